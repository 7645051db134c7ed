"""Routing: which upstream carries a message, and how long to wait for it.

A ``RouteTable`` is built once from the ``[[routes]]`` config (as ``RouteRule``
values: config.route_table converts) and asked once
per message on the hot path, with the few fields the compiled scanner read
(MTI, DE 2 PAN, DE 49 currency, DE 41 terminal, DE 42 merchant). It is sans-IO:
no trio, no sockets, no clock.

Semantics
---------
* A route matches a message when every criterion it gives matches; an empty
  list matches anything. DE 41/42 are space-padded on the wire, so terminal and
  merchant values are compared with trailing spaces stripped (on both sides).
* Among the matching routes, the one whose BIN entry covers the PAN with the
  longest prefix wins. A prefix "510000" covers PANs that start with it; a
  range "510000-559999" counts as a prefix of its bound length (6) and covers a
  PAN whose first 6 digits fall between the bounds. A route without bins is a
  catch-all at prefix length 0. Ties (same length) go to the route listed first.
* Only a PAN's leading digits are compared with BINs (validation should have
  refused anything else; this keeps routing defined if it did not).
* A message without a PAN (an 0800, say) only matches routes without bins.
* When nothing matches: if some route with bins matches every other criterion,
  the PAN's BIN is unknown -> ``NoRoute(unknown_bin_code or no_route_code,
  "unknown_bin")``; otherwise ``NoRoute(no_route_code, "no_route")``. A message
  without a PAN has no BIN that could be unknown, so it always gets "no_route".

Overlapping ranges are allowed, within one route and across routes: for each
bound length the ranges are cut into disjoint segments at every range start and
every range end + 1, and each segment keeps the (sorted, shared) tuple of routes
covering it, so one ``bisect`` finds every route whose range contains a value.

Cost per lookup: one dict probe (plus one bisect if that length has ranges) per
distinct BIN length present in the table, longest first, then a criteria check
on the few routes that cover the PAN at that length. Nothing is allocated per
call except the PAN slices used as keys. The result objects are built at load.

It must never put a PAN in an error, a label or a ``NoRoute`` reason: reasons
are the two bounded labels above, fit for a metric label.
"""

from __future__ import annotations

from bisect import bisect_right
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Sequence

from .errors import ConfigError

__all__ = ["MAX_BIN_LENGTH", "NoRoute", "Route", "RouteRule", "RouteTable", "parse_bin"]

# ISO/IEC 7812-1: a PAN is at most 19 digits, so no BIN entry can be longer.
MAX_BIN_LENGTH = 19

NO_ROUTE = "no_route"
UNKNOWN_BIN = "unknown_bin"


@dataclass(frozen=True, slots=True)
class Route:
    """Where a message goes: an upstream name and the seconds to wait for its answer."""

    name: str
    upstream: str
    timeout: float


@dataclass(frozen=True, slots=True)
class RouteRule:
    """One ``[[routes]]`` entry as plain values: where it goes, how long to wait, and its
    criteria (an empty tuple matches anything)."""

    name: str
    upstream: str
    timeout: float
    mti: tuple[str, ...] = ()
    bins: tuple[str, ...] = ()
    currencies: tuple[str, ...] = ()
    terminals: tuple[str, ...] = ()
    merchants: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class NoRoute:
    """No route carries the message: answer the front end with ``code``.

    ``reason`` is a bounded label, ``"no_route"`` or ``"unknown_bin"``.
    """

    code: str
    reason: str


def parse_bin(entry: str) -> tuple[str, str]:
    """A BIN entry as ``(low, high)`` bounds of equal length; a prefix has low == high.

    Raises ``ValueError`` with a reason that is safe to print (a BIN is not a PAN).
    """
    low, sep, high = entry.partition("-")
    if not sep:
        high = low
    for bound in (low, high):
        if not (bound.isascii() and bound.isdigit()):
            raise ValueError(f"{entry!r} is not a digit prefix (\"510000\") or range (\"510000-559999\")")
        if not 1 <= len(bound) <= MAX_BIN_LENGTH:
            raise ValueError(f"{entry!r}: a BIN has 1 to {MAX_BIN_LENGTH} digits")
    if len(low) != len(high):
        raise ValueError(f"{entry!r}: both ends of a range need the same number of digits")
    if low > high:
        raise ValueError(f"{entry!r}: the range starts after it ends")
    return low, high


