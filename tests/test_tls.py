"""The sans-IO TLS engine (iso_gateway/net/tls.py) against independent TLS peers.

The engine is driven over real sockets on 127.0.0.1 by a small trio harness (``EngineConn``: read,
feed, write what it wants written) and meets ``openssl s_client`` / ``openssl s_server``
subprocesses and Python's own ``ssl`` sockets (in a thread). Certificates come from tests/pki.py,
fresh per module. Every wait is bounded by ``trio.fail_after`` with a generous limit, nothing sleeps
for a fixed time, and every subprocess is killed when its test ends. The handshake timeout runs
on trio's autojump clock; the chunking and garbage properties run in memory.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import IO, Any, Protocol, cast

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from iso_gateway.net.tls import (
    CLOSED, ESTABLISHED, FAILED, HANDSHAKING, REASONS, TlsConfigError, TlsEndpoint, TlsListenerSettings,
    TlsSession, TlsUpstreamSettings, certificate_expiry, listener_endpoint, parse_pin, peer_identity,
    upstream_endpoint,
)
from iso_gateway.net.sockio import SocketIO, TlsSocketIO
from iso_gateway.net.writer import FrameWriter
from pki import NOW, Authority, Issued, Pki, make_pki

OPENSSL = shutil.which("openssl")
needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="the openssl command is not installed")

# Generous: a loaded machine may be slow, and nothing waits this long when things work.
LIMIT = 30.0


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def listener_settings(pki: Pki, *, server: Issued | None = None, client_certs: str = "required",
                      **kw: Any) -> TlsListenerSettings:
    server = server or pki.server
    return TlsListenerSettings(
        cert_chain=str(server.cert_path), key=str(server.key_path),
        client_ca=(str(pki.ca.cert_path),) if client_certs != "none" else (),
        client_certs=client_certs,  # type: ignore[arg-type]
        **kw,
    )


def upstream_settings(pki: Pki, *, client: Issued | None = None, **kw: Any) -> TlsUpstreamSettings:
    values: dict[str, Any] = {"ca": (str(pki.ca.cert_path),), "server_name": "switch.test"}
    if client is not None:
        values.update(cert_chain=str(client.cert_path), key=str(client.key_path))
    values.update(kw)
    return TlsUpstreamSettings(**values)


# ------------------------------------------------------------------------------------------------ harness


class ByteStream(Protocol):
    async def send_all(self, data: bytes) -> None: ...

    async def receive_some(self, max_bytes: int = 65536) -> bytes: ...

    async def aclose(self) -> None: ...


class EngineConn:
    """The engine on a socket: what a poller and a writer would do, one read at a time."""

    def __init__(self, stream: ByteStream, session: TlsSession) -> None:
        self.stream = stream
        self.session = session
        self.plain = bytearray()
        self.eof = False

    async def flush(self) -> None:
        out = self.session.data_to_send()
        if out:
            try:
                await self.stream.send_all(out)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the peer is gone; what it missed was an alert or a close_notify

    async def pump(self) -> None:
        """Read once, feed the engine, write what it answers."""
        await self.flush()
        try:
            data = await self.stream.receive_some(65536)
        except trio.BrokenResourceError:  # reset by the peer
            data = b""
        if not data:
            self.eof = True
            self.session.receive_eof()
        else:
            self.plain += self.session.receive_data(data)
        await self.flush()

    async def handshake(self) -> None:
        await self.flush()
        while self.session.state is HANDSHAKING and not self.eof:
            await self.pump()

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(self.session.send(data))

    async def receive_until(self, done: Callable[[], bool]) -> None:
        """Read until ``done()``, or the session ends, or the peer closes."""
        while not done() and self.session.state is ESTABLISHED and not self.eof:
            await self.pump()

    async def settle(self) -> None:
        """Read until the session is no longer established (a late alert, a close) or the peer closes."""
        await self.receive_until(lambda: False)


async def accept_engine(listener: trio.SocketListener, endpoint: TlsEndpoint) -> EngineConn:
    stream = await listener.accept()
    conn = EngineConn(stream, endpoint.new_session())
    await conn.handshake()
    return conn


async def connect_engine(port: int, endpoint: TlsEndpoint) -> EngineConn:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    conn = EngineConn(stream, endpoint.new_session())
    await conn.handshake()
    return conn


async def open_listener() -> tuple[trio.SocketListener, int]:
    (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    return listener, listener.socket.getsockname()[1]


def _stderr_file(path: Path) -> IO[bytes]:
    return path.open("wb")


@asynccontextmanager
async def openssl(tmp_path: Path, *args: str) -> AsyncIterator[trio.Process]:
    """An ``openssl`` subprocess (stdin and stdout piped, stderr to a file); killed at the end."""
    assert OPENSSL is not None
    err = _stderr_file(tmp_path / f"openssl-{args[0]}.err")
    proc = await trio.lowlevel.open_process([OPENSSL, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                            stderr=err)
    try:
        yield proc
    finally:
        with trio.CancelScope(shield=True):
            proc.kill()
            await proc.wait()
            err.close()


async def read_until(proc: trio.Process, marker: bytes) -> bytes:
    """Read a subprocess's stdout until ``marker`` appears or it ends; everything read."""
    assert proc.stdout is not None
    buf = bytearray()
    while marker not in buf:
        chunk = await proc.stdout.receive_some(65536)
        if not chunk:
            break
        buf += chunk
    return bytes(buf)


