"""The listening side: front-end connections, their limits and their reads.

A listener's connections are read by one task, its ``FrontPoller`` (an epoll set
of its own, waited on through trio), and each has one ``FrameWriter``. A round
of the poller reads every connection that has data, handles their frames, logs
the forwarded requests with one journal write and sends each writer's batch.
Limits all end in a counted outcome: too many connections (accepted, counted,
closed; the listener keeps accepting), too many requests in flight (reading
pauses until answers drain: backpressure, not memory), a frame over the size
limit or a broken length header (framing lost: closed), a frame started and not
finished within ``partial_frame_timeout`` (a stalled client: dropped), nothing
at all for ``idle_timeout`` (closed), answers it does not read for
``send_timeout`` (a stalled reader: dropped, without holding up anyone else).
An exception in one connection is logged and counted, closes that connection and
never reaches the listener or the others.
"""
from __future__ import annotations

import heapq
import logging
import math
import select
import socket
from itertools import count
from typing import TYPE_CHECKING

import trio

from .config import ListenerConfig
from .dialect import Dialect, get_dialect
from .errors import FrameError, FrameTooLarge
from .framing import Framer, framer_from_config
from .scanner import Scanner
from .validation import RuleSet, load_rules
from .sockio import SocketIO
from .writer import FrameWriter

if TYPE_CHECKING:
    from .gateway import Gateway

log = logging.getLogger("iso_gateway.frontend")

_conn_ids = count(1)

# Fields the gateway itself reads from every front-end request, besides the rule set's.
ROUTING_FIELDS = frozenset({2, 7, 11, 32, 37, 41, 42, 49, 90})


class Listener:
    """One configured front-end listener: codec, rules, limits and its connections."""

    def __init__(self, cfg: ListenerConfig, gateway: "Gateway", dialect_dirs: tuple[str, ...] = (),
                 rule_dirs: tuple[str, ...] = ()) -> None:
        self.gateway = gateway
        self.connections: set[FrontConnection] = set()
        self.port = cfg.port
        self._accept_scope: trio.CancelScope | None = None
        self._poller: FrontPoller | None = None
        self.apply(cfg, dialect_dirs, rule_dirs)

    def apply(self, cfg: ListenerConfig, dialect_dirs: tuple[str, ...] = (), rule_dirs: tuple[str, ...] = ()) -> None:
        """Take (new) settings: codec, rules and limits. Address changes need a restart."""
        where = f"listeners.{cfg.name}"
        dialect: Dialect = get_dialect(cfg.dialect, dialect_dirs)
        rules: RuleSet = load_rules(cfg.rules, rule_dirs)
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
        self.scanner = Scanner(dialect, rules.fields_needed | ROUTING_FIELDS | set(gateway_match_fields(self.gateway)))

    async def serve(self, connection_nursery: trio.Nursery, *, task_status=trio.TASK_STATUS_IGNORED) -> None:  # noqa: ANN001
        """Accept connections until ``stop_accepting``; connections live in ``connection_nursery``."""
        if self.gateway.worker is None:
            listeners = await trio.open_tcp_listeners(self.cfg.port, host=self.cfg.host)
        else:
            listeners = [await open_shared_listener(self.cfg.host, self.cfg.port)]
        self.port = listeners[0].socket.getsockname()[1]
        self._poller = FrontPoller(self)
        await connection_nursery.start(self._poller.run)
        with trio.CancelScope() as scope:
            self._accept_scope = scope
            task_status.started(self.port)
            await trio.serve_listeners(self._handle, listeners, handler_nursery=connection_nursery)
        for lst in listeners:
            with trio.CancelScope(shield=True):
                await lst.aclose()

    def stop_accepting(self) -> None:
        if self._accept_scope is not None:
            self._accept_scope.cancel()

    async def _handle(self, trio_stream: trio.SocketStream) -> None:
        """A new connection: counted, then handed to the poller (this task ends here)."""
        stream = SocketIO.adopt(trio_stream)
        m = self.gateway.metrics
        if len(self.connections) >= self.cfg.max_connections or self._poller is None:
            m.connections_total(self.name, "refused").inc()
            log.warning("listener %s: connection refused: %d open is the limit", self.name, self.cfg.max_connections)
            stream.close()
            return
        m.connections_total(self.name, "accepted").inc()
        conn = FrontConnection(self, stream, self._poller)
        self.connections.add(conn)
        m.connections_open(self.name).inc()
        self._poller.add(conn, trio.current_time())

    def closed(self, conn: "FrontConnection", reason: str) -> None:
        """Bookkeeping for a connection that ended (``FrontConnection.close``)."""
        self.connections.discard(conn)
        m = self.gateway.metrics
        m.connections_open(self.name).dec()
        m.connections_closed(self.name, reason).inc()
        if reason not in ("peer_closed", "shutdown"):
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


