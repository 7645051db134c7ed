"""The gateway on the PostgreSQL journal, end to end: a real server (conftest_pg.py), the simulator,
front ends on 127.0.0.1. Approvals, timeouts reversed, a restart, duplicates and STANs across two
nodes on one database, a dead node's reversals sent by the survivor, the database stopped mid-run."""

from __future__ import annotations

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
    from iso_gateway.security.pan import PanVault, load_master_key

    vault = PanVault(load_master_key(gw.config.journal.key_file))
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
