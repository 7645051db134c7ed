"""The observability endpoint: ``/metrics``, ``/healthz`` and ``/readyz`` on an address of their own.

- ``/metrics``: every metric, in the Prometheus text format, or OpenMetrics when
  the scraper's Accept header asks for it (and gzipped when it accepts gzip;
  ``name[]`` query parameters keep only those metrics).
- ``/healthz``: 200 when the process is alive *and* the gateway's trio event loop
  runs a callback within ``LOOP_DEADLINE``; 503 with the reason otherwise. A
  wedged loop (a blocking call, a busy loop) fails it, which a process check
  can't see. The body says how long the loop took (its lag).
- ``/readyz``: 200 when the gateway can carry traffic (what ``readiness``
  answers, run on the event loop: at least one upstream link ready and
  answering, the journal writable, not draining); 503 with a plain-text reason
  otherwise.

Why this server. The endpoint runs an event loop of its own (trio, in one
thread), speaking HTTP/1.1 with h11 (parsing, framing and keep-alive are the
library's; this module only decides what to answer). So it holds no thread per
connection and can bound everything a client can make it hold:

- at most ``max_connections`` connections at once; past that, new ones wait in
  the kernel's listen queue (``backlog`` long) until a slot frees, so a burst of
  scrapes is served in turn rather than refused;
- a request's headers must arrive within ``header_timeout`` of the connection
  opening (or of the previous answer, on a kept-alive connection), and be at
  most ``MAX_HEADER_BYTES``; a slow or silent client is closed after that;
- an answer the client does not read within ``send_timeout`` ends the
  connection;
- a request that is not HTTP gets 400 and the connection is closed.

Why a loop of its own rather than the gateway's: the probes must measure the
gateway's loop from outside it. ``/healthz`` asks that loop to run one tiny
callback (``TrioToken.run_sync_soon``, thread-safe) and waits for it with a
deadline, so a wedged gateway loop gets a prompt 503, not silence; and the
endpoint's own work (parsing, answering hundreds of scrapes) never sits in the
queue of the loop that relays payments.

What it must never do: block or slow the gateway's loop. The registry is
rendered in a worker thread (``trio.to_thread``, at most ``RENDER_THREADS`` at
once; prometheus-client's values are thread-safe), and scrapes that arrive while
a render runs share the next one (one render per burst, however many scrapers).
Nothing here echoes request data.

Several worker processes (issue 6, prometheus-client multiprocess mode): when
``PROMETHEUS_MULTIPROC_DIR`` is set, ``/metrics`` serves a registry that adds up
every worker's metric files, so one scrape of any worker gives the whole
picture; the probes answer for the process that serves them.
"""

from __future__ import annotations

import gzip
import logging
import os
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable
from urllib.parse import parse_qs

import h11
import trio
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder, gzip_accepted

if TYPE_CHECKING:
    from ..config import MetricsConfig

log = logging.getLogger("iso_gateway.http")

# How long a probe waits for the event loop. Kubernetes' default probe timeout
# is 1 s; the loop normally answers in well under a millisecond, so 0.5 s of
# silence means it is wedged, and the prober still gets its answer in time.
LOOP_DEADLINE = 0.5

# Request line and headers of one request, bytes. A scrape or a probe sends a few
# hundred; 16 KiB is h11's own default and far more than any honest client needs.
MAX_HEADER_BYTES = 16 * 1024
# A request body is read (a client may send one) and ignored, up to this much; more: 413 and closed.
MAX_BODY_BYTES = 64 * 1024
# Registry renders at once, in worker threads. Scrapes that arrive together share a render,
# so two (text and OpenMetrics at once, say) is all a burst needs; more would only
# compete for the interpreter with the gateway's loop.
RENDER_THREADS = 2

# (ready, why): the callback the gateway gives for /readyz; it runs on the event loop.
Readiness = Callable[[], "tuple[bool, str]"]

PLAIN = [("Content-Type", "text/plain; charset=utf-8"), ("Cache-Control", "no-store")]