async def read_line(proc: trio.Process, prefix: bytes) -> bytes:
    """Read a subprocess's stdout until a whole line starting with ``prefix``; that line."""
    assert proc.stdout is not None
    buf = bytearray()
    while True:
        for line in bytes(buf).split(b"\n")[:-1]:
            if line.startswith(prefix):
                return line
        chunk = await proc.stdout.receive_some(65536)
        if not chunk:
            raise AssertionError(f"no line starting with {prefix!r} in {bytes(buf)!r}")
        buf += chunk


@asynccontextmanager
async def openssl_server(tmp_path: Path, server: Issued, *extra: str) -> AsyncIterator[tuple[trio.Process, int]]:
    """``openssl s_server -rev`` (it answers each line reversed) on a free port of 127.0.0.1."""
    async with openssl(tmp_path, "s_server", "-accept", "127.0.0.1:0", "-cert", str(server.cert_path),
                       "-key", str(server.key_path), "-naccept", "1", "-rev", *extra) as proc:
        line = await read_line(proc, b"ACCEPT ")
        yield proc, int(line.rsplit(b":", 1)[1])


def python_client(port: int, ctx: ssl.SSLContext, message: bytes, *, server_name: str = "switch.test",
                  rounds: int = 1) -> tuple[bytes, bytes | None]:
    """A blocking ``ssl`` client (run in a thread): send ``message``, read its echo ``rounds`` times.

    Returns what it read and the server's certificate (DER)."""
    with socket.create_connection(("127.0.0.1", port), timeout=LIMIT) as raw:
        with ctx.wrap_socket(raw, server_hostname=server_name) as tls:
            got = b""
            for _ in range(rounds):
                tls.sendall(message)
                want = len(got) + len(message)
                while len(got) < want:
                    chunk = tls.recv(65536)
                    if not chunk:
                        break
                    got += chunk
            return got, tls.getpeercert(binary_form=True)


def client_context(pki: Pki, client: Issued | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=str(pki.ca.cert_path))
    if client is not None:
        ctx.load_cert_chain(str(client.cert_path), str(client.key_path))
    return ctx


async def echo_once(conn: EngineConn, size: int) -> None:
    """Serve one echo of ``size`` bytes on an established engine connection."""
    await conn.receive_until(lambda: len(conn.plain) >= size)
    data = bytes(conn.plain[:size])
    del conn.plain[:size]
    await conn.send(data)


# ------------------------------------------------------------------------------------------------ listener side


def s_client_args(port: int, pki: Pki, client: Issued | None, *extra: str) -> list[str]:
    args = ["s_client", "-connect", f"127.0.0.1:{port}", "-servername", "switch.test",
            "-CAfile", str(pki.ca.cert_path), "-verify_return_error", "-quiet", *extra]
    if client is not None:
        args += ["-cert", str(client.cert_path), "-key", str(client.key_path)]
    return args


@needs_openssl
async def test_openssl_s_client_with_a_good_certificate_exchanges_bytes_both_ways(pki: Pki, tmp_path: Path) -> None:
    endpoint = listener_endpoint(listener_settings(pki, client_names=("front-1",)))
    with trio.fail_after(LIMIT):
        listener, port = await open_listener()
        async with openssl(tmp_path, *s_client_args(port, pki, pki.client)) as proc:
            conn = await accept_engine(listener, endpoint)
            assert conn.session.state is ESTABLISHED, (conn.session.reason, conn.session.detail)
            assert conn.session.version in ("TLSv1.3", "TLSv1.2")
            assert proc.stdin is not None
            await proc.stdin.send_all(b"ping from the front end\n")
            await conn.receive_until(lambda: b"\n" in conn.plain)
            assert bytes(conn.plain) == b"ping from the front end\n"
            await conn.send(b"pong from the gateway\n")
            assert b"pong from the gateway\n" in await read_until(proc, b"pong from the gateway\n")
            peer = conn.session.peer
            assert peer is not None
            assert peer.common_name == "front-1"
            assert peer.dns_names == ("front-1.acquirer.test",)
            assert peer.sha256 == pki.client.sha256
            assert "CN=front-1" in peer.subject
            await conn.stream.send_all(conn.session.close())  # close_notify: s_client ends its session
            assert conn.session.state is CLOSED
            await conn.stream.aclose()
        listener.socket.close()


@needs_openssl
@pytest.mark.parametrize(("client_attr", "reason"), [
    (None, "no_certificate"),
    ("client_expired", "expired"),
    ("client_other_ca", "unknown_ca"),
    ("client_wrong_name", "bad_name"),
])
async def test_openssl_s_client_with_a_bad_certificate_is_refused_by_reason(
        pki: Pki, tmp_path: Path, client_attr: str | None, reason: str) -> None:
    endpoint = listener_endpoint(listener_settings(pki, client_names=("front-1", "front-2.acquirer.test")))
    client = getattr(pki, client_attr) if client_attr else None
    with trio.fail_after(LIMIT):
        listener, port = await open_listener()
        async with openssl(tmp_path, *s_client_args(port, pki, client)) as proc:
            conn = await accept_engine(listener, endpoint)
            if conn.session.state is ESTABLISHED:  # TLS 1.3: the client's Finished came with nothing wrong yet
                assert proc.stdin is not None
                await proc.stdin.send_all(b"authorize me\n")
                await conn.settle()
            assert conn.session.state is FAILED
            assert conn.session.reason == reason, conn.session.detail
            assert not conn.plain  # nothing from a refused client reaches the framing
            await conn.stream.aclose()
        listener.socket.close()


