"""One task reads every socket of the hot path: front connections and switch links.

The sockets are registered once (level-triggered) in an epoll set of the poller's own,
and the task waits, through trio (``trio.lowlevel.wait_readable`` on that set), for it
to have something. A wake-up then reads every socket with data, and before going back
to trio the poller looks again (without waiting) for a few rounds: a front end's next
request or a switch's answer that arrived meanwhile costs no trip through trio's
scheduler, and a connection costs no task and no registration per read. At the end of
a round the gateway executes what the flow decided for it (the requests forwarded in it
are logged with one journal write) and every writer touched sends its batch
(``FrameWriter.flush_soon``: a send the kernel can't take at once finishes in a task of
its own, so a slow reader holds up no one).

Deadlines (a front connection's idle or partial-frame timeout) move by an assignment;
a sweeper task sleeping until the earliest heap entry finds the expired ones, and an
entry whose deadline moved later is pushed back lazily.

What the poller reads is anything with ``fd``, ``on_readable(now, touched)`` (read once,
handle what was read, put the writers to flush into ``touched``) and ``fail()`` (an
unexpected exception in ``on_readable``: end that socket, never the others). Deadlines
need ``id``, ``closed``, ``deadline``, ``heap_at`` and ``expired()`` as well.
"""

from __future__ import annotations

import heapq
import logging
import math
import select
from typing import TYPE_CHECKING, Callable, Protocol

import trio

if TYPE_CHECKING:
    from .writer import FrameWriter

log = logging.getLogger("iso_gateway.poller")

# Rounds read back to back, without waiting, before the poller lets trio run the other tasks.
EAGER_ROUNDS = 4


class Readable(Protocol):
    fd: int

    def on_readable(self, now: float, touched: "set[FrameWriter]") -> None: ...

    def fail(self) -> None: ...


class Timed(Readable, Protocol):
    id: int
    closed: bool
    deadline: float
    heap_at: float | None

    def expired(self) -> None: ...


class Poller:
    """Reads registered sockets from one task; see the module's docstring."""

    def __init__(self, begin_round: Callable[[], None],
                 end_round: "Callable[[set[FrameWriter]], set[FrameWriter]]") -> None:
        # Called before a round's reads, and with the writers it touched before they flush
        # (returning them with any it added: the gateway logs and queues held requests there).
        self._begin_round = begin_round
        self._end_round = end_round
        self._epoll = select.epoll()
        self._reading: dict[int, Readable] = {}
        self._heap: list[tuple[float, int, Timed]] = []
        self._sleep = trio.CancelScope()
        self.nursery: trio.Nursery | None = None

    # ------------------------------------------------------------------ registration

    def add(self, obj: Readable) -> None:
        self._epoll.register(obj.fd, select.EPOLLIN)
        self._reading[obj.fd] = obj

    def remove(self, obj: Readable) -> None:
        """Stop reading it (idempotent); call before its socket closes."""
        if self._reading.get(obj.fd) is obj:
            del self._reading[obj.fd]
            try:
                self._epoll.unregister(obj.fd)
            except (OSError, ValueError):
                pass

    # ------------------------------------------------------------------ deadlines

    def set_deadline(self, obj: Timed, at: float) -> None:
        obj.deadline = at
        if obj.heap_at is None or at < obj.heap_at:
            self._push(obj, at)

    def _push(self, obj: Timed, at: float) -> None:
        obj.heap_at = at
        heapq.heappush(self._heap, (at, obj.id, obj))
        if at < self._sleep.deadline:
            self._sleep.deadline = at

    # ------------------------------------------------------------------ tasks

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled."""
        try:
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                nursery.start_soon(self._sweep)
                task_status.started()
                await self._read()
        finally:
            self._epoll.close()

    async def _read(self) -> None:
        epoll = self._epoll
        poll = epoll.poll
        reading = self._reading
        begin_round = self._begin_round
        end_round = self._end_round
        current_time = trio.current_time
        while True:
            await trio.lowlevel.wait_readable(epoll)
            for _ in range(EAGER_ROUNDS):
                events = poll(0, 1024)
                if not events:
                    break
                now = current_time()
                begin_round()
                touched: set[FrameWriter] = set()
                for fd, _ in events:
                    obj = reading.get(fd)
                    if obj is None:
                        continue  # closed or paused by something read earlier in this round
                    try:
                        obj.on_readable(now, touched)
                    except Exception:  # one socket's bug must not reach the others
                        log.exception("internal error reading a connection; it is closed")
                        obj.fail()
                for writer in end_round(touched):
                    writer.flush_soon()

    async def _sweep(self) -> None:
        """Call ``expired`` on whatever's deadline passed."""
        heap = self._heap
        while True:
            self._sleep = trio.CancelScope(deadline=heap[0][0] if heap else math.inf)
            with self._sleep:
                await trio.sleep_forever()
            now = trio.current_time()
            while heap and heap[0][0] <= now:
                at, _, obj = heapq.heappop(heap)
                if obj.closed or obj.heap_at != at:
                    continue  # stale entry
                obj.heap_at = None
                if obj.deadline <= now:
                    obj.expired()
                elif obj.deadline < math.inf:
                    self._push(obj, obj.deadline)
