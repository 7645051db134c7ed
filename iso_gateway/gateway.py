"""The gateway: the trio shell around the transaction flow (``core/flow.py``).

It wires listeners, upstream links, the poller, the journal and the reversal queue to
one ``Flow``, feeds the flow what happens (frames read by the poller, link sessions
beginning and ending, deadlines, journal writes and lookups done, answers delivered)
and executes what the flow decides (``_execute``): frames to send, answers to write,
journal records, reversals to queue, deadlines to arm. It decides nothing about a
message itself.

A poller round feeds every frame read in it, then executes the round's actions at once
(``end_round``): the requests it forwards are logged with one journal write and each
writer it touched sends its batch. An event fed outside a round (a timer, a journal
callback, a lookup, the reversal queue) is followed by ``run_flow``, which does the same.
"""

from __future__ import annotations

import logging
import secrets
from typing import Any, Callable, Sequence

import trio

from .clock import Clock
from .config import Config, MacConfig, route_table
from .core.errors import ConfigError
from .core.flow import (
    ANSWER, ARM, CANCEL_SAF, INSTALL_KEY, LATE, LOG, LOOKUP, NET_DONE, RECORD, REVERSE, SAF_OUTCOME, SAVE_STAN, SEND, STAN_BLOCK,
    STATE, TAKE_OVER, Flow, FlowSettings, Link, Txn,
)
from .core.dialect import Dialect
from .core.framing import Frame
from .core.macs import ClientScope, ClientTable, MacField, MacHop
from .core.matching import StanAllocator
from .journal import Journal, failure_reason, new_id, pg_settings
from .logs import masked_exception
from .metrics import Metrics
from .net.frontend import FrontConnection, Listener
from .net.links import Upstream, UpstreamConnection
from .net.poller import Poller
from .net.writer import FrameWriter
from .reversals import DurableReversals, ReversalSender
from .keys import JournalKeys, open_gateway_keys
from .security.module import SecurityModule
from .security.pan import PanVault
from .specfiles import get_dialect, load_rules

log = logging.getLogger("iso_gateway.gateway")
flow_log = logging.getLogger("iso_gateway.flow")  # the flow's LOG actions

# Seconds between hand-overs of the hot path's counters to prometheus-client
# (a scrape also triggers one, so a scrape is never stale).
METRICS_FLUSH = 1.0


