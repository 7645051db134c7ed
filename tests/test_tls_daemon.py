"""TLS wired into the daemon: a real gateway (tests/conftest.py's harness, or a daemon process) with
TLS listeners and TLS switch links, on 127.0.0.1, against the switch simulator and front-end client
in TLS, ``openssl s_client`` as a front end and ``openssl s_server`` as a switch.

Certificates come from tests/pki.py, fresh per module. Timeouts that are the gateway's own (the
handshake deadline, a flood of stalled handshakes) run on trio's autojump clock; tests with a
subprocess (openssl, a daemon) run on real time and wait for conditions, every wait bounded.
"""

from __future__ import annotations

import re
import shutil
import signal
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import tomli_w
import trio
from prometheus_client import generate_latest

from conftest import config_dict, merge, wait_for
from iso_gateway.config import Config
from iso_gateway.core.errors import ConfigError
from iso_gateway.core.framing import framer_from_config
from iso_gateway.core.message import build_response, decode, encode
from iso_gateway.gateway import Gateway
from iso_gateway.metrics import Metrics
from iso_gateway.net.frontend import TlsFrontConnection
from iso_gateway.net.tls import HANDSHAKING, TlsSession, TlsUpstreamSettings, upstream_endpoint
from iso_gateway.sim.client import ConnectionClosed, FrontEndClient, RequestTimeout, sample_auth
from iso_gateway.sim.tlsctx import TlsHandshakeFailed, client_context, server_context
from iso_gateway.specfiles import get_dialect
from pki import DAY, NOW, Issued, Pki, make_pki

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


def config_dict_of(harness: Any, **options: Any) -> dict[str, Any]:
    """The raw configuration of the harness's gateway (its switch port), without a journal on disk."""
    return config_dict(harness.switch_port, state_dir=harness.state_dir, journal={"enabled": False}, **options)


def failures(gw: Gateway, side: str, name: str, reason: str) -> float:
    return gw.metrics.tls_handshake_failures(side, name, reason).get()


def front_connections(gw: Gateway) -> list[TlsFrontConnection]:
    return [c for c in gw.listeners[0].connections if isinstance(c, TlsFrontConnection)]


# --------------------------------------------------------------------------------------------- both legs


async def test_good_certificates_on_both_legs_carry_authorizations_and_name_the_front_end(harness, pki):
    switch = await harness.start_switch(tls=switch_tls(pki))
    gw = await harness.start_gateway(listener={"tls": listener_tls(pki, client_names=["front-1"])},
                                     upstream={"tls": upstream_tls(pki, client=pki.client)})
    seen: list[str] = []  # the identity of each connection whose frames reach the gateway, as they do
    on_front_frames = gw.on_front_frames

    def spy(front: Any, *args: Any) -> None:
        seen.append(front.identity)
        on_front_frames(front, *args)

    gw.on_front_frames = spy  # type: ignore[method-assign]
    with trio.fail_after(LIMIT):
        client = await tls_client(harness.port, pki, pki.client)
        harness.clients.append(client)
        for _ in range(3):
            resp = await client.request(harness.auth(), timeout=5)
            assert resp["39"] == "00"
        (conn,) = front_connections(gw)
        assert conn.identity == "cert:front-1" and seen == ["cert:front-1"] * 3  # known before the first frame
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


# --------------------------------------------------------------------------------------------- switch links


