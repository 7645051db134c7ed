"""Nothing lost: timeout reversals through the SAF, late responses, front-end reversals, duplicates, the store."""

from __future__ import annotations

import secrets
import sqlite3
from datetime import datetime, timezone

import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import TEST_PAN, wait_for
import realtime
from realtime import wait_real
from iso_gateway.cli import main
from iso_gateway.core.message import OriginalData
from iso_gateway.security.pan import PanVault
from iso_gateway.sim.client import FrontEndClient, sample_reversal
from iso_gateway.journal.store import SQLiteStore

journal_clock = realtime.journal_clock  # a fixture: trio's MockClock for a gateway with a journal

FAST_SAF = {"saf_first_delay": 0.0, "saf_retry_initial": 0.1, "saf_retry_max": 0.2, "reversal_timeout": 0.3}


def saf_rows(harness) -> list[tuple]:
    db = sqlite3.connect(harness.gateway.config.journal.path)
    try:
        return db.execute("SELECT state, reason, mti, stan, f90, attempts FROM saf ORDER BY created").fetchall()
    finally:
        db.close()


def txn_state(harness, rrn: str) -> str | None:
    """The state of the authorization with RRN ``rrn``; None while the indexer has not written its row."""
    db = sqlite3.connect(harness.gateway.config.journal.path)
    try:
        row = db.execute("SELECT state FROM txn WHERE rrn=? AND mti LIKE '01%'", (rrn,)).fetchone()
        return row[0] if row else None
    finally:
        db.close()


async def test_a_timed_out_authorization_is_reversed_with_field_90_pointing_at_what_the_switch_saw(
        harness, journal_clock):
    sim = await harness.start_switch()
    gw = await harness.start_gateway(upstream={**FAST_SAF, "reversal_timeout": 2.0, "institution_id": "504001"},
                                     routes=[{"name": "all", "upstream": "cmi", "timeout": 0.2}])
    client = await harness.client()
    req = {**harness.auth(10599), "32": "123456"}  # the switch approves after 0.5 s: too late
    resp = await client.request(req, timeout=30)
    assert resp["39"] == "91"
    await wait_real(lambda: any(r.mti == "0420" and r.response_code == "00" for r in sim.records), 10, "0430")
    original = next(r for r in sim.records if r.mti == "0100")
    reversal = next(r for r in sim.records if r.mti == "0420")
    f90 = OriginalData.parse(reversal.original)
    assert (f90.mti, f90.stan, f90.transmission, f90.acquirer) == ("0100", original.stan, req["7"], "123456")
    assert original.stan != req["11"]  # the switch saw the gateway's STAN, and field 90 says so
    assert reversal.amount == req["4"] and reversal.rrn == req["37"] and reversal.applied
    await wait_real(lambda: txn_state(harness, req["37"]) == "reversed", 10, "journal says reversed")
    assert gw.metrics.reversals("cmi", "acknowledged").get() == 1
    assert gw.metrics.late_responses("cmi", "00").get() == 1  # the late approval was not forwarded
    assert client.responses == 1


async def test_an_unacknowledged_reversal_is_repeated_as_0421_with_the_same_stan_then_parked(harness, journal_clock):
    sim = await harness.start_switch()
    gw = await harness.start_gateway(upstream={**FAST_SAF, "saf_budget": 3},
                                     routes=[{"name": "all", "upstream": "cmi", "timeout": 0.2}])
    client = await harness.client()
    assert (await client.request(harness.auth(10097), timeout=30))["39"] == "91"  # never answered, nor its reversals
    await wait_real(lambda: [r[0] for r in saf_rows(harness)] == ["parked"], 10, "parked")
    sent = [r for r in sim.records if r.mti in ("0420", "0421")]
    assert [r.mti for r in sent] == ["0420", "0421", "0421"]
    assert len({r.stan for r in sent}) == 1 and len({r.original for r in sent}) == 1
    assert gw.metrics.reversals("cmi", "parked").get() == 1
    assert gw.metrics.reversals("cmi", "repeated").get() == 2
    # An operator sends it again: the worker picks the change up and repeats it (0421).
    path = gw.config.journal.path
    assert main(["saf", "retry", "--journal", path, "--all"]) == 0
    await wait_real(lambda: sum(1 for r in sim.records if r.mti == "0421") == 3, 10, "the retry")


