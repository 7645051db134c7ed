"""The listening side: front-end connections, their limits and their reads.

Connections are read by the gateway's ``Poller`` (poller.py: one task for every
front connection and switch link) and each has one ``FrameWriter``.
Limits all end in a counted outcome: too many connections from one source
address (``max_connections_per_source``: accepted, counted, closed), the listener
full (``max_connections``: a connection with no request in flight is closed to
make room, one that never sent a whole frame before any that did, longest-idle first, counted as ``evicted_idle``; only when every connection
has a request in flight is the new one closed, counted as ``refused``; the
listener keeps accepting either way), too many requests in flight (reading
pauses until answers drain: backpressure, not memory), a frame over the size
limit or a broken length header (framing lost: closed), a frame not finished
within ``partial_frame_timeout`` of its first byte (a stalled or dribbling client:
dropped), nothing
at all for ``idle_timeout`` (closed), answers it does not read for
``send_timeout`` (a stalled reader: dropped, without holding up anyone else).
An exception in one connection is logged and counted, closes that connection and
never reaches the listener or the others.

A TLS listener (``[listeners.tls]``) wraps each accepted socket in a ``TlsSession``
(tls.py): ``TlsFrontConnection`` reads ciphertext, hands the plaintext to the same framing
and writes through ``TlsSocketIO``. Until the handshake ends the connection's deadline is the
handshake's (``handshake_timeout`` from the accept); a TLS record begun and not ended counts as a
partial frame. Every limit above applies unchanged; a failed handshake is counted by reason
(``iso_gateway_tls_handshake_failures_total``) and closes the connection. Plaintext listeners
use ``FrontConnection`` as before, with no TLS work per read.

Each connection knows who is at the other end (``identity``) before its first frame reaches the
gateway: ``cert:<CN>`` (or its first DNS name) when a client certificate was verified, else
``addr:<source address>``.
"""

from __future__ import annotations

import heapq
import ipaddress
import logging
import math
import socket
from itertools import count
from typing import TYPE_CHECKING, Protocol, Sequence

import trio

from ..config import ListenerConfig
from ..core.dialect import Dialect
from ..core.errors import ConfigError, FrameError, FrameTooLarge
from ..core.flow import FrontSide
from ..core.framing import Framer, framer_from_config
from .poller import Poller
from ..core.scanner import Scanner
from ..core.validation import RuleSet
from .sockio import SocketIO, TlsSocketIO
from .tls import (
    CLOSED, FAILED, HANDSHAKING, TRUNCATED, ExpiryGauge, TlsConfigError, TlsEndpoint, TlsListenerSettings, TlsSession,
    listener_endpoint,
)
from .writer import FrameWriter

if TYPE_CHECKING:
    from ..clock import Clock
    from ..config import Config
    from ..core.framing import Frame
    from ..metrics import Metrics

log = logging.getLogger("iso_gateway.frontend")

_conn_ids = count(1)

# Fields the gateway itself reads from every front-end request, besides the rule set's.
ROUTING_FIELDS = frozenset({2, 7, 11, 32, 37, 41, 42, 49, 90})

class FrontHandler(Protocol):
    """What a listener needs of the application that owns it (the gateway): its settings, its
    metrics and poller, and where a connection's complete frames go. Typed here so that the
    network side never imports the application."""

    config: Config
    config_path: str | None
    metrics: Metrics
    poller: Poller
    worker: int | None
    clock: Clock

    def on_front_frames(self, front: FrontConnection, frames: Sequence[Frame], touched: set[FrameWriter],
                        now: float) -> None: ...


# Eviction candidates taken per scan of a full listener's connections: a flood of new
# connections costs one scan per this many evictions, not one per connection.
EVICTION_BATCH = 64


