"""A pytest plugin: the throwaway PostgreSQL server (pgserver.py) for the tests that need one.

Load it with ``pytest_plugins = ["conftest_pg"]`` in a test module. ``pg_server`` is one server
for the session, started on first use and stopped at the end; ``pg_conninfo`` is a new empty
database on it for each test (creating one takes a few tens of milliseconds).

Without PostgreSQL's binaries the tests fail, saying what to install: the suite is meant to run
them everywhere (``.ci/run`` installs Debian's ``postgresql``). ``ISO_GATEWAY_PG_TESTS_SKIP=1``
turns that failure into a skip, for a machine that can't have them.
"""

from __future__ import annotations

import os
from typing import Iterator

import pytest

from pgserver import SKIP_ENV, PgServer, PgServerUnavailable


def new_server() -> PgServer:
    """A started server (fails, or skips when SKIP_ENV says so, without the binaries)."""
    try:
        server = PgServer()
    except PgServerUnavailable as exc:
        if os.environ.get(SKIP_ENV) == "1":
            pytest.skip(str(exc))
        pytest.fail(str(exc), pytrace=False)
    try:
        server.start()
    except BaseException:
        server.destroy()
        raise
    return server


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    server = new_server()
    try:
        yield server
    finally:
        server.destroy()


@pytest.fixture
def pg_conninfo(pg_server: PgServer) -> str:
    """The conninfo of a new, empty database (no schema yet)."""
    return pg_server.conninfo(pg_server.create_database())
