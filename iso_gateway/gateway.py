"""The transaction flow: front-end request in, switch response out, every failure answered.

Per request, on the hot path, nothing is fully decoded: the request is scanned
(MTI and the fields rules and routes need), validated, routed, given the link's
own STAN by splicing, and sent. The response is scanned for 11/38/39/41,
matched, given the front end's STAN back by splicing, and written to the front
end. pyiso8583 decodes only messages that cross between two different dialects
and front-end reversals; the gateway's own answers (rejects, timeouts, 0810s) echo
fields read by a scan.

The scan refuses exactly what a decode would, so what it accepts always decodes;
still, each request is handled inside a boundary (``request_failed``): whatever
escapes is counted, logged masked and answered 30 or 96, and the connection, its
neighbours and the process carry on.

Every request gets exactly one answer: the switch's, or the gateway's own
(a validation reject, 92/15 for no route, 91 when no link can carry it, 91 on
timeout or when the link drops). What happens to a timed-out authorization
afterwards (a reversal) goes through ``ReversalSink``.
"""

from __future__ import annotations

import logging
import secrets
import sqlite3
from datetime import datetime, timezone
from typing import Any, Callable, Protocol, Sequence

import trio

from .clock import Clock
from .config import Config, route_table
from .core.duplicates import DuplicateEntry, DuplicateTable
from .core.duplicates import Key as DupKey
from .journal import ANSWERED, NOT_SENT, REVERSAL_FIELDS, REVERSED, Journal, failure_reason, new_id
from .core.matching import StanAllocator
from .core.message import OriginalData, original_mti
from .reversals import DurableReversals, SafWorker
from .security.pan import PanVault, load_master_key
from .specfiles import get_dialect, load_rules
from .core.dialect import Dialect, check_field_type
from .core.errors import ConfigError, DecodeError, IsoGatewayError, MessageError
from .net.frontend import FrontConnection, Listener
from .net.poller import Poller
from .core.framing import Frame
from .net.links import STAN_BLOCK, Upstream, UpstreamConnection
from .core.masking import mask_pan
from .logs import masked_exception
from .core.matching import match_key
from .core.message import build_response, decode, encode, is_request, is_valid_mti, response_mti
from .metrics import Metrics
from .core.routing import NoRoute
from .core.scanner import Scan, Scanner
from .net.writer import FrameWriter

log = logging.getLogger("iso_gateway.gateway")

# Seconds between hand-overs of the hot path's counters to prometheus-client
# (a scrape also triggers one, so a scrape is never stale).
METRICS_FLUSH = 1.0

REVERSAL_KEYS = tuple((int(k), k) for k in REVERSAL_FIELDS)

# DE 39 values that approve (ISO 8583:1987): approved; honour with identification; approved for a
# partial amount; approved (VIP); approved, update track 3. Only these leave something to reverse.
APPROVED_CODES = frozenset({"00", "08", "10", "11", "16"})
# The answer to a front-end reversal whose original was declined (or never reached the switch):
# 21, "no action taken", the code for a reversal that found nothing to reverse. It says the
# original was found (unlike 25) and that no funds were held, so the switch is not asked.
NOTHING_TO_REVERSE_CODE = "21"


def front_identity(front: FrontConnection) -> str:
    """Who sent a request, as the journal records it (``txn.listener``) and as a front-end reversal
    must match it to find its original: today the listener it came through, so any client of a
    listener may reverse what another client of the same listener sent (with the same acquirer,
    terminal and merchant). When listeners authenticate their clients (a TLS client certificate,
    a sign-on), this is the one place to return the authenticated identity instead; the forward
    path (``Gateway._forward``) writes the same value."""
    return front.listener.name


class ReversalSink(Protocol):
    """Where the gateway hands transactions that may need reversing.

    ``timed_out``: the switch did not answer in time, or the link dropped while
    the request was out; the sink calls ``then()`` (which answers the front
    end) once whatever it must store is durable. ``late_response``: an answer
    came after the timeout. ``undeliverable``: the switch answered but the
    front end is gone.
    """

    def timed_out(self, request: "FrontRequest", reason: str,
                  then: Callable[[], FrameWriter | None]) -> FrameWriter | None: ...

    def late_response(self, conn: UpstreamConnection, scan: Scan, raw: bytes, request: "FrontRequest | None") -> None: ...

    def undeliverable(self, request: "FrontRequest", scan: Scan, raw: bytes) -> None: ...


