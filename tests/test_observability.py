"""Observability: /metrics, /healthz, /readyz served over real HTTP on 127.0.0.1, and the logs.

Known traffic goes through a gateway to the switch simulator (whose answer is
chosen by the last two digits of DE 4) and exactly those numbers are read back
from an HTTP scrape, parsed with prometheus-client's own parser.
"""

from __future__ import annotations

import json
import logging
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from contextlib import asynccontextmanager
from pathlib import Path
from typing import AsyncIterator

import trio
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families

from conftest import DAEMON_LOG_FILES, OTHER_PANS, TEST_PAN, pans_in, wait_for
from realtime import poll_real
from iso_gateway import __version__
from iso_gateway.gateway import Gateway
from iso_gateway.net.http import start_server
from iso_gateway.sim.integrity import free_port
from iso_gateway.logs import JsonFormatter, MaskingFormatter, TEXT_FORMAT
from iso_gateway.metrics import Metrics, NullMetrics, reference_markdown
from iso_gateway.sim.client import FrontEndClient, sample_auth
from iso_gateway.sim.switch import SwitchSimulator

OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


# --------------------------------------------------------------------------- helpers


@asynccontextmanager
async def endpoint(gateway: Gateway, deadline: float = 0.5) -> AsyncIterator[str]:
    """The gateway's observability endpoint on a free 127.0.0.1 port; yields its base URL."""
    server = start_server("127.0.0.1", 0, gateway.metrics.registry, gateway.readiness, deadline=deadline,
                          before_scrape=gateway.metrics.flush)
    try:
        yield server.url
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(server.close)


def fetch(url: str, accept: str | None = None) -> tuple[int, str, str]:
    """(status, content type, body) of a GET; only ever 127.0.0.1."""
    assert url.startswith("http://127.0.0.1:"), url
    request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, resp.headers.get("Content-Type", ""), resp.read().decode("utf-8")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type", ""), exc.read().decode("utf-8")


async def get(url: str, accept: str | None = None) -> tuple[int, str, str]:
    return await trio.to_thread.run_sync(fetch, url, accept)


def parse(text: str) -> Samples:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


async def scrape(base_url: str) -> Samples:
    status, content_type, body = await get(base_url + "/metrics")
    assert status == 200 and content_type.startswith("text/plain"), (status, content_type)
    return parse(body)


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sample with exactly these labels; 0 when absent (a counter nobody has touched)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum of every sample of ``name`` whose labels include these."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


# --------------------------------------------------------------------------- /metrics


