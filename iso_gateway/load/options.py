"""What a load run is asked to do: ``LoadOptions``, one documented field per knob.

Plain data (picklable: worker processes get a copy each); ``split`` shares a
run out over processes. Nothing here touches a socket.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ..core.errors import ConfigError
from ..security.mac import MacError, mac_key

__all__ = ["DEFAULT_DURATION", "LoadOptions", "parse_target"]

# A run given neither --duration nor --count lasts this long, in seconds.
DEFAULT_DURATION = 10.0
# Requests in flight per connection when none is given. Closed loop: 8, a
# pipelining front end's usual window. Open loop: 64, the gateway listener's
# max_in_flight default, past which the gateway stops reading anyway.
DEFAULT_IN_FLIGHT_CLOSED = 8
DEFAULT_IN_FLIGHT_OPEN = 64
# The load generator plays the front end, whose timeout sits above the
# gateway's (30-45 s) so that the gateway's own 91 arrives first (docs/domain.md §3.6).
DEFAULT_TIMEOUT = 60.0
# TCP connect budget (docs/domain.md §3.6: about 5 s before failing over).
DEFAULT_CONNECT_TIMEOUT = 5.0


def parse_target(text: str) -> tuple[str, int]:
    """HOST:PORT (or [IPv6]:PORT) -> (host, port); ConfigError when it isn't one."""
    host, sep, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError("load", "--target", "give HOST:PORT, e.g. 127.0.0.1:9583")
    return host, int(port)


def _positive(name: str, value: float | None, *, integer: bool = False, zero: bool = False) -> None:
    if value is None:
        return
    ok = isinstance(value, int) if integer else isinstance(value, (int, float)) and math.isfinite(value)
    if isinstance(value, bool) or not ok or value < 0 or (value == 0 and not zero):
        kind = "whole number" if integer else "number"
        raise ConfigError("load", name, f"must be a {kind}{', 0 or more' if zero else ' over 0'}")


