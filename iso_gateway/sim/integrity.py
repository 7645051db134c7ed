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
from functools import partial
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable

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
    approved_at: list[float] = field(default_factory=list)  # when each approval came (the pair check's)


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


# Seconds the switch may hold an answer (its chaos delays: run_check's delay_range), and the time the
# gateway is given to act on an acknowledgement it has read (``_repeats_after_ack``).
ANSWER_DELAY_MAX = 0.8
ACK_MARGIN = 1.0


def _repeats_after_ack(records: list) -> list[str]:
    """Reversals sent again after the gateway had their 0430. The switch does not know when the
    gateway read an answer, so an acknowledgement counts as read when its connection went on
    carrying answers for ACK_MARGIN seconds after it (a node killed with the 0430 in its socket may
    be right to send the reversal again); a reversal of the same original the switch received
    (its answer time less ANSWER_DELAY_MAX) later than that is a violation."""
    last_on: dict[int, float] = {}
    for r in records:
        last_on[r.connection] = max(last_on.get(r.connection, 0.0), r.time)
    reversals = sorted((r for r in records if r.mti in ("0420", "0421") and r.rrn), key=lambda r: r.time)
    acked: dict[str, tuple[float, int]] = {}
    out: list[str] = []
    for r in reversals:
        ack = acked.get(r.rrn)
        if ack is not None and r.time - ANSWER_DELAY_MAX > ack[0] + ACK_MARGIN and last_on[ack[1]] > ack[0] + ACK_MARGIN:
            out.append(f"RRN {r.rrn}: {r.mti} sent {r.time - ack[0]:.1f} s after the gateway had its 0430")
        if r.response_code == "00" and ack is None:
            acked[r.rrn] = (r.time, r.connection)
    return out


def refused_but_sent(records: list, outcome: Outcome) -> list[str]:
    """RRNs a front end was answered 96 for (the journal could not take them: never to be sent)
    that the switch received all the same. (The simulator itself never answers 96 here.)"""
    refused = {rrn for rrn, rc in outcome.answered.items() if rc == "96"}
    return sorted(refused & {r.rrn for r in records if r.mti in ("0100", "0101")})


def reconcile(records: list, outcome: Outcome, journal_rrns: set[str]) -> dict[str, object]:
    repeats = _repeats_after_ack(records)
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
    violations.extend(repeats)
    # A request in flight when its gateway was SIGKILLed is in doubt, and reversed after the
    # restart (or by the other node): the gateway can't know whether the switch read it, and a
    # switch does read it only if it arrived before the kill (the kernel's reset drops what the
    # switch had not read yet). Such a reversal finds no original to change at the switch (the
    # simulator acknowledges it all the same): counted, not a violation.
    reversal_rrns = {r.rrn for r in records if r.mti in ("0420", "0421")}
    never_seen = reversal_rrns - seen
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
        "reversals_sent_after_their_0430": len(repeats),
        "reversals_of_requests_the_switch_never_read": len(never_seen),
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


# --------------------------------------------------------------------------- the pair (two nodes, one database)

HAPROXY_CONFIG = Path(__file__).resolve().parents[2] / "deploy" / "haproxy" / "haproxy.cfg"


def _pair_config(path: Path, port: int, metrics_port: int, switch_port: int, state: Path, dsn: str,
                 node: str, kek_dir: Path) -> None:
    """A node of the pair: the single gateway's settings, on the shared PostgreSQL journal. Both
    nodes share the key file (and its KEK): either must open what the other sealed."""
    _config(path, port, switch_port, state, kek_dir)
    text = path.read_text()
    text = text.replace(f'path = "{state / "journal.sqlite3"}"\n',
                        f'backend = "postgresql"\ndsn = "{dsn}"\nnode = "{node}"\nheartbeat_interval = 0.5\n'
                        'node_ttl = 3.0\nlease_seconds = 3.0\ndb_timeout = 2.0\n')
    text = text.replace(f'file = "{state / "gateway.log"}"', f'file = "{state / (node + ".log")}"')
    text = text.replace("[metrics]\nenabled = false", f'[metrics]\nhost = "127.0.0.1"\nport = {metrics_port}')
    path.write_text(text)


