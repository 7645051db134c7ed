"""Upstream links: persistent connections to a bank switch.

Each ``UpstreamConnection`` connects (trying the upstream's hosts in order),
optionally signs on (0800/001, traffic only after an 0810 with 00), then has the
gateway's poller read its responses (``on_readable``), answers the switch's own
0800s, sends an echo (0800/301) when it has been write-idle for
``echo_interval`` and reconnects after ``echo_misses`` unanswered echoes.
A connection whose requests go unanswered (``UNANSWERED_NOT_READY`` in a row, or
one echo) is not ``answering`` until the switch answers something in time: it
still carries traffic, but /readyz no longer counts it as ready.
Reconnects back off exponentially with jitter. When a connection drops, every
request in flight on it is answered at once, each told whether the gateway
closed it (``closing``) or the switch (or the network) did: a reversal in flight
when the switch drops a link is then sent again alone, on a ``SoloConnection``.
A response that matches nothing in flight is offered to the upstream's
``outstanding`` waiters (reversals not yet acknowledged) before it is counted as
late or unmatched.

The matching structures (the pending table, STAN allocation, deadlines) are
``core.matching``'s; this module keeps them per connection and decides what a
link does (connect, sign on, echo, reconnect, send a suspect alone), while what
a request's answer means is decided by its waiter (the gateway's or the SAF
worker's). It never raises out of ``run``: every failure is a counted, logged
state change.
"""

from __future__ import annotations

import enum
import logging
import random
import socket
from collections import OrderedDict
from datetime import datetime
from typing import TYPE_CHECKING, Callable, Protocol

import trio

from ..clock import Clock
from ..config import UpstreamConfig
from ..core.dialect import Dialect
from ..core.errors import FrameError, IsoGatewayError, MessageError
from ..core.framing import FrameDecoder, Framer, framer_from_config
from ..core.matching import Key, PendingTable, StanAllocator, match_key
from .poller import Poller
from ..core.message import build_response, decode, encode, is_request
from ..core.scanner import Scan, Scanner
from .sockio import SocketIO
from .writer import FrameWriter

if TYPE_CHECKING:
    from ..metrics import Metrics

log = logging.getLogger("iso_gateway.links")

# How long a timed-out request's key is remembered, so that its response is
# counted as late rather than unknown (jPOS QMUX keeps unhandled ones 120 s).
LATE_WINDOW = 120.0
LATE_MEMORY = 100_000
# Outstanding reversals remembered per upstream past their attempt's deadline (see
# Outstanding): as many as late responses, ample for any SAF backlog that is being worked.
OUTSTANDING_MEMORY = LATE_MEMORY
STAN_BLOCK = 1000  # a link's STAN counter is saved every this many STANs; a restart resumes past it
# A connection that took this many requests (echoes included) in a row and answered none in
# time is not "answering": /readyz stops counting it as ready, although it still carries
# traffic (a switch that accepts TCP but never answers looks connected). Why 3: a healthy
# switch answers nearly everything within the route timeout, so one or two timeouts are
# ordinary slowness, while three in a row with not one answer between them is a switch
# that has stopped answering. An unanswered echo counts as the whole run at once: echoes
# are only sent to an idle link, and the switch always answers them.
UNANSWERED_NOT_READY = 3


class LinkState(enum.Enum):
    DISCONNECTED = "disconnected"
    CONNECTING = "connecting"
    SIGNING_ON = "signing_on"
    READY = "ready"
    DOWN = "down"


class Waiter(Protocol):
    """Something in the pending table: a front-end request or the link's own 0800."""

    mti: str

    def on_response(self, conn: "UpstreamConnection", raw: bytes, scan: Scan, now: float) -> FrameWriter | None: ...

    def on_timeout(self, conn: "UpstreamConnection", now: float) -> FrameWriter | None: ...

    def on_link_lost(self, conn: "UpstreamConnection", now: float) -> FrameWriter | None: ...


class LinkListener(Protocol):
    """What a link tells the gateway about traffic nobody waits for."""

    def on_unmatched(self, conn: "UpstreamConnection", scan: Scan, raw: bytes, late: object | None, now: float) -> FrameWriter | None: ...

    def release_held(self) -> set[FrameWriter]:
        """Queue what waits to be sent (requests waiting for their journal write); returns the writers touched."""
        ...

    @property
    def poller(self) -> Poller:
        """Reads the link's socket (poller.py)."""
        ...


