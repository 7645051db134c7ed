"""The front door under abuse: dribbling clients (slowloris) and one address holding the listener.

The partial-frame deadline is checked as a property of ``FrontConnection`` alone
(a socket pair, a poller that is never run, times given by hand: no clock at all),
and end to end on loopback with small limits. Several source addresses come from
127.0.0.0/8, all of which is loopback on Linux.
"""

from __future__ import annotations

import socket
from types import SimpleNamespace

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import wait_for
from iso_gateway.config import ListenerConfig
from iso_gateway.specfiles import get_dialect
from iso_gateway.core.framing import framer_from_config
from iso_gateway.net.frontend import FrontConnection
from iso_gateway.metrics import NullMetrics
from iso_gateway.net.poller import Poller
from iso_gateway.sim.client import FrontEndClient
from iso_gateway.net.sockio import SocketIO

PARTIAL = 1.0
IDLE = 300.0


# --------------------------------------------------------------------------- slowloris: the deadline's property


def _connection() -> tuple[FrontConnection, socket.socket, list[str]]:
    """A FrontConnection on one end of a socket pair (the test writes the other), outside any event loop."""
    cfg = ListenerConfig(name="ecom", port=0, partial_frame_timeout=PARTIAL, idle_timeout=IDLE)
    closed: list[str] = []
    gateway = SimpleNamespace(metrics=NullMetrics(), on_front_frames=lambda conn, frames, touched, now: None)
    listener = SimpleNamespace(cfg=cfg, name="ecom", gateway=gateway, framer=framer_from_config("ascii4"), side=None,
                               closed=lambda conn, reason: closed.append(reason))
    ours, theirs = socket.socketpair()
    poller = Poller(lambda: None, lambda touched: touched)
    conn = FrontConnection(listener, SocketIO(ours), poller)  # type: ignore[arg-type]
    return conn, theirs, closed


frames_and_cuts = st.lists(st.integers(0, 40), min_size=1, max_size=6).flatmap(
    lambda sizes: st.tuples(
        st.just(b"".join(b"%04d" % n + b"x" * n for n in sizes)),
        st.lists(st.tuples(st.integers(1, 12), st.floats(0.0, 0.6)), min_size=1, max_size=60),
    ))


@settings(max_examples=200, deadline=None)
@given(frames_and_cuts)
def test_a_partial_frame_deadline_runs_from_the_frames_first_byte_however_the_bytes_dribble_in(case):
    stream, cuts = case
    bounds, at = [], 0  # (first byte, end) of each frame in the stream
    while at < len(stream):
        end = at + 4 + int(stream[at:at + 4])
        bounds.append((at, end))
        at = end
    conn, peer, closed = _connection()
    try:
        now, sent, sent_at = 0.0, 0, []  # sent_at[i]: when byte i was read
        conn.start_reading(now)
        for size, gap in cuts:
            if sent >= len(stream):
                break
            now += gap
            chunk = stream[sent:sent + size]
            peer.sendall(chunk)
            conn.on_readable(now, set())
            sent += len(chunk)
            sent_at += [now] * len(chunk)
            assert not closed
            started = [first for first, end in bounds if first < sent < end]
            if started:  # part of a frame is held: its deadline is its first byte's time + the timeout
                assert conn.deadline == sent_at[started[0]] + PARTIAL
            else:
                assert conn.deadline == now + IDLE
    finally:
        conn.sock.close()
        peer.close()


def test_a_client_dribbling_one_byte_at_a_time_keeps_no_frame_open_past_the_timeout():
    conn, peer, closed = _connection()
    try:
        conn.start_reading(0.0)
        now = 0.0
        for byte in b"0150" + b"0100":  # promises 150 bytes, sends one every 0.3 s
            now += 0.3
            peer.sendall(bytes([byte]))
            conn.on_readable(now, set())
        assert conn.deadline == 0.3 + PARTIAL  # from the first byte, however many came since
    finally:
        conn.sock.close()
        peer.close()


