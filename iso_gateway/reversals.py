"""Durable reversals: queue them before the front end hears 91, send them until the switch acknowledges.

``DurableReversals`` is the reversal queue: when the flow decides a transaction
must be reversed (REVERSE: timed out, its link lost, or an approval the front end
could not receive), it becomes a row of the journal's SAF table (store and
forward: the queue's name in the store, the metrics and the ``saf`` commands),
committed before the front end is answered. One ``ReversalSender`` per upstream
sends due items through the flow (``Flow.send_reversal``: 0420, then 0421
repeats), a window of them at a time so one item the switch keeps refusing never
blocks the rest, drains the queue as soon as a link is ready again, and parks an
item once its retry budget is spent. It hears each attempt's outcome from the
flow (SAF_OUTCOME). The queue lives in the journal, so it survives restarts; the
sender polls it, so ``iso-gateway saf retry`` from another process is picked up.

An item stays outstanding from its first attempt until it is complete: a
0430/0410 that comes after an attempt's deadline (``reversal_timeout``) still
acknowledges it, so a switch that answers slowly is not sent the same reversal
again and again. An item in flight when a link drops is suspected of dropping
it: its next attempt goes alone, on a connection of its own that carries
nothing else (``links.SoloConnection``), and if the switch drops that one too
the item is parked with the reason, counted and alerted, rather than repeated
on the links that carry live traffic. Suspicion lives in memory: after a
restart a suspect gets one more attempt on the shared links.
"""

from __future__ import annotations

import collections
import logging
import random
import sqlite3
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Protocol

import trio

from .clock import Clock
from .core.flow import Flow, OutstandingReversal, ReversalAttempt, Txn
from .net.links import SoloConnection
from .journal import (
    REVERSED, SAF_ACKED, SAF_PARKED, SAF_PENDING, SAF_SENT, STORE_RETRY_INITIAL, STORE_RETRY_MAX,
    TIMED_OUT, Backoff, Journal, SafItem, TxnRow, failure_reason, new_id,
)
from .core.saf import RetryPolicy, attempt_mti, build_reversal

if TYPE_CHECKING:
    from .metrics import Metrics
    from .net.links import Upstream, UpstreamConnection


class ReversalHost(Protocol):
    """What the reversal queue needs of the application that owns it (the gateway): its
    metrics, its upstreams by name, the flow that sends and matches reversal attempts, and
    ``run_flow`` (execute what the flow decided). Typed here so that this module never imports
    gateway.py."""

    metrics: Metrics
    upstreams: dict[str, Upstream]
    flow: Flow

    def run_flow(self) -> None: ...


log = logging.getLogger("iso_gateway.reversals")

