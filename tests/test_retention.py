"""Card data is not kept forever: sealed reversal data is erased once no reversal can need it, rows
past the retention are deleted, and nothing a reversal still owes is touched (time injected)."""

from __future__ import annotations

import secrets
import sqlite3
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import TEST_PAN
import realtime
from realtime import wait_real
from iso_gateway.cli import main as cli_main
from iso_gateway.journal import (
    ANSWERED, SAF_ACKED, SAF_CANCELLED, SAF_PARKED, SAF_PENDING, SAF_SENT, TIMED_OUT, SafItem, SQLiteStore, id_at,
)
from iso_gateway.security.pan import PanVault

journal_clock = realtime.journal_clock  # a fixture: trio's MockClock for a gateway with a journal

NOW = 1_800_000_000.0
HOUR = 3600.0
WINDOW = 48 * HOUR
RETENTION = 90 * 24 * HOUR
LIVE = (SAF_PENDING, SAF_SENT, SAF_PARKED)
ORIGINAL = {"2": TEST_PAN, "4": "000000010000", "7": "1127101010", "11": "000123", "37": "633100000001",
            "41": "TERM0001", "42": "MERCHANT0000001", "49": "504"}


def add(conn: sqlite3.Connection, store: SQLiteStore, n: int, age_hours: int, saf_state: str | None,
        saf_idle_hours: int) -> tuple[int, int]:
    """A transaction received ``age_hours`` ago and, with ``saf_state``, its reversal, last changed
    ``saf_idle_hours`` ago: (txn id, saf id)."""
    txn_id = id_at(NOW - age_hours * HOUR) + n * 128
    row = {"id": txn_id, "listener": "ecom", "mti": "0100", "upstream": "cmi", "link": 0, "upstream_stan": "400001",
           "state": TIMED_OUT if saf_state else ANSWERED}
    store.insert_txn(conn, row, {**ORIGINAL, "37": f"{n:012d}"})
    saf_id = txn_id + 64
    if saf_state is not None:
        store.insert_saf(conn, SafItem(id=saf_id, txn_id=txn_id, upstream="cmi", state=saf_state, reason="timeout",
                                       mti="0420", stan="000001", f90="0" * 42, attempts=1, next_attempt=NOW,
                                       created=NOW, message={**ORIGINAL, "t": "0420"}))
        conn.execute("UPDATE saf SET updated=? WHERE id=?", (NOW - min(saf_idle_hours, age_hours) * HOUR, saf_id))
    return txn_id, saf_id


def purge_all(conn: sqlite3.Connection, store: SQLiteStore, now: float, batch: int) -> dict[str, int]:
    total = {"reversal_data": 0, "txn": 0, "saf": 0}
    for _ in range(10_000):
        conn.execute("BEGIN IMMEDIATE")
        counts, more = store.purge(conn, now, WINDOW, RETENTION, batch)
        conn.execute("COMMIT")
        for k, v in counts.items():
            total[k] += v
        if not more:
            return total
    raise AssertionError("the purge never finished")


rows_strategy = st.lists(
    st.tuples(st.integers(0, 24 * 120), st.sampled_from([None, *LIVE, SAF_ACKED, SAF_CANCELLED]),
              st.integers(0, 24 * 120)),
    max_size=30)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=rows_strategy, batch=st.integers(1, 7))
def test_the_purge_erases_card_data_and_old_rows_but_never_what_an_owed_reversal_needs(tmp_path_factory, rows, batch):
    path = tmp_path_factory.mktemp("purge") / "journal.sqlite3"
    store = SQLiteStore(PanVault(secrets.token_bytes(32)))
    conn = SQLiteStore.connect(str(path))
    made = [(add(conn, store, n, age, saf, idle), age, saf, idle) for n, (age, saf, idle) in enumerate(rows)]
    purge_all(conn, store, NOW, batch)
    originals = dict(conn.execute("SELECT id, original FROM txn").fetchall())
    messages = dict(conn.execute("SELECT id, message FROM saf").fetchall())
    for (txn_id, saf_id), age, saf, idle in made:
        live = saf in LIVE
        past_retention = txn_id < id_at(NOW - RETENTION)
        saf_idle = min(idle, age) * HOUR
        saf_final_past_window = saf in (SAF_ACKED, SAF_CANCELLED) and saf_idle > WINDOW
        if past_retention and not live:
            assert txn_id not in originals  # deleted
        else:
            assert txn_id in originals
            if live:
                assert originals[txn_id] is not None and messages[saf_id] is not None
            elif txn_id < id_at(NOW - WINDOW) or saf_final_past_window:
                assert originals[txn_id] is None
            else:
                assert store.vault.open(originals[txn_id])["2"] == TEST_PAN  # still reversible
        if saf is not None:
            if saf in (SAF_ACKED, SAF_CANCELLED) and saf_id < id_at(NOW - RETENTION):
                assert saf_id not in messages
            elif saf_final_past_window:
                assert messages[saf_id] is None
            elif saf_id in messages:
                assert messages[saf_id] is not None
    again = purge_all(conn, store, NOW, batch)
    assert again == {"reversal_data": 0, "txn": 0, "saf": 0}  # nothing left to do, nothing done twice
    conn.close()


def test_an_answered_transaction_keeps_its_row_for_journal_find_after_its_card_data_is_erased(tmp_path, capsys):
    path = tmp_path / "journal.sqlite3"
    store = SQLiteStore(PanVault(secrets.token_bytes(32)))
    conn = SQLiteStore.connect(str(path))
    old, _ = add(conn, store, 1, 72, None, 0)
    fresh, _ = add(conn, store, 2, 1, None, 0)
    assert purge_all(conn, store, NOW, 1000) == {"reversal_data": 1, "txn": 0, "saf": 0}
    originals = dict(conn.execute("SELECT id, original FROM txn").fetchall())
    assert originals[old] is None and originals[fresh] is not None
    conn.close()
    assert cli_main(["journal", "find", "--journal", str(path), "--rrn", "000000000001"]) == 0
    out = capsys.readouterr().out
    assert "476173******0119" in out and TEST_PAN not in out


async def test_the_gateway_purges_by_itself_and_counts_it(harness, journal_clock):
    """The purge's schedule and its "now" are the gateway's clock (on trio's): days pass in a jump."""
    await harness.start_switch()
    gw = await harness.start_gateway(journal={"retention": 30.0})
    client = await harness.client()
    assert (await client.request(harness.auth(15000), timeout=3))["39"] == "00"
    db = Path(gw.config.journal.path)

    def sealed() -> list:
        c = sqlite3.connect(db)
        try:
            return [r[0] is not None for r in c.execute("SELECT original FROM txn")]
        finally:
            c.close()

    await wait_real(lambda: sealed() == [True], 10, "the row, with its reversal data")  # by the indexer
    journal_clock.jump(3 * 86400)  # three days later: past the window of two, and a purge is due
    await wait_real(lambda: sealed() == [False], 10, "the reversal data erased")
    # Counted when the journal's thread hands the purge back, which may be a moment after the
    # file shows it (a loaded machine): waited for, not read at once.
    await wait_real(lambda: gw.metrics.journal_purged("reversal_data")._value.get() == 1, 10, "the erasure counted")
    journal_clock.jump(31 * 86400)  # past the 30 days of retention
    await wait_real(lambda: sealed() == [], 10, "the row deleted")
    await wait_real(lambda: gw.metrics.journal_purged("txn")._value.get() == 1, 10, "the deletion counted")
