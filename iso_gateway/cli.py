"""The ``iso-gateway`` command: one entry point, one sub-command per job.

Bad input prints one clear line on stderr and exits non-zero; a traceback is a
bug. Output is masked unless ``--unmasked`` is given, which warns on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
from typing import TYPE_CHECKING, Any, Sequence

from . import __version__
from .core.errors import ConfigError, IsoGatewayError

if TYPE_CHECKING:  # imported lazily at run time, for a quick start
    from .core.dialect import Dialect
    from .core.framing import Framer

EXIT_OK = 0
EXIT_FAIL = 1
EXIT_USAGE = 2
# Files and folders the daemon creates: owner only (0600 files, 0700 folders).
PRIVATE_UMASK = 0o077

def _err(msg: str) -> None:
    print(f"iso-gateway: {msg}", file=sys.stderr)


# --------------------------------------------------------------------------- decode / encode


def _read_input(args: argparse.Namespace) -> bytes:
    """The bytes to decode: --file (raw bytes), else HEX argument, else hex on stdin."""
    if args.file:
        try:
            with open(args.file, "rb") as fh:
                return fh.read()
        except OSError as exc:
            raise IsoGatewayError(f"can't read {args.file}: {exc.strerror}") from None
    text = args.hex if args.hex not in (None, "-") else sys.stdin.read()
    cleaned = "".join(text.split())
    if cleaned.lower().startswith("0x"):
        cleaned = cleaned[2:]
    try:
        return bytes.fromhex(cleaned)
    except ValueError:
        raise IsoGatewayError("input is not hexadecimal (use --file for raw bytes)") from None


def _framer(args: argparse.Namespace) -> Framer:
    from .core.framing import framer_from_config

    options: dict[str, Any] = {}
    if args.length_includes_header:
        options["length_includes_header"] = True
    if args.tpdu:
        options["tpdu"] = True
    return framer_from_config(args.framing, **options)


def _describe(dialect: Dialect, msg: dict[str, str], unmasked: bool) -> list[dict[str, str]]:
    from .core.masking import REMOVED, mask_field
    from .core.message import mti_class, mti_function

    rows = [{"field": "t", "name": "Message type indicator", "format": "n4",
             "value": msg["t"], "meaning": f"{mti_class(msg['t'])} {mti_function(msg['t'])}"}]
    for key in sorted((k for k in msg if k.isdigit()), key=int):
        num = int(key)
        fd = dialect.fields[num]
        value = msg[key] if unmasked else mask_field(dialect, num, msg[key])
        rows.append({"field": key, "name": fd.name, "format": fd.format,
                     "value": REMOVED if value is None else value})
    return rows


def cmd_decode(args: argparse.Namespace) -> int:
    from .specfiles import get_dialect
    from .core.message import decode

    dialect = get_dialect(args.dialect)
    data = _read_input(args)
    if args.unmasked:
        print("WARNING: --unmasked prints card data in clear; do not paste this output anywhere.", file=sys.stderr)
    messages: list[tuple[bytes, bytes]] = []
    if args.framing:
        framer = _framer(args)
        decoder = framer.decoder()
        for frame in decoder.feed(data):
            if not frame.keepalive:
                messages.append((frame.header, frame.message))
        if decoder.pending:
            raise IsoGatewayError(f"{decoder.pending} bytes left after the last complete frame")
    else:
        messages.append((b"", data))
    if not messages:
        raise IsoGatewayError("no message in the input")
    out = []
    for header, raw in messages:
        msg = decode(dialect, raw, check_types=not args.lenient)
        entry: dict[str, Any] = {"dialect": dialect.name, "length": len(raw), "fields": _describe(dialect, msg, args.unmasked)}
        if header:
            entry["header"] = header.hex().upper()
        out.append(entry)
    if args.json:
        print(json.dumps(out if len(out) > 1 else out[0], indent=2))
        return EXIT_OK
    for i, entry in enumerate(out):
        if len(out) > 1:
            print(f"--- message {i + 1} of {len(out)}")
        head = f"dialect {entry['dialect']}, {entry['length']} bytes"
        if "header" in entry:
            head += f", header {entry['header']}"
        print(head)
        for row in entry["fields"]:
            label = "MTI" if row["field"] == "t" else f"{int(row['field']):>3}"
            extra = f"  ({row['meaning']})" if "meaning" in row else ""
            print(f"{label}  {row['format']:<9} {row['name'][:44]:<44} {row['value']}{extra}")
    return EXIT_OK


def cmd_encode(args: argparse.Namespace) -> int:
    from .specfiles import get_dialect
    from .core.message import encode

    dialect = get_dialect(args.dialect)
    text = args.json_text if args.json_text not in (None, "-") else sys.stdin.read()
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise IsoGatewayError(f"input is not JSON: {exc.msg} at line {exc.lineno}") from None
    if not isinstance(doc, dict):
        raise IsoGatewayError('input must be a JSON object such as {"t": "0800", "11": "000001", "70": "301"}')
    fields: dict[str, str] = {}
    for key, value in doc.items():
        key = "t" if key in ("t", "mti", "MTI", "0") else str(key)
        fields[key] = value if isinstance(value, str) else str(value)
    raw = encode(dialect, fields)
    if args.framing:
        raw = _framer(args).encode(raw, header=bytes.fromhex(args.header) if args.header else b"")
    print(raw.hex().upper())
    return EXIT_OK


def cmd_dialects(args: argparse.Namespace) -> int:
    from .specfiles import dialect_paths, get_dialect

    for name, path in dialect_paths().items():
        try:
            d = get_dialect(name)
            print(f"{name:<14} {d.title}  [{path}]")
        except ConfigError as exc:
            print(f"{name:<14} INVALID: {exc}")
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    # Before anything is created (the state folder, the journal, the log, the metrics folder,
    # the workers and the indexer inherit it): what the gateway writes holds card data or
    # traces of it, and is its owner's only.
    os.umask(PRIVATE_UMASK)
    if args.workers > 1 and args.worker_index is None:
        from .workers import supervise  # sets up multiprocess metrics before anything imports them

        return supervise(args.config, args.workers)
    from .daemon import run

    return run(args.config, worker=args.worker_index)


def cmd_check_config(args: argparse.Namespace) -> int:
    """Load the configuration and everything it names (dialects, rules, routes), start nothing."""
    from .config import load_config, route_table
    from .core.framing import framer_from_config
    from .specfiles import get_dialect, load_rules

    cfg = load_config(args.config)
    dialect_dirs, rule_dirs = tuple(cfg.dialect_dirs), tuple(cfg.rule_dirs)
    for i, lc in enumerate(cfg.listeners):
        get_dialect(lc.dialect, dialect_dirs)
        load_rules(lc.rules, rule_dirs)
        framer_from_config(lc.framing, source=args.config, where=f"listeners[{i}].framing")
    for i, uc in enumerate(cfg.upstreams):
        get_dialect(uc.dialect, dialect_dirs)
        framer_from_config(uc.framing, source=args.config, where=f"upstreams[{i}].framing")
    route_table(cfg.routes, cfg.routing, source=args.config)
    from .keys import check_security_config
    from .net.frontend import listener_tls
    from .net.links import upstream_tls

    check_security_config(cfg, args.config)  # a KEK or PIN file in the state directory is refused
    for lc in cfg.listeners:
        listener_tls(lc, args.config)  # certificates, keys and CAs read and checked, as at start
    for uc in cfg.upstreams:
        upstream_tls(uc, args.config)
    print(f"{args.config}: OK ({len(cfg.listeners)} listeners, {len(cfg.upstreams)} upstreams, {len(cfg.routes)} routes)")
    return EXIT_OK


def cmd_db(args: argparse.Namespace) -> int:
    """``db migrate`` / ``db status``: the PostgreSQL journal's schema (journal/dbcli.py)."""
    from .config import load_config
    from .journal import dbcli
    from .journal.pg import make_conninfo, read_password

    cfg = load_config(args.config).journal
    if cfg.backend != "postgresql":
        raise IsoGatewayError(f'{args.config}: [journal] backend is "{cfg.backend}": the db commands are for "postgresql"')
    try:
        password = read_password(cfg.password_file or None, cfg.password_env or None)
    except OSError as exc:
        raise IsoGatewayError(f"the database password can't be read: {exc}") from None
    dsn = make_conninfo(cfg.dsn, password=password, application_name="iso-gateway-db")
    return dbcli.migrate(dsn) if args.db_command == "migrate" else dbcli.status(dsn)


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run

    return run(args.connections)


