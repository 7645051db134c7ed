"""The observability endpoint under ordinary abuse: bursts of scrapes, slow and silent clients, garbage.

The server runs on 127.0.0.1 with small limits; one connection's handling
(``serve_connection``) is also driven over an in-memory stream with trio's
MockClock, so timeouts are checked without waiting for them.
"""

from __future__ import annotations

import gzip
from collections import Counter

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import wait_for
from iso_gateway.net.http import MAX_HEADER_BYTES, Limits, ObservabilityApp, serve_connection, start_server
from iso_gateway.metrics import Metrics


def _metrics() -> Metrics:
    m = Metrics(process=False)
    m.front_received("ecom", "0100").inc(7)
    m.flush()
    return m


async def _server(limits: Limits, metrics: Metrics | None = None):
    metrics = metrics or _metrics()
    return start_server("127.0.0.1", 0, metrics.registry, lambda: (True, "test"), before_scrape=metrics.flush,
                        limits=limits)


async def _close(server) -> None:
    with trio.CancelScope(shield=True):
        await trio.to_thread.run_sync(server.close)


async def _exchange(port: int, request: bytes, timeout: float = 20) -> bytes:
    """Send ``request`` and read until the server closes; everything it sent."""
    with trio.fail_after(timeout):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        try:
            await stream.send_all(request)
            out = bytearray()
            while True:
                try:
                    data = await stream.receive_some(65536)
                except trio.BrokenResourceError:
                    break
                if not data:
                    break
                out += data
            return bytes(out)
        finally:
            await stream.aclose()


SCRAPE = b"GET /metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"


async def test_a_thousand_concurrent_scrapes_are_all_answered_sharing_few_renders():
    server = await _server(Limits(max_connections=64, header_timeout=5.0))
    answers: list[bytes] = []
    try:
        async def one() -> None:
            answers.append(await _exchange(server.port, SCRAPE, timeout=30))

        with trio.fail_after(30):
            async with trio.open_nursery() as n:
                for _ in range(1000):
                    n.start_soon(one)
    finally:
        await _close(server)
    assert len(answers) == 1000
    assert all(a.startswith(b"HTTP/1.1 200 ") and b'iso_gateway_front_messages_received_total{listener="ecom",mti="0100"} 7.0'
               in a for a in answers)
    assert server.app.renders < 1000  # scrapes arriving together share a render
    assert server.stats["peak"] <= 64


async def test_a_silent_a_half_sent_and_a_dribbling_request_are_all_closed_after_the_header_timeout():
    server = await _server(Limits(header_timeout=0.5))
    try:
        silent = await trio.open_tcp_stream("127.0.0.1", server.port)
        half = await trio.open_tcp_stream("127.0.0.1", server.port)
        await half.send_all(b"GET /metrics HTTP/1.1\r\nHost: t\r\n")
        dribble = await trio.open_tcp_stream("127.0.0.1", server.port)
        started = trio.current_time()
        closed: dict[str, float] = {}

        async def wait_closed(name: str, stream: trio.SocketStream) -> None:
            while True:
                try:
                    if await stream.receive_some(100) == b"":
                        break
                except trio.BrokenResourceError:
                    break
            closed[name] = trio.current_time() - started

        async def dribbling() -> None:
            for byte in b"GET /metrics HTTP/1.1\r\nHost: a-long-host-name\r\nX: y\r\n\r\n":
                try:
                    await dribble.send_all(bytes([byte]))
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return
                # Real time on purpose: the server runs on its own thread and clock. A byte every
                # 0.1 s, 54 bytes: 5.4 s if it were never cut off.
                await trio.sleep(0.1)

        with trio.fail_after(4):
            async with trio.open_nursery() as n:
                n.start_soon(dribbling)
                async with trio.open_nursery() as closing:
                    for name, stream in (("silent", silent), ("half", half), ("dribble", dribble)):
                        closing.start_soon(wait_closed, name, stream)
                n.cancel_scope.cancel()  # all three closed: the dribbler stops
        assert set(closed) == {"silent", "half", "dribble"} and max(closed.values()) < 3, closed
        assert server.stats["closed_header_timeout"] == 3
        for s in (silent, half, dribble):
            await s.aclose()
        assert (await _exchange(server.port, SCRAPE)).startswith(b"HTTP/1.1 200 ")
    finally:
        await _close(server)


