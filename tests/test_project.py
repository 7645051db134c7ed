"""What the project writes once: its version (pyproject.toml) and its command names (the parser)."""

from __future__ import annotations

import argparse
import re
import tomllib
from pathlib import Path

import pytest

import iso_gateway
from iso_gateway.cli import build_parser, main

ROOT = Path(__file__).resolve().parent.parent


def _pyproject_version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def test_the_version_is_written_once_in_pyproject_toml_and_read_at_run_time() -> None:
    version = _pyproject_version()
    assert iso_gateway.__version__ == version, "pyproject.toml's version changed: reinstall (pip install -e .)"
    quoted = re.compile(r"""["']""" + re.escape(version) + r"""["']""")
    written = [str(p.relative_to(ROOT)) for p in (ROOT / "iso_gateway").rglob("*.py") if quoted.search(p.read_text())]
    assert written == [], "the version is written in pyproject.toml only"


def test_the_version_option_prints_the_installed_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"iso-gateway {_pyproject_version()}"


def _commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> dict[tuple[str, ...], argparse.ArgumentParser]:
    """Every leaf command the parser accepts (``("saf", "retry")``...), with its parser."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        return {path: parser}
    found: dict[tuple[str, ...], argparse.ArgumentParser] = {}
    for name, child in subs[0].choices.items():
        found.update(_commands(child, path + (name,)))
    return found


def test_every_command_the_parser_accepts_names_its_own_handler() -> None:
    commands = _commands(build_parser())
    assert len(commands) >= 10
    for path, parser in commands.items():
        assert callable(parser.get_default("handler")), f"iso-gateway {' '.join(path)} has no handler"


def _readme_commands() -> set[tuple[str, ...]]:
    """The commands in the README's Commands table: `iso-gateway saf list\\|retry\\|park ...` gives three."""
    text = (ROOT / "README.md").read_text()
    table = text.split("## Commands", 1)[1].split("\n\n", 2)[1]
    found: set[tuple[str, ...]] = set()
    for cell in re.findall(r"^\| `iso-gateway ([^`]*)`", table, flags=re.M):
        words = [w for w in cell.split() if re.fullmatch(r"[a-z][a-z\-\\|]*", w)]
        first, rest = words[0], words[1:2]
        for second in (rest[0].split("\\|") if rest else [None]):
            found.add((first,) if second is None else (first, second))
    return found


def test_the_readme_command_table_lists_exactly_the_commands_the_parser_accepts() -> None:
    assert _readme_commands() == set(_commands(build_parser()))
