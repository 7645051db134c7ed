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

import inspect
import time
from typing import Awaitable, Callable, TypeVar

import pytest
import trio
import trio.testing

# Real seconds the loop must stay idle before virtual time jumps: many times a journal commit or a
# loopback round trip, small next to the timers it skips.
IDLE_BEFORE_JUMP = 0.005

T = TypeVar("T")


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


# --------------------------------------------------------------------------- another process's state
#
# A daemon or a worker in a process of its own runs on the machine's clock whatever clock the test
# has: what it does can only be looked at, every so often, until it shows or a bound in real seconds
# passes. The bound is generous (a loaded machine is slow); a fast one returns at once.


def poll_real_sync(predicate: Callable[[], bool], seconds: float, look_every: float = 0.05) -> bool:
    """Look at ``predicate`` (from synchronous code) until it holds or ``seconds`` real seconds
    pass; whether it held. The predicate may raise (an assertion on the way) to stop early."""
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(look_every)
    return True


async def poll_real(probe: Callable[[], Awaitable[T] | T], done: Callable[[T], bool], seconds: float,
                    look_every: float = 0.1) -> T:
    """Call ``probe`` (sync or async) until ``done`` holds for what it returns, or ``seconds`` real
    seconds pass; the last value it returned (the caller asserts on it, with its own message)."""
    deadline = time.monotonic() + seconds
    while True:
        value = probe()
        if inspect.isawaitable(value):
            value = await value
        if done(value) or time.monotonic() > deadline:
            return value
        await trio.sleep(look_every)
