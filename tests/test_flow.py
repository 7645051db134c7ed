"""The transaction flow without sockets: events in, actions out, a clock that is a number.

Every scenario the end-to-end tests cover (approve, decline, the reject codes, a timeout
answered 91 and reversed, late answers, a lost link, a journal that fails, duplicates,
front-end reversals, 0800s both ways, undeliverable answers) runs here as a sequence of
calls on ``core.flow.Flow``, each checked against the actions it returns. Then properties
over random interleavings: every request gets exactly one answer, a switch never sees
two requests in flight with one STAN on one link, and each front end gets its own STAN back.
"""

from __future__ import annotations

import itertools
from datetime import datetime, timezone
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from iso_gateway.core import flow as F
from iso_gateway.core.flow import Flow, FlowSettings, FrontSide, Link, UpstreamSide
from iso_gateway.core.framing import framer_from_config
from iso_gateway.core.message import OriginalData, decode, encode
from iso_gateway.core.routing import RouteRule, RouteTable
from iso_gateway.core.scanner import Scanner
from iso_gateway.journal.store import TxnRow
from iso_gateway.metrics import Metrics
from iso_gateway.net.frontend import ROUTING_FIELDS
from iso_gateway.sim.client import sample_auth, sample_network, sample_reversal
from iso_gateway.specfiles import get_dialect, load_rules

NOW = datetime(2026, 11, 27, 10, 10, 10, tzinfo=timezone.utc)
TIMEOUT = 5.0
NAMES = {v: k for k, v in vars(F).items() if k.isupper() and isinstance(v, int) and k not in (
    "INFO", "WARNING", "ERROR", "LATE_MEMORY", "OUTSTANDING_MEMORY", "STAN_BLOCK", "UNANSWERED_NOT_READY")}


class World:
    """One listener (iso87ascii, ascii4 framing) and one upstream with ``links`` links, fed by hand."""

    def __init__(self, *, journaling: bool = True, duplicate_window: float = 0.0, links: int = 1,
                 upstream_dialect: str = "iso87ascii", routes: list[RouteRule] | None = None,
                 dialect: str = "iso87ascii", **settings: Any) -> None:
        self.t = 1000.0
        self.dialect = get_dialect(dialect)
        self.up_dialect = get_dialect(upstream_dialect)
        self.framer = framer_from_config("ascii4")
        self.up = UpstreamSide("cmi", self.up_dialect, framer_from_config("ascii4"), b"", reversal_timeout=10.0)
        self.links = [Link(self.up, i) for i in range(links)]
        self.up.links.extend(self.links)
        ids = itertools.count(1)
        self.metrics = Metrics(process=False)
        table = RouteTable(routes or [RouteRule("all", "cmi", TIMEOUT, (), (), (), (), ())])
        self.flow = Flow(FlowSettings(journaling=journaling, **settings), table, {"cmi": self.up}, self.metrics,
                         lambda: next(ids), duplicate_window)
        rules = load_rules("default")
        self.side = FrontSide("ecom", self.dialect, rules, self.framer,
                              Scanner(self.dialect, rules.fields_needed | ROUTING_FIELDS))
        self.fronts = itertools.count(1)
        self.stans = itertools.count(1)
        self.flow.begin_round(NOW.timestamp())
        for link in self.links:
            self.flow.link_connected(link)
            self.flow.link_ready(link)
        self.flow.take_actions()

    # -- events

    def front(self) -> SimpleNamespace:
        return SimpleNamespace(side=self.side, closed=False, id=next(self.fronts))

    def auth(self, amount: int = 15000, **kw: Any) -> dict[str, str]:
        return sample_auth(next(self.stans), amount, now=NOW, **kw)

    def request(self, front: Any, msg: dict[str, str]) -> list[tuple]:
        self.flow.front_frame(front, encode(self.dialect, msg), b"", self.t)
        return self.flow.take_actions()

    def journaled(self, actions: list[tuple], error: BaseException | None = None) -> list[tuple]:
        """The journal takes every RECORD in ``actions`` (or fails with ``error``)."""
        for a in actions:
            if a[0] == F.RECORD:
                self.flow.journal_done(a[1], error, self.t)
        return self.flow.take_actions()

    def forward(self, front: Any, msg: dict[str, str]) -> tuple[Any, dict[str, str]]:
        """A request journaled and sent: its Txn and the message the switch got."""
        actions = self.request(front, msg)
        (record,) = of(actions, F.RECORD)
        (send,) = of(self.journaled(actions), F.SEND)
        return record[1], self.switch_msg(send)

    def switch_msg(self, send: tuple) -> dict[str, str]:
        return decode(self.up_dialect, send[2][4:])

    def switch(self, msg: dict[str, str], link: Link | None = None) -> list[tuple]:
        self.flow.switch_frame(link or self.links[0], encode(self.up_dialect, msg, check_types=False), b"", self.t)
        return self.flow.take_actions()

    def answer(self, sent: dict[str, str], rc: str = "00", link: Link | None = None, **extra: str) -> list[tuple]:
        resp = {k: v for k, v in sent.items() if k not in ("t", "2", "14", "22", "25", "26")}
        resp.update({"t": sent["t"][:2] + str(int(sent["t"][2]) + 1) + sent["t"][3], "39": rc, **extra})
        return self.switch(resp, link)

    def later(self, seconds: float, link: Link | None = None) -> list[tuple]:
        self.t += seconds
        self.flow.deadline(link or self.links[0], self.t)
        return self.flow.take_actions()

    def answers(self, actions: list[tuple]) -> list[dict[str, str] | None]:
        return [decode(self.dialect, a[2][4:]) if a[2] is not None else None for a in of(actions, F.ANSWER)]


