"""Read a few fields out of raw ISO 8583 bytes, and splice fixed fields, without a full decode.

The hot path of the gateway never decodes a whole message: it walks the bitmap
and the length prefixes with a plan compiled from the dialect (the same TOML
file pyiso8583 is driven by), reads the handful of fields it needs (MTI, 11,
37, 38, 39, 41, ...) and replaces the STAN in place. Property tests hold the
scanner to pyiso8583's full decode and encode for every shipped dialect: a full
scan (``full=True``, what the gateway does to every front-end request) refuses
exactly the bytes ``message.decode`` refuses, garbage included, so nothing the
gateway forwards can be a message the switch's decoder chokes on.

Errors name the field, never its value. Nothing here touches a socket.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from .dialect import Dialect, FieldDef, prefix_width
from .errors import DecodeError, EncodeError
from .message import VALID_MTIS

# How a field's length prefix is read (kind, width in bytes).
_P_NONE, _P_ASCII, _P_BCD, _P_BIN, _P_EBCDIC = range(5)
# How a length becomes a byte count.
_U_BYTES, _U_NIBBLES = range(2)
# How a value becomes text.
_V_ASCII, _V_BCD, _V_RAW, _V_EBCDIC = range(4)
_VARIABLE, _UNDEFINED = -1, -2
# Fields 1 (the secondary bitmap) and 64 in a scan's bitmap (field n at 1 << (128 - n)).
_FIELD_1, _FIELD_64 = 1 << 127, 1 << 64
_HEX_UPPER = b"0123456789ABCDEF"
# What a step of the walk does with a field's value: nothing, read it (wanted), or only
# check it (a full scan refuses what pyiso8583 would: a non-ASCII byte in a text field,
# an odd BCD value whose pad nibble is not the dialect's).
_SKIP, _READ, _CHECK_TEXT, _CHECK_PAD = range(4)
# A hex bitmap is exactly these characters (int(x, 16) also takes '+', '-', '_', spaces, '0x').
_HEX_DIGITS = b"0123456789abcdefABCDEF"


@dataclass(frozen=True, slots=True)
class _Plan:
    number: int
    prefix_kind: int
    prefix_width: int
    fixed_bytes: int  # byte length of a fixed field; 0 for a variable one
    unit: int
    value_kind: int
    max_units: int
    length: int  # fixed length in the field's own units
    bcd_pad: str  # where an odd BCD value's pad nibble goes: left, right, right_f


def _compile(fd: FieldDef) -> _Plan:
    width = prefix_width(fd)
    if fd.prefix == 0:
        pkind = _P_NONE
    else:
        pkind = {"ascii": _P_ASCII, "bcd": _P_BCD, "binary": _P_BIN, "ebcdic": _P_EBCDIC}[fd.length_encoding]
    if fd.encoding == "bcd":
        unit, vkind = _U_NIBBLES, _V_BCD
    elif fd.encoding == "raw":
        unit, vkind = _U_BYTES, _V_RAW
    elif fd.encoding == "hex":
        # Two ASCII characters a byte; pyiso8583 (dialect._pyiso_field) counts a variable
        # one's length prefix in characters, so the scanner does too.
        unit, vkind = _U_BYTES, _V_ASCII
    elif fd.encoding == "ebcdic":
        unit, vkind = _U_BYTES, _V_EBCDIC
    else:
        unit, vkind = _U_BYTES, _V_ASCII
    length = fd.length * 2 if fd.encoding == "hex" else fd.length
    fixed = 0
    if fd.prefix == 0:
        fixed = _byte_len(length, unit)
    return _Plan(fd.number, pkind, width, fixed, unit, vkind, length, length, fd.bcd_pad)


def _byte_len(units: int, unit: int) -> int:
    if unit == _U_NIBBLES:
        return (units + 1) >> 1
    return units


@dataclass(slots=True)
class Scan:
    """What a scan found: the MTI, the set of present fields (as a bitmap int,
    bit for field n is ``1 << (128 - n)``), the wanted values, and their byte spans."""

    mti: str
    bitmap: int
    values: dict[int, str]
    spans: dict[int, tuple[int, int]]
    end: int  # offset just past the last field walked

    def has(self, field: int) -> bool:
        return bool(self.bitmap >> (128 - field) & 1)

    def present(self) -> list[int]:
        return [n for n in range(2, 129) if self.bitmap >> (128 - n) & 1]


class Scanner:
    """A scan plan for one dialect and one set of wanted fields."""

    def __init__(self, dialect: Dialect, wanted: Iterable[int] = (11, 37, 38, 39, 41, 42)) -> None:
        self.dialect = dialect
        self.wanted = frozenset(wanted)
        self._last_wanted = max(self.wanted, default=0)
        self._plans: list[_Plan | None] = [None] * 129
        # Per field: the byte size of a fixed field, _VARIABLE, or _UNDEFINED; and
        # whether a wanted value is plain ASCII (the common case, decoded inline).
        self._fixed: list[int] = [_UNDEFINED] * 129
        self._ascii: list[bool] = [False] * 129
        # Per bitmap walked: the steps, and whether every field in them is ASCII text with an
        # ASCII length prefix or none (then an all-ASCII message is walked as a str, below).
        self._steps: dict[tuple[int, bool], tuple[tuple[tuple[int, int, int], ...], bool]] = {}
        self._text: list[bool] = [False] * 129
        # Per field: what a full scan checks in a value it does not read (_SKIP when nothing).
        self._check: list[int] = [_SKIP] * 129
        for num, fd in dialect.fields.items():
            plan = self._plans[num] = _compile(fd)
            self._fixed[num] = plan.fixed_bytes if plan.prefix_kind == _P_NONE else _VARIABLE
            self._ascii[num] = plan.value_kind == _V_ASCII
            self._text[num] = (plan.value_kind == _V_ASCII and plan.unit == _U_BYTES
                               and plan.prefix_kind in (_P_NONE, _P_ASCII))
            if plan.value_kind == _V_ASCII:
                self._check[num] = _CHECK_TEXT
            elif plan.value_kind == _V_BCD and (plan.prefix_kind != _P_NONE or plan.length & 1):
                self._check[num] = _CHECK_PAD
        self._mti_kind = dialect.mti_encoding
        self._mti_len = 2 if dialect.mti_encoding == "bcd" else 4
        self._bitmap_hex = dialect.bitmap_encoding == "hex"
        self._bitmap_len = 16 if self._bitmap_hex else 8
        self._bitmaps: dict[bytes, int] = {}  # a bitmap's wire bytes -> its value, for those seen already

    # ------------------------------------------------------------------ scan

    def scan(self, raw: bytes | bytearray, *, full: bool = False, found: dict[int, str] | None = None) -> Scan:
        """Read the MTI and the wanted fields.

        With ``full`` the walk goes through every field and checks that the
        message ends exactly where the last field does, and that every value is
        what ``message.decode`` would take (text bytes in a text field, the
        dialect's pad nibble in an odd BCD value): a full scan refuses exactly
        what a decode refuses (not the ISO type of each value, which the rules
        check). With ``found``,
        the wanted values read before a DecodeError are left in that dict, so a
        caller can still echo the STAN and terminal of a broken request.
        """
        mti_len = self._mti_len
        n = len(raw)
        if n < mti_len:
            raise DecodeError("message shorter than its MTI", "t", 0)
        if self._mti_kind == "bcd":
            mti = raw[:2].hex()
        else:
            try:
                mti = raw[:4].decode("cp500" if self._mti_kind == "ebcdic" else "ascii")
            except UnicodeDecodeError:
                raise DecodeError("MTI is not text", "t", 0) from None
        if mti not in VALID_MTIS:
            raise DecodeError("not a valid MTI", "t", 0)
        # A bitmap seen before is one dict lookup (real traffic has a few dozen); a new one is
        # checked (_read_bitmap) and remembered.
        pos = mti_len
        bitmaps = self._bitmaps
        end = pos + self._bitmap_len
        bitmap = bitmaps.get(raw[pos:end]) if type(raw) is bytes else None
        if bitmap is None:
            bitmap = self._read_bitmap(raw, pos, "p")
        pos = end
        bitmap <<= 64
        if bitmap >> 127 & 1:
            end = pos + self._bitmap_len
            secondary = bitmaps.get(raw[pos:end]) if type(raw) is bytes else None
            if secondary is None:
                secondary = self._read_bitmap(raw, pos, "1")
            pos = end
            bitmap |= secondary
        start = pos
        values: dict[int, str] = {} if found is None else found
        spans: dict[int, tuple[int, int]] = {}
        compiled = self._steps.get((bitmap, full))
        if compiled is None:
            compiled = self._compile_steps(bitmap, full)
        steps, text_ok = compiled
        if text_ok and raw.isascii():
            end = self._walk_text(raw.decode("ascii"), steps, pos, values, spans)
            if end >= 0 and not (full and end != n):
                return Scan(mti, bitmap, values, spans, end)
            values.clear()  # something is wrong: the walk below names it
            spans.clear()
        ascii_ = self._ascii
        # The hot loop: one iteration per present field; a fixed field is skipped by
        # its size. Running past the end is checked once after the loop (slices
        # don't raise), and the slow path then names the field.
        for num, size, want in steps:
            if size < 0:
                if size == _UNDEFINED:
                    raise DecodeError("field present but not defined in the dialect", str(num), pos)
                plan = self._plans[num]
                units = self._read_prefix(raw, pos, plan)  # type: ignore[arg-type]
                pos += plan.prefix_width  # type: ignore[union-attr]
                size = _byte_len(units, plan.unit)  # type: ignore[union-attr]
            end = pos + size
            if want and end <= n:
                if want == 1:  # _READ (a literal: this is the hot loop)
                    if ascii_[num]:
                        try:
                            values[num] = raw[pos:end].decode("ascii")
                        except UnicodeDecodeError:
                            raise DecodeError("field is not text", str(num), pos) from None
                    else:
                        plan = self._plans[num]
                        units = plan.length if plan.prefix_kind == _P_NONE else self._read_prefix(  # type: ignore[union-attr]
                            raw, pos - plan.prefix_width, plan)  # type: ignore[union-attr,arg-type]
                        values[num] = self._value(raw, pos, end, units, plan)  # type: ignore[arg-type]
                    spans[num] = (pos, end)
                elif want == _CHECK_TEXT:
                    if not raw[pos:end].isascii():
                        raise DecodeError("field is not text", str(num), pos)
                else:
                    plan = self._plans[num]
                    units = plan.length if plan.prefix_kind == _P_NONE else self._read_prefix(  # type: ignore[union-attr]
                        raw, pos - plan.prefix_width, plan)  # type: ignore[union-attr,arg-type]
                    if units & 1:
                        self._check_pad(raw, pos, end, plan)  # type: ignore[arg-type]
            pos = end
        if pos > n:
            self._raise_truncated(raw, steps, start)
        if full and pos != n:
            raise DecodeError("extra bytes after the last field", None, pos)
        return Scan(mti, bitmap, values, spans, pos)

    def _walk_text(self, text: str, steps: tuple[tuple[int, int, int], ...], pos: int, values: dict[int, str],
                   spans: dict[int, tuple[int, int]]) -> int:
        """The walk of an all-ASCII message whose fields are all ASCII text: str slices, no
        per-field decode. Returns the end, or -1 at anything unexpected (a length prefix that
        is not a number or over its maximum, a message that ends early)."""
        plans = self._plans
        for num, size, want in steps:
            if size < 0:
                plan = plans[num]
                width = plan.prefix_width  # type: ignore[union-attr]
                prefix = text[pos:pos + width]
                if not prefix.isdigit():
                    return -1
                size = int(prefix)
                if size > plan.max_units:  # type: ignore[union-attr]
                    return -1
                pos += width
            end = pos + size
            if want == 1:  # _READ; the checks a full scan makes hold already: the message is all ASCII
                values[num] = text[pos:end]
                spans[num] = (pos, end)
            pos = end
        return pos if pos <= len(text) else -1

    def _compile_steps(self, bitmap: int, full: bool) -> tuple[tuple[tuple[int, int, int], ...], bool]:
        """The walk for one bitmap: (field, fixed byte size or a marker, wanted) per present
        field; and whether ``_walk_text`` can do it."""
        last = 128 if full else self._last_wanted
        steps = []
        rest = bitmap & ~(1 << 127)  # field 1 is the secondary bitmap, read already
        check = self._check
        while rest:
            num = 129 - rest.bit_length()
            if num > last:
                break
            rest ^= 1 << (128 - num)
            want = _READ if num in self.wanted else (check[num] if full else _SKIP)
            steps.append((num, self._fixed[num], want))
        if len(self._steps) >= 4096:  # real traffic has a few dozen bitmaps; garbage must not grow this
            self._steps.clear()
        text = self._text
        result = self._steps[(bitmap, full)] = (tuple(steps), all(text[num] for num, _, _ in steps))
        return result

    def _raise_truncated(self, raw: bytes | bytearray, steps: tuple[tuple[int, int, int], ...], pos: int) -> None:
        """Slow path: find the field the message ends in, for the error."""
        n = len(raw)
        for num, size, _ in steps:
            if size < 0:
                plan = self._plans[num]
                units = self._read_prefix(raw, pos, plan)  # type: ignore[arg-type]
                pos += plan.prefix_width  # type: ignore[union-attr]
                size = _byte_len(units, plan.unit)  # type: ignore[union-attr]
            if pos + size > n:
                raise DecodeError("message ends inside the field", str(num), pos)
            pos += size
        raise DecodeError("message ends inside a field", None, pos)

    def _read_bitmap(self, raw: bytes | bytearray, pos: int, field: str) -> int:
        end = pos + self._bitmap_len
        if end > len(raw):
            raise DecodeError("message ends inside the bitmap", field, pos)
        chunk = bytes(raw[pos:end])
        if self._bitmap_hex:
            if chunk.translate(None, _HEX_DIGITS):  # anything left is not a hex digit
                raise DecodeError("bitmap is not hexadecimal", field, pos)
            value = int(chunk, 16)
        else:
            value = int.from_bytes(chunk, "big")
        if len(self._bitmaps) >= 4096:  # garbage must not grow this
            self._bitmaps.clear()
        self._bitmaps[chunk] = value
        return value

    @staticmethod
    def _read_prefix(raw: bytes | bytearray, pos: int, plan: _Plan) -> int:
        end = pos + plan.prefix_width
        if end > len(raw):
            raise DecodeError("message ends inside the length prefix", str(plan.number), pos)
        chunk = raw[pos:end]
        kind = plan.prefix_kind
        try:
            if kind == _P_ASCII:
                if not chunk.isdigit():
                    raise ValueError
                units = int(chunk)
            elif kind == _P_BCD:
                units = int(chunk.hex(), 10)
            elif kind == _P_BIN:
                units = int.from_bytes(chunk, "big")
            else:
                text = bytes(chunk).decode("cp500")
                if not text.isdigit():
                    raise ValueError
                units = int(text)
        except ValueError:
            raise DecodeError("length prefix is not a number", str(plan.number), pos) from None
        if units > plan.max_units:
            raise DecodeError(f"length {units} over the maximum {plan.max_units}", str(plan.number), pos)
        return units

    @staticmethod
    def _value(raw: bytes | bytearray, start: int, end: int, units: int, plan: _Plan) -> str:
        kind = plan.value_kind
        chunk = raw[start:end]
        try:
            if kind == _V_ASCII:
                return chunk.decode("ascii")
            if kind == _V_EBCDIC:
                return bytes(chunk).decode("cp500")
            text = chunk.hex().upper()
            if kind == _V_BCD and units & 1:
                pad = plan.bcd_pad  # the pad nibble must be the dialect's, as in _check_pad
                if pad == "left":
                    if text[0] != "0":
                        raise DecodeError("pad nibble of an odd-length BCD value is wrong", str(plan.number), start)
                    return text[1:]
                if text[-1] != ("F" if pad == "right_f" else "0"):
                    raise DecodeError("pad nibble of an odd-length BCD value is wrong", str(plan.number), start)
                return text[:-1]
            return text
        except UnicodeDecodeError:
            raise DecodeError("field is not text", str(plan.number), start) from None

    @staticmethod
    def _check_pad(raw: bytes | bytearray, start: int, end: int, plan: _Plan) -> None:
        """An odd BCD value's pad nibble must be the dialect's (0 on the left, 0 or F on the
        right), as pyiso8583 requires: anything else is not a value of that many digits."""
        pad = plan.bcd_pad
        if pad == "left":
            ok = raw[start] >> 4 == 0
        else:
            ok = raw[end - 1] & 0xF == (0xF if pad == "right_f" else 0)
        if not ok:
            raise DecodeError("pad nibble of an odd-length BCD value is wrong", str(plan.number), start)

    # ------------------------------------------------------------------ splice

    def encode_value(self, field: int, value: str) -> bytes:
        """The wire bytes of a fixed-length field's value."""
        plan = self._plans[field]
        if plan is None or plan.prefix_kind != _P_NONE:
            raise EncodeError("only a fixed-length field can be spliced", str(field))
        if len(value) != plan.length:
            raise EncodeError(f"value must be {plan.length} long", str(field))
        kind = plan.value_kind
        if kind == _V_ASCII:
            return value.encode("ascii")
        if kind == _V_EBCDIC:
            return value.encode("cp500")
        if kind == _V_BCD and len(value) & 1:
            value = {"left": "0" + value, "right": value + "0"}.get(plan.bcd_pad, value + "F")
        return bytes.fromhex(value)

    def splice(self, raw: bytes | bytearray, scan: Scan, field: int, value: str) -> bytes:
        """``raw`` with fixed field ``field`` (found by ``scan``) replaced by ``value``."""
        start, end = scan.spans[field]
        data = self.encode_value(field, value)
        return b"".join((raw[:start], data, raw[end:]))

    # Field 64 as a message's last field, added or dropped in place: a message with no secondary
    # bitmap ends with field 64 when it has one, so its bit (the primary bitmap's last) and its
    # bytes (the message's last) are all that change. For a MAC added or dropped by a hop (the
    # MAC's own bytes are then written by whoever signs).

    def can_add_last_64(self, bitmap: int) -> bool:
        """Whether ``add_last_64`` applies to a message with ``bitmap``: neither a secondary bitmap
        nor field 64, and field 64 fixed in this dialect."""
        return not bitmap & (_FIELD_1 | _FIELD_64) and self._fixed[64] > 0

    def can_drop_last_64(self, bitmap: int) -> bool:
        """Whether ``drop_last_64`` applies: field 64 present and last (no secondary bitmap), fixed."""
        return bool(bitmap & _FIELD_64) and not bitmap & _FIELD_1 and self._fixed[64] > 0

    def add_last_64(self, raw: bytes) -> bytes:
        """``raw`` (for which ``can_add_last_64``) with field 64 added, its value zeros."""
        filler = b"0" if self._ascii[64] else b"\0"
        return self._with_bit_64(raw, True) + filler * self._fixed[64]

    def drop_last_64(self, raw: bytes) -> bytes:
        """``raw`` (fully scanned, and ``can_drop_last_64``) without its field 64."""
        return self._with_bit_64(raw[:-self._fixed[64]], False)

    def _with_bit_64(self, raw: bytes, on: bool) -> bytes:
        """``raw`` with the primary bitmap's last bit (field 64) set or cleared."""
        if self._bitmap_hex:
            at = self._mti_len + 15  # the last of 16 hex digits
            digit = raw[at:at + 1]
            value = int(digit, 16)
            value = value | 1 if on else value & ~1
            new = _HEX_UPPER[value:value + 1]
            if digit.islower():
                new = new.lower()
        else:
            at = self._mti_len + 7  # the last of 8 bytes
            value = raw[at] | 1 if on else raw[at] & 0xFE
            new = bytes((value,))
        return b"".join((raw[:at], new, raw[at + 1:]))