async def test_the_connection_cap_holds_and_a_waiting_scrape_is_served_when_a_slot_frees():
    server = await _server(Limits(max_connections=3, header_timeout=1.0))
    held = []
    try:
        for _ in range(3):
            held.append(await trio.open_tcp_stream("127.0.0.1", server.port))
        late = await trio.open_tcp_stream("127.0.0.1", server.port)  # queued by the kernel, not served yet
        await late.send_all(SCRAPE)
        with trio.move_on_after(0.5):
            assert await late.receive_some(100) == b"never"  # nothing while three silent ones hold the slots
        assert server.stats["open"] == 3 and server.stats["peak"] == 3
        with trio.fail_after(5):  # the silent ones time out, and the waiting scrape gets its answer
            data = await late.receive_some(65536)
        assert data.startswith(b"HTTP/1.1 200 ")
        assert server.stats["peak"] == 3
        await late.aclose()
    finally:
        for s in held:
            await s.aclose()
        await _close(server)


@pytest.mark.parametrize("garbage", [
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(32)) + b"\r\n\r\n",  # a TLS hello
    b"GET /metrics HTTP/1.1\r\nHost a\r\n\r\n",
    b"GET /metrics HTTP/1.1\r\nHost: a\r\nHost: b\r\nContent-Length: x\r\n\r\n",
    b"HELLO\r\n\r\n",
])
async def test_a_request_that_is_not_http_gets_400_and_the_connection_is_closed(garbage):
    server = await _server(Limits())
    try:
        answer = await _exchange(server.port, garbage, timeout=5)
        assert answer.startswith((b"HTTP/1.1 400 ", b"HTTP/1.1 505 ")), answer[:80]
        assert b"Connection: close" in answer or b"connection: close" in answer
        assert (await _exchange(server.port, SCRAPE)).startswith(b"HTTP/1.1 200 ")  # and the endpoint serves on
        assert server.stats["closed_bad_request"] == 1
    finally:
        await _close(server)


async def test_headers_over_the_size_limit_are_refused_and_closed():
    server = await _server(Limits())
    try:
        huge = b"GET /metrics HTTP/1.1\r\nHost: t\r\nX: " + b"a" * (MAX_HEADER_BYTES + 10)  # and no end
        answer = await _exchange(server.port, huge, timeout=5)
        assert answer.startswith((b"HTTP/1.1 431 ", b"HTTP/1.1 400 ")), answer[:80]
    finally:
        await _close(server)