def of(actions: list[tuple], op: int) -> list[tuple]:
    return [a for a in actions if a[0] == op]


def ops(actions: list[tuple]) -> list[str]:
    return [NAMES[a[0]] for a in actions if a[0] != F.LOG]


# ---------------------------------------------------------------------------------- answers


def test_an_approval_goes_out_after_the_journal_has_it_and_comes_back_with_the_front_ends_stan():
    w = World()
    front = w.front()
    msg = w.auth()
    actions = w.request(front, msg)
    assert ops(actions) == ["ARM", "RECORD"]  # journaled first: nothing is sent before the journal has it
    (record,) = of(actions, F.RECORD)
    assert record[2]["mti"] == "0100" and "2" not in record[2] and record[3]["2"] == msg["2"]  # the PAN: sealed fields only
    (send,) = of(w.journaled(actions), F.SEND)
    sent = w.switch_msg(send)
    assert sent["2"] == msg["2"] and sent["4"] == msg["4"] and sent["11"] == record[2]["upstream_stan"]
    out = w.answer(sent, "00", **{"38": "A12345"})
    (answer,) = w.answers(out)
    assert answer["t"] == "0110" and answer["39"] == "00" and answer["11"] == msg["11"] and answer["38"] == "A12345"
    txn = of(out, F.ANSWER)[0][3]
    w.flow.delivered(txn, True)
    assert of(w.flow.take_actions(), F.STATE) == [(F.STATE, txn.txn_id, "answered", "00", "A12345")]
    assert w.flow.in_flight == 0 and len(w.links[0].pending) == 0


def test_a_decline_is_answered_as_the_switch_gave_it_and_journaled_as_answered():
    w = World()
    front = w.front()
    txn, sent = w.forward(front, w.auth())
    (answer,) = w.answers(w.answer(sent, "05"))
    assert answer["39"] == "05"
    w.flow.delivered(txn, True)
    assert of(w.flow.take_actions(), F.STATE)[0][2:4] == ("answered", "05")


@pytest.mark.parametrize("change, code", [
    ({"4": "000000000000"}, "13"),  # zero amount
    ({"49": "999"}, "13"),  # unknown currency: the rule set's code
])
def test_a_request_the_rules_refuse_is_answered_locally_and_never_sent(change, code):
    w = World()
    actions = w.request(w.front(), {**w.auth(), **change})
    assert ops(actions) == ["ANSWER"]
    assert w.answers(actions)[0]["39"] in (code, "30", "12")


def test_bytes_that_do_not_decode_are_answered_30_echoing_what_was_read():
    w = World()
    front = w.front()
    raw = encode(w.dialect, w.auth())
    w.flow.front_frame(front, raw[:-3], b"", w.t)  # cut short
    (answer,) = w.answers(w.flow.take_actions())
    assert answer["t"] == "0110" and answer["39"] == "30"


def test_a_response_sent_by_a_front_end_is_dropped_but_still_ends_its_request():
    w = World()
    actions = w.request(w.front(), {**w.auth(), "t": "0110", "39": "00"})
    assert of(actions, F.ANSWER) and w.answers(actions) == [None]


def test_no_route_and_no_link_are_answered_with_their_codes():
    w = World(routes=[RouteRule("visa", "cmi", TIMEOUT, (), ("4",), (), (), ())])
    assert w.answers(w.request(w.front(), w.auth(pan="5105105105105100")))[0]["39"] in ("92", "15")
    w = World()
    w.flow.link_down(w.links[0], w.t)
    w.flow.take_actions()
    assert w.answers(w.request(w.front(), w.auth()))[0]["39"] == "91"


def test_the_gateways_own_0800_is_answered_0810_locally():
    w = World()
    (answer,) = w.answers(w.request(w.front(), sample_network(7, "301", now=NOW)))
    assert (answer["t"], answer["39"], answer["11"]) == ("0810", "00", "000007")


# ---------------------------------------------------------------------------------- timeouts


