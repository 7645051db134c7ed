"""Configuration: one TOML file, validated at start into frozen objects.

Every setting documents its default and unit here, and the README's
configuration reference is checked against these models by a test. A bad file
is refused with the file, the key path and the reason; on SIGHUP a bad file is
refused the same way and the running configuration stays.

Nothing here opens a socket or imports trio.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.fields import FieldInfo

from .core.routing import RouteRule, RouteTable
from .datafiles import parse_toml, read_text, validate

ResponseCode = str


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _code(v: str) -> str:
    if len(v) != 2 or not v.isalnum():
        raise ValueError("a response code is 2 characters, e.g. '91'")
    return v


def _ip_address(host: str) -> str:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if host != "localhost":
            raise ValueError("give an IP address (e.g. 127.0.0.1, ::1, 0.0.0.0)") from None
    return host


class WireConfig(_Model):
    """How one side speaks: dialect and framing."""

    dialect: str = Field("iso87ascii", description="dialect name from specs/dialects, or a .toml path")
    framing: str = Field("ascii4", description="length header: ascii4, binary2, binary2r, bcd2, binary4")
    length_includes_header: bool = Field(False, description="the length counts the length header (and TPDU/header) too")
    tpdu: bool = Field(False, description="a 5-byte TPDU follows the length header; replies swap its addresses")
    header: str = Field("", description="a fixed header (hex) that follows the length header")
    tpdu_value: str = Field("6000000000", description="TPDU (hex, 5 bytes) on messages this side starts, e.g. to a switch")
    max_frame: int = Field(8192, ge=64, le=1 << 20, description="largest message accepted, bytes")

    @field_validator("header")
    @classmethod
    def _hex(cls, v: str) -> str:
        try:
            bytes.fromhex(v)
        except ValueError:
            raise ValueError("header must be hex") from None
        return v

    @field_validator("tpdu_value")
    @classmethod
    def _tpdu(cls, v: str) -> str:
        try:
            raw = bytes.fromhex(v)
        except ValueError:
            raise ValueError("tpdu_value must be hex") from None
        if len(raw) != 5 or raw[0] != 0x60:
            raise ValueError("a TPDU is 5 bytes starting with 60")
        return v



def _file_list(v: object) -> object:
    """One file may be written as a string; a list stays a list."""
    return [v] if isinstance(v, str) else v


def _non_empty(key: str, values: list[str]) -> list[str]:
    if not all(values):
        raise ValueError(f"{key}: empty entries are not file names")
    return values


class ListenerTlsConfig(_Model):
    """``[listeners.tls]``: TLS on a front-end listener (docs/tls.md). Paths as written (a relative
    one from the working directory, like the journal's)."""

    cert_chain: str = Field(min_length=1, description="PEM: the listener's certificate, then its intermediates")
    key: str = Field(min_length=1, description="PEM: its private key, unencrypted (the file's permissions protect it)")
    client_ca: list[str] = Field(default_factory=list, description="PEM files of the CAs that may sign client certificates")
    client_certs: Literal["required", "optional", "none"] = Field(
        "none", description='"required", "optional" (a client without one is known by its address) or "none"')
    client_names: list[str] = Field(
        default_factory=list, description='names a client certificate must carry one of (CN or SAN, any case); '
        'empty: any the CA signed; needs client_certs = "required"')
    handshake_timeout: float = Field(10.0, gt=0, allow_inf_nan=False, description="seconds from the TCP accept to the end of the handshake")
    minimum_version: Literal["1.2", "1.3"] = Field("1.2", description='"1.2" or "1.3"')
    ciphers: str | None = Field(None, min_length=1, description="OpenSSL cipher string for TLS 1.2; absent: OpenSSL's defaults")

    @field_validator("client_ca", "client_names", mode="before")
    @classmethod
    def _lists(cls, v: object) -> object:
        return _file_list(v)

    @model_validator(mode="after")
    def _shape(self) -> "ListenerTlsConfig":
        _non_empty("client_ca", self.client_ca)
        _non_empty("client_names", self.client_names)
        if self.client_certs != "none" and not self.client_ca:
            raise ValueError(f'client_ca is required when client_certs is "{self.client_certs}"')
        if self.client_names and self.client_certs != "required":
            raise ValueError('client_names needs client_certs = "required"')
        return self


class UpstreamTlsConfig(_Model):
    """``[upstreams.tls]``: TLS on the links to a switch (docs/tls.md). Trust ``ca`` (with
    ``server_name``), ``pin_sha256``, or both."""

    ca: list[str] = Field(default_factory=list, description="PEM files of the CAs that sign the switch's certificate")
    server_name: str | None = Field(None, min_length=1, description="the name the switch's certificate must carry (also sent as SNI); required with ca")
    pin_sha256: str | None = Field(None, description="SHA-256 fingerprint of the switch's own certificate (hex, colons allowed): that one only")
    cert_chain: str | None = Field(None, min_length=1, description="PEM: our client certificate (then intermediates), if the switch asks for one")
    key: str | None = Field(None, min_length=1, description="PEM: its private key")
    handshake_timeout: float = Field(10.0, gt=0, allow_inf_nan=False, description="seconds from the TCP connect to the end of the handshake")
    minimum_version: Literal["1.2", "1.3"] = Field("1.2", description='"1.2" or "1.3"')
    ciphers: str | None = Field(None, min_length=1, description="OpenSSL cipher string for TLS 1.2; absent: OpenSSL's defaults")

    @field_validator("ca", mode="before")
    @classmethod
    def _lists(cls, v: object) -> object:
        return _file_list(v)

    @field_validator("pin_sha256")
    @classmethod
    def _pin(cls, v: str | None) -> str | None:
        if v is None:
            return v
        digits = v.replace(":", "").replace(" ", "").strip()
        try:
            pin = bytes.fromhex(digits)
        except ValueError:
            raise ValueError("pin_sha256 is not hexadecimal") from None
        if len(pin) != 32:
            raise ValueError(f"pin_sha256 must be 32 bytes (64 hex digits), not {len(pin)}")
        return v

    @model_validator(mode="after")
    def _shape(self) -> "UpstreamTlsConfig":
        _non_empty("ca", self.ca)
        if not self.ca and self.pin_sha256 is None:
            raise ValueError("a CA bundle (ca) or a pinned certificate (pin_sha256) is required")
        if self.ca and not self.server_name:
            raise ValueError("server_name is required with ca (the name the switch's certificate must carry)")
        if (self.cert_chain is None) != (self.key is None):
            raise ValueError("cert_chain and key go together")
        return self


class MacConfig(_Model):
    """MACs on one hop (field 64, or 128 with a secondary bitmap): verified on what the gateway
    receives there, generated on what it sends there. The key is a label in the security module."""

    key: str = Field(min_length=1, description="label of the MAC key in the security module ([security])")
    padding: Literal[1, 2] = Field(1, description="ISO 9797-1 padding method: 1 (zeros, usual for ISO 8583) or 2")
    failure_code: str = Field("63", description="answer to a front end's request whose MAC is missing or wrong (listeners only)")
    zone_key: str = Field("", description="label of the zone key the switch sends new MAC keys under (upstreams only; the dialect's [key_change] says where); empty: key changes are refused")
    algorithm: Literal["retail", "aes-cmac"] = Field("retail", description="algorithm of the MAC keys the switch sends (upstreams only)")


class ClientConfig(_Model):
    """One identified front end of a listener and the ids it may use (empty lists: any)."""

    identity: str = Field(min_length=1, description='"cert:<name>" (TLS client certificate: CN, else the first DNS name) or "addr:<ip>"')
    acquirers: list[str] = Field(default_factory=list, description="DE 32 values it may send")
    merchants: list[str] = Field(default_factory=list, description="DE 42 values it may send")
    terminals: list[str] = Field(default_factory=list, description="DE 41 values it may send")


class ListenerConfig(WireConfig):
    """A front-end listener. Defaults: see each field."""

    name: str = Field(description="label used in logs and metrics")
    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(ge=0, le=65535, description="TCP port; 0 picks a free one")
    rules: str = Field("default", description="validation rule set from specs/rules, or a .toml path")
    max_connections: int = Field(
        2000, ge=1, description="open connections; when full, one with no request in flight is closed to make room "
        "(never-used ones first, then the longest idle; only when every one has a request in flight is the new one "
        "closed)")
    # Why 200: a front end's connection pool is tens of connections, so 200 leaves it room to
    # spare, and at a tenth of the default max_connections no single address can hold the
    # listener (it takes ten, and even then idle connections are closed to make room).
    max_connections_per_source: int = Field(
        200, ge=1, description="open connections from one peer address (IPv6: one /64); more are accepted, counted and closed")
    max_in_flight: int = Field(64, ge=1, description="requests in flight per connection before reading pauses")
    idle_timeout: float = Field(300.0, gt=0, description="seconds without a frame before a connection is closed")
    partial_frame_timeout: float = Field(5.0, gt=0, description="seconds a frame may take to complete, from its first byte")
    send_timeout: float = Field(10.0, gt=0, description="seconds a send to a front end may block before it is dropped")
    tls: ListenerTlsConfig | None = Field(None, description="TLS on this listener: the [listeners.tls] keys below; absent: plaintext")
    mac: MacConfig | None = Field(None, description="MACs with front ends ([listeners.mac]: key, padding, failure_code); none when absent")
    clients: list[ClientConfig] = Field(default_factory=list, description="identified front ends ([[listeners.clients]]: identity, acquirers, merchants, terminals); when given, a request from any other identity, or for ids outside its own, is refused with client_refusal_code")
    client_refusal_code: str = Field("58", description="answer to a request from an unknown front end, or for ids outside its own")

    @field_validator("host")
    @classmethod
    def _host(cls, v: str) -> str:
        return _ip_address(v)


class HostConfig(_Model):
    host: str
    port: int = Field(ge=1, le=65535)


class UpstreamConfig(WireConfig):
    """A bank switch: hosts tried in order (failover), N connections kept open."""

    name: str = Field(description="label used in routes, logs and metrics")
    hosts: list[str] = Field(min_length=1, description='"host:port" entries in failover order')
    connections: int = Field(1, ge=1, le=64, description="connections kept open to the active host")
    connect_timeout: float = Field(5.0, gt=0, description="seconds for TCP connect (docs/domain.md §3.6: about 5 s)")
    reconnect_initial: float = Field(0.5, gt=0, description="first reconnect delay, seconds; doubles each failure")
    reconnect_max: float = Field(30.0, gt=0, description="longest reconnect delay, seconds (jitter: up to +25%)")
    sign_on: bool = Field(False, description="send 0800 sign-on and carry traffic only after 0810 with 00")
    sign_on_timeout: float = Field(5.0, gt=0, description="seconds to wait for the sign-on 0810")
    sign_off: bool = Field(True, description="send 0800 sign-off on shutdown when signed on")
    echo_interval: float = Field(30.0, ge=0, description="write-idle seconds before an echo 0800; 0 disables")
    echo_timeout: float = Field(5.0, gt=0, description="seconds to wait for an echo 0810")
    echo_misses: int = Field(2, ge=1, description="missed echoes in a row before the link is reconnected")
    max_in_flight: int = Field(2000, ge=1, description="requests in flight per connection; more go elsewhere or get 91")
    match_fields: list[int] = Field(
        default_factory=list,
        description="fields besides MTI class and STAN that a response must echo to match (e.g. [41, 7])",
    )
    network_codes: dict[str, str] = Field(
        default_factory=lambda: {"sign_on": "001", "sign_off": "002", "echo": "301"},
        description="DE 70 values: verify with the switch",
    )
    institution_id: str = Field("", description="DE 32 for messages the gateway originates (0800); empty: none")
    reversal_mti: Literal["0420", "0400"] = Field("0420", description="what a timeout reversal is sent as; repeats are 0421/0401")
    reversal_stan: Literal["new", "original"] = Field(
        "new", description="a reversal's DE 11: a new STAN, or the original's (verify with the switch)")
    reversal_timeout: float = Field(10.0, gt=0, description="seconds to wait for a reversal's 0430/0410 before the attempt counts as unanswered and a repeat is scheduled; a later 0430/0410 still completes it")
    reversal_codes: dict[str, str] = Field(
        default_factory=lambda: {"timeout": "68", "link_lost": "68", "in_doubt": "68", "undeliverable": "68"},
        description="DE 39 sent in a reversal, by why it is sent (68: response received too late); verify with the switch",
    )
    saf_first_delay: float = Field(1.0, ge=0, description="seconds a new reversal waits before its first attempt (a late decline can still cancel it)")
    saf_retry_initial: float = Field(5.0, gt=0, description="seconds before the first repeat; doubles each time")
    saf_retry_max: float = Field(300.0, gt=0, description="longest wait between repeats, seconds")
    saf_budget: int = Field(6, ge=1, description="attempts before a reversal is parked for an operator (PayEx: 6)")
    saf_window: int = Field(16, ge=1, description="reversals in flight at once on this upstream")
    tls: UpstreamTlsConfig | None = Field(None, description="TLS on the links: the [upstreams.tls] keys below; absent: plaintext")
    mac: MacConfig | None = Field(None, description="MACs with this switch ([upstreams.mac]: key, padding); none when absent")

    @field_validator("hosts")
    @classmethod
    def _hosts(cls, v: list[str]) -> list[str]:
        for h in v:
            host, _, port = h.rpartition(":")
            if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
                raise ValueError(f"{h!r} is not host:port")
            _ip_address(host.strip("[]"))
        return v

    def host_list(self) -> list[HostConfig]:
        out = []
        for h in self.hosts:
            host, _, port = h.rpartition(":")
            out.append(HostConfig(host=host.strip("[]"), port=int(port)))
        return out


class RouteConfig(_Model):
    """A route: every given criterion must match; the longest matching BIN prefix wins."""

    name: str = Field(description="label used in logs")
    upstream: str = Field(description="name of an [[upstreams]] entry")
    mti: list[str] = Field(default_factory=list, description="MTIs this route carries; empty: any")
    bins: list[str] = Field(default_factory=list, description='PAN prefixes ("4", "510000") or ranges ("510000-559999")')
    currencies: list[str] = Field(default_factory=list, description="DE 49 values; empty: any")
    terminals: list[str] = Field(default_factory=list, description="DE 41 values; empty: any")
    merchants: list[str] = Field(default_factory=list, description="DE 42 values; empty: any")
    timeout: float = Field(30.0, gt=0, le=600, description="seconds to wait for the switch (docs/domain.md §3.6)")


class RoutingConfig(_Model):
    no_route_code: str = Field("92", description="answer when no route matches")
    unknown_bin_code: str = Field("15", description="answer when the PAN's BIN is in no route; '' uses no_route_code")

    @field_validator("no_route_code")
    @classmethod
    def _codes(cls, v: str) -> str:
        return _code(v)

    @field_validator("unknown_bin_code")
    @classmethod
    def _bin_code(cls, v: str) -> str:
        return v if v == "" else _code(v)


class GatewayConfig(_Model):
    name: str = Field("iso-gateway", description="node name in logs")
    timeout_code: str = Field("91", description="answer to the front end when the switch does not answer in time (or 68)")
    unavailable_code: str = Field("91", description="answer when no upstream link can carry the request")
    drain_timeout: float = Field(10.0, gt=0, description="seconds SIGTERM waits for in-flight requests")
    local_network_management: bool = Field(True, description="answer front-end 0800 locally with 0810")
    duplicate_window: float = Field(300.0, ge=0, description="seconds a repeated front-end request (same 41, 42, 11, 7, 4, 37) is recognised; 0 disables")
    unknown_original_code: str = Field("25", description="answer to a front-end reversal whose original is not in the journal")
    amount_mismatch_code: str = Field("64", description="answer to a front-end reversal whose amount differs from the original's")
    duplicate_in_flight: Literal["wait", "94"] = Field(
        "wait", description="a duplicate of a request still in flight: answered when the first completes, or 94 at once")

    @field_validator("timeout_code", "unavailable_code", "unknown_original_code", "amount_mismatch_code")
    @classmethod
    def _codes(cls, v: str) -> str:
        return _code(v)


class JournalConfig(_Model):
    enabled: bool = Field(True, description="journal every transaction before it is sent; false keeps reversals in memory only (for measurement)")
    path: str = Field("var/journal.sqlite3", description="SQLite file (WAL mode), created when missing")
    synchronous: Literal["NORMAL", "FULL"] = Field("NORMAL", description="NORMAL survives a process crash; FULL also a power loss")
    key_file: str = Field(
        "var/pan.key", description="an older version's PAN key file (or ISO_GATEWAY_PAN_KEY): when present, imported "
        "once into the security module as a retired data key, so what it sealed stays readable; never created "
        "(keys are in [security])")
    max_batch: int = Field(1000, ge=1, description="operations committed together at most")
    indexer: Literal["process", "thread"] = Field(
        "process", description="where the write-ahead log is written into SQLite: a child process (off the "
        "event loop's core) or the journal thread")
    # The indexer writes a segment every 0.2 s within milliseconds: 50 waiting is 10 s of traffic
    # not yet in SQLite, which a healthy indexer never reaches (a restarted one catches up in
    # about a second), while front-end reversals already wait for it and a restart's replay grows.
    max_log_segments: int = Field(
        50, ge=1, description="log segments waiting for the indexer past which /readyz fails and the "
        "IsoGatewayJournalIndexerBehind alert fires")
    # Two days, as recovery looks back (RECOVERY_WINDOW): a reversal must reach the switch within
    # 24 h, so past that no reversal, recovered or sent by a front end, can need the card data.
    reversal_data_window: float = Field(
        172800.0, ge=3600, description="seconds a transaction keeps its sealed reversal fields (the "
        "encrypted PAN among them) after it was received, and a reversal its sealed message after it was "
        "acknowledged or cancelled; then they are erased, unless a reversal of it is still owed")
    # 90 days: an operator can still look up a transaction of last quarter with `journal find`
    # (disputes come weeks later), and the file stops growing. The switch keeps the record of account.
    retention: float = Field(
        90.0, gt=0, description="days a journal row (transaction or finished reversal) is kept; older ones are "
        "deleted by a purge that runs every ten minutes, except those a reversal still owes")
    # PostgreSQL: several nodes share one database (docs/postgresql.md).
    backend: Literal["sqlite", "postgresql"] = Field(
        "sqlite", description="where the journal lives: sqlite (the embedded file at path) or postgresql (one "
        "database several gateway nodes share, at dsn)")
    dsn: str = Field("", description="postgresql: the libpq DSN or postgresql:// URI, without the password "
                     '(e.g. "host=db1 dbname=iso_gateway user=gateway sslmode=verify-full")')
    password_file: str = Field("", description="postgresql: a file (mode 0600) whose first line is the password")
    password_env: str = Field("", description="postgresql: an environment variable holding the password (wins over password_file)")
    node: str = Field("", description="postgresql: this node's id, unique among the nodes sharing the database; empty: the host name")
    db_timeout: float = Field(
        2.0, gt=0, le=60, description="postgresql: seconds a journal write may wait for a connection or a statement "
        "before the requests in it are answered 96 (never sent) and the writes that must land are kept and retried")
    heartbeat_interval: float = Field(2.0, gt=0, description="postgresql: seconds between this node's heartbeats")
    node_ttl: float = Field(
        10.0, gt=0, description="postgresql: seconds without a heartbeat after which a node counts as dead and a "
        "survivor takes over its in-doubt transactions (and reverses them)")
    lease_seconds: float = Field(
        20.0, gt=0, description="postgresql: seconds a node's lease on a reversal it sends lasts (renewed while it "
        "works on it); a dead node's reversals are sent by another node once their leases run out")
    start_timeout: float = Field(30.0, gt=0, description="postgresql: seconds a starting node waits for the database (migrations, its node slot) before it gives up")

    @model_validator(mode="after")
    def _backend(self) -> "JournalConfig":
        if self.backend == "postgresql" and self.enabled and not self.dsn:
            raise ValueError("backend = \"postgresql\" needs dsn")
        if self.heartbeat_interval * 2 > self.node_ttl:
            raise ValueError("node_ttl must be at least twice heartbeat_interval")
        return self


class SecurityConfig(_Model):
    """The security module that holds the gateway's keys (docs/security.md)."""

    module: Literal["software", "pkcs11"] = Field(
        "software", description="software: a key file wrapped under a key-encrypting key (KEK); pkcs11: a PKCS#11 "
        "token (an HSM; SoftHSM2 for development)")
    key_file: str = Field("", description="software: the wrapped key file; empty: keys.bin in the state directory "
                          "(the journal's folder)")
    kek_file: str = Field(
        "", description="software: file holding the KEK (64 hex digits, owner-only), outside the state directory; "
        "ISO_GATEWAY_KEK overrides; empty: $XDG_CONFIG_HOME/iso-gateway/kek.hex (~/.config/...), for development")
    create: bool = Field(True, description="software: when the key file is missing, create it (and a missing KEK "
                         "file with it); false for production, where both must exist (iso-gateway keys init)")
    library: str = Field("", description="pkcs11: the PKCS#11 library; empty: SoftHSM2's, when installed (development)")
    token_label: str = Field("iso-gateway", description="pkcs11: the token's label")
    pin_file: str = Field("", description="pkcs11: file holding the user PIN (owner-only, outside the state "
                          "directory); ISO_GATEWAY_PKCS11_PIN overrides")


class LogConfig(_Model):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="DEBUG, INFO, WARNING or ERROR")
    format: Literal["text", "json"] = Field("text", description="text for people, json for log shippers")
    file: str = Field("", description="log file; empty: stderr")


