"""The journal's write-ahead log (journal/txlog.py) and its indexer (journal/indexer.py): durable before sending, in SQLite soon after."""

from __future__ import annotations

import errno
import os
import secrets
import signal
import sqlite3
from pathlib import Path

import pytest
import trio

from conftest import TEST_PAN, wait_for
import realtime
from realtime import wait_real
from iso_gateway.journal import commit as journal_module
from iso_gateway.journal import txlog
from iso_gateway.journal import ANSWERED, FORWARDED, REVERSED, Journal, new_id
from iso_gateway.security.pan import PanVault

journal_clock = realtime.journal_clock  # a fixture: trio's MockClock for a gateway with a journal

ORIGINAL = {"2": TEST_PAN, "4": "000000010000", "7": "1127101010", "11": "000123", "37": "633100000001",
            "41": "TERM0001", "42": "MERCHANT0000001", "49": "504"}


def row(txn_id: int) -> dict:
    return {"id": txn_id, "listener": "ecom", "mti": "0100", "upstream": "cmi", "link": 0, "upstream_stan": "400001"}


def rows(path: Path) -> list[tuple]:
    db = sqlite3.connect(path)
    try:
        return db.execute("SELECT id, state, response_code, auth_code, pan_masked, rrn FROM txn ORDER BY id").fetchall()
    finally:
        db.close()


async def one_indexed_approval(harness):
    """A gateway whose first approval is in SQLite (so its indexer process runs): (gateway, client, db)."""
    await harness.start_switch()
    gw = await harness.start_gateway()
    client = await harness.client()
    db = Path(gw.config.journal.path)
    assert (await client.request(harness.auth(15000), timeout=3))["39"] == "00"
    await wait_real(lambda: len(rows(db)) == 1, 10, "the first row")  # an indexer process starts: real time
    return gw, client, db


def test_records_read_back_and_a_torn_tail_ends_the_segment(tmp_path):
    seg = tmp_path / "j.sqlite3-txlog.w00.1"
    first = [("T", 1, 2.0, "ecom", "0100", "cmi", 0, "000001", 0, b"\x00sealed")]
    second = [("U", 1, "answered", 3.0, "00", None), ("T", 2, 4.0, "ecom", "0100", "cmi", 0, "000002", 0, b"s")]
    seg.write_bytes(txlog.encode(first) + txlog.encode(second))
    assert txlog.read(seg) == (first + second, 0)
    whole = seg.read_bytes()
    seg.write_bytes(whole[:-3])  # the crash cut the last write short
    assert txlog.read(seg) == (first, len(txlog.encode(second)) - 3)
    seg.write_bytes(whole[:-1] + bytes([whole[-1] ^ 0xFF]))  # a flipped byte fails the CRC
    assert txlog.read(seg)[0] == first


def test_a_failed_write_closes_the_segment_so_nothing_follows_a_torn_frame(tmp_path, monkeypatch):
    log_ = txlog.TxLog(str(tmp_path / "j.sqlite3"), 0)
    log_.append(("T", 1, 1.0, "ecom", "0100", "cmi", 0, "000001", 0, b"s"), write=True)
    log_.append(("U", 1, "answered", 2.0, "00", None), write=False)
    log_.append(("T", 2, 3.0, "ecom", "0100", "cmi", 0, "000002", 0, b"s"), write=False)
    first = log_.path
    real_write = os.write

    def half(fd, data):  # the disk fills up half-way through the frame
        real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(txlog, "_write", half)
    with pytest.raises(OSError):
        log_.write()
    monkeypatch.setattr(txlog, "_write", real_write)
    log_.append(("T", 3, 4.0, "ecom", "0100", "cmi", 0, "000003", 0, b"s"), write=True)
    assert log_.path != first  # a new segment, after the torn one
    done = log_.rotate()
    assert done[0] == first and len(done) == 2
    records, torn = txlog.read(first)
    assert [r[:2] for r in records] == [("T", 1)] and torn > 0
    # The refused transaction 2 is gone; the answer to 1 was kept and went with the next write.
    assert [r[:2] for r in txlog.read(done[1])[0]] == [("U", 1), ("T", 3)]


