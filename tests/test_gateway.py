"""The daemon end to end: real sockets on 127.0.0.1, the project's switch simulator, bounded waits."""

from __future__ import annotations

from functools import partial

import trio

from conftest import OTHER_PANS, TEST_PAN, wait_for
from iso_gateway.sim.client import FrontEndClient, sample_auth


async def test_an_approval_comes_back_with_the_front_ends_own_stan(harness):
    sim = await harness.start_switch()
    await harness.start_gateway()
    client = await harness.client()
    req = harness.auth(15000)
    resp = await client.request(req, timeout=3)
    assert resp["t"] == "0110" and resp["39"] == "00" and len(resp["38"]) == 6
    assert resp["11"] == req["11"] and resp["41"] == req["41"] and resp["4"] == req["4"]
    assert sim.count("0100") == 1


async def test_a_decline_is_passed_through(harness):
    await harness.start_switch()
    await harness.start_gateway()
    client = await harness.client()
    resp = await client.request(harness.auth(15051), timeout=3)
    assert resp["39"] == "51" and "38" not in resp


async def test_a_financial_request_gets_a_0210(harness):
    await harness.start_switch()
    await harness.start_gateway()
    client = await harness.client()
    resp = await client.request(harness.auth(20000, mti="0200"), timeout=3)
    assert resp["t"] == "0210" and resp["39"] == "00"


async def test_each_validation_reject_is_answered_by_the_gateway_without_reaching_the_switch(harness):
    sim = await harness.start_switch()
    await harness.start_gateway()
    client = await harness.client()
    cases = {
        "14": {"2": "4761739001010118"},          # Luhn
        "54": {"14": "2001"},                    # expired
        "13": {"4": "000000000000"},              # zero amount
        "30": {"11": "000000"},                   # STAN zero
        "12": {"3": "990000"},                    # processing code not allowed for 0100
    }
    for code, change in cases.items():
        req = {**harness.auth(), **change}
        resp = await client.request(req, timeout=3)
        assert (resp["t"], resp["39"]) == ("0110", code), change
        assert resp["11"] == req["11"]
    bad_currency = {**harness.auth(), "49": "999"}
    assert (await client.request(bad_currency, timeout=3))["39"] == "13"
    bad_time = {**harness.auth(), "7": "1332250000"}
    assert (await client.request(bad_time, timeout=3))["39"] == "30"
    missing = harness.auth()
    del missing["42"]
    assert (await client.request(missing, timeout=3))["39"] == "30"
    assert sim.count("0100") == 0


async def test_a_request_the_switch_does_not_answer_gets_91_within_its_timeout(harness):
    await harness.start_switch()
    await harness.start_gateway(routes=[{"name": "all", "upstream": "cmi", "timeout": 0.5}])
    client = await harness.client()
    start = trio.current_time()
    resp = await client.request(harness.auth(15097), timeout=3)
    elapsed = trio.current_time() - start
    assert resp["39"] == "91" and resp["t"] == "0110"
    assert 0.45 <= elapsed < 1.0


async def test_a_late_response_is_never_forwarded(harness):
    await harness.start_switch()
    gw = await harness.start_gateway(routes=[{"name": "all", "upstream": "cmi", "timeout": 0.3}])
    client = await harness.client()
    late = harness.auth(10899)  # the switch approves after 0.8 s
    resp = await client.request(late, timeout=3)
    assert resp["39"] == "91"
    late_metric = gw.metrics.late_responses("cmi", "00")
    await wait_for(lambda: late_metric.get() == 1, 3, "late response counted")
    ok = await client.request(harness.auth(15000), timeout=3)  # the connection is fine and in step
    assert ok["39"] == "00"
    assert client.unmatched == 0 and client.responses == 2


async def test_no_route_is_92_and_an_unknown_bin_is_15(harness):
    await harness.start_switch()
    await harness.start_gateway(routes=[
        {"name": "visa", "upstream": "cmi", "bins": ["4"], "currencies": ["504"]},
    ])
    client = await harness.client()
    assert (await client.request(harness.auth(pan="5413330089020011"), timeout=3))["39"] == "15"
    assert (await client.request({**harness.auth(), "49": "978"}, timeout=3))["39"] == "92"
    assert (await client.request(harness.auth(), timeout=3))["39"] == "00"


async def test_with_the_link_down_requests_are_answered_91_at_once(harness, autojump_clock):
    await harness.start_switch()
    gw = await harness.start_gateway(routes=[{"name": "all", "upstream": "cmi", "timeout": 5.0}])
    client = await harness.client()
    harness.stop_switch()
    await wait_for(lambda: not gw.upstreams["cmi"].ready, 3, "link down")
    start = trio.current_time()
    resp = await client.request(harness.auth(), timeout=3)
    assert resp["39"] == "91"
    assert trio.current_time() - start == 0  # virtual time: answered before any timer ran out


