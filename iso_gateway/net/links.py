"""Upstream links: persistent connections to a bank switch, as the shell keeps them.

Each ``UpstreamConnection`` connects (trying the upstream's hosts in order),
optionally signs on (0800/001, traffic only after an 0810 with 00), then has the
gateway's poller read its frames (``on_readable``), sends an echo (0800/301) when
it has been write-idle for ``echo_interval`` and reconnects after ``echo_misses``
unanswered echoes. Reconnects back off exponentially with jitter.

What a frame means is not decided here: every frame goes to the flow
(``core.flow.Flow.switch_frame``), which owns the link's protocol state (a
``core.flow.Link``: the pending and late tables, the STANs, whether the switch
answers) and answers the switch's own 0800s. This module tells the flow when a
session begins, may carry traffic and ends (``link_connected``, ``link_ready``,
``link_down``: what was in flight is answered then), runs the link's timer (the
flow arms it with ARM actions) and waits for its own 0800s' outcomes. It never
raises out of ``run``: every failure is a counted, logged state change.

With ``[upstreams.tls]`` each session is a TLS client session (tls.py): the handshake comes
first, within ``handshake_timeout`` of the connect, then sign-on as on a plaintext link. The
poller's reads go through the session and the writer writes through ``TlsSocketIO``. A failed
handshake (a certificate that does not verify, a pin that does not match, the switch refusing
ours, the deadline) is counted by reason (``iso_gateway_tls_handshake_failures_total``) and the
link reconnects as after any lost connection.
"""

from __future__ import annotations

import enum
import logging
import math
import random
import socket
from datetime import datetime
from typing import TYPE_CHECKING, Protocol

import trio

from ..clock import Clock
from ..config import UpstreamConfig
from ..core.dialect import Dialect
from ..core.errors import ConfigError, FrameError
from ..core.flow import UNANSWERED_NOT_READY, Flow, Link, UpstreamSide
from ..core.framing import FrameDecoder, Framer, framer_from_config
from ..core.matching import STAN_MAX, StanAllocator
from .poller import Poller
from .sockio import SocketIO, TlsSocketIO
from .tls import (
    FAILED, HANDSHAKING, TRUNCATED, ExpiryGauge, TlsConfigError, TlsEndpoint, TlsSession, TlsUpstreamSettings, upstream_endpoint,
)
from .writer import FrameWriter

if TYPE_CHECKING:
    from ..metrics import Metrics

log = logging.getLogger("iso_gateway.links")

__all__ = ["UNANSWERED_NOT_READY", "LinkHost", "LinkState", "SoloConnection", "Upstream", "UpstreamConnection",
           "transmission_time"]


class LinkState(enum.Enum):
    DISCONNECTED = "disconnected"
    CONNECTING = "connecting"
    SIGNING_ON = "signing_on"
    READY = "ready"
    DOWN = "down"


class LinkHost(Protocol):
    """What a link needs of the gateway that owns it: the flow that decides what its frames mean,
    the poller that reads its socket, and ``run_flow`` (execute what the flow decided: the
    actions of an event fed outside a poller round)."""

    flow: Flow
    poller: Poller

    def run_flow(self) -> None: ...


def transmission_time(now: datetime) -> str:
    """DE 7 of ``now`` (UTC, from the gateway's clock): MMDDhhmmss."""
    return now.strftime("%m%d%H%M%S")


