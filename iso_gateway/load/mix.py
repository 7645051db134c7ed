"""Message mixes for the load generator, and the requests they make.

A mix file (``specs/load/*.toml``) says what the traffic looks like: which
MTIs in what proportions, amounts (ranges or lists, so that a tester can mix in
the amounts a switch declines or never answers), PANs (BIN prefixes or ranges,
a valid Luhn check digit generated), terminals, merchants and currencies.

``RequestFactory`` turns a mix into a pool of pre-encoded frames once, with
pyiso8583, and then makes each request by splicing the few fixed-length fields
that must change per request into those bytes: the STAN (DE 11, unique per
terminal), the RRN (DE 37, unique per run), the transmission time (DE 7, UTC)
and the local time (DE 12/13, Africa/Casablanca). There is no encode on the hot
path: a request costs one ``bytes.join``.

Proportions are exact, not sampled: each dimension of the mix (MTI, amount
entry, PAN entry, merchant, currency) is shared out over the pool by largest
remainder and shuffled, and requests walk the pool in order; so after a whole
number of pools every weight is honoured to the message (a mix with 5 % of
``...51`` amounts gives exactly 5 % of 51s from the simulator).

It never touches a socket or imports trio, and never puts a PAN in an error.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..datafiles import parse_toml, read_text, spec_files, validate
from ..core.dialect import Dialect, FieldDef
from ..core.errors import ConfigError, MessageError
from ..core.framing import Framer
from ..core.macs import MacField
from ..core.message import Message, encode, match_class
from ..core.scanner import Scanner
from ..security.mac import CmacKey, RetailMacKey
from ..sim.client import CASABLANCA, DEFAULT_TPDU

__all__ = [
    "DEFAULT_MIX",
    "MAX_POOL",
    "Mix",
    "RequestFactory",
    "load_mix",
    "luhn_check_digit",
    "mix_paths",
    "parse_mix",
]

#: The mix used when none is named: ``specs/load/ecom.toml``.
DEFAULT_MIX = "ecom"

# A pool is re-spliced (DE 7, 12, 13) once a second: about 1 µs a message, so
# 10,000 messages cost 1 % of a core. Far more variety than that is better had
# from a bigger PAN range than from a bigger pool.
MAX_POOL = 10_000

# Fields the factory writes itself; a mix's [fields] table may not set them.
GENERATED = frozenset({2, 4, 7, 11, 12, 13, 14, 37, 41, 42, 43, 49})

# STAN (DE 11, n6): 000001..999999, wrapping (docs/domain.md §2.1).
STAN_MAX = 999_999
# RRN (DE 37, an12): YDDD then an 8-digit sequence unique within a run.
RRN_SEQUENCE = 10**8


# --------------------------------------------------------------------------- file model


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Weighted(Strict):
    # Relative weight of this entry within its list. The default is 1.
    weight: float = Field(default=1.0, gt=0)


class _MessageEntry(_Weighted):
    mti: str

    @field_validator("mti")
    @classmethod
    def _request_mti(cls, v: str) -> str:
        if len(v) != 4 or not v.isdigit() or v[1] not in "12" or v[2] not in "02":
            raise ValueError("must be an authorization or financial request or advice MTI (0100, 0200, 0120, ...)")
        return v


class _AmountEntry(_Weighted):
    # Explicit DE 4 values in minor units (10051 is MAD 100.51); one is drawn per message.
    values: list[int] | None = None
    # Inclusive [min, max] in minor units; `step` apart from min (100: whole units only).
    range: tuple[int, int] | None = None
    step: int = Field(default=1, ge=1)

    @model_validator(mode="after")
    def _one_kind(self) -> "_AmountEntry":
        if (self.values is None) == (self.range is None):
            raise ValueError("give either values or range")
        amounts = self.values if self.values is not None else list(self.range)  # type: ignore[arg-type]
        if not amounts:
            raise ValueError("values is empty")
        if any(not 0 <= a < 10**12 for a in amounts):
            raise ValueError("amounts are minor units from 0 to 999999999999 (DE 4, n12)")
        if self.range is not None and self.range[0] > self.range[1]:
            raise ValueError("range min is over its max")
        return self


class _PanEntry(_Weighted):
    # A BIN (issuer prefix): PANs of `length` digits starting with it, random middle, Luhn check digit.
    bin: str | None = None
    length: int = Field(default=16, ge=12, le=19)
    # Inclusive [first, last] PANs of one length; each generated PAN is in it and passes Luhn.
    range: tuple[str, str] | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> "_PanEntry":
        if (self.bin is None) == (self.range is None):
            raise ValueError("give either bin or range")
        if self.bin is not None:
            if not self.bin.isdigit() or not 1 <= len(self.bin) < self.length:
                raise ValueError("bin must be digits, shorter than length")
        else:
            lo, hi = self.range  # type: ignore[misc]
            if not (lo.isdigit() and hi.isdigit()) or len(lo) != len(hi) or not 12 <= len(lo) <= 19:
                raise ValueError("range must be two PANs of the same length (12 to 19 digits)")
            if int(lo) > int(hi):
                raise ValueError("range first is over its last")
            if _first_luhn_at_or_after(int(lo)) > int(hi):
                raise ValueError("range holds no Luhn-valid PAN")
        return self


class _Terminals(Strict):
    # Explicit terminal ids (DE 41, at most 8 characters)...
    ids: list[str] | None = None
    # ...or `count` ids made of `prefix` and a zero-padded number: ECOM0001, ECOM0002, ...
    prefix: str = "TERM"
    count: int = Field(default=8, ge=1, le=100_000)

    @model_validator(mode="after")
    def _fit(self) -> "_Terminals":
        for tid in self.names():
            if not tid or len(tid) > 8 or not tid.isascii() or not tid.isprintable():
                raise ValueError("terminal ids are 1 to 8 printable ASCII characters (DE 41, ans8)")
        if len(set(self.names())) != len(self.names()):
            raise ValueError("terminal ids repeat")
        return self

    def names(self) -> list[str]:
        if self.ids is not None:
            return list(self.ids)
        width = max(1, 8 - len(self.prefix))
        return [f"{self.prefix}{i:0{width}d}" for i in range(1, self.count + 1)]


class _MerchantEntry(_Weighted):
    # DE 42, card acceptor id (ans15, padded with spaces).
    id: str = Field(min_length=1, max_length=15)
    # DE 43, name and location (ans40 in ISO 8583:1987); omitted when empty.
    name_location: str = ""


class _CurrencyEntry(_Weighted):
    # DE 49, ISO 4217 numeric: 504 MAD, 978 EUR, 840 USD.
    code: str

    @field_validator("code")
    @classmethod
    def _numeric(cls, v: str) -> str:
        if len(v) != 3 or not v.isdigit():
            raise ValueError("an ISO 4217 numeric code, 3 digits (504 for MAD)")
        return v


class Mix(Strict):
    """A message mix as read from its file. Every key but the lists has a default."""

    # One line for people.
    description: str = ""
    # Distinct pre-encoded messages a run cycles through. The default is 2000.
    pool: int = Field(default=2000, ge=1, le=MAX_POOL)
    messages: list[_MessageEntry] = Field(min_length=1)
    amounts: list[_AmountEntry] = Field(min_length=1)
    pans: list[_PanEntry] = Field(min_length=1)
    terminals: _Terminals = _Terminals()
    merchants: list[_MerchantEntry] = Field(min_length=1)
    currencies: list[_CurrencyEntry] = Field(min_length=1)
    # Local-time fields written in Africa/Casablanca time: 12 (hhmmss, or YYMMDDhhmmss
    # where the dialect makes it n12) and 13 (MMDD). The default is [12, 13].
    local_time: list[int] = [12, 13]
    # DE 14 (YYMM) this many years ahead of today; 0 leaves DE 14 out. The default is 3.
    expiry_years: int = Field(default=3, ge=0, le=20)
    # Constant fields of every message, by field number: processing code, MCC, entry mode...
    fields: dict[str, str] = {}

    @field_validator("local_time")
    @classmethod
    def _local(cls, v: list[int]) -> list[int]:
        if any(f not in (12, 13) for f in v):
            raise ValueError("only 12 and 13 are local-time fields")
        return sorted(set(v))

    @field_validator("fields")
    @classmethod
    def _constants(cls, v: dict[str, str]) -> dict[str, str]:
        for key in v:
            if not key.isdigit() or not 2 <= int(key) <= 128:
                raise ValueError(f"{key!r} is not a field number from 2 to 128")
            if int(key) in GENERATED:
                raise ValueError(f"field {key} is generated by the load generator; it can't be a constant")
        return v


def mix_paths(extra_dirs: tuple[str, ...] = ()) -> dict[str, Path]:
    """Mix name -> file for ``specs/load/*.toml``."""
    return spec_files("load", extra_dirs)


def parse_mix(text: str, source: str) -> Mix:
    return validate(Mix, parse_toml(text, source), source)


def load_mix(name_or_path: str) -> tuple[Mix, str]:
    """A mix by name (from ``specs/load``) or .toml path; returns it with its source for errors."""
    if name_or_path.endswith(".toml") or os.sep in name_or_path:
        source = name_or_path
    else:
        paths = mix_paths()
        if name_or_path not in paths:
            known = ", ".join(paths) or "none"
            raise ConfigError("load", "mix", f"unknown mix {name_or_path!r}; shipped mixes: {known}")
        source = str(paths[name_or_path])
    return parse_mix(read_text(source), source), source


# --------------------------------------------------------------------------- card numbers


def luhn_check_digit(body: str) -> str:
    """The digit that makes ``body + digit`` pass the Luhn check (ISO/IEC 7812-1)."""
    total = 0
    for i, ch in enumerate(reversed(body)):
        d = ord(ch) - 48
        if not i & 1:  # doubled: every second digit counting from the check digit's left
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return str(-total % 10)


def _with_check_digit(body: int, width: int) -> int:
    text = f"{body:0{width - 1}d}"
    return int(text + luhn_check_digit(text))


def _first_luhn_at_or_after(n: int) -> int:
    # Among the 10 numbers sharing n's body exactly one passes Luhn; it or the next body's.
    width = len(str(n))
    candidate = _with_check_digit(n // 10, width)
    return candidate if candidate >= n else _with_check_digit(n // 10 + 1, width)


def _pan(entry: _PanEntry, rng: random.Random) -> str:
    if entry.bin is not None:
        middle = entry.length - len(entry.bin) - 1
        body = entry.bin + "".join(rng.choice("0123456789") for _ in range(middle))
        return body + luhn_check_digit(body)
    lo, hi = (int(p) for p in entry.range)  # type: ignore[union-attr]
    width = len(entry.range[0])  # type: ignore[index]
    while True:
        pan = _with_check_digit(rng.randint(lo // 10, hi // 10), width)
        if lo <= pan <= hi:  # the first or last body may put the valid PAN just outside
            return f"{pan:0{width}d}"


def _amount(entry: _AmountEntry, rng: random.Random) -> int:
    if entry.values is not None:
        return rng.choice(entry.values)
    lo, hi = entry.range  # type: ignore[misc]
    return lo + entry.step * rng.randint(0, (hi - lo) // entry.step)


# --------------------------------------------------------------------------- pool


def _allocate(weights: list[float], n: int, rng: random.Random, where: str, source: str) -> list[int]:
    """Entry indices for ``n`` slots in exact proportion to ``weights`` (largest remainder), shuffled."""
    total = sum(weights)
    shares = [w * n / total for w in weights]
    counts = [int(s) for s in shares]
    order = sorted(range(len(weights)), key=lambda i: shares[i] - counts[i], reverse=True)
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    for i, c in enumerate(counts):
        if c == 0:
            reason = f"weight {weights[i]:g} gives no message in a pool of {n}; raise `pool` or the weight"
            raise ConfigError(source, f"{where}.{i}.weight", reason)
    slots = [i for i, c in enumerate(counts) for _ in range(c)]
    rng.shuffle(slots)
    return slots


@dataclass(slots=True)
class _Template:
    """One pre-encoded frame, cut around the fields spliced per request."""

    mti: str
    key_class: str  # match_class(mti)
    terminal: int  # index into the terminal list
    terminal_id: str  # DE 41 as sent (padded to 8)
    segments: tuple[bytes, ...]  # frame bytes between the spliced fields
    head: bytes = b""  # segments[0] + DE 7 + segments[1], for the current second
    middle: bytes = b""  # the bytes between DE 11 and DE 37, local time included, for the current second


def _field_encoder(scanner: Scanner, fd: FieldDef) -> Callable[[str], bytes]:
    """The fastest correct way to write a fixed field's value on the wire."""
    if fd.encoding == "ascii":
        return str.encode  # digits and an12 are the same bytes in ASCII and UTF-8
    if fd.encoding == "bcd" and fd.length % 2 == 0:
        return bytes.fromhex
    return lambda value: scanner.encode_value(fd.number, value)


class RequestFactory:
    """Makes request frames from a mix: ``next(wall_time)`` -> (frame bytes, match key).

    The match key is (MTI class, DE 41, DE 11) as ``match_class`` and the
    scanner give them, so a response is matched by ``(match_class(mti),
    values[41], values[11])``. STANs run per terminal through this worker's
    block of 000001..999999 (``worker`` of ``workers`` processes, so that
    processes never share a STAN), RRNs through its block of the 8-digit
    sequence. Nothing here is thread- or process-shared.
    """

    def __init__(
        self,
        mix: Mix,
        dialect: Dialect,
        framer: Framer,
        *,
        seed: int | str | None = None,
        worker: int = 0,
        workers: int = 1,
        source: str = "<mix>",
        header: bytes = b"",
        now: float | None = None,
        mac: RetailMacKey | CmacKey | None = None,
    ) -> None:
        if not 0 <= worker < workers:
            raise ValueError("worker must be in range(workers)")
        self.mix = mix
        self.dialect = dialect
        self.framer = framer
        if framer.options.tpdu and not header:
            header = DEFAULT_TPDU
        rng = random.Random(seed)
        self.terminals = mix.terminals.names()
        for f in (7, 11, 37, 41, *mix.local_time):
            fd = dialect.fields.get(f)
            if fd is None or not fd.fixed:
                raise ConfigError(source, "local_time" if f in (12, 13) else "", f"dialect {dialect.name} has no fixed field {f}")
        self._spliced = (7, 11, *mix.local_time, 37)
        scanner = Scanner(dialect, self._spliced)
        self._encode = {f: _field_encoder(scanner, dialect.fields[f]) for f in self._spliced}
        self._local_formats = {12: "%H%M%S" if dialect.fields[12].length == 6 else "%y%m%d%H%M%S", 13: "%m%d"}

        # Per-worker blocks: STANs and RRN sequences never meet across processes.
        self._stan_block = STAN_MAX // workers
        self._stan_base = worker * self._stan_block
        self._stan_next = [0] * len(self.terminals)  # per terminal, 0-based within the block
        self._rrn_block = RRN_SEQUENCE // workers
        self._rrn_base = worker * self._rrn_block
        self._rrn_next = 0

        wall = now if now is not None else datetime.now(timezone.utc).timestamp()
        today = datetime.fromtimestamp(wall, timezone.utc).astimezone(CASABLANCA)
        expiry = f"{(today.year + mix.expiry_years) % 100:02d}{today.month:02d}" if mix.expiry_years else None

        n = mix.pool
        mtis = _allocate([e.weight for e in mix.messages], n, rng, "messages", source)
        amounts = _allocate([e.weight for e in mix.amounts], n, rng, "amounts", source)
        pans = _allocate([e.weight for e in mix.pans], n, rng, "pans", source)
        merchants = _allocate([e.weight for e in mix.merchants], n, rng, "merchants", source)
        currencies = _allocate([e.weight for e in mix.currencies], n, rng, "currencies", source)
        terminal_slots = [j % len(self.terminals) for j in range(n)]
        rng.shuffle(terminal_slots)
        placeholders = {"7": "0101000000", "11": "000001", "12": "000000" if dialect.fields[12].length == 6 else "000101000000",
                        "13": "0101", "37": "000000000000"}
        self._pool: list[_Template] = []
        for j in range(n):
            merchant = mix.merchants[merchants[j]]
            terminal_id = self.terminals[terminal_slots[j]].ljust(8)
            msg: Message = {
                "t": mix.messages[mtis[j]].mti,
                "2": _pan(mix.pans[pans[j]], rng),
                "4": f"{_amount(mix.amounts[amounts[j]], rng):012d}",
                "7": placeholders["7"],
                "11": placeholders["11"],
                "37": placeholders["37"],
                "41": terminal_id,
                "42": merchant.id.ljust(15),
                "49": mix.currencies[currencies[j]].code,
            }
            for f in mix.local_time:
                msg[str(f)] = placeholders[str(f)]
            if expiry is not None:
                msg["14"] = expiry
            if merchant.name_location:
                fd43 = dialect.fields.get(43)
                msg["43"] = merchant.name_location.ljust(fd43.length) if fd43 is not None and fd43.fixed else merchant.name_location
            msg.update(mix.fields)
            if mac is not None:
                msg[MacField.field_for(msg)] = "0" * 16  # signed per request (``next``)
            try:
                raw = encode(dialect, msg)
            except MessageError as exc:
                raise ConfigError(source, "", f"its messages don't encode under dialect {dialect.name}: {exc}") from None
            frame = framer.encode(raw, header)
            offset = len(frame) - len(raw)
            spans = scanner.scan(raw).spans
            cuts = [0]
            for f in self._spliced:
                start, end = spans[f]
                cuts += [offset + start, offset + end]
            cuts.append(len(frame))
            segments = tuple(frame[cuts[i]:cuts[i + 1]] for i in range(0, len(cuts), 2))
            self._pool.append(_Template(msg["t"], match_class(msg["t"]), terminal_slots[j], terminal_id, segments))
        # With a MAC key, every frame is signed in ``next``: the MAC covers the message, which starts
        # after the frame's length header (and TPDU), and ends the frame.
        self._mac = mac
        self._mac_field = MacField(dialect) if mac is not None else None
        self._frame_header = offset  # the length header (and TPDU): the same before every message
        self._cursor = 0
        self._second = -1
        self._rrn_prefix = ""
        self._tick(wall)

    @property
    def pool_size(self) -> int:
        return len(self._pool)

    def _tick(self, wall: float) -> None:
        """Re-splice the per-second fields (DE 7 UTC, DE 12/13 local) into every template."""
        second = int(wall)
        self._second = second
        utc = datetime.fromtimestamp(second, timezone.utc)
        local = utc.astimezone(CASABLANCA)
        enc = self._encode
        de7 = enc[7](utc.strftime("%m%d%H%M%S"))
        locals_ = [enc[f](local.strftime(self._local_formats[f])) for f in self.mix.local_time]
        self._rrn_prefix = f"{utc.year % 10}{utc.timetuple().tm_yday:03d}"
        for t in self._pool:
            s = t.segments
            t.head = s[0] + de7 + s[1]
            parts = [s[2]]
            for i, value in enumerate(locals_):
                parts += [value, s[3 + i]]
            t.middle = b"".join(parts)

    def next(self, wall: float) -> tuple[bytes, tuple[str, str, str]]:
        """The next request frame and its match key; ``wall`` is the Unix time (for DE 7/12/13/37)."""
        if wall >= self._second + 1 or wall < self._second:
            self._tick(wall)
        t = self._pool[self._cursor]
        self._cursor += 1
        if self._cursor == len(self._pool):
            self._cursor = 0
        i = t.terminal
        n = self._stan_next[i]
        self._stan_next[i] = n + 1 if n + 1 < self._stan_block else 0
        stan = "%06d" % (self._stan_base + n + 1)
        r = self._rrn_next
        self._rrn_next = r + 1 if r + 1 < self._rrn_block else 0
        rrn = "%s%08d" % (self._rrn_prefix, self._rrn_base + r)
        enc = self._encode
        frame = b"".join((t.head, enc[11](stan), t.middle, enc[37](rrn), t.segments[-1]))
        if self._mac_field is not None:
            assert self._mac is not None
            field = self._mac_field
            body = frame[self._frame_header:-field.width]
            frame = frame[:-field.width] + field.wire(self._mac.mac(body))
        return frame, (t.key_class, t.terminal_id, stan)