async def test_requests_in_flight_when_the_link_drops_are_answered_91_at_once(harness):
    await harness.start_switch()
    await harness.start_gateway(routes=[{"name": "all", "upstream": "cmi", "timeout": 5.0}])
    client = await harness.client()
    results = []

    async def one(amount):
        results.append(await client.request(harness.auth(amount), timeout=3))

    async with trio.open_nursery() as n:
        for _ in range(5):
            n.start_soon(one, 13097)  # never answered
        n.start_soon(one, 15098)  # the switch closes the connection on this one
    assert [r["39"] for r in results] == ["91"] * 6


async def test_the_gateway_reconnects_and_signs_on_again_after_the_switch_restarts(harness, autojump_clock):
    sim = await harness.start_switch()
    port = harness.switch_port
    gw = await harness.start_gateway()
    assert any(r.mti == "0800" for r in sim.records)
    harness.stop_switch()
    await wait_for(lambda: not gw.upstreams["cmi"].ready, 3, "link down")
    sim2 = await harness.start_switch(port=port)
    await wait_for(lambda: gw.upstreams["cmi"].ready, 5, "link back")
    assert [r.mti for r in sim2.records][:1] == ["0800"]  # signed on before any traffic
    client = await harness.client()
    assert (await client.request(harness.auth(), timeout=3))["39"] == "00"


async def test_an_idle_link_sends_echoes_and_answers_the_switchs_own_0800(harness):
    sim = await harness.start_switch(echo_interval=0.2)
    gw = await harness.start_gateway(upstream={"echo_interval": 0.2})
    await wait_for(lambda: sum(1 for r in sim.records if r.mti == "0800") >= 3, 3, "echoes")
    await wait_for(lambda: sim.echo_answered >= 1, 3, "the switch's echo answered")
    rtt = gw.metrics.echo_rtt("cmi")
    assert rtt._sum.get() > 0


async def test_a_link_whose_echoes_go_unanswered_is_reconnected(harness, autojump_clock):
    sim = await harness.start_switch()
    gw = await harness.start_gateway(upstream={"echo_interval": 0.1, "echo_timeout": 0.1, "echo_misses": 2})
    conn = gw.upstreams["cmi"].connections[0]
    first = conn.connects
    sim.mute_network = True  # the switch stops answering 0800s
    await wait_for(lambda: conn.connects > first, 5, "reconnect after missed echoes")
    assert gw.metrics.echo_missed("cmi").get() >= 2


async def test_two_front_ends_with_the_same_stans_in_flight_each_get_their_own_answers(harness):
    await harness.start_switch()
    await harness.start_gateway()
    a, b = await harness.client(), await harness.client()
    results: dict[tuple[str, int], dict] = {}

    async def send(client, name, stan, amount):
        req = sample_auth(stan, amount)
        results[(name, stan)] = await client.request(req, timeout=5)
        assert results[(name, stan)]["4"] == req["4"]

    async with trio.open_nursery() as n:
        for stan in range(1, 31):
            n.start_soon(send, a, "a", stan, 10000 + stan * 100)
            n.start_soon(send, b, "b", stan, 50000 + stan * 100)
    assert len(results) == 60
    assert all(r["39"] == "00" for r in results.values())


async def test_answers_come_in_completion_order_on_one_connection(harness, autojump_clock):
    await harness.start_switch()
    gw = await harness.start_gateway(routes=[{"name": "all", "upstream": "cmi", "timeout": 3.0}])
    client = await harness.client()
    order = []

    async def one(amount, label):
        await client.request(harness.auth(amount), timeout=3)
        order.append(label)

    async with trio.open_nursery() as n:
        n.start_soon(one, 10599, "slow")  # 0.5 s
        await wait_for(lambda: gw.upstreams["cmi"].in_flight() == 1, 3, "the slow one sent first")
        n.start_soon(one, 15000, "fast")
    assert order == ["fast", "slow"]