def test_a_timeout_is_answered_91_only_once_its_reversal_is_durable_and_a_late_answer_is_reported():
    w = World()
    front = w.front()
    txn, sent = w.forward(front, w.auth())
    actions = w.later(TIMEOUT)
    assert ops(actions) == ["REVERSE", "ARM"]
    assert actions[0 if actions[0][0] == F.REVERSE else 1][1:] == (txn, "timeout", None, True)
    w.flow.reversal_stored(txn, w.t)
    (answer,) = w.answers(w.flow.take_actions())
    assert answer["39"] == "91"
    late = w.answer(sent, "00")
    assert of(late, F.LATE) == [(F.LATE, txn, "00")] and not of(late, F.ANSWER)
    assert w.metrics.late_responses("cmi", "00").get() == 1


def test_a_request_the_journal_never_took_times_out_unsent_and_owes_no_reversal():
    w = World()
    actions = w.request(w.front(), w.auth())
    w.t += TIMEOUT
    w.flow.deadline(w.links[0], w.t)
    out = w.flow.take_actions()
    assert not of(out, F.REVERSE) and w.answers(out)[0]["39"] == "91"
    assert of(out, F.STATE)[0][2] == "not_sent"
    assert not of(w.journaled(actions), F.SEND)  # the journal's late answer sends nothing


def test_a_journal_that_fails_gets_96_and_the_request_never_leaves():
    w = World()
    actions = w.request(w.front(), w.auth())
    out = w.journaled(actions, OSError("disk full"))
    assert not of(out, F.SEND) and w.answers(out)[0]["39"] == "96"
    assert len(w.links[0].pending) == 0


def test_a_link_lost_with_a_request_out_answers_91_and_reverses_it():
    w = World()
    txn, _ = w.forward(w.front(), w.auth())
    w.flow.link_down(w.links[0], w.t)
    out = w.flow.take_actions()
    assert of(out, F.REVERSE)[0][1:3] == (txn, "link_lost") and not of(out, F.ANSWER)
    w.flow.reversal_stored(txn, w.t)
    assert w.answers(w.flow.take_actions())[0]["39"] == "91"


def test_an_approval_the_front_end_cannot_receive_is_reversed():
    w = World()
    front = w.front()
    txn, sent = w.forward(front, w.auth())
    out = w.answer(sent, "00")
    w.flow.delivered(of(out, F.ANSWER)[0][3], False)
    assert of(w.flow.take_actions(), F.REVERSE)[0][1:] == (txn, "undeliverable", None, False)
    front2 = w.front()
    txn2, sent2 = w.forward(front2, w.auth())
    front2.closed = True
    out = w.answer(sent2, "00")
    assert of(out, F.REVERSE)[0][1:3] == (txn2, "undeliverable") and w.answers(out) == [None]


# ---------------------------------------------------------------------------------- duplicates


def test_a_duplicate_in_flight_waits_for_the_first_answer_and_a_later_one_is_replayed():
    w = World(duplicate_window=60.0)
    first, second, third = w.front(), w.front(), w.front()
    msg = w.auth()
    txn, sent = w.forward(first, msg)
    assert ops(w.request(second, msg)) == []  # it waits
    out = w.answer(sent, "00", **{"38": "A12345"})
    answers = w.answers(out)
    assert [a["39"] for a in answers] == ["00", "00"] and {a["11"] for a in answers} == {msg["11"]}
    assert [a[1] for a in of(out, F.ANSWER)] == [second, first] or [a[1] for a in of(out, F.ANSWER)] == [first, second]
    replay = w.answers(w.request(third, msg))
    assert replay[0]["39"] == "00" and replay[0]["38"] == "A12345"
    assert len(of(w.request(w.front(), w.auth()), F.RECORD)) == 1  # another payment is forwarded


def test_a_duplicate_in_flight_is_answered_94_when_so_configured():
    w = World(duplicate_window=60.0, duplicate_in_flight="94")
    msg = w.auth()
    w.forward(w.front(), msg)
    assert w.answers(w.request(w.front(), msg))[0]["39"] == "94"


# ---------------------------------------------------------------------------------- front-end reversals


def _row(w: World, original: dict[str, str], sent: dict[str, str], **kw: Any) -> TxnRow:
    fields: dict[str, Any] = dict(id=77, created=0.0, listener="ecom", mti="0100", terminal=original["41"],
                                  merchant=original["42"], front_stan=original["11"], transmission=original["7"],
                                  upstream="cmi", upstream_stan=sent["11"], rrn=original["37"], amount=original["4"],
                                  currency="504", pan_masked="", state="answered", response_code="00", auth_code="A1")
    fields.update(kw)
    return TxnRow(**fields)


def _reversal(w: World, **row: Any) -> tuple[World, Any, dict[str, str], list[tuple], dict[str, str]]:
    front = w.front()
    original = w.auth()
    _, sent = w.forward(front, original)
    w.answer(sent, "00")
    reversal = sample_reversal(original, now=NOW)
    actions = w.request(front, reversal)
    (lookup,) = of(actions, F.LOOKUP)
    assert lookup[2:] == ("ecom", original["32"], original["41"], original["42"], original["11"], original["7"], "0100")
    return w, lookup[1], reversal, [_row(w, original, sent, **row), {"4": original["4"]}, []], sent