class UpstreamConnection:
    """One TCP connection to a switch, reconnected for as long as ``run`` runs."""

    def __init__(self, upstream: "Upstream", index: int, pooled: bool = True) -> None:
        self.upstream = upstream
        self.cfg = upstream.cfg
        self.index = index
        # The protocol side of this connection (pending table, STANs...): the flow's. A pooled
        # one is in the upstream's links, which the flow picks from; a solo one is not.
        self.link = Link(upstream.side, index, io=self, metrics=upstream.metrics)
        # STANs from a random point, so a new link does not repeat STANs the switch saw lately from an
        # earlier run (a restart resumes past the saved counter instead: Gateway._restore_stans).
        self.link.stans = StanAllocator(random.randint(1, STAN_MAX))
        if pooled:
            upstream.side.links.append(self.link)
        self.state = LinkState.DISCONNECTED
        self.host = ""
        self.writer: FrameWriter | None = None
        self._timer = trio.CancelScope(deadline=math.inf)
        self._session_scope: trio.CancelScope | None = None
        self._gauge_at: tuple[str, str] | None = None
        self.connects = 0
        self.fd = -1  # the session's socket, read by the poller
        self._sock: socket.socket | None = None
        self._decoder: FrameDecoder | None = None
        # TLS: the session's engine and writer side (None on a plaintext link), set when the
        # handshake has an outcome, and whether the switch has sent any plaintext yet.
        self._tls: TlsSession | None = None
        self._tls_io: TlsSocketIO | None = None
        self._tls_done = trio.Event()
        self._tls_heard = False

    # ------------------------------------------------------------------ state

    @property
    def ready(self) -> bool:
        return self.link.ready and self.writer is not None and self.writer.broken is None

    @property
    def answering(self) -> bool:
        """False after a run of unanswered requests or an unanswered echo (see UNANSWERED_NOT_READY)."""
        return self.link.answering

    @property
    def closing(self) -> bool:
        """The gateway is closing it (shutdown, or a solo connection done with): its end is nobody's fault."""
        return self.link.closing

    @closing.setter
    def closing(self, value: bool) -> None:
        self.link.closing = value

    def _set_state(self, state: LinkState) -> None:
        """Change state; the link_state gauge counts connections per (upstream, host, state)."""
        self.state = state
        m = self.upstream.metrics
        if m is not None and self.host:
            if self._gauge_at is not None:
                m.link_state(self.cfg.name, *self._gauge_at).dec()
            self._gauge_at = (self.host, state.value)
            m.link_state(self.cfg.name, *self._gauge_at).inc()

    def arm(self, at: float) -> None:
        """The flow's earliest deadline on this link is now ``at`` (ARM): the timer wakes then."""
        self._timer.deadline = at

    async def network_exchange(self, code: str, timeout: float) -> tuple[str | None, float]:
        """Send an 0800 with DE 70 = ``code`` and wait for its 0810: (response code or None, rtt)."""
        if self.writer is None or self.writer.broken:
            return None, 0.0
        up = self.upstream
        host = up.host
        exchange = host.flow.network_request(self.link, code, transmission_time(up.clock.utc()), timeout,
                                             trio.current_time())
        if exchange is None:
            return None, 0.0
        exchange.waker = done = trio.Event()
        host.run_flow()
        if not exchange.done:
            await done.wait()  # bounded: its deadline, or the link's end
        return exchange.rc, exchange.rtt

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
            stream = await self._connect(host.host, host.port)
            if stream is not None:
                signed_on = await self._serve(stream)
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

    async def _connect(self, host: str, port: int) -> SocketIO | None:
        cfg = self.cfg
        try:
            with trio.fail_after(cfg.connect_timeout):
                return SocketIO.adopt(await trio.open_tcp_stream(host, port))
        except (OSError, trio.TooSlowError) as exc:
            reason = "timeout" if isinstance(exc, trio.TooSlowError) else (exc.strerror or type(exc).__name__)
            log.warning("upstream %s connection %d: connect to %s failed: %s", cfg.name, self.index, self.host, reason)
            if self.upstream.metrics:
                self.upstream.metrics.connect_failures(cfg.name, self.host).inc()
            return None

    async def _serve(self, plain: SocketIO) -> bool:
        """One session on ``plain`` (in TLS when the upstream has it), closed at its end; True if it
        reached READY."""
        stream: SocketIO | TlsSocketIO = plain
        tls = self.upstream.tls
        if tls is not None:
            self._tls = session = tls.new_session()
            self._tls_io = stream = TlsSocketIO(plain.sock, session)
            self._tls_done = trio.Event()
            self._tls_heard = False
        else:
            self._tls = self._tls_io = None
        try:
            return await self._session(stream)
        except Exception:  # a bug in one session must not stop the link, or the daemon
            log.exception("upstream %s connection %d: internal error; reconnecting", self.cfg.name, self.index)
            return False
        finally:
            self._lost()
            with trio.CancelScope(shield=True):
                await stream.aclose()

    async def _handshake(self) -> bool:
        """The TLS handshake, within its deadline (the poller's reads drive it); True once established."""
        session, io = self._tls, self._tls_io
        assert session is not None and io is not None
        io.write_pending()  # the ClientHello
        with trio.move_on_after(session.endpoint.handshake_timeout):
            await self._tls_done.wait()
        if session.state is HANDSHAKING:
            session.handshake_timed_out()
            self._tls_failed(session)
        return session.established

    def _tls_failed(self, session: TlsSession) -> None:
        cfg = self.cfg
        reason = session.reason or "internal"
        if self.upstream.metrics:
            self.upstream.metrics.tls_handshake_failures("upstream", cfg.name, reason).inc()
        log.warning("upstream %s connection %d: TLS handshake with %s failed: %s (%s)", cfg.name, self.index,
                    self.host, reason, session.detail)

    async def _session(self, stream: SocketIO | TlsSocketIO) -> bool:
        """Serve one connection; True if it reached READY."""
        cfg = self.cfg
        self.writer = writer = FrameWriter(stream, send_timeout=max(cfg.echo_timeout, 5.0))
        writer.on_broken = self._writer_broken
        self._decoder = self.upstream.framer.decoder()
        self._sock = stream.sock
        self.fd = stream.sock.fileno()
        reached_ready = False
        host = self.upstream.host
        poller = host.poller
        async with trio.open_nursery() as nursery:
            self._session_scope = nursery.cancel_scope
            writer.background = nursery  # a send the kernel can't take at once finishes here
            poller.add(self)  # read until _end (the poller calls on_readable)
            nursery.start_soon(self._stop_reading_at_end, poller)
            nursery.start_soon(self._timer_loop)
            if self._tls is not None and not await self._handshake():
                nursery.cancel_scope.cancel()
                return False
            host.flow.link_connected(self.link)
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
            host.flow.link_ready(self.link)
            reached_ready = True
            log.info("upstream %s connection %d: %s on %s", cfg.name, self.index,
                     "signed on, ready" if cfg.sign_on else "ready", self.host)
            if cfg.echo_interval > 0:
                nursery.start_soon(self._echo_loop)
        return reached_ready

    def _writer_broken(self, reason: str) -> None:
        self.link.ready = False  # nothing more is picked for it; the session ends
        self._end()

    def _lost(self) -> None:
        """The connection is gone: the flow answers everything that was waiting on it."""
        was_ready = self.state is LinkState.READY
        self._set_state(LinkState.DOWN)
        self._session_scope = None
        host = self.upstream.host
        host.flow.link_down(self.link, trio.current_time())
        host.run_flow()
        if was_ready:
            if self.link.closing:
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
        """The poller found the switch's socket readable: read once, hand every frame to the flow
        (the poller executes what it decided at the end of its round)."""
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
        tls = self._tls
        if tls is not None:
            data = self._tls_read(tls, data)
            if not data:
                return
        elif not data:
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
        switch_frame = self.upstream.host.flow.switch_frame
        link = self.link
        for frame in frames:
            if not frame.keepalive:
                switch_frame(link, frame.message, frame.header, now)

    def _tls_read(self, session: TlsSession, data: bytes) -> bytes:
        """What the switch sent, through the TLS session: the plaintext (b"" if none, or the
        session ended: then the link is ended too, and a failed handshake counted)."""
        cfg = self.cfg
        handshaking = session.state is HANDSHAKING
        if data:
            plain = session.receive_data(data)
        else:
            session.receive_eof()
            plain = b""
        if session.wants_write:
            assert self._tls_io is not None
            self._tls_io.write_pending()
        if handshaking and session.state is not HANDSHAKING:
            self._tls_done.set()
            if session.established:
                if self.upstream.metrics:
                    self.upstream.metrics.tls_handshakes("upstream", cfg.name).inc()
                if self.upstream.expiry is not None:
                    self.upstream.expiry.saw(session.peer, self.upstream.clock.utc())
        if session.established:
            if plain:
                self._tls_heard = True
            return plain
        if session.state is FAILED and (handshaking or (not self._tls_heard and session.reason != TRUNCATED)):
            # With TLS 1.3 a switch refusing our certificate says so just after our handshake ended.
            self._tls_failed(session)
        elif session.state is FAILED and session.reason != TRUNCATED:
            log.warning("upstream %s connection %d: TLS failed: %s (%s)", cfg.name, self.index, session.reason,
                        session.detail)
        elif not handshaking or not data:
            log.warning("upstream %s connection %d: switch closed the connection", cfg.name, self.index)
        self._end()
        return b""

    def fail(self) -> None:
        self._end()

    def _end(self) -> None:
        """Stop reading and end the session (it reconnects)."""
        self.upstream.host.poller.remove(self)
        if self._session_scope is not None:
            self._session_scope.cancel()

    async def _timer_loop(self) -> None:
        """Wake at the deadline the flow armed (ARM), and tell it (``Flow.deadline``)."""
        host = self.upstream.host
        link = self.link
        while True:
            self._timer = trio.CancelScope(deadline=link.armed)
            with self._timer:
                await trio.sleep_forever()
            host.flow.deadline(link, trio.current_time())
            host.run_flow()

    async def _echo_loop(self) -> None:
        cfg = self.cfg
        misses = 0
        while True:
            idle_until = self.link.last_write + cfg.echo_interval
            now = trio.current_time()
            if now < idle_until:
                await trio.sleep_until(idle_until)
                continue
            rc, rtt = await self.network_exchange(cfg.network_codes.get("echo", "301"), cfg.echo_timeout)
            m = self.upstream.metrics
            if rc is None:
                misses += 1
                self.link.echo_missed()
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
        self.link.closing = True
        if self.ready and self.cfg.sign_on and self.cfg.sign_off:
            rc, _ = await self.network_exchange(self.cfg.network_codes.get("sign_off", "002"), self.cfg.sign_on_timeout)
            log.info("upstream %s connection %d: signed off (%s)", self.cfg.name, self.index, rc or "no answer")