class MetricsConfig(_Model):
    enabled: bool = Field(True, description="serve metrics over HTTP")
    host: str = Field("127.0.0.1", description="address of the /metrics, /healthz, /readyz endpoint")
    port: int = Field(9108, ge=0, le=65535, description="port of that endpoint; 0 picks a free one")
    # Why 1024: Prometheus keeps one connection per target and a prober one per probe, so a
    # few suffice for honest clients; the cap is for a flood. A connection here costs a task
    # and a small buffer on the endpoint's own loop (renders are limited apart), so 1024 cost
    # a few megabytes, and a flood of silent connections that size is served (and closed at
    # header_timeout) beside the probes: with a cap of 64, 1,000 silent connections kept
    # /healthz waiting in the listen queue for 75 s. Past the cap, connections wait there.
    max_connections: int = Field(1024, ge=1, description="connections the endpoint serves at once; more wait in the listen queue")
    # Why 5 s: a scraper or prober sends its whole request at once, in well under a second;
    # 5 s is generous on a slow network and still frees a slot held by a client that never
    # finishes (or never starts) its request soon.
    header_timeout: float = Field(5.0, gt=0, description="seconds a request's headers may take, from the connection (or the previous answer) on")
    # Why 10 s: a scrape's answer is a few hundred kilobytes at most, sent in milliseconds to
    # a client that reads; a client that reads nothing for 10 s is gone or hostile.
    send_timeout: float = Field(10.0, gt=0, description="seconds an answer may take to be sent before the connection is closed")
    # Why 1024: room for a burst of about a thousand scrapes or probes arriving at once to
    # wait their turn, instead of being dropped and retried (the kernel caps it at somaxconn).
    backlog: int = Field(1024, ge=1, le=65535, description="the listen queue: connections waiting to be served")