@pytest.mark.parametrize("row, found, code", [
    ({}, None, "25"),  # no such original
    ({"amount": "000000000001"}, True, "13"),  # another amount
    ({"state": "reversed"}, True, "00"),  # already reversed: acknowledged again, never twice
    ({"response_code": "05"}, True, "21"),  # declined: nothing to reverse
    ({"state": "not_sent"}, True, "21"),  # it never left
])
def test_a_front_end_reversal_that_need_not_reach_the_switch_is_answered_locally(row, found, code):
    w, txn, reversal, result, _ = _reversal(World(), **row)
    w.flow.lookup_done(txn, tuple(result) if found else None, w.t)
    out = w.flow.take_actions()
    assert not of(out, F.RECORD) and not of(out, F.SEND)
    (answer,) = w.answers(out)
    assert (answer["t"], answer["39"], answer["11"]) == ("0430", code, reversal["11"])


def test_a_reversal_the_gateway_already_queued_is_not_forwarded():
    w, txn, reversal, result, _ = _reversal(World())
    result[2] = ["pending"]
    w.flow.lookup_done(txn, tuple(result), w.t)
    assert w.answers(w.flow.take_actions())[0]["39"] == "00"


def test_a_front_end_reversal_goes_the_request_path_with_field_90_pointing_at_what_the_switch_saw():
    w, txn, reversal, result, sent = _reversal(World())
    w.flow.lookup_done(txn, tuple(result), w.t)
    actions = w.flow.take_actions()
    (record,) = of(actions, F.RECORD)
    (send,) = of(w.journaled(actions), F.SEND)
    out_msg = w.switch_msg(send)
    f90 = OriginalData.parse(out_msg["90"])
    assert out_msg["t"] == "0420" and f90.stan == sent["11"] and out_msg["11"] == record[2]["upstream_stan"]
    out = w.answer(out_msg, "00")
    assert (F.STATE, 77, "reversed", None, None) in out and (F.CANCEL_SAF, 77, "reversed by the front end") in out
    (answer,) = w.answers(out)
    assert answer["90"] == reversal["90"] and answer["11"] == reversal["11"] and answer["39"] == "00"


def test_a_front_end_reversal_out_when_the_switch_drops_the_link_is_taken_over():
    w, txn, _, result, _ = _reversal(World())
    w.flow.lookup_done(txn, tuple(result), w.t)
    w.journaled(w.flow.take_actions())
    w.flow.link_down(w.links[0], w.t)
    out = w.flow.take_actions()
    assert of(out, F.TAKE_OVER) == [(F.TAKE_OVER, txn)] and w.answers(out)[0]["39"] == "91"
    assert not of(out, F.REVERSE)  # a reversal is not reversed


# ---------------------------------------------------------------------------------- the switch's side


def test_the_switchs_0800_is_answered_0810_on_the_same_link():
    w = World()
    out = w.switch(sample_network(42, "301", now=NOW))
    (send,) = of(out, F.SEND)
    resp = w.switch_msg(send)
    assert (resp["t"], resp["39"], resp["11"]) == ("0810", "00", "000042")


def test_the_links_own_echo_is_matched_or_times_out():
    w = World()
    link = w.links[0]
    ex = w.flow.network_request(link, "301", "1127101010", 2.0, w.t)
    (send,) = of(w.flow.take_actions(), F.SEND)
    w.t += 0.25
    w.answer(w.switch_msg(send), "00")
    assert ex is not None and ex.done and ex.rc == "00" and ex.rtt == 0.25
    ex = w.flow.network_request(link, "301", "1127101010", 2.0, w.t)
    w.flow.take_actions()
    out = w.later(2.0)
    assert ex is not None and of(out, F.NET_DONE) == [(F.NET_DONE, ex)] and ex.rc is None


def test_an_answer_nobody_waits_for_is_counted_unmatched():
    w = World()
    assert ops(w.switch({"t": "0110", "11": "123456", "39": "00"})) == []
    assert w.metrics.unmatched_responses("cmi").get() == 1


def test_three_timeouts_in_a_row_make_a_link_not_answering_until_it_answers():
    w = World()
    for _ in range(3):
        w.forward(w.front(), w.auth())
        w.later(TIMEOUT)
    assert not w.links[0].answering
    _, sent = w.forward(w.front(), w.auth())
    w.answer(sent)
    assert w.links[0].answering


def test_requests_in_another_dialect_are_translated_both_ways():
    w = World(upstream_dialect="iso87binary")
    msg = w.auth()
    _, sent = w.forward(w.front(), msg)
    assert sent["4"] == msg["4"] and sent["2"] == msg["2"]
    (answer,) = w.answers(w.answer(sent, "00"))
    assert answer["11"] == msg["11"] and answer["39"] == "00"


