"""The PostgreSQL schema's versions: numbered SQL files applied in order, once each.

The files are ``migrations/NNNN_name.sql`` inside this package (they ship in the wheel). Each one
runs in the same transaction as the row that records it in ``schema_version``, so a migration is
either wholly applied and recorded or not at all. The runner holds a transaction-level advisory
lock while it looks and applies: several nodes starting together apply each migration once, the
others wait for the lock, then find nothing left to do. A database whose schema is newer than this
code knows (another node was upgraded first) is refused rather than written with the wrong shape.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from typing import Any

# pg_advisory_xact_lock key of the runner: "isogw" + "mig" in ASCII, an arbitrary constant of this program.
LOCK_KEY = 0x69736F67776D6967 & 0x7FFFFFFFFFFFFFFF

_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")

_CREATE_VERSION_TABLE = (
    "CREATE TABLE IF NOT EXISTS schema_version ("
    " version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied TIMESTAMPTZ NOT NULL DEFAULT now())")


class MigrationError(RuntimeError):
    """The migrations folder or the database's recorded versions are not what this code expects."""


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


def available(package: str = "iso_gateway.journal.migrations") -> list[Migration]:
    """The migrations this code ships, in order; numbered 1, 2, 3... with no gap or repeat."""
    found: list[Migration] = []
    for entry in resources.files(package).iterdir():
        m = _NAME.match(entry.name)
        if m is None:
            continue
        found.append(Migration(int(m.group(1)), m.group(2), entry.read_text(encoding="utf-8")))
    found.sort(key=lambda mig: mig.version)
    expected = list(range(1, len(found) + 1))
    if [mig.version for mig in found] != expected:
        raise MigrationError(f"migrations must be numbered 1..n without gaps: found {[m.version for m in found]}")
    return found


@dataclass(frozen=True, slots=True)
class Status:
    current: int                  # the highest version applied (0: an empty database)
    latest: int                   # the highest version this code ships
    pending: tuple[Migration, ...]

    @property
    def up_to_date(self) -> bool:
        return not self.pending and self.current == self.latest


def _applied(conn: Any) -> list[int]:
    exists = conn.execute("SELECT to_regclass('schema_version') IS NOT NULL").fetchone()[0]
    if not exists:
        return []
    return [r[0] for r in conn.execute("SELECT version FROM schema_version ORDER BY version")]


def status(conn: Any, migrations: list[Migration] | None = None) -> Status:
    """Where the database stands (reads only; ``conn`` is a psycopg connection)."""
    migrations = available() if migrations is None else migrations
    applied = _applied(conn)
    if not conn.autocommit:
        conn.rollback()  # end the read's transaction: a caller's connection is not left "idle in transaction"
    current = max(applied, default=0)
    latest = migrations[-1].version if migrations else 0
    return Status(current, latest, tuple(m for m in migrations if m.version not in applied))


def migrate(conn: Any, migrations: list[Migration] | None = None) -> list[int]:
    """Apply what is missing, each migration in its own transaction, under the runner's lock;
    returns the versions applied now (empty when the schema was up to date).

    ``conn``: a psycopg connection not inside a transaction."""
    migrations = available() if migrations is None else migrations
    latest = migrations[-1].version if migrations else 0
    done: list[int] = []
    for migration in migrations:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_KEY,))
            conn.execute(_CREATE_VERSION_TABLE)
            applied = _applied(conn)
            newest = max(applied, default=0)
            if newest > latest:
                raise MigrationError(f"the database's schema is at version {newest}, newer than this program's "
                                     f"{latest}: upgrade this node")
            if migration.version in applied:
                continue
            if newest != migration.version - 1:
                raise MigrationError(f"schema version {newest} recorded, but migration {migration.version} "
                                     "does not follow it")
            conn.execute(migration.sql.encode())  # bytes: run as written (no parameter placeholders)
            conn.execute("INSERT INTO schema_version (version, name) VALUES (%s, %s)",
                         (migration.version, migration.name))
            done.append(migration.version)
    return done
