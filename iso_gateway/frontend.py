"""The listening side: front-end connections, their limits and their reader loop.

Each connection has one reader (this module's loop) and one ``FrameWriter``.
Limits all end in a counted outcome: too many connections (accepted, counted,
closed; the listener keeps accepting), too many requests in flight (reading
pauses until answers drain: backpressure, not memory), a frame over the size
limit or a broken length header (framing lost: closed), a frame started and not
finished within ``partial_frame_timeout`` (a stalled client: dropped), nothing
at all for ``idle_timeout`` (closed). An exception in one connection is logged
and counted and never reaches the listener.
"""

from __future__ import annotations

import logging
import math
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
        stream = SocketIO.adopt(trio_stream)
        m = self.gateway.metrics
        if len(self.connections) >= self.cfg.max_connections:
            m.connections_total(self.name, "refused").inc()
            log.warning("listener %s: connection refused: %d open is the limit", self.name, self.cfg.max_connections)
            with trio.CancelScope(shield=True):
                await stream.aclose()
            return
        m.connections_total(self.name, "accepted").inc()
        conn = FrontConnection(self, stream)
        self.connections.add(conn)
        m.connections_open(self.name).inc()
        reason = "internal_error"
        try:
            reason = await conn.serve()
        except trio.Cancelled:
            reason = "shutdown"
            raise
        except Exception:  # noqa: BLE001 - one connection's bug must not reach the listener
            log.exception("listener %s connection %d: internal error; connection closed", self.name, conn.id)
        finally:
            conn.closed = True
            self.connections.discard(conn)
            m.connections_open(self.name).dec()
            m.connections_closed(self.name, reason).inc()
            if reason not in ("peer_closed", "shutdown"):
                log.info("listener %s connection %d closed: %s", self.name, conn.id, reason)
            with trio.CancelScope(shield=True):
                await stream.aclose()


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
    """One front end's connection."""

    def __init__(self, listener: Listener, stream: SocketIO) -> None:
        self.id = next(_conn_ids)
        self.listener = listener
        self.stream = stream
        self.writer = FrameWriter(stream, send_timeout=listener.cfg.send_timeout)
        self.in_flight = 0
        self.closed = False
        self._resume: trio.Event | None = None
        self._scope = trio.CancelScope()
        self._abort_reason = ""
        self.writer.on_broken = self.abort

    def abort(self, reason: str) -> None:
        """End the connection from outside its reader (a stalled or broken writer)."""
        self._abort_reason = "stalled_reader" if reason == "send_timeout" else "reset"
        self._scope.cancel()

    def request_done(self) -> None:
        """An answer went out for one of this connection's requests."""
        self.in_flight -= 1
        resume = self._resume
        if resume is not None and self.in_flight < self.listener.cfg.max_in_flight:
            self._resume = None
            resume.set()

    async def serve(self) -> str:
        """Read frames until the connection ends; return why it ended.

        One cancel scope serves the whole connection: its deadline moves before
        each read (idle or partial-frame timeout) and is lifted while requests
        are processed, which costs far less than a scope per read. ``abort``
        cancels it from outside."""
        listener = self.listener
        gateway = listener.gateway
        decoder = listener.framer.decoder()
        stream = self.stream
        scope = self._scope
        inf = math.inf
        with scope:
            while True:
                cfg = listener.cfg
                scope.deadline = trio.current_time() + (
                    cfg.partial_frame_timeout if decoder.partial else cfg.idle_timeout)
                try:
                    data = await stream.receive_some(65536)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    return "reset"
                scope.deadline = inf
                if not data:
                    return "peer_closed"
                try:
                    frames = decoder.feed(data)
                except FrameTooLarge:
                    gateway.metrics.frames_too_large("front", listener.name).inc()
                    log.warning("listener %s connection %d: frame over %d bytes; closing", listener.name, self.id,
                                cfg.max_frame)
                    return "frame_too_large"
                except FrameError as exc:
                    gateway.metrics.decode_errors("front", listener.name, "framing").inc()
                    log.warning("listener %s connection %d: framing lost (%s); closing", listener.name, self.id, exc)
                    return "framing_lost"
                if frames:
                    for writer in gateway.on_front_frames(self, frames):
                        if writer.deferred:
                            writer.flush_later()
                        else:
                            await writer.flush()
                if self.in_flight >= cfg.max_in_flight:
                    # Backpressure: stop reading until answers drain below the limit.
                    self._resume = trio.Event()
                    await self._resume.wait()
        if self._abort_reason:
            return self._abort_reason
        return "stalled_partial_frame" if decoder.partial else "idle_timeout"
