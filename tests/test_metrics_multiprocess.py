"""Ready for worker processes: every metric works in prometheus-client's multiprocess mode and one scrape adds them up.

Multiprocess mode is chosen when prometheus-client is imported (``PROMETHEUS_MULTIPROC_DIR``),
so each "worker" here is a process of its own.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

WORKER = """
import sys
from iso_gateway.metrics import Metrics
m = Metrics()
n = int(sys.argv[1])
m.front_sent("ecom", "0110", "00").inc(n)
m.connections_open("ecom").inc(2)
m.link_state("cmi", "127.0.0.1:9583", "ready").inc()
m.request_latency("cmi", "0100").observe(0.012)
m.saf_depth("cmi").set(5)
m.flush()  # what the gateway does every second and before each scrape
"""

SCRAPE = """
from prometheus_client import CollectorRegistry, generate_latest
from iso_gateway.net.http import exposition_registry
print(generate_latest(exposition_registry(CollectorRegistry())).decode())
"""


def run(code: str, *args: str, env: dict[str, str]) -> str:
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_one_scrape_adds_up_every_worker_process(tmp_path: Path):
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    run(WORKER, "3", env=env)
    run(WORKER, "4", env=env)
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(run(SCRAPE, env=env)) for s in f.samples}
    assert samples[("iso_gateway_front_messages_sent_total", (("listener", "ecom"), ("mti", "0110"), ("rc", "00")))] == 7
    assert samples[("iso_gateway_front_connections_open", (("listener", "ecom"),))] == 4  # livesum
    assert samples[("iso_gateway_link_state", (("host", "127.0.0.1:9583"), ("state", "ready"), ("upstream", "cmi")))] == 2
    assert samples[("iso_gateway_request_duration_seconds_count", (("mti", "0100"), ("upstream", "cmi")))] == 2
    assert samples[("iso_gateway_saf_queue_depth", (("upstream", "cmi"),))] == 5  # one shared store: max, not sum
    assert [v for (name, _), v in samples.items() if name == "iso_gateway_build_info"] == [1]