# Seconds between looks at the SAF table for due items.
SAF_POLL = 1.0
# Settled items remembered before older ones are pruned (see ReversalSender._settle): a small table.
SETTLED_MEMORY = 1024
# ReversalSender.in_flight's mark for an item queued to be sent alone (run_suspects).
ALONE = "alone"
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

    def __init__(self, gateway: ReversalHost, journal: Journal, clock: Clock | None = None) -> None:
        self.gateway = gateway
        self.journal = journal
        # The gateway's clock: reversals' due times and DE 7 (a clock of its own if none).
        self.clock = clock if clock is not None else Clock()
        self.senders: dict[str, ReversalSender] = {}
        self.recovery_owed = False  # the store could not be read at start (see ``recover``)
        # A store several nodes share: the in-doubt transactions of a node that died are reversed here.
        journal.on_adopt = self.adopted

    def adopted(self, dead: str, in_doubt: list) -> None:
        """Node ``dead`` stopped beating: its in-doubt transactions (now this node's) are reversed
        as this node's own would be after a crash. (Its queued reversals need nothing: any node
        leases them once their leases run out.)"""
        count = self.recover(in_doubt)
        if count:
            log.warning("reversals queued for %d transactions node %s left in doubt", count, dead)
            for sender in self.senders.values():
                sender.wake()

    # -- what the flow asks of the queue (actions REVERSE, LATE, TAKE_OVER)

    def late_response(self, txn: Txn, rc: str) -> None:
        """An answer ``rc`` came for ``txn`` after its deadline: a decline cancels its unsent reversal."""
        if txn.txn_id is None or txn.upstream is None:
            return
        name = txn.upstream.name
        if rc == "00":
            log.warning("late approval on %s: its reversal stays queued", name)
            return
        metrics = self.gateway.metrics

        def cancelled(count: int | None, error: BaseException | None) -> None:
            if count:
                metrics.reversals(name, "cancelled").inc()
                log.info("late decline (%s) on %s: its unsent reversal is cancelled", rc, name)

        self.journal.submit(self.journal.store.cancel_unsent_saf, txn.txn_id, f"late response {rc}", callback=cancelled)
        self.journal.set_state(txn.txn_id, TIMED_OUT, rc)

    def queue(self, txn: Txn, reason: str, auth_code: str | None, answer: bool) -> None:
        """Queue a reversal of ``txn`` (it reached the switch); with ``answer``, the flow answers the
        front end once the reversal is durable (``Flow.reversal_stored``)."""
        upstream = self.gateway.upstreams[txn.upstream.name] if txn.upstream is not None else None
        if upstream is None:
            return
        item = self.make_item(upstream, txn.reversal_fields(), txn.mti, txn.upstream_stan, reason, txn.txn_id,
                              auth_code)
        if txn.txn_id is not None:
            self.journal.set_state(txn.txn_id, TIMED_OUT)
        metrics = self.gateway.metrics
        host = self.gateway

        def durable(result: object, error: BaseException | None) -> None:
            if error is not None:
                log.error("reversal could not be stored (%s)", type(error).__name__)
            else:
                metrics.reversals(upstream.cfg.name, "queued").inc()
                log.info("reversal %s queued for %s (%s, RRN %s)", saf_label(item.id), upstream.cfg.name, reason,
                         item.message.get("37", "?"))
                sender = self.senders.get(upstream.cfg.name)
                if sender is not None:
                    sender.wake()
            if answer:
                host.flow.reversal_stored(txn, trio.current_time())
                host.run_flow()

        self.journal.submit(self.journal.store.insert_saf, item, callback=durable)

    def take_over(self, upstream: "Upstream", original: dict[str, str], txn: TxnRow) -> None:
        """A front end's reversal of ``txn`` was out when the switch dropped the link: the gateway
        reverses ``txn`` itself from now on, with a SAF item suspected from the start (its first
        attempt goes alone, on a connection of its own), and the front end's repeats find it in
        the journal (answered as being reversed) instead of being forwarded into the same drop."""
        item = self.make_item(upstream, original, txn.mti, txn.upstream_stan, "link_lost", txn.id, txn.auth_code)
        sender = self.senders.get(upstream.cfg.name)
        if sender is not None:
            sender.suspect(item)
        metrics = self.gateway.metrics

        def durable(result: object, error: BaseException | None) -> None:
            if error is not None:
                log.error("reversal taken over from a front end could not be stored (%s)", type(error).__name__)
                return
            metrics.reversals(upstream.cfg.name, "queued").inc()
            log.warning("reversal %s queued for %s: a front end's reversal (RRN %s) was out when the link dropped",
                        saf_label(item.id), upstream.cfg.name, item.message.get("37", "?"))
            if sender is not None:
                sender.wake()

        self.journal.submit(self.journal.store.insert_saf, item, callback=durable)

    def make_item(self, upstream: "Upstream", original: dict[str, str], original_mti: str, upstream_stan: str,
                  reason: str, txn_id: int | None, auth_code: str | None) -> SafItem:
        cfg = upstream.cfg
        now = self.clock.wall()
        stan = upstream_stan if cfg.reversal_stan == "original" else ""
        message = build_reversal(original, original_mti=original_mti, upstream_stan=upstream_stan,
                                 reversal_mti=cfg.reversal_mti, stan=stan or "000000",
                                 reason_code=cfg.reversal_codes.get(reason), auth_code=auth_code,
                                 now=datetime.fromtimestamp(now, timezone.utc))
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
            except getattr(store, "errors", sqlite3.Error) as exc:  # counted, shown by /readyz, retried by the senders
                self.journal.note_failure("recovery", f"in-doubt transactions can't be read ({exc})",
                                          getattr(store, "failure_reason", failure_reason)(exc))
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
            self.recovery_owed = False  # one reversal sender does it, not one per upstream
            try:
                await self.journal.replayed.wait()
                in_doubt = await self.journal.call(self.journal.store.in_doubt)
            except BaseException:
                self.recovery_owed = True
                raise
            self.journal.clear_failure("recovery")
            self.recover(in_doubt)