class Listener:
    """One configured front-end listener: codec, rules, limits and its connections."""

    def __init__(self, cfg: ListenerConfig, gateway: FrontHandler, dialect: Dialect, rules: RuleSet) -> None:
        self.gateway = gateway
        self.connections: set[FrontConnection] = set()
        self.per_source: dict[str, int] = {}  # open connections by the peer's address
        # Idle connections to close when the listener is full, longest-idle first: a few taken at
        # once (see _make_room), so a flood of new connections does not scan every open one each.
        self._evictable: list[tuple[bool, float, int, FrontConnection]] = []
        self._evictable_at = -math.inf
        # A connection was accepted since the batch was taken: it is not in the batch, and if it
        # never sends it goes before any used one there (see _make_room).
        self._accepted_since_batch = False
        self._refusals = 0  # refusals not logged yet (see _refused)
        self._refusal_logged = -math.inf
        self.port = cfg.port
        self._accept_scope: trio.CancelScope | None = None
        self.apply(cfg, dialect, rules)
        # TLS: the endpoint new connections start with (swapped by reload_tls), or None: plaintext.
        self.tls = listener_tls(cfg, getattr(gateway, "config_path", None) or "config")
        self._tls_failures = 0  # failed handshakes not logged yet (see tls_failed)
        self._tls_failure_logged = -math.inf
        self.expiry = ExpiryGauge(gateway.metrics, "listener", cfg.name)

    def apply(self, cfg: ListenerConfig, dialect: Dialect, rules: RuleSet) -> None:
        """Take (new) settings: codec, rules and limits. Address changes need a restart.
        ``dialect`` and ``rules`` are ``cfg.dialect`` and ``cfg.rules``, loaded by the caller."""
        where = f"listeners.{cfg.name}"
        framer: Framer = framer_from_config(
            cfg.framing, where=f"{where}.framing", max_frame=cfg.max_frame,
            length_includes_header=cfg.length_includes_header, tpdu=cfg.tpdu,
            **({"header": cfg.header} if cfg.header else {}),
        )
        self.cfg = cfg
        self.name = cfg.name
        self.dialect = dialect
        self.rules = rules
        self.framer = framer
        self.scanner = scanner = Scanner(dialect, rules.fields_needed | ROUTING_FIELDS | set(gateway_match_fields(self.gateway)))
        # What the flow knows of this listener: changed in place, so open connections see a reload.
        side = getattr(self, "side", None)
        if side is None:
            self.side = FrontSide(cfg.name, dialect, rules, framer, scanner)
        else:
            side.name, side.dialect, side.rules, side.framer, side.scanner = cfg.name, dialect, rules, framer, scanner

    async def serve(self, connection_nursery: trio.Nursery, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Accept connections until ``stop_accepting``; connections live in ``connection_nursery``."""
        if self.gateway.worker is None:
            listeners = await trio.open_tcp_listeners(self.cfg.port, host=self.cfg.host)
        else:
            listeners = [await open_shared_listener(self.cfg.host, self.cfg.port)]
        self.port = listeners[0].socket.getsockname()[1]
        if self.tls is not None:
            connection_nursery.start_soon(self._expiry_loop)
        with trio.CancelScope() as scope:
            self._accept_scope = scope
            task_status.started(self.port)
            await trio.serve_listeners(self._handle, listeners, handler_nursery=connection_nursery)
        for lst in listeners:
            with trio.CancelScope(shield=True):
                await lst.aclose()

    def reload_tls(self, cfg: ListenerConfig) -> str | None:
        """Read the TLS files again (SIGHUP): new connections get the new endpoint, established ones
        keep theirs. A file that does not load keeps the old endpoint; returns why (None: reloaded)."""
        if self.tls is None or cfg.tls is None:
            return None
        try:
            self.tls = listener_tls(cfg, "config")
        except ConfigError as exc:
            return f"{exc.where}: {exc.reason}"
        finally:
            self.refresh_expiry()
        return None

    def refresh_expiry(self) -> None:
        """The certificate days-left gauge, from the files of the endpoint in use."""
        if self.tls is not None:
            self.expiry.refresh(self.tls, self.gateway.clock.utc())

    async def _expiry_loop(self) -> None:
        while True:
            self.refresh_expiry()
            await trio.sleep(ExpiryGauge.INTERVAL)

    def tls_failed(self, session: TlsSession, conn_id: int) -> None:
        """Count a failed handshake by reason; log it, at most a line a second (a flood of garbage
        is no flood of logs: the metric counts every one)."""
        reason = session.reason or "internal"
        self.gateway.metrics.tls_handshake_failures("listener", self.name, reason).inc()
        self._tls_failures += 1
        now = trio.current_time()
        if now - self._tls_failure_logged >= 1.0:
            log.warning("listener %s connection %d: TLS handshake failed: %s (%s) (%d such since the last line)",
                        self.name, conn_id, reason, session.detail, self._tls_failures)
            self._tls_failure_logged = now
            self._tls_failures = 0

    def stop_accepting(self) -> None:
        if self._accept_scope is not None:
            self._accept_scope.cancel()

    async def _handle(self, trio_stream: trio.SocketStream) -> None:
        """A new connection: counted, then handed to the poller (this task ends here)."""
        stream = SocketIO.adopt(trio_stream)
        m = self.gateway.metrics
        cfg = self.cfg
        try:
            peer = stream.sock.getpeername()
            source = source_key(peer[0])
        except OSError:  # already reset by the peer
            stream.close()
            return
        if self.per_source.get(source, 0) >= cfg.max_connections_per_source:
            m.connections_total(self.name, "refused_per_source").inc()
            self._refused(f"connection refused: {cfg.max_connections_per_source} open from one address is the limit")
            stream.close()
            return
        if len(self.connections) >= cfg.max_connections and not self._make_room():
            m.connections_total(self.name, "refused").inc()
            self._refused(f"connection refused: {cfg.max_connections} open is the limit and every one has a "
                          "request in flight")
            stream.close()
            return
        m.connections_total(self.name, "accepted").inc()
        identity = "addr:" + peer[0]
        tls = self.tls
        if tls is None:
            conn = FrontConnection(self, stream, self.gateway.poller, source, identity)
        else:
            conn = TlsFrontConnection(self, TlsSocketIO(stream.sock, tls.new_session()), self.gateway.poller, source,
                                      identity)
        self.connections.add(conn)
        self._accepted_since_batch = True
        self.per_source[source] = self.per_source.get(source, 0) + 1
        m.connections_open(self.name).inc()
        conn.last_read = now = trio.current_time()
        conn.start_reading(now)

    def _refused(self, why: str) -> None:
        """Log a refusal or an eviction: at most one line a second, so a flood of connections is no
        flood of logs (the metrics count every one)."""
        self._refusals += 1
        now = trio.current_time()
        if now - self._refusal_logged >= 1.0:
            log.warning("listener %s: %s (%d such since the last line)", self.name, why, self._refusals)
            self._refusal_logged = now
            self._refusals = 0

    def _make_room(self) -> bool:
        """The listener is full: close a connection with no request in flight, one that never sent
        a whole frame before any that did, the longest-idle first.

        False when there is none (every connection is waiting for an answer). Candidates are
        taken a batch at a time, in that order, and each is checked again when its
        turn comes (it may have read, sent a request or closed since); a batch older than a
        second is taken again, so one that was busy then is not passed over for long, and so is
        a batch whose next candidate has been used while connections were accepted since (a
        burst of new idle sockets goes before it).
        """
        now = trio.current_time()
        if now - self._evictable_at > 1.0:
            self._evictable = []
        while True:
            if self._evictable and self._evictable[-1][0] and self._accepted_since_batch:
                self._evictable = []
            if not self._evictable:
                self._evictable_at = now
                self._accepted_since_batch = False
                self._evictable = heapq.nsmallest(
                    EVICTION_BATCH, ((c.used, c.last_read, c.id, c) for c in self.connections if c.in_flight == 0))
                self._evictable.reverse()  # popped from the end: the oldest first
                if not self._evictable:
                    return False
            used, last_read, _, conn = self._evictable.pop()
            if conn.closed or conn.in_flight or conn.last_read != last_read or conn.used != used:
                continue
            self._refused(f"full ({self.cfg.max_connections} open): closed the longest-idle connection to make room")
            conn.close("evicted_idle")
            return True

    def close_all(self, reason: str) -> None:
        for conn in list(self.connections):
            conn.close(reason)

    def closed(self, conn: "FrontConnection", reason: str) -> None:
        """Bookkeeping for a connection that ended (``FrontConnection.close``)."""
        self.connections.discard(conn)
        left = self.per_source.get(conn.source, 0) - 1
        if left > 0:
            self.per_source[conn.source] = left
        else:
            self.per_source.pop(conn.source, None)
        m = self.gateway.metrics
        m.connections_open(self.name).dec()
        m.connections_closed(self.name, reason).inc()
        # evictions: see _make_room; failed handshakes: tls_failed
        if reason not in ("peer_closed", "shutdown", "evicted_idle", "tls_handshake_failed"):
            log.info("listener %s connection %d closed: %s", self.name, conn.id, reason)


async def open_shared_listener(host: str, port: int, backlog: int = 4096) -> trio.SocketListener:
    """A listening socket with SO_REUSEPORT: worker processes bound to one port, the kernel
    spreading new connections among them."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    await sock.bind((host, port))
    sock.listen(backlog)
    return trio.SocketListener(sock)


def source_key(address: str) -> str:
    """What the per-source limit counts by: the IPv4 address, or the IPv6 /64 (one host
    usually has a whole /64 to pick addresses from)."""
    if ":" not in address or address.startswith("::ffff:"):
        return address
    try:
        return str(ipaddress.IPv6Network(f"{address.partition('%')[0]}/64", strict=False))
    except ValueError:
        return address


def listener_tls(cfg: ListenerConfig, source: str) -> TlsEndpoint | None:
    """The TLS endpoint of a listener's ``[listeners.tls]``, its files read now (None: plaintext).
    A file that does not load is a ConfigError naming the key and the reason."""
    if cfg.tls is None:
        return None
    t = cfg.tls
    try:
        return listener_endpoint(TlsListenerSettings(
            cert_chain=t.cert_chain, key=t.key, client_ca=tuple(t.client_ca), client_certs=t.client_certs,
            client_names=tuple(t.client_names), handshake_timeout=t.handshake_timeout,
            minimum_version=t.minimum_version, ciphers=t.ciphers))
    except TlsConfigError as exc:
        raise ConfigError(source, f"listeners.{cfg.name}.tls.{exc.key}", exc.reason) from None


def tls_identity(session: TlsSession, otherwise: str) -> str:
    """``cert:<CN>`` (or the first DNS name, or the subject) of a verified client certificate."""
    peer = session.peer
    if peer is None:
        return otherwise
    return "cert:" + (peer.common_name or (peer.dns_names[0] if peer.dns_names else peer.subject))


def gateway_match_fields(gateway: FrontHandler) -> set[int]:
    out: set[int] = set()
    for up in gateway.config.upstreams:
        out.update(up.match_fields)
    return out


class FrontConnection:
    """One front end's connection: read by the gateway's ``Poller``, written by its ``FrameWriter``."""

    __slots__ = ("id", "listener", "side", "stream", "sock", "writer", "in_flight", "closed", "decoder", "deadline",
                 "paused", "_poller", "heap_at", "fd", "source", "last_read", "used", "identity")

    def __init__(self, listener: Listener, stream: SocketIO | TlsSocketIO, poller: Poller, source: str = "",
                 identity: str = "") -> None:
        self.id = next(_conn_ids)
        self.source = source  # the peer's address (per-source limit)
        # Who the peer is, set before its first frame reaches the gateway: "addr:<ip>", or on a TLS
        # listener with client certificates "cert:<CN>" (the first DNS name without a CN).
        self.identity = identity
        self.last_read = 0.0  # when it last sent anything, or was accepted (longest-idle goes first)
        # It has sent a whole frame: a connection that never has is closed before any that has
        # when the listener is full, so a burst of fresh idle sockets can't push out a front end
        # that is merely between two payments.
        self.used = False
        self.listener = listener
        self.side = listener.side  # the flow's view of its listener (core.flow.FrontRef)
        self.stream = stream
        self.sock = stream.sock
        self.fd = stream.sock.fileno()
        self.writer = FrameWriter(stream, send_timeout=listener.cfg.send_timeout)
        self.in_flight = 0
        self.closed = False
        self.decoder = listener.framer.decoder()
        # When the connection ends unless it reads something (idle or partial-frame timeout);
        # math.inf while reading is paused for backpressure.
        self.deadline = math.inf
        self.paused = False
        self._poller = poller
        self.heap_at: float | None = None  # the deadline of its entry in the poller's heap
        self.writer.on_broken = self.abort
        self.writer.background = poller.nursery  # a slow reader's sends finish there

    def abort(self, reason: str) -> None:
        """End the connection from outside its reads (a stalled or broken writer)."""
        self.close("stalled_reader" if reason == "send_timeout" else "reset")

    def request_done(self) -> None:
        """An answer went out for one of this connection's requests."""
        self.in_flight -= 1
        if self.paused and self.in_flight < self.listener.cfg.max_in_flight and not self.closed:
            self.paused = False
            self.start_reading(trio.current_time())

    def start_reading(self, now: float) -> None:
        self._poller.add(self)
        cfg = self.listener.cfg
        self._poller.set_deadline(self, now + (cfg.partial_frame_timeout if self.decoder.partial else cfg.idle_timeout))

    def on_readable(self, now: float, touched: set[FrameWriter]) -> None:
        """Read once and handle every complete frame; the writers to flush go into ``touched``."""
        listener = self.listener
        try:
            data = self.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            self.close("reset")
            return
        if not data:
            self.close("peer_closed")
            return
        self.last_read = now
        gateway = listener.gateway
        decoder = self.decoder
        cfg = listener.cfg
        frames = self._cut(data)
        if frames is None:
            return
        if frames:
            self.used = True
            gateway.on_front_frames(self, frames, touched, now)
            if self.closed:
                return
            if self.in_flight >= cfg.max_in_flight:
                # Backpressure: stop reading until answers drain below the limit.
                self.paused = True
                self.deadline = math.inf
                self._poller.remove(self)
                return
        if decoder.partial:
            # The partial-frame deadline runs from the frame's first byte: moved only when this
            # read started a new frame (it completed one, or nothing was buffered before it), so
            # a client dribbling a byte at a time can't push it out (slowloris).
            if frames or decoder.pending <= len(data):
                self._poller.set_deadline(self, now + cfg.partial_frame_timeout)
        else:
            self.deadline = now + cfg.idle_timeout  # later than before: the heap entry catches up lazily

    def _cut(self, data: bytes) -> list[Frame] | None:
        """The complete frames ``data`` ends, or None: the framing is lost (counted, logged, closed)."""
        listener = self.listener
        try:
            return self.decoder.feed(data)
        except FrameTooLarge:
            listener.gateway.metrics.frames_too_large("front", listener.name).inc()
            log.warning("listener %s connection %d: frame over %d bytes; closing", listener.name, self.id,
                        listener.cfg.max_frame)
            self.close("frame_too_large")
        except FrameError as exc:
            listener.gateway.metrics.decode_errors("front", listener.name, "framing").inc()
            log.warning("listener %s connection %d: framing lost (%s); closing", listener.name, self.id, exc)
            self.close("framing_lost")
        return None

    def expired(self) -> None:
        self.close("stalled_partial_frame" if self.decoder.partial else "idle_timeout")

    def fail(self) -> None:
        self.close("internal_error")

    def close(self, reason: str) -> None:
        """End the connection (idempotent): answers still to come for it are undeliverable."""
        if self.closed:
            return
        self.closed = True
        self._poller.remove(self)
        self.listener.closed(self, reason)
        self.stream.close()


class TlsFrontConnection(FrontConnection):
    """A front connection on a TLS listener: the poller's reads go through its ``TlsSession``.

    Until the handshake ends nothing reaches the framing, and the deadline is the handshake's
    (``handshake_timeout`` from the accept); a failed handshake is counted by reason and closes
    the connection (with the alert, if the session has one). Once established the plaintext goes to
    the same framing as on a plaintext listener, with the same limits; a TLS record begun and not
    ended counts as a partial frame (its deadline runs from its first byte). Closing sends
    close_notify (``TlsSocketIO.close``).
    """

    __slots__ = ("tls", "tls_io")

    def __init__(self, listener: Listener, stream: TlsSocketIO, poller: Poller, source: str = "",
                 identity: str = "") -> None:
        super().__init__(listener, stream, poller, source, identity)
        self.tls_io = stream
        self.tls = stream.session

    def start_reading(self, now: float) -> None:
        self._poller.add(self)
        cfg = self.listener.cfg
        session = self.tls
        if session.state is HANDSHAKING:
            self._poller.set_deadline(self, now + session.endpoint.handshake_timeout)
        else:
            partial = self.decoder.partial or session.partial
            self._poller.set_deadline(self, now + (cfg.partial_frame_timeout if partial else cfg.idle_timeout))

    def on_readable(self, now: float, touched: set[FrameWriter]) -> None:
        """Read once, decrypt, handle every complete frame (see ``FrontConnection.on_readable``)."""
        listener = self.listener
        try:
            data = self.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            self.close("reset")
            return
        session = self.tls
        if not session.established:
            if not data:
                session.receive_eof()
            plain = session.receive_data(data) if data else b""
            if session.wants_write:
                self.tls_io.write_pending()
            if not session.established:
                if session.state is FAILED:
                    listener.tls_failed(session, self.id)
                    self.close("tls_handshake_failed")
                elif session.state is CLOSED:
                    self.close("peer_closed")
                return  # still handshaking: its deadline stands
            self.last_read = now
            self.identity = tls_identity(session, self.identity)
            listener.gateway.metrics.tls_handshakes("listener", listener.name).inc()
            was_partial = False
        else:
            if not data:
                self.close("peer_closed")
                return
            self.last_read = now
            was_partial = self.decoder.partial or session.partial
            plain = session.receive_data(data)
            if session.wants_write:
                self.tls_io.write_pending()  # a close_notify's reply, a key update's
        frames: list[Frame] = []
        decoder = self.decoder
        cfg = listener.cfg
        if plain:
            gateway = listener.gateway
            cut = self._cut(plain)
            if cut is None:
                return
            frames = cut
            if frames:
                self.used = True
                gateway.on_front_frames(self, frames, touched, now)
                if self.closed:
                    return
        if not session.established:  # close_notify came, or a record did not decrypt
            if session.state is FAILED and not self.used and session.reason != TRUNCATED:
                # Before any frame: the end of a handshake (with TLS 1.3 a client certificate can be
                # judged after the server's side of the handshake has ended).
                listener.tls_failed(session, self.id)
                self.close("tls_handshake_failed")
                return
            if session.state is FAILED:
                log.warning("listener %s connection %d: TLS failed: %s (%s)", listener.name, self.id, session.reason,
                            session.detail)
            self.close("peer_closed" if session.state is CLOSED else "tls_error")
            return
        if frames and self.in_flight >= cfg.max_in_flight:
            self.paused = True  # backpressure, as on a plaintext connection
            self.deadline = math.inf
            self._poller.remove(self)
            return
        if decoder.partial or session.partial:
            # From the first byte of a frame or record: moved only when this read began a new one.
            if frames or not was_partial:
                self._poller.set_deadline(self, now + cfg.partial_frame_timeout)
        else:
            self._poller.set_deadline(self, now + cfg.idle_timeout)

    def expired(self) -> None:
        session = self.tls
        if session.state is HANDSHAKING:
            session.handshake_timed_out()
            self.listener.tls_failed(session, self.id)
            self.close("tls_handshake_failed")
            return
        self.close("stalled_partial_frame" if self.decoder.partial or session.partial else "idle_timeout")
