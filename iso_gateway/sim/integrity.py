"""The integrity check: thousands of authorizations through a gateway that is killed, against a switch that misbehaves.

Runs the switch simulator (in this process, with seeded chaos: delays, drops,
closed connections) and the gateway (a subprocess, SIGKILLed and restarted),
drives e-commerce authorizations through it, lets the store-and-forward queue
drain, and reconciles what the switch saw with what the front ends were told:

- every authorization the switch approved was either received as an approval
  by the front end, or reversed (a reversal the switch acknowledged);
- no original was reversed twice;
- every request was answered, unless the gateway was killed while holding it,
  and then, if the switch saw it, the journal has it.

Usage: python -m iso_gateway.sim.integrity [--requests N] [--kills K] [--seed S]
Prints the counts and the number of violations; exits 1 if there is any.
Everything runs on 127.0.0.1 and is bounded in count and time.
"""

from __future__ import annotations

import argparse
import itertools
import json
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import trio

from .client import ConnectionClosed, FrontEndClient, RequestTimeout, sample_auth
from .switch import SwitchSimulator

# Amount endings and their share: most approve, some decline, a few answer late (after the gateway's timeout).
AMOUNTS = [10000] * 14 + [10051, 10005] + [10799]


@dataclass
class Outcome:
    sent: int = 0
    answered: dict[str, str] = field(default_factory=dict)  # rrn -> response code
    killed: set[str] = field(default_factory=set)  # rrn of requests lost with a killed gateway
    duplicates: int = 0


def free_port() -> int:
    """A port on 127.0.0.1 that was free a moment ago (for the gateway processes the checks start)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(path: Path, port: int, switch_port: int, state: Path, kek_dir: Path) -> None:
    path.write_text(f"""