class Config(_Model):
    gateway: GatewayConfig = GatewayConfig()
    routing: RoutingConfig = RoutingConfig()
    journal: JournalConfig = JournalConfig()
    security: SecurityConfig = SecurityConfig()
    log: LogConfig = LogConfig()
    metrics: MetricsConfig = MetricsConfig()
    listeners: list[ListenerConfig] = Field(min_length=1)
    upstreams: list[UpstreamConfig] = Field(min_length=1)
    routes: list[RouteConfig] = Field(min_length=1)
    dialect_dirs: list[str] = Field(default_factory=list, description="extra folders searched for dialect files")
    rule_dirs: list[str] = Field(default_factory=list, description="extra folders searched for rule files")

    @model_validator(mode="after")
    def _references(self) -> "Config":
        names = [u.name for u in self.upstreams]
        if len(set(names)) != len(names):
            raise ValueError("upstream names must be unique")
        lnames = [lst.name for lst in self.listeners]
        if len(set(lnames)) != len(lnames):
            raise ValueError("listener names must be unique")
        for i, r in enumerate(self.routes):
            if r.upstream not in names:
                raise ValueError(f"routes[{i}] ({r.name}) names upstream {r.upstream!r}, which is not defined")
        return self


def parse_config(text: str, source: str) -> Config:
    return validate(Config, parse_toml(text, source), source)


