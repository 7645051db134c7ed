"""Durable reversals: queue them before the front end hears 91, send them until the switch acknowledges.

``DurableReversals`` is the gateway's ``ReversalSink``: a timed-out (or
undeliverable) authorization becomes a SAF row in the journal, committed before
the front end is answered. One ``SafWorker`` per upstream sends due items over
the upstream's links (0420, then 0421 repeats), a window of them at a time so
one item the switch keeps refusing never blocks the rest, drains the queue as
soon as a link is ready again, and parks an item once its retry budget is spent.
The queue lives in the journal, so it survives restarts; the worker polls it,
so ``iso-gateway saf retry`` from another process is picked up.
"""

from __future__ import annotations

import logging
import random
import sqlite3
import time
from typing import TYPE_CHECKING, Callable

import trio

from .errors import IsoGatewayError
from .journal import (
    ANSWERED, NOT_SENT, REVERSED, SAF_ACKED, SAF_PARKED, SAF_PENDING, SAF_SENT, STORE_RETRY_INITIAL, STORE_RETRY_MAX,
    TIMED_OUT, Backoff, Journal, SafItem, failure_reason, new_id,
)
from .matching import match_key
from .message import encode
from .saf import RetryPolicy, attempt_mti, build_reversal
from .scanner import Scan

if TYPE_CHECKING:
    from .gateway import FrontRequest, Gateway
    from .links import Upstream, UpstreamConnection
    from .writer import FrameWriter

log = logging.getLogger("iso_gateway.reversals")

# Seconds between looks at the SAF table for due items.
SAF_POLL = 1.0
# Seconds between full counts of the SAF table (the saf gauges): counting a large
# backlog reads every row, so it is not done on every look.
STATS_EVERY = 5.0


def saf_label(saf_id: int) -> str:
    """How a SAF item's id is shown to people: digits grouped by underscores (1_882_994_...),
    which the saf commands accept as typed, and which the log's PAN safety net, looking
    for unbroken runs of 12 to 19 digits, leaves alone."""
    return f"{saf_id:_}"


def policy_of(upstream: "Upstream") -> RetryPolicy:
    c = upstream.cfg
    return RetryPolicy(first_delay=c.saf_first_delay, initial=c.saf_retry_initial, maximum=c.saf_retry_max,
                       budget=c.saf_budget)