async def test_known_traffic_is_read_back_exactly_from_metrics(harness):
    await harness.start_switch()
    gw = await harness.start_gateway(routes=[{"name": "all", "upstream": "cmi", "timeout": 0.5}],
                                     upstream={"saf_first_delay": 0.0})
    async with endpoint(gw) as url:
        client = await harness.client()
        for _ in range(100):
            assert (await client.request(harness.auth(15000), timeout=3))["39"] == "00"
        for _ in range(7):
            assert (await client.request(harness.auth(15051), timeout=3))["39"] == "51"
        rejects = {"14": {"2": TEST_PAN[:-1] + "8"}, "54": {"14": "2001"}, "13": {"4": "000000000000"}}
        for code, change in rejects.items():
            assert (await client.request({**harness.auth(), **change}, timeout=3))["39"] == code
        timed_out: list[str] = []

        async def one_timeout() -> None:
            timed_out.append((await client.request(harness.auth(15097), timeout=3))["39"])

        async with trio.open_nursery() as n:  # the two timeouts run together
            n.start_soon(one_timeout)
            n.start_soon(one_timeout)
        assert timed_out == ["91", "91"]
        # Each timeout queues a reversal (durable before the 91 went out); the simulator applies
        # "97: never answers" to the reversal too, so both stay sent and unacknowledged.
        sent = gw.metrics.reversals("cmi", "sent")
        await wait_for(lambda: sent.get() == 2, 10, "both reversals sent")

        s = await scrape(url)

    ecom, cmi = {"listener": "ecom"}, {"upstream": "cmi"}
    p = "iso_gateway_"
    assert value(s, p + "front_messages_received_total", **ecom, mti="0100") == 112
    assert value(s, p + "front_messages_sent_total", **ecom, mti="0110", rc="00") == 100
    assert value(s, p + "front_messages_sent_total", **ecom, mti="0110", rc="51") == 7
    for code in rejects:
        assert value(s, p + "front_messages_sent_total", **ecom, mti="0110", rc=code) == 1
        assert total(s, p + "validation_rejections_total", **ecom, rc=code) == 1
    assert value(s, p + "front_messages_sent_total", **ecom, mti="0110", rc="91") == 2
    assert total(s, p + "front_messages_sent_total", **ecom) == 112
    assert total(s, p + "validation_rejections_total") == 3
    assert value(s, p + "upstream_messages_sent_total", **cmi, mti="0100") == 109
    assert value(s, p + "upstream_messages_received_total", **cmi, mti="0110", rc="00") == 100
    assert value(s, p + "upstream_messages_received_total", **cmi, mti="0110", rc="51") == 7
    assert value(s, p + "timeouts_total", **cmi, mti="0100") == 2
    assert total(s, p + "timeouts_total") == 2
    assert value(s, p + "upstream_duration_seconds_count", **cmi, mti="0100") == 107
    assert value(s, p + "request_duration_seconds_count", **cmi, mti="0100") == 109  # timeouts included
    assert value(s, p + "requests_in_flight", **cmi) == 0
    assert total(s, p + "late_responses_total") == 0 and total(s, p + "unmatched_responses_total") == 0
    assert total(s, p + "decode_errors_total") == 0
    assert value(s, p + "reversals_total", **cmi, outcome="queued") == 2
    assert value(s, p + "reversals_total", **cmi, outcome="sent") == 2
    assert value(s, p + "reversals_total", **cmi, outcome="acknowledged") == 0
    assert value(s, p + "upstream_messages_sent_total", **cmi, mti="0420") == 2
    assert value(s, p + "sign_ons_total", **cmi, result="ok") == 1
    assert total(s, p + "link_state", **cmi, state="ready") == 1
    assert total(s, p + "link_state", **cmi) == 1  # one connection, in exactly one state
    assert value(s, p + "front_connections_total", **ecom, outcome="accepted") == 1
    assert value(s, p + "front_connections_open", **ecom) == 1
    assert value(s, p + "build_info", version=__version__) == 1


async def test_a_scrape_exposes_only_declared_names_and_no_card_data_in_labels(harness):
    await harness.start_switch()
    gw = await harness.start_gateway(routes=[{"name": "visa", "upstream": "cmi", "bins": ["4"], "timeout": 0.5}])
    async with endpoint(gw) as url:
        client = await harness.client()
        req = harness.auth(15000)
        await client.request(req, timeout=3)
        await client.request(harness.auth(pan=OTHER_PANS[0]), timeout=3)  # no route for this BIN
        await client.request({**harness.auth(), "2": TEST_PAN[:-1] + "8"}, timeout=3)
        s = await scrape(url)
    assert {name for name, _ in s} <= Metrics(process=False).names()
    labels = {v for _, ls in s for _, v in ls}
    for secret in (TEST_PAN, *OTHER_PANS, req["11"], req["37"], req["41"], req["41"].strip(), req["42"]):
        assert not any(secret in v for v in labels), secret


async def test_metrics_are_served_as_openmetrics_when_the_scraper_asks(harness):
    await harness.start_switch()
    gw = await harness.start_gateway()
    async with endpoint(gw) as url:
        client = await harness.client()
        await client.request(harness.auth(15000), timeout=3)
        status, content_type, body = await get(url + "/metrics", accept=OPENMETRICS)
    assert status == 200 and content_type.startswith("application/openmetrics-text")
    assert body.endswith("# EOF\n")
    families = {f.name: f for f in parse_openmetrics(body)}
    sent = families["iso_gateway_front_messages_sent"]
    assert any(s.labels == {"listener": "ecom", "mti": "0110", "rc": "00"} and s.value == 1 for s in sent.samples)
    assert families["iso_gateway_build_info"].samples[0].labels == {"version": __version__}


