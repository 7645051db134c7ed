"""A transaction's journal states, and the fields a reversal is built from: decided by the flow
(``flow.py``), stored by the journal."""

# Journal states of a transaction (the journal stores them; the flow decides them).
RECEIVED = "received"          # journaled, not yet sent
FORWARDED = "forwarded"        # sent to the switch, no answer yet (in doubt after a crash)
ANSWERED = "answered"          # the switch answered (response_code)
TIMED_OUT = "timed_out"        # no answer in time: a reversal is queued
NOT_SENT = "not_sent"          # the link dropped before it left
REVERSED = "reversed"          # a reversal of it was acknowledged

# Fields a reversal is built from (docs/domain.md §1.2): never 14, 35, 36, 45, 48, 52, 55.
REVERSAL_FIELDS = ("2", "3", "4", "7", "11", "12", "13", "32", "33", "37", "41", "42", "49")