def test_what_a_killed_process_logged_is_in_the_database_after_the_next_start(tmp_path):
    db = tmp_path / "journal.sqlite3"
    vault = PanVault(secrets.token_bytes(32))
    journal = Journal(str(db), vault)
    answered, in_flight = new_id(), new_id()
    journal.record_txn(row(answered), ORIGINAL)
    journal.record_txn(row(in_flight), {**ORIGINAL, "37": "633100000002"})
    journal.set_state(answered, ANSWERED, "00", "A1B2C3")
    journal.write_log()  # then the process dies: nothing reached SQLite
    journal.txlog.close()
    assert rows(db) == [] and len(txlog.segments(str(db))) == 1
    segment_bytes = txlog.segments(str(db))[0].read_bytes()
    assert TEST_PAN.encode() not in segment_bytes and b"476173" not in segment_bytes  # the PAN only sealed

    again = Journal(str(db), vault)  # the next start replays, then deletes, the segment
    assert rows(db) == [(answered, ANSWERED, "00", "A1B2C3", "476173******0119", "633100000001"),
                        (in_flight, FORWARDED, None, None, "476173******0119", "633100000002")]
    assert txlog.segments(str(db)) == []
    in_doubt = again.run_sync(again.store.in_doubt)
    assert [(t[0], t[4]["2"]) for t in in_doubt] == [(in_flight, TEST_PAN)]  # reversed after the restart
    again.close()


def test_a_segment_applied_twice_changes_nothing(tmp_path):
    db = tmp_path / "journal.sqlite3"
    vault = PanVault(secrets.token_bytes(32))
    journal = Journal(str(db), vault)
    txn = new_id()
    journal.record_txn(row(txn), ORIGINAL)
    journal.set_state(txn, ANSWERED, "00", None)
    journal.write_log()
    (seg,) = journal.txlog.rotate()
    copy = seg.read_bytes()
    journal.close()
    Journal(str(db), vault).close()
    journal = Journal(str(db), vault)
    journal.run_sync(journal.store.update_txn, txn, REVERSED)  # a later change, then the crash replays the old segment
    journal.close()
    seg.write_bytes(copy)
    Journal(str(db), vault).close()
    assert [r[:2] for r in rows(db)] == [(txn, REVERSED)]


def test_the_reversal_lookup_index_grows_at_its_end_and_replaces_an_older_journals(tmp_path):
    db = tmp_path / "journal.sqlite3"
    vault = PanVault(secrets.token_bytes(32))
    Journal(str(db), vault).close()
    old = sqlite3.connect(db)  # a journal from before: the index led by the STAN (random inserts)
    old.execute("DROP INDEX txn_front_time")
    old.execute("CREATE INDEX txn_front ON txn(front_stan, terminal, transmission)")
    old.commit()
    old.close()
    Journal(str(db), vault).close()
    conn = sqlite3.connect(db)
    try:
        indexes = {r[0]: r[1] for r in conn.execute("SELECT name, sql FROM sqlite_master WHERE type='index'")}
        assert "txn_front" not in indexes
        assert "(transmission, terminal, front_stan)" in indexes["txn_front_time"]  # DE 7 first: time order
        plan = " ".join(str(r) for r in conn.execute(
            "EXPLAIN QUERY PLAN SELECT id FROM txn WHERE terminal=? AND front_stan=? AND transmission=? AND mti=?"
            " ORDER BY created DESC LIMIT 1", ("TERM0001", "000123", "1127101010", "0100")))
        assert "txn_front_time" in plan
    finally:
        conn.close()


