"""The journal's store on PostgreSQL, for several gateway nodes sharing one database.

``PgStore`` keeps the rows and the rules of ``SQLiteStore`` (store.py): the PAN only as a keyed hash
and a masked form, the reversal fields sealed with AES-GCM (``PanVault``), never CVV2, track data or
PIN blocks; the same method set, each method running in the caller's transaction on a psycopg 3
connection, so ``Journal`` can drive either store. Writes of a batch go in as few statements as
possible (rows in arrays, ``unnest``), so a group commit of hundreds of rows is a few round trips;
the journal's common batch, new requests and the answers to earlier ones, is one statement that
commits by itself (``write_txns``): one round trip.

What several nodes need besides (the schema is in ``migrations/``, applied by ``migrate.py``):

- every row names the node that wrote it (``node``); ``due_saf``, ``in_doubt`` and the rest read the
  node's own rows, as the SQLite store reads a worker's own;
- ``heartbeat`` / ``expired_nodes``: a row per node with a deadline, renewed while the node lives;
  ``claim_slot``: the node's 6-bit id slot, so that no two live nodes make the same row id;
- ``lease_due_saf`` / ``renew_leases`` / ``release_leases``: reversals owed are leased with
  ``SELECT ... FOR UPDATE SKIP LOCKED`` and a lease deadline, so one node at a time sends a given
  0420/0421 sequence, and the reversals of a node that died are taken once its leases run out;
  ``take_over`` hands a dead node's in-doubt transactions and queued reversals to a live one;
- ``next_stan_block``: STANs per switch link in blocks, from one counter row per link taken under
  its row lock, so two nodes never hold the same STAN on the same link.

Connection settings: ``make_conninfo`` builds a libpq conninfo from plain values (the password read
from a file or an environment variable, never from the config file itself); ``redact`` is its form
for logs and messages, with the password replaced. ``PgDatabase`` is a connection pool (psycopg_pool)
with the session settings every connection gets, and ``run`` for one transaction; its errors are
``StoreUnavailable`` with a reason (``failure_reason``) and a message scrubbed of the password.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence, TypeVar

import psycopg
import psycopg_pool
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from psycopg.conninfo import make_conninfo as _libpq_conninfo

from ..core.errors import DuplicateRecorded
from ..core.masking import mask_pan
from ..security.pan import PanVault
from .store import (
    FORWARDED, MAX_WORKERS, PURGE_BATCH, RECOVERY_WINDOW, SAF_ACKED, SAF_CANCELLED, SAF_PARKED, SAF_PENDING, SAF_SENT,
    TIMED_OUT, TXN_COLUMNS, SafItem, SQLiteStore, TxnRow, fold_log, id_at,
)
from .store import failure_reason as sqlite_failure_reason

log = logging.getLogger("iso_gateway.journal")

Conn = psycopg.Connection[Any]
T = TypeVar("T")

# STANs are six digits, 000001..999999 (000000 is not used: docs/domain.md §2.1).
STAN_MAX = 999_999
# Id slots (``claim_slot``): the low 6 bits of every row id (store.MAX_WORKERS of them).
MAX_SLOTS = MAX_WORKERS
# Seconds a node's heartbeat row stays alive without renewal (``heartbeat``'s default).
NODE_TTL = 15.0
# pg_try_advisory_xact_lock key of the purge: one node purges at a time ("isogw" + "prg").
PURGE_LOCK_KEY = 0x69736F6777707267
# Rows one front-end reversal lookup reads at most (as in store.py).
_ORIGINAL_CANDIDATES = 8
REDACTED = "********"

_TXN_INSERT_COLUMNS = (
    ("id", "int8"), ("created", "float8"), ("updated", "float8"), ("listener", "text"), ("mti", "text"),
    ("terminal", "text"), ("merchant", "text"), ("front_stan", "text"), ("transmission", "text"),
    ("upstream", "text"), ("link", "int4"), ("upstream_stan", "text"), ("rrn", "text"), ("amount", "text"),
    ("currency", "text"), ("pan_masked", "text"), ("pan_hash", "text"), ("state", "text"), ("original", "bytea"),
    ("worker", "int4"), ("response_code", "text"), ("auth_code", "text"), ("acquirer", "text"), ("node", "text"),
    ("dup_key", "text"), ("dup_bucket", "int8"),
)
# Rows arrive as SQLiteStore.txn_params tuples (the same columns, the same order) plus the node and
# the duplicate key and window number.
_P_UPDATED, _P_STATE, _P_RESPONSE_CODE, _P_AUTH_CODE = 2, 17, 20, 21

_INSERT_TXN_ARRAYS = (
    "INSERT INTO txn (" + ", ".join(c for c, _ in _TXN_INSERT_COLUMNS) + ") SELECT * FROM unnest("
    + ", ".join(f"%b::{t}[]" for _, t in _TXN_INSERT_COLUMNS) + ")")
# A batch of inserts and answers as one statement (``write_txns``), run outside any transaction of the
# caller's: one round trip, committed when it returns. The new rows and the answers come as JSON
# (``json_to_recordset``): one parameter each, encoded in C, where arrays cost psycopg a Python loop
# per column. ``found``: the first row of each new row's duplicate key within the window (one index
# probe per key); ``ins``: the rows whose key it did not find (a key another node is inserting at the
# same moment meets it on the unique index and inserts nothing); ``upd``: the answers, folded per
# row. Every part reads the snapshot the statement started with, so an answer to a row inserted by
# the same statement would update nothing: such a batch is not sent this way (``write_txns`` says
# so). The result: the ids inserted (key NULL), then what ``found`` found.
# The columns the same for every row of a batch are single parameters (the time, the node, the worker,
# the window number; no answer yet), the others go in the JSON, one object per row.
_TXN_BATCH_VALUES = {"created": "%s::float8", "updated": "%s::float8", "worker": "%s::int4", "response_code": "NULL",
                     "auth_code": "NULL", "node": "%s::text", "dup_bucket": "%s::int8"}
_TXN_JSON_COLUMNS = tuple((i, c, t) for i, (c, t) in enumerate(_TXN_INSERT_COLUMNS) if c not in _TXN_BATCH_VALUES)
_TXN_JSON_NAMES = tuple(c for _, c, _ in _TXN_JSON_COLUMNS)
_TXN_JSON_ROW = "json_to_recordset(%s::json) AS r(" + ", ".join(f"{c} {t}" for _, c, t in _TXN_JSON_COLUMNS) + ")"
_P_ORIGINAL = 18  # the sealed reversal fields: bytes, sent as bytea's hex form
_UPDATE_TXN_JSON = (
    "UPDATE txn SET state=u.state, updated=u.updated, response_code=COALESCE(u.rc, txn.response_code),"
    " auth_code=COALESCE(u.auth, txn.auth_code)"
    " FROM json_to_recordset(%s::json) AS u(id int8, state text, updated float8, rc text, auth text)"
    " WHERE txn.id=u.id")
_WRITE_ROWS = "r AS MATERIALIZED (SELECT * FROM " + _TXN_JSON_ROW + ")"
_WRITE_FOUND = (
    "found AS MATERIALIZED (SELECT r.dup_key AS key, t.id, t.response_code, t.auth_code FROM r"
    " CROSS JOIN LATERAL (SELECT txn.id, txn.response_code, txn.auth_code FROM txn WHERE txn.dup_key = r.dup_key"
    " AND txn.dup_key <> '' AND txn.created >= %s::float8 ORDER BY txn.created LIMIT 1) AS t WHERE r.dup_key <> '')")
_WRITE_INSERT = (
    "ins AS (INSERT INTO txn (" + ", ".join(c for c, _ in _TXN_INSERT_COLUMNS) + ") SELECT "
    + ", ".join(_TXN_BATCH_VALUES.get(c, "r." + c) for c, _ in _TXN_INSERT_COLUMNS) + " FROM r WHERE NOT EXISTS (SELECT 1 FROM found f WHERE f.key = r.dup_key)"
    " ON CONFLICT (dup_key, dup_bucket) WHERE dup_key <> '' DO NOTHING RETURNING id)")
_WRITE_UPDATE = "upd AS (" + _UPDATE_TXN_JSON + ")"
_WRITE_RESULT = (" SELECT id, NULL::text, NULL::text, NULL::text FROM ins"
                 " UNION ALL SELECT id, key, response_code, auth_code FROM found")
_WRITE_TXNS = "WITH " + ", ".join((_WRITE_ROWS, _WRITE_FOUND, _WRITE_INSERT, _WRITE_UPDATE)) + _WRITE_RESULT
_WRITE_TXNS_NO_UPDATES = "WITH " + ", ".join((_WRITE_ROWS, _WRITE_FOUND, _WRITE_INSERT)) + _WRITE_RESULT
_FIRST_OF = (
    "SELECT k.key, t.response_code, t.auth_code FROM json_array_elements_text(%s::json) AS k(key) CROSS JOIN LATERAL"
    " (SELECT response_code, auth_code FROM txn WHERE dup_key = k.key AND dup_key <> '' AND created >= %s::float8"
    " ORDER BY created LIMIT 1) AS t")
# ``write_txns``' statements by kind (``TxnWrite.kind``), and the look-up it may need after one.
WRITE_STATEMENTS = {"write": _WRITE_TXNS, "insert": _WRITE_TXNS_NO_UPDATES, "update": _UPDATE_TXN_JSON,
                    "first_of": _FIRST_OF}
_SAF_COLUMNS = "id, txn_id, upstream, state, reason, mti, stan, f90, attempts, next_attempt, created, message"
_LIVE_SAF = (f"SELECT 1 FROM saf s WHERE s.txn_id=txn.id AND s.state NOT IN ('{SAF_ACKED}', '{SAF_CANCELLED}')")
_WAITING = (SAF_PENDING, SAF_SENT)


class TxnWrite:
    """A batch of ``write_txns`` between ``plan_write`` and its answer: the statement (``kind``, one of
    ``WRITE_STATEMENTS``, and ``params``: str and float values), and per call its result once known."""

    __slots__ = ("calls", "now", "kind", "params", "results", "first", "later")

    def __init__(self, calls: Sequence[tuple[bool, tuple[Any, ...]]], now: float) -> None:
        self.calls = calls
        self.now = now
        self.kind = ""
        self.params: list[Any] = []
        self.results: list[DuplicateRecorded | None] = [None] * len(calls)
        self.first: dict[str, int] = {}  # a duplicate key -> the call that inserts it
        self.later: list[tuple[int, str]] = []  # calls whose key an earlier call of the batch has: in flight

    def lost_keys(self, lost: list[int]) -> list[str]:
        """The keys of ``lost`` calls (``finish_write``), for ``first_of``."""
        return sorted({str(self.calls[i][1][0]["dup_key"]) for i in lost})

    def settle(self, lost: list[int], found: dict[str, tuple[str | None, str | None]]) -> None:
        """The ``lost`` calls' answers: the row another node inserted with their key (``first_of``)."""
        for i in lost:
            self.results[i] = DuplicateRecorded(*found.get(str(self.calls[i][1][0]["dup_key"]), (None, None)))