def gateway_match_fields(gateway: "Gateway") -> set[int]:
    out: set[int] = set()
    for up in gateway.config.upstreams:
        out.update(up.match_fields)
    return out


class FrontConnection:
    """One front end's connection: read by its listener's ``FrontPoller``, written by its ``FrameWriter``."""

    __slots__ = ("id", "listener", "stream", "sock", "writer", "in_flight", "closed", "decoder", "deadline",
                 "paused", "_poller", "_heap_at", "fd")

    def __init__(self, listener: Listener, stream: SocketIO, poller: "FrontPoller") -> None:
        self.id = next(_conn_ids)
        self.listener = listener
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
        self._heap_at: float | None = None  # the deadline of its entry in the poller's heap
        self.writer.on_broken = self.abort

    def abort(self, reason: str) -> None:
        """End the connection from outside its reads (a stalled or broken writer)."""
        self.close("stalled_reader" if reason == "send_timeout" else "reset")

    def request_done(self) -> None:
        """An answer went out for one of this connection's requests."""
        self.in_flight -= 1
        if self.paused and self.in_flight < self.listener.cfg.max_in_flight and not self.closed:
            self._poller.resume(self, trio.current_time())

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
        gateway = listener.gateway
        decoder = self.decoder
        cfg = listener.cfg
        try:
            frames = decoder.feed(data)
        except FrameTooLarge:
            gateway.metrics.frames_too_large("front", listener.name).inc()
            log.warning("listener %s connection %d: frame over %d bytes; closing", listener.name, self.id,
                        cfg.max_frame)
            self.close("frame_too_large")
            return
        except FrameError as exc:
            gateway.metrics.decode_errors("front", listener.name, "framing").inc()
            log.warning("listener %s connection %d: framing lost (%s); closing", listener.name, self.id, exc)
            self.close("framing_lost")
            return
        if frames:
            gateway.on_front_frames(self, frames, touched, now)
            if self.closed:
                return
            if self.in_flight >= cfg.max_in_flight:
                # Backpressure: stop reading until answers drain below the limit.
                self._poller.pause(self)
                return
        if decoder.partial:
            self._poller.set_deadline(self, now + cfg.partial_frame_timeout)
        else:
            self.deadline = now + cfg.idle_timeout  # later than before: the heap entry catches up lazily

    def expired(self) -> None:
        self.close("stalled_partial_frame" if self.decoder.partial else "idle_timeout")

    def close(self, reason: str) -> None:
        """End the connection (idempotent): answers still to come for it are undeliverable."""
        if self.closed:
            return
        self.closed = True
        self._poller.forget(self)
        self.listener.closed(self, reason)
        self.stream.close()


