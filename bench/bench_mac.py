#!/usr/bin/env python3
"""What a MAC on each hop costs the gateway: CPU per transaction, plaintext against MACs, in one run.

    python bench/bench_mac.py                      # journal off and on; software keys
    python bench/bench_mac.py --pkcs11             # also keys on a throwaway SoftHSM2 token
    python bench/bench_mac.py --journal off --loads 64 --count 20000 --rounds 3
    python bench/bench_mac.py --hops upstream      # MACs on the switch link only (front ends on TLS, say)

For each key store it starts the instant responder (signing its answers with the switch's key when
MACs are on), a gateway (MACs on the listener and the upstream, keys imported into its security
module before it starts) and the load generator (signing each request with the front end's key),
and measures the gateway's CPU per answered transaction at each load, the same way
bench_gateway.py does. Rows are measured in turn, plaintext then MACs, ``--rounds`` times; the
ratios printed are the medians of each round's MAC / plaintext ratio (the machine is shared and
noisy: a ratio taken within a round is what compares).

The target in issue 14: a MAC per hop at most 1.2x the plaintext CPU (software keys).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_gateway beside this script

from bench_gateway import LOADS, Proc, measure, wait_ready

from iso_gateway.config import Config
from iso_gateway.keys import open_security_module
from iso_gateway.security.pkcs11 import find_softhsm2
from iso_gateway.sim.integrity import free_port

# Test keys, in clear, for a benchmark only: (front end's, switch's) per algorithm.
KEYS = {"retail": (bytes.fromhex("0123456789ABCDEFFEDCBA9876543210"), bytes.fromhex("89ABCDEF0123456776543210FEDCBA98")),
        "aes-cmac": (bytes.fromhex("2B7E151628AED2A6ABF7158809CF4F3C"), bytes.fromhex("603DEB1015CA71BE2B73AEF0857D7781"))}
PIN = "123456"


def config_text(port: int, switch_port: int, state: Path, journal: bool, mac: str, security: str,
                front_mac: bool = True) -> str:
    macs = (f'\n[listeners.mac]\nkey = "ecom.{mac}"\n' if front_mac else "",
            f'\n[upstreams.mac]\nkey = "cmi.{mac}"\n') if mac else ("", "")
    return f"""
