"""Both store backends keep the same rows and the same rules: one suite run on SQLite and on a real
PostgreSQL server (started by the tests themselves, see conftest_pg.py), then what only the shared
PostgreSQL store does: migrations, leases on the reversals owed, STAN blocks, node heartbeats, and
how it fails when the database is gone."""

from __future__ import annotations

import os
import re
import secrets
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import TEST_PAN
from iso_gateway.journal import dbcli, migrate as migrations
from iso_gateway.journal.pg import (
    PgDatabase, PgStore, StoreUnavailable, failure_reason, make_conninfo, read_password, redact, stan_block,
)
from iso_gateway.journal.store import (
    ANSWERED, FORWARDED, RECEIVED, REVERSAL_FIELDS, REVERSED, SAF_ACKED, SAF_CANCELLED, SAF_PARKED, SAF_PENDING,
    SAF_SENT, TIMED_OUT, SafItem, SQLiteStore, id_at,
)
from iso_gateway.security.pan import PanVault
from pgserver import PgServer

pytest_plugins = ["conftest_pg"]

NOW = 1_800_000_000.0
HOUR = 3600.0
WINDOW = 48 * HOUR
RETENTION = 90 * 24 * HOUR
ORIGINAL = {"2": TEST_PAN, "3": "000000", "4": "000000010000", "7": "1127101010", "11": "000123",
            "12": "101010", "13": "1127", "32": "123456", "37": "633100000001", "41": "TERM0001",
            "42": "MERCHANT0000001", "49": "504"}
# What must never be stored: CVV2 (in DE 48 here), track 2, the PIN block, ICC data.
SECRETS = {"14": "2812", "35": f"{TEST_PAN}=28121010000000000000", "48": "CVV2=123", "52": "0123456789ABCDEF",
           "55": "9F2608AABBCCDDEEFF0011"}

_seq = iter(range(1, 10**9))


def txn_row(txn_id: int, *, state: str = FORWARDED, listener: str = "ecom", stan: str = "400001") -> dict[str, Any]:
    return {"id": txn_id, "listener": listener, "mti": "0100", "upstream": "cmi", "link": 0,
            "upstream_stan": stan, "state": state}


def saf_item(saf_id: int, txn_id: int | None, *, state: str = SAF_PENDING, next_attempt: float = NOW,
             upstream: str = "cmi", attempts: int = 0) -> SafItem:
    return SafItem(id=saf_id, txn_id=txn_id, upstream=upstream, state=state, reason="timeout", mti="0420",
                   stan="000001", f90="0" * 42, attempts=attempts, next_attempt=next_attempt, created=NOW,
                   message={**ORIGINAL, "t": "0420"})


def new_ids(n: int, t: float = NOW) -> list[int]:
    """Ids as new_id gives them at time ``t`` (distinct, growing)."""
    return [id_at(t) + next(_seq) * 64 for _ in range(n)]


# --------------------------------------------------------------------------- the two backends


