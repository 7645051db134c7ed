"""Request validation: per-MTI rule tables from ``specs/rules/``, answering a DE 39 code.

The gateway scans a front end's request with a Scanner whose wanted set is
``RuleSet.fields_needed`` and hands the MTI, the bitmap and the scanned values
to ``RuleSet.validate``, which returns ``None`` (pass it on) or a ``Rejection``
(answer it with that response code). A rule file is data: which fields each
MTI must carry, which values are checked and how, and the response code of
every check. ``specs/rules/default.toml`` documents the format.

Checks run in one fixed order, so the first failure decides the code:

1. MTI: an MTI with no rules is ``unsupported_mti``.
2. Mandatory fields, lowest number first (from the bitmap, not the values);
   then conditional fields, in file order (``missing_field``).
3. ISO type and length, per the dialect, of every field in ``values``; the
   lowest failing field number is reported (``field_type``).
4. Value checks, by kind in this order, then by field number: ``stan``,
   ``transmission_time``, ``processing_code``, ``pan``, ``expiry``,
   ``amount``, ``currency``. Message integrity (format errors) first, then
   whether the transaction is supported, then the card, then the money.

This runs on the hot path: everything that can be is compiled when the rule
file is loaded (one plan per MTI, one prebuilt Rejection per outcome) and per
dialect on first use, so a call builds no dict, compiles no regex and only
allocates for the DE 7 datetime.

Reading and checking rule files is the shell's job (specfiles.py): a RuleSet is
built from a file's checked contents as plain data.

It must never touch a socket or a file, read the clock (``now`` is passed in), or put a
field value in a Rejection or an error: a Rejection names a field number and a
bounded reason label, nothing else.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from .dialect import Dialect, check_field_type
from .errors import ConfigError

__all__ = [
    "CHECK_KINDS",
    "REASONS",
    "Currency",
    "Rejection",
    "RuleSet",
    "luhn_ok",
]

# The value checks a rule file can attach to a field, in the order they run.
CHECK_KINDS = ("stan", "transmission_time", "processing_code", "pan", "expiry", "amount", "currency")

# Every reason label a Rejection can carry (bounded: safe as a metric label).
# The defaults are the ISO 8583:1987 meanings (docs/domain.md §4).
DEFAULT_CODES: dict[str, str] = {
    "unsupported_mti": "12",  # invalid transaction
    "missing_field": "30",  # format error
    "field_type": "30",
    "zero_stan": "30",
    "bad_stan": "30",
    "bad_transmission_time": "30",
    "processing_code": "12",  # invalid transaction for this MTI
    "pan_length": "14",  # invalid card number
    "pan_luhn": "14",
    "bad_expiry": "30",  # not a YYMM: a format error, not a card fact
    "expired_card": "54",  # 54 rather than 33: the gateway never asks for a pick-up
    "bad_amount": "13",  # invalid amount
    "unknown_currency": "13",
}
REASONS = tuple(DEFAULT_CODES)

# DE 7 carries no year, so the year is the one that puts the time nearest to
# `now`; that is only unambiguous while the allowed skew stays under half a year.
MAX_CLOCK_SKEW = 180 * 86400
# docs/domain.md §5 suggests a few minutes; front ends with drifting
# clocks are common and a wrong DE 7 harms no one downstream, so the default is
# generous and a host that wants it tight says so in its rule file.
DEFAULT_CLOCK_SKEW = 86400

# ISO/IEC 7812: a PAN is 12 to 19 digits, the last a Luhn check digit.
PAN_MIN, PAN_MAX = 12, 19

_UTC = _dt.timezone.utc
# Feb has 29: DE 7 and DE 13 have no year, so 0229 is a real date in some year.
_DAYS_IN_MONTH = (0, 31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)


# --------------------------------------------------------------------------- results


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why a request is refused: the DE 39 code to answer, a bounded reason label
    (one of ``REASONS``) and the field number as text. Never a field value."""

    code: str
    reason: str
    field: str | None = None


@dataclass(frozen=True, slots=True)
class Currency:
    """One ISO 4217 entry. ``minor`` is the number of decimals in DE 4 (MAD: 2),
    None for units that are not a means of payment (XAU, XDR, XTS, XXX...)."""

    numeric: str
    alpha: str
    minor: int | None