class _NetworkWaiter:
    """The link's own 0800 (sign-on, echo, sign-off) waiting for its 0810."""

    __slots__ = ("mti", "event", "rc", "sent_at", "rtt")

    def __init__(self, sent_at: float) -> None:
        self.mti = "0800"
        self.event = trio.Event()
        self.rc: str | None = None
        self.sent_at = sent_at
        self.rtt = 0.0

    def on_response(self, conn: "UpstreamConnection", raw: bytes, scan: Scan, now: float) -> None:
        self.rc = scan.values.get(39, "")
        self.rtt = now - self.sent_at
        self.event.set()

    def on_timeout(self, conn: "UpstreamConnection", now: float) -> None:
        self.event.set()

    on_link_lost = on_timeout


def transmission_time(now: datetime) -> str:
    """DE 7 of ``now`` (UTC, from the gateway's clock): MMDDhhmmss."""
    return now.strftime("%m%d%H%M%S")


class UpstreamConnection:
    """One TCP connection to a switch, reconnected for as long as ``run`` runs."""

    def __init__(self, upstream: "Upstream", index: int) -> None:
        self.upstream = upstream
        self.cfg = upstream.cfg
        self.index = index
        self.state = LinkState.DISCONNECTED
        self.host = ""
        self.writer: FrameWriter | None = None
        self.pending: PendingTable[Waiter] = PendingTable()
        self.stans = StanAllocator(random.randint(1, 999_999))
        self.last_write = 0.0
        self.late: OrderedDict[Key, tuple[float, object]] = OrderedDict()
        self._timer_wakeup = trio.Event()
        self._timer_target = float("inf")
        self._session_scope: trio.CancelScope | None = None
        self._gauge_at: tuple[str, str] | None = None
        self.connects = 0
        # Requests (echoes too) that timed out in a row with no answer in time between them;
        # an unanswered echo makes it at least UNANSWERED_NOT_READY. Kept across reconnects:
        # a new session to a silent switch is not ready until it answers.
        self.unanswered = 0
        self._silent_counted = False  # counted in the link_not_answering gauge (ready and not answering)
        self.closing = False  # set on shutdown, so the end of the link is not a warning
        self.last_header = b""  # TPDU or header of the switch's last frame (replies swap it)
        self.fd = -1  # the session's socket, read by the poller
        self._sock: socket.socket | None = None
        self._decoder: FrameDecoder | None = None
        # Told every STAN_BLOCK STANs, so the counter can be saved (the gateway journals it).
        self.on_stan_block: Callable[["UpstreamConnection"], None] | None = None

    # ------------------------------------------------------------------ state

    @property
    def ready(self) -> bool:
        return self.state is LinkState.READY and self.writer is not None and self.writer.broken is None

    @property
    def answering(self) -> bool:
        """False after a run of unanswered requests or an unanswered echo (see UNANSWERED_NOT_READY)."""
        return self.unanswered < UNANSWERED_NOT_READY

    def _count_silence(self) -> None:
        """Keep the link_not_answering gauge (connections ready but not answering) in step."""
        silent = self.state is LinkState.READY and self.unanswered >= UNANSWERED_NOT_READY
        if silent is not self._silent_counted:
            self._silent_counted = silent
            m = self.upstream.metrics
            if m is not None:
                g = m.link_not_answering(self.cfg.name)
                g.inc() if silent else g.dec()

    def _set_state(self, state: LinkState) -> None:
        """Change state; the link_state gauge counts connections per (upstream, host, state)."""
        self.state = state
        m = self.upstream.metrics
        if m is not None and self.host:
            if self._gauge_at is not None:
                m.link_state(self.cfg.name, *self._gauge_at).dec()
            self._gauge_at = (self.host, state.value)
            m.link_state(self.cfg.name, *self._gauge_at).inc()
        self._count_silence()

    # ------------------------------------------------------------------ sending

    def register(self, waiter: Waiter, raw_with_stan: bytes, key: Key, deadline: float, now: float) -> bytes:
        """Put ``waiter`` in the pending table under ``key`` and return the frame to send.

        The frame is encoded first, so a message that can't be framed leaves nothing pending."""
        frame = self.upstream.encode_frame(raw_with_stan)
        self.pending.add(key, waiter, deadline)
        if deadline < self._timer_target:
            self._timer_wakeup.set()
        self.last_write = now
        return frame

    def send_request(self, waiter: Waiter, raw_with_stan: bytes, key: Key, deadline: float, now: float) -> FrameWriter:
        """Register ``waiter`` and queue the frame; the caller flushes the writer."""
        assert self.writer is not None
        self.writer.enqueue(self.register(waiter, raw_with_stan, key, deadline, now))
        return self.writer

    def allocate_stan(self) -> str:
        stan = self.stans.allocate(self.pending)
        if self.on_stan_block is not None and self.stans.last % STAN_BLOCK == 0:
            self.on_stan_block(self)
        return stan

    async def network_exchange(self, code: str, timeout: float) -> tuple[str | None, float]:
        """Send an 0800 with DE 70 = ``code`` and wait for its 0810: (response code or None, rtt)."""
        if self.writer is None or self.writer.broken:
            return None, 0.0
        up = self.upstream
        now = trio.current_time()
        stan = self.allocate_stan()
        msg = {"t": "0800", "7": transmission_time(up.clock.utc()), "11": stan, "70": code}
        if self.cfg.institution_id:
            msg["32"] = self.cfg.institution_id
        waiter = _NetworkWaiter(now)
        raw = encode(up.dialect, msg)
        writer = self.send_request(waiter, raw, match_key("0800", stan, ()), now + timeout, now)
        if up.metrics:
            up.metrics.upstream_sent(self.cfg.name, "0800").inc()
        await writer.flush()
        await waiter.event.wait()
        return waiter.rc, waiter.rtt

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        """Connect, serve, reconnect: until cancelled."""
        cfg = self.cfg
        hosts = cfg.host_list()
        delay = cfg.reconnect_initial
        host_index = 0
        while True:
            host = hosts[host_index]
            self.host = f"{host.host}:{host.port}"
            self._set_state(LinkState.CONNECTING)
            if self.connects and self.upstream.metrics:
                self.upstream.metrics.reconnects(cfg.name, self.host).inc()
            self.connects += 1
            stream = None
            try:
                with trio.fail_after(cfg.connect_timeout):
                    stream = SocketIO.adopt(await trio.open_tcp_stream(host.host, host.port))
            except (OSError, trio.TooSlowError) as exc:
                reason = "timeout" if isinstance(exc, trio.TooSlowError) else (exc.strerror or type(exc).__name__)
                log.warning("upstream %s connection %d: connect to %s failed: %s", cfg.name, self.index, self.host, reason)
                if self.upstream.metrics:
                    self.upstream.metrics.connect_failures(cfg.name, self.host).inc()
            if stream is not None:
                signed_on = False
                try:
                    signed_on = await self._session(stream)
                except Exception:  # a bug in one session must not stop the link, or the daemon
                    log.exception("upstream %s connection %d: internal error; reconnecting", cfg.name, self.index)
                finally:
                    self._lost()
                    with trio.CancelScope(shield=True):
                        await stream.aclose()
                if signed_on:
                    delay = cfg.reconnect_initial  # a session that carried traffic resets the backoff
                    host_index = 0
                    self._set_state(LinkState.DISCONNECTED)
                    await trio.sleep(cfg.reconnect_initial * random.uniform(0.5, 1.0))
                    continue
            self._set_state(LinkState.DISCONNECTED)
            host_index = (host_index + 1) % len(hosts)
            if host_index == 0:
                await trio.sleep(delay * random.uniform(1.0, 1.25))  # jitter keeps many gateways apart
                delay = min(delay * 2, cfg.reconnect_max)

    async def _session(self, stream: SocketIO) -> bool:
        """Serve one connection; True if it reached READY."""
        cfg = self.cfg
        self.writer = FrameWriter(stream, send_timeout=max(cfg.echo_timeout, 5.0))
        self._decoder = self.upstream.framer.decoder()
        self._sock = stream.sock
        self.fd = stream.sock.fileno()
        reached_ready = False
        poller = self.upstream.listener.poller
        async with trio.open_nursery() as nursery:
            self._session_scope = nursery.cancel_scope
            poller.add(self)  # read until _end (the poller calls on_readable)
            nursery.start_soon(self._stop_reading_at_end, poller)
            nursery.start_soon(self._timer_loop)
            # The poller sends what a round queued; this task finishes a send the kernel could
            # not take at once (FrameWriter.flush_soon), so no reader ever waits on the switch,
            # logging first whatever requests are held for the journal.
            self.writer.before_flush = self.upstream.listener.release_held
            nursery.start_soon(self.writer.run_flusher)
            if cfg.sign_on:
                self._set_state(LinkState.SIGNING_ON)
                rc, _ = await self.network_exchange(cfg.network_codes.get("sign_on", "001"), cfg.sign_on_timeout)
                result = "ok" if rc == "00" else ("timeout" if rc is None else "declined")
                if self.upstream.metrics:
                    self.upstream.metrics.sign_ons(cfg.name, result).inc()
                if rc != "00":
                    log.warning("upstream %s connection %d: sign-on to %s %s", cfg.name, self.index, self.host, result)
                    nursery.cancel_scope.cancel()
                    return False
            self._set_state(LinkState.READY)
            reached_ready = True
            log.info("upstream %s connection %d: %s on %s", cfg.name, self.index,
                     "signed on, ready" if cfg.sign_on else "ready", self.host)
            if cfg.echo_interval > 0:
                nursery.start_soon(self._echo_loop)
        return reached_ready

    def _lost(self) -> None:
        """The connection is gone: answer everything that was waiting on it."""
        was_ready = self.state is LinkState.READY
        self._set_state(LinkState.DOWN)
        self._session_scope = None
        now = trio.current_time()
        touched: set[FrameWriter] = set()
        for waiter in self.pending.drain():
            w = waiter.on_link_lost(self, now)
            if w is not None:
                touched.add(w)
        self._timer_target = float("inf")
        for w in touched:
            self.upstream.schedule_flush(w)
        if was_ready:
            if self.closing:
                log.info("upstream %s connection %d: link to %s closed", self.cfg.name, self.index, self.host)
            else:
                log.warning("upstream %s connection %d: link to %s lost", self.cfg.name, self.index, self.host)
        self.writer = None

    def drop(self) -> None:
        """Close the current session (it reconnects)."""
        if self._session_scope is not None:
            self._session_scope.cancel()

    # ------------------------------------------------------------------ tasks

    async def _stop_reading_at_end(self, poller: Poller) -> None:
        try:
            await trio.sleep_forever()
        finally:
            poller.remove(self)  # before the socket closes

    def on_readable(self, now: float, touched: set[FrameWriter]) -> None:
        """The poller found the switch's socket readable: read once, handle every frame."""
        cfg = self.cfg
        assert self._sock is not None and self._decoder is not None
        try:
            data = self._sock.recv(65536)
        except BlockingIOError:
            return
        except OSError as exc:
            log.warning("upstream %s connection %d: read failed: %s", cfg.name, self.index, type(exc).__name__)
            self._end()
            return
        if not data:
            log.warning("upstream %s connection %d: switch closed the connection", cfg.name, self.index)
            self._end()
            return
        try:
            frames = self._decoder.feed(data)
        except FrameError as exc:
            log.warning("upstream %s connection %d: framing lost: %s", cfg.name, self.index, exc)
            if self.upstream.metrics:
                self.upstream.metrics.decode_errors("upstream", cfg.name, "framing").inc()
            self._end()
            return
        for frame in frames:
            if frame.keepalive:
                continue
            self.last_header = frame.header
            w = self._on_frame(frame.message, now)
            if w is not None:
                touched.add(w)
        if self.writer is not None and self.writer.broken:
            self._end()

    def fail(self) -> None:
        self._end()

    def _end(self) -> None:
        """Stop reading and end the session (it reconnects)."""
        self.upstream.listener.poller.remove(self)
        if self._session_scope is not None:
            self._session_scope.cancel()

    def _on_frame(self, raw: bytes, now: float) -> FrameWriter | None:
        up = self.upstream
        try:
            scan = up.scanner.scan(raw)
        except MessageError as exc:
            log.warning("upstream %s: undecodable message dropped: %s", self.cfg.name, exc)
            if up.metrics:
                up.metrics.decode_errors("upstream", self.cfg.name, "decode").inc()
            return None
        mti = scan.mti
        if up.metrics:
            up.metrics.upstream_received(self.cfg.name, mti, scan.values.get(39, "")).inc()
        if is_request(mti):
            return self._on_switch_request(raw, mti)
        key = match_key(mti, scan.values.get(11, ""), tuple(scan.values.get(f, "") for f in self.cfg.match_fields))
        waiter = self.pending.pop(key)
        if waiter is None:
            waiter = up.outstanding.get(key)  # an answer past its attempt's deadline that still counts
            if waiter is None:
                late = self.late.pop(key, None)
                return up.listener.on_unmatched(self, scan, raw, late[1] if late else None, now)
        elif self.unanswered:  # an answer in time: the switch answers (readiness)
            self.unanswered = 0
            self._count_silence()
        return waiter.on_response(self, raw, scan, now)

    def _on_switch_request(self, raw: bytes, mti: str) -> FrameWriter | None:
        """The switch's own 0800 (echo, sign-on): answer 0810 with 00. Others are refused."""
        up = self.upstream
        if self.writer is None:
            return None
        try:
            req = decode(up.dialect, raw, check_types=False)
        except IsoGatewayError:
            return None
        if mti[1] != "8":
            log.warning("upstream %s: switch sent an unsupported %s; answered 12", self.cfg.name, mti)
            code = "12"
        else:
            code = "00"
        answer = build_response(up.dialect, req, code)
        try:
            resp = encode(up.dialect, answer, check_types=False)
        except IsoGatewayError:
            return None
        self.writer.enqueue(up.encode_frame(resp, reply_to=self.last_header))
        if up.metrics:
            up.metrics.upstream_sent(self.cfg.name, answer["t"]).inc()
        return self.writer

    def remember_late(self, key: Key, info: object, now: float) -> None:
        late = self.late
        late[key] = (now, info)
        while late and (len(late) > LATE_MEMORY or next(iter(late.values()))[0] < now - LATE_WINDOW):
            late.popitem(last=False)

    async def _timer_loop(self) -> None:
        while True:
            deadline = self.pending.next_deadline()
            self._timer_wakeup = trio.Event()
            self._timer_target = deadline if deadline is not None else float("inf")
            if deadline is None:
                await self._timer_wakeup.wait()
                continue
            with trio.move_on_at(deadline):
                await self._timer_wakeup.wait()
            now = trio.current_time()
            touched: set[FrameWriter] = set()
            for waiter in self.pending.expire(now):
                self.unanswered += 1
                if self.unanswered == UNANSWERED_NOT_READY:
                    self._count_silence()
                w = waiter.on_timeout(self, now)
                if w is not None:
                    touched.add(w)
            for w in touched:
                if not w.flush_soon():
                    await w.flush()

    async def _echo_loop(self) -> None:
        cfg = self.cfg
        misses = 0
        while True:
            idle_until = self.last_write + cfg.echo_interval
            now = trio.current_time()
            if now < idle_until:
                await trio.sleep_until(idle_until)
                continue
            rc, rtt = await self.network_exchange(cfg.network_codes.get("echo", "301"), cfg.echo_timeout)
            m = self.upstream.metrics
            if rc is None:
                misses += 1
                self.unanswered = max(self.unanswered, UNANSWERED_NOT_READY)
                self._count_silence()
                if m:
                    m.echo_missed(cfg.name).inc()
                log.warning("upstream %s connection %d: echo not answered (%d in a row)", cfg.name, self.index, misses)
                if misses >= cfg.echo_misses:
                    log.warning("upstream %s connection %d: marking the link down and reconnecting", cfg.name, self.index)
                    self.drop()
                    return
            else:
                misses = 0
                if m:
                    m.echo_rtt(cfg.name).observe(rtt)

    async def sign_off(self) -> None:
        self.closing = True
        if self.ready and self.cfg.sign_on and self.cfg.sign_off:
            rc, _ = await self.network_exchange(self.cfg.network_codes.get("sign_off", "002"), self.cfg.sign_on_timeout)
            log.info("upstream %s connection %d: signed off (%s)", self.cfg.name, self.index, rc or "no answer")


