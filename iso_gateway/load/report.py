"""What a load run counts, and how it is reported: text for people, JSON for CI.

``Tally`` is what one phase (warm-up or measured) of one process counts.
``LoadResult`` is the measured tally of a run with what the run was, merged
across processes (HdrHistogram encode/decode), with the report formats.
Latencies are recorded in microseconds into an HdrHistogram (1 µs to 1 hour,
3 significant digits: 0.1 % resolution at every scale).

The JSON keys are a contract with CI scripts: ``JSON_SCHEMA`` names the
version; keys are only ever added, and every key is always present (null when
there is nothing to report, such as percentiles of a run with no answer).

Nothing here touches a socket or imports trio.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hdrh.histogram import HdrHistogram

__all__ = ["ERROR_KINDS", "JSON_SCHEMA", "LATENCY_MAX_US", "PERCENTILES", "LoadResult", "Tally", "new_histogram"]

JSON_SCHEMA = "iso-gateway-load/1"

# Latency range of the histograms: 1 µs to one hour; longer values are recorded as one hour.
LATENCY_MAX_US = 3_600_000_000
# Three significant digits: a recorded value is within 0.1 % of the true one.
LATENCY_DIGITS = 3

#: Reported percentiles: JSON key and percentile.
PERCENTILES = (("p50", 50.0), ("p90", 90.0), ("p99", 99.0), ("p99_9", 99.9))

#: Error counters, in report order:
#:   connect_failed  connection attempts that failed (refused, unreachable, over the connect timeout)
#:   disconnects     connections lost while running (closed or reset by the peer, a failed write)
#:   lost            requests in flight on a connection when it was lost: never answered, not timed out
#:   unmatched       responses matching no request in flight (late after a timeout, or a wrong key)
#:   undecodable     frames whose MTI, bitmap or fields 11/39/41 could not be read
#:   frame_errors    connections closed because the byte stream could not be cut into frames
ERROR_KINDS = ("connect_failed", "disconnects", "lost", "unmatched", "undecodable", "frame_errors")


def new_histogram() -> HdrHistogram:
    return HdrHistogram(1, LATENCY_MAX_US, LATENCY_DIGITS)


@dataclass(slots=True)
class Tally:
    """Counts of one phase of one process. Plain fields: the engine bumps them inline."""

    sent: int = 0
    answered: int = 0
    timeouts: int = 0
    codes: dict[str, int] = field(default_factory=dict)  # DE 39 -> answers; "none" when absent
    errors: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ERROR_KINDS, 0))
    latency: HdrHistogram = field(default_factory=new_histogram)  # µs from intended send to answer
    last_answer: float | None = None  # process clock of the last answer

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


def _ms(us: float | None) -> float | None:
    return None if us is None else round(us / 1000.0, 3)


@dataclass
class LoadResult:
    """The measured part of one run (warm-up excluded), merged over its processes."""

    target: str
    dialect: str
    framing: str
    mix: str
    mode: str  # "closed" (as fast as answers come) or "open" (fixed rate)
    rate: float | None  # requests/s asked for in open loop
    connections: int
    in_flight: int
    processes: int
    warmup_s: float
    timeout_s: float
    seed: int
    sent: int
    answered: int
    timeouts: int
    codes: dict[str, int]
    errors: dict[str, int]
    latency: HdrHistogram
    window_s: float  # from the end of warm-up to the last answer (or to the end, with none)
    elapsed_s: float  # the whole run: warm-up, load and drain
    send_lag: HdrHistogram | None = None  # open loop: µs each request went out after its intended time
    aborted: str | None = None  # why the run stopped early, or None
    cpu_s: float = 0.0  # CPU seconds (user + sys) the load generator's processes spent on the run

    # ------------------------------------------------------------------ figures

    @property
    def throughput(self) -> float:
        """Answered requests per second over the measured window."""
        return self.answered / self.window_s if self.window_s > 0 else 0.0

    def percentile_ms(self, p: float) -> float | None:
        if self.latency.get_total_count() == 0:
            return None
        return _ms(self.latency.get_value_at_percentile(p))

    @property
    def max_ms(self) -> float | None:
        return _ms(self.latency.get_max_value()) if self.latency.get_total_count() else None

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    # ------------------------------------------------------------------ JSON

    def to_json(self) -> dict[str, Any]:
        """The report for CI: stable keys (see ``JSON_SCHEMA``), times in ms or s as named."""
        lat: dict[str, float | None] = {k: self.percentile_ms(p) for k, p in PERCENTILES}
        n = self.latency.get_total_count()
        lat["max"] = self.max_ms
        lat["min"] = _ms(self.latency.get_min_value()) if n else None
        lat["mean"] = _ms(self.latency.get_mean_value()) if n else None
        lag = None
        if self.send_lag is not None and self.send_lag.get_total_count():
            lag = {"p99": _ms(self.send_lag.get_value_at_percentile(99.0)), "max": _ms(self.send_lag.get_max_value())}
        return {
            "schema": JSON_SCHEMA,
            "target": self.target,
            "dialect": self.dialect,
            "framing": self.framing,
            "mix": self.mix,
            "mode": self.mode,
            "rate": self.rate,
            "connections": self.connections,
            "in_flight": self.in_flight,
            "processes": self.processes,
            "warmup_s": self.warmup_s,
            "timeout_s": self.timeout_s,
            "seed": self.seed,
            "window_s": round(self.window_s, 6),
            "elapsed_s": round(self.elapsed_s, 6),
            "sent": self.sent,
            "answered": self.answered,
            "timeouts": self.timeouts,
            "response_codes": dict(sorted(self.codes.items())),
            "errors": {k: self.errors.get(k, 0) for k in ERROR_KINDS},
            "throughput_rps": round(self.throughput, 3),
            "latency_ms": lat,
            "latency_count": n,
            "send_lag_ms": lag,
            "aborted": self.aborted,
            "cpu_s": round(self.cpu_s, 3),
        }

    # ------------------------------------------------------------------ text

    def text(self) -> str:
        """The final report for people."""
        loop = f"open loop at {self.rate:,.0f}/s" if self.mode == "open" else "closed loop"
        procs = f"{self.processes} processes x " if self.processes > 1 else ""
        lines = [
            f"iso-gateway load: {self.target} ({self.dialect}, {self.framing}, mix {self.mix}), "
            f"{procs}{self.connections} connection{'s' if self.connections != 1 else ''} x {self.in_flight} in flight, {loop}",
            f"  window     {self.window_s:.2f} s measured"
            + (f" after {self.warmup_s:g} s warm-up" if self.warmup_s else "") + f" ({self.elapsed_s:.2f} s in all)",
            f"  requests   sent {self.sent:,}  answered {self.answered:,}  timeouts {self.timeouts:,}"
            f"  errors {self.error_count:,}",
        ]
        if self.codes:
            total = sum(self.codes.values())
            codes = "  ".join(f"{c} {n:,} ({100.0 * n / total:.1f}%)" for c, n in sorted(self.codes.items()))
            lines.append(f"  responses  {codes}")
        lines.append("  errors     " + "  ".join(f"{k} {self.errors.get(k, 0):,}" for k in ERROR_KINDS))
        lines.append(f"  throughput {self.throughput:,.1f} answered/s")
        if self.latency.get_total_count():
            parts = [f"{k.replace('_', '.')} {self.percentile_ms(p):.3f}" for k, p in PERCENTILES]
            parts.append(f"max {self.max_ms:.3f}")
            what = "from intended send time" if self.mode == "open" else "from send"
            lines.append(f"  latency ms {'  '.join(parts)}  ({what})")
        else:
            lines.append("  latency ms no answers")
        if self.send_lag is not None and self.send_lag.get_total_count():
            lag99 = _ms(self.send_lag.get_value_at_percentile(99.0))
            lines.append(f"  send lag   p99 {lag99:.3f} ms  max {_ms(self.send_lag.get_max_value()):.3f} ms"
                         " (how late requests left against the schedule)")
        if self.elapsed_s > 0:
            lines.append(f"  generator  {self.cpu_s:.2f} s CPU in {self.elapsed_s:.2f} s"
                         f" ({100.0 * self.cpu_s / self.elapsed_s:.0f}% of one core)")
        if self.aborted:
            lines.append(f"  ABORTED    {self.aborted}")
        return "\n".join(lines)

    # ------------------------------------------------------------------ processes

    def to_wire(self) -> dict[str, Any]:
        """A picklable, JSON-safe form for sending a worker's result to the parent."""
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["latency"] = self.latency.encode().decode("ascii")
        d["send_lag"] = self.send_lag.encode().decode("ascii") if self.send_lag is not None else None
        return d

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> "LoadResult":
        d = dict(d)
        latency = new_histogram()
        latency.decode_and_add(d["latency"].encode("ascii"))
        d["latency"] = latency
        if d["send_lag"] is not None:
            lag = new_histogram()
            lag.decode_and_add(d["send_lag"].encode("ascii"))
            d["send_lag"] = lag
        return cls(**d)

    @classmethod
    def merge(cls, parts: list["LoadResult"]) -> "LoadResult":
        """One result from the results of the processes of one run (started together)."""
        if not parts:
            raise ValueError("nothing to merge")
        first = parts[0]
        latency = new_histogram()
        lag = new_histogram() if first.send_lag is not None else None
        codes: dict[str, int] = {}
        errors = dict.fromkeys(ERROR_KINDS, 0)
        for p in parts:
            latency.add(p.latency)
            if lag is not None and p.send_lag is not None:
                lag.add(p.send_lag)
            for k, n in p.codes.items():
                codes[k] = codes.get(k, 0) + n
            for k, n in p.errors.items():
                errors[k] = errors.get(k, 0) + n
        rates = [p.rate for p in parts if p.rate is not None]
        return cls(
            target=first.target, dialect=first.dialect, framing=first.framing, mix=first.mix, mode=first.mode,
            rate=sum(rates) if rates else None,
            connections=sum(p.connections for p in parts),
            in_flight=first.in_flight,
            processes=sum(p.processes for p in parts),
            warmup_s=first.warmup_s, timeout_s=first.timeout_s, seed=first.seed,
            sent=sum(p.sent for p in parts),
            answered=sum(p.answered for p in parts),
            timeouts=sum(p.timeouts for p in parts),
            codes=codes, errors=errors, latency=latency,
            # The processes started together, so they measured side by side: the run's window
            # is the longest of theirs, and throughput adds up over it.
            window_s=max(p.window_s for p in parts),
            elapsed_s=max(p.elapsed_s for p in parts),
            send_lag=lag,
            aborted="; ".join(dict.fromkeys(p.aborted for p in parts if p.aborted)) or None,
            cpu_s=sum(p.cpu_s for p in parts),
        )
