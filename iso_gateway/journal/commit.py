"""The transaction journal and the store-and-forward (SAF) queue: durable, batched, PAN-safe.

Every transaction the gateway forwards is a row in ``txn``; every reversal it
owes a switch is a row in ``saf``. SQLite in WAL mode is the default store and
needs no setup; the schema and statements are in store.py (``SQLiteStore``,
the small interface a server database can implement for several nodes).

Writes never block the event loop. A forwarded transaction, and each change of
its state, is a record in the write-ahead log (txlog.py), written from the
event loop before the request is sent; the indexer (indexer.py) writes the log
into SQLite in bulk. Everything else (the SAF queue, STAN counters, reads)
goes to one worker thread that owns a connection and commits whatever has
queued up in one transaction (group commit), then hands the batch back to the
trio side, where each operation's callback runs. On PostgreSQL every write is a
batch (no log); the common one, new requests and answers, goes from the event
loop itself on a connection of its own while the thread has nothing under way
(``_send_here``: one statement, sent and read without blocking), so it costs no
thread hand-off either way.

A store that fails (a full disk, a read-only file, an I/O error) never stops
the process. What fails is counted (``journal_errors_total`` by source and
reason) and /readyz says why (``failed``). A write that must not be lost (a
reversal owed, its progress, a state, a STAN block) is kept in memory, in
order, and retried with backoff until the store takes it; reads and the
other writes of the same batch still get their answers. The indexer retries
a segment it could not write (later ones wait behind it, in order), and
everything resumes by itself when the store works again.

Card data is not kept forever: a periodic purge (``purge_now``) erases the
sealed reversal fields once no reversal can need them and deletes rows past
the retention (``SQLiteStore.purge``), a bounded step per transaction.
"""

from __future__ import annotations

import json
import logging
import math
import queue
import re
import sqlite3
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import trio

from . import store as store_module
from . import txlog
from ..core.errors import DuplicateRecorded
from ..security.pan import PanVault
from .store import (
    ANSWERED, CHECKPOINT_EVERY, FORWARDED, MAX_WORKERS, NOT_SENT, RECEIVED, RECOVERY_WINDOW,
    REVERSAL_FIELDS, REVERSED, SAF_ACKED, SAF_CANCELLED, SAF_PARKED, SAF_PENDING, SAF_SENT, SCHEMA, TIMED_OUT,
    TXN_COLUMNS, Backoff, SafItem, SQLiteStore, TxnRow, failure_reason, id_at, new_id,
)

# The store's names are the journal's too: the rest of the gateway imports them from here.
__all__ = [
    "ANSWERED", "CHECKPOINT_EVERY", "FORWARDED", "MAX_WORKERS", "NOT_SENT", "RECEIVED", "RECOVERY_WINDOW",
    "REVERSAL_FIELDS", "REVERSED", "SAF_ACKED", "SAF_CANCELLED", "SAF_PARKED", "SAF_PENDING", "SAF_SENT", "SCHEMA",
    "TIMED_OUT", "TXN_COLUMNS", "Backoff", "SafItem", "SQLiteStore", "TxnRow", "failure_reason", "id_at", "new_id",
    "INDEX_EVERY", "STORE_RETRY_INITIAL", "STORE_RETRY_MAX", "Journal", "LogIndexer", "open_store_readonly",
    "replay_segments", "PgSettings", "pg_settings",
]

log = logging.getLogger("iso_gateway.journal")

# Seconds between bulk writes of the write-ahead log's rows into SQLite (see txlog.py):
# a transaction answered within this time is written once, in its final state.
INDEX_EVERY = 0.2
# An indexer process that dies is started again after this many seconds.
INDEXER_RESTART_DELAY = 1.0
# An indexer process with nothing to do for this many seconds exits (a quiet gateway keeps no
# idle process); the next segment starts one again.
INDEXER_IDLE_EXIT = 5.0
# Seconds before the first retry of a write the store refused, doubling up to the maximum. A
# retry against a full disk costs one failing statement, so retrying often is cheap; 2 s at
# most means service resumes within 2 s of space returning.
STORE_RETRY_INITIAL = 0.1
STORE_RETRY_MAX = 2.0
# Seconds between runs of the purge (reversal data past its window, rows past the retention).
# Both are days long: a purge ten minutes late keeps nothing noticeably longer, and a run
# that finds nothing costs a few index reads.
PURGE_EVERY = 600.0


# Writes that must reach the store in the end, in order: a reversal owed and its progress, a
# transaction's state, a STAN block. When the store refuses them they are kept and retried.
# Not ``insert_txn`` (with synchronous=FULL): a request the journal can't take is refused
# (96) and never sent, so nothing is owed for it.
# By name: either store's methods (SQLiteStore, pg.PgStore).
MUST_LAND = frozenset(f.__name__ for f in (
    SQLiteStore.insert_saf, SQLiteStore.update_saf, SQLiteStore.cancel_unsent_saf, SQLiteStore.update_txn,
    SQLiteStore.update_txn_many, SQLiteStore.set_meta))


@dataclass(frozen=True)
class PgSettings:
    """The journal on PostgreSQL (``[journal] backend = "postgresql"``): where, and as which node."""

    conninfo: str  # with the password (never logged: ``pg.redact``)
    node: str
    db_timeout: float = 2.0
    heartbeat_interval: float = 2.0
    node_ttl: float = 10.0
    lease_seconds: float = 20.0
    start_timeout: float = 30.0
    dup_window: float = 0.0  # the gateway's duplicate_window: a key another node journaled is refused


def pg_settings(cfg: Any, worker: int | None = None, dup_window: float = 0.0) -> PgSettings | None:
    """``PgSettings`` from a ``config.JournalConfig`` (None for the SQLite backend or no journal).
    The password comes from ``password_env`` or ``password_file``; a worker process (``--workers``)
    is a node of its own (``<node>/w<n>``)."""
    if cfg.backend != "postgresql" or not cfg.enabled:
        return None
    import socket

    from .pg import make_conninfo, read_password

    node = cfg.node or socket.gethostname()
    if worker is not None:
        node = f"{node}/w{worker}"
    password = read_password(cfg.password_file or None, cfg.password_env or None)
    # A server that stops answering on an open connection (a partition, a stopped host) is noticed
    # by the kernel: unacknowledged data for db_timeout fails the connection, and so do keepalives.
    conninfo = make_conninfo(cfg.dsn, password=password, connect_timeout=max(2, math.ceil(cfg.db_timeout)),
                             tcp_user_timeout=str(int(cfg.db_timeout * 1000)), keepalives="1",
                             keepalives_idle="5", keepalives_interval="2", keepalives_count="2")
    return PgSettings(conninfo, node, cfg.db_timeout, cfg.heartbeat_interval, cfg.node_ttl, cfg.lease_seconds,
                      cfg.start_timeout, dup_window)


# --------------------------------------------------------------------------- the worker


Callback = Callable[[Any, BaseException | None], Any]


class _Op:
    __slots__ = ("fn", "args", "kwargs", "callback", "result", "error", "kept")

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
                 callback: Callback | None) -> None:
        self.fn = fn
        self.args = args
        self.kwargs = kwargs
        self.callback = callback
        self.result: Any = None
        self.error: BaseException | None = None
        self.kept = False  # refused by the store, kept for a retry (a MUST_LAND write)


_STOP = object()


