"""The observability endpoint: ``/metrics``, ``/healthz`` and ``/readyz`` on an address of their own.

- ``/metrics``: every metric, in the Prometheus text format, or OpenMetrics when
  the scraper's Accept header asks for it (and gzipped when it accepts gzip).
- ``/healthz``: 200 when the process is alive *and* its trio event loop runs a
  callback within ``LOOP_DEADLINE``; 503 with the reason otherwise. A wedged
  loop (a blocking call, a busy loop) fails it, which a process check can't see.
- ``/readyz``: 200 when the gateway can carry traffic (what ``readiness``
  answers, run on the event loop: at least one upstream link ready, the journal
  writable, not draining); 503 with a plain-text reason otherwise.

Why this server. prometheus-client's WSGI app (``make_wsgi_app``) already does
the /metrics work (format negotiation, compression, ``name[]`` filters), and the
standard library's ``wsgiref`` serves WSGI with one daemon thread per request
(prometheus-client's own ``ThreadingWSGIServer``, the server behind its
``start_http_server``). So there is no hand-written HTTP parsing and no new
dependency, and a slow or stuck scraper holds only its own thread. A small WSGI
dispatcher adds the two probes in front of it.

What it must never do: block or slow the event loop. A scrape renders the
registry in an HTTP thread (prometheus-client's values are thread-safe); the
probes only queue one tiny callback on the loop with ``TrioToken.run_sync_soon``
(thread-safe, never blocks the caller) and wait for it on a ``threading.Event``
with a deadline, so a stuck loop costs the prober a bounded wait, never a
thread parked forever. Nothing here reads a request body or echoes request data.

Several worker processes (issue 6, prometheus-client multiprocess mode): when
``PROMETHEUS_MULTIPROC_DIR`` is set, ``/metrics`` serves a registry that adds up
every worker's metric files, so one scrape of any worker gives the whole
picture; the probes answer for the worker that serves them.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Any, Callable, Iterable
from wsgiref.simple_server import WSGIRequestHandler, make_server

import trio
from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

log = logging.getLogger("iso_gateway.http")

# How long a probe waits for the event loop. Kubernetes' default probe timeout
# is 1 s; the loop normally answers in well under a millisecond, so 0.5 s of
# silence means it is wedged, and the prober still gets its answer in time.
LOOP_DEADLINE = 0.5

# (ready, why): the callback the gateway gives for /readyz; it runs on the event loop.
Readiness = Callable[[], "tuple[bool, str]"]

PLAIN = [("Content-Type", "text/plain; charset=utf-8"), ("Cache-Control", "no-store")]


class LoopUnresponsive(Exception):
    """The event loop did not run a probe callback before the deadline (or has finished)."""


def call_on_loop(token: trio.lowlevel.TrioToken, fn: Callable[[], Any], deadline: float = LOOP_DEADLINE) -> Any:
    """Run ``fn`` on the trio loop from another thread; wait at most ``deadline`` seconds.

    Raises ``LoopUnresponsive`` when the loop does not get to it in time, or no
    longer runs. Exceptions from ``fn`` are raised here.
    """
    done = threading.Event()
    box: list[Any] = []

    def run() -> None:
        try:
            box.append((True, fn()))
        except Exception as exc:  # noqa: BLE001 - handed to the calling thread
            box.append((False, exc))
        finally:
            done.set()

    try:
        token.run_sync_soon(run)
    except trio.RunFinishedError:
        raise LoopUnresponsive("the event loop has stopped") from None
    if not done.wait(deadline):
        raise LoopUnresponsive(f"the event loop did not respond within {deadline:g} s")
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


class ObservabilityApp:
    """The WSGI application: /metrics, /healthz, /readyz; anything else is 404."""

    def __init__(self, registry: CollectorRegistry, token: trio.lowlevel.TrioToken,
                 readiness: Readiness | None = None, *, deadline: float = LOOP_DEADLINE,
                 before_scrape: Callable[[], None] | None = None) -> None:
        self.metrics_app = make_wsgi_app(exposition_registry(registry))
        self.token = token
        self.readiness = readiness
        self.deadline = deadline
        # Run on the event loop before a scrape renders: brings the loop's fast counters in.
        self.before_scrape = before_scrape

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            if self.before_scrape is not None:
                try:
                    call_on_loop(self.token, self.before_scrape, self.deadline)
                except LoopUnresponsive:
                    pass  # serve what was flushed last (at most a second old)
            return self.metrics_app(environ, start_response)
        if path not in ("/healthz", "/readyz"):
            return _text(start_response, "404 Not Found", "not found: try /metrics, /healthz or /readyz\n")
        if environ["REQUEST_METHOD"] not in ("GET", "HEAD"):
            return _text(start_response, "405 Method Not Allowed", "use GET\n", [("Allow", "GET, HEAD")])
        status, body = self.healthz() if path == "/healthz" else self.readyz()
        if environ["REQUEST_METHOD"] == "HEAD":
            start_response(status, PLAIN + [("Content-Length", str(len(body.encode())))])
            return [b""]
        return _text(start_response, status, body)

    def healthz(self) -> tuple[str, str]:
        start = time.perf_counter()
        try:
            call_on_loop(self.token, _nothing, self.deadline)
        except LoopUnresponsive as exc:
            return "503 Service Unavailable", f"unhealthy: {exc}\n"
        return "200 OK", f"ok: event loop answered in {(time.perf_counter() - start) * 1000:.1f} ms\n"

    def readyz(self) -> tuple[str, str]:
        if self.readiness is None:
            return "503 Service Unavailable", "not ready: no gateway is attached to this endpoint\n"
        try:
            ready, why = call_on_loop(self.token, self.readiness, self.deadline)
        except LoopUnresponsive as exc:
            return "503 Service Unavailable", f"not ready: {exc}\n"
        except Exception:  # noqa: BLE001 - a failing check means "not ready", and is logged once per probe
            log.exception("readiness check failed")
            return "503 Service Unavailable", "not ready: the readiness check failed (see the log)\n"
        if ready:
            return "200 OK", f"ready: {why}\n"
        return "503 Service Unavailable", f"not ready: {why}\n"


def _nothing() -> None:
    return None


def _text(start_response: Callable[..., Any], status: str, body: str,
          extra: list[tuple[str, str]] | None = None) -> list[bytes]:
    data = body.encode("utf-8")
    start_response(status, PLAIN + [("Content-Length", str(len(data)))] + (extra or []))
    return [data]


class _QuietHandler(WSGIRequestHandler):
    """No access log on stderr: scrapes every few seconds are not events."""

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's name
        pass


class ObservabilityServer:
    """The endpoint's HTTP server, serving from daemon threads until ``close``."""

    def __init__(self, host: str, port: int, app: ObservabilityApp) -> None:
        server_class = type("Server", (ThreadingWSGIServer,), {"address_family": _family(host, port)})
        self.server = make_server(host, port, app, server_class=server_class, handler_class=_QuietHandler)
        self.host = host
        self.port: int = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name=f"observability-http:{self.port}", daemon=True)

    def start(self) -> "ObservabilityServer":
        self._thread.start()
        return self

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def close(self) -> None:
        """Stop serving and release the port (waits at most the poll interval)."""
        if self._thread.is_alive():
            self.server.shutdown()
            self._thread.join(timeout=5)
        self.server.server_close()


def _family(host: str, port: int) -> socket.AddressFamily:
    return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]


def start_server(host: str, port: int, registry: CollectorRegistry, readiness: Readiness | None = None,
                 *, deadline: float = LOOP_DEADLINE,
                 before_scrape: Callable[[], None] | None = None) -> ObservabilityServer:
    """Start serving from a thread; call from inside ``trio.run`` (the probes need its token)."""
    app = ObservabilityApp(registry, trio.lowlevel.current_trio_token(), readiness, deadline=deadline,
                           before_scrape=before_scrape)
    return ObservabilityServer(host, port, app).start()