# --------------------------------------------------------------------------- value checks

_DOUBLED = str.maketrans("0123456789", "0246813579")


def luhn_ok(digits: str) -> bool:
    """The ISO/IEC 7812 mod-10 check over an ASCII digit string (check digit last)."""
    # Summing the code points and taking 48 off per digit is the digit sum,
    # done in C rather than a Python loop: about 0.3 µs for 16 digits.
    total = sum(digits[-1::-2].encode()) + sum(digits[-2::-2].translate(_DOUBLED).encode())
    return (total - 48 * len(digits)) % 10 == 0


_Check = Callable[[str, _dt.datetime], "Rejection | None"]


def _digits(v: str) -> bool:
    return v.isdigit() and v.isascii()


def _stan_check(zero: Rejection, bad: Rejection) -> _Check:
    def check(v: str, now: _dt.datetime) -> Rejection | None:
        if len(v) != 6 or not _digits(v):
            return bad
        if v == "000000":  # section 2.2: 000001-999999, zero never allocated
            return zero
        return None

    return check


def _transmission_time_check(bad: Rejection, skew: float) -> _Check:
    limit = _dt.timedelta(seconds=skew)
    half_year = _dt.timedelta(days=183)

    def check(v: str, now: _dt.datetime) -> Rejection | None:
        if len(v) != 10 or not _digits(v):
            return bad
        # divmod on one int is twice as fast as five slices and int()s.
        x, second = divmod(int(v), 100)
        x, minute = divmod(x, 100)
        x, hour = divmod(x, 100)
        month, day = divmod(x, 100)
        if not (1 <= month <= 12 and 1 <= day <= _DAYS_IN_MONTH[month] and hour < 24 and minute < 60 and second < 60):
            return bad
        # No year on the wire: take this year, or the year next to it when the
        # date is over half a year away (a December time read in January).
        year = now.year
        try:
            diff = _dt.datetime(year, month, day, hour, minute, second, tzinfo=_UTC) - now
        except ValueError:  # 29 February outside a leap year
            diff = None
        if diff is None or not -half_year <= diff <= half_year:
            for other in (year - 1, year + 1):
                try:
                    d = _dt.datetime(other, month, day, hour, minute, second, tzinfo=_UTC) - now
                except ValueError:
                    continue
                if diff is None or abs(d) < abs(diff):
                    diff = d
        if diff is None or abs(diff) > limit:
            return bad
        return None

    return check


def _processing_code_check(bad: Rejection, allowed: frozenset[str]) -> _Check:
    def check(v: str, now: _dt.datetime) -> Rejection | None:
        return None if v[:2] in allowed else bad

    return check


def _pan_check(bad_length: Rejection, bad_luhn: Rejection) -> _Check:
    def check(v: str, now: _dt.datetime) -> Rejection | None:
        if not PAN_MIN <= len(v) <= PAN_MAX or not _digits(v):
            return bad_length
        if not luhn_ok(v):
            return bad_luhn
        return None

    return check


def _expiry_check(bad: Rejection, expired: Rejection) -> _Check:
    def check(v: str, now: _dt.datetime) -> Rejection | None:
        if len(v) != 4 or not _digits(v):
            return bad
        yy, month = divmod(int(v), 100)
        if not 1 <= month <= 12:
            return bad
        # YY in the century that puts it within 50 years of now.
        now_year = now.year
        year = now_year - now_year % 100 + yy
        if year < now_year - 50:
            year += 100
        elif year >= now_year + 50:
            year -= 100
        # Valid through the last day of its month (CMF DE 14), in UTC.
        if year < now_year or (year == now_year and month < now.month):
            return expired
        return None

    return check


def _amount_check(bad: Rejection) -> _Check:
    def check(v: str, now: _dt.datetime) -> Rejection | None:
        if not _digits(v) or not v.strip("0"):
            return bad
        return None

    return check


def _currency_check(bad: Rejection, known: frozenset[str]) -> _Check:
    def check(v: str, now: _dt.datetime) -> Rejection | None:
        return None if v in known else bad

    return check