@pytest.mark.parametrize(("case", "reason"), [
    ("pin", "pin_mismatch"),
    ("name", "bad_name"),
    ("expired", "expired"),
    ("other_ca", "unknown_ca"),
    ("no_client_cert", "alert_certificate_required"),
])
async def test_a_switch_link_whose_handshake_fails_is_not_ready_and_counted_by_reason(harness, pki, case, reason,
                                                                                       autojump_clock):
    server = {"expired": pki.server_expired, "other_ca": pki.server_other_ca}.get(case, pki.server)
    ctx = server_context(str(server.cert_path), str(server.key_path), client_ca=(str(pki.ca.cert_path),),
                         require_client_cert=True)
    switch = await harness.start_switch(tls=ctx)
    tls = upstream_tls(pki, client=None if case == "no_client_cert" else pki.client)
    if case == "pin":
        tls = {"pin_sha256": pki.server_other_ca.sha256, "cert_chain": str(pki.client.cert_path),
               "key": str(pki.client.key_path)}
    elif case == "name":
        tls["server_name"] = "elsewhere.test"
    gw = await harness.start_gateway(upstream={"tls": tls}, wait_ready=False)
    with trio.fail_after(LIMIT):
        await wait_for(lambda: failures(gw, "upstream", "cmi", reason) >= 2, LIMIT, f"{reason} twice (it reconnects)")
    assert not gw.upstreams["cmi"].ready and not gw.readiness()[0]
    assert switch.count("0800") == 0  # no sign-on ever left on a link that failed its handshake
    client = await harness.client()
    assert (await client.request(harness.auth(), timeout=5))["39"] == "91"


async def test_a_pinned_switch_certificate_is_trusted_whatever_signed_it_and_its_expiry_is_shown(harness, pki):
    server = pki.server_other_ca  # signed by a CA the gateway does not know: the pin is the whole of the trust
    await harness.start_switch(tls=server_context(str(server.cert_path), str(server.key_path)))
    gw = await harness.start_gateway(upstream={"tls": {"pin_sha256": ":".join(
        pki.server_other_ca.sha256[i:i + 2] for i in range(0, 64, 2)).upper()}})
    client = await harness.client()
    assert (await client.request(harness.auth(), timeout=5))["39"] == "00"
    subject = server.cert.subject.rfc4514_string()
    gw.metrics.flush()
    assert 364 < gw.metrics.tls_days_left("upstream", "cmi", subject).get() <= 365


async def test_a_switch_that_never_finishes_the_handshake_is_given_up_at_the_deadline(harness, pki, nursery,
                                                                                       autojump_clock):
    accepted: list[trio.SocketStream] = []

    async def mute(stream: trio.SocketStream) -> None:
        accepted.append(stream)
        await trio.sleep_forever()

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    nursery.start_soon(trio.serve_listeners, mute, listeners)
    harness.switch_port = port
    gw = await harness.start_gateway(upstream={"tls": upstream_tls(pki, handshake_timeout=4.0),
                                               "reconnect_initial": 30.0, "reconnect_max": 30.0}, wait_ready=False)
    start = trio.current_time()
    with trio.fail_after(LIMIT):
        await wait_for(lambda: failures(gw, "upstream", "cmi", "timeout") == 1, LIMIT, "a handshake timeout")
    assert 4.0 <= trio.current_time() - start < 5.0
    assert not gw.upstreams["cmi"].ready and len(accepted) == 1


async def test_a_reversal_sent_alone_goes_over_tls_too(harness, pki):
    from iso_gateway.net.links import SoloConnection

    switch = await harness.start_switch(tls=switch_tls(pki))
    gw = await harness.start_gateway(upstream={"tls": upstream_tls(pki, client=pki.client)})
    up = gw.upstreams["cmi"]
    solo = SoloConnection(up)
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as n:
            n.start_soon(solo.run)
            await solo.settled.wait()
            assert solo.ready and solo._tls is not None and solo._tls.established
            solo.closing = True
            solo.drop()
    assert switch.tls_handshakes == 2 and switch.count("0800") == 2  # its own handshake and sign-on


# --------------------------------------------------------------------------------------------- openssl peers


