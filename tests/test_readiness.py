"""/readyz and a switch that accepts TCP but does not answer (sign_on = false).

A connected link is not enough to be ready: after a run of requests with no
answer in time, or an unanswered echo, the link stops counting for readiness
until the switch answers something again. The switch simulator never answers
an amount ending in 97; a bare TCP server that reads and never writes stands in
for a switch that answers nothing at all, echoes included.
"""

from __future__ import annotations

import trio

from conftest import wait_for
from iso_gateway.net.links import UNANSWERED_NOT_READY

FAST_TIMEOUT = [{"name": "all", "upstream": "cmi", "timeout": 0.3}]  # an unanswered request costs 0.3 s


async def test_a_link_whose_requests_go_unanswered_is_not_ready_until_the_switch_answers_again(harness):
    await harness.start_switch()
    gw = await harness.start_gateway(upstream={"sign_on": False}, routes=FAST_TIMEOUT)
    assert gw.readiness()[0]
    client = await harness.client()
    for n in range(UNANSWERED_NOT_READY):
        assert gw.readiness()[0], f"not ready after only {n} unanswered requests"
        assert (await client.request(harness.auth(amount=15097), timeout=5))["39"] == "91"  # never answered
    ready, why = gw.readiness()
    assert not ready and "no upstream link is ready" in why and "not answering" in why, why
    assert gw.metrics.link_not_answering("cmi").get() == 1  # what the --workers supervisor's /readyz reads
    assert gw.upstreams["cmi"].ready  # still carries traffic: the next request is answered...
    assert (await client.request(harness.auth(), timeout=5))["39"] == "00"
    assert gw.readiness() == (True, "upstream cmi: 1/1 connections ready")  # ...and that makes it ready again
    assert gw.metrics.link_not_answering("cmi").get() == 0


async def test_answers_between_timeouts_keep_the_link_ready(harness):
    await harness.start_switch()
    gw = await harness.start_gateway(upstream={"sign_on": False}, routes=FAST_TIMEOUT)
    client = await harness.client()
    for _ in range(3):
        for _ in range(UNANSWERED_NOT_READY - 1):
            assert (await client.request(harness.auth(amount=15097), timeout=5))["39"] == "91"
        assert (await client.request(harness.auth(), timeout=5))["39"] == "00"
        assert gw.readiness()[0]


async def test_a_switch_that_accepts_tcp_and_never_answers_is_not_ready_after_an_unanswered_echo(harness, nursery, autojump_clock):
    async def black_hole(stream: trio.SocketStream) -> None:
        while await stream.receive_some(65536):
            pass  # reads everything, answers nothing

    listeners = await nursery.start(trio.serve_tcp, black_hole, 0)
    harness.switch_port = listeners[0].socket.getsockname()[1]
    gw = await harness.start_gateway(upstream={"sign_on": False, "echo_interval": 0.2, "echo_timeout": 0.3,
                                               "echo_misses": 100})
    assert gw.readiness()[0]  # connected, and nothing has gone unanswered yet
    await wait_for(lambda: not gw.readiness()[0], 3, "not ready after an unanswered echo")
    assert gw.upstreams["cmi"].ready and "not answering" in gw.readiness()[1]
