"""Reversals and their retry policy: what a store-and-forward item is sent as, and when again.

A timed-out authorization becomes a reversal advice (0420 by default, 0400 if
the switch wants it) built from the original's fields: the amount and the
identities the switch needs, field 90 pointing at the original as the switch saw
it, never CVV2, track data or a PIN block. The first attempt goes out as 0420;
every repeat as 0421 with the same STAN and field 90 (docs/domain.md §1.1). Each item
keeps its own retry state, so one the switch keeps refusing never blocks the
others; after ``budget`` attempts it is parked for an operator (counted, never
dropped).

Sans-IO: times are passed in, plain floats (wall-clock seconds, since the queue
outlives the process) and the reversal's DE 7 ``now``; nothing here reads a clock.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime

from .message import OriginalData, repeat_mti

# PayEx repeats a reversal advice with exponential back-off and asks for manual
# action after 6 failed attempts; one switch operator uses a budget of 5 (docs/domain.md §3.4).
DEFAULT_BUDGET = 6


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """When to try a reversal again. Every field documents its default and unit."""

    # Seconds before the first attempt: a late decline can still cancel it. The default is 1 s.
    first_delay: float = 1.0
    # Seconds before the first repeat; doubles each time. The default is 5 s.
    initial: float = 5.0
    # Longest wait between attempts, seconds. The default is 300 s.
    maximum: float = 300.0
    # Attempts (0420 + 0421s) before the item is parked. The default is 6.
    budget: int = DEFAULT_BUDGET
    # Random extra wait, as a fraction of the delay. The default is 0.2.
    jitter: float = 0.2

    def next_attempt(self, attempts: int, now: float, rng: random.Random | None = None) -> float | None:
        """When to try again after ``attempts`` unacknowledged attempts; None: park it."""
        if attempts >= self.budget:
            return None
        delay = min(self.initial * (2 ** max(0, attempts - 1)), self.maximum)
        return now + delay * (1 + (rng or random).uniform(0, self.jitter))


def build_reversal(original: dict[str, str], *, original_mti: str, upstream_stan: str, reversal_mti: str,
                   stan: str, reason_code: str | None, auth_code: str | None = None,
                   now: datetime) -> dict[str, str]:
    """The reversal message of ``original`` as the switch saw it.

    ``original`` holds the front end's fields; the switch saw them with the
    gateway's ``upstream_stan``, which is what field 90 points at. ``stan`` is
    the reversal's own STAN (a new one, or the original's: verify with the switch).
    ``now`` (timezone-aware UTC) is the reversal's transmission time, DE 7.
    """
    msg = {"t": reversal_mti}
    for key in ("2", "3", "4", "12", "13", "32", "33", "37", "41", "42", "49"):
        if key in original:
            msg[key] = original[key]
    msg["7"] = now.strftime("%m%d%H%M%S")
    msg["11"] = stan
    if auth_code:
        msg["38"] = auth_code
    if reason_code:
        msg["39"] = reason_code  # v87 links often carry the reversal reason here (docs/domain.md §3.1)
    msg["90"] = OriginalData(
        mti=original_mti, stan=upstream_stan, transmission=original.get("7", "0"),
        acquirer=original.get("32", ""), forwarder=original.get("33", ""),
    ).encode()
    return msg


def attempt_mti(message_mti: str, attempts: int) -> str:
    """0420 the first time, 0421 for every repeat."""
    return repeat_mti(message_mti) if attempts > 0 else message_mti
