"""A TCP connection for the hot path: stdlib socket calls, trio only for the waiting.

trio's ``SocketStream`` makes every successful ``send`` and ``recv`` a
scheduling point (a yield to the run loop, about 5-10 µs of Python each), and a
``receive_some`` on an empty socket first tries ``recv`` (EAGAIN) before it
waits. For a gateway relaying small messages one at a time on many connections
that is most of the cost. ``SocketIO`` keeps trio's semantics where they matter
(waiting is ``trio.lowlevel.wait_readable``/``wait_writable``, so timeouts and
cancellation work as everywhere else, and ``notify_closing`` before close) but:

- ``receive_some`` waits for readability first, then reads once: one wait per
  read, no failed ``recv``;
- ``send_all`` writes straight away and only waits when the kernel buffer is
  full: a successful send is just the system call.

Only public trio API is used. It must never be handed to two readers or two
writers (the FrameWriter owns the sending side).
"""

from __future__ import annotations

import socket

import trio


class SocketIO:
    """A connected non-blocking socket with ``receive_some``, ``send_all`` and ``aclose``."""

    __slots__ = ("sock", "_closed")

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._closed = False

    @classmethod
    def adopt(cls, stream: trio.SocketStream) -> "SocketIO":
        """Take over the socket of a trio stream (the stream must not be used afterwards)."""
        sock = socket.socket(fileno=stream.socket.detach())
        return cls(sock)

    async def receive_some(self, max_bytes: int = 65536) -> bytes:
        """Wait until readable, then read; b"" at end of stream."""
        sock = self.sock
        while True:
            await trio.lowlevel.wait_readable(sock)
            try:
                return sock.recv(max_bytes)
            except BlockingIOError:
                continue
            except OSError as exc:
                if self._closed:
                    raise trio.ClosedResourceError("the connection was closed") from None
                raise trio.BrokenResourceError(f"receive failed: {exc.strerror or type(exc).__name__}") from None

    def send_nowait(self, data: bytes | bytearray | memoryview) -> int:
        """Write what the kernel takes right now; returns the bytes written (0 when its buffer is full)."""
        try:
            return self.sock.send(data)
        except BlockingIOError:
            return 0
        except OSError as exc:
            if self._closed:
                raise trio.ClosedResourceError("the connection was closed") from None
            raise trio.BrokenResourceError(f"send failed: {exc.strerror or type(exc).__name__}") from None

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Write everything, waiting only while the kernel's send buffer is full."""
        sock = self.sock
        view = memoryview(data)
        try:
            while view:
                try:
                    sent = sock.send(view)
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(sock)
                    continue
                view = view[sent:]
        except OSError as exc:
            if self._closed:
                raise trio.ClosedResourceError("the connection was closed") from None
            raise trio.BrokenResourceError(f"send failed: {exc.strerror or type(exc).__name__}") from None
        finally:
            view.release()

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            trio.lowlevel.notify_closing(self.sock)
            self.sock.close()
        await trio.lowlevel.checkpoint()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            trio.lowlevel.notify_closing(self.sock)
            self.sock.close()