def cmd_sim_switch(args: argparse.Namespace) -> int:
    from .sim.switch import run

    return run(args)


def cmd_load(args: argparse.Namespace) -> int:
    from .load.command import run

    return run(args)


# --------------------------------------------------------------------------- parser


def _add_wire_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dialect", default="iso87ascii", help="dialect name or .toml path (default: iso87ascii)")
    p.add_argument("--framing", help="length-header framing of the input: ascii4, binary2, binary2r, bcd2, binary4")
    p.add_argument("--length-includes-header", action="store_true", help="the length header counts itself")
    p.add_argument("--tpdu", action="store_true", help="a 5-byte TPDU follows the length header")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="iso-gateway", description="ISO 8583 gateway daemon and tools")
    parser.add_argument("--version", action="version", version=f"iso-gateway {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("decode", help="decode a message or a framed stream and print its fields, masked")
    p.set_defaults(handler=cmd_decode)
    p.add_argument("hex", nargs="?", help="the message as hex; '-' or nothing reads hex from stdin")
    p.add_argument("--file", help="read raw bytes from this file instead")
    _add_wire_options(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--unmasked", action="store_true", help="show card data in clear (warns on stderr)")
    p.add_argument("--lenient", action="store_true", help="do not check ISO field types (n, an, ...)")

    p = sub.add_parser("encode", help="encode a JSON field object into hex")
    p.set_defaults(handler=cmd_encode)
    p.add_argument("json_text", nargs="?", metavar="JSON", help='e.g. \'{"t": "0800", "11": "000001", "70": "301"}\'; - reads stdin')
    _add_wire_options(p)
    p.add_argument("--header", help="TPDU or fixed header bytes as hex, with --framing")

    sub.add_parser("dialects", help="list the dialects found in specs/dialects").set_defaults(handler=cmd_dialects)

    p = sub.add_parser("run", help="run the gateway daemon")
    p.set_defaults(handler=cmd_run)
    p.add_argument("--config", required=True, help="the gateway's TOML configuration")
    p.add_argument("--workers", type=int, default=1,
                   help="worker processes sharing the listening port (SO_REUSEPORT), each with its own upstream links")
    p.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)  # set by the supervisor for each worker

    p = sub.add_parser("check-config", help="validate a configuration file and everything it names, start nothing")
    p.set_defaults(handler=cmd_check_config)
    p.add_argument("config", help="the gateway's TOML configuration")

    from .operator import add_parsers

    add_parsers(sub)
    from .keys import add_parsers as add_keys_parsers

    add_keys_parsers(sub)

    p = sub.add_parser("db", help="the PostgreSQL journal's schema: migrate it, or show its status")
    dsub = p.add_subparsers(dest="db_command", metavar="SUBCOMMAND", required=True)
    for name, help_text in (("migrate", "apply the schema migrations this program has and the database lacks"),
                            ("status", "show the schema version; exit 0 up to date, 2 migrations pending, 1 unusable")):
        d = dsub.add_parser(name, help=help_text)
        d.set_defaults(handler=cmd_db)
        d.add_argument("--config", required=True, help="the gateway's configuration (its [journal] dsn and password)")

    p = sub.add_parser("demo", help="run the simulator and the gateway on loopback and show a burst of traffic")
    p.set_defaults(handler=cmd_demo)
    p.add_argument("--connections", type=int, default=8, help="front-end connections (default 8)")

    p = sub.add_parser("sim-switch", help="run the bank switch simulator")
    p.set_defaults(handler=cmd_sim_switch)
    from .sim.switch import add_arguments

    add_arguments(p)

    p = sub.add_parser("load", help="drive raw ISO 8583 load at a host and report rates, codes and latency")
    p.set_defaults(handler=cmd_load)
    from .load.command import add_arguments as add_load_arguments

    add_load_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return args.handler(args)  # each sub-command's parser names its handler (set_defaults)
    except ConfigError as exc:
        _err(str(exc))
        return EXIT_USAGE
    except IsoGatewayError as exc:
        _err(str(exc))
        return EXIT_FAIL
    except sqlite3.Error as exc:  # the journal's file is unreadable, read-only, full: one line, no traceback
        _err(f"the journal can't be used ({exc})")
        return EXIT_FAIL
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return EXIT_OK