@dataclass(frozen=True)
class Limits:
    """What a client can make the endpoint hold (see ``MetricsConfig`` for each default's reason)."""

    max_connections: int = 1024
    header_timeout: float = 5.0
    send_timeout: float = 10.0
    backlog: int = 1024

    @classmethod
    def from_config(cls, cfg: "MetricsConfig") -> "Limits":
        return cls(max_connections=cfg.max_connections, header_timeout=cfg.header_timeout,
                   send_timeout=cfg.send_timeout, backlog=cfg.backlog)


class LoopUnresponsive(Exception):
    """The event loop did not run a probe callback before the deadline (or has finished)."""


def call_on_loop(token: trio.lowlevel.TrioToken, fn: Callable[[], Any], deadline: float = LOOP_DEADLINE) -> Any:
    """Run ``fn`` on the trio loop from another thread; wait at most ``deadline`` seconds.

    Raises ``LoopUnresponsive`` when the loop does not get to it in time, or no
    longer runs. Exceptions from ``fn`` are raised here.
    """
    done = threading.Event()
    box: list[tuple[bool, Any]] = []

    def run() -> None:
        try:
            _run_into(fn, box)
        finally:
            done.set()

    try:
        token.run_sync_soon(run)
    except trio.RunFinishedError:
        raise LoopUnresponsive("the event loop has stopped") from None
    if not done.wait(deadline):
        raise LoopUnresponsive(f"the event loop did not respond within {deadline:g} s")
    return _unbox(box)


async def ask_loop(token: trio.lowlevel.TrioToken, fn: Callable[[], Any], deadline: float = LOOP_DEADLINE) -> Any:
    """``call_on_loop`` from a trio task of another loop (or the same one): waits without a thread."""
    here = trio.lowlevel.current_trio_token()
    done = trio.Event()
    box: list[tuple[bool, Any]] = []

    def run() -> None:
        try:
            _run_into(fn, box)
        finally:
            try:
                here.run_sync_soon(done.set)
            except trio.RunFinishedError:
                pass  # the asker's loop is gone: nobody waits

    try:
        token.run_sync_soon(run)
    except trio.RunFinishedError:
        raise LoopUnresponsive("the event loop has stopped") from None
    with trio.move_on_after(deadline):
        await done.wait()
    if not box:
        raise LoopUnresponsive(f"the event loop did not respond within {deadline:g} s")
    return _unbox(box)


def _run_into(fn: Callable[[], Any], box: list[tuple[bool, Any]]) -> None:
    """Run ``fn`` (on the loop) and keep its outcome for the asker: (True, value) or (False, exception)."""
    try:
        box.append((True, fn()))
    except Exception as exc:  # noqa: BLE001 - handed to the asker, who raises it
        box.append((False, exc))


def _unbox(box: list[tuple[bool, Any]]) -> Any:
    """The outcome ``_run_into`` kept: its value, or its exception raised here."""
    ok, value = box[0]
    if not ok:
        raise value
    return value


def exposition_registry(registry: CollectorRegistry) -> CollectorRegistry:
    """What /metrics serves: this process's registry, or every worker's in multiprocess mode."""
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not path:
        return registry
    from prometheus_client import multiprocess

    combined = CollectorRegistry()
    multiprocess.MultiProcessCollector(combined, path=path)
    return combined


# status, headers, body
Answer = tuple[int, list[tuple[str, str]], bytes]


def _text(status: int, body: str, extra: list[tuple[str, str]] | None = None) -> Answer:
    return status, PLAIN + (extra or []), body.encode("utf-8")


class _Render:
    """One render of the registry, shared by every scrape that waits for it."""

    def __init__(self) -> None:
        self.done = trio.Event()
        self.started = False
        self.result: Answer | Exception | None = None