@asynccontextmanager
async def openssl(tmp_path: Path, *args: str) -> AsyncIterator[trio.Process]:
    """An ``openssl`` subprocess (stdin and stdout piped, stderr to a file); killed at the end."""
    assert OPENSSL is not None
    err = (tmp_path / f"openssl-{args[0]}.err").open("wb")
    proc = await trio.lowlevel.open_process([OPENSSL, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                            stderr=err)
    try:
        yield proc
    finally:
        with trio.CancelScope(shield=True):
            proc.kill()
            await proc.wait()
            err.close()


async def read_frame(proc: trio.Process, mti: bytes, buf: bytearray) -> bytes:
    """From a subprocess's stdout (after whatever it prints first), the first ascii4 frame whose
    message starts with ``mti``: the message."""
    assert proc.stdout is not None
    while True:
        match = re.search(rb"(\d{4})" + mti, bytes(buf))
        if match is not None:
            size = int(match.group(1))
            end = match.start() + 4 + size
            if len(buf) >= end:
                return bytes(buf[match.start() + 4:end])
        chunk = await proc.stdout.receive_some(65536)
        if not chunk:
            raise AssertionError(f"no {mti!r} frame in {bytes(buf)[-300:]!r}")
        buf += chunk


ASCII4 = framer_from_config("ascii4")


@needs_openssl
@pytest.mark.parametrize(("client_attr", "reason"), [("client", None), ("client_other_ca", "unknown_ca")])
async def test_openssl_s_client_as_a_front_end_is_served_or_refused_by_reason(harness, pki, tmp_path, client_attr,
                                                                               reason):
    await harness.start_switch()
    gw = await harness.start_gateway(listener={"tls": listener_tls(pki, client_names=["front-1"])})
    client: Issued = getattr(pki, client_attr)
    dialect = get_dialect("iso87ascii")
    args = ["s_client", "-connect", f"127.0.0.1:{harness.port}", "-servername", "switch.test", "-CAfile",
            str(pki.ca.cert_path), "-verify_return_error", "-quiet", "-cert", str(client.cert_path), "-key",
            str(client.key_path)]
    with trio.fail_after(LIMIT):
        async with openssl(tmp_path, *args) as proc:
            assert proc.stdin is not None
            request = harness.auth()
            await proc.stdin.send_all(ASCII4.encode(encode(dialect, request)))
            if reason is None:
                answer = decode(dialect, await read_frame(proc, b"0110", bytearray()))
                assert answer["39"] == "00" and answer["11"] == request["11"]
                (conn,) = front_connections(gw)
                assert conn.identity == "cert:front-1"
            else:
                await wait_for(lambda: failures(gw, "listener", "ecom", reason) == 1, LIMIT, f"a {reason} failure")
                assert proc.stdout is not None
                assert b"0110" not in await proc.stdout.receive_some(65536)  # closed without an answer
                await wait_for(lambda: not gw.listeners[0].connections, LIMIT, "the refused connection closed")


@needs_openssl
async def test_openssl_s_server_as_the_switch_gets_the_request_over_mutual_tls_and_its_answer_comes_back(
        harness, pki, tmp_path):
    dialect = get_dialect("iso87ascii")
    args = ["s_server", "-accept", "127.0.0.1:0", "-cert", str(pki.server.cert_path), "-key",
            str(pki.server.key_path), "-Verify", "1", "-verify_return_error", "-CAfile", str(pki.ca.cert_path),
            "-naccept", "1"]
    with trio.fail_after(LIMIT):
        async with openssl(tmp_path, *args) as proc:
            out = bytearray()
            assert proc.stdout is not None and proc.stdin is not None
            while not re.search(rb"ACCEPT .*:(\d+)\n", bytes(out)):
                out += await proc.stdout.receive_some(65536)
            harness.switch_port = int(re.search(rb"ACCEPT .*:(\d+)\n", bytes(out)).group(1))  # type: ignore[union-attr]
            gw = await harness.start_gateway(upstream={"tls": upstream_tls(pki, client=pki.client), "sign_on": False})
            front = await harness.client()
            request = harness.auth()
            async with trio.open_nursery() as n:
                got: dict[str, Any] = {}

                async def ask() -> None:
                    got["answer"] = await front.request(request, timeout=LIMIT)

                n.start_soon(ask)
                forwarded = decode(dialect, await read_frame(proc, b"0100", out))
                assert forwarded["4"] == request["4"] and "11" in forwarded  # the gateway's own STAN
                answer = build_response(dialect, forwarded, "00", auth_code="OPENSL")
                await proc.stdin.send_all(ASCII4.encode(encode(dialect, answer)))
            assert got["answer"]["39"] == "00" and got["answer"]["11"] == request["11"]
            assert got["answer"]["38"] == "OPENSL"
            assert gw.metrics.tls_handshakes("upstream", "cmi").get() == 1


# --------------------------------------------------------------------------------------------- reload, expiry, config


def own_copy(issued: Issued, folder: Path) -> tuple[Path, Path]:
    """The listener's certificate and key as files of the test's own (a reload rewrites them)."""
    folder.mkdir(parents=True, exist_ok=True)
    cert, key = folder / "listener.crt", folder / "listener.key"
    cert.write_bytes(issued.cert_path.read_bytes())
    key.write_bytes(issued.key_path.read_bytes())
    return cert, key


def peer_serial(client: FrontEndClient) -> int:
    from cryptography import x509

    der = client.stream.getpeercert(binary_form=True)  # type: ignore[attr-defined]  # an SSLStream
    return x509.load_der_x509_certificate(der).serial_number


async def test_sighup_swaps_the_certificate_for_new_connections_and_keeps_established_ones(nursery, pki, tmp_path):
    from test_daemon import start_daemon, write_config

    from iso_gateway.sim.integrity import free_port
    from iso_gateway.sim.switch import SwitchSimulator

    switch_port = await nursery.start(SwitchSimulator().serve, "127.0.0.1", 0)
    cert, key = own_copy(pki.server, tmp_path / "tls")
    renewed = pki.ca.issue("renewed", "switch.test renewed", dns=("switch.test",), server=True)
    port = free_port()
    cfg, log_file = tmp_path / "gw.toml", tmp_path / "gw.log"
    tls = {"cert_chain": str(cert), "key": str(key), "client_certs": "required", "client_ca": [str(pki.ca.cert_path)]}
    write_config(cfg, port=port, switch_port=switch_port, log_file=log_file, listener={"tls": tls})
    proc = await start_daemon(cfg, port)
    try:
        with trio.fail_after(LIMIT):
            old = await tls_client(port, pki, pki.client)
            stan = 900000
            while (await old.request(sample_auth(stan, 10000), timeout=5))["39"] != "00":  # until signed on
                stan += 1
                await trio.sleep(0.05)
            assert peer_serial(old) == pki.server.cert.serial_number
            cert.write_bytes(renewed.cert_path.read_bytes())
            key.write_bytes(renewed.key_path.read_bytes())
            proc.send_signal(signal.SIGHUP)
            await wait_for(lambda: "TLS files read again" in log_file.read_text(), LIMIT, "the reload")
            new = await tls_client(port, pki, pki.client)
            assert peer_serial(new) == renewed.cert.serial_number  # new connections: the new certificate
            assert (await new.request(sample_auth(stan + 1, 10000), timeout=5))["39"] == "00"
            assert (await old.request(sample_auth(stan + 2, 10000), timeout=5))["39"] == "00"  # not dropped
            cert.write_text("not a certificate\n")  # a bad file: the running certificate stays
            proc.send_signal(signal.SIGHUP)
            await wait_for(lambda: "keeps its TLS certificate" in log_file.read_text(), LIMIT, "the refusal")
            assert "listeners.ecom.tls" in log_file.read_text()
            third = await tls_client(port, pki, pki.client)
            assert peer_serial(third) == renewed.cert.serial_number
            for i, client in enumerate((old, new, third)):
                assert (await client.request(sample_auth(stan + 3 + i, 10000), timeout=5))["39"] == "00"
                await client.aclose()
    finally:
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(LIMIT):
            await proc.wait()


async def test_days_to_expiry_of_each_certificate_and_a_reload_that_renews_one(harness, pki, tmp_path):
    await harness.start_switch(tls=switch_tls(pki))
    cert, key = own_copy(pki.server, tmp_path / "tls")
    listener = {"tls": listener_tls(pki) | {"cert_chain": str(cert), "key": str(key)}}
    upstream = {"tls": upstream_tls(pki, client=pki.client)}
    gw = await harness.start_gateway(listener=listener, upstream=upstream)
    await wait_for(lambda: gw.listeners[0].expiry.shown != {}, LIMIT, "the gauge")
    m = gw.metrics
    server_subject = pki.server.cert.subject.rfc4514_string()
    ca_subject = pki.ca.cert.subject.rfc4514_string()
    assert 363 < m.tls_days_left("listener", "ecom", server_subject).get() <= 365
    assert 3600 < m.tls_days_left("listener", "ecom", ca_subject).get() <= 3650
    assert 363 < m.tls_days_left("upstream", "cmi", pki.client.cert.subject.rfc4514_string()).get() <= 365
    soon = pki.ca.issue("soon", "switch.test soon", dns=("switch.test",), server=True, not_after=NOW + 5 * DAY)
    cert.write_bytes(soon.cert_path.read_bytes())
    key.write_bytes(soon.key_path.read_bytes())
    gw.reload(Config.model_validate(config_dict_of(harness, listener=listener, upstream=upstream)))
    assert gw.listeners[0].expiry.shown.keys() == {soon.cert.subject.rfc4514_string(), ca_subject}
    assert 4 < m.tls_days_left("listener", "ecom", soon.cert.subject.rfc4514_string()).get() <= 5
    m.flush()
    exported = [line for line in generate_latest(m.registry).decode().splitlines()
                if line.startswith("iso_gateway_tls_certificate_days_left{") and 'side="listener"' in line]
    assert len(exported) == 2 and not any(f'subject="{server_subject}"' in line for line in exported)


def test_a_certificate_file_that_does_not_load_refuses_the_start_naming_the_key(pki, tmp_path):
    def config(**options: Any) -> Config:
        return Config.model_validate(config_dict(9, state_dir=tmp_path, journal={"enabled": False}, **options))

    bad = tmp_path / "bad.crt"
    bad.write_text("not a certificate\n")
    for listener_extra, where in (
        ({"cert_chain": str(tmp_path / "missing.crt")}, "listeners.ecom.tls.cert_chain"),
        ({"key": str(pki.client.key_path)}, "listeners.ecom.tls.key"),  # not the certificate's key
        ({"client_ca": [str(bad)]}, "listeners.ecom.tls.client_ca"),
    ):
        raw = {"tls": listener_tls(pki) | listener_extra}
        with pytest.raises(ConfigError) as caught:
            Gateway(config(listener=raw), metrics=Metrics(process=False))
        assert caught.value.where == where, caught.value
    with pytest.raises(ConfigError) as caught:
        Gateway(config(upstream={"tls": upstream_tls(pki) | {"ca": [str(bad)]}}), metrics=Metrics(process=False))
    assert caught.value.where == "upstreams.cmi.tls.ca"


@pytest.mark.parametrize(("tls", "message"), [
    ({"cert_chain": "a", "key": "b", "client_certs": "required"}, 'client_ca is required when client_certs is "required"'),
    ({"cert_chain": "a", "key": "b", "client_names": ["x"]}, 'client_names needs client_certs = "required"'),
    ({"cert_chain": "a", "key": "b", "handshake_timeout": float("inf")}, "handshake_timeout"),
    ({"cert_chain": "a", "key": "b", "client_certs": "sometimes"}, "client_certs"),
    ({"cert_chain": "a"}, "key"),
])
def test_listener_tls_settings_are_checked_at_load_with_the_key_and_the_reason(tls, message):
    from iso_gateway.config import parse_config

    text = tomli_w.dumps(config_dict(9, listener={"tls": tls}))
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "gw.toml")
    assert caught.value.source == "gw.toml" and caught.value.where.startswith("listeners.0.tls")
    assert message in str(caught.value)


