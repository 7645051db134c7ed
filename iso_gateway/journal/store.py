"""The journal's store: the SQLite schema and statements, PAN-safe, with no event loop in sight.

``SQLiteStore`` implements the store interface (interface.py), as ``PgStore``
(pg.py) does on PostgreSQL for several gateway nodes; ``Journal`` (commit.py) runs its methods in its worker
thread, and the indexer process (indexer.py) runs ``apply_log`` without
importing trio at all (it stays a small process).

What is stored: identities (listener, terminal, merchant, STANs, DE 7, RRN),
amount, currency, the masked PAN, a keyed hash of the PAN, states and times.
The PAN itself only inside AES-GCM ciphertext, and only the fields a reversal
needs, erased once no reversal can need them; rows go after the retention
(``purge``). Never CVV2, track data, PIN blocks or ICC data (see security/pan.py).
"""

from __future__ import annotations

import functools
import logging
import os
import sqlite3
import time
from dataclasses import dataclass, field
from itertools import count
from pathlib import Path
from typing import Any, Callable, Sequence

from ..core.masking import mask_pan
from ..core.states import (  # noqa: F401 - the journal's public names too
    ANSWERED, FORWARDED, NOT_SENT, RECEIVED, REVERSAL_FIELDS, REVERSED, TIMED_OUT,
)
from ..security.pan import PanVault

log = logging.getLogger("iso_gateway.journal")

# Transaction states: core/states.py (the flow decides them). SAF states:
SAF_PENDING = "pending"
SAF_SENT = "sent"
SAF_ACKED = "acked"
SAF_PARKED = "parked"
SAF_CANCELLED = "cancelled"

# Seconds between WAL checkpoints (the checkpoint thread; see Journal._checkpoints).
CHECKPOINT_EVERY = 1.0

# Rows one purge statement touches at most (``SQLiteStore.purge``): a few milliseconds of the
# writer's time, so a purge of a large backlog never holds the requests' commits back for long.
PURGE_BATCH = 1000


SCHEMA = """
CREATE TABLE IF NOT EXISTS txn (
    id INTEGER PRIMARY KEY,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    listener TEXT, mti TEXT, terminal TEXT, merchant TEXT, front_stan TEXT, transmission TEXT,
    upstream TEXT, link INTEGER, upstream_stan TEXT, rrn TEXT, amount TEXT, currency TEXT,
    pan_masked TEXT, pan_hash TEXT,
    state TEXT NOT NULL, response_code TEXT, auth_code TEXT,
    original BLOB,
    worker INTEGER NOT NULL DEFAULT 0,
    acquirer TEXT
);
CREATE INDEX IF NOT EXISTS txn_rrn ON txn(rrn);
DROP INDEX IF EXISTS txn_front;
CREATE INDEX IF NOT EXISTS txn_front_time ON txn(transmission, terminal, front_stan);
CREATE TABLE IF NOT EXISTS saf (
    id INTEGER PRIMARY KEY,
    txn_id INTEGER,
    upstream TEXT NOT NULL,
    state TEXT NOT NULL,
    reason TEXT, mti TEXT, stan TEXT, f90 TEXT, rrn TEXT, amount TEXT, currency TEXT, pan_masked TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    last_result TEXT,
    message BLOB,
    worker INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS saf_due ON saf(upstream, worker, state, next_attempt);
CREATE INDEX IF NOT EXISTS saf_txn ON saf(txn_id);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
"""


def create_private(path: str) -> None:
    """Make the journal's folder (0700) and file (0600) if missing, before SQLite opens it.

    Card data at rest, even masked and encrypted, is the owner's only, from the first byte:
    SQLite gives its -wal and -shm files the database file's mode, so a file created 0600
    here keeps them 0600 too, whatever the process's umask (a chmod after SQLite created
    them would leave them readable by others until it ran)."""
    folder = Path(path).parent
    if not folder.exists():
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
    except FileExistsError:
        pass


