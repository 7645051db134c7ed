"""--workers N: processes sharing the port, one journal, one scrape for the whole picture."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import urllib.request

import trio
from prometheus_client.parser import text_string_to_metric_families

from iso_gateway.load import LoadOptions, run_load
from realtime import poll_real
from iso_gateway.sim.switch import SwitchSimulator
from test_daemon import free_port


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = s.name + "".join(f"|{k}={v}" for k, v in sorted(s.labels.items()))
            out[key] = out.get(key, 0.0) + s.value
    return out


def status(port: int, path: str) -> int:
    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5).status
    except urllib.error.HTTPError as exc:
        return exc.code


async def test_two_workers_share_the_port_the_journal_and_one_scrape(nursery, tmp_path):
    sim = SwitchSimulator()
    switch_port = await nursery.start(sim.serve, "127.0.0.1", 0)
    port, metrics_port = free_port(), free_port()
    cfg = tmp_path / "gw.toml"
    cfg.write_text(f"""
[journal]
path = "{tmp_path / 'journal.sqlite3'}"
key_file = "{tmp_path / 'pan.key'}"
[log]
file = "{tmp_path / 'gw.log'}"
[metrics]
port = {metrics_port}
[[listeners]]
name = "ecom"
port = {port}
[[upstreams]]
name = "cmi"
hosts = ["127.0.0.1:{switch_port}"]
sign_on = true
echo_interval = 0
[[routes]]
name = "all"
upstream = "cmi"
""")
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "iso_gateway", "run", "--config", str(cfg), "--workers", "2"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # The workers are processes of their own, on the machine's clock: their state is looked at
        # until it shows, within bounds in real seconds.
        async def ready() -> bool:
            try:
                return await trio.to_thread.run_sync(lambda: status(metrics_port, "/readyz") == 200)
            except OSError:
                return False

        def scraped():
            return trio.to_thread.run_sync(scrape, metrics_port)

        assert await poll_real(ready, bool, 20), "the workers were not ready within 20 s"
        ready_key = "iso_gateway_link_state|host=127.0.0.1:%d|state=ready|upstream=cmi" % switch_port
        # Each worker hands its gauges over every second.
        metrics = await poll_real(scraped, lambda m: m.get(ready_key) == 2, 5, look_every=0.2)
        assert metrics.get(ready_key) == 2  # one link per worker
        # 32 connections: the kernel spreads them over the two workers by a hash, so all of them
        # landing on one worker (a chance of 2 in 2**32) can't make this test fail.
        result = await run_load(LoadOptions(host="127.0.0.1", port=port, mix="bench", connections=32, in_flight=1,
                                            count=2000, timeout=10))
        assert result.answered == 2000 and result.codes == {"00": 2000}
        # Workers hand their counters to the shared files every second.
        key = "iso_gateway_front_messages_received_total|listener=ecom|mti=0100"
        metrics = await poll_real(scraped, lambda m: m.get(key) == 2000, 5, look_every=0.2)
        assert metrics.get(key) == 2000
        assert sim.count("0100") == 2000
        def rows_per_worker() -> dict[int, int]:
            db = sqlite3.connect(tmp_path / "journal.sqlite3")
            try:
                return dict(db.execute("SELECT worker, COUNT(*) FROM txn GROUP BY worker").fetchall())
            finally:
                db.close()

        # Each worker's indexer writes its log segments into SQLite a moment after they close:
        # wait for the rows (bounded) rather than for a machine fast enough to have them already.
        per_worker = await poll_real(lambda: trio.to_thread.run_sync(rows_per_worker),
                                     lambda rows: sum(rows.values()) >= 2000, 20, look_every=0.2)
        assert set(per_worker) == {0, 1} and sum(per_worker.values()) == 2000  # both took connections
        assert await trio.to_thread.run_sync(status, metrics_port, "/healthz") == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(20):
            assert await proc.wait() == 0
    assert [r for r in sim.records if r.mti == "0800"]  # each worker signed on (and off)
