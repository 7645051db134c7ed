"""The daemon as a process: signals, reload, drain, chaos, other wire formats and failover."""

from __future__ import annotations

import itertools
import random
import signal
import subprocess
import sys
from pathlib import Path

import trio

from conftest import wait_for, write_daemon_config
from iso_gateway.core.framing import framer_from_config
from iso_gateway.sim.client import FrontEndClient, sample_auth
from iso_gateway.sim.integrity import free_port
from iso_gateway.sim.switch import SwitchSimulator
from realtime import poll_real


def write_config(path: Path, *, port: int, switch_port: int, log_file: Path | None = None, timeout: float = 3.0,
                 **options) -> None:
    """The suite's daemon configuration, with a route timeout long enough for the simulator's slow answers."""
    options.setdefault("routes", [{"name": "all", "upstream": "cmi", "timeout": timeout}])
    write_daemon_config(path, switch_port, port=port, log_file=log_file, gateway={"drain_timeout": 5.0}, **options)


async def start_daemon(config: Path, port: int) -> trio.Process:
    proc = await trio.lowlevel.open_process([sys.executable, "-m", "iso_gateway", "run", "--config", str(config)],
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    async def connectable():
        try:
            s = await trio.open_tcp_stream("127.0.0.1", port)
        except OSError:
            return False
        await s.aclose()
        return True
    await poll_real(connectable, bool, 15, look_every=0.05)  # a process of its own: on the machine's clock
    return proc


async def ready_client(port: int) -> FrontEndClient:
    """A client once the daemon's link is signed on (it answers 91 before that)."""
    client = await FrontEndClient.connect("127.0.0.1", port, "iso87ascii", "ascii4")
    stans = itertools.count(900001)

    async def approved() -> bool:
        return (await client.request(sample_auth(next(stans), 10000, terminal="WARMUP00"), timeout=3))["39"] == "00"

    assert await poll_real(approved, bool, 15, look_every=0.05), "the daemon never became ready"
    return client


async def test_sigterm_lets_requests_in_flight_finish_then_exits_0(nursery, tmp_path):
    sim = SwitchSimulator()
    switch_port = await nursery.start(sim.serve, "127.0.0.1", 0)
    port = free_port()
    cfg = tmp_path / "gw.toml"
    write_config(cfg, port=port, switch_port=switch_port, log_file=tmp_path / "gw.log")
    proc = await start_daemon(cfg, port)
    try:
        client = await ready_client(port)
        got = {}

        async def slow():
            got["resp"] = await client.request(sample_auth(1, 11599), timeout=5)  # answered after 1.5 s

        async def refused() -> bool:
            try:
                s = await trio.open_tcp_stream("127.0.0.1", port)
            except OSError:
                return True
            await s.aclose()
            return False

        async with trio.open_nursery() as n:
            n.start_soon(slow)
            # Real time on purpose: the daemon is another process, and the simulator shows no request
            # before it answers it; a moment for the request to reach the daemon before the signal.
            await trio.sleep(0.2)
            proc.send_signal(signal.SIGTERM)
            # No new connections once draining: refused while the slow request is still in flight
            # (a daemon that exited at once, or that accepted until it exited, fails one of these).
            was_refused = await poll_real(refused, bool, 5, look_every=0.05)
            in_flight = "resp" not in got
        assert got["resp"]["39"] == "00"
        assert was_refused and in_flight, (was_refused, in_flight)
        with trio.fail_after(10):
            assert await proc.wait() == 0
        log = (tmp_path / "gw.log").read_text()
        assert "signed off" in log
        assert any(r.mti == "0800" for r in sim.records[-3:])  # the sign-off reached the switch
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_sighup_reloads_routes_and_a_bad_file_keeps_the_old_configuration(nursery, tmp_path):
    sim = SwitchSimulator()
    switch_port = await nursery.start(sim.serve, "127.0.0.1", 0)
    port = free_port()
    cfg = tmp_path / "gw.toml"
    log_file = tmp_path / "gw.log"
    write_config(cfg, port=port, switch_port=switch_port, log_file=log_file)
    proc = await start_daemon(cfg, port)
    try:
        client = await ready_client(port)
        assert (await client.request(sample_auth(1, 10000), timeout=3))["39"] == "00"
        mc_only = [{"name": "mc", "upstream": "cmi", "bins": ["5"], "timeout": 3.0}]
        write_config(cfg, port=port, switch_port=switch_port, log_file=log_file, routes=mc_only)
        proc.send_signal(signal.SIGHUP)
        await wait_for(lambda: "configuration reloaded" in log_file.read_text(), 5, "reload")
        assert (await client.request(sample_auth(2, 10000), timeout=3))["39"] == "15"  # Visa no longer routed
        write_config(cfg, port=port, switch_port=switch_port, log_file=log_file, routes=mc_only,
                     listener={"bogus": 1})
        proc.send_signal(signal.SIGHUP)
        await wait_for(lambda: "reload refused" in log_file.read_text(), 5, "refusal")
        assert "listeners.0.bogus: unknown key" in log_file.read_text()
        assert (await client.request(sample_auth(3, 10000), timeout=3))["39"] == "15"  # still the reloaded one
        assert (await client.request(sample_auth(4, 10000, pan="5413330089020011"), timeout=3))["39"] == "00"
    finally:
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(10):
            await proc.wait()


async def test_every_request_gets_exactly_one_answer_in_time_whatever_the_switch_does(harness):
    """Chaos: the switch delays, drops and closes at random; each request still gets one answer,
    at the latest its route timeout plus a small margin after it was sent."""
    await harness.start_switch(seed=7, delay_probability=0.15, delay_range=(0.0, 0.6), drop_probability=0.1,
                               close_probability=0.03)
    timeout = 0.4
    await harness.start_gateway(upstream={"connections": 2},
                                routes=[{"name": "all", "upstream": "cmi", "timeout": timeout}])
    clients = [await harness.client() for _ in range(8)]
    rng = random.Random(3)
    results: list[tuple[str, float]] = []

    async def worker(i: int, client: FrontEndClient) -> None:
        for n in range(40):
            amount = rng.choice([10000, 10051, 10097, 10199, 10399])
            start = trio.current_time()
            resp = await client.request(sample_auth(n + 1, amount, terminal=f"CHAOS{i:03d}"), timeout=5)
            results.append((resp["39"], trio.current_time() - start))

    with trio.fail_after(60):
        async with trio.open_nursery() as n:
            for i, c in enumerate(clients):
                n.start_soon(worker, i, c)
    assert len(results) == 320
    assert max(elapsed for _, elapsed in results) < timeout + 1.5  # the route timeout plus a margin for a busy machine
    codes = {code for code, _ in results}
    assert {"00", "51", "91"} <= codes
    assert all(c.unmatched == 0 for c in clients)  # nothing answered twice, nothing late forwarded


async def test_binary_dialect_with_tpdu_framing_end_to_end(harness):
    sim = await harness.start_switch(dialect="iso87binary", framing="binary2", tpdu=True)
    wire = {"dialect": "iso87binary", "framing": "binary2", "tpdu": True}
    gw = await harness.start_gateway(listener=wire, upstream={**wire, "tpdu_value": "6000560078"})
    client = await FrontEndClient.connect("127.0.0.1", gw.listeners[0].port, "iso87binary",
                                          framer_from_config("binary2", tpdu=True), header=bytes.fromhex("6000120034"))
    harness.clients.append(client)
    resp = await client.request(sample_auth(5, 12345), timeout=3)
    assert resp["39"] == "00" and resp["11"] == "000005"
    assert sim.count("0100") == 1
    await client.send(sample_auth(6, 12345))
    frame = await client.receive_frame(3)
    assert frame.header == bytes.fromhex("6000340012")  # the reply swaps destination and source


async def test_a_front_end_in_one_dialect_reaches_a_switch_in_another(harness):
    sim = await harness.start_switch(dialect="iso87binary", framing="binary2")
    await harness.start_gateway(upstream={"dialect": "iso87binary", "framing": "binary2"})
    client = await harness.client()
    resp = await client.request(sample_auth(9, 15051), timeout=3)
    assert (resp["t"], resp["39"], resp["11"]) == ("0110", "51", "000009")
    assert sim.count("0100") == 1


async def test_a_dead_primary_host_fails_over_to_the_backup(harness, autojump_clock):
    sim = await harness.start_switch()
    dead = free_port()
    gw = await harness.start_gateway(upstream={"hosts": [f"127.0.0.1:{dead}", f"127.0.0.1:{harness.switch_port}"]})
    client = await harness.client()
    assert (await client.request(harness.auth(), timeout=3))["39"] == "00"
    assert gw.metrics.connect_failures("cmi", f"127.0.0.1:{dead}").get() >= 1
    assert sim.count("0100") == 1


async def test_a_switch_that_declines_sign_on_never_gets_traffic(harness, autojump_clock):
    sim = await harness.start_switch()
    sim.mute_network = True
    gw = await harness.start_gateway(wait_ready=False, upstream={"sign_on_timeout": 0.2})
    client = await harness.client()
    await wait_for(lambda: gw.metrics.sign_ons("cmi", "timeout").get() >= 1, 3, "sign-on timeout")
    assert (await client.request(harness.auth(), timeout=3))["39"] == "91"
    assert sim.count("0100") == 0
    sim.mute_network = False
    await wait_for(lambda: gw.upstreams["cmi"].ready, 5, "signed on")
    assert (await client.request(harness.auth(), timeout=3))["39"] == "00"
