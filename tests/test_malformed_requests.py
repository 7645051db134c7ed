"""One hostile frame never stops the daemon: format errors are answered 30, failures inside the
gateway 96, each counted; local answers never decode again; real sockets on 127.0.0.1."""

from __future__ import annotations

import pytest
import trio

from conftest import TEST_PAN, wait_for
from iso_gateway.specfiles import get_dialect
from iso_gateway.core.flow import Flow
from iso_gateway.core.message import decode, encode
from iso_gateway.sim.client import sample_reversal

D87 = get_dialect("iso87ascii")


def with_bit_65(msg: dict[str, str]) -> bytes:
    """``msg`` (with a DE 70, so there is a secondary bitmap) in iso87ascii, then bit 65 set and
    two hex characters put where a field 65 goes (the old dialect declared it b1). To pyiso8583
    bit 65 means a tertiary bitmap, read from the 16 characters after the secondary bitmap: the
    start of field 2 ("16" + PAN) sets bits above 128, and the lookup of their spec is a KeyError."""
    msg = {**msg, "70": "301"}
    raw = encode(D87, msg, check_types=False)
    secondary = int(raw[20:36], 16) | 1 << 63
    pos = 36
    for num in sorted(int(k) for k in msg if k.isdigit() and int(k) < 65):
        fd = D87.fields[num]
        pos += fd.length * (2 if fd.encoding == "hex" else 1) if fd.fixed else fd.prefix + int(raw[pos:pos + fd.prefix])
    return raw[:20] + f"{secondary:016X}".encode() + raw[36:pos] + b"00" + raw[pos:]


def test_the_bit_65_frame_of_the_issue_is_refused_by_the_scan_and_by_decode():
    raw = with_bit_65({"t": "0420", "2": TEST_PAN, "11": "000001", "41": "TERM0001"})
    from iso_gateway.core.errors import DecodeError
    from iso_gateway.core.scanner import Scanner
    with pytest.raises(DecodeError):
        Scanner(D87, {2, 11, 41}).scan(raw, full=True)
    with pytest.raises(DecodeError) as info:
        decode(D87, raw, check_types=False)
    assert TEST_PAN not in str(info.value)


async def _answer(client, raw: bytes) -> dict[str, str]:
    await client.send_raw(client.framer.encode(raw))
    frame = await client.receive_frame(3)
    return decode(client.dialect, frame.message, check_types=False)


async def test_a_request_with_bit_65_is_answered_30_and_the_daemon_keeps_serving(harness):
    sim = await harness.start_switch()
    gw = await harness.start_gateway()
    client = await harness.client()
    honest = await harness.client()
    original = harness.auth(15000)
    assert (await honest.request(original, timeout=3))["39"] == "00"
    for msg in (harness.auth(16000), sample_reversal(original), sample_reversal(original, mti="0421")):
        resp = await _answer(client, with_bit_65(msg))
        assert resp["39"] == "30" and resp["t"] == msg["t"][:2] + str(int(msg["t"][2]) + 1) + "0"
        assert resp["11"] == msg["11"] and resp["41"] == msg["41"]
        assert (await honest.request(harness.auth(15000), timeout=3))["39"] == "00"
    assert sim.count("0100") == 4 and sim.count("0420") == 0  # the honest ones only
    assert gw.metrics.rejections("ecom", "format_error", "30").get() == 3
    assert not gw._stopped.is_set()


async def test_a_signed_hex_or_spaced_bitmap_is_answered_30_on_the_same_connection(harness):
    await harness.start_switch()
    gw = await harness.start_gateway()
    client = await harness.client()
    for bad in (b"-", b"+", b" ", b"_"):
        msg = harness.auth(15000)
        raw = encode(D87, msg, check_types=False)
        hostile = raw[:4] + bad + raw[5:]
        resp = await _answer(client, hostile)
        assert (resp["t"], resp["39"]) == ("0110", "30")
    assert (await client.request(harness.auth(15000), timeout=3))["39"] == "00"
    assert gw.metrics.decode_errors("front", "ecom", "decode").get() == 4


