"""Prometheus metrics: every name the gateway exports, in one place.

Naming follows Prometheus conventions: one prefix (``iso_gateway_``), base
units (seconds, bytes), ``_total`` counters. Labels are bounded: listener,
upstream, host, MTI, response code, reason, state. A label never carries a PAN,
STAN, RRN, terminal or merchant id.

Label children are cached per label tuple so the hot path pays a dict lookup,
not prometheus-client's label resolution, per increment. ``NullMetrics`` has the
same attributes and does nothing, for measuring what metrics cost (the
benchmark's "metrics off").

Several worker processes (prometheus-client's multiprocess mode, with
``PROMETHEUS_MULTIPROC_DIR`` set before prometheus-client is imported): every
metric here works in that mode. Each gauge says how workers' values combine
(``multiprocess_mode``; ignored with one process), build info is a gauge rather
than an ``Info`` (which that mode does not support), and ``http`` aggregates
every worker's files for the scrape. Process metrics then describe only the
process serving the scrape.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import GCCollector, PlatformCollector, ProcessCollector

from . import __version__

# 1 ms .. 60 s: a loopback round trip is ~1 ms, a switch's own timeout is 15-30 s
# and the gateway's is at most 60 s (docs/domain.md §3.6).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0)
ECHO_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

LINK_STATES = ("disconnected", "connecting", "signing_on", "ready", "down")

PREFIX = "iso_gateway_"


class _FastCounter:
    """A counter child the event loop bumps with a plain addition; ``Metrics.flush`` hands the
    increase to prometheus-client (whose every increment takes a lock: most of what metrics
    cost per transaction). Only for metrics changed on the event loop thread."""

    __slots__ = ("value", "_flushed", "_target")

    def __init__(self, target: Any) -> None:
        self.value = 0.0
        self._flushed = 0.0
        self._target = target

    def inc(self, amount: float = 1) -> None:
        self.value += amount

    def get(self) -> float:
        return self.value

    def flush(self) -> None:
        delta = self.value - self._flushed
        if delta:
            self._flushed = self.value
            self._target.inc(delta)


class _FastGauge(_FastCounter):
    __slots__ = ()

    def dec(self, amount: float = 1) -> None:
        self.value -= amount

    def set(self, value: float) -> None:
        self.value = value

    def flush(self) -> None:
        if self.value != self._flushed:
            self._flushed = self.value
            self._target.set(self.value)


class _Cached:
    """A metric with its label children cached by label values (fast children when ``fast``)."""

    __slots__ = ("metric", "_children", "_fast", "_flushing")

    def __init__(self, metric: Any, fast: type[_FastCounter] | None = None,
                 flushing: list[_FastCounter] | None = None) -> None:
        self.metric = metric
        self._children: dict[tuple[str, ...], Any] = {}
        self._fast = fast
        self._flushing = flushing

    def __call__(self, *labels: str) -> Any:
        child = self._children.get(labels)
        if child is None:
            target = self.metric.labels(*labels) if labels else self.metric
            if self._fast is not None and self._flushing is not None:
                child = self._fast(target)
                self._flushing.append(child)
            else:
                child = target
            self._children[labels] = child
        return child

    def forget(self, *labels: str) -> None:
        """Drop one label set's series (a certificate no longer in the files): it is no longer exported."""
        child = self._children.pop(labels, None)
        if child is None:
            return
        if self._flushing is not None and child in self._flushing:
            self._flushing.remove(child)
        try:
            self.metric.remove(*labels)
        except KeyError:
            pass


