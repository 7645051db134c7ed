"""One writer per stream: frames queue up and go out together in one ``send_all``.

Two tasks never write one stream. A task with a frame appends it; if nobody is
sending, that same task sends everything queued (no hand-off to a writer task,
so a quiet connection pays no task switch per message); if somebody is sending,
it returns at once and the sender picks the frame up on its next round.

A send that blocks past ``send_timeout`` means the peer stopped reading: the
writer is marked broken and the owner closes the connection.
"""

from __future__ import annotations

from typing import Callable

import trio


class WriterBroken(Exception):
    """The stream can't be written any more (peer gone, or stalled past the send timeout)."""


class FrameWriter:
    __slots__ = ("_stream", "_queue", "_sending", "broken", "send_timeout", "bytes_sent", "on_broken")

    def __init__(self, stream: trio.abc.SendStream, send_timeout: float = 10.0) -> None:
        self._stream = stream
        self._queue: list[bytes] = []
        self._sending = False
        self.broken: str | None = None
        self.send_timeout = send_timeout
        self.bytes_sent = 0
        # Called once with the reason when the writer breaks, so the owner can
        # close the connection even while its reader is blocked elsewhere.
        self.on_broken: Callable[[str], None] | None = None

    def enqueue(self, frame: bytes) -> None:
        """Queue a frame; call ``flush`` (now or after queueing more) to send it."""
        if self.broken is None:
            self._queue.append(frame)

    async def send(self, frame: bytes) -> None:
        """Queue a frame and, unless another task is sending, send the queue."""
        if self.broken is None:
            self._queue.append(frame)
            if not self._sending:
                await self.flush()

    async def flush(self) -> None:
        """Send everything queued unless another task is already doing so.

        Raises nothing: a failure marks the writer broken (see ``broken``)."""
        if self._sending or self.broken is not None:
            return
        self._sending = True
        try:
            while self._queue:
                data = b"".join(self._queue) if len(self._queue) > 1 else self._queue[0]
                self._queue.clear()
                with trio.move_on_after(self.send_timeout) as scope:
                    await self._stream.send_all(data)
                if scope.cancelled_caught:
                    self._break("send_timeout")
                    return
                self.bytes_sent += len(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            self._break("send_failed")
        finally:
            self._sending = False

    def _break(self, reason: str) -> None:
        self.broken = reason
        self._queue.clear()
        if self.on_broken is not None:
            self.on_broken(reason)

    @property
    def idle(self) -> bool:
        return not self._sending and not self._queue