async def test_a_dribbling_client_is_dropped_partial_frame_timeout_after_its_first_byte(harness, autojump_clock):
    await harness.start_switch()
    gw = await harness.start_gateway(listener={"partial_frame_timeout": 1.0})
    good = await harness.client()
    slow = await trio.open_tcp_stream("127.0.0.1", harness.port)
    started = trio.current_time()
    closed_at = None
    with trio.fail_after(5):
        for byte in b"0150" + b"0100" * 4:  # a byte every 0.3 s: 4.8 s if it were never dropped
            try:
                await slow.send_all(bytes([byte]))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                closed_at = trio.current_time()
                break
            with trio.move_on_after(0.3):
                try:
                    if await slow.receive_some(10) == b"":
                        closed_at = trio.current_time()
                        break
                except trio.BrokenResourceError:
                    closed_at = trio.current_time()
                    break
    assert closed_at is not None, "the dribbling client was never dropped"
    # Virtual time: dropped when its partial-frame timeout runs out, not a moment later.
    assert closed_at - started == pytest.approx(1.0)
    assert gw.metrics.connections_closed("ecom", "stalled_partial_frame").get() == 1
    assert (await good.request(harness.auth(), timeout=3))["39"] == "00"
    await slow.aclose()


# --------------------------------------------------------------------------- one address can't hold the listener


async def client_from(source: str, port: int) -> FrontEndClient:
    """A front-end client whose connection comes from ``source`` (an address in 127.0.0.0/8)."""
    sock = trio.socket.socket()
    await sock.bind((source, 0))
    await sock.connect(("127.0.0.1", port))
    return FrontEndClient(trio.SocketStream(sock), get_dialect("iso87ascii"), framer_from_config("ascii4"))


async def test_one_address_gets_at_most_max_connections_per_source_and_others_are_still_served(harness, autojump_clock):
    await harness.start_switch()
    gw = await harness.start_gateway(listener={"max_connections_per_source": 3, "max_connections": 50})
    lst = gw.listeners[0]
    held = [await client_from("127.0.0.2", harness.port) for _ in range(3)]
    harness.clients.extend(held)
    await wait_for(lambda: len(lst.connections) == 3, 2, "three connections")
    for _ in range(4):
        extra = await client_from("127.0.0.2", harness.port)
        harness.clients.append(extra)
        await extra.wait_closed(2)
    assert gw.metrics.connections_total("ecom", "refused_per_source").get() == 4
    assert lst.per_source == {"127.0.0.2": 3}
    other = await client_from("127.0.0.3", harness.port)
    harness.clients.append(other)
    assert (await other.request(harness.auth(), timeout=3))["39"] == "00"
    assert (await held[0].request(harness.auth(), timeout=3))["39"] == "00"
    await held[1].aclose()
    await wait_for(lambda: lst.per_source.get("127.0.0.2") == 2, 2, "the count drops with the close")
    again = await client_from("127.0.0.2", harness.port)
    harness.clients.append(again)
    assert (await again.request(harness.auth(), timeout=3))["39"] == "00"


async def test_a_full_listener_makes_room_by_closing_the_longest_idle_connections_first(harness, autojump_clock):
    await harness.start_switch()
    gw = await harness.start_gateway(listener={"max_connections": 4, "max_connections_per_source": 4})
    lst = gw.listeners[0]
    flood = []
    for _ in range(4):  # the flood: idle sockets from one address fill the listener
        flood.append(await client_from("127.0.0.2", harness.port))
        await wait_for(lambda: len(lst.connections) == len(flood), 2, "accepted")
        await trio.sleep(0.01)  # virtual: distinct accept times, so the order of idleness is known
    harness.clients.extend(flood)
    # The newest flood connection talks: it is no longer the longest idle.
    assert (await flood[0].request(harness.auth(), timeout=3))["39"] == "00"
    honest = []
    for i in range(3):
        c = await client_from(f"127.0.0.{3 + i}", harness.port)
        harness.clients.append(c)
        assert (await c.request(harness.auth(), timeout=3))["39"] == "00"
        honest.append(c)
    for victim in flood[1:]:  # closed in order of idleness; flood[0] had spoken, so it is kept
        await victim.wait_closed(2)
    assert not flood[0].closed
    assert gw.metrics.connections_closed("ecom", "evicted_idle").get() == 3
    assert gw.metrics.connections_total("ecom", "refused").get() == 0
    assert len(lst.connections) == 4


