"""The journal's write-ahead log: what "journaled before it is sent" costs on the hot path.

Forwarded transactions are appended to a log segment from the event loop, the
requests of a poller round in one ``os.write``, before their frames go to the
switch (the gateway's ``_send_held``). The write reaches
the kernel's page cache, so it survives a crash of the process (SIGKILL), as
a SQLite commit in WAL mode with ``synchronous=NORMAL`` does; it costs about a
few microseconds, where a round trip through the journal thread and a commit
cost tens. The rows are then written to SQLite in bulk, in the background, a few
times a second (``Journal``); once a segment's rows are committed there, the
segment is deleted. After a crash, the segments left behind are replayed
into SQLite at start, before in-doubt transactions are looked for.

A segment holds frames, each ``length (4 bytes LE) | CRC-32 (4 bytes LE) |
payload``, the payload the journal's AES-GCM seal (security/pan.py) of a
marshalled list: the records of one write (the requests of one poller round,
and the answers since the last write), each a tuple:

- ``("T", id, time, listener, mti, upstream, link, upstream STAN, worker,
  fields)``: a transaction sent upstream, with the fields a reversal needs
  (the PAN among them: hence the seal; never CVV2, track data or a PIN block);
- ``("U", id, state, time, response_code, auth_code)``: a later state.

One seal per write, not per transaction, keeps the cost on the event loop low.

A frame cut short by the crash (a short or corrupt tail) ends the replay of
its segment, which is reported. Segments are named
``<journal file>-txlog.w<worker>.<start time ms>-<pid>`` beside the journal,
mode 0600, one writer process each.
"""

from __future__ import annotations

import logging
import marshal
import os
import struct
import time
import zlib
from pathlib import Path
from typing import Any, Callable, Iterator

log = logging.getLogger("iso_gateway.txlog")

_HEAD = struct.Struct("<II")
_MARSHAL_VERSION = 4
# The system call that appends (a name of its own, so tests can make the disk "full").
_write = os.write
# A record longer than this is corruption (a row is a few hundred bytes).
MAX_RECORD = 1 << 20


def segment_glob(db_path: str, worker: int | None = None) -> str:
    name = Path(db_path).name
    return f"{name}-txlog.w{worker:02d}.*" if worker is not None else f"{name}-txlog.w*"


def segments(db_path: str, worker: int | None = None) -> list[Path]:
    """The segments left beside ``db_path`` (one worker's, or all), oldest first."""
    folder = Path(db_path).parent
    return sorted(folder.glob(segment_glob(db_path, worker)), key=lambda p: p.name.rsplit(".", 1)[-1])


def _plain(data: bytes) -> bytes:
    return data


def encode(records: list[tuple[Any, ...]], seal: Callable[[bytes], bytes] = _plain) -> bytes:
    """One frame: the records written by one ``write`` (a chunk of requests, answers since),
    marshalled, then sealed (the journal's AES-GCM: the records carry PANs)."""
    payload = seal(marshal.dumps(records, _MARSHAL_VERSION))
    return _HEAD.pack(len(payload), zlib.crc32(payload)) + payload


def read(path: Path, unseal: Callable[[bytes], bytes] = _plain) -> tuple[list[tuple[Any, ...]], int]:
    """The records of one segment, and how many bytes at its end could not be read (a torn
    tail, or a frame the key does not open)."""
    data = path.read_bytes()
    records: list[tuple[Any, ...]] = []
    pos, end = 0, len(data)
    while pos + _HEAD.size <= end:
        length, crc = _HEAD.unpack_from(data, pos)
        start = pos + _HEAD.size
        if length > MAX_RECORD or start + length > end:
            break
        payload = data[start:start + length]
        if zlib.crc32(payload) != crc:
            break
        try:
            frame = marshal.loads(unseal(payload))
        except Exception:  # noqa: BLE001 - a frame that does not open or unmarshal ends the segment
            break
        if not isinstance(frame, list) or not all(isinstance(r, tuple) and r and r[0] in ("T", "U") for r in frame):
            break
        records.extend(frame)
        pos = start + length
    return records, end - pos


class TxLog:
    """One process's append-only segments; used from the event loop thread only."""

    def __init__(self, db_path: str, worker: int, seal: Callable[[bytes], bytes] = _plain) -> None:
        self.seal = seal
        self.folder = Path(db_path).parent
        self.base = f"{Path(db_path).name}-txlog.w{worker:02d}"
        self._fd = -1
        self.path: Path | None = None
        self._buffer: list[tuple[Any, ...]] = []  # records not yet written (answers wait for the next write)
        self._closed: list[Path] = []  # segments closed early (a failed write), for the next rotate
        self._seq = 0
        self.bytes_written = 0
        # Failed writes so far: a transaction logged before a failure whose write was not
        # seen to succeed was dropped with it (see ``write``), whoever called the write.
        self.failures = 0

    def _open(self) -> None:
        self._seq += 1
        self.path = self.folder / f"{self.base}.{int(time.time() * 1000):013d}{self._seq:06d}-{os.getpid()}"
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)

    def _close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            assert self.path is not None
            self._closed.append(self.path)
            self.path = None

    def append(self, record: tuple[Any, ...], *, write: bool) -> None:
        """Add a record; with ``write`` everything buffered goes to the kernel now (raises OSError)."""
        self._buffer.append(record)
        if write:
            self.write()

    def write(self) -> None:
        """Everything buffered, as one frame, in one system call.

        If that fails (a full disk), the transactions of the frame are dropped (the caller
        refuses them) while the answers stay buffered for the next write, and the segment
        is closed: it may end in a torn frame, and nothing may follow one."""
        if not self._buffer:
            return
        try:
            if self._fd < 0:
                self._open()
            data = encode(self._buffer, self.seal)
            view = memoryview(data)
            while view:  # a regular file takes it all at once unless the disk is full
                n = _write(self._fd, view)
                view = view[n:]
        except OSError:
            self.failures += 1
            self._buffer = [r for r in self._buffer if r[0] == "U"]
            try:
                self._close()
            except OSError:
                pass
            raise
        self._buffer.clear()
        self.bytes_written += len(data)

    def probe(self) -> None:
        """Whether a log write would succeed now (after one failed): a small write to a file of
        its own beside the segments, then removed; raises OSError. Nothing else waits for it."""
        path = self.folder / f"{self.base}.probe-{os.getpid()}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            _write(fd, bytes(4096))  # a page: what the next frame needs at least
        finally:
            os.close(fd)
            path.unlink(missing_ok=True)

    def rotate(self) -> list[Path]:
        """Write what is buffered, close the segment and return the segments now complete
        (oldest first; none if nothing was written). The next record starts a new segment;
        the caller deletes the old ones once their rows are safe in SQLite."""
        self.write()
        self._close()
        return self.take_closed()

    def take_closed(self) -> list[Path]:
        """The segments closed so far and not yet handed out (oldest first)."""
        done, self._closed = self._closed, []
        return done

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def replay(paths: list[Path]) -> Iterator[tuple[Path, list[tuple[Any, ...]], int]]:
    """Each segment's records and torn-tail size, oldest segment first."""
    for path in paths:
        try:
            records, torn = read(path)
        except OSError as exc:
            log.error("journal log %s can't be read (%s); left in place", path.name, exc.strerror)
            continue
        yield path, records, torn
