"""A failing store (full disk, read-only file, a stuck indexer) never stops the gateway: it is
counted, /readyz says why, nothing owed is lost, and service resumes by itself."""

from __future__ import annotations

import errno
import os
import secrets
import signal
import sqlite3
from pathlib import Path
from types import SimpleNamespace

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import wait_for
import realtime
from realtime import wait_real
from iso_gateway.journal import commit as journal_module
from iso_gateway.journal import txlog
from iso_gateway.journal import SAF_PENDING, Journal, SafItem, new_id
from iso_gateway.config import UpstreamConfig
from iso_gateway.metrics import Metrics
from iso_gateway.reversals import DurableReversals, ReversalSender
from iso_gateway.security.pan import PanVault

journal_clock = realtime.journal_clock  # a fixture: trio's MockClock for a gateway with a journal

FAST_SAF = {"saf_first_delay": 0.0, "saf_retry_initial": 0.1, "saf_retry_max": 0.2, "reversal_timeout": 0.3}


def saf_item(n: int) -> SafItem:
    now = 1_700_000_000.0
    return SafItem(id=new_id(), txn_id=None, upstream="cmi", state=SAF_PENDING, reason="timeout", mti="0420",
                   stan=f"{n % 999999 + 1:06d}", f90="0100" + "0" * 38, attempts=0, next_attempt=now, created=now,
                   message={"t": "0420", "11": f"{n:06d}", "37": f"{n:012d}", "4": "000000010000"})


def fill_the_disk(conn: sqlite3.Connection) -> None:
    """SQLite's own "disk full": no page beyond those the file has (writes that need one fail with SQLITE_FULL)."""
    (pages,) = conn.execute("PRAGMA page_count").fetchone()
    conn.execute(f"PRAGMA max_page_count={pages}")


def space_returns(conn: sqlite3.Connection) -> None:
    conn.execute("PRAGMA max_page_count=1073741823")


def saf_rows(path: Path) -> list[int]:
    db = sqlite3.connect(path)
    try:
        return [r[0] for r in db.execute("SELECT id FROM saf ORDER BY id")]
    finally:
        db.close()


def no_space(*_args):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(writes=st.integers(min_value=20, max_value=120), reads_between=st.integers(min_value=1, max_value=5))
def test_writes_a_full_disk_refuses_are_kept_in_order_and_land_when_space_returns_while_reads_still_answer(
        tmp_path_factory, writes, reads_between):
    path = tmp_path_factory.mktemp("full") / "journal.sqlite3"
    metrics = Metrics(process=False)
    journal = Journal(str(path), PanVault(secrets.token_bytes(32)), metrics=metrics, indexer="thread")
    store = journal.store

    async def main():
        async with trio.open_nursery() as nursery:
            await nursery.start(journal.run)
            await journal.call(fill_the_disk)
            items = [saf_item(n) for n in range(writes)]
            for n, item in enumerate(items):
                journal.submit(store.insert_saf, item)
                if n % reads_between == 0:  # a read in the same batch as refused writes still answers
                    await journal.call(store.next_due, "cmi")
            await wait_for(lambda: journal.failed is not None, 5, "the failure shown")
            assert "disk_full" in journal.failed
            assert metrics.journal_errors("store", "disk_full")._value.get() >= 1
            assert len(saf_rows(path)) < writes  # the disk really was full
            await journal.call(space_returns)
            await wait_for(lambda: len(saf_rows(path)) == writes, 10, "every kept write stored")
            assert saf_rows(path) == sorted(i.id for i in items)
            await wait_for(lambda: journal.failed is None, 5, "the failure cleared")
            nursery.cancel_scope.cancel()

    trio.run(main)
    journal.close()