# --------------------------------------------------------------------------- errors


class StoreUnavailable(Exception):
    """The database could not do what was asked: ``reason`` as ``failure_reason`` says it (a metric
    label, what /readyz shows), the message scrubbed of the password."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason


# SQLSTATE classes and codes, most specific first, and what they say about the store.
_SQLSTATE_REASONS = (
    ("53100", "disk_full"), ("25006", "read_only"), ("57014", "timeout"), ("55P03", "locked"),
    ("40001", "locked"), ("40P01", "locked"), ("57P01", "unreachable"), ("57P02", "unreachable"),
    ("57P03", "unreachable"), ("08", "unreachable"), ("53", "resources"), ("58", "io"), ("XX001", "corrupt"),
    ("XX002", "corrupt"), ("28", "auth"), ("3D000", "config"), ("42P01", "schema"), ("42703", "schema"),
)
# Reasons that say the store refused the work for now (a write is kept and retried), not that the
# operation itself is wrong (a constraint, a bug).
TRANSIENT = frozenset({"disk_full", "read_only", "timeout", "locked", "unreachable", "resources", "io"})


def failure_reason(exc: BaseException) -> str:
    """What a store failure says about the store, for either backend: disk_full, read_only, locked,
    io, corrupt (as ``store.failure_reason``), and for PostgreSQL also unreachable (no connection,
    the server shutting down or restarting), timeout (a statement or the pool's wait), resources
    (out of memory, too many connections), auth, config (no such database), schema (migrations not
    applied), or other."""
    if isinstance(exc, StoreUnavailable):
        return exc.reason
    if isinstance(exc, psycopg_pool.PoolTimeout):
        return "unreachable"
    if isinstance(exc, psycopg.Error):
        state = exc.sqlstate or ""
        for prefix, reason in _SQLSTATE_REASONS:
            if state.startswith(prefix):
                return reason
        if not state and isinstance(exc, psycopg.OperationalError):
            return "unreachable"  # libpq's own: no server, connection lost, a closed connection
        return "other"
    return sqlite_failure_reason(exc)


def refused(exc: BaseException) -> bool:
    """The store could not take the work now (retry it later), as opposed to the work being wrong."""
    return failure_reason(exc) in TRANSIENT


# --------------------------------------------------------------------------- connection settings


def read_password(password_file: str | os.PathLike[str] | None = None, password_env: str | None = None) -> str | None:
    """The database password: from ``password_env`` (an environment variable's name) if set, else the
    first line of ``password_file``; None when neither gives one (libpq may still find one in
    ~/.pgpass or PGPASSWORD). A password file readable by others is refused."""
    if password_env:
        value = os.environ.get(password_env)
        if value:
            return value
    if password_file:
        path = Path(password_file)
        mode = path.stat().st_mode
        if mode & 0o077:
            raise PermissionError(f"{path}: the password file must be readable by its owner only (chmod 600)")
        lines = path.read_text(encoding="utf-8").splitlines()
        return lines[0] if lines else None
    return None


def make_conninfo(dsn: str = "", *, password: str | None = None, application_name: str = "iso-gateway",
                  connect_timeout: int = 5, **params: Any) -> str:
    """A libpq conninfo from a DSN (``host=... dbname=...`` or a ``postgresql://`` URI) and plain
    values: ``password`` (from ``read_password``) and any other libpq parameter override the DSN's.
    Raises ValueError, with no part of the DSN in its message, when the DSN can't be parsed."""
    try:
        base = conninfo_to_dict(dsn) if dsn else {}
    except psycopg.ProgrammingError:
        raise ValueError("the PostgreSQL DSN can't be parsed (not shown: it may hold a password)") from None
    extra: dict[str, Any] = {k: v for k, v in params.items() if v is not None}
    base.setdefault("application_name", application_name)
    base.setdefault("connect_timeout", str(connect_timeout))
    if password is not None:
        extra["password"] = password
    return _libpq_conninfo("", **{**base, **extra})


def redact(conninfo: str) -> str:
    """The conninfo for logs and messages: the password (if any) replaced by ``********``."""
    try:
        params = conninfo_to_dict(conninfo)
    except psycopg.ProgrammingError:
        return "<a DSN that can't be parsed>"
    if "password" in params:
        params["password"] = REDACTED
    return " ".join(f"{k}={_quote(str(v))}" for k, v in params.items())


def _quote(value: str) -> str:
    if value and not any(c in value for c in " '\\"):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def scrub(text: str, conninfo: str) -> str:
    """``text`` with the conninfo's password (and the conninfo itself) taken out."""
    try:
        password = str(conninfo_to_dict(conninfo).get("password") or "")
    except psycopg.ProgrammingError:
        password = ""
    if conninfo:
        text = text.replace(conninfo, redact(conninfo))
    if password:
        text = text.replace(password, REDACTED)
    return text


# --------------------------------------------------------------------------- the store


class PgStore:
    """The SQL, for PostgreSQL. Every method takes a psycopg connection and runs inside the
    caller's transaction; the method set is ``SQLiteStore``'s (see interface.py), plus the ones
    several nodes need. ``node``: this node's id (its rows, its leases, its heartbeat)."""

    def __init__(self, vault: PanVault, node: str, worker: int = 0, dup_window: float = 0.0) -> None:
        if not node:
            raise ValueError("a PostgreSQL store needs a node id")
        self.vault = vault
        self.node = node
        self.worker = worker
        # Seconds a request's duplicate key refuses a second one (the gateway's duplicate_window; 0: off).
        self.dup_window = dup_window
        self._rows = SQLiteStore(vault, worker)  # the columns of a row (masked PAN, hash, sealed fields)

    failure_reason = staticmethod(failure_reason)
    refused = staticmethod(refused)
    # What its operations raise when the store fails (``except store.errors``): psycopg's errors
    # on a connection of the caller's, ``StoreUnavailable`` through ``PgDatabase``.
    errors: tuple[type[Exception], ...] = (psycopg.Error, StoreUnavailable)

    # -- writes

    def insert_txn(self, conn: Conn, row: dict[str, Any], original: dict[str, str]) -> None:
        """As ``insert_txn_many`` for one row: raises ``DuplicateRecorded`` when refused as a duplicate."""
        (error,) = self.insert_txn_many(conn, [(row, original)])
        if error is not None:
            raise error

    def insert_txn_many(self, conn: Conn, calls: list[tuple[Any, ...]]) -> list[DuplicateRecorded | None]:
        """Insert each (row, original); returns, per call, None (inserted) or ``DuplicateRecorded``:
        a row with the same non-empty ``dup_key`` (any node's) was created within ``dup_window``
        seconds (its answer, or rc None while it is in flight), so this one is not inserted and
        must not be sent. Two nodes inserting the same key at once meet on the unique index
        (key, window number): the second waits for the first's commit and inserts nothing."""
        now = time.time()
        window = self.dup_window
        keys = [str(row.get("dup_key") or "") for row, _ in calls] if window > 0 else [""] * len(calls)
        bucket = int(now // window) if window > 0 else 0
        results: list[DuplicateRecorded | None] = [None] * len(calls)
        keyed = sorted({k for k in keys if k})
        seen: set[str] = set()
        if keyed:
            found = self._first_of(conn, keyed, now)
            for i, key in enumerate(keys):
                if not key:
                    continue
                if key in found:
                    results[i] = DuplicateRecorded(*found[key])
                elif key in seen:  # a second one in this batch: the first is in flight
                    results[i] = DuplicateRecorded(None, None)
                seen.add(key)
        rows = [(*self._rows.txn_params(row, original, now), self.node, keys[i], bucket)
                for i, (row, original) in enumerate(calls) if results[i] is None]
        if not keyed:
            self._insert_rows(conn, rows, on_conflict="")
            return results
        inserted = {r[0] for r in self._insert_rows_returning(conn, rows)}
        lost = [i for i, (row, _) in enumerate(calls) if results[i] is None and row["id"] not in inserted]
        if lost:  # another node inserted the same key meanwhile (it waited for that one's commit)
            found = self._first_of(conn, sorted({keys[i] for i in lost}), now)
            for i in lost:
                results[i] = DuplicateRecorded(*found.get(keys[i], (None, None)))
        return results

    def write_txns(self, conn: Conn, calls: Sequence[tuple[bool, tuple[Any, ...]]],
                   ) -> list[DuplicateRecorded | None] | None:
        """A batch of ``insert_txn`` calls, (True, (row, original)), and ``update_txn`` calls, (False,
        (txn_id, state[, response_code[, auth_code]])), in order, as one statement: for a connection
        in autocommit mode, where it is one round trip and commits when it returns (the journal's
        common batch: new requests and the answers to earlier ones). What it writes and returns are
        what the calls one after the other in one transaction would: per call None, or for an insert
        ``DuplicateRecorded`` as ``insert_txn_many`` gives it (the first row's answer as the updates
        before that call in the batch left it). A statement does not see its own inserts, so a batch
        that updates a row it inserts is not written this way: None is returned and nothing done (the
        caller runs the calls in a transaction). Errors as one transaction's: nothing is written.
        (``plan_write`` and ``finish_write`` are its halves, for a caller that sends it itself.)"""
        plan = self.plan_write(calls)
        if plan is None:
            return None
        cur = conn.execute(WRITE_STATEMENTS[plan.kind], plan.params, prepare=True)
        lost = self.finish_write(plan, cur.fetchall() if cur.description else [])
        if lost:
            try:
                again = self._first_of(conn, plan.lost_keys(lost), plan.now)
            except psycopg.Error:  # the batch is committed: these are refused all the same, as in flight
                again = {}
            plan.settle(lost, again)
        return plan.results

    def plan_write(self, calls: Sequence[tuple[bool, tuple[Any, ...]]]) -> TxnWrite | None:
        """``write_txns``' statement for ``calls``: which one (``WRITE_STATEMENTS``) and its parameters;
        None when the batch updates a row it inserts."""
        now = time.time()
        window = self.dup_window
        bucket = int(now // window) if window > 0 else 0
        txn_params = self._rows.txn_params
        node = self.node
        plan = TxnWrite(calls, now)
        rows: list[dict[str, Any]] = []
        inserting: set[int] = set()
        first = plan.first
        updates: list[tuple[int, str, float, str | None, str | None]] = []
        for i, (insert, args) in enumerate(calls):
            if insert:
                row, original = args
                inserting.add(row["id"])
                key = str(row.get("dup_key") or "") if window > 0 else ""
                if key:
                    if key in first:
                        plan.later.append((i, key))
                        continue
                    first[key] = i
                values = [*txn_params(row, original, now), node, key, bucket]
                values[_P_ORIGINAL] = "\\x" + values[_P_ORIGINAL].hex()
                rows.append({name: values[i] for i, name, _ in _TXN_JSON_COLUMNS})
            elif args[0] in inserting:
                return None
            else:
                updates.append((args[0], args[1], now, *(args[2:] + (None, None))[:2]))
        if not rows:
            plan.kind, plan.params = "update", [_fold_updates(updates)]
            return plan
        plan.kind = "write" if updates else "insert"
        plan.params = [json.dumps(rows), now - window, now, now, self.worker, node, bucket]
        if updates:
            plan.params.append(_fold_updates(updates))
        return plan

    @staticmethod
    def finish_write(plan: TxnWrite, answer: Sequence[tuple[int, str | None, str | None, str | None]]) -> list[int]:
        """Read the statement's ``answer`` (rows of id, key, rc, auth) into ``plan.results``; returns the
        calls whose key another node inserted at the same moment (``lost``): their answers need
        ``first_of`` (after the statement), then ``plan.settle``."""
        if not plan.first:
            return []
        found: dict[str, tuple[int, str | None, str | None]] = {}
        inserted: set[int] = set()
        for txn_id, key, rc, auth in answer:
            if key is None:
                inserted.add(txn_id)
            else:
                found[key] = (txn_id, rc, auth)
        calls = plan.calls
        results = plan.results

        def seen_by(i: int, key: str) -> DuplicateRecorded:
            """The first row's answer as call ``i`` sees it: after the batch's updates before it."""
            first_id, rc, auth = found[key]
            for insert, args in calls[:i]:
                if not insert and args[0] == first_id:
                    new_rc, new_auth = (args[2:] + (None, None))[:2]
                    rc = rc if new_rc is None else new_rc
                    auth = auth if new_auth is None else new_auth
            return DuplicateRecorded(rc, auth)

        lost: list[int] = []
        for key, i in plan.first.items():
            if key in found:
                results[i] = seen_by(i, key)
            elif calls[i][1][0]["id"] not in inserted:
                lost.append(i)  # another node inserted the same key meanwhile (it waited for that one's commit)
        for i, key in plan.later:
            results[i] = seen_by(i, key) if key in found else DuplicateRecorded(None, None)
        return lost

    def _first_of(self, conn: Conn, keys: list[str], now: float) -> dict[str, tuple[str | None, str | None]]:
        """The first row of each duplicate key created within the window: (response code, auth code).
        One index look-up per key (the lateral join keeps the planner on txn_dup_key)."""
        return {key: (rc, auth) for key, rc, auth in conn.execute(
            WRITE_STATEMENTS["first_of"], (json.dumps(keys), now - self.dup_window), prepare=True)}

    @staticmethod
    def _insert_rows_returning(conn: Conn, rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
        """Rows with duplicate keys: one that meets another's (key, window number), committed or
        being inserted by another node, is not inserted; returns the ids that were. (The window
        look-up is ``_first_of``'s, by index: folded into this statement as NOT EXISTS, the
        planner hashed the whole window once per batch.)"""
        if not rows:
            return []
        columns = [list(col) for col in zip(*rows, strict=True)]
        return conn.execute(_INSERT_TXN_ARRAYS + " ON CONFLICT (dup_key, dup_bucket) WHERE dup_key <> '' DO NOTHING"
                            " RETURNING id", columns).fetchall()

    def _insert_rows(self, conn: Conn, rows: list[tuple[Any, ...]], on_conflict: str) -> int:
        if not rows:
            return 0
        columns = [list(col) for col in zip(*rows, strict=True)]
        cur = conn.execute(_INSERT_TXN_ARRAYS + on_conflict, columns)
        return cur.rowcount

    def apply_log(self, conn: Conn, records: list[tuple[Any, ...]]) -> tuple[int, int]:
        """A write-ahead log segment's records (txlog.py) into ``txn``: (rows inserted, rows updated).
        As ``SQLiteStore.apply_log``: answers to rows of the same segment are folded into them, a
        row already there is kept, the other updates apply in order."""
        rows, updates = fold_log(records, lambda record: [*self._rows.logged_params(record), self.node, "", 0])
        inserted = self._insert_rows(conn, [tuple(r) for r in rows.values()], " ON CONFLICT (id) DO NOTHING")
        return inserted, self._update_rows(conn, updates)

    @staticmethod
    def _update_rows(conn: Conn, updates: Sequence[tuple[int, str, float, str | None, str | None]]) -> int:
        """Updates of ``txn`` rows in one statement, with the effect of applying them in order
        (``_fold_updates``)."""
        if not updates:
            return 0
        cur = conn.execute(_UPDATE_TXN_JSON, (_fold_updates(updates),))
        return cur.rowcount

    def update_txn(self, conn: Conn, txn_id: int, state: str, response_code: str | None = None,
                   auth_code: str | None = None) -> None:
        self._update_rows(conn, [(txn_id, state, time.time(), response_code, auth_code)])

    def update_txn_many(self, conn: Conn, calls: list[tuple[Any, ...]]) -> None:
        now = time.time()
        self._update_rows(conn, [(c[0], c[1], now, *(c[2:] + (None, None))[:2]) for c in calls])

    def insert_saf(self, conn: Conn, item: SafItem) -> None:
        msg = item.message
        pan = msg.get("2", "")
        # A recovered (in-doubt) transaction is reversed once, even when its own node, restarting,
        # and a survivor taking over from it both find it: the second insert adds nothing.
        guard = (" WHERE NOT EXISTS (SELECT 1 FROM saf WHERE txn_id=%s)" if item.reason == "in_doubt"
                 and item.txn_id is not None else "")
        conn.execute(
            "INSERT INTO saf (id, txn_id, upstream, state, reason, mti, stan, f90, rrn, amount, currency, pan_masked,"
            " attempts, next_attempt, created, updated, message, worker, node)"
            " SELECT %s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s" + guard,
            (item.id, item.txn_id, item.upstream, item.state, item.reason, item.mti, item.stan, item.f90,
             msg.get("37", ""), msg.get("4", ""), msg.get("49", ""), mask_pan(pan) if pan else "",
             item.attempts, item.next_attempt, item.created, time.time(), self.vault.seal(msg), self.worker,
             self.node, *((item.txn_id,) if guard else ())))

    @staticmethod
    def update_saf(conn: Conn, saf_id: int, *, state: str, attempts: int | None = None,
                   next_attempt: float | None = None, stan: str | None = None, result: str | None = None) -> None:
        conn.execute(
            "UPDATE saf SET state=%s, updated=%s, attempts=COALESCE(%s, attempts),"
            " next_attempt=COALESCE(%s, next_attempt), stan=COALESCE(%s, stan), last_result=COALESCE(%s, last_result)"
            " WHERE id=%s",
            (state, time.time(), attempts, next_attempt, stan, result, saf_id))

    @staticmethod
    def cancel_unsent_saf(conn: Conn, txn_id: int, result: str) -> int:
        """Cancel a reversal of ``txn_id`` that has not been sent yet; returns how many."""
        cur = conn.execute(
            "UPDATE saf SET state=%s, updated=%s, last_result=%s WHERE txn_id=%s AND state=%s AND attempts=0",
            (SAF_CANCELLED, time.time(), result, txn_id, SAF_PENDING))
        return cur.rowcount

    @staticmethod
    def set_meta(conn: Conn, key: str, value: str) -> None:
        conn.execute("INSERT INTO meta (key, value) VALUES (%s, %s) ON CONFLICT (key) DO UPDATE SET value=excluded.value",
                     (key, value))

    @staticmethod
    def get_meta(conn: Conn, key: str) -> str | None:
        row = conn.execute("SELECT value FROM meta WHERE key=%s", (key,)).fetchone()
        return row[0] if row else None

    # -- retention

    def purge(self, conn: Conn, now: float, reversal_data_window: float, retention: float,
              batch: int = PURGE_BATCH) -> tuple[dict[str, int], bool]:
        """One bounded step of the clean-up, as ``SQLiteStore.purge`` (the same rules), over every
        node's rows: one node purges at a time (a transaction-level advisory lock; a node that
        finds it taken does nothing this time and says there is no more to do)."""
        done = {"reversal_data": 0, "txn": 0, "saf": 0}
        if not _one(conn.execute("SELECT pg_try_advisory_xact_lock(%s)", (PURGE_LOCK_KEY,)))[0]:
            return done, False
        erase_before = id_at(now - reversal_data_window)
        mark_key = "purge:sealed"
        mark = int(self.get_meta(conn, mark_key) or 0)
        walked, last = _one(conn.execute(
            "SELECT COUNT(*), MAX(id) FROM (SELECT id FROM txn WHERE id>=%s AND id<%s ORDER BY id LIMIT %s) w",
            (mark, erase_before, batch)))
        if last is not None:
            done["reversal_data"] += conn.execute(
                f"UPDATE txn SET original=NULL WHERE id>=%s AND id<=%s AND original IS NOT NULL"
                f" AND NOT EXISTS ({_LIVE_SAF})", (mark, last)).rowcount
            self.set_meta(conn, mark_key, str(last + 1))
        finals = conn.execute(
            "SELECT id, txn_id FROM saf WHERE state IN (%s, %s) AND message IS NOT NULL AND updated<%s LIMIT %s",
            (SAF_ACKED, SAF_CANCELLED, now - reversal_data_window, batch)).fetchall()
        if finals:
            conn.execute("UPDATE saf SET message=NULL WHERE id = ANY(%s)", ([sid for sid, _ in finals],))
            txns = [t for _, t in finals if t is not None]
            erased = conn.execute(f"UPDATE txn SET original=NULL WHERE id = ANY(%s) AND original IS NOT NULL"
                                  f" AND NOT EXISTS ({_LIVE_SAF})", (txns,)).rowcount if txns else 0
            done["reversal_data"] += len(finals) + max(erased, 0)
        keep_after = id_at(now - retention)
        done["txn"] = conn.execute(
            f"DELETE FROM txn WHERE id IN (SELECT id FROM txn WHERE id<%s AND NOT EXISTS ({_LIVE_SAF})"
            " ORDER BY id LIMIT %s)", (keep_after, batch)).rowcount
        done["saf"] = conn.execute(
            "DELETE FROM saf WHERE id IN (SELECT id FROM saf WHERE id<%s AND state IN (%s, %s) ORDER BY id LIMIT %s)",
            (keep_after, SAF_ACKED, SAF_CANCELLED, batch)).rowcount
        return done, batch in (walked, len(finals), done["txn"], done["saf"])

    # -- reads

    def _saf_item(self, row: Sequence[Any]) -> SafItem:
        (sid, txn_id, upstream, state, reason, mti, stan, f90, attempts, next_attempt, created, blob) = row
        return SafItem(sid, txn_id, upstream, state, reason or "", mti or "", stan or "", f90 or "", attempts,
                       next_attempt, created, self.vault.open(bytes(blob)) if blob else {}, self.worker)

    def due_saf(self, conn: Conn, upstream: str, now: float, limit: int) -> list[SafItem]:
        """This node's waiting reversals due at ``now`` (several nodes: ``lease_due_saf``)."""
        rows = conn.execute(
            f"SELECT {_SAF_COLUMNS} FROM saf WHERE node=%s AND upstream=%s AND state IN (%s, %s)"
            " AND next_attempt<=%s ORDER BY next_attempt LIMIT %s",
            (self.node, upstream, *_WAITING, now, limit)).fetchall()
        return [self._saf_item(r) for r in rows]

    def next_due(self, conn: Conn, upstream: str) -> float | None:
        due: float | None = _one(conn.execute(
            "SELECT MIN(next_attempt) FROM saf WHERE node=%s AND upstream=%s AND state IN (%s, %s)",
            (self.node, upstream, *_WAITING)))[0]
        return due

    def saf_stats(self, conn: Conn, upstream: str) -> tuple[int, float | None, float | None, int]:
        """(waiting, created time of the oldest waiting, earliest next attempt, parked) for one upstream."""
        waiting, oldest, due, parked = _one(conn.execute(
            "SELECT COUNT(*) FILTER (WHERE state IN (%s, %s)), MIN(created) FILTER (WHERE state IN (%s, %s)),"
            " MIN(next_attempt) FILTER (WHERE state IN (%s, %s)), COUNT(*) FILTER (WHERE state=%s)"
            " FROM saf WHERE node=%s AND upstream=%s AND state IN (%s, %s, %s)",
            (*_WAITING, *_WAITING, *_WAITING, SAF_PARKED, self.node, upstream, *_WAITING, SAF_PARKED)))
        return waiting, oldest, due, parked

    def in_doubt(self, conn: Conn, since: float | None = None,
                 node: str | None = None) -> list[tuple[int, str, str, str, dict[str, str]]]:
        """A node's (default: this one's) transactions sent upstream and never answered, whose
        reversal is not queued: (id, upstream, mti, upstream_stan, fields). As ``SQLiteStore.in_doubt``."""
        since = time.time() - RECOVERY_WINDOW if since is None else since
        rows = conn.execute(
            "SELECT t.id, t.upstream, t.mti, t.upstream_stan, t.original FROM txn t"
            " WHERE t.node=%s AND t.id>=%s AND t.state IN (%s, %s) AND t.response_code IS NULL"
            " AND NOT EXISTS (SELECT 1 FROM saf s WHERE s.txn_id=t.id) ORDER BY t.id",
            (node or self.node, id_at(since), FORWARDED, TIMED_OUT)).fetchall()
        return [(r[0], r[1], r[2], r[3], self.vault.open(bytes(r[4])) if r[4] else {}) for r in rows]

    def find_original(self, conn: Conn, listener: str, acquirer: str, terminal: str, merchant: str, stan: str,
                      transmission: str, mti: str) -> tuple[TxnRow, dict[str, str], list[str]] | None:
        """The transaction a front-end reversal points at (any node's), its fields and its
        reversals' states; or None. The same identity rules as ``SQLiteStore.find_original``."""
        rows = conn.execute(
            f"SELECT {TXN_COLUMNS}, acquirer, original FROM txn"
            " WHERE transmission=%s AND terminal=%s AND front_stan=%s AND mti=%s AND merchant=%s AND listener=%s"
            " AND (acquirer=%s OR acquirer IS NULL) ORDER BY created DESC LIMIT %s",
            (transmission, terminal.rstrip(), stan, mti, merchant.rstrip(), listener, acquirer,
             _ORIGINAL_CANDIDATES)).fetchall()
        for row in rows:
            fields = self.vault.open(bytes(row[-1])) if row[-1] else {}
            if row[-2] is None and fields.get("32", "") != acquirer:
                continue
            txn = TxnRow(*row[:-2])
            states = [r[0] for r in conn.execute("SELECT state FROM saf WHERE txn_id=%s ORDER BY id", (txn.id,))]
            return txn, fields, states
        return None

    @staticmethod
    def find_txns(conn: Conn, *, rrn: str | None = None, stan: str | None = None, terminal: str | None = None,
                  limit: int = 50) -> list[TxnRow]:
        where: list[sql.Composable] = []
        args: list[Any] = []
        for column, value in (("rrn", rrn), ("front_stan", stan), ("terminal", terminal)):
            if value is not None:
                where.append(sql.SQL("{}=%s").format(sql.Identifier(column)))
                args.append(value)
        query: sql.Composable = sql.SQL(f"SELECT {TXN_COLUMNS} FROM txn")
        if where:
            query = sql.SQL("{} WHERE {}").format(query, sql.SQL(" AND ").join(where))
        query = sql.SQL("{} ORDER BY created DESC LIMIT %s").format(query)
        return [TxnRow(*r) for r in conn.execute(query, (*args, limit))]

    @staticmethod
    def list_saf(conn: Conn, states: Sequence[str], limit: int = 100) -> list[tuple[Any, ...]]:
        return conn.execute(
            "SELECT id, upstream, state, reason, mti, stan, rrn, amount, currency, pan_masked, attempts, next_attempt,"
            " created, last_result FROM saf WHERE state = ANY(%s) ORDER BY created LIMIT %s",
            (list(states), limit)).fetchall()

    # -- operator actions (``iso-gateway saf retry|park`` on the shared store, from any node)

    @staticmethod
    def retry_saf(conn: Conn, now: float, saf_ids: Sequence[int] | None = None) -> int:
        """Parked or waiting reversals (these, or all) back in the queue, due ``now``; the next
        attempt is a repeat (0421); any lease on them is dropped. Returns how many."""
        where = "" if saf_ids is None else " AND id = ANY(%(ids)s)"
        return conn.execute(
            "UPDATE saf SET state=%(pending)s, next_attempt=%(now)s, attempts=LEAST(attempts, 1), updated=%(now)s,"
            " last_result='retry by operator', leased_by=NULL, lease_until=NULL"
            f" WHERE state IN (%(parked)s, %(pending)s, %(sent)s){where}",
            {"pending": SAF_PENDING, "parked": SAF_PARKED, "sent": SAF_SENT, "now": now,
             "ids": list(saf_ids or ())}).rowcount

    @staticmethod
    def park_saf(conn: Conn, now: float, saf_ids: Sequence[int] | None = None) -> int:
        """Stop retrying waiting reversals (these, or all): they stay listed as parked."""
        where = "" if saf_ids is None else " AND id = ANY(%(ids)s)"
        return conn.execute(
            "UPDATE saf SET state=%(parked)s, updated=%(now)s, last_result='parked by operator',"
            f" leased_by=NULL, lease_until=NULL WHERE state IN (%(pending)s, %(sent)s){where}",
            {"pending": SAF_PENDING, "parked": SAF_PARKED, "sent": SAF_SENT, "now": now,
             "ids": list(saf_ids or ())}).rowcount

    # -- several nodes

    @staticmethod
    def heartbeat(conn: Conn, node: str, now: float, ttl: float = NODE_TTL) -> None:
        """``node`` is alive until ``now + ttl`` (its row is made on the first beat)."""
        conn.execute(
            "INSERT INTO nodes (node, started, heartbeat, expires) VALUES (%s, %s, %s, %s)"
            " ON CONFLICT (node) DO UPDATE SET heartbeat=excluded.heartbeat, expires=excluded.expires",
            (node, now, now, now + ttl))

    @staticmethod
    def claim_slot(conn: Conn, node: str, now: float, ttl: float = NODE_TTL) -> int:
        """The id slot (0..63, the low bits of ``store.new_id``: set ``store._worker_bits`` to it)
        of ``node``, alive until ``now + ttl``: the one it holds, else the lowest that no live node
        holds (a dead node's slot is reused). Claims are serialized by a lock on ``nodes``; raises
        RuntimeError when 64 live nodes hold every slot."""
        conn.execute("LOCK TABLE nodes IN SHARE ROW EXCLUSIVE MODE")
        row = conn.execute("SELECT slot FROM nodes WHERE node=%s", (node,)).fetchone()
        if row is not None and row[0] is not None:
            slot = int(row[0])
        else:
            free = conn.execute(
                "SELECT s FROM generate_series(0, %s) s WHERE s NOT IN"
                " (SELECT slot FROM nodes WHERE slot IS NOT NULL AND expires>=%s) ORDER BY s LIMIT 1",
                (MAX_SLOTS - 1, now)).fetchone()
            if free is None:
                raise RuntimeError(f"all {MAX_SLOTS} node slots are held by live nodes")
            slot = int(free[0])
            conn.execute("UPDATE nodes SET slot=NULL WHERE slot=%s", (slot,))  # a dead node's, reused
        conn.execute(
            "INSERT INTO nodes (node, started, heartbeat, expires, slot) VALUES (%s, %s, %s, %s, %s)"
            " ON CONFLICT (node) DO UPDATE SET heartbeat=excluded.heartbeat, expires=excluded.expires,"
            " slot=excluded.slot", (node, now, now, now + ttl, slot))
        return slot

    @staticmethod
    def expired_nodes(conn: Conn, now: float) -> list[str]:
        """The nodes whose heartbeat ran out before ``now``, by name."""
        return [r[0] for r in conn.execute("SELECT node FROM nodes WHERE expires<%s ORDER BY node", (now,))]

    @staticmethod
    def live_nodes(conn: Conn, now: float) -> list[str]:
        return [r[0] for r in conn.execute("SELECT node FROM nodes WHERE expires>=%s ORDER BY node", (now,))]

    def lease_due_saf(self, conn: Conn, node: str, now: float, lease_seconds: float, limit: int,
                      upstream: str | None = None) -> list[SafItem]:
        """Reversals due at ``now`` (any node's, or one upstream's) that no other node holds a live
        lease on, leased to ``node`` until ``now + lease_seconds``, oldest due first.

        Rows another transaction is leasing at the same moment are skipped (``FOR UPDATE SKIP
        LOCKED``), not waited for: two nodes asking together get different items, and neither
        waits for the other. The node's own live leases are renewed and returned again.

        Under contention the answer may hold fewer than ``limit`` items, even none, while due
        items remain (a row another node leased after this statement's snapshot is locked, then
        dropped when its new lease is seen): never an item twice, and the next call finds the rest."""
        upstream_sql = " AND upstream=%(upstream)s" if upstream is not None else ""
        rows = conn.execute(
            f"UPDATE saf SET leased_by=%(node)s, lease_until=%(until)s WHERE id IN ("
            f" SELECT id FROM saf WHERE state IN (%(pending)s, %(sent)s) AND next_attempt<=%(now)s{upstream_sql}"
            f" AND (leased_by IS NULL OR lease_until<=%(now)s OR leased_by=%(node)s)"
            f" ORDER BY next_attempt LIMIT %(limit)s FOR UPDATE SKIP LOCKED)"
            f" RETURNING {_SAF_COLUMNS}",
            {"node": node, "until": now + lease_seconds, "now": now, "limit": limit, "upstream": upstream,
             "pending": SAF_PENDING, "sent": SAF_SENT}).fetchall()
        items = [self._saf_item(r) for r in rows]
        items.sort(key=lambda item: (item.next_attempt, item.id))
        return items

    @staticmethod
    def renew_leases(conn: Conn, node: str, saf_ids: Sequence[int], until: float) -> list[int]:
        """Extend ``node``'s leases on these items to ``until``; returns the ids it still held (an
        id missing from the answer was lost: its lease ran out and another node took it)."""
        rows = conn.execute("UPDATE saf SET lease_until=%s WHERE id = ANY(%s) AND leased_by=%s RETURNING id",
                            (until, list(saf_ids), node)).fetchall()
        return sorted(r[0] for r in rows)

    @staticmethod
    def release_leases(conn: Conn, node: str, saf_ids: Sequence[int] | None = None) -> int:
        """Give up ``node``'s leases (these items, or all of them: a clean stop); returns how many."""
        if saf_ids is None:
            cur = conn.execute("UPDATE saf SET leased_by=NULL, lease_until=NULL WHERE leased_by=%s", (node,))
        else:
            cur = conn.execute("UPDATE saf SET leased_by=NULL, lease_until=NULL WHERE leased_by=%s AND id = ANY(%s)",
                               (node, list(saf_ids)))
        return cur.rowcount

    @staticmethod
    def take_over(conn: Conn, dead: str, node: str) -> tuple[int, int]:
        """A dead node's in-doubt transactions and waiting reversals become ``node``'s (its
        recovery then reverses them as its own): (transactions, reversals) moved. Its leases
        are left to run out, so a node that was only slow finishes nothing twice."""
        txns = conn.execute(
            "UPDATE txn SET node=%s WHERE node=%s AND state IN (%s, %s) AND response_code IS NULL",
            (node, dead, FORWARDED, TIMED_OUT)).rowcount
        safs = conn.execute("UPDATE saf SET node=%s WHERE node=%s AND state IN (%s, %s, %s)",
                            (node, dead, *_WAITING, SAF_PARKED)).rowcount
        return txns, safs

    def adopt(self, conn: Conn, now: float) -> list[tuple[str, list[tuple[int, str, str, str, dict[str, str]]]]]:
        """Take over from every node whose heartbeat ran out before ``now`` (but this one): its
        in-doubt transactions become this node's, returned as ``in_doubt`` gives them (for the
        caller to reverse), its waiting reversals too (``take_over``), and its row is deleted (its
        slot freed). Returns [(dead node, its in-doubt transactions)]. Two survivors adopting at
        once take each row once (the updates lock it)."""
        adopted = []
        for dead in self.expired_nodes(conn, now):
            if dead == self.node:
                continue
            ids = [r[0] for r in conn.execute(
                "UPDATE txn SET node=%s WHERE node=%s AND state IN (%s, %s) AND response_code IS NULL RETURNING id",
                (self.node, dead, FORWARDED, TIMED_OUT))]
            conn.execute("UPDATE saf SET node=%s WHERE node=%s AND state IN (%s, %s, %s)",
                         (self.node, dead, *_WAITING, SAF_PARKED))
            conn.execute("DELETE FROM nodes WHERE node=%s AND expires<%s", (dead, now))
            rows = conn.execute(
                "SELECT t.id, t.upstream, t.mti, t.upstream_stan, t.original FROM txn t WHERE t.id = ANY(%s)"
                " AND NOT EXISTS (SELECT 1 FROM saf s WHERE s.txn_id=t.id) ORDER BY t.id", (ids,)).fetchall() \
                if ids else []
            adopted.append((dead, [(r[0], r[1], r[2], r[3], self.vault.open(bytes(r[4])) if r[4] else {})
                                   for r in rows]))
        return adopted

    @staticmethod
    def leave(conn: Conn, node: str) -> None:
        """A clean stop: ``node`` gives up its leases, and its heartbeat ends now (its slot is free)."""
        conn.execute("UPDATE saf SET leased_by=NULL, lease_until=NULL WHERE leased_by=%s", (node,))
        conn.execute("UPDATE nodes SET expires=LEAST(expires, heartbeat) WHERE node=%s", (node,))

    @staticmethod
    def next_leasable(conn: Conn, node: str, upstream: str) -> float | None:
        """When the next reversal on ``upstream`` that ``node`` could lease is due: the earliest
        next attempt of the waiting items, each no sooner than another node's lease on it ends."""
        due: float | None = _one(conn.execute(
            "SELECT MIN(GREATEST(next_attempt, CASE WHEN leased_by IS NULL OR leased_by=%s THEN 0"
            " ELSE COALESCE(lease_until, 0) END)) FROM saf WHERE upstream=%s AND state IN (%s, %s)",
            (node, upstream, *_WAITING)))[0]
        return due

    @staticmethod
    def next_stan_block(conn: Conn, link: str, size: int) -> int:
        """The first STAN of a block of ``size`` consecutive STANs on ``link`` that no other caller
        gets until the counter comes round (after 999,999, STAN 000001 follows). The counter row
        is locked until the caller's transaction ends: concurrent callers queue on it briefly."""
        if not 1 <= size < STAN_MAX:
            raise ValueError(f"a STAN block holds 1 to {STAN_MAX - 1} STANs")
        nxt = _one(conn.execute(
            "INSERT INTO stan_counter (link, next) VALUES (%(link)s, %(first_next)s)"
            " ON CONFLICT (link) DO UPDATE SET next=(stan_counter.next - 1 + %(size)s) %% %(max)s + 1"
            " RETURNING next",
            {"link": link, "first_next": size % STAN_MAX + 1, "size": size, "max": STAN_MAX}))[0]
        return int((nxt - 1 - size) % STAN_MAX + 1)


def _fold_updates(updates: Sequence[tuple[int, str, float, str | None, str | None]]) -> str:
    """Updates of ``txn`` rows (id, state, time, rc, auth) as ``_UPDATE_TXN_JSON``'s parameter, one
    entry per row with the effect of applying them in order: the last state and time win, and the
    last response and approval codes given."""
    folded: dict[int, dict[str, Any]] = {}
    for txn_id, state, when, rc, auth in updates:
        row = folded.get(txn_id)
        if row is None:
            folded[txn_id] = {"id": txn_id, "state": state, "updated": when, "rc": rc, "auth": auth}
            continue
        row["state"], row["updated"] = state, when
        if rc is not None:
            row["rc"] = rc
        if auth is not None:
            row["auth"] = auth
    return json.dumps(list(folded.values()))


def _one(cur: psycopg.Cursor[Any]) -> tuple[Any, ...]:
    """The one row a statement returns (an aggregate, a RETURNING of one row)."""
    row = cur.fetchone()
    if row is None:
        raise psycopg.DataError("the statement returned no row")
    return tuple(row)


def stan_block(first: int, size: int) -> list[int]:
    """The STANs of the block ``next_stan_block`` handed out, in order (wrapping after 999,999)."""
    return [(first - 1 + i) % STAN_MAX + 1 for i in range(size)]


# --------------------------------------------------------------------------- the pool


@dataclass(frozen=True, slots=True)
class SessionSettings:
    """Set on every connection the pool opens (milliseconds): a statement that takes longer, a
    lock wait, a transaction left open, are ended by the server, so a slow database fails the
    work (answered 96, kept and retried) instead of holding it."""

    statement_timeout_ms: int = 5000
    lock_timeout_ms: int = 2000
    idle_in_transaction_timeout_ms: int = 30000


class PgDatabase:
    """A connection pool on one database and a store on it: ``run(fn, *args)`` runs ``fn(conn,
    *args)`` in a transaction of its own on a pooled connection and returns its result.

    Errors come out as ``StoreUnavailable`` (reason and scrubbed message). The pool checks a
    connection before handing it out and replaces broken ones, so a restarted server is used
    again without any action. ``connect_timeout``: seconds ``run`` waits for a connection."""

    def __init__(self, conninfo: str, store: PgStore, *, min_size: int = 1, max_size: int = 4,
                 connect_timeout: float = 5.0, settings: SessionSettings | None = None) -> None:
        self.conninfo = conninfo
        self.store = store
        self.connect_timeout = connect_timeout
        self.settings = settings or SessionSettings()
        self.pool: psycopg_pool.ConnectionPool[Conn] = psycopg_pool.ConnectionPool(
            conninfo, min_size=min_size, max_size=max_size, open=False, configure=self._configure,
            check=psycopg_pool.ConnectionPool.check_connection, name="iso-gateway-journal",
            timeout=connect_timeout, reconnect_timeout=0)

    def _configure(self, conn: Conn) -> None:
        s = self.settings
        conn.execute(f"SET statement_timeout = {int(s.statement_timeout_ms)}")
        conn.execute(f"SET lock_timeout = {int(s.lock_timeout_ms)}")
        conn.execute(f"SET idle_in_transaction_session_timeout = {int(s.idle_in_transaction_timeout_ms)}")
        conn.commit()

    def open(self, wait: bool = False) -> None:
        """Start the pool (``wait``: until it has its first connection, else StoreUnavailable)."""
        try:
            self.pool.open(wait=wait, timeout=self.connect_timeout)
        except psycopg.Error as exc:
            raise self.error(exc) from None

    def close(self) -> None:
        self.pool.close()

    def __enter__(self) -> PgDatabase:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def error(self, exc: BaseException) -> StoreUnavailable:
        """``exc`` as this database's classified error, with no password in its text."""
        return StoreUnavailable(failure_reason(exc), scrub(f"{type(exc).__name__}: {exc}".strip(), self.conninfo))

    def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        try:
            with self.pool.connection(timeout=self.connect_timeout) as conn:
                with conn.transaction():
                    return fn(conn, *args, **kwargs)
        except psycopg.Error as exc:
            raise self.error(exc) from None

    def migrate(self) -> list[int]:
        from .migrate import migrate

        return self.run_autocommit(migrate)

    def run_autocommit(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(conn, *args)`` on a pooled connection outside a transaction (it opens its own)."""
        try:
            with self.pool.connection(timeout=self.connect_timeout) as conn:
                return fn(conn, *args)
        except psycopg.Error as exc:
            raise self.error(exc) from None


if TYPE_CHECKING:  # both backends satisfy the store interface (mypy checks this; nothing runs)
    import sqlite3

    from .interface import SharedStore, Store

    def _satisfies(lite: SQLiteStore, pg: PgStore) -> tuple[Store[sqlite3.Connection], SharedStore[Conn]]:
        return lite, pg