class Backend:
    """One store on one database, and what the tests need around it: a transaction, raw SQL
    (written with ``?``), a store of another worker (SQLite) or node (PostgreSQL) on the same data."""

    name: str
    conn: Any
    store: Any

    @contextmanager
    def tx(self) -> Iterator[Any]:
        raise NotImplementedError
        yield

    def run(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        with self.tx():
            return fn(self.conn, *args, **kwargs)

    def sql(self, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        raise NotImplementedError

    def other_store(self) -> Any:
        raise NotImplementedError

    def reset(self) -> None:
        for table in ("txn", "saf", "meta"):
            self.sql(f"DELETE FROM {table}")

    def close(self) -> None:
        self.conn.close()


class SQLiteBackend(Backend):
    name = "sqlite"

    def __init__(self, path: str, vault: PanVault) -> None:
        self.conn = SQLiteStore.connect(path)
        self.store = SQLiteStore(vault, 0)

    @contextmanager
    def tx(self) -> Iterator[Any]:
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    def sql(self, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        return self.conn.execute(query, params).fetchall()

    def other_store(self) -> Any:
        return SQLiteStore(self.store.vault, 1)


class PgBackend(Backend):
    name = "postgresql"

    def __init__(self, conninfo: str, vault: PanVault) -> None:
        self.conninfo = conninfo
        self.conn = psycopg.connect(conninfo, autocommit=True)
        migrations.migrate(self.conn)
        self.store = PgStore(vault, "node-a")

    @contextmanager
    def tx(self) -> Iterator[Any]:
        with self.conn.transaction():
            yield self.conn

    def sql(self, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        cur = self.conn.execute(query.replace("?", "%s"), params)
        return [tuple(bytes(v) if isinstance(v, memoryview) else v for v in r) for r in cur.fetchall()] \
            if cur.description else []

    def other_store(self) -> Any:
        return PgStore(self.store.vault, "node-b")


@pytest.fixture
def vault() -> PanVault:
    return PanVault(secrets.token_bytes(32))


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest, tmp_path: Path, vault: PanVault) -> Iterator[Backend]:
    b: Backend
    if request.param == "sqlite":
        b = SQLiteBackend(str(tmp_path / "journal.sqlite3"), vault)
    else:
        b = PgBackend(request.getfixturevalue("pg_conninfo"), vault)
    try:
        yield b
    finally:
        b.close()


@pytest.fixture
def pg(pg_conninfo: str, vault: PanVault) -> Iterator[PgBackend]:
    b = PgBackend(pg_conninfo, vault)
    try:
        yield b
    finally:
        b.close()


# --------------------------------------------------------------------------- the shared suite


def test_a_transaction_is_stored_with_the_pan_masked_hashed_and_sealed_and_nothing_secret(backend: Backend) -> None:
    (txn_id,) = new_ids(1)
    backend.run(backend.store.insert_txn, txn_row(txn_id), {**ORIGINAL, **SECRETS})
    everything = repr(backend.sql("SELECT * FROM txn"))
    assert TEST_PAN not in everything and "CVV2" not in everything and "0123456789ABCDEF" not in everything
    (hit,) = backend.run(backend.store.find_txns, rrn="633100000001")
    assert (hit.id, hit.pan_masked, hit.state, hit.terminal, hit.merchant) == (
        txn_id, "476173******0119", FORWARDED, "TERM0001", "MERCHANT0000001")
    ((pan_hash, sealed),) = backend.sql("SELECT pan_hash, original FROM txn")
    assert pan_hash == backend.store.vault.pan_hash(TEST_PAN)
    fields = backend.store.vault.open(sealed)
    assert fields == ORIGINAL and set(fields) <= set(REVERSAL_FIELDS)  # the reversal's fields only


def test_a_batch_of_inserts_and_ordered_updates_lands_in_one_transaction(backend: Backend) -> None:
    ids = new_ids(300)
    calls = [(txn_row(i), {**ORIGINAL, "37": f"{n:012d}"}) for n, i in enumerate(ids)]
    with backend.tx() as conn:
        backend.store.insert_txn_many(conn, calls)
        # Several answers to one row in one batch apply in order: the last state, the codes given.
        backend.store.update_txn_many(conn, [(ids[0], ANSWERED, "00", "A1B2C3"), (ids[0], REVERSED),
                                             (ids[1], TIMED_OUT), (ids[1], ANSWERED, "05"), (ids[2], ANSWERED, "00")])
        backend.store.update_txn(conn, ids[3], ANSWERED, "51", None)
    rows = {r[0]: r[1:] for r in backend.sql("SELECT id, state, response_code, auth_code FROM txn")}
    assert len(rows) == 300
    assert rows[ids[0]] == (REVERSED, "00", "A1B2C3")
    assert rows[ids[1]] == (ANSWERED, "05", None)
    assert rows[ids[2]] == (ANSWERED, "00", None)
    assert rows[ids[3]] == (ANSWERED, "51", None)
    assert rows[ids[4]] == (FORWARDED, None, None)


def test_a_failed_batch_leaves_nothing_behind(backend: Backend) -> None:
    (txn_id,) = new_ids(1)
    backend.run(backend.store.insert_txn, txn_row(txn_id), ORIGINAL)
    with pytest.raises(backend.store.errors) as caught:
        with backend.tx() as conn:
            backend.store.insert_txn_many(conn, [(txn_row(new_ids(1)[0]), ORIGINAL), (txn_row(txn_id), ORIGINAL)])
    assert backend.sql("SELECT COUNT(*) FROM txn") == [(1,)]
    assert isinstance(caught.value, (sqlite3.IntegrityError, psycopg.IntegrityError))
    assert not backend.store.refused(caught.value) and backend.store.failure_reason(caught.value) == "other"


def log_record(txn_id: int, created: float, n: int) -> tuple[Any, ...]:
    return ("T", txn_id, created, "ecom", "0100", "cmi", 0, f"{n:06d}", 0, {**ORIGINAL, "37": f"{n:012d}"})


def test_a_log_segment_applied_twice_changes_nothing(backend: Backend) -> None:
    a, b, c = new_ids(3)
    backend.run(backend.store.insert_txn, txn_row(c), ORIGINAL)
    records = [log_record(a, NOW, 1), log_record(b, NOW + 1, 2), ("U", a, ANSWERED, NOW + 2, "00", "X1"),
               ("U", c, TIMED_OUT, NOW + 3, None, None), ("U", c, ANSWERED, NOW + 4, "00", None)]
    assert backend.run(backend.store.apply_log, records) == (2, 2 if backend.name == "sqlite" else 1)
    assert backend.run(backend.store.apply_log, records)[0] == 0
    rows = {r[0]: r[1:] for r in backend.sql("SELECT id, state, response_code, auth_code, updated FROM txn")}
    assert rows == {a: (ANSWERED, "00", "X1", NOW + 2), b: (FORWARDED, None, None, NOW + 1),
                    c: (ANSWERED, "00", None, NOW + 4)}


def test_the_reversal_queue_gives_what_is_due_in_order_with_its_stats(backend: Backend) -> None:
    store = backend.store
    ids = new_ids(8)
    with backend.tx() as conn:
        store.insert_saf(conn, saf_item(ids[0], None, next_attempt=NOW + 30))
        store.insert_saf(conn, saf_item(ids[1], None, next_attempt=NOW - 10))
        store.insert_saf(conn, saf_item(ids[2], None, state=SAF_SENT, next_attempt=NOW - 20, attempts=1))
        store.insert_saf(conn, saf_item(ids[3], None, state=SAF_PARKED, next_attempt=NOW - 30))
        store.insert_saf(conn, saf_item(ids[4], None, state=SAF_ACKED, next_attempt=NOW - 30))
        store.insert_saf(conn, saf_item(ids[5], None, next_attempt=NOW - 40, upstream="other"))
        backend.other_store().insert_saf(conn, saf_item(ids[6], None, next_attempt=NOW - 50))  # not ours
    due = backend.run(store.due_saf, "cmi", NOW, 10)
    assert [i.id for i in due] == [ids[2], ids[1]]
    assert due[0].message["2"] == TEST_PAN and due[0].attempts == 1 and due[0].state == SAF_SENT
    assert [i.id for i in backend.run(store.due_saf, "cmi", NOW, 1)] == [ids[2]]
    assert backend.run(store.next_due, "cmi") == NOW - 20
    assert backend.run(store.next_due, "nowhere") is None
    assert backend.run(store.saf_stats, "cmi") == (3, NOW, NOW - 20, 1)
    assert backend.run(store.saf_stats, "nowhere") == (0, None, None, 0)
    backend.run(store.update_saf, ids[1], state=SAF_ACKED, result="acknowledged")
    backend.run(store.update_saf, ids[2], state=SAF_SENT, attempts=2, next_attempt=NOW + 60, stan="000777")
    assert [i.id for i in backend.run(store.due_saf, "cmi", NOW, 10)] == []
    listed = backend.run(store.list_saf, [SAF_SENT, SAF_PARKED], 10)
    assert sorted((r[0], r[2], r[5], r[10]) for r in listed) == sorted(
        [(ids[2], SAF_SENT, "000777", 2), (ids[3], SAF_PARKED, "000001", 0)])
    assert all(TEST_PAN not in repr(r) and "476173******0119" in r for r in listed)
    assert "CVV2" not in repr(backend.sql("SELECT * FROM saf")) and TEST_PAN not in repr(backend.sql("SELECT * FROM saf"))


def test_only_a_reversal_never_sent_is_cancelled_by_a_late_answer(backend: Backend) -> None:
    t1, t2, s1, s2 = new_ids(4)
    with backend.tx() as conn:
        backend.store.insert_saf(conn, saf_item(s1, t1))
        backend.store.insert_saf(conn, saf_item(s2, t2, state=SAF_SENT, attempts=1))
    assert backend.run(backend.store.cancel_unsent_saf, t1, "late response 00") == 1
    assert backend.run(backend.store.cancel_unsent_saf, t2, "late response 00") == 0
    assert sorted(backend.sql("SELECT id, state, last_result FROM saf")) == sorted(
        [(s1, SAF_CANCELLED, "late response 00"), (s2, SAF_SENT, None)])


def test_a_front_end_reversal_finds_only_its_own_merchants_original(backend: Backend) -> None:
    store = backend.store
    mine, other_merchant, other_listener, s1 = new_ids(4)
    with backend.tx() as conn:
        store.insert_txn(conn, txn_row(mine, state=ANSWERED), ORIGINAL)
        store.insert_txn(conn, txn_row(other_merchant, state=ANSWERED), {**ORIGINAL, "42": "MERCHANT0000002"})
        store.insert_txn(conn, txn_row(other_listener, state=ANSWERED, listener="pos"), ORIGINAL)
        store.insert_saf(conn, saf_item(s1, mine, state=SAF_ACKED))
    args = ("ecom", "123456", "TERM0001", "MERCHANT0000001", "000123", "1127101010", "0100")
    found = backend.run(store.find_original, *args)
    assert found is not None
    txn, fields, states = found
    assert (txn.id, fields["2"], states) == (mine, TEST_PAN, [SAF_ACKED])
    assert backend.run(store.find_original, "ecom", "654321", *args[2:]) is None  # another acquirer
    assert backend.run(store.find_original, "web", *args[1:]) is None  # another front end
    assert backend.run(store.find_original, *args[:3], "MERCHANT0000009", *args[4:]) is None
    assert backend.run(store.find_original, *args[:4], "000124", *args[5:]) is None
    other = backend.run(store.find_original, "ecom", "123456", "TERM0001", "MERCHANT0000002", *args[4:])
    assert other is not None and other[0].id == other_merchant and other[2] == []


def test_in_doubt_are_the_unanswered_sent_transactions_with_no_reversal_queued(backend: Backend) -> None:
    store = backend.store
    forwarded, timed_out, queued, answered, received, old, others = new_ids(7)
    (ancient,) = new_ids(1, NOW - 3 * 86400)
    with backend.tx() as conn:
        store.insert_txn(conn, txn_row(forwarded), ORIGINAL)
        store.insert_txn(conn, txn_row(timed_out, state=TIMED_OUT), ORIGINAL)
        store.insert_txn(conn, txn_row(queued, state=TIMED_OUT), ORIGINAL)
        store.insert_saf(conn, saf_item(new_ids(1)[0], queued))
        store.insert_txn(conn, txn_row(answered), ORIGINAL)
        store.update_txn(conn, answered, ANSWERED, "00")
        store.insert_txn(conn, txn_row(received, state=RECEIVED), ORIGINAL)
        store.insert_txn(conn, txn_row(ancient), ORIGINAL)
        backend.other_store().insert_txn(conn, txn_row(others), ORIGINAL)
    assert old  # (an id drawn, unused: gaps between ids change nothing)
    found = backend.run(store.in_doubt, NOW - 86400)
    assert sorted(t[0] for t in found) == [forwarded, timed_out]
    assert all(t[1:4] == ("cmi", "0100", "400001") and t[4]["2"] == TEST_PAN for t in found)
    assert sorted(t[0] for t in backend.run(store.in_doubt, NOW - 4 * 86400)) == sorted([ancient, forwarded,
                                                                                        timed_out])


def test_meta_values_are_set_read_and_replaced(backend: Backend) -> None:
    assert backend.run(backend.store.get_meta, "stan:cmi:0") is None
    backend.run(backend.store.set_meta, "stan:cmi:0", "1000")
    backend.run(backend.store.set_meta, "stan:cmi:0", "2000")
    assert backend.run(backend.store.get_meta, "stan:cmi:0") == "2000"


LIVE = (SAF_PENDING, SAF_SENT, SAF_PARKED)


def add_aged(backend: Backend, n: int, age_hours: int, saf_state: str | None, idle_hours: int) -> tuple[int, int]:
    txn_id = id_at(NOW - age_hours * HOUR) + n * 128
    store = backend.store
    row = txn_row(txn_id, state=TIMED_OUT if saf_state else ANSWERED)
    with backend.tx() as conn:
        store.insert_txn(conn, row, {**ORIGINAL, "37": f"{n:012d}"})
        if saf_state is not None:
            store.insert_saf(conn, saf_item(txn_id + 64, txn_id, state=saf_state, attempts=1))
    if saf_state is not None:
        backend.sql("UPDATE saf SET updated=? WHERE id=?", (NOW - min(idle_hours, age_hours) * HOUR, txn_id + 64))
    return txn_id, txn_id + 64


def purge_all(backend: Backend, batch: int) -> dict[str, int]:
    total = {"reversal_data": 0, "txn": 0, "saf": 0}
    for _ in range(10_000):
        counts, more = backend.run(backend.store.purge, NOW, WINDOW, RETENTION, batch)
        for k, v in counts.items():
            total[k] += v
        if not more:
            return total
    raise AssertionError("the purge never finished")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(st.tuples(st.integers(0, 24 * 120), st.sampled_from([None, *LIVE, SAF_ACKED, SAF_CANCELLED]),
                               st.integers(0, 24 * 120)), max_size=20),
       batch=st.integers(1, 7))
def test_the_purge_never_touches_what_an_owed_reversal_needs(backend: Backend, rows: list[tuple[Any, ...]],
                                                             batch: int) -> None:
    backend.reset()
    made = [(add_aged(backend, n, age, saf, idle), age, saf, idle) for n, (age, saf, idle) in enumerate(rows)]
    purge_all(backend, batch)
    originals = dict(backend.sql("SELECT id, original FROM txn"))
    messages = dict(backend.sql("SELECT id, message FROM saf"))
    for (txn_id, saf_id), age, saf, idle in made:
        live = saf in LIVE
        final_past_window = saf in (SAF_ACKED, SAF_CANCELLED) and min(idle, age) * HOUR > WINDOW
        if txn_id < id_at(NOW - RETENTION) and not live:
            assert txn_id not in originals
        elif live:
            assert originals[txn_id] is not None and messages[saf_id] is not None
        elif txn_id < id_at(NOW - WINDOW) or final_past_window:
            assert originals[txn_id] is None
        else:
            assert backend.store.vault.open(originals[txn_id])["2"] == TEST_PAN
        if saf in (SAF_ACKED, SAF_CANCELLED) and saf_id < id_at(NOW - RETENTION):
            assert saf_id not in messages
    assert purge_all(backend, batch) == {"reversal_data": 0, "txn": 0, "saf": 0}


# Write-ahead log records: rows (T) and their updates (U), in any order, some for rows not in the segment.
records_strategy = st.lists(
    st.one_of(st.tuples(st.just("T"), st.integers(0, 5)),
              st.tuples(st.just("U"), st.integers(0, 7), st.sampled_from([ANSWERED, TIMED_OUT, REVERSED]),
                        st.sampled_from([None, "00", "05"]), st.sampled_from([None, "A1", "B2"]))),
    max_size=25)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pre=st.sets(st.integers(6, 7)), script=records_strategy)
def test_both_backends_apply_a_log_segment_to_the_same_rows(tmp_path: Path, pg: PgBackend, vault: PanVault,
                                                            pre: set[int], script: list[tuple[Any, ...]]) -> None:
    lite = SQLiteBackend(":memory:", vault)
    base = id_at(NOW)
    records: list[tuple[Any, ...]] = []
    seen: set[int] = set()
    for n, step in enumerate(script):
        if step[0] == "T":
            if step[1] in seen:
                continue  # a row is logged once
            seen.add(step[1])
            records.append(log_record(base + step[1] * 64, NOW + n, step[1]))
        else:
            records.append(("U", base + step[1] * 64, step[2], NOW + n, step[3], step[4]))
    pg.reset()
    results = []
    for b in (lite, pg):
        with b.tx() as conn:
            for k in pre:  # rows written by an earlier segment
                b.store.insert_txn(conn, txn_row(base + k * 64), ORIGINAL)
            b.sql("UPDATE txn SET updated=?", (NOW,))
        inserted, _ = b.run(b.store.apply_log, records)
        results.append((inserted, b.sql("SELECT id, state, response_code, auth_code, updated, pan_masked, rrn"
                                        " FROM txn ORDER BY id")))
    lite.close()
    assert results[0] == results[1]


# --------------------------------------------------------------------------- PostgreSQL: migrations


def test_migrations_apply_once_and_report_their_status(pg_conninfo: str) -> None:
    with psycopg.connect(pg_conninfo, autocommit=True) as conn:
        assert migrations.status(conn).current == 0
        latest = migrations.available()[-1].version
        assert migrations.migrate(conn) == list(range(1, latest + 1))
        assert migrations.migrate(conn) == []
        state = migrations.status(conn)
        assert state.up_to_date and state.current == latest
        columns = {r[0] for r in conn.execute(
            "SELECT table_name || '.' || column_name FROM information_schema.columns WHERE table_schema='public'")}
        assert {"txn.node", "saf.node", "saf.leased_by", "saf.lease_until", "nodes.expires", "nodes.slot",
                "stan_counter.next"} <= columns


def test_migrations_started_together_on_several_nodes_apply_once(pg_conninfo: str) -> None:
    results: list[list[int]] = []
    errors: list[BaseException] = []
    start = threading.Barrier(6)

    def node() -> None:
        try:
            with psycopg.connect(pg_conninfo, autocommit=True) as conn:
                start.wait()
                results.append(migrations.migrate(conn))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=node) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    latest = migrations.available()[-1].version
    # Each migration is applied by exactly one of them (one node may apply the first, another the next).
    assert sorted(v for applied in results for v in applied) == list(range(1, latest + 1)) and len(results) == 6
    with psycopg.connect(pg_conninfo) as conn:
        assert conn.execute("SELECT COUNT(*), COUNT(DISTINCT version) FROM schema_version").fetchone() == (
            latest, latest)


