"""The package layout holds its layers: no import cycles, a core free of I/O, lower layers that
never reach up.

Imports are read from the source with ``ast``, every one of them: at module level, inside
functions, and under ``if TYPE_CHECKING:`` (a cycle of type hints is still a cycle for a reader,
and becomes a real one the day someone moves the import). The layers, lowest first:

- ``core/``: plain Python on bytes and plain values, ``now`` passed in. It may import the
  standard library except what reaches a socket, a file, a process, a thread or the clock
  (``CORE_FORBIDDEN_STDLIB``), and pyiso8583 and cryptography.
- ``security/``: the core, the standard library, cryptography.
- ``journal/``: never the network side nor the application.
- ``net/``: never the application.
- the application (gateway, reversals, daemon, cli, workers, operator, demo) and the tools
  (``sim/``, ``load/``) on top. The shell's helpers (config, specfiles, datafiles, logs, metrics)
  sit beside the core: they import neither net, journal nor the application.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "iso_gateway"
ROOT = "iso_gateway"

# What the core may not import from the standard library, and why: it would reach outside the
# process's memory (sockets, files, processes, threads, the clock) or wait on something.
CORE_FORBIDDEN_STDLIB = frozenset({
    # the network and waiting
    "socket", "select", "selectors", "ssl", "asyncio", "http", "urllib", "email", "smtplib",
    # threads and processes
    "threading", "_thread", "multiprocessing", "concurrent", "subprocess", "signal", "queue",
    # files, the file system and stores
    "os", "io", "pathlib", "shutil", "tempfile", "glob", "fileinput", "mmap", "sqlite3", "dbm",
    "shelve", "linecache", "tomllib", "logging", "traceback", "zipfile", "tarfile", "gzip",
    # the clock (datetime stays: its types and arithmetic are plain values; reading "now" is
    # checked separately, below)
    "time", "sched",
})
CORE_ALLOWED_THIRD_PARTY = frozenset({"iso8583", "cryptography"})
# Calls that read the clock or open a file, whatever module they come from.
CORE_FORBIDDEN_CALLS = frozenset({"now", "utcnow", "today", "open", "time", "monotonic", "perf_counter"})

APPLICATION = frozenset({
    f"{ROOT}.gateway", f"{ROOT}.reversals", f"{ROOT}.daemon", f"{ROOT}.cli", f"{ROOT}.__main__",
    f"{ROOT}.workers", f"{ROOT}.operator", f"{ROOT}.demo",
})
TOOLS = (f"{ROOT}.sim", f"{ROOT}.load")
SHELL_HELPERS = frozenset({
    f"{ROOT}.config", f"{ROOT}.specfiles", f"{ROOT}.datafiles", f"{ROOT}.logs", f"{ROOT}.metrics",
    f"{ROOT}.clock",
})


def module_name(path: Path, package: Path) -> str:
    parts = [ROOT, *path.relative_to(package).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def parse_modules(package: Path) -> dict[str, tuple[Path, ast.Module]]:
    return {
        module_name(p, package): (p, ast.parse(p.read_text(encoding="utf-8"), str(p)))
        for p in sorted(package.rglob("*.py"))
    }


def imports_of(name: str, path: Path, tree: ast.Module, known: set[str]) -> list[tuple[str, int]]:
    """Every module ``name`` imports, as (absolute dotted name, line): an import of a name from a
    module of the package that is itself a module (``from . import txlog``) counts as that module."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.append((sub if sub in known else target, node.lineno))
    return found


def internal_graph(modules: dict[str, tuple[Path, ast.Module]]) -> dict[str, set[str]]:
    known = set(modules)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, (path, tree) in modules.items():
        for target, _ in imports_of(name, path, tree, known):
            while target and target not in known and target.startswith(ROOT + "."):
                target = target.rpartition(".")[0]  # a name inside a module: the module
            if target in known and target != name:
                graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10 * len(graph) + 100))
    try:
        for v in sorted(graph):
            if v not in index:
                visit(v)
    finally:
        sys.setrecursionlimit(limit)
    return found


def in_layer(name: str, layer: str) -> bool:
    return name == layer or name.startswith(layer + ".")


