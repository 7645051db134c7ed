"""TLS and mutual TLS as a sans-IO engine: ``ssl.MemoryBIO`` between the socket and the framing.

The poller reads raw sockets and the writers send raw bytes; TLS sits between them without
owning either. A ``TlsSession`` is fed the ciphertext a read returned and hands back plaintext;
it takes plaintext to send and hands back ciphertext; it drives the handshake as bytes arrive
and reports how it ended: established, closed, or failed with a short reason that can be a
metric label (``REASONS``). It never touches a socket, never waits and never reads a clock:
the handshake deadline (``handshake_timeout`` of the settings) is the caller's, who calls
``handshake_timed_out`` when it passes.

Around it, from plain values (the config layer turns TOML into them):

- ``TlsListenerSettings`` / ``TlsUpstreamSettings``: the files and choices of one listener or
  upstream; checked on construction (``TlsConfigError`` names the key and the reason).
- ``TlsEndpoint``: an ``ssl.SSLContext`` built from them (``listener_endpoint``,
  ``upstream_endpoint``) plus the checks the context cannot make itself (a pinned certificate,
  the client names a listener accepts). ``new_session()`` starts a connection; ``reload()``
  builds a new endpoint from the same files, so SIGHUP can swap it for new connections while
  established sessions keep the context they started with.
- ``PeerIdentity``: the peer certificate's subject CN, SANs and fingerprint as plain strings.
- ``certificate_expiry`` / ``TlsEndpoint.expiry``: days to expiry of every certificate in the
  files, with ``now`` passed in (a gauge and an alert).

docs/tls.md has the settings, how to make test certificates and what each reason means.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import math
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cryptography import x509
from cryptography.x509.oid import NameOID

__all__ = [
    "CLOSED", "ESTABLISHED", "FAILED", "HANDSHAKING", "REASONS",
    "CertExpiry", "ExpiryGauge", "PeerIdentity", "TlsConfigError", "TlsEndpoint", "TlsListenerSettings", "TlsSession",
    "TlsUpstreamSettings", "certificate_expiry", "classify_error", "listener_context", "listener_endpoint", "parse_pin",
    "peer_identity", "upstream_context", "upstream_endpoint",
]

# ---------------------------------------------------------------------------------------------------- states

HANDSHAKING = "handshaking"
ESTABLISHED = "established"
CLOSED = "closed"  # an orderly end: close_notify sent or received
FAILED = "failed"  # see ``TlsSession.reason``

# ---------------------------------------------------------------------------------------------------- reasons

# Why a session failed: a closed set, so each can be a metric label. What each means: docs/tls.md.
# We refused the peer's certificate:
NO_CERTIFICATE = "no_certificate"  # a client certificate is required and none was sent
EXPIRED = "expired"  # past its notAfter (or before its notBefore: "not_yet_valid")
NOT_YET_VALID = "not_yet_valid"
UNKNOWN_CA = "unknown_ca"  # not signed by a CA we trust (self-signed, other CA, broken signature)
BAD_NAME = "bad_name"  # the switch's certificate is not for the expected server name; a client name not allowed
BAD_CERTIFICATE = "bad_certificate"  # any other verification failure (purpose, extensions, revoked...)
PIN_MISMATCH = "pin_mismatch"  # the switch's certificate is not the pinned one
# The peer refused us (it sent an alert during the handshake):
ALERT_NO_CERTIFICATE = "alert_certificate_required"
ALERT_EXPIRED = "alert_certificate_expired"
ALERT_UNKNOWN_CA = "alert_unknown_ca"
ALERT_BAD_CERTIFICATE = "alert_bad_certificate"
ALERT_HANDSHAKE = "alert_handshake_failure"
ALERT_OTHER = "alert_other"
# The conversation itself:
PROTOCOL_VERSION = "protocol_version"  # below TLS 1.2 (or above what we allow)
NO_SHARED_CIPHER = "no_shared_cipher"
GARBAGE = "garbage"  # bytes that are not TLS records where the handshake should start (plaintext, HTTP, noise)
PROTOCOL = "protocol"  # a TLS protocol error (bad record MAC, unexpected message, decryption failure...)
TIMEOUT = "timeout"  # the caller's handshake deadline passed
EOF = "eof"  # the peer closed the TCP connection before the handshake finished
TRUNCATED = "truncated"  # the peer closed the TCP connection without close_notify once established
INTERNAL = "internal"  # anything else OpenSSL or the engine raised (a bug to look at, never a crash)

REASONS = frozenset({
    NO_CERTIFICATE, EXPIRED, NOT_YET_VALID, UNKNOWN_CA, BAD_NAME, BAD_CERTIFICATE, PIN_MISMATCH,
    ALERT_NO_CERTIFICATE, ALERT_EXPIRED, ALERT_UNKNOWN_CA, ALERT_BAD_CERTIFICATE, ALERT_HANDSHAKE, ALERT_OTHER,
    PROTOCOL_VERSION, NO_SHARED_CIPHER, GARBAGE, PROTOCOL, TIMEOUT, EOF, TRUNCATED, INTERNAL,
})

# OpenSSL's certificate verification error codes (X509_V_ERR_*) by the reason they are counted as.
_VERIFY_CODES = {
    9: NOT_YET_VALID,  # CERT_NOT_YET_VALID
    10: EXPIRED,  # CERT_HAS_EXPIRED
    2: UNKNOWN_CA,  # UNABLE_TO_GET_ISSUER_CERT
    7: UNKNOWN_CA,  # CERT_SIGNATURE_FAILURE
    18: UNKNOWN_CA,  # DEPTH_ZERO_SELF_SIGNED_CERT
    19: UNKNOWN_CA,  # SELF_SIGNED_CERT_IN_CHAIN
    20: UNKNOWN_CA,  # UNABLE_TO_GET_ISSUER_CERT_LOCALLY
    21: UNKNOWN_CA,  # UNABLE_TO_VERIFY_LEAF_SIGNATURE
    62: BAD_NAME,  # HOSTNAME_MISMATCH
    63: BAD_NAME,  # EMAIL_MISMATCH
    64: BAD_NAME,  # IP_ADDRESS_MISMATCH
}

# OpenSSL's reason names (``SSLError.reason``) by what they are counted as.
_SSL_REASONS = {
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": NO_CERTIFICATE,
    "CERTIFICATE_VERIFY_FAILED": BAD_CERTIFICATE,  # without a verify code (rare): the code wins when present
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": ALERT_NO_CERTIFICATE,
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": ALERT_EXPIRED,
    "TLSV1_ALERT_UNKNOWN_CA": ALERT_UNKNOWN_CA,
    "SSLV3_ALERT_BAD_CERTIFICATE": ALERT_BAD_CERTIFICATE,
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE": ALERT_BAD_CERTIFICATE,
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": ALERT_BAD_CERTIFICATE,
    "SSLV3_ALERT_CERTIFICATE_REVOKED": ALERT_BAD_CERTIFICATE,
    "TLSV1_ALERT_ACCESS_DENIED": ALERT_BAD_CERTIFICATE,
    "SSLV3_ALERT_HANDSHAKE_FAILURE": ALERT_HANDSHAKE,
    "TLSV1_ALERT_INSUFFICIENT_SECURITY": ALERT_HANDSHAKE,
    "TLSV1_ALERT_PROTOCOL_VERSION": PROTOCOL_VERSION,
    "UNSUPPORTED_PROTOCOL": PROTOCOL_VERSION,
    "NO_PROTOCOLS_AVAILABLE": PROTOCOL_VERSION,
    "TLSV1_ALERT_INAPPROPRIATE_FALLBACK": PROTOCOL_VERSION,
    "NO_SHARED_CIPHER": NO_SHARED_CIPHER,
    "NO_CIPHERS_AVAILABLE": NO_SHARED_CIPHER,
    "NO_SUITABLE_SIGNATURE_ALGORITHM": NO_SHARED_CIPHER,
    "NO_SHARED_SIGNATURE_ALGORITHMS": NO_SHARED_CIPHER,
    # The first bytes were not a TLS record at all.
    "WRONG_VERSION_NUMBER": GARBAGE,
    "HTTP_REQUEST": GARBAGE,
    "HTTPS_PROXY_REQUEST": GARBAGE,
    "UNKNOWN_PROTOCOL": GARBAGE,
    "PACKET_LENGTH_TOO_LONG": GARBAGE,
    "RECORD_LENGTH_MISMATCH": GARBAGE,
    "ENCRYPTED_LENGTH_TOO_LONG": GARBAGE,
    "WRONG_SSL_VERSION": GARBAGE,
    "UNEXPECTED_RECORD": GARBAGE,
    "RECORD_LAYER_FAILURE": GARBAGE,
}


def classify_error(exc: BaseException, *, hello_seen: bool) -> str:
    """The reason (one of ``REASONS``) an ``ssl`` exception stands for.

    ``hello_seen``: the peer's hello was accepted (its ClientHello or ServerHello parsed, a cipher
    chosen). Before it, whatever breaks the handshake is ``garbage`` (the peer does not speak TLS,
    or not to us) unless OpenSSL names something sharper (an old protocol version, no shared
    cipher); after it, a broken record or message is ``protocol``."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return _VERIFY_CODES.get(exc.verify_code, BAD_CERTIFICATE)
    if isinstance(exc, ssl.SSLError):
        name = exc.reason or ""
        reason = _SSL_REASONS.get(name)
        if reason is None:
            if name.startswith(("SSLV3_ALERT_", "TLSV1_ALERT_", "TLSV13_ALERT_")):
                return ALERT_OTHER
            return PROTOCOL if hello_seen else GARBAGE
        if reason is GARBAGE and hello_seen:
            return PROTOCOL
        return reason
    return INTERNAL