async def test_a_kept_alive_connection_gets_several_answers_gzip_and_head_included():
    server = await _server(Limits())
    try:
        request = (b"GET /metrics HTTP/1.1\r\nHost: t\r\nAccept-Encoding: gzip\r\n\r\n"
                   b"HEAD /healthz HTTP/1.1\r\nHost: t\r\n\r\n"
                   b"GET /readyz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        answer = await _exchange(server.port, request)
        first, rest = answer.split(b"\r\n\r\n", 1)
        assert first.startswith(b"HTTP/1.1 200 ") and b"Content-Encoding: gzip" in first
        length = int(next(line for line in first.split(b"\r\n") if line.lower().startswith(b"content-length"))
                     .split(b":")[1])
        assert b"iso_gateway_front_messages_received_total" in gzip.decompress(rest[:length])
        second, third = rest[length:].split(b"\r\n\r\n", 1)
        assert second.startswith(b"HTTP/1.1 200 ")  # HEAD: headers only
        assert third.startswith(b"HTTP/1.1 200 ") and third.endswith(b"ready: test\n")
    finally:
        await _close(server)


# --------------------------------------------------------------------------- one connection, on MockClock


def _app() -> ObservabilityApp:
    return ObservabilityApp(Metrics(process=False).registry, trio.lowlevel.current_trio_token(), lambda: (True, "t"))


@settings(max_examples=40, deadline=None)
@given(gaps=st.lists(st.floats(0.0, 0.15), min_size=1, max_size=30))
def test_however_a_request_dribbles_in_it_is_cut_off_header_timeout_after_the_connection_opened(gaps):
    """Headers complete within the timeout are answered (and the kept-alive connection is closed a header
    timeout after the answer); headers still incomplete then are closed at that moment, unanswered."""
    timeout = 2.0
    request = b"GET /nowhere HTTP/1.1\r\nHost: t\r\n\r\n"
    times = [sum(gaps[:i + 1]) for i in range(len(gaps))]
    complete_at = times[len(request) - 1] if len(gaps) >= len(request) else None
    answered = complete_at is not None and complete_at < timeout
    outcome: dict[str, object] = {}

    async def main() -> None:
        client, server_side = trio.testing.memory_stream_pair()
        stats: Counter[str] = Counter()
        start = trio.current_time()

        async def dribble() -> None:
            for i, gap in enumerate(gaps[:len(request)]):
                await trio.sleep(gap)  # virtual (MockClock): the gaps are the input
                try:
                    await client.send_all(request[i:i + 1])
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return

        async with trio.open_nursery() as n:
            n.start_soon(serve_connection, server_side, _app(), Limits(header_timeout=timeout), stats)
            n.start_soon(dribble)
            received = b""
            while data := await client.receive_some(65536):
                received += data
            outcome["closed_at"] = trio.current_time() - start
            outcome["received"] = received
            n.cancel_scope.cancel()
        outcome["stats"] = stats

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    if answered:
        assert outcome["received"].startswith(b"HTTP/1.1 404 ")
        assert outcome["closed_at"] == pytest.approx(complete_at + timeout)
    else:
        assert outcome["received"] == b""
        assert outcome["closed_at"] == pytest.approx(timeout)
    assert outcome["stats"]["closed_header_timeout"] == 1


async def test_name_filters_keep_only_the_metrics_asked_for():
    metrics = _metrics()
    metrics.front_sent("ecom", "0110", "00").inc()
    metrics.flush()
    server = await _server(Limits(), metrics)
    try:
        answer = await _exchange(server.port, b"GET /metrics?name[]=iso_gateway_front_messages_received_total "
                                              b"HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    finally:
        await _close(server)
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert b"iso_gateway_front_messages_received_total" in answer
    assert b"iso_gateway_front_messages_sent_total" not in answer


async def test_a_scraper_that_never_reads_its_answers_is_closed_after_the_send_timeout():
    import socket

    metrics = _metrics()
    for i in range(2000):  # a large answer (about 200 kB), so unread answers fill every buffer on the way
        metrics.front_received(f"listener-{i:04d}", "0100").inc()
    metrics.flush()
    server = await _server(Limits(send_timeout=0.5), metrics)
    try:
        sock = trio.socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        await sock.connect(("127.0.0.1", server.port))
        deaf = trio.SocketStream(sock)
        # Kept-alive scrapes, pipelined, and not one byte read: tens of megabytes the kernel can't hold.
        await deaf.send_all(b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n" * 100)
        await wait_for(lambda: server.stats["closed_send_timeout"] > 0, 30, "the deaf scraper closed")
        assert server.stats["closed_send_timeout"] == 1
        # The endpoint serves others all along, and afterwards.
        assert (await _exchange(server.port, SCRAPE)).startswith(b"HTTP/1.1 200 ")
        await deaf.aclose()
    finally:
        await _close(server)
