"""The store interface: what the journal, the reversal queue and the operator tools ask of a store.

Two backends satisfy it: ``SQLiteStore`` (store.py, embedded, one machine) and ``PgStore`` (pg.py,
one PostgreSQL database shared by several nodes). Every operation takes the backend's connection
first and runs inside the caller's transaction; ``Journal`` (commit.py) opens and commits the
transactions (one per group commit), so a store never commits by itself.

``SharedStore`` adds what only a database shared by several nodes does: heartbeats, leases on the
reversals owed, taking over a dead node's work, and STAN blocks unique across nodes.

The connection type is the protocol's parameter (``Store[sqlite3.Connection]``,
``Store[psycopg.Connection[Any]]``); nothing here imports a database driver.
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence, TypeVar

from ..security.pan import PanVault
from .store import SafItem, TxnRow

C = TypeVar("C", contravariant=True)

InDoubt = tuple[int, str, str, str, dict[str, str]]  # (txn id, upstream, mti, upstream STAN, reversal fields)


class Store(Protocol[C]):
    """The operations the gateway needs from its store, on connection type ``C``."""

    vault: PanVault
    worker: int
    # What the operations raise when the store fails (``except store.errors as exc``): the
    # caller then asks ``failure_reason`` and ``refused``.
    errors: tuple[type[Exception], ...]

    # -- what a failure says (both are pure: they look at the exception only)

    def failure_reason(self, exc: BaseException) -> str:
        """A short label (metric label, /readyz): disk_full, read_only, locked, io, corrupt, other;
        a server store may add its own (unreachable, timeout...)."""
        ...

    def refused(self, exc: BaseException) -> bool:
        """The store could not take the work now (keep a must-land write and retry it), as opposed
        to the work itself being wrong (a constraint, a bug: the operation's own error)."""
        ...

    # -- transactions (the request path and its answers)

    def insert_txn(self, conn: C, row: dict[str, Any], original: dict[str, str]) -> None: ...

    def insert_txn_many(self, conn: C, calls: list[tuple[Any, ...]]) -> Sequence[BaseException | None] | None:
        """``insert_txn`` of each (row, original), as one batch. A shared store may refuse some rows
        (a duplicate another node journaled first): then it returns, per call, None or the error
        for that row (``core.errors.DuplicateRecorded``), and the batch goes on."""
        ...

    def update_txn(self, conn: C, txn_id: int, state: str, response_code: str | None = None,
                   auth_code: str | None = None) -> None: ...

    def update_txn_many(self, conn: C, calls: list[tuple[Any, ...]]) -> None:
        """``update_txn`` of each (txn_id, state[, response_code[, auth_code]]), in order, as one batch."""
        ...

    def apply_log(self, conn: C, records: list[tuple[Any, ...]]) -> tuple[int, int]:
        """A write-ahead log segment's records (txlog.py): (rows inserted, rows updated); applying
        the same segment twice changes nothing."""
        ...

    # -- the reversal queue (SAF)

    def insert_saf(self, conn: C, item: SafItem) -> None: ...

    def update_saf(self, conn: C, saf_id: int, *, state: str, attempts: int | None = None,
                   next_attempt: float | None = None, stan: str | None = None, result: str | None = None) -> None: ...

    def cancel_unsent_saf(self, conn: C, txn_id: int, result: str) -> int: ...

    def due_saf(self, conn: C, upstream: str, now: float, limit: int) -> list[SafItem]: ...

    def next_due(self, conn: C, upstream: str) -> float | None: ...

    def saf_stats(self, conn: C, upstream: str) -> tuple[int, float | None, float | None, int]: ...

    def list_saf(self, conn: C, states: Sequence[str], limit: int = 100) -> list[tuple[Any, ...]]: ...

    # -- recovery and look-ups

    def in_doubt(self, conn: C, since: float | None = None) -> list[InDoubt]: ...

    def find_original(self, conn: C, listener: str, acquirer: str, terminal: str, merchant: str, stan: str,
                      transmission: str, mti: str) -> tuple[TxnRow, dict[str, str], list[str]] | None: ...

    def find_txns(self, conn: C, *, rrn: str | None = None, stan: str | None = None, terminal: str | None = None,
                  limit: int = 50) -> list[TxnRow]: ...

    # -- small values (STAN counters, marks) and retention

    def set_meta(self, conn: C, key: str, value: str) -> None: ...

    def get_meta(self, conn: C, key: str) -> str | None: ...

    def purge(self, conn: C, now: float, reversal_data_window: float, retention: float,
              batch: int = ...) -> tuple[dict[str, int], bool]: ...


class SharedStore(Store[C], Protocol[C]):
    """A store several gateway nodes share (PostgreSQL): who is alive, who sends which reversal,
    and STANs no two nodes hold at once."""

    node: str

    def heartbeat(self, conn: C, node: str, now: float, ttl: float = ...) -> None: ...

    def claim_slot(self, conn: C, node: str, now: float, ttl: float = ...) -> int: ...

    def expired_nodes(self, conn: C, now: float) -> list[str]: ...

    def lease_due_saf(self, conn: C, node: str, now: float, lease_seconds: float, limit: int,
                      upstream: str | None = None) -> list[SafItem]: ...

    def renew_leases(self, conn: C, node: str, saf_ids: Sequence[int], until: float) -> list[int]: ...

    def release_leases(self, conn: C, node: str, saf_ids: Sequence[int] | None = None) -> int: ...

    def take_over(self, conn: C, dead: str, node: str) -> tuple[int, int]: ...

    def next_stan_block(self, conn: C, link: str, size: int) -> int: ...