def test_a_gateway_registry_has_the_standard_process_metrics():
    names = Metrics().names()
    assert {"process_cpu_seconds_total", "process_resident_memory_bytes", "python_info"} <= names


def test_the_readme_metric_table_is_generated_from_the_definitions():
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = text.split("<!-- metrics-reference:start -->\n", 1)[1].split("<!-- metrics-reference:end -->", 1)[0]
    assert section == reference_markdown(), "regenerate the README table from iso_gateway.metrics.reference_markdown()"
    assert all(f"| `{name}` |" in section for name, *_ in Metrics(process=False).catalogue)


def test_null_metrics_take_every_call_the_gateway_makes_and_record_nothing():
    m = NullMetrics()
    m.front_sent("ecom", "0110", "00").inc()
    m.request_latency("cmi", "0100").observe(0.01)
    m.in_flight("cmi").dec()
    m.saf_depth("cmi").set(3)
    assert list(m.registry.collect()) == []


# --------------------------------------------------------------------------- /healthz, /readyz


async def test_healthz_is_200_while_the_event_loop_answers_and_503_while_it_is_blocked(harness):
    await harness.start_switch()
    gw = await harness.start_gateway()
    async with endpoint(gw, deadline=0.2) as url:
        status, _, body = await get(url + "/healthz")
        assert status == 200 and body.startswith("ok")
        answered = threading.Event()
        result: list[tuple[int, str, str]] = []

        def probe() -> None:
            try:
                result.append(fetch(url + "/healthz"))
            finally:
                answered.set()

        threading.Thread(target=probe, daemon=True).start()
        answered.wait(10)  # a blocking call on the event loop: the loop can't answer until the probe has
        assert result and result[0][0] == 503 and "did not respond" in result[0][2]
        status, _, body = await get(url + "/healthz")
        assert status == 200, body


async def test_readyz_is_200_with_a_ready_link_and_503_with_the_reason_when_the_switch_goes_down(harness):
    await harness.start_switch()
    gw = await harness.start_gateway()
    async with endpoint(gw) as url:
        status, content_type, body = await get(url + "/readyz")
        assert status == 200 and content_type.startswith("text/plain") and "cmi: 1/1 connections ready" in body
        harness.stop_switch()
        await wait_for(lambda: not gw.upstreams["cmi"].ready, 5, "link down")
        status, _, body = await get(url + "/readyz")
        assert status == 503
        assert body.startswith("not ready: no upstream link is ready") and "cmi: 0/1" in body
        assert (await get(url + "/healthz"))[0] == 200  # alive, only not ready


async def test_readyz_is_503_before_any_link_is_up(harness):
    harness.switch_port = free_port()  # nothing listens there
    gw = await harness.start_gateway(wait_ready=False)
    async with endpoint(gw) as url:
        status, _, body = await get(url + "/readyz")
    assert status == 503 and "no upstream link is ready" in body


async def test_readyz_is_503_when_a_readiness_check_such_as_the_journal_fails_and_while_draining(harness):
    await harness.start_switch()
    gw = await harness.start_gateway()
    async with endpoint(gw) as url:
        assert (await get(url + "/readyz"))[0] == 200
        failing = lambda: (False, "the journal is not writable (disk full)")  # noqa: E731
        gw.readiness_checks.append(failing)
        status, _, body = await get(url + "/readyz")
        assert (status, body) == (503, "not ready: the journal is not writable (disk full)\n")
        gw.readiness_checks.remove(failing)
        gw.stop()
        await wait_for(lambda: gw.draining, 5, "draining")
        status, _, body = await get(url + "/readyz")
        assert (status, body) == (503, "not ready: shutting down\n")