async def test_one_reversal_the_switch_never_acknowledges_does_not_hold_back_the_others(harness):
    sim = await harness.start_switch()
    await harness.start_gateway(upstream={**FAST_SAF, "saf_budget": 50},
                                routes=[{"name": "all", "upstream": "cmi", "timeout": 0.2}])
    client = await harness.client()
    await client.request(harness.auth(10097), timeout=3)  # its reversals are never answered
    for _ in range(3):
        await client.request(harness.auth(10399), timeout=3)  # answered after 0.3 s: late, reversal acked
    await wait_for(lambda: sum(1 for r in sim.records if r.mti in ("0420", "0421") and r.response_code == "00") == 3,
                   8, "the three good reversals acknowledged")


async def test_a_late_decline_cancels_a_reversal_not_yet_sent(harness, journal_clock):
    sim = await harness.start_switch(seed=1, delay_probability=1.0, delay_range=(0.4, 0.4))
    gw = await harness.start_gateway(upstream={"saf_first_delay": 1.5},
                                     routes=[{"name": "all", "upstream": "cmi", "timeout": 0.2}])
    client = await harness.client()
    assert (await client.request(harness.auth(10051), timeout=30))["39"] == "91"
    await wait_real(lambda: [r[0] for r in saf_rows(harness)] == ["cancelled"], 10, "cancelled")
    await trio.sleep(1.5)  # virtual: past the reversal's first due time
    assert sim.count("0420") == 0
    assert gw.metrics.reversals("cmi", "cancelled").get() == 1


async def test_a_link_lost_after_sending_queues_a_reversal_before_answering_91(harness):
    sim = await harness.start_switch()
    await harness.start_gateway(upstream=FAST_SAF, routes=[{"name": "all", "upstream": "cmi", "timeout": 5.0}])
    client = await harness.client()
    req = harness.auth(10098)  # the switch closes the connection on it
    assert (await client.request(req, timeout=3))["39"] == "91"
    assert [r[1] for r in saf_rows(harness)] == ["link_lost"]
    await wait_for(lambda: any(r.mti == "0420" for r in sim.records), 5, "reversal after reconnect")
    # 98 applies to the reversal too: the switch closes again; the SAF keeps going after each reconnect
    await wait_for(lambda: sum(1 for r in sim.records if r.mti in ("0420", "0421")) >= 2, 5, "repeat")


async def test_front_end_reversals_are_checked_against_the_journal_and_applied_once(harness):
    sim = await harness.start_switch()
    await harness.start_gateway()
    client = await harness.client()
    auth = harness.auth(25000)
    assert (await client.request(auth, timeout=3))["39"] == "00"
    unknown = sample_reversal({**auth, "11": "999999"})
    assert (await client.request(unknown, timeout=3))["39"] == "25"
    wrong_amount = {**sample_reversal(auth), "4": "000000024000"}
    assert (await client.request(wrong_amount, timeout=3))["39"] == "64"
    rev = sample_reversal(auth)
    resp = await client.request(rev, timeout=3)
    assert (resp["t"], resp["39"], resp["11"], resp["90"]) == ("0430", "00", rev["11"], rev["90"])
    upstream_auth = next(r for r in sim.records if r.mti == "0100")
    upstream_rev = next(r for r in sim.records if r.mti == "0420")
    assert OriginalData.parse(upstream_rev.original).stan == upstream_auth.stan
    await wait_for(lambda: txn_state(harness, auth["37"]) == "reversed", 3, "journal")
    repeat = {**rev, "t": "0421"}
    assert (await client.request(repeat, timeout=3))["39"] == "00"  # answered as before
    assert sim.count("0420") == 1 and sim.count("0421") == 0  # and never reversed twice


