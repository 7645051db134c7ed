"""Framing: cutting a TCP byte stream into ISO 8583 messages, and back.

Each framing style is one small class that reads and writes one kind of length
header (``FRAMINGS`` names them); ``FrameDecoder`` takes bytes in and gives
``Frame`` values out, h11 style; ``Framer`` bundles a style with its options
for the daemon and also encodes. See ``docs/domain.md`` §6.

It must never touch a socket or import trio, and never put message bytes into
an error: a frame can carry a PAN, and errors end up in logs.

Wire layout of one frame::

    length header | header or TPDU (optional) | ISO message
    ^ style's size  ^ FramingOptions             ^ Frame.message

The length counts the header or TPDU as well as the message (jPOS BaseChannel
sends ``message + header`` length); with ``length_includes_header`` it also
counts the length header itself. A frame whose length is zero is a keep-alive.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, ClassVar, NamedTuple

from .errors import BadFrameHeader, BadLengthHeader, ConfigError, FrameError, FrameTooLarge

__all__ = [
    "DEFAULT_MAX_FRAME",
    "FRAMINGS",
    "TPDU_ID",
    "TPDU_SIZE",
    "Ascii4",
    "Bcd2",
    "Binary2",
    "Binary2Reserved",
    "Binary4",
    "Frame",
    "FrameDecoder",
    "Framer",
    "FramingOptions",
    "FramingSpec",
    "LengthHeader",
    "encode_frame",
    "framer_from_config",
    "get_framing",
    "keepalive_frame",
    "tpdu_reply",
]

# Largest body (header/TPDU + message) accepted by default, in bytes.
#   Visa VMLH links:                        2048   (docs/domain.md §6)
#   ascii4 / bcd2 framings can express:     9999
#   binary2 framings can express:          65535
#   jPOS BaseChannel maxPacketLength:     100000
# A 128-field message rarely passes 2 KB; 8 KiB leaves room for private
# fields (48, 55, 126) while keeping what a peer can make us buffer small.
DEFAULT_MAX_FRAME = 8 * 1024

# TPDU: ID 0x60, 2-byte destination NII, 2-byte source NII (docs/domain.md §6).
TPDU_ID = 0x60
TPDU_SIZE = 5


# --------------------------------------------------------------------------- length headers


class LengthHeader:
    """One way of writing a frame's length in front of it.

    A style only reads and writes the length (as jPOS channels only override
    ``getMessageLength``/``sendMessageLength``); the decoder does the rest.
    Instances are stateless.
    """

    #: The name used in config files and in ``FRAMINGS``.
    name: ClassVar[str]
    #: Bytes the length header takes on the wire, reserved bytes included.
    size: ClassVar[int]
    #: Largest length value the header can express.
    max_length: ClassVar[int]

    def read(self, buf: bytes, pos: int) -> int:
        """The length written at ``buf[pos:pos + size]``; raise BadLengthHeader if unreadable."""
        raise NotImplementedError

    def write(self, length: int) -> bytes:
        """The header bytes for ``length`` (0 <= length <= max_length)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Binary2(LengthHeader):
    """2-byte big-endian binary length (jPOS NACChannel, moov Binary2Bytes)."""

    name = "binary2"
    size = 2
    max_length = 0xFFFF

    def read(self, buf: bytes, pos: int) -> int:
        return (buf[pos] << 8) | buf[pos + 1]

    def write(self, length: int) -> bytes:
        return length.to_bytes(2, "big")


class Binary2Reserved(LengthHeader):
    """2-byte big-endian length, then 2 reserved zero bytes (Visa VMLH, jPOS CSChannel)."""

    name = "binary2r"
    size = 4
    max_length = 0xFFFF

    def read(self, buf: bytes, pos: int) -> int:
        if buf[pos + 2] or buf[pos + 3]:
            raise BadLengthHeader("the 2 reserved bytes after the length are not zero")
        return (buf[pos] << 8) | buf[pos + 1]

    def write(self, length: int) -> bytes:
        return length.to_bytes(2, "big") + b"\x00\x00"


# Value of one BCD byte (two decimal digits), or -1 when a nibble is over 9.
_BCD_VALUE = tuple((hi * 10 + lo) if hi < 10 and lo < 10 else -1 for hi in range(16) for lo in range(16))


class Bcd2(LengthHeader):
    """2-byte BCD length, 4 digits, at most 9999 (jPOS NCCChannel)."""

    name = "bcd2"
    size = 2
    max_length = 9999

    def read(self, buf: bytes, pos: int) -> int:
        hi = _BCD_VALUE[buf[pos]]
        lo = _BCD_VALUE[buf[pos + 1]]
        if hi < 0 or lo < 0:
            raise BadLengthHeader("length is not 2 BCD bytes (a nibble is over 9)")
        return hi * 100 + lo

    def write(self, length: int) -> bytes:
        return bytes.fromhex("%04d" % length)


