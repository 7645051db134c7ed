"""A front-end test client: what a PSP's payment page looks like to the gateway.

``FrontEndClient`` opens one TCP connection, frames and encodes requests, and
matches each response to the request that waits for it by the key jPOS QMUX
uses: the MTI's class (``match_class``: 0100, 0101 and 0110 all give "010"),
DE 41 (terminal) and DE 11 (STAN). Many ``request()`` calls may run at once on
one connection (pipelining); responses can come back in any order. It is the
base of the load generator, so it spends no task hand-off per message: there
is no background reader task. Whichever waiting ``request()`` finds nobody
reading becomes the reader until its own response is in, dispatches every
other response it reads to its waiter, and then hands the reading over to a
task that is still waiting (leader/follower). Writes go through one
``FrameWriter``, so two tasks never write the stream at once.

``sample_auth`` (and ``sample_reversal``, ``sample_network``) build valid
iso87ascii e-commerce messages for tests, demos and load.

With ``connect(..., tls=context)`` (``sim.tlsctx.client_context``) the connection is TLS, its
handshake done within the connect timeout (``TlsHandshakeFailed`` with the reason otherwise).

It must never put a clear PAN in an exception, a log line or a counter.
"""

from __future__ import annotations

import collections
import ssl
from datetime import datetime, timezone
from typing import cast
from zoneinfo import ZoneInfo

import trio

from ..core.dialect import Dialect
from ..specfiles import get_dialect
from ..core.errors import FrameError, MessageError
from ..core.framing import TPDU_ID, Frame, Framer, framer_from_config
from ..net.writer import FrameWriter
from ..core.message import (
    Message,
    OriginalData,
    build_response,
    decode,
    encode,
    is_request,
    is_response,
    match_class,
    response_mti,
)

__all__ = [
    "ACQUIRER_ID",
    "CASABLANCA",
    "ConnectionClosed",
    "DEFAULT_TPDU",
    "FrontEndClient",
    "MERCHANT_ID",
    "MERCHANT_NAME_LOCATION",
    "RequestTimeout",
    "match_key",
    "sample_auth",
    "sample_network",
    "sample_reversal",
]

# Bytes asked of the socket per read. 64 KiB holds hundreds of pipelined
# messages of a few hundred bytes; trio's own default for receive_some is the same.
RECEIVE_SIZE = 65536

# The TPDU a client sends when the link has one and none is given: ID 0x60,
# destination NII 0001, source NII 0000 (docs/domain.md §6).
DEFAULT_TPDU = bytes((TPDU_ID, 0x00, 0x01, 0x00, 0x00))

# Morocco's local time for DE 12/13: Africa/Casablanca, never a fixed +01:00,
# because Morocco moves to UTC+0 during Ramadan (docs/domain.md §5).
CASABLANCA = ZoneInfo("Africa/Casablanca")

# Test acquirer, merchant and shop for the sample messages.
ACQUIRER_ID = "504123"  # DE 32, n..11
MERCHANT_ID = "MERCHANT0000001"  # DE 42, ans15
# DE 43, ans40 in the ISO reference layout: 1-23 name, 24-36 city, 37-38 state, 39-40 country.
MERCHANT_NAME_LOCATION = "BOUTIQUE EXEMPLE SARL".ljust(23) + "CASABLANCA".ljust(13) + "  " + "MA"
assert len(MERCHANT_NAME_LOCATION) == 40


class ConnectionClosed(Exception):
    """The connection is gone (closed by the peer, reset, or closed here); no response will come."""


class RequestTimeout(TimeoutError):
    """No response (or no bytes) arrived before the deadline."""


# --------------------------------------------------------------------------- client


def match_key(msg: Message) -> tuple[str, str, str]:
    """(MTI class, DE 41, DE 11): how a response finds its request (jPOS QMUX's default key)."""
    return match_class(msg["t"]), msg.get("41", ""), msg.get("11", "")


class _Waiter:
    __slots__ = ("event", "response")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.response: Message | None = None


