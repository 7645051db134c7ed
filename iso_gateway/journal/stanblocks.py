"""STANs from blocks a shared store hands out, so that nodes sharing a switch never use the same one.

With the PostgreSQL store, each switch (upstream) has one counter in the database
(``PgStore.next_stan_block``): a node takes a block of ``size`` consecutive STANs from it and uses
them on its links to that switch, asking for the next block while half of the current one is still
left. No other node gets a STAN of a block until the counter comes round (999,999 STANs later).

``BlockStans`` is a ``core.matching.StanAllocator`` (what the flow calls): it gives the STANs of the
blocks it holds, in order, skipping those in flight. ``refill`` (the shell's) asks the store for a
block and calls ``add_block`` with it when it comes. Should the blocks run out before the next one
arrives (the database unreachable for a long time), it cycles through the last block it held: its
STANs are this node's alone, so no other node's STAN is ever used (one of them may come back
sooner than the counter would bring it, as after any wrap). Before the first block arrives (none
held yet) it counts from ``start``, as the SQLite journal's counter does.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable

from ..core.matching import PendingTable, StanAllocator

STAN_MAX = 999_999


class BlockStans(StanAllocator):
    def __init__(self, size: int, refill: Callable[[], None], start: int = 1) -> None:
        super().__init__(start)
        self.size = size
        self._refill = refill
        self._blocks: deque[int] = deque()  # first STANs of the blocks held and not yet started
        self._block: int | None = None  # first STAN of the block in use
        self._used = 0  # STANs of it given so far
        self.waiting = False  # a refill was asked for and has not come yet
        self.exhausted = 0  # times the blocks ran out before a new one came

    def add_block(self, first: int) -> None:
        self.waiting = False
        if self._block is None:
            self._block, self._used = first, 0
        else:
            self._blocks.append(first)

    def refill_failed(self) -> None:
        self.waiting = False

    def _ask(self) -> None:
        if not self.waiting:
            self.waiting = True
            self._refill()

    def _next_value(self) -> int:
        if self._block is None:  # no block yet: the local counter (see the module's docstring)
            value = self._next
            self._next = 1 if value >= STAN_MAX else value + 1
            self._ask()
            return value
        if self._used >= self.size:
            if self._blocks:
                self._block, self._used = self._blocks.popleft(), 0
            else:
                self.exhausted += 1
                self._used = 0  # cycle within the last block: this node's STANs only
        value = (self._block - 1 + self._used) % STAN_MAX + 1
        self._used += 1
        if not self._blocks and self._used * 2 >= self.size:
            self._ask()
        self._next = value % STAN_MAX + 1  # ``last`` stays meaningful
        return value

    def allocate(self, in_flight: "PendingTable[Any] | set[str]") -> str:
        limit = self.size if self._block is not None else STAN_MAX
        for _ in range(limit + 1):
            stan = f"{self._next_value():06d}"
            if stan not in in_flight:
                return stan
        raise RuntimeError("every STAN of this node's block is in flight")


# STANs a node takes at a time from the database's counter of a switch.
BLOCK_SIZE = 10_000


def shared_stans(journal: Any, upstream: str, size: int = BLOCK_SIZE) -> BlockStans:
    """The STAN allocator of one switch's links on a node sharing ``journal``'s PostgreSQL store:
    its first block read now (start-up, before traffic), the next ones through the journal's
    thread as they are needed. A block that can't be read is asked for again at the next STAN."""
    key = f"stan:{upstream}"

    def refill() -> None:
        def got(first: Any, error: BaseException | None) -> None:
            if error is not None:
                stans.refill_failed()
            else:
                stans.add_block(int(first))

        journal.submit(journal.store.next_stan_block, key, size, callback=got)

    stans = BlockStans(size, refill)
    try:
        stans.add_block(int(journal.run_sync(journal.store.next_stan_block, key, size)))
    except journal.store.errors as exc:
        journal.note_failure("store", f"no STAN block for {upstream} ({exc})", journal.store.failure_reason(exc))
    return stans