async def test_a_thousand_concurrent_front_end_connections_are_all_served(harness):
    await harness.start_switch()
    await harness.start_gateway(listener={"max_connections": 1500, "max_connections_per_source": 1500},
                                upstream={"connections": 2},
                                routes=[{"name": "all", "upstream": "cmi", "timeout": 10.0}])
    clients = []
    async with trio.open_nursery() as n:
        async def connect():
            clients.append(await FrontEndClient.connect("127.0.0.1", harness.port, "iso87ascii", "ascii4"))
        for _ in range(1000):
            n.start_soon(connect)
    harness.clients.extend(clients)
    codes = []

    async def one(i, c):
        codes.append((await c.request(sample_auth(i + 1, 10000, terminal=f"T{i:07d}"), timeout=20))["39"])

    async with trio.open_nursery() as n:
        for i, c in enumerate(clients):
            n.start_soon(one, i, c)
    assert codes == ["00"] * 1000


async def test_a_connection_over_the_limit_closes_the_longest_idle_one_and_the_listener_keeps_serving(harness):
    await harness.start_switch()
    gw = await harness.start_gateway(listener={"max_connections": 2})
    a = await harness.client()
    await wait_for(lambda: len(gw.listeners[0].connections) == 1, 2, "one connection")
    b = await harness.client()
    await wait_for(lambda: len(gw.listeners[0].connections) == 2, 2, "two connections")
    assert (await b.request(harness.auth(), timeout=3))["39"] == "00"
    extra = await harness.client()  # room is made: a, idle the longest, is closed
    await a.wait_closed(2)
    assert gw.metrics.connections_closed("ecom", "evicted_idle").get() == 1
    assert gw.metrics.connections_total("ecom", "refused").get() == 0
    assert (await b.request(harness.auth(), timeout=3))["39"] == "00"
    assert (await extra.request(harness.auth(), timeout=3))["39"] == "00"


async def test_a_client_that_stalls_in_a_half_frame_is_dropped_while_others_are_served(harness, autojump_clock):
    await harness.start_switch()
    gw = await harness.start_gateway(listener={"partial_frame_timeout": 0.3})
    stalled = await trio.open_tcp_stream("127.0.0.1", harness.port)
    await stalled.send_all(b"0150" + b"0100")  # promises 150 bytes, sends 4
    good = await harness.client()
    assert (await good.request(harness.auth(), timeout=3))["39"] == "00"
    with trio.fail_after(2):
        assert await stalled.receive_some(100) == b""  # the gateway closed it
    assert gw.metrics.connections_closed("ecom", "stalled_partial_frame").get() == 1
    assert (await good.request(harness.auth(), timeout=3))["39"] == "00"
    await stalled.aclose()


async def test_a_front_end_that_stops_reading_is_dropped_and_holds_no_one_else_up(harness, autojump_clock):
    import socket
    await harness.start_switch()
    # Virtual time (autojump): the clock moves only when every task waits, so the 3,000 requests
    # take no time however slow the machine, and the send timeout runs out only while nothing else
    # is left to do. The property is who gets served, not how fast.
    gw = await harness.start_gateway(listener={"send_timeout": 5.0, "max_in_flight": 100_000},
                                     upstream={"max_in_flight": 10_000},
                                     routes=[{"name": "all", "upstream": "cmi", "timeout": 60.0}])
    good = await harness.client()
    deaf = trio.socket.socket()
    deaf.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await deaf.connect(("127.0.0.1", harness.port))
    stream = trio.SocketStream(deaf)
    await stream.send_all(b"".join(good.frame(harness.auth()) for _ in range(3000)))  # and never reads
    closed = gw.metrics.connections_closed("ecom", "stalled_reader")
    served_while_deaf_open = 0
    with trio.fail_after(120):
        while closed.get() == 0:
            # Served while the deaf connection's answers wait for its send timeout: a deaf
            # reader that held the gateway would let this answer through only after its close.
            assert (await good.request(harness.auth(), timeout=60.0))["39"] == "00"
            served_while_deaf_open += closed.get() == 0
            await trio.sleep(0.5)  # virtual, idle: the clock moves towards the deaf connection's send timeout
    assert served_while_deaf_open >= 1 and len(gw.listeners[0].connections) == 1
    assert (await good.request(harness.auth(), timeout=60.0))["39"] == "00"
    await stream.aclose()


async def test_a_switch_that_loses_framing_is_counted_and_reconnected(harness, autojump_clock):
    connections = []

    async def garbage_switch(stream):
        connections.append(stream)
        await stream.send_all(b"00X1")  # not a length: framing lost at once
        await trio.sleep_forever()  # and holds the connection: the gateway is the one to close it

    listeners = await harness.nursery.start(partial(trio.serve_tcp, garbage_switch, 0, host="127.0.0.1"))
    harness.switch_port = listeners[0].socket.getsockname()[1]
    gw = await harness.start_gateway(wait_ready=False, upstream={"sign_on": False, "reconnect_initial": 0.05})
    await wait_for(lambda: len(connections) >= 2, 5, "a reconnect")
    assert gw.metrics.decode_errors("upstream", "cmi", "framing").get() >= 1
    client = await harness.client()  # the front end is still served: no link, so 91 at once
    assert (await client.request(harness.auth(), timeout=3))["39"] == "91"