@needs_openssl
async def test_a_client_below_tls_1_2_is_refused_as_protocol_version(pki: Pki, tmp_path: Path) -> None:
    endpoint = listener_endpoint(listener_settings(pki, client_certs="none"))
    with trio.fail_after(LIMIT):
        listener, port = await open_listener()
        async with openssl(tmp_path, *s_client_args(port, pki, None, "-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0")):
            conn = await accept_engine(listener, endpoint)
            assert conn.session.state is FAILED
            assert conn.session.reason == "protocol_version", conn.session.detail
            await conn.stream.aclose()
        listener.socket.close()


@needs_openssl
async def test_a_tls_1_2_client_asking_to_renegotiate_is_refused(pki: Pki, tmp_path: Path) -> None:
    """Renegotiation is off (it makes a server do handshakes on demand on an established connection):
    s_client's "R" gets a refusal, the client gives up, and nothing it sends after reaches the framing."""
    endpoint = listener_endpoint(listener_settings(pki, client_certs="none"))
    with trio.fail_after(LIMIT):
        listener, port = await open_listener()
        args = [a for a in s_client_args(port, pki, None, "-tls1_2") if a != "-quiet"]  # its commands on
        async with openssl(tmp_path, *args) as proc:
            conn = await accept_engine(listener, endpoint)
            assert conn.session.state is ESTABLISHED and conn.session.version == "TLSv1.2"
            assert proc.stdin is not None
            await proc.stdin.send_all(b"before\n")
            await conn.receive_until(lambda: b"before\n" in conn.plain)
            await proc.stdin.send_all(b"R\nafter\n")
            await conn.settle()
            assert conn.session.state is FAILED and (conn.session.reason or "").startswith("alert_")
            assert bytes(conn.plain) == b"before\n"
            await conn.stream.aclose()
        listener.socket.close()


async def test_python_ssl_client_with_and_without_a_certificate(pki: Pki) -> None:
    endpoint = listener_endpoint(listener_settings(pki))
    with trio.fail_after(LIMIT):
        listener, port = await open_listener()
        async with trio.open_nursery() as nursery:
            result: list[tuple[bytes, bytes | None]] = []

            async def client() -> None:
                result.append(await trio.to_thread.run_sync(
                    python_client, port, client_context(pki, pki.client), b"0800 echo" * 500))

            nursery.start_soon(client)
            conn = await accept_engine(listener, endpoint)
            assert conn.session.state is ESTABLISHED, conn.session.detail
            await echo_once(conn, 4500)
        assert result[0][0] == b"0800 echo" * 500
        assert result[0][1] == pki.server.der
        await conn.stream.aclose()

        failures: list[BaseException] = []

        def refused_client() -> None:
            try:
                python_client(port, client_context(pki, None), b"x")
            except (ssl.SSLError, OSError) as exc:
                failures.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.to_thread.run_sync, refused_client)
            conn = await accept_engine(listener, endpoint)
            await conn.settle()
            assert conn.session.state is FAILED and conn.session.reason == "no_certificate"
            await conn.stream.aclose()
        assert failures  # the client heard the refusal (an alert) or a reset, never an answer
        listener.socket.close()


GARBAGE = [
    pytest.param(b"GET / HTTP/1.1\r\nHost: gateway\r\n\r\n", id="http"),
    pytest.param(b"\x00\x4a0100723A4000" + b"1" * 60, id="plain-iso8583"),
    pytest.param(bytes(range(256)) * 4, id="noise"),
    pytest.param(b"\x16\x03\x01\x00\x05hello", id="bad-handshake-record"),
    pytest.param(b"\x16\x03\x01\xff\xff" + b"a" * 300, id="oversized-record"),
]


@pytest.mark.parametrize("garbage", GARBAGE)
async def test_garbage_instead_of_a_client_hello_fails_as_garbage_and_the_next_client_is_served(
        pki: Pki, garbage: bytes) -> None:
    endpoint = listener_endpoint(listener_settings(pki, client_certs="none"))
    with trio.fail_after(LIMIT):
        listener, port = await open_listener()
        attacker = await trio.open_tcp_stream("127.0.0.1", port)
        await attacker.send_all(garbage)
        conn = await accept_engine(listener, endpoint)  # no exception escapes the engine
        assert conn.session.state is FAILED
        assert conn.session.reason == "garbage", conn.session.detail
        assert not conn.plain
        await conn.stream.aclose()
        answer = b""
        try:
            while chunk := await attacker.receive_some(4096):
                answer += chunk
        except trio.BrokenResourceError:
            pass
        assert not answer or answer[0] == 0x15  # at most an alert record, never data
        await attacker.aclose()

        result: list[tuple[bytes, bytes | None]] = []

        async def honest() -> None:
            result.append(await trio.to_thread.run_sync(python_client, port, client_context(pki), b"0100 ..."))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(honest)
            conn = await accept_engine(listener, endpoint)
            assert conn.session.state is ESTABLISHED
            await echo_once(conn, 8)
        assert result[0][0] == b"0100 ..."
        await conn.stream.aclose()
        listener.socket.close()