# Criteria of one route: (mtis, currencies, terminals, merchants), None meaning any,
# or None as a whole when the route gives no criterion but BINs.
_Criteria = tuple[frozenset[str] | None, frozenset[str] | None, frozenset[str] | None, frozenset[str] | None] | None


def _criterion(values: Sequence[str], strip: bool = False) -> frozenset[str] | None:
    if not values:
        return None
    return frozenset(v.rstrip(" ") for v in values) if strip else frozenset(values)


def _leading_digits(pan: str) -> str:
    for i, ch in enumerate(pan):
        if not ("0" <= ch <= "9"):
            return pan[:i]
    return pan


class _Level:
    """Every BIN entry of one length.

    ``exact`` maps a key (the PAN's first ``length`` digits) to every route
    covering it, by prefix or by a range that contains it, so a hit needs no
    bisect. ``starts``/``covers`` are the range segments for keys not in
    ``exact``: segment j runs from ``starts[j]`` up to ``starts[j + 1]``
    (exclusive); ``starts[0]`` is "" so that every key falls in some segment.
    """

    __slots__ = ("length", "exact", "starts", "covers")

    def __init__(self, length: int, exact: dict[str, tuple[int, ...]], starts: list[str], covers: list[tuple[int, ...]]):
        self.length = length
        self.exact = exact
        self.starts = starts
        self.covers = covers