# --------------------------------------------------------------------------- compiled rules


@dataclass(frozen=True, slots=True)
class _Condition:
    field: int
    bit: int  # the bit of `field` in a 128-bit bitmap
    when: int
    when_bit: int
    starts_with: tuple[str, ...] | None
    missing: Rejection


@dataclass(frozen=True, slots=True)
class _MtiPlan:
    mandatory_mask: int
    conditions: tuple[_Condition, ...]
    checks: tuple[tuple[int, _Check], ...]  # (field, check), in CHECK_KINDS order


def _bit(field: int) -> int:
    return 1 << (128 - field)


# How a field's ISO type is checked on the hot path: (shortest, longest,
# predicate, FieldDef). The common types are tried with a str method (C speed,
# no regex); a value that fails it, or a type with no such method (lo > hi
# sends it straight there), goes to check_field_type, which decides.
_TypeEntry = tuple[int, int, Callable[[str], bool], Any]
_FAST_TYPES: dict[str, Callable[[str], bool]] = {
    "n": str.isdigit,
    "ans": str.isprintable,
    "an": str.isalnum,  # no spaces: an RRN or an approval code; a padded one takes the slow path
    "a": str.isalpha,
}


def _type_table(dialect: Dialect) -> list[_TypeEntry | None]:
    table: list[_TypeEntry | None] = [None] * 129
    for num, fd in dialect.fields.items():
        pred = _FAST_TYPES.get(fd.type)
        if pred is None:
            table[num] = (1, 0, str.isascii, fd)
        else:
            table[num] = (fd.length if fd.fixed else 1, fd.length, pred, fd)
    return table


