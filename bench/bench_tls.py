"""TLS micro-benchmark: CPU per record round trip through two sans-IO engines (iso_gateway/net/tls.py).

Run: python bench/bench_tls.py [--number N]
Prints tables; makes no assertions. Times are process CPU (user + system, ``time.process_time``),
best of 5, so another process on the machine slows the figures less than it would wall time;
ratios are measured in the same run.

A round trip is what one transaction costs a gateway leg: the client side sends a request of
SIZE bytes, the server side reads it and sends it back, the client reads the answer.

- ``engine``: the two engines in memory (two encryptions, two decryptions, the engine's Python).
- ``ssl floor``: the same through bare ``ssl.SSLObject`` + ``MemoryBIO`` calls: what is left when
  the engine's own Python is taken away (the difference is the engine's overhead).
- ``plain socket``: the round trip over a connected ``socketpair``, no TLS: the system calls a
  plaintext leg makes.
- ``tls socket``: the same socketpair with the engines in the path (what a TLS leg makes).
- ``ratio``: tls socket / plain socket, for this one leg's I/O (a transaction's CPU also holds the
  gateway's own work, which TLS does not change: see the note printed at the end).

Then the same per frame when frames leave in batches (the writer joins what a poller round queued:
one record, one system call, for k frames), and the cost of a full handshake (one new connection).
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import socket
import ssl
import tempfile
import timeit
import time
from pathlib import Path
from typing import Callable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from iso_gateway.net.tls import (
    TlsEndpoint, TlsListenerSettings, TlsSession, TlsUpstreamSettings, listener_endpoint, upstream_endpoint,
)

SIZES = (200, 1024, 4096)
BATCHES = (1, 4, 16, 64)  # frames per send: 64 in flight on one link come out in batches


# ------------------------------------------------------------------------------------------------ certificates


def _issue(directory: Path, stem: str, cn: str, key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey,
           issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey] | None, ca: bool) -> Path:
    now = dt.datetime.now(dt.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    issuer_name, issuer_key = issuer if issuer is not None else (name, key)
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer_name).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=30))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if not ca:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(cn)]), critical=False)
    cert = builder.sign(issuer_key, hashes.SHA256())
    (directory / f"{stem}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / f"{stem}.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return directory / f"{stem}.crt"


def make_files(directory: Path, kind: str) -> None:
    """ca.crt, server.crt/.key ("switch.bench") and client.crt/.key, keys of ``kind`` (ec or rsa)."""
    def new_key() -> ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey:
        return ec.generate_private_key(ec.SECP256R1()) if kind == "ec" else rsa.generate_private_key(65537, 2048)
    ca_key = new_key()
    _issue(directory, "ca", "Bench CA", ca_key, None, True)
    ca = (x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Bench CA")]), ca_key)
    _issue(directory, "server", "switch.bench", new_key(), ca, False)
    _issue(directory, "client", "front.bench", new_key(), ca, False)


def endpoints(directory: Path, *, mutual: bool, version: str = "1.3",
              ciphers: str | None = None) -> tuple[TlsEndpoint, TlsEndpoint]:
    d = str(directory)
    server = listener_endpoint(TlsListenerSettings(
        cert_chain=f"{d}/server.crt", key=f"{d}/server.key", client_ca=(f"{d}/ca.crt",) if mutual else (),
        client_certs="required" if mutual else "none", ciphers=ciphers))
    client = upstream_endpoint(TlsUpstreamSettings(
        ca=(f"{d}/ca.crt",), server_name="switch.bench", minimum_version="1.3" if version == "1.3" else "1.2",
        cert_chain=f"{d}/client.crt" if mutual else None, key=f"{d}/client.key" if mutual else None))
    if version == "1.2":  # the client offers no more than TLS 1.2
        client.context.maximum_version = ssl.TLSVersion.TLSv1_2
    return server, client


def handshake(server_ep: TlsEndpoint, client_ep: TlsEndpoint) -> tuple[TlsSession, TlsSession]:
    client, server = client_ep.new_session(), server_ep.new_session()
    for _ in range(10):
        out = client.data_to_send()
        if out:
            server.receive_data(out)
        back = server.data_to_send()
        if back:
            client.receive_data(back)
        if not out and not back:
            break
    if not (client.established and server.established):
        raise SystemExit(f"handshake failed: client {client.reason} {client.detail}, server {server.reason} {server.detail}")
    return client, server


# ------------------------------------------------------------------------------------------------ timing


def best(fn: Callable[[], object], number: int) -> float:
    """µs of process CPU per call, best of 5."""
    return min(timeit.repeat(fn, number=number, repeat=5, timer=time.process_time)) / number * 1e6


def engine_round_trip(client: TlsSession, server: TlsSession, msg: bytes) -> Callable[[], object]:
    def run() -> object:
        return client.receive_data(server.send(server.receive_data(client.send(msg))))
    return run


def floor_round_trip(client: TlsSession, server: TlsSession, msg: bytes) -> Callable[[], object]:
    """The same calls on the bare ssl objects (the sessions' private parts: a benchmark's licence)."""
    c_obj, c_in, c_out = client._obj, client._in, client._out
    s_obj, s_in, s_out = server._obj, server._in, server._out

    def run() -> object:
        c_obj.write(msg)
        s_in.write(c_out.read())
        data = s_obj.read(65536)
        s_obj.write(data)
        c_in.write(s_out.read())
        return c_obj.read(65536)
    return run


def plain_socket_round_trip(a: socket.socket, b: socket.socket, msg: bytes) -> Callable[[], object]:
    def run() -> object:
        a.send(msg)
        data = b.recv(65536)
        b.send(data)
        return a.recv(65536)
    return run


def tls_socket_round_trip(a: socket.socket, b: socket.socket, client: TlsSession, server: TlsSession,
                          msg: bytes) -> Callable[[], object]:
    def run() -> object:
        a.send(client.send(msg))
        data = server.receive_data(b.recv(65536))
        b.send(server.send(data))
        return client.receive_data(a.recv(65536))
    return run


def check(run: Callable[[], object], msg: bytes) -> None:
    got = run()
    if got != msg:
        raise SystemExit(f"round trip returned {len(got) if isinstance(got, bytes) else got!r} bytes, not {len(msg)}")


# ------------------------------------------------------------------------------------------------ main


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--number", type=int, default=20000, help="round trips per timing (best of 5)")
    ap.add_argument("--handshakes", type=int, default=100, help="handshakes per timing (best of 5)")
    args = ap.parse_args()
    print(f"python {platform.python_version()} on {platform.machine()}, {ssl.OPENSSL_VERSION}; "
          f"process CPU, best of 5 x {args.number}")
    with tempfile.TemporaryDirectory() as tmp:
        ec_dir, rsa_dir = Path(tmp, "ec"), Path(tmp, "rsa")
        ec_dir.mkdir()
        rsa_dir.mkdir()
        make_files(ec_dir, "ec")
        make_files(rsa_dir, "rsa")

        print("\nµs per round trip (client send -> server read -> server send -> client read)")
        print(f"{'protocol, cipher':<40} {'size':>5} {'engine':>8} {'ssl floor':>10} {'plain socket':>13} "
              f"{'tls socket':>11} {'ratio':>6}")
        configs = [("1.3", None), ("1.2", "ECDHE+AESGCM"), ("1.2", "ECDHE+CHACHA20")]
        for version, ciphers in configs:
            server_ep, client_ep = endpoints(ec_dir, mutual=True, version=version, ciphers=ciphers)
            for size in SIZES:
                msg = bytes(range(256)) * (size // 256) + bytes(size % 256)
                client, server = handshake(server_ep, client_ep)
                engine = engine_round_trip(client, server, msg)
                check(engine, msg)
                t_engine = best(engine, args.number)
                floor = floor_round_trip(client, server, msg)
                check(floor, msg)
                t_floor = best(floor, args.number)
                a, b = socket.socketpair()
                with a, b:
                    plain = plain_socket_round_trip(a, b, msg)
                    check(plain, msg)
                    t_plain = best(plain, args.number)
                    tls = tls_socket_round_trip(a, b, client, server, msg)
                    check(tls, msg)
                    t_tls = best(tls, args.number)
                name = f"TLS {version} {client.cipher}"
                print(f"{name:<40} {size:>5} {t_engine:>8.2f} {t_floor:>10.2f} {t_plain:>13.2f} {t_tls:>11.2f} "
                      f"{t_tls / t_plain:>6.2f}")

        print("\nµs per 200-byte frame when the writer sends k frames at once (one TLS record carries them all)")
        server_ep, client_ep = endpoints(ec_dir, mutual=True)
        print(f"{'k':>4} {'engine per frame':>17} {'tls socket per frame':>21} {'plain socket per frame':>23}")
        for k in BATCHES:
            msg = bytes(range(200)) * k
            client, server = handshake(server_ep, client_ep)
            engine = engine_round_trip(client, server, msg)
            check(engine, msg)
            a, b = socket.socketpair()
            with a, b:
                plain = plain_socket_round_trip(a, b, msg)
                tls = tls_socket_round_trip(a, b, client, server, msg)
                check(plain, msg)
                check(tls, msg)
                number = max(args.number // k, 100)
                print(f"{k:>4} {best(engine, number) / k:>17.2f} {best(tls, number) / k:>21.2f} "
                      f"{best(plain, number) / k:>23.2f}")

        print("\nms per full handshake in memory (both sides' CPU: one new connection)")
        for kind, directory in (("ECDSA P-256", ec_dir), ("RSA 2048", rsa_dir)):
            for mutual in (False, True):
                for version in ("1.3", "1.2"):
                    server_ep, client_ep = endpoints(directory, mutual=mutual, version=version)
                    handshake(server_ep, client_ep)
                    t = best(lambda: handshake(server_ep, client_ep), args.handshakes) / 1000
                    print(f"  {kind:<12} TLS {version} {'mutual' if mutual else 'server-only':<12} {t:>7.3f}")
    print("\nThe ratio is one leg's I/O alone. Per transaction the gateway has two legs and its own work "
          "(decode, route, match, journal: tens of µs), which TLS does not touch; "
          "see docs/tls.md for the arithmetic.")


if __name__ == "__main__":
    main()