@pytest.mark.parametrize(("tls", "message"), [
    ({}, "a CA bundle (ca) or a pinned certificate (pin_sha256) is required"),
    ({"ca": "ca.crt"}, "server_name is required with ca"),
    ({"pin_sha256": "ab:cd"}, "must be 32 bytes"),
    ({"pin_sha256": "zz" * 32}, "not hexadecimal"),
    ({"pin_sha256": "ab" * 32, "cert_chain": "c.crt"}, "cert_chain and key go together"),
])
def test_upstream_tls_settings_are_checked_at_load_with_the_key_and_the_reason(tls, message):
    from iso_gateway.config import parse_config

    with pytest.raises(ConfigError) as caught:
        parse_config(tomli_w.dumps(config_dict(9, upstream={"tls": tls})), "gw.toml")
    assert caught.value.where.startswith("upstreams.0.tls") and message in str(caught.value)


def test_a_reload_cannot_turn_tls_on_or_off(pki, tmp_path):
    raw = config_dict(9, state_dir=tmp_path, journal={"enabled": False})
    gw = Gateway(Config.model_validate(raw), metrics=Metrics(process=False))
    with pytest.raises(ConfigError, match="TLS turned on or off"):
        gw.reload(Config.model_validate(merge(raw, {"listeners": [raw["listeners"][0] | {"tls": listener_tls(pki)}]})))