def is_application(name: str) -> bool:
    return name in APPLICATION or any(in_layer(name, t) for t in TOOLS)


MODULES = parse_modules(PACKAGE)
GRAPH = internal_graph(MODULES)


def edges_from(layer: str) -> list[tuple[str, str]]:
    return [(a, b) for a in sorted(GRAPH) if in_layer(a, layer) for b in sorted(GRAPH[a])]


def test_the_layout_has_the_layer_packages() -> None:
    for layer in ("core", "journal", "net", "security"):
        assert (PACKAGE / layer / "__init__.py").is_file(), f"iso_gateway/{layer}/ is missing"


def test_no_modules_import_each_other_in_a_circle() -> None:
    assert cycles(GRAPH) == []


def test_the_cycle_check_finds_a_circle_through_type_hints_and_function_bodies(tmp_path: Path) -> None:
    pkg = tmp_path / ROOT
    (pkg / "net").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "net" / "__init__.py").write_text("")
    (pkg / "net" / "front.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..app import App\n")
    (pkg / "app.py").write_text("def run():\n    from .net import front\n")
    (pkg / "leaf.py").write_text("import os\n")
    graph = internal_graph(parse_modules(pkg))
    assert cycles(graph) == [[f"{ROOT}.app", f"{ROOT}.net.front"]]


@pytest.mark.parametrize("name", sorted(n for n in MODULES if in_layer(n, f"{ROOT}.core")))
def test_the_core_imports_only_the_core_pure_stdlib_pyiso8583_and_cryptography(name: str) -> None:
    path, tree = MODULES[name]
    bad = []
    for target, line in imports_of(name, path, tree, set(MODULES)):
        top = target.partition(".")[0]
        if top == ROOT:
            ok = in_layer(target, f"{ROOT}.core")
        elif top in sys.stdlib_module_names or top == "__future__":
            ok = top not in CORE_FORBIDDEN_STDLIB
        else:
            ok = top in CORE_ALLOWED_THIRD_PARTY
        if not ok:
            bad.append(f"{path.name}:{line} imports {target}")
    assert bad == []


@pytest.mark.parametrize("name", sorted(n for n in MODULES if in_layer(n, f"{ROOT}.core")))
def test_the_core_reads_no_clock_and_opens_no_file(name: str) -> None:
    path, tree = MODULES[name]
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            fn = node.func
            called = fn.attr if isinstance(fn, ast.Attribute) else fn.id if isinstance(fn, ast.Name) else None
            if called in CORE_FORBIDDEN_CALLS:
                bad.append(f"{path.name}:{node.lineno} calls {called}()")
    assert bad == []


def test_security_imports_only_the_core_the_stdlib_and_cryptography() -> None:
    bad = []
    for name in sorted(n for n in MODULES if in_layer(n, f"{ROOT}.security")):
        path, tree = MODULES[name]
        for target, line in imports_of(name, path, tree, set(MODULES)):
            top = target.partition(".")[0]
            ok = (in_layer(target, f"{ROOT}.core") or in_layer(target, f"{ROOT}.security")
                  if top == ROOT else top in sys.stdlib_module_names or top in ("__future__", "cryptography", "pkcs11"))
            if not ok:
                bad.append(f"{name}:{line} imports {target}")
    assert bad == []


def test_the_journal_never_imports_the_network_side_or_the_application() -> None:
    bad = [(a, b) for a, b in edges_from(f"{ROOT}.journal") if in_layer(b, f"{ROOT}.net") or is_application(b)]
    assert bad == []


def test_the_network_side_never_imports_the_application() -> None:
    bad = [(a, b) for a, b in edges_from(f"{ROOT}.net") if is_application(b)]
    assert bad == []


def test_the_shell_helpers_import_neither_the_network_side_the_journal_nor_the_application() -> None:
    bad = [
        (a, b) for a in sorted(SHELL_HELPERS) for b in sorted(GRAPH.get(a, ()))
        if in_layer(b, f"{ROOT}.net") or in_layer(b, f"{ROOT}.journal") or is_application(b)
    ]
    assert bad == []