class FrontRequest:
    """A front-end request in flight to a switch: the pending-table entry for it."""

    __slots__ = ("gateway", "front", "raw", "header", "mti", "front_stan", "upstream_stan", "upstream",
                 "received_at", "sent_at", "translate", "done", "sent", "txn_id", "original", "frame", "conn",
                 "duplicate", "restore", "on_answer")

    def __init__(self, gateway: "Gateway", front: FrontConnection, raw: bytes, header: bytes, mti: str,
                 front_stan: str, upstream: Upstream, received_at: float, translate: bool) -> None:
        self.gateway = gateway
        self.front = front
        self.raw = raw
        self.header = header
        self.mti = mti
        self.front_stan = front_stan
        self.upstream_stan = ""
        self.upstream = upstream
        self.received_at = received_at
        self.sent_at = received_at
        self.translate = translate
        self.done = False
        self.sent = False  # the frame left for the switch (else a timeout needs no reversal)
        self.txn_id: int | None = None
        self.original: dict[str, str] = {}  # the fields a reversal is built from (memory only); see reversal_fields
        self.frame = b""  # the framed upstream copy, held until the journal has the transaction
        self.conn: UpstreamConnection | None = None
        self.duplicate: "DuplicateEntry | None" = None
        self.restore: dict[str, str] | None = None  # fields other than 11 to give back to the front end
        self.on_answer: Callable[[str], None] | None = None  # told the switch's response code

    def reversal_fields(self) -> dict[str, str]:
        """The fields a reversal of this request is built from: kept when journaled, else decoded now (rare path)."""
        if not self.original:
            try:
                msg = decode(self.front.listener.dialect, self.raw, check_types=False)
            except IsoGatewayError:
                return {}
            self.original = {k: msg[k] for k in REVERSAL_FIELDS if k in msg}
        return self.original

    def transmit(self) -> FrameWriter | None:
        """Send the held frame (the journal has the transaction now), unless it already ended."""
        conn = self.conn
        if self.done or conn is None or conn.writer is None or not self.frame:
            return None
        conn.writer.enqueue(self.frame)
        self.sent = True
        self.frame = b""
        return conn.writer

    def on_response(self, conn: UpstreamConnection, raw: bytes, scan: Scan, now: float) -> FrameWriter | None:
        self.done = True
        gw = self.gateway
        gw.front_in_flight -= 1
        m = gw.metrics
        upname = conn.cfg.name
        rc = scan.values.get(39, "")
        m.upstream_latency(upname, self.mti).observe(now - self.sent_at)
        m.in_flight(upname).dec()
        if self.on_answer is not None:
            self.on_answer(rc)
        front = self.front
        if front.closed:
            gw.complete_duplicates(self, rc, scan.values.get(38), None)
            gw.reversals.undeliverable(self, scan, raw)
            return None
        listener = front.listener
        try:
            if self.translate or self.restore:
                msg = decode(conn.upstream.dialect, raw, check_types=False)
                msg["11"] = self.front_stan
                msg.update(self.restore or {})
                out = encode(listener.dialect, msg, check_types=False)
            elif 11 in scan.spans:
                out = conn.upstream.scanner.splice(raw, scan, 11, self.front_stan)
            else:
                out = raw
        except IsoGatewayError as exc:
            log.warning("response from %s can't be returned to the front end (%s); answering 96", upname, exc)
            gw.complete_duplicates(self, "96", None, None)
            return gw.answer_locally(front, self.raw, self.header, "96", "bad_response", now, self.received_at)
        gw.complete_duplicates(self, rc, scan.values.get(38), out)
        auth = scan.values.get(38)

        def delivered(ok: bool) -> None:
            # Only an answer handed to the front end's socket counts as answered: after a
            # crash, anything less is in doubt and reversed (journal states, recovery).
            if ok:
                if self.txn_id is not None:
                    gw.journal.set_state(self.txn_id, ANSWERED, rc, auth, gw.round_wall)
            else:
                gw.reversals.undeliverable(self, scan, raw)

        front.writer.enqueue(listener.framer.encode(out, header=listener.framer.reply_header(self.header)), delivered)
        front.request_done()
        m.front_sent(listener.name, scan.mti, rc).inc()
        m.request_latency(upname, self.mti).observe(now - self.received_at)
        return front.writer

    def on_timeout(self, conn: UpstreamConnection, now: float) -> FrameWriter | None:
        gw = self.gateway
        code = gw.config.gateway.timeout_code
        if self.sent:
            gw.metrics.timeouts(conn.cfg.name, self.mti).inc()
            log.warning("upstream %s: no answer to %s (upstream STAN %s) in time; answered %s",
                        conn.cfg.name, self.mti, self.upstream_stan, code)
            conn.remember_late(match_key(self.mti, self.upstream_stan, ()), self, now)
        else:
            log.warning("upstream %s: %s could not be sent in time (journal slow or failing); answered %s",
                        conn.cfg.name, self.mti, code)
        return self._fail(code, "timeout", now)

    def on_link_lost(self, conn: UpstreamConnection, now: float) -> FrameWriter | None:
        return self._fail(self.gateway.config.gateway.unavailable_code, "link_lost", now)

    def _fail(self, code: str, reason: str, now: float) -> FrameWriter | None:
        """Answer ``code`` once the reversal (if one is owed) is durable."""
        self.done = True
        gw = self.gateway
        gw.front_in_flight -= 1
        gw.metrics.in_flight(self.upstream.cfg.name).dec()
        # The front end waited this long too: p99 latency must see timeouts, not only answers.
        gw.metrics.request_latency(self.upstream.cfg.name, self.mti).observe(now - self.received_at)
        if self.on_answer is not None:
            self.on_answer(code)

        def answer() -> FrameWriter | None:
            gw.complete_duplicates(self, code, None, None)
            return gw.answer_locally(self.front, self.raw, self.header, code, reason, now, self.received_at)

        return gw.reversals.timed_out(self, reason, answer)