# --------------------------------------------------------------------------------------------- the plaintext limits, in TLS


async def raw_tls(port: int, pki: Pki, *, rcvbuf: int | None = None) -> tuple[trio.SocketStream, TlsSession]:
    """A TLS front end driven by hand (the engine as a client, over a raw socket): the test decides
    how its records reach the wire. Returns the stream and the established session."""
    sock = trio.socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    await sock.connect(("127.0.0.1", port))
    stream = trio.SocketStream(sock)
    session = upstream_endpoint(TlsUpstreamSettings(
        ca=(str(pki.ca.cert_path),), server_name="switch.test", cert_chain=str(pki.client.cert_path),
        key=str(pki.client.key_path))).new_session()
    await stream.send_all(session.data_to_send())
    while session.state is HANDSHAKING:
        data = await stream.receive_some(65536)
        if data:
            session.receive_data(data)
        else:
            session.receive_eof()
        if session.wants_write:
            await stream.send_all(session.data_to_send())
    assert session.established, session.detail
    return stream, session


async def closed_by_gateway(stream: trio.SocketStream, within: float) -> bool:
    with trio.move_on_after(within):
        try:
            while await stream.receive_some(65536):
                pass
        except trio.BrokenResourceError:
            pass
        return True
    return False


@pytest.mark.parametrize("how", ["bytes of one record", "records of one byte"])
async def test_a_tls_front_end_dribbling_a_frame_is_dropped_partial_frame_timeout_after_its_first_byte(
        harness, pki, autojump_clock, how):
    await harness.start_switch()
    gw = await harness.start_gateway(listener={"tls": listener_tls(pki), "partial_frame_timeout": 1.0})
    good = await tls_client(harness.port, pki, pki.client)
    harness.clients.append(good)
    stream, session = await raw_tls(harness.port, pki)
    frame = ASCII4.encode(encode(get_dialect("iso87ascii"), harness.auth()))
    if how == "bytes of one record":
        pieces = [bytes([b]) for b in session.send(frame)]  # one record, a byte at a time
    else:
        pieces = [session.send(frame[i:i + 1]) for i in range(len(frame))]  # each byte a record of its own
    started = trio.current_time()
    closed_at = None
    with trio.fail_after(30):
        for piece in pieces:
            try:
                await stream.send_all(piece)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                closed_at = trio.current_time()
                break
            if await closed_by_gateway(stream, 0.3):
                closed_at = trio.current_time()
                break
    assert closed_at is not None, "the dribbling client was never dropped"
    assert closed_at - started == pytest.approx(1.0, abs=0.31)  # its deadline ran from the first byte
    assert gw.metrics.connections_closed("ecom", "stalled_partial_frame").get() == 1
    assert (await good.request(harness.auth(), timeout=3))["39"] == "00"
    await stream.aclose()