class Outstanding(OrderedDict[Key, Waiter]):
    """An upstream's waiters that outlive their deadline, by match key, oldest first, at most
    OUTSTANDING_MEMORY of them (past that the oldest is forgotten, and an answer to it is
    unmatched: the worst case is the repeat this table exists to avoid, never a wrong match)."""

    def keep(self, key: Key, waiter: Waiter) -> None:
        self.pop(key, None)
        self[key] = waiter
        while len(self) > OUTSTANDING_MEMORY:
            self.popitem(last=False)

    def release(self, key: Key, waiter: Waiter) -> None:
        """Forget ``waiter`` (and only it) under ``key``."""
        if self.get(key) is waiter:
            del self[key]


class SoloConnection(UpstreamConnection):
    """A connection of its own, for one message that must travel alone (a reversal in flight when
    a link dropped: reversals.py). It is not in the upstream's pool, so ``Upstream.pick`` never
    puts other traffic on it, nor in the link-state gauges or readiness (it is not capacity).
    ``run`` connects once (hosts in order), signs on when the upstream does, and serves one
    session: no reconnects. ``settled`` is set once it is ready or its session is over."""

    def __init__(self, upstream: "Upstream") -> None:
        super().__init__(upstream, len(upstream.connections))
        self.settled = trio.Event()

    def _set_state(self, state: LinkState) -> None:
        self.state = state
        if state is LinkState.READY:
            self.settled.set()

    async def run(self) -> None:
        cfg = self.cfg
        try:
            for host in cfg.host_list():
                self.host = f"{host.host}:{host.port}"
                try:
                    with trio.fail_after(cfg.connect_timeout):
                        stream = SocketIO.adopt(await trio.open_tcp_stream(host.host, host.port))
                except (OSError, trio.TooSlowError):
                    log.warning("upstream %s: a connection of its own to %s could not be opened", cfg.name, self.host)
                    continue
                try:
                    await self._session(stream)
                except Exception:  # a bug in this session must not reach the SAF worker
                    log.exception("upstream %s: internal error on a connection of its own", cfg.name)
                finally:
                    self._lost()
                    with trio.CancelScope(shield=True):
                        await stream.aclose()
                return
        finally:
            self.settled.set()