async def test_a_repeated_request_is_answered_from_the_first_and_never_sent_twice(harness):
    sim = await harness.start_switch()
    gw = await harness.start_gateway()
    client = await harness.client()
    req = harness.auth(31000)
    first = await client.request(req, timeout=3)
    again = await client.request(req, timeout=3)
    assert first["39"] == again["39"] == "00" and first["38"] == again["38"]
    assert sim.count("0100") == 1
    assert gw.metrics.duplicates("ecom").get() == 1


async def test_a_duplicate_of_a_request_in_flight_waits_for_the_same_answer(harness, autojump_clock):
    sim = await harness.start_switch()
    gw = await harness.start_gateway(routes=[{"name": "all", "upstream": "cmi", "timeout": 3.0}])
    a, b = await harness.client(), await harness.client()
    req = harness.auth(10399)  # answered after 0.3 s
    answers = []

    async def send(client):
        answers.append(await client.request(req, timeout=3))

    async with trio.open_nursery() as n:
        n.start_soon(send, a)
        await wait_for(lambda: gw.upstreams["cmi"].in_flight() == 1, 3, "the first one in flight")
        n.start_soon(send, b)
    assert [r["39"] for r in answers] == ["00", "00"] and answers[0]["38"] == answers[1]["38"]
    assert sim.count("0100") == 1


async def test_duplicates_in_flight_can_be_answered_94(harness, autojump_clock):
    await harness.start_switch()
    gw = await harness.start_gateway(gateway={"duplicate_in_flight": "94"},
                                     routes=[{"name": "all", "upstream": "cmi", "timeout": 3.0}])
    a, b = await harness.client(), await harness.client()
    req = harness.auth(10399)
    answers = {}

    async def send(name, client):
        answers[name] = (await client.request(req, timeout=3))["39"]

    async with trio.open_nursery() as n:
        n.start_soon(send, "first", a)
        await wait_for(lambda: gw.upstreams["cmi"].in_flight() == 1, 3, "the first one in flight")
        n.start_soon(send, "second", b)
    assert answers == {"first": "00", "second": "94"}


async def test_the_store_holds_no_clear_pan_and_no_cvv2(harness):
    await harness.start_switch()
    gw = await harness.start_gateway(upstream=FAST_SAF, routes=[{"name": "all", "upstream": "cmi", "timeout": 0.2}])
    client = await harness.client()
    await client.request({**harness.auth(15000), "48": "CVV2=737 3DS=AAABBB"}, timeout=3)
    await client.request(harness.auth(10097), timeout=3)  # a reversal is stored
    await wait_for(lambda: len(saf_rows(harness)) == 1, 3, "reversal stored")
    # Everything written first (not a pause that a slow machine may outlast): then nothing is in clear.
    await wait_for(lambda: gw.metrics.journal_writes("insert_txn")._value.get() == 2, 3, "both rows written")
    blob = b"".join(p.read_bytes() for p in harness.state_dir.glob("journal.sqlite3*"))
    assert blob and TEST_PAN.encode() not in blob and b"CVV2" not in blob and b"737 3DS" not in blob
    assert b"476173******0119" in blob  # masked for people


async def test_without_the_journal_reversals_still_go_out(harness):
    sim = await harness.start_switch()
    await harness.start_gateway(journal={"enabled": False}, upstream=FAST_SAF,
                                routes=[{"name": "all", "upstream": "cmi", "timeout": 0.2}])
    client = await harness.client()
    assert (await client.request(harness.auth(10399), timeout=3))["39"] == "91"
    await wait_for(lambda: any(r.mti == "0420" and r.response_code == "00" for r in sim.records), 5, "0430")
    assert not list(harness.state_dir.glob("journal.sqlite3*"))


