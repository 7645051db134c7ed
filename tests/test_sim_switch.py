"""The switch simulator and the front-end client, over real sockets on 127.0.0.1."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from datetime import datetime, timezone

import pytest
import trio

from conftest import wait_for
from iso_gateway.core.errors import ConfigError
from iso_gateway.sim import (
    ConnectionClosed,
    FrontEndClient,
    RequestTimeout,
    SwitchBehaviour,
    SwitchSimulator,
    outcome_for_amount,
    sample_auth,
    sample_network,
    sample_reversal,
)
from iso_gateway.sim.switch import DECLINE_CODES, Chaos, add_arguments

PAN = "4761739001010119"
MASKED_PAN = "476173******0119"
TIMEOUT = 1.0  # per request; every wait in these tests is bounded


@pytest.fixture
def start_switch(nursery):
    """Start a simulator on a free loopback port; the test's nursery stops it.

    Afterwards, no connection handler may have failed with a bug.
    """
    started: list[SwitchSimulator] = []

    async def start(**options: object) -> SwitchSimulator:
        sim = SwitchSimulator(**options)
        await nursery.start(sim.serve, "127.0.0.1", 0)
        started.append(sim)
        return sim

    yield start
    for sim in started:
        assert sim.closes["error"] == 0


@pytest.fixture
async def switch(start_switch) -> SwitchSimulator:
    return await start_switch()


async def connect(sim: SwitchSimulator) -> FrontEndClient:
    return await FrontEndClient.connect("127.0.0.1", sim.port, sim.dialect, sim.framer)


async def eventually(predicate, timeout: float = TIMEOUT) -> None:
    await wait_for(predicate, timeout)


# --------------------------------------------------------------------------- the table, without sockets


@pytest.mark.parametrize(
    ("amount", "action", "code", "delay"),
    [
        ("000000010000", "approve", "00", 0.0),
        ("000000010004", "approve", "00", 0.0),
        ("000000010006", "approve", "00", 0.0),
        ("000000010011", "approve", "00", 0.0),
        ("000000010005", "decline", "05", 0.0),
        ("000000010051", "decline", "51", 0.0),
        ("000000010096", "decline", "96", 0.0),
        ("000000010097", "drop", None, 0.0),
        ("000000010098", "close", None, 0.0),
        ("000000011599", "delay", "00", 1.5),
        ("000000010099", "delay", "00", 0.0),
    ],
)
def test_the_last_digits_of_the_amount_choose_the_outcome(amount, action, code, delay):
    outcome = outcome_for_amount(amount)
    assert (outcome.action, outcome.code) == (action, code)
    assert outcome.delay == pytest.approx(delay)


def test_a_reversal_is_acknowledged_whatever_decline_digits_its_amount_has():
    assert outcome_for_amount("000000010051", acknowledge=True).code == "00"
    assert outcome_for_amount("000000010097", acknowledge=True).action == "drop"


def test_chaos_with_the_same_seed_gives_the_same_faults_and_stays_in_bounds():
    behaviour = SwitchBehaviour(seed=7, delay_probability=0.3, drop_probability=0.2, close_probability=0.1, delay_range=(0.1, 0.2))

    def draws() -> list:
        chaos = Chaos(behaviour)
        return [chaos.draw() for _ in range(500)]

    a = draws()
    assert a == draws()
    actions = [o.action if o else None for o in a]
    assert {"delay", "drop", "close", None} == set(actions)
    assert all(0.1 <= o.delay <= 0.2 for o in a if o and o.action == "delay")
    assert Chaos(SwitchBehaviour()).draw() is None


@pytest.mark.parametrize(
    "options",
    [{"drop_probability": 1.5}, {"drop_probability": 0.6, "close_probability": 0.6}, {"delay_range": (2.0, 1.0)}, {"echo_interval": -1}],
)
def test_an_impossible_behaviour_is_refused(options):
    with pytest.raises(ConfigError):
        SwitchBehaviour(**options)


# --------------------------------------------------------------------------- authorizations


async def test_an_ordinary_amount_is_approved_with_a_six_character_auth_code(switch, autojump_clock):
    async with await connect(switch) as client:
        request = sample_auth(1, 15000)
        response = await client.request(request, TIMEOUT)
        financial = await client.request(sample_auth(2, 15003, mti="0200"), TIMEOUT)
    assert response["t"] == "0110" and response["39"] == "00"
    assert len(response["38"]) == 6 and response["38"].isalnum()
    for key in ("2", "4", "7", "11", "37", "41", "42", "49"):
        assert response[key] == request[key]
    assert financial["t"] == "0210" and financial["39"] == "00"
    rec = switch.records[0]
    assert (rec.mti, rec.stan, rec.amount, rec.response_code, rec.action, rec.applied) == ("0100", "000001", "000000015000", "00", "approve", None)
    assert rec.pan == MASKED_PAN
    assert switch.count("0100") == 1 and switch.count("0200") == 1


async def test_an_amount_ending_in_a_decline_code_is_declined_with_that_code(switch, autojump_clock):
    async with await connect(switch) as client:
        for stan, code in enumerate(sorted(DECLINE_CODES), start=1):
            response = await client.request(sample_auth(stan, 20000 + int(code)), TIMEOUT)
            assert response["39"] == code
            assert "38" not in response
    assert [r.action for r in switch.records] == ["decline"] * len(DECLINE_CODES)


async def test_an_amount_ending_97_is_never_answered_and_the_connection_still_works(switch, autojump_clock):
    async with await connect(switch) as client:
        with pytest.raises(RequestTimeout):
            await client.request(sample_auth(1, 10097), 0.3)
        assert (await client.request(sample_auth(2, 10000), TIMEOUT))["39"] == "00"
    assert [(r.action, r.response_code) for r in switch.records] == [("drop", None), ("approve", "00")]


async def test_an_amount_ending_98_closes_the_connection_without_an_answer(switch, autojump_clock):
    async with await connect(switch) as client:
        with pytest.raises(ConnectionClosed):
            await client.request(sample_auth(1, 10098), TIMEOUT)
    await eventually(lambda: switch.closes["close"] == 1)
    assert switch.records[0].action == "close" and switch.records[0].response_code is None
    assert switch.connections == 0


async def test_an_amount_ending_99_is_approved_after_the_tenths_in_the_two_digits_before(switch, autojump_clock):
    async with await connect(switch) as client:
        started = trio.current_time()
        response = await client.request(sample_auth(1, 10399), TIMEOUT)
        elapsed = trio.current_time() - started
    assert response["39"] == "00"
    assert 0.28 <= elapsed < 0.8
    assert switch.records[0].action == "delay" and switch.records[0].response_code == "00"


async def test_pipelined_requests_are_answered_out_of_order_so_a_slow_one_does_not_hold_back_fast_ones(switch, autojump_clock):
    finished: list[str] = []
    async with await connect(switch) as client:

        async def ask(stan: int, amount: int) -> None:
            response = await client.request(sample_auth(stan, amount), TIMEOUT)
            assert response["11"] == f"{stan:06d}"
            finished.append(response["11"])

        started = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask, 1, 10599)  # 0.5 s
            await trio.sleep(0.02)  # virtual: every task idle meanwhile, so the slow one is surely in first
            for stan in range(2, 12):
                nursery.start_soon(ask, stan, 10000 + stan)
        elapsed = trio.current_time() - started
    assert finished[-1] == "000001"
    assert sorted(finished) == [f"{n:06d}" for n in range(1, 12)]
    assert elapsed < 0.9  # the fast ones did not queue behind the delay
    assert switch.accepted == 1


async def test_concurrent_connections_are_served_side_by_side(switch, autojump_clock):
    async def one_client(terminal: str) -> None:
        async with await connect(switch) as client:
            async with trio.open_nursery() as nursery:
                for stan in range(1, 6):
                    nursery.start_soon(client.request, sample_auth(stan, 1000, terminal=terminal), TIMEOUT)

    async with trio.open_nursery() as nursery:
        for n in range(3):
            nursery.start_soon(one_client, f"TERM000{n}")
    assert switch.accepted == 3 and switch.count("0100") == 15
    assert {r.connection for r in switch.records} == {1, 2, 3}


# --------------------------------------------------------------------------- reversals


async def test_a_reversal_is_applied_once_and_its_repeat_is_acknowledged_without_applying_it_again(switch, autojump_clock):
    async with await connect(switch) as client:
        original = sample_auth(1, 25000)
        assert (await client.request(original, TIMEOUT))["39"] == "00"
        first = await client.request(sample_reversal(original, mti="0420"), TIMEOUT)
        repeat = await client.request(sample_reversal(original, mti="0421"), TIMEOUT)
        duplicate = await client.request(sample_reversal(original, mti="0420"), TIMEOUT)
    for response in (first, repeat, duplicate):
        assert response["t"] == "0430" and response["39"] == "00" and "38" not in response
        assert response["90"].startswith("0100000001")
    reversals = [r for r in switch.records if r.mti.startswith("04")]
    assert [(r.mti, r.applied) for r in reversals] == [("0420", True), ("0421", False), ("0420", False)]
    assert len(switch.reversed) == 1


async def test_a_reversal_request_0400_gets_0410_and_counts_as_the_same_original(switch, autojump_clock):
    async with await connect(switch) as client:
        original = sample_auth(1, 25051)  # declined as an authorization, acknowledged as a reversal
        await client.request(original, TIMEOUT)
        response = await client.request(sample_reversal(original, mti="0400"), TIMEOUT)
        advice = await client.request(sample_reversal(original, mti="0420"), TIMEOUT)
    assert (response["t"], response["39"], advice["39"]) == ("0410", "00", "00")
    assert [r.applied for r in switch.records[1:]] == [True, False]


async def test_a_reversal_whose_amount_ends_97_is_never_answered_nor_applied_so_saf_retries(switch, autojump_clock):
    original = sample_auth(1, 30097)
    async with await connect(switch) as client:
        for mti in ("0420", "0421", "0421"):
            with pytest.raises(RequestTimeout):
                await client.request(sample_reversal(original, mti=mti), 0.15)
    assert switch.count("0420") == 1 and switch.count("0421") == 2
    assert [r.applied for r in switch.records] == [False, False, False]
    assert not switch.reversed


# --------------------------------------------------------------------------- network management and the wire


async def test_0800_sign_on_echo_and_sign_off_get_0810_00_echoing_7_11_and_70(switch, autojump_clock):
    async with await connect(switch) as client:
        for stan, code in ((1, "001"), (2, "301"), (3, "002")):
            request = sample_network(stan, code)
            response = await client.request(request, TIMEOUT)
            assert response == {"t": "0810", "7": request["7"], "11": request["11"], "70": code, "39": "00"}
    assert switch.count("0800") == 3


async def test_the_switch_echoes_on_its_own_and_consumes_the_0810s(start_switch, autojump_clock):
    sim = await start_switch(echo_interval=0.1)
    async with await connect(sim) as client:
        await client.pump(0.45)
        assert client.echoes_answered >= 2
    assert sim.echo_sent >= 2 and sim.echo_answered >= 2
    assert sim.unexpected == 0 and sim.echo_missed == 0
    assert not sim.records  # its own echoes are not transactions


async def test_a_zero_length_keepalive_frame_is_echoed_back(switch, autojump_clock):
    async with await connect(switch) as client:
        await client.send_raw(b"0000")
        assert await client.receive_raw(timeout=TIMEOUT) == b"0000"
    assert switch.keepalives == 1


async def test_an_undecodable_frame_is_counted_and_ignored_and_the_connection_still_works(switch, autojump_clock):
    async with await connect(switch) as client:
        await client.send_raw(b"0008GARBAGE!")
        assert (await client.request(sample_auth(1, 10000), TIMEOUT))["39"] == "00"
    assert switch.undecodable == 1 and switch.accepted == 1


async def test_a_frame_split_across_writes_is_answered_once_complete(switch, autojump_clock):
    async with await connect(switch) as client:
        data = client.frame(sample_auth(1, 10000))
        await client.send_raw(data[:7])
        await trio.sleep(0.05)  # virtual: every task idle meanwhile, so the switch has read the first piece alone
        await client.send_raw(data[7:])
        response = await client.receive_message(TIMEOUT)
    assert response["t"] == "0110" and response["39"] == "00"


async def test_a_broken_length_header_closes_the_connection(switch, autojump_clock):
    async with await connect(switch) as client:
        await client.send_raw(b"ZZZZ")
        await client.wait_closed(TIMEOUT)
    await eventually(lambda: switch.closes["frame_error"] == 1)


async def test_a_tpdu_link_gets_answers_with_source_and_destination_swapped(start_switch, autojump_clock):
    sim = await start_switch(framing="binary2", tpdu=True)
    client = await FrontEndClient.connect("127.0.0.1", sim.port, sim.dialect, sim.framer, header=b"\x60\x00\x01\x00\x02")
    async with client:
        await client.send(sample_auth(1, 10000))
        frame = await client.receive_frame(TIMEOUT)
    assert frame.header == b"\x60\x00\x02\x00\x01"


# --------------------------------------------------------------------------- going down, chaos


async def test_stop_closes_every_connection_and_stops_listening(start_switch, nursery, autojump_clock):
    sim = await start_switch()
    async with await connect(sim) as client:
        await client.request(sample_auth(1, 10000), TIMEOUT)
        sim.stop()
        await client.wait_closed(TIMEOUT)
    with pytest.raises(OSError):
        await trio.open_tcp_stream("127.0.0.1", sim.port)
    # ... and comes back up on the same port.
    await nursery.start(sim.serve, "127.0.0.1", sim.port)
    async with await connect(sim) as client:
        assert (await client.request(sample_auth(2, 10000), TIMEOUT))["39"] == "00"


async def test_close_connections_drops_the_links_but_keeps_listening(switch, autojump_clock):
    async with await connect(switch) as client:
        switch.close_connections()
        await client.wait_closed(TIMEOUT)
    async with await connect(switch) as client:
        assert (await client.request(sample_auth(1, 10000), TIMEOUT))["39"] == "00"
    await eventually(lambda: switch.closes["stopped"] == 1)


async def test_chaos_drop_probability_one_never_answers_but_still_answers_network_management(start_switch, autojump_clock):
    sim = await start_switch(seed=1, drop_probability=1.0)
    async with await connect(sim) as client:
        with pytest.raises(RequestTimeout):
            await client.request(sample_auth(1, 10000), 0.15)
        assert (await client.request(sample_network(2), TIMEOUT))["39"] == "00"
    assert sim.records[0].action == "drop"


# --------------------------------------------------------------------------- records


async def test_records_never_hold_a_clear_pan(start_switch, tmp_path, autojump_clock):
    live = tmp_path / "live.jsonl"
    sim = await start_switch(record_file=str(live))
    async with await connect(sim) as client:
        original = sample_auth(1, 10000, pan=PAN)
        await client.request(original, TIMEOUT)
        await client.request(sample_auth(2, 10051, pan=PAN), TIMEOUT)
        await client.request(sample_reversal(original), TIMEOUT)
        with pytest.raises(RequestTimeout):
            await client.request(sample_auth(3, 10097, pan=PAN), 0.1)
    dumped = tmp_path / "dump.jsonl"
    assert sim.records_jsonl(dumped) == 4
    for path in (live, dumped):
        text = path.read_text()
        assert PAN not in text
        rows = [json.loads(line) for line in text.splitlines()]
        assert [r["action"] for r in rows] == ["approve", "decline", "approve", "drop"]
        assert {r["pan"] for r in rows} == {MASKED_PAN}
        assert rows[2]["applied"] is True and rows[2]["original"].startswith("0100000001")
    assert all(PAN not in repr(r) for r in sim.records)


def test_sample_auth_uses_utc_for_de7_and_casablanca_time_for_de12_and_de13():
    msg = sample_auth(42, 150_00, now=datetime(2025, 1, 15, 23, 30, 5, tzinfo=timezone.utc))
    assert (msg["7"], msg["12"], msg["13"]) == ("0115233005", "003005", "0116")  # UTC+1 in January
    ramadan = sample_auth(42, 150_00, now=datetime(2025, 3, 10, 12, 0, 0, tzinfo=timezone.utc))
    assert ramadan["12"] == "120000"  # UTC+0 during Ramadan
    assert msg["11"] == "000042" and msg["4"] == "000000015000" and len(msg["43"]) == 40
    assert msg["14"] == "2801"


# --------------------------------------------------------------------------- CLI hooks


def test_the_cli_options_default_to_loopback_and_port_9583():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([])
    assert (args.host, args.port, args.framing, args.echo_interval, args.record) == ("127.0.0.1", 9583, "ascii4", 0.0, None)


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to a child process")
def test_run_prints_a_summary_and_no_traceback_on_ctrl_c(tmp_path):
    code = (
        "import argparse, sys\n"
        "from iso_gateway.sim.switch import add_arguments, run\n"
        "p = argparse.ArgumentParser(); add_arguments(p)\n"
        "sys.exit(run(p.parse_args(sys.argv[1:])))\n"
    )
    with subprocess.Popen(
        [sys.executable, "-c", code, "--port", "0"],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    ) as proc:
        try:
            line = proc.stderr.readline()  # "sim-switch listening on ..." once the port is bound
            assert "listening on 127.0.0.1:" in line
            proc.send_signal(signal.SIGINT)
            rest = proc.communicate(timeout=5)[1]
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 0
    assert "Traceback" not in rest
    assert rest.startswith("sim-switch: 0 connections")


# --------------------------------------------------------------------------- options aimed at reversals


async def test_close_on_reversal_closes_on_that_amounts_reversal_while_its_authorization_follows_the_table(start_switch, autojump_clock):
    sim = await start_switch(close_on_reversal=frozenset({"000000010000"}))
    async with await connect(sim) as client:
        auth = sample_auth(1, 10000)
        assert (await client.request(auth, TIMEOUT))["39"] == "00"
        other = sample_auth(2, 12000)
        assert (await client.request(other, TIMEOUT))["39"] == "00"
        assert (await client.request(sample_reversal(other), TIMEOUT))["39"] == "00"
        with pytest.raises(ConnectionClosed):
            await client.request(sample_reversal(auth), TIMEOUT)
    await eventually(lambda: sim.closes["close"] == 1)
    assert [(r.mti, r.action, r.applied) for r in sim.records][-1] == ("0420", "close", False)


async def test_reversal_delay_acknowledges_every_reversal_that_much_later_and_nothing_else(start_switch, autojump_clock):
    sim = await start_switch(reversal_delay=0.3)
    async with await connect(sim) as client:
        auth = sample_auth(1, 10000)
        started = trio.current_time()
        assert (await client.request(auth, TIMEOUT))["39"] == "00"
        assert trio.current_time() - started < 0.25
        started = trio.current_time()
        assert (await client.request(sample_reversal(auth), TIMEOUT))["39"] == "00"
        assert trio.current_time() - started >= 0.28
    assert [(r.mti, r.action, r.applied) for r in sim.records][-1] == ("0420", "delay", True)


def test_a_reversal_delay_outside_its_bounds_is_refused():
    for bad in (-1.0, 61.0):
        with pytest.raises(ConfigError):
            SwitchBehaviour(reversal_delay=bad)