def test_a_failing_migration_leaves_nothing_and_a_newer_schema_is_refused(pg_conninfo: str) -> None:
    shipped = migrations.available()
    n = len(shipped)
    good = migrations.Migration(n + 1, "add_a_table", "CREATE TABLE extra (x INT); CREATE INDEX extra_x ON extra (x);")
    bad = migrations.Migration(n + 2, "broken", "CREATE TABLE broken (y INT); SELECT no_such_function();")
    with psycopg.connect(pg_conninfo, autocommit=True) as conn:
        with pytest.raises(psycopg.errors.UndefinedFunction):
            migrations.migrate(conn, [*shipped, good, bad])
        assert migrations.status(conn, [*shipped, good, bad]).current == n + 1
        assert conn.execute("SELECT to_regclass('extra') IS NOT NULL, to_regclass('broken') IS NULL").fetchone() == (
            True, True)
        with pytest.raises(migrations.MigrationError, match="newer than this program"):
            migrations.migrate(conn)  # this program ships only ``shipped``


def test_dbcli_migrates_and_reports_without_showing_the_password(pg_server: PgServer) -> None:
    dsn = pg_server.conninfo(pg_server.create_database())
    out: list[str] = []
    assert dbcli.status(dsn, out.append) == 2
    assert dbcli.migrate(dsn, out.append) == 0
    assert dbcli.migrate(dsn, out.append) == 0
    assert dbcli.status(dsn, out.append) == 0
    wrong = dsn.replace(pg_server.password, "not-the-password-x9")
    assert dbcli.status(wrong, out.append) == 1
    text = "\n".join(out)
    assert "pending: 0001_initial" in text and "up to date" in text and "failed" in text and "auth" in text
    assert pg_server.password not in text and "not-the-password-x9" not in text and "password=********" in text