async def test_a_silent_client_fails_as_timeout_at_the_handshake_deadline(pki: Pki, autojump_clock: Any) -> None:
    endpoint = listener_endpoint(listener_settings(pki, client_certs="none", handshake_timeout=7.0))
    listener, port = await open_listener()
    silent = await trio.open_tcp_stream("127.0.0.1", port)
    stream = await listener.accept()
    conn = EngineConn(stream, endpoint.new_session())
    started = trio.current_time()
    with trio.move_on_after(endpoint.handshake_timeout):  # the caller's deadline, as the poller's sweeper keeps it
        await conn.handshake()
    conn.session.handshake_timed_out()
    assert trio.current_time() - started == pytest.approx(7.0)
    assert conn.session.state is FAILED and conn.session.reason == "timeout"
    await stream.aclose()
    await silent.aclose()
    listener.socket.close()


# ------------------------------------------------------------------------------------------------ upstream side


@needs_openssl
async def test_openssl_s_server_with_mutual_tls_exchanges_bytes_both_ways(pki: Pki, tmp_path: Path) -> None:
    endpoint = upstream_endpoint(upstream_settings(pki, client=pki.client))
    with trio.fail_after(LIMIT):
        async with openssl_server(tmp_path, pki.server, "-Verify", "1", "-verify_return_error",
                                  "-CAfile", str(pki.ca.cert_path)) as (proc, port):
            conn = await connect_engine(port, endpoint)
            assert conn.session.state is ESTABLISHED, conn.session.detail
            await conn.send(b"0800 sign on\n")
            await conn.receive_until(lambda: b"\n" in conn.plain)
            assert bytes(conn.plain) == b"no ngis 0080\n"  # s_server -rev answers the line reversed
            assert conn.session.peer is not None and conn.session.peer.common_name == "switch.test"
            assert "127.0.0.1" in conn.session.peer.ip_addresses
            await conn.stream.aclose()


@needs_openssl
@pytest.mark.parametrize(("server_attr", "reason"), [
    ("server_expired", "expired"),
    ("server_other_ca", "unknown_ca"),
    ("server_wrong_name", "bad_name"),
])
async def test_a_bad_switch_certificate_is_refused_by_reason(pki: Pki, tmp_path: Path, server_attr: str,
                                                            reason: str) -> None:
    endpoint = upstream_endpoint(upstream_settings(pki))
    with trio.fail_after(LIMIT):
        async with openssl_server(tmp_path, getattr(pki, server_attr)) as (_proc, port):
            conn = await connect_engine(port, endpoint)
            assert conn.session.state is FAILED
            assert conn.session.reason == reason, conn.session.detail
            assert conn.session.send(b"0100 never sent") == b""
            await conn.stream.aclose()


@needs_openssl
async def test_a_switch_that_requires_our_certificate_is_told_of_its_refusal(pki: Pki, tmp_path: Path) -> None:
    """The switch refuses us (no client certificate): the link counts the switch's alert."""
    endpoint = upstream_endpoint(upstream_settings(pki))
    with trio.fail_after(LIMIT):
        async with openssl_server(tmp_path, pki.server, "-Verify", "1", "-verify_return_error",
                                  "-CAfile", str(pki.ca.cert_path)) as (_proc, port):
            conn = await connect_engine(port, endpoint)
            await conn.settle()  # TLS 1.3: our handshake ends before the switch has judged our (missing) certificate
            assert conn.session.state is FAILED
            assert conn.session.reason in ("alert_certificate_required", "alert_handshake_failure"), conn.session.detail


@needs_openssl
@pytest.mark.parametrize("match", [True, False])
async def test_a_pinned_switch_certificate_is_the_whole_of_the_trust(pki: Pki, tmp_path: Path, match: bool) -> None:
    """Pinned: the switch's certificate is taken on its fingerprint alone (here one whose name and CA
    the CA mode would refuse), and any other certificate is refused as pin_mismatch."""
    pinned = pki.server_wrong_name if match else pki.server
    pin = ":".join(f"{b:02X}" for b in bytes.fromhex(pinned.sha256))  # as openssl x509 -fingerprint prints it
    endpoint = upstream_endpoint(TlsUpstreamSettings(pin_sha256=pin, server_name="switch.test"))
    with trio.fail_after(LIMIT):
        async with openssl_server(tmp_path, pki.server_wrong_name) as (_proc, port):
            conn = await connect_engine(port, endpoint)
            if match:
                assert conn.session.state is ESTABLISHED, conn.session.detail
                await conn.send(b"abc\n")
                await conn.receive_until(lambda: b"\n" in conn.plain)
                assert bytes(conn.plain) == b"cba\n"
            else:
                assert conn.session.state is FAILED
                assert conn.session.reason == "pin_mismatch"
                assert pki.server_wrong_name.sha256 in conn.session.detail
            await conn.stream.aclose()


def python_server(sock: socket.socket, ctx: ssl.SSLContext) -> bytes:
    """A blocking ``ssl`` server (run in a thread): one connection, echo until the client closes."""
    raw, _ = sock.accept()
    raw.settimeout(LIMIT)
    got = b""
    with ctx.wrap_socket(raw, server_side=True) as tls:
        while True:
            try:
                chunk = tls.recv(65536)
            except ssl.SSLEOFError:
                break
            if not chunk:
                break
            got += chunk
            tls.sendall(chunk)
        try:
            tls.unwrap()  # answer the client's close_notify
        except (ssl.SSLError, OSError):
            pass
    return got


