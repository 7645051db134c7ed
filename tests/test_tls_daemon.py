"""TLS wired into the daemon: a real gateway (tests/conftest.py's harness, or a daemon process) with
TLS listeners and TLS switch links, on 127.0.0.1, against the switch simulator and front-end client
in TLS, ``openssl s_client`` as a front end and ``openssl s_server`` as a switch.

Certificates come from tests/pki.py, fresh per module. Timeouts that are the gateway's own (the
handshake deadline, a flood of stalled handshakes) run on trio's autojump clock; tests with a
subprocess (openssl, a daemon) run on real time and wait for conditions, every wait bounded.
"""

from __future__ import annotations

import shutil
import signal
import ssl
import subprocess
from pathlib import Path
from typing import Any

import pytest
import trio

from conftest import wait_for
from iso_gateway.config import Config
from iso_gateway.core.errors import ConfigError
from iso_gateway.core.framing import framer_from_config
from iso_gateway.core.message import decode, encode
from iso_gateway.gateway import Gateway
from iso_gateway.metrics import Metrics
from iso_gateway.net.frontend import TlsFrontConnection
from iso_gateway.sim.client import ConnectionClosed, FrontEndClient, RequestTimeout, sample_auth
from iso_gateway.sim.tlsctx import TlsHandshakeFailed, client_context, server_context
from iso_gateway.specfiles import get_dialect
from pki import Issued, Pki, make_pki

OPENSSL = shutil.which("openssl")
needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="the openssl command is not installed")

# Generous: a loaded machine may be slow, and nothing waits this long when things work.
LIMIT = 30.0


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def listener_tls(pki: Pki, *, client_certs: str = "required", server: Issued | None = None, **kw: Any) -> dict[str, Any]:
    """``[listeners.tls]`` as a TOML file would give it."""
    server = server or pki.server
    out: dict[str, Any] = {"cert_chain": str(server.cert_path), "key": str(server.key_path),
                           "client_certs": client_certs, **kw}
    if client_certs != "none":
        out["client_ca"] = [str(pki.ca.cert_path)]
    return out


def upstream_tls(pki: Pki, *, client: Issued | None = None, **kw: Any) -> dict[str, Any]:
    """``[upstreams.tls]``: trust the test CA for switch.test, present ``client`` if given."""
    out: dict[str, Any] = {"ca": [str(pki.ca.cert_path)], "server_name": "switch.test", **kw}
    if client is not None:
        out["cert_chain"], out["key"] = str(client.cert_path), str(client.key_path)
    return out


def switch_tls(pki: Pki, *, require_client_cert: bool = True) -> ssl.SSLContext:
    return server_context(str(pki.server.cert_path), str(pki.server.key_path), client_ca=(str(pki.ca.cert_path),),
                          require_client_cert=require_client_cert)


def front_tls(pki: Pki, client: Issued | None) -> ssl.SSLContext:
    return client_context(ca=(str(pki.ca.cert_path),), server_name="switch.test",
                          cert_chain=str(client.cert_path) if client else None,
                          key=str(client.key_path) if client else None)


async def tls_client(port: int, pki: Pki, client: Issued | None) -> FrontEndClient:
    return await FrontEndClient.connect("127.0.0.1", port, "iso87ascii", "ascii4", tls=front_tls(pki, client),
                                        server_name="switch.test")


def failures(gw: Gateway, side: str, name: str, reason: str) -> float:
    return gw.metrics.tls_handshake_failures(side, name, reason).get()


def front_connections(gw: Gateway) -> list[TlsFrontConnection]:
    return [c for c in gw.listeners[0].connections if isinstance(c, TlsFrontConnection)]


# --------------------------------------------------------------------------------------------- both legs


async def test_good_certificates_on_both_legs_carry_authorizations_and_name_the_front_end(harness, pki):
    switch = await harness.start_switch(tls=switch_tls(pki))
    gw = await harness.start_gateway(listener={"tls": listener_tls(pki, client_names=["front-1"])},
                                     upstream={"tls": upstream_tls(pki, client=pki.client)})
    with trio.fail_after(LIMIT):
        client = await tls_client(harness.port, pki, pki.client)
        harness.clients.append(client)
        for _ in range(3):
            resp = await client.request(harness.auth(), timeout=5)
            assert resp["39"] == "00"
        (conn,) = front_connections(gw)
        assert conn.identity == "cert:front-1"
        assert conn.tls.version in ("TLSv1.3", "TLSv1.2")
    assert switch.tls_handshakes == 1 and switch.tls_clients == ["front-1"]  # the gateway's client certificate
    assert switch.count("0100") == 3
    assert gw.metrics.tls_handshakes("listener", "ecom").get() == 1
    assert gw.metrics.tls_handshakes("upstream", "cmi").get() == 1


async def test_a_front_end_without_a_certificate_is_known_by_its_address(harness, pki):
    await harness.start_switch()
    gw = await harness.start_gateway(listener={"tls": listener_tls(pki, client_certs="optional")})
    with trio.fail_after(LIMIT):
        anonymous = await tls_client(harness.port, pki, None)
        harness.clients.append(anonymous)
        assert (await anonymous.request(harness.auth(), timeout=5))["39"] == "00"
        named = await tls_client(harness.port, pki, pki.client)
        harness.clients.append(named)
        assert (await named.request(harness.auth(), timeout=5))["39"] == "00"
    assert sorted(c.identity for c in front_connections(gw)) == ["addr:127.0.0.1", "cert:front-1"]


