"""The message model: MTI rules, decode/encode through pyiso8583, responses, field 90.

A message is a plain ``dict[str, str]`` as pyiso8583 uses it: ``"t"`` holds the
MTI and ``"2"`` .. ``"128"`` the field values as text (binary fields as upper
case hex). Bitmaps are derived, never stored in the dict.

Errors raised here name the field and the reason, never a value, so a PAN can't
leave through an exception. Nothing here touches a socket or imports trio.
"""

from __future__ import annotations

from dataclasses import dataclass

import iso8583
from iso8583.decoder import DecodeError as _PyDecodeError
from iso8583.encoder import EncodeError as _PyEncodeError

from .dialect import Dialect, check_field_type
from .errors import DecodeError, EncodeError, FieldTypeError

Message = dict[str, str]

# --------------------------------------------------------------------------- MTI

MTI_CLASSES = {
    "1": "authorization",
    "2": "financial",
    "3": "file action",
    "4": "reversal",
    "5": "reconciliation",
    "6": "administrative",
    "7": "fee collection",
    "8": "network management",
}
MTI_FUNCTIONS = {
    "0": "request",
    "1": "request response",
    "2": "advice",
    "3": "advice response",
    "4": "notification",
    "5": "notification acknowledgement",
}


# Every valid MTI (4,800 of them): a set lookup is both the strictest check (ASCII digits
# only, where str.isdigit() also takes '²') and the cheapest one on the hot path.
VALID_MTIS = frozenset(f"{v}{c}{f}{o}" for v in "0123456789" for c in MTI_CLASSES for f in MTI_FUNCTIONS
                       for o in "0123456789")


def is_valid_mti(mti: str) -> bool:
    return mti in VALID_MTIS


def response_mti(mti: str) -> str:
    """0100 -> 0110, 0420/0421 -> 0430: the function digit goes up by one, origin back to 0."""
    if not is_valid_mti(mti) or mti[2] not in "024":
        raise ValueError("not a request or advice MTI")
    return f"{mti[:2]}{int(mti[2]) + 1}0"


def request_mti(mti: str) -> str:
    """0110 -> 0100, 0430 -> 0420."""
    if not is_valid_mti(mti) or mti[2] not in "135":
        raise ValueError("not a response MTI")
    return f"{mti[:2]}{int(mti[2]) - 1}0"


def is_request(mti: str) -> bool:
    return len(mti) == 4 and mti[2] in "024"


def is_response(mti: str) -> bool:
    return len(mti) == 4 and mti[2] in "135"


def is_repeat(mti: str) -> bool:
    """Origin digit 1, 3 or 5: a repeat (0101, 0421)."""
    return len(mti) == 4 and mti[3] in "135"


def repeat_mti(mti: str) -> str:
    """0420 -> 0421, 0100 -> 0101; a repeat stays a repeat."""
    if len(mti) != 4 or mti[3] not in "012345":
        raise ValueError("not an MTI with a known origin")
    return mti if is_repeat(mti) else f"{mti[:3]}{int(mti[3]) + 1}"


def original_mti(mti: str) -> str:
    """0421 -> 0420: the MTI with the repeat flag cleared."""
    return f"{mti[:3]}{int(mti[3]) - 1}" if is_repeat(mti) else mti


_MATCH_CLASSES: dict[str, str] = {}


def match_class(mti: str) -> str:
    """The part of an MTI a response shares with its request (jPOS QMUX's mapping):
    version + class + function rounded down to the request, origin dropped.
    0100, 0101 and 0110 all give "010"; 0420, 0421 and 0430 give "042"."""
    cls = _MATCH_CLASSES.get(mti)
    if cls is None:
        f = mti[2]
        cls = mti[:2] + (str(int(f) - 1) if f in "13579" else f)
        if len(_MATCH_CLASSES) < 1000 and mti.isdigit():  # per-message hot path: remember the few real MTIs
            _MATCH_CLASSES[mti] = cls
    return cls


def mti_class(mti: str) -> str:
    return MTI_CLASSES.get(mti[1:2], "unknown")


def mti_function(mti: str) -> str:
    return MTI_FUNCTIONS.get(mti[2:3], "unknown")


# --------------------------------------------------------------------------- codec


def decode(dialect: Dialect, raw: bytes | bytearray, *, check_types: bool = True) -> Message:
    """Decode one message (no length header, no TPDU) into a field dict.

    Raises DecodeError naming the field, whatever went wrong inside pyiso8583 (a
    tertiary bitmap's field 129 is a KeyError there); FieldTypeError when a value
    decodes but breaks its ISO type (letters in an ``n`` field), unless
    ``check_types`` is off.

    Stricter than pyiso8583 alone, exactly as strict as the scanner (a property
    test holds the two to each other): a hex bitmap is 16 hex digits (pyiso8583's
    ``bytes.fromhex`` skips spaces), a text length prefix is digits only
    (``int()`` takes signs, spaces and underscores), the MTI is a valid one, and a
    field the dialect does not define is refused (pyiso8583 reads it as empty).
    """
    try:
        doc, enc = iso8583.decode(bytes(raw), dialect.spec)
    except _PyDecodeError as exc:
        raise DecodeError(exc.msg, exc.field, exc.pos) from None
    except Exception as exc:  # noqa: BLE001 - any other codec failure is the peer's garbage, typed
        raise DecodeError(f"does not decode under dialect {dialect.name} ({type(exc).__name__})") from None
    if doc.get("t") not in VALID_MTIS:
        raise DecodeError("not a valid MTI", "t", 0)
    hex_bitmap = dialect.bitmap_encoding == "hex"
    for key in ("p", "1"):
        parts = enc.get(key)
        # 16 hex digits (8 bytes): a bitmap with spaces, or extended by bit 65, is refused.
        if parts is not None and (len(parts["data"]) != (16 if hex_bitmap else 8)
                                  or (hex_bitmap and not _HEX_DIGITS.issuperset(doc[key]))):
            raise DecodeError("bitmap is not hexadecimal", key, None)
    defined = dialect.field_keys
    prefixed = dialect.text_prefix_keys
    for key, parts in enc.items():
        if key in defined:
            encoding = prefixed.get(key)
            if encoding is not None and not _is_digits(parts["len"], encoding):
                raise DecodeError("length prefix is not a number", key, None)
        elif key not in _NOT_FIELDS:
            raise DecodeError("field present but not defined in the dialect", key, None)
    doc.pop("h", None)
    doc.pop("p", None)
    doc.pop("1", None)
    if check_types:
        problem = first_type_problem(dialect, doc)
        if problem:
            raise FieldTypeError(problem[1], problem[0])
    return doc


