"""Matching requests to responses on one upstream link: STANs, the pending table, deadlines.

The gateway gives every request it sends upstream its own STAN (DE 11), unique
among the link's requests in flight, so two front ends that use the same STAN
at the same time can't be confused. A response is matched on its MTI class
(0110 answers 0100, 0430 answers 0420/0421: jPOS QMUX's mapping) plus that
STAN, plus any extra fields the link is configured to compare.

Sans-IO: time comes in as ``now`` (the shell passes ``trio.current_time()``),
nothing here sleeps, reads or writes.
"""

from __future__ import annotations

import heapq
from itertools import count
from typing import Generic, Hashable, Iterator, TypeVar

from .message import match_class

STAN_MAX = 999999

T = TypeVar("T")
Key = tuple[Hashable, ...]


def match_key(mti: str, stan: str, extra: tuple[str, ...] = ()) -> Key:
    """The key a request is stored under and its response is looked up by."""
    return (match_class(mti), stan, *extra)


class StanAllocator:
    """STANs 000001..999999, wrapping, never 000000, skipping values still in flight.

    ``start`` lets the shell resume after the last value it persisted, so a
    restart does not reuse STANs the switch saw recently (docs/domain.md §2.1).
    """

    def __init__(self, start: int = 1) -> None:
        self._next = start if 1 <= start <= STAN_MAX else 1

    @property
    def last(self) -> int:
        return self._next - 1 if self._next > 1 else STAN_MAX

    def allocate(self, in_flight: "PendingTable[T] | set[str]") -> str:
        for _ in range(STAN_MAX):
            value = self._next
            self._next = 1 if value >= STAN_MAX else value + 1
            stan = f"{value:06d}"
            if stan not in in_flight:
                return stan
        raise RuntimeError("every STAN is in flight")  # 999,999 requests in flight on one link


class PendingTable(Generic[T]):
    """Requests waiting for a response, by match key, with deadlines.

    Deadlines sit in a heap with lazy deletion: popping a matched entry is O(1)
    and expiry is O(log n) per entry. The heap holds only (deadline, sequence,
    key), never the entry, so a matched request is freed at once rather than
    when its deadline passes; when stale heap items outnumber live ones the heap
    is rebuilt, so its size stays proportional to what is in flight.
    """

    def __init__(self) -> None:
        self._entries: dict[Key, tuple[T, float, int]] = {}
        self._stans: dict[Hashable, int] = {}  # keyed by a match key's STAN, key[1]
        self._heap: list[tuple[float, int, Key]] = []
        self._seq = count()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, stan: object) -> bool:
        """Whether a STAN is in flight (used by the allocator)."""
        return stan in self._stans

    @property
    def scheduled(self) -> int:
        """Deadlines in the heap, stale ones included (bounded by 4 x in flight + 1024)."""
        return len(self._heap)

    def add(self, key: Key, entry: T, deadline: float) -> None:
        if key in self._entries:
            raise KeyError("a request with this match key is already in flight")
        seq = next(self._seq)
        self._entries[key] = (entry, deadline, seq)
        stan = key[1]
        self._stans[stan] = self._stans.get(stan, 0) + 1
        heap = self._heap
        heapq.heappush(heap, (deadline, seq, key))
        if len(heap) > 4 * len(self._entries) + 1024:
            self._heap = [(d, q, k) for k, (_, d, q) in self._entries.items()]
            heapq.heapify(self._heap)

    def pop(self, key: Key) -> T | None:
        item = self._entries.pop(key, None)
        if item is None:
            return None
        self._forget_stan(key)
        return item[0]

    def _forget_stan(self, key: Key) -> None:
        stan = key[1]
        left = self._stans[stan] - 1
        if left:
            self._stans[stan] = left
        else:
            del self._stans[stan]

    def _live(self, seq: int, key: Key) -> bool:
        item = self._entries.get(key)
        return item is not None and item[2] == seq

    def next_deadline(self) -> float | None:
        heap = self._heap
        while heap and not self._live(heap[0][1], heap[0][2]):
            heapq.heappop(heap)  # matched or removed already
        return heap[0][0] if heap else None

    def expire(self, now: float) -> list[T]:
        """Remove and return every entry whose deadline is at or before ``now``."""
        out: list[T] = []
        heap = self._heap
        entries = self._entries
        while heap and heap[0][0] <= now:
            _, seq, key = heapq.heappop(heap)
            item = entries.get(key)
            if item is not None and item[2] == seq:
                del entries[key]
                self._forget_stan(key)
                out.append(item[0])
        if not entries:
            heap.clear()
        return out

    def drain(self) -> list[T]:
        """Remove and return everything (the link dropped)."""
        out = [item[0] for item in self._entries.values()]
        self._entries.clear()
        self._stans.clear()
        self._heap.clear()
        return out

    def values(self) -> Iterator[T]:
        return iter([item[0] for item in self._entries.values()])