[journal]
enabled = {str(journal).lower()}
path = "{state / 'journal.sqlite3'}"
{security}
[log]
level = "WARNING"
file = "{state / 'gateway.log'}"
[metrics]
enabled = true
port = 0
[[listeners]]
name = "ecom"
port = {port}
max_in_flight = 256
{macs[0]}
[[upstreams]]
name = "cmi"
hosts = ["127.0.0.1:{switch_port}"]
connections = 1
sign_on = true
echo_interval = 0
{macs[1]}
[[routes]]
name = "all"
upstream = "cmi"
timeout = 30
"""


def security_section(kind: str, keys: Path) -> str:
    """The [security] table: a software key file with its KEK outside the state folder, or a token."""
    if kind == "software":
        kek = keys.parent / "kek" / "kek.hex"  # never beside the key file it protects
        kek.parent.mkdir(exist_ok=True)
        if not kek.exists():
            kek.write_text(os.urandom(32).hex() + "\n")
            kek.chmod(0o600)
        return f'[security]\nmodule = "software"\nkey_file = "{keys / "keys.bin"}"\nkek_file = "{kek}"\n'
    pin = keys / "pin"
    pin.write_text(PIN + "\n")
    pin.chmod(0o600)
    return (f'[security]\nmodule = "pkcs11"\nlibrary = "{find_softhsm2()}"\ntoken_label = "bench"\n'
            f'pin_file = "{pin}"\n')


def make_token(directory: Path) -> None:
    """A throwaway SoftHSM2 token (its own config; the gateway inherits SOFTHSM2_CONF)."""
    tokens = directory / "tokens"
    tokens.mkdir(parents=True)
    conf = directory / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", "bench", "--pin", PIN, "--so-pin",
                    "12345678"], check=True, capture_output=True, timeout=60)


def import_keys(cfg_path: Path, algorithm: str) -> None:
    import tomllib
    cfg = Config.model_validate(tomllib.loads(cfg_path.read_text()))
    module = open_security_module(cfg, str(cfg_path), create=True)
    front, switch = KEYS[algorithm]
    for label, key in ((f"ecom.{algorithm}", front), (f"cmi.{algorithm}", switch)):
        try:
            module.check_value(label)
        except Exception:  # noqa: BLE001 - not there yet
            module.import_key(label, key, usage="mac", algorithm=algorithm)  # type: ignore[attr-defined]
    module.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--journal", default="off,on", help="off, on, or both (default)")
    ap.add_argument("--loads", default="8,64,seq16", help=f"among {', '.join(LOADS)}")
    ap.add_argument("--algorithms", default="retail,aes-cmac", help="among retail, aes-cmac (default: both)")
    ap.add_argument("--count", type=int, default=20000, help="transactions per measurement")
    ap.add_argument("--rounds", type=int, default=2, help="rounds of plaintext then each MAC, measured in turn")
    ap.add_argument("--pkcs11", action="store_true", help="also measure keys on a SoftHSM2 token")
    ap.add_argument("--hops", choices=("both", "upstream"), default="both",
                    help="MACs on both hops (default: four MACs a transaction) or on the switch link only (two)")
    args = ap.parse_args()
    journals = [j == "on" for j in args.journal.split(",")]
    loads = args.loads.split(",")
    algorithms = args.algorithms.split(",")
    kinds = ["software"] + (["pkcs11"] if args.pkcs11 else [])
    if args.pkcs11 and (shutil.which("softhsm2-util") is None or find_softhsm2() is None):
        print("--pkcs11 needs Debian's softhsm2 package", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="iso-gw-bench-mac-"))
    if args.pkcs11:
        make_token(work / "hsm")
    os.environ.setdefault("XDG_CONFIG_HOME", str(work / "config"))
    print(f"iso-gateway MAC benchmark: {os.cpu_count()} cores, Python {sys.version.split()[0]}, {args.count} "
          f"transactions per row, the instant responder as the switch, MACs on {'both hops' if args.hops == 'both' else 'the switch link only'}",
          flush=True)
    print(f"{'keys':9} {'MAC':9} {'journal':8} {'load':6} {'plain µs/tx':>12} {'MAC µs/tx':>10} {'ratio':>7}", flush=True)
    switch_ports = {mode: free_port() for mode in ["", *algorithms]}
    switches = []
    for mode, sport in switch_ports.items():
        argv = [sys.executable, "-m", "iso_gateway.load.responder", "--port", str(sport)]
        if mode:
            argv += ["--mac-key", KEYS[mode][1].hex(), "--mac-algorithm", mode]
        switches.append(Proc(argv, sport))
    try:
        for kind in kinds:
            keys = work / f"keys-{kind}"
            keys.mkdir()
            security = security_section(kind, keys)
            for journal in journals:
                cpus: dict[tuple[str, str], list[float]] = {}
                ratios: dict[tuple[str, str], list[float]] = {}
                for r in range(args.rounds):
                    for mode in ["", *algorithms]:
                        state = work / f"{kind}-{journal}-{mode or 'plain'}-{r}"
                        state.mkdir()
                        port = free_port()
                        cfg = state / "gw.toml"
                        cfg.write_text(config_text(port, switch_ports[mode], state, journal, mode, security, args.hops == "both"))
                        if mode:
                            import_keys(cfg, mode)
                        gw = Proc([sys.executable, "-m", "iso_gateway", "run", "--config", str(cfg)], port)
                        try:
                            extra = ["--mac-key", KEYS[mode][0].hex(), "--mac-algorithm", mode] if mode and args.hops == "both" else []
                            wait_ready(port, extra=extra)
                            for load in loads:
                                res = measure(mode or "plain", load, port, gw.proc.pid, args.count, extra=extra)
                                assert res.cpu_us is not None
                                cpus.setdefault((load, mode), []).append(res.cpu_us)
                        finally:
                            gw.stop()
                    for load in loads:
                        for mode in algorithms:
                            ratios.setdefault((load, mode), []).append(cpus[load, mode][-1] / cpus[load, ""][-1])
                for mode in algorithms:
                    for load in loads:
                        print(f"{kind:9} {mode:9} {'on' if journal else 'off':8} {load:6} "
                              f"{statistics.median(cpus[load, '']):12.1f} {statistics.median(cpus[load, mode]):10.1f} "
                              f"{statistics.median(ratios[load, mode]):6.2f}x", flush=True)
    finally:
        for s in switches:
            s.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
