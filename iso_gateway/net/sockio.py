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

``TlsSocketIO`` is the same for a TLS connection: a ``TlsSession`` (tls.py) between the
writer's plaintext and the socket.
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from .tls import TlsSession


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


class TlsSocketIO:
    """A connected non-blocking socket with a ``TlsSession`` (net/tls.py) between the writer and it.

    What a ``FrameWriter`` writes through unchanged: ``send_nowait`` and ``send_all`` take
    plaintext, as ``SocketIO``'s take bytes for the wire. The session turns all the plaintext
    offered into ciphertext at once; what the kernel does not take is carried, and sent before
    anything newer is encrypted. The writer must come back for it, so while ciphertext is carried
    the last byte offered is reported unsent although it was encrypted (``_ahead``): the writer
    offers the unsent rest again first, and that byte is then skipped.

    Reading stays the poller's (it feeds ``session.receive_data``); ``write_pending`` then writes
    what the session wants written by itself (a handshake flight, an alert, a close_notify reply),
    without waiting: what the kernel does not take is carried and goes before the next frame (a
    handshake flight on a new connection fits in any socket buffer; one that did not would be left
    to the handshake deadline).
    """

    __slots__ = ("sock", "session", "_carry", "_ahead", "_closed", "partial_sends")

    def __init__(self, sock: socket.socket, session: "TlsSession") -> None:
        sock.setblocking(False)
        self.sock = sock
        self.session = session
        self._carry = b""
        self._ahead = 0
        self._closed = False
        self.partial_sends = 0  # sends the kernel did not take whole (ciphertext carried)

    def _push(self) -> bool:
        """Write carried ciphertext; True when none is left."""
        carry = self._carry
        while carry:
            try:
                n = self.sock.send(carry)
            except BlockingIOError:
                self._carry = carry
                return False
            except OSError as exc:
                self._carry = b""
                if self._closed:
                    raise trio.ClosedResourceError("the connection was closed") from None
                raise trio.BrokenResourceError(f"send failed: {exc.strerror or type(exc).__name__}") from None
            carry = carry[n:]
        self._carry = b""
        return True

    def send_nowait(self, data: bytes | bytearray | memoryview) -> int:
        """Encrypt and write what the kernel takes now; returns the plaintext bytes to count as sent."""
        if self._carry and not self._push():
            return 0
        skip, self._ahead = min(self._ahead, len(data)), 0
        if len(data) > skip:
            self._carry = self.session.send(bytes(data[skip:]) if skip or not isinstance(data, bytes) else data)
            if not self._push():
                self._ahead = 1
                self.partial_sends += 1
                return len(data) - 1
        return len(data)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        try:
            done = self.send_nowait(view)
            while done < len(view) or self._carry:
                await trio.lowlevel.wait_writable(self.sock)
                done += self.send_nowait(view[done:])
        finally:
            view.release()

    def write_pending(self) -> None:
        """Write what the session wants written by itself, without waiting (see the class)."""
        out = self.session.data_to_send()
        if out:
            self._carry += out
            try:
                self._push()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the next read or send finds the connection gone

    def close(self) -> None:
        """close_notify (or a pending alert), as far as the kernel takes it at once, then the socket."""
        if self._closed:
            return
        tail = self.session.close()
        if not self._carry:  # after carried ciphertext it would break the stream: not sent then
            try:
                self.sock.send(tail)
            except OSError:
                pass
        self._closed = True
        trio.lowlevel.notify_closing(self.sock)
        self.sock.close()

    async def aclose(self) -> None:
        self.close()
        await trio.lowlevel.checkpoint()