class RouteTable:
    """Routes from config, indexed for lookup by longest BIN match.

    ``no_route_code`` and ``unknown_bin_code`` (empty: ``no_route_code``) are the
    answers when nothing matches. ``source`` names the config file in the
    ``ConfigError`` raised for a bad BIN entry; the error's key path is ``routes[i].bins``.
    """

    __slots__ = ("_routes", "_criteria", "_levels", "_first_level", "_catch_all", "_bin_routes", "_no_route", "_unknown_bin")

    def __init__(self, routes: Sequence[RouteRule], no_route_code: str = "92", unknown_bin_code: str = "15",
                 source: str = "config") -> None:
        self._routes = tuple(Route(r.name, r.upstream, r.timeout) for r in routes)
        criteria: list[_Criteria] = []
        for r in routes:
            c = (
                _criterion(r.mti),
                _criterion(r.currencies),
                _criterion(r.terminals, strip=True),
                _criterion(r.merchants, strip=True),
            )
            criteria.append(None if c == (None, None, None, None) else c)
        self._criteria = tuple(criteria)
        self._no_route = NoRoute(no_route_code, NO_ROUTE)
        self._unknown_bin = NoRoute(unknown_bin_code or no_route_code, UNKNOWN_BIN)

        prefixes: dict[int, dict[str, set[int]]] = {}
        ranges: dict[int, list[tuple[str, str, int]]] = {}
        catch_all: list[int] = []
        bin_routes: list[int] = []
        for i, r in enumerate(routes):
            if not r.bins:
                catch_all.append(i)
                continue
            bin_routes.append(i)
            for entry in r.bins:
                try:
                    low, high = parse_bin(entry)
                except ValueError as exc:
                    raise ConfigError(source, f"routes[{i}].bins", str(exc)) from None
                if low == high:
                    prefixes.setdefault(len(low), {}).setdefault(low, set()).add(i)
                else:
                    ranges.setdefault(len(low), []).append((low, high, i))
        self._catch_all = tuple(catch_all)
        self._bin_routes = tuple(bin_routes)

        shared: dict[tuple[int, ...], tuple[int, ...]] = {}  # one tuple object per distinct route set

        def intern(ids: set[int] | Counter[int]) -> tuple[int, ...]:
            t = tuple(sorted(ids))
            return shared.setdefault(t, t)

        levels = []
        for length in sorted(set(prefixes) | set(ranges), reverse=True):
            starts, covers = _segments(length, ranges.get(length, []), intern)
            exact: dict[str, tuple[int, ...]] = {}
            for key, ids in prefixes.get(length, {}).items():
                in_ranges = covers[bisect_right(starts, key) - 1]
                exact[key] = intern(ids.union(in_ranges))
            levels.append(_Level(length, exact, starts, covers))
        self._levels = tuple(levels)
        # _first_level[n]: index of the first (longest) level whose length is <= n,
        # so a PAN of n digits never slices past its end.
        self._first_level = tuple(
            next((j for j, lv in enumerate(levels) if lv.length <= n), len(levels)) for n in range(MAX_BIN_LENGTH + 1)
        )

    @property
    def routes(self) -> tuple[Route, ...]:
        """The routes in config order."""
        return self._routes

    def lookup(
        self, mti: str, pan: str | None, currency: str | None, terminal: str | None, merchant: str | None
    ) -> Route | NoRoute:
        """The route for a message, or why there is none (see the module docstring)."""
        if terminal:
            terminal = terminal.rstrip(" ")
        if merchant:
            merchant = merchant.rstrip(" ")
        criteria = self._criteria
        if pan:
            if not (pan.isascii() and pan.isdigit()):
                pan = _leading_digits(pan)
            n = len(pan)
            levels = self._levels
            for j in range(self._first_level[n if n < MAX_BIN_LENGTH else MAX_BIN_LENGTH], len(levels)):
                level = levels[j]
                key = pan[: level.length]
                ids = level.exact.get(key)
                if ids is None:
                    starts = level.starts
                    if len(starts) == 1:  # no ranges at this length
                        continue
                    ids = level.covers[bisect_right(starts, key) - 1]
                for i in ids:
                    if _fits(criteria[i], mti, currency, terminal, merchant):
                        return self._routes[i]
        for i in self._catch_all:
            if _fits(criteria[i], mti, currency, terminal, merchant):
                return self._routes[i]
        if pan:
            for i in self._bin_routes:
                if _fits(criteria[i], mti, currency, terminal, merchant):
                    return self._unknown_bin
        return self._no_route


def _fits(c: tuple | None, mti: str, currency: str | None, terminal: str | None, merchant: str | None) -> bool:
    """Whether a route's criteria other than BINs (MTIs, currencies, terminals, merchants) admit the message."""
    return c is None or (
        (c[0] is None or mti in c[0])
        and (c[1] is None or currency in c[1])
        and (c[2] is None or terminal in c[2])
        and (c[3] is None or merchant in c[3])
    )


def _segments(length: int, ranges: list[tuple[str, str, int]],
              intern: Callable[[Counter[int]], tuple[int, ...]]) -> tuple[list[str], list[tuple[int, ...]]]:
    """Cut overlapping ranges of one bound length into disjoint segments.

    A sweep over range starts (+1 for the route) and ends + 1 (-1), so nested or
    overlapping ranges cost O(n log n + total coverage), not O(n^2) probes.
    """
    events: dict[str, list[tuple[int, int]]] = {}
    for low, high, i in ranges:
        events.setdefault(low, []).append((i, 1))
        after = int(high) + 1
        if after < 10**length:  # a range ending in 9...9 runs to the end of the key space
            events.setdefault(str(after).zfill(length), []).append((i, -1))
    starts = [""]
    covers: list[tuple[int, ...]] = [()]
    active: Counter[int] = Counter()
    for point in sorted(events):
        for i, delta in events[point]:
            active[i] += delta
            if not active[i]:
                del active[i]
        t = intern(active)
        if t == covers[-1]:
            continue
        starts.append(point)
        covers.append(t)
    return starts, covers