async def test_python_ssl_server_echoes_large_records_and_closes_in_order(pki: Pki) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(pki.server.cert_path), str(pki.server.key_path))
    endpoint = upstream_endpoint(upstream_settings(pki))
    payload = os.urandom(100_000)  # several 16 KB records each way
    with socket.socket() as sock, trio.fail_after(LIMIT):
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        sock.settimeout(LIMIT)
        port = sock.getsockname()[1]
        got: list[bytes] = []
        async with trio.open_nursery() as nursery:

            async def server() -> None:
                got.append(await trio.to_thread.run_sync(python_server, sock, ctx))

            nursery.start_soon(server)
            conn = await connect_engine(port, endpoint)
            assert conn.session.state is ESTABLISHED
            await conn.send(payload)
            await conn.receive_until(lambda: len(conn.plain) >= len(payload))
            assert bytes(conn.plain) == payload
            await conn.stream.send_all(conn.session.close())
            await conn.settle()  # the server's close_notify
            assert conn.session.state is CLOSED
            await conn.stream.aclose()
        assert got == [payload]


# ------------------------------------------------------------------------------------------------ reload


def _server_files(directory: Path, issued: Issued) -> tuple[str, str]:
    cert, key = directory / "listener.crt", directory / "listener.key"
    shutil.copyfile(issued.cert_path, cert)
    shutil.copyfile(issued.key_path, key)
    return str(cert), str(key)


async def test_reload_swaps_the_certificate_for_new_sessions_only(pki: Pki, tmp_path: Path) -> None:
    cert, key = _server_files(tmp_path, pki.server)
    settings_ = TlsListenerSettings(cert_chain=cert, key=key)
    first = listener_endpoint(settings_)
    renewed = pki.ca.issue("server-renewed", "switch.test", dns=("switch.test",), server=True)
    ctx = client_context(pki)
    with trio.fail_after(LIMIT):
        listener, port = await open_listener()
        async with trio.open_nursery() as nursery:
            seen: dict[str, tuple[bytes, bytes | None]] = {}

            async def client(name: str, rounds: int) -> None:
                seen[name] = await trio.to_thread.run_sync(
                    lambda: python_client(port, ctx, name.encode(), rounds=rounds))

            nursery.start_soon(client, "old", 2)
            old = await accept_engine(listener, first)
            await echo_once(old, 3)  # the old session works

            _server_files(tmp_path, renewed)  # the files change on disk; SIGHUP
            second = first.reload()

            nursery.start_soon(client, "new", 1)
            new = await accept_engine(listener, second)
            await echo_once(new, 3)
            await echo_once(old, 3)  # the established session carries on, on its own context
        assert seen["old"] == (b"oldold", pki.server.der)
        assert seen["new"] == (b"new", renewed.der)
        assert old.session.endpoint is first and new.session.endpoint is second
        for conn in (old, new):
            await conn.stream.aclose()
        listener.socket.close()

    (tmp_path / "listener.key").write_text("not a key")
    with pytest.raises(TlsConfigError) as info:
        second.reload()
    assert info.value.key == "key"  # the caller keeps `second` and reports the key


# ------------------------------------------------------------------------------------------------ in memory


def _run_pair(client: TlsSession, server: TlsSession, cuts_c2s: Callable[[], int], cuts_s2c: Callable[[], int],
              to_server: list[bytes], to_client: list[bytes]) -> tuple[bytes, bytes]:
    """Two sessions connected by two byte queues delivered in chunks of the sizes drawn."""
    c2s, s2c = bytearray(), bytearray()
    got_server, got_client = bytearray(), bytearray()
    for data in to_server:
        c2s += client.send(data)  # held until the handshake ends
    server_sent = False
    for _ in range(100_000):
        c2s += client.data_to_send()
        s2c += server.data_to_send()
        if server.state is ESTABLISHED and not server_sent:
            for data in to_client:
                s2c += server.send(data)
            server_sent = True
        if not c2s and not s2c:
            break
        if c2s:
            n = min(cuts_c2s(), len(c2s))
            got_server += server.receive_data(bytes(c2s[:n]))
            del c2s[:n]
        if s2c:
            n = min(cuts_s2c(), len(s2c))
            got_client += client.receive_data(bytes(s2c[:n]))
            del s2c[:n]
    return bytes(got_server), bytes(got_client)


@pytest.fixture(scope="module")
def memory_endpoints(pki: Pki) -> tuple[TlsEndpoint, TlsEndpoint]:
    return (listener_endpoint(listener_settings(pki)), upstream_endpoint(upstream_settings(pki, client=pki.client)))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(),
       to_server=st.lists(st.binary(min_size=1, max_size=3000), max_size=6),
       to_client=st.lists(st.binary(min_size=1, max_size=40_000), max_size=4))