# ---------------------------------------------------------------------------------- properties

event = st.one_of(
    st.tuples(st.just("request"), st.integers(0, 3), st.integers(1, 5)),  # front end, its STAN
    st.tuples(st.just("journal"), st.booleans(), st.just(0)),  # the journal takes (or fails) what waits
    st.tuples(st.just("answer"), st.integers(0, 50), st.sampled_from(["00", "05"])),
    st.tuples(st.just("time"), st.floats(0.0, 6.0), st.just(0)),
    st.tuples(st.just("drop"), st.integers(0, 1), st.just(0)),
    st.tuples(st.just("stored"), st.just(0), st.just(0)),  # every queued reversal becomes durable
)


@settings(max_examples=300, deadline=None)
@given(st.lists(event, max_size=40), st.booleans())
def test_every_request_gets_exactly_one_answer_with_its_own_stan_and_a_link_never_has_two_in_flight_on_one_stan(
        script, duplicates):
    w = World(links=2, duplicate_window=60.0 if duplicates else 0.0)
    fronts = [w.front() for _ in range(4)]
    asked: dict[int, list[str]] = {f.id: [] for f in fronts}  # per front: STANs of the requests it sent
    answered: dict[int, list[str]] = {f.id: [] for f in fronts}
    waiting_journal: list[tuple] = []
    on_switch: list[tuple[Link, dict[str, str]]] = []
    queued: list[Any] = []

    def absorb(actions: list[tuple]) -> None:
        for a in actions:
            if a[0] == F.ANSWER:
                answered[a[1].id].append(decode(w.dialect, a[2][4:])["11"] if a[2] is not None else "")
            elif a[0] == F.RECORD:
                waiting_journal.append(a)
            elif a[0] == F.SEND:
                on_switch.append((a[1], w.switch_msg(a)))
            elif a[0] == F.REVERSE and a[4]:
                queued.append(a[1])
        for link in w.links:  # the switch never has two requests on one STAN on one link
            stans = [k[1] for k in link.pending._entries]
            assert len(stans) == len(set(stans))

    for kind, a, b in script:
        if kind == "request":
            front = fronts[a]
            msg = sample_auth(b, 15000 + b, now=NOW)
            asked[front.id].append(msg["11"])
            absorb(w.request(front, msg))
        elif kind == "journal":
            batch, waiting_journal[:] = list(waiting_journal), []
            absorb(w.journaled(batch, None if a else OSError("full")))
        elif kind == "answer" and on_switch:
            link, sent = on_switch.pop(a % len(on_switch))
            absorb(w.answer(sent, b, link=link))
        elif kind == "time":
            w.t += a
            for link in w.links:
                w.flow.deadline(link, w.t)
            absorb(w.flow.take_actions())
        elif kind == "drop":
            w.flow.link_down(w.links[a], w.t)
            w.flow.link_connected(w.links[a])
            w.flow.link_ready(w.links[a])
            absorb(w.flow.take_actions())
        elif kind == "stored":
            for txn in queued:
                w.flow.reversal_stored(txn, w.t)
            queued.clear()
            absorb(w.flow.take_actions())
    # The end: the journal takes what waits, every deadline passes, every reversal is durable.
    absorb(w.journaled(list(waiting_journal)))
    w.t += 3600
    for link in w.links:
        w.flow.deadline(link, w.t)
    absorb(w.flow.take_actions())
    for txn in queued:
        w.flow.reversal_stored(txn, w.t)
    absorb(w.flow.take_actions())
    for front in fronts:
        assert sorted(answered[front.id]) == sorted(asked[front.id]), "one answer per request, with its own STAN"
    assert w.flow.in_flight == 0 and all(len(link.pending) == 0 for link in w.links)


def test_a_request_another_node_journaled_first_is_never_sent_and_is_answered_as_a_duplicate():
    from iso_gateway.core.errors import DuplicateRecorded
    w = World(duplicate_window=60.0)
    actions = w.request(w.front(), w.auth())
    assert of(actions, F.RECORD)[0][2]["dup_key"].startswith("ecom|")
    out = w.journaled(actions, DuplicateRecorded("05"))
    assert not of(out, F.SEND) and w.answers(out)[0]["39"] == "05"
    out = w.journaled(w.request(w.front(), w.auth()), DuplicateRecorded(None))  # still in flight there
    assert not of(out, F.SEND) and w.answers(out)[0]["39"] == "94"
    assert w.flow.in_flight == 0 and len(w.links[0].pending) == 0


# ---------------------------------------------------------------------------------- MACs per hop

from iso_gateway.core.macs import ClientScope, ClientTable, MacField, MacHop  # noqa: E402
from iso_gateway.security.mac import retail_mac  # noqa: E402
from iso_gateway.security.software import Kek, SoftwareSecurityModule  # noqa: E402

