"""Prometheus metrics: every name the gateway exports, in one place.

Naming follows Prometheus conventions: one prefix (``iso_gateway_``), base
units (seconds, bytes), ``_total`` counters. Labels are bounded: listener,
upstream, host, MTI, response code, reason, state. A label never carries a PAN,
STAN, RRN, terminal or merchant id.

Label children are cached per label tuple so the hot path pays a dict lookup,
not prometheus-client's label resolution, per increment.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client import ProcessCollector, PlatformCollector

from . import __version__

# 1 ms .. 60 s: a loopback round trip is ~1 ms, a switch's own timeout is 15-30 s
# and the gateway's is at most 60 s (domain ref. 3.6).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0)
ECHO_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

LINK_STATES = ("disconnected", "connecting", "signing_on", "ready", "down")


class _Cached:
    """A metric with its label children cached by label values."""

    __slots__ = ("metric", "_children")

    def __init__(self, metric: Any) -> None:
        self.metric = metric
        self._children: dict[tuple[str, ...], Any] = {}

    def __call__(self, *labels: str) -> Any:
        if not labels:
            return self.metric  # a metric without labels is its own child
        child = self._children.get(labels)
        if child is None:
            child = self._children[labels] = self.metric.labels(*labels)
        return child


class Metrics:
    """All gateway metrics on one registry (one per gateway, so tests stay apart)."""

    def __init__(self, registry: CollectorRegistry | None = None, *, process: bool = True) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        if process:
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
        p = "iso_gateway_"
        Info(p + "build", "Build information.", registry=r).info({"version": __version__})

        def counter(name: str, doc: str, labels: tuple[str, ...]) -> _Cached:
            return _Cached(Counter(p + name, doc, labels, registry=r))

        def gauge(name: str, doc: str, labels: tuple[str, ...]) -> _Cached:
            return _Cached(Gauge(p + name, doc, labels, registry=r))

        def histogram(name: str, doc: str, labels: tuple[str, ...], buckets: tuple[float, ...]) -> _Cached:
            return _Cached(Histogram(p + name, doc, labels, registry=r, buckets=buckets))

        # front end
        self.front_received = counter("front_messages_received_total", "Messages received from front ends.", ("listener", "mti"))
        self.front_sent = counter("front_messages_sent_total", "Messages sent to front ends.", ("listener", "mti", "rc"))
        self.rejections = counter("validation_rejections_total", "Requests answered by the gateway without reaching a switch.", ("listener", "reason", "rc"))
        self.decode_errors = counter("decode_errors_total", "Messages that did not decode.", ("side", "name", "reason"))
        self.duplicates = counter("duplicates_total", "Repeated front-end requests recognised as duplicates.", ("listener",))
        self.connections_open = gauge("front_connections_open", "Front-end connections open.", ("listener",))
        self.connections_total = counter("front_connections_total", "Front-end connections by outcome (accepted, refused).", ("listener", "outcome"))
        self.connections_closed = counter("front_connections_closed_total", "Front-end connections closed, by reason.", ("listener", "reason"))
        self.frames_too_large = counter("frames_too_large_total", "Frames over the size limit.", ("side", "name"))
        self.request_latency = histogram("request_duration_seconds", "From a front-end request received to its answer sent.", ("upstream", "mti"), LATENCY_BUCKETS)
        # upstream
        self.upstream_sent = counter("upstream_messages_sent_total", "Messages sent to switches.", ("upstream", "mti"))
        self.upstream_received = counter("upstream_messages_received_total", "Messages received from switches.", ("upstream", "mti", "rc"))
        self.upstream_latency = histogram("upstream_duration_seconds", "From a request sent to a switch to its response.", ("upstream", "mti"), LATENCY_BUCKETS)
        self.in_flight = gauge("requests_in_flight", "Requests sent to a switch and not answered yet.", ("upstream",))
        self.timeouts = counter("timeouts_total", "Requests the switch did not answer in time.", ("upstream", "mti"))
        self.late_responses = counter("late_responses_total", "Responses that came after their request timed out.", ("upstream", "rc"))
        self.unmatched_responses = counter("unmatched_responses_total", "Responses nobody was waiting for.", ("upstream",))
        self.link_state = gauge("link_state", "1 for the state each upstream connection is in.", ("upstream", "host", "state"))
        self.reconnects = counter("link_reconnects_total", "Upstream connection attempts after the first.", ("upstream", "host"))
        self.connect_failures = counter("link_connect_failures_total", "Failed upstream connection attempts.", ("upstream", "host"))
        self.sign_ons = counter("sign_ons_total", "Sign-on attempts by result (ok, declined, timeout).", ("upstream", "result"))
        self.echo_rtt = histogram("echo_rtt_seconds", "Echo (0800/301) round-trip time.", ("upstream",), ECHO_BUCKETS)
        self.echo_missed = counter("echo_missed_total", "Echoes the switch did not answer in time.", ("upstream",))
        self.reversals = counter("reversals_total", "Reversals by outcome (queued, sent, repeated, acknowledged, parked, cancelled).", ("upstream", "outcome"))
        self.saf_depth = gauge("saf_queue_depth", "Reversals waiting in the store-and-forward queue.", ("upstream",))
        self.saf_oldest_age = gauge("saf_oldest_age_seconds", "Age of the oldest reversal waiting in the store-and-forward queue.", ("upstream",))
        self.saf_parked = gauge("saf_parked", "Reversals parked (dead letters) after their retry budget, waiting for an operator.", ("upstream",))
        self.journal_writes = counter("journal_writes_total", "Journal records written, by kind.", ("kind",))
        self.journal_commit_seconds = histogram("journal_commit_seconds", "Time of one journal group commit.", (), ECHO_BUCKETS)
        self.journal_errors = counter("journal_errors_total", "Journal operations that failed.", ())

    def set_link_state(self, upstream: str, host: str, state: str) -> None:
        for s in LINK_STATES:
            self.link_state(upstream, host, s).set(1 if s == state else 0)