async def test_other_paths_are_404_and_probes_take_only_get(harness):
    await harness.start_switch()
    gw = await harness.start_gateway()
    async with endpoint(gw) as url:
        assert (await get(url + "/"))[0] == 404
        assert (await get(url + "/metrics/../admin"))[0] == 404

        def post() -> int:
            try:
                with urllib.request.urlopen(urllib.request.Request(url + "/healthz", data=b"x", method="POST"),
                                            timeout=10) as resp:
                    return resp.status
            except urllib.error.HTTPError as exc:
                return exc.code

        assert await trio.to_thread.run_sync(post) == 405


# --------------------------------------------------------------------------- logs


def _record(msg: str, *args: object, exc: bool = False, **extra: object) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError(f"bad field 2 {TEST_PAN}")
        except ValueError:
            exc_info = sys.exc_info()
    record = logging.LogRecord("iso_gateway.test", logging.WARNING, __file__, 1, msg, args, exc_info)
    record.__dict__.update(extra)
    return record


def test_a_json_log_line_is_one_masked_object_with_node_pid_and_extra_fields():
    line = JsonFormatter("vpos-1").format(_record("card %s declined", TEST_PAN, exc=True, upstream="cmi", event="x"))
    assert "\n" not in line
    doc = json.loads(line)
    assert doc["level"] == "WARNING" and doc["logger"] == "iso_gateway.test"
    assert doc["message"] == "card 476173******0119 declined"
    assert doc["node"] == "vpos-1" and isinstance(doc["pid"], int)
    assert doc["upstream"] == "cmi" and doc["event"] == "x"
    assert "ValueError: bad field 2 476173******0119" in doc["exception"]
    assert not pans_in(line)


def test_a_text_log_line_keeps_a_traceback_on_the_same_line_masked():
    line = MaskingFormatter(TEXT_FORMAT).format(_record("card %s", TEST_PAN, exc=True))
    assert "\n" not in line and "Traceback (most recent call last): | " in line
    assert "WARNING" in line and "476173******0119" in line and not pans_in(line)


async def test_approvals_are_not_logged_at_info_and_a_reject_is_a_warning_with_its_reason(harness, caplog):
    caplog.set_level(logging.INFO, logger="iso_gateway")
    await harness.start_switch()
    await harness.start_gateway()
    client = await harness.client()
    await client.request(harness.auth(15000), timeout=3)  # the first one may log connection set-up
    caplog.clear()
    for _ in range(20):
        assert (await client.request(harness.auth(15000), timeout=3))["39"] == "00"
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO] == []
    assert (await client.request({**harness.auth(), "14": "2001"}, timeout=3))["39"] == "54"
    [reject] = [r for r in caplog.records if r.levelno >= logging.INFO]
    assert reject.levelno == logging.WARNING and "rejected with 54" in reject.getMessage()
    assert "expired" in reject.getMessage()


# --------------------------------------------------------------------------- the daemon process


def _daemon_config(path: Path, *, switch_port: int, port: int, metrics_port: int, log_file: Path) -> None:
    state = path.parent
    path.write_text(f"""
[gateway]
name = "vpos-test-1"
drain_timeout = 3.0
[log]
level = "INFO"
format = "json"
file = "{log_file}"
[metrics]
host = "127.0.0.1"
port = {metrics_port}
[journal]
path = "{state / 'journal.sqlite3'}"
key_file = "{state / 'pan.key'}"
[[listeners]]
name = "ecom"
port = {port}
[[upstreams]]
name = "cmi"
hosts = ["127.0.0.1:{switch_port}"]
sign_on = true
echo_interval = 0
reconnect_initial = 0.05
saf_first_delay = 0.0
[[routes]]
name = "visa"
upstream = "cmi"
bins = ["4"]
timeout = 0.5
""")


