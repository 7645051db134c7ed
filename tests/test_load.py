"""The load generator: mixes and requests without sockets, runs against the simulator on 127.0.0.1.

Every run here is bounded by a count or a short duration and a short timeout;
nothing asserts on timing, only on counts.
"""

from __future__ import annotations

import collections
import json
import signal
import subprocess
import sys
import threading
from datetime import datetime, timezone
from pathlib import Path

import pytest
import trio

from iso_gateway import cli
from iso_gateway.specfiles import get_dialect
from iso_gateway.core.errors import ConfigError
from iso_gateway.core.framing import framer_from_config
from iso_gateway.load import JSON_SCHEMA, LoadError, LoadOptions, LoadResult, Progress, RequestFactory, load_mix, luhn_check_digit, run_load
from iso_gateway.load import engine as load_engine
from iso_gateway.load.command import ProgressLine
from iso_gateway.load.mix import parse_mix
from iso_gateway.load.report import ERROR_KINDS, Tally
from iso_gateway.load.responder import InstantResponder
from iso_gateway.core.masking import luhn_ok
from iso_gateway.core.message import decode
from iso_gateway.sim.client import CASABLANCA
from iso_gateway.sim.switch import SwitchSimulator
from conftest import wait_for

TIMEOUT = 2.0  # per request, in every run against the simulator (generous: a busy CI machine is slow)

# A mix with known shares: of every 100 messages, 80 approved, 10 declined 51, 5 declined 05, 5 never answered.
SHARES_MIX = """
pool = 100
[[messages]]
mti = "0100"
weight = 3
[[messages]]
mti = "0200"
weight = 1
[[amounts]]
range = [1000, 90000]
step = 100
weight = 80
[[amounts]]
values = [10051, 20051]
weight = 10
[[amounts]]
values = [10005]
weight = 5
[[amounts]]
values = [10097]
weight = 5
[[pans]]
bin = "476173"
weight = 1
[[pans]]
range = ["5413330000000000", "5413330000009999"]
weight = 1
[terminals]
prefix = "LT"
count = 4
[[merchants]]
id = "MERCHANT0000001"
[[currencies]]
code = "504"
[fields]
3 = "000000"
"""


@pytest.fixture
def shares_mix(tmp_path: Path) -> str:
    path = tmp_path / "shares.toml"
    path.write_text(SHARES_MIX)
    return str(path)


@pytest.fixture
async def switch(nursery) -> SwitchSimulator:
    sim = SwitchSimulator()
    await nursery.start(sim.serve, "127.0.0.1", 0)
    yield sim
    assert sim.closes["error"] == 0


def options(port: int, **kw: object) -> LoadOptions:
    kw.setdefault("timeout", TIMEOUT)
    kw.setdefault("seed", 7)
    return LoadOptions(host="127.0.0.1", port=port, **kw)  # type: ignore[arg-type]


def factory(mix_text: str = SHARES_MIX, dialect: str = "iso87ascii", **kw: object) -> RequestFactory:
    return RequestFactory(parse_mix(mix_text, "<test>"), get_dialect(dialect), framer_from_config("ascii4"), seed=1, **kw)  # type: ignore[arg-type]


def decoded(f: RequestFactory, n: int, wall: float) -> list[dict[str, str]]:
    decoder = f.framer.decoder()
    out = []
    for _ in range(n):
        frame, key = f.next(wall)
        (fr,) = decoder.feed(frame)
        msg = decode(f.dialect, fr.message)
        assert key == (msg["t"][:3], msg["41"], msg["11"])
        out.append(msg)
    return out


# --------------------------------------------------------------------------- mixes and requests (no sockets)


def test_the_luhn_check_digit_makes_a_valid_card_number() -> None:
    for body in ("476173900101011", "541333008902001", "400005665566555", "7992739871"):
        assert luhn_ok(body + luhn_check_digit(body))
        assert sum(luhn_ok(body + d) for d in "0123456789") == 1


def test_generated_pans_pass_luhn_and_stay_in_their_bin_or_range() -> None:
    msgs = decoded(factory(), 100, 1_800_000_000.0)
    pans = [m["2"] for m in msgs]
    assert all(luhn_ok(p) for p in pans)
    assert all(p.startswith("476173") and len(p) == 16 or "5413330000000000" <= p <= "5413330000009999" for p in pans)
    assert sum(p.startswith("476173") for p in pans) == 50  # weights 1:1, exactly, over one pool
    assert len(set(pans)) > 90


def test_every_weight_is_honoured_exactly_over_a_pool() -> None:
    msgs = decoded(factory(), 200, 1_800_000_000.0)  # two pools of 100
    endings = collections.Counter(m["4"][-2:] for m in msgs)
    assert endings["51"] == 20 and endings["05"] == 10 and endings["97"] == 10
    assert collections.Counter(m["t"] for m in msgs) == {"0100": 150, "0200": 50}
    assert all(m["4"].endswith("00") for m in msgs if m["4"][-2:] not in ("51", "05", "97"))


