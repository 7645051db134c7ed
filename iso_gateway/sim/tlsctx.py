"""TLS for the tools (switch simulator, front-end client, load generator, instant responder).

The contexts come from the gateway's own TLS settings (``net/tls.py``), so a tool checks what the
gateway checks; the tools' streams are trio's ``SSLStream`` (they are peers to test the gateway
with, not the gateway's hot path). ``handshake`` runs one with a deadline and turns a failure
into a reason from ``net.tls.REASONS``.
"""

from __future__ import annotations

import ssl

import trio

from ..net.tls import (
    TIMEOUT, TlsListenerSettings, TlsUpstreamSettings, classify_error, listener_context, upstream_context,
)

__all__ = ["TlsHandshakeFailed", "client_context", "handshake", "server_context"]


class TlsHandshakeFailed(Exception):
    """A tool's TLS handshake failed; ``reason`` is one of ``net.tls.REASONS``."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"TLS handshake failed: {reason}" + (f" ({detail})" if detail else ""))
        self.reason = reason


def server_context(cert_chain: str, key: str, *, client_ca: tuple[str, ...] = (), require_client_cert: bool = False,
                   minimum_version: str = "1.2") -> ssl.SSLContext:
    """A server context (the simulated switch, the responder): our certificate; with
    ``require_client_cert``, clients must present one signed by ``client_ca``."""
    return listener_context(TlsListenerSettings(
        cert_chain=cert_chain, key=key, client_ca=client_ca,
        client_certs="required" if require_client_cert else ("optional" if client_ca else "none"),
        minimum_version=minimum_version))  # type: ignore[arg-type]


def client_context(*, ca: tuple[str, ...] = (), server_name: str | None = None, pin_sha256: str | None = None,
                   cert_chain: str | None = None, key: str | None = None, insecure: bool = False,
                   minimum_version: str = "1.2") -> ssl.SSLContext:
    """A client context (a front end, the load generator): trust ``ca`` for ``server_name``;
    ``insecure`` trusts anything (measurement against a throwaway certificate only)."""
    if insecure:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        if cert_chain and key:
            ctx.load_cert_chain(cert_chain, key)
        return ctx
    return upstream_context(TlsUpstreamSettings(
        ca=ca, server_name=server_name, pin_sha256=pin_sha256, cert_chain=cert_chain, key=key,
        minimum_version=minimum_version))  # type: ignore[arg-type]


async def handshake(stream: trio.abc.Stream, context: ssl.SSLContext, *, server_side: bool,
                    server_hostname: str | None = None, timeout: float = 10.0) -> trio.SSLStream[trio.abc.Stream]:
    """``stream`` in TLS, its handshake done within ``timeout``; TlsHandshakeFailed otherwise (the
    stream is then closed)."""
    tls = trio.SSLStream(stream, context, server_side=server_side, server_hostname=server_hostname,
                         https_compatible=True)
    try:
        with trio.fail_after(timeout):
            await tls.do_handshake()
    except trio.TooSlowError:
        await trio.aclose_forcefully(stream)
        raise TlsHandshakeFailed(TIMEOUT) from None
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        # The alert OpenSSL made for the peer is left in the SSLStream's outgoing buffer (a private
        # one: read only if it is there), so that the peer hears why, as from any TLS server.
        outgoing = getattr(tls, "_outgoing", None)
        if isinstance(outgoing, ssl.MemoryBIO) and outgoing.pending:
            with trio.move_on_after(1.0):
                try:
                    await stream.send_all(outgoing.read())
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    pass
        await trio.aclose_forcefully(stream)
        cause = exc.__cause__ if exc.__cause__ is not None else exc
        raise TlsHandshakeFailed(classify_error(cause, hello_seen=True), str(cause)) from None
    return tls