class FrontPoller:
    """Reads all of a listener's connections from one task.

    The connections are registered once (level-triggered) in an epoll set of their own,
    and the task waits, through trio, for that set to have something: one wake-up then
    reads every connection that has data. A connection costs no task and no per-read
    registration, and a deadline moves by an assignment (expired entries are found by a
    sweeper task that sleeps until the earliest one). Writers that could not send at once
    finish in tasks of their own, so a slow client never holds the others up.
    """

    def __init__(self, listener: Listener) -> None:
        self.listener = listener
        self._epoll = select.epoll()
        self._reading: dict[int, FrontConnection] = {}
        self._heap: list[tuple[float, int, FrontConnection]] = []
        self._sleep = trio.CancelScope()
        self._nursery: trio.Nursery | None = None

    def add(self, conn: FrontConnection, now: float) -> None:
        conn.writer.background = self._nursery  # a slow reader's sends finish there
        self._epoll.register(conn.fd, select.EPOLLIN)
        self._reading[conn.fd] = conn
        self.set_deadline(conn, now + self.listener.cfg.idle_timeout)

    def set_deadline(self, conn: FrontConnection, at: float) -> None:
        conn.deadline = at
        if conn._heap_at is None or at < conn._heap_at:
            self._push(conn, at)

    def _push(self, conn: FrontConnection, at: float) -> None:
        conn._heap_at = at
        heapq.heappush(self._heap, (at, conn.id, conn))
        if at < self._sleep.deadline:
            self._sleep.deadline = at

    def pause(self, conn: FrontConnection) -> None:
        if not conn.paused:
            conn.paused = True
            conn.deadline = math.inf
            del self._reading[conn.fd]
            self._epoll.unregister(conn.fd)

    def resume(self, conn: FrontConnection, now: float) -> None:
        if conn.paused:
            conn.paused = False
            self._epoll.register(conn.fd, select.EPOLLIN)
            self._reading[conn.fd] = conn
            self.set_deadline(conn, now + (self.listener.cfg.partial_frame_timeout if conn.decoder.partial
                                           else self.listener.cfg.idle_timeout))

    def forget(self, conn: FrontConnection) -> None:
        if self._reading.pop(conn.fd, None) is not None:
            try:
                self._epoll.unregister(conn.fd)
            except (OSError, ValueError):
                pass

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:  # noqa: ANN001
        """Serve until cancelled; then every connection still open is closed ("shutdown")."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._sweep)
                task_status.started()
                await self._read()
        finally:
            for conn in list(self.listener.connections):
                if conn._poller is self:
                    conn.close("shutdown")
            self._epoll.close()

    async def _read(self) -> None:
        epoll = self._epoll
        reading = self._reading
        nursery = self._nursery
        assert nursery is not None
        name = self.listener.name
        gateway = self.listener.gateway
        while True:
            await trio.lowlevel.wait_readable(epoll)
            events = epoll.poll(0, 1024)
            if not events:
                continue
            now = trio.current_time()
            gateway.begin_round()
            touched: set[FrameWriter] = set()
            for fd, _ in events:
                conn = reading.get(fd)
                if conn is None:
                    continue  # closed or paused by an earlier connection's answers
                try:
                    conn.on_readable(now, touched)
                except Exception:  # noqa: BLE001 - one connection's bug must not reach the others
                    log.exception("listener %s connection %d: internal error; connection closed", name, conn.id)
                    conn.close("internal_error")
            # One log write for the requests of the whole round, then one send per writer (the
            # requests of every connection read here leave for a switch link together).
            for writer in gateway.release_held(touched):
                if not writer.flush_soon():
                    nursery.start_soon(writer.flush)

    async def _sweep(self) -> None:
        """Close connections whose deadline passed."""
        heap = self._heap
        while True:
            self._sleep = trio.CancelScope(deadline=heap[0][0] if heap else math.inf)
            with self._sleep:
                await trio.sleep_forever()
            now = trio.current_time()
            while heap and heap[0][0] <= now:
                at, _, conn = heapq.heappop(heap)
                if conn.closed or conn._heap_at != at:
                    continue  # stale entry
                conn._heap_at = None
                if conn.deadline <= now:
                    conn.expired()
                elif conn.deadline < math.inf:
                    self._push(conn, conn.deadline)
