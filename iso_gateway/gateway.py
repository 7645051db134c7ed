"""The transaction flow: front-end request in, switch response out, every failure answered.

Per request, on the hot path, nothing is fully decoded: the request is scanned
(MTI and the fields rules and routes need), validated, routed, given the link's
own STAN by splicing, and sent. The response is scanned for 11/38/39/41,
matched, given the front end's STAN back by splicing, and written to the front
end. pyiso8583 decodes only what the gateway answers itself (rejects, timeouts,
0810s) and messages that cross between two different dialects.

Every request gets exactly one answer: the switch's, or the gateway's own
(a validation reject, 92/15 for no route, 91 when no link can carry it, 91 on
timeout or when the link drops). What happens to a timed-out authorization
afterwards (a reversal) goes through ``ReversalSink``.
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from typing import Protocol, Sequence

import trio

from .config import Config
from .errors import ConfigError, IsoGatewayError, MessageError
from .frontend import FrontConnection, Listener
from .framing import Frame
from .links import Upstream, UpstreamConnection
from .masking import mask_pan
from .matching import match_key
from .message import build_response, decode, encode, is_request, is_valid_mti, response_mti
from .metrics import Metrics
from .routing import NoRoute, RouteTable
from .scanner import Scan
from .writer import FrameWriter

log = logging.getLogger("iso_gateway.gateway")


class ReversalSink(Protocol):
    """Where the gateway hands transactions that may need reversing.

    ``timed_out``: the switch did not answer in time (or the link dropped after
    the request was sent); ``late_response``: an answer came after the timeout;
    ``undeliverable``: the switch answered but the front end is gone.
    """

    def timed_out(self, request: "FrontRequest", reason: str) -> None: ...

    def late_response(self, conn: UpstreamConnection, scan: Scan, raw: bytes, request: "FrontRequest | None") -> None: ...

    def undeliverable(self, request: "FrontRequest", scan: Scan, raw: bytes) -> None: ...


class LogReversalSink:
    """Counts and logs; the durable store-and-forward sink replaces it (see saf)."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def timed_out(self, request: "FrontRequest", reason: str) -> None:
        if request.mti[1] in "12":
            self.metrics.reversals(request.upstream.cfg.name, "needed").inc()
            log.warning("reversal needed (%s): %s upstream STAN %s", reason, request.mti, request.upstream_stan)

    def late_response(self, conn: UpstreamConnection, scan: Scan, raw: bytes, request: "FrontRequest | None") -> None:
        if request is not None and scan.values.get(39) == "00" and request.mti[1] in "12":
            self.metrics.reversals(conn.cfg.name, "needed").inc()
            log.warning("reversal needed (late approval): %s upstream STAN %s", request.mti, request.upstream_stan)

    def undeliverable(self, request: "FrontRequest", scan: Scan, raw: bytes) -> None:
        if scan.values.get(39) == "00" and request.mti[1] in "12":
            self.metrics.reversals(request.upstream.cfg.name, "needed").inc()
            log.warning("reversal needed (front end gone): %s upstream STAN %s", request.mti, request.upstream_stan)


