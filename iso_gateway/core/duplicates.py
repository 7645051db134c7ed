"""Recognising a front end's repeated request, so the switch never sees it twice.

A request is a duplicate of an earlier one when the same listener gets the same
terminal (41), merchant (42), STAN (11) and transmission time (7) within
``window`` seconds (the STAN is unique only for a day, so the time is part of
the key; docs/domain.md §2.1, §2.3), with the same amount (4) and RRN (37): a true
retransmission repeats those too, while two different payments that happen to
share a terminal, STAN and second are both forwarded. An entry is in flight (the first request is
still waiting for the switch: duplicates wait with it, each held as the caller's
own value, e.g. its connection and raw request, until the first one's answer
comes) or done (only its response code and authorization code are kept for
replay, never a message: a done entry holds no card data).

Sans-IO: ``now`` comes in; the table is bounded in size and time.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

Key = str  # the listener and the identity fields joined: one compact string per entry

# Entries kept at most, whatever the window: a bound on memory under any load
# (about 250 bytes each: 25 MB at the limit, when the window is effectively shorter).
MAX_ENTRIES = 100_000


class DuplicateEntry:
    """A request still in flight, and the duplicates waiting for its answer."""

    __slots__ = ("key", "created", "request", "followers")

    def __init__(self, key: Key, created: float, request: Any) -> None:
        self.key = key
        self.created = created
        self.request = request
        self.followers: list[Any] = []  # duplicates waiting for the first one's answer


# A completed request: (created, response code, authorization code). A plain tuple of
# strings and a float, which the garbage collector stops tracking: a table of 100,000
# of them then costs a full collection nothing (objects cost tens of milliseconds).
Done = tuple


class DuplicateTable:
    def __init__(self, window: float, max_entries: int = MAX_ENTRIES) -> None:
        self.window = window
        self.max_entries = max_entries
        self._entries: OrderedDict[Key, DuplicateEntry | Done] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, key: Key, now: float) -> DuplicateEntry | Done | None:
        """The entry for ``key``: a DuplicateEntry (in flight), a Done tuple, or None."""
        entry = self._entries.get(key)
        if entry is not None and now - _created(entry) > self.window:
            del self._entries[key]
            return None
        return entry

    def start(self, key: Key, request: Any, now: float) -> DuplicateEntry:
        entries = self._entries
        entry = entries[key] = DuplicateEntry(key, now, request)
        cutoff = now - self.window
        while entries:
            first = next(iter(entries.values()))
            if len(entries) <= self.max_entries and (_created(first) >= cutoff or isinstance(first, DuplicateEntry)):
                break  # within the window, or still in flight (its duplicates must still wait)
            entries.popitem(last=False)
        return entry

    def complete(self, entry: DuplicateEntry, rc: str, auth_code: str | None) -> None:
        """The first request has its answer: keep only the codes, for replays."""
        if self._entries.get(entry.key) is entry:
            self._entries[entry.key] = (entry.created, rc, auth_code)
        entry.request = None


def _created(entry: DuplicateEntry | Done) -> float:
    return entry.created if isinstance(entry, DuplicateEntry) else entry[0]
