"""``iso-gateway load``: the command-line face of the load generator.

The live progress line is one carriage-return line on stderr, about once a
second, only when stderr is a terminal (and not with ``--quiet``): a single
line of counters needs no layout engine, and a plain ``print`` keeps the
generator's processes free of a display library's import time and of any work
between two reads of the socket. The final report goes to stdout, as text or
(``--json``) as one JSON object with stable keys for CI.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from typing import TextIO

from .engine import Progress
from .options import DEFAULT_CONNECT_TIMEOUT, DEFAULT_DURATION, DEFAULT_TIMEOUT, LoadOptions, parse_target

__all__ = ["ProgressLine", "add_arguments", "options_from_args", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``iso-gateway load``."""
    parser.add_argument("--target", required=True, metavar="HOST:PORT", help="the host under load (gateway, switch, simulator)")
    wire = parser.add_argument_group("wire format")
    wire.add_argument("--dialect", default="iso87ascii", help="dialect name or .toml path (default: iso87ascii)")
    wire.add_argument("--framing", default="ascii4", help="length header: ascii4, binary2, binary2r, bcd2, binary4 (default: ascii4)")
    wire.add_argument("--length-includes-header", action="store_true", help="the length header counts itself")
    wire.add_argument("--tpdu", action="store_true", help="a 5-byte TPDU (60 0001 0000) follows the length header")
    load = parser.add_argument_group("load")
    load.add_argument("--mix", default="ecom", metavar="NAME|FILE", help="message mix from specs/load or a .toml file (default: ecom)")
    load.add_argument("--connections", type=int, default=1, metavar="N", help="TCP connections (default: 1)")
    load.add_argument("--in-flight", type=int, metavar="N",
                      help="requests in flight per connection: the window in closed loop (default 8), a cap in open loop (default 64)")
    load.add_argument("--rate", type=float, metavar="R",
                      help="open loop: R requests/s on a fixed schedule, latency from each request's intended send time "
                           "(default: closed loop, as fast as answers come)")
    end = load.add_mutually_exclusive_group()
    end.add_argument("--duration", type=float, metavar="S", help=f"seconds of measured load (default: {DEFAULT_DURATION:g})")
    end.add_argument("--count", type=int, metavar="N", help="exactly N measured requests instead of a duration")
    load.add_argument("--warmup", type=float, default=0.0, metavar="S", help="seconds of load before measuring, left out of the results (default: 0)")
    load.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="S",
                      help=f"seconds to wait for each answer (default: {DEFAULT_TIMEOUT:g}, above a gateway's 30-45 s)")
    load.add_argument("--connect-timeout", type=float, default=DEFAULT_CONNECT_TIMEOUT, metavar="S",
                      help=f"seconds for a TCP connect (default: {DEFAULT_CONNECT_TIMEOUT:g})")
    load.add_argument("--processes", type=int, default=1, metavar="N",
                      help="worker processes sharing the connections, rate and count (default: 1)")
    load.add_argument("--seed", type=int, help="seed of the message pool (PANs, amounts, order) for a repeatable run")
    tls = parser.add_argument_group("TLS")
    tls.add_argument("--tls", action="store_true", help="speak TLS to the target")
    tls.add_argument("--tls-ca", action="append", default=[], metavar="PEM",
                     help="a CA the target's certificate must chain to (repeatable); none: not verified (measurement only)")
    tls.add_argument("--tls-server-name", metavar="NAME", help="the name the target's certificate must carry (with --tls-ca)")
    tls.add_argument("--tls-cert", metavar="PEM", help="our client certificate, for a target that asks for one")
    tls.add_argument("--tls-key", metavar="PEM", help="its private key")
    parser.add_argument("--mac-key", metavar="HEX", type=bytes.fromhex,
                        help="sign every request (field 64/128) with this test key (hex, in clear: for tests and benchmarks)")
    parser.add_argument("--mac-algorithm", choices=("retail", "aes-cmac"), default="retail",
                        help="the MAC with --mac-key: retail (ISO 9797-1 algorithm 3, 16-byte TDES key) or aes-cmac (default: retail)")
    out = parser.add_argument_group("output")
    out.add_argument("--json", action="store_true", help="print the report as one JSON object (stable keys, for CI)")
    out.add_argument("--quiet", action="store_true", help="no progress line")


def options_from_args(args: argparse.Namespace) -> LoadOptions:
    host, port = parse_target(args.target)
    return LoadOptions(
        host=host, port=port, dialect=args.dialect, framing=args.framing,
        length_includes_header=args.length_includes_header, tpdu=args.tpdu, mix=args.mix,
        connections=args.connections, in_flight=args.in_flight, rate=args.rate,
        duration=args.duration, count=args.count, warmup=args.warmup, timeout=args.timeout,
        connect_timeout=args.connect_timeout, processes=args.processes, seed=args.seed,
        tls=args.tls or bool(args.tls_ca), tls_ca=tuple(args.tls_ca), tls_server_name=args.tls_server_name,
        tls_cert=args.tls_cert, tls_key=args.tls_key, mac_key=args.mac_key,
        mac_algorithm=args.mac_algorithm,
    )


class ProgressLine:
    """Rewrites one line on a terminal: elapsed, phase, counts, answer rate, errors, current p99."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.shown = False

    def __call__(self, p: Progress) -> None:
        p99 = f"{p.p99_ms:.2f} ms" if p.p99_ms is not None else "-"
        line = (f"{p.elapsed:6.1f}s {p.phase:<7} sent {p.sent:,}  answered {p.answered:,}  {p.rate:,.0f}/s  "
                f"in flight {p.in_flight:,}  timeouts {p.timeouts:,}  errors {p.errors:,}  p99 {p99}")
        self.stream.write("\r\x1b[2K" + line)
        self.stream.flush()
        self.shown = True

    def clear(self) -> None:
        if self.shown:
            self.stream.write("\r\x1b[2K")
            self.stream.flush()


def run(args: argparse.Namespace) -> int:
    """Run the load and print the report. ConfigError (exit 2) and LoadError (exit 1) are left to cli.main."""
    from . import run_load_sync

    options = options_from_args(args)
    # This process only runs the load: keep the collector's full passes over the
    # start-up objects (modules, dialects, the message pool), ~10 ms each, out of the timings.
    gc.collect()
    gc.freeze()
    line = ProgressLine(sys.stderr) if not args.quiet and sys.stderr.isatty() else None
    try:
        result = run_load_sync(options, progress=line, handle_signals=True)
    finally:
        if line is not None:
            line.clear()
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        print(result.text())
    return 0
