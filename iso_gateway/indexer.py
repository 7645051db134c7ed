"""Writing the write-ahead log into SQLite, in a process of its own.

The event loop appends each forwarded transaction to a log segment (txlog.py)
and, every ``INDEX_EVERY`` seconds, closes the segment and hands its name to
the indexer: a child process that reads the segment, derives the columns
(masked PAN, keyed hash, identities: it opens the sealed fields with the same
key), writes the rows in one SQLite transaction, deletes the segment and says
so. In the gateway's own process the same work would hold the GIL for several
microseconds a row, and the event loop would wait for it; in a child it runs
on the other core.

Protocol (lines of text): the parent sends one JSON line
``{"db": ..., "synchronous": ..., "key": <hex>, "worker": n}``, then
``apply <segment path>`` per segment; end of input means stop. The child
answers ``done <path> <inserted> <updated>`` or ``failed <path> <reason>`` for
each segment, in order. A segment that failed stays on disk and is written at
the gateway's next start (``journal.replay_segments``).

``thread`` mode (``[journal] indexer = "thread"``) does the same in the
journal's worker thread, without a process.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import subprocess
import sys
import time
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import trio

from . import txlog

if TYPE_CHECKING:
    from .journal import Journal

log = logging.getLogger("iso_gateway.indexer")

# A child that dies is started again after this many seconds.
RESTART_DELAY = 1.0
# The child's niceness (see main).
NICE = 10


def apply_segment(conn: sqlite3.Connection, store: Any, path: Path) -> tuple[int, int]:
    """Write one segment into SQLite and delete it: (rows inserted, rows updated)."""
    records, torn = txlog.read(path)
    if torn:
        log.warning("journal log %s ended with %d unreadable bytes (cut short by a crash)", path.name, torn)
    conn.execute("BEGIN IMMEDIATE")
    try:
        counts = store.apply_log(conn, records)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    path.unlink()
    return counts


class LogIndexer:
    """The parent's side: segments go to the child in order; ``done`` callbacks follow."""

    def __init__(self, journal: "Journal", on_done: Callable[[Path, bool, str], None]) -> None:
        self.journal = journal
        self.on_done = on_done  # (segment, ok, detail)
        self.unacked: deque[Path] = deque()
        self._proc: trio.Process | None = None
        self._ready = trio.Event()
        self._closing = False

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Keep a child running until ``close``; restart it when it dies (sending again what it had)."""
        started = False
        while True:
            proc = await trio.lowlevel.open_process(
                [sys.executable, "-m", "iso_gateway.indexer"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            self._proc = proc
            try:
                j = self.journal
                hello = {"db": j.path, "synchronous": j.synchronous, "key": j.store.vault.export_key().hex(),
                         "worker": j.store.worker}
                assert proc.stdin is not None and proc.stdout is not None
                await proc.stdin.send_all(json.dumps(hello).encode() + b"\n")
                for path in list(self.unacked):  # what a dead child had not finished
                    await proc.stdin.send_all(f"apply {path}\n".encode())
                self._ready.set()
                if not started:
                    started = True
                    task_status.started()
                await self._read(proc)
            finally:
                self._ready = trio.Event()
                self._proc = None
            code = await proc.wait()
            if self._closing:
                return
            log.error("journal indexer exited with %s; %d segments wait; restarting it", code, len(self.unacked))
            self.journal.note_failure("indexer exited")
            await trio.sleep(RESTART_DELAY)

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
        what it had not done stays on disk for the next start)."""
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


def main() -> int:
    """The child: apply each segment named on stdin, answer on stdout."""
    from .journal import CHECKPOINT_EVERY, SQLiteStore
    from .security.pan import PanVault

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Behind the gateway for the CPU: its bursts (a segment every INDEX_EVERY) would otherwise
    # take a core from the event loop for milliseconds, and show in the p99 latency.
    try:
        os.nice(NICE)
    except OSError:
        pass
    hello = json.loads(sys.stdin.readline())
    conn = SQLiteStore.connect(hello["db"], hello["synchronous"])
    conn.execute("PRAGMA wal_autocheckpoint=0")  # the gateway's checkpoint thread does it
    store = SQLiteStore(PanVault(bytes.fromhex(hello.pop("key"))), hello["worker"])
    out = sys.stdout
    checkpoint_at = 0.0
    for line in sys.stdin:
        verb, _, arg = line.rstrip("\n").partition(" ")
        if verb != "apply":
            continue
        path = Path(arg)
        try:
            inserted, updated = apply_segment(conn, store, path)
        except (sqlite3.Error, OSError, ValueError) as exc:
            out.write(f"failed {path} {type(exc).__name__}\n")
        else:
            out.write(f"done {path} {inserted} {updated}\n")
        out.flush()
        if time.monotonic() >= checkpoint_at:  # the WAL into the database, here rather than in the gateway
            checkpoint_at = time.monotonic() + CHECKPOINT_EVERY
            try:
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
            except sqlite3.Error as exc:
                log.warning("journal checkpoint failed (%s)", type(exc).__name__)
    conn.close()
    return 0


if __name__ == "__main__":
    os.umask(0o077)
    sys.exit(main())