def test_stans_are_unique_per_terminal_and_rrns_unique_per_run() -> None:
    msgs = decoded(factory(), 400, 1_800_000_000.0)
    per_terminal = collections.defaultdict(list)
    for m in msgs:
        per_terminal[m["41"]].append(int(m["11"]))
    assert sorted(per_terminal) == ["LT000001", "LT000002", "LT000003", "LT000004"]
    for stans in per_terminal.values():
        assert stans == list(range(1, len(stans) + 1))  # 000001, 000002, ... per terminal
    assert len({m["37"] for m in msgs}) == 400


def test_stans_wrap_within_the_block_of_each_worker_process() -> None:
    mix = SHARES_MIX.replace('prefix = "LT"\ncount = 4', 'ids = ["ONLY1"]')
    first = factory(mix, worker=0, workers=2)
    second = factory(mix, worker=1, workers=2)
    first._stan_next[0] = first._stan_block - 2  # near the end of worker 0's block: 000001..499999
    stans = [m["11"] for m in decoded(first, 3, 1_800_000_000.0)]
    assert stans == ["499998", "499999", "000001"]
    assert [m["11"] for m in decoded(second, 2, 1_800_000_000.0)] == ["500000", "500001"]


def test_de7_is_utc_and_de12_13_are_casablanca_time_in_the_binary_dialect_too() -> None:
    wall = datetime(2026, 3, 1, 23, 30, 5, tzinfo=timezone.utc).timestamp()
    for dialect in ("iso87ascii", "iso87binary"):
        (msg,) = decoded(factory(dialect=dialect), 1, wall)
        local = datetime.fromtimestamp(wall, timezone.utc).astimezone(CASABLANCA)
        assert msg["7"] == "0301233005"
        assert msg["12"] == local.strftime("%H%M%S") and msg["13"] == local.strftime("%m%d")
        assert msg["37"].startswith("6060")  # YDDD: 2026, day 60
    later = decoded(factory(), 1, wall + 61.0)[0]
    assert later["7"] == "0301233106"


def test_the_shipped_mixes_encode_under_the_1987_dialects() -> None:
    for name in ("ecom", "ecom-faults"):
        mix, source = load_mix(name)
        for dialect in ("iso87ascii", "iso87binary"):
            f = RequestFactory(mix, get_dialect(dialect), framer_from_config("binary2", tpdu=True), seed=1, source=source)
            assert f.pool_size == mix.pool