class Upstream:
    """A switch: its configuration, codec and connections."""

    def __init__(self, cfg: UpstreamConfig, listener: LinkListener, metrics: "Metrics | None",
                 dialect: Dialect, clock: Clock | None = None) -> None:
        """``dialect`` is ``cfg.dialect``, loaded by the caller; ``clock`` is the gateway's (DE 7
        of the 0800s this side starts), a clock of its own if none."""
        self.cfg = cfg
        self.clock = clock if clock is not None else Clock()
        self.listener = listener
        self.metrics = metrics
        self.dialect = dialect
        self.framer: Framer = framer_from_config(
            cfg.framing, where=f"upstreams.{cfg.name}.framing", max_frame=cfg.max_frame,
            length_includes_header=cfg.length_includes_header, tpdu=cfg.tpdu,
            **({"header": cfg.header} if cfg.header else {}),
        )
        self.scanner = Scanner(self.dialect, {11, 38, 39, 41, 70, *cfg.match_fields})
        # The TPDU (or fixed header) on frames the gateway starts; replies swap the peer's.
        self.header = bytes.fromhex(cfg.tpdu_value) if cfg.tpdu else (bytes.fromhex(cfg.header) if cfg.header else b"")
        self.connections = [UpstreamConnection(self, i) for i in range(cfg.connections)]
        # Waiters whose answer still counts after their deadline, on any of this upstream's
        # connections: reversals not yet acknowledged (reversals.py). A response that matches
        # nothing in flight is offered to them before it is called late or unmatched; each
        # removes itself once complete (see Outstanding).
        self.outstanding = Outstanding()
        self._flush_send: trio.MemorySendChannel[FrameWriter] | None = None

    def encode_frame(self, message: bytes, reply_to: bytes | None = None) -> bytes:
        header = self.framer.reply_header(reply_to) if reply_to else self.header
        return self.framer.encode(message, header=header)

    def pick(self) -> UpstreamConnection | None:
        """The least-loaded ready connection with room, or None."""
        best: UpstreamConnection | None = None
        best_load = self.cfg.max_in_flight
        for c in self.connections:
            if c.ready:
                load = len(c.pending)
                if load < best_load:
                    best, best_load = c, load
        return best

    @property
    def ready(self) -> bool:
        return any(c.ready for c in self.connections)

    def in_flight(self) -> int:
        return sum(len(c.pending) for c in self.connections)

    def schedule_flush(self, writer: FrameWriter) -> None:
        """Flush a writer from a task of its own (used where the caller can't await)."""
        if self._flush_send is not None:
            try:
                self._flush_send.send_nowait(writer)
            except (trio.WouldBlock, trio.ClosedResourceError):
                pass

    async def run(self) -> None:
        send, receive = trio.open_memory_channel[FrameWriter](10_000)
        self._flush_send = send
        async with trio.open_nursery() as nursery:
            for c in self.connections:
                nursery.start_soon(c.run)
            async for writer in receive:
                if not writer.flush_soon():
                    await writer.flush()

    async def sign_off(self) -> None:
        async with trio.open_nursery() as nursery:
            for c in self.connections:
                nursery.start_soon(c.sign_off)