class FrontRequest:
    """A front-end request in flight to a switch: the pending-table entry for it."""

    __slots__ = ("gateway", "front", "raw", "header", "mti", "front_stan", "upstream_stan", "upstream",
                 "received_at", "sent_at", "translate", "done")

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

    def on_response(self, conn: UpstreamConnection, raw: bytes, scan: Scan, now: float) -> FrameWriter | None:
        self.done = True
        gw = self.gateway
        gw.front_in_flight -= 1
        m = gw.metrics
        upname = conn.cfg.name
        m.upstream_latency(upname, self.mti).observe(now - self.sent_at)
        m.in_flight(upname).dec()
        front = self.front
        if front.closed:
            gw.reversals.undeliverable(self, scan, raw)
            return None
        listener = front.listener
        try:
            if self.translate:
                msg = decode(conn.upstream.dialect, raw, check_types=False)
                msg["11"] = self.front_stan
                out = encode(listener.dialect, msg, check_types=False)
            elif 11 in scan.spans:
                out = conn.upstream.scanner.splice(raw, scan, 11, self.front_stan)
            else:
                out = raw
        except IsoGatewayError as exc:
            log.warning("response from %s can't be returned to the front end (%s); answering 96", upname, exc)
            return gw.answer_locally(front, self.raw, self.header, "96", "bad_response", now, self.received_at)
        front.writer.enqueue(listener.framer.encode(out, header=listener.framer.reply_header(self.header)))
        front.request_done()
        m.front_sent(listener.name, scan.mti, scan.values.get(39, "")).inc()
        m.request_latency(upname, self.mti).observe(now - self.received_at)
        return front.writer

    def on_timeout(self, conn: UpstreamConnection, now: float) -> FrameWriter | None:
        gw = self.gateway
        gw.metrics.timeouts(conn.cfg.name, self.mti).inc()
        log.warning("upstream %s: no answer to %s (upstream STAN %s) in time; answered %s",
                    conn.cfg.name, self.mti, self.upstream_stan, gw.config.gateway.timeout_code)
        conn.remember_late(self._key(conn), self, now)
        gw.reversals.timed_out(self, "timeout")
        return self._fail(gw.config.gateway.timeout_code, "timeout", now)

    def on_link_lost(self, conn: UpstreamConnection, now: float) -> FrameWriter | None:
        gw = self.gateway
        gw.reversals.timed_out(self, "link_lost")
        return self._fail(gw.config.gateway.unavailable_code, "link_lost", now)

    def _key(self, conn: UpstreamConnection) -> tuple:
        return match_key(self.mti, self.upstream_stan, ())

    def _fail(self, code: str, reason: str, now: float) -> FrameWriter | None:
        self.done = True
        gw = self.gateway
        gw.front_in_flight -= 1
        gw.metrics.in_flight(self.upstream.cfg.name).dec()
        return gw.answer_locally(self.front, self.raw, self.header, code, reason, now, self.received_at)