class ReversalSender:
    """Sends one upstream's queued reversals until each is acknowledged or parked."""

    def __init__(self, reversals: DurableReversals, upstream: "Upstream", clock: Clock | None = None) -> None:
        self.reversals = reversals
        self.journal = reversals.journal
        # Due times, polling and next attempts: the gateway's clock (a clock of its own if none),
        # so a test on trio's MockClock drives retries without waiting.
        self.clock = clock if clock is not None else Clock()
        self.upstream = upstream
        self.policy = policy_of(upstream)
        # Items being worked on, by SAF id: the attempt in flight (core.flow.ReversalAttempt), or
        # ALONE while queued to be sent alone. An attempt's outcome counts only while it is here.
        self.in_flight: dict[int, object] = {}
        self._wakeup = trio.Event()
        self._rng = random.Random()
        # Items acknowledged or parked lately (see _settle), and items suspected of dropping a
        # link, with the queue of those waiting to be sent alone (run_suspects).
        self._settled: dict[int, int] = {}  # SAF id -> the read of the due list it was settled during
        self._reads = 0
        self.suspects: set[int] = set()
        self._alone: collections.deque[SafItem] = collections.deque()
        self._alone_wakeup = trio.Event()

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
            except Exception as exc:  # a failing store must not stop the reversals
                reason = getattr(self.journal.store, "failure_reason", failure_reason)(exc)
                if reason == "other":
                    log.exception("reversal sender for %s: round failed", self.upstream.cfg.name)
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
        wall = self.clock.wall
        shared = getattr(self.journal, "shared", False)  # a store several nodes share (PostgreSQL)
        node = getattr(self.journal, "node", "")
        await self.reversals.recover_owed()
        while True:
            if shared:
                await self._renew()
            if trio.current_time() >= stats_at:  # the full count: for the gauges, now and then
                waiting, oldest, due_at, parked = await self.journal.call(store.saf_stats, name)
                metrics.saf_depth(name).set(waiting)
                metrics.saf_oldest_age(name).set(wall() - oldest if oldest else 0)
                metrics.saf_parked(name).set(parked)
                stats_at = trio.current_time() + STATS_EVERY
                if shared:
                    due_at = await self.journal.call(store.next_leasable, node, name)
            elif shared:  # any node's reversals, once no other node holds a lease on them
                due_at = await self.journal.call(store.next_leasable, node, name)
            else:
                due_at = await self.journal.call(store.next_due, name)
            room = cfg.saf_window - len(self.in_flight)
            # While the store refuses writes, an attempt could not be recorded (nor its
            # acknowledgement): the same reversal would go out again every round. They wait.
            if (self.upstream.ready and room > 0 and due_at is not None and due_at <= wall()
                    and not self.journal.holding_writes):
                self._reads += 1  # items settled from now on may still be in this list (see _send)
                if shared:  # leased to this node: no other sends them meanwhile
                    due = await self.journal.call(store.lease_due_saf, node, wall(), self.lease_seconds,
                                                  room + len(self.in_flight), name)
                else:
                    due = await self.journal.call(store.due_saf, name, wall(), room + len(self.in_flight))
                for item in due:
                    if item.id not in self.in_flight and len(self.in_flight) < cfg.saf_window:
                        self._send(item)
                self.reversals.gateway.run_flow()
            self._wakeup = trio.Event()
            # Sleep until the next item is due, but look again at least every SAF_POLL
            # (an operator's retry from another process, gauges kept fresh).
            pause = SAF_POLL if due_at is None else min(SAF_POLL, max(0.01, due_at - wall()))
            with trio.move_on_after(pause):
                await self._wakeup.wait()

    @property
    def lease_seconds(self) -> float:
        pg = self.journal.pg
        return pg.lease_seconds if pg is not None else 0.0

    async def _renew(self, only: list[int] | None = None) -> list[int]:
        """Shared store: extend this node's leases on the items it works on (or ``only`` these);
        an item whose lease was lost (it ran out, and another node took it) is dropped here, and
        returned."""
        ids = only if only is not None else list(self.in_flight)
        if not ids:
            return []
        held = set(await self.journal.call(self.journal.store.renew_leases, self.journal.node, ids,
                                           self.clock.wall() + self.lease_seconds))
        lost = [i for i in ids if i not in held]
        for saf_id in lost:
            log.warning("reversal %s: its lease ran out and another node took it; this node lets it go",
                        saf_label(saf_id))
            attempt = self.in_flight.pop(saf_id, None)
            if isinstance(attempt, ReversalAttempt) and attempt.waker is not None:
                attempt.waker.set()
        return lost

    def _send(self, item: SafItem) -> None:
        if self._settled.get(item.id) == self._reads:
            return  # acknowledged or parked while the due list was being read
        if item.id in self.suspects:
            self._send_alone_later(item)
            return
        conn = self.upstream.pick()
        if conn is not None:
            self._send_on(conn, item)

    def _send_on(self, conn: "UpstreamConnection", item: SafItem, alone: bool = False) -> ReversalAttempt | None:
        """Have the flow send one attempt of ``item`` on ``conn`` (the caller runs the flow's
        actions); the attempt, or None when it did not go."""
        cfg = self.upstream.cfg
        flow = self.reversals.gateway.flow
        mti = attempt_mti(item.mti, item.attempts)
        attempt = flow.send_reversal(conn.link, self, item, item.id, item.txn_id, item.message, mti, item.stan,
                                     trio.current_time(), alone)
        if isinstance(attempt, str):
            if attempt != "busy":  # the STAN is busy (in flight, or another outstanding reversal's): next round
                log.error("reversal %s can't be encoded (%s): parked", saf_label(item.id), attempt)
                self._park(item, attempt)
            return None
        stan = attempt.stan
        attempts = attempt.attempts
        now_wall = self.clock.wall()
        next_attempt = self.policy.next_attempt(attempts, now_wall, self._rng)
        store = self.journal.store
        self.journal.submit(store.update_saf, item.id, state=SAF_SENT, attempts=attempts,
                            next_attempt=next_attempt if next_attempt is not None else now_wall + cfg.reversal_timeout,
                            stan=stan)
        item.stan = stan
        self.in_flight[item.id] = attempt
        metrics = self.reversals.gateway.metrics
        metrics.reversals(cfg.name, "sent" if attempts == 1 else "repeated").inc()
        return attempt

    def outcome(self, attempt: ReversalAttempt | OutstandingReversal, outcome: str, rc: str) -> None:
        """What became of an attempt (SAF_OUTCOME): "answer" (the switch answered ``rc`` in time),
        "timeout" (the item stays outstanding: a 0430 that comes after this still completes it),
        "lost" (the switch or the network dropped the link), "closed" (the gateway closed it), or
        "late" (an answer past the attempt's deadline, for an item still outstanding)."""
        if isinstance(attempt, OutstandingReversal):
            if rc == "00":
                log.info("reversal %s: its 0430/0410 came after the attempt's deadline; it completes it",
                         saf_label(attempt.saf_id))
                self.acknowledged(attempt.saf_id, attempt.txn_id, attempt.rrn)
            else:
                log.warning("reversal %s: a late answer %s; its repeats go on", saf_label(attempt.saf_id),
                            rc or "without 39")
            return
        if attempt.waker is not None:
            attempt.waker.set()
        if self.in_flight.get(attempt.saf_id) is not attempt:
            return  # completed otherwise meanwhile (a late 0430, a park)
        item: SafItem = attempt.item
        if outcome == "answer":
            if attempt.alone:
                self.cleared(item)  # the switch answered it and kept the link
            if rc == "00":
                self.acknowledged(item.id, item.txn_id, item.message.get("37", "?"))
            else:
                self.failed(item, attempt.attempts, f"answered {rc or 'without 39'}")
        elif outcome == "timeout":
            self.failed(item, attempt.attempts, "no answer")
        elif outcome == "closed":  # the gateway closed it (shutdown): nobody's fault
            self.failed(item, attempt.attempts, "link closed")
        elif attempt.alone:
            self.dropped_alone(item, attempt.attempts)
        else:
            self.suspect(item)
            self.failed(item, attempt.attempts, "link lost")

    def acknowledged(self, saf_id: int, txn_id: int | None, rrn: str) -> None:
        self.in_flight.pop(saf_id, None)
        self.suspects.discard(saf_id)
        self._settle(saf_id)
        self._release(saf_id)
        store = self.journal.store
        self.journal.submit(store.update_saf, saf_id, state=SAF_ACKED, result="acknowledged")
        if txn_id is not None:
            self.journal.set_state(txn_id, REVERSED)
        self.reversals.gateway.metrics.reversals(self.upstream.cfg.name, "acknowledged").inc()
        log.info("reversal %s (RRN %s) acknowledged by %s", saf_label(saf_id), rrn, self.upstream.cfg.name)
        self.wake()

    def failed(self, item: SafItem, attempts: int, why: str) -> None:
        self.in_flight.pop(item.id, None)
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
        self.in_flight.pop(item.id, None)
        self.suspects.discard(item.id)
        self._settle(item.id)
        self._release(item.id)  # its STAN is free for others; an operator's retry makes it outstanding again
        self.journal.submit(self.journal.store.update_saf, item.id, state=SAF_PARKED, result=why)
        self.reversals.gateway.metrics.reversals(self.upstream.cfg.name, "parked").inc()

    def _release(self, saf_id: int) -> None:
        """``saf_id`` is no longer outstanding: a 0430/0410 for it from now on is unmatched."""
        self.reversals.gateway.flow.release_outstanding(self.upstream.side, saf_id)

    def _settle(self, saf_id: int) -> None:
        """Remember that ``saf_id`` is done with during the current read of the due list, which may
        still hold it (the journal applies the change after that read). Once the next read starts,
        the journal is the truth again (an operator's `saf retry` of a parked item included)."""
        settled = self._settled
        if len(settled) >= SETTLED_MEMORY:
            self._settled = settled = {k: v for k, v in settled.items() if v == self._reads}
        settled[saf_id] = self._reads

    # -- suspects: a reversal in flight when a link dropped travels alone

    def suspect(self, item: SafItem) -> None:
        """``item`` was in flight when a shared link dropped: its next attempt goes alone."""
        if item.id in self.suspects:
            return
        self.suspects.add(item.id)
        self.reversals.gateway.metrics.saf_link_drops(self.upstream.cfg.name, "suspected").inc()
        log.warning("reversal %s (RRN %s) was in flight when the link to %s dropped: its next attempt goes alone,"
                    " on a connection of its own", saf_label(item.id), item.message.get("37", "?"),
                    self.upstream.cfg.name)

    def cleared(self, item: SafItem) -> None:
        """The switch answered ``item`` sent alone and kept the link: it goes with the rest again."""
        if item.id in self.suspects:
            self.suspects.discard(item.id)
            self.reversals.gateway.metrics.saf_link_drops(self.upstream.cfg.name, "cleared").inc()

    def dropped_alone(self, item: SafItem, attempts: int) -> None:
        """The link dropped again, with ``item`` alone on it: parked for an operator, with the reason."""
        item.attempts = attempts
        why = "the switch dropped the link after it, twice: the second time it was alone on its connection"
        log.error("reversal %s (RRN %s): %s; parked for an operator", saf_label(item.id),
                  item.message.get("37", "?"), why)
        self.reversals.gateway.metrics.saf_link_drops(self.upstream.cfg.name, "parked").inc()
        self._park(item, why)

    def _send_alone_later(self, item: SafItem) -> None:
        if item.id in self.in_flight:
            return
        self.in_flight[item.id] = ALONE  # counts in the window, and is not offered again meanwhile
        self._alone.append(item)
        self._alone_wakeup.set()

    async def run_suspects(self) -> None:
        """Send suspected reversals one at a time, each alone on a connection of its own, until cancelled.

        Live traffic never shares that connection, so if the switch drops it again only the
        suspect is affected: it is parked (``dropped_alone``). A connection that can't be opened
        (or signed on) leaves the item pending, still suspected, for ``saf_retry_initial`` seconds.

        Error handling: an unexpected error with one item is logged and leaves it pending (it is
        not sent again at once); the next item is served."""
        while True:
            while not self._alone:
                self._alone_wakeup = trio.Event()
                await self._alone_wakeup.wait()
            item = self._alone.popleft()
            if self.in_flight.get(item.id) is not ALONE:
                continue  # acknowledged (a late 0430) or parked while it waited here
            try:
                await self._send_alone(item)
            except Exception:  # one item's trouble must not end the lane (nor the worker)
                log.exception("reversal %s: sending it alone failed", saf_label(item.id))
                self._retry_later(item, "internal error sending it alone")

    async def _send_alone(self, item: SafItem) -> None:
        cfg = self.upstream.cfg
        shared = getattr(self.journal, "shared", False)
        if shared and await self._renew([item.id]):
            return  # another node has it now
        conn = SoloConnection(self.upstream)
        if shared:  # STANs from this node's blocks, as on its other links
            conn.link.stans = self.upstream.connections[0].link.stans
        async with trio.open_nursery() as nursery:
            nursery.start_soon(conn.run)
            try:
                with trio.move_on_after(cfg.connect_timeout * len(cfg.host_list())
                                        + (cfg.sign_on_timeout if cfg.sign_on else 0.0)):
                    await conn.settled.wait()
                if not conn.ready:
                    self._retry_later(item, "no connection of its own could be opened")
                    return
                attempt = self._send_on(conn, item, alone=True)
                if attempt is None:
                    self._retry_later(item, "not sent alone")
                    return
                attempt.waker = done = trio.Event()
                self.reversals.gateway.run_flow()
                if not attempt.done:
                    await done.wait()  # bounded: the attempt's deadline, or the connection's end
            finally:
                # From here on the end of this connection is the gateway's doing (also on shutdown).
                conn.closing = True
                conn.drop()
                nursery.cancel_scope.cancel()

    def _retry_later(self, item: SafItem, why: str) -> None:
        """Leave ``item`` pending without counting an attempt, due again in ``saf_retry_initial``."""
        self.in_flight.pop(item.id, None)
        self.journal.submit(self.journal.store.update_saf, item.id, state=SAF_PENDING,
                            next_attempt=self.clock.wall() + self.upstream.cfg.saf_retry_initial, result=why)
