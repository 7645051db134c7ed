"""The reversal sender's attempts against one link, without sockets: late 0430s and link drops, as properties.

The real flow (``core.flow``: the link's pending table, the upstream's outstanding
reversals) with a small executor that keeps the frames it is asked to send, and a fake
journal (that keeps each SAF row's state), stand around a real ``ReversalSender``; hypothesis
plays every order of attempts, deadlines passing, 0430s (in time, late, repeated,
refused) and link drops.
"""

from __future__ import annotations

from datetime import datetime, timezone
from types import SimpleNamespace

import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from iso_gateway.config import UpstreamConfig
from iso_gateway.core.flow import SAF_OUTCOME, SEND, Flow, FlowSettings
from iso_gateway.net.links import Upstream
from iso_gateway.core.message import encode
from iso_gateway.metrics import Metrics
from iso_gateway.reversals import ReversalSender
from iso_gateway.core.saf import build_reversal
from iso_gateway.journal.store import SAF_PENDING, SafItem
from iso_gateway.specfiles import get_dialect

BUDGET = 4


class FakeJournal:
    """Runs nothing; keeps the last state each SAF row was given, and the transactions reversed."""

    def __init__(self) -> None:
        self.store = SimpleNamespace(update_saf="update_saf")
        self.saf_state: dict[int, str] = {}
        self.reversed: list[int] = []

    def submit(self, fn: object, saf_id: int, *args: object, callback: object = None, **kwargs: object) -> None:
        assert fn == "update_saf"
        self.saf_state[saf_id] = str(kwargs["state"])

    def set_state(self, txn_id: int, state: str, *args: object) -> None:
        self.reversed.append(txn_id)


class FakeGateway:
    """The shell's part: executes the flow's SEND (keeps the frame) and SAF_OUTCOME actions."""

    def __init__(self) -> None:
        self.metrics = Metrics(process=False)
        self.flow: Flow
        self.frames: list[bytes] = []

    def run_flow(self) -> None:
        while self.flow.actions:
            for action in self.flow.take_actions():
                if action[0] == SEND:
                    self.frames.append(action[2])
                elif action[0] == SAF_OUTCOME:
                    action[1].owner.outcome(action[1], action[2], action[3])

    @property
    def unmatched(self) -> float:
        return self.metrics.unmatched_responses("cmi").get()


def rig() -> tuple[ReversalSender, FakeJournal, FakeGateway, object, SafItem]:
    gateway = FakeGateway()
    journal = FakeJournal()
    cfg = UpstreamConfig(name="cmi", hosts=["127.0.0.1:9"], saf_budget=BUDGET, reversal_timeout=1.0)
    upstream = Upstream(cfg, gateway, None, get_dialect(cfg.dialect))
    gateway.flow = Flow(FlowSettings(), None, {"cmi": upstream.side}, gateway.metrics, lambda: 1)  # type: ignore[arg-type]
    link = upstream.connections[0].link
    gateway.flow.link_connected(link)
    gateway.flow.link_ready(link)
    original = {"2": "4761739001010119", "4": "000000025000", "7": "1127101010", "11": "000123",
                "37": "633100000001", "41": "TERM0001", "42": "MERCHANT0000001", "49": "504"}
    message = build_reversal(original, original_mti="0100", upstream_stan="400001", reversal_mti="0420",
                             stan="000000", reason_code="68", now=datetime.now(timezone.utc))
    item = SafItem(id=1, txn_id=2, upstream="cmi", state=SAF_PENDING, reason="timeout", mti="0420", stan="",
                   f90=message["90"], attempts=0, next_attempt=0.0, created=0.0, message=message)
    worker = ReversalSender(SimpleNamespace(journal=journal, gateway=gateway), upstream)
    return worker, journal, gateway, link, item


def send(worker: ReversalSender, item: SafItem) -> bool:
    """One attempt through the worker, executed: whether a frame left."""
    gateway = worker.reversals.gateway
    before = len(gateway.frames)
    worker._send(item)
    gateway.run_flow()
    return len(gateway.frames) > before


def deadline(gateway: FakeGateway, link) -> None:
    gateway.flow.deadline(link, trio.current_time() + 3600)
    gateway.run_flow()


def drop(gateway: FakeGateway, link) -> None:
    gateway.flow.link_down(link, trio.current_time())
    gateway.run_flow()
    gateway.flow.link_connected(link)
    gateway.flow.link_ready(link)


def answer(gateway: FakeGateway, link, item: SafItem, rc: str) -> None:
    raw = encode(link.upstream.dialect, {"t": "0430", "11": item.stan, "39": rc, "4": item.message["4"]},
                 check_types=False)
    gateway.flow.switch_frame(link, raw, b"", trio.current_time())
    gateway.run_flow()


events = st.lists(st.sampled_from(["send", "deadline", "ack", "refuse", "drop"]), min_size=1, max_size=25)


@settings(max_examples=300, deadline=None)
@given(events)
def test_a_reversal_is_complete_at_its_first_0430_with_00_whenever_it_comes_and_never_sent_after(script):
    async def play() -> None:
        worker, journal, gateway, link, item = rig()
        suspected = False
        sent = gateway.metrics.reversals
        for event in script:
            state = journal.saf_state.get(item.id, SAF_PENDING)
            complete = state in ("acked", "parked")
            if event == "send":
                went = item.id not in worker.in_flight and not complete and send(worker, item)
                # Never after completion, never on the shared link once suspected (it waits to go alone).
                assert not went or not (complete or suspected)
            elif event == "deadline":
                deadline(gateway, link)
            elif event in ("ack", "refuse"):
                if not item.stan:
                    continue  # never sent: nothing to answer
                unmatched = gateway.unmatched
                answer(gateway, link, item, "00" if event == "ack" else "05")
                if event == "ack" and not complete:
                    # Any 0430 with 00 for an outstanding reversal completes it: in time or late.
                    assert journal.saf_state[item.id] == "acked" and gateway.unmatched == unmatched
                if event == "ack" and state == "acked":
                    assert gateway.unmatched == unmatched + 1  # a second one is nobody's
            else:  # the switch drops the link: whatever was in flight is suspected
                in_flight = item.id in worker.in_flight
                drop(gateway, link)
                if in_flight and not complete:
                    suspected = journal.saf_state[item.id] != "parked"
            assert sent("cmi", "sent").get() + sent("cmi", "repeated").get() <= BUDGET
        acknowledged = gateway.metrics.reversals("cmi", "acknowledged").get()
        assert acknowledged == (1 if journal.saf_state.get(item.id) == "acked" else 0)
        assert journal.reversed == ([2] if acknowledged else [])
        if journal.saf_state.get(item.id) in ("acked", "parked"):  # complete: nothing of it stays outstanding
            assert not link.upstream.outstanding

    trio.run(play)


def test_two_reversals_never_share_a_stan_while_outstanding_and_a_parked_one_frees_it():
    async def play() -> None:
        worker, journal, gateway, link, first = rig()
        second = SafItem(id=9, txn_id=10, upstream="cmi", state=SAF_PENDING, reason="timeout", mti="0420",
                         stan="", f90=first.f90, attempts=0, next_attempt=0.0, created=0.0,
                         message=dict(first.message))
        first.stan = second.stan = "400001"  # reversal_stan = "original": two originals with one upstream STAN
        assert send(worker, first)
        deadline(gateway, link)
        assert not send(worker, second)  # the first is still outstanding under that STAN
        worker._park(first, "by hand")
        assert send(worker, second)
        answer(gateway, link, second, "00")
        assert journal.saf_state == {first.id: "parked", second.id: "acked"}

    trio.run(play)
