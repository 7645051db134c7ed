"""Dialects: everything needed to read and write one host's ISO 8583 messages.

A dialect is data (a TOML file under ``specs/dialects/``), never code: the field
table with ISO types and lengths, how the MTI, bitmap, numbers, text and length
prefixes are written on the wire, which fields a response echoes, and which
fields carry card data. This module turns a dialect file's checked contents
(plain data: ``build_dialect``) into a ``Dialect`` and compiles the pyiso8583
spec that does the actual encoding and decoding. Reading and checking the
files is the shell's job (specfiles.py).

It must never touch a socket or a file, or import trio.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal, Mapping

from .errors import ConfigError

# ISO 8583 data element types. pyiso8583 checks lengths and encodings but not
# these character classes, so `check_field_type` does.
FIELD_TYPES = ("n", "a", "an", "ans", "as", "ns", "anp", "z", "b", "x+n")

TextEncoding = Literal["ascii", "ebcdic"]
NumericEncoding = Literal["ascii", "ebcdic", "bcd"]
BinaryEncoding = Literal["raw", "hex"]
LengthEncoding = Literal["ascii", "ebcdic", "bcd", "binary"]
# Odd-length BCD values get one pad nibble: "left" is a 0 on the left (jPOS
# pad=true), "right" a 0 on the right (jPOS pad=false), "right_f" an F on the right.
BcdPad = Literal["left", "right", "right_f"]

_PY_CODEC = {"ascii": "ascii", "ebcdic": "cp500"}
PREFIX_DIGITS = {"": 0, "L": 1, "LL": 2, "LLL": 3, "LLLL": 4}


# --------------------------------------------------------------------------- compiled model


@dataclass(frozen=True, slots=True)
class FieldDef:
    """One data element as the dialect writes it.

    ``length`` is the fixed length or the maximum, in the field's own units:
    digits for numeric fields, characters for text, bytes for binary fields.
    ``prefix`` is the number of length digits (0 for a fixed field).
    ``encoding`` is how the value is written: ascii, ebcdic, bcd, raw or hex.
    """

    number: int
    name: str
    type: str
    length: int
    prefix: int
    encoding: str
    length_encoding: str
    bcd_pad: str = "left"

    @property
    def fixed(self) -> bool:
        return self.prefix == 0

    @property
    def format(self) -> str:
        """The ISO notation: n6, ans..40, n..19."""
        if self.fixed:
            return f"{self.type}{self.length}"
        return f"{self.type}{'.' * self.prefix}{self.length}"


@dataclass(frozen=True)
class KeyChange:
    code: str
    key_field: int
    check_field: int


@dataclass(frozen=True)
class Dialect:
    name: str
    title: str
    standard: str
    mti_encoding: str
    bitmap_encoding: str
    fields: dict[int, FieldDef]
    echo: tuple[int, ...]
    pan_fields: frozenset[int]
    mask_fields: frozenset[int]
    remove_fields: frozenset[int]
    presence_fields: frozenset[int]
    source: str
    spec: dict[str, Any] = field(repr=False, compare=False, hash=False)
    # How the switch sends a new MAC key (an 0800 whose DE 70 is ``code``: the key wrapped under the
    # zone key in ``key_field``, its check value in ``check_field``), or None: it never does.
    key_change: KeyChange | None = None

    @cached_property
    def bcd_track_fields(self) -> tuple[int, ...]:
        """Track-data (z) fields written in BCD, whose '=' separator is the nibble D on the wire."""
        return tuple(n for n, fd in self.fields.items() if fd.type == "z" and fd.encoding == "bcd")

    @cached_property
    def field_keys(self) -> frozenset[str]:
        """The defined field numbers as the message dict's keys ("2" .. "128")."""
        return frozenset(str(n) for n in self.fields)

    @cached_property
    def text_prefix_keys(self) -> dict[str, str]:
        """Variable fields whose length prefix is text (ascii or ebcdic digits), by key: the prefixes
        ``message.decode`` checks are digits only, since pyiso8583's ``int()`` also takes signs and spaces."""
        return {str(n): fd.length_encoding for n, fd in self.fields.items()
                if fd.prefix and fd.length_encoding in ("ascii", "ebcdic")}

    def field_name(self, number: int) -> str:
        fd = self.fields.get(number)
        return fd.name if fd else f"field {number}"


def _resolve_field(num: int, f: Mapping[str, Any], wire: Mapping[str, Any], where: str, source: str) -> FieldDef:
    if f["encoding"] is not None:
        enc = f["encoding"]
    elif f["type"] in ("n", "z"):
        enc = wire["numeric"]
    elif f["type"] == "b":
        enc = wire["binary"]
    else:
        enc = wire["text"]
    allowed = {
        "n": {"ascii", "ebcdic", "bcd"},
        "z": {"ascii", "ebcdic", "bcd"},
        "b": {"raw", "hex"},
    }.get(f["type"], {"ascii", "ebcdic"})
    if enc not in allowed:
        raise ConfigError(source, f"{where}.encoding", f"{enc!r} can't carry type {f['type']!r}; one of {sorted(allowed)}")
    length_encoding = f["length_encoding"] or wire["length"]
    return FieldDef(
        number=num,
        name=f["name"],
        type=f["type"],
        length=f["len"] if f["len"] is not None else f["max"],
        prefix=PREFIX_DIGITS[f["prefix"] or ""],
        encoding=enc,
        length_encoding=length_encoding,
        bcd_pad=f["bcd_pad"] or wire["bcd_pad"],
    )


