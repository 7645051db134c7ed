"""trio's MockClock for tests whose gateway runs the journal's thread and indexer process.

With ``autojump_clock`` (threshold 0) virtual time jumps to the next deadline the moment every trio
task is blocked, and that includes while they wait for the journal's thread (a SAF row committed
before the front end hears 91) or its indexer process: those run in real time, and a commit of a
millisecond can then let tens of virtual seconds pass, enough to time out a client that is only
waiting for that commit. ``journal_clock`` jumps only once the loop has been idle for
IDLE_BEFORE_JUMP real seconds: a commit or an indexer pass ends well before, while a wait for a
timer (SAF retries and polls, reversal deadlines, the index rotation) costs that much real time per
jump instead of the timer's. ``wait_real`` waits for a condition bounded in real seconds (what the
thread or the indexer writes), looking at it every ``look_every`` virtual seconds.
"""

from __future__ import annotations

import time
from typing import Callable

import pytest
import trio
import trio.testing

# Real seconds the loop must stay idle before virtual time jumps: many times a journal commit or a
# loopback round trip, small next to the timers it skips.
IDLE_BEFORE_JUMP = 0.005


@pytest.fixture
def journal_clock() -> trio.testing.MockClock:
    """A MockClock that jumps once the loop has been idle IDLE_BEFORE_JUMP real seconds (pytest-trio
    runs the test on any fixture that is a clock)."""
    return trio.testing.MockClock(autojump_threshold=IDLE_BEFORE_JUMP)


async def wait_real(predicate: Callable[[], bool], seconds: float = 10.0, what: str = "condition",
                    look_every: float = 0.1) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {seconds} real seconds waiting for {what}")
        await trio.sleep(look_every)  # on journal_clock, virtual: the next timer's turn comes meanwhile