class DurableReversals:
    """The reversal sink backed by the journal's SAF table."""

    def __init__(self, gateway: "Gateway", journal: Journal) -> None:
        self.gateway = gateway
        self.journal = journal
        self.workers: dict[str, SafWorker] = {}
        self.recovery_owed = False  # the store could not be read at start (see ``recover``)

    # -- ReversalSink

    def timed_out(self, request: "FrontRequest", reason: str,
                  then: Callable[[], "FrameWriter | None"]) -> "FrameWriter | None":
        """Queue a reversal of ``request`` if it reached the switch; answer the front end once it is durable.

        Returns the writer ``then`` used when it ran at once (nothing to store)."""
        if not request.sent or request.mti[1] not in "12":
            self._note_txn(request, TIMED_OUT if request.sent else NOT_SENT)
            return then()
        self._queue(request, reason, auth_code=None, then=then)
        return None

    def late_response(self, conn: "UpstreamConnection", scan: Scan, raw: bytes, request: "FrontRequest | None") -> None:
        if request is None or request.txn_id is None:
            return
        rc = scan.values.get(39, "")
        store = self.journal.store
        if rc == "00":
            log.warning("late approval on %s: its reversal stays queued", conn.cfg.name)
            return
        metrics = self.gateway.metrics

        def cancelled(count: int | None, error: BaseException | None) -> None:
            if count:
                metrics.reversals(conn.cfg.name, "cancelled").inc()
                log.info("late decline (%s) on %s: its unsent reversal is cancelled", rc, conn.cfg.name)

        self.journal.submit(store.cancel_unsent_saf, request.txn_id, f"late response {rc}", callback=cancelled)
        self.journal.set_state(request.txn_id, TIMED_OUT, rc)

    def undeliverable(self, request: "FrontRequest", scan: Scan, raw: bytes) -> None:
        """The switch answered, the front end can't be told: an approval is reversed."""
        rc = scan.values.get(39, "")
        if rc == "00" and request.mti[1] in "12":
            log.warning("approval for a front end that is gone: reversing it")
            self._queue(request, "undeliverable", auth_code=scan.values.get(38), then=lambda: None)
        elif request.txn_id is not None:
            self.journal.set_state(request.txn_id, ANSWERED, rc)

    # -- queueing

    def _note_txn(self, request: "FrontRequest", state: str) -> None:
        if request.txn_id is not None:
            self.journal.set_state(request.txn_id, state)

    def _queue(self, request: "FrontRequest", reason: str, auth_code: str | None,
               then: Callable[[], "FrameWriter | None"]) -> None:
        upstream = request.upstream
        item = self.make_item(upstream, request.reversal_fields(), request.mti, request.upstream_stan, reason,
                              request.txn_id, auth_code)
        store = self.journal.store
        if request.txn_id is not None:
            self.journal.set_state(request.txn_id, TIMED_OUT)
        metrics = self.gateway.metrics

        def durable(result: object, error: BaseException | None) -> "FrameWriter | None":
            if error is not None:
                log.error("reversal could not be stored (%s)", type(error).__name__)
            else:
                metrics.reversals(upstream.cfg.name, "queued").inc()
                log.info("reversal %s queued for %s (%s, RRN %s)", saf_label(item.id), upstream.cfg.name, reason,
                         item.message.get("37", "?"))
                worker = self.workers.get(upstream.cfg.name)
                if worker is not None:
                    worker.wake()
            return then()

        self.journal.submit(store.insert_saf, item, callback=durable)

    def make_item(self, upstream: "Upstream", original: dict[str, str], original_mti: str, upstream_stan: str,
                  reason: str, txn_id: int | None, auth_code: str | None) -> SafItem:
        cfg = upstream.cfg
        now = time.time()
        stan = upstream_stan if cfg.reversal_stan == "original" else ""
        message = build_reversal(original, original_mti=original_mti, upstream_stan=upstream_stan,
                                 reversal_mti=cfg.reversal_mti, stan=stan or "000000",
                                 reason_code=cfg.reversal_codes.get(reason), auth_code=auth_code)
        return SafItem(id=new_id(), txn_id=txn_id, upstream=cfg.name, state=SAF_PENDING, reason=reason,
                       mti=cfg.reversal_mti, stan=stan, f90=message["90"], attempts=0,
                       next_attempt=now + policy_of(upstream).first_delay, created=now, message=message)

    # -- start-up

    def recover(self, in_doubt: list | None = None) -> int:
        """Queue a reversal for every transaction that was sent and never answered (a crash). Start-up,
        or ``recover_owed`` when the store could not be read then.

        The reversals go through the journal's thread (writes it keeps until the store takes
        them), so a full disk delays them and loses none."""
        store = self.journal.store
        count = 0
        if in_doubt is None and not self.journal.replayed.is_set():
            # The last run's log is not all in SQLite yet (the store refused it at start): its
            # in-doubt transactions would be missed. Recovery waits for it (``recover_owed``).
            log.warning("recovery waits: %d log segments of the last run are not in the journal yet",
                        len(self.journal.unreplayed))
            self.recovery_owed = True
            return 0
        if in_doubt is None:
            try:
                in_doubt = self.journal.run_sync(store.in_doubt)
            except sqlite3.Error as exc:  # counted, shown by /readyz, and tried again by the SAF workers
                self.journal.note_failure("recovery", f"in-doubt transactions can't be read ({exc})",
                                          failure_reason(exc))
                self.recovery_owed = True
                return 0
        for txn_id, upstream_name, mti, upstream_stan, original in in_doubt:
            upstream = self.gateway.upstreams.get(upstream_name)
            if upstream is None or mti[1:2] not in ("1", "2") or not original:
                continue
            item = self.make_item(upstream, original, mti, upstream_stan, "in_doubt", txn_id, None)
            self.journal.submit(store.insert_saf, item)
            self.journal.submit(store.update_txn, txn_id, TIMED_OUT, None, None)
            self.gateway.metrics.reversals(upstream_name, "queued").inc()
            count += 1
        if count:
            log.warning("recovery: %d transactions were in doubt after a restart; reversals queued", count)
        return count

    async def recover_owed(self) -> None:
        """The recovery the store could not read at start, now (raises what the store raises)."""
        if self.recovery_owed:
            self.recovery_owed = False  # one SAF worker does it, not one per upstream
            try:
                await self.journal.replayed.wait()
                in_doubt = await self.journal.call(self.journal.store.in_doubt)
            except BaseException:
                self.recovery_owed = True
                raise
            self.journal.clear_failure("recovery")
            self.recover(in_doubt)


