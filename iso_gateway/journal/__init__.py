"""The journal: the store (store.py), the write-ahead log (txlog.py), the indexer process
(indexer.py) and ``Journal``, which commits through them (commit.py).

``iso_gateway.journal`` hands on commit.py's public names (``Journal``, ``SQLiteStore``, the
state constants...). They are looked up on first use, not imported here: the indexer runs
as ``python -m iso_gateway.journal.indexer`` in a child process that must not load trio.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .commit import *  # noqa: F403

_SUBMODULES = frozenset({"commit", "dbcli", "indexer", "interface", "migrate", "migrations", "pg", "store", "txlog"})


def __getattr__(name: str) -> Any:
    # A submodule's name falls through to the import system (``from . import txlog``
    # asks here first); anything else is one of commit.py's public names, or nothing.
    if name not in _SUBMODULES and not name.startswith("_"):
        commit = importlib.import_module(".commit", __name__)
        if name in commit.__all__:
            return getattr(commit, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
