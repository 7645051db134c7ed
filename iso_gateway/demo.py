"""``iso-gateway demo``: the whole product on one machine, with no configuration.

Starts the switch simulator and the gateway on 127.0.0.1 with the shipped
example configuration (deploy/gateway.toml; only its ports are changed to free
ones, and its route timeouts shortened so the timeout case takes seconds, not
half a minute), drives a short burst of mixed traffic through the gateway, and
prints what happened in words a newcomer can follow.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import trio
from hdrh.histogram import HdrHistogram

from .config import Config, load_config
from .datafiles import specs_dir
from .gateway import Gateway
from .metrics import Metrics
from .sim.client import FrontEndClient, sample_auth
from .sim.switch import SwitchSimulator

DEMO_TIMEOUT = 2.0  # seconds: the example's 30 s route timeout, shortened for the demo

# (label, amount in minor units, how many, what to change in the request, the answer expected)
SCENARIOS: list[tuple[str, int, int, dict[str, str], str]] = [
    ("approved", 15000, 400, {}, "00"),
    ("declined: insufficient funds (51)", 15051, 40, {}, "51"),
    ("declined: do not honour (05)", 15005, 20, {}, "05"),
    ("rejected by the gateway: bad card number (14)", 15000, 10, {"2": "4761739001010118"}, "14"),
    ("rejected by the gateway: expired card (54)", 15000, 10, {"14": "2001"}, "54"),
    ("rejected by the gateway: unknown BIN (15)", 15000, 5, {"2": "9999990000000006"}, "15"),
    # The switch answers these after 2.5 s: the front end hears 91 at 2 s, and the gateway reverses them.
    ("switch answered too late: timed out (91)", 152599, 5, {}, "91"),
]


def example_config_path() -> Path:
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "deploy" / "gateway.toml", specs_dir().parent / "deploy" / "gateway.toml",
                      here / "deploy" / "gateway.toml"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError("deploy/gateway.toml (the example configuration) was not found")


def demo_config(base: Config, switch_port: int, state_dir: str, kek_dir: str | None = None) -> Config:
    """The example configuration on free ports, its state in ``state_dir``; the software security
    module's KEK file (created with its key file) in ``kek_dir``, outside the state directory."""
    raw = base.model_dump()
    raw["journal"]["path"] = f"{state_dir}/journal.sqlite3"
    raw["journal"]["key_file"] = f"{state_dir}/pan.key"  # an old version's key: never there, never created
    raw["security"] = {**raw["security"], "module": "software", "key_file": f"{state_dir}/keys.bin", "create": True}
    if kek_dir is not None:
        raw["security"]["kek_file"] = f"{kek_dir}/kek.hex"
    for lst in raw["listeners"]:
        lst["port"] = 0
    for up in raw["upstreams"]:
        up["hosts"] = [f"127.0.0.1:{switch_port}"]
    for route in raw["routes"]:
        route["timeout"] = DEMO_TIMEOUT
    for up in raw["upstreams"]:
        up["saf_first_delay"] = 0.0
    raw["metrics"]["port"] = 0
    return Config.model_validate(raw)


async def _drive(port: int, connections: int) -> tuple[Counter[str], int, Counter[str], HdrHistogram, float]:
    """Send every scenario; timeouts run beside the burst so they don't stall it."""
    outcomes: Counter[str] = Counter()
    codes: Counter[str] = Counter()
    unexpected = 0
    hist = HdrHistogram(1, 60_000_000, 3)  # microseconds, 1 µs .. 60 s
    burst: list[tuple[str, int, dict[str, str], str]] = []
    slow: list[tuple[str, int, dict[str, str], str]] = []
    for label, amount, count, change, expect in SCENARIOS:
        (slow if expect == "91" else burst).extend((label, amount, change, expect) for _ in range(count))
    burst = [burst[i] for i in sorted(range(len(burst)), key=lambda i: (i * 7919) % len(burst))]  # interleave kinds
    clients = [await FrontEndClient.connect("127.0.0.1", port, "iso87ascii", "ascii4") for _ in range(connections + 1)]

    async def one(client: FrontEndClient, n: int, idx: int, item: tuple[str, int, dict[str, str], str]) -> None:
        nonlocal unexpected
        label, amount, change, expect = item
        req = {**sample_auth(n, amount, terminal=f"DEMO{idx:04d}"), **change}
        t0 = time.perf_counter()
        resp = await client.request(req, timeout=DEMO_TIMEOUT + 5)
        if expect != "91":
            hist.record_value(max(1, int((time.perf_counter() - t0) * 1e6)))
        code = resp.get("39", "??")
        codes[code] += 1
        outcomes[label] += 1
        unexpected += code != expect

    async def worker(idx: int, client: FrontEndClient) -> None:
        for n, item in enumerate(burst[idx::connections]):
            await one(client, n + 1, idx, item)

    async with trio.open_nursery() as nursery:
        for n, item in enumerate(slow):
            nursery.start_soon(one, clients[-1], n + 1, 9999, item)
        start = time.perf_counter()
        async with trio.open_nursery() as inner:
            for i, c in enumerate(clients[:-1]):
                inner.start_soon(worker, i, c)
        elapsed = time.perf_counter() - start
    for c in clients:
        await c.aclose()
    return outcomes, unexpected, codes, hist, elapsed