[gateway]
drain_timeout = 2.0
[journal]
path = "{state / 'journal.sqlite3'}"
[security]
key_file = "{state / 'keys.bin'}"
kek_file = "{kek_dir / 'kek.hex'}"
[log]
file = "{state / 'gateway.log'}"
[metrics]
enabled = false
[[listeners]]
name = "ecom"
port = {port}
max_in_flight = 64
[[upstreams]]
name = "cmi"
hosts = ["127.0.0.1:{switch_port}"]
connections = 2
sign_on = true
echo_interval = 0
reconnect_initial = 0.05
reconnect_max = 0.5
reversal_timeout = 1.0
saf_first_delay = 0.2
saf_retry_initial = 0.2
saf_retry_max = 1.0
saf_budget = 1000
[[routes]]
name = "all"
upstream = "cmi"
timeout = 0.5
""")


class GatewayProcess:
    def __init__(self, config: Path, port: int) -> None:
        self.config = config
        self.port = port
        self.proc: trio.Process | None = None

    async def start(self) -> None:
        self.proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "iso_gateway", "run", "--config", str(self.config)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        with trio.fail_after(20):
            while True:
                try:
                    c = await FrontEndClient.connect("127.0.0.1", self.port, "iso87ascii", "ascii4", connect_timeout=1)
                except (OSError, RequestTimeout):
                    await trio.sleep(0.05)
                    continue
                # Ready when an authorization comes back approved (the link is signed on).
                probe = sample_auth(int(time.time() * 1000) % 999_999 + 1, 10000, terminal="READY000")
                probe["37"] = "READY" + probe["11"] + "0"  # not a reconciled RRN (those are all digits)
                resp = await c.request(probe, timeout=2)
                await c.aclose()
                if resp.get("39") == "00":
                    return
                await trio.sleep(0.1)

    async def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            with trio.move_on_after(15):
                await self.proc.wait()
            if self.proc.returncode is None:
                self.proc.kill()
                await self.proc.wait()


async def _drive(gateway: GatewayProcess, total: int, connections: int, in_flight: int, kills: int,
                 outcome: Outcome) -> None:
    rrns = itertools.count(1)
    stans: dict[str, itertools.count] = {}
    next_kill = [total * (k + 1) // (kills + 1) for k in range(kills)]
    lock = trio.Lock()

    async def killer() -> None:
        for at in next_kill:
            while outcome.sent < at:  # noqa: ASYNC110 - the drivers' shared count
                await trio.sleep(0.01)
            await gateway.kill()
            await trio.sleep(0.2)
            await gateway.start()

    async def worker(w: int) -> None:
        terminal = f"INT{w:05d}"
        stan_counter = stans.setdefault(terminal, itertools.count(1))
        client: FrontEndClient | None = None
        while outcome.sent < total:
            if client is None or client.closed:
                try:
                    client = await FrontEndClient.connect("127.0.0.1", gateway.port, "iso87ascii", "ascii4",
                                                          connect_timeout=1)
                except (OSError, RequestTimeout):
                    await trio.sleep(0.05)
                    continue

            async def one(c: FrontEndClient) -> None:
                async with lock:
                    if outcome.sent >= total:
                        return
                    outcome.sent += 1
                    n = next(rrns)
                stan = next(stan_counter) % 999_999 + 1
                amount = AMOUNTS[n % len(AMOUNTS)]
                req = sample_auth(stan, amount, terminal=terminal)
                req["37"] = f"{n:012d}"  # unique RRN: the reconciliation key
                try:
                    resp = await c.request(req, timeout=5)
                except (ConnectionClosed, RequestTimeout, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    outcome.killed.add(req["37"])
                    return
                if req["37"] in outcome.answered:
                    outcome.duplicates += 1
                outcome.answered[req["37"]] = resp.get("39", "")

            async with trio.open_nursery() as n:
                for _ in range(in_flight):
                    n.start_soon(one, client)
            if client.closed:
                client = None

    async with trio.open_nursery() as n:
        n.start_soon(killer)
        for w in range(connections):
            n.start_soon(worker, w)


def _journal_rrns(path: Path) -> set[str]:
    db = sqlite3.connect(path)
    try:
        return {r[0] for r in db.execute("SELECT rrn FROM txn")}
    finally:
        db.close()


def _saf_waiting(path: Path) -> int:
    db = sqlite3.connect(path, timeout=10)
    try:
        return db.execute("SELECT COUNT(*) FROM saf WHERE state IN ('pending', 'sent')").fetchone()[0]
    finally:
        db.close()


def reconcile(records: list, outcome: Outcome, journal_rrns: set[str]) -> dict[str, object]:
    records = [r for r in records if r.rrn and r.rrn.isdigit()]  # readiness probes are not part of the run
    approved = {r.rrn for r in records if r.mti in ("0100", "0101") and r.response_code == "00"}
    seen = {r.rrn for r in records if r.mti in ("0100", "0101")}
    reversed_ok = {r.rrn for r in records if r.mti in ("0420", "0421") and r.response_code == "00"}
    applied = Counter(r.rrn for r in records if r.mti in ("0420", "0421") and r.applied)
    front_approved = {rrn for rrn, rc in outcome.answered.items() if rc == "00"}
    violations: list[str] = []
    for rrn in sorted(approved - front_approved - reversed_ok):
        violations.append(f"RRN {rrn}: approved by the switch, not delivered, not reversed")
    for rrn, n in applied.items():
        if n > 1:
            violations.append(f"RRN {rrn}: reversed {n} times")
    unanswered = outcome.killed - set(outcome.answered)
    for rrn in sorted(unanswered & seen - journal_rrns):
        violations.append(f"RRN {rrn}: lost with the gateway, seen by the switch, and not in the journal")
    if outcome.duplicates:
        violations.append(f"{outcome.duplicates} requests were answered more than once")
    return {
        "requests": outcome.sent,
        "answered": len(outcome.answered),
        "answers_by_code": dict(sorted(Counter(outcome.answered.values()).items())),
        "lost_with_a_killed_gateway": len(unanswered),
        "switch_saw": len(seen),
        "switch_approved": len(approved),
        "front_end_approved": len(front_approved),
        "reversals_acknowledged": len(reversed_ok),
        "approved_then_reversed": len(front_approved & reversed_ok),
        "violations": len(violations),
        "violation_samples": violations[:20],
    }


async def run_check(requests: int, kills: int, seed: int, connections: int = 16, in_flight: int = 4) -> dict[str, object]:
    state = Path(tempfile.mkdtemp(prefix="iso-gateway-integrity-"))
    kek_dir = Path(tempfile.mkdtemp(prefix="iso-gateway-integrity-kek-"))  # outside the state directory
    sim = SwitchSimulator(seed=seed, delay_probability=0.05, delay_range=(0.0, 0.8), drop_probability=0.02,
                          close_probability=0.005)
    started = time.monotonic()
    async with trio.open_nursery() as nursery:
        switch_port = await nursery.start(sim.serve, "127.0.0.1", 0)
        port = free_port()
        cfg = state / "gateway.toml"
        _config(cfg, port, switch_port, state, kek_dir)
        gateway = GatewayProcess(cfg, port)
        await gateway.start()
        outcome = Outcome()
        try:
            with trio.fail_after(max(120, requests / 20)):
                await _drive(gateway, requests, connections, in_flight, kills, outcome)
            # Let the SAF queue drain: every owed reversal sent and acknowledged.
            journal = state / "journal.sqlite3"
            with trio.move_on_after(60):
                while await trio.to_thread.run_sync(_saf_waiting, journal):  # noqa: ASYNC110 - another process's file
                    await trio.sleep(0.2)
            waiting = await trio.to_thread.run_sync(_saf_waiting, journal)
        finally:
            await gateway.stop()
        nursery.cancel_scope.cancel()
    report = reconcile(sim.records, outcome, _journal_rrns(state / "journal.sqlite3"))
    report["reversals_still_queued"] = waiting
    report["gateway_kills"] = kills
    report["seconds"] = round(time.monotonic() - started, 1)
    report["state_dir"] = str(state)
    report["kek_dir"] = str(kek_dir)
    if waiting:
        report["violations"] = int(report["violations"]) + 1  # type: ignore[call-overload]
        report["violation_samples"].append(f"{waiting} reversals still queued after 60 s")  # type: ignore[attr-defined]
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m iso_gateway.sim.integrity", description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=5000)
    ap.add_argument("--kills", type=int, default=2, help="times the gateway is SIGKILLed and restarted")
    ap.add_argument("--seed", type=int, default=8583)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    report = trio.run(run_check, args.requests, args.kills, args.seed)
    if args.json:
        print(json.dumps(report))
    else:
        for key, value in report.items():
            if key != "violation_samples":
                print(f"{key:<28} {value}")
        for line in report["violation_samples"]:  # type: ignore[attr-defined]
            print("  " + line)
    return 1 if report["violations"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