@dataclass(frozen=True)
class LoadOptions:
    """One load run. Every field but the target has a default."""

    # Address of the host under load (a gateway, a switch, the simulator).
    host: str
    port: int
    # Dialect name from specs/dialects or a .toml path. The default is iso87ascii.
    dialect: str = "iso87ascii"
    # Length-header framing: ascii4, binary2, binary2r, bcd2, binary4. The default is ascii4.
    framing: str = "ascii4"
    # Whether the length header counts itself. The default is False.
    length_includes_header: bool = False
    # Whether a 5-byte TPDU (60 0001 0000) follows the length header. The default is False.
    tpdu: bool = False
    # Message mix: a name from specs/load or a .toml path. The default is ecom.
    mix: str = "ecom"
    # TCP connections per run (shared out over the processes). The default is 1.
    connections: int = 1
    # Requests in flight per connection: the window in closed loop, a cap in open loop
    # (a request over the cap waits, and the wait counts in its latency). None: 8 closed, 64 open.
    in_flight: int | None = None
    # Open loop at this many requests/s on a fixed schedule; None (the default) runs closed loop.
    rate: float | None = None
    # Seconds of measured load after the warm-up. The default is 10 s unless count is given.
    duration: float | None = None
    # Exact number of measured requests (after the warm-up) instead of a duration.
    count: int | None = None
    # Seconds of load before measuring starts; their requests are left out of every figure. The default is 0.
    warmup: float = 0.0
    # Seconds a request may wait for its answer before it counts as a timeout. The default is 60 s.
    timeout: float = DEFAULT_TIMEOUT
    # Seconds a TCP connect may take. The default is 5 s.
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    # Worker processes, each with its own connections and share of the rate and count. The default is 1.
    processes: int = 1
    # Seed of the message pool (PANs, amounts, order); None (the default) picks one, reported in the result.
    seed: int | None = None
    # TLS on every connection. The default is False (plaintext).
    tls: bool = False
    # PEM files of the CAs the target's certificate must chain to; empty (the default) verifies
    # nothing (measurement against a throwaway certificate only).
    tls_ca: tuple[str, ...] = ()
    # The name the target's certificate must carry (and SNI); needed with tls_ca. The default is None.
    tls_server_name: str | None = None
    # Our client certificate and key (PEM), for a target that asks for one. The default is None.
    tls_cert: str | None = None
    tls_key: str | None = None
    # A MAC on every request (field 64, or 128 past 64) under this key, in clear: for test and
    # benchmark keys only. The default is None (no MAC).
    mac_key: bytes | None = None
    # The MAC's algorithm: "retail" (ISO 9797-1 algorithm 3, a 16-byte TDES key) or "aes-cmac".
    mac_algorithm: str = "retail"

    def __post_init__(self) -> None:
        if not isinstance(self.port, int) or not 0 < self.port < 65536:
            raise ConfigError("load", "port", "must be 1 to 65535")
        _positive("connections", self.connections, integer=True)
        _positive("in_flight", self.in_flight, integer=True)
        _positive("rate", self.rate)
        _positive("duration", self.duration)
        _positive("count", self.count, integer=True)
        _positive("warmup", self.warmup, zero=True)
        _positive("timeout", self.timeout)
        _positive("connect_timeout", self.connect_timeout)
        _positive("processes", self.processes, integer=True)
        if self.duration is not None and self.count is not None:
            raise ConfigError("load", "duration", "give a duration or a count, not both")
        if self.count is not None and self.count < self.processes:
            raise ConfigError("load", "count", "must be at least the number of processes")
        if self.tls_ca and not self.tls_server_name:
            raise ConfigError("load", "tls_server_name", "give the name the target's certificate carries with tls_ca")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("load", "tls_key", "give tls_cert and tls_key together")
        if self.mac_key is not None:
            try:
                mac_key(self.mac_algorithm, self.mac_key)
            except (ValueError, MacError) as exc:
                raise ConfigError("load", "mac_key", str(exc)) from None
        if self.processes > self.connections:
            raise ConfigError("load", "processes", "each process needs a connection of its own: give at least as many connections")

    @property
    def target(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def open_loop(self) -> bool:
        return self.rate is not None

    @property
    def window(self) -> int:
        """Requests in flight per connection, defaults applied."""
        if self.in_flight is not None:
            return self.in_flight
        return DEFAULT_IN_FLIGHT_OPEN if self.open_loop else DEFAULT_IN_FLIGHT_CLOSED

    @property
    def measured_duration(self) -> float | None:
        """Seconds of measured load, or None for a run of ``count`` requests."""
        if self.count is not None:
            return None
        return self.duration if self.duration is not None else DEFAULT_DURATION

    def split(self) -> list["LoadOptions"]:
        """One LoadOptions per process: connections dealt out, rate and count in proportion (exactly)."""
        n = self.processes
        conns = [self.connections // n + (1 if i < self.connections % n else 0) for i in range(n)]
        counts: list[int | None] = [None] * n
        if self.count is not None:
            counts = list(_shares(self.count, conns))
        rates = [None if self.rate is None else self.rate * c / self.connections for c in conns]
        return [
            dataclasses.replace(self, connections=conns[i], count=counts[i], rate=rates[i], processes=1)
            for i in range(n)
        ]


def _shares(total: int, weights: list[int]) -> list[int]:
    """``total`` split in proportion to ``weights``, largest remainder: the parts add up exactly."""
    whole = sum(weights)
    exact = [total * w / whole for w in weights]
    parts = [int(x) for x in exact]
    for i in sorted(range(len(weights)), key=lambda i: exact[i] - parts[i], reverse=True)[: total - sum(parts)]:
        parts[i] += 1
    for i, part in enumerate(parts):  # every process gets at least one request
        if part == 0:
            parts[parts.index(max(parts))] -= 1
            parts[i] = 1
    return parts