async def test_an_internal_error_reading_one_connection_closes_only_that_one(harness, monkeypatch):
    from iso_gateway.net.frontend import FrontConnection
    await harness.start_switch()
    gw = await harness.start_gateway()
    good = await harness.client()
    victim = await harness.client()
    await wait_for(lambda: len(gw.listeners[0].connections) == 2, 2, "two connections")
    victim_conn = max(gw.listeners[0].connections, key=lambda c: c.id)
    original = FrontConnection.on_readable

    def on_readable(self, now, touched):
        if self is victim_conn:
            raise RuntimeError("a bug")
        return original(self, now, touched)

    monkeypatch.setattr(FrontConnection, "on_readable", on_readable)
    await victim.send(harness.auth())
    await victim.wait_closed(3)
    assert gw.metrics.connections_closed("ecom", "internal_error").get() == 1
    assert (await good.request(harness.auth(), timeout=3))["39"] == "00"


async def test_garbage_is_answered_or_counted_and_lost_framing_closes_cleanly(harness):
    await harness.start_switch()
    gw = await harness.start_gateway()
    client = await harness.client()
    await client.send_raw(client.framer.encode(b"0100" + b"ZZZZ"))  # readable MTI, broken bitmap
    frame = await client.receive_frame(2)
    from iso_gateway.core.message import decode
    resp = decode(client.dialect, frame.message, check_types=False)
    assert (resp["t"], resp["39"]) == ("0110", "30")
    await client.send_raw(client.framer.encode(b"\xff\xfe garbage"))  # unreadable: counted and dropped
    assert (await client.request(harness.auth(), timeout=3))["39"] == "00"  # the connection survives
    assert gw.metrics.decode_errors("front", "ecom", "decode").get() == 2
    raw = await trio.open_tcp_stream("127.0.0.1", harness.port)
    await raw.send_all(b"00X1")  # not a length: framing is lost
    with trio.fail_after(2):
        assert await raw.receive_some(100) == b""
    await raw.aclose()
    assert gw.metrics.connections_closed("ecom", "framing_lost").get() == 1


async def test_reading_pauses_at_the_in_flight_limit_and_every_request_is_answered(harness, autojump_clock):
    await harness.start_switch()
    await harness.start_gateway(listener={"max_in_flight": 2},
                                routes=[{"name": "all", "upstream": "cmi", "timeout": 3.0}])
    client = await harness.client()
    codes = []

    async def one(i):
        codes.append((await client.request(harness.auth(10199), timeout=5))["39"])  # 0.1 s each

    async with trio.open_nursery() as n:
        for i in range(10):
            n.start_soon(one, i)
    assert codes == ["00"] * 10


async def test_front_end_echo_is_answered_by_the_gateway_itself(harness):
    sim = await harness.start_switch()
    await harness.start_gateway()
    client = await harness.client()
    before = sim.count("0800")
    resp = await client.request({"t": "0800", "7": "1127103000", "11": "000777", "70": "301"}, timeout=3)
    assert (resp["t"], resp["39"], resp["70"]) == ("0810", "00", "301")
    assert sim.count("0800") == before


async def test_a_reload_changes_routes_without_dropping_connections(harness):
    await harness.start_switch()
    gw = await harness.start_gateway()
    client = await harness.client()
    assert (await client.request(harness.auth(), timeout=3))["39"] == "00"
    from conftest import make_config
    new = make_config(harness.switch_port, routes=[{"name": "mc-only", "upstream": "cmi", "bins": ["5"]}])
    gw.reload(new)
    assert (await client.request(harness.auth(), timeout=3))["39"] == "15"
    assert (await client.request(harness.auth(pan=OTHER_PANS[0]), timeout=3))["39"] == "00"


async def test_no_card_number_reaches_the_log(harness, caplog):
    await harness.start_switch()
    await harness.start_gateway(routes=[{"name": "visa", "upstream": "cmi", "bins": ["5"], "timeout": 0.3}])
    client = await harness.client()
    await client.request(harness.auth(), timeout=3)  # unknown BIN: logged with the PAN masked
    await client.request({**harness.auth(), "2": TEST_PAN[:-1] + "8"}, timeout=3)  # Luhn reject
    text = caplog.text
    assert "476173******0119" in text
    assert TEST_PAN not in text and TEST_PAN[:-1] not in text