class ForwardedReversal(FrontRequest):
    """A front end's reversal forwarded to the switch.

    If the switch (not the gateway) drops the link while it is out, ``take_over`` runs: the
    gateway reverses the original itself from then on, alone on a connection of its own
    (DurableReversals.take_over), so the front end's repeats, answered from the journal, are not
    forwarded into the same drop of the links every request shares."""

    __slots__ = ("take_over",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # FrontRequest's
        super().__init__(*args, **kwargs)
        self.take_over: Callable[[], None] | None = None

    def on_link_lost(self, conn: UpstreamConnection, now: float) -> FrameWriter | None:
        if self.sent and not conn.closing and self.take_over is not None:
            self.take_over()
        return super().on_link_lost(conn, now)


class Gateway:
    """Listeners, upstreams and routes wired together; ``run`` serves until ``stop``."""

    def __init__(self, config: Config, *, metrics: Metrics | None = None, config_path: str | None = None,
                 worker: int | None = None) -> None:
        self.config = config
        # Worker process number with --workers (listeners share the port, the journal file is shared
        # and each worker owns its rows); None for a single process.
        self.worker = worker
        self.config_path = config_path
        self.metrics = metrics or Metrics()
        journal_cfg = config.journal
        # Without the journal (measurement only) reversals still go through a SAF, kept in memory.
        self.journaling = journal_cfg.enabled
        # The one clock of the shell (clock.py): started by run, read by everything that
        # schedules or stamps, so trio's MockClock moves them all.
        self.clock = Clock()
        if journal_cfg.enabled:
            vault = PanVault(load_master_key(journal_cfg.key_file))
            self.journal = Journal(journal_cfg.path, vault, synchronous=journal_cfg.synchronous, max_batch=journal_cfg.max_batch,
                                   metrics=self.metrics, worker=worker or 0, replay_all=worker is None,
                                   indexer=journal_cfg.indexer, max_log_segments=journal_cfg.max_log_segments,
                                   reversal_data_window=journal_cfg.reversal_data_window, retention=journal_cfg.retention * 86400)
        else:
            log.warning("journal disabled: transactions are not journaled and reversals are lost on restart")
            self.journal = Journal(":memory:", PanVault(secrets.token_bytes(32)), max_batch=journal_cfg.max_batch,
                                   metrics=self.metrics)
        self.journal.wall = self.clock.wall
        self.reversals = DurableReversals(self, self.journal, self.clock)
        self.duplicates = DuplicateTable(config.gateway.duplicate_window)
        dialect_dirs = tuple(config.dialect_dirs)
        rule_dirs = tuple(config.rule_dirs)
        self.routes = route_table(config.routes, config.routing, source=config_path or "config")
        # Reads every front connection and switch link from one task (net/poller.py).
        self.poller = Poller(self.begin_round, self.release_held)
        self.upstreams = {u.name: Upstream(u, self, self.metrics, get_dialect(u.dialect, dialect_dirs), self.clock)
                          for u in config.upstreams}
        self.listeners = [Listener(lc, self, get_dialect(lc.dialect, dialect_dirs), load_rules(lc.rules, rule_dirs))
                          for lc in config.listeners]
        self._stop = trio.Event()
        self._stopped = trio.Event()
        self.draining = False
        self.front_in_flight = 0
        self.metrics_port: int | None = None
        # More conditions for /readyz, each () -> (ok, why if not): e.g. the journal is writable.
        self.readiness_checks: list[Callable[[], tuple[bool, str]]] = [self._journal_ready]
        # Requests logged but not yet written to the log nor sent (see _send_held): those of the
        # poller's round, written when it ends (one write, and one seal, for all of them).
        self._held: list[tuple[FrontRequest, tuple, int]] = []  # (request, key, journal.log_failures then)
        # The wall clock of the poller's round (begin_round): validation's "now" and the journal's
        # timestamps for what the round does, one clock read per round, none per message.
        self.round_wall = 0.0
        self._now_utc = datetime.fromtimestamp(0, timezone.utc)
        # Per dialect: a scanner reading the fields a response echoes, for local answers (see answer_locally).
        self._echo_scanners: dict[str, tuple[Dialect, Scanner]] = {}

    # ------------------------------------------------------------------ control

    def stop(self) -> None:
        """Begin a graceful shutdown (what SIGTERM does)."""
        self._stop.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    @property
    def ports(self) -> list[int]:
        return [lst.port for lst in self.listeners]

    def readiness(self) -> tuple[bool, str]:
        """Whether this gateway can carry traffic, and why: what /readyz answers (runs on the event loop).

        Ready: not shutting down, at least one upstream with a ready connection that
        answers (connected, signed on when configured, and not after a run of unanswered
        requests or an unanswered echo: ``UpstreamConnection.answering``), and every check in
        ``readiness_checks`` (the journal's "writable") passes.
        """
        if self.draining:
            return False, "shutting down"
        ready: list[str] = []
        not_ready: list[str] = []
        for name, up in self.upstreams.items():
            n = silent = 0
            for c in up.connections:
                if c.ready:
                    if c.answering:
                        n += 1
                    else:
                        silent += 1
            why = f"upstream {name}: {n}/{len(up.connections)} connections ready"
            if silent:
                why += f" ({silent} connected but not answering: requests or echoes unanswered in a row)"
            (ready if n else not_ready).append(why)
        if not ready:
            return False, "no upstream link is ready (" + "; ".join(not_ready) + ")"
        for check in self.readiness_checks:
            ok, why = check()
            if not ok:
                return False, why
        return True, "; ".join(ready + not_ready)

    def reload(self, config: Config) -> None:
        """Apply routes, rules and limits from a new configuration without dropping connections.

        Raises ConfigError and changes nothing when the new configuration is not usable.
        """
        if [(u.name, u.hosts, u.dialect, u.framing) for u in config.upstreams] != [
            (u.name, u.hosts, u.dialect, u.framing) for u in self.config.upstreams
        ] or [(lc.name, lc.host, lc.port) for lc in config.listeners] != [
            (lc.name, lc.host, lc.port) for lc in self.config.listeners
        ]:
            raise ConfigError(self.config_path or "config", "listeners/upstreams",
                              "addresses, hosts, dialects or framings changed: these need a restart")
        routes = route_table(config.routes, config.routing, source=self.config_path or "config")
        # Build every listener's new state before touching any, so a failure changes nothing.
        dialect_dirs, rule_dirs = tuple(config.dialect_dirs), tuple(config.rule_dirs)
        staged = []
        for lst, lc in zip(self.listeners, config.listeners, strict=True):  # same listeners: checked above
            probe = Listener.__new__(Listener)
            probe.gateway = self
            dialect, rules = get_dialect(lc.dialect, dialect_dirs), load_rules(lc.rules, rule_dirs)
            probe.apply(lc, dialect, rules)
            staged.append((lst, lc, dialect, rules))
        for lst, lc, dialect, rules in staged:
            lst.apply(lc, dialect, rules)
        self.routes = routes
        self.config = config
        log.info("configuration reloaded: %d routes", len(config.routes))

    async def run(self, *, task_status: trio.TaskStatus[Gateway] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until ``stop``; then drain, answer what is left, sign off and return."""
        self.clock.start()
        self.begin_round()
        self._restore_stans()
        self.reversals.recover()
        async with trio.open_nursery() as root:
            poller_scope = trio.CancelScope()

            async def run_poller(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
                with poller_scope:
                    await self.poller.run(task_status=task_status)

            await root.start(run_poller)
            journal_scope = trio.CancelScope()

            async def run_journal(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
                with journal_scope:
                    await self.journal.run(task_status=task_status)

            await root.start(run_journal)
            self._tasks = root
            up_scope = trio.CancelScope()

            async def run_upstreams() -> None:
                with up_scope:
                    async with trio.open_nursery() as n:
                        n.start_soon(self._flush_metrics)
                        for up in self.upstreams.values():
                            n.start_soon(up.run)
                            worker = self.reversals.workers[up.cfg.name] = SafWorker(self.reversals, up, self.clock)
                            n.start_soon(worker.run)
                            n.start_soon(worker.run_suspects)

            root.start_soon(run_upstreams)
            conn_scope = trio.CancelScope()
            conn_nursery_ready = trio.Event()
            holder: list[trio.Nursery] = []

            async def connections() -> None:
                try:
                    with conn_scope:
                        async with trio.open_nursery() as n:
                            holder.append(n)
                            conn_nursery_ready.set()
                            await trio.sleep_forever()
                finally:
                    for lst in self.listeners:
                        lst.close_all("shutdown")

            root.start_soon(connections)
            await conn_nursery_ready.wait()
            for lst in self.listeners:
                await root.start(lst.serve, holder[0])
            log.info("gateway %s listening on %s", self.config.gateway.name,
                     ", ".join(f"{lst.name}={lst.cfg.host}:{lst.port}" for lst in self.listeners))
            task_status.started(self)
            await self._stop.wait()
            await self._drain()
            conn_scope.cancel()
            up_scope.cancel()
            self._save_stans()
            await trio.lowlevel.checkpoint()  # let the last journal batch be handed back
            journal_scope.cancel()
            poller_scope.cancel()
        self.journal.close()
        self._stopped.set()

    async def _flush_metrics(self) -> None:
        """The hot path counts in plain numbers; prometheus-client gets them every second (and at each scrape)."""
        try:
            while True:
                await trio.sleep(METRICS_FLUSH)
                self.metrics.flush()
        finally:
            self.metrics.flush()

    async def _drain(self) -> None:
        self.draining = True
        for lst in self.listeners:
            lst.stop_accepting()
        log.info("shutting down: no new connections; draining in-flight requests")
        with trio.move_on_after(self.config.gateway.drain_timeout):
            while self.front_in_flight:  # noqa: ASYNC110 - a count many tasks change; checked while draining only
                await trio.sleep(0.05)
        if self.front_in_flight:
            log.warning("drain deadline passed with %d requests in flight; answering them %s",
                        self.front_in_flight, self.config.gateway.timeout_code)
        now = trio.current_time()
        touched: set[FrameWriter] = set()
        for up in self.upstreams.values():
            for conn in up.connections:
                for waiter in conn.pending.drain():
                    w = waiter.on_timeout(conn, now)
                    if w is not None:
                        touched.add(w)
        for w in touched:
            await w.flush()
        with trio.move_on_after(5):
            async with trio.open_nursery() as n:
                for up in self.upstreams.values():
                    n.start_soon(up.sign_off)

    # ------------------------------------------------------------------ hot path

    def begin_round(self) -> None:
        """A round of reads starts: the wall clock that validation checks DE 7 against, and that
        the journal's records of this round carry."""
        wall = self.round_wall = self.clock.wall()
        self._now_utc = datetime.fromtimestamp(wall, timezone.utc)

    def on_front_frames(self, front: FrontConnection, frames: Sequence[Frame], touched: set[FrameWriter],
                        now: float) -> None:
        """Handle every complete frame one read of ``front`` gave (``now``: trio's clock, read at
        the start of the poller's round); the writers to flush go into ``touched``.

        Forwarded requests may be held for the journal's log: the caller ends its round with
        ``release_held`` (one log write for all of them), then flushes."""
        touched.add(front.writer)
        for frame in frames:
            if frame.keepalive:
                front.writer.enqueue(front.listener.framer.keepalive())
                continue
            try:
                w = self._on_request(front, frame.message, frame.header, now)
            except Exception as exc:  # noqa: BLE001 - the per-message boundary: answer, never lose the connection
                w = self.request_failed(front, frame.message, frame.header, exc, "request", now, counted=False)
            if w is not None:
                touched.add(w)

    def release_held(self, touched: set[FrameWriter] | None = None) -> set[FrameWriter]:
        """Log and queue every held request (a round of reads ends, or a link's flusher is
        about to send); returns ``touched`` with the writers they went to."""
        if touched is None:
            touched = set()
        if self._held:
            self._send_held(touched)
        return touched

    def _send_held(self, touched: set[FrameWriter]) -> None:
        """The held requests are logged with one write, then sent; one whose log record a failed
        write dropped (this one, or another since it was recorded) is refused, never sent."""
        held, self._held = self._held, []
        error: OSError | None = None
        try:
            self.journal.write_log()
        except OSError as exc:
            error = exc
        failures = self.journal.log_failures
        for request, key, logged_at in held:
            why = error or (None if logged_at == failures else OSError("a journal log write failed"))
            w = request.transmit() if why is None else self._journaled(request, key, why)
            if w is not None:
                touched.add(w)

    def _on_request(self, front: FrontConnection, raw: bytes, header: bytes, now: float) -> FrameWriter | None:
        listener = front.listener
        m = self.metrics
        found: dict[int, str] = {}
        try:
            scan = listener.scanner.scan(raw, full=True, found=found)
        except MessageError as exc:
            self._undecodable(front, raw, header, found, exc, now)
            return None
        mti = scan.mti
        m.front_received(listener.name, mti).inc()
        if not is_valid_mti(mti) or not is_request(mti):
            m.decode_errors("front", listener.name, "not_a_request").inc()
            log.warning("listener %s: %s is not a request; dropped", listener.name, mti if mti.isdigit() else "MTI")
            return None
        if mti[1] == "8" and self.config.gateway.local_network_management:
            return self.answer_locally(front, raw, header, "00", "network_management", now, now, counted=False)
        values = scan.values
        rejection = listener.rules.validate(listener.dialect, mti, scan.bitmap, values, self._now_utc)
        if rejection is not None:
            m.rejections(listener.name, rejection.reason, rejection.code).inc()
            log.warning("listener %s: %s rejected with %s (%s%s)", listener.name, mti, rejection.code,
                        rejection.reason, f", field {rejection.field}" if rejection.field else "")
            return self.answer_locally(front, raw, header, rejection.code, rejection.reason, now, now, counted=False)
        if mti[1] == "4":
            front.in_flight += 1  # answered by the task, which may wait for the journal
            self._tasks.start_soon(self._front_reversal, front, raw, header, scan, now)
            return None
        dup_key: DupKey | None = None
        if self.duplicates.window:
            get = values.get
            dup_key = "|".join((listener.name, get(41, ""), get(42, ""), get(11, ""), get(7, ""), get(4, ""),
                                get(37, "")))
            entry = self.duplicates.lookup(dup_key, now)
            if entry is not None:
                return self._on_duplicate(front, raw, header, entry, now)
        route = self.routes.lookup(mti, values.get(2), values.get(49), values.get(41), values.get(42))
        if isinstance(route, NoRoute):
            m.rejections(listener.name, route.reason, route.code).inc()
            pan = values.get(2)
            log.warning("listener %s: %s has no route (%s, PAN %s); answered %s", listener.name, mti, route.reason,
                        mask_pan(pan) if pan else "none", route.code)
            return self.answer_locally(front, raw, header, route.code, route.reason, now, now, counted=False)
        upstream = self.upstreams[route.upstream]
        conn = upstream.pick()
        if conn is None or self.draining:
            code = self.config.gateway.unavailable_code
            m.rejections(listener.name, "no_link", code).inc()
            log.warning("listener %s: no usable link to %s; answered %s", listener.name, upstream.cfg.name, code)
            return self.answer_locally(front, raw, header, code, "no_link", now, now, counted=False)
        return self._forward(front, raw, header, scan, upstream, conn, route.timeout, now, dup_key)

    def _forward(self, front: FrontConnection, raw: bytes, header: bytes, scan: Scan, upstream: Upstream,
                 conn: UpstreamConnection, timeout: float, now: float, dup_key: DupKey | None) -> FrameWriter | None:
        listener = front.listener
        translate = listener.dialect is not upstream.dialect
        mti = scan.mti
        values = scan.values
        request = FrontRequest(self, front, raw, header, mti, values.get(11, ""), upstream, now, translate)
        stan = conn.allocate_stan()
        request.upstream_stan = stan
        request.conn = conn
        if translate:
            msg = decode(listener.dialect, raw, check_types=False)
            msg["11"] = stan
            out = encode(upstream.dialect, msg, check_types=False)
        else:
            out = listener.scanner.splice(raw, scan, 11, stan)
        match_fields = upstream.cfg.match_fields
        key = match_key(mti, stan, tuple(values.get(f, "") for f in match_fields) if match_fields else ())
        if dup_key is not None:
            request.duplicate = self.duplicates.start(dup_key, request, now)
        front.in_flight += 1
        self.front_in_flight += 1
        m = self.metrics
        m.upstream_sent(upstream.cfg.name, mti).inc()
        m.in_flight(upstream.cfg.name).inc()
        if not self.journaling:
            request.sent = True
            return conn.send_request(request, out, key, now + timeout, now)
        # Journaled before it leaves.
        request.original = {key_: values[k] for k, key_ in REVERSAL_KEYS if k in values}
        request.txn_id = new_id()
        # "listener": front_identity(front), the listener's name today (spelled out on the hot path).
        row = {"id": request.txn_id, "listener": listener.name, "mti": mti, "upstream": upstream.cfg.name,
               "link": conn.index, "upstream_stan": stan}
        journal = self.journal
        request.frame = conn.register(request, out, key, now + timeout, now)
        if journal.write_ahead:
            # Into the log (journal/txlog.py) with the others of this poller round, in one
            # write before any of them is sent (release_held, _send_held).
            journal.record_txn(row, request.original, write=False, created=self.round_wall)
            self._held.append((request, key, journal.log_failures))
            return None
        # synchronous=FULL: the frame waits for the (fsync'd) commit of its batch.
        journal.submit(journal.store.insert_txn, row, request.original,
                       callback=lambda _r, error: self._journaled(request, key, error))
        return None

    def _journaled(self, request: FrontRequest, key: tuple, error: BaseException | None) -> FrameWriter | None:
        if error is None:
            return request.transmit()
        # The journal can't take it: refuse rather than send what a crash would forget.
        log.error("journal write failed (%s): %s answered 96 without being sent", type(error).__name__, request.mti)
        conn = request.conn
        if request.done or conn is None or conn.pending.pop(key) is not request:
            return None
        return request._fail("96", "journal_failed", trio.current_time())

    def _journal_ready(self) -> tuple[bool, str]:
        """The journal takes what it is given: no part of it failing now (the store, the log, the
        indexer), and the indexer not further behind than ``[journal] max_log_segments``."""
        journal = self.journal
        if journal.failed:
            return False, f"the journal is not writable ({journal.failed})"
        if journal.segments_waiting > journal.max_log_segments:
            return False, (f"the journal's indexer is behind: {journal.segments_waiting} log segments wait "
                           f"(more than {journal.max_log_segments})")
        return True, ""

    def _restore_stans(self) -> None:
        """Resume each link's STAN counter past what it used before a restart (docs/domain.md §2.1)."""
        store = self.journal.store
        for up in self.upstreams.values():
            for conn in up.connections:
                try:
                    last = self.journal.run_sync(store.get_meta, self._stan_key(conn))
                except sqlite3.Error as exc:  # an unreadable store: counted and shown; start anyway
                    self.journal.note_failure("store", f"the STAN counters can't be read ({exc})", failure_reason(exc))
                    last = None
                if last is not None and last.isdigit():
                    conn.stans = StanAllocator((int(last) + STAN_BLOCK) % 999_999 + 1)  # past anything used since the save
                conn.on_stan_block = self._save_stan

    def _stan_key(self, conn: UpstreamConnection) -> str:
        prefix = "stan" if self.worker is None else f"stan:w{self.worker}"
        return f"{prefix}:{conn.cfg.name}:{conn.index}"

    def _save_stan(self, conn: UpstreamConnection) -> None:
        self.journal.submit(self.journal.store.set_meta, self._stan_key(conn), str(conn.stans.last))

    def _save_stans(self) -> None:
        for up in self.upstreams.values():
            for conn in up.connections:
                self._save_stan(conn)

    # ------------------------------------------------------------------ duplicates

    def _on_duplicate(self, front: FrontConnection, raw: bytes, header: bytes, entry: DuplicateEntry | tuple,
                      now: float) -> FrameWriter | None:
        listener = front.listener
        self.metrics.duplicates(listener.name).inc()
        if isinstance(entry, DuplicateEntry):
            if self.config.gateway.duplicate_in_flight == "94":
                log.warning("listener %s: duplicate of a request still in flight; answered 94", listener.name)
                return self.answer_locally(front, raw, header, "94", "duplicate", now, now, counted=False)
            log.info("listener %s: duplicate of a request still in flight; it will get the same answer",
                     listener.name)
            front.in_flight += 1
            entry.followers.append((front, raw, header))
            return None
        _, rc, auth_code = entry
        log.info("listener %s: duplicate request; the stored answer %s is replayed", listener.name, rc)
        return self.answer_locally(front, raw, header, rc or "96", "duplicate", now, now, counted=False,
                                   auth_code=auth_code)

    def complete_duplicates(self, request: FrontRequest, rc: str, auth_code: str | None, out: bytes | None) -> None:
        """The first of a set of duplicates has its answer: keep it for replays, and answer the waiting ones."""
        entry = request.duplicate
        if entry is None:
            return
        self.duplicates.complete(entry, rc, auth_code)
        followers, entry.followers = entry.followers, []
        now = trio.current_time()
        for front, raw, header in followers:
            front.request_done()
            if front.closed:
                continue
            if out is not None:
                listener = front.listener
                front.writer.enqueue(listener.framer.encode(out, header=listener.framer.reply_header(header)))
                w: FrameWriter | None = front.writer
            else:
                w = self.answer_locally(front, raw, header, rc, "duplicate", now, now, counted=False,
                                        auth_code=auth_code)
            if w is not None:
                request.upstream.schedule_flush(w)

    # ------------------------------------------------------------------ front-end reversals

    async def _front_reversal(self, front: FrontConnection, raw: bytes, header: bytes, scan: Scan,
                              received_at: float) -> None:
        """A 0400/0420/0421 from a front end: checked against the journal through field 90, then forwarded."""
        try:
            w = await self._front_reversal_inner(front, raw, header, scan, received_at)
        except Exception as exc:  # noqa: BLE001 - this task's boundary: answer, never reach the root nursery
            w = self.request_failed(front, raw, header, exc, "reversal", received_at, counted=True)
        if w is not None and not w.flush_soon():
            await w.flush()

    async def _front_reversal_inner(self, front: FrontConnection, raw: bytes, header: bytes, scan: Scan,
                                    received_at: float) -> FrameWriter | None:
        listener = front.listener
        values = scan.values
        m = self.metrics

        def local(code: str, reason: str) -> FrameWriter | None:
            if code != "00":
                m.rejections(listener.name, reason, code).inc()
            log.info("listener %s: %s answered %s (%s)", listener.name, scan.mti, code, reason)
            return self.answer_locally(front, raw, header, code, reason, received_at, received_at)

        try:
            f90 = OriginalData.parse(values.get(90, ""))
        except MessageError:
            return local("30", "bad_original_data")
        # A reversal that names another acquirer in field 90 than in its DE 32 points at nothing
        # it may reverse: answered as an unknown original, like one naming another merchant's.
        acquirer = values.get(32, "")
        if f90.acquirer and f90.acquirer != acquirer.lstrip("0"):
            return local(self.config.gateway.unknown_original_code, "unknown_original")
        store = self.journal.store
        await self.journal.sync()  # the original may be in the write-ahead log only
        found = await self.journal.call(store.find_original, front_identity(front), acquirer, values.get(41, ""),
                                        values.get(42, ""), f90.stan, f90.transmission, original_mti(f90.mti))
        if found is None:
            return local(self.config.gateway.unknown_original_code, "unknown_original")
        txn, original, saf_states = found
        if values.get(4) != txn.amount and not scan.has(95):
            return local(self.config.gateway.amount_mismatch_code, "amount_mismatch")
        if txn.state == REVERSED:
            return local("00", "already_reversed")  # never twice: the repeat is acknowledged again
        if txn.state == NOT_SENT or (txn.response_code and txn.response_code not in APPROVED_CODES):
            # Declined (in time or late), or it never left: no funds are held, the switch has
            # nothing to undo, and asking it would only add a message it must reconcile.
            return local(NOTHING_TO_REVERSE_CODE, "nothing_to_reverse")
        if saf_states:
            return local("00", "already_reversed")  # the gateway is reversing it itself: never twice
        upstream = self.upstreams.get(txn.upstream)
        conn = upstream.pick() if upstream is not None else None
        if upstream is None or conn is None or self.draining:
            return local(self.config.gateway.unavailable_code, "no_link")
        msg = decode(listener.dialect, raw, check_types=False)
        stan = conn.allocate_stan()
        msg["11"] = stan
        msg["90"] = OriginalData(mti=txn.mti, stan=txn.upstream_stan, transmission=txn.transmission,
                                 acquirer=f90.acquirer, forwarder=f90.forwarder).encode()
        out = encode(upstream.dialect, msg, check_types=False)
        now = trio.current_time()
        mti = scan.mti
        request = ForwardedReversal(self, front, raw, header, mti, values.get(11, ""), upstream, received_at, True)
        if original:
            request.take_over = lambda: self.reversals.take_over(upstream, original, txn)
        request.upstream_stan = stan
        request.conn = conn
        request.restore = {"90": values[90]}
        request.txn_id = new_id()
        txn_id = txn.id

        def answered(rc: str) -> None:
            if rc == "00":
                self.journal.set_state(txn_id, REVERSED)
                self.journal.submit(store.cancel_unsent_saf, txn_id, "reversed by the front end")

        request.on_answer = answered
        row = {"id": request.txn_id, "listener": front_identity(front), "mti": mti, "upstream": upstream.cfg.name,
               "link": conn.index, "upstream_stan": stan}
        fields = {k: msg[k] for k in REVERSAL_FIELDS if k in msg}
        self.front_in_flight += 1
        m.upstream_sent(upstream.cfg.name, mti).inc()
        m.in_flight(upstream.cfg.name).inc()
        extra = tuple(values.get(f, "") for f in upstream.cfg.match_fields)
        key = match_key(mti, stan, extra)
        request.frame = conn.register(request, out, key, now + upstream.cfg.reversal_timeout, now)
        if not self.journal.write_ahead:
            self.journal.submit(store.insert_txn, row, fields)
            return request.transmit()
        # Logged and sent with whatever else is held (one write; refused with 96 if it fails).
        self.journal.record_txn(row, fields, write=False)
        self._held.append((request, key, self.journal.log_failures))
        touched: set[FrameWriter] = set()
        self._send_held(touched)
        for w in touched:
            if not w.flush_soon():
                await w.flush()
        return None

    # ------------------------------------------------------------------ local answers

    def answer_locally(self, front: FrontConnection, raw: bytes, header: bytes, code: str, reason: str,
                       now: float, received_at: float, *, counted: bool = True,
                       auth_code: str | None = None, known: dict[int, str] | None = None,
                       mti: str | None = None) -> FrameWriter | None:
        """Answer a request with the gateway's own response (echo fields, 39 = ``code``). Raises nothing.

        The echo fields come from what is known already (``known``, the values a failed
        scan read, with ``mti``), else from a scan of ``raw`` for the echo fields: ``raw``
        passed the listener's full scan, which refuses exactly what a decode refuses, so
        that scan reads it too; nothing here decodes again what failed to decode. A
        response that can't be encoded falls back to a minimal one (see _local_response).

        ``counted``: the request was counted in flight and this answer completes it.
        """
        listener = front.listener
        if counted:
            front.request_done()
        if front.closed:
            return None
        try:
            values = known
            if values is None:
                found: dict[int, str] = {}
                try:
                    scan = self._echo_scanner(listener.dialect).scan(raw, full=True, found=found)
                    mti, values = scan.mti, scan.values
                except MessageError:
                    values = found
            if mti is None:
                mti = _peek_mti(listener, raw)
            out = self._local_response(listener.dialect, mti, values, code, auth_code)
            if out is None:
                self.metrics.request_errors(listener.name, "no_answer").inc()
                log.warning("listener %s: no %s answer (%s) can be built for %s", listener.name, code, reason,
                            mti if mti is not None and mti.isdigit() else "an unreadable MTI")
                return None
            front.writer.enqueue(listener.framer.encode(out, header=listener.framer.reply_header(header)))
        except Exception as exc:  # noqa: BLE001 - an error path must not raise: count it and give up on this one
            self.metrics.request_errors(listener.name, "no_answer").inc()
            log.error("listener %s: answering %s (%s) failed: %s", listener.name, code, reason,
                      masked_exception(exc))
            return None
        self.metrics.front_sent(listener.name, response_mti(mti), code).inc()  # type: ignore[arg-type]
        return front.writer

    def _echo_scanner(self, dialect: Dialect) -> Scanner:
        entry = self._echo_scanners.get(dialect.name)
        if entry is None or entry[0] is not dialect:
            entry = self._echo_scanners[dialect.name] = (dialect, Scanner(dialect, dialect.echo))
        return entry[1]

    @staticmethod
    def _local_response(dialect: Dialect, mti: str | None, values: dict[int, str], code: str,
                        auth_code: str | None) -> bytes | None:
        """The encoded response to a request of ``mti`` whose echo fields are in ``values``; None when
        ``mti`` has no response or not even the minimal one encodes. In order: every echo field; the
        echo fields whose value fits its ISO type; the response MTI and DE 39 alone."""
        if mti is None or not is_valid_mti(mti) or not is_request(mti):
            return None
        request = {str(k): v for k, v in values.items()}
        request["t"] = mti
        resp = build_response(dialect, request, code, auth_code=auth_code)
        try:
            return encode(dialect, resp, check_types=False)
        except MessageError:
            pass
        fitting = {k: v for k, v in resp.items()
                   if k in ("t", "39") or (int(k) in dialect.fields and check_field_type(dialect.fields[int(k)], v) is None)}
        for attempt in (fitting, {"t": resp["t"], "39": code}):
            try:
                return encode(dialect, attempt, check_types=False)
            except MessageError:
                continue
        return None

    def request_failed(self, front: FrontConnection, raw: bytes, header: bytes, exc: Exception, where: str,
                       now: float, *, counted: bool) -> FrameWriter | None:
        """The boundary around one request's handling: what escaped it is counted, logged masked and
        answered (30 for bytes that do not decode, 96 for anything else). Raises nothing."""
        listener = front.listener
        code, reason = ("30", "format_error") if isinstance(exc, DecodeError) else ("96", "internal_error")
        try:
            self.metrics.request_errors(listener.name, reason).inc()
            log.error("listener %s: %s handling failed (%s); answered %s\n%s", listener.name, where, reason, code,
                      masked_exception(exc))
        except Exception:  # noqa: BLE001 - counting and logging must not stop the answer
            pass
        return self.answer_locally(front, raw, header, code, reason, now, now, counted=counted)

    def _undecodable(self, front: FrontConnection, raw: bytes, header: bytes, found: dict[int, str],
                     exc: MessageError, now: float) -> None:
        """A request that does not decode: answered 30 if its MTI can be read, else counted and dropped.

        The answer echoes the values the scan read before it failed (``found``): the bytes are
        never decoded again."""
        listener = front.listener
        m = self.metrics
        m.decode_errors("front", listener.name, "decode").inc()
        mti = _peek_mti(listener, raw)
        if mti is None or not is_request(mti):
            log.warning("listener %s connection %d: undecodable frame dropped (%s)", listener.name, front.id, exc)
            return
        log.warning("listener %s: %s does not decode (%s); answered 30", listener.name, mti, exc)
        m.rejections(listener.name, "format_error", "30").inc()
        self.answer_locally(front, raw, header, "30", "format_error", now, now, counted=False, known=found, mti=mti)

    # ------------------------------------------------------------------ from links

    def on_unmatched(self, conn: UpstreamConnection, scan: Scan, raw: bytes, late: object | None,
                     now: float) -> FrameWriter | None:
        rc = scan.values.get(39, "")
        if late is not None:
            self.metrics.late_responses(conn.cfg.name, rc).inc()
            log.warning("upstream %s: late %s (STAN %s, response code %s) not forwarded",
                        conn.cfg.name, scan.mti, scan.values.get(11, "?"), rc or "none")
            self.reversals.late_response(conn, scan, raw, late if isinstance(late, FrontRequest) else None)
        else:
            self.metrics.unmatched_responses(conn.cfg.name).inc()
            log.warning("upstream %s: unmatched %s (STAN %s, response code %s) dropped",
                        conn.cfg.name, scan.mti, scan.values.get(11, "?"), rc or "none")
        return None


def _peek_mti(listener: Listener, raw: bytes) -> str | None:
    try:
        if listener.dialect.mti_encoding == "bcd":
            mti = raw[:2].hex()
        else:
            mti = raw[:4].decode("cp500" if listener.dialect.mti_encoding == "ebcdic" else "ascii")
    except UnicodeDecodeError:
        return None
    return mti if len(mti) == 4 and is_valid_mti(mti) else None