class Ascii4(LengthHeader):
    """4 ASCII decimal digits, at most 9999 (jPOS ASCIIChannel, moov ASCII4Bytes)."""

    name = "ascii4"
    size = 4
    max_length = 9999

    def read(self, buf: bytes, pos: int) -> int:
        digits = buf[pos : pos + 4]
        # bytes.isdigit() is ASCII-only; it also keeps int() from accepting
        # the signs, spaces and underscores it would otherwise allow.
        if not digits.isdigit():
            raise BadLengthHeader("length is not 4 ASCII digits")
        return int(digits)

    def write(self, length: int) -> bytes:
        return b"%04d" % length


class Binary4(LengthHeader):
    """4-byte big-endian binary length (jPOS RawChannel)."""

    name = "binary4"
    size = 4
    max_length = 0xFFFFFFFF

    def read(self, buf: bytes, pos: int) -> int:
        return int.from_bytes(buf[pos : pos + 4], "big")

    def write(self, length: int) -> bytes:
        return length.to_bytes(4, "big")


#: A framing style as callers may give it: its name, its class or an instance.
FramingSpec = str | LengthHeader | type[LengthHeader]

#: Every framing style by its config name.
FRAMINGS: dict[str, type[LengthHeader]] = {
    cls.name: cls for cls in (Binary2, Binary2Reserved, Bcd2, Ascii4, Binary4)
}


def get_framing(framing: FramingSpec) -> LengthHeader:
    """A framing style from its name, its class or itself; ValueError for an unknown name."""
    if isinstance(framing, LengthHeader):
        return framing
    if isinstance(framing, type) and issubclass(framing, LengthHeader):
        return framing()
    cls = FRAMINGS.get(framing) if isinstance(framing, str) else None
    if cls is None:
        raise ValueError(f"unknown framing {framing!r}; known framings: {', '.join(FRAMINGS)}")
    return cls()


# --------------------------------------------------------------------------- options


class _OptionError(ValueError):
    def __init__(self, field: str, reason: str) -> None:
        self.field = field
        self.reason = reason
        super().__init__(f"{field}: {reason}")


@dataclass(frozen=True, slots=True)
class FramingOptions:
    """How a framing style is used on one link."""

    # Whether the length counts the length header itself (and, as always, the
    # header or TPDU): "0050" instead of "0046" for a 46-byte message behind
    # ascii4. For binary2r the 2 reserved bytes count too. The default is False.
    length_includes_header: bool = False

    # Largest body (header or TPDU plus message) accepted or sent, in bytes.
    # A longer length is refused as soon as the length header is read, before
    # any of the body is buffered. The style's own maximum (9999 for ascii4
    # and bcd2) applies as well. The default is 8192 bytes.
    max_frame: int = DEFAULT_MAX_FRAME

    # A fixed-size header between the length and the ISO message (a network
    # header). Only its size is fixed: decoding hands over whatever the peer
    # sent in Frame.header, and encoding sends these bytes unless it is given
    # others. The default is None (no header).
    header: bytes | None = None

    # Whether a 5-byte TPDU (0x60, destination NII, source NII) sits between
    # the length and the ISO message. Decoding refuses a TPDU that does not
    # start with 0x60. Exclusive with `header`. The default is False.
    tpdu: bool = False

    def __post_init__(self) -> None:
        if type(self.length_includes_header) is not bool:
            raise _OptionError("length_includes_header", "must be true or false")
        if type(self.max_frame) is not int or self.max_frame < 1:
            raise _OptionError("max_frame", "must be a whole number of bytes, at least 1")
        if type(self.tpdu) is not bool:
            raise _OptionError("tpdu", "must be true or false")
        if self.header is not None:
            if not isinstance(self.header, (bytes, bytearray)) or not self.header:
                raise _OptionError("header", "must be non-empty bytes, or None for no header")
            if self.tpdu:
                raise _OptionError("header", "a fixed header and a TPDU can't both be used")
            object.__setattr__(self, "header", bytes(self.header))

    @property
    def header_size(self) -> int:
        """Bytes between the length header and the message (TPDU or fixed header)."""
        if self.tpdu:
            return TPDU_SIZE
        return len(self.header) if self.header is not None else 0


_DEFAULT_OPTIONS = FramingOptions()


# --------------------------------------------------------------------------- frames


