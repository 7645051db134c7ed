"""Recognising a front end's repeated request, so the switch never sees it twice.

A request is a duplicate of an earlier one when the same listener gets the same
terminal (41), merchant (42), STAN (11) and transmission time (7) within
``window`` seconds (the STAN is unique only for a day, so the time is part of
the key; domain ref. 2.2-2.3), with the same amount (4) and RRN (37): a true
retransmission repeats those too, while two different payments that happen to
share a terminal, STAN and second are both forwarded. An entry is in flight (the first request is
still waiting for the switch: duplicates wait with it) or done (its response
code and authorization code are kept for replay). Only codes are kept, never a
message, so nothing here holds card data.

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
    __slots__ = ("key", "created", "request", "followers", "rc", "auth_code", "response")

    def __init__(self, key: Key, created: float, request: Any) -> None:
        self.key = key
        self.created = created
        self.request = request  # the first request while it is in flight, then None
        self.followers: list[Any] = []  # duplicates waiting for the first one's answer
        self.rc: str | None = None
        self.auth_code: str | None = None
        self.response: bytes | None = None  # the switch's answer, only until the followers have it

    @property
    def in_flight(self) -> bool:
        return self.rc is None


class DuplicateTable:
    def __init__(self, window: float, max_entries: int = MAX_ENTRIES) -> None:
        self.window = window
        self.max_entries = max_entries
        self._entries: OrderedDict[Key, DuplicateEntry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, key: Key, now: float) -> DuplicateEntry | None:
        entry = self._entries.get(key)
        if entry is not None and now - entry.created > self.window:
            del self._entries[key]
            return None
        return entry

    def start(self, key: Key, request: Any, now: float) -> DuplicateEntry:
        entries = self._entries
        entry = entries[key] = DuplicateEntry(key, now, request)
        cutoff = now - self.window
        while entries:
            first = next(iter(entries.values()))
            if first.created >= cutoff and len(entries) <= self.max_entries:
                break
            if first.in_flight and len(entries) <= self.max_entries:
                break  # keep in-flight entries: their duplicates must still wait
            entries.popitem(last=False)
        return entry
