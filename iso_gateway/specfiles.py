"""The spec files: dialects (``specs/dialects/``) and rule sets (``specs/rules/``), from TOML
to the core's objects.

The core (iso_gateway/core/) reads no files and takes plain values: this module finds a spec
by name or path, reads it, checks it against its schema (pydantic, so a bad file is refused
with the file, the key path and the reason) and hands the checked contents, as plain data, to
``core.dialect.build_dialect`` or ``core.validation.RuleSet``. Loads are cached: a listener,
a link and a tool asking for the same spec share one object.
"""

from __future__ import annotations

import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .core.dialect import (
    FIELD_TYPES, BcdPad, BinaryEncoding, Dialect, LengthEncoding, NumericEncoding, TextEncoding, build_dialect,
)
from .core.errors import ConfigError
from .core.message import is_valid_mti
from .core.validation import DEFAULT_CLOCK_SKEW, DEFAULT_CODES, MAX_CLOCK_SKEW, RuleSet
from .datafiles import parse_toml, read_text, spec_files, validate

__all__ = [
    "dialect_paths",
    "get_dialect",
    "load_dialect_file",
    "load_rules",
    "parse_dialect",
    "parse_rules",
    "rules_paths",
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------- dialect files


class _FieldFile(_Strict):
    name: str
    type: str
    len: int | None = Field(default=None, ge=1, le=9999, description="fixed length")
    max: int | None = Field(default=None, ge=1, le=9999, description="maximum length of a variable field")
    prefix: Literal["L", "LL", "LLL", "LLLL"] | None = None
    encoding: Literal["ascii", "ebcdic", "bcd", "raw", "hex"] | None = None
    length_encoding: LengthEncoding | None = None
    bcd_pad: BcdPad | None = None

    @field_validator("type")
    @classmethod
    def _known_type(cls, v: str) -> str:
        if v not in FIELD_TYPES:
            raise ValueError(f"unknown type {v!r}; one of {', '.join(FIELD_TYPES)}")
        return v

    @model_validator(mode="after")
    def _length_shape(self) -> "_FieldFile":
        if (self.len is None) == (self.max is None):
            raise ValueError("give exactly one of 'len' (fixed) or 'max' with 'prefix' (variable)")
        if self.max is not None and self.prefix is None:
            raise ValueError("a variable field ('max') needs a 'prefix' (L, LL, LLL or LLLL)")
        if self.len is not None and self.prefix is not None:
            raise ValueError("a fixed field ('len') takes no 'prefix'")
        if self.max is not None and self.max >= 10 ** len(self.prefix or ""):
            raise ValueError(f"max {self.max} does not fit a {self.prefix} prefix")
        return self


class _WireFile(_Strict):
    mti: NumericEncoding = "ascii"
    bitmap: Literal["hex", "binary"] = "hex"
    numeric: NumericEncoding = "ascii"
    text: TextEncoding = "ascii"
    binary: BinaryEncoding = "raw"
    length: LengthEncoding = "ascii"
    bcd_pad: BcdPad = "left"


class _CardDataFile(_Strict):
    pan: list[int] = [2]
    mask: list[int] = [14]
    remove: list[int] = [35, 36, 45, 52, 55]
    presence: list[int] = [64, 128]


class _ResponseFile(_Strict):
    echo: list[int]


class _KeyChangeFile(_Strict):
    """How a switch sends a new MAC key in an 0800 (the gateway installs it after checking its check value)."""

    code: str = "161"  # DE 70 of the 0800 that carries a new key
    key_field: int = 96  # the new key, wrapped under the zone key (hex)
    check_field: int = 48  # its key check value (hex, 6 characters at least)


class _DialectFile(_Strict):
    name: str
    title: str
    standard: Literal["1987", "1993", "2003"]
    wire: _WireFile = _WireFile()
    card_data: _CardDataFile = _CardDataFile()
    response: _ResponseFile
    fields: dict[str, _FieldFile]
    key_change: _KeyChangeFile | None = None

    @field_validator("name")
    @classmethod
    def _name_shape(cls, v: str) -> str:
        if not re.fullmatch(r"[a-z0-9][a-z0-9_-]*", v):
            raise ValueError("a dialect name is lower-case letters, digits, '-' and '_'")
        return v

    @field_validator("fields")
    @classmethod
    def _field_numbers(cls, v: dict[str, _FieldFile]) -> dict[str, _FieldFile]:
        for key in v:
            if not key.isdigit() or not 2 <= int(key) <= 128 or key != str(int(key)):
                raise ValueError(f"field number {key!r} is not 2..128")
            if key == "65":
                # pyiso8583 reads bit 65 as "a tertiary bitmap follows" on decode and drops a
                # field 65 on encode: it can never carry a value, so no dialect may define it
                # (a message with bit 65 set is then a format error, never a KeyError).
                raise ValueError("field 65 can't be defined: bit 65 marks a tertiary bitmap, which the gateway does not carry")
        return v


def parse_dialect(text: str, source: str) -> Dialect:
    """Parse and check a dialect file's text. Raises ConfigError naming the key path."""
    return build_dialect(validate(_DialectFile, parse_toml(text, source), source).model_dump(), source)


def load_dialect_file(path: str | os.PathLike[str]) -> Dialect:
    return parse_dialect(read_text(path), str(path))


def dialect_paths(extra_dirs: tuple[str, ...] = ()) -> dict[str, Path]:
    """Dialect name -> file, shipped ones first; a file in ``extra_dirs`` overrides by name."""
    return spec_files("dialects", extra_dirs)


@lru_cache(maxsize=64)
def get_dialect(name_or_path: str, extra_dirs: tuple[str, ...] = ()) -> Dialect:
    """A dialect by shipped name (``iso87ascii``) or by file path."""
    if name_or_path.endswith(".toml") or os.sep in name_or_path:
        return load_dialect_file(name_or_path)
    paths = dialect_paths(extra_dirs)
    if name_or_path not in paths:
        known = ", ".join(sorted(paths)) or "none"
        raise ConfigError("dialect", name_or_path, f"unknown dialect; known: {known}")
    dialect = load_dialect_file(paths[name_or_path])
    if dialect.name != name_or_path:
        raise ConfigError(str(paths[name_or_path]), "name", f"{dialect.name!r} does not match the file name")
    return dialect


# --------------------------------------------------------------------------- rule set files


_FieldNum = Annotated[int, Field(ge=2, le=128)]
_Code = Annotated[str, Field(pattern=r"^[0-9A-Za-z]{2,4}$")]
_Skew = Annotated[float, Field(gt=0, le=MAX_CLOCK_SKEW)]
_CheckKind = Literal["stan", "transmission_time", "pan", "expiry", "amount", "currency", "off"]


class _CodesFile(_Strict):
    unsupported_mti: _Code = DEFAULT_CODES["unsupported_mti"]
    missing_field: _Code = DEFAULT_CODES["missing_field"]
    field_type: _Code = DEFAULT_CODES["field_type"]
    zero_stan: _Code = DEFAULT_CODES["zero_stan"]
    bad_stan: _Code = DEFAULT_CODES["bad_stan"]
    bad_transmission_time: _Code = DEFAULT_CODES["bad_transmission_time"]
    processing_code: _Code = DEFAULT_CODES["processing_code"]
    pan_length: _Code = DEFAULT_CODES["pan_length"]
    pan_luhn: _Code = DEFAULT_CODES["pan_luhn"]
    bad_expiry: _Code = DEFAULT_CODES["bad_expiry"]
    expired_card: _Code = DEFAULT_CODES["expired_card"]
    bad_amount: _Code = DEFAULT_CODES["bad_amount"]
    unknown_currency: _Code = DEFAULT_CODES["unknown_currency"]


class _ConditionFile(_Strict):
    field: _FieldNum
    when: _FieldNum
    starts_with: list[str] | None = None

    @field_validator("starts_with")
    @classmethod
    def _prefixes(cls, v: list[str] | None) -> list[str] | None:
        if v is not None:
            if not v:
                raise ValueError("give at least one prefix, or leave 'starts_with' out to mean 'when present'")
            if any(not p for p in v):
                raise ValueError("a prefix can't be empty")
        return v


class _MtiFile(_Strict):
    title: str = ""
    mandatory: list[_FieldNum] = []
    conditional: list[_ConditionFile] = []
    checks: dict[str, _CheckKind] = {}
    processing_codes: list[Annotated[str, Field(pattern=r"^[0-9]{2}$")]] | None = Field(default=None, min_length=1)
    clock_skew: _Skew | None = None

    @field_validator("checks")
    @classmethod
    def _check_fields(cls, v: dict[str, str]) -> dict[str, str]:
        for key in v:
            _field_key(key)
        return v


class _CurrencyFile(_Strict):
    alpha: str = Field(pattern=r"^[A-Z]{3}$")
    minor: int | None = Field(default=None, ge=0, le=4)


class _RulesFile(_Strict):
    name: str
    title: str = ""
    extends: str | None = None
    clock_skew: _Skew = DEFAULT_CLOCK_SKEW
    codes: _CodesFile = _CodesFile()
    type_checked: list[_FieldNum] = []
    currencies: dict[str, _CurrencyFile] = {}
    mti: dict[str, _MtiFile]

    @field_validator("name")
    @classmethod
    def _name_shape(cls, v: str) -> str:
        if not v or not all(c.isascii() and (c.isalnum() or c in "-_") for c in v) or not v[0].isalnum():
            raise ValueError("a rule set name is letters, digits, '-' and '_'")
        return v

    @field_validator("currencies")
    @classmethod
    def _currency_codes(cls, v: dict[str, _CurrencyFile]) -> dict[str, _CurrencyFile]:
        for key in v:
            if len(key) != 3 or not key.isdigit():
                raise ValueError("a currency key is an ISO 4217 numeric code (3 digits)")
        return v

    @field_validator("mti")
    @classmethod
    def _mti_keys(cls, v: dict[str, _MtiFile]) -> dict[str, _MtiFile]:
        for key in v:
            if not is_valid_mti(key):
                raise ValueError(f"{key!r} is not a valid MTI (4 digits, known class and function)")
        return v


def _field_key(key: str) -> int:
    if not key.isdigit() or key != str(int(key)) or not 2 <= int(key) <= 128:
        raise ValueError("a check's key is a field number 2..128")
    return int(key)


# --------------------------------------------------------------------------- loading rule sets

# A chain of `extends` longer than this is a mistake, not a design.
MAX_EXTENDS_DEPTH = 8


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` laid on ``base``: tables merge key by key, anything else replaces."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_rules(text: str, source: str, extra_dirs: tuple[str, ...] = ()) -> RuleSet:
    """Parse and compile a rule file's text. Raises ConfigError naming the file,
    the key path and the reason. ``extra_dirs`` is where ``extends`` looks
    (after the shipped rules) for a parent named without a path."""
    return _parse(text, source, extra_dirs, ())[0]


def _parse(text: str, source: str, extra_dirs: tuple[str, ...], chain: tuple[str, ...]) -> tuple[RuleSet, dict[str, Any]]:
    """The rule set and its merged file (what a rule file that ``extends`` this one starts from)."""
    raw = parse_toml(text, source)
    if "name" not in raw:
        raise ConfigError(source, "name", "required key is missing")
    parent_ref = raw.get("extends")
    if parent_ref is not None:
        if not isinstance(parent_ref, str) or not parent_ref:
            raise ConfigError(source, "extends", "must be a rule set name or a .toml path")
        if len(chain) >= MAX_EXTENDS_DEPTH:
            raise ConfigError(source, "extends", f"more than {MAX_EXTENDS_DEPTH} levels of 'extends'")
        base = Path(source).parent if os.sep in source or source.endswith(".toml") else None
        path = _resolve(parent_ref, extra_dirs, base, source, "extends")
        if str(path.resolve()) in chain or str(path.resolve()) == _resolved(source):
            raise ConfigError(source, "extends", f"{parent_ref!r} extends this file again (a cycle)")
        _, parent_raw = _load_file(path, extra_dirs, (*chain, _resolved(source)))
        raw = _merge(parent_raw, raw)
    return RuleSet(validate(_RulesFile, raw, source).model_dump(), source), raw


def _resolved(source: str) -> str:
    try:
        return str(Path(source).resolve())
    except OSError:
        return source


def _load_file(path: Path, extra_dirs: tuple[str, ...], chain: tuple[str, ...]) -> tuple[RuleSet, dict[str, Any]]:
    return _parse(read_text(path), str(path), extra_dirs, chain)


def rules_paths(extra_dirs: tuple[str, ...] = ()) -> dict[str, Path]:
    """Rule set name -> file, shipped ones first; a file in ``extra_dirs`` overrides by name."""
    return spec_files("rules", extra_dirs)


def _is_path(name_or_path: str) -> bool:
    return name_or_path.endswith(".toml") or os.sep in name_or_path or "/" in name_or_path


def _resolve(name_or_path: str, extra_dirs: tuple[str, ...], base: Path | None, source: str, where: str) -> Path:
    if _is_path(name_or_path):
        p = Path(name_or_path)
        return p if p.is_absolute() or base is None else base / p
    paths = rules_paths(extra_dirs)
    if name_or_path not in paths:
        known = ", ".join(sorted(paths)) or "none"
        raise ConfigError(source, where, f"unknown rule set {name_or_path!r}; known: {known}")
    return paths[name_or_path]


@lru_cache(maxsize=64)
def load_rules(name_or_path: str, extra_dirs: tuple[str, ...] = ()) -> RuleSet:
    """A rule set by shipped name (``default`` is ``specs/rules/default.toml``),
    by a name found in ``extra_dirs``, or by file path. Cached like get_dialect."""
    if _is_path(name_or_path):
        return _load_file(Path(name_or_path), extra_dirs, ())[0]
    path = _resolve(name_or_path, extra_dirs, None, "rules", name_or_path)
    rules = _load_file(path, extra_dirs, ())[0]
    if rules.name != name_or_path:
        raise ConfigError(str(path), "name", f"{rules.name!r} does not match the file name")
    return rules
