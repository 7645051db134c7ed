"""``iso-gateway db migrate|status``: the PostgreSQL schema, for operators.

The command line (cli.py) builds the conninfo from the ``[journal]`` config (``pg.make_conninfo``,
the password from its file or environment variable) and calls ``migrate`` or ``status``, which print
what they did and return the process's exit code. Messages name the database by its redacted
conninfo: the password never reaches the terminal or a log.
"""

from __future__ import annotations

from typing import Callable

import psycopg

from .migrate import MigrationError
from .migrate import migrate as apply_migrations
from .migrate import status as schema_status
from .pg import failure_reason, redact, scrub

Print = Callable[[str], None]


def _connect(dsn: str) -> psycopg.Connection[tuple[object, ...]]:
    return psycopg.connect(dsn, autocommit=False)


def _failed(dsn: str, what: str, exc: BaseException, out: Print) -> int:
    out(f"{what} failed on {redact(dsn)}: {failure_reason(exc)} ({scrub(str(exc).strip(), dsn)})")
    return 1


def migrate(dsn: str, out: Print = print) -> int:
    """Bring the schema up to date: 0 when it is (now or already), 1 when it could not be."""
    try:
        with _connect(dsn) as conn:
            applied = apply_migrations(conn)
            state = schema_status(conn)
    except (psycopg.Error, MigrationError) as exc:
        return _failed(dsn, "migration", exc, out)
    if applied:
        out(f"applied migrations {', '.join(str(v) for v in applied)} on {redact(dsn)}: "
            f"schema version {state.current}")
    else:
        out(f"schema version {state.current} on {redact(dsn)}: up to date")
    return 0


def status(dsn: str, out: Print = print) -> int:
    """Say where the schema stands: 0 when up to date, 2 when migrations are pending, 1 when the
    database can't be read or is newer than this program."""
    try:
        with _connect(dsn) as conn:
            state = schema_status(conn)
    except psycopg.Error as exc:
        return _failed(dsn, "status", exc, out)
    out(f"database {redact(dsn)}: schema version {state.current}, this program's latest {state.latest}")
    if state.current > state.latest:
        out("the schema is newer than this program: upgrade it before it uses this database")
        return 1
    for m in state.pending:
        out(f"pending: {m.version:04d}_{m.name}")
    return 0 if state.up_to_date else 2