# ---------------------------------------------------------------------------------------------------- settings


class TlsConfigError(ValueError):
    """A TLS setting that cannot be used: ``key`` names the setting, the message says why."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}")
        self.key = key
        self.reason = reason


ClientCerts = Literal["required", "optional", "none"]
MinimumVersion = Literal["1.2", "1.3"]
_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


def _files(settings: object, *names: str) -> None:
    """Lists (from TOML) as tuples, and one file written as a string as a tuple of one."""
    for name in names:
        value = getattr(settings, name)
        if isinstance(value, str):
            value = (value,)
        elif not isinstance(value, tuple):
            value = tuple(value)
        if not all(isinstance(v, str) and v for v in value):
            raise TlsConfigError(name, f"must be a list of non-empty strings, not {value!r}")
        object.__setattr__(settings, name, value)  # frozen: set once, here


def _check_common(handshake_timeout: float, minimum_version: str, ciphers: str | None) -> None:
    if not (handshake_timeout > 0 and math.isfinite(handshake_timeout)):  # everything that waits has a deadline
        raise TlsConfigError("handshake_timeout", f"must be a number of seconds above 0, not {handshake_timeout!r}")
    if minimum_version not in _VERSIONS:
        raise TlsConfigError("minimum_version", f'must be "1.2" or "1.3", not {minimum_version!r}')
    if ciphers is not None and not ciphers.strip():
        raise TlsConfigError("ciphers", "is empty (leave it out for OpenSSL's defaults)")


@dataclass(frozen=True, slots=True)
class TlsListenerSettings:
    """TLS on one front-end listener: its certificate and what it asks of clients.

    ``cert_chain``: PEM, the listener's certificate first, then any intermediates; ``key``: its
    private key (PEM, unencrypted: file permissions protect it). ``client_ca``: PEM files of the CAs
    that may sign client certificates (needed unless ``client_certs`` is ``"none"``).
    ``client_names``: if not empty, a client certificate must carry one of these as its subject CN
    or a SAN (DNS, URI, e-mail, IP; any case), or the session fails as ``bad_name``; needs ``client_certs =
    "required"``. ``handshake_timeout``: seconds, enforced by the caller. ``ciphers``: an OpenSSL
    cipher string for TLS 1.2 (TLS 1.3 suites stay OpenSSL's); None keeps OpenSSL's defaults.
    """

    cert_chain: str
    key: str
    client_ca: tuple[str, ...] = ()
    client_certs: ClientCerts = "none"
    client_names: tuple[str, ...] = ()
    handshake_timeout: float = 10.0
    minimum_version: MinimumVersion = "1.2"
    ciphers: str | None = None

    def __post_init__(self) -> None:
        _files(self, "client_ca", "client_names")
        if not self.cert_chain:
            raise TlsConfigError("cert_chain", "is required")
        if not self.key:
            raise TlsConfigError("key", "is required")
        if self.client_certs not in ("required", "optional", "none"):
            raise TlsConfigError("client_certs", f'must be "required", "optional" or "none", not {self.client_certs!r}')
        if self.client_certs != "none" and not self.client_ca:
            raise TlsConfigError("client_ca", f'is required when client_certs is "{self.client_certs}"')
        if self.client_names and self.client_certs != "required":
            raise TlsConfigError("client_names", 'needs client_certs = "required"')
        _check_common(self.handshake_timeout, self.minimum_version, self.ciphers)


@dataclass(frozen=True, slots=True)
class TlsUpstreamSettings:
    """TLS on the links to one upstream (switch): how its certificate is trusted, and ours.

    Trust is ``ca`` (PEM files of the CAs that sign the switch's certificate; the certificate must
    then also be for ``server_name``), or ``pin_sha256`` (the SHA-256 fingerprint of the switch's
    own certificate, hex, colons allowed: that certificate and no other, whatever signed it and
    whatever its names or dates), or both (both must hold). ``server_name`` is also sent as SNI;
    it is required with ``ca``. ``cert_chain`` and ``key``: our client certificate, if the switch
    asks for one.
    """

    ca: tuple[str, ...] = ()
    pin_sha256: str | None = None
    server_name: str | None = None
    cert_chain: str | None = None
    key: str | None = None
    handshake_timeout: float = 10.0
    minimum_version: MinimumVersion = "1.2"
    ciphers: str | None = None

    def __post_init__(self) -> None:
        _files(self, "ca")
        if not self.ca and self.pin_sha256 is None:
            raise TlsConfigError("ca", "a CA bundle (ca) or a pinned certificate (pin_sha256) is required")
        if self.pin_sha256 is not None:
            parse_pin(self.pin_sha256)
        if self.ca and not self.server_name:
            raise TlsConfigError("server_name", "is required with ca (the name the switch's certificate must carry)")
        if (self.cert_chain is None) != (self.key is None):
            raise TlsConfigError("key" if self.key is None else "cert_chain", "cert_chain and key go together")
        _check_common(self.handshake_timeout, self.minimum_version, self.ciphers)


def parse_pin(text: str) -> bytes:
    """A SHA-256 fingerprint written as hex (any case, colons or spaces allowed) as its 32 bytes."""
    digits = text.replace(":", "").replace(" ", "").strip()
    try:
        pin = bytes.fromhex(digits)
    except ValueError:
        raise TlsConfigError("pin_sha256", "is not hexadecimal") from None
    if len(pin) != 32:
        raise TlsConfigError("pin_sha256", f"must be 32 bytes (64 hex digits), not {len(pin)}")
    return pin


# ---------------------------------------------------------------------------------------------------- contexts


def _base_context(protocol: int, minimum_version: str, ciphers: str | None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(protocol)
    ctx.minimum_version = _VERSIONS[minimum_version]
    # Renegotiation (TLS 1.2) is a way to make a server do handshakes on an established connection.
    ctx.options |= ssl.OP_NO_RENEGOTIATION
    if ciphers is not None:
        try:
            ctx.set_ciphers(ciphers)
        except ssl.SSLError:
            raise TlsConfigError("ciphers", f"OpenSSL selects no cipher from {ciphers!r}") from None
    return ctx


def _load_chain(ctx: ssl.SSLContext, cert_chain: str, key: str) -> None:
    for name, path in (("cert_chain", cert_chain), ("key", key)):
        if not Path(path).is_file():
            raise TlsConfigError(name, f"{path}: no such file")
    try:
        ctx.load_cert_chain(cert_chain, key)
    except ssl.SSLError as exc:
        raise TlsConfigError("key", f"{cert_chain} and {key} do not load as a certificate and its key "
                                    f"({exc.reason or exc})") from None
    except OSError as exc:
        raise TlsConfigError("cert_chain", f"{exc.filename or cert_chain}: {exc.strerror}") from None


def _load_cas(ctx: ssl.SSLContext, key: str, files: tuple[str, ...]) -> None:
    for path in files:
        try:
            ctx.load_verify_locations(cafile=path)
        except ssl.SSLError as exc:
            raise TlsConfigError(key, f"{path}: no CA certificate in it ({exc.reason or exc})") from None
        except OSError as exc:
            raise TlsConfigError(key, f"{path}: {exc.strerror}") from None


def listener_context(settings: TlsListenerSettings) -> ssl.SSLContext:
    """The server context of a listener, from its files (read now)."""
    ctx = _base_context(ssl.PROTOCOL_TLS_SERVER, settings.minimum_version, settings.ciphers)
    _load_chain(ctx, settings.cert_chain, settings.key)
    if settings.client_certs != "none":
        _load_cas(ctx, "client_ca", settings.client_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED if settings.client_certs == "required" else ssl.CERT_OPTIONAL
    # No session tickets: every connection is a full handshake with its client certificate checked
    # against the files of now (a reload is not bypassed by resuming); front ends keep their
    # connections open, so resumption would save little. It also keeps post-handshake bytes away.
    ctx.options |= ssl.OP_NO_TICKET
    ctx.num_tickets = 0
    return ctx


def upstream_context(settings: TlsUpstreamSettings) -> ssl.SSLContext:
    """The client context of an upstream's links, from its files (read now)."""
    ctx = _base_context(ssl.PROTOCOL_TLS_CLIENT, settings.minimum_version, settings.ciphers)
    if settings.ca:
        _load_cas(ctx, "ca", settings.ca)  # PROTOCOL_TLS_CLIENT: CERT_REQUIRED and the name checked
    else:
        # Pinned only: the fingerprint check after the handshake is the whole of the trust.
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if settings.cert_chain is not None and settings.key is not None:
        _load_chain(ctx, settings.cert_chain, settings.key)
    return ctx


# ---------------------------------------------------------------------------------------------------- identity


@dataclass(frozen=True, slots=True)
class PeerIdentity:
    """What a peer's certificate says it is, as plain strings (a front end's identity is mapped to
    the acquirer, merchant and terminal ids it may use from these)."""

    subject: str  # the distinguished name as one string, e.g. "CN=front-1,O=Acquirer"
    common_name: str | None
    dns_names: tuple[str, ...] = ()
    ip_addresses: tuple[str, ...] = ()
    uris: tuple[str, ...] = ()
    emails: tuple[str, ...] = ()
    issuer: str = ""
    serial: str = ""  # hex
    sha256: str = ""  # hex fingerprint of the DER certificate, as pin_sha256 takes it
    not_after: dt.datetime | None = None  # UTC: a pinned switch certificate's expiry is known only from here

    def names(self) -> tuple[str, ...]:
        """Every name it carries: the CN first, then the SANs."""
        first = (self.common_name,) if self.common_name else ()
        return first + self.dns_names + self.uris + self.emails + self.ip_addresses


def peer_identity(der: bytes) -> PeerIdentity:
    """Read a DER certificate's subject, CN and SANs."""
    cert = x509.load_der_x509_certificate(der)
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    cn = cns[0].value if cns else None
    dns: list[str] = []
    ips: list[str] = []
    uris: list[str] = []
    emails: list[str] = []
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        pass
    else:
        dns = san.get_values_for_type(x509.DNSName)
        ips = [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
        emails = san.get_values_for_type(x509.RFC822Name)
    return PeerIdentity(
        subject=cert.subject.rfc4514_string(),
        common_name=cn if isinstance(cn, str) else None,
        dns_names=tuple(dns), ip_addresses=tuple(ips), uris=tuple(uris), emails=tuple(emails),
        issuer=cert.issuer.rfc4514_string(),
        serial=format(cert.serial_number, "x"),
        sha256=hashlib.sha256(der).hexdigest(),
        not_after=cert.not_valid_after_utc,
    )


# ---------------------------------------------------------------------------------------------------- expiry


@dataclass(frozen=True, slots=True)
class CertExpiry:
    """One certificate of a file and the days left before it expires (negative: expired)."""

    path: str
    subject: str
    not_after: dt.datetime
    days_left: float


def certificate_expiry(paths: tuple[str, ...] | list[str], now: dt.datetime) -> list[CertExpiry]:
    """Every certificate in the PEM files ``paths``, with its days left at ``now`` (aware, UTC)."""
    out: list[CertExpiry] = []
    for path in paths:
        try:
            data = Path(path).read_bytes()
            certs = x509.load_pem_x509_certificates(data)
        except OSError as exc:
            raise TlsConfigError("cert_chain", f"{path}: {exc.strerror}") from None
        except ValueError:
            raise TlsConfigError("cert_chain", f"{path}: no PEM certificate in it") from None
        for cert in certs:
            after = cert.not_valid_after_utc
            out.append(CertExpiry(path, cert.subject.rfc4514_string(), after, (after - now).total_seconds() / 86400))
    return out


class ExpiryGauge:
    """Days to expiry of one listener's or upstream's certificates, as a gauge with a subject label
    (``metrics.tls_days_left``): every certificate in the endpoint's files, and the peer
    certificates ``seen`` (a pinned switch's, known only from its handshakes). Subjects no longer
    in the files are dropped from the gauge. ``now`` is passed in, from the gateway's clock."""

    INTERVAL = 3600.0  # seconds between refreshes (and one at each reload)

    def __init__(self, metrics: Any, side: str, name: str) -> None:
        self._gauge = metrics.tls_days_left
        self._forget = getattr(self._gauge, "forget", None)  # NullMetrics has none
        self.side = side
        self.name = name
        self.seen: dict[str, dt.datetime] = {}  # peer certificates by subject: their notAfter
        self.shown: dict[str, float] = {}  # subject -> days left, as last set

    def refresh(self, endpoint: TlsEndpoint | None, now: dt.datetime) -> None:
        days: dict[str, float] = {}
        if endpoint is not None:
            try:
                found = endpoint.expiry(now)
            except TlsConfigError:
                return  # a file gone since it was loaded: keep what is shown (the reload says why)
            for item in found:
                days[item.subject] = min(days.get(item.subject, math.inf), item.days_left)
        for subject, not_after in self.seen.items():
            days[subject] = min(days.get(subject, math.inf), (not_after - now).total_seconds() / 86400)
        for subject, left in days.items():
            self._gauge(self.side, self.name, subject).set(round(left, 3))
        if self._forget is not None:
            for subject in self.shown.keys() - days.keys():
                self._forget(self.side, self.name, subject)
        self.shown = days

    def saw(self, peer: PeerIdentity | None, now: dt.datetime) -> None:
        """A peer certificate came in a handshake: its expiry is shown from now on."""
        if peer is not None and peer.not_after is not None and self.seen.get(peer.subject) != peer.not_after:
            self.seen[peer.subject] = peer.not_after
            left = round((peer.not_after - now).total_seconds() / 86400, 3)
            self._gauge(self.side, self.name, peer.subject).set(left)
            self.shown[peer.subject] = left


# ---------------------------------------------------------------------------------------------------- endpoint


@dataclass(frozen=True, slots=True)
class TlsEndpoint:
    """A built context and what goes with it; immutable, so a reload swaps the whole of it."""

    context: ssl.SSLContext
    server_side: bool
    settings: TlsListenerSettings | TlsUpstreamSettings
    server_name: str | None = None
    pin: bytes | None = None
    client_names: frozenset[str] = field(default_factory=frozenset)

    @property
    def handshake_timeout(self) -> float:
        return self.settings.handshake_timeout

    def new_session(self, read_size: int = 65536) -> TlsSession:
        """A session for one new connection (a client one has its ClientHello ready to send)."""
        return TlsSession(self, read_size)

    def reload(self) -> TlsEndpoint:
        """A new endpoint from the same files, read again (raises ``TlsConfigError``: keep the old)."""
        if isinstance(self.settings, TlsListenerSettings):
            return listener_endpoint(self.settings)
        return upstream_endpoint(self.settings)

    def certificate_files(self) -> tuple[str, ...]:
        """The certificate files it was built from: its own chain, then the CAs it trusts."""
        s = self.settings
        own = (s.cert_chain,) if s.cert_chain else ()
        return own + (s.client_ca if isinstance(s, TlsListenerSettings) else s.ca)

    def expiry(self, now: dt.datetime) -> list[CertExpiry]:
        """Days to expiry of each certificate in its files, at ``now``."""
        return certificate_expiry(self.certificate_files(), now)


def listener_endpoint(settings: TlsListenerSettings) -> TlsEndpoint:
    return TlsEndpoint(listener_context(settings), True, settings,
                       client_names=frozenset(n.lower() for n in settings.client_names))


def upstream_endpoint(settings: TlsUpstreamSettings) -> TlsEndpoint:
    pin = parse_pin(settings.pin_sha256) if settings.pin_sha256 is not None else None
    return TlsEndpoint(upstream_context(settings), False, settings, server_name=settings.server_name, pin=pin)


# ---------------------------------------------------------------------------------------------------- session


class TlsSession:
    """One connection's TLS, sans I/O.

    Feed it what the socket read (``receive_data``: returns the plaintext it decrypted, b"" while
    handshaking) and the end of the stream (``receive_eof``); give it plaintext (``send``: returns
    the ciphertext to write, with any handshake bytes before it). After every call, whatever it
    still wants written is in ``data_to_send()`` (handshake flights, alerts, close_notify):
    ``wants_write`` says if there is any. ``state`` is HANDSHAKING, ESTABLISHED, CLOSED or
    FAILED (``reason``, ``detail``). No call raises for anything the peer sent.

    Plaintext given before the handshake ends is held and encrypted as soon as it ends (and
    dropped if it fails).
    """

    __slots__ = ("endpoint", "state", "established", "reason", "detail", "peer", "read_size", "_in", "_out",
                 "_obj", "_held", "_read", "_write", "_out_read", "_rec_left", "_rec_head", "__weakref__")

    def __init__(self, endpoint: TlsEndpoint, read_size: int = 65536) -> None:
        self.endpoint = endpoint
        self.state = HANDSHAKING
        self.established = False  # state is ESTABLISHED (a plain attribute for the hot path)
        self.reason: str | None = None  # one of REASONS once FAILED
        self.detail = ""  # OpenSSL's words for the failure, for a log line (never a label)
        self.peer: PeerIdentity | None = None  # the peer's certificate, once established (if it sent one)
        self.read_size = read_size
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._obj = endpoint.context.wrap_bio(self._in, self._out, server_side=endpoint.server_side,
                                              server_hostname=None if endpoint.server_side else endpoint.server_name)
        self._held: list[bytes] = []
        # Where the peer's records end, followed on the bytes fed (``partial``): bytes of the current
        # record still to come, and the start of a record header cut by a read.
        self._rec_left = 0
        self._rec_head = b""
        self._read = self._obj.read
        self._write = self._obj.write
        self._out_read = self._out.read
        if not endpoint.server_side:
            self._handshake()  # the ClientHello

    # ------------------------------------------------------------------ what the caller reads

    @property
    def wants_write(self) -> bool:
        """There are bytes to write (``data_to_send``)."""
        return self._out.pending > 0

    @property
    def handshaking(self) -> bool:
        return self.state is HANDSHAKING

    @property
    def partial(self) -> bool:
        """A record of the peer's has begun and not ended: to the caller, a partial frame (its
        deadline runs from the record's first byte; the framing sees nothing of it until it ends)."""
        return self._rec_left > 0 or bool(self._rec_head)

    def data_to_send(self) -> bytes:
        """Every byte the session wants written now (b"" if none)."""
        return self._out_read()

    @property
    def version(self) -> str | None:
        """The negotiated protocol ("TLSv1.3"), once established."""
        return self._obj.version()

    @property
    def cipher(self) -> str | None:
        c = self._obj.cipher()
        return c[0] if c else None

    def peer_certificate(self) -> bytes | None:
        """The peer's certificate, DER (whether or not it was verified)."""
        return self._obj.getpeercert(binary_form=True)

    # ------------------------------------------------------------------ bytes in

    def receive_data(self, data: bytes) -> bytes:
        """Ciphertext read from the socket in; the plaintext it completes out (b"" if none yet).

        May leave bytes to write (the handshake's answer, an alert): check ``wants_write``."""
        if self.established:
            self._in.write(data)
            left = self._rec_left
            size = len(data)
            if left >= size:
                self._rec_left = left - size  # all of it inside the record under way
            elif left + 5 <= size and not self._rec_head:
                end = left + 5 + ((data[left + 3] << 8) | data[left + 4])
                if end >= size:
                    self._rec_left = end - size  # the common case: the read ends in (or with) the next record
                else:
                    self._track(data)
            else:
                self._track(data)
        else:
            if self.state is not HANDSHAKING:
                return b""  # failed or closed: what the peer sends now is ignored, not kept
            if data:
                self._in.write(data)
                self._track(data)
            self._handshake()
            if not self.established:
                return b""
        try:
            out = self._read(self.read_size)
        except ssl.SSLWantReadError:
            return b""
        except ssl.SSLZeroReturnError:
            self._peer_closed()
            return b""
        except ssl.SSLError as exc:
            self._fail(classify_error(exc, hello_seen=True), exc)
            return b""
        except Exception as exc:  # noqa: BLE001 - no call raises for what the peer sent: a reason instead
            self._fail(INTERNAL, exc)
            return b""
        if not out:
            self._peer_closed()
            return b""
        if not self._in.pending and len(out) < self.read_size:
            return out  # the common case: one read took everything (nothing fed is left, no record was cut)
        return self._read_more(out)

    def _track(self, data: bytes) -> None:
        """Follow the record headers (5 bytes, the length in the last two) over ``data``."""
        if self._rec_head:
            data = self._rec_head + data
            self._rec_head = b""
            pos = 0
        else:
            pos = self._rec_left
        end = len(data)
        while pos + 5 <= end:
            pos += 5 + ((data[pos + 3] << 8) | data[pos + 4])
        if pos < end:
            self._rec_head = data[pos:]
            self._rec_left = 0
        else:
            self._rec_left = pos - end

    def _read_more(self, first: bytes) -> bytes:
        chunks = [first]
        read = self._read
        size = self.read_size
        while True:
            try:
                out = read(size)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                self._peer_closed()
                break
            except ssl.SSLError as exc:
                self._fail(classify_error(exc, hello_seen=True), exc)
                break  # what decrypted before the bad record is still the peer's
            if not out:
                self._peer_closed()
                break
            chunks.append(out)
        return b"".join(chunks)

    def receive_eof(self) -> None:
        """The socket read end of stream (the peer closed TCP)."""
        if self.state is HANDSHAKING:
            self._fail(EOF, None, "the peer closed the connection during the handshake")
        elif self.state is ESTABLISHED:
            self._fail(TRUNCATED, None, "the peer closed the connection without close_notify")

    def handshake_timed_out(self) -> None:
        """The caller's handshake deadline passed: FAILED as ``timeout`` if still handshaking."""
        if self.state is HANDSHAKING:
            self._fail(TIMEOUT, None, f"no handshake within {self.endpoint.handshake_timeout} s")

    # ------------------------------------------------------------------ bytes out

    def send(self, data: bytes) -> bytes:
        """Plaintext in; the ciphertext to write out (with anything pending before it).

        Before the handshake ends the plaintext is held (the result is then only handshake bytes,
        often b""); once the session failed or closed it is dropped."""
        if self.established:
            if data:
                try:
                    n = self._write(data)
                    if n < len(data):  # not with a memory BIO (it grows), but never lose the rest
                        view = memoryview(data)
                        while n < len(view):
                            view = view[n:]
                            n = self._write(view)
                except ssl.SSLError as exc:
                    self._fail(classify_error(exc, hello_seen=True), exc)
            return self._out_read()
        if self.state is HANDSHAKING and data:
            self._held.append(data)
        return self._out_read()

    def close(self) -> bytes:
        """Start an orderly close (close_notify); returns the bytes to write before closing the socket."""
        if self.state is ESTABLISHED:
            try:
                self._obj.unwrap()
            except ssl.SSLWantReadError:
                pass  # the peer's close_notify has not come: not waited for
            except ssl.SSLError as exc:
                self._fail(classify_error(exc, hello_seen=True), exc)
                return self._out_read()
            self.state = CLOSED
            self.established = False
        elif self.state is HANDSHAKING:
            # Ended by the caller (shutdown, eviction): not a handshake failure, no reason to count.
            self.state = CLOSED
            self._held = []
        return self._out_read()

    # ------------------------------------------------------------------ inside

    def _handshake(self) -> None:
        try:
            self._obj.do_handshake()
        except ssl.SSLWantReadError:
            return
        except ssl.SSLError as exc:
            self._fail(classify_error(exc, hello_seen=self._obj.cipher() is not None), exc)
            return
        except Exception as exc:  # noqa: BLE001 - whatever OpenSSL raised, the caller gets a reason, not a crash
            self._fail(INTERNAL, exc)
            return
        der = self._obj.getpeercert(binary_form=True)
        ep = self.endpoint
        if der is not None:
            try:
                self.peer = peer_identity(der)
            except ValueError as exc:  # OpenSSL took it but cryptography cannot read it
                self._fail(BAD_CERTIFICATE, exc)
                return
        if ep.pin is not None and (der is None or not hmac.compare_digest(hashlib.sha256(der).digest(), ep.pin)):
            self._fail(PIN_MISMATCH, None, "the switch's certificate is not the pinned one (sha256 "
                       f"{self.peer.sha256 if self.peer else 'none'})")
            return
        if ep.client_names:
            names = self.peer.names() if self.peer is not None else ()
            if not any(n.lower() in ep.client_names for n in names):
                self._fail(BAD_NAME, None, f"client certificate names {list(names)} are not allowed")
                return
        self.state = ESTABLISHED
        self.established = True
        if self._held:
            held, self._held = self._held, []
            for data in held:
                self._write(data)

    def _peer_closed(self) -> None:
        """close_notify received: answer it (the reply is in ``data_to_send``) and end."""
        if self.state is ESTABLISHED:
            try:
                self._obj.unwrap()
            except ssl.SSLError:
                pass  # the reply could not be made: the connection ends anyway
        self.state = CLOSED
        self.established = False

    def _fail(self, reason: str, exc: BaseException | None, detail: str = "") -> None:
        self.state = FAILED
        self.established = False
        self.reason = reason
        self._held = []
        if exc is not None:
            detail = getattr(exc, "verify_message", None) or getattr(exc, "reason", None) or str(exc) or type(exc).__name__
        self.detail = detail
