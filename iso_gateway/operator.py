"""Operator tools: look into the journal and the SAF queue of a running or stopped gateway.

``iso-gateway journal find`` and ``iso-gateway saf list|retry|park`` open the
gateway's SQLite file directly (WAL mode lets them read and write while the
daemon runs; the daemon's reversal sender polls the queue, so a retry is picked up
within a second). With ``[journal] backend = "postgresql"`` they work on the
database the nodes share, from any node (``PgStore``'s look-ups and operator
actions; a retried or parked item's lease is dropped). They show masked PANs
only: the tools never need, and never load, the PAN key.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from contextlib import contextmanager
from typing import Any, Iterator

from .journal import txlog
from .config import load_config
from .core.errors import IsoGatewayError
from .journal import SAF_PARKED, SAF_PENDING, SAF_SENT, SQLiteStore
from .reversals import saf_label

SAF_STATES = ("pending", "sent", "acked", "parked", "cancelled")


def add_store_argument(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--config", help="the gateway's configuration (its [journal] path is used)")
    g.add_argument("--journal", help="the journal's SQLite file")
    p.add_argument("--json", action="store_true", help="print JSON lines")


def _shared(args: argparse.Namespace) -> Any:
    """A connection to the PostgreSQL journal the configuration names (autocommit), or None for SQLite."""
    if args.journal:
        return None
    cfg = load_config(args.config).journal
    if cfg.backend != "postgresql":
        return None
    import psycopg

    from .journal.pg import failure_reason, make_conninfo, read_password, redact, scrub

    conninfo = make_conninfo(cfg.dsn, password=read_password(cfg.password_file or None, cfg.password_env or None),
                             application_name="iso-gateway-operator")
    try:
        return psycopg.connect(conninfo, autocommit=True)
    except psycopg.Error as exc:
        raise IsoGatewayError(f"the journal's database {redact(conninfo)} can't be used: {failure_reason(exc)} "
                              f"({scrub(str(exc).strip(), conninfo)})") from None


@contextmanager
def _using(conn: Any) -> Iterator[Any]:
    """The shared store's connection for one command: closed after, its failures one line each
    (a schema not migrated: run `iso-gateway db migrate`)."""
    import psycopg

    from .journal.pg import failure_reason

    try:
        with conn:
            yield conn
    except psycopg.Error as exc:
        hint = " (run `iso-gateway db migrate`)" if failure_reason(exc) == "schema" else ""
        raise IsoGatewayError(f"the journal's database failed: {failure_reason(exc)}{hint}") from None


def _open(args: argparse.Namespace) -> sqlite3.Connection:
    path = args.journal or load_config(args.config).journal.path
    if not Path(path).exists():
        raise IsoGatewayError(f"no journal at {path}")
    conn = sqlite3.connect(path, isolation_level=None, timeout=10.0)
    conn.execute("PRAGMA busy_timeout=10000")
    return conn


def _when(t: float | None) -> str:
    if not t:
        return "-"
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def journal_find(args: argparse.Namespace) -> int:
    if not (args.rrn or args.stan or args.terminal):
        raise IsoGatewayError("give --rrn, --stan or --terminal")
    shared = _shared(args)
    if shared is not None:
        from .journal.pg import PgStore

        with _using(shared):
            rows = PgStore.find_txns(shared, rrn=args.rrn, stan=args.stan, terminal=args.terminal, limit=args.limit)
    else:
        conn = _open(args)
        rows = SQLiteStore.find_txns(conn, rrn=args.rrn, stan=args.stan, terminal=args.terminal, limit=args.limit)
    for r in rows:
        doc = {"id": r.id, "time": _when(r.created), "mti": r.mti, "terminal": r.terminal, "merchant": r.merchant,
               "stan": r.front_stan, "transmission": r.transmission, "rrn": r.rrn, "amount": r.amount,
               "currency": r.currency, "pan": r.pan_masked, "upstream": r.upstream, "upstream_stan": r.upstream_stan,
               "state": r.state, "response_code": r.response_code or "", "auth_code": r.auth_code or ""}
        if args.json:
            print(json.dumps(doc))
        else:
            print(f"{doc['time']} {r.mti} term={r.terminal} stan={r.front_stan} rrn={r.rrn} amount={r.amount} "
                  f"{r.currency} pan={r.pan_masked} -> {r.upstream}/{r.upstream_stan} {r.state} "
                  f"rc={r.response_code or '-'}")
    if not rows and not args.json:
        print("no matching transaction")
    if shared is not None:
        return 0
    waiting = txlog.segments(args.journal or load_config(args.config).journal.path)
    if waiting:  # a running gateway writes them within a second; a stopped one at its next start
        print(f"note: {len(waiting)} journal log segment(s) not yet in the database: the newest transactions "
              "(within the last second, or before a crash) may not show until they are", file=sys.stderr)
    return 0


def saf_list(args: argparse.Namespace) -> int:
    states = args.state or ["pending", "sent", "parked"]
    shared = _shared(args)
    if shared is not None:
        from .journal.pg import PgStore

        with _using(shared):
            rows = PgStore.list_saf(shared, states, args.limit)
    else:
        rows = SQLiteStore.list_saf(_open(args), states, args.limit)
    for (sid, upstream, state, reason, mti, stan, rrn, amount, currency, pan, attempts, next_attempt, created,
         last) in rows:
        doc = {"id": sid, "upstream": upstream, "state": state, "reason": reason, "mti": mti, "stan": stan,
               "rrn": rrn, "amount": amount, "currency": currency, "pan": pan, "attempts": attempts,
               "next_attempt": _when(next_attempt), "created": _when(created), "last_result": last or ""}
        if args.json:
            print(json.dumps(doc))
        else:
            print(f"{saf_label(sid)} {upstream} {state:<9} {reason:<13} {mti} stan={stan or '-'} rrn={rrn} amount={amount} "
                  f"{currency} pan={pan} attempts={attempts} next={doc['next_attempt']} last={last or '-'}")
    if not rows and not args.json:
        print("the queue is empty" if set(states) & {"pending", "sent"} else "nothing in those states")
    return 0


def _change(args: argparse.Namespace, sql: str, params: tuple, states: tuple[str, ...]) -> int:
    conn = _open(args)
    marks = ",".join("?" * len(states))
    if args.all:
        cur = conn.execute(f"{sql} WHERE state IN ({marks})", (*params, *states))
    else:
        if not args.ids:
            raise IsoGatewayError("give item ids, or --all")
        cur = conn.execute(f"{sql} WHERE state IN ({marks}) AND id IN ({','.join('?' * len(args.ids))})",
                           (*params, *states, *args.ids))
    print(f"{cur.rowcount} item(s) changed")
    return 0 if cur.rowcount or args.all else 1


def _change_shared(args: argparse.Namespace, shared: Any, action: Any) -> int:
    if not args.all and not args.ids:
        raise IsoGatewayError("give item ids, or --all")
    with _using(shared):
        count = action(shared, time.time(), None if args.all else args.ids)
    print(f"{count} item(s) changed")
    return 0 if count or args.all else 1


def saf_retry(args: argparse.Namespace) -> int:
    """Parked (or waiting) items go back to the queue, due now; the next attempt is a repeat (0421)."""
    shared = _shared(args)
    if shared is not None:
        from .journal.pg import PgStore

        return _change_shared(args, shared, PgStore.retry_saf)
    return _change(args, "UPDATE saf SET state=?, next_attempt=?, attempts=MIN(attempts, 1), updated=?,"
                         " last_result='retry by operator'", (SAF_PENDING, time.time(), time.time()),
                   (SAF_PARKED, SAF_PENDING, SAF_SENT))


def saf_park(args: argparse.Namespace) -> int:
    shared = _shared(args)
    if shared is not None:
        from .journal.pg import PgStore

        return _change_shared(args, shared, PgStore.park_saf)
    return _change(args, "UPDATE saf SET state=?, updated=?, last_result='parked by operator'",
                   (SAF_PARKED, time.time()), (SAF_PENDING, SAF_SENT))


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("journal", help="look up transactions in the journal (masked)")
    jsub = p.add_subparsers(dest="journal_command", metavar="SUBCOMMAND", required=True)
    f = jsub.add_parser("find", help="find transactions by RRN, STAN or terminal")
    add_store_argument(f)
    f.add_argument("--rrn")
    f.add_argument("--stan")
    f.add_argument("--terminal")
    f.add_argument("--limit", type=int, default=50)
    f.set_defaults(handler=journal_find)

    p = sub.add_parser("saf", help="the store-and-forward reversal queue: list, retry, park")
    ssub = p.add_subparsers(dest="saf_command", metavar="SUBCOMMAND", required=True)
    lst = ssub.add_parser("list", help="list queued (and, with --state, other) reversals")
    add_store_argument(lst)
    lst.add_argument("--state", action="append", choices=SAF_STATES, help="states to list (repeatable)")
    lst.add_argument("--limit", type=int, default=100)
    lst.set_defaults(handler=saf_list)
    for name, help_text, handler in (("retry", "send parked or waiting reversals again now", saf_retry),
                                     ("park", "stop retrying reversals (they stay listed as parked)", saf_park)):
        c = ssub.add_parser(name, help=help_text)
        c.set_defaults(handler=handler)
        add_store_argument(c)
        c.add_argument("ids", nargs="*", type=int, help="item ids (from saf list)")
        c.add_argument("--all", action="store_true", help="every item in a state it applies to")