async def test_a_full_disk_and_a_read_only_journal_keep_the_gateway_up_and_it_resumes_by_itself(
        harness, monkeypatch, journal_clock):
    sim = await harness.start_switch()
    gw = await harness.start_gateway(upstream=FAST_SAF)
    client = await harness.client()
    assert (await client.request(harness.auth(15000), timeout=3))["39"] == "00"

    await gw.journal.call(lambda conn: conn.execute("PRAGMA query_only=1"))  # the journal is read-only now
    # The switch never answers this one: the front end hears 91, and a reversal is owed but
    # can't be stored. (The log is still writable, so it was sent.)
    assert (await client.request(harness.auth(10097), timeout=3))["39"] == "91"
    await wait_real(lambda: not gw.readiness()[0], 10, "not ready")  # the thread finds out
    assert "read_only" in gw.readiness()[1]
    with monkeypatch.context() as m:
        m.setattr(txlog, "_write", no_space)  # and now the disk is full for the log too
        assert (await client.request(harness.auth(15000), timeout=3))["39"] == "96"
        await trio.sleep(1.5)  # virtual: SAF rounds and journal batches fail meanwhile: nothing stops
        assert not gw.readiness()[0]
    assert sum(r.mti == "0100" for r in sim.records) == 2  # the 96 never left
    assert not any(r.mti in ("0420", "0421") for r in sim.records)
    assert gw.metrics.journal_errors("store", "read_only")._value.get() >= 1

    await gw.journal.call(lambda conn: conn.execute("PRAGMA query_only=0"))  # space returns
    assert (await client.request(harness.auth(15000), timeout=3))["39"] == "00"
    # The thread retries the writes it kept on a backoff of its own, in real time.
    await wait_real(lambda: any(r.mti in ("0420", "0421") for r in sim.records), 10, "the owed reversal sent")
    await wait_real(lambda: gw.readiness()[0], 10, "ready again")


class _FlakyJournal:
    """A journal whose store fails every call until ``works`` (the reversal sender's view of it)."""

    def __init__(self) -> None:
        self.store = SimpleNamespace(saf_stats="saf_stats", next_due="next_due", due_saf="due_saf")
        self.works = False
        self.holding_writes = False
        self.calls: list[tuple[float, str]] = []

    async def call(self, fn, *args):
        self.calls.append((trio.current_time(), fn))
        await trio.lowlevel.checkpoint()
        if not self.works:
            exc = sqlite3.OperationalError("database or disk is full")
            exc.sqlite_errorname = "SQLITE_FULL"
            raise exc
        return (0, None, None, 0) if fn == "saf_stats" else None


async def test_a_store_that_fails_every_call_does_not_stop_the_saf_worker_which_backs_off_then_resumes(
        autojump_clock):
    metrics = Metrics(process=False)
    journal = _FlakyJournal()
    reversals = DurableReversals(SimpleNamespace(metrics=metrics, upstreams={}), journal)
    upstream = SimpleNamespace(cfg=UpstreamConfig(name="cmi", hosts=["127.0.0.1:1"]), ready=False)
    worker = ReversalSender(reversals, upstream)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(worker.run)
        await trio.sleep(60)
        failing = [t for t, _ in journal.calls]
        gaps = [round(b - a, 6) for a, b in zip(failing, failing[1:], strict=False)]
        assert len(failing) >= 10 and gaps == sorted(gaps)  # asked again, less and less often...
        assert gaps[0] == pytest.approx(journal_module.STORE_RETRY_INITIAL)
        assert max(gaps) == pytest.approx(journal_module.STORE_RETRY_MAX)  # ...up to the bound
        assert metrics.journal_errors("saf", "disk_full")._value.get() == len(failing)
        journal.works = True
        await trio.sleep(10)
        assert len(journal.calls) > len(failing) + 5  # polling again, every SAF_POLL
        assert metrics.journal_errors("saf", "disk_full")._value.get() == len(failing)
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("indexer", ["process", "thread"])
async def test_an_indexer_that_cant_write_retries_in_order_and_readiness_says_why(harness, indexer):
    await harness.start_switch()
    gw = await harness.start_gateway(journal={"indexer": indexer})
    client = await harness.client()
    db = Path(gw.config.journal.path)
    assert (await client.request(harness.auth(15000), timeout=3))["39"] == "00"
    await wait_for(lambda: gw.journal.segments_waiting == 0 and _count(db, "txn") == 1, 5, "the first row")
    # Every connection's inserts into txn now fail, the indexer process's among them.
    outside = sqlite3.connect(db)
    outside.execute("CREATE TRIGGER refuse BEFORE INSERT ON txn BEGIN SELECT RAISE(ABORT, 'no room'); END")
    outside.commit()
    for n in range(1, 4):
        assert (await client.request(harness.auth(15000), timeout=3))["39"] == "00"  # in the log: safe
        await wait_for(lambda: gw.journal.segments_waiting >= n, 5, "its segment closed")  # noqa: B023 - awaited in this iteration
    await wait_for(lambda: not gw.readiness()[0], 5, "not ready")
    assert "indexer" in gw.readiness()[1]
    assert gw.journal.segments_waiting >= 1 and _count(db, "txn") == 1
    outside.execute("DROP TRIGGER refuse")
    outside.commit()
    outside.close()
    await wait_for(lambda: _count(db, "txn") == 4, 10, "every row written once the store takes them")
    await wait_for(lambda: gw.readiness()[0] and gw.journal.segments_waiting == 0, 10, "ready, no backlog")
    assert txlog.segments(str(db)) == []