class ObservabilityApp:
    """What the endpoint answers: /metrics, /healthz, /readyz; anything else is 404.

    ``respond`` runs on the endpoint's own loop; ``token`` is the gateway's loop.
    """

    def __init__(self, registry: CollectorRegistry, token: trio.lowlevel.TrioToken,
                 readiness: Readiness | None = None, *, deadline: float = LOOP_DEADLINE,
                 before_scrape: Callable[[], None] | None = None) -> None:
        self.registry = exposition_registry(registry)
        self.token = token
        self.readiness = readiness
        self.deadline = deadline
        # Run on the event loop before a scrape renders: brings the loop's fast counters in.
        self.before_scrape = before_scrape
        # Renders waiting to start, by what they render: a scrape joins the one not started yet.
        self._next: dict[tuple[str, str, tuple[str, ...]], _Render] = {}
        self._running: dict[tuple[str, str, tuple[str, ...]], trio.Event] = {}
        self._limiter: trio.CapacityLimiter | None = None
        self.renders = 0  # registry renders done (tests: a burst shares them)

    async def respond(self, method: str, target: str, headers: dict[str, str]) -> Answer:
        path, _, query = target.partition("?")
        if path not in ("/metrics", "/healthz", "/readyz"):
            return _text(404, "not found: try /metrics, /healthz or /readyz\n")
        if method not in ("GET", "HEAD"):
            return _text(405, "use GET\n", [("Allow", "GET, HEAD")])
        if path == "/metrics":
            return await self.metrics(headers, query)
        return await (self.healthz() if path == "/healthz" else self.readyz())

    async def metrics(self, headers: dict[str, str], query: str) -> Answer:
        accept = headers.get("accept", "")
        encoding = headers.get("accept-encoding", "")
        names = tuple(sorted(parse_qs(query).get("name[]", ())))
        key = (accept, encoding, names)
        # Join the render that starts next: it starts after this request came, so it
        # misses nothing counted before; scrapes arriving during a render share one.
        render = self._next.get(key)
        if render is None:
            render = self._next[key] = _Render()
        if not render.started:
            running = self._running.get(key)
            if running is not None:
                await running.wait()  # the render before ours: ours starts when it ends
            if not render.started:
                render.started = True
                if self._next.get(key) is render:
                    del self._next[key]
                self._running[key] = render.done
                try:
                    render.result = await self._render(accept, encoding, names)
                except Exception as exc:  # noqa: BLE001 - every waiter answers 500 for it
                    render.result = exc
                except BaseException:  # cancelled: the endpoint is stopping
                    render.result = _text(503, "the endpoint is stopping\n")
                    raise
                finally:
                    if self._running.get(key) is render.done:
                        del self._running[key]
                    render.done.set()
        await render.done.wait()
        if isinstance(render.result, Exception):
            log.error("rendering the metrics failed: %s", render.result)
            return _text(500, "the metrics could not be rendered (see the log)\n")
        assert render.result is not None
        return render.result

    async def _render(self, accept: str, encoding: str, names: tuple[str, ...]) -> Answer:
        if self._limiter is None:
            self._limiter = trio.CapacityLimiter(RENDER_THREADS)
        return await trio.to_thread.run_sync(self._render_in_thread, accept, encoding, names,
                                             limiter=self._limiter, abandon_on_cancel=True)

    def _render_in_thread(self, accept: str, encoding: str, names: tuple[str, ...]) -> Answer:
        if self.before_scrape is not None:
            try:
                call_on_loop(self.token, self.before_scrape, self.deadline)
            except LoopUnresponsive:
                pass  # serve what was flushed last (at most a second old)
        # prometheus-client's own exposition pieces: format negotiation, name[] filter, gzip.
        encoder, content_type = choose_encoder(accept)
        body = encoder(self.registry.restricted_registry(list(names)) if names else self.registry)
        headers = [("Content-Type", content_type)]
        if gzip_accepted(encoding):
            body = gzip.compress(body)
            headers.append(("Content-Encoding", "gzip"))
        self.renders += 1
        return 200, headers, body

    async def healthz(self) -> Answer:
        start = time.perf_counter()
        try:
            await ask_loop(self.token, _nothing, self.deadline)
        except LoopUnresponsive as exc:
            return _text(503, f"unhealthy: {exc}\n")
        return _text(200, f"ok: event loop answered in {(time.perf_counter() - start) * 1000:.1f} ms\n")

    async def readyz(self) -> Answer:
        if self.readiness is None:
            return _text(503, "not ready: no gateway is attached to this endpoint\n")
        try:
            ready, why = await ask_loop(self.token, self.readiness, self.deadline)
        except LoopUnresponsive as exc:
            return _text(503, f"not ready: {exc}\n")
        except Exception:  # a failing check means "not ready", and is logged once per probe
            log.exception("readiness check failed")
            return _text(503, "not ready: the readiness check failed (see the log)\n")
        if ready:
            return _text(200, f"ready: {why}\n")
        return _text(503, f"not ready: {why}\n")


