"""The parent's pipe to the journal's indexer child: one writer at a time, lines in queue order.

Found under CPU contention: the periodic rotation and a front-end reversal's ``sync`` both hand
segments to the child, and two writes at once on a full pipe raised trio's BusyResourceError,
which ended the journal and the daemon. Here the pipe is a stream that refuses a second writer
as trio's does, and blocks until the test lets the child read.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import trio

from iso_gateway.journal.commit import LogIndexer


class SlowPipe:
    """A child's stdin that takes one write at a time and blocks each until ``drain``."""

    def __init__(self) -> None:
        self.lines: list[bytes] = []
        self.writing = False
        self.go = trio.Event()

    async def send_all(self, data: bytes) -> None:
        if self.writing:
            raise trio.BusyResourceError("another task is using this stream for send")
        self.writing = True
        try:
            await self.go.wait()
            self.lines.append(bytes(data))
        finally:
            self.writing = False


async def test_segments_sent_at_once_by_two_tasks_reach_the_child_one_at_a_time_in_queue_order():
    indexer = LogIndexer(SimpleNamespace(), lambda path, ok, detail: None)  # type: ignore[arg-type]
    pipe = SlowPipe()
    indexer._proc = SimpleNamespace(stdin=pipe)  # type: ignore[assignment]
    indexer._ready.set()
    paths = [Path(f"/tmp/seg-{i}") for i in range(5)]
    async with trio.open_nursery() as nursery:
        for path in paths:
            nursery.start_soon(indexer.send, path)
            await trio.testing.wait_all_tasks_blocked()
        pipe.go.set()
    assert pipe.lines == [f"apply {p}\n".encode() for p in paths]
    assert list(indexer.unacked) == paths