class Frame(NamedTuple):
    """One frame taken off the wire."""

    #: The ISO message: no length header, no header or TPDU. b"" for a keep-alive.
    message: bytes
    #: The fixed header or the 5 TPDU bytes as received; b"" if the link has none.
    header: bytes = b""
    #: True for a zero-length frame (jPOS CSChannel echoes these back).
    keepalive: bool = False


KEEPALIVE = Frame(b"", b"", True)


def tpdu_reply(tpdu: bytes) -> bytes:
    """The TPDU for a reply: same ID, destination and source NII swapped (docs/domain.md §6)."""
    if len(tpdu) != TPDU_SIZE or tpdu[0] != TPDU_ID:
        raise ValueError("a TPDU is 5 bytes starting with 0x60")
    return bytes((tpdu[0], tpdu[3], tpdu[4], tpdu[1], tpdu[2]))


# --------------------------------------------------------------------------- decoder


class FrameDecoder:
    """Cuts a byte stream into frames: ``feed`` bytes in, get ``Frame`` values out.

    Any chunking works, one byte at a time or many frames at once. After a
    FrameError the stream can't be cut any more: the decoder stays failed and
    every later ``feed`` raises that error again; close the connection.

    Buffer cost: bytes are only buffered while a frame is incomplete, and the
    buffer is rebuilt at most once per ``feed`` that completes a frame, from
    bytes of that same ``feed``; so the work stays O(bytes read) however a
    peer splits its writes, and the buffer never holds more than one length
    header plus ``max_frame``.
    """

    __slots__ = (
        "framing", "options", "_read", "_size", "_adjust", "_header_size", "_tpdu", "_limit", "_buf", "_need", "_error"
    )

    def __init__(self, framing: FramingSpec, options: FramingOptions | None = None) -> None:
        self.framing = get_framing(framing)
        self.options = options = options if options is not None else _DEFAULT_OPTIONS
        self._read = self.framing.read
        self._size = self.framing.size
        self._adjust = self.framing.size if options.length_includes_header else 0
        self._header_size = options.header_size
        self._tpdu = options.tpdu
        self._limit = options.max_frame
        self._buf = bytearray()  # the start of one incomplete frame, or empty
        self._need = 0  # len(_buf) at which feeding can make progress
        self._error: FrameError | None = None

    @property
    def pending(self) -> int:
        """Bytes received and not yet returned in a frame."""
        return len(self._buf)

    @property
    def partial(self) -> bool:
        """True while a frame has started but is not complete (for a partial-frame deadline)."""
        return bool(self._buf)

    @property
    def error(self) -> FrameError | None:
        """The error that stopped this decoder, or None while it works."""
        return self._error

    def feed(self, data: bytes) -> list[Frame]:
        """Add received bytes; return every frame they complete, in order (often none).

        Raises a FrameError when the stream is no longer framed. Frames that
        were complete earlier in the same chunk are then not returned: the
        connection is closing, so their answers could not be delivered, and a
        request is better never started than answered into a closed socket.
        """
        if self._error is not None:
            raise self._error.with_traceback(None)
        buf = self._buf
        if buf:
            buf += data
            if len(buf) < self._need:
                return []
            data = bytes(buf)
            buf.clear()
        elif type(data) is not bytes:
            data = bytes(data)
        try:
            frames, pos, need = self._cut(data)
        except FrameError as exc:
            self._error = exc
            buf.clear()
            raise
        if pos < len(data):
            buf += memoryview(data)[pos:]
            self._need = need
        return frames

    def _cut(self, data: bytes) -> tuple[list[Frame], int, int]:
        """Frames in ``data``, where the unused tail starts, and how long it must grow."""
        read = self._read
        size = self._size
        adjust = self._adjust
        header_size = self._header_size
        limit = self._limit
        end = len(data)
        pos = 0
        frames: list[Frame] = []
        while True:
            avail = end - pos
            if avail < size:
                return frames, pos, size
            length = read(data, pos)
            body = length - adjust
            if body <= 0:
                # Length 0 is a keep-alive even where the length counts itself.
                if body < 0 and length != 0:
                    raise BadLengthHeader(f"length {length} is less than the {size} bytes of length header it counts")
                frames.append(KEEPALIVE)
                pos += size
                continue
            if body > limit:
                raise FrameTooLarge(body, limit)
            start = pos + size
            if header_size:
                if body < header_size:
                    raise BadLengthHeader(f"length {length} leaves no room for the {header_size}-byte header")
                if self._tpdu:
                    if avail == size:
                        return frames, pos, size + 1
                    if data[start] != TPDU_ID:
                        raise BadFrameHeader("TPDU does not start with 0x60")
                stop = start + body
                if stop > end:
                    return frames, pos, size + body
                mark = start + header_size
                frames.append(Frame(data[mark:stop], data[start:mark], False))
            else:
                stop = start + body
                if stop > end:
                    return frames, pos, size + body
                frames.append(Frame(data[start:stop], b"", False))
            pos = stop