def replay_segments(conn: sqlite3.Connection, store: SQLiteStore, worker: int | None, *, quiet: bool = False) -> int:
    """Write what log segments left behind by a crash hold into SQLite, then delete them.

    ``worker`` None: every segment beside the file (a single process, or the supervisor
    before it starts the workers); else that worker's own."""
    from .indexer import apply_segment

    rows = 0
    for path in txlog.segments(store_path(conn), worker):
        try:
            inserted, updated = apply_segment(conn, store, path)
        except (sqlite3.Error, OSError, ValueError) as exc:
            # Later segments wait too: their answers may belong to this one's transactions.
            log.error("journal log %s could not be replayed (%s); it and %d later ones are left in place",
                      path.name, type(exc).__name__, len(txlog.segments(store_path(conn), worker)) - 1)
            break
        rows += inserted
        if not quiet:
            log.info("journal log %s replayed: %d transactions added, %d updated", path.name, inserted, updated)
    return rows


def _apply_log_file(conn: sqlite3.Connection, store: SQLiteStore, path: Path) -> tuple[int, int]:
    """Thread-mode indexing: one segment in the batch's transaction (deleted after the commit)."""
    records, torn = txlog.read(path, store.vault.open_bytes)
    if torn:
        log.warning("journal log %s ended with %d unreadable bytes", path.name, torn)
    return store.apply_log(conn, records)


def store_path(conn: sqlite3.Connection) -> str:
    return conn.execute("PRAGMA database_list").fetchone()[2]