async def test_an_indexer_further_behind_than_the_bound_fails_readiness_with_the_reason(harness):
    await harness.start_switch()
    gw = await harness.start_gateway(journal={"max_log_segments": 2})
    client = await harness.client()
    assert gw.metrics.journal_log_segments_bound().get() == 2
    assert (await client.request(harness.auth(15000), timeout=3))["39"] == "00"
    await wait_for(lambda: gw.journal._indexer._proc is not None, 5, "the indexer running")
    child = gw.journal._indexer._proc
    os.kill(child.pid, signal.SIGSTOP)  # an indexer that falls behind
    try:
        for n in range(1, 5):
            assert (await client.request(harness.auth(15000), timeout=3))["39"] == "00"
            # A rotation each: a segment that waits (an acknowledgement the child sent before it
            # stopped may still lower the count: at least n, not "one more than before").
            await wait_for(lambda: gw.journal.segments_waiting >= n, 5, "its segment closed")  # noqa: B023 - awaited in this iteration
        await wait_for(lambda: gw.journal.segments_waiting > 2, 5, "a backlog past the bound")
        ready, why = gw.readiness()
        assert not ready and "indexer is behind" in why and "more than 2" in why
    finally:
        os.kill(child.pid, signal.SIGCONT)
    await wait_for(lambda: gw.readiness()[0], 10, "ready once it caught up")


def _count(db: Path, table: str) -> int:
    conn = sqlite3.connect(db)
    try:
        return conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
    finally:
        conn.close()


def test_a_timed_out_transaction_whose_reversal_never_reached_the_store_is_in_doubt_at_the_next_start(tmp_path):
    """The journal kept the reversal in memory and the process stopped: the next start owes it still."""
    journal = Journal(str(tmp_path / "journal.sqlite3"), PanVault(secrets.token_bytes(32)))
    store = journal.store
    row = {"listener": "ecom", "mti": "0100", "upstream": "cmi", "link": 0, "upstream_stan": "400001"}
    original = {"2": "4761739001010119", "4": "000000010000", "11": "000001", "37": "633100000001"}
    lost, stored, declined_late = new_id(), new_id(), new_id()
    for txn_id in (lost, stored, declined_late):
        journal.run_sync(store.insert_txn, {**row, "id": txn_id, "state": "timed_out"}, original)
    journal.run_sync(store.insert_saf, SafItem(id=new_id(), txn_id=stored, upstream="cmi", state=SAF_PENDING,
                                               reason="timeout", mti="0420", stan="", f90="0" * 42, attempts=0,
                                               next_attempt=0.0, created=0.0, message={"t": "0420"}))
    journal.run_sync(store.update_txn, declined_late, "timed_out", "05", None)  # a late decline: nothing owed
    assert [t[0] for t in journal.run_sync(store.in_doubt)] == [lost]
    journal.close()


async def test_recovery_at_start_on_a_read_only_journal_owes_its_reversals_until_the_store_takes_them(tmp_path):
    path = tmp_path / "journal.sqlite3"
    journal = Journal(str(path), PanVault(secrets.token_bytes(32)), indexer="thread")
    in_doubt = new_id()
    journal.run_sync(journal.store.insert_txn, {"id": in_doubt, "listener": "ecom", "mti": "0100", "upstream": "cmi",
                                                 "link": 0, "upstream_stan": "400001"},
                     {"2": "4761739001010119", "4": "000000010000", "7": "1127101010", "11": "000001",
                      "37": "633100000001"})
    journal._conn.execute("PRAGMA query_only=1")  # the file is read-only when the gateway starts
    metrics = Metrics(process=False)
    upstream = SimpleNamespace(cfg=UpstreamConfig(name="cmi", hosts=["127.0.0.1:1"]))
    reversals = DurableReversals(SimpleNamespace(metrics=metrics, upstreams={"cmi": upstream}), journal)
    assert reversals.recover() == 1  # read fine; the writes are the journal's to keep
    async with trio.open_nursery() as nursery:
        await nursery.start(journal.run)
        await wait_for(lambda: journal.failed is not None and "read_only" in journal.failed, 5, "the failure shown")
        assert saf_rows(path) == []
        await journal.call(lambda conn: conn.execute("PRAGMA query_only=0"))
        await wait_for(lambda: len(saf_rows(path)) == 1, 5, "the recovered reversal stored")
        await wait_for(lambda: journal.failed is None, 5, "the failure cleared")
        nursery.cancel_scope.cancel()
    journal.close()