_ids = count()
_id_base = int(time.time() * 1000) << 20
_worker_bits = 0  # this process's worker number, in the low 6 bits of every id (set by Journal)
MAX_WORKERS = 64
# How far back recovery looks for in-doubt transactions: a reversal must reach the
# switch within 24 h (scheme rules, docs/domain.md §3.3), so two days is ample.
RECOVERY_WINDOW = 2 * 86400.0


class Backoff:
    """Delays between retries of something that failed: ``initial``, doubling, at most ``maximum``
    seconds; ``reset`` after a success. No jitter: one process retries its own store."""

    def __init__(self, initial: float, maximum: float) -> None:
        self.initial = initial
        self.maximum = maximum
        self._delay = initial

    def next(self) -> float:
        delay = self._delay
        self._delay = min(self._delay * 2, self.maximum)
        return delay

    def reset(self) -> None:
        self._delay = self.initial


def failure_reason(exc: BaseException) -> str:
    """What a store failure says about the store, as a metric label and for /readyz: disk_full,
    read_only, locked, io, corrupt, or other (a bug, a constraint)."""
    name = getattr(exc, "sqlite_errorname", "") or ""
    if isinstance(exc, OSError):
        return "disk_full" if exc.errno in (28, 122) else "read_only" if exc.errno == 30 else "io"
    for prefix, reason in (("SQLITE_FULL", "disk_full"), ("SQLITE_READONLY", "read_only"), ("SQLITE_BUSY", "locked"),
                           ("SQLITE_LOCKED", "locked"), ("SQLITE_IOERR", "io"), ("SQLITE_CANTOPEN", "io"),
                           ("SQLITE_CORRUPT", "corrupt"), ("SQLITE_NOTADB", "corrupt")):
        if name.startswith(prefix):
            return reason
    return "other"


def new_id() -> int:
    """A row id unique across restarts and worker processes: the process start time in ms,
    then a counter, then the worker number (ids stay unique while a process makes fewer
    than 16,000 a millisecond, on average since it started)."""
    return _id_base + (next(_ids) << 6) + _worker_bits


def id_at(t: float) -> int:
    """The smallest id ``new_id`` could give at time ``t``."""
    return int(t * 1000) << 20


@dataclass(slots=True)
class SafItem:
    """A reversal owed to a switch, as the reversal sender sees it."""

    id: int
    txn_id: int | None
    upstream: str
    state: str
    reason: str
    mti: str
    stan: str
    f90: str
    attempts: int
    next_attempt: float
    created: float
    message: dict[str, str] = field(repr=False)  # the reversal's fields, PAN included: memory only
    worker: int = 0  # the worker process that owns it (see --workers)


@dataclass(slots=True)
class TxnRow:
    id: int
    created: float
    listener: str
    mti: str
    terminal: str
    merchant: str
    front_stan: str
    transmission: str
    upstream: str
    upstream_stan: str
    rrn: str
    amount: str
    currency: str
    pan_masked: str
    state: str
    response_code: str | None
    auth_code: str | None


# --------------------------------------------------------------------------- SQLite


def fold_log(records: Sequence[tuple[Any, ...]], row_of: Callable[[tuple[Any, ...]], list[Any]],
             ) -> tuple[dict[int, list[Any]], list[tuple[int, str, float, str | None, str | None]]]:
    """A log segment's records as the rows to insert (``row_of`` makes a row's parameters from its
    "T" record) and the updates left over: an answer ("U") to a row of the same segment is folded
    into the row; the others stay updates (txn id, state, when, rc, auth), in order. Shared by
    both stores' ``apply_log``."""
    rows: dict[int, list[Any]] = {}
    updates: list[tuple[int, str, float, str | None, str | None]] = []
    for record in records:
        if record[0] == "T":
            rows[record[1]] = row_of(record)
            continue
        _, txn_id, state, when, rc, auth = record
        row = rows.get(txn_id)
        if row is None:
            updates.append((txn_id, state, when, rc, auth))
            continue
        row[_P_STATE] = state
        row[_P_UPDATED] = when
        if rc is not None:
            row[_P_RESPONSE_CODE] = rc
        if auth is not None:
            row[_P_AUTH_CODE] = auth
    return rows, updates


