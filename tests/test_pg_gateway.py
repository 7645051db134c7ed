"""The gateway on the PostgreSQL journal, end to end: a real server (conftest_pg.py), the simulator,
front ends on 127.0.0.1. Approvals, timeouts reversed, a restart, duplicates and STANs across two
nodes on one database, a dead node's reversals sent by the survivor, the database stopped mid-run."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import psycopg
import trio

from conftest import make_config, wait_for
import realtime
from realtime import wait_real
from iso_gateway.gateway import Gateway
from iso_gateway.metrics import Metrics

pytest_plugins = ["conftest_pg"]
journal_clock = realtime.journal_clock

FAST_SAF = {"saf_first_delay": 0.0, "saf_retry_initial": 0.1, "saf_retry_max": 0.2, "reversal_timeout": 0.3}


def pg_journal(conninfo: str, node: str, **extra: Any) -> dict[str, Any]:
    return {"backend": "postgresql", "dsn": conninfo, "node": node, "db_timeout": 1.0, **extra}


def rows(conninfo: str, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(conninfo, autocommit=True) as conn:
        return conn.execute(query, params).fetchall()


async def start_node(harness, nursery, conninfo: str, node: str, **kw: Any) -> tuple[Gateway, trio.CancelScope]:
    """A gateway node on the shared database (its own state folder for the PAN key: one key for all
    nodes, the harness's)."""
    journal = pg_journal(conninfo, node, **kw.pop("journal", {}))
    cfg = make_config(harness.switch_port, state_dir=harness.state_dir, journal=journal, **kw)
    gw = Gateway(cfg, metrics=Metrics(process=False))
    scope = trio.CancelScope()

    async def run(task_status=trio.TASK_STATUS_IGNORED) -> None:
        with scope:
            await gw.run(task_status=task_status)

    await nursery.start(run)
    await wait_for(lambda: all(u.ready for u in gw.upstreams.values()), 5.0, "upstream ready")
    return gw, scope


async def test_an_approval_is_journaled_in_postgresql_before_it_is_sent(harness, nursery, pg_conninfo, journal_clock):
    sim = await harness.start_switch()
    gw, _ = await start_node(harness, nursery, pg_conninfo, "gw-a")
    harness.gateway = gw
    client = await harness.client()
    req = harness.auth(10000)
    resp = await client.request(req, timeout=10)
    assert resp["39"] == "00"
    assert [r.mti for r in sim.records if r.mti != "0800"] == ["0100"]
    await wait_real(lambda: rows(pg_conninfo, "SELECT state, response_code, node FROM txn WHERE rrn=%s", (req["37"],))
                    == [("answered", "00", "gw-a")], 10, "the answer in the database")
    (pan_masked, original) = rows(pg_conninfo, "SELECT pan_masked, original FROM txn")[0]
    assert pan_masked.startswith(req["2"][:6]) and req["2"] not in pan_masked and original is not None
    gw.stop()
    await gw.wait_stopped()


async def test_a_timeout_is_reversed_and_a_restart_reverses_what_a_crash_left_in_doubt(
        harness, nursery, pg_conninfo, journal_clock):
    sim = await harness.start_switch()
    gw, scope = await start_node(harness, nursery, pg_conninfo, "gw-a", upstream=FAST_SAF,
                                 routes=[{"name": "all", "upstream": "cmi", "timeout": 0.2}])
    harness.gateway = gw
    client = await harness.client()
    req = harness.auth(10599)  # approved after 0.5 s: too late
    assert (await client.request(req, timeout=30))["39"] == "91"
    await wait_real(lambda: any(r.mti == "0420" and r.response_code == "00" for r in sim.records), 10, "0430")
    await wait_real(lambda: rows(pg_conninfo, "SELECT state FROM txn WHERE rrn=%s", (req["37"],)) == [("reversed",)],
                    10, "reversed in the database")
    assert rows(pg_conninfo, "SELECT state, node FROM saf") == [("acked", "gw-a")]
    gw.stop()
    await gw.wait_stopped()
    # A crash: a transaction sent and never answered, no reversal queued (as a SIGKILL leaves it).
    from iso_gateway.journal.pg import PgStore

    assert gw.keys is not None
    vault = gw.keys.vault  # the security module's data keys, as a restarted node opens them
    lost = harness.auth(10001)
    sent_stan = "777001"
    with psycopg.connect(pg_conninfo) as conn:
        from iso_gateway.journal.store import new_id

        PgStore(vault, "gw-a").insert_txn(conn, {"id": new_id(), "listener": "ecom", "mti": "0100", "upstream": "cmi",
                                                  "link": 0, "upstream_stan": sent_stan}, lost)
    gw2, _ = await start_node(harness, nursery, pg_conninfo, "gw-a", upstream=FAST_SAF)
    await wait_real(lambda: any(r.mti == "0420" and r.rrn == lost["37"] and r.response_code == "00"
                                for r in sim.records), 10, "the in-doubt one reversed after the restart")
    gw2.stop()
    await gw2.wait_stopped()
    assert rows(pg_conninfo, "SELECT count(*) FROM saf WHERE reason='in_doubt'") == [(1,)]


async def test_a_duplicate_landing_on_the_other_node_is_never_sent_and_gets_the_first_answer(
        harness, nursery, pg_conninfo, journal_clock):
    sim = await harness.start_switch()
    a, _ = await start_node(harness, nursery, pg_conninfo, "gw-a")
    b, _ = await start_node(harness, nursery, pg_conninfo, "gw-b")
    harness.gateway = a
    on_a = await harness.client()
    harness.gateway = b
    on_b = await harness.client()
    slow = harness.auth(10599)  # approved after 0.5 s (the route waits 1 s)
    first = trio.Event()
    answers: dict[str, Any] = {}

    async def send_first() -> None:
        answers["a"] = await on_a.request(slow, timeout=10)
        first.set()

    nursery.start_soon(send_first)
    await wait_real(lambda: any(r.mti == "0100" for r in sim.records) or
                    bool(rows(pg_conninfo, "SELECT 1 FROM txn WHERE rrn=%s", (slow["37"],))), 10, "the first journaled")
    in_flight = await on_b.request(dict(slow), timeout=10)  # the front end's retry, on the other node
    assert in_flight["39"] == "94"
    await first.wait()
    assert answers["a"]["39"] == "00"
    await wait_real(lambda: rows(pg_conninfo, "SELECT response_code FROM txn WHERE rrn=%s", (slow["37"],))
                    == [("00",)], 10, "the first answer stored")
    # One answered on A, then retried on B (which has never seen it): A's answer, not sent again.
    done = harness.auth(10000)
    first_answer = await on_a.request(done, timeout=10)
    assert first_answer["39"] == "00"
    await wait_real(lambda: rows(pg_conninfo, "SELECT response_code FROM txn WHERE rrn=%s", (done["37"],))
                    == [("00",)], 10, "the answer stored")
    later = await on_b.request(dict(done), timeout=10)
    assert later["39"] == "00" and later.get("38") == first_answer.get("38")
    assert [r.rrn for r in sim.records if r.mti == "0100"] == [slow["37"], done["37"]]  # each sent once
    for gw in (a, b):
        gw.stop()
        await gw.wait_stopped()


async def test_two_nodes_never_use_the_same_stan_on_one_switch(harness, nursery, pg_conninfo, journal_clock):
    sim = await harness.start_switch()
    a, _ = await start_node(harness, nursery, pg_conninfo, "gw-a", upstream={"connections": 2})
    b, _ = await start_node(harness, nursery, pg_conninfo, "gw-b", upstream={"connections": 2})
    clients = []
    for gw in (a, b):
        harness.gateway = gw
        clients.append(await harness.client())
    async with trio.open_nursery() as n:
        for c in clients:
            async def burst(c=c) -> None:
                for _ in range(60):
                    assert (await c.request(harness.auth(10000), timeout=10))["39"] == "00"
            n.start_soon(burst)
    stans = [r.stan for r in sim.records if r.mti == "0100"]
    assert len(stans) == 120 and len(set(stans)) == 120
    for gw in (a, b):
        gw.stop()
        await gw.wait_stopped()


async def test_a_dead_nodes_reversals_and_in_doubt_transactions_are_taken_over_by_a_survivor(
        harness, nursery, pg_conninfo, journal_clock):
    """What a SIGKILLed node leaves in the database: a reversal it owed (leased to it) and a
    transaction it sent and never saw answered. The survivor sends both once the dead node's
    heartbeat and lease have run out, each once. (The pair test kills a real process.)"""
    import time

    from iso_gateway.journal.pg import PgStore
    from iso_gateway.journal.store import SAF_PENDING, SafItem, new_id
    from iso_gateway.core.saf import build_reversal

    sim = await harness.start_switch()
    survivor, _ = await start_node(harness, nursery, pg_conninfo, "gw-b", upstream=FAST_SAF,
                                   journal={"heartbeat_interval": 0.2, "node_ttl": 1.0, "lease_seconds": 1.0})
    assert survivor.keys is not None
    vault = survivor.keys.vault  # the dead node shared the key file (and its KEK)
    dead = PgStore(vault, "gw-a")
    owed, in_doubt = harness.auth(10001), harness.auth(10002)
    wall = survivor.clock.wall()
    with psycopg.connect(pg_conninfo) as conn:
        dead.heartbeat(conn, "gw-a", wall, 0.5)
        txn_id = new_id()
        dead.insert_txn(conn, {"id": txn_id, "listener": "ecom", "mti": "0100", "upstream": "cmi", "link": 0,
                               "upstream_stan": "900001"}, owed)
        message = build_reversal({k: v for k, v in owed.items() if k != "t"}, original_mti="0100",
                                 upstream_stan="900001", reversal_mti="0420", stan="000000", reason_code="68",
                                 auth_code=None, now=datetime.now(timezone.utc))
        item = SafItem(id=new_id(), txn_id=txn_id, upstream="cmi", state=SAF_PENDING, reason="timeout", mti="0420",
                       stan="", f90=message["90"], attempts=0, next_attempt=wall, created=time.time(),
                       message=message)
        dead.insert_saf(conn, item)
        dead.lease_due_saf(conn, "gw-a", wall, 0.8, 10)
        dead.insert_txn(conn, {"id": new_id(), "listener": "ecom", "mti": "0100", "upstream": "cmi", "link": 0,
                               "upstream_stan": "900002"}, in_doubt)
    for req in (owed, in_doubt):
        await wait_real(lambda req=req: any(r.mti == "0420" and r.rrn == req["37"] and r.response_code == "00"
                                            for r in sim.records), 15, f"the reversal of {req['37']}")
    await wait_real(lambda: rows(pg_conninfo, "SELECT count(*) FROM saf WHERE state<>'acked'") == [(0,)], 10,
                    "both acknowledged")
    await trio.sleep(3)  # virtual: several more rounds of the sender; nothing goes again
    reversals = [r for r in sim.records if r.mti in ("0420", "0421")]
    assert sorted(r.rrn for r in reversals) == sorted([owed["37"], in_doubt["37"]])
    assert rows(pg_conninfo, "SELECT node FROM nodes") == [("gw-b",)]
    # What an SRE sees: one take-over (IsoGatewayNodeTakenOver), one node alive (IsoGatewayFewerNodes).
    assert survivor.metrics.journal_node_takeovers().get() == 1
    await wait_real(lambda: survivor.metrics.journal_nodes_live().get() == 1, 5, "the live node count")
    survivor.stop()
    await survivor.wait_stopped()


async def test_with_the_database_stopped_requests_are_answered_96_unsent_and_nothing_is_lost(harness, nursery):
    """Its own server, stopped and started again mid-run. Real time: the journal's thread waits for
    the database for real (``db_timeout``), which a MockClock would turn into route timeouts."""
    from conftest_pg import new_server

    server = new_server()
    try:
        conninfo = server.conninfo(server.create_database())
        sim = await harness.start_switch()
        # (Its reversal is answered 2.5 s late too: the attempt waits 3 s.)
        gw, _ = await start_node(harness, nursery, conninfo, "gw-a", upstream={**FAST_SAF, "reversal_timeout": 3.0},
                                 routes=[{"name": "all", "upstream": "cmi", "timeout": 2.0}])
        harness.gateway = gw
        client = await harness.client()
        before = harness.auth(10000)
        assert (await client.request(before, timeout=10))["39"] == "00"
        timed_out = harness.auth(12599)  # approved after 2.5 s: its reversal is owed when the database goes
        assert (await client.request(timed_out, timeout=30))["39"] == "91"
        await trio.to_thread.run_sync(server.stop)
        during = [harness.auth(10000) for _ in range(3)]
        for req in during:
            assert (await client.request(req, timeout=30))["39"] == "96"
        ok, why = gw.readiness()
        assert not ok and "journal" in why and "unreachable" in why, why
        sent = {r.rrn for r in sim.records if r.mti == "0100"}
        assert not sent & {r["37"] for r in during}  # never sent
        await trio.to_thread.run_sync(server.restart)
        await wait_real(lambda: gw.readiness()[0], 15, "ready again")
        after = harness.auth(10000)
        assert (await client.request(after, timeout=10))["39"] == "00"
        await wait_real(lambda: any(r.mti == "0420" and r.rrn == timed_out["37"] and r.response_code == "00"
                                    for r in sim.records), 15, "the owed reversal")
        await wait_real(lambda: dict(rows(conninfo, "SELECT rrn, state FROM txn")) == {
            before["37"]: "answered", timed_out["37"]: "reversed", after["37"]: "answered"}, 15,
            f"every row ({rows(conninfo, 'SELECT rrn, state FROM txn')})")
        gw.stop()
        await gw.wait_stopped()
    finally:
        await trio.to_thread.run_sync(server.destroy)


async def test_a_database_that_stops_answering_fails_readiness_and_what_waits_is_never_sent(
        harness, nursery, pg_conninfo):
    """The server process behind the journal's connection is stopped (SIGSTOP: the kernel still
    acknowledges, nothing answers, nothing fails). /readyz says so after twice db_timeout; the
    request waiting for its commit is answered by its route's deadline and never sent, even once
    the database answers again. Real time (the journal's thread waits for real)."""
    import os
    import signal

    sim = await harness.start_switch()
    gw, _ = await start_node(harness, nursery, pg_conninfo, "gw-a",
                             routes=[{"name": "all", "upstream": "cmi", "timeout": 4.0}])
    harness.gateway = gw
    client = await harness.client()
    assert (await client.request(harness.auth(10000), timeout=10))["39"] == "00"
    # Both of the journal's connections: the thread's, and the event loop's for the common batch.
    await wait_real(lambda: gw.journal._here is not None, 10, "the event loop's connection")
    backends = {c.info.backend_pid for c in (gw.journal._pg_conn, gw.journal._here) if c is not None}
    for backend in backends:
        os.kill(backend, signal.SIGSTOP)
    try:
        held = harness.auth(10000)
        answer: dict[str, Any] = {}

        async def send() -> None:
            answer.update(await client.request(held, timeout=20))

        nursery.start_soon(send)
        await wait_real(lambda: not gw.readiness()[0], 10, "not ready")
        assert "has not answered a commit" in gw.readiness()[1]
        await wait_real(lambda: bool(answer), 10, "the held request answered by its deadline")
        assert answer["39"] == "91"
    finally:
        for backend in backends:
            os.kill(backend, signal.SIGCONT)
    await wait_real(lambda: gw.readiness()[0], 10, "ready again")
    assert (await client.request(harness.auth(10000), timeout=10))["39"] == "00"
    assert held["37"] not in {r.rrn for r in sim.records}  # never sent
    gw.stop()
    await gw.wait_stopped()
