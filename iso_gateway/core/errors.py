"""Typed errors for iso-gateway.

Every error here is safe to print: its ``str()`` names a field, a position or a
reason, never message bytes or a field value, so a card number can't leak
through a log line or a traceback. Errors caused by what a peer sent
(``PeerError``) are kept apart from errors in our own configuration
(``ConfigError``), so a peer's garbage never looks like our bug.
"""

from __future__ import annotations


class IsoGatewayError(Exception):
    """Base of every error the gateway raises on purpose."""


class ConfigError(IsoGatewayError):
    """A configuration, dialect or rule file is wrong.

    ``source`` is the file, ``where`` the key path (``fields.2.max``), and
    ``reason`` what is wrong with it.
    """

    def __init__(self, source: str, where: str, reason: str) -> None:
        self.source = source
        self.where = where
        self.reason = reason
        loc = f"{source}: {where}" if where else source
        super().__init__(f"{loc}: {reason}")


class PeerError(IsoGatewayError):
    """Something a peer sent is not acceptable. Never carries message bytes."""


class FrameError(PeerError):
    """The byte stream can't be cut into frames any more (framing is lost)."""


class FrameTooLarge(FrameError):
    def __init__(self, length: int, limit: int) -> None:
        self.length = length
        self.limit = limit
        super().__init__(f"frame of {length} bytes is over the limit of {limit}")


class BadLengthHeader(FrameError):
    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"bad length header: {reason}")


class BadFrameHeader(FrameError):
    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"bad frame header: {reason}")


class MessageError(PeerError):
    """A message could not be decoded, encoded or is not valid for its type.

    ``field`` is the ISO field number as text ("2", "t" for the MTI, "p" for the
    bitmap) or ``None`` when the problem is not tied to one field.
    """

    def __init__(self, reason: str, field: str | None = None, pos: int | None = None) -> None:
        self.reason = reason
        self.field = field
        self.pos = pos
        where = ""
        if field is not None:
            where = f"field {field_label(field)}"
            if pos is not None:
                where += f" at byte {pos}"
            where += ": "
        super().__init__(f"{where}{reason}")


class DecodeError(MessageError):
    """Bytes that do not decode under the dialect."""


class EncodeError(MessageError):
    """Field values that can't be encoded under the dialect."""


class FieldTypeError(MessageError):
    """A field value that the codec accepts but the field's ISO type forbids."""


def field_label(field: str) -> str:
    return {"t": "MTI", "p": "bitmap", "1": "secondary bitmap", "h": "header"}.get(field, field)


class DuplicateRecorded(IsoGatewayError):
    """The journal already holds a request with the same duplicate key (another node of a pair took
    it first: the shared store refused the second record). ``rc`` and ``auth_code`` are the first
    one's answer when it has one; ``rc`` None means the first is still in flight."""

    def __init__(self, rc: str | None, auth_code: str | None = None) -> None:
        super().__init__("a request with this duplicate key is already journaled")
        self.rc = rc
        self.auth_code = auth_code