@pytest.mark.parametrize("indexer", ["process", "thread"])
async def test_transactions_reach_the_database_through_the_indexer_and_no_segment_is_left(harness, indexer):
    await harness.start_switch()
    gw = await harness.start_gateway(journal={"indexer": indexer})
    client = await harness.client()
    answers = [await client.request(harness.auth(15000), timeout=3) for _ in range(20)]
    assert {a["39"] for a in answers} == {"00"}
    db = Path(gw.config.journal.path)
    await wait_for(lambda: [r[1] for r in rows(db)] == [ANSWERED] * 20, 3, "20 answered rows")
    await wait_for(lambda: gw.metrics.journal_writes("insert_txn")._value.get() == 20, 3, "counted")
    answers = [await client.request(harness.auth(15000), timeout=3) for _ in range(5)]
    gw.stop()  # at once: the last ones are still in the log
    await gw.wait_stopped()
    assert [r[1] for r in rows(db)] == [ANSWERED] * 25  # a clean stop leaves everything in SQLite
    assert txlog.segments(str(db)) == []
    if indexer == "process":
        assert gw.journal._indexer._proc is None  # and the indexer process has exited


async def test_a_log_that_cant_be_written_refuses_the_transaction_and_says_not_ready(harness, monkeypatch):
    sim = await harness.start_switch()
    gw = await harness.start_gateway()
    client = await harness.client()
    assert (await client.request(harness.auth(15000), timeout=3))["39"] == "00"

    def full(*_args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as m:
        m.setattr(txlog, "_write", full)
        assert (await client.request(harness.auth(15000), timeout=3))["39"] == "96"
        assert gw.readiness()[0] is False and "No space left" in gw.readiness()[1]
    assert sum(r.mti == "0100" for r in sim.records) == 1  # the refused one never left
    assert (await client.request(harness.auth(15000), timeout=3))["39"] == "00"
    assert gw.readiness()[0] is True


async def test_a_killed_indexer_is_restarted_and_loses_nothing(harness):
    gw, client, db = await one_indexed_approval(harness)
    indexer = gw.journal._indexer
    await wait_for(lambda: indexer._proc is not None, 3, "the indexer running")
    os.kill(indexer._proc.pid, signal.SIGKILL)
    for _ in range(10):
        assert (await client.request(harness.auth(15000), timeout=3))["39"] == "00"
    await wait_for(lambda: len(rows(db)) == 11, 10, "every row, through the restarted indexer")
    await wait_for(lambda: gw.journal.failed is None, 5, "the failure cleared")
    await trio.lowlevel.checkpoint()


async def test_with_synchronous_full_requests_wait_for_the_thread_commit_and_no_log_is_written(harness):
    sim = await harness.start_switch()
    gw = await harness.start_gateway(journal={"synchronous": "FULL"},
                                     routes=[{"name": "all", "upstream": "cmi", "timeout": 0.2}])
    assert not gw.journal.write_ahead
    client = await harness.client()
    assert (await client.request(harness.auth(15000), timeout=3))["39"] == "00"
    assert (await client.request(harness.auth(10097), timeout=3))["39"] == "91"  # reversed, as ever
    db = Path(gw.config.journal.path)
    await wait_for(lambda: sorted(r[1] for r in rows(db)) == [ANSWERED, "timed_out"], 3, "both rows")
    await wait_for(lambda: any(r.mti in ("0420", "0421") for r in sim.records), 5, "the reversal")
    assert txlog.segments(str(db)) == []


def test_frames_are_sealed_and_a_wrong_key_reads_nothing(tmp_path):
    vault, other = PanVault(secrets.token_bytes(32)), PanVault(secrets.token_bytes(32))
    seg = tmp_path / "j.sqlite3-txlog.w00.1"
    records = [("T", 1, 2.0, "ecom", "0100", "cmi", 0, "000001", 0, ORIGINAL)]
    seg.write_bytes(txlog.encode(records, vault.seal_bytes))
    assert TEST_PAN.encode() not in seg.read_bytes() and b"TERM0001" not in seg.read_bytes()
    assert txlog.read(seg, vault.open_bytes) == (records, 0)
    assert txlog.read(seg, other.open_bytes) == ([], seg.stat().st_size)


async def test_a_quiet_gateways_indexer_exits_and_the_next_segment_starts_one(harness, monkeypatch):
    monkeypatch.setattr(journal_module, "INDEXER_IDLE_EXIT", 0.3)
    await harness.start_switch()
    gw = await harness.start_gateway()
    indexer = gw.journal._indexer
    assert indexer._proc is None  # nothing to write yet: no process
    client = await harness.client()
    db = Path(gw.config.journal.path)
    assert (await client.request(harness.auth(15000), timeout=3))["39"] == "00"
    await wait_for(lambda: len(rows(db)) == 1, 3, "the first row")
    first = indexer._proc
    await wait_for(lambda: indexer._proc is None, 5, "the idle indexer gone")
    assert first.returncode == 0 and gw.journal.failed is None and gw.readiness()[0]
    assert (await client.request(harness.auth(15000), timeout=3))["39"] == "00"
    await wait_for(lambda: len(rows(db)) == 2, 5, "the second row, through a new indexer")


def test_a_failed_write_is_seen_by_every_transaction_it_dropped(tmp_path, monkeypatch):
    journal = Journal(str(tmp_path / "journal.sqlite3"), PanVault(secrets.token_bytes(32)))
    first = new_id()
    journal.record_txn(row(first), ORIGINAL, write=False)  # held by one caller...
    recorded_at = journal.log_failures

    def full(*_args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(txlog, "_write", full)
    with pytest.raises(OSError):
        journal.record_txn(row(new_id()), ORIGINAL)  # ...while another's write fails
    monkeypatch.undo()
    journal.write_log()  # the first caller's own write now succeeds, with nothing of its in it
    assert journal.log_failures != recorded_at  # so it must refuse its transaction (gateway._send_held)
    journal.close()


async def test_a_full_disk_at_rotation_keeps_the_gateway_up_and_its_segment_is_written_later(
        harness, monkeypatch, journal_clock):
    await harness.start_switch()
    gw = await harness.start_gateway()
    client = await harness.client()
    db = Path(gw.config.journal.path)
    assert (await client.request(harness.auth(15000), timeout=3))["39"] == "00"  # its answer waits in memory

    def full(*_args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as m:
        m.setattr(txlog, "_write", full)
        # A rotation (from the loop) fails, and /readyz says so.
        await wait_for(lambda: "No space left" in gw.readiness()[1], 5, "the failed rotation shown")
    assert (await client.request(harness.auth(15000), timeout=3))["39"] == "00"
    # By the indexer, in real time.
    await wait_real(lambda: [r[1] for r in rows(db)] == [ANSWERED, ANSWERED], 10, "both rows, answered")


async def test_the_indexer_backlog_is_a_gauge_that_returns_to_zero(harness, journal_clock):
    gw, client, db = await one_indexed_approval(harness)
    child = gw.journal._indexer._proc
    os.kill(child.pid, signal.SIGSTOP)  # an indexer that falls behind
    try:
        for waiting in (1, 2):
            assert (await client.request(harness.auth(15000), timeout=3))["39"] == "00"
            # A rotation each (from the loop): a segment that waits.
            await wait_for(lambda n=waiting: gw.metrics.journal_log_segments().get() >= n, 5, f"{waiting} segments")
        assert gw.metrics.journal_log_segments().get() >= 2
    finally:
        os.kill(child.pid, signal.SIGCONT)
    await wait_real(lambda: len(rows(db)) == 3, 10, "three rows")  # the indexer works in real time
    await wait_real(lambda: gw.metrics.journal_log_segments().get() == 0, 10, "no backlog")
