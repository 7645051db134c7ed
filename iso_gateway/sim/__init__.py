"""The simulators: a bank switch to test the gateway against, and a front-end client.

``SwitchSimulator`` answers like a switch, its behaviour chosen by the last
digits of each request's amount (see ``iso_gateway.sim.switch``);
``FrontEndClient`` sends pipelined requests and matches their responses, the
base of the load generator. Both use real sockets and trio; neither ever
records or prints a clear PAN.
"""

from __future__ import annotations

from .client import (
    ConnectionClosed,
    FrontEndClient,
    RequestTimeout,
    match_key,
    sample_auth,
    sample_network,
    sample_reversal,
)
from .switch import Outcome, Record, SwitchBehaviour, SwitchSimulator, outcome_for_amount

__all__ = [
    "ConnectionClosed",
    "FrontEndClient",
    "Outcome",
    "Record",
    "RequestTimeout",
    "SwitchBehaviour",
    "SwitchSimulator",
    "match_key",
    "outcome_for_amount",
    "sample_auth",
    "sample_network",
    "sample_reversal",
]
