"""The shell's one clock: wall time that moves with trio's clock.

Everything that schedules (deadlines, the SAF queue's due times, the purge) and everything that
stamps (DE 7 of the messages the gateway originates, the validation's "now", the journal's
timestamps) reads this one clock, so under trio's ``MockClock`` a test moves all of them at once
by sleeping in virtual time (``autojump_clock``), without waiting for real.

Wall time is the real epoch read once, when the clock starts, plus the trio time elapsed since:
the SAF queue outlives the process, so its due times are epoch seconds, while the event loop only
ever compares against trio's clock. (An NTP step after the start does not move it; trio's clock
is monotonic, and the next start reads the epoch again.) The core never reads this: it is given
``now`` values.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone

import trio


class Clock:
    """Epoch seconds (``wall``) and UTC datetimes (``utc``) on trio's clock.

    It starts at its first reading inside ``trio.run`` (or at ``start``): the gateway starts it
    when it runs, so it can be handed to what needs it before that."""

    __slots__ = ("_epoch0", "_trio0")

    def __init__(self) -> None:
        self._epoch0 = 0.0
        self._trio0: float | None = None

    def start(self) -> None:
        """Anchor: the real epoch now, against trio's clock now (call inside ``trio.run``)."""
        self._trio0 = trio.current_time()
        self._epoch0 = time.time()

    def wall(self) -> float:
        """Epoch seconds: moves with trio's clock (with a MockClock, with virtual time)."""
        if self._trio0 is None:
            self.start()
        return self._epoch0 + (trio.current_time() - self._trio0)  # type: ignore[operator]

    def utc(self) -> datetime:
        """``wall`` as a timezone-aware UTC datetime (DE 7, the validation's now)."""
        return datetime.fromtimestamp(self.wall(), timezone.utc)