async def test_operators_find_transactions_and_park_reversals_with_masked_output(harness, capsys):
    await harness.start_switch()
    gw = await harness.start_gateway(upstream={**FAST_SAF, "saf_first_delay": 30.0},
                                     routes=[{"name": "all", "upstream": "cmi", "timeout": 0.2}])
    client = await harness.client()
    req = harness.auth(10097)
    assert (await client.request(req, timeout=3))["39"] == "91"
    await wait_for(lambda: len(saf_rows(harness)) == 1, 3, "queued")
    path = gw.config.journal.path
    # The timeout reaches the database with the next indexer batch (journal.INDEX_EVERY).
    await wait_for(lambda: sqlite3.connect(path).execute("SELECT state FROM txn WHERE rrn=?", (req["37"],))
                   .fetchone() == ("timed_out",), 3, "the state in the database")
    assert main(["journal", "find", "--journal", path, "--rrn", req["37"]]) == 0
    out = capsys.readouterr().out
    assert "476173******0119" in out and "timed_out" in out and TEST_PAN not in out
    assert main(["saf", "list", "--journal", path, "--json"]) == 0
    item = __import__("json").loads(capsys.readouterr().out.splitlines()[0])
    assert (item["state"], item["reason"], item["mti"], item["pan"]) == ("pending", "timeout", "0420", "476173******0119")
    assert main(["saf", "park", "--journal", path, str(item["id"])]) == 0
    assert [r[0] for r in saf_rows(harness)] == ["parked"]
    assert main(["saf", "park", "--journal", path, "12345"]) == 1  # nothing changed: says so


# --------------------------------------------------------------------------- whose original a reversal may reverse


async def test_a_reversal_reaches_its_original_only_through_the_same_listener_acquirer_terminal_and_merchant(harness):
    sim = await harness.start_switch()
    gw = await harness.start_gateway(listeners=[{"name": "ecom", "host": "127.0.0.1", "port": 0},
                                                {"name": "moto", "host": "127.0.0.1", "port": 0}])
    ecom = await harness.client()
    moto = await FrontEndClient.connect("127.0.0.1", gw.listeners[1].port, "iso87ascii", "ascii4")
    harness.clients.append(moto)
    auth = harness.auth(25000)
    assert (await ecom.request(auth, timeout=3))["39"] == "00"
    rev = sample_reversal(auth)
    # Another merchant (or acquirer) on the same terminal id, STAN, DE 7 and amount: not found.
    for other in ({"42": "MERCHANT0000002"}, {"32": "504999"}, {"41": "TERM0002"}):
        assert (await ecom.request(sample_reversal({**auth, **other}), timeout=3))["39"] == "25", other
    # Field 90 naming another acquirer than the reversal's own DE 32: not found either.
    lying = {**rev, "90": OriginalData(mti="0100", stan=auth["11"], transmission=auth["7"], acquirer="504999").encode()}
    assert (await ecom.request(lying, timeout=3))["39"] == "25"
    # The same reversal through another listener (another front end): not found.
    assert (await moto.request(rev, timeout=3))["39"] == "25"
    assert sim.count("0420") == 0
    assert gw.metrics.rejections("ecom", "unknown_original", "25").get() == 4
    # The merchant's own reversal, through its own listener, is forwarded.
    assert (await ecom.request(rev, timeout=3))["39"] == "00"
    assert sim.count("0420") == 1


async def test_a_reversal_of_a_declined_original_is_answered_21_without_reaching_the_switch(harness):
    sim = await harness.start_switch()
    gw = await harness.start_gateway()
    client = await harness.client()
    auth = harness.auth(25051)  # declined 51 by the switch
    assert (await client.request(auth, timeout=3))["39"] == "51"
    for mti in ("0420", "0421", "0400"):
        resp = await client.request(sample_reversal(auth, mti=mti), timeout=3)
        assert (resp["t"], resp["39"]) == (("0430" if mti[2] == "2" else "0410"), "21")
    assert sim.count("0420") == sim.count("0421") == sim.count("0400") == 0
    assert gw.metrics.rejections("ecom", "nothing_to_reverse", "21").get() == 3


# The store's side: a property over many journaled transactions and look-ups.

IDENTITY = ("listener", "acquirer", "terminal", "merchant", "stan", "transmission", "mti")
identities = st.fixed_dictionaries({
    "listener": st.sampled_from(["ecom", "moto"]), "acquirer": st.sampled_from(["504123", "504999", ""]),
    "terminal": st.sampled_from(["TERM0001", "TERM0002"]),
    "merchant": st.sampled_from(["MERCHANT0000001", "MERCHANT0000002"]),
    "stan": st.sampled_from(["000001", "000002"]), "transmission": st.sampled_from(["1127101010", "1127101011"]),
    "mti": st.sampled_from(["0100", "0200"])})