class Haproxy:
    """HAProxy (Debian's ``haproxy``) with deploy/haproxy/haproxy.cfg, in front of the pair."""

    def __init__(self, front: int, nodes: list[tuple[int, int]], state: Path, config: Path = HAPROXY_CONFIG) -> None:
        (a, a_metrics), (b, b_metrics) = nodes
        self.front = front
        self.env = {"GW_FRONT": f"127.0.0.1:{front}", "GW_A": f"127.0.0.1:{a}", "GW_B": f"127.0.0.1:{b}",
                    "GW_A_METRICS": str(a_metrics), "GW_B_METRICS": str(b_metrics),
                    "GW_STATS": f"127.0.0.1:{free_port()}"}
        self.config = config
        self.log = state / "haproxy.log"
        self.proc: trio.Process | None = None

    async def start(self) -> None:
        import os
        import shutil

        binary = shutil.which("haproxy") or "/usr/sbin/haproxy"
        with open(self.log, "ab") as log:  # noqa: ASYNC230 - a local file, opened once at start
            self.proc = await trio.lowlevel.open_process([binary, "-db", "-f", str(self.config)],
                                                         env={**os.environ, **self.env}, stdout=log, stderr=log)
        with trio.fail_after(10):
            while True:
                try:
                    stream = await trio.open_tcp_stream("127.0.0.1", self.front)
                except OSError:
                    if self.proc.poll() is not None:
                        raise RuntimeError(f"haproxy exited ({self.proc.returncode}): see {self.log}") from None
                    await trio.sleep(0.05)
                    continue
                await stream.aclose()
                return

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            with trio.move_on_after(5):
                await self.proc.wait()
            if self.proc.returncode is None:
                self.proc.kill()
                await self.proc.wait()


# A pair-check front end backs off after a failure (its connection broken, or a 96: the journal
# could not take the request), from BACKOFF_MIN seconds doubling up to BACKOFF_MAX, and starts again
# from the least after any other answer. With both nodes refusing (a database outage), front ends
# retrying at full speed would spend the whole run there.
BACKOFF_MIN, BACKOFF_MAX = 0.05, 0.5


async def _drive_pair(port: int, total: int, connections: int, in_flight: int,
                      actions: list[tuple[float, Callable[[], Awaitable[None]]]], outcome: Outcome,
                      gaps: list[float]) -> None:
    """As ``_drive``, through HAProxy's ``port``; ``actions`` run when that share of the requests has
    been sent (kills, restarts). ``gaps``: for each connection that broke, the seconds until a
    request was answered again (on a new connection, through HAProxy): the fail-over time."""
    rrns = itertools.count(1)
    lock = trio.Lock()

    async def killer() -> None:
        for share, action in actions:
            while outcome.sent < total * share:  # noqa: ASYNC110 - the drivers' shared count
                await trio.sleep(0.01)
            await action()

    async def worker(w: int) -> None:
        terminal = f"INT{w:05d}"
        stan_counter = itertools.count(1)
        client: FrontEndClient | None = None
        broke_at: float | None = None
        backoff = BACKOFF_MIN
        while outcome.sent < total:
            if client is None or client.closed:
                try:
                    client = await FrontEndClient.connect("127.0.0.1", port, "iso87ascii", "ascii4", connect_timeout=1)
                except (OSError, RequestTimeout):
                    await trio.sleep(0.05)
                    continue

            async def one(c: FrontEndClient) -> None:
                nonlocal broke_at, backoff
                async with lock:
                    if outcome.sent >= total:
                        return
                    outcome.sent += 1
                    n = next(rrns)
                req = sample_auth(next(stan_counter) % 999_999 + 1, AMOUNTS[n % len(AMOUNTS)], terminal=terminal)
                req["37"] = f"{n:012d}"
                try:
                    resp = await c.request(req, timeout=5)
                except (ConnectionClosed, RequestTimeout, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    outcome.killed.add(req["37"])
                    if broke_at is None:
                        broke_at = time.monotonic()
                    return
                if broke_at is not None:
                    gaps.append(time.monotonic() - broke_at)
                    broke_at = None
                if req["37"] in outcome.answered:
                    outcome.duplicates += 1
                rc = outcome.answered[req["37"]] = resp.get("39", "")
                if rc == "96":  # "system malfunction": back off
                    await trio.sleep(backoff)
                    backoff = min(backoff * 2, BACKOFF_MAX)
                else:
                    backoff = BACKOFF_MIN
                    if rc == "00":
                        outcome.approved_at.append(time.monotonic())

            async with trio.open_nursery() as n:
                for _ in range(in_flight):
                    n.start_soon(one, client)
            if client.closed:
                client = None
                await trio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)

    async with trio.open_nursery() as n:
        n.start_soon(killer)
        for w in range(connections):
            n.start_soon(worker, w)