async def test_a_recovery_the_store_could_not_read_at_start_is_done_by_the_saf_worker_later(tmp_path, monkeypatch):
    path = tmp_path / "journal.sqlite3"
    journal = Journal(str(path), PanVault(secrets.token_bytes(32)), indexer="thread")
    in_doubt = new_id()
    journal.run_sync(journal.store.insert_txn, {"id": in_doubt, "listener": "ecom", "mti": "0100", "upstream": "cmi",
                                                 "link": 0, "upstream_stan": "400001"},
                     {"2": "4761739001010119", "4": "000000010000", "11": "000001", "37": "633100000001"})
    real = type(journal.store).in_doubt

    def unreadable(self, conn, since=None):
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(type(journal.store), "in_doubt", unreadable)
    metrics = Metrics(process=False)
    upstream = SimpleNamespace(cfg=UpstreamConfig(name="cmi", hosts=["127.0.0.1:1"]), ready=False)
    reversals = DurableReversals(SimpleNamespace(metrics=metrics, upstreams={"cmi": upstream}), journal)
    assert reversals.recover() == 0 and reversals.recovery_owed
    assert "recovery" in journal.failed
    async with trio.open_nursery() as nursery:
        await nursery.start(journal.run)
        nursery.start_soon(ReversalSender(reversals, upstream).run)
        await trio.sleep(0.3)  # the reversal sender's rounds fail meanwhile, and it carries on
        assert saf_rows(path) == [] and reversals.recovery_owed
        monkeypatch.setattr(type(journal.store), "in_doubt", real)
        await wait_for(lambda: len(saf_rows(path)) == 1, 10, "the reversal the recovery owed")
        assert not reversals.recovery_owed and journal.failed is None
        nursery.cancel_scope.cancel()
    journal.close()


async def test_a_reversal_whose_progress_the_store_refuses_is_not_sent_again_and_again(harness, journal_clock):
    sim = await harness.start_switch()
    gw = await harness.start_gateway(upstream={**FAST_SAF, "saf_first_delay": 0.5, "reversal_timeout": 5.0},
                                     routes=[{"name": "all", "upstream": "cmi", "timeout": 0.3}])
    client = await harness.client()
    db = Path(gw.config.journal.path)
    # Answered by the switch after 1.5 s: too late for the route's 0.3 s; its reversal too, in 1.5 s.
    assert (await client.request(harness.auth(11599), timeout=3))["39"] == "91"
    await wait_real(lambda: len(saf_rows(db)) == 1, 10, "the reversal stored")
    await gw.journal.call(lambda conn: conn.execute("PRAGMA query_only=1"))  # then the journal turns read-only
    reversals = lambda: sum(r.mti in ("0420", "0421") for r in sim.records)  # noqa: E731
    await wait_real(lambda: reversals() >= 1, 10, "the reversal sent")
    await trio.sleep(3.5)  # virtual: many SAF rounds: its "sent" and "acknowledged" are kept, not stored
    assert reversals() == 1
    await gw.journal.call(lambda conn: conn.execute("PRAGMA query_only=0"))
    await wait_real(lambda: _saf_states(db) == ["acked"], 10, "its acknowledgement stored")  # the thread's retry
    await trio.sleep(1.5)  # virtual: more SAF rounds
    assert reversals() == 1


def _saf_states(db: Path) -> list[str]:
    conn = sqlite3.connect(db)
    try:
        return [r[0] for r in conn.execute("SELECT state FROM saf")]
    finally:
        conn.close()


async def test_an_idle_gateway_becomes_ready_again_by_itself_once_the_log_can_be_written(
        harness, monkeypatch, journal_clock):
    """/readyz keeps traffic away from a gateway that failed: it must find out by itself that it works again."""
    await harness.start_switch()
    gw = await harness.start_gateway()
    client = await harness.client()
    with monkeypatch.context() as m:
        m.setattr(txlog, "_write", no_space)
        assert (await client.request(harness.auth(15000), timeout=3))["39"] == "96"
        await trio.sleep(journal_module.STORE_RETRY_MAX + 0.5)  # virtual: probed (from the loop), still full
        assert not gw.readiness()[0] and "No space left" in gw.readiness()[1]
    await wait_for(lambda: gw.readiness()[0], journal_module.STORE_RETRY_MAX * 3, "ready, with no request sent")