class Gateway:
    """Listeners, upstreams and routes wired together; ``run`` serves until ``stop``."""

    def __init__(self, config: Config, *, metrics: Metrics | None = None, reversals: ReversalSink | None = None,
                 config_path: str | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.metrics = metrics or Metrics()
        self.reversals: ReversalSink = reversals or LogReversalSink(self.metrics)
        dd = tuple(config.dialect_dirs)
        rd = tuple(config.rule_dirs)
        self.routes = RouteTable(config.routes, config.routing, source=config_path or "config")
        self.upstreams = {u.name: Upstream(u, self, self.metrics, dd) for u in config.upstreams}
        self.listeners = [Listener(lc, self, dd, rd) for lc in config.listeners]
        self._stop = trio.Event()
        self._stopped = trio.Event()
        self.draining = False
        self.front_in_flight = 0
        self.metrics_port: int | None = None
        self._now_utc = datetime.now(timezone.utc)

    # ------------------------------------------------------------------ control

    def stop(self) -> None:
        """Begin a graceful shutdown (what SIGTERM does)."""
        self._stop.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    @property
    def ports(self) -> list[int]:
        return [lst.port for lst in self.listeners]

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
        routes = RouteTable(config.routes, config.routing, source=self.config_path or "config")
        # Build every listener's new state before touching any, so a failure changes nothing.
        staged = []
        for lst, lc in zip(self.listeners, config.listeners):
            probe = Listener.__new__(Listener)
            probe.gateway = self
            probe.apply(lc, tuple(config.dialect_dirs), tuple(config.rule_dirs))
            staged.append((lst, lc))
        for lst, lc in staged:
            lst.apply(lc, tuple(config.dialect_dirs), tuple(config.rule_dirs))
        self.routes = routes
        self.config = config
        log.info("configuration reloaded: %d routes", len(config.routes))

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:  # noqa: ANN001
        """Serve until ``stop``; then drain, answer what is left, sign off and return."""
        async with trio.open_nursery() as root:
            up_scope = trio.CancelScope()

            async def run_upstreams() -> None:
                with up_scope:
                    async with trio.open_nursery() as n:
                        for up in self.upstreams.values():
                            n.start_soon(up.run)

            root.start_soon(run_upstreams)
            conn_scope = trio.CancelScope()
            conn_nursery_ready = trio.Event()
            holder: list[trio.Nursery] = []

            async def connections() -> None:
                with conn_scope:
                    async with trio.open_nursery() as n:
                        holder.append(n)
                        conn_nursery_ready.set()
                        await trio.sleep_forever()

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
        self._stopped.set()

    async def _drain(self) -> None:
        self.draining = True
        for lst in self.listeners:
            lst.stop_accepting()
        log.info("shutting down: no new connections; draining in-flight requests")
        with trio.move_on_after(self.config.gateway.drain_timeout):
            while self.front_in_flight:
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

    def on_front_frames(self, front: FrontConnection, frames: Sequence[Frame]) -> set[FrameWriter]:
        """Handle every complete frame read in one chunk; returns the writers the caller must flush."""
        now = trio.current_time()
        self._now_utc = datetime.now(timezone.utc)
        touched: set[FrameWriter] = {front.writer}
        for frame in frames:
            if frame.keepalive:
                front.writer.enqueue(front.listener.framer.keepalive())
                continue
            try:
                w = self._on_request(front, frame.message, frame.header, now)
            except Exception:  # noqa: BLE001 - answer 96 rather than lose the connection
                log.exception("listener %s: internal error handling a request; answered 96", front.listener.name)
                self.answer_locally(front, frame.message, frame.header, "96", "internal_error", now, now, counted=False)
                continue
            if w is not None:
                touched.add(w)
        return touched

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
        return self._forward(front, raw, header, scan, upstream, conn, route.timeout, now)

    def _forward(self, front: FrontConnection, raw: bytes, header: bytes, scan: Scan, upstream: Upstream,
                 conn: UpstreamConnection, timeout: float, now: float) -> FrameWriter:
        listener = front.listener
        translate = listener.dialect is not upstream.dialect
        mti = scan.mti
        request = FrontRequest(self, front, raw, header, mti, scan.values.get(11, ""), upstream, now, translate)
        stan = conn.allocate_stan()
        request.upstream_stan = stan
        if translate:
            msg = decode(listener.dialect, raw, check_types=False)
            msg["11"] = stan
            out = encode(upstream.dialect, msg, check_types=False)
        else:
            out = listener.scanner.splice(raw, scan, 11, stan)
        extra = tuple(scan.values.get(f, "") for f in upstream.cfg.match_fields)
        writer = conn.send_request(request, out, match_key(mti, stan, extra), now + timeout, now)
        front.in_flight += 1
        self.front_in_flight += 1
        m = self.metrics
        m.upstream_sent(upstream.cfg.name, mti).inc()
        m.in_flight(upstream.cfg.name).inc()
        return writer

    # ------------------------------------------------------------------ local answers

    def answer_locally(self, front: FrontConnection, raw: bytes, header: bytes, code: str, reason: str,
                       now: float, received_at: float, *, counted: bool = True) -> FrameWriter | None:
        """Answer a request with the gateway's own response (echo fields, 39 = ``code``).

        ``counted``: the request was counted in flight and this answer completes it.
        """
        listener = front.listener
        if counted:
            front.request_done()
        try:
            req = decode(listener.dialect, raw, check_types=False)
        except IsoGatewayError:
            req = None
        out: bytes | None = None
        if req is not None:
            try:
                out = encode(listener.dialect, build_response(listener.dialect, req, code), check_types=False)
            except IsoGatewayError:
                out = None
        if out is None:
            return None
        if front.closed:
            return None
        front.writer.enqueue(listener.framer.encode(out, header=listener.framer.reply_header(header)))
        self.metrics.front_sent(listener.name, response_mti(req["t"]), code).inc()
        return front.writer

    def _undecodable(self, front: FrontConnection, raw: bytes, header: bytes, found: dict[int, str],
                     exc: MessageError, now: float) -> None:
        """A request that does not decode: answered 30 if its MTI can be read, else counted and dropped."""
        listener = front.listener
        m = self.metrics
        m.decode_errors("front", listener.name, "decode").inc()
        mti = _peek_mti(listener, raw)
        if mti is None or not is_request(mti):
            log.warning("listener %s connection %d: undecodable frame dropped (%s)", listener.name, front.id, exc)
            return
        log.warning("listener %s: %s does not decode (%s); answered 30", listener.name, mti, exc)
        m.rejections(listener.name, "format_error", "30").inc()
        resp = {"t": response_mti(mti), "39": "30"}
        for f in (11, 41, 42, 37, 7):
            if f in found:
                resp[str(f)] = found[f]
        try:
            out = encode(listener.dialect, resp, check_types=True)
        except IsoGatewayError:
            out = encode(listener.dialect, {"t": resp["t"], "39": "30"}, check_types=False)
        front.writer.enqueue(listener.framer.encode(out, header=listener.framer.reply_header(header)))
        m.front_sent(listener.name, resp["t"], "30").inc()

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