def journal_row(store: SQLiteStore, txn_id: int, created: float, who: dict[str, str]) -> tuple:
    original = {"2": TEST_PAN, "4": "000000025000", "7": who["transmission"], "11": who["stan"],
                "37": "633100000001", "41": who["terminal"], "42": who["merchant"], "49": "504"}
    if who["acquirer"]:
        original["32"] = who["acquirer"]
    return store.logged_params(("T", txn_id, created, who["listener"], who["mti"], "cmi", 0, "400001", 0, original))


@settings(max_examples=60, deadline=None)
@given(st.lists(identities, min_size=1, max_size=12), identities)
def test_find_original_returns_the_newest_transaction_whose_every_identity_matches_and_nothing_else(journaled, asked):
    store = SQLiteStore(PanVault(secrets.token_bytes(32)))
    conn = SQLiteStore.connect(":memory:")
    statements: list[str] = []
    for i, who in enumerate(journaled):
        conn.execute(store._INSERT_TXN, journal_row(store, 1000 + i, 100.0 + i, who))
    conn.set_trace_callback(statements.append)
    found = store.find_original(conn, **asked)
    conn.set_trace_callback(None)
    same = [1000 + i for i, who in enumerate(journaled) if who == asked]
    if not same:
        assert found is None
    else:
        txn, fields, saf_states = found
        assert txn.id == max(same) and fields["2"] == TEST_PAN and saf_states == []
    # The look-up seeks the (DE 7, terminal, STAN) index: it never reads the whole journal.
    select = next(s for s in statements if s.lstrip().upper().startswith("SELECT") and "FROM txn" in s)
    plan = " ".join(r[3] for r in conn.execute("EXPLAIN QUERY PLAN " + select))
    assert "USING INDEX txn_front_time" in plan, plan


def test_a_journal_from_before_the_acquirer_column_opens_and_its_rows_match_on_their_sealed_de_32(tmp_path):
    path = str(tmp_path / "old.sqlite3")
    vault = PanVault(secrets.token_bytes(32))
    store = SQLiteStore(vault)
    old = sqlite3.connect(path)
    old.executescript(OLD_TXN_TABLE)
    who = {"listener": "ecom", "acquirer": "504123", "terminal": "TERM0001", "merchant": "MERCHANT0000001",
           "stan": "000001", "transmission": "1127101010", "mti": "0100"}
    old.execute(OLD_INSERT, journal_row(store, 7, 1.0, who)[:22])
    old.commit()
    old.close()
    conn = SQLiteStore.connect(path)
    assert "acquirer" in {r[1] for r in conn.execute("PRAGMA table_info(txn)")}
    assert store.find_original(conn, **who)[0].id == 7
    assert store.find_original(conn, **{**who, "acquirer": "504999"}) is None
    conn.execute(store._INSERT_TXN, journal_row(store, 8, 2.0, {**who, "stan": "000002"}))
    assert store.find_original(conn, **{**who, "stan": "000002"})[0].id == 8


# The txn table as it was before the acquirer column (the columns in their order then).
OLD_TXN_TABLE = """
CREATE TABLE txn (
    id INTEGER PRIMARY KEY, created REAL NOT NULL, updated REAL NOT NULL,
    listener TEXT, mti TEXT, terminal TEXT, merchant TEXT, front_stan TEXT, transmission TEXT,
    upstream TEXT, link INTEGER, upstream_stan TEXT, rrn TEXT, amount TEXT, currency TEXT,
    pan_masked TEXT, pan_hash TEXT, state TEXT NOT NULL, response_code TEXT, auth_code TEXT,
    original BLOB, worker INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX txn_front ON txn(terminal, front_stan);
"""
OLD_INSERT = (
    "INSERT INTO txn (id, created, updated, listener, mti, terminal, merchant, front_stan, transmission,"
    " upstream, link, upstream_stan, rrn, amount, currency, pan_masked, pan_hash, state, original, worker,"
    " response_code, auth_code) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)")


# --------------------------------------------------------------------------- late acknowledgements