# --------------------------------------------------------------------------- PostgreSQL: several nodes


def queue(pg: PgBackend, n: int, upstream: str = "cmi") -> list[int]:
    ids = new_ids(n)
    with pg.tx() as conn:
        for k, i in enumerate(ids):
            pg.store.insert_saf(conn, saf_item(i, None, next_attempt=NOW - 10_000 + k, upstream=upstream))
    return ids


def test_two_nodes_leasing_together_never_get_the_same_reversal(pg: PgBackend) -> None:
    """One node's lease transaction is still open (its rows locked) when the other asks: the other
    skips those rows at once, without waiting (lock_timeout would fail it), and gets the rest."""
    ids = queue(pg, 10)
    b_conn = psycopg.connect(pg.conninfo, autocommit=True)
    b_conn.execute("SET lock_timeout = '200ms'")
    b = PgStore(pg.store.vault, "node-b")
    try:
        with pg.conn.transaction():
            first = pg.store.lease_due_saf(pg.conn, "node-a", NOW, 30, 4)
            with b_conn.transaction():
                second = b.lease_due_saf(b_conn, "node-b", NOW, 30, 10)
        assert [i.id for i in first] == ids[:4]
        assert [i.id for i in second] == ids[4:]
        assert second[0].message["2"] == TEST_PAN
        # Both committed: each holds its own, nobody gets the other's while the leases live.
        assert [i.id for i in b.lease_due_saf(b_conn, "node-b", NOW + 1, 30, 10)] == ids[4:]  # renewed, its own
        assert pg.run(pg.store.lease_due_saf, "node-c", NOW + 1, 30, 10) == []
    finally:
        b_conn.close()