class Journal:
    """The store behind a worker thread with group commit; use from trio.

    ``submit(fn, *args, callback=cb)`` queues ``fn(conn, *args)``; after the
    batch holding it commits, ``cb(result, error)`` runs in the trio thread (a
    callback may return a FrameWriter to flush). ``await call(fn, *args)``
    does the same and returns the result.
    """

    def __init__(self, path: str, vault: PanVault, *, synchronous: str = "NORMAL", max_batch: int = 1000,
                 metrics: Any = None, worker: int = 0, replay_all: bool = True, indexer: str = "process",
                 max_log_segments: int = 50, reversal_data_window: float = RECOVERY_WINDOW,
                 retention: float = 90 * 86400.0, pg: PgSettings | None = None) -> None:
        if not 0 <= worker < MAX_WORKERS:
            raise ValueError(f"worker number must be below {MAX_WORKERS}")
        store_module._worker_bits = worker
        self.path = path
        # PostgreSQL (several nodes share the database) or the SQLite file at ``path``.
        self.pg = pg
        self.shared = pg is not None
        self.node = pg.node if pg is not None else ""
        self.db: Any = None
        self.store: Any = SQLiteStore(vault, worker)
        # Called (on the event loop) with the in-doubt transactions taken over from a dead node.
        self.on_adopt: Callable[[str, list[Any]], None] | None = None
        self.synchronous = synchronous
        self.max_batch = max_batch
        self.metrics = metrics
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._done_send: trio.MemorySendChannel[list[_Op]] | None = None
        # What is failing now, by source (store, log, indexer, recovery): what /readyz shows.
        self._failures: dict[str, str] = {}
        # MUST_LAND writes the store refused, oldest first, and when to try them again (thread only).
        self._kept: list[_Op] = []
        self._kept_at = 0.0
        self._backoff = Backoff(STORE_RETRY_INITIAL, STORE_RETRY_MAX)
        self.max_log_segments = max_log_segments
        self.reversal_data_window = reversal_data_window
        self.retention = retention
        # The event loop's wall clock (epoch seconds): the purge's "now" and the timestamps of the
        # log's records. The gateway sets its own (clock.Clock, on trio's clock, so a MockClock
        # moves it); called on the event loop only. The thread and the indexer keep real time for
        # their own housekeeping (retry backoff, checkpoints), never for what they store.
        self.wall: Callable[[], float] = time.time
        # Called once after each committed batch's callbacks (the gateway: run what they decided).
        self.after_callbacks: Callable[[], None] | None = None
        self.commits = 0
        self.ops = 0
        # Operations submitted during one turn of the event loop go to the thread as one
        # list: one queue hand-off (and at most one thread wake-up) per turn, not per op.
        self._pending: list[_Op] = []
        self._kick: trio.Event | None = None
        # Statements run as one executemany when a batch holds a run of them.
        # Errors an operation's own (a constraint): in a batch on SQLite the op fails alone; on
        # PostgreSQL the transaction is aborted, so the batch goes again one op at a time.
        self._op_errors: tuple[type[BaseException], ...] = (sqlite3.IntegrityError, DuplicateRecorded)
        self._integrity: tuple[type[BaseException], ...] = (sqlite3.IntegrityError,)
        self._down: BaseException | None = None  # PostgreSQL: the store's failure until a batch works again
        self._pg_conn: Any = None  # PostgreSQL: the thread's connection (see _pg_connection)
        self._here: Any = None  # PostgreSQL: the event loop's connection (see _send_here)
        # Operations handed to the thread, and those it has done (each counter has one writer):
        # equal when the thread has nothing left to commit.
        self._handed = 0
        self._thread_done = 0
        self._busy_since: float | None = None  # PostgreSQL: when the batch being committed began (monotonic)
        if pg is not None:
            self._open_pg(vault, pg, worker)
        else:
            self._conn = SQLiteStore.connect(path, synchronous)  # opened here so a bad path fails at start
            if path != ":memory:":
                self._conn.execute("PRAGMA wal_autocheckpoint=0")  # the checkpoint thread does it (see _checkpoints)
        self._bulk: dict[str, Callable[..., Any]] = {"insert_txn": self.store.insert_txn_many,
                                                     "update_txn": self.store.update_txn_many}
        self._checkpoint_stop = threading.Event()
        # Forwarded transactions go to the write-ahead log (txlog.py) from the event loop and
        # reach SQLite through the indexer (indexer.py) every INDEX_EVERY seconds. With
        # synchronous=FULL (a power loss must not lose them either) they take the thread and
        # its fsync'd commit instead; so do they on PostgreSQL (durable when its commit returns).
        self.write_ahead = path != ":memory:" and synchronous != "FULL" and pg is None
        self.indexer_mode = indexer
        self.txlog: txlog.TxLog | None = None
        self._indexer: Any = None
        self._indexed: dict[Path, trio.Event] = {}  # segments someone waits for (see ``sync``)
        self._segments_waiting = 0  # handed to the indexer, not yet written (a gauge)
        # Thread mode: segments not yet written, oldest first; only the first is being written
        # (a later one may hold answers to its transactions), retried at ``_thread_retry_at``.
        self._thread_segments: deque[Path] = deque()
        self._thread_busy = False
        self._thread_retry_at: float | None = None
        self._thread_backoff = Backoff(STORE_RETRY_INITIAL, STORE_RETRY_MAX)
        if metrics is not None:
            metrics.journal_log_segments_bound().set(max_log_segments)
        # Segments of an earlier run the store refused at start (a full disk): the indexer writes
        # them first, before any of this run's; ``replayed`` is set once they are in SQLite (the
        # recovery of in-doubt transactions waits for it, see DurableReversals.recover).
        self.unreplayed: list[Path] = []
        self.replayed = trio.Event()
        if self.write_ahead:
            # A single process owns every segment beside the file; a worker only its own.
            owner = None if replay_all else worker
            replay_segments(self._conn, self.store, owner)
            self.unreplayed = txlog.segments(path, owner)
            self.txlog = txlog.TxLog(path, worker, vault.seal_bytes)
        if not self.unreplayed:
            self.replayed.set()

    def _open_pg(self, vault: PanVault, pg: PgSettings, worker: int) -> None:
        """The pool, the schema brought up to date and this node's id slot: tried until
        ``start_timeout`` (a node does not start without its database; once running it
        survives the database's absence)."""
        import psycopg

        from .pg import PgDatabase, PgStore, SessionSettings, redact

        store = PgStore(vault, pg.node, worker, dup_window=pg.dup_window)
        ms = int(pg.db_timeout * 1000)
        self.db = db = PgDatabase(pg.conninfo, store, min_size=1, max_size=4, connect_timeout=pg.db_timeout,
                                  settings=SessionSettings(statement_timeout_ms=ms, lock_timeout_ms=ms))
        self.store = store
        self._conn = None  # type: ignore[assignment]
        self._op_errors = (DuplicateRecorded,)
        self._integrity = (psycopg.IntegrityError,)
        deadline = time.monotonic() + pg.start_timeout
        backoff = Backoff(STORE_RETRY_INITIAL, STORE_RETRY_MAX)
        db.open()
        while True:
            try:
                applied = db.migrate()
                slot = db.run(store.claim_slot, pg.node, time.time(), pg.node_ttl)
                break
            except Exception as exc:  # noqa: BLE001 - StoreUnavailable, a migration refused
                if time.monotonic() >= deadline:
                    db.close()
                    raise RuntimeError(f"the journal's database {redact(pg.conninfo)} can't be used: {exc}") from None
                log.warning("journal: waiting for the database %s (%s)", redact(pg.conninfo), exc)
                time.sleep(backoff.next())
        if applied:
            log.info("journal: schema migrations %s applied", ", ".join(map(str, applied)))
        store_module._worker_bits = slot
        log.info("journal on PostgreSQL %s as node %s (id slot %d)", redact(pg.conninfo), pg.node, slot)

    # -- lifecycle

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the worker thread and deliver its results, until cancelled (then drain and stop)."""
        self._token = trio.lowlevel.current_trio_token()
        send, receive = trio.open_memory_channel[list[_Op]](math.inf)
        self._done_send = send
        self._thread = threading.Thread(target=self._work, name="journal", daemon=True)
        self._thread.start()
        checkpointer = None
        # The indexer process checkpoints when there is one (the copy stays off this process's GIL).
        if self.path != ":memory:" and self.db is None and not (self.write_ahead and self.indexer_mode == "process"):
            checkpointer = threading.Thread(target=self._checkpoints, name="journal-checkpoint", daemon=True)
            checkpointer.start()
        self._kick = trio.Event()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._pump)
                if self.txlog is not None:
                    if self.indexer_mode == "process":
                        self._indexer = LogIndexer(self, self._segment_done)
                        nursery.start_soon(self._indexer.run)
                    nursery.start_soon(self._index)
                nursery.start_soon(self._purge)
                nursery.start_soon(self._probe)
                if self.pg is not None:
                    nursery.start_soon(self._heartbeat)
                    if self.write_here:
                        nursery.start_soon(self._connect_here)
                if self.unreplayed:
                    await self._hand_to_indexer(self.unreplayed)
                    self._indexed.setdefault(self.unreplayed[-1], trio.Event())
                    nursery.start_soon(self._when_replayed, self._indexed[self.unreplayed[-1]])
                task_status.started()
                async for batch in receive:
                    await self._deliver(batch)
        finally:
            with trio.CancelScope(shield=True):
                if self._indexer is not None:
                    await self._indexer.close(10)  # it finishes what it was sent, then exits
                if self.pg is not None:  # a clean stop: leases given up, the heartbeat ended
                    self._pending.append(_Op(self.store.leave, (self.node,), {}, None))
                self._hand_over()
                self._queue.put(_STOP)
                self._checkpoint_stop.set()
                await trio.to_thread.run_sync(self._thread.join, 10)
                if checkpointer is not None:
                    await trio.to_thread.run_sync(checkpointer.join, 10)
                if self.txlog is not None and not self._thread.is_alive():
                    self._finish_log()

    def _finish_log(self) -> None:
        """At stop: what the indexer has not written (the last segment at least) goes into SQLite
        now, from this process, so a clean stop leaves no segment behind (one the store refuses
        stays on disk, for the next start)."""
        assert self.txlog is not None
        try:
            self.txlog.rotate()
        except OSError as exc:
            self.note_failure("log", exc.strerror or type(exc).__name__, failure_reason(exc))
        self.txlog.close()
        replay_segments(self._conn, self.store, self.store.worker, quiet=True)

    def _checkpoints(self) -> None:
        """Copy the WAL into the database from a connection of its own, every CHECKPOINT_EVERY seconds.

        The writer's automatic checkpoint is off: left on, a commit now and then does the copy
        itself and every request waiting for that commit waits tens of milliseconds longer. A
        PASSIVE checkpoint never blocks the writer."""
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, timeout=10.0)
        except sqlite3.Error as exc:  # the writer's own commits still work; the WAL just grows
            self.note_failure("store", f"no checkpoint connection ({exc})", failure_reason(exc))
            return
        failing = False
        try:
            while not self._checkpoint_stop.wait(CHECKPOINT_EVERY):
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
                    failing = False
                except sqlite3.Error as exc:
                    if not failing:  # once per run of failures: a full disk fails it every second
                        log.warning("journal checkpoint failed (%s)", type(exc).__name__)
                    failing = True
            try:
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
            except sqlite3.Error:
                pass
        finally:
            conn.close()

    async def _pump(self) -> None:
        """Hand what the loop submitted to the thread: woken by a submit, so the operations of
        everything that ran meanwhile go over together. (PostgreSQL: the common batch is written
        from here when it can be, ``_send_here``.)"""
        while True:
            assert self._kick is not None
            await self._kick.wait()
            self._kick = trio.Event()
            if self._here is not None and self._pending:
                flight = self._send_here()
                if flight is not None:
                    await self._fly_here(flight)
                    continue
            self._hand_over()

    async def _index(self) -> None:
        """Every INDEX_EVERY seconds the log segment is closed and goes to the indexer."""
        while True:
            await trio.sleep(INDEX_EVERY)
            await self._rotate()
            if self._thread_retry_at is not None and trio.current_time() >= self._thread_retry_at:
                self._thread_retry_at = None
                self._index_in_thread()

    async def _probe(self) -> None:
        """While a part of the journal fails and nothing else would find out that it works again
        (an idle gateway that /readyz keeps out of traffic), try it every STORE_RETRY_MAX
        seconds: a small log write, a STAN-like meta write (kept and retried like any other)."""
        while True:
            await trio.sleep(STORE_RETRY_MAX)
            if "log" in self._failures and self.txlog is not None:
                try:
                    self.txlog.probe()
                except OSError as exc:
                    self.note_failure("log", exc.strerror or type(exc).__name__, failure_reason(exc))
                else:
                    self.clear_failure("log")
            if "store" in self._failures and not self._kept:
                self.submit(self.store.set_meta, f"probe:w{self.store.worker}", str(self.wall()))

    async def _heartbeat(self) -> None:
        """PostgreSQL: this node's heartbeat every ``heartbeat_interval`` seconds, and a look for
        dead nodes (no heartbeat for ``node_ttl``): their in-doubt transactions and reversals
        become this node's, and the in-doubt ones go to ``on_adopt`` to be reversed."""
        assert self.pg is not None
        pg = self.pg

        def adopted(found: Any, error: BaseException | None) -> None:
            if error is not None or not found:
                return
            for dead, in_doubt in found:
                log.warning("journal: node %s is dead (no heartbeat for %.0f s): this node takes over its work"
                            " (%d transactions in doubt)", dead, pg.node_ttl, len(in_doubt))
                if self.metrics is not None:
                    self.metrics.journal_node_takeovers().inc()
                if self.on_adopt is not None:
                    self.on_adopt(dead, in_doubt)

        def beat(slot: Any, error: BaseException | None) -> None:
            if error is None and slot != store_module._worker_bits:
                # This node's row was gone (it was cut off from the database for longer than
                # node_ttl, and another node took it for dead): its slot was given up, and it
                # holds another one now.
                log.warning("journal: this node's id slot is %d now (it was %d): it was taken for dead",
                            slot, store_module._worker_bits)
                store_module._worker_bits = slot

        def counted(nodes: Any, error: BaseException | None) -> None:
            if error is None and self.metrics is not None:
                self.metrics.journal_nodes_live().set(len(nodes))

        while True:
            now = self.wall()
            # A beat claims the slot again (the one held, or a free one if this node's row was
            # deleted), so that no two live nodes ever make ids with the same slot.
            self.submit(self.store.claim_slot, self.node, now, pg.node_ttl, callback=beat)
            self.submit(self.store.adopt, now, callback=adopted)
            self.submit(self.store.live_nodes, now, callback=counted)
            await trio.sleep(pg.heartbeat_interval)

    async def _purge(self) -> None:
        """Every PURGE_EVERY seconds, the purge (``purge_now``); the first one soon after start."""
        await trio.sleep(INDEX_EVERY)
        while True:
            await self.purge_now()
            await trio.sleep(PURGE_EVERY)

    async def purge_now(self) -> dict[str, int]:
        """Erase the reversal data no reversal can need any more and delete rows past the
        retention (``SQLiteStore.purge``): a bounded step per journal batch, repeated until
        done. Returns what it did, by kind; a store that refuses it is counted (the next run
        tries again)."""
        total = {"reversal_data": 0, "txn": 0, "saf": 0}
        for _ in range(100_000):  # bounded: 10^8 rows at PURGE_BATCH a step
            try:
                counts, more = await self.call(self.store.purge, self.wall(), self.reversal_data_window,
                                               self.retention)
            except Exception as exc:  # noqa: BLE001 - counted and shown; the next run tries again
                log.warning("journal purge stopped (%s); it runs again in %.0f s", type(exc).__name__, PURGE_EVERY)
                break
            for kind, n in counts.items():
                total[kind] += n
                if n and self.metrics is not None:
                    self.metrics.journal_purged(kind).inc(n)
            if not more:
                break
        if any(total.values()):
            log.info("journal purge: reversal data erased from %d rows; %d transactions and %d reversals past "
                     "the retention deleted", total["reversal_data"], total["txn"], total["saf"])
        return total

    async def _rotate(self) -> Path | None:
        """Close the segment and hand the complete ones to the indexer; returns the newest."""
        assert self.txlog is not None
        try:
            paths = self.txlog.rotate()
        except OSError as exc:
            self.note_failure("log", exc.strerror or type(exc).__name__, failure_reason(exc))
            paths = self.txlog.take_closed()  # the segment the failed write closed, if it did
        await self._hand_to_indexer(paths)
        return paths[-1] if paths else None

    async def _hand_to_indexer(self, paths: list[Path]) -> None:
        self._count_segments(len(paths))
        for path in paths:
            if self._indexer is not None:
                await self._indexer.send(path)
            else:  # thread mode
                self._thread_segments.append(path)
        if paths and self._indexer is None:
            self._index_in_thread()

    async def _when_replayed(self, done: trio.Event) -> None:
        await done.wait()
        log.info("journal: %d log segments left by the last run are in SQLite now", len(self.unreplayed))
        self.unreplayed = []
        self.replayed.set()

    def _index_in_thread(self) -> None:
        """Thread mode: write the oldest waiting segment (one at a time, in order)."""
        if self._thread_busy or self._thread_retry_at is not None or not self._thread_segments:
            return
        path = self._thread_segments[0]
        self._thread_busy = True

        def done(counts: Any, error: BaseException | None) -> None:
            self._thread_busy = False
            if error is None:
                self._thread_segments.popleft()
                self._thread_backoff.reset()
                self._segment_done(path, True, "%d %d" % counts, unlink=True)
                self._index_in_thread()
            else:
                self._thread_retry_at = trio.current_time() + self._thread_backoff.next()
                self._segment_done(path, False, f"{failure_reason(error)} ({type(error).__name__})")

        self.submit(_apply_log_file, self.store, path, callback=done)

    def _segment_done(self, path: Path, ok: bool, detail: str, unlink: bool = False) -> None:
        """The indexer is done with a segment: ``detail`` is "<inserted> <updated>", or why it
        failed (``reason (name)``: then it is retried, and the ones after it wait)."""
        if ok:
            self._count_segments(-1)
            if self.metrics is not None:
                counts = detail.split()
                if len(counts) == 2 and all(c.isdigit() for c in counts):
                    self.metrics.journal_writes("insert_txn").inc(int(counts[0]))
                    self.metrics.journal_writes("update_txn").inc(int(counts[1]))
            if unlink:
                try:
                    path.unlink()
                except OSError as exc:
                    log.warning("journal log %s not deleted (%s)", path.name, exc.strerror)
            self.clear_failure("indexer")
        else:
            self.note_failure("indexer", f"journal log {path.name} not written to SQLite: {detail}; retried",
                              detail.split(" ", 1)[0])
            return
        event = self._indexed.pop(path, None)
        if event is not None:
            event.set()

    def _count_segments(self, change: int) -> None:
        self._segments_waiting += change
        if self.metrics is not None:
            self.metrics.journal_log_segments().set(self._segments_waiting)

    @property
    def stalled_for(self) -> float:
        """PostgreSQL: seconds the batch being committed has waited so far (0 when none is): a
        database that holds a batch without failing it (what ``failed`` can't see yet)."""
        since = self._busy_since
        return time.monotonic() - since if since is not None else 0.0

    @property
    def holding_writes(self) -> bool:
        """Writes the store refused are kept in memory, waiting for it (reads don't see them yet)."""
        return bool(self._kept)

    @property
    def segments_waiting(self) -> int:
        """Log segments closed and not yet written into SQLite (the indexer's backlog)."""
        return self._segments_waiting

    @property
    def failed(self) -> str | None:
        """Why the journal can't do all its work now (what /readyz shows), or None."""
        failures = self._failures
        return "; ".join(failures.values()) if failures else None

    def set_vault(self, vault: PanVault) -> None:
        """Seal from now on with ``vault`` (a data key rotated, keys reloaded): the store, the log's
        frames and the indexer process (told over its pipe, before any segment sealed under the new
        key reaches it; one started later gets it in its hello). ``vault`` must still open what the
        old one sealed. Call on the event loop."""
        self.store.vault = vault
        if self.txlog is not None:
            self.txlog.seal = vault.seal_bytes
        if self._indexer is not None:
            self._indexer.new_key()

    def note_failure(self, source: str, why: str, reason: str = "other") -> None:
        """Something of the journal failed (``source``: store, log, indexer, recovery; ``reason``:
        see ``store.failure_reason``): counted each time, logged when it changes, and shown by
        /readyz until ``clear_failure(source)``. Call from either thread."""
        text = f"{source}: {why}"
        if self._failures.get(source) != text:
            log.error("journal: %s", text)
        self._failures[source] = text
        if self.metrics is not None:
            self.metrics.journal_errors(source, reason).inc()

    def clear_failure(self, source: str) -> None:
        if self._failures.pop(source, None) is not None:
            log.info("journal: %s works again", source)

    async def sync(self, timeout: float = 5.0) -> None:
        """Wait until what was logged so far is in SQLite (reads that must see it: front-end
        reversals looking for their original)."""
        if self.txlog is None:
            return
        path = await self._rotate()
        if path is None:
            return
        event = self._indexed.setdefault(path, trio.Event())
        with trio.move_on_after(timeout):
            await event.wait()
            return
        log.warning("journal: the indexer did not write %s within %.0f s", path.name, timeout)

    def record_txn(self, row: dict[str, Any], original: dict[str, str], *, write: bool = True,
                   created: float | None = None) -> None:
        """Journal a transaction about to be sent (write-ahead mode): in the log now, in SQLite
        within INDEX_EVERY. Raises OSError when the log can't be written: then the
        transaction must not be sent. With ``write=False`` the record waits for ``write_log``,
        which must succeed before the transaction is sent.

        ``original`` holds only REVERSAL_FIELDS. The log seals it with the rest of its write;
        the indexer derives the row's columns (masked PAN, keyed hash, identities) from it.
        ``created``: the wall clock of the caller's round if it has one (no clock read per
        transaction), else ``wall()``."""
        assert self.txlog is not None
        record = ("T", row["id"], self.wall() if created is None else created, row["listener"], row["mti"],
                  row["upstream"], row.get("link", 0), row["upstream_stan"], self.store.worker, original)
        self.txlog.append(record, write=False)
        if write:
            self.write_log()

    @property
    def log_failures(self) -> int:
        """How many log writes have failed: a transaction recorded (``write=False``) when this
        was n is in the log only if it is still n after a successful ``write_log``."""
        return self.txlog.failures if self.txlog is not None else 0

    def write_log(self) -> None:
        """Everything logged so far to the kernel (one system call); raises OSError."""
        assert self.txlog is not None
        try:
            self.txlog.write()  # on failure it drops those transactions: they are refused, never sent
        except OSError as exc:
            self.note_failure("log", exc.strerror or type(exc).__name__, failure_reason(exc))
            raise
        if "log" in self._failures:
            self.clear_failure("log")

    def set_state(self, txn_id: int, state: str, response_code: str | None = None,
                  auth_code: str | None = None, when: float | None = None) -> None:
        """A transaction's new state (answered, timed out, reversed...): in write-ahead mode a
        log record, written with the next write (or within INDEX_EVERY), applied after the row.
        ``when``: as ``created`` in ``record_txn``. (Without the log the store stamps the row
        itself, in the thread.)"""
        if self.txlog is None:
            self.submit(self.store.update_txn, txn_id, state, response_code, auth_code)
            return
        self.txlog.append(("U", txn_id, state, self.wall() if when is None else when, response_code, auth_code),
                         write=False)

    def _kick_pump(self) -> None:
        if self._kick is not None:
            self._kick.set()
        else:
            self._hand_over()

    def _hand_over(self) -> None:
        if self._pending:
            pending, self._pending = self._pending, []
            self._handed += len(pending)
            self._queue.put(pending)

    async def _deliver(self, batch: list[_Op]) -> None:
        """A committed batch's callbacks, on the event loop, then ``after_callbacks`` once: what they
        decided is carried out together (one send per connection for the whole batch)."""
        for op in batch:
            if op.callback is not None:
                try:
                    op.callback(op.result, op.error)
                except Exception:  # one callback's bug must not stop the journal
                    log.exception("journal callback failed")
        if self.after_callbacks is not None:
            try:
                self.after_callbacks()
            except Exception:  # the owner's bug must not stop the journal (logged with its traceback)
                log.exception("journal: after_callbacks failed")

    def close(self) -> None:
        if self.txlog is not None:
            self.txlog.close()
        if self.db is not None:
            self._drop_here()
            self._drop_pg_connection()
            self.db.close()
        else:
            self._conn.close()

    # -- use

    def submit(self, fn: Callable[..., Any], *args: Any, callback: Callback | None = None, **kwargs: Any) -> None:
        """Queue ``fn(conn, *args, **kwargs)``; call from the event loop thread."""
        self._pending.append(_Op(fn, args, kwargs, callback))
        self._kick_pump()

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(conn, *args)`` in the journal's transaction order and return its result."""
        done = trio.Event()
        box: list[Any] = []

        def callback(result: Any, error: BaseException | None) -> None:
            box.append((result, error))
            done.set()

        self.submit(fn, *args, callback=callback)
        await done.wait()
        result, error = box[0]
        if error is not None:
            raise error
        return result

    def run_sync(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(conn, *args)`` right now on this thread (start-up and tools only, never on the event loop)."""
        if self.db is not None:
            return self.db.run(fn, *args)
        with self._conn:
            return fn(self._conn, *args)

    # -- the thread

    def _work(self) -> None:
        q = self._queue
        while True:
            try:
                # Kept writes are tried again when their time comes, traffic or not.
                first = q.get(timeout=max(0.0, self._kept_at - time.monotonic()) if self._kept else None)
            except queue.Empty:
                first = []
            if first is _STOP:
                self._give_up_kept()
                return
            batch = list(first)
            stop = False
            while len(batch) < self.max_batch:
                try:
                    more = q.get_nowait()
                except queue.Empty:
                    break
                if more is _STOP:
                    stop = True
                    break
                batch.extend(more)
            try:
                self._commit(batch)
            except Exception:  # the thread must outlive any one batch
                log.exception("journal batch failed")
                for op in batch:
                    if op.error is None and not op.kept:
                        op.error = RuntimeError("journal batch failed")
            self._thread_done += len(batch)
            if batch:
                self._hand_back(batch)
            if stop:
                self._give_up_kept()
                return

    def _commit(self, batch: list[_Op]) -> None:
        """One transaction for the kept writes that are due and the batch; when it fails, each
        op alone (see ``_one_by_one``)."""
        conn = self._conn
        ops = batch
        retrying = 0
        if self._kept:
            if time.monotonic() >= self._kept_at:
                retrying = len(self._kept)
                ops, self._kept = self._kept + batch, []
            else:  # not yet due: MUST_LAND writes queue up behind them, in order
                ops = []
                for op in batch:
                    if op.fn.__name__ in MUST_LAND:
                        op.kept = True
                        self._kept.append(op)
                    else:
                        ops.append(op)
        if not ops:
            return
        if self.db is not None:
            self._commit_pg(ops, retrying)
            return
        started = time.perf_counter()
        changes = conn.total_changes
        try:
            conn.execute("BEGIN IMMEDIATE")
            self._apply(conn, ops)
            conn.execute("COMMIT")
        except Exception as exc:  # noqa: BLE001 - sorted out op by op
            self._rollback()
            log.debug("journal commit failed (%s); each operation alone", type(exc).__name__)
            self._one_by_one(ops)
        else:
            if retrying:
                log.info("journal: %d writes kept while the store refused them are stored now", retrying)
                self._backoff.reset()
            if conn.total_changes != changes or retrying:
                self.clear_failure("store")
        self._count(ops, started)

    def _count(self, ops: list[_Op], started: float) -> None:
        self.commits += 1
        self.ops += len(ops)
        if self.metrics is not None:
            self.metrics.journal_commit_seconds().observe(time.perf_counter() - started)
            kinds: dict[str, int] = {}
            for op in ops:
                name = op.fn.__name__
                if name.startswith(("insert", "update", "cancel", "set")) and op.error is None and not op.kept:
                    kinds[name] = kinds.get(name, 0) + 1
            for kind, n in kinds.items():
                self.metrics.journal_writes(kind).inc(n)

    def _commit_pg(self, ops: list[_Op], retrying: int) -> None:
        """PostgreSQL: the batch in one transaction on the thread's connection: one statement when it
        holds only new transactions and state changes (``_apply_at_once``), else BEGIN, its statements
        and COMMIT. While the database
        is failing (until the next retry is due) nothing waits for it: the ops fail at once (a
        request is answered 96, never sent) and MUST_LAND writes are kept. A failure that says
        the database refused the work fails the batch the same way; any other (a constraint)
        sends it again one op at a time."""
        started = time.perf_counter()
        down = self._down
        if down is not None and time.monotonic() < self._kept_at:
            self._refuse(ops, down, note=False)
            return
        self._busy_since = time.monotonic()
        try:
            self._commit_pg_batch(ops, retrying, started)
        finally:
            self._busy_since = None

    def _commit_pg_batch(self, ops: list[_Op], retrying: int, started: float) -> None:
        try:
            conn = self._pg_connection()
            try:
                if not self._apply_at_once(conn, ops):
                    with conn.transaction():
                        self._apply(conn, ops)
            except Exception as exc:  # sorted out below
                if self.store.refused(exc) or conn.closed:
                    raise
                log.debug("journal commit failed (%s); each operation alone", type(exc).__name__)
                self._one_by_one(ops, conn)
                self._count(ops, started)
                return
        except Exception as exc:  # noqa: BLE001 - the database refused the work (or is gone)
            self._drop_pg_connection()
            error = self.db.error(exc)
            self._refuse(ops, error)
            return
        if retrying:
            log.info("journal: %d writes kept while the store refused them are stored now", retrying)
        if self._down is not None or retrying:
            self._down = None
            self._backoff.reset()
            self.clear_failure("store")
        self._count(ops, started)

    def _hot_calls(self, ops: list[_Op]) -> list[tuple[bool, tuple[Any, ...]]] | None:
        """``ops`` as ``PgStore.write_txns``' calls when they are nothing but new transactions and
        state changes (``insert_txn``, ``update_txn``: the common batch), else None."""
        store = self.store
        calls: list[tuple[bool, tuple[Any, ...]]] = []
        for op in ops:
            fn = op.fn
            if op.kwargs or getattr(fn, "__self__", None) is not store:
                return None
            name = fn.__name__
            if name == "insert_txn":
                calls.append((True, op.args))
            elif name == "update_txn":
                calls.append((False, op.args))
            else:
                return None
        return calls

    def _apply_at_once(self, conn: Any, ops: list[_Op]) -> bool:
        """PostgreSQL: the common batch (``_hot_calls``) as one statement, ``PgStore.write_txns``,
        outside any transaction (one round trip, committed when it returns), with the results
        ``_apply`` in a transaction would give. False, having written nothing, for any other batch."""
        calls = self._hot_calls(ops)
        if calls is None:
            return False
        results = self.store.write_txns(conn, calls)
        if results is None:  # it updates a row it inserts
            return False
        for op, error in zip(ops, results, strict=True):
            op.result = None
            op.error = error
            op.kept = False
        return True

    # -- PostgreSQL: the common batch from the event loop

    # The common batch goes from the event loop on a connection of its own when it can (``_send_here``).
    write_here = True

    def _send_here(self) -> tuple[list[_Op], Any, float] | None:
        """PostgreSQL: send what was submitted from the event loop, when it is the common batch
        (``_hot_calls``) and nothing else is under way: the thread has committed all it was handed
        (``_handed`` == ``_thread_done``), holds no kept write, and the database is not failing. So
        one batch at a time is in flight, on either connection, in the order submitted, as with the
        thread alone. The statement is ``write_txns``' (one round trip, committed when it returns),
        sent and read without blocking (``_fly_here``): nothing waits on a thread, and the event loop
        goes on meanwhile (what it submits waits for the next batch). Returns the batch in flight
        (ops, plan, when), or None, having done nothing, when the batch is not for here."""
        if self._handed != self._thread_done or self._kept or self._down is not None:
            return None
        ops = self._pending
        calls = self._hot_calls(ops)
        if calls is None:
            return None
        plan = self.store.plan_write(calls)
        if plan is None:  # it updates a row it inserts: the thread's transaction
            return None
        started = time.perf_counter()
        try:
            _pg_send(self._here.pgconn, plan.kind, plan.params)
        except Exception as exc:  # noqa: BLE001 - the thread runs them
            log.debug("journal: the event loop's connection failed (%s); the thread runs the batch", type(exc).__name__)
            self._drop_here()
            self._kick_pump()  # (the pump hands them over)
            return None
        self._pending = []
        self._busy_since = time.monotonic()
        return ops, plan, started

    async def _fly_here(self, flight: tuple[list[_Op], Any, float] | None) -> None:
        """Read the answer of the batch in flight (``_send_here``); send the next one, if one is
        waiting, before running this one's callbacks (the database works on it meanwhile; what the
        callbacks submit goes in the one after); and so on while batches follow. A statement that
        fails in any way (a stop too) hands its batch back to the pump, first in line, and from there
        to the thread, which runs it again and sorts out the failure as for any batch (a statement
        that committed and lost its answer is then met as a commit whose answer was lost is)."""
        while flight is not None:
            ops, plan, started = flight
            conn = self._here
            try:
                try:
                    answer = await _pg_receive(conn.pgconn)
                except BaseException as exc:  # a stop (Cancelled) too: then the thread runs them at its stop
                    self._drop_here()
                    self._pending = ops + self._pending
                    self._kick_pump()
                    if not isinstance(exc, Exception):
                        raise
                    log.debug("journal: a batch failed on the event loop's connection (%s); the thread runs it",
                              type(exc).__name__)
                    return
                try:
                    lost = self.store.finish_write(plan, [(int(r[0] or 0), *(None if v is None else v.decode()
                                                                             for v in r[1:])) for r in answer])
                except Exception:  # a bug: the journal outlives it, as the thread does one batch's
                    log.exception("journal batch failed")
                    plan.results = [RuntimeError("journal batch failed")] * len(ops)
                    lost = []
                if lost:  # the batch is committed: a failing look-up refuses them all the same, as in flight
                    again: dict[str, tuple[str | None, str | None]] = {}
                    try:
                        _pg_send(conn.pgconn, "first_of", [json.dumps(plan.lost_keys(lost)),
                                                            plan.now - self.store.dup_window])
                        rows = await _pg_receive(conn.pgconn)
                        again = {key.decode(): (None if rc is None else rc.decode(),
                                                None if auth is None else auth.decode())
                                 for key, rc, auth in rows if key is not None}
                    except Exception:  # noqa: BLE001
                        self._drop_here()
                    plan.settle(lost, again)
            finally:
                self._busy_since = None
            for op, error in zip(ops, plan.results, strict=True):
                op.result = None
                op.error = error
                op.kept = False
            flight = self._send_here() if self._pending and self._here is not None else None
            self._count(ops, started)
            await self._deliver(ops)

    async def _connect_here(self) -> None:
        """PostgreSQL: the event loop's connection for the common batch (``_send_here``), opened in a
        worker thread at start, and again after it failed once the database works."""
        while True:
            if self._here is None and self._down is None:
                try:
                    self._here = await trio.to_thread.run_sync(self._open_here)
                except Exception as exc:  # noqa: BLE001 - the thread's connection carries on meanwhile
                    log.debug("journal: no event-loop connection to the database yet (%s)", type(exc).__name__)
            await trio.sleep(STORE_RETRY_MAX)

    def _open_here(self) -> Any:
        from .pg import WRITE_STATEMENTS

        conn = self._connect_pg()
        try:
            pgconn = conn.pgconn
            # Each statement prepared, then run once on nothing: its first run (the tables' and indexes'
            # descriptions, its plan) costs milliseconds, here rather than in the first batch.
            for kind, query in WRITE_STATEMENTS.items():
                # (nothing: an empty JSON array, 0 for a number, an empty text)
                empty = [{"json": b"[]", "text": b""}.get(cast, b"0") for cast in re.findall(r"%s::(\w+)", query)]
                for result in (pgconn.prepare(kind.encode(), _numbered(query).encode()),
                               pgconn.exec_prepared(kind.encode(), empty)):
                    if result.status not in (_COMMAND_OK, _TUPLES_OK):
                        raise RuntimeError(f"{kind}: {result.error_message.decode(errors='replace')}")
            pgconn.nonblocking = 1
        except BaseException:
            conn.close()
            raise
        return conn

    def _drop_here(self) -> None:
        conn, self._here = self._here, None
        _close_quietly(conn)

    def _connect_pg(self) -> Any:
        """A connection as the journal's statements need it, in autocommit mode."""
        import psycopg

        conn = psycopg.connect(self.db.conninfo, connect_timeout=max(2, math.ceil(self.db.connect_timeout)))
        try:
            self.db._configure(conn)
            # Every statement of the journal's batches finds its rows by an index (ids, duplicate
            # keys, a node's or an upstream's queue). Planned from statistics older than the
            # table (a new database, a burst before autovacuum analyzes it), the update of a
            # batch's answers joined the whole table by a hash (2 ms a batch, growing with the
            # table): this connection's planner stays on the indexes.
            conn.execute("SET enable_seqscan = off")
            conn.execute("SET enable_hashjoin = off")
            conn.execute("SET enable_mergejoin = off")
            conn.commit()
            # A batch of new transactions and answers is one statement (``_apply_at_once``) that
            # commits by itself; any other opens its transaction (BEGIN and COMMIT: two round trips).
            conn.autocommit = True
        except BaseException:
            conn.close()
            raise
        return conn

    def _pg_connection(self) -> Any:
        """The thread's own connection (a batch holds one for its transaction; the pool's hand-out
        and check would cost each batch a round trip): opened when missing, within db_timeout."""
        conn = self._pg_conn
        if conn is None or conn.closed:
            conn = self._pg_conn = self._connect_pg()
        return conn

    def _drop_pg_connection(self) -> None:
        conn, self._pg_conn = self._pg_conn, None
        _close_quietly(conn)

    def _refuse(self, ops: list[_Op], error: BaseException, note: bool = True) -> None:
        """The store took none of ``ops``: MUST_LAND writes are kept (in order), the others fail."""
        for op in ops:
            op.result = None
            if op.fn.__name__ in MUST_LAND:
                op.kept = True
                op.error = None
                self._kept.append(op)
            else:
                op.kept = False
                op.error = error
        if note:
            self._down = error
            reason = self.store.failure_reason(error)
            self._kept_at = time.monotonic() + self._backoff.next()
            kept = f"; {len(self._kept)} writes kept in memory and retried" if self._kept else ""
            self.note_failure("store", f"{reason} ({error}){kept}", reason)

    def _one_by_one(self, ops: list[_Op], pg_conn: Any = None) -> None:
        """After a failed batch: each op in a transaction of its own, so reads get their answers
        and one bad op does not fail the rest. A MUST_LAND write the store refuses is kept
        (its callback runs as if it were written: the journal owns it now), and every
        MUST_LAND write after it is kept untried, behind it, in order."""
        conn = self._conn if pg_conn is None else pg_conn
        store_refused = self.store.refused
        refused: BaseException | None = None
        for op in ops:
            must = op.fn.__name__ in MUST_LAND
            if must and refused is not None:
                op.kept = True
                self._kept.append(op)
                continue
            op.error = None
            try:
                if pg_conn is not None:
                    with pg_conn.transaction():
                        op.result = op.fn(conn, *op.args, **op.kwargs)
                else:
                    conn.execute("BEGIN")
                    op.result = op.fn(conn, *op.args, **op.kwargs)
                    conn.execute("COMMIT")
            except Exception as exc:  # noqa: BLE001 - the op's own error, or the store's
                if pg_conn is None:
                    self._rollback()
                store_failed = store_refused(exc) if pg_conn is not None else isinstance(exc, sqlite3.OperationalError)
                if must and store_failed:
                    op.kept = True
                    self._kept.append(op)
                    refused = exc
                    continue
                op.error = exc
                if store_failed:
                    refused = refused or exc
                elif not isinstance(exc, self._integrity + (DuplicateRecorded,)):
                    log.error("journal operation %s failed (%s)", op.fn.__name__, type(exc).__name__)
                    if self.metrics is not None:
                        self.metrics.journal_errors("store", self.store.failure_reason(exc)).inc()
            else:
                op.kept = False
        if refused is not None:
            if pg_conn is not None:
                self._down = refused
            reason = self.store.failure_reason(refused)
            self._kept_at = time.monotonic() + self._backoff.next()
            kept = f"; {len(self._kept)} writes kept in memory and retried" if self._kept else ""
            self.note_failure("store", f"{reason} ({refused}){kept}", reason)

    def _rollback(self) -> None:
        """End a failed transaction (SQLite has already ended it after some errors, a full disk among them)."""
        if self._conn.in_transaction:
            try:
                self._conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass

    def _give_up_kept(self) -> None:
        """At stop: one last try for the kept writes; what the store still refuses is lost with
        this process (a reversal whose SAF row never landed is found again at the next start:
        its transaction is in doubt, see ``SQLiteStore.in_doubt``)."""
        if not self._kept:
            return
        self._kept_at = 0.0
        try:
            self._commit([])
        except Exception:  # noqa: BLE001
            pass
        if self._kept:
            log.error("journal: %d writes the store refused are dropped at stop", len(self._kept))
            self._kept = []

    def _apply(self, conn: Any, batch: list[_Op]) -> None:
        """Run the batch in order; a run of the same bulk-able statement is one executemany.
        A bulk insert may refuse some rows (a shared store's duplicates): those ops alone fail."""
        bulk = self._bulk
        op_errors = self._op_errors
        i, n = 0, len(batch)
        while i < n:
            op = batch[i]
            many = bulk.get(op.fn.__name__) if not op.kwargs and getattr(op.fn, "__self__", None) is self.store else None
            j = i + 1
            if many is not None:
                while j < n and batch[j].fn == op.fn and not batch[j].kwargs:
                    j += 1
            if many is not None and j - i > 1:
                try:
                    results = many(conn, [o.args for o in batch[i:j]])
                except op_errors as exc:
                    for o in batch[i:j]:
                        o.error = exc
                else:
                    if results is not None:
                        for o, error in zip(batch[i:j], results, strict=True):
                            o.error = error
            else:
                try:
                    op.result = op.fn(conn, *op.args, **op.kwargs)
                except op_errors as exc:
                    op.error = exc
            i = j
        for op in batch:
            op.kept = False

    def _hand_back(self, batch: list[_Op]) -> None:
        if self._token is None or self._done_send is None:
            return
        send = self._done_send
        try:
            self._token.run_sync_soon(send.send_nowait, batch)
        except trio.RunFinishedError:
            pass