async def test_an_exception_handling_a_request_is_answered_96_counted_and_logged_masked(harness, monkeypatch, caplog):
    await harness.start_switch()
    gw = await harness.start_gateway()
    client = await harness.client()
    rules = gw.listeners[0].rules

    def broken(*args, **kwargs):
        raise RuntimeError(f"a bug that quotes the card {TEST_PAN}")

    monkeypatch.setattr(type(rules), "validate", broken)
    req = harness.auth(15000)
    resp = await client.request(req, timeout=3)
    assert (resp["39"], resp["11"], resp["41"]) == ("96", req["11"], req["41"])
    assert gw.metrics.request_errors("ecom", "internal_error").get() == 1
    assert "a bug that quotes the card" in caplog.text and TEST_PAN not in caplog.text
    monkeypatch.undo()
    assert (await client.request(harness.auth(15000), timeout=3))["39"] == "00"


async def test_a_failing_front_end_reversal_is_answered_96_and_the_task_ends_quietly(harness, monkeypatch):
    await harness.start_switch()
    gw = await harness.start_gateway()
    client = await harness.client()
    original = harness.auth(15000)
    assert (await client.request(original, timeout=3))["39"] == "00"

    def broken(self, *args, **kwargs):
        raise KeyError("129")

    monkeypatch.setattr(Flow, "_reversal_found", broken)
    reversal = sample_reversal(original)
    resp = await client.request(reversal, timeout=3)
    assert (resp["t"], resp["39"], resp["11"]) == ("0430", "96", reversal["11"])
    assert gw.metrics.request_errors("ecom", "internal_error").get() == 1
    assert gw.listeners[0].connections and not gw._stopped.is_set()


async def test_local_answers_never_decode_the_request_again(harness, monkeypatch):
    import iso_gateway.core.flow as flow_module
    await harness.start_switch()
    await harness.start_gateway(routes=[{"name": "all", "upstream": "cmi", "timeout": 0.3}])
    client = await harness.client()
    calls = []

    def counting_decode(*args, **kwargs):
        calls.append(1)
        raise AssertionError("decode called on the local-answer path")

    monkeypatch.setattr(flow_module, "decode", counting_decode)
    rejected = {**harness.auth(15000), "4": "000000000000"}  # zero amount: a validation reject
    assert (await client.request(rejected, timeout=3))["39"] == "13"
    assert (await client.request(harness.auth(15097), timeout=3))["39"] == "91"  # the switch never answers
    assert calls == []


@pytest.mark.parametrize("dialect_name", ["iso87ascii", "iso87binary", "iso93ascii"])
def test_an_answer_that_cannot_be_encoded_falls_back_to_the_fields_that_can(dialect_name):
    dialect = get_dialect(dialect_name)
    mti = "1100" if dialect.standard == "1993" else "0100"
    code = "000" if dialect.fields[39].length == 3 else "96"
    stan = "0" * (dialect.fields[11].length - 1) + "7"
    values = {11: stan, 41: "TERM0001", 4: "9" * 40, 49: "X"}  # 4 too long, 49 not numeric
    out = Flow._local_response(dialect, mti, values, code, None)
    resp = decode(dialect, out, check_types=False)
    assert resp["t"][2] == "1" and resp["39"] == code and resp["11"] == stan and resp["41"] == "TERM0001"
    assert "4" not in resp and "49" not in resp
    assert Flow._local_response(dialect, mti, {}, code, None) is not None  # MTI and 39 alone
    assert Flow._local_response(dialect, mti[:2] + "10", values, code, None) is None  # a response: no answer
    assert Flow._local_response(dialect, None, values, code, None) is None


async def test_two_hundred_hostile_frames_leave_every_honest_request_answered(harness):
    """A mix of the hostile frames above, interleaved with honest requests on another connection."""
    await harness.start_switch()
    gw = await harness.start_gateway()
    hostile = await harness.client()
    honest = await harness.client()
    answered = 0
    for i in range(200):
        msg = harness.auth(15000)
        raw = encode(D87, msg, check_types=False)
        variants = (with_bit_65(msg), raw[:4] + b"-" + raw[5:], raw[:3] + b"x" + raw[4:], raw[:-1], raw + b"0")
        await hostile.send_raw(hostile.framer.encode(variants[i % len(variants)]))
        if i % 20 == 0:
            assert (await honest.request(harness.auth(15000), timeout=3))["39"] == "00"
            answered += 1
    with trio.move_on_after(3):
        got = 0
        while got < 160:  # every variant but the unreadable MTI (1 in 5) gets its 30
            frame = await hostile.receive_frame(3)
            assert decode(hostile.dialect, frame.message, check_types=False)["39"] == "30"
            got += 1
    assert got == 160 and answered == 10
    await wait_for(lambda: gw.metrics.decode_errors("front", "ecom", "decode").get() == 200, 3, "all counted")
