"""The gateway benchmark: throughput, latency and CPU per transaction, gateway vs direct, in one run.

Starts a switch (the instant responder by default, or the simulator), then for
each configuration a gateway in front of it, and drives both with
`iso-gateway load` (a separate process) using the 16-field 0100 of
specs/load/bench.toml. For each load shape (8 in flight on one connection,
64 in flight on one connection, 16 connections sending one at a time) it
prints throughput, p50/p99 latency and the gateway's CPU time per transaction
(user + sys of the gateway's processes divided by transactions: stable on a
noisy machine, unlike throughput). "direct" sends the same load straight to
the switch: the baseline the gateway's added latency is read against. "byte
pump" relays the same load through bench/pump.py, which cuts frames, sends every
front connection's over one switch connection and hands answers back by order,
with no ISO 8583 work at all: the CPU any Python relay pays (system calls,
interpreter) before doing anything, so a row minus the pump's is the cost of the
gateway's own work. (It needs a switch that answers in order: the responder,
not the simulator.)

    python bench/bench_gateway.py                  # every configuration and load, ~2 minutes here
    python bench/bench_gateway.py --quick          # fewer transactions
    python bench/bench_gateway.py --configs off,on --loads 8 --json
    python bench/bench_gateway.py --tls --configs off,on --no-pump --ab-rounds 0   # plaintext and TLS rows
    python bench/bench_gateway.py --configs on,pg --loads 8,64   # SQLite vs PostgreSQL journal
    python bench/bench_gateway.py --configs pg --loads 8 --failover 3000   # + fail-over through HAProxy

--tls adds, for each configuration, a row with TLS on both legs (the load generator to the gateway
in mutual TLS, the gateway to a TLS instant responder; TLS 1.3, ECDSA P-256 throwaway certificates
made for the run), measured in the same run as the plaintext rows, and prints TLS / plaintext CPU
per transaction (the issue's target: at most 1.3x at 64 in flight).

"pg" journals on PostgreSQL: a throwaway server (tests/pgserver.py: Debian's initdb and pg_ctl, on
127.0.0.1, fsync off as in the tests) started for the run; the server's CPU per transaction is
counted apart from the gateway's (its own column). ``--failover N`` runs the pair (two nodes on
that database behind HAProxy, deploy/haproxy) with N authorizations, kills each node once
(iso_gateway.sim.integrity.run_pair_check) and prints how long front ends waited to be served
again, and how long the survivor took to send every reversal the dead node owed.

Optional side-by-side: --jpos-gateway "CMD {front_port} {switch_host} {switch_port}"
runs another gateway (e.g. a jPOS QServer+QMUX build) under the same loads,
and reports the ratio of CPU per transaction; it gets --jpos-warmup requests
(60,000) first, so a JVM is measured with its hot code compiled.

Nothing here asserts a figure; it prints them. 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from iso_gateway.sim.integrity import free_port

ROOT = Path(__file__).resolve().parent.parent
HZ = os.sysconf("SC_CLK_TCK")

LOADS = {  # name -> (connections, in flight per connection)
    "8": (1, 8),
    "64": (1, 64),
    "seq16": (16, 1),
}
# Rows that are not a gateway configuration.
NAMES = {"pump": "byte pump (floor)"}
# name -> (journal, metrics, workers, description)
CONFIGS = {
    "off": (False, True, 1, "journal off"),
    "on": (True, True, 1, "journal on"),
    "nometrics": (False, False, 1, "journal off, metrics off"),
    "w2": (True, True, 2, "journal on, 2 workers"),
    "pg": (True, True, 1, "journal on PostgreSQL"),
}


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on 127.0.0.1:{port} after {timeout} s")


def process_tree(pid: int) -> list[int]:
    out = [pid]
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as fh:
                for child in fh.read().split():
                    out.extend(process_tree(int(child)))
    except OSError:
        pass
    return out


def cpu_seconds(pid: int) -> float:
    """CPU of a process and everything under it, children that exited included (a journal
    indexer exits when idle: its time moves to its parent's cutime/cstime once reaped)."""
    total = 0
    for p in process_tree(pid):
        try:
            with open(f"/proc/{p}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            total += sum(int(f) for f in fields[11:15])  # utime, stime, cutime, cstime
        except OSError:
            pass
    return total / HZ


def gateway_config(path: Path, port: int, switch_port: int, state: Path, journal: bool, metrics: bool,
                   tls: Path | None = None, dsn: str = "") -> None:
    """The gateway's configuration; with ``tls`` (a folder of bench_tls.make_files), TLS on both legs;
    with ``dsn``, the journal on that PostgreSQL database."""
    backend = f'backend = "postgresql"\ndsn = "{dsn}"\nnode = "bench"\n' if dsn else ""
    listener_tls = upstream_tls = ""
    if tls is not None:
        listener_tls = f"""
[listeners.tls]
cert_chain = "{tls / 'server.crt'}"
key = "{tls / 'server.key'}"
client_certs = "required"
client_ca = ["{tls / 'ca.crt'}"]
"""
        upstream_tls = f"""
[upstreams.tls]
ca = ["{tls / 'ca.crt'}"]
server_name = "switch.bench"
cert_chain = "{tls / 'client.crt'}"
key = "{tls / 'client.key'}"
"""
    path.write_text(f"""
[journal]
{backend}enabled = {str(journal).lower()}
path = "{state / 'journal.sqlite3'}"
key_file = "{state / 'pan.key'}"
[log]
level = "WARNING"
file = "{state / 'gateway.log'}"
[metrics]
enabled = {str(metrics).lower()}
port = 0
[[listeners]]
name = "ecom"
port = {port}
max_in_flight = 256
{listener_tls}
[[upstreams]]
name = "cmi"
hosts = ["127.0.0.1:{switch_port}"]
connections = 1
sign_on = true
echo_interval = 0
{upstream_tls}
[[routes]]
name = "all"
upstream = "cmi"
timeout = 30
""")


@dataclass
class Result:
    config: str
    load: str
    transactions: int
    throughput: float
    p50_ms: float
    p99_ms: float
    cpu_us: float | None  # gateway CPU per transaction (None for direct)
    db_cpu_us: float | None = None  # the PostgreSQL server's CPU per transaction ("pg")


def tls_load_args(tls: Path | None) -> list[str]:
    """``iso-gateway load``'s options for a TLS gateway (mutual TLS with the run's certificates)."""
    if tls is None:
        return []
    return ["--tls", "--tls-ca", str(tls / "ca.crt"), "--tls-server-name", "switch.bench",
            "--tls-cert", str(tls / "client.crt"), "--tls-key", str(tls / "client.key")]


def run_load(port: int, connections: int, in_flight: int, count: int, tls: Path | None = None,
             extra: Sequence[str] = ()) -> dict:
    """``extra``: more options for ``iso-gateway load`` (bench_mac.py: ``--mac-key``)."""
    argv = [sys.executable, "-m", "iso_gateway", "load", "--target", f"127.0.0.1:{port}", "--mix", "bench",
            "--connections", str(connections), "--in-flight", str(in_flight), "--quiet", "--count", str(count),
            "--json", *tls_load_args(tls), *extra]
    out = subprocess.run(argv, check=True, capture_output=True, text=True, timeout=600)
    return json.loads(out.stdout)


def measure(name: str, load: str, port: int, pid: int | None, count: int, tls: Path | None = None,
            extra: Sequence[str] = (), db_pid: int | None = None) -> Result:
    conns, in_flight = LOADS[load]
    run_load(port, conns, in_flight, max(500, count // 10), tls, extra)  # warm up (and the handshakes)
    before = cpu_seconds(pid) if pid else 0.0
    db_before = cpu_seconds(db_pid) if db_pid else 0.0
    report = run_load(port, conns, in_flight, count, tls, extra)
    after = cpu_seconds(pid) if pid else 0.0
    db_after = cpu_seconds(db_pid) if db_pid else 0.0
    answered = report["answered"]
    lat = report["latency_ms"]
    return Result(name, load, answered, report["throughput_rps"], lat["p50"], lat["p99"],
                  (after - before) / answered * 1e6 if pid and answered else None,
                  (db_after - db_before) / answered * 1e6 if db_pid and answered else None)


class ThrowawayPostgres:
    """tests/pgserver.py's server for "pg" and --failover: ``dsn()`` gives a new empty database;
    ``pid`` is the postmaster's (its backends are its children: their CPU is the database's)."""

    def __init__(self) -> None:
        sys.path.insert(0, str(ROOT / "tests"))
        from pgserver import PgServer  # type: ignore[import-not-found]

        self.server = PgServer().start()
        self.pid = int((self.server.data / "postmaster.pid").read_text().split()[0])

    def dsn(self) -> str:
        return self.server.conninfo(self.server.create_database())

    def stop(self) -> None:
        self.server.destroy()


class Proc:
    def __init__(self, argv: list[str], port: int) -> None:
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        wait_port(port)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def wait_ready(port: int, tls: Path | None = None, extra: Sequence[str] = ()) -> None:
    """Until an authorization through the gateway is approved (its link is signed on)."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            r = run_load(port, 1, 1, 1, tls, extra)
            if r["response_codes"].get("00"):
                return
        except subprocess.CalledProcessError:
            pass
        time.sleep(0.2)
    raise RuntimeError("the gateway never became ready")


def rss_mb(pid: int) -> float:
    total = 0.0
    for p in process_tree(pid):
        try:
            with open(f"/proc/{p}/status") as fh:
                for line in fh:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) / 1024
        except OSError:
            pass
    return total


def open_loop(port: int, rate: float, seconds: float, connections: int = 4, tls: Path | None = None) -> dict:
    argv = [sys.executable, "-m", "iso_gateway", "load", "--target", f"127.0.0.1:{port}", "--mix", "bench",
            "--connections", str(connections), "--rate", str(rate), "--duration", str(seconds), "--quiet", "--json",
            *tls_load_args(tls)]
    return json.loads(subprocess.run(argv, check=True, capture_output=True, text=True, timeout=600).stdout)


def at_rate(port: int, pid: int, rate: float, tls: Path | None) -> float:
    """The gateway's CPU per transaction under the same open-loop load (``rate`` tx/s over 16
    connections for 10 s): the same arrivals whatever the load generator's own speed, so a plaintext
    and a TLS gateway are compared on equal terms."""
    open_loop(port, rate, 2, 16, tls)  # warm up (and the handshakes)
    before = cpu_seconds(pid)
    report = open_loop(port, rate, 10, 16, tls)
    return (cpu_seconds(pid) - before) / max(1, report["answered"]) * 1e6


def journal_share(state: Path, switch_port: int, loads: list[str], count: int, rounds: int) -> list[str]:
    """Throughput with the journal on as a share of off, robust to a noisy machine: both
    gateways run side by side and each load is measured off, on, off, on... (``rounds`` pairs);
    the share is the median of the pairs' ratios."""
    gws: dict[bool, tuple[Proc, int]] = {}
    try:
        for journal in (False, True):
            port = free_port()
            cfg = state / f"share-{journal}.toml"
            gateway_config(cfg, port, switch_port, state / f"share-{journal}", journal=journal, metrics=True)
            gws[journal] = (Proc([sys.executable, "-m", "iso_gateway", "run", "--config", str(cfg)], port), port)
            wait_ready(port)
        lines = []
        for load in loads:
            ratios = []
            for _ in range(rounds):
                tx = {j: measure("share", load, port, proc.proc.pid, count).throughput for j, (proc, port) in gws.items()}
                ratios.append(tx[True] / tx[False])
            ratios.sort()
            lines.append(f"journal on / off throughput, {load}: median {ratios[len(ratios) // 2]:.0%} of {rounds} "
                         f"pairs measured in turn ({', '.join(f'{r:.0%}' for r in ratios)})")
        return lines
    finally:
        for proc, _ in gws.values():
            proc.stop()


def extras(state: Path, switch_port: int, count: int, idle_connections: int) -> list[str]:
    """Idle connections, linear cost, latency at half the maximum throughput, a SAF backlog."""
    import resource
    import sqlite3

    lines: list[str] = []
    for journal in (False, True):
        name = "journal on" if journal else "journal off"
        port = free_port()
        cfg = state / f"extras-{journal}.toml"
        gateway_config(cfg, port, switch_port, state / f"extras-{journal}", journal=journal, metrics=True)
        cfg.write_text(cfg.read_text().replace("max_in_flight = 256", "max_in_flight = 256\nmax_connections = 20000\nmax_connections_per_source = 20000"))
        gw = Proc([sys.executable, "-m", "iso_gateway", "run", "--config", str(cfg)], port)
        try:
            wait_ready(port)
            pid = gw.proc.pid
            # Latency at half the maximum throughput (open loop, from intended send times).
            peak = measure("extras", "64", port, pid, count).throughput
            half = peak / 2
            direct = open_loop(switch_port, half, 10)
            through = open_loop(port, half, 10)
            added = through["latency_ms"]["p99"] - direct["latency_ms"]["p99"]
            lines.append(f"{name}: half of max throughput ({peak:.0f} tx/s closed loop) = {half:.0f} tx/s open loop: "
                         f"p99 {through['latency_ms']['p99']:.2f} ms via the gateway, "
                         f"{direct['latency_ms']['p99']:.2f} ms direct: +{added:.2f} ms added")
            # Linear cost: the same load, 10x longer.
            small = measure("extras", "8", port, pid, count)
            large = measure("extras", "8", port, pid, count * 10)
            assert small.cpu_us is not None and large.cpu_us is not None  # the gateway's CPU is always measured
            lines.append(f"{name}: linear cost at 8 in flight: {small.cpu_us:.1f} µs/tx over {count} tx, "
                         f"{large.cpu_us:.1f} µs/tx over {count * 10} tx (ratio {large.cpu_us / small.cpu_us:.2f})")
            if not journal:
                continue
            # Idle front-end connections: memory and CPU while nothing happens.
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            settle = time.monotonic() + 15
            while len(process_tree(pid)) > 1 and time.monotonic() < settle:
                time.sleep(0.5)  # the journal's indexer exits when idle: measure without it
            rss0 = rss_mb(pid)
            socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(idle_connections)]
            time.sleep(3)
            cpu0 = cpu_seconds(pid)
            time.sleep(10)
            idle_cpu = cpu_seconds(pid) - cpu0
            rss1 = rss_mb(pid)
            for sk in socks:
                sk.close()
            lines.append(f"{idle_connections} idle front-end connections: RSS {rss0:.0f} -> {rss1:.0f} MB, "
                         f"CPU while idle for 10 s: {idle_cpu:.2f} s")
            # A SAF backlog of 100,000 reversals (due tomorrow: counted, not sent) vs none.
            before = measure("extras", "8", port, pid, count)
            db = sqlite3.connect(state / "extras-True" / "journal.sqlite3", timeout=30)
            now = time.time()
            with db:
                db.executemany(
                    "INSERT INTO saf (id, txn_id, upstream, state, reason, mti, stan, f90, attempts, next_attempt,"
                    " created, updated, worker) VALUES (?, NULL, 'cmi', 'pending', 'bench', '0420', '', '', 0, ?,"
                    " ?, ?, 0)", [(10**18 + i, now + 86400, now, now) for i in range(100_000)])
            # Copied into the database file here, so the gateway's indexer (whose CPU is counted)
            # doesn't bill the live path for checkpointing the bench's 100,000 inserts.
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            db.close()
            time.sleep(2)
            after = measure("extras", "8", port, pid, count)
            lines.append(f"SAF backlog of 100,000 (journal on, 8 in flight): {before.cpu_us:.1f} -> {after.cpu_us:.1f} "
                         f"µs/tx, p99 {before.p99_ms:.2f} -> {after.p99_ms:.2f} ms, {before.throughput:.0f} -> "
                         f"{after.throughput:.0f} tx/s")
        finally:
            gw.stop()
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=30000, help="transactions per measurement")
    ap.add_argument("--quick", action="store_true", help="5,000 transactions per measurement")
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"among {', '.join(CONFIGS)}")
    ap.add_argument("--loads", default=",".join(LOADS), help=f"among {', '.join(LOADS)}")
    ap.add_argument("--switch", choices=("responder", "sim"), default="responder",
                    help="the switch: the instant responder (default) or the simulator")
    ap.add_argument("--jpos-gateway", help='command for another gateway: "... {front_port} {switch_host} {switch_port}"')
    ap.add_argument("--jpos-warmup", type=int, default=60_000,
                    help="requests sent to the --jpos-gateway before its rows are measured (its JIT warm-up)")
    ap.add_argument("--no-pump", dest="pump", action="store_false",
                    help="skip the byte pump (bench/pump.py: the same loads relayed with no ISO 8583 work, the floor; "
                         "always skipped with --switch sim)")
    ap.add_argument("--tls", action="store_true",
                    help="also each configuration with TLS on both legs (mutual TLS from the load generator, TLS to a "
                         "TLS instant responder), in the same run, and the TLS / plaintext CPU ratio")
    ap.add_argument("--tls-rate", type=float, default=4000.0, metavar="R",
                    help="with --tls: also compare plaintext and TLS at this fixed rate (open loop, 16 connections; "
                         "0: not)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--failover", type=int, default=0, metavar="N",
                    help="also: the pair behind HAProxy (needs haproxy) with N authorizations, each node SIGKILLed "
                         "once: fail-over seconds and the survivor's catch-up")
    ap.add_argument("--extras", action="store_true",
                    help="also: linear cost, latency at half the maximum, a 100,000-item SAF backlog, idle connections")
    ap.add_argument("--idle-connections", type=int, default=10_000)
    ap.add_argument("--ab-rounds", type=int, default=3,
                    help="rounds of the journal on/off comparison with both gateways up, measured in turn (0: none)")
    args = ap.parse_args()
    count = 5000 if args.quick else args.count
    configs = [c for c in args.configs.split(",") if c]
    loads = [x for x in args.loads.split(",") if x]
    state = Path(tempfile.mkdtemp(prefix="iso-gateway-bench-"))
    switch_port = free_port()
    if args.switch == "sim":
        switch_argv = [sys.executable, "-m", "iso_gateway", "sim-switch", "--port", str(switch_port)]
    else:
        switch_argv = [sys.executable, "-m", "iso_gateway.load.responder", "--port", str(switch_port)]
    switch = Proc(switch_argv, switch_port)
    tls_dir: Path | None = None
    tls_switch: Proc | None = None
    if args.tls:
        from bench_tls import make_files  # bench/ is the script's folder

        tls_dir = state / "tls"
        tls_dir.mkdir()
        make_files(tls_dir, "ec")
        tls_switch_port = free_port()
        tls_switch = Proc([sys.executable, "-m", "iso_gateway.load.responder", "--port", str(tls_switch_port),
                           "--tls-cert", str(tls_dir / "server.crt"), "--tls-key", str(tls_dir / "server.key")],
                          tls_switch_port)
    results: list[Result] = []
    rate_cpu: dict[tuple[str, bool], float] = {}  # (config, tls) -> µs/tx at --tls-rate
    postgres = ThrowawayPostgres() if "pg" in configs or args.failover else None
    failover: dict | None = None
    try:
        for load in loads:
            results.append(measure("direct", load, switch_port, None, count))
        if args.pump and args.switch == "responder":  # the pump matches answers by order
            port = free_port()
            pump = Proc([sys.executable, str(ROOT / "bench" / "pump.py"), str(port), str(switch_port)], port)
            try:
                for load in loads:
                    results.append(measure("pump", load, port, pump.proc.pid, count))
            finally:
                pump.stop()
        for name in configs:
            journal, metrics, workers, _ = CONFIGS[name]
            port = free_port()
            cfg = state / f"{name}.toml"
            dsn = postgres.dsn() if name == "pg" and postgres is not None else ""
            gateway_config(cfg, port, switch_port, state / name, journal, metrics, dsn=dsn)
            argv = [sys.executable, "-m", "iso_gateway", "run", "--config", str(cfg)]
            if workers > 1:
                argv += ["--workers", str(workers)]
            gw = Proc(argv, port)
            try:
                wait_ready(port)
                db_pid = postgres.pid if dsn and postgres is not None else None
                for load in loads:
                    results.append(measure(name, load, port, gw.proc.pid, count, db_pid=db_pid))
                if tls_dir is not None and args.tls_rate:
                    rate_cpu[name, False] = at_rate(port, gw.proc.pid, args.tls_rate, None)
            finally:
                gw.stop()
            if tls_dir is None:
                continue
            port = free_port()
            cfg = state / f"{name}-tls.toml"
            gateway_config(cfg, port, tls_switch_port, state / f"{name}-tls", journal, metrics, tls=tls_dir)
            argv = [sys.executable, "-m", "iso_gateway", "run", "--config", str(cfg)]
            if workers > 1:
                argv += ["--workers", str(workers)]
            gw = Proc(argv, port)
            try:
                wait_ready(port, tls_dir)
                for load in loads:
                    results.append(measure(f"{name}+tls", load, port, gw.proc.pid, count, tls_dir))
                if args.tls_rate:
                    rate_cpu[name, True] = at_rate(port, gw.proc.pid, args.tls_rate, tls_dir)
            finally:
                gw.stop()
        share_lines = journal_share(state, switch_port, loads, count, args.ab_rounds) if args.ab_rounds else []
        extra_lines = extras(state, switch_port, count, args.idle_connections) if args.extras else []
        if args.jpos_gateway:
            port = free_port()
            argv = shlex.split(args.jpos_gateway.format(front_port=port, switch_host="127.0.0.1",
                                                        switch_port=switch_port))
            other = Proc(argv, port)
            try:
                wait_ready(port)
                if args.jpos_warmup:  # a JVM compiles its hot code after thousands of calls: measure it warm
                    run_load(port, 1, 64, args.jpos_warmup)
                for load in loads:
                    results.append(measure("jpos", load, port, other.proc.pid, count))
            finally:
                other.stop()
        if args.failover and postgres is not None:
            import trio

            from iso_gateway.sim.integrity import run_pair_check

            failover = trio.run(run_pair_check, args.failover, 8583, postgres.dsn())
    finally:
        switch.stop()
        if tls_switch is not None:
            tls_switch.stop()
        if postgres is not None:
            postgres.stop()
    if args.json:
        print(json.dumps({"rows": [r.__dict__ for r in results], "extras": extra_lines, "failover": failover,
                          "tls_rate_cpu_us": {f"{n}{'+tls' if t else ''}": v for (n, t), v in rate_cpu.items()}},
                         indent=1))
        return 0
    print(f"iso-gateway benchmark: {platform.node()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"switch={args.switch}, {count} transactions per row (16-field 0100, ascii4, loopback)")
    print(f"{'config':<26} {'load':<7} {'tx/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'CPU µs/tx':>10} {'vs jpos':>8}")
    jpos = {r.load: r.cpu_us for r in results if r.config == "jpos" and r.cpu_us is not None}
    for r in results:
        base = r.config.removesuffix("+tls")
        desc = CONFIGS[base][3] if base in CONFIGS else NAMES.get(r.config, r.config)
        if r.config.endswith("+tls"):
            desc += ", TLS"
        cpu = f"{r.cpu_us:10.1f}" if r.cpu_us is not None else f"{'-':>10}"
        ratio = f"{r.cpu_us / jpos[r.load]:7.2f}x" if r.cpu_us and jpos.get(r.load) and r.config != "jpos" else ""
        print(f"{desc:<26} {r.load:<7} {r.throughput:8.0f} {r.p50_ms:8.2f} {r.p99_ms:8.2f} {cpu} {ratio:>8}")
    direct = {r.load: r for r in results if r.config == "direct"}
    tls_rows = [(r, plain) for r in results if r.config.endswith("+tls") and r.cpu_us
                for plain in results if plain.config == r.config.removesuffix("+tls") and plain.load == r.load
                and plain.cpu_us]
    if tls_rows:
        print("TLS on both legs / plaintext, CPU per transaction (the issue's target: at most 1.3x at 64 in flight):")
        for r, plain in tls_rows:
            assert r.cpu_us is not None and plain.cpu_us is not None
            print(f"  {plain.config:<10} {r.load:<6} {plain.cpu_us:6.1f} -> {r.cpu_us:6.1f} µs/tx  "
                  f"{r.cpu_us / plain.cpu_us:.2f}x")
        for name in configs:
            if (name, False) in rate_cpu and (name, True) in rate_cpu:
                plain_us, tls_us = rate_cpu[name, False], rate_cpu[name, True]
                print(f"  {name:<10} {args.tls_rate:.0f}/s  {plain_us:6.1f} -> {tls_us:6.1f} µs/tx  {tls_us / plain_us:.2f}x"
                      "   (fixed rate, open loop, 16 connections: the same arrivals both ways)")
    for line in extra_lines:
        print(line)
    by = {(r.config, r.load): r for r in results}
    shares = [f"{load} {by['on', load].throughput / by['off', load].throughput:.0%}"
              for load in LOADS if ("on", load) in by and ("off", load) in by and by["off", load].throughput]
    if shares:
        print("throughput with the journal on, as a share of off, from the rows above (the journal issue asks at "
              "least 75%): " + ", ".join(shares))
    for line in share_lines:
        print(line)
    pg_rows = [r for r in results if r.config == "pg"]
    if pg_rows:
        print("journal on PostgreSQL (same machine, fsync off as in the tests), the server's own CPU apart:")
        for r in pg_rows:
            share = (f", {r.throughput / by['on', r.load].throughput:.0%} of SQLite's throughput"
                     if ("on", r.load) in by and by["on", r.load].throughput else "")
            db_cpu = f"{r.db_cpu_us:.1f}" if r.db_cpu_us is not None else "-"
            print(f"  {r.load:<6} {r.throughput:8.0f} tx/s, gateway {r.cpu_us or 0:.1f} µs/tx + database {db_cpu} µs/tx"
                  f"{share}")
    if failover is not None:
        print(f"fail-over through HAProxy ({failover['requests']} authorizations, each node SIGKILLed once): front ends "
              f"served again within {failover['failover_seconds_max']} s at most ({failover['connections_failed_over']} "
              f"connections moved); every reversal owed sent and acknowledged "
              f"{failover['seconds_from_last_kill_to_queue_empty']} s after the last kill; "
              f"{failover['violations']} violations of the money invariant")
    floor = {r.load: r.cpu_us for r in results if r.config == "pump" and r.cpu_us}
    if floor:
        print("CPU above the floor (a row minus the byte pump's, same load), µs/tx:")
        for r in results:
            if r.config not in ("direct", "pump") and r.cpu_us and r.load in floor:
                print(f"  {r.config:<10} {r.load:<6} {r.cpu_us - floor[r.load]:6.1f}")
        for load, jpos_cpu in jpos.items():
            if load in floor:
                print(f"  0.6x jpos at {load} ({0.6 * jpos_cpu:.1f} µs/tx) leaves {0.6 * jpos_cpu - floor[load]:.1f} µs/tx above "
                      f"the floor")
    print("latency the gateway adds (p50 / p99, vs direct):")
    for r in results:
        if r.config != "direct" and r.load in direct:
            d = direct[r.load]
            print(f"  {r.config:<10} {r.load:<6} +{r.p50_ms - d.p50_ms:.2f} ms / +{r.p99_ms - d.p99_ms:.2f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