FRONT_KEY = bytes.fromhex("0123456789ABCDEFFEDCBA9876543210")
SWITCH_KEY = bytes.fromhex("89ABCDEF0123456776543210FEDCBA98")


def mac_world(tmp_path, *, front: bool = True, switch: bool = True, **kw: Any) -> World:
    """A World whose hops MAC (retail, the keys below) as asked."""
    w = World(**kw)
    module = SoftwareSecurityModule(tmp_path / "keys.bin", Kek(bytes(range(32)), "test"), create=True)
    module.import_key("front.mac", FRONT_KEY, usage="mac", algorithm="retail")
    module.import_key("switch.mac", SWITCH_KEY, usage="mac", algorithm="retail")
    w.flow.security = module
    if front:
        w.side.mac = MacHop("front.mac", MacField(w.dialect))
    if switch:
        w.up.mac = MacHop("switch.mac", MacField(w.up_dialect))
    return w


def signed(dialect: Any, msg: dict[str, str], key: bytes) -> bytes:
    """``msg`` as an independent sender MACs it: field 64 (128 past 64), the retail MAC of every byte before it."""
    raw = encode(dialect, {**msg, ("128" if any(k.isdigit() and int(k) > 64 for k in msg) else "64"): "0" * 16})
    width = MacField(dialect).width
    return raw[:-width] + MacField(dialect).wire(retail_mac(FRONT_KEY if key is FRONT_KEY else key, raw[:-width]))


def mac_ok(dialect: Any, raw: bytes, key: bytes) -> bool:
    field = MacField(dialect)
    return field.value(raw) == retail_mac(key, raw[:-field.width])[:8]


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(front_mac=st.booleans(), switch_mac=st.booleans(), dialect=st.sampled_from(["iso87ascii", "iso87binary"]),
       extra=st.dictionaries(st.sampled_from(["48", "62", "102", "123"]), st.text("ABC 123", min_size=1, max_size=25),
                             max_size=3),
       stan=st.integers(1, 999999), stray_mac=st.booleans())
def test_a_mac_added_dropped_or_signed_again_in_place_gives_the_bytes_a_decode_and_encode_would(
        tmp_path_factory, front_mac, switch_mac, dialect, extra, stan, stray_mac):
    """The hot path splices a message's STAN and MAC field rather than decoding it: for MACs on
    either hop, both or neither, a hex or a binary bitmap, with or without fields past 64 (field 128
    then, which takes the decoding path), a stray MAC field from a front end whose hop has none,
    what goes to the switch and back to the front end is byte for byte what decoding, changing the
    STAN and the MAC field, and encoding again gives."""
    w = mac_world(tmp_path_factory.mktemp("keys"), front=front_mac, switch=switch_mac, dialect=dialect,
                  upstream_dialect=dialect)
    msg = {**w.auth(), **extra, "11": f"{stan:06d}"}
    if front_mac:
        raw = signed(w.dialect, msg, FRONT_KEY)
    else:  # a stray MAC field (a front end's own, the listener has none): not checked, not passed on as is
        mac_field = "128" if any(int(k) > 64 for k in msg if k.isdigit()) else "64"
        raw = encode(w.dialect, {**msg, mac_field: "0123456789ABCDEF"} if stray_mac else msg)
    w.flow.front_frame(w.front(), raw, b"", w.t)
    (send,) = of(w.journaled(w.flow.take_actions()), F.SEND)
    sent = send[2][4:]

    def expected(dialect_: Any, source: bytes, stan_: str, key: bytes | None) -> bytes:
        fields = {k: v for k, v in decode(dialect_, source).items() if k not in ("64", "128")}
        fields["11"] = stan_
        return signed(dialect_, fields, key) if key is not None else encode(dialect_, fields)

    switch_stan = decode(w.up_dialect, sent)["11"]
    assert sent == expected(w.up_dialect, raw, switch_stan, SWITCH_KEY if switch_mac else None)
    resp = {k: v for k, v in decode(w.up_dialect, sent).items() if k not in ("t", "2", "14", "22", "25", "64", "128")}
    resp.update({"t": "0110", "39": "00", "38": "A1B2C3"})
    answer_raw = signed(w.up_dialect, resp, SWITCH_KEY) if switch_mac else encode(w.up_dialect, resp)
    w.flow.switch_frame(w.links[0], answer_raw, b"", w.t)
    (answer,) = of(w.flow.take_actions(), F.ANSWER)
    assert answer[2][4:] == expected(w.dialect, answer_raw, msg["11"], FRONT_KEY if front_mac else None)