# --------------------------------------------------------------------------- encoder


class Framer:
    """A framing style with its options: makes decoders, encodes frames."""

    __slots__ = ("framing", "options", "_write", "_adjust", "_limit", "_tpdu", "_fixed", "_keepalive")

    def __init__(self, framing: FramingSpec, options: FramingOptions | None = None) -> None:
        self.framing = get_framing(framing)
        self.options = options = options if options is not None else _DEFAULT_OPTIONS
        self._write = self.framing.write
        self._adjust = self.framing.size if options.length_includes_header else 0
        self._limit = min(options.max_frame, self.framing.max_length - self._adjust)
        self._tpdu = options.tpdu
        self._fixed = options.header
        self._keepalive = self._write(self._adjust)

    @property
    def name(self) -> str:
        return self.framing.name

    def __repr__(self) -> str:
        return f"Framer({self.framing.name!r}, {self.options!r})"

    def decoder(self) -> FrameDecoder:
        """A fresh decoder for one connection."""
        return FrameDecoder(self.framing, self.options)

    def encode(self, message: bytes, header: bytes = b"") -> bytes:
        """One frame for ``message``.

        ``header`` is the TPDU (required on a TPDU link; see ``reply_header``)
        or the fixed header (the configured one when empty). ValueError for a
        header that doesn't fit the options; FrameTooLarge for a body over
        ``max_frame`` or over what the length header can express.
        """
        if not message:
            raise ValueError("an empty message can't be framed; a zero-length frame is a keep-alive")
        if self._tpdu:
            if len(header) != TPDU_SIZE or header[0] != TPDU_ID:
                raise ValueError("this framing needs the 5 TPDU bytes starting with 0x60")
        elif self._fixed is not None:
            if not header:
                header = self._fixed
            elif len(header) != len(self._fixed):
                raise ValueError(f"this framing's header is {len(self._fixed)} bytes, not {len(header)}")
        elif header:
            raise ValueError("this framing has no header or TPDU")
        body = len(header) + len(message)
        if body > self._limit:
            raise FrameTooLarge(body, self._limit)
        return self._write(body + self._adjust) + header + message

    def keepalive(self) -> bytes:
        """A zero-length frame (its length counts only itself with length_includes_header)."""
        return self._keepalive

    def reply_header(self, header: bytes) -> bytes:
        """The header for the answer to a frame that came with ``header``.

        A TPDU gets its NIIs swapped; a fixed header is returned as is.
        """
        if self._tpdu:
            return tpdu_reply(header)
        return header


def encode_frame(
    framing: FramingSpec,
    options: FramingOptions | None,
    message: bytes,
    header: bytes = b"",
) -> bytes:
    """One frame for ``message``; see ``Framer.encode``. The daemon keeps a Framer instead."""
    return Framer(framing, options).encode(message, header)


def keepalive_frame(framing: FramingSpec, options: FramingOptions | None = None) -> bytes:
    """A zero-length (keep-alive) frame; see ``Framer.keepalive``."""
    return Framer(framing, options).keepalive()


_OPTION_NAMES = tuple(f.name for f in fields(FramingOptions))


def framer_from_config(name: str, *, source: str = "<config>", where: str = "framing", **options: Any) -> Framer:
    """A Framer from config values; ConfigError(source, where, reason) if they are wrong.

    ``source`` is the config file and ``where`` the key path of the framing
    name; an option's errors are reported at ``where.<option>``. ``header``
    may be given as hex text ("6000000000"), since TOML has no bytes.
    """
    cls = FRAMINGS.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ConfigError(source, where, f"unknown framing {name!r}; known framings: {', '.join(FRAMINGS)}")
    for key in options:
        if key not in _OPTION_NAMES:
            known = ", ".join(_OPTION_NAMES)
            raise ConfigError(source, f"{where}.{key}", f"unknown framing option; known options: {known}")
    header = options.get("header")
    if isinstance(header, str):
        try:
            options["header"] = bytes.fromhex(header)
        except ValueError:
            raise ConfigError(source, f"{where}.header", "not hex digits") from None
    try:
        opts = FramingOptions(**options)
    except _OptionError as exc:
        raise ConfigError(source, f"{where}.{exc.field}", exc.reason) from None
    framer = Framer(cls(), opts)
    if opts.header_size >= framer._limit:
        reason = f"leaves no room for a message after the {opts.header_size}-byte header"
        raise ConfigError(source, f"{where}.max_frame", reason)
    return framer
