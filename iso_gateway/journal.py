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
trio side, where each operation's callback runs.
"""

from __future__ import annotations

import json
import logging
import math
import queue
import sqlite3
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable

import trio

from . import store as store_module
from . import txlog
from .security.pan import PanVault
from .store import (
    ANSWERED, CHECKPOINT_EVERY, FORWARDED, MAX_WORKERS, NOT_SENT, RECEIVED, RECOVERY_WINDOW,
    REVERSAL_FIELDS, REVERSED, SAF_ACKED, SAF_CANCELLED, SAF_PARKED, SAF_PENDING, SAF_SENT, SCHEMA, TIMED_OUT,
    TXN_COLUMNS, SafItem, SQLiteStore, TxnRow, id_at, new_id,
)

# The store's names are the journal's too: the rest of the gateway imports them from here.
__all__ = [
    "ANSWERED", "CHECKPOINT_EVERY", "FORWARDED", "MAX_WORKERS", "NOT_SENT", "RECEIVED", "RECOVERY_WINDOW",
    "REVERSAL_FIELDS", "REVERSED", "SAF_ACKED", "SAF_CANCELLED", "SAF_PARKED", "SAF_PENDING", "SAF_SENT", "SCHEMA",
    "TIMED_OUT", "TXN_COLUMNS", "SafItem", "SQLiteStore", "TxnRow", "id_at", "new_id",
    "INDEX_EVERY", "Journal", "LogIndexer", "open_store_readonly", "replay_segments",
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


# --------------------------------------------------------------------------- the worker


Callback = Callable[[Any, BaseException | None], Any]


class _Op:
    __slots__ = ("fn", "args", "kwargs", "callback", "result", "error")

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
                 callback: Callback | None) -> None:
        self.fn = fn
        self.args = args
        self.kwargs = kwargs
        self.callback = callback
        self.result: Any = None
        self.error: BaseException | None = None


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
                 metrics: Any = None, worker: int = 0, replay_all: bool = True, indexer: str = "process") -> None:
        if not 0 <= worker < MAX_WORKERS:
            raise ValueError(f"worker number must be below {MAX_WORKERS}")
        store_module._worker_bits = worker
        self.path = path
        self.store = SQLiteStore(vault, worker)
        self.synchronous = synchronous
        self.max_batch = max_batch
        self.metrics = metrics
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._done_send: trio.MemorySendChannel[list[_Op]] | None = None
        self.failed: str | None = None
        self.commits = 0
        self.ops = 0
        # Operations submitted during one turn of the event loop go to the thread as one
        # list: one queue hand-off (and at most one thread wake-up) per turn, not per op.
        self._pending: list[_Op] = []
        self._kick: trio.Event | None = None
        # Statements run as one executemany when a batch holds a run of them.
        self._bulk = {SQLiteStore.insert_txn: self.store.insert_txn_many,
                      SQLiteStore.update_txn: self.store.update_txn_many}
        self._conn = SQLiteStore.connect(path, synchronous)  # opened here so a bad path fails at start
        if path != ":memory:":
            self._conn.execute("PRAGMA wal_autocheckpoint=0")  # the checkpoint thread does it (see _checkpoints)
        self._checkpoint_stop = threading.Event()
        # Forwarded transactions go to the write-ahead log (txlog.py) from the event loop and
        # reach SQLite through the indexer (indexer.py) every INDEX_EVERY seconds. With
        # synchronous=FULL (a power loss must not lose them either) they take the thread and
        # its fsync'd commit instead.
        self.write_ahead = path != ":memory:" and synchronous != "FULL"
        self.indexer_mode = indexer
        self.txlog: txlog.TxLog | None = None
        self._indexer: Any = None
        self._indexed: dict[Path, trio.Event] = {}  # segments someone waits for (see ``sync``)
        self._segments_waiting = 0  # handed to the indexer, not yet written (a gauge)
        if self.write_ahead:
            # A single process owns every segment beside the file; a worker only its own.
            replay_segments(self._conn, self.store, None if replay_all else worker)
            self.txlog = txlog.TxLog(path, worker, vault.seal_bytes)

    # -- lifecycle

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:  # noqa: ANN001
        """Run the worker thread and deliver its results, until cancelled (then drain and stop)."""
        self._token = trio.lowlevel.current_trio_token()
        send, receive = trio.open_memory_channel[list[_Op]](math.inf)
        self._done_send = send
        self._thread = threading.Thread(target=self._work, name="journal", daemon=True)
        self._thread.start()
        checkpointer = None
        # The indexer process checkpoints when there is one (the copy stays off this process's GIL).
        if self.path != ":memory:" and not (self.write_ahead and self.indexer_mode == "process"):
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
                task_status.started()
                async for batch in receive:
                    await self._deliver(batch)
        finally:
            with trio.CancelScope(shield=True):
                if self._indexer is not None:
                    await self._indexer.close(10)  # it finishes what it was sent, then exits
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
        now, from this process, so a clean stop leaves no segment behind."""
        assert self.txlog is not None
        try:
            self.txlog.rotate()
        except OSError as exc:
            self.note_failure(f"log: {exc.strerror or type(exc).__name__}")
        self.txlog.close()
        replay_segments(self._conn, self.store, self.store.worker, quiet=True)

    def _checkpoints(self) -> None:
        """Copy the WAL into the database from a connection of its own, every CHECKPOINT_EVERY seconds.

        The writer's automatic checkpoint is off: left on, a commit now and then does the copy
        itself and every request waiting for that commit waits tens of milliseconds longer. A
        PASSIVE checkpoint never blocks the writer."""
        conn = sqlite3.connect(self.path, isolation_level=None, timeout=10.0)
        try:
            while not self._checkpoint_stop.wait(CHECKPOINT_EVERY):
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
                except sqlite3.Error as exc:
                    log.warning("journal checkpoint failed (%s)", type(exc).__name__)
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        finally:
            conn.close()

    async def _pump(self) -> None:
        """Hand what the loop submitted to the thread, once per turn of the loop."""
        while True:
            assert self._kick is not None
            await self._kick.wait()
            self._kick = trio.Event()
            self._hand_over()

    async def _index(self) -> None:
        """Every INDEX_EVERY seconds the log segment is closed and goes to the indexer."""
        while True:
            await trio.sleep(INDEX_EVERY)
            await self._rotate()

    async def _rotate(self) -> Path | None:
        """Close the segment and hand the complete ones to the indexer; returns the newest."""
        assert self.txlog is not None
        try:
            paths = self.txlog.rotate()
        except OSError as exc:
            self.note_failure(f"log: {exc.strerror or type(exc).__name__}")
            paths = self.txlog.take_closed()  # the segment the failed write closed, if it did
        self._count_segments(len(paths))
        for path in paths:
            if self._indexer is not None:
                await self._indexer.send(path)
            else:  # thread mode
                self.submit(_apply_log_file, self.store, path,
                            callback=lambda counts, error, path=path: self._segment_done(
                                path, error is None, type(error).__name__ if error else "%d %d" % counts,
                                unlink=True))
        return paths[-1] if paths else None

    def _segment_done(self, path: Path, ok: bool, detail: str, unlink: bool = False) -> None:
        """The indexer is done with a segment: ``detail`` is "<inserted> <updated>", or why it failed."""
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
            if self.failed is not None and self.failed.startswith("indexer"):
                self.failed = None
        else:
            log.error("journal log %s could not be written to SQLite (%s); kept for the next start", path.name,
                      detail)
            self.note_failure(f"indexer: {detail}")
        event = self._indexed.pop(path, None)
        if event is not None:
            event.set()

    def _count_segments(self, change: int) -> None:
        self._segments_waiting += change
        if self.metrics is not None:
            self.metrics.journal_log_segments().set(self._segments_waiting)

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

    def note_failure(self, why: str) -> None:
        self.failed = why
        log.error("journal: %s", why)
        if self.metrics is not None:
            self.metrics.journal_errors().inc()

    def record_txn(self, row: dict[str, Any], original: dict[str, str], *, write: bool = True) -> None:
        """Journal a transaction about to be sent (write-ahead mode): in the log now, in SQLite
        within INDEX_EVERY. Raises OSError when the log can't be written: then the
        transaction must not be sent. With ``write=False`` the record waits for ``write_log``,
        which must succeed before the transaction is sent.

        ``original`` holds only REVERSAL_FIELDS. The log seals it with the rest of its write;
        the indexer derives the row's columns (masked PAN, keyed hash, identities) from it."""
        assert self.txlog is not None
        record = ("T", row["id"], time.time(), row["listener"], row["mti"], row["upstream"], row.get("link", 0),
                  row["upstream_stan"], self.store.worker, original)
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
            self.note_failure(f"log: {exc.strerror or type(exc).__name__}")
            raise
        if self.failed is not None and self.failed.startswith("log:"):
            self.failed = None

    def set_state(self, txn_id: int, state: str, response_code: str | None = None,
                  auth_code: str | None = None) -> None:
        """A transaction's new state (answered, timed out, reversed...): in write-ahead mode a
        log record, written with the next write (or within INDEX_EVERY), applied after the row."""
        if self.txlog is None:
            self.submit(self.store.update_txn, txn_id, state, response_code, auth_code)
            return
        self.txlog.append(("U", txn_id, state, time.time(), response_code, auth_code), write=False)

    def _kick_pump(self) -> None:
        if self._kick is not None:
            self._kick.set()
        else:
            self._hand_over()

    def _hand_over(self) -> None:
        if self._pending:
            pending, self._pending = self._pending, []
            self._queue.put(pending)

    async def _deliver(self, batch: list[_Op]) -> None:
        touched = set()
        for op in batch:
            if op.callback is not None:
                try:
                    w = op.callback(op.result, op.error)
                except Exception:  # noqa: BLE001 - one callback's bug must not stop the journal
                    log.exception("journal callback failed")
                    continue
                if w is not None:
                    touched.add(w)
        for w in touched:
            await w.flush()

    def close(self) -> None:
        if self.txlog is not None:
            self.txlog.close()
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
        with self._conn:
            return fn(self._conn, *args)

    # -- the thread

    def _work(self) -> None:
        conn = self._conn
        q = self._queue
        while True:
            first = q.get()
            if first is _STOP:
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
            started = time.perf_counter()
            try:
                conn.execute("BEGIN IMMEDIATE")
                self._apply(conn, batch)
                conn.execute("COMMIT")
                self.failed = None
            except sqlite3.Error as exc:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
                self.failed = type(exc).__name__
                log.error("journal commit failed (%s): %d operations refused", type(exc).__name__, len(batch))
                for op in batch:
                    op.error = exc
                if self.metrics is not None:
                    self.metrics.journal_errors().inc()
            self.commits += 1
            self.ops += len(batch)
            if self.metrics is not None:
                self.metrics.journal_commit_seconds().observe(time.perf_counter() - started)
                kinds: dict[str, int] = {}
                for op in batch:
                    name = op.fn.__name__
                    if name.startswith(("insert", "update", "cancel", "set")):
                        kinds[name] = kinds.get(name, 0) + 1
                for kind, n in kinds.items():
                    self.metrics.journal_writes(kind).inc(n)
            self._hand_back(batch)
            if stop:
                return

    def _apply(self, conn: sqlite3.Connection, batch: list[_Op]) -> None:
        """Run the batch in order; a run of the same bulk-able statement is one executemany."""
        bulk = self._bulk
        i, n = 0, len(batch)
        while i < n:
            op = batch[i]
            many = bulk.get(getattr(op.fn, "__func__", None)) if not op.kwargs else None
            j = i + 1
            if many is not None:
                while j < n and batch[j].fn == op.fn and not batch[j].kwargs:
                    j += 1
            if many is not None and j - i > 1:
                try:
                    many(conn, [o.args for o in batch[i:j]])
                except sqlite3.IntegrityError as exc:
                    for o in batch[i:j]:
                        o.error = exc
            else:
                try:
                    op.result = op.fn(conn, *op.args, **op.kwargs)
                except sqlite3.IntegrityError as exc:
                    op.error = exc
            i = j

    def _hand_back(self, batch: list[_Op]) -> None:
        if self._token is None or self._done_send is None:
            return
        send = self._done_send
        try:
            self._token.run_sync_soon(send.send_nowait, batch)
        except trio.RunFinishedError:
            pass


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

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Start a child when there is work, until ``close``. A child that exits after
        INDEXER_IDLE_EXIT quiet seconds is started again with the next segment; one that
        dies is restarted and gets again what it had not acknowledged."""
        task_status.started()
        while True:
            await self._work.wait()
            proc = await trio.lowlevel.open_process(
                [sys.executable, "-m", "iso_gateway.indexer"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            self._proc = proc
            try:
                j = self.journal
                hello = {"db": j.path, "synchronous": j.synchronous, "key": j.store.vault.export_key().hex(),
                         "worker": j.store.worker, "idle_exit": INDEXER_IDLE_EXIT}
                assert proc.stdin is not None and proc.stdout is not None
                await proc.stdin.send_all(json.dumps(hello).encode() + b"\n")
                for path in list(self.unacked):  # what it has to do (a dead child had not finished)
                    await proc.stdin.send_all(f"apply {path}\n".encode())
                self._ready.set()
                if j.failed == "indexer exited":  # it runs again
                    j.failed = None
                await self._read(proc)
            finally:
                self._ready = trio.Event()  # (``close`` still has ``_proc`` when this task is cancelled)
            code = await proc.wait()
            self._proc = None
            if self._closing:
                return
            if code == 0:  # quiet for a while: it exits, and starts again with the next segment
                if not self.unacked:
                    self._work = trio.Event()
                continue
            log.error("journal indexer exited with %s; %d segments wait; restarting it", code, len(self.unacked))
            self.journal.note_failure("indexer exited")
            await trio.sleep(INDEXER_RESTART_DELAY)

    async def _read(self, proc: trio.Process) -> None:
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
                if self.unacked and self.unacked[0] == path:
                    self.unacked.popleft()
                self.on_done(path, kind == "done", detail)

    async def send(self, path: Path) -> None:
        self.unacked.append(path)
        self._work.set()
        proc = self._proc
        if proc is None or not self._ready.is_set():
            return  # sent when the (re)started child comes up
        assert proc.stdin is not None
        try:
            await proc.stdin.send_all(f"apply {path}\n".encode())
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