def test_any_chunking_of_a_tls_stream_gives_the_same_plaintext(
        memory_endpoints: tuple[TlsEndpoint, TlsEndpoint], data: st.DataObject,
        to_server: list[bytes], to_client: list[bytes]) -> None:
    server_ep, client_ep = memory_endpoints
    sizes = st.one_of(st.integers(1, 8), st.integers(1, 600), st.integers(1, 70_000))
    c2s = data.draw(st.lists(sizes, min_size=1, max_size=20), label="client to server chunks")
    s2c = data.draw(st.lists(sizes, min_size=1, max_size=20), label="server to client chunks")
    ci, si = iter(c2s * 100_000), iter(s2c * 100_000)
    read_size = data.draw(st.sampled_from([65536, 16384, 1000, 7]), label="read size")
    client, server = client_ep.new_session(read_size), server_ep.new_session(read_size)
    got_server, got_client = _run_pair(client, server, lambda: next(ci), lambda: next(si), to_server, to_client)
    assert client.state is ESTABLISHED and server.state is ESTABLISHED
    assert got_server == b"".join(to_server)
    assert got_client == b"".join(to_client)
    assert not client.partial and not server.partial
    # and an orderly close, in chunks too
    closing = client.close()
    for i in range(0, len(closing), 3):
        server.receive_data(closing[i:i + 3])
    assert server.state is CLOSED
    client.receive_data(server.data_to_send())
    assert client.state is CLOSED


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(chunks=st.lists(st.binary(min_size=0, max_size=600), min_size=1, max_size=5))
def test_whatever_bytes_arrive_first_the_engine_raises_nothing_and_names_a_reason(
        memory_endpoints: tuple[TlsEndpoint, TlsEndpoint], chunks: list[bytes]) -> None:
    server = memory_endpoints[0].new_session()
    for chunk in chunks:
        assert server.receive_data(chunk) == b""
    server.receive_eof()
    assert server.state is FAILED and server.reason in REASONS
    assert server.reason in ("garbage", "eof", "protocol", "protocol_version", "no_shared_cipher") or \
        server.reason.startswith("alert_")


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_client_hello_with_bytes_changed_never_raises(
        memory_endpoints: tuple[TlsEndpoint, TlsEndpoint], data: st.DataObject) -> None:
    """Deeper than noise: a genuine ClientHello with a few bytes changed, cut short or run on, reaches
    the parsers behind the record layer. The server answers or fails with a reason; nothing raises."""
    server_ep, client_ep = memory_endpoints
    hello = bytearray(client_ep.new_session().data_to_send())
    for _ in range(data.draw(st.integers(1, 6), label="changes")):
        at = data.draw(st.integers(0, len(hello) - 1), label="at")
        hello[at] = data.draw(st.integers(0, 255), label="byte")
    cut = data.draw(st.integers(1, len(hello)), label="cut")
    tail = data.draw(st.binary(max_size=64), label="tail")
    server = server_ep.new_session()
    server.receive_data(bytes(hello[:cut]) + tail)
    server.data_to_send()
    assert server.state in (HANDSHAKING, FAILED)
    server.handshake_timed_out()
    assert server.state is FAILED and server.reason in REASONS


def test_plaintext_given_before_the_handshake_is_dropped_if_it_fails(pki: Pki) -> None:
    server = listener_endpoint(listener_settings(pki)).new_session()
    client = upstream_endpoint(upstream_settings(pki)).new_session()  # no client certificate
    got_server, got_client = _run_pair(client, server, lambda: 1 << 20, lambda: 1 << 20, [b"0100 held"], [])
    assert server.state is FAILED and server.reason == "no_certificate"
    assert client.state is FAILED and client.reason == "alert_certificate_required"
    assert got_server == got_client == b""


def test_a_failed_or_closed_session_ignores_what_comes_after(pki: Pki) -> None:
    server = listener_endpoint(listener_settings(pki, client_certs="none")).new_session()
    server.receive_data(b"GET / HTTP/1.0\r\n\r\n")
    assert server.state is FAILED and server.reason == "garbage"
    assert server.receive_data(os.urandom(100)) == b"" and server.send(b"x") == b""
    server.handshake_timed_out()
    server.receive_eof()
    assert server.reason == "garbage"  # the first reason stays


def test_eof_during_the_handshake_and_after_it(pki: Pki) -> None:
    server_ep = listener_endpoint(listener_settings(pki, client_certs="none"))
    client_ep = upstream_endpoint(upstream_settings(pki))
    server = server_ep.new_session()
    server.receive_data(client_ep.new_session().data_to_send())
    server.receive_eof()
    assert server.reason == "eof"
    client, server = client_ep.new_session(), server_ep.new_session()
    _run_pair(client, server, lambda: 1 << 20, lambda: 1 << 20, [], [])
    assert client.state is ESTABLISHED
    client.receive_eof()
    assert client.reason == "truncated"


# ------------------------------------------------------------------------------------------------ settings, files


def test_settings_are_refused_with_the_key_and_the_reason(pki: Pki, tmp_path: Path) -> None:
    cert, key = str(pki.server.cert_path), str(pki.server.key_path)
    cases: list[tuple[Callable[[], object], str]] = [
        (lambda: TlsListenerSettings(cert, key, client_certs="required"), "client_ca"),
        (lambda: TlsListenerSettings(cert, key, client_certs="sometimes"), "client_certs"),  # type: ignore[arg-type]
        (lambda: TlsListenerSettings(cert, key, client_ca=(cert,), client_certs="optional", client_names=("a",)),
         "client_names"),
        (lambda: TlsListenerSettings(cert, key, handshake_timeout=0), "handshake_timeout"),
        (lambda: TlsListenerSettings(cert, key, handshake_timeout=float("inf")), "handshake_timeout"),
        (lambda: TlsListenerSettings(cert, key, client_ca=("",), client_certs="required"), "client_ca"),
        (lambda: TlsListenerSettings(cert, key, minimum_version="1.1"), "minimum_version"),  # type: ignore[arg-type]
        (lambda: TlsUpstreamSettings(), "ca"),
        (lambda: TlsUpstreamSettings(ca=(cert,)), "server_name"),
        (lambda: TlsUpstreamSettings(pin_sha256="abcd"), "pin_sha256"),
        (lambda: TlsUpstreamSettings(pin_sha256="zz" * 32), "pin_sha256"),
        (lambda: TlsUpstreamSettings(pin_sha256="00" * 32, cert_chain=cert), "key"),
        (lambda: listener_endpoint(TlsListenerSettings(str(tmp_path / "missing.crt"), key)), "cert_chain"),
        (lambda: listener_endpoint(TlsListenerSettings(cert, str(pki.client.key_path))), "key"),
        (lambda: listener_endpoint(TlsListenerSettings(cert, key, ciphers="NOTHING-AT-ALL")), "ciphers"),
        (lambda: upstream_endpoint(TlsUpstreamSettings(ca=(key,), server_name="x")), "ca"),
    ]
    # lists from TOML become tuples; a single file may be written as a string
    listed = TlsListenerSettings(cert, key, client_ca=[cert], client_certs="required", client_names=["a"])  # type: ignore[arg-type]
    assert listed.client_ca == (cert,) and listed.client_names == ("a",)
    assert TlsUpstreamSettings(ca=cert, server_name="x").ca == (cert,)  # type: ignore[arg-type]
    for make, key_name in cases:
        with pytest.raises(TlsConfigError) as info:
            make()
        assert info.value.key == key_name, info.value