_COMMAND_OK = 1  # libpq's PGRES_COMMAND_OK
_TUPLES_OK = 2  # PGRES_TUPLES_OK


def _close_quietly(conn: Any) -> None:
    """Close a database connection that may be broken already (it is gone either way)."""
    if conn is not None:
        try:
            conn.close()
        except Exception:  # noqa: BLE001
            pass


def _numbered(query: str) -> str:
    """A psycopg query's ``%s`` placeholders as libpq's ``$1``, ``$2``... (for a prepared statement)."""
    parts = query.split("%s")
    return parts[0] + "".join(f"${n}{part}" for n, part in enumerate(parts[1:], 1))


def _pg_send(pgconn: Any, name: str, params: list[Any]) -> None:
    """Send the prepared statement ``name`` on a non-blocking libpq connection (psycopg's ``pgconn``);
    ``_pg_receive`` reads its answer. Parameters go as text (str, or a number's exact repr)."""
    pgconn.send_query_prepared(name.encode(), [p.encode() if isinstance(p, str) else repr(p).encode()
                                               for p in params])


async def _pg_receive(pgconn: Any) -> list[tuple[bytes | None, ...]]:
    """The answer to what ``_pg_send`` sent, without blocking the event loop: the rest of the query
    sent as the socket takes it, then read as it becomes readable. Rows come back as text (bytes,
    None for NULL). Raises psycopg's errors: the server's, or a connection that failed."""
    import psycopg

    sock = pgconn.socket
    while pgconn.flush():
        await trio.lowlevel.wait_writable(sock)
    rows: list[tuple[bytes | None, ...]] = []
    error: BaseException | None = None
    while True:
        while pgconn.is_busy():
            await trio.lowlevel.wait_readable(sock)
            pgconn.consume_input()
        result = pgconn.get_result()
        if result is None:
            break
        if result.status == _TUPLES_OK:
            width = result.nfields
            rows += [tuple(result.get_value(r, c) for c in range(width)) for r in range(result.ntuples)]
        elif result.status != _COMMAND_OK and error is None:
            error = psycopg.errors.error_from_result(result, encoding="utf-8")
    if error is not None:
        raise error
    return rows


