"""MACs per hop and identified front ends through a running gateway, on real sockets.

The front end and the switch here are written in the test: each signs and checks with the retail
MAC function of ``security.mac`` (held to the published ISO 9797-1 vectors and to a build from
single-DES steps in test_security_mac.py) and its own key, as a peer that shares only the key
would. The gateway's keys are imported into its security module before it starts, as an operator
does with ``iso-gateway keys import``.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio

from conftest import make_config, wait_for
from iso_gateway.core.framing import framer_from_config
from iso_gateway.core.macs import MacField
from iso_gateway.core.message import decode, encode
from iso_gateway.gateway import Gateway
from iso_gateway.keys import open_security_module
from iso_gateway.metrics import Metrics
from iso_gateway.security.mac import retail_mac
from iso_gateway.sim.client import sample_auth, sample_reversal
from iso_gateway.specfiles import get_dialect

FRONT_KEY = bytes.fromhex("0123456789ABCDEFFEDCBA9876543210")
SWITCH_KEY = bytes.fromhex("89ABCDEF0123456776543210FEDCBA98")
DIALECT = get_dialect("iso87ascii")
FIELD = MacField(DIALECT)
FRAMER = framer_from_config("ascii4")


def sign(msg: dict[str, str], key: bytes) -> bytes:
    mac_field = "128" if any(k.isdigit() and int(k) > 64 for k in msg) else "64"
    raw = encode(DIALECT, {**msg, mac_field: "0" * 16})
    body = raw[:-FIELD.width]
    return body + retail_mac(key, body)[:8].hex().upper().encode()


def signed_by(raw: bytes, key: bytes) -> bool:
    body = raw[:-FIELD.width]
    return raw[-FIELD.width:] == retail_mac(key, body)[:8].hex().upper().encode()


class MacSwitch:
    """A switch that checks every request's MAC with its key and signs every answer with it."""

    def __init__(self) -> None:
        self.received: list[dict[str, str]] = []
        self.bad = 0
        self.approve = True

    async def serve(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        task_status.started(listeners[0].socket.getsockname()[1])
        await trio.serve_listeners(self._conn, listeners)

    async def _conn(self, stream: trio.SocketStream) -> None:
        decoder = FRAMER.decoder()
        async for data in stream:
            for frame in decoder.feed(data):
                msg = decode(DIALECT, frame.message)
                if msg["t"][1] == "8":
                    resp = {k: v for k, v in msg.items() if k in ("7", "11", "70")}
                    await stream.send_all(FRAMER.encode(encode(DIALECT, {**resp, "t": "0810", "39": "00"})))
                    continue
                if not signed_by(frame.message, SWITCH_KEY):
                    self.bad += 1
                    continue
                self.received.append(msg)
                resp = {k: v for k, v in msg.items() if k in ("3", "4", "7", "11", "37", "41", "42", "49", "90")}
                resp.update({"t": msg["t"][:2] + str(int(msg["t"][2]) + 1) + msg["t"][3],
                             "39": "00" if self.approve else "05"})
                await stream.send_all(FRAMER.encode(sign(resp, SWITCH_KEY)))


async def start(nursery: trio.Nursery, tmp_path: Any, switch: MacSwitch, *, front_mac: bool = True,
                **listener: Any) -> Gateway:
    port = await nursery.start(switch.serve)
    cfg = make_config(port, state_dir=tmp_path, listener={**({"mac": {"key": "ecom.mac"}} if front_mac else {}), **listener},
                      upstream={"mac": {"key": "cmi.mac"}, "sign_on": False})
    module = open_security_module(cfg)
    module.import_key("ecom.mac", FRONT_KEY, usage="mac", algorithm="retail")
    module.import_key("cmi.mac", SWITCH_KEY, usage="mac", algorithm="retail")
    module.close()
    gw = Gateway(cfg, metrics=Metrics(process=False))
    await nursery.start(gw.run)
    await wait_for(lambda: all(u.ready for u in gw.upstreams.values()), 5.0, "upstream ready")
    return gw


async def exchange(port: int, raw: bytes) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(FRAMER.encode(raw))
        decoder = FRAMER.decoder()
        with trio.fail_after(5):
            async for data in stream:
                frames = decoder.feed(data)
                if frames:
                    return frames[0].message
    raise AssertionError("no answer")


async def test_a_signed_authorization_crosses_both_macd_hops_and_its_answer_is_signed_for_the_front_end(
        nursery, tmp_path):
    switch = MacSwitch()
    gw = await start(nursery, tmp_path, switch)
    msg = sample_auth(1, 15000)
    answer = await exchange(gw.listeners[0].port, sign(msg, FRONT_KEY))
    assert signed_by(answer, FRONT_KEY)
    resp = decode(DIALECT, answer)
    assert resp["39"] == "00" and resp["11"] == msg["11"]
    assert len(switch.received) == 1 and switch.bad == 0  # the switch checked the gateway's MAC with its key
    reversal = sample_reversal(msg)
    answer = await exchange(gw.listeners[0].port, sign(reversal, FRONT_KEY))  # field 90: the MAC goes in 128
    assert signed_by(answer, FRONT_KEY) and decode(DIALECT, answer)["39"] == "00"
    assert switch.received[-1]["t"] == "0420" and switch.bad == 0


async def test_a_mac_on_the_switch_link_only_is_added_to_each_request_and_dropped_from_each_answer(nursery, tmp_path):
    """Front ends on their own (no MAC on the listener), the switch link MAC'd: the switch gets
    every request signed with its key (field 64 added; 128 for a reversal with field 90), the front
    end every answer without a MAC field, byte for byte what it would be with no MAC anywhere."""
    switch = MacSwitch()
    gw = await start(nursery, tmp_path, switch, front_mac=False)
    msg = sample_auth(7, 15000)
    answer = await exchange(gw.listeners[0].port, encode(DIALECT, msg))
    resp = decode(DIALECT, answer)
    assert resp["39"] == "00" and resp["11"] == msg["11"] and "64" not in resp and "128" not in resp
    assert answer == encode(DIALECT, resp)  # what an encoder gives: bitmap and bytes, no MAC field
    assert len(switch.received) == 1 and switch.bad == 0
    for field in ("2", "3", "4", "37", "41", "42", "43", "49"):  # the rest of the request as the front end sent it
        assert switch.received[0][field] == msg[field]
    answer = await exchange(gw.listeners[0].port, encode(DIALECT, sample_reversal(msg)))  # field 90: MAC in 128
    assert decode(DIALECT, answer)["39"] == "00" and not {"64", "128"} & set(decode(DIALECT, answer))
    assert switch.received[-1]["t"] == "0420" and switch.bad == 0


@pytest.mark.parametrize("where", [0, 10, 40, -20, -1])
async def test_a_tampered_byte_gets_63_and_nothing_reaches_the_switch(nursery, tmp_path, where):
    switch = MacSwitch()
    gw = await start(nursery, tmp_path, switch)
    raw = bytearray(sign(sample_auth(2, 15000), FRONT_KEY))
    raw[where] ^= 0x01  # still ASCII: the format holds, the MAC does not
    answer = await exchange(gw.listeners[0].port, bytes(raw))
    rc = decode(DIALECT, answer)["39"]
    assert rc in ("63", "30") and switch.received == []
    assert signed_by(answer, FRONT_KEY)


async def test_an_unsigned_request_gets_63_and_a_front_end_of_another_merchant_gets_58(nursery, tmp_path):
    switch = MacSwitch()
    gw = await start(nursery, tmp_path, switch, clients=[{"identity": "addr:127.0.0.1",
                                                          "merchants": ["MERCHANT0000009"]}])
    answer = await exchange(gw.listeners[0].port, encode(DIALECT, sample_auth(3, 15000)))
    assert decode(DIALECT, answer)["39"] == "63"
    answer = await exchange(gw.listeners[0].port, sign(sample_auth(4, 15000), FRONT_KEY))
    assert decode(DIALECT, answer)["39"] == "58" and switch.received == []
    assert gw.metrics.mac_failures("front", "ecom", "missing").get() == 1
    assert gw.metrics.rejections("ecom", "not_authorized", "58").get() == 1


async def test_a_switch_answer_with_a_bad_mac_is_answered_91_and_reversed(nursery, tmp_path):
    switch = MacSwitch()
    gw = await start(nursery, tmp_path, switch)
    real_sign = sign

    def bad_sign(msg: dict[str, str], key: bytes) -> bytes:
        raw = bytearray(real_sign(msg, key))
        if msg["t"] == "0110":
            raw[-1] = ord("0") if raw[-1] != ord("0") else ord("1")
        return bytes(raw)

    globals()["sign"] = bad_sign
    try:
        answer = await exchange(gw.listeners[0].port, real_sign(sample_auth(5, 15000), FRONT_KEY))
    finally:
        globals()["sign"] = real_sign
    assert decode(DIALECT, answer)["39"] == "91"
    assert gw.metrics.mac_failures("upstream", "cmi", "bad").get() == 1
    await wait_for(lambda: any(m["t"] in ("0420", "0421") for m in switch.received), 10, "the reversal")


# ---------------------------------------------------------------------------------- the simulator, and new keys

ZONE_KEY = bytes.fromhex("C1D0F8FB4958670DBA40AB1F3752EF0D")
NEW_KEY = bytes.fromhex("A1B2C3D4E5F60718293A4B5C6D7E8F90")


async def start_with_simulator(harness: Any, tmp_path: Any, gateway_zone_key: bytes) -> Gateway:
    from iso_gateway.sim.switch import SwitchSimulator

    sim = SwitchSimulator(mac_key=SWITCH_KEY, zone_key=ZONE_KEY)
    harness.switch_port = await harness.nursery.start(sim.serve, "127.0.0.1", 0)
    harness.switch = sim
    cfg = make_config(harness.switch_port, state_dir=tmp_path,
                      upstream={"mac": {"key": "cmi.mac", "zone_key": "cmi.zmk"}})
    module = open_security_module(cfg)
    module.import_key("cmi.mac", SWITCH_KEY, usage="mac", algorithm="retail")
    module.import_key("cmi.zmk", gateway_zone_key, usage="kek", key_type="tdes")
    module.close()
    gw = Gateway(cfg, metrics=Metrics(process=False))
    await harness.nursery.start(gw.run)
    harness.gateway = gw
    await wait_for(lambda: all(u.ready for u in gw.upstreams.values()), 5.0, "upstream ready")
    return gw


async def test_the_simulator_checks_and_signs_macs_and_a_new_key_it_sends_is_used_from_the_next_message(
        harness, tmp_path, caplog):
    gw = await start_with_simulator(harness, tmp_path, ZONE_KEY)
    sim = harness.switch
    client = await harness.client()
    assert (await client.request(harness.auth(15000), timeout=3))["39"] == "00"
    assert await sim.change_mac_key(NEW_KEY) == 1
    await wait_for(lambda: sim.key_changes == 1, 5, "the gateway's 0810 to the key change")
    assert (await client.request(harness.auth(15000), timeout=3))["39"] == "00"  # under the new key both ways
    assert sim.mac_failures == 0 and gw.metrics.mac_failures("upstream", "cmi", "bad").get() == 0
    assert "new MAC key installed (check value" in caplog.text
    assert NEW_KEY.hex().upper() not in caplog.text and NEW_KEY.hex() not in caplog.text


async def test_a_new_key_under_another_zone_key_is_refused_and_the_old_one_stays(harness, tmp_path):
    gw = await start_with_simulator(harness, tmp_path, bytes.fromhex("0123456789ABCDEFFEDCBA9876543210"))
    sim = harness.switch
    client = await harness.client()
    await sim.change_mac_key(NEW_KEY)
    await wait_for(lambda: sim.key_changes_refused == 1, 5, "the gateway's refusal")
    assert (await client.request(harness.auth(15000), timeout=3))["39"] == "00"  # the old key, both sides
    assert sim.mac_failures == 0 and gw.metrics.mac_failures("upstream", "cmi", "key_change").get() == 1