def test_contexts_hold_tls_1_2_as_the_minimum_and_take_a_cipher_string(pki: Pki) -> None:
    ep = listener_endpoint(listener_settings(pki, ciphers="ECDHE+AESGCM"))
    assert ep.context.minimum_version is ssl.TLSVersion.TLSv1_2
    names = {c["name"] for c in ep.context.get_ciphers()}
    assert "ECDHE-ECDSA-AES128-GCM-SHA256" in names and "ECDHE-ECDSA-CHACHA20-POLY1305" not in names
    assert ep.context.verify_mode is ssl.CERT_REQUIRED
    assert listener_endpoint(listener_settings(pki, client_certs="optional")).context.verify_mode is ssl.CERT_OPTIONAL
    up = upstream_endpoint(upstream_settings(pki, minimum_version="1.3"))
    assert up.context.minimum_version is ssl.TLSVersion.TLSv1_3 and up.context.check_hostname
    pinned = upstream_endpoint(TlsUpstreamSettings(pin_sha256=pki.server.sha256))
    assert pinned.context.verify_mode is ssl.CERT_NONE and pinned.pin == bytes.fromhex(pki.server.sha256)


def test_a_pin_reads_as_openssl_and_sha256sum_print_it() -> None:
    raw = bytes(range(32))
    assert parse_pin(raw.hex()) == parse_pin(raw.hex().upper()) == parse_pin(":".join(f"{b:02X}" for b in raw)) == raw


def test_days_to_expiry_of_every_certificate_in_the_files(pki: Pki, tmp_path: Path) -> None:
    at = NOW + dt.timedelta(days=100)
    ep = listener_endpoint(listener_settings(pki))
    found = ep.expiry(at)
    assert [e.path for e in found] == [str(pki.server.cert_path), str(pki.ca.cert_path)]
    server = found[0]
    assert server.days_left == pytest.approx((pki.server.cert.not_valid_after_utc - at).total_seconds() / 86400)
    assert 264 < server.days_left < 266 and "CN=switch.test" in server.subject
    (expired,) = certificate_expiry([str(pki.client_expired.cert_path)], NOW)
    assert expired.days_left < -9
    # a chain file: one entry per certificate in it
    chained = Authority(tmp_path, "Chain CA").issue("chained", "x", with_chain=True)
    assert len(certificate_expiry((str(chained.cert_path),), NOW)) == 2
    with pytest.raises(TlsConfigError):
        certificate_expiry((str(pki.server.key_path),), NOW)


def test_peer_identity_reads_cn_and_sans(pki: Pki) -> None:
    server = peer_identity(pki.server.der)
    assert server.common_name == "switch.test"
    assert server.dns_names == ("switch.test",) and server.ip_addresses == ("127.0.0.1",)
    assert server.names() == ("switch.test", "switch.test", "127.0.0.1")
    assert server.sha256 == pki.server.sha256
    assert server.not_after == pki.server.cert.not_valid_after_utc
    assert server.issuer.endswith("CN=Test Root CA") or "CN=Test Root CA" in server.issuer


def test_a_session_keeps_at_most_one_partial_record_and_nothing_once_failed(pki: Pki) -> None:
    server_ep = listener_endpoint(listener_settings(pki, client_certs="none"))
    client_ep = upstream_endpoint(upstream_settings(pki))
    client, server = client_ep.new_session(), server_ep.new_session()
    _run_pair(client, server, lambda: 1 << 20, lambda: 1 << 20, [], [])
    record = client.send(b"z" * 1000)
    assert not server.partial
    assert server.receive_data(record[:10]) == b"" and server.partial  # a record under way
    assert server.receive_data(record[10:]) == b"z" * 1000 and not server.partial
    for cut in range(1, 60):  # a read that ends anywhere: in a header, in a body, between two records
        first, second = client.send(b"y" * 10), client.send(b"x" * 20)
        two = first + second
        got = server.receive_data(two[:cut])
        assert server.partial == (cut != len(first))
        assert got + server.receive_data(two[cut:]) == b"y" * 10 + b"x" * 20
        assert not server.partial
    server.receive_data(b"\x17\x03\x03\x00\x20" + b"\x00" * 32)  # not a record of this session: broken
    assert server.state is FAILED and server.reason == "protocol"
    for _ in range(100):
        server.receive_data(b"\x00" * 65536)
    assert server.partial == 0  # a failed session keeps nothing of what keeps coming