class _ReversalWaiter:
    """A SAF item in flight on a link, waiting for its 0430/0410."""

    __slots__ = ("mti", "worker", "item", "attempts")

    def __init__(self, worker: "SafWorker", item: SafItem, mti: str, attempts: int) -> None:
        self.mti = mti
        self.worker = worker
        self.item = item
        self.attempts = attempts

    def on_response(self, conn: "UpstreamConnection", raw: bytes, scan: Scan, now: float) -> None:
        rc = scan.values.get(39, "")
        if rc == "00":
            self.worker.acknowledged(self.item)
        else:
            self.worker.failed(self.item, self.attempts, f"answered {rc or 'without 39'}")

    def on_timeout(self, conn: "UpstreamConnection", now: float) -> None:
        self.worker.failed(self.item, self.attempts, "no answer")

    def on_link_lost(self, conn: "UpstreamConnection", now: float) -> None:
        self.worker.failed(self.item, self.attempts, "link lost")


class SafWorker:
    """Sends one upstream's queued reversals until each is acknowledged or parked."""

    def __init__(self, reversals: DurableReversals, upstream: "Upstream") -> None:
        self.reversals = reversals
        self.journal = reversals.journal
        self.upstream = upstream
        self.policy = policy_of(upstream)
        self.in_flight: set[int] = set()
        self._wakeup = trio.Event()
        self._rng = random.Random()

    def wake(self) -> None:
        self._wakeup.set()

    async def run(self) -> None:
        """Send due reversals until cancelled. A store that fails is counted, shown by /readyz
        (the journal's ``failed``) and asked again after a delay that doubles up to
        STORE_RETRY_MAX; the reversals stay owed."""
        backoff = Backoff(STORE_RETRY_INITIAL, STORE_RETRY_MAX)
        while True:
            try:
                await self._round()
            except Exception as exc:  # noqa: BLE001 - a failing store must not stop the reversals
                reason = failure_reason(exc)
                if reason == "other":
                    log.exception("SAF worker for %s: round failed", self.upstream.cfg.name)
                self.reversals.gateway.metrics.journal_errors("saf", reason).inc()
                await trio.sleep(backoff.next())
            else:
                backoff.reset()

    async def _round(self) -> None:
        store = self.journal.store
        cfg = self.upstream.cfg
        metrics = self.reversals.gateway.metrics
        name = cfg.name
        stats_at = 0.0
        await self.reversals.recover_owed()
        while True:
            if time.monotonic() >= stats_at:  # the full count: for the gauges, now and then
                waiting, oldest, due_at, parked = await self.journal.call(store.saf_stats, name)
                metrics.saf_depth(name).set(waiting)
                metrics.saf_oldest_age(name).set(time.time() - oldest if oldest else 0)
                metrics.saf_parked(name).set(parked)
                stats_at = time.monotonic() + STATS_EVERY
            else:
                due_at = await self.journal.call(store.next_due, name)
            room = cfg.saf_window - len(self.in_flight)
            # While the store refuses writes, an attempt could not be recorded (nor its
            # acknowledgement): the same reversal would go out again every round. They wait.
            if (self.upstream.ready and room > 0 and due_at is not None and due_at <= time.time()
                    and not self.journal.holding_writes):
                due = await self.journal.call(store.due_saf, name, time.time(), room + len(self.in_flight))
                touched = set()
                for item in due:
                    if item.id not in self.in_flight and len(self.in_flight) < cfg.saf_window:
                        w = self._send(item)
                        if w is not None:
                            touched.add(w)
                for w in touched:
                    await w.flush()
            self._wakeup = trio.Event()
            # Sleep until the next item is due, but look again at least every SAF_POLL
            # (an operator's retry from another process, gauges kept fresh).
            pause = SAF_POLL if due_at is None else min(SAF_POLL, max(0.01, due_at - time.time()))
            with trio.move_on_after(pause):
                await self._wakeup.wait()

    def _send(self, item: SafItem) -> "FrameWriter | None":
        cfg = self.upstream.cfg
        conn = self.upstream.pick()
        if conn is None:
            return None
        stan = item.stan or conn.allocate_stan()
        if stan in conn.pending:
            return None  # that STAN is busy on this link right now: try on the next round
        msg = dict(item.message)
        mti = attempt_mti(item.mti, item.attempts)
        msg["t"] = mti
        msg["11"] = stan
        try:
            raw = encode(self.upstream.dialect, msg, check_types=False)
        except IsoGatewayError as exc:
            log.error("reversal %s can't be encoded (%s): parked", saf_label(item.id), exc)
            self._park(item, f"encode failed: {exc}")
            return None
        attempts = item.attempts + 1
        now_wall = time.time()
        next_attempt = self.policy.next_attempt(attempts, now_wall, self._rng)
        store = self.journal.store
        self.journal.submit(store.update_saf, item.id, state=SAF_SENT, attempts=attempts,
                            next_attempt=next_attempt if next_attempt is not None else now_wall + cfg.reversal_timeout,
                            stan=stan)
        item.stan = stan
        self.in_flight.add(item.id)
        now = trio.current_time()
        waiter = _ReversalWaiter(self, item, mti, attempts)
        writer = conn.send_request(waiter, raw, match_key(mti, stan, ()), now + cfg.reversal_timeout, now)
        metrics = self.reversals.gateway.metrics
        metrics.reversals(cfg.name, "sent" if attempts == 1 else "repeated").inc()
        metrics.upstream_sent(cfg.name, mti).inc()
        return writer

    def acknowledged(self, item: SafItem) -> None:
        self.in_flight.discard(item.id)
        store = self.journal.store
        self.journal.submit(store.update_saf, item.id, state=SAF_ACKED, result="acknowledged")
        if item.txn_id is not None:
            self.journal.set_state(item.txn_id, REVERSED)
        self.reversals.gateway.metrics.reversals(self.upstream.cfg.name, "acknowledged").inc()
        log.info("reversal %s (RRN %s) acknowledged by %s", saf_label(item.id), item.message.get("37", "?"), self.upstream.cfg.name)
        self.wake()

    def failed(self, item: SafItem, attempts: int, why: str) -> None:
        self.in_flight.discard(item.id)
        item.attempts = attempts
        if attempts >= self.policy.budget:
            log.error("reversal %s (RRN %s) unacknowledged after %d attempts (%s): parked for an operator",
                      saf_label(item.id), item.message.get("37", "?"), attempts, why)
            self._park(item, why)
            return
        log.warning("reversal %s (RRN %s): attempt %d %s; it will be repeated", saf_label(item.id),
                    item.message.get("37", "?"), attempts, why)
        self.journal.submit(self.journal.store.update_saf, item.id, state=SAF_PENDING, result=why)
        self.wake()

    def _park(self, item: SafItem, why: str) -> None:
        self.in_flight.discard(item.id)
        self.journal.submit(self.journal.store.update_saf, item.id, state=SAF_PARKED, result=why)
        self.reversals.gateway.metrics.reversals(self.upstream.cfg.name, "parked").inc()
