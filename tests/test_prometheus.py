"""The deploy/ files against the real thing: promtool, a real Prometheus server, the gateway's own metrics.

promtool and prometheus come from Debian's ``prometheus`` package, which
``.ci/run`` installs when they are missing; without them these tests skip and
say so. The Prometheus server a test starts listens on 127.0.0.1, scrapes only
the gateway under test on 127.0.0.1, keeps its data in the test's temporary
folder and is killed when the test ends.
"""

from __future__ import annotations

import json
import re
import runpy
import shutil
import subprocess
import urllib.parse
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator

import pytest
import trio
import yaml

from conftest import wait_for
from realtime import poll_real
from iso_gateway.metrics import Metrics
from test_observability import endpoint, fetch, free_port, get

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
SCRAPE_CONFIG = PROMETHEUS_DIR / "prometheus.yml"
ALERTS = PROMETHEUS_DIR / "alerts.yml"
GRAFANA_DIR = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA_DIR / "iso-gateway.json"

METRIC_NAME = re.compile(r"\b((?:iso_gateway|process|python)_[a-z0-9_]+)")


def binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed: install the Debian package 'prometheus' (.ci/run does) to run this test")
    return path


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([binary("promtool"), *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def dashboard_exprs() -> list[str]:
    board = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in board["panels"] for t in panel.get("targets", [])]
    exprs += [v["query"]["query"] for v in board["templating"]["list"] if isinstance(v.get("query"), dict)]
    return exprs


# --------------------------------------------------------------------------- the files themselves


def test_promtool_accepts_the_scrape_config_and_the_alert_rules():
    checked = promtool("check", "config", str(SCRAPE_CONFIG))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS" in checked.stdout and "1 rule files found" in checked.stdout
    rules = promtool("check", "rules", str(ALERTS))
    assert rules.returncode == 0, rules.stdout + rules.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in rules.stdout


def test_every_alert_has_a_severity_a_summary_a_description_and_runbook_notes():
    rules = alert_rules()
    assert {r["alert"] for r in rules} >= {
        "IsoGatewayNoUpstreamReady", "IsoGatewayUpstreamDown", "IsoGatewayLinkDown", "IsoGatewayTimeoutRatioHigh",
        "IsoGatewayLatencyP99High", "IsoGatewayDecodeErrorsSpike", "IsoGatewaySafBacklog",
        "IsoGatewaySafOldestReversalAging", "IsoGatewaySafReversalsParked", "IsoGatewayDown",
        "IsoGatewayJournalIndexerBehind", "IsoGatewayReversalDropsLink"}
    for rule in rules:
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        notes = rule["annotations"]
        assert {"summary", "description", "runbook"} <= notes.keys(), rule["alert"]
        assert len(notes["runbook"]) > 100, rule["alert"]


def test_every_metric_name_in_deploy_files_is_one_the_gateway_exports():
    exported = Metrics().names()
    for path in [SCRAPE_CONFIG, ALERTS, DASHBOARD]:
        used = set(METRIC_NAME.findall(path.read_text()))
        assert used or path == SCRAPE_CONFIG, path
        assert used <= exported, f"{path.name} names metrics the gateway does not export: {sorted(used - exported)}"


def test_the_dashboard_json_is_what_its_generator_writes_and_shows_what_sre_needs():
    generator = runpy.run_path(str(GRAFANA_DIR / "dashboard.py"))
    assert DASHBOARD.read_text() == generator["render"](), "run python deploy/grafana/dashboard.py and commit the JSON"
    board = json.loads(DASHBOARD.read_text())
    panels = board["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    titles = " / ".join(p["title"] for p in panels).lower()
    for topic in ("requests", "approvals vs declines", "latency", "timeouts", "reversals", "store-and-forward",
                  "connections by state", "open connections", "sign-ons"):
        assert topic in titles, topic
    for p in panels:
        for t in p.get("targets", []):
            assert t["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        if p["type"] != "row":
            assert 0 <= p["gridPos"]["x"] and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24


# --------------------------------------------------------------------------- alert rule unit tests


def _series(labels: dict[str, str], values: str, name: str) -> dict[str, str]:
    base = {"instance": "gw1:9108", "job": "iso-gateway", **labels}
    return {"series": name + "{" + ", ".join(f'{k}="{v}"' for k, v in base.items()) + "}", "values": values}


def _fires(at: str, alert: str, *label_sets: dict[str, str]) -> dict[str, Any]:
    return {"eval_time": at, "alertname": alert,
            "exp_alerts": [{"exp_labels": {"instance": "gw1:9108", "job": "iso-gateway", **labels}}
                           for labels in label_sets]}


def test_each_alert_fires_on_the_series_that_should_fire_it_and_only_after_its_for(tmp_path):
    # promtool compares annotations exactly; these tests are about expressions and timing,
    # so they run against a copy of the rules without annotations.
    rules = yaml.safe_load(ALERTS.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(rules))
    cmi = {"upstream": "cmi"}
    link = "iso_gateway_link_state"
    a, b = {"host": "10.1.1.1:9583"}, {"host": "10.1.1.2:9583"}
    crit, warn = {"severity": "critical"}, {"severity": "warning"}
    tests = [
        {  # both connections to the only switch go down at 5m
            "interval": "1m",
            "input_series": [
                _series({**cmi, **a, "state": "ready"}, "2x4 0x20", link),
                _series({**cmi, **a, "state": "down"}, "0x4 2x20", link),
                _series({}, "1x25", "up"),
            ],
            "alert_rule_test": [
                _fires("4m", "IsoGatewayNoUpstreamReady"),
                _fires("5m", "IsoGatewayNoUpstreamReady"),  # pending: for 30s
                _fires("6m", "IsoGatewayNoUpstreamReady", crit),
                _fires("6m", "IsoGatewayUpstreamDown", {**cmi, **crit}),
                _fires("6m", "IsoGatewayLinkDown"),  # pending: for 2m
                _fires("8m", "IsoGatewayLinkDown", {**cmi, **a, **warn}),
                _fires("8m", "IsoGatewayDown"),
            ],
        },
        {  # never connected at all: there is no "ready" series, and that is still no upstream ready
            "interval": "1m",
            "input_series": [_series({**cmi, **a, "state": "connecting"}, "1x10", link)],
            "alert_rule_test": [_fires("2m", "IsoGatewayNoUpstreamReady", crit)],
        },
        {  # two switches, one down: that upstream is down, the gateway still has one ready
            "interval": "1m",
            "input_series": [
                _series({**cmi, **a, "state": "ready"}, "1x10", link),
                _series({"upstream": "acq", **b, "state": "ready"}, "0x10", link),
                _series({"upstream": "acq", **b, "state": "connecting"}, "1x10", link),
            ],
            "alert_rule_test": [
                _fires("5m", "IsoGatewayNoUpstreamReady"),
                _fires("5m", "IsoGatewayUpstreamDown", {"upstream": "acq", **crit}),
                _fires("5m", "IsoGatewayLinkDown", {"upstream": "acq", **b, **warn}),
            ],
        },
        {  # 10% of requests time out (5% is the line); network management does not count
            "interval": "1m",
            "input_series": [
                _series({**cmi, "mti": "0100"}, "0+600x30", "iso_gateway_upstream_messages_sent_total"),
                _series({**cmi, "mti": "0800"}, "0+6000x30", "iso_gateway_upstream_messages_sent_total"),
                _series({**cmi, "mti": "0100"}, "0+60x30", "iso_gateway_timeouts_total"),
            ],
            "alert_rule_test": [
                _fires("3m", "IsoGatewayTimeoutRatioHigh"),  # pending: for 5m
                _fires("12m", "IsoGatewayTimeoutRatioHigh", {**cmi, **crit}),
            ],
        },
        {  # 1% time out: below the line
            "interval": "1m",
            "input_series": [
                _series({**cmi, "mti": "0100"}, "0+600x30", "iso_gateway_upstream_messages_sent_total"),
                _series({**cmi, "mti": "0100"}, "0+6x30", "iso_gateway_timeouts_total"),
            ],
            "alert_rule_test": [_fires("20m", "IsoGatewayTimeoutRatioHigh")],
        },
        {  # every request takes between 5 and 10 s
            "interval": "1m",
            "input_series": [
                _series({**cmi, "mti": "0100", "le": "5.0"}, "0x30", "iso_gateway_request_duration_seconds_bucket"),
                _series({**cmi, "mti": "0100", "le": "10.0"}, "0+100x30", "iso_gateway_request_duration_seconds_bucket"),
                _series({**cmi, "mti": "0100", "le": "+Inf"}, "0+100x30", "iso_gateway_request_duration_seconds_bucket"),
            ],
            "alert_rule_test": [
                _fires("8m", "IsoGatewayLatencyP99High"),
                _fires("20m", "IsoGatewayLatencyP99High", {**cmi, **warn}),
            ],
        },
        {  # 5 undecodable frames a minute from one listener
            "interval": "1m",
            "input_series": [_series({"side": "front", "name": "ecom", "reason": "framing"}, "0+5x20",
                                     "iso_gateway_decode_errors_total")],
            "alert_rule_test": [
                _fires("10m", "IsoGatewayDecodeErrorsSpike", {"side": "front", "name": "ecom", **warn})],
        },
        {  # a backlog that grows, an old reversal, a parked one
            "interval": "1m",
            "input_series": [
                _series(cmi, "0+5x30", "iso_gateway_saf_queue_depth"),
                _series(cmi, "0+120x30", "iso_gateway_saf_oldest_age_seconds"),
                _series(cmi, "0x5 1x20", "iso_gateway_saf_parked"),
            ],
            "alert_rule_test": [
                _fires("12m", "IsoGatewaySafBacklog"),  # 60 waiting, but not for 10 minutes yet
                _fires("25m", "IsoGatewaySafBacklog", {**cmi, **warn}),
                _fires("9m", "IsoGatewaySafOldestReversalAging"),
                _fires("14m", "IsoGatewaySafOldestReversalAging", {**cmi, **crit}),
                _fires("5m", "IsoGatewaySafReversalsParked"),
                _fires("7m", "IsoGatewaySafReversalsParked", {**cmi, **crit}),
            ],
        },
        {  # reversals in flight at link drops: suspected and cleared ones do not page; one parked does, then stops
            "interval": "1m",
            "input_series": [
                _series({**cmi, "outcome": "suspected"}, "0 3 5 5 5 5 5 5 5 5 5 5 5 5 5 5 5 5 5 5 5 5 5 5 5 5",
                        "iso_gateway_saf_link_drops_total"),
                _series({**cmi, "outcome": "cleared"}, "0 2 4 4 4 4 4 4 4 4 4 4 4 4 4 4 4 4 4 4 4 4 4 4 4 4",
                        "iso_gateway_saf_link_drops_total"),
                _series({**cmi, "outcome": "parked"}, "0 0 0 0 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1",
                        "iso_gateway_saf_link_drops_total"),
            ],
            "alert_rule_test": [
                _fires("3m", "IsoGatewayReversalDropsLink"),
                _fires("5m", "IsoGatewayReversalDropsLink", {**cmi, **crit}),
                _fires("25m", "IsoGatewayReversalDropsLink"),  # 15 minutes without another
            ],
        },
        {  # the journal's indexer falls behind its configured bound, then catches up
            "interval": "1m",
            "input_series": [_series({}, "0 0 30 60 90 120 0 0 0", "iso_gateway_journal_log_segments"),
                             _series({}, "50x8", "iso_gateway_journal_log_segments_bound")],
            "alert_rule_test": [
                _fires("2m", "IsoGatewayJournalIndexerBehind"),  # 30 waiting: within the bound of 50
                _fires("3m", "IsoGatewayJournalIndexerBehind"),  # past it, but not for a minute yet
                _fires("4m", "IsoGatewayJournalIndexerBehind", warn),
                _fires("7m", "IsoGatewayJournalIndexerBehind"),  # caught up
            ],
        },
        {  # the alert follows the configured bound: a larger one keeps quiet on the same backlog
            "interval": "1m",
            "input_series": [_series({}, "0 60 60 60 60 60", "iso_gateway_journal_log_segments"),
                             _series({}, "100x5", "iso_gateway_journal_log_segments_bound")],
            "alert_rule_test": [_fires("5m", "IsoGatewayJournalIndexerBehind")],
        },
        {  # the store fails (a full disk) for a while, then works again
            "interval": "1m",
            "input_series": [_series({"source": "store", "reason": "disk_full"}, "0 0 30 60 90 120 150 180 210 240"
                                     " 270 300 300 300 300 300 300 300", "iso_gateway_journal_errors_total")],
            "alert_rule_test": [
                _fires("4m", "IsoGatewayJournalFailing"),  # failing, but not for 5 minutes yet
                _fires("8m", "IsoGatewayJournalFailing", {"source": "store", "reason": "disk_full", **crit}),
                _fires("17m", "IsoGatewayJournalFailing"),  # resumed
            ],
        },
        {  # a pair: both nodes alive, one dies at 10m and the survivor takes its work over at 11m
            "interval": "1m",
            "input_series": [_series({}, "2x9 1x20", "iso_gateway_journal_nodes_live"),
                             _series({}, "0x10 1x20", "iso_gateway_journal_node_takeovers_total")],
            "alert_rule_test": [
                _fires("9m", "IsoGatewayFewerNodes"),
                _fires("12m", "IsoGatewayFewerNodes"),  # pending: for 5m
                {"eval_time": "16m", "alertname": "IsoGatewayFewerNodes",  # per job: the cluster, not one node
                 "exp_alerts": [{"exp_labels": {"job": "iso-gateway", **warn}}]},
                _fires("9m", "IsoGatewayNodeTakenOver"),
                _fires("12m", "IsoGatewayNodeTakenOver", warn),
                _fires("25m", "IsoGatewayNodeTakenOver"),  # over 10 minutes ago
            ],
        },
    ]
    spec = tmp_path / "alerts_test.yml"
    spec.write_text(yaml.safe_dump({"rule_files": ["alerts.yml"], "evaluation_interval": "15s", "tests": tests}))
    result = promtool("test", "rules", str(spec), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


# --------------------------------------------------------------------------- a real Prometheus server


@asynccontextmanager
async def prometheus_server(folder: Path, target_port: int, rules: Path) -> AsyncIterator[str]:
    """A Prometheus server on 127.0.0.1 scraping 127.0.0.1:target_port every second; killed on exit."""
    exe = binary("prometheus")
    port = free_port()
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(rules)],
        "scrape_configs": [{"job_name": "iso-gateway", "static_configs": [{"targets": [f"127.0.0.1:{target_port}"]}]}],
    }
    (folder / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
    log = (folder / "prometheus.log").open("wb")
    proc = await trio.lowlevel.open_process(
        [exe, f"--config.file={folder / 'prometheus.yml'}", f"--storage.tsdb.path={folder / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    # Prometheus and its scrapes (every second) run on the machine's clock: looked at until they show.
    async def ready() -> bool:
        try:
            return (await get(url + "/-/ready"))[0] == 200
        except OSError:
            return False

    try:
        await poll_real(lambda: proc.returncode is not None or ready(), lambda up: up is True, 30)
        assert proc.returncode is None and (await get(url + "/-/ready"))[0] == 200, \
            (folder / "prometheus.log").read_text(errors="replace")[-2000:]
        yield url
    finally:
        with trio.CancelScope(shield=True):
            if proc.returncode is None:
                proc.terminate()
                with trio.move_on_after(10):
                    await proc.wait()
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            log.close()


def query(url: str, promql: str) -> list[dict[str, Any]]:
    status, _, body = fetch(f"{url}/api/v1/query?query={urllib.parse.quote(promql)}")
    doc = json.loads(body)
    assert status == 200 and doc["status"] == "success", (promql, body)
    return doc["data"]["result"]


def scalar(url: str, promql: str) -> float | None:
    result = query(url, promql)
    return float(result[0]["value"][1]) if result else None


async def until(url: str, promql: str, expected: float, what: str, timeout: float = 30) -> None:
    """Wait (bounded) until the query's single value equals ``expected``."""
    seen = await poll_real(lambda: trio.to_thread.run_sync(scalar, url, promql), lambda v: v == expected, timeout,
                           look_every=0.2)
    assert seen == expected, f"{what}: {promql} = {seen}, expected {expected} (waited {timeout} s)"


def firing(url: str, alert: str) -> list[dict[str, Any]]:
    status, _, body = fetch(f"{url}/api/v1/alerts")
    assert status == 200
    return [a for a in json.loads(body)["data"]["alerts"] if a["labels"]["alertname"] == alert and a["state"] == "firing"]


@pytest.mark.slow
async def test_a_real_prometheus_scrapes_the_gateway_and_fires_an_alert_when_the_switch_goes_down(harness, tmp_path):
    binary("prometheus")
    # The deploy rules with every "for" cut to 1 s, so an alert fires within seconds.
    rules = yaml.safe_load(ALERTS.read_text())
    for group in rules["groups"]:
        group["interval"] = "1s"
        for rule in group["rules"]:
            rule["for"] = "1s"
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(rules))

    await harness.start_switch()
    gw = await harness.start_gateway(routes=[{"name": "all", "upstream": "cmi", "timeout": 0.5}])
    async with endpoint(gw) as gateway_url:
        port = int(gateway_url.rsplit(":", 1)[1])
        async with prometheus_server(tmp_path, port, tmp_path / "alerts.yml") as prom:
            client = await harness.client()
            for _ in range(20):
                assert (await client.request(harness.auth(15000), timeout=3))["39"] == "00"
            for _ in range(3):
                assert (await client.request(harness.auth(15051), timeout=3))["39"] == "51"
            assert (await client.request({**harness.auth(), "14": "2001"}, timeout=3))["39"] == "54"
            assert (await client.request(harness.auth(15097), timeout=3))["39"] == "91"

            sent = 'iso_gateway_front_messages_sent_total{job="iso-gateway", listener="ecom", mti="0110", rc="%s"}'
            await until(prom, sent % "00", 20, "approvals")
            await until(prom, sent % "51", 3, "declines")
            await until(prom, sent % "54", 1, "expired-card reject")
            await until(prom, sent % "91", 1, "timeout answer")
            await until(prom, 'sum(iso_gateway_timeouts_total{upstream="cmi"})', 1, "timeouts")
            await until(prom, 'sum(iso_gateway_validation_rejections_total{listener="ecom"})', 1, "rejections")
            await until(prom, 'iso_gateway_request_duration_seconds_count{upstream="cmi", mti="0100"}', 24, "latency")
            assert await trio.to_thread.run_sync(scalar, prom, 'up{job="iso-gateway"}') == 1
            assert await trio.to_thread.run_sync(
                scalar, prom, 'sum(iso_gateway_link_state{upstream="cmi", state="ready"})') == 1
            assert await trio.to_thread.run_sync(firing, prom, "IsoGatewayNoUpstreamReady") == []

            # Every dashboard query and variable is valid PromQL to this server.
            grafana_vars = {"$__rate_interval": "1m", "$job": ".*", "$instance": ".*", "$upstream": ".*",
                            "$listener": ".*"}
            for expr in dashboard_exprs():
                if expr.startswith("label_values("):  # a Grafana function: check the selector inside it
                    expr = "count(" + expr[len("label_values("):].rsplit(",", 1)[0] + ")"
                for var, replacement in grafana_vars.items():
                    expr = expr.replace(var, replacement)
                await trio.to_thread.run_sync(query, prom, expr)

            harness.stop_switch()
            await wait_for(lambda: not gw.upstreams["cmi"].ready, 5, "link down")
            alerts = await poll_real(lambda: trio.to_thread.run_sync(firing, prom, "IsoGatewayNoUpstreamReady"), bool, 30,
                                     look_every=0.2)
            assert alerts, "IsoGatewayNoUpstreamReady never fired"
            assert alerts[0]["labels"]["severity"] == "critical"
            assert alerts[0]["annotations"]["summary"] == f"iso-gateway 127.0.0.1:{port} has no upstream link ready"
            assert await trio.to_thread.run_sync(firing, prom, "IsoGatewayUpstreamDown")
            status, _, body = await get(gateway_url + "/readyz")
            assert status == 503 and "no upstream link is ready" in body