_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")
_NOT_FIELDS = frozenset(("t", "p", "1", "h"))


def _is_digits(prefix: bytes, encoding: str) -> bool:
    if encoding == "ebcdic":
        text = prefix.decode("cp500")
        return text.isascii() and text.isdigit()
    return prefix.isdigit()  # bytes.isdigit: ASCII digits only


def encode(dialect: Dialect, msg: Message, *, check_types: bool = True) -> bytes:
    """Encode a field dict into one message's bytes (no length header).

    Raises EncodeError (or FieldTypeError) for anything that can't be encoded,
    whatever pyiso8583 raised; the text names the field, never a value."""
    if not is_valid_mti(msg.get("t", "")):
        raise EncodeError("not a valid MTI", "t")
    doc = {k: v for k, v in msg.items() if k not in ("p", "1", "h")}
    for key in doc:
        if key != "t" and (not key.isdigit() or int(key) not in dialect.fields):
            raise EncodeError(f"not defined in dialect {dialect.name}", key)
    for num in dialect.bcd_track_fields:
        value = doc.get(str(num))
        if isinstance(value, str) and "=" in value:
            doc[str(num)] = value.replace("=", "D")  # BCD track data writes the separator as the nibble D
    if check_types:
        problem = first_type_problem(dialect, doc)
        if problem:
            raise FieldTypeError(problem[1], problem[0])
    try:
        raw, _ = iso8583.encode(doc, dialect.spec)
    except _PyEncodeError as exc:
        raise EncodeError(exc.msg, exc.field) from None
    except Exception as exc:  # noqa: BLE001 - a value of the wrong kind, anything pyiso8583 did not expect
        raise EncodeError(f"fields do not encode under dialect {dialect.name} ({type(exc).__name__})") from None
    return bytes(raw)


def first_type_problem(dialect: Dialect, msg: Message) -> tuple[str, str] | None:
    """(field, reason) for the first field whose value breaks its ISO type."""
    for key in sorted((k for k in msg if k.isdigit()), key=int):
        fd = dialect.fields.get(int(key))
        if fd is None:
            return key, "not defined in the dialect"
        reason = check_field_type(fd, msg[key])
        if reason:
            return key, reason
    return None


# --------------------------------------------------------------------------- responses

# Fields a responder sets and a request never hands down to its response.
RESPONDER_FIELDS = frozenset({"38", "39", "44", "54", "55"})


def build_response(
    dialect: Dialect,
    request: Message,
    response_code: str,
    *,
    auth_code: str | None = None,
    extra: Message | None = None,
) -> Message:
    """A response to ``request``: response MTI, the dialect's echo fields, 39 and 38.

    38 (authorization id) is set only for an approval (39 = 00) when given.
    """
    resp: Message = {"t": response_mti(request["t"])}
    for num in dialect.echo:
        key = str(num)
        if key in request and key not in RESPONDER_FIELDS:
            resp[key] = request[key]
    resp["39"] = response_code
    if auth_code is not None and response_code == "00":
        resp["38"] = auth_code
    if extra:
        resp.update(extra)
    return resp


# --------------------------------------------------------------------------- field 90

F90_LENGTH = 42


@dataclass(frozen=True, slots=True)
class OriginalData:
    """Field 90, original data elements (v87 n42): what a reversal points back to."""

    mti: str
    stan: str
    transmission: str  # DE 7, MMDDhhmmss
    acquirer: str = ""  # DE 32
    forwarder: str = ""  # DE 33

    def encode(self) -> str:
        parts = (
            (self.mti, 4, "original MTI"),
            (self.stan, 6, "original STAN"),
            (self.transmission or "0", 10, "original transmission date and time"),
            (self.acquirer or "0", 11, "original acquirer id"),
            (self.forwarder or "0", 11, "original forwarder id"),
        )
        out = []
        for value, width, what in parts:
            if not value.isdigit() or len(value) > width:
                raise EncodeError(f"{what} is not numeric of at most {width} digits", "90")
            out.append(value.zfill(width))  # right-justified, zero-filled
        return "".join(out)

    @classmethod
    def parse(cls, value: str) -> "OriginalData":
        if len(value) != F90_LENGTH or not value.isdigit():
            raise DecodeError(f"original data elements must be {F90_LENGTH} digits", "90")
        return cls(
            mti=value[0:4],
            stan=value[4:10],
            transmission=value[10:20],
            acquirer=value[20:31].lstrip("0"),
            forwarder=value[31:42].lstrip("0"),
        )

    @classmethod
    def of(cls, original: Message) -> "OriginalData":
        """Field 90 for a reversal of ``original``."""
        return cls(
            mti=original_mti(original["t"]),
            stan=original.get("11", "0"),
            transmission=original.get("7", "0"),
            acquirer=original.get("32", ""),
            forwarder=original.get("33", ""),
        )