def flow_settings(config: Config) -> FlowSettings:
    g = config.gateway
    return FlowSettings(timeout_code=g.timeout_code, unavailable_code=g.unavailable_code,
                        unknown_original_code=g.unknown_original_code, amount_mismatch_code=g.amount_mismatch_code,
                        local_network_management=g.local_network_management,
                        duplicate_in_flight=g.duplicate_in_flight, journaling=config.journal.enabled)


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
        # The keys (keys.py): the security module of [security], the journal's vault from its data
        # keys. ``security`` is what MACs and key exchanges use; None when no key is needed (the
        # journal disabled and no [security] section).
        self.keys: JournalKeys | None = None
        self.security: SecurityModule | None = None
        if journal_cfg.enabled or "security" in config.model_fields_set:
            self.keys = open_gateway_keys(config, config_path or "config")
            self.security = self.keys.module
        if journal_cfg.enabled:
            assert self.keys is not None
            vault = self.keys.vault
            self.journal = Journal(journal_cfg.path, vault, synchronous=journal_cfg.synchronous, max_batch=journal_cfg.max_batch,
                                   metrics=self.metrics, worker=worker or 0, replay_all=worker is None,
                                   indexer=journal_cfg.indexer, max_log_segments=journal_cfg.max_log_segments,
                                   reversal_data_window=journal_cfg.reversal_data_window, retention=journal_cfg.retention * 86400,
                                   pg=pg_settings(journal_cfg, worker, config.gateway.duplicate_window))
        else:
            log.warning("journal disabled: transactions are not journaled and reversals are lost on restart")
            self.journal = Journal(":memory:", PanVault(secrets.token_bytes(32)), max_batch=journal_cfg.max_batch,
                                   metrics=self.metrics)
        if self.keys is not None:
            self.keys.attach(self.journal)
        self.journal.wall = self.clock.wall
        # A committed batch's callbacks feed the flow; what they decided goes out together after them.
        self.journal.after_callbacks = self.run_flow
        self.reversals = DurableReversals(self, self.journal, self.clock)
        dialect_dirs = tuple(config.dialect_dirs)
        rule_dirs = tuple(config.rule_dirs)
        # Reads every front connection and switch link from one task (net/poller.py).
        self.poller = Poller(self.begin_round, self.end_round)
        self.upstreams = {u.name: Upstream(u, self, self.metrics, get_dialect(u.dialect, dialect_dirs), self.clock)
                          for u in config.upstreams}
        # Every decision about a message (core/flow.py); this class executes what it decides.
        self.flow = Flow(flow_settings(config), route_table(config.routes, config.routing, source=config_path or "config"),
                         {name: up.side for name, up in self.upstreams.items()}, self.metrics, new_id,
                         config.gateway.duplicate_window)
        self.listeners = [Listener(lc, self, get_dialect(lc.dialect, dialect_dirs), load_rules(lc.rules, rule_dirs))
                          for lc in config.listeners]
        self._apply_hops(self._hop_settings(config))
        self._stop = trio.Event()
        self._stopped = trio.Event()
        self.draining = False
        self.metrics_port: int | None = None
        # More conditions for /readyz, each () -> (ok, why if not): e.g. the journal is writable.
        self.readiness_checks: list[Callable[[], tuple[bool, str]]] = [self._journal_ready]
        # Requests recorded in the journal's log but not yet written nor sent (RECORD): those of
        # the poller's round, written when it ends (one write, and one seal, for all of them).
        self._held: list[tuple[Txn, int]] = []  # (request, journal.log_failures when recorded)
        self._tasks: trio.Nursery | None = None

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
        if [lc.tls is None for lc in config.listeners] != [lc.tls is None for lc in self.config.listeners] or [
            u.tls is None for u in config.upstreams
        ] != [u.tls is None for u in self.config.upstreams]:
            raise ConfigError(self.config_path or "config", "listeners/upstreams",
                              "TLS turned on or off: this needs a restart")
        routes = route_table(config.routes, config.routing, source=self.config_path or "config")
        hops = self._hop_settings(config)
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
        self._apply_hops(hops)
        self.flow.routes = routes
        self.flow.settings = flow_settings(config)
        self.config = config
        # TLS files read again: new connections get them, established ones keep theirs; a file that
        # does not load keeps the old certificate, and the log says why.
        tls_reloaded = 0
        for lst, lc in zip(self.listeners, config.listeners, strict=True):
            if lst.tls is not None:
                why = lst.reload_tls(lc)
                if why is None:
                    tls_reloaded += 1
                else:
                    log.error("listener %s keeps its TLS certificate: %s", lst.name, why)
        for uc in config.upstreams:
            up = self.upstreams[uc.name]
            if up.tls is not None:
                why = up.reload_tls(uc)
                if why is None:
                    tls_reloaded += 1
                else:
                    log.error("upstream %s keeps its TLS settings: %s", uc.name, why)
        log.info("configuration reloaded: %d routes%s", len(config.routes),
                 f"; TLS files read again for {tls_reloaded} listeners and upstreams" if tls_reloaded else "")

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
                            sender = self.reversals.senders[up.cfg.name] = ReversalSender(self.reversals, up, self.clock)
                            n.start_soon(sender.run)
                            n.start_soon(sender.run_suspects)

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
        if self.security is not None:
            self.security.close()
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
        self.draining = self.flow.draining = True
        for lst in self.listeners:
            lst.stop_accepting()
        log.info("shutting down: no new connections; draining in-flight requests")
        with trio.move_on_after(self.config.gateway.drain_timeout):
            while self.flow.in_flight:  # noqa: ASYNC110 - a count the flow keeps; checked while draining only
                await trio.sleep(0.05)
        if self.flow.in_flight:
            log.warning("drain deadline passed with %d requests in flight; answering them %s",
                        self.flow.in_flight, self.config.gateway.timeout_code)
        self.flow.expire_all(trio.current_time())
        self.run_flow()
        await trio.lowlevel.checkpoint()  # let the answers' sends finish
        with trio.move_on_after(5):
            async with trio.open_nursery() as n:
                for up in self.upstreams.values():
                    n.start_soon(up.sign_off)

    def _hop_settings(self, config: Config) -> tuple[list[tuple[MacHop | None, ClientTable | None]], list[MacHop | None]]:
        """Each listener's MAC and identified clients and each upstream's MAC, as the flow takes them;
        ConfigError when a MAC has no security module, an unknown key or a dialect without 64/128."""
        source = self.config_path or "config"
        security = self.security  # the security module (keys.py: set up with the journal's keys)

        def hop(where: str, mac: MacConfig | None, dialect: Dialect) -> MacHop | None:
            if mac is None:
                return None
            if security is None:
                raise ConfigError(source, f"{where}.mac", "MACs need a security module ([security])")
            try:
                security.check_value(mac.key)
            except Exception as exc:  # noqa: BLE001 - UnknownKey, or a token that can't tell: either way unusable
                raise ConfigError(source, f"{where}.mac.key", f"the security module has no usable key {mac.key!r} "
                                  f"({type(exc).__name__})") from None
            return MacHop(mac.key, MacField(dialect), mac.padding, mac.failure_code, mac.zone_key, mac.algorithm)

        fronts = []
        for i, (lst, lc) in enumerate(zip(self.listeners, config.listeners, strict=True)):
            clients = None
            if lc.clients:
                clients = ClientTable({c.identity: ClientScope(frozenset(a.lstrip("0") for a in c.acquirers),
                                                               frozenset(m.rstrip(" ") for m in c.merchants),
                                                               frozenset(t.rstrip(" ") for t in c.terminals))
                                       for c in lc.clients}, lc.client_refusal_code)
            fronts.append((hop(f"listeners.{i}", lc.mac, lst.side.dialect), clients))
        ups = [hop(f"upstreams.{i}", uc.mac, up.dialect)
               for i, (up, uc) in enumerate(zip(self.upstreams.values(), config.upstreams, strict=True))]
        return fronts, ups

    def _apply_hops(self, hops: tuple[list[tuple[MacHop | None, ClientTable | None]], list[MacHop | None]]) -> None:
        fronts, ups = hops
        for lst, (mac, clients) in zip(self.listeners, fronts, strict=True):
            lst.side.mac, lst.side.clients = mac, clients
        for up, up_mac in zip(self.upstreams.values(), ups, strict=True):
            up.side.mac = up_mac
        self.flow.security = self.security

    # ------------------------------------------------------------------ feeding the flow

    def begin_round(self) -> None:
        """A round of reads starts: the wall clock that validation checks DE 7 against, and that
        the journal's records of this round carry."""
        self.flow.begin_round(self.clock.wall())

    def on_front_frames(self, front: FrontConnection, frames: Sequence[Frame], touched: set[FrameWriter],
                        now: float) -> None:
        """Every complete frame one read of ``front`` gave (``now``: trio's clock at the start of the
        poller's round) goes to the flow; each request counts in the connection's in-flight until
        its ANSWER. The round's actions run at its end (``end_round``)."""
        front_frame = self.flow.front_frame
        for frame in frames:
            if frame.keepalive:
                front.writer.enqueue(front.side.framer.keepalive())
                touched.add(front.writer)
                continue
            front.in_flight += 1
            front_frame(front, frame.message, frame.header, now)

    def end_round(self, touched: set[FrameWriter]) -> set[FrameWriter]:
        """Execute what the flow decided, log the requests held for the journal with one write
        and send them; returns the writers to flush (the poller's, or ``run_flow``'s)."""
        wall = self.flow.wall
        self._execute(touched, wall)
        if self._held:
            self._send_held()
            self._execute(touched, wall)
        return touched

    def run_flow(self) -> None:
        """Execute what the flow decided after an event fed outside a poller round, and send."""
        if not self.flow.actions and not self._held:
            return
        touched: set[FrameWriter] = set()
        self._execute(touched, None)
        if self._held:
            self._send_held()
            self._execute(touched, None)
        for writer in touched:
            writer.flush_soon()

    def _send_held(self) -> None:
        """The held requests are logged with one write, then the flow hears how it went: one whose
        log record a failed write dropped (this one, or another since it was recorded) is refused."""
        held, self._held = self._held, []
        journal = self.journal
        error: OSError | None = None
        try:
            journal.write_log()
        except OSError as exc:
            error = exc
        failures = journal.log_failures
        now = trio.current_time()
        journal_done = self.flow.journal_done
        for txn, logged_at in held:
            journal_done(txn, error or (None if logged_at == failures else OSError("a journal log write failed")), now)

    # ------------------------------------------------------------------ executing the flow's actions

    def _execute(self, touched: set[FrameWriter], wall: float | None) -> None:
        """Carry out the flow's actions in order (see core/flow.py for each); the writers that got
        frames go into ``touched``. ``wall``: the round's wall clock for journal stamps (None: now)."""
        flow = self.flow
        while flow.actions:
            for action in flow.take_actions():
                op = action[0]
                if op == SEND:
                    writer = action[1].io.writer
                    if writer is not None:
                        writer.enqueue(action[2])
                        touched.add(writer)
                elif op == ANSWER:
                    front = action[1]
                    front.request_done()
                    frame = action[2]
                    txn = action[3]
                    if frame is not None and not front.closed:
                        writer = front.writer
                        if txn is None:
                            writer.enqueue(frame)
                        else:
                            writer.enqueue(frame, self._delivery(txn))
                        touched.add(writer)
                    elif txn is not None:
                        flow.delivered(txn, False)
                elif op == RECORD:
                    self._record(action[1], action[2], action[3], wall)
                elif op == STATE:
                    self.journal.set_state(action[1], action[2], action[3], action[4], wall)
                elif op == ARM:
                    action[1].io.arm(action[2])
                else:
                    self._execute_rare(action)

    def _execute_rare(self, action: tuple[Any, ...]) -> None:
        op = action[0]
        if op == LOG:
            flow_log.log(action[1], action[2], *[masked_exception(a) if isinstance(a, BaseException) else a
                                                 for a in action[3]])
        elif op == SAF_OUTCOME:
            action[1].owner.outcome(action[1], action[2], action[3])
        elif op == NET_DONE:
            waker = action[1].waker
            if waker is not None:
                waker.set()
        elif op == REVERSE:
            self.reversals.queue(action[1], action[2], action[3], action[4])
        elif op == LATE:
            self.reversals.late_response(action[1], action[2])
        elif op == CANCEL_SAF:
            self.journal.submit(self.journal.store.cancel_unsent_saf, action[1], action[2])
        elif op == LOOKUP:
            assert self._tasks is not None
            self._tasks.start_soon(self._lookup, action[1], action[2:])
        elif op == TAKE_OVER:
            txn = action[1]
            original, fields = txn.reversal_of
            upstream = self.upstreams.get(original.upstream)
            if upstream is not None:
                self.reversals.take_over(upstream, fields, original)
        elif op == SAVE_STAN:
            self._save_stan(action[1].io)
        elif op == INSTALL_KEY:
            self._install_key(*action[1:])
        else:
            raise AssertionError(f"unknown flow action {op!r}")

    def _install_key(self, link: Link, request: dict[str, str], label: str, zone_key: str, wrapped: str,
                     check_value: str, algorithm: str) -> None:
        """A switch's new MAC key into the security module (INSTALL_KEY); the flow answers the switch."""
        installed: str | None = None
        try:
            installed = self.flow.security.install_key(label, kek=zone_key, wrapped=bytes.fromhex(wrapped),
                                                       check_value=check_value, algorithm=algorithm)
        except Exception as exc:  # noqa: BLE001 - a bad key or check value: refused, counted, the old key stays
            log.warning("upstream key change for %s refused: %s", label, type(exc).__name__)
        self.flow.key_installed(link, request, installed)

    def _delivery(self, txn: Txn) -> Callable[[bool], None]:
        """What the front end's writer tells once the answer to ``txn`` is in the kernel (or never will be)."""
        flow = self.flow

        def delivered(ok: bool) -> None:
            flow.delivered(txn, ok)
            self.run_flow()

        return delivered

    def _record(self, txn: Txn, row: dict[str, Any], fields: dict[str, str], wall: float | None) -> None:
        """Journal ``txn`` before it leaves: into the log with the others of this round (one write
        when it ends: ``_send_held``), or, without the log (synchronous=FULL, or the in-memory
        journal), once its batch is committed."""
        journal = self.journal
        if journal.write_ahead:
            journal.record_txn(row, fields, write=False, created=wall)
            self._held.append((txn, journal.log_failures))
            return

        def committed(result: object, error: BaseException | None) -> None:
            self.flow.journal_done(txn, error, trio.current_time())  # carried out after the batch's callbacks

        journal.submit(journal.store.insert_txn, row, fields, callback=committed)

    async def _lookup(self, txn: Txn, args: tuple[Any, ...]) -> None:
        """A front-end reversal's original, from the journal (LOOKUP), for the flow."""
        try:
            await self.journal.sync()  # the original may be in the write-ahead log only
            found = await self.journal.call(self.journal.store.find_original, *args)
        except Exception as exc:  # noqa: BLE001 - the reversal's boundary: the flow answers 96
            self.flow.lookup_failed(txn, exc)
        else:
            self.flow.lookup_done(txn, found, trio.current_time())
        self.run_flow()

    def _journal_ready(self) -> tuple[bool, str]:
        """The journal takes what it is given: no part of it failing now (the store, the log, the
        indexer), and the indexer not further behind than ``[journal] max_log_segments``."""
        journal = self.journal
        if journal.failed:
            return False, f"the journal is not writable ({journal.failed})"
        if journal.pg is not None and journal.stalled_for > 2 * journal.pg.db_timeout:
            return False, (f"the journal is not writable (store: the database has not answered a commit for "
                           f"{journal.stalled_for:.0f} s)")
        if journal.segments_waiting > journal.max_log_segments:
            return False, (f"the journal's indexer is behind: {journal.segments_waiting} log segments wait "
                           f"(more than {journal.max_log_segments})")
        return True, ""

    def _restore_stans(self) -> None:
        """Resume each link's STAN counter past what it used before a restart (docs/domain.md §2.1).
        On a store several nodes share, a switch's links take their STANs from blocks of the
        database's counter for that switch instead (journal/stanblocks.py): no two nodes hold
        the same STAN."""
        store = self.journal.store
        if self.journal.shared:
            from .journal.stanblocks import shared_stans

            for up in self.upstreams.values():
                stans = shared_stans(self.journal, up.cfg.name)
                for conn in up.connections:
                    conn.link.stans = stans
            return
        for up in self.upstreams.values():
            for conn in up.connections:
                try:
                    last = self.journal.run_sync(store.get_meta, self._stan_key(conn))
                except store.errors as exc:  # an unreadable store: counted and shown; start anyway
                    self.journal.note_failure("store", f"the STAN counters can't be read ({exc})", failure_reason(exc))
                    last = None
                if last is not None and last.isdigit():
                    # Past anything used since the save (SAVE_STAN comes every STAN_BLOCK STANs).
                    conn.link.stans = StanAllocator((int(last) + STAN_BLOCK) % 999_999 + 1)

    def _stan_key(self, conn: UpstreamConnection) -> str:
        prefix = "stan" if self.worker is None else f"stan:w{self.worker}"
        return f"{prefix}:{conn.cfg.name}:{conn.index}"

    def _save_stan(self, conn: UpstreamConnection) -> None:
        if self.journal.shared:
            return  # the database's counter is ahead of every block handed out
        self.journal.submit(self.journal.store.set_meta, self._stan_key(conn), str(conn.link.stans.last))

    def _save_stans(self) -> None:
        for up in self.upstreams.values():
            for conn in up.connections:
                self._save_stan(conn)