def prefix_width(fd: FieldDef) -> int:
    """Bytes the length prefix takes on the wire."""
    if fd.prefix == 0:
        return 0
    if fd.length_encoding in ("ascii", "ebcdic"):
        return fd.prefix
    if fd.length_encoding == "bcd":
        return (fd.prefix + 1) // 2
    return 1 if fd.prefix <= 2 else 2  # binary: uint8 up to 255, then uint16


def _pyiso_field(fd: FieldDef) -> dict[str, Any]:
    len_enc = {"ascii": "ascii", "ebcdic": "cp500", "bcd": "bcd", "binary": "b"}[fd.length_encoding]
    spec: dict[str, Any] = {"len_enc": len_enc, "len_type": prefix_width(fd), "desc": fd.name}
    if fd.encoding == "bcd":
        spec.update(data_enc="b", len_count="nibbles", max_len=fd.length)
        key, digit = {"left": ("left_pad", "0"), "right": ("right_pad", "0"), "right_f": ("right_pad", "F")}[fd.bcd_pad]
        spec[key] = digit
    elif fd.encoding == "raw":
        spec.update(data_enc="b", max_len=fd.length)
    elif fd.encoding == "hex":
        spec.update(data_enc="ascii", max_len=fd.length * 2)
    else:
        spec.update(data_enc=_PY_CODEC[fd.encoding], max_len=fd.length)
    return spec


def _build_spec(wire: Mapping[str, Any], fields: dict[int, FieldDef]) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "h": {"data_enc": "ascii", "len_enc": "ascii", "len_type": 0, "max_len": 0, "desc": "Header"},
    }
    if wire["mti"] == "bcd":
        spec["t"] = {"data_enc": "b", "len_enc": "ascii", "len_type": 0, "max_len": 2, "desc": "MTI"}
    else:
        spec["t"] = {"data_enc": _PY_CODEC[wire["mti"]], "len_enc": "ascii", "len_type": 0, "max_len": 4, "desc": "MTI"}
    for key, desc in (("p", "Primary bitmap"), ("1", "Secondary bitmap")):
        if wire["bitmap"] == "binary":
            spec[key] = {"data_enc": "b", "len_enc": "ascii", "len_type": 0, "max_len": 8, "desc": desc}
        else:
            spec[key] = {"data_enc": "ascii", "len_enc": "ascii", "len_type": 0, "max_len": 16, "desc": desc}
    for num in range(2, 129):
        fd = fields.get(num)
        if fd is None:
            # Undefined fields still need an entry; a message that sets one fails
            # to decode with a clear "field N" error instead of a KeyError.
            spec[str(num)] = {"data_enc": "ascii", "len_enc": "ascii", "len_type": 0, "max_len": 0, "desc": "Undefined"}
        else:
            spec[str(num)] = _pyiso_field(fd)
    return spec


def build_dialect(d: Mapping[str, Any], source: str) -> Dialect:
    """A Dialect from a dialect file's checked contents as plain data (specfiles.py reads and
    checks the file: every key present, defaults filled in). Raises ConfigError naming the key
    path for what only the whole file can tell: an encoding a type can't carry, a field a
    section names but ``[fields]`` does not define."""
    wire = d["wire"]
    card = d["card_data"]
    fields: dict[int, FieldDef] = {}
    for key, f in d["fields"].items():
        num = int(key)
        fields[num] = _resolve_field(num, f, wire, f"fields.{key}", source)
    for section, nums in (
        ("response.echo", d["response"]["echo"]),
        ("card_data.pan", card["pan"]),
        ("card_data.mask", card["mask"]),
        ("card_data.remove", card["remove"]),
        ("card_data.presence", card["presence"]),
        ("key_change", [d["key_change"]["key_field"], d["key_change"]["check_field"]] if d.get("key_change") else []),
    ):
        for n in nums:
            if n not in fields:
                raise ConfigError(source, section, f"field {n} is not defined in [fields]")
    return Dialect(
        name=d["name"],
        title=d["title"],
        standard=d["standard"],
        mti_encoding=wire["mti"],
        bitmap_encoding=wire["bitmap"],
        fields=fields,
        echo=tuple(d["response"]["echo"]),
        pan_fields=frozenset(card["pan"]),
        mask_fields=frozenset(card["mask"]),
        remove_fields=frozenset(card["remove"]),
        presence_fields=frozenset(card["presence"]),
        source=source,
        spec=_build_spec(wire, fields),
        key_change=KeyChange(**d["key_change"]) if d.get("key_change") else None,
    )


# --------------------------------------------------------------------------- field types

_TYPE_PATTERNS = {
    "n": re.compile(r"[0-9]*"),
    "a": re.compile(r"[A-Za-z ]*"),
    "an": re.compile(r"[A-Za-z0-9 ]*"),
    "anp": re.compile(r"[A-Za-z0-9 ]*"),
    "ans": re.compile(r"[\x20-\x7e]*"),
    "as": re.compile(r"[^0-9\x00-\x1f\x7f-\xff]*"),
    "ns": re.compile(r"[^A-Za-z\x00-\x1f\x7f-\xff]*"),
    "z": re.compile(r"[0-9=D^]*"),
    "b": re.compile(r"[0-9A-Fa-f]*"),
    "x+n": re.compile(r"[CD][0-9]*"),
}


def check_field_type(fd: FieldDef, value: str) -> str | None:
    """None when ``value`` fits the field's ISO type and length, else the reason (no value in it)."""
    if not _TYPE_PATTERNS[fd.type].fullmatch(value):
        return f"not of type {fd.type}"
    n = len(value)
    if fd.type == "b":
        n //= 2
    if fd.fixed and n != fd.length:
        return f"length {n}, expected {fd.length}"
    if n > fd.length:
        return f"length {n}, over the maximum {fd.length}"
    return None