def load_config(path: str | Path) -> Config:
    return parse_config(read_text(path), str(path))


# --------------------------------------------------------------------------- reference


def route_table(routes: Sequence[RouteConfig], routing: RoutingConfig, source: str = "config") -> RouteTable:
    """The core's RouteTable from the ``[[routes]]`` and ``[routing]`` sections, as plain values."""
    rules = [
        RouteRule(r.name, r.upstream, float(r.timeout), tuple(r.mti), tuple(r.bins), tuple(r.currencies),
                  tuple(r.terminals), tuple(r.merchants))
        for r in routes
    ]
    return RouteTable(rules, routing.no_route_code, routing.unknown_bin_code, source=source)


def _default_text(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    if value is None:
        return "absent"
    if isinstance(value, BaseModel):
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, dict):
        return "{" + ", ".join(f'{k} = "{v}"' for k, v in value.items()) + "}"
    return str(value)


def reference_markdown() -> str:
    """The configuration reference table for the README, made from the models themselves."""
    sections: list[tuple[str, type[BaseModel]]] = [
        ("[gateway]", GatewayConfig),
        ("[routing]", RoutingConfig),
        ("[journal]", JournalConfig),
        ("[security]", SecurityConfig),
        ("[log]", LogConfig),
        ("[metrics]", MetricsConfig),
        ("[[listeners]]", ListenerConfig),
        ("[listeners.tls]", ListenerTlsConfig),
        ("[[upstreams]]", UpstreamConfig),
        ("[upstreams.tls]", UpstreamTlsConfig),
        ("[listeners.mac], [upstreams.mac]", MacConfig),
        ("[[listeners.clients]]", ClientConfig),
        ("[[routes]]", RouteConfig),
        ("top level", Config),
    ]
    lines = []
    for title, model in sections:
        lines.append(f"**{title}**")
        lines.append("")
        lines.append("| key | default | meaning |")
        lines.append("|---|---|---|")
        for name, field in model.model_fields.items():
            if isinstance(field.get_default(call_default_factory=True), BaseModel):
                continue
            if model is Config and name in ("listeners", "upstreams", "routes"):
                continue
            lines.append(f"| `{name}` | {_default_text(field)} | {field.description or ''} |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"