class SQLiteStore:
    """The SQL. Every method takes the connection and runs inside the caller's transaction.

    This method set is the store interface: a server database (for several
    gateway nodes sharing one SAF) implements the same methods on its own
    connection type, and ``Journal`` runs them the same way.
    """

    def __init__(self, vault: PanVault, worker: int = 0) -> None:
        self.vault = vault
        # With --workers, processes share the file; each one sends and recovers only its own rows.
        self.worker = worker

    # What a failure says (the store interface, see interface.py): its label, and whether the
    # store refused the work for now (SQLITE_FULL, _BUSY, _IOERR...: an OperationalError) rather
    # than the work being wrong (a constraint).
    failure_reason = staticmethod(failure_reason)
    # What its operations raise when the store fails (``except store.errors``).
    errors: tuple[type[Exception], ...] = (sqlite3.Error,)

    @staticmethod
    def refused(exc: BaseException) -> bool:
        return isinstance(exc, sqlite3.OperationalError)

    @staticmethod
    def connect(path: str, synchronous: str = "NORMAL") -> sqlite3.Connection:
        if path != ":memory:":
            create_private(path)
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10.0)
        for attempt in range(50):  # several workers opening one new file race to set WAL mode
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                break
            except sqlite3.OperationalError:
                if attempt == 49:
                    raise
                time.sleep(0.1)
        # NORMAL in WAL mode: a commit survives a crash of the process (SIGKILL);
        # FULL also survives a power loss, at one fsync per group commit.
        conn.execute(f"PRAGMA synchronous={synchronous}")
        for table in ("txn", "saf"):  # files written before the worker column existed
            cols = {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}
            if cols and "worker" not in cols:
                conn.execute(f"ALTER TABLE {table} ADD COLUMN worker INTEGER NOT NULL DEFAULT 0")
        _add_acquirer_column(conn)
        conn.executescript(SCHEMA)
        return conn

    # -- writes

    _INSERT_TXN = (
        "INSERT INTO txn (id, created, updated, listener, mti, terminal, merchant, front_stan, transmission,"
        " upstream, link, upstream_stan, rrn, amount, currency, pan_masked, pan_hash, state, original, worker,"
        " response_code, auth_code, acquirer) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)")
    _UPDATE_TXN = ("UPDATE txn SET state=?, updated=?, response_code=COALESCE(?, response_code),"
                   " auth_code=COALESCE(?, auth_code) WHERE id=?")

    def txn_params(self, row: dict[str, Any], original: dict[str, str], now: float) -> tuple[Any, ...]:
        """The ``txn`` row's values, in ``_INSERT_TXN`` order."""
        sealed = self.vault.seal({k: original[k] for k in REVERSAL_FIELDS if k in original})
        return self._columns(row["id"], now, now, row["listener"], row["mti"], row["upstream"], row.get("link", 0),
                             row["upstream_stan"], original, row.get("state", FORWARDED), sealed, self.worker,
                             None, None)

    def logged_params(self, record: Sequence[Any]) -> tuple[Any, ...]:
        """The ``txn`` row of a write-ahead log "T" record (see ``Journal.record_txn``): the
        reversal fields are sealed here, one row at a time (the log sealed them per frame)."""
        _, txn_id, created, listener, mti, upstream, link, upstream_stan, worker, original = record
        return self._columns(txn_id, created, created, listener, mti, upstream, link, upstream_stan,
                             original, FORWARDED, self.vault.seal(original), worker, None, None)

    def _columns(self, txn_id: int, created: float, updated: float, listener: str, mti: str, upstream: str,
                 link: int, upstream_stan: str, original: dict[str, str], state: str, sealed: bytes, worker: int,
                 rc: str | None, auth: str | None) -> tuple[Any, ...]:
        pan = original.get("2", "")
        get = original.get
        return (txn_id, created, updated, listener, mti, get("41", "").rstrip(), get("42", "").rstrip(), get("11", ""),
                get("7", ""), upstream, link, upstream_stan, get("37", ""), get("4", ""), get("49", ""),
                mask_pan(pan) if pan else "", self.vault.pan_hash(pan) if pan else "", state, sealed, worker, rc, auth,
                get("32", ""))

    def insert_txn(self, conn: sqlite3.Connection, row: dict[str, Any], original: dict[str, str]) -> None:
        conn.execute(self._INSERT_TXN, self.txn_params(row, original, time.time()))

    def insert_txn_many(self, conn: sqlite3.Connection, calls: list[tuple[Any, ...]]) -> None:
        now = time.time()
        conn.executemany(self._INSERT_TXN, [self.txn_params(row, original, now) for row, original in calls])

    @staticmethod
    @functools.cache
    def _insert_many_sql(size: int) -> str:
        head, values = SQLiteStore._INSERT_TXN.split(" VALUES ")
        return head.replace("INSERT", "INSERT OR IGNORE", 1) + " VALUES " + ",".join([values] * size)

    def apply_log(self, conn: sqlite3.Connection, records: list[tuple[Any, ...]]) -> tuple[int, int]:
        """Write one write-ahead log segment's records (txlog.py) into ``txn``, in the caller's
        transaction: (rows inserted, rows updated).

        An answer to a row of the same segment is folded into the row, so most transactions
        are one INSERT; a few dozen rows go in one statement. A row already there (the
        segment is applied again after a crash) is kept as it is, and updates apply in order."""
        rows, answers = fold_log(records, lambda record: list(self.logged_params(record)))
        updates = [(state, when, rc, auth, txn_id) for txn_id, state, when, rc, auth in answers]
        pending = list(rows.values())
        inserted, i, n = 0, 0, len(pending)
        for size in _CHUNKS:
            while n - i >= size:
                cur = conn.execute(self._insert_many_sql(size), [v for row in pending[i:i + size] for v in row])
                inserted += cur.rowcount
                i += size
        updated = conn.executemany(self._UPDATE_TXN, updates).rowcount if updates else 0
        return inserted, updated

    def update_txn(self, conn: sqlite3.Connection, txn_id: int, state: str, response_code: str | None = None,
                   auth_code: str | None = None) -> None:
        conn.execute(self._UPDATE_TXN, (state, time.time(), response_code, auth_code, txn_id))

    def update_txn_many(self, conn: sqlite3.Connection, calls: list[tuple[Any, ...]]) -> None:
        now = time.time()
        conn.executemany(self._UPDATE_TXN, [(c[1], now, *(c[2:] + (None, None))[:2], c[0]) for c in calls])

    def insert_saf(self, conn: sqlite3.Connection, item: SafItem) -> None:
        msg = item.message
        pan = msg.get("2", "")
        conn.execute(
            "INSERT INTO saf (id, txn_id, upstream, state, reason, mti, stan, f90, rrn, amount, currency, pan_masked,"
            " attempts, next_attempt, created, updated, message, worker) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (item.id, item.txn_id, item.upstream, item.state, item.reason, item.mti, item.stan, item.f90,
             msg.get("37", ""), msg.get("4", ""), msg.get("49", ""), mask_pan(pan) if pan else "",
             item.attempts, item.next_attempt, item.created, time.time(), self.vault.seal(msg), self.worker),
        )

    @staticmethod
    def update_saf(conn: sqlite3.Connection, saf_id: int, *, state: str, attempts: int | None = None,
                   next_attempt: float | None = None, stan: str | None = None, result: str | None = None) -> None:
        conn.execute(
            "UPDATE saf SET state=?, updated=?, attempts=COALESCE(?, attempts), next_attempt=COALESCE(?, next_attempt),"
            " stan=COALESCE(?, stan), last_result=COALESCE(?, last_result) WHERE id=?",
            (state, time.time(), attempts, next_attempt, stan, result, saf_id),
        )

    @staticmethod
    def cancel_unsent_saf(conn: sqlite3.Connection, txn_id: int, result: str) -> int:
        """Cancel a reversal of ``txn_id`` that has not been sent yet; returns how many."""
        cur = conn.execute(
            "UPDATE saf SET state=?, updated=?, last_result=? WHERE txn_id=? AND state=? AND attempts=0",
            (SAF_CANCELLED, time.time(), result, txn_id, SAF_PENDING),
        )
        return cur.rowcount

    @staticmethod
    def set_meta(conn: sqlite3.Connection, key: str, value: str) -> None:
        conn.execute("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                     (key, value))

    # -- retention

    # A reversal still owed (waiting, in flight, parked for an operator: any state but the two
    # final ones, so a state added later is safe too) keeps its transaction's sealed fields and
    # row: it may yet be sent, or rebuilt by an operator.
    _LIVE_SAF = (f"SELECT 1 FROM saf s WHERE s.txn_id=txn.id AND s.state NOT IN"
                 f" ('{SAF_ACKED}', '{SAF_CANCELLED}')")

    def purge(self, conn: sqlite3.Connection, now: float, reversal_data_window: float, retention: float,
              batch: int = PURGE_BATCH) -> tuple[dict[str, int], bool]:
        """One bounded step of the journal's clean-up, in the caller's transaction: how many
        rows it changed, by kind ("reversal_data" erased, "txn" and "saf" rows deleted), and
        whether there is more to do (the caller repeats it, one transaction each, until not).

        - A transaction past ``reversal_data_window`` seconds keeps its row (masked PAN, keyed
          hash, identities, states) but loses its sealed reversal fields (the encrypted PAN
          among them), unless a reversal of it is still owed; an acknowledged or cancelled
          reversal past the window loses its sealed message, and its transaction's fields go
          with it. Transactions are walked by id (ids grow with time) from where the last step
          stopped (a mark in ``meta``), so each row is read once, not at every run.
        - Rows older than ``retention`` seconds are deleted, except a transaction whose
          reversal is still owed and that reversal itself."""
        done = {"reversal_data": 0, "txn": 0, "saf": 0}
        erase_before = id_at(now - reversal_data_window)
        mark_key = f"purge:sealed:w{self.worker}"
        mark = int(self.get_meta(conn, mark_key) or 0)
        walked, last = conn.execute(
            "SELECT COUNT(*), MAX(id) FROM (SELECT id FROM txn WHERE id>=? AND id<? AND worker=? ORDER BY id LIMIT ?)",
            (mark, erase_before, self.worker, batch)).fetchone()
        if last is not None:
            done["reversal_data"] += conn.execute(
                f"UPDATE txn SET original=NULL WHERE id>=? AND id<=? AND worker=? AND original IS NOT NULL"
                f" AND NOT EXISTS ({self._LIVE_SAF})", (mark, last, self.worker)).rowcount
            self.set_meta(conn, mark_key, str(last + 1))
        finals = conn.execute(
            "SELECT id, txn_id FROM saf WHERE worker=? AND state IN (?, ?) AND message IS NOT NULL AND updated<?"
            " LIMIT ?", (self.worker, SAF_ACKED, SAF_CANCELLED, now - reversal_data_window, batch)).fetchall()
        if finals:
            conn.executemany("UPDATE saf SET message=NULL WHERE id=?", [(sid,) for sid, _ in finals])
            txns = [(t,) for _, t in finals if t is not None]
            erased = conn.executemany(f"UPDATE txn SET original=NULL WHERE id=? AND original IS NOT NULL"
                                      f" AND NOT EXISTS ({self._LIVE_SAF})", txns).rowcount if txns else 0
            done["reversal_data"] += len(finals) + max(erased, 0)
        keep_after = id_at(now - retention)
        done["txn"] = conn.execute(
            f"DELETE FROM txn WHERE id IN (SELECT id FROM txn WHERE id<? AND worker=? AND NOT EXISTS ({self._LIVE_SAF})"
            " ORDER BY id LIMIT ?)", (keep_after, self.worker, batch)).rowcount
        done["saf"] = conn.execute(
            "DELETE FROM saf WHERE id IN (SELECT id FROM saf WHERE id<? AND worker=? AND state IN (?, ?)"
            " ORDER BY id LIMIT ?)", (keep_after, self.worker, SAF_ACKED, SAF_CANCELLED, batch)).rowcount
        return done, batch in (walked, len(finals), done["txn"], done["saf"])

    # -- reads

    @staticmethod
    def get_meta(conn: sqlite3.Connection, key: str) -> str | None:
        row = conn.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else None

    def _saf_item(self, row: Sequence[Any]) -> SafItem:
        (sid, txn_id, upstream, state, reason, mti, stan, f90, attempts, next_attempt, created, blob) = row
        return SafItem(sid, txn_id, upstream, state, reason or "", mti or "", stan or "", f90 or "", attempts,
                       next_attempt, created, self.vault.open(blob) if blob else {})

    _SAF_COLUMNS = "id, txn_id, upstream, state, reason, mti, stan, f90, attempts, next_attempt, created, message"

    def due_saf(self, conn: sqlite3.Connection, upstream: str, now: float, limit: int) -> list[SafItem]:
        rows = conn.execute(
            f"SELECT {self._SAF_COLUMNS} FROM saf WHERE upstream=? AND worker=? AND state IN (?, ?) AND next_attempt<=?"
            " ORDER BY next_attempt LIMIT ?",
            (upstream, self.worker, SAF_PENDING, SAF_SENT, now, limit),
        ).fetchall()
        return [self._saf_item(r) for r in rows]

    def next_due(self, conn: sqlite3.Connection, upstream: str) -> float | None:
        """The earliest next attempt among this worker's waiting reversals (an index seek per state)."""
        dues = [conn.execute("SELECT MIN(next_attempt) FROM saf WHERE upstream=? AND worker=? AND state=?",
                             (upstream, self.worker, state)).fetchone()[0] for state in (SAF_PENDING, SAF_SENT)]
        known = [d for d in dues if d is not None]
        return min(known) if known else None

    def saf_stats(self, conn: sqlite3.Connection, upstream: str) -> tuple[int, float | None, float | None, int]:
        """(waiting, created time of the oldest waiting, earliest next attempt, parked) for one upstream.

        Counting reads every waiting row: the reversal sender does it for its gauges every
        STATS_EVERY seconds, and looks up only ``next_due`` in between."""
        waiting, oldest = conn.execute(
            "SELECT COUNT(*), MIN(created) FROM saf WHERE upstream=? AND worker=? AND state IN (?, ?)",
            (upstream, self.worker, SAF_PENDING, SAF_SENT),
        ).fetchone()
        (parked,) = conn.execute("SELECT COUNT(*) FROM saf WHERE upstream=? AND worker=? AND state=?",
                                 (upstream, self.worker, SAF_PARKED)).fetchone()
        return waiting, oldest, self.next_due(conn, upstream), parked

    def in_doubt(self, conn: sqlite3.Connection, since: float | None = None) -> list[tuple[int, str, str, str, dict[str, str]]]:
        """This worker's transactions sent upstream and never answered: (id, upstream, mti, upstream_stan, fields).

        That is forwarded ones, and timed-out ones whose reversal never reached the SAF table
        (the store could not take it, and the process stopped before it could: the journal
        keeps such a write in memory and retries it). Only rows newer than ``since`` (default:
        the last RECOVERY_WINDOW) are read, by id range: ids grow with time, so no index on
        the state is needed (one fewer to update per write)."""
        since = time.time() - RECOVERY_WINDOW if since is None else since
        rows = conn.execute(
            "SELECT t.id, t.upstream, t.mti, t.upstream_stan, t.original FROM txn t"
            " WHERE t.id>=? AND t.worker=? AND t.state IN (?, ?) AND t.response_code IS NULL"
            " AND NOT EXISTS (SELECT 1 FROM saf s WHERE s.txn_id=t.id)",
            (id_at(since), self.worker, FORWARDED, TIMED_OUT),
        ).fetchall()
        return [(r[0], r[1], r[2], r[3], self.vault.open(r[4]) if r[4] else {}) for r in rows]

    def find_original(self, conn: sqlite3.Connection, listener: str, acquirer: str, terminal: str,
                      merchant: str, stan: str, transmission: str,
                      mti: str) -> tuple[TxnRow, dict[str, str], list[str]] | None:
        """The transaction a front-end reversal points at, its fields and its reversals' states; or None.

        Besides the original's STAN, DE 7 and MTI (from field 90), everything that says whose
        transaction it is must match the reversal: the front end's identity (``listener``: the
        listener it came through, see ``core.flow.front_identity``), the acquirer (DE 32), the
        terminal (DE 41) and the merchant (DE 42). So a front end can reverse only its own
        merchants' transactions: another merchant's approval on the same terminal id, STAN, DE 7
        and amount is not found. The lookup seeks ``txn_front_time`` (DE 7, terminal, STAN) and
        filters the few rows there. Rows written before the acquirer column existed (NULL) are
        checked against DE 32 in their sealed fields."""
        rows = conn.execute(
            f"SELECT {TXN_COLUMNS}, acquirer, original FROM txn"
            " WHERE transmission=? AND terminal=? AND front_stan=? AND mti=? AND merchant=? AND listener=?"
            " AND (acquirer=? OR acquirer IS NULL) ORDER BY created DESC LIMIT ?",
            (transmission, terminal.rstrip(), stan, mti, merchant.rstrip(), listener, acquirer, _ORIGINAL_CANDIDATES),
        ).fetchall()
        for row in rows:
            fields = self.vault.open(row[-1]) if row[-1] else {}
            if row[-2] is None and fields.get("32", "") != acquirer:
                continue
            txn = TxnRow(*row[:-2])
            states = [r[0] for r in conn.execute("SELECT state FROM saf WHERE txn_id=?", (txn.id,))]
            return txn, fields, states
        return None

    @staticmethod
    def find_txns(conn: sqlite3.Connection, *, rrn: str | None = None, stan: str | None = None,
                  terminal: str | None = None, limit: int = 50) -> list[TxnRow]:
        where, args = [], []
        for column, value in (("rrn", rrn), ("front_stan", stan), ("terminal", terminal)):
            if value is not None:
                where.append(f"{column}=?")
                args.append(value)
        sql = f"SELECT {TXN_COLUMNS} FROM txn"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created DESC LIMIT ?"
        return [TxnRow(*r) for r in conn.execute(sql, (*args, limit))]

    @staticmethod
    def list_saf(conn: sqlite3.Connection, states: Sequence[str], limit: int = 100) -> list[tuple[Any, ...]]:
        marks = ",".join("?" * len(states))
        return conn.execute(
            "SELECT id, upstream, state, reason, mti, stan, rrn, amount, currency, pan_masked, attempts, next_attempt,"
            f" created, last_result FROM saf WHERE state IN ({marks}) ORDER BY created LIMIT ?",
            (*states, limit),
        ).fetchall()


# Rows with one (DE 7, terminal, STAN, MTI, merchant, listener) that ``find_original`` looks at:
# a front end reuses a STAN within one second on one terminal only by mistake, so a handful is
# plenty, and the bound keeps a hostile flood of look-alikes from making one lookup long.
_ORIGINAL_CANDIDATES = 8


def _add_acquirer_column(conn: sqlite3.Connection) -> None:
    """Files written before ``txn.acquirer`` existed get it (NULL in their old rows), so they keep opening."""
    cols = {r[1] for r in conn.execute("PRAGMA table_info(txn)")}
    if cols and "acquirer" not in cols:
        conn.execute("ALTER TABLE txn ADD COLUMN acquirer TEXT")


# Rows per INSERT in ``apply_log``: 64 at a time, the rest in smaller powers of two
# (a few prepared statements, each under SQLite's 32,766 bound values).
_CHUNKS = (64, 32, 16, 8, 4, 2, 1)
# Positions in a ``txn_params`` row.
_P_UPDATED, _P_STATE, _P_RESPONSE_CODE, _P_AUTH_CODE = 2, 17, 20, 21

TXN_COLUMNS = ("id, created, listener, mti, terminal, merchant, front_stan, transmission, upstream, upstream_stan,"
               " rrn, amount, currency, pan_masked, state, response_code, auth_code")