def test_a_request_with_a_good_mac_is_resigned_for_the_switch_after_the_stan_is_spliced(tmp_path):
    w = mac_world(tmp_path)
    front = w.front()
    msg = w.auth()
    w.flow.front_frame(front, signed(w.dialect, msg, FRONT_KEY), b"", w.t)
    actions = w.flow.take_actions()
    (send,) = of(w.journaled(actions), F.SEND)
    wire = send[2][4:]
    assert mac_ok(w.up_dialect, wire, SWITCH_KEY) and not mac_ok(w.up_dialect, wire, FRONT_KEY)
    sent = decode(w.up_dialect, wire)
    resp = {k: v for k, v in sent.items() if k not in ("t", "2", "14", "22", "25", "26", "64")}
    resp.update({"t": "0110", "39": "00"})
    w.flow.switch_frame(w.links[0], signed(w.up_dialect, resp, SWITCH_KEY), b"", w.t)
    out = w.flow.take_actions()
    (answer,) = of(out, F.ANSWER)
    assert mac_ok(w.dialect, answer[2][4:], FRONT_KEY) and decode(w.dialect, answer[2][4:])["11"] == msg["11"]


@pytest.mark.parametrize("tamper", ["flip", "missing"])
def test_a_request_with_a_bad_or_missing_mac_is_answered_63_signed_and_never_forwarded(tmp_path, tamper):
    w = mac_world(tmp_path)
    raw = signed(w.dialect, w.auth(), FRONT_KEY)
    if tamper == "flip":
        raw = raw[:30] + bytes([raw[30] ^ 1]) + raw[31:]
    else:
        raw = encode(w.dialect, w.auth())
    w.flow.front_frame(w.front(), raw, b"", w.t)
    out = w.flow.take_actions()
    assert not of(out, F.RECORD) and not of(out, F.SEND)
    (answer,) = of(out, F.ANSWER)
    rc = decode(w.dialect, answer[2][4:])["39"]
    assert mac_ok(w.dialect, answer[2][4:], FRONT_KEY)  # the gateway's own answer is signed too
    if tamper == "missing":
        assert rc == "63" and w.metrics.mac_failures("front", "ecom", "missing").get() == 1
    else:  # the flipped byte broke the format (30) or the MAC (63)
        assert rc in ("63", "30")


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_a_tampered_byte_anywhere_in_a_macd_request_means_63_and_nothing_forwarded(tmp_path_factory, data):
    w = mac_world(tmp_path_factory.mktemp("k"))
    raw = signed(w.dialect, w.auth(), FRONT_KEY)
    at = data.draw(st.integers(0, len(raw) - 1))
    flip = data.draw(st.integers(1, 255))
    tampered = raw[:at] + bytes([raw[at] ^ flip]) + raw[at + 1:]
    w.flow.front_frame(w.front(), tampered, b"", w.t)
    out = w.flow.take_actions()
    assert not of(out, F.RECORD) and not of(out, F.SEND)
    assert len(of(out, F.ANSWER)) == 1


def test_an_answer_with_a_bad_mac_from_the_switch_is_not_trusted_the_front_end_hears_91_and_it_is_reversed(tmp_path):
    w = mac_world(tmp_path, front=False)
    txn, sent = w.forward(w.front(), w.auth())
    out = w.answer(sent, "00")  # it echoes the request's MAC field: wrong for an answer
    assert of(out, F.REVERSE)[0][1:3] == (txn, "bad_mac") and not of(out, F.ANSWER)
    w.flow.reversal_stored(txn, w.t)
    assert w.answers(w.flow.take_actions())[0]["39"] == "91"
    assert w.metrics.mac_failures("upstream", "cmi", "bad").get() == 1


def test_macs_on_one_hop_only_are_added_or_dropped_by_reencoding(tmp_path):
    w = mac_world(tmp_path, front=False)  # the front end sends no MAC; the switch wants one
    _, sent = w.forward(w.front(), w.auth())
    assert "64" in sent
    w = mac_world(tmp_path / "b", switch=False)  # the front end MACs; the switch knows nothing of it
    front = w.front()
    w.flow.front_frame(front, signed(w.dialect, w.auth(), FRONT_KEY), b"", w.t)
    (send,) = of(w.journaled(w.flow.take_actions()), F.SEND)
    sent = w.switch_msg(send)
    assert "64" not in sent
    (answer,) = of(w.answer(sent, "00"), F.ANSWER)
    assert mac_ok(w.dialect, answer[2][4:], FRONT_KEY)


# ---------------------------------------------------------------------------------- identified front ends