def _nothing() -> None:
    return None


REASONS = {200: b"OK", 400: b"Bad Request", 404: b"Not Found", 405: b"Method Not Allowed",
           408: b"Request Timeout", 413: b"Content Too Large", 431: b"Request Header Fields Too Large",
           500: b"Internal Server Error", 503: b"Service Unavailable"}


class _Closed(Exception):
    """The client went away, or broke the protocol: end the connection."""


async def _receive(stream: trio.abc.Stream, conn: h11.Connection) -> Any:
    """The next h11 event, reading as needed."""
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        try:
            data = await stream.receive_some(16384)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise _Closed from None
        conn.receive_data(bytes(data))  # a no-op for the bytes trio's sockets return; h11 is typed for bytes


async def _send(stream: trio.abc.Stream, conn: h11.Connection, method: str, answer: Answer, close: bool) -> None:
    status, headers, body = answer
    headers = headers + [("Content-Length", str(len(body)))]
    if close:
        headers.append(("Connection", "close"))
    data = conn.send(h11.Response(status_code=status, headers=headers, reason=REASONS.get(status, b"")))
    if method != "HEAD":
        data += conn.send(h11.Data(data=body))
    data += conn.send(h11.EndOfMessage())
    try:
        await stream.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        raise _Closed from None


async def serve_connection(stream: trio.abc.Stream, app: ObservabilityApp, limits: Limits,
                           stats: Counter[str] | None = None) -> None:
    """Answer requests on one connection until the client closes it or a limit ends it; closes it."""
    stats = stats if stats is not None else Counter()
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
    reason = "client_closed"
    try:
        while True:
            # The request: headers (and any small body) within header_timeout.
            request: h11.Request | None = None
            with trio.move_on_after(limits.header_timeout) as timer:
                first = await _receive(stream, conn)
                if isinstance(first, h11.ConnectionClosed):
                    return
                assert isinstance(first, h11.Request)
                size = 0
                while True:
                    event = await _receive(stream, conn)
                    if isinstance(event, h11.EndOfMessage):
                        break
                    if isinstance(event, h11.ConnectionClosed):
                        return
                    size += len(getattr(event, "data", b""))
                    if size > MAX_BODY_BYTES:
                        reason = "body_too_large"
                        with trio.move_on_after(limits.send_timeout):
                            await _send(stream, conn, "POST", _text(413, "request body too large\n"), True)
                        return
                request = first
            if timer.cancelled_caught or request is None:
                reason = "header_timeout"  # too slow (or silent): closed, its slot freed
                return
            method = request.method.decode("ascii", "replace")
            target = request.target.decode("ascii", "replace")
            headers = {k.decode("ascii", "replace").lower(): v.decode("latin-1") for k, v in request.headers}
            answer = await app.respond(method, target, headers)
            stats["requests"] += 1
            close = conn.their_state is not h11.DONE  # h11 also honours the client's "Connection: close"
            with trio.move_on_after(limits.send_timeout):
                await _send(stream, conn, method, answer, close)
                if close or conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    reason = "answered"
                    return
                conn.start_next_cycle()
                continue
            reason = "send_timeout"
            return
    except h11.RemoteProtocolError as exc:
        # Not HTTP (or broken HTTP): 400 when an answer can still be sent, then close.
        reason = "bad_request"
        if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            status = exc.error_status_hint if exc.error_status_hint in REASONS else 400
            try:
                data = conn.send(h11.Response(status_code=status, reason=REASONS[status], headers=PLAIN + [
                    ("Content-Length", "12"), ("Connection", "close")]))
                data += conn.send(h11.Data(data=b"bad request\n")) + conn.send(h11.EndOfMessage())
            except h11.LocalProtocolError:
                data = b""
            with trio.move_on_after(limits.send_timeout):
                try:
                    await stream.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
    except _Closed:
        reason = "client_closed"
    except Exception:  # one connection's failure must not reach the others
        reason = "internal_error"
        log.exception("observability endpoint: internal error on a connection; it is closed")
    finally:
        stats[f"closed_{reason}"] += 1
        await trio.aclose_forcefully(stream)