async def test_tls_front_ends_keep_the_idle_timeout_per_source_limit_and_backpressure(harness, pki, autojump_clock):
    await harness.start_switch()
    gw = await harness.start_gateway(listener={"tls": listener_tls(pki), "idle_timeout": 20.0, "max_in_flight": 2,
                                               "max_connections_per_source": 2},
                                     routes=[{"name": "all", "upstream": "cmi", "timeout": 3.0}])
    first = await tls_client(harness.port, pki, pki.client)
    harness.clients.append(first)
    codes: list[str] = []

    async def one() -> None:
        codes.append((await first.request(harness.auth(10199), timeout=5))["39"])  # answered after 0.1 s

    async with trio.open_nursery() as n:  # 10 in flight against a limit of 2: reading pauses, all answered
        for _ in range(10):
            n.start_soon(one)
    assert codes == ["00"] * 10
    second = await tls_client(harness.port, pki, pki.client)
    harness.clients.append(second)
    third = await trio.open_tcp_stream("127.0.0.1", harness.port)  # a third from the same address
    assert await closed_by_gateway(third, 5)
    assert gw.metrics.connections_total("ecom", "refused_per_source").get() == 1
    start = trio.current_time()
    await second.wait_closed(30)  # nothing for idle_timeout: closed
    assert trio.current_time() - start == pytest.approx(20.0, abs=0.5)
    assert gw.metrics.connections_closed("ecom", "idle_timeout").get() == 2  # and the first, as idle
    await third.aclose()