class RuleSet:
    """One rule file compiled: a plan per MTI and the set of fields the rules read.

    Scan requests with ``Scanner(dialect, ruleset.fields_needed)`` so that
    every field a rule reads, and every field whose type is checked, is in
    ``values``. A RuleSet is immutable once built and can serve any number of
    dialects.
    """

    __slots__ = (
        "name",
        "title",
        "source",
        "fields_needed",
        "currencies",
        "_plans",
        "_unsupported",
        "_missing",
        "_type_rejections",
        "_type_tables",
    )

    def __init__(self, rules: Mapping[str, Any], source: str) -> None:
        """``rules`` is a rule file's checked contents as plain data (specfiles.py reads and
        checks the file: every key present, defaults filled in); ``source`` names it in errors."""
        self.name = rules["name"]
        self.title = rules["title"]
        self.source = source
        self.currencies: dict[str, Currency] = {
            key: Currency(key, c["alpha"], c["minor"]) for key, c in sorted(rules["currencies"].items())
        }
        # Units with no minor unit (metals, SDR, test, "no currency") are not a payment currency.
        payable = frozenset(k for k, c in self.currencies.items() if c.minor is not None)
        codes = rules["codes"]

        def rej(reason: str, field: int | None = None) -> Rejection:
            return Rejection(codes[reason], reason, None if field is None else str(field))

        self._unsupported = rej("unsupported_mti")
        missing = {n: rej("missing_field", n) for n in range(2, 129)}
        self._missing = missing
        # Keyed by any int a caller's values may hold, so the reject path never builds one.
        self._type_rejections = {n: rej("field_type", n) for n in range(129)}
        self._type_tables: dict[int, tuple[Dialect, list[_TypeEntry | None]]] = {}

        needed: set[int] = set(rules["type_checked"])
        plans: dict[str, _MtiPlan] = {}
        for mti, m in rules["mti"].items():
            where = f"mti.{mti}"
            mask = 0
            for n in m["mandatory"]:
                mask |= _bit(n)
            needed.update(m["mandatory"])
            conditions = []
            for c in m["conditional"]:
                conditions.append(
                    _Condition(
                        c["field"],
                        _bit(c["field"]),
                        c["when"],
                        _bit(c["when"]),
                        tuple(c["starts_with"]) if c["starts_with"] is not None else None,
                        missing[c["field"]],
                    )
                )
                needed.update((c["field"], c["when"]))
            checks: list[tuple[int, int, _Check]] = []
            for key, kind in m["checks"].items():
                field = int(key)
                if kind == "off":
                    continue
                if kind == "stan":
                    fn = _stan_check(rej("zero_stan", field), rej("bad_stan", field))
                elif kind == "transmission_time":
                    skew = m["clock_skew"] if m["clock_skew"] is not None else rules["clock_skew"]
                    fn = _transmission_time_check(rej("bad_transmission_time", field), skew)
                elif kind == "pan":
                    fn = _pan_check(rej("pan_length", field), rej("pan_luhn", field))
                elif kind == "expiry":
                    fn = _expiry_check(rej("bad_expiry", field), rej("expired_card", field))
                elif kind == "amount":
                    fn = _amount_check(rej("bad_amount", field))
                else:  # currency
                    if not payable:
                        raise ConfigError(
                            source, f"{where}.checks.{key}", "a currency check needs a [currencies] table"
                        )
                    fn = _currency_check(rej("unknown_currency", field), payable)
                checks.append((CHECK_KINDS.index(kind), field, fn))
                needed.add(field)
            if m["processing_codes"] is not None:
                fn = _processing_code_check(rej("processing_code", 3), frozenset(m["processing_codes"]))
                checks.append((CHECK_KINDS.index("processing_code"), 3, fn))
                needed.add(3)
            checks.sort(key=lambda c: (c[0], c[1]))
            plans[mti] = _MtiPlan(mask, tuple(conditions), tuple((f, fn) for _, f, fn in checks))
        self._plans = plans
        self.fields_needed: frozenset[int] = frozenset(needed)

    def __repr__(self) -> str:
        return f"RuleSet({self.name!r}, mtis={sorted(self._plans)}, source={self.source!r})"

    def mtis(self) -> frozenset[str]:
        """The MTIs this rule set accepts; any other is answered ``unsupported_mti``."""
        return frozenset(self._plans)

    def currency(self, numeric: str) -> Currency | None:
        return self.currencies.get(numeric)

    def check_dialect(self, dialect: Dialect) -> None:
        """Raise ConfigError when a rule names a field the dialect does not define
        (a message could never carry it). Meant for start-up, not the hot path."""
        for n in sorted(self.fields_needed):
            if n not in dialect.fields:
                reason = f"field {n} is used by a rule but not defined in dialect {dialect.name}"
                raise ConfigError(self.source, "", reason)

    def validate(
        self,
        dialect: Dialect,
        mti: str,
        bitmap: int,
        values: dict[int, str],
        now: _dt.datetime,
    ) -> Rejection | None:
        """None when the request passes every rule, else the first failure in
        the documented order. ``bitmap`` has field n's bit at ``1 << (128 - n)``
        (the Scanner's); ``values`` holds at least the present fields of
        ``fields_needed``; ``now`` is timezone-aware UTC."""
        plan = self._plans.get(mti)
        if plan is None:
            return self._unsupported

        missing = plan.mandatory_mask & ~bitmap
        if missing:
            # The highest set bit is the lowest field number.
            return self._missing[129 - missing.bit_length()]
        for cond in plan.conditions:
            if not bitmap & cond.bit and bitmap & cond.when_bit:
                if cond.starts_with is None:
                    return cond.missing
                v = values.get(cond.when)
                if v is not None and v.startswith(cond.starts_with):
                    return cond.missing

        entry = self._type_tables.get(id(dialect))
        if entry is None or entry[0] is not dialect:
            entry = (dialect, _type_table(dialect))
            self._type_tables[id(dialect)] = entry
        table = entry[1]
        bad: int | None = None
        for num, v in values.items():
            try:
                lo, hi, fast, fd = table[num]  # type: ignore[misc]
            except (IndexError, TypeError):  # not a field of this dialect
                if bad is None or num < bad:
                    bad = num
                continue
            if lo <= len(v) <= hi and fast(v) and v.isascii():
                continue
            if check_field_type(fd, v) is not None and (bad is None or num < bad):
                bad = num
        if bad is not None:
            return self._type_rejections.get(bad) or Rejection(self._type_rejections[2].code, "field_type", str(bad))

        for field, check in plan.checks:
            v = values.get(field)
            if v is not None:
                r = check(v, now)
                if r is not None:
                    return r
        return None