class Metrics:
    """All gateway metrics on one registry (one per gateway, so tests stay apart)."""

    def __init__(self, registry: CollectorRegistry | None = None, *, process: bool = True) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        if process:
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
            GCCollector(registry=r)
        p = PREFIX
        # (name as scraped, type, labels, help): the README's metric table is made from it.
        self.catalogue: list[tuple[str, str, tuple[str, ...], str]] = [
            (p + "build_info", "gauge", ("version",), "Build information (always 1).")]
        # A gauge, not an Info: the same exposition (iso_gateway_build_info{version="..."} 1),
        # and it also works in multiprocess mode.
        Gauge(p + "build_info", "Build information (always 1).", ("version",), registry=r,
              multiprocess_mode="max").labels(__version__).set(1)

        # Children changed on the event loop: plain numbers, handed to prometheus-client by flush().
        self._flushing: list[_FastCounter] = []

        def counter(name: str, doc: str, labels: tuple[str, ...], fast: bool = True) -> _Cached:
            self.catalogue.append((p + name, "counter", labels, doc))
            return _Cached(Counter(p + name, doc, labels, registry=r), _FastCounter if fast else None, self._flushing)

        def gauge(name: str, doc: str, labels: tuple[str, ...], mode: str) -> _Cached:
            # mode: how several workers' values combine (multiprocess mode only); "live" forgets dead workers.
            self.catalogue.append((p + name, "gauge", labels, doc))
            return _Cached(Gauge(p + name, doc, labels, registry=r, multiprocess_mode=mode),  # type: ignore[arg-type]
                           _FastGauge, self._flushing)

        def histogram(name: str, doc: str, labels: tuple[str, ...], buckets: tuple[float, ...]) -> _Cached:
            self.catalogue.append((p + name, "histogram", labels, doc))
            return _Cached(Histogram(p + name, doc, labels, registry=r, buckets=buckets))

        # front end
        self.front_received = counter("front_messages_received_total", "Messages received from front ends.", ("listener", "mti"))
        self.front_sent = counter("front_messages_sent_total", "Messages sent to front ends.", ("listener", "mti", "rc"))
        self.rejections = counter("validation_rejections_total", "Requests answered by the gateway without reaching a switch: rule failures, no route, unknown BIN, no usable link.", ("listener", "reason", "rc"))
        self.decode_errors = counter("decode_errors_total", "Messages that did not decode or lost framing, by side (front, upstream) and listener or upstream name.", ("side", "name", "reason"))
        self.request_errors = counter("request_errors_total", "Front-end requests whose handling failed inside the gateway, by reason: internal_error (answered 96), format_error (a decode failed past the scan; answered 30), no_answer (not even a minimal response could be built).", ("listener", "reason"))
        self.mac_failures = counter("mac_failures_total", "Messages whose MAC (field 64 or 128) was missing, wrong or could not be checked, by side (front, upstream), listener or upstream name and reason (missing, bad, error): a front end's request is answered (63 by default) and never forwarded; a switch's answer is not trusted (the front end hears the timeout code and the transaction is reversed).", ("side", "name", "reason"))
        self.duplicates = counter("duplicates_total", "Repeated front-end requests recognised as duplicates.", ("listener",))
        self.connections_open = gauge("front_connections_open", "Front-end connections open.", ("listener",), "livesum")
        self.connections_total = counter("front_connections_total", "Front-end connections by outcome (accepted; refused: the listener full and every connection waiting for an answer; refused_per_source: max_connections_per_source open from that address).", ("listener", "outcome"))
        self.connections_closed = counter("front_connections_closed_total", "Front-end connections closed, by reason (peer_closed, idle_timeout, stalled_partial_frame, stalled_reader, frame_too_large, framing_lost, reset, shutdown, internal_error, evicted_idle: closed to make room when the listener was full; TLS listeners: tls_handshake_failed, tls_error).", ("listener", "reason"))
        self.frames_too_large = counter("frames_too_large_total", "Frames over the size limit (max_frame), by side and listener or upstream name.", ("side", "name"))
        self.request_latency = histogram("request_duration_seconds", "From a front-end request received to its answer sent (timeouts and dropped links included).", ("upstream", "mti"), LATENCY_BUCKETS)
        # upstream
        self.upstream_sent = counter("upstream_messages_sent_total", "Messages sent to switches.", ("upstream", "mti"))
        self.upstream_received = counter("upstream_messages_received_total", "Messages received from switches.", ("upstream", "mti", "rc"))
        self.upstream_latency = histogram("upstream_duration_seconds", "From a request sent to a switch to its response.", ("upstream", "mti"), LATENCY_BUCKETS)
        self.in_flight = gauge("requests_in_flight", "Requests sent to a switch and not answered yet.", ("upstream",), "livesum")
        self.timeouts = counter("timeouts_total", "Requests the switch did not answer in time.", ("upstream", "mti"))
        self.late_responses = counter("late_responses_total", "Responses that came after their request timed out.", ("upstream", "rc"))
        self.unmatched_responses = counter("unmatched_responses_total", "Responses nobody was waiting for.", ("upstream",))
        self.link_state = gauge("link_state", "Upstream connections in each state, per upstream and host.", ("upstream", "host", "state"), "livesum")
        self.link_not_answering = gauge("link_not_answering", "Upstream connections ready (connected, signed on) that left 3 requests in a row or an echo unanswered: not counted as ready by /readyz until the switch answers again.", ("upstream",), "livesum")
        self.reconnects = counter("link_reconnects_total", "Upstream connection attempts after the first.", ("upstream", "host"))
        self.connect_failures = counter("link_connect_failures_total", "Failed upstream connection attempts.", ("upstream", "host"))
        self.sign_ons = counter("sign_ons_total", "Sign-on attempts by result (ok, declined, timeout).", ("upstream", "result"))
        self.echo_rtt = histogram("echo_rtt_seconds", "Echo (0800/301) round-trip time.", ("upstream",), ECHO_BUCKETS)
        self.echo_missed = counter("echo_missed_total", "Echoes the switch did not answer in time.", ("upstream",))
        self.reversals = counter("reversals_total", "Reversals by outcome (queued, sent, repeated, acknowledged, parked, cancelled).", ("upstream", "outcome"))
        # The SAF lives in one store that every worker reports whole: workers' values are not added.
        self.saf_link_drops = counter("saf_link_drops_total", "Reversals in flight when a switch link dropped, by outcome: suspected (its next attempt goes alone, on a connection of its own), cleared (answered there), parked (that connection dropped too: parked for an operator).", ("upstream", "outcome"))
        self.saf_depth = gauge("saf_queue_depth", "Reversals waiting in the store-and-forward queue.", ("upstream",), "livemax")
        self.saf_oldest_age = gauge("saf_oldest_age_seconds", "Age of the oldest reversal waiting in the store-and-forward queue.", ("upstream",), "livemax")
        self.saf_parked = gauge("saf_parked", "Reversals parked (dead letters) after their retry budget, waiting for an operator.", ("upstream",), "livemax")
        # TLS (net/tls.py): reasons are a closed set (tls.REASONS); subject is a certificate's DN
        # from our own files (or a pinned switch's), never a peer's client certificate.
        self.tls_handshakes = counter(
            "tls_handshakes_total", "TLS handshakes completed, by side (listener: front ends; upstream: switch "
            "links) and listener or upstream name.", ("side", "name"))
        self.tls_handshake_failures = counter(
            "tls_handshake_failures_total", "TLS handshakes that failed, by side, name and reason (no_certificate, "
            "expired, not_yet_valid, unknown_ca, bad_name, bad_certificate, pin_mismatch, alert_..., "
            "protocol_version, no_shared_cipher, garbage, protocol, timeout, eof, internal: docs/tls.md §5).",
            ("side", "name", "reason"))
        self.tls_days_left = gauge(
            "tls_certificate_days_left", "Days before each certificate in a listener's or upstream's TLS files "
            "expires (negative: expired), and a pinned switch certificate's once seen; refreshed hourly and at "
            "reload.", ("side", "name", "subject"), "livemin")
        # The journal's worker thread counts these: thread-safe prometheus-client children.
        self.journal_writes = counter("journal_writes_total", "Journal records written, by kind.", ("kind",), fast=False)
        self.journal_commit_seconds = histogram("journal_commit_seconds", "Time of one journal group commit.", (), ECHO_BUCKETS)
        self.journal_errors = counter(
            "journal_errors_total", "Journal failures, by source (store, log, indexer, recovery, saf) and reason "
            "(disk_full, read_only, locked, io, corrupt, exited, other); each is retried.", ("source", "reason"),
            fast=False)
        # Per process, as readiness compares them: with several workers, the largest backlog.
        self.journal_log_segments = gauge(
            "journal_log_segments", "Write-ahead log segments closed and not yet written into SQLite (the indexer's "
            "backlog; it should stay near 0).", (), "livemax")
        self.journal_log_segments_bound = gauge(
            "journal_log_segments_bound", "The backlog of log segments past which /readyz fails "
            "([journal] max_log_segments).", (), "livemin")
        # A journal shared by several nodes (PostgreSQL): who is alive, and the dead whose work this node took.
        self.journal_nodes_live = gauge(
            "journal_nodes_live", "Gateway nodes with a live heartbeat in the shared PostgreSQL journal, as this node "
            "last read them (0 on SQLite).", (), "livemax")
        self.journal_node_takeovers = counter(
            "journal_node_takeovers_total", "Dead nodes (no heartbeat for node_ttl) whose owed reversals and in-doubt "
            "transactions this node took over.", ())
        self.journal_purged = counter(
            "journal_purged_total", "Journal rows cleaned by the purge, by kind (reversal_data: sealed card data "
            "erased; txn, saf: rows past the retention deleted).", ("kind",), fast=False)

    def flush(self) -> None:
        """Hand every fast child's change to prometheus-client. Call on the event loop thread
        (the gateway does every second, and before each scrape)."""
        for child in self._flushing:
            child.flush()

    def names(self) -> set[str]:
        """Every name this registry can expose: sample names (``_total``, ``_bucket``, ...), and histograms' own."""
        suffixes = {"counter": ("_total", "_created"), "histogram": ("", "_bucket", "_count", "_sum", "_created"),
                    "info": ("_info",), "summary": ("", "_count", "_sum", "_created")}
        out: set[str] = set()
        for family in self.registry.collect():
            out.update(family.name + suf for suf in suffixes.get(family.type, ("",)))
            out.update(sample.name for sample in family.samples)
        return out


def reference_markdown() -> str:
    """The README's metric table, made from the definitions above (a test keeps the two equal)."""
    lines = ["| metric | type | labels | meaning |", "|---|---|---|---|"]
    for name, kind, labels, doc in Metrics(process=False).catalogue:
        lines.append(f"| `{name}` | {kind} | {', '.join(labels)} | {doc} |")
    return "\n".join(lines) + "\n"


class _Nothing:
    """A metric child that records nothing."""

    __slots__ = ()

    def inc(self, amount: float = 1) -> None: ...

    def dec(self, amount: float = 1) -> None: ...

    def set(self, value: float) -> None: ...

    def observe(self, value: float) -> None: ...


_NOTHING = _Nothing()


class NullMetrics:
    """Metrics switched off: every attribute of ``Metrics``, and every call a no-op.

    For the benchmark's "metrics off" (what the hot path pays for metrics);
    a running daemon always has real metrics.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)

        def nothing(*labels: str) -> _Nothing:
            return _NOTHING

        setattr(self, name, nothing)  # found directly next time
        return nothing