def test_many_nodes_leasing_at_once_share_the_queue_without_overlap(pg: PgBackend) -> None:
    ids = queue(pg, 200)
    got: dict[str, list[int]] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(5)

    def node(name: str) -> None:
        store = PgStore(pg.store.vault, name)
        mine: list[int] = []
        try:
            with psycopg.connect(pg.conninfo, autocommit=True) as conn:
                start.wait()
                for _ in range(10_000):
                    with conn.transaction():
                        # As the SAF worker asks: room for 7 more besides what it holds (its own come again).
                        items = store.lease_due_saf(conn, name, NOW, 60, 7 + len(mine))
                        new = [i.id for i in items if i.id not in mine]
                    mine.extend(new)
                    # Under contention a lease may come back short, even empty (rows another node
                    # leased a moment ago): a node asks again while anything is left unleased.
                    if not new and conn.execute("SELECT COUNT(*) FROM saf WHERE leased_by IS NULL").fetchone() == (0,):
                        break
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        got[name] = mine

    threads = [threading.Thread(target=node, args=(f"n{k}",)) for k in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    everything = [i for mine in got.values() for i in mine]
    assert sorted(everything) == sorted(ids) and len(set(everything)) == len(everything)
    holders = dict(pg.sql("SELECT id, leased_by FROM saf"))
    assert all(holders[i] == name for name, mine in got.items() for i in mine)


def test_a_lease_runs_out_unless_renewed_and_can_be_released(pg: PgBackend) -> None:
    a, b = pg.store, PgStore(pg.store.vault, "node-b")
    ids = queue(pg, 3)
    assert [i.id for i in pg.run(a.lease_due_saf, "node-a", NOW, 30, 2)] == ids[:2]
    assert pg.run(a.renew_leases, "node-a", ids, NOW + 60) == ids[:2]  # the third was never its own
    assert [i.id for i in pg.run(b.lease_due_saf, "node-b", NOW + 45, 30, 10)] == [ids[2]]
    # node-a's renewed leases run out at NOW + 60: then node-b takes them, and node-a has lost them.
    assert [i.id for i in pg.run(b.lease_due_saf, "node-b", NOW + 61, 30, 10)] == ids
    assert pg.run(a.renew_leases, "node-a", ids, NOW + 120) == []
    assert pg.run(b.release_leases, "node-b", [ids[0]]) == 1
    assert [i.id for i in pg.run(a.lease_due_saf, "node-a", NOW + 62, 30, 10)] == [ids[0]]
    assert pg.run(b.release_leases, "node-b") == 2
    # Only what is waiting and due is leased; one upstream can be asked for.
    pg.run(a.update_saf, ids[1], state=SAF_ACKED)
    pg.run(a.update_saf, ids[2], state=SAF_PENDING, next_attempt=NOW + 500)
    other = queue(pg, 1, upstream="other")
    assert [i.id for i in pg.run(b.lease_due_saf, "node-b", NOW + 200, 30, 10, "other")] == other
    # (node-a's lease on ids[0] ran out at NOW + 92: it is due again.)
    assert [i.id for i in pg.run(b.lease_due_saf, "node-b", NOW + 200, 30, 10, "cmi")] == [ids[0]]


def test_an_operator_parks_and_retries_reversals_from_any_node(pg: PgBackend) -> None:
    a, b = pg.store, PgStore(pg.store.vault, "node-b")
    ids = queue(pg, 3)
    pg.run(a.lease_due_saf, "node-a", NOW, 30, 10)
    assert pg.run(b.park_saf, NOW, [ids[0]]) == 1  # from another node: parked, its lease dropped
    assert [i.id for i in pg.run(a.lease_due_saf, "node-a", NOW + 1, 30, 10)] == ids[1:]
    assert pg.run(b.park_saf, NOW + 2) == 2
    assert pg.run(a.lease_due_saf, "node-a", NOW + 3, 30, 10) == []
    pg.run(a.update_saf, ids[2], state=SAF_PARKED, attempts=5)
    assert pg.run(b.retry_saf, NOW + 4, [ids[2]]) == 1
    assert pg.run(b.retry_saf, NOW + 4, [ids[2]]) == 1  # a waiting one is made due again too
    (item,) = pg.run(b.lease_due_saf, "node-b", NOW + 4, 30, 10)
    assert (item.id, item.state, item.attempts, item.next_attempt) == (ids[2], SAF_PENDING, 1, NOW + 4)
    assert pg.run(a.retry_saf, NOW + 5) == 3
    assert sorted(r[0] for r in pg.sql("SELECT id FROM saf WHERE state='pending' AND leased_by IS NULL")) == ids


def test_heartbeats_show_which_nodes_died_and_a_survivor_takes_over_their_work(pg: PgBackend) -> None:
    a, b = pg.store, PgStore(pg.store.vault, "node-b")
    pg.run(a.heartbeat, "node-a", NOW, 10)
    pg.run(b.heartbeat, "node-b", NOW, 10)
    pg.run(a.heartbeat, "node-a", NOW + 8, 10)
    assert pg.run(a.expired_nodes, NOW + 5) == []
    assert pg.run(a.expired_nodes, NOW + 11) == ["node-b"]
    assert pg.run(a.live_nodes, NOW + 11) == ["node-a"]
    sent, answered, queued_txn, saf_id = new_ids(4)
    with pg.tx() as conn:
        b.insert_txn(conn, txn_row(sent), ORIGINAL)
        b.insert_txn(conn, txn_row(answered), ORIGINAL)
        b.update_txn(conn, answered, ANSWERED, "00")
        b.insert_txn(conn, txn_row(queued_txn, state=TIMED_OUT), ORIGINAL)
        b.insert_saf(conn, saf_item(saf_id, queued_txn))
    assert [t[0] for t in pg.run(a.in_doubt, NOW - 3600, "node-b")] == [sent]
    assert pg.run(a.take_over, "node-b", "node-a") == (2, 1)
    assert [t[0] for t in pg.run(a.in_doubt, NOW - 3600)] == [sent]
    assert [i.id for i in pg.run(a.due_saf, "cmi", NOW, 10)] == [saf_id]
    assert pg.run(b.in_doubt, NOW - 3600) == []


def test_live_nodes_hold_different_id_slots_and_a_dead_nodes_slot_is_reused(pg: PgBackend) -> None:
    store = pg.store
    slots: dict[str, int] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def node(name: str) -> None:
        try:
            with psycopg.connect(pg.conninfo, autocommit=True) as conn:
                start.wait()
                with conn.transaction():
                    slots[name] = store.claim_slot(conn, name, NOW, 10)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=node, args=(f"n{k}",)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [] and sorted(slots.values()) == list(range(8))
    assert pg.run(store.claim_slot, "n3", NOW + 5, 10) == slots["n3"]  # a node keeps its own
    for name in slots:
        if name != "n5":
            pg.run(store.heartbeat, name, NOW + 9, 10)
    # n5 died (its heartbeat ran out at NOW + 10): a new node gets its slot, none of the live ones.
    assert pg.run(store.claim_slot, "new", NOW + 12, 10) == slots["n5"]
    assert pg.run(store.claim_slot, "n5", NOW + 13, 10) == 8  # back again: a free slot, not the taken one
    for k in range(9, 64):
        pg.run(store.claim_slot, f"m{k}", NOW + 14, 10)
    with pytest.raises(RuntimeError, match="all 64 node slots"):
        pg.run(store.claim_slot, "one-too-many", NOW + 15, 10)


def test_stan_blocks_are_unique_across_concurrent_callers(pg: PgBackend) -> None:
    blocks: list[tuple[int, int]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    start = threading.Barrier(6)

    def node(k: int) -> None:
        try:
            with psycopg.connect(pg.conninfo, autocommit=True) as conn:
                start.wait()
                for n in range(40):
                    size = 1 + (k + n) % 17
                    first = PgStore.next_stan_block(conn, "cmi:0", size)
                    with lock:
                        blocks.append((first, size))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=node, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    stans = [s for first, size in blocks for s in stan_block(first, size)]
    assert len(stans) == len(set(stans)) == sum(size for _, size in blocks)
    assert sorted(stans) == list(range(1, len(stans) + 1))  # no gaps either: the counter only moves by blocks
    assert pg.run(PgStore.next_stan_block, "cmi:1", 5) == 1  # each link has its own counter


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(start=st.integers(1, 999_999), sizes=st.lists(st.integers(1, 5000), min_size=1, max_size=6))
def test_stan_blocks_wrap_after_999999_and_never_give_000000(pg: PgBackend, start: int, sizes: list[int]) -> None:
    pg.sql("DELETE FROM stan_counter")
    pg.sql("INSERT INTO stan_counter (link, next) VALUES ('w', ?)", (start,))
    expected = start
    for size in sizes:
        first = pg.run(PgStore.next_stan_block, "w", size)
        assert first == expected
        block = stan_block(first, size)
        assert all(1 <= s <= 999_999 for s in block)
        expected = block[-1] % 999_999 + 1


# --------------------------------------------------------------------------- PostgreSQL: settings and failures


def test_the_conninfo_is_built_from_plain_values_and_logged_without_its_password(tmp_path: Path,
                                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    pwfile = tmp_path / "db-password"
    pwfile.write_text("s3cret-from-file\n")
    pwfile.chmod(0o600)
    assert read_password(pwfile) == "s3cret-from-file"
    monkeypatch.setenv("ISO_GATEWAY_DB_PASSWORD", "s3cret from env")
    assert read_password(pwfile, "ISO_GATEWAY_DB_PASSWORD") == "s3cret from env"
    assert read_password(None, "NO_SUCH_VARIABLE_HERE") is None
    pwfile.chmod(0o644)
    with pytest.raises(PermissionError):
        read_password(pwfile)
    conninfo = make_conninfo("postgresql://gw@db.example:5433/journal?sslmode=require", password="s3cret from env",
                             application_name="iso-gateway node-a")
    from psycopg.conninfo import conninfo_to_dict

    params = conninfo_to_dict(conninfo)
    assert (params["host"], params["port"], params["dbname"], params["user"], params["password"],
            params["sslmode"], params["application_name"]) == (
        "db.example", "5433", "journal", "gw", "s3cret from env", "require", "iso-gateway node-a")
    shown = redact(conninfo)
    assert "s3cret" not in shown and "password=********" in shown and "host=db.example" in shown
    assert sorted(redact(make_conninfo("host=h user=u")).split()) == [
        "application_name=iso-gateway", "connect_timeout=5", "host=h", "user=u"]
    with pytest.raises(ValueError) as bad:
        make_conninfo("host=h password=half secret")
    assert "secret" not in str(bad.value) and "half" not in str(bad.value)
    assert "secret" not in redact("host=h password=half secret")


def test_a_stopped_database_fails_each_operation_with_a_classified_error_and_no_password(
        vault: PanVault, caplog: pytest.LogCaptureFixture) -> None:
    from conftest_pg import new_server

    server = new_server()
    try:
        conninfo = server.conninfo(server.create_database())
        db = PgDatabase(conninfo, PgStore(vault, "node-a"), connect_timeout=1.0)
        db.open(wait=True)
        try:
            assert db.migrate() == [m.version for m in migrations.available()]
            (txn_id,) = new_ids(1)
            db.run(db.store.insert_txn, txn_row(txn_id), ORIGINAL)
            server.stop()
            started = time.monotonic()
            for fn, args in ((db.store.insert_txn, (txn_row(txn_id + 64), ORIGINAL)),
                             (db.store.due_saf, ("cmi", NOW, 10)), (db.store.set_meta, ("k", "v"))):
                with pytest.raises(StoreUnavailable) as failed:
                    db.run(fn, *args)
                assert failed.value.reason == "unreachable" and failure_reason(failed.value) == "unreachable"
                text = f"{failed.value} {failed.value!r} {failed.value.__cause__!r} {failed.value.__context__!r}"
                assert server.password not in text
            assert time.monotonic() - started < 30  # each waits at most its connect timeout
            server.restart()  # the pool replaces its broken connections: service resumes by itself
            deadline = time.monotonic() + 20
            while True:
                try:
                    assert db.run(db.store.find_txns, rrn="633100000001")[0].id == txn_id
                    break
                except StoreUnavailable:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
        finally:
            db.close()
    finally:
        server.destroy()
    assert server.password not in caplog.text


def test_errors_say_what_they_mean_about_the_store() -> None:
    cases = {"53100": "disk_full", "25006": "read_only", "57014": "timeout", "55P03": "locked", "40P01": "locked",
             "57P01": "unreachable", "08006": "unreachable", "53300": "resources", "58030": "io",
             "XX001": "corrupt", "28P01": "auth", "3D000": "config", "42P01": "schema", "23505": "other"}
    for sqlstate, reason in cases.items():
        exc = psycopg.errors.lookup(sqlstate)("x")
        assert failure_reason(exc) == reason, sqlstate
        assert PgStore.refused(exc) == (reason in {"disk_full", "read_only", "timeout", "locked", "unreachable",
                                                   "resources", "io"}), sqlstate
    assert failure_reason(psycopg.OperationalError("connection is lost")) == "unreachable"
    full = sqlite3.OperationalError("database or disk is full")
    full.sqlite_errorname = "SQLITE_FULL"  # type: ignore[attr-defined]
    assert failure_reason(full) == "disk_full" and SQLiteStore.refused(full)
    assert not SQLiteStore.refused(sqlite3.IntegrityError("UNIQUE constraint failed"))


def test_the_migrations_ship_inside_the_package() -> None:
    folder = Path(migrations.__file__).parent / "migrations"
    names = sorted(p.name for p in folder.glob("*.sql"))
    assert names and all(re.fullmatch(r"\d{4}_[a-z0-9_]+\.sql", n) for n in names)
    assert [m.version for m in migrations.available()] == list(range(1, len(names) + 1))
    assert os.path.exists(folder / "__init__.py")
