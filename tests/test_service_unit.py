"""deploy/systemd/iso-gateway.service agrees with the daemon it starts."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from iso_gateway.cli import EXIT_USAGE
from iso_gateway.config import load_config
from iso_gateway.daemon import fd_budget

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "deploy" / "systemd" / "iso-gateway.service"


def settings() -> dict[str, str]:
    out: dict[str, str] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", "[")):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def test_the_unit_restarts_a_crashed_daemon_but_not_a_refused_configuration():
    s = settings()
    assert s["Restart"] == "on-failure"
    assert s["RestartPreventExitStatus"] == str(EXIT_USAGE)  # what `run` returns for a bad configuration
    assert s["ExecReload"].endswith("-HUP $MAINPID")  # SIGHUP: reload routes, rules and limits
    assert s["UMask"] == "0077" and s["StateDirectoryMode"] == "0700"


def test_the_unit_allows_the_descriptors_the_shipped_configuration_may_need():
    assert int(settings()["LimitNOFILE"]) >= fd_budget(load_config(ROOT / "deploy" / "gateway.toml"))


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_finds_nothing_wrong_with_the_unit_but_the_binary_not_installed_here():
    proc = subprocess.run(["systemd-analyze", "verify", str(UNIT)], capture_output=True, text=True, timeout=60)
    problems = [line for line in (proc.stdout + proc.stderr).splitlines()
                if line.strip() and "is not executable" not in line and "No such file" not in line]
    assert not problems, problems