class SoloConnection(UpstreamConnection):
    """A connection of its own, for one message that must travel alone (a reversal in flight when
    a link dropped: reversals.py). It is not in the upstream's links, so the flow never picks it
    for other traffic, nor in the link-state gauges or readiness (it is not capacity).
    ``run`` connects once (hosts in order), signs on when the upstream does, and serves one
    session: no reconnects. ``settled`` is set once it is ready or its session is over."""

    def __init__(self, upstream: "Upstream") -> None:
        super().__init__(upstream, len(upstream.connections), pooled=False)
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
                await self._serve(stream)
                return
        finally:
            self.settled.set()


class Upstream:
    """A switch: its configuration, codec and connections (the flow's ``UpstreamSide`` is ``side``)."""

    def __init__(self, cfg: UpstreamConfig, host: LinkHost, metrics: "Metrics | None",
                 dialect: Dialect, clock: Clock | None = None) -> None:
        """``dialect`` is ``cfg.dialect``, loaded by the caller; ``clock`` is the gateway's (DE 7
        of the 0800s this side starts), a clock of its own if none."""
        self.cfg = cfg
        self.clock = clock if clock is not None else Clock()
        self.host = host
        self.metrics = metrics
        self.dialect = dialect
        self.framer: Framer = framer_from_config(
            cfg.framing, where=f"upstreams.{cfg.name}.framing", max_frame=cfg.max_frame,
            length_includes_header=cfg.length_includes_header, tpdu=cfg.tpdu,
            **({"header": cfg.header} if cfg.header else {}),
        )
        # The TPDU (or fixed header) on frames the gateway starts; replies swap the peer's.
        header = bytes.fromhex(cfg.tpdu_value) if cfg.tpdu else (bytes.fromhex(cfg.header) if cfg.header else b"")
        self.side = UpstreamSide(cfg.name, dialect, self.framer, header, match_fields=tuple(cfg.match_fields),
                                 max_in_flight=cfg.max_in_flight, reversal_timeout=cfg.reversal_timeout,
                                 institution_id=cfg.institution_id or "")
        self.connections = [UpstreamConnection(self, i) for i in range(cfg.connections)]
        # TLS: the endpoint new sessions start with (swapped by reload_tls), or None: plaintext.
        self.tls = upstream_tls(cfg, getattr(host, "config_path", None) or "config")
        self.expiry = ExpiryGauge(metrics, "upstream", cfg.name) if metrics is not None else None

    def reload_tls(self, cfg: UpstreamConfig) -> str | None:
        """Read the TLS files again (SIGHUP): new sessions get the new endpoint, established ones keep
        theirs. A file that does not load keeps the old endpoint; returns why (None: reloaded)."""
        if self.tls is None or cfg.tls is None:
            return None
        try:
            self.tls = upstream_tls(cfg, "config")
        except ConfigError as exc:
            return f"{exc.where}: {exc.reason}"
        finally:
            self.refresh_expiry()
        return None

    def refresh_expiry(self) -> None:
        if self.tls is not None and self.expiry is not None:
            self.expiry.refresh(self.tls, self.clock.utc())

    async def _expiry_loop(self) -> None:
        while True:
            self.refresh_expiry()
            await trio.sleep(ExpiryGauge.INTERVAL)

    def pick(self) -> UpstreamConnection | None:
        """The least-loaded ready connection with room, or None (the flow's choice)."""
        link = self.side.pick()
        return link.io if link is not None else None

    @property
    def ready(self) -> bool:
        return any(c.ready for c in self.connections)

    def in_flight(self) -> int:
        return self.side.in_flight()

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            if self.tls is not None:
                nursery.start_soon(self._expiry_loop)
            for c in self.connections:
                nursery.start_soon(c.run)

    async def sign_off(self) -> None:
        async with trio.open_nursery() as nursery:
            for c in self.connections:
                nursery.start_soon(c.sign_off)


def upstream_tls(cfg: UpstreamConfig, source: str) -> TlsEndpoint | None:
    """The TLS endpoint of an upstream's ``[upstreams.tls]``, its files read now (None: plaintext).
    A file that does not load is a ConfigError naming the key and the reason."""
    if cfg.tls is None:
        return None
    t = cfg.tls
    try:
        return upstream_endpoint(TlsUpstreamSettings(
            ca=tuple(t.ca), pin_sha256=t.pin_sha256, server_name=t.server_name, cert_chain=t.cert_chain, key=t.key,
            handshake_timeout=t.handshake_timeout, minimum_version=t.minimum_version, ciphers=t.ciphers))
    except TlsConfigError as exc:
        raise ConfigError(source, f"upstreams.{cfg.name}.tls.{exc.key}", exc.reason) from None