async def serve(listener: trio.SocketListener, app: ObservabilityApp, limits: Limits,
                stats: Counter[str] | None = None) -> None:
    """Accept connections, at most ``limits.max_connections`` open at once, until cancelled."""
    stats = stats if stats is not None else Counter()
    slots = trio.Semaphore(limits.max_connections)

    async def one(stream: trio.SocketStream) -> None:
        try:
            await serve_connection(stream, app, limits, stats)
        finally:
            stats["open"] -= 1
            slots.release()

    async with trio.open_nursery() as nursery:
        while True:
            await slots.acquire()  # full: new connections wait in the listen queue
            try:
                stream = await listener.accept()
            except OSError as exc:  # out of file descriptors, say: wait a little, keep serving
                slots.release()
                log.warning("observability endpoint: accept failed: %s", exc.strerror or exc)
                await trio.sleep(0.1)
                continue
            stats["accepted"] += 1
            stats["open"] += 1
            stats["peak"] = max(stats["peak"], stats["open"])
            nursery.start_soon(one, stream)


class ObservabilityServer:
    """The endpoint: its socket is bound at once; it serves from a thread running its own trio loop."""

    def __init__(self, host: str, port: int, app: ObservabilityApp, limits: Limits | None = None) -> None:
        self.limits = limits or Limits()
        self.app = app
        self.host = host
        self.stats: Counter[str] = Counter()  # accepted, open, peak, requests, closed_<reason>
        sock = socket.socket(_family(host, port), socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(self.limits.backlog)
        except OSError:
            sock.close()
            raise
        self.sock = sock
        self.port: int = sock.getsockname()[1]
        self._token: trio.lowlevel.TrioToken | None = None
        self._scope: trio.CancelScope | None = None
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"observability-http:{self.port}", daemon=True)

    def start(self) -> "ObservabilityServer":
        self._thread.start()
        self._started.wait(10)
        return self

    def _run(self) -> None:
        try:
            trio.run(self._main)
        except Exception:  # the endpoint failing must not take the gateway with it
            log.exception("observability endpoint stopped")
        finally:
            self._started.set()

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        with trio.CancelScope() as scope:
            self._scope = scope
            self._started.set()
            listener = trio.SocketListener(trio.socket.from_stdlib_socket(self.sock))
            await serve(listener, self.app, self.limits, self.stats)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def close(self) -> None:
        """Stop serving and release the port (waits at most a few seconds for the thread)."""
        if self._thread.is_alive() and self._token is not None and self._scope is not None:
            try:
                self._token.run_sync_soon(self._scope.cancel)
            except trio.RunFinishedError:
                pass
            self._thread.join(timeout=5)
        self.sock.close()


def _family(host: str, port: int) -> socket.AddressFamily:
    return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]


def start_server(host: str, port: int, registry: CollectorRegistry, readiness: Readiness | None = None,
                 *, deadline: float = LOOP_DEADLINE, before_scrape: Callable[[], None] | None = None,
                 limits: Limits | None = None) -> ObservabilityServer:
    """Start serving from a thread; call from inside ``trio.run`` (the probes need its token)."""
    app = ObservabilityApp(registry, trio.lowlevel.current_trio_token(), readiness, deadline=deadline,
                           before_scrape=before_scrape)
    return ObservabilityServer(host, port, app, limits).start()