async def test_a_tls_front_end_that_stops_reading_is_dropped_and_holds_no_one_else_up(harness, pki, autojump_clock):
    await harness.start_switch()
    gw = await harness.start_gateway(listener={"tls": listener_tls(pki), "send_timeout": 5.0,
                                               "max_in_flight": 100_000},
                                     upstream={"max_in_flight": 10_000},
                                     routes=[{"name": "all", "upstream": "cmi", "timeout": 60.0}])
    good = await tls_client(harness.port, pki, pki.client)
    harness.clients.append(good)
    deaf, session = await raw_tls(harness.port, pki, rcvbuf=4096)
    dialect = get_dialect("iso87ascii")
    await deaf.send_all(session.send(b"".join(ASCII4.encode(encode(dialect, harness.auth())) for _ in range(3000))))
    closed = gw.metrics.connections_closed("ecom", "stalled_reader")
    served_while_deaf_open = 0
    with trio.fail_after(120):
        while closed.get() == 0:
            assert (await good.request(harness.auth(), timeout=60.0))["39"] == "00"
            served_while_deaf_open += closed.get() == 0
            await trio.sleep(0.5)
    assert served_while_deaf_open >= 1 and len(gw.listeners[0].connections) == 1
    assert (await good.request(harness.auth(), timeout=60.0))["39"] == "00"
    await deaf.aclose()


# --------------------------------------------------------------------------------------------- identified front ends


async def test_a_front_end_known_by_its_certificate_may_use_its_own_merchant_only(harness, pki):
    """[[listeners.clients]] (identified front ends) with identities from TLS client certificates."""
    switch = await harness.start_switch()
    await harness.start_gateway(listener={
        "tls": listener_tls(pki),
        "clients": [{"identity": "cert:front-1", "merchants": ["MERCHANT0000001"]}]})
    with trio.fail_after(LIMIT):
        front_1 = await tls_client(harness.port, pki, pki.client)  # CN front-1
        harness.clients.append(front_1)
        assert (await front_1.request(harness.auth(), timeout=5))["39"] == "00"
        other_merchant = {**harness.auth(), "42": "MERCHANT0000002"}
        assert (await front_1.request(other_merchant, timeout=5))["39"] == "58"
        stranger = await tls_client(harness.port, pki, pki.client_wrong_name)  # CN intruder, signed by the CA
        harness.clients.append(stranger)
        assert (await stranger.request(harness.auth(), timeout=5))["39"] == "58"
    assert switch.count("0100") == 1  # only front-1's own merchant reached the switch