async def test_an_idle_gateway_becomes_ready_again_by_itself_once_the_store_takes_writes(harness, journal_clock):
    await harness.start_switch()
    gw = await harness.start_gateway()
    client = await harness.client()
    await gw.journal.call(lambda conn: conn.execute("PRAGMA query_only=1"))
    await gw.journal.purge_now()  # a write nobody retries (the purge runs again later) is refused
    await wait_real(lambda: not gw.readiness()[0], 10, "not ready")
    assert "read_only" in gw.readiness()[1]
    await gw.journal.call(lambda conn: conn.execute("PRAGMA query_only=0"))
    # The thread retries the write it kept on its own backoff, in real time: bounded in real seconds.
    await wait_real(lambda: gw.readiness()[0], journal_module.STORE_RETRY_MAX * 3, "ready, with no request sent")
    assert (await client.request(harness.auth(15000), timeout=3))["39"] == "00"


async def test_a_gateway_stops_promptly_while_its_indexer_retries_and_the_next_start_loses_nothing(harness):
    await harness.start_switch()
    gw = await harness.start_gateway()
    client = await harness.client()
    db = Path(gw.config.journal.path)
    assert (await client.request(harness.auth(15000), timeout=3))["39"] == "00"
    await wait_for(lambda: _count(db, "txn") == 1, 5, "the first row")
    outside = sqlite3.connect(db)
    outside.execute("CREATE TRIGGER refuse BEFORE INSERT ON txn BEGIN SELECT RAISE(ABORT, 'no room'); END")
    outside.commit()
    for _ in range(2):
        assert (await client.request(harness.auth(15000), timeout=3))["39"] == "00"
    await wait_for(lambda: "indexer" in (gw.journal.failed or ""), 5, "the indexer failing")
    gw.stop()
    with trio.fail_after(5):  # the retrying indexer is told to stop, not killed after its 10 s
        await gw.wait_stopped()
    assert txlog.segments(str(db)) and _count(db, "txn") == 1  # what it could not write waits on disk
    outside.execute("DROP TRIGGER refuse")
    outside.commit()
    outside.close()
    await harness.start_gateway()  # the next start replays it
    assert _count(db, "txn") == 3 and txlog.segments(str(db)) == []


async def test_a_log_left_by_a_crash_that_the_full_store_refused_at_start_is_written_and_recovered_later(harness):
    """Recovery waits for the last run's log: once the store takes it, the in-doubt transaction is reversed."""
    from conftest import make_config
    from iso_gateway.keys import open_security_module

    sim = await harness.start_switch()
    db = harness.state_dir / "journal.sqlite3"
    crashed = Journal(str(db), open_security_module(make_config(1, state_dir=harness.state_dir)).pan_vault())
    in_flight = new_id()
    crashed.record_txn({"id": in_flight, "listener": "ecom", "mti": "0100", "upstream": "cmi", "link": 0,
                        "upstream_stan": "400001"},
                       {"2": "4761739001010119", "4": "000000010000", "7": "1127101010", "11": "000123",
                        "37": "633100000001", "41": "TERM0001", "42": "MERCHANT0000001", "49": "504"})
    crashed.txlog.close()  # then the process dies, its transaction sent and unanswered
    crashed._conn.execute("CREATE TRIGGER refuse BEFORE INSERT ON txn BEGIN SELECT RAISE(ABORT, 'full'); END")
    crashed._conn.close()

    gw = await harness.start_gateway(upstream=FAST_SAF)
    assert gw.journal.unreplayed and not gw.journal.replayed.is_set()  # recovery waits for it
    await wait_for(lambda: "indexer" in (gw.journal.failed or ""), 5, "the indexer failing on it")
    assert not any(r.mti in ("0420", "0421") for r in sim.records)
    outside = sqlite3.connect(db)
    outside.execute("DROP TRIGGER refuse")
    outside.commit()
    outside.close()
    await wait_for(lambda: any(r.mti in ("0420", "0421") for r in sim.records), 10, "the in-doubt one reversed")
    assert _count(db, "txn") == 1 and not gw.reversals.recovery_owed
    await wait_for(lambda: gw.readiness()[0], 10, "ready")