async def test_the_daemon_serves_its_endpoint_and_logs_json_lines_with_no_card_number(nursery, tmp_path):
    sim = SwitchSimulator()
    switch_port = await nursery.start(sim.serve, "127.0.0.1", 0)
    port, metrics_port = free_port(), free_port()
    log_file, stderr_file = tmp_path / "gateway.log", tmp_path / "stderr.txt"
    DAEMON_LOG_FILES.extend([log_file, stderr_file])
    config = tmp_path / "gateway.toml"
    _daemon_config(config, switch_port=switch_port, port=port, metrics_port=metrics_port, log_file=log_file)
    with stderr_file.open("wb") as stderr:
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "iso_gateway", "run", "--config", str(config)],
            stdout=subprocess.DEVNULL, stderr=stderr)
    url = f"http://127.0.0.1:{metrics_port}"
    async def ready() -> bool:  # a process of its own: on the machine's clock
        try:
            return (await get(url + "/readyz"))[0] == 200
        except OSError:
            return False

    try:
        await poll_real(ready, bool, 20, look_every=0.05)
        status, _, body = await get(url + "/readyz")
        assert status == 200, body
        assert (await get(url + "/healthz"))[0] == 200
        async with await FrontEndClient.connect("127.0.0.1", port, "iso87ascii", "ascii4") as client:
            assert (await client.request(sample_auth(1, 15000, pan=TEST_PAN), 3))["39"] == "00"
            assert (await client.request(sample_auth(2, 15051, pan=TEST_PAN), 3))["39"] == "51"
            assert (await client.request(sample_auth(3, 15000, pan=OTHER_PANS[0]), 3))["39"] == "15"  # no route
            assert (await client.request(sample_auth(4, 15000, pan=TEST_PAN[:-1] + "8"), 3))["39"] == "14"
            assert (await client.request(sample_auth(5, 15097, pan=TEST_PAN), 3))["39"] == "91"
            s = await poll_real(lambda: scrape(url),
                                lambda s: value(s, "iso_gateway_reversals_total", upstream="cmi", outcome="sent") >= 1,
                                10, look_every=0.05)
        assert value(s, "iso_gateway_front_messages_sent_total", listener="ecom", mti="0110", rc="00") == 1
        assert value(s, "iso_gateway_reversals_total", upstream="cmi", outcome="queued") == 1
        assert value(s, "iso_gateway_reversals_total", upstream="cmi", outcome="sent") == 1
        assert value(s, "process_cpu_seconds_total") > 0  # the standard process metrics
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(15):
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        sim.stop()
    text = log_file.read_text(encoding="utf-8")
    docs = [json.loads(line) for line in text.splitlines()]  # every line one JSON object
    assert all(d["node"] == "vpos-test-1" and d["pid"] == proc.pid for d in docs)
    messages = "\n".join(f'{d["level"]} {d["message"]}' for d in docs)
    for expected in ("INFO iso-gateway", "configuration", "loaded", "observability endpoint on http://127.0.0.1:",
                     "signed on, ready", "WARNING listener ecom: 0100 rejected with 14",
                     "no route", "PAN 541333******0011", "gateway stopped"):
        assert expected in messages, expected
    assert "no answer to 0100" in messages and "reversal" in messages and "queued for cmi (timeout" in messages
    assert not pans_in(text) and not pans_in(stderr_file.read_text(errors="replace"))


def test_a_refused_configuration_is_one_logged_line_and_exit_2(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text('[metrics]\nport = "ninety"\n[[listeners]]\nname = "ecom"\nport = 1\n')
    proc = subprocess.run([sys.executable, "-m", "iso_gateway", "run", "--config", str(config)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "ERROR" in lines[0] and "configuration refused" in lines[0]
    assert str(config) in lines[0] and "Traceback" not in proc.stderr


def test_a_metrics_address_already_in_use_is_refused_naming_the_key(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        config = tmp_path / "gateway.toml"
        _daemon_config(config, switch_port=9, port=free_port(), metrics_port=busy.getsockname()[1],
                       log_file=tmp_path / "gateway.log")
        proc = subprocess.run([sys.executable, "-m", "iso_gateway", "run", "--config", str(config)],
                              capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    log = (tmp_path / "gateway.log").read_text()
    assert "configuration refused" in log and "metrics.port" in log and "Traceback" not in log + proc.stderr