async def _main(connections: int) -> int:
    base_path = example_config_path()
    base = load_config(base_path)
    sim = SwitchSimulator(dialect=base.upstreams[0].dialect, framing=base.upstreams[0].framing)
    async with trio.open_nursery() as nursery:
        switch_port = await nursery.start(sim.serve, "127.0.0.1", 0)
        state_dir = tempfile.mkdtemp(prefix="iso-gateway-demo-")
        kek_dir = tempfile.mkdtemp(prefix="iso-gateway-demo-kek-")  # the KEK: never beside what it protects
        config = demo_config(base, switch_port, state_dir, kek_dir)
        gateway = Gateway(config, metrics=Metrics(), config_path=str(base_path))
        from .daemon import start_metrics_server

        metrics_port = start_metrics_server(config, gateway.metrics, gateway)
        await nursery.start(gateway.run)
        with trio.move_on_after(10):
            while not all(u.ready for u in gateway.upstreams.values()):  # noqa: ASYNC110 - no event for "all links up"
                await trio.sleep(0.01)
        print(f"switch simulator on 127.0.0.1:{switch_port}; gateway listening on 127.0.0.1:{gateway.ports[0]}"
              f" (config {base_path}, route timeouts {DEMO_TIMEOUT:g} s for the demo)")
        print(f"journal (SQLite): {config.journal.path}")
        if gateway.security is not None:
            kcvs = gateway.security.check_values()
            kid = gateway.security.data_key_id
            kek = "ISO_GATEWAY_KEK" if os.environ.get("ISO_GATEWAY_KEK") else config.security.kek_file
            print(f"keys: software security module, {config.security.key_file} sealed under the KEK in "
                  f"{kek} (outside the state folder); card data sealed under data key {kid} "
                  f"(check value {kcvs.get(f'data/{kid}', '?')})")
        print(f"sending {sum(s[2] for s in SCENARIOS)} e-commerce authorizations (MAD) over {connections} connections...")
        outcomes, unexpected, codes, hist, elapsed = await _drive(gateway.ports[0], connections)
        total = sum(outcomes.values())
        print()
        print("outcome                                              count")
        for label, _, _, _, _ in SCENARIOS:
            print(f"  {label:<50} {outcomes[label]:>5}")
        print(f"  {'total answered':<50} {total:>5}")
        if unexpected:
            print(f"  {'answered with an unexpected code':<50} {unexpected:>5}")
        print()
        print("response codes: " + ", ".join(f"{c}={n}" for c, n in sorted(codes.items())))
        burst = hist.get_total_count()
        print(f"throughput: {burst / elapsed:,.0f} requests/s ({burst} answered in {elapsed:.2f} s; "
              f"the {total - burst} timeouts ran beside them)")
        print(f"latency (timeouts excluded): p50 {hist.get_value_at_percentile(50) / 1000:.2f} ms, "
              f"p99 {hist.get_value_at_percentile(99) / 1000:.2f} ms, max {hist.get_max_value() / 1000:.2f} ms")
        print(f"the switch saw {sim.count('0100')} authorizations (the gateway answered the rejects itself)")
        with trio.move_on_after(DEMO_TIMEOUT + 5):  # the timed-out ones are reversed: wait for the 0430s
            while sum(1 for r in sim.records if r.mti == "0420" and r.response_code == "00") < 5:  # noqa: ASYNC110 - a demo
                await trio.sleep(0.05)
        reversed_ = sum(1 for r in sim.records if r.mti in ("0420", "0421") and r.response_code == "00")
        print(f"the {outcomes[SCENARIOS[-1][0]]} timed-out authorizations were reversed (0420); the switch "
              f"acknowledged {reversed_}")
        print(f"journal: iso-gateway journal find --journal {config.journal.path} --terminal DEMO0000")
        if metrics_port:
            print(f"metrics: http://127.0.0.1:{metrics_port}/metrics, health: /healthz and /readyz"
                  " (served while the demo runs)")
        gateway.stop()
        await gateway.wait_stopped()
        nursery.cancel_scope.cancel()
    return 0 if unexpected == 0 and total == sum(s[2] for s in SCENARIOS) else 1


def run(connections: int = 8) -> int:
    logging.basicConfig(level=logging.ERROR, stream=sys.stderr)
    return trio.run(_main, connections)
