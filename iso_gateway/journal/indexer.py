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
``apply <segment path>`` per segment, and ``key <hex>`` when the gateway's vault
changes (a data key rotated: segments after that line may be sealed under the
new key); end of input means stop. The child answers ``done <path> <inserted>
<updated>`` for each segment, in order. A segment it can't write (a full disk, a read-only file) is answered ``failed
<path> <reason> (<error>)``, and tried again, from a new connection, after
``retry_initial`` seconds, doubling up to ``retry_max``, until it is written:
the segments after it wait (one may hold the answers to its transactions).
A segment still on disk when the gateway stops is written at its next start
(``journal.replay_segments``).

``thread`` mode (``[journal] indexer = "thread"``) does the same in the
journal's worker thread, without a process. The parent's side is
``commit.LogIndexer``; this module imports no trio, so the child stays small.
"""

from __future__ import annotations

import json
import logging
import os
import select
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

from . import txlog

log = logging.getLogger("iso_gateway.indexer")

# The child's niceness (see main).
NICE = 10


def apply_segment(conn: sqlite3.Connection, store: Any, path: Path) -> tuple[int, int]:
    """Write one segment into SQLite and delete it: (rows inserted, rows updated).

    A segment that is gone was written by someone else (the indexer of a gateway killed a
    moment ago, racing the new gateway's replay): nothing to do."""
    try:
        records, torn = txlog.read(path, store.vault.open_bytes)
    except FileNotFoundError:
        return 0, 0
    if torn:
        log.warning("journal log %s ended with %d unreadable bytes (cut short by a crash)", path.name, torn)
    conn.execute("BEGIN IMMEDIATE")
    try:
        counts = store.apply_log(conn, records)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:  # SQLite ends it itself after some errors (a full disk)
            conn.execute("ROLLBACK")
        raise
    path.unlink(missing_ok=True)
    return counts


def main() -> int:
    """The child: apply each segment named on stdin, answer on stdout."""
    from .store import CHECKPOINT_EVERY, Backoff, SQLiteStore, failure_reason
    from ..security.pan import PanVault

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Behind the gateway for the CPU: its bursts (a segment every INDEX_EVERY) would otherwise
    # take a core from the event loop for milliseconds, and show in the p99 latency.
    try:
        os.nice(NICE)
    except OSError:
        pass
    lines = _Lines(sys.stdin.fileno())
    hello = json.loads(lines.next() or "{}")
    lines.idle = float(hello.get("idle_exit", 0)) or None
    store = SQLiteStore(PanVault(bytes.fromhex(hello.pop("key"))), hello["worker"])
    backoff = Backoff(float(hello.get("retry_initial", 0.1)), float(hello.get("retry_max", 2.0)))

    def connect() -> sqlite3.Connection:
        c = SQLiteStore.connect(hello["db"], hello["synchronous"])
        c.execute("PRAGMA wal_autocheckpoint=0")  # the gateway's checkpoint thread does it
        return c

    conn: sqlite3.Connection | None = None
    out = sys.stdout
    checkpoint_at = 0.0
    parent = os.getppid()
    while (line := lines.next()) is not None:
        if os.getppid() != parent:
            # The gateway died (SIGKILL): its next start replays the segments in order; writing
            # one now could apply it after newer ones and undo their state changes.
            break
        verb, _, arg = line.partition(" ")
        if verb == "key":  # the gateway's vault changed (a data key rotated): segments after this use it
            store.vault = PanVault(bytes.fromhex(arg))
            continue
        if verb != "apply":
            continue
        path = Path(arg)
        while True:
            try:
                if conn is None:
                    conn = connect()
                inserted, updated = apply_segment(conn, store, path)
                break
            except (sqlite3.Error, OSError, ValueError) as exc:
                out.write(f"failed {path} {failure_reason(exc)} ({type(exc).__name__})\n")
                out.flush()
                if conn is not None:  # a new connection for the retry (a file made writable again)
                    conn.close()
                    conn = None
                if lines.ended_within(backoff.next()) or os.getppid() != parent:
                    # The gateway stops (or died): the segment stays on disk for its next start.
                    return 0
        backoff.reset()
        out.write(f"done {path} {inserted} {updated}\n")
        out.flush()
        if time.monotonic() >= checkpoint_at:  # the WAL into the database, here rather than in the gateway
            checkpoint_at = time.monotonic() + CHECKPOINT_EVERY
            try:
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
            except sqlite3.Error as exc:
                log.warning("journal checkpoint failed (%s)", type(exc).__name__)
    if conn is not None:
        try:
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        except sqlite3.Error:
            pass
        conn.close()
    return 0


class _Lines:
    """Lines from a pipe; ``next`` gives None at end of input, or after ``idle`` seconds without
    a line (the indexer of a quiet gateway exits, and is started again with the next segment)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.idle: float | None = None
        self._buf = b""

    def next(self) -> str | None:
        while b"\n" not in self._buf:
            if self.idle is not None and not select.select([self.fd], [], [], self.idle)[0]:
                return None
            chunk = os.read(self.fd, 65536)
            if not chunk:
                return None
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode(errors="replace")

    def ended_within(self, seconds: float) -> bool:
        """Wait ``seconds``, keeping what arrives; True as soon as the input ends (the gateway
        stops while a segment is being retried: no need to keep it waiting)."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            if select.select([self.fd], [], [], left)[0]:
                chunk = os.read(self.fd, 65536)
                if not chunk:
                    return True
                self._buf += chunk
        return False


if __name__ == "__main__":
    os.umask(0o077)
    sys.exit(main())
