"""What the gateway writes (journal, its -wal and -shm, log segments, key, log file) is its owner's only,
from the moment it is created, whatever umask the gateway was started with."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import trio

from conftest import wait_for, write_daemon_config
from iso_gateway.sim.client import FrontEndClient, sample_auth
from iso_gateway.sim.integrity import free_port
from iso_gateway.sim.switch import SwitchSimulator


def modes(folder: Path) -> dict[str, int]:
    """Permission bits of ``folder`` and everything under it (files that vanish meanwhile skipped)."""
    out = {".": stat.S_IMODE(folder.stat().st_mode)}
    for path in folder.rglob("*"):
        try:
            out[str(path.relative_to(folder))] = stat.S_IMODE(path.stat().st_mode)
        except FileNotFoundError:
            pass  # a log segment written and deleted meanwhile
    return out


def assert_private(found: dict[str, int], folder: Path) -> None:
    wrong = {name: oct(mode) for name, mode in found.items()
             if mode != (0o700 if (folder / name).is_dir() or name == "." else 0o600)}
    assert not wrong, f"readable by others: {wrong}"


async def test_a_fresh_daemon_creates_its_state_folder_0700_and_every_file_0600(nursery, tmp_path):
    sim = SwitchSimulator()
    switch_port = await nursery.start(sim.serve, "127.0.0.1", 0)
    port = free_port()
    state = tmp_path / "srv" / "var"  # does not exist yet: the daemon makes it
    log_file = state / "gw.log"
    cfg = write_daemon_config(tmp_path / "gw.toml", switch_port, port=port, log_file=log_file, state_dir=state)
    old = os.umask(0o022)  # the usual umask, which would leave files 0644 and folders 0755
    try:
        proc = await trio.lowlevel.open_process([sys.executable, "-m", "iso_gateway", "run", "--config", str(cfg)],
                                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    finally:
        os.umask(old)
    try:
        client = None
        with trio.move_on_after(15):
            while client is None:
                try:
                    client = await FrontEndClient.connect("127.0.0.1", port, "iso87ascii", "ascii4")
                except OSError:
                    await trio.sleep(0.05)
        assert client is not None, "the daemon never listened"
        approved = 0
        for stan in range(1, 400):
            approved += (await client.request(sample_auth(stan, 15000), timeout=3))["39"] == "00"
            if approved >= 5:
                break
            await trio.sleep(0.02)
        assert approved >= 5
        names = set()

        def everything_there() -> bool:
            names.update(modes(state))
            return {"journal.sqlite3", "journal.sqlite3-wal", "journal.sqlite3-shm", "keys.bin", "gw.log"} <= names

        await wait_for(everything_there, 10, "the journal, its -wal and -shm, the key file and the log")
        assert_private(modes(state), state)
        await client.aclose()
    finally:
        proc.send_signal(signal.SIGTERM)
        with trio.move_on_after(10):
            await proc.wait()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert_private(modes(state), state)


async def test_an_in_process_gateway_creates_private_files_even_under_a_lax_umask(harness, tmp_path):
    """Not the umask alone: the journal file is created 0600 before SQLite opens it, so its -wal
    and -shm (SQLite gives them the database's mode) are never readable by others."""
    harness.state_dir = tmp_path / "fresh" / "var"
    old = os.umask(0o022)
    try:
        await harness.start_switch()
        gw = await harness.start_gateway()
        client = await harness.client()
        assert (await client.request(harness.auth(15000), timeout=3))["39"] == "00"
        state = Path(gw.config.journal.path).parent
        await wait_for(lambda: {"journal.sqlite3-wal", "journal.sqlite3-shm"} <= set(modes(state)), 5, "-wal, -shm")
        assert_private(modes(state), state)
    finally:
        os.umask(old)