@pytest.mark.parametrize(
    ("change", "where"),
    [
        (("weight = 5\n[[pans]]", "weight = 0\n[[pans]]"), "amounts.3.weight"),
        (('mti = "0200"', 'mti = "0210"'), "messages.1.mti"),
        (('bin = "476173"', 'bin = "47617x"'), "pans.0"),
        (('3 = "000000"', '11 = "000001"'), "fields"),
        (('code = "504"', 'code = "MAD"'), "currencies.0.code"),
    ],
)
def test_a_bad_mix_is_refused_with_the_key_path(change: tuple[str, str], where: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_mix(SHARES_MIX.replace(*change), "shares.toml")
    assert err.value.source == "shares.toml" and err.value.where.startswith(where)


def test_a_weight_too_small_for_the_pool_is_refused() -> None:
    with pytest.raises(ConfigError, match="raise `pool`"):
        factory(SHARES_MIX.replace("weight = 5\n[[pans]]", "weight = 0.1\n[[pans]]"))


def test_a_run_is_shared_out_over_processes_exactly() -> None:
    parts = options(1, connections=5, count=1001, processes=2).split()
    assert [p.connections for p in parts] == [3, 2] and sum(p.count for p in parts) == 1001  # type: ignore[misc]
    parts = options(1, connections=4, rate=1000.0, processes=3).split()
    assert [p.connections for p in parts] == [2, 1, 1] and [p.rate for p in parts] == [500.0, 250.0, 250.0]
    with pytest.raises(ConfigError):
        options(1, connections=1, processes=2)
    with pytest.raises(ConfigError):
        options(1, count=10, duration=1.0)


def _result(tally: Tally, **kw: object) -> LoadResult:
    base = dict(target="127.0.0.1:1", dialect="iso87ascii", framing="ascii4", mix="ecom", mode="closed", rate=None,
                connections=1, in_flight=8, processes=1, warmup_s=0.0, timeout_s=1.0, seed=1, sent=tally.sent,
                answered=tally.answered, timeouts=tally.timeouts, codes=tally.codes, errors=tally.errors,
                latency=tally.latency, window_s=1.0, elapsed_s=1.0)
    base.update(kw)
    return LoadResult(**base)  # type: ignore[arg-type]


def test_results_of_processes_merge_counts_and_histograms() -> None:
    a, b = Tally(), Tally()
    for tally, values in ((a, range(100, 1100)), (b, range(5000, 6000))):
        for v in values:
            tally.latency.record_value(v)
        tally.sent = tally.answered = 1000
        tally.codes = {"00": 990, "51": 10}
    b.errors["unmatched"] = 3
    wire = [LoadResult.from_wire(json.loads(json.dumps(_result(t).to_wire()))) for t in (a, b)]
    merged = LoadResult.merge(wire)
    assert merged.sent == 2000 and merged.codes == {"00": 1980, "51": 20} and merged.errors["unmatched"] == 3
    assert merged.latency.get_total_count() == 2000 and merged.max_ms == pytest.approx(6.0, rel=1e-3)
    assert merged.percentile_ms(50) == pytest.approx(1.1, rel=1e-2)
    assert merged.processes == 2 and merged.throughput == pytest.approx(2000.0)


def test_the_json_report_keeps_its_keys_even_with_no_answer() -> None:
    doc = _result(Tally()).to_json()
    assert doc["schema"] == JSON_SCHEMA
    assert set(doc) >= {"target", "mode", "rate", "connections", "in_flight", "processes", "sent", "answered",
                        "timeouts", "response_codes", "errors", "throughput_rps", "latency_ms", "window_s", "seed"}
    assert list(doc["errors"]) == list(ERROR_KINDS)
    assert doc["latency_ms"] == {"p50": None, "p90": None, "p99": None, "p99_9": None, "max": None, "min": None, "mean": None}
    json.dumps(doc)


# --------------------------------------------------------------------------- runs against the simulator


async def test_a_count_run_sends_exactly_that_many_and_codes_follow_the_mix(switch: SwitchSimulator, shares_mix: str) -> None:
    result = await run_load(options(switch.port, mix=shares_mix, count=400, connections=2, in_flight=32))
    assert result.sent == 400 == result.answered + result.timeouts
    assert result.codes == {"00": 320, "51": 40, "05": 20}
    assert result.timeouts == 20  # the ...97 amounts: never answered
    assert result.error_count == 0
    assert switch.count("0100") == 300 and switch.count("0200") == 100
    assert result.latency.get_total_count() == 380 and result.percentile_ms(99) is not None
    # Unique STANs per terminal, on the wire.
    keys = [(r.terminal, r.stan) for r in switch.records]
    assert len(keys) == 400 == len(set(keys))
    assert len({r.rrn for r in switch.records}) == 400


async def test_an_open_loop_run_sends_its_schedule(switch: SwitchSimulator) -> None:
    result = await run_load(options(switch.port, rate=400.0, duration=0.5, connections=2))
    assert result.mode == "open" and result.sent == 200 == result.answered
    assert result.send_lag is not None and result.send_lag.get_total_count() == 200
    assert result.to_json()["send_lag_ms"]["max"] is not None


async def test_an_open_loop_count_run_sends_exactly_the_count_after_the_warmup(switch: SwitchSimulator) -> None:
    result = await run_load(options(switch.port, rate=1000.0, count=150, warmup=0.1, connections=1))
    assert result.sent == 150 == result.answered
    assert switch.count("0100") + switch.count("0200") == 250  # 100 warm-up requests, not counted


async def test_warmup_requests_are_left_out_of_a_closed_loop_run(switch: SwitchSimulator) -> None:
    result = await run_load(options(switch.port, count=100, warmup=0.2, connections=1, in_flight=4))
    received = switch.count("0100") + switch.count("0200")
    assert result.sent == 100 == result.answered and received > 100
    assert result.latency.get_total_count() == 100


async def test_a_target_that_closes_the_connection_counts_lost_requests_and_reconnects(switch: SwitchSimulator, tmp_path: Path) -> None:
    mix = tmp_path / "close.toml"
    mix.write_text(SHARES_MIX.replace("values = [10097]", "values = [10098]"))  # ...98: the switch closes the connection
    result = await run_load(options(switch.port, mix=str(mix), count=200, connections=1, in_flight=1))
    assert result.sent == 200
    assert result.errors["disconnects"] == 10 == result.errors["lost"]
    assert result.answered == 190 and switch.accepted == 11


async def test_echo_requests_from_the_target_are_answered_while_loading(nursery) -> None:
    sim = SwitchSimulator(echo_interval=0.05)
    await nursery.start(sim.serve, "127.0.0.1", 0)
    result = await run_load(options(sim.port, rate=200.0, duration=0.4, connections=1))
    assert result.sent == 80 == result.answered and result.error_count == 0
    assert sim.echo_answered > 0


async def test_progress_is_reported_while_running(switch: SwitchSimulator, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(load_engine, "PROGRESS_INTERVAL", 0.05)
    seen: list[Progress] = []
    result = await run_load(options(switch.port, rate=500.0, duration=0.4, connections=1), progress=seen.append)
    assert seen and all(a.sent <= b.sent for a, b in zip(seen, seen[1:], strict=False))
    assert seen[-1].sent <= result.sent and any(p.p99_ms is not None for p in seen)


def test_the_progress_line_rewrites_one_line() -> None:
    import io

    out = io.StringIO()
    line = ProgressLine(out)
    line(Progress(1.0, "load", 2000, 1990, 1, 0, 1990.0, 1.25, 10))
    line(Progress(2.0, "load", 4000, 3990, 1, 0, 2000.0, None, 10))
    line.clear()
    text = out.getvalue()
    assert "\n" not in text and text.count("\r") == 3
    assert "sent 2,000" in text and "p99 1.25 ms" in text and "p99 -" in text


async def test_an_unreachable_target_is_a_load_error() -> None:
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: connections are refused
        with pytest.raises(LoadError, match="can't connect"):
            await run_load(options(port, count=10))


async def test_the_binary_dialect_with_a_tpdu_is_matched(nursery) -> None:
    sim = SwitchSimulator(dialect="iso87binary", framing="binary2", tpdu=True)
    await nursery.start(sim.serve, "127.0.0.1", 0)
    result = await run_load(options(sim.port, dialect="iso87binary", framing="binary2", tpdu=True, count=100, connections=2))
    assert result.answered == 100 and result.error_count == 0


async def test_the_instant_responder_answers_every_request(nursery) -> None:
    responder = InstantResponder()
    port = await nursery.start(responder.serve, "127.0.0.1", 0)
    result = await run_load(options(port, count=3000, connections=2, in_flight=64))
    assert result.answered == 3000 == responder.answered and result.codes == {"00": 3000}


async def test_processes_run_side_by_side_and_their_results_merge(switch: SwitchSimulator, shares_mix: str) -> None:
    result = await run_load(options(switch.port, mix=shares_mix, count=400, connections=2, in_flight=16, processes=2))
    assert result.processes == 2 and result.connections == 2
    assert result.sent == 400 and result.codes == {"00": 320, "51": 40, "05": 20} and result.timeouts == 20
    assert result.latency.get_total_count() == 380
    keys = [(r.terminal, r.stan) for r in switch.records]
    assert len(keys) == 400 == len(set(keys))  # the two processes' STAN blocks never meet


# --------------------------------------------------------------------------- the command


def test_the_load_command_prints_a_json_report(capsys: pytest.CaptureFixture[str]) -> None:
    responder = InstantResponder()
    started = threading.Event()
    token: list[trio.lowlevel.TrioToken] = []
    scope = trio.CancelScope()

    async def serve() -> None:
        token.append(trio.lowlevel.current_trio_token())
        with scope:
            async with trio.open_nursery() as nursery:
                await nursery.start(responder.serve, "127.0.0.1", 0)
                started.set()

    thread = threading.Thread(target=trio.run, args=(serve,), daemon=True)
    thread.start()
    assert started.wait(10)
    try:
        code = cli.main(["load", "--target", f"127.0.0.1:{responder.port}", "--count", "500", "--connections", "2",
                         "--timeout", "2", "--json"])
    finally:
        trio.from_thread.run_sync(scope.cancel, trio_token=token[0])
        thread.join(10)
    assert code == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["schema"] == JSON_SCHEMA and doc["sent"] == 500 and doc["response_codes"] == {"00": 500}
    assert doc["latency_ms"]["p99"] > 0 and doc["connections"] == 2 and doc["in_flight"] == 8


def test_bad_load_options_exit_2_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["load", "--target", "nowhere"]) == 2
    assert cli.main(["load", "--target", "127.0.0.1:9", "--mix", "no-such-mix"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "HOST:PORT" in err[0] and "unknown mix" in err[1]


async def test_an_interrupted_run_stops_sending_drains_and_still_reports(nursery) -> None:
    responder = InstantResponder()
    port = await nursery.start(responder.serve, "127.0.0.1", 0)
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "iso_gateway", "load", "--target", f"127.0.0.1:{port}", "--duration", "60", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        await wait_for(lambda: responder.answered > 0, timeout=20.0, what="the load to start")
        proc.send_signal(signal.SIGINT)
        with trio.fail_after(20):
            out = b""
            while chunk := await proc.stdout.receive_some():  # type: ignore[union-attr]
                out += chunk
            await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0
    doc = json.loads(out)
    assert doc["aborted"] == "interrupted" and doc["sent"] == doc["answered"] > 0
