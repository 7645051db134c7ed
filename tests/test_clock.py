"""The shell's one clock (clock.py): epoch seconds that move with trio's clock, so a MockClock moves
every due time and timestamp the gateway makes."""

from __future__ import annotations

import time
from datetime import timezone

import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from iso_gateway.clock import Clock
import realtime
from realtime import wait_real
from iso_gateway.net.links import transmission_time

journal_clock = realtime.journal_clock  # a fixture: trio's MockClock for a gateway with a journal


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(min_value=0.0, max_value=90 * 86400.0), max_size=8))
def test_the_wall_clock_moves_exactly_as_far_as_trios_clock_from_the_epoch_it_started_at(jumps):
    async def main() -> None:
        clock = Clock()
        before = time.time()
        clock.start()
        start = clock.wall()
        assert before - 1 <= start <= time.time() + 1  # the real epoch, read once
        for seconds in jumps:
            mock.jump(seconds)
        assert abs(clock.wall() - (start + sum(jumps))) < 1e-3 * (1 + len(jumps))
        utc = clock.utc()
        assert utc.tzinfo is timezone.utc and abs(utc.timestamp() - clock.wall()) < 1e-3

    mock = trio.testing.MockClock()
    trio.run(main, clock=mock)


def test_a_clock_read_before_it_is_started_starts_itself_and_de_7_is_its_utc_time():
    async def main() -> None:
        clock = Clock()
        first = clock.wall()
        mock.jump(3600)
        assert 3599.999 < clock.wall() - first < 3600.001
        assert transmission_time(clock.utc()) == clock.utc().strftime("%m%d%H%M%S")

    mock = trio.testing.MockClock()
    trio.run(main, clock=mock)


async def test_the_gateway_checks_de_7_against_its_clock_so_a_mock_clock_two_days_on_refuses_the_machines_time(
        harness, journal_clock):
    await harness.start_switch()
    gw = await harness.start_gateway()
    client = await harness.client()
    assert (await client.request(harness.auth(15000), timeout=30))["39"] == "00"
    journal_clock.jump(2 * 86400)
    await wait_real(lambda: gw.upstreams["cmi"].ready, 10, "the link ready")  # two idle days may have dropped it
    client = await harness.client()
    answer = await client.request(harness.auth(15000), timeout=30)  # DE 7: the machine's time, two days behind
    assert answer["39"] == "30"