class FrontEndClient:
    """One front-end connection that sends requests and waits for matching responses.

    Counters (plain ints, read them any time): ``sent`` requests, ``responses``
    matched, ``unmatched`` responses nobody waits for (late ones included),
    ``undecodable`` frames, ``keepalives`` received, ``echoes_answered``
    (0800s from the peer answered with 0810 while reading), ``unsolicited``
    other requests from the peer (ignored).

    Don't mix ``receive_frame``/``receive_raw`` with ``request`` running in
    another task: both read the same stream.
    """

    def __init__(
        self,
        stream: trio.SocketStream,
        dialect: Dialect,
        framer: Framer,
        *,
        header: bytes = b"",
        answer_echoes: bool = True,
    ) -> None:
        self.stream = stream
        self.dialect = dialect
        self.framer = framer
        if framer.options.tpdu and not header:
            header = DEFAULT_TPDU
        self.header = header
        self.answer_echoes = answer_echoes
        self._writer = FrameWriter(stream)
        self._decoder = framer.decoder()
        self._pending: dict[tuple[str, str, str], _Waiter] = {}
        self._waiting: dict[_Waiter, None] = {}  # everyone blocked in _wait, in arrival order
        self._reader: _Waiter | None = None
        self._backlog: collections.deque[Frame] = collections.deque()
        self._failure: str | None = None
        self.sent = 0
        self.responses = 0
        self.unmatched = 0
        self.undecodable = 0
        self.keepalives = 0
        self.echoes_answered = 0
        self.unsolicited = 0

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        dialect: Dialect | str,
        framer: Framer | str,
        *,
        header: bytes = b"",
        answer_echoes: bool = True,
        connect_timeout: float = 5.0,
        tls: ssl.SSLContext | None = None,
        server_name: str | None = None,
    ) -> "FrontEndClient":
        """Open a connection. ``dialect`` and ``framer`` may be given by name.

        ``header`` is the TPDU or fixed header sent with every frame (a TPDU
        link gets ``DEFAULT_TPDU`` when none is given). Waits at most
        ``connect_timeout`` seconds (5 s: the usual TCP connect budget before
        failing over, docs/domain.md §3.6); raises RequestTimeout after that.
        """
        if isinstance(dialect, str):
            dialect = get_dialect(dialect)
        if isinstance(framer, str):
            framer = framer_from_config(framer)
        with trio.move_on_after(connect_timeout) as scope:
            plain = await trio.open_tcp_stream(host, port)
        if scope.cancelled_caught:
            raise RequestTimeout(f"connect to {host}:{port} took over {connect_timeout} s")
        stream = plain
        if tls is not None:
            from .tlsctx import handshake  # raises TlsHandshakeFailed

            # Used through the Stream methods only (receive_some, send_all, aclose): typed as the plain one.
            stream = cast(trio.SocketStream, await handshake(plain, tls, server_side=False,
                                                             server_hostname=server_name, timeout=connect_timeout))
        return cls(stream, dialect, framer, header=header, answer_echoes=answer_echoes)

    async def __aenter__(self) -> "FrontEndClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    @property
    def closed(self) -> bool:
        return self._failure is not None

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    # ----------------------------------------------------------------- sending

    def frame(self, msg: Message) -> bytes:
        """The bytes ``msg`` goes out as: encoded, header or TPDU, length header."""
        return self.framer.encode(encode(self.dialect, msg), self.header)

    async def send(self, msg: Message) -> None:
        """Send one message without waiting for anything back."""
        await self.send_raw(self.frame(msg))

    async def send_raw(self, data: bytes) -> None:
        """Send bytes as they are: garbage, half frames, keep-alives."""
        if self._failure is not None:
            raise ConnectionClosed(self._failure)
        try:
            await self._writer.send(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._fail("the connection broke while sending")
            raise ConnectionClosed(self._failure) from None

    async def request(self, msg: Message, timeout: float) -> Message:
        """Send ``msg`` and wait for its response; return the decoded response.

        The deadline covers the send and the wait. Raises RequestTimeout when
        nothing matched in ``timeout`` seconds (a response arriving later is
        counted in ``unmatched``), ConnectionClosed when the connection goes
        away first, ValueError when a request with the same key (MTI class,
        DE 41, DE 11) is already waiting on this connection.
        """
        key = match_key(msg)
        if key in self._pending:
            raise ValueError("a request with the same MTI class, terminal (41) and STAN (11) is already in flight")
        data = self.frame(msg)
        waiter = _Waiter()
        self._pending[key] = waiter
        try:
            with trio.move_on_after(timeout):
                await self.send_raw(data)
                self.sent += 1
                await self._wait(waiter)
            if waiter.response is not None:
                return waiter.response
            if self._failure is not None:
                raise ConnectionClosed(self._failure)
            raise RequestTimeout(f"no {response_mti(msg['t'])} for STAN {key[2]} within {timeout} s")
        finally:
            if self._pending.get(key) is waiter:
                del self._pending[key]

    # ----------------------------------------------------------------- reading

    async def _wait(self, waiter: _Waiter) -> None:
        """Until ``waiter`` has its response, reading the stream while nobody else does."""
        while waiter.response is None:
            if self._failure is not None:
                raise ConnectionClosed(self._failure)
            if self._reader is None:
                self._reader = waiter
                try:
                    while waiter.response is None and self._failure is None:
                        await self._receive_once()
                finally:
                    self._reader = None
                    self._hand_over()
            else:
                waiter.event = trio.Event()
                self._waiting[waiter] = None
                try:
                    await waiter.event.wait()
                finally:
                    self._waiting.pop(waiter, None)

    def _hand_over(self) -> None:
        """Wake one task that still waits, so that it takes over the reading."""
        for w in self._waiting:
            if w.response is None:
                w.event.set()
                return

    async def _receive_once(self) -> None:
        """Read once and dispatch every frame completed (or left over by receive_frame)."""
        while self._backlog:
            await self._dispatch(self._backlog.popleft())
        try:
            data = await self.stream.receive_some(RECEIVE_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._fail("the connection was reset")
            return
        if not data:
            self._fail("the peer closed the connection")
            return
        try:
            frames = self._decoder.feed(data)
        except FrameError as exc:
            self._fail(f"framing lost: {exc}")
            return
        for frame in frames:
            await self._dispatch(frame)

    async def _dispatch(self, frame: Frame) -> None:
        if frame.keepalive:
            self.keepalives += 1
            return
        try:
            msg = decode(self.dialect, frame.message)
        except MessageError:
            self.undecodable += 1
            return
        mti = msg["t"]
        if is_response(mti):
            waiter = self._pending.get(match_key(msg))
            if waiter is None or waiter.response is not None:
                self.unmatched += 1
                return
            waiter.response = msg
            self.responses += 1
            waiter.event.set()
        elif mti[1] == "8" and is_request(mti) and self.answer_echoes:
            reply = build_response(self.dialect, msg, "00", extra={k: msg[k] for k in ("7", "11", "70") if k in msg})
            header = self.framer.reply_header(frame.header) if frame.header else self.header
            try:
                await self._writer.send(self.framer.encode(encode(self.dialect, reply), header))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._fail("the connection broke while sending")
                return
            self.echoes_answered += 1
        else:
            self.unsolicited += 1

    async def pump(self, seconds: float) -> None:
        """Read and dispatch for ``seconds`` while no request is waiting (answers the peer's echoes)."""
        idle = _Waiter()
        with trio.move_on_after(seconds):
            try:
                await self._wait(idle)
            except ConnectionClosed:
                pass

    async def receive_frame(self, timeout: float) -> Frame:
        """The next frame as it came, not dispatched; RequestTimeout or ConnectionClosed."""
        self._check_no_reader()
        if not self._backlog:
            with trio.move_on_after(timeout):
                while not self._backlog:
                    data = await self.stream.receive_some(RECEIVE_SIZE)
                    if not data:
                        self._fail("the peer closed the connection")
                        raise ConnectionClosed(self._failure)
                    self._backlog.extend(self._decoder.feed(data))
            if not self._backlog:
                raise RequestTimeout(f"no frame within {timeout} s")
        return self._backlog.popleft()

    async def receive_message(self, timeout: float) -> Message:
        """The next frame, decoded (DecodeError if it does not decode)."""
        while True:
            frame = await self.receive_frame(timeout)
            if not frame.keepalive:
                return decode(self.dialect, frame.message)
            self.keepalives += 1

    async def receive_raw(self, max_bytes: int = RECEIVE_SIZE, timeout: float = 1.0) -> bytes:
        """Bytes as they come off the socket, bypassing the frame decoder; b"" when the peer closed."""
        self._check_no_reader()
        with trio.move_on_after(timeout):
            try:
                return await self.stream.receive_some(max_bytes)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return b""
        raise RequestTimeout(f"no bytes within {timeout} s")

    async def wait_closed(self, timeout: float) -> None:
        """Until the peer closes the connection (bytes read meanwhile are dropped); RequestTimeout."""
        self._check_no_reader()
        with trio.move_on_after(timeout):
            while True:
                try:
                    data = await self.stream.receive_some(RECEIVE_SIZE)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    data = b""
                if not data:
                    self._fail("the peer closed the connection")
                    return
        raise RequestTimeout(f"the connection is still open after {timeout} s")

    def _check_no_reader(self) -> None:
        if self._reader is not None:
            raise RuntimeError("a request is reading this connection; raw reads would steal its frames")

    # ----------------------------------------------------------------- closing

    def _fail(self, reason: str) -> None:
        if self._failure is None:
            self._failure = reason
        for w in list(self._waiting):
            w.event.set()
        for w in self._pending.values():
            w.event.set()

    async def aclose(self) -> None:
        """Close the connection; requests still waiting get ConnectionClosed."""
        self._fail("the connection was closed by this client")
        await trio.aclose_forcefully(self.stream)


# --------------------------------------------------------------------------- sample messages


def _utc(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(timezone.utc)
    if now.tzinfo is None:
        return now.replace(tzinfo=timezone.utc)
    return now.astimezone(timezone.utc)


def _stan(stan: int) -> str:
    if not 1 <= stan <= 999_999:
        raise ValueError("a STAN is 1..999999")
    return f"{stan:06d}"


def sample_auth(
    stan: int,
    amount_minor: int,
    *,
    pan: str = "4761739001010119",
    terminal: str = "TERM0001",
    mti: str = "0100",
    now: datetime | None = None,
) -> Message:
    """A valid iso87ascii e-commerce 0100 (or 0200 with ``mti``) for MAD ``amount_minor``.

    DE 7 is ``now`` in UTC (MMDDhhmmss); DE 12/13 are ``now`` in Africa/Casablanca;
    DE 14 is an expiry three years ahead; DE 37 is the common YDDDhh + STAN RRN.
    ``now`` defaults to the current time; a naive datetime is taken as UTC.
    """
    if not 0 <= amount_minor < 10**12:
        raise ValueError("amount_minor must fit DE 4 (n12)")
    if len(terminal) > 8:
        raise ValueError("a terminal id (DE 41) is at most 8 characters")
    utc = _utc(now)
    local = utc.astimezone(CASABLANCA)
    stan_text = _stan(stan)
    return {
        "t": mti,
        "2": pan,
        "3": "000000",  # purchase, default accounts
        "4": f"{amount_minor:012d}",
        "7": utc.strftime("%m%d%H%M%S"),
        "11": stan_text,
        "12": local.strftime("%H%M%S"),
        "13": local.strftime("%m%d"),
        "14": f"{(local.year + 3) % 100:02d}{local.month:02d}",
        "18": "5999",  # miscellaneous and specialty retail
        "22": "812",  # e-commerce PAN entry, no PIN capability (docs/domain.md §1.3)
        "25": "59",  # e-commerce request by public network
        "32": ACQUIRER_ID,
        "37": f"{utc.year % 10}{utc.timetuple().tm_yday:03d}{utc.hour:02d}{stan_text}",
        "41": terminal.ljust(8),
        "42": MERCHANT_ID,
        "43": MERCHANT_NAME_LOCATION,
        "49": "504",  # MAD
    }


def sample_reversal(original: Message, *, mti: str = "0420", now: datetime | None = None) -> Message:
    """A full reversal (0400 or 0420; 0421 for a repeat) of ``original``.

    Keeps the original STAN, RRN, amounts and card acceptor (the jPOS
    convention, docs/domain.md §1.2), carries the original's MTI, STAN, DE 7 and
    DE 32 in field 90, and a fresh DE 7.
    """
    utc = _utc(now)
    reversal: Message = {"t": mti}
    for key in ("2", "3", "4", "11", "12", "13", "32", "37", "41", "42", "49"):
        if key in original:
            reversal[key] = original[key]
    reversal["7"] = utc.strftime("%m%d%H%M%S")
    reversal["90"] = OriginalData.of(original).encode()
    return reversal


def sample_network(stan: int, code: str = "301", *, now: datetime | None = None) -> Message:
    """An 0800: sign-on ``001``, sign-off ``002``, echo ``301`` (docs/domain.md §1.1)."""
    return {"t": "0800", "7": _utc(now).strftime("%m%d%H%M%S"), "11": _stan(stan), "70": code}