class LogIndexer:
    """The parent's side: segments go to the child in order; ``done`` callbacks follow."""

    def __init__(self, journal: Journal, on_done: Callable[[Path, bool, str], None]) -> None:
        self.journal = journal
        self.on_done = on_done  # (segment, ok, detail)
        self.unacked: deque[Path] = deque()
        self._proc: trio.Process | None = None
        self._ready = trio.Event()
        self._work = trio.Event()  # set when there is a segment to write
        self._closing = False
        self._key_pending = False  # the vault changed: send the child the new key before the next segment
        # One writer at a time on the child's stdin: the periodic rotation and a reversal's ``sync``
        # both send segments, and two writes at once on a full pipe would raise BusyResourceError
        # (ending the journal). trio's Lock is fair, so lines go in the order segments were queued.
        self._stdin_lock = trio.Lock()
        self._given: set[Path] = set()  # segments the running child was sent (each goes to a child once)

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Start a child when there is work, until ``close``. A child that exits after
        INDEXER_IDLE_EXIT quiet seconds is started again with the next segment; one that
        dies, or can't be started, is started again after a delay (doubling up to
        STORE_RETRY_MAX times ten) and gets again what it had not acknowledged."""
        task_status.started()
        backoff = Backoff(INDEXER_RESTART_DELAY, STORE_RETRY_MAX * 10)
        while True:
            await self._work.wait()
            code = await self._run_child()
            if self._closing:
                return
            if code == 0:  # quiet for a while: it exits, and starts again with the next segment
                backoff.reset()
                if not self.unacked:
                    self._work = trio.Event()
                continue
            log.error("journal indexer exited with %s; %d segments wait; restarting it", code, len(self.unacked))
            self.journal.note_failure("indexer", "the indexer process exited", "exited")
            await trio.sleep(backoff.next())

    async def _run_child(self) -> int | None:
        """One child, from start to exit: its exit code (None: it could not be started)."""
        j = self.journal
        try:
            proc = await trio.lowlevel.open_process(
                [sys.executable, "-m", "iso_gateway.journal.indexer"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        except OSError as exc:  # no memory, no file descriptors: counted, and tried again
            j.note_failure("indexer", f"can't start the indexer process ({exc.strerror or exc})", failure_reason(exc))
            return None
        self._proc = proc
        try:
            hello = {"db": j.path, "synchronous": j.synchronous, "key": j.store.vault.export_key().hex(),
                     "worker": j.store.worker, "idle_exit": INDEXER_IDLE_EXIT,
                     "retry_initial": STORE_RETRY_INITIAL, "retry_max": STORE_RETRY_MAX}
            assert proc.stdin is not None and proc.stdout is not None
            async with self._stdin_lock:
                self._given = set()
                await proc.stdin.send_all(json.dumps(hello).encode() + b"\n")
                for path in list(self.unacked):  # what it has to do (a dead child had not finished)
                    await proc.stdin.send_all(f"apply {path}\n".encode())
                    self._given.add(path)
                self._ready.set()
            if j._failures.get("indexer", "").endswith("exited"):  # it runs again
                j.clear_failure("indexer")
            await self._read(proc)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass  # the child died early: its exit code says so
        finally:
            self._ready = trio.Event()  # (``close`` still has ``_proc`` when this task is cancelled)
        code = await proc.wait()
        self._proc = None
        return code

    async def _read(self, proc: trio.Process) -> None:
        """The child's answers: a segment leaves ``unacked`` once written ("done"); one it could
        not write ("failed") stays first, and the child tries it again."""
        assert proc.stdout is not None
        buf = b""
        while True:
            data = await proc.stdout.receive_some(65536)
            if not data:
                return
            buf += data
            *lines, buf = buf.split(b"\n")
            for line in lines:
                kind, _, rest = line.decode(errors="replace").partition(" ")
                path_s, _, detail = rest.partition(" ")
                path = Path(path_s)
                done = kind == "done"
                if done and self.unacked and self.unacked[0] == path:
                    self.unacked.popleft()
                    self._given.discard(path)
                self.on_done(path, done, detail)

    def new_key(self) -> None:
        """The journal's vault changed: a running child gets the new key ring before its next segment
        (the pipe keeps order); a child started later gets it in its hello."""
        proc = self._proc
        if proc is None or not self._ready.is_set():
            return
        self._key_pending = True

    async def send(self, path: Path) -> None:
        self.unacked.append(path)
        self._work.set()
        async with self._stdin_lock:
            proc = self._proc
            if proc is None or proc.stdin is None or not self._ready.is_set():
                return  # sent when the (re)started child comes up (its hello has the key)
            if self._key_pending:  # before this segment, which may be sealed under the new key
                self._key_pending = False
                line = f"key {self.journal.store.vault.export_key().hex()}\n".encode()
                try:
                    await proc.stdin.send_all(line)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return  # the child is gone: the next one gets the key in its hello, and this segment
            if path in self._given:
                return  # the child had it with what it started with
            try:
                await proc.stdin.send_all(f"apply {path}\n".encode())
                self._given.add(path)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the child is gone: sent again to the next one

    async def close(self, timeout: float) -> None:
        """Let the child finish what it was sent, then stop it (after ``timeout`` it is killed;
        what it had not done is left on disk, for ``Journal._finish_log``)."""
        self._closing = True
        proc = self._proc
        if proc is None:
            return
        with trio.move_on_after(timeout):
            if proc.stdin is not None:
                async with self._stdin_lock:  # after what is being written
                    await proc.stdin.aclose()
            await proc.wait()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        self._proc = None


def open_store_readonly(path: str, vault: PanVault) -> tuple[sqlite3.Connection, SQLiteStore]:
    """For the operator tools: the store of a running or stopped gateway."""
    if not Path(path).exists():
        raise FileNotFoundError(path)
    return SQLiteStore.connect(path), SQLiteStore(vault)
