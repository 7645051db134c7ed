"""One writer per stream: frames queue up and go out together in one ``send_all``.

Two tasks never write one stream. A task with a frame appends it; if nobody is
sending, that same task sends everything queued (no hand-off to a writer task,
so a quiet connection pays no task switch per message); if somebody is sending,
it returns at once and the sender picks the frame up on its next round.

A send that blocks past ``send_timeout`` means the peer stopped reading; a send
that fails or is cancelled part-way leaves the stream's framing unknown. Either
way the writer is broken for good and the owner closes the connection.

Used by the gateway (``enqueue``, then ``flush_soon`` once a round of work is done, never
raising: the owner reads ``broken``) and by the simulator and clients (``send``, which raises
once the writer is broken and waits when more than ``high_water`` bytes are queued).
``flush_soon`` is the gateway's one way to send: what the kernel takes at once goes now, and
the rest is finished by a task started in the writer's ``background`` nursery (a front
connection's: the poller's; a switch link's: its session's), so no caller ever waits on a
slow peer.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable

import trio

if TYPE_CHECKING:
    from .sockio import SocketIO, TlsSocketIO


class FrameWriter:
    __slots__ = ("_stream", "_queue", "_queued", "_sending", "_drained", "_waiting", "_notify", "broken", "send_timeout",
                 "high_water", "bytes_sent", "on_broken", "background")

    def __init__(self, stream: "trio.abc.SendStream | SocketIO | TlsSocketIO", send_timeout: float = math.inf,
                 high_water: int = 1 << 20) -> None:
        self._stream = stream
        self._queue: list[bytes] = []
        self._queued = 0
        self._sending = False
        self._drained = trio.Event()
        self._waiting = False  # a sender waits for the queue to drain (back-pressure)
        # Callbacks of queued frames that want to know whether they went out: (True) once
        # send_all returned with them, (False) if the writer broke first.
        self._notify: list[Callable[[bool], None]] = []
        self.broken: str | None = None
        # Seconds one send_all may block before the peer counts as stalled.
        self.send_timeout = send_timeout
        # Bytes queued behind a send under way before ``send`` waits (1 MiB:
        # thousands of messages, far more than any window in flight, yet a
        # bound on what a stalled peer costs).
        self.high_water = high_water
        self.bytes_sent = 0
        # Called once with the reason when the writer breaks, so the owner can
        # close the connection even while its reader is blocked elsewhere.
        self.on_broken: Callable[[str], None] | None = None
        # Where ``flush_soon`` finishes a send the kernel could not take at once (a front
        # connection's writer: its poller's nursery), so a slow reader holds up no other task.
        self.background: trio.Nursery | None = None

    @property
    def idle(self) -> bool:
        return not self._sending and not self._queue

    @property
    def queued(self) -> int:
        """Bytes waiting to be sent."""
        return self._queued

    def enqueue(self, frame: bytes, on_sent: Callable[[bool], None] | None = None) -> None:
        """Queue a frame; call ``flush`` (now or after queueing more) to send it.

        ``on_sent(True)`` runs once the frame is handed to the kernel, ``on_sent(False)``
        if the writer breaks before (or is already broken)."""
        if self.broken is None:
            self._queue.append(frame)
            self._queued += len(frame)
            if on_sent is not None:
                self._notify.append(on_sent)
        elif on_sent is not None:
            on_sent(False)

    async def flush(self) -> None:
        """Send everything queued unless another task is already doing so.

        Raises nothing: a failure marks the writer broken (see ``broken``)."""
        if self._sending or self.broken is not None:
            return
        self._sending = True
        notify: list[Callable[[bool], None]] = []
        try:
            while self._queue:
                queue = self._queue
                data = b"".join(queue) if len(queue) > 1 else queue[0]
                queue.clear()
                self._queued = 0
                notify, self._notify = self._notify, []
                # The common case costs one system call: a socket that takes the whole
                # batch at once needs no timeout scope (creating one costs more than the send).
                try_send = getattr(self._stream, "send_nowait", None)
                sent = try_send(data) if try_send is not None else 0
                if sent < len(data):
                    with trio.move_on_after(self.send_timeout) as scope:
                        await self._stream.send_all(memoryview(data)[sent:])
                    if scope.cancelled_caught:
                        self._break("send_timeout", notify)
                        return
                self._sent(len(data), notify)
                notify = []
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            self._break("send_failed", notify)
        except BaseException:
            self._break("cancelled", notify)  # part of a frame may be out: the framing is unknown
            raise
        finally:
            self._sending = False

    def flush_soon(self) -> None:
        """Send what is queued now if the socket takes it all, else leave the rest to a task in
        ``background`` (without one, the next ``flush`` sends it). Raises nothing."""
        queue = self._queue
        if self._sending or self.broken is not None or not queue:
            return
        data = b"".join(queue) if len(queue) > 1 else queue[0]
        try:
            sent = self._stream.send_nowait(data)  # type: ignore[union-attr]
        except AttributeError:  # a stream with no non-blocking send (tests' memory streams)
            sent = 0
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            self._break("send_failed")
            return
        if sent < len(data):
            self._queue = [data[sent:]] if sent else [data]
            self._queued = len(data) - sent
            if self.background is not None:
                self.background.start_soon(self.flush)
            return
        queue.clear()
        self._queued = 0
        notify, self._notify = self._notify, []
        self._sent(len(data), notify)

    def _sent(self, size: int, notify: list[Callable[[bool], None]]) -> None:
        self.bytes_sent += size
        for callback in notify:
            callback(True)
        if self._waiting:
            self._waiting = False
            self._drained.set()
            self._drained = trio.Event()

    async def send(self, frame: bytes) -> None:
        """Queue a frame and send (or leave it to the task sending); raise once broken.

        Waits only when more than ``high_water`` bytes are queued behind a
        send under way (back-pressure from a slow reader).
        """
        if self.broken is not None:
            raise trio.BrokenResourceError(f"an earlier write on this connection failed ({self.broken})")
        self.enqueue(frame)
        if self._sending:
            if self._queued > self.high_water:
                self._waiting = True
                await self._drained.wait()
        else:
            await self.flush()
        if self.broken is not None:
            raise trio.BrokenResourceError(f"write failed ({self.broken})")

    def _break(self, reason: str, unsent: list[Callable[[bool], None]] | None = None) -> None:
        """Broken for good: every frame not known to be sent is reported unsent."""
        self.broken = reason
        self._queue.clear()
        self._queued = 0
        self._drained.set()
        notify, self._notify = (unsent or []) + self._notify, []
        for callback in notify:
            callback(False)
        if self.on_broken is not None:
            self.on_broken(reason)