def _pg_query(dsn: str, query: str) -> list[tuple[Any, ...]]:
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(query).fetchall()


async def run_pair_check(requests: int, seed: int, dsn: str, connections: int = 16, in_flight: int = 4,
                         drain_seconds: float = 60.0, *,
                         db_outage: tuple[Callable[[], None], Callable[[], None]] | None = None,
                         outage_seconds: float = 3.0) -> dict[str, object]:
    """The money invariant across two nodes sharing ``dsn`` (an empty database: it is migrated),
    through HAProxy: node A is SIGKILLed at a third of the requests and restarted, node B is
    SIGKILLed at two thirds and left dead, so A finishes B's work (its leased reversals once
    the leases run out, its in-doubt transactions once its heartbeat does). Reconciled against
    the switch's own records, as ``run_check``, with the journal read from the database.

    ``db_outage``: (stop, start), blocking calls that stop the database server and start it again:
    at half of the requests it is stopped for ``outage_seconds``. Then also: every request a front
    end was answered 96 (the journal could not take it) must be one the switch never saw, and the
    report counts them (``answered_96``) with the outage's length."""
    state = Path(tempfile.mkdtemp(prefix="iso-gateway-pair-"))
    kek_dir = Path(tempfile.mkdtemp(prefix="iso-gateway-pair-kek-"))  # outside the state directory
    sim = SwitchSimulator(seed=seed, delay_probability=0.05, delay_range=(0.0, 0.8), drop_probability=0.02,
                          close_probability=0.005)
    started = time.monotonic()
    gaps: list[float] = []
    takeover: dict[str, float] = {}
    async with trio.open_nursery() as nursery:
        switch_port = await nursery.start(sim.serve, "127.0.0.1", 0)
        nodes: dict[str, GatewayProcess] = {}
        for name in ("gw-a", "gw-b"):
            port, metrics_port = free_port(), free_port()
            cfg = state / f"{name}.toml"
            _pair_config(cfg, port, metrics_port, switch_port, state, dsn, name, kek_dir)
            nodes[name] = GatewayProcess(cfg, port)
            nodes[name].metrics_port = metrics_port  # type: ignore[attr-defined]
        for gw in nodes.values():  # one at a time: the first migrates the schema
            await gw.start()
        proxy = Haproxy(free_port(), [(gw.port, gw.metrics_port) for gw in nodes.values()],  # type: ignore[attr-defined]
                        state)
        await proxy.start()
        await trio.sleep(1.5)  # both marked up by their health checks (rise 2, every 0.5 s)

        async def kill_a() -> None:
            await nodes["gw-a"].kill()
            await trio.sleep(0.5)
            await nodes["gw-a"].start()

        async def kill_b() -> None:
            await nodes["gw-b"].kill()
            takeover["killed_at"] = time.monotonic()

        async def outage() -> None:
            assert db_outage is not None
            stop, start = db_outage
            began = time.monotonic()
            await trio.to_thread.run_sync(stop)
            await trio.sleep(outage_seconds)
            await trio.to_thread.run_sync(start)
            takeover["outage_ended"] = time.monotonic()
            takeover["outage"] = round(takeover["outage_ended"] - began, 1)

        actions: list[tuple[float, Callable[[], Awaitable[None]]]] = [(1 / 3, kill_a), (2 / 3, kill_b)]
        if db_outage is not None:
            actions.insert(1, (1 / 2, outage))
        outcome = Outcome()
        try:
            with trio.fail_after(max(180, requests / 20)):
                await _drive_pair(proxy.front, requests, connections, in_flight, actions, outcome, gaps)
            waiting_query = "SELECT COUNT(*) FROM saf WHERE state IN ('pending', 'sent')"
            with trio.move_on_after(drain_seconds):
                while (await trio.to_thread.run_sync(_pg_query, dsn, waiting_query))[0][0]:  # noqa: ASYNC110
                    await trio.sleep(0.2)
            if "killed_at" in takeover:
                takeover["drained_after_kill"] = round(time.monotonic() - takeover.pop("killed_at"), 1)
            waiting = (await trio.to_thread.run_sync(_pg_query, dsn, waiting_query))[0][0]
        finally:
            await proxy.stop()
            for gw in nodes.values():
                await gw.stop()
        nursery.cancel_scope.cancel()
    journal = {r[0] for r in await trio.to_thread.run_sync(_pg_query, dsn, "SELECT rrn FROM txn")}
    report = reconcile(sim.records, outcome, journal)
    report["reversals_still_queued"] = waiting
    report["gateway_kills"] = 2
    report["failover_seconds_max"] = round(max(gaps), 2) if gaps else 0.0
    report["connections_failed_over"] = len(gaps)
    report["seconds_from_last_kill_to_queue_empty"] = takeover.get("drained_after_kill", -1)
    if db_outage is not None:
        report["database_outage_seconds"] = takeover.get("outage", -1)
        ended = takeover.get("outage_ended")
        after = [t for t in outcome.approved_at if ended is not None and t > ended]
        # From the database's return to the first approval after it (the fail-over maximum above
        # includes the outage: no node can serve during it).
        report["approvals_again_after_database_seconds"] = round(min(after) - ended, 2) if after and ended else -1
        report["answered_96"] = sum(1 for rc in outcome.answered.values() if rc == "96")
        sent_anyway = refused_but_sent(sim.records, outcome)
        for rrn in sent_anyway:
            report["violation_samples"].append(f"RRN {rrn}: answered 96 and sent to the switch all the same")  # type: ignore[attr-defined]
        report["violations"] = int(report["violations"]) + len(sent_anyway)  # type: ignore[call-overload]
    report["seconds"] = round(time.monotonic() - started, 1)
    report["state_dir"] = str(state)
    if waiting:
        report["violations"] = int(report["violations"]) + 1  # type: ignore[call-overload]
        report["violation_samples"].append(f"{waiting} reversals still queued after {drain_seconds:.0f} s")  # type: ignore[attr-defined]
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m iso_gateway.sim.integrity", description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=5000)
    ap.add_argument("--kills", type=int, default=2, help="times the gateway is SIGKILLed and restarted")
    ap.add_argument("--seed", type=int, default=8583)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--pair-dsn", metavar="DSN",
                    help="run the pair check instead: two nodes on this (empty) PostgreSQL database behind HAProxy, "
                         "one SIGKILLed and restarted, then the other SIGKILLed (deploy/pair/run-pair gives a "
                         "throwaway database)")
    ap.add_argument("--db-stop", metavar="COMMAND", help="with --pair-dsn: a command that stops the database server; "
                    "with --db-start, the run stops it at half of the requests for --outage seconds")
    ap.add_argument("--db-start", metavar="COMMAND", help="with --pair-dsn and --db-stop: the command that starts it again")
    ap.add_argument("--outage", type=float, default=3.0, metavar="SECONDS", help="the database outage (default 3)")
    args = ap.parse_args(argv)
    if bool(args.db_stop) != bool(args.db_start) or (args.db_stop and not args.pair_dsn):
        ap.error("--db-stop and --db-start go together, with --pair-dsn")
    if args.pair_dsn:
        outage = None
        if args.db_stop:
            import shlex

            stop_cmd, start_cmd = shlex.split(args.db_stop), shlex.split(args.db_start)
            outage = (lambda: subprocess.run(stop_cmd, check=True, timeout=120),
                      lambda: subprocess.run(start_cmd, check=True, timeout=120))
        report = trio.run(partial(run_pair_check, args.requests, args.seed, args.pair_dsn, db_outage=outage,  # type: ignore[arg-type]
                                  outage_seconds=args.outage))
    else:
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