def reversal_messages(sim) -> dict[str, int]:
    """How many reversal messages (0420 and 0421) the switch received per original (by RRN)."""
    out: dict[str, int] = {}
    for r in sim.records:
        if r.mti in ("0420", "0421"):
            out[r.rrn] = out.get(r.rrn, 0) + 1
    return out


async def test_a_0430_that_comes_after_the_attempts_deadline_completes_the_reversal_and_no_repeat_is_sent(
        harness, journal_clock):
    # Every reversal is acknowledged 0.2 s after the table's delay: all later than reversal_timeout.
    sim = await harness.start_switch(reversal_delay=0.2)
    gw = await harness.start_gateway(upstream={"saf_first_delay": 0.0, "saf_retry_initial": 3.0, "reversal_timeout": 0.15},
                                     routes=[{"name": "all", "upstream": "cmi", "timeout": 0.1}])
    client = await harness.client()
    # Each original is answered too late for its route (0.2 to 0.9 s) and so is its reversal (0.4 to 1.1 s).
    auths = [harness.auth(amount) for amount in (10299, 10499, 10699, 10999)]
    async with trio.open_nursery() as n:
        for auth in auths:
            n.start_soon(client.request, auth, 30)
    await wait_real(lambda: [r[0] for r in saf_rows(harness)] == ["acked"] * len(auths), 10,
                    "every reversal acknowledged")
    assert reversal_messages(sim) == {auth["37"]: 1 for auth in auths}
    assert [r[5] for r in saf_rows(harness)] == [1] * len(auths)  # one attempt each
    assert gw.metrics.reversals("cmi", "acknowledged").get() == len(auths)
    assert gw.metrics.reversals("cmi", "repeated").get() == 0
    assert gw.metrics.unmatched_responses("cmi").get() == 0
    for auth in auths:
        await wait_real(lambda: txn_state(harness, auth["37"]) == "reversed", 10, "journal says reversed")  # noqa: B023 - awaited in this iteration


# --------------------------------------------------------------------------- a reversal that drops the link


def saf_results(harness) -> list[tuple]:
    db = sqlite3.connect(harness.gateway.config.journal.path)
    try:
        return db.execute("SELECT state, attempts, last_result FROM saf ORDER BY created").fetchall()
    finally:
        db.close()


async def test_a_reversal_that_drops_the_link_is_retried_alone_then_parked_and_live_traffic_keeps_its_link(harness):
    killer = 10097  # never answered; its reversal makes the switch close the connection it came on
    sim = await harness.start_switch(close_on_reversal=frozenset({f"{killer:012d}"}))
    gw = await harness.start_gateway(upstream={**FAST_SAF, "reversal_timeout": 1.0, "saf_budget": 6},
                                     routes=[{"name": "all", "upstream": "cmi", "timeout": 1.0}])
    up = gw.upstreams["cmi"]
    clients = [await harness.client() for _ in range(4)]
    first = harness.auth(killer)
    assert (await clients[0].request(first, timeout=3))["39"] == "91"
    answers: list[tuple[bool, str]] = []  # (sent after the shared link came back from its first drop, DE 39)
    done = trio.Event()

    async def traffic(client) -> None:
        for _ in range(2000):  # bounded; ends once the reversal is parked and some more went by
            recovered = sim.accepted >= 2 and up.ready
            answers.append((recovered, (await client.request(harness.auth(15000), timeout=3))["39"]))
            if done.is_set():
                return

    async with trio.open_nursery() as n:
        for c in clients:
            n.start_soon(traffic, c)
        await wait_for(lambda: saf_results(harness) and saf_results(harness)[0][0] == "parked", 10, "parked")
        await wait_for(lambda: sum(1 for recovered, _ in answers if recovered) >= 100, 5, "traffic after it")
        done.set()
    after = [rc for recovered, rc in answers if recovered]
    assert after and set(after) == {"00"}, f"{after.count('91')} answered 91 after the first drop was over"
    state, attempts, why = saf_results(harness)[0]
    assert (state, attempts) == ("parked", 2) and "alone" in why
    assert [r.mti for r in sim.records if r.rrn == first["37"] and r.mti[1] == "4"] == ["0420", "0421"]
    assert gw.metrics.saf_link_drops("cmi", "suspected").get() == 1
    assert gw.metrics.saf_link_drops("cmi", "parked").get() == 1
    # The shared link dropped once (with the 0420); the 0421 went on a connection of its own.
    assert sum(c.connects for c in up.connections) == 2 and sim.accepted == 3