# ------------------------------------------------------------------------------------------------ with the writer


def slow_reader(port: int, ctx: ssl.SSLContext, total: int) -> bytes:
    """A Python ssl client with a small receive buffer that reads until ``total`` bytes came."""
    with socket.socket() as raw:
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        raw.settimeout(LIMIT)
        raw.connect(("127.0.0.1", port))
        with ctx.wrap_socket(raw, server_hostname="switch.test") as tls:
            got = bytearray()
            while len(got) < total:
                chunk = tls.recv(65536)
                if not chunk:
                    break
                got += chunk
            return bytes(got)


async def test_the_frame_writer_sends_through_the_engine_in_order_across_partial_sends(pki: Pki) -> None:
    """The writer (net/writer.py, unchanged) over the engine: 2 MB of frames through a socket whose
    buffers are far smaller, so most sends are partial; the peer reads every byte in order."""
    endpoint = listener_endpoint(listener_settings(pki, client_certs="none"))
    frames = [bytes([i % 251]) * (500 + i % 700) for i in range(3000)]
    total = sum(map(len, frames))
    with trio.fail_after(LIMIT):
        listener, port = await open_listener()
        got: list[bytes] = []
        async with trio.open_nursery() as nursery:

            async def reader() -> None:
                got.append(await trio.to_thread.run_sync(slow_reader, port, client_context(pki), total))

            nursery.start_soon(reader)
            stream = SocketIO.adopt(await listener.accept())
            sock = stream.sock
            session = endpoint.new_session()
            adapter = TlsSocketIO(sock, session)  # net/sockio.py: what the daemon's writers write through
            while session.state is HANDSHAKING:  # as the poller's on_readable would: read, feed, write what it wants
                await trio.lowlevel.wait_readable(sock)
                data = sock.recv(65536)
                if data:
                    assert session.receive_data(data) == b""
                else:
                    session.receive_eof()
                adapter.write_pending()
            assert session.state is ESTABLISHED
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            writer = FrameWriter(cast(Any, adapter), send_timeout=LIMIT)
            writer.background = nursery
            for i, frame in enumerate(frames):
                if i % 3 == 0:
                    await writer.send(frame)  # flush(): send_nowait, then send_all for the rest
                else:
                    writer.enqueue(frame)  # a poller round: flush_soon, the rest in the background
                    if i % 3 == 2 and not writer.flush_soon():
                        await writer.flush()
            while not writer.idle:
                await writer.flush()
                await trio.lowlevel.wait_writable(sock)
            assert writer.broken is None
        assert got == [b"".join(frames)]
        assert adapter.partial_sends > 10  # the carried-ciphertext path was taken, many times
        adapter.close()
        assert session.state is CLOSED
        listener.socket.close()


def _handshake_in_memory(server_ep: TlsEndpoint, client_ep: TlsEndpoint) -> tuple[TlsSession, TlsSession]:
    client, server = client_ep.new_session(), server_ep.new_session()
    _run_pair(client, server, lambda: 1 << 20, lambda: 1 << 20, [b"probe"], [])
    return client, server


def test_optional_client_certificates_let_in_none_but_refuse_a_bad_one(pki: Pki) -> None:
    server_ep = listener_endpoint(listener_settings(pki, client_certs="optional"))
    client, server = _handshake_in_memory(server_ep, upstream_endpoint(upstream_settings(pki)))
    assert server.state is ESTABLISHED and server.peer is None  # identified by its address, then
    client, server = _handshake_in_memory(server_ep, upstream_endpoint(upstream_settings(pki, client=pki.client)))
    assert server.state is ESTABLISHED and server.peer is not None and server.peer.common_name == "front-1"
    client, server = _handshake_in_memory(server_ep, upstream_endpoint(upstream_settings(pki, client=pki.client_expired)))
    assert server.state is FAILED and server.reason == "expired"


def test_a_switch_named_by_its_ip_address(pki: Pki) -> None:
    server_ep = listener_endpoint(listener_settings(pki, client_certs="none"))
    client, _ = _handshake_in_memory(server_ep, upstream_endpoint(upstream_settings(pki, server_name="127.0.0.1")))
    assert client.state is ESTABLISHED
    client, _ = _handshake_in_memory(server_ep, upstream_endpoint(upstream_settings(pki, server_name="127.0.0.2")))
    assert client.state is FAILED and client.reason == "bad_name"


def test_a_cipher_string_and_a_version_floor_both_sides_must_meet(pki: Pki) -> None:
    tls12_only = upstream_endpoint(upstream_settings(pki))
    tls12_only.context.maximum_version = ssl.TLSVersion.TLSv1_2
    server_ep = listener_endpoint(listener_settings(pki, client_certs="none", minimum_version="1.3"))
    client, server = _handshake_in_memory(server_ep, tls12_only)
    assert server.state is FAILED and server.reason == "protocol_version"
    assert client.state is FAILED and client.reason == "protocol_version"
    server_ep = listener_endpoint(listener_settings(pki, client_certs="none", ciphers="ECDHE+CHACHA20"))
    client, server = _handshake_in_memory(server_ep, tls12_only)
    assert server.state is ESTABLISHED and server.version == "TLSv1.2" and "CHACHA20" in (server.cipher or "")