async def test_a_plaintext_listener_names_each_front_end_by_its_address(harness):
    await harness.start_switch()
    gw = await harness.start_gateway()
    client = await harness.client()
    assert (await client.request(harness.auth(), timeout=5))["39"] == "00"
    (conn,) = gw.listeners[0].connections
    assert type(conn).__name__ == "FrontConnection" and conn.identity == "addr:127.0.0.1"


@pytest.mark.parametrize(("client_attr", "reason"), [
    (None, "no_certificate"),
    ("client_expired", "expired"),
    ("client_other_ca", "unknown_ca"),
    ("client_wrong_name", "bad_name"),
])
async def test_a_front_end_with_a_bad_certificate_is_refused_and_counted_by_reason(harness, pki, client_attr, reason):
    switch = await harness.start_switch()
    gw = await harness.start_gateway(listener={"tls": listener_tls(pki, client_names=["front-1"])})
    client = getattr(pki, client_attr) if client_attr else None
    with trio.fail_after(LIMIT):
        try:
            refused = await tls_client(harness.port, pki, client)
        except (TlsHandshakeFailed, ConnectionClosed, RequestTimeout):
            pass  # refused during its handshake
        else:  # TLS 1.3: the client's side of the handshake ended before the gateway judged its certificate
            with pytest.raises((ConnectionClosed, RequestTimeout)):
                await refused.request(harness.auth(), timeout=5)
            await refused.aclose()
        await wait_for(lambda: failures(gw, "listener", "ecom", reason) == 1, LIMIT, f"a {reason} failure")
        await wait_for(lambda: not gw.listeners[0].connections, LIMIT, "the refused connection closed")
        good = await tls_client(harness.port, pki, pki.client)
        harness.clients.append(good)
        assert (await good.request(harness.auth(), timeout=5))["39"] == "00"
    assert switch.count("0100") == 1  # only the good client's request reached the switch
    assert gw.metrics.connections_closed("ecom", "tls_handshake_failed").get() == 1
    assert sum(failures(gw, "listener", "ecom", r) for r in ("no_certificate", "expired", "unknown_ca", "bad_name")) == 1


async def test_the_handshake_deadline_runs_from_the_accept_and_a_slow_handshake_is_counted(harness, pki, autojump_clock):
    await harness.start_switch()
    gw = await harness.start_gateway(listener={"tls": listener_tls(pki, client_certs="none", handshake_timeout=3.0),
                                               "idle_timeout": 600})
    silent = await trio.open_tcp_stream("127.0.0.1", harness.port)
    hello_only = await trio.open_tcp_stream("127.0.0.1", harness.port)
    await hello_only.send_all(b"\x16\x03\x01\x00\xc8\x01\x00\x00")  # a ClientHello's first bytes, then nothing
    start = trio.current_time()
    with trio.fail_after(10):
        for stream in (silent, hello_only):
            assert await stream.receive_some(100) == b""  # closed by the gateway
    assert 3.0 <= trio.current_time() - start < 3.5
    assert failures(gw, "listener", "ecom", "timeout") == 2
    await silent.aclose()
    await hello_only.aclose()


async def test_a_tls_garbage_flood_leaves_honest_front_ends_served(harness, pki, autojump_clock):
    switch = await harness.start_switch()
    gw = await harness.start_gateway(listener={
        "tls": listener_tls(pki, handshake_timeout=2.0), "max_connections": 50, "max_connections_per_source": 1000,
        "idle_timeout": 600})
    honest = await tls_client(harness.port, pki, pki.client)
    harness.clients.append(honest)
    assert (await honest.request(harness.auth(), timeout=5))["39"] == "00"
    junk = [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"0044" + b"0" * 44, bytes(range(256)),
            b"\x16\x03\x01\x00\x05\xff\xff\xff\xff\xff", b"\x15\x03\x03\x00\x02\x02\x28"]
    flood: list[trio.SocketStream] = []
    served = 0
    with trio.fail_after(60):
        for i in range(40):  # garbage: refused on its first bytes
            s = await trio.open_tcp_stream("127.0.0.1", harness.port)
            await s.send_all(junk[i % len(junk)])
            flood.append(s)
        for i in range(80):  # stalled mid-handshake: more than the listener holds
            s = await trio.open_tcp_stream("127.0.0.1", harness.port)
            if i % 2:
                await s.send_all(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
            flood.append(s)
            if i % 10 == 0:  # the established front end is served throughout
                assert (await honest.request(harness.auth(), timeout=5))["39"] == "00"
                served += 1
        newcomer = await tls_client(harness.port, pki, pki.client)  # room is made for it
        harness.clients.append(newcomer)
        assert (await newcomer.request(harness.auth(), timeout=5))["39"] == "00"
        await trio.sleep(2.5)  # past every handshake deadline
        assert (await honest.request(harness.auth(), timeout=5))["39"] == "00"
    m = gw.metrics
    assert failures(gw, "listener", "ecom", "garbage") == 40  # refused on their first bytes
    evicted = m.connections_closed("ecom", "evicted_idle").get()
    assert evicted > 0 and failures(gw, "listener", "ecom", "timeout") + evicted == 80  # room made, or timed out
    assert {c.identity for c in gw.listeners[0].connections} == {"cert:front-1"}  # only the honest two are left
    assert len(gw.listeners[0].connections) == 2
    assert switch.count("0100") == served + 3
    for s in flood:
        await s.aclose()