async def test_a_front_end_reversal_that_drops_the_link_is_taken_over_and_its_repeats_are_not_forwarded(harness):
    amount = 12000  # approved; its reversal makes the switch close the connection it came on
    sim = await harness.start_switch(close_on_reversal=frozenset({f"{amount:012d}"}))
    gw = await harness.start_gateway(upstream={**FAST_SAF, "reversal_timeout": 1.0},
                                     routes=[{"name": "all", "upstream": "cmi", "timeout": 1.0}])
    client = await harness.client()
    auth = harness.auth(amount)
    assert (await client.request(auth, timeout=3))["39"] == "00"
    rev = sample_reversal(auth)
    assert (await client.request(rev, timeout=3))["39"] == "91"  # the link dropped under it
    # From here the gateway reverses it itself, alone; the front end's repeats are answered from the journal.
    await wait_for(lambda: saf_results(harness) and saf_results(harness)[0][0] == "parked", 10, "parked")
    for _ in range(3):
        assert (await client.request({**rev, "t": "0421"}, timeout=3))["39"] == "00"
    assert [r.mti for r in sim.records if r.rrn == auth["37"] and r.mti[1] == "4"] == ["0420", "0420"]
    assert sum(c.connects for c in gw.upstreams["cmi"].connections) == 2 and sim.accepted == 3
    assert gw.metrics.saf_link_drops("cmi", "parked").get() == 1
    assert (await client.request(harness.auth(15000), timeout=3))["39"] == "00"


# --------------------------------------------------------------------------- the gateway's clock


async def test_reversals_are_due_and_stamped_by_the_gateways_clock_so_a_mock_clock_moves_them(harness, journal_clock):
    """The SAF's due times and a reversal's DE 7 come from the gateway's one clock (clock.py), on
    trio's: jumped by an hour, a MockClock sends a reversal due in an hour, and a reversal queued
    after the jump carries the clock's time, not the machine's."""
    sim = await harness.start_switch()
    gw = await harness.start_gateway(upstream={"saf_first_delay": 3600.0, "reversal_timeout": 0.3},
                                     routes=[{"name": "all", "upstream": "cmi", "timeout": 0.2}])
    client = await harness.client()
    assert (await client.request(harness.auth(10097), timeout=30))["39"] == "91"  # never answered, nor its reversals
    await wait_real(lambda: len(saf_rows(harness)) == 1, 10, "the reversal stored")
    await trio.sleep(5)  # virtual: nothing is sent within 5 s
    assert sim.count("0420") == 0  # due in an hour
    journal_clock.jump(3600)
    await wait_real(lambda: sim.count("0420") == 1, 10, "the reversal, an hour later by the clock")
    # Queued an hour after the first by the clock: its DE 7 is the clock's, an hour ahead of the machine's.
    # (An hour idle closed the front connection, and the link may be reconnecting.)
    await wait_real(lambda: gw.upstreams["cmi"].ready, 10, "the link ready")
    client = await harness.client()
    assert (await client.request(harness.auth(10097), timeout=30))["39"] == "91"
    await wait_real(lambda: len(saf_rows(harness)) == 2, 10, "the second reversal stored")
    store = gw.journal.store
    items = await gw.journal.call(store.due_saf, "cmi", gw.clock.wall() + 2 * 3600, 10)
    newest = max(items, key=lambda item: item.created)
    assert newest.next_attempt - newest.created == 3600.0
    now = gw.clock.utc()
    stamped = datetime.strptime(newest.message["7"], "%m%d%H%M%S").replace(year=now.year, tzinfo=timezone.utc)
    assert abs((stamped - gw.clock.utc()).total_seconds()) < 60
    assert (stamped - datetime.now(timezone.utc)).total_seconds() > 3000