def test_an_identified_front_end_may_act_only_for_its_own_merchant_and_reverses_only_its_own():
    w = World()
    w.side.clients = ClientTable({"cert:shop-a": ClientScope(merchants=frozenset({"MERCHANT0000001"}))}, code="58")
    a = SimpleNamespace(side=w.side, closed=False, id=1, identity="cert:shop-a")
    b = SimpleNamespace(side=w.side, closed=False, id=2, identity="cert:shop-b")
    msg = w.auth()
    assert msg["42"].rstrip() == "MERCHANT0000001"
    actions = w.request(a, msg)
    assert of(actions, F.RECORD)[0][2]["listener"] == "ecom/cert:shop-a"  # its reversals match within it
    assert w.answers(w.request(b, w.auth()))[0]["39"] == "58"  # unknown identity
    other = {**w.auth(), "42": "MERCHANT0000002"}
    assert w.answers(w.request(a, other))[0]["39"] == "58"  # another merchant
    reversal = sample_reversal({**msg, "42": "MERCHANT0000002"}, now=NOW)
    assert w.answers(w.request(a, reversal))[0]["39"] == "58"  # nor reverse for it
    (lookup,) = of(w.request(a, sample_reversal(msg, now=NOW)), F.LOOKUP)
    assert lookup[2] == "ecom/cert:shop-a"
    assert w.metrics.rejections("ecom", "not_authorized", "58").get() == 3


# ---------------------------------------------------------------------------------- a new MAC key from the switch

from iso_gateway.security.keys import SecretKey, wrap_working_key  # noqa: E402
from iso_gateway.security.mac import tdes_check_value  # noqa: E402

ZONE_KEY = bytes.fromhex("C1D0F8FB4958670DBA40AB1F3752EF0D")
NEW_SWITCH_KEY = bytes.fromhex("A1B2C3D4E5F60718293A4B5C6D7E8F90")


def execute_install(w: World, actions: list[tuple]) -> list[tuple]:
    """The shell's part of INSTALL_KEY: the security module installs the key, the flow answers."""
    for a in of(actions, F.INSTALL_KEY):
        _, link, request, label, zone, wrapped, check, algorithm = a
        try:
            kcv = w.flow.security.install_key(label, kek=zone, wrapped=bytes.fromhex(wrapped), check_value=check,
                                              algorithm=algorithm)
        except Exception:  # noqa: BLE001
            kcv = None
        w.flow.key_installed(link, request, kcv)
    return w.flow.take_actions()


@pytest.mark.parametrize("good_check", [True, False])
def test_a_new_mac_key_from_the_switch_is_installed_only_if_its_check_value_matches(tmp_path, good_check):
    w = mac_world(tmp_path, front=False)
    w.flow.security.import_key("zone", ZONE_KEY, usage="kek", key_type="tdes")
    w.up.mac.zone_key = "zone"
    _, before = w.forward(w.front(), w.auth())  # the hop's key in use (and its MAC function kept) before
    assert mac_ok(w.up_dialect, encode(w.up_dialect, before), SWITCH_KEY)
    wrapped = wrap_working_key(SecretKey(ZONE_KEY, usage="kek", key_type="tdes"), NEW_SWITCH_KEY)
    check = tdes_check_value(NEW_SWITCH_KEY).hex().upper()[:6] if good_check else "000000"
    change = {"t": "0800", "7": "1127101010", "11": "000321", "70": "161", "96": wrapped.hex().upper(), "48": check}
    actions = w.switch(change)
    assert [a[0] for a in actions if a[0] != F.LOG] == [F.INSTALL_KEY]
    assert all(wrapped.hex().upper() not in str(a[3]) for a in of(actions, F.LOG))
    (send,) = of(execute_install(w, actions), F.SEND)
    resp = w.switch_msg(send)
    assert resp["t"] == "0810" and resp["39"] == ("00" if good_check else "96") and "96" not in resp
    _, sent = w.forward(w.front(), w.auth())
    key = NEW_SWITCH_KEY if good_check else SWITCH_KEY  # from the next message on: the new key, or still the old
    assert mac_ok(w.up_dialect, encode(w.up_dialect, sent), key)


def test_a_reversal_acknowledged_with_a_bad_mac_stays_owed(tmp_path):
    w = mac_world(tmp_path, front=False)
    link = w.links[0]
    message = {"2": "4761739001010119", "4": "000000015000", "7": "1127101010", "11": "000001", "37": "633100000001",
               "41": "TERM0001", "42": "MERCHANT0000001", "49": "504", "90": "010000000111271010100000000000000000000000"}
    attempt = w.flow.send_reversal(link, "owner", SimpleNamespace(attempts=0), 5, 6, message, "0420", "", w.t)
    assert not isinstance(attempt, str)
    (send,) = of(w.flow.take_actions(), F.SEND)
    sent = w.switch_msg(send)
    assert mac_ok(w.up_dialect, send[2][4:], SWITCH_KEY)
    out = w.answer(sent, "00")  # echoes the request's MAC: wrong for the 0430
    assert of(out, F.SAF_OUTCOME) == [(F.SAF_OUTCOME, attempt, "timeout", "")]
    resp = {k: v for k, v in sent.items() if k not in ("t", "64", "128")}
    good = signed(w.up_dialect, {**resp, "t": "0430", "39": "00"}, SWITCH_KEY)
    w.flow.switch_frame(link, good, b"", w.t)  # a late, well-signed 0430 still completes it
    (outcome,) = of(w.flow.take_actions(), F.SAF_OUTCOME)
    assert outcome[2:] == ("late", "00")
