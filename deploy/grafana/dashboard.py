"""Writes deploy/grafana/iso-gateway.json, the Grafana dashboard for iso-gateway.

The dashboard is generated so that its ~30 panels stay consistent (one label
selector, one rate window, units) and so a test can hold it to the metrics the
gateway really exports. Change this file, run it, and commit both:

    python deploy/grafana/dashboard.py            # rewrite the JSON
    python deploy/grafana/dashboard.py --check    # exit 1 if the JSON is out of date

Import: Grafana > Dashboards > New > Import > upload iso-gateway.json, pick the
Prometheus data source. Or provision it from a file (see the README).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

OUT = Path(__file__).with_name("iso-gateway.json")

DS = {"type": "prometheus", "uid": "${datasource}"}
S = 'job=~"$job", instance=~"$instance"'  # every query's selector
UP = S + ', upstream=~"$upstream"'
LI = S + ', listener=~"$listener"'
W = "$__rate_interval"
AUTH_RESPONSES = 'mti=~"0110|0210"'
REQUESTS = 'mti!~"08.."'  # everything but network management (sign-on, echo)


def target(expr: str, legend: str = "", ref: str = "A") -> dict[str, Any]:
    return {"datasource": DS, "expr": expr, "legendFormat": legend or "__auto", "refId": ref, "range": True}


def quantiles(metric: str, selector: str, by: str) -> list[dict[str, Any]]:
    return [target(f"histogram_quantile({q}, sum by (le, {by}) (rate({metric}_bucket{{{selector}}}[{W}])))",
                   f"{name} {{{{{by}}}}}") for q, name in (("0.5", "p50"), ("0.9", "p90"), ("0.99", "p99"))]


class Layout:
    """Places panels left to right, 24 columns wide, in rows."""

    def __init__(self) -> None:
        self.panels: list[dict[str, Any]] = []
        self.x = 0
        self.y = 0
        self.row_height = 0
        self.next_id = 1

    def _id(self) -> int:
        self.next_id += 1
        return self.next_id - 1

    def row(self, title: str) -> None:
        if self.x:
            self.y += self.row_height
        self.panels.append({"type": "row", "title": title, "id": self._id(), "collapsed": False, "panels": [],
                            "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y}})
        self.y += 1
        self.x = 0
        self.row_height = 0

    def add(self, panel: dict[str, Any], w: int, h: int) -> None:
        if self.x + w > 24:
            self.y += self.row_height
            self.x = 0
            self.row_height = 0
        panel["id"] = self._id()
        panel["gridPos"] = {"h": h, "w": w, "x": self.x, "y": self.y}
        self.panels.append(panel)
        self.x += w
        self.row_height = max(self.row_height, h)


def timeseries(title: str, description: str, targets: list[dict[str, Any]], unit: str = "short", *,
               stack: bool = False, min_zero: bool = True) -> dict[str, Any]:
    for i, t in enumerate(targets):
        t["refId"] = chr(ord("A") + i)
    custom: dict[str, Any] = {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10 if not stack else 40,
                              "showPoints": "never", "spanNulls": False}
    if stack:
        custom["stacking"] = {"mode": "normal", "group": "A"}
    defaults: dict[str, Any] = {"unit": unit, "custom": custom}
    if min_zero:
        defaults["min"] = 0
    return {"type": "timeseries", "title": title, "description": description, "datasource": DS,
            "targets": targets, "fieldConfig": {"defaults": defaults, "overrides": []},
            "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                        "tooltip": {"mode": "multi", "sort": "desc"}}}


def stat(title: str, description: str, expr: str, unit: str = "short",
         thresholds: list[tuple[float | None, str]] | None = None) -> dict[str, Any]:
    steps = [{"color": c, "value": v} for v, c in (thresholds or [(None, "green")])]
    return {"type": "stat", "title": title, "description": description, "datasource": DS,
            "targets": [target(expr, "", "A")],
            "fieldConfig": {"defaults": {"unit": unit, "thresholds": {"mode": "absolute", "steps": steps}},
                            "overrides": []},
            "options": {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                        "colorMode": "background", "graphMode": "area", "textMode": "auto"}}


def variable(name: str, label: str, query: str, *, include_all: bool = True) -> dict[str, Any]:
    return {"name": name, "label": label, "type": "query", "datasource": DS,
            "query": {"query": query, "refId": f"{name}-var"}, "definition": query, "refresh": 2,
            "includeAll": include_all, "multi": include_all, "allValue": ".*",
            "current": {"selected": True, "text": ["All"], "value": ["$__all"]} if include_all else {},
            "sort": 1, "hide": 0, "options": []}


def build() -> dict[str, Any]:
    lay = Layout()
    lay.row("Overview")
    lay.add(stat("Requests/s", "Requests received from front ends (all listeners).",
                 f"sum(rate(iso_gateway_front_messages_received_total{{{S}, {REQUESTS}}}[{W}]))", "reqps"), 4, 4)
    lay.add(stat("Approved", "Share of authorization and financial answers with response code 00.",
                 f'sum(rate(iso_gateway_front_messages_sent_total{{{S}, {AUTH_RESPONSES}, rc="00"}}[{W}]))'
                 f" / sum(rate(iso_gateway_front_messages_sent_total{{{S}, {AUTH_RESPONSES}}}[{W}]))",
                 "percentunit", [(None, "red"), (0.5, "orange"), (0.8, "green")]), 4, 4)
    lay.add(stat("p99 latency", "End to end (request received to answer sent), timeouts included.",
                 f"histogram_quantile(0.99, sum by (le) (rate(iso_gateway_request_duration_seconds_bucket{{{S}}}[{W}])))",
                 "s", [(None, "green"), (2, "orange"), (5, "red")]), 4, 4)
    lay.add(stat("Upstreams down", "Upstreams (switches) with no ready connection. Their requests are answered 91.",
                 f"count(count by (upstream) (iso_gateway_link_state{{{S}}}))"
                 f' - (count(sum by (upstream) (iso_gateway_link_state{{{S}, state="ready"}}) > 0) or vector(0))',
                 "short", [(None, "green"), (1, "red")]), 4, 4)
    lay.add(stat("Reversals waiting", "Reversals in the store-and-forward queue, all upstreams.",
                 f"sum(max by (upstream) (iso_gateway_saf_queue_depth{{{S}}})) or vector(0)",
                 "short", [(None, "green"), (1, "orange"), (50, "red")]), 4, 4)
    lay.add(stat("Front-end connections", "Front-end connections open now.",
                 f"sum(iso_gateway_front_connections_open{{{S}}})"), 4, 4)

    lay.row("Traffic")
    lay.add(timeseries("Requests by listener and MTI", "Messages received from front ends.", [
        target(f"sum by (listener, mti) (rate(iso_gateway_front_messages_received_total{{{LI}}}[{W}]))",
               "{{listener}} {{mti}}")], "reqps"), 12, 8)
    lay.add(timeseries("Approvals vs declines", "What front ends were told, per second: approved by the switch, "
                       "declined by the switch, rejected by the gateway's own checks, and timed out (91).", [
        target(f'sum(rate(iso_gateway_front_messages_sent_total{{{LI}, {AUTH_RESPONSES}, rc="00"}}[{W}]))', "approved"),
        target(f'sum(rate(iso_gateway_upstream_messages_received_total{{{S}, {AUTH_RESPONSES}, rc!="00"}}[{W}]))',
               "declined by the switch"),
        target(f"sum(rate(iso_gateway_validation_rejections_total{{{LI}}}[{W}]))", "rejected by the gateway"),
        target(f'sum(rate(iso_gateway_timeouts_total{{{S}, mti=~"0100|0200"}}[{W}]))', "timed out"),
    ], "reqps", stack=True), 12, 8)
    lay.add(timeseries("Answers by response code", "Answers sent to front ends by DE 39.", [
        target(f"sum by (rc) (rate(iso_gateway_front_messages_sent_total{{{LI}, {REQUESTS}}}[{W}]))", "{{rc}}")],
        "reqps", stack=True), 12, 8)
    lay.add(timeseries("Gateway rejects by reason", "Requests answered by the gateway without reaching a switch: "
                       "validation rules, no route, unknown BIN, no usable link.", [
        target(f"sum by (listener, reason, rc) (rate(iso_gateway_validation_rejections_total{{{LI}}}[{W}]))",
               "{{listener}} {{reason}} ({{rc}})")], "reqps"), 12, 8)
    lay.add(timeseries("Messages to and from switches", "Per upstream and MTI, network management included.", [
        target(f"sum by (upstream, mti) (rate(iso_gateway_upstream_messages_sent_total{{{UP}}}[{W}]))",
               "sent {{upstream}} {{mti}}"),
        target(f"sum by (upstream, mti) (rate(iso_gateway_upstream_messages_received_total{{{UP}}}[{W}]))",
               "received {{upstream}} {{mti}}"),
    ], "reqps"), 24, 8)

    lay.row("Latency")
    lay.add(timeseries("End-to-end latency", "From a front-end request received to its answer sent, per upstream; "
                       "timeouts included.", quantiles("iso_gateway_request_duration_seconds", UP, "upstream"), "s"),
            12, 8)
    lay.add(timeseries("Switch latency", "From a request sent to a switch to its response.",
                       quantiles("iso_gateway_upstream_duration_seconds", UP, "upstream"), "s"), 12, 8)
    lay.add(timeseries("Echo round trip", "0800/301 echo to its 0810, per upstream.",
                       quantiles("iso_gateway_echo_rtt_seconds", UP, "upstream"), "s"), 12, 8)
    lay.add(timeseries("Requests in flight", "Sent to a switch and not answered yet.", [
        target(f"sum by (upstream) (iso_gateway_requests_in_flight{{{UP}}})", "{{upstream}}")]), 12, 8)

    lay.row("Timeouts, reversals and store-and-forward")
    lay.add(timeseries("Timeouts, late and unmatched responses", "Timeouts were answered 91 and queue a reversal; "
                       "late responses came after their timeout and were not forwarded.", [
        target(f"sum by (upstream) (rate(iso_gateway_timeouts_total{{{UP}}}[{W}]))", "timeouts {{upstream}}"),
        target(f"sum by (upstream) (rate(iso_gateway_late_responses_total{{{UP}}}[{W}]))", "late {{upstream}}"),
        target(f"sum by (upstream) (rate(iso_gateway_unmatched_responses_total{{{UP}}}[{W}]))",
               "unmatched {{upstream}}"),
    ], "reqps"), 12, 8)
    lay.add(timeseries("Timeout ratio", "Timeouts / requests sent, per upstream (alert: above 5% for 5 minutes).", [
        target(f"sum by (upstream) (rate(iso_gateway_timeouts_total{{{UP}, {REQUESTS}}}[{W}]))"
               f" / sum by (upstream) (rate(iso_gateway_upstream_messages_sent_total{{{UP}, {REQUESTS}}}[{W}]))",
               "{{upstream}}")], "percentunit"), 12, 8)
    lay.add(timeseries("Reversals by outcome", "queued, sent, repeated (0421), acknowledged, parked, cancelled;"
                       " and those in flight at a link drop: suspected (sent again alone), cleared, parked.", [
        target(f"sum by (upstream, outcome) (rate(iso_gateway_reversals_total{{{UP}}}[{W}]))",
               "{{upstream}} {{outcome}}"),
        target(f"sum by (upstream, outcome) (rate(iso_gateway_saf_link_drops_total{{{UP}}}[{W}]))",
               "{{upstream}} link drop: {{outcome}}")], "ops"), 8, 8)
    lay.add(timeseries("Store-and-forward queue", "Reversals waiting, and parked after their retry budget.", [
        target(f"max by (upstream) (iso_gateway_saf_queue_depth{{{UP}}})", "waiting {{upstream}}"),
        target(f"max by (upstream) (iso_gateway_saf_parked{{{UP}}})", "parked {{upstream}}"),
    ]), 8, 8)
    lay.add(timeseries("Oldest reversal waiting", "Age of the oldest queued reversal (alert: over 15 minutes).", [
        target(f"max by (upstream) (iso_gateway_saf_oldest_age_seconds{{{UP}}})", "{{upstream}}")], "s"), 8, 8)

    lay.row("Upstream links")
    lay.add(timeseries("Connections by state", "Upstream connections per host and state (ready carries traffic).", [
        target(f"sum by (upstream, host, state) (iso_gateway_link_state{{{UP}}})",
               "{{upstream}} {{host}} {{state}}")]), 12, 8)
    lay.add(timeseries("Reconnects and connect failures", "Per upstream and host.", [
        target(f"sum by (upstream, host) (increase(iso_gateway_link_reconnects_total{{{UP}}}[{W}]))",
               "reconnects {{upstream}} {{host}}"),
        target(f"sum by (upstream, host) (increase(iso_gateway_link_connect_failures_total{{{UP}}}[{W}]))",
               "connect failures {{upstream}} {{host}}"),
    ]), 12, 8)
    lay.add(timeseries("Sign-ons by result", "0800/001 sign-on results: ok, declined, timeout.", [
        target(f"sum by (upstream, result) (increase(iso_gateway_sign_ons_total{{{UP}}}[{W}]))",
               "{{upstream}} {{result}}")]), 12, 8)
    lay.add(timeseries("Missed echoes", "Echoes the switch did not answer in time; echo_misses in a row reconnect.", [
        target(f"sum by (upstream) (increase(iso_gateway_echo_missed_total{{{UP}}}[{W}]))", "{{upstream}}")]),
        12, 8)

    lay.row("Front-end connections")
    lay.add(timeseries("Open connections", "Per listener.", [
        target(f"sum by (listener) (iso_gateway_front_connections_open{{{LI}}})", "{{listener}}")]), 8, 8)
    lay.add(timeseries("Connections accepted and refused", "Refused: over max_connections.", [
        target(f"sum by (listener, outcome) (rate(iso_gateway_front_connections_total{{{LI}}}[{W}]))",
               "{{listener}} {{outcome}}")], "cps"), 8, 8)
    lay.add(timeseries("Connections closed by reason", "peer_closed, idle_timeout, stalled_partial_frame "
                       "(stalled clients dropped), stalled_reader, frame_too_large, framing_lost, reset, shutdown.", [
        target(f"sum by (listener, reason) (rate(iso_gateway_front_connections_closed_total{{{LI}}}[{W}]))",
               "{{listener}} {{reason}}")], "cps"), 8, 8)
    lay.add(timeseries("Decode errors and oversized frames", "Per side (front, upstream) and listener or upstream.", [
        target(f"sum by (side, name, reason) (rate(iso_gateway_decode_errors_total{{{S}}}[{W}]))",
               "{{side}} {{name}} {{reason}}"),
        target(f"sum by (side, name) (rate(iso_gateway_frames_too_large_total{{{S}}}[{W}]))",
               "{{side}} {{name}} too large"),
        target(f"sum by (listener) (rate(iso_gateway_duplicates_total{{{LI}}}[{W}]))", "{{listener}} duplicates"),
    ], "ops"), 24, 8)

    lay.row("Process and journal")
    lay.add(timeseries("CPU", "Gateway process CPU, in cores.", [
        target(f"rate(process_cpu_seconds_total{{{S}}}[{W}])", "{{instance}}")], "short"), 8, 8)
    lay.add(timeseries("Resident memory", "", [
        target(f"process_resident_memory_bytes{{{S}}}", "{{instance}}")], "bytes"), 8, 8)
    lay.add(timeseries("Journal", "Group-commit time (p99), journal failures by source and reason, and log "
                       "segments waiting for the indexer (the write-ahead log's backlog) beside the bound past "
                       "which /readyz fails.", [
        target(f"histogram_quantile(0.99, sum by (le) (rate(iso_gateway_journal_commit_seconds_bucket{{{S}}}[{W}])))",
               "commit p99"),
        target(f"sum by (source, reason) (rate(iso_gateway_journal_errors_total{{{S}}}[{W}]))",
               "{{source}} {{reason}} errors/s"),
        target(f"max(iso_gateway_journal_log_segments{{{S}}})", "segments waiting"),
        target(f"min(iso_gateway_journal_log_segments_bound{{{S}}})", "segments bound"),
    ], "s"), 8, 8)

    lay.row("Security and nodes")
    lay.add(timeseries("TLS handshakes failed", "Per side (listener, upstream), name and reason: no_certificate, "
                       "expired, unknown_ca, bad_name, pin_mismatch, garbage, timeout...", [
        target(f"sum by (side, name, reason) (rate(iso_gateway_tls_handshake_failures_total{{{S}}}[{W}]))",
               "{{side}} {{name}} {{reason}}")], "ops"), 8, 8)
    lay.add(timeseries("Certificates: days left", "Days to expiry of every certificate in use (alerts: under 30 "
                       "and 7 days).", [
        target(f"min by (side, name, subject) (iso_gateway_tls_certificate_days_left{{{S}}})",
               "{{side}} {{name}} {{subject}}")], "d"), 8, 8)
    lay.add(timeseries("MAC failures", "Messages whose MAC was missing, wrong or not checkable, and refused key "
                       "changes: a front end's request answered 63, a switch's answer not trusted (91, reversed).", [
        target(f"sum by (side, name, reason) (rate(iso_gateway_mac_failures_total{{{S}}}[{W}]))",
               "{{side}} {{name}} {{reason}}")], "ops"), 8, 8)
    lay.add(timeseries("Nodes of the shared journal", "Gateway nodes with a live heartbeat in the PostgreSQL "
                       "journal, and take-overs of dead nodes' work (alerts: fewer nodes, a take-over).", [
        target(f"max(iso_gateway_journal_nodes_live{{{S}}})", "nodes alive"),
        target(f"sum(increase(iso_gateway_journal_node_takeovers_total{{{S}}}[{W}]))", "take-overs"),
    ]), 24, 8)

    return {
        "title": "iso-gateway",
        "uid": "iso-gateway",
        "description": "ISO 8583 gateway: traffic, approvals, latency, timeouts, reversals, links and connections.",
        "tags": ["iso-gateway", "iso8583", "payments"],
        "editable": True,
        "graphTooltip": 1,
        "refresh": "30s",
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-3h", "to": "now"},
        "timepicker": {},
        "timezone": "",
        "annotations": {"list": []},
        "links": [],
        "templating": {"list": [
            {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
             "current": {}, "hide": 0, "refresh": 1, "options": []},
            variable("job", "Job", "label_values(iso_gateway_build_info, job)"),
            variable("instance", "Instance", 'label_values(iso_gateway_build_info{job=~"$job"}, instance)'),
            variable("upstream", "Upstream", 'label_values(iso_gateway_link_state{job=~"$job", instance=~"$instance"}, upstream)'),
            variable("listener", "Listener", 'label_values(iso_gateway_front_connections_total{job=~"$job", instance=~"$instance"}, listener)'),
        ]},
        "panels": lay.panels,
    }


def render() -> str:
    return json.dumps(build(), indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if not OUT.is_file() or OUT.read_text(encoding="utf-8") != text:
            print(f"{OUT} is out of date: run python {Path(__file__).as_posix()}", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