async def test_a_burst_of_fresh_idle_connections_never_pushes_out_a_front_end_between_payments(harness, autojump_clock):
    await harness.start_switch()
    gw = await harness.start_gateway(listener={"max_connections": 4, "max_connections_per_source": 4})
    lst = gw.listeners[0]
    honest = await harness.client()
    assert (await honest.request(harness.auth(), timeout=3))["39"] == "00"
    await trio.sleep(0.05)  # virtual: it is now idle longer than anything the burst opens
    burst = []
    for i in range(8):  # more fresh sockets than the listener holds, none of which ever sends
        c = await client_from(f"127.0.0.{2 + i % 4}", harness.port)
        harness.clients.append(c)
        burst.append(c)
    await wait_for(lambda: gw.metrics.connections_closed("ecom", "evicted_idle").get() == 5, 3, "room made 5 times")
    assert not honest.closed
    assert (await honest.request(harness.auth(), timeout=3))["39"] == "00"
    assert len(lst.connections) == 4


async def test_a_connection_with_a_request_in_flight_is_never_closed_to_make_room(harness, autojump_clock):
    await harness.start_switch()
    gw = await harness.start_gateway(listener={"max_connections": 2})
    busy = [await harness.client(), await harness.client()]
    results: list[str] = []

    async def slow_request(c: FrontEndClient) -> None:
        results.append((await c.request(harness.auth(amount=599), timeout=5))["39"])  # answered after 0.5 s

    async with trio.open_nursery() as n:
        for c in busy:
            n.start_soon(slow_request, c)
        await wait_for(lambda: sum(c.in_flight for c in gw.listeners[0].connections) == 2, 2, "both requests in flight")
        extra = await client_from("127.0.0.3", harness.port)
        harness.clients.append(extra)
        await extra.wait_closed(2)
    assert results == ["00", "00"]
    assert gw.metrics.connections_total("ecom", "refused").get() == 1
    assert gw.metrics.connections_closed("ecom", "evicted_idle").get() == 0


def test_the_per_source_limit_counts_ipv4_addresses_and_ipv6_64s():
    from iso_gateway.net.frontend import source_key
    assert source_key("127.0.0.2") == "127.0.0.2"
    assert source_key("::ffff:10.1.2.3") == "::ffff:10.1.2.3"
    assert source_key("2001:db8:1:2::1") == source_key("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert source_key("2001:db8:1:3::1") != source_key("2001:db8:1:2::1")
    assert source_key("fe80::1%eth0") == "fe80::/64"


class _FakeConnection:
    """What ``Listener._make_room`` looks at in a connection."""

    def __init__(self, i: int, listener) -> None:
        self.id, self.listener, self.last_read, self.in_flight, self.closed = i, listener, 0.0, 0, False
        self.used = False

    def close(self, reason: str) -> None:
        self.closed = True
        self.listener.connections.discard(self)


@settings(max_examples=150, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from(["read", "frame", "busy", "done", "evict", "evict"]), st.integers(0, 19)),
                    max_size=80),
       pause=st.sampled_from([0.001, 1.5]))
def test_room_is_made_by_closing_a_never_used_then_the_longest_idle_connection_never_one_in_flight(ops, pause):
    import math

    from iso_gateway.net.frontend import Listener

    async def main() -> None:
        lst = Listener.__new__(Listener)
        lst.cfg = SimpleNamespace(max_connections=20)
        lst.name = "ecom"
        lst.gateway = SimpleNamespace(metrics=NullMetrics())
        lst._evictable, lst._evictable_at, lst._refusals, lst._refusal_logged = [], -math.inf, 0, -math.inf
        lst._accepted_since_batch = False
        conns = [_FakeConnection(i, lst) for i in range(20)]
        lst.connections = set(conns)
        for op, i in ops:
            await trio.sleep(pause)  # virtual; 1.5 s: every eviction looks afresh; 1 ms: within one batch
            now, c = trio.current_time(), conns[i]
            if op == "read" and not c.closed:
                c.last_read = now
            elif op == "frame" and not c.closed:
                c.last_read, c.used = now, True
            elif op == "busy" and not c.closed:
                c.in_flight += 1
                c.last_read, c.used = now, True
            elif op == "done" and c.in_flight:
                c.in_flight -= 1
            elif op == "evict":
                idle = [x for x in lst.connections if x.in_flight == 0]
                before = set(lst.connections)
                assert lst._make_room() == bool(idle)
                gone = before - lst.connections
                assert len(gone) == (1 if idle else 0)
                for victim in gone:
                    assert victim.in_flight == 0 and victim.closed
                    if pause > 1:  # never-used ones first, then the longest idle
                        assert (victim.used, victim.last_read) == min((x.used, x.last_read) for x in idle)

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
