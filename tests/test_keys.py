"""The daemon's keys live in the security module: the journal seals under its data keys, rotation
keeps old records open, an old pan.key is migrated, the KEK never sits in the state folder, and no
key (nor a PAN) shows in anything the gateway writes. Software module and PKCS#11 (SoftHSM2)."""

from __future__ import annotations

import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio
from cryptography.exceptions import InvalidTag
from prometheus_client import generate_latest

from conftest import TEST_PAN, make_config, wait_for, write_daemon_config
from iso_gateway.cli import main
from iso_gateway.config import load_config
from iso_gateway.core.errors import ConfigError
from iso_gateway.journal import Journal, new_id
from iso_gateway.keys import open_security_module
from iso_gateway.security.module import SecurityModule, parse_sealed
from iso_gateway.security.pan import RING_MAGIC, PanVault
from iso_gateway.security.software import load_kek
from iso_gateway.sim.client import FrontEndClient, sample_auth
from iso_gateway.sim.integrity import free_port
from softhsm import Token, make_token, softhsm_missing, wipe

FAST_SAF = {"saf_first_delay": 0.0, "saf_retry_initial": 0.1, "saf_retry_max": 0.2, "reversal_timeout": 3.0}
LEGACY_KEY = bytes(range(32))
# The simulator answers amounts ending in 99 after digits [-4:-2] x 0.1 s: 1.5 s, past the route's
# 1 s timeout; the front end hears 91 and the reversal (same amount) is acknowledged 1.5 s later.
TOO_LATE = 101599


@pytest.fixture(scope="session")
def softhsm_token(tmp_path_factory: pytest.TempPathFactory) -> Token:
    why = softhsm_missing()
    if why:
        pytest.skip(why)
    return make_token(tmp_path_factory.mktemp("softhsm"))


@pytest.fixture(autouse=True)
def no_key_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("ISO_GATEWAY_KEK", "ISO_GATEWAY_PAN_KEY", "ISO_GATEWAY_PKCS11_PIN"):
        monkeypatch.delenv(var, raising=False)


def secret_file(path: Path, text: str) -> Path:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text + "\n")
    return path


def security_section(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> dict[str, Any]:
    """[security] for ``kind``; its KEK or PIN file in tmp_path/secrets, outside the state folder (tmp_path/var)."""
    if kind == "software":
        return {"module": "software", "kek_file": str(tmp_path / "secrets" / "kek.hex")}
    token: Token = request.getfixturevalue("softhsm_token")
    wipe(token)
    pin = secret_file(tmp_path / "secrets" / "pin", token.pin)
    return {"module": "pkcs11", "library": token.library, "token_label": token.label, "pin_file": str(pin)}


def key_material(vault: PanVault, kek_file: Path | None) -> list[bytes]:
    """Every key that protects the journal: the vault's master keys (for the software module, the data
    keys themselves), and the KEK."""
    exported = vault.export_key()
    ring = json.loads(exported[len(RING_MAGIC):])["keys"] if exported.startswith(RING_MAGIC) else {"": exported.hex()}
    keys = [bytes.fromhex(v) for v in ring.values()]
    if kek_file is not None and kek_file.exists():
        keys.append(bytes.fromhex(kek_file.read_text().strip()))
    return keys


def reveals(data: bytes, keys: list[bytes]) -> list[str]:
    """Which of ``keys`` appear in ``data``: as bytes, or as hex in either case, whole or either half."""
    found = []
    low = data.lower()
    for k in keys:
        half = len(k) // 2
        for needle in (k, k.hex().encode(), k[:half].hex().encode(), k[half:].hex().encode()):
            if needle in data or needle in low:  # hex in either case (``low``)
                found.append(k[:2].hex() + "...")
                break
    return found


def state_bytes(state: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(state.rglob("*")) if p.is_file())


def sealed_blobs(db: Path) -> tuple[list[bytes], list[bytes]]:
    conn = sqlite3.connect(db)
    try:
        txns = [r[0] for r in conn.execute("SELECT original FROM txn WHERE original IS NOT NULL")]
        safs = [r[0] for r in conn.execute("SELECT message FROM saf WHERE message IS NOT NULL ORDER BY id")]
    finally:
        conn.close()
    return txns, safs


def count(db: Path, table: str) -> int:
    conn = sqlite3.connect(db)
    try:
        return conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
    finally:
        conn.close()


async def stop(gw: Any) -> None:
    """Stop an in-process gateway and close its module (a token's login lasts while a session is open)."""
    gw.stop()
    await gw.wait_stopped()
    if gw.security is not None:
        gw.security.close()


async def approve(client: FrontEndClient, harness: Any, n: int) -> None:
    for _ in range(n):
        assert (await client.request(harness.auth(15000), timeout=5))["39"] == "00"


@pytest.mark.parametrize("kind", ["software", "pkcs11"])
async def test_the_journal_seals_under_the_modules_data_keys_and_a_rotation_mid_run_keeps_old_records_open(
        harness: Any, tmp_path: Path, kind: str, request: pytest.FixtureRequest,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="iso_gateway")
    harness.state_dir = state = tmp_path / "var"
    section = security_section(kind, tmp_path, request)
    sim = await harness.start_switch()
    gw = await harness.start_gateway(security=section, upstream=FAST_SAF)
    assert isinstance(gw.security, SecurityModule) and gw.security.data_key_id == "1"
    assert "key check values (start): current data key 1" in caplog.text
    client = await harness.client()
    await approve(client, harness, 5)
    first = harness.auth(TOO_LATE)
    assert (await client.request(first, timeout=5))["39"] == "91"
    await wait_for(lambda: any(r.mti == "0420" and r.rrn == first["37"] and r.response_code == "00"
                               for r in sim.records), 10, "the first reversal, built from sealed data, acknowledged")

    assert gw.keys is not None
    gw.keys.rotate_data_key("2")  # mid-run: the journal, its log and its indexer process seal under key 2 from now on
    assert gw.security.data_key_id == "2" and "key check values (data key rotated): current data key 2" in caplog.text
    await approve(client, harness, 5)
    second = harness.auth(TOO_LATE)
    assert (await client.request(second, timeout=5))["39"] == "91"
    await wait_for(lambda: any(r.mti == "0420" and r.rrn == second["37"] and r.response_code == "00"
                               for r in sim.records), 10, "the second reversal, sealed under the new key")
    db = state / "journal.sqlite3"
    await wait_for(lambda: count(db, "txn") == 12, 10, "every transaction written by the indexer")
    txns, safs = sealed_blobs(db)
    ids = [parse_sealed(b)[0] for b in txns]  # type: ignore[index]
    assert set(ids) == {"1", "2"}, ids  # rows written before and after the rotation, by the indexer process
    assert [parse_sealed(b)[0] for b in safs] == ["1", "2"]  # type: ignore[index]
    vault = gw.journal.store.vault
    assert all(vault.open(b)["2"] == TEST_PAN for b in txns) and len(safs) == 2
    metrics_text = generate_latest(gw.metrics.registry)
    await stop(gw)

    # A new process (here: a new gateway) opens both generations with the keys from the module.
    gw2 = await harness.start_gateway(security=section, upstream=FAST_SAF)
    assert gw2.security is not None and gw2.security.data_key_id == "2"
    assert all(gw2.journal.store.vault.open(b)["2"] == TEST_PAN for b in txns)
    assert all(gw2.journal.store.vault.open(b) for b in safs)
    keys = key_material(gw2.journal.store.vault, tmp_path / "secrets" / "kek.hex" if kind == "software" else None)
    await stop(gw2)

    # Nothing at rest shows a PAN or a key; nor does anything the gateway logged or counted.
    at_rest = state_bytes(state)
    assert TEST_PAN.encode() not in at_rest
    assert reveals(at_rest, keys) == []
    assert reveals(caplog.text.encode(), keys) == [] and TEST_PAN not in caplog.text
    assert reveals(metrics_text, keys) == []
    # Without the KEK (or the PIN), nothing opens.
    config = make_config(harness.switch_port, state_dir=state, security=section)
    if kind == "software":
        (tmp_path / "secrets" / "kek.hex").rename(tmp_path / "kek.elsewhere")
        with pytest.raises(ConfigError, match="security.kek_file.*no KEK file") as exc:
            open_security_module(config)
        secret_file(tmp_path / "secrets" / "kek.hex", os.urandom(32).hex())  # a wrong one
        with pytest.raises(ConfigError, match="does not open under the key-encrypting key"):
            open_security_module(config)
    else:
        (tmp_path / "secrets" / "pin").unlink()
        secret_file(tmp_path / "secrets" / "pin", "000000")
        with pytest.raises(ConfigError, match="PIN was refused") as exc:
            open_security_module(config)
        assert reveals(str(exc.value).encode(), keys) == []
    stranger = PanVault(os.urandom(32), key_id="1", retired={"2": os.urandom(32)})
    for blob in txns + safs:
        with pytest.raises(InvalidTag):
            stranger.open(blob)


def test_a_kek_file_inside_the_state_folder_is_refused_with_the_file_the_key_and_the_reason(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "var"
    kek = secret_file(state / "kek.hex", os.urandom(32).hex())
    cfg = write_daemon_config(tmp_path / "gw.toml", 9583, port=free_port(), state_dir=state,
                              security={"kek_file": str(kek)})
    with pytest.raises(ConfigError) as exc:
        open_security_module(load_config(cfg), str(cfg))
    assert exc.value.source == str(cfg) and exc.value.where == "security.kek_file"
    assert "inside the state directory" in exc.value.reason
    assert main(["check-config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert str(cfg) in err and "security.kek_file" in err and "inside the state directory" in err
    # The daemon refuses to start with it (exit 2: a configuration it refused).
    proc = subprocess.run([sys.executable, "-m", "iso_gateway", "run", "--config", str(cfg)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "security.kek_file" in proc.stderr
    # The development default too, when the user's configuration folder is inside the state folder.
    monkeypatch.setenv("XDG_CONFIG_HOME", str(state / "conf"))
    cfg2 = write_daemon_config(tmp_path / "gw2.toml", 9583, port=free_port(), state_dir=state)
    with pytest.raises(ConfigError, match=r"security.kek_file \(default\).*inside the state directory"):
        open_security_module(load_config(cfg2), str(cfg2))
    assert reveals(err.encode() + proc.stderr.encode(), [bytes.fromhex(kek.read_text().strip())]) == []


@pytest.mark.parametrize("kind", ["software", "pkcs11"])
async def test_an_old_pan_key_is_imported_once_and_what_it_sealed_is_still_reversed(
        harness: Any, tmp_path: Path, kind: str, request: pytest.FixtureRequest,
        caplog: pytest.LogCaptureFixture) -> None:
    """A gateway of an older version crashed with a transaction in flight, sealed under var/pan.key:
    the new one imports that key as a retired data key, replays the log, and reverses it."""
    caplog.set_level(logging.INFO, logger="iso_gateway")
    harness.state_dir = state = tmp_path / "var"
    legacy = secret_file(state / "pan.key", LEGACY_KEY.hex())
    old = Journal(str(state / "journal.sqlite3"), PanVault(LEGACY_KEY))  # the old version's vault
    original = sample_auth(4242, 15000)
    original["37"] = "000000004242"
    old.record_txn({"id": new_id(), "listener": "ecom", "mti": "0100", "upstream": "cmi", "link": 0,
                    "upstream_stan": "400001"}, original)
    assert old.txlog is not None
    old.txlog.close()  # then it dies, its transaction sent and unanswered
    old._conn.close()

    section = security_section(kind, tmp_path, request)
    sim = await harness.start_switch()
    gw = await harness.start_gateway(security=section, upstream=FAST_SAF, journal={"key_file": str(legacy)})
    await wait_for(lambda: any(r.mti in ("0420", "0421") and r.rrn == "000000004242" and r.response_code == "00"
                               for r in sim.records), 10, "the in-doubt transaction reversed")
    legacy_id = PanVault(LEGACY_KEY).key_id
    assert gw.security is not None and gw.security.data_key_id == "1"
    assert f"data/{legacy_id}" in gw.security.check_values()
    assert f"imported into the security module as retired data key {legacy_id}" in caplog.text
    assert legacy.exists()  # the operator's file: never deleted behind his back
    txns, _ = sealed_blobs(state / "journal.sqlite3")
    assert [parse_sealed(b)[0] for b in txns] == ["1"]  # type: ignore[index]  # re-sealed by the replay
    # The lookup hash stays the old key's: rows before and after the migration compare.
    assert gw.journal.store.vault.pan_hash(TEST_PAN) == PanVault(LEGACY_KEY).pan_hash(TEST_PAN)
    await stop(gw)

    caplog.clear()
    gw = await harness.start_gateway(security=section, upstream=FAST_SAF, journal={"key_file": str(legacy)})
    assert "is already in the security module" in caplog.text and "imported into" not in caplog.text
    # An old blob still opens, from the module alone (the file gone).
    blob = PanVault(LEGACY_KEY).seal({"2": TEST_PAN})
    await stop(gw)
    legacy.rename(tmp_path / "pan.key.backup")
    gw = await harness.start_gateway(security=section, upstream=FAST_SAF, journal={"key_file": str(legacy)})
    assert gw.journal.store.vault.open(blob) == {"2": TEST_PAN}
    assert reveals(caplog.text.encode(), [LEGACY_KEY]) == []
    if kind == "software":
        assert reveals((state / "keys.bin").read_bytes(), [LEGACY_KEY]) == []  # sealed under the KEK
    await stop(gw)


async def test_without_a_journal_or_a_security_section_the_gateway_holds_no_keys(harness: Any, tmp_path: Path) -> None:
    harness.state_dir = tmp_path / "var"
    await harness.start_switch()
    gw = await harness.start_gateway(journal={"enabled": False})
    assert gw.security is None and gw.keys is None
    assert not (tmp_path / "var" / "keys.bin").exists()
    await stop(gw)


def test_the_keys_commands_set_up_show_rotate_and_import_keys_without_printing_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    state, kek = tmp_path / "var", tmp_path / "etc" / "kek.hex"
    cfg = write_daemon_config(tmp_path / "gw.toml", 9583, port=free_port(), state_dir=state,
                              security={"kek_file": str(kek), "create": False})
    assert main(["keys", "check-values", "--config", str(cfg)]) == 2  # nothing set up yet, and create = false
    assert "security.kek_file" in capsys.readouterr().err
    assert main(["keys", "init", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert (state / "keys.bin").exists() and kek.exists() and "data key 1: check value" in out
    assert kek.stat().st_mode & 0o077 == 0 and (state / "keys.bin").stat().st_mode & 0o077 == 0
    assert main(["keys", "init", "--config", str(cfg)]) == 1  # never replaces a key file
    assert "exists already" in capsys.readouterr().err

    assert main(["keys", "rotate-data-key", "--config", str(cfg)]) == 0
    assert "data key 2 is current" in capsys.readouterr().out
    assert main(["keys", "rotate-data-key", "--config", str(cfg), "--key-id", "2"]) == 1  # ids are never reused
    assert "exists already" in capsys.readouterr().err

    zone = bytes.fromhex("89ABCDEF01234567" "76543210FEDCBA98")
    monkeypatch.setenv("ZONE_KEY", zone.hex())
    assert main(["keys", "import", "--config", str(cfg), "cmi.zmk", "--value-env", "ZONE_KEY", "--kcv", "000000"]) == 1
    bad = capsys.readouterr().err
    assert "does not match" in bad and "not imported" in bad
    from iso_gateway.security.mac import tdes_check_value

    kcv = tdes_check_value(zone).hex().upper()
    assert main(["keys", "import", "--config", str(cfg), "cmi.zmk", "--value-env", "ZONE_KEY", "--kcv", kcv]) == 0
    assert f"check value {kcv}" in capsys.readouterr().out
    assert main(["keys", "check-values", "--config", str(cfg)]) == 0
    listing = capsys.readouterr()
    assert "current data key: 2" in listing.out and "cmi.zmk" in listing.out and kcv in listing.out
    assert "data/1" in listing.out and "data/2" in listing.out
    module = open_security_module(load_config(cfg), create=False)
    keys = key_material(module.pan_vault(), kek) + [zone]  # type: ignore[attr-defined]
    module.close()
    assert reveals((listing.out + bad + out).encode(), keys) == []
    assert reveals(state_bytes(state), keys) == []
    assert load_kek(state, kek).kcv  # the KEK file is usable as made (owner only, outside the state folder)


@pytest.mark.parametrize("kind", ["software", "pkcs11"])
async def test_a_running_daemon_takes_a_rotated_data_key_on_sighup_and_logs_no_key(
        nursery: trio.Nursery, tmp_path: Path, kind: str, request: pytest.FixtureRequest) -> None:
    from iso_gateway.sim.switch import SwitchSimulator

    state, log_file = tmp_path / "var", tmp_path / "gateway.log"
    section = security_section(kind, tmp_path, request)
    kek = tmp_path / "secrets" / "kek.hex" if kind == "software" else None
    sim = SwitchSimulator()
    switch_port = await nursery.start(sim.serve, "127.0.0.1", 0)
    port = free_port()
    cfg = write_daemon_config(tmp_path / "gw.toml", switch_port, port=port, log_file=log_file, state_dir=state,
                              security=section)
    proc = await trio.lowlevel.open_process([sys.executable, "-m", "iso_gateway", "run", "--config", str(cfg)],
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = None
        with trio.move_on_after(20):
            while client is None:
                try:
                    client = await FrontEndClient.connect("127.0.0.1", port, "iso87ascii", "ascii4")
                except OSError:
                    await trio.sleep(0.05)
        assert client is not None, "the daemon never listened"
        stan = 0

        async def approved(n: int) -> None:
            nonlocal stan
            done = 0
            while done < n:
                stan += 1
                done += (await client.request(sample_auth(stan, 15000), timeout=5))["39"] == "00"

        await approved(3)
        db = state / "journal.sqlite3"
        await wait_for(lambda: count(db, "txn") >= 3, 10, "the first rows written (sealed under key 1)")
        assert main(["keys", "rotate-data-key", "--config", str(cfg)]) == 0  # another process: the operator's
        proc.send_signal(signal.SIGHUP)
        await wait_for(lambda: "key check values (reload): current data key 2" in log_file.read_text(), 10,
                       "the reload's check values in the log")
        await approved(3)
        await wait_for(lambda: count(db, "txn") >= 6, 10, "the rows written")
        txns, _ = sealed_blobs(db)
        assert {parse_sealed(b)[0] for b in txns} == {"1", "2"}  # type: ignore[index]
        await client.aclose()
    finally:
        proc.send_signal(signal.SIGTERM)
        with trio.move_on_after(10):
            await proc.wait()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    module = open_security_module(load_config(cfg), create=False)
    vault = module.pan_vault()  # type: ignore[attr-defined]
    module.close()
    assert all(vault.open(b)["2"] == TEST_PAN for b in txns)
    keys = key_material(vault, kek)
    text = log_file.read_text()
    assert "key check values (start): current data key 1" in text
    assert (state / "keys.bin").exists() == (kind == "software")  # a token's keys are in the token
    assert reveals(text.encode(), keys) == [] and TEST_PAN not in text
    assert reveals(state_bytes(state), keys) == [] and TEST_PAN.encode() not in state_bytes(state)


def test_the_kek_may_come_from_the_environment_and_a_kek_file_others_can_read_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state, kek_value = tmp_path / "var", os.urandom(32)
    config = make_config(9583, state_dir=state, security={"kek_file": str(tmp_path / "etc" / "kek.hex")})
    monkeypatch.setenv("ISO_GATEWAY_KEK", kek_value.hex())
    module = open_security_module(config)
    assert module.data_key_id == "1" and not (tmp_path / "etc" / "kek.hex").exists()  # no file made: the env has it
    vault = module.pan_vault()
    module.close()
    monkeypatch.delenv("ISO_GATEWAY_KEK")
    with pytest.raises(ConfigError, match="security.kek_file.*can't be opened") as exc:
        open_security_module(config)  # the key file is there, its KEK is not: never a new one
    assert not (tmp_path / "etc" / "kek.hex").exists()
    lax = secret_file(tmp_path / "etc" / "kek.hex", kek_value.hex())
    lax.chmod(0o644)
    with pytest.raises(ConfigError, match="owner only") as exc2:
        open_security_module(config)
    lax.chmod(0o600)
    module = open_security_module(config)  # the same KEK from a file: the same keys
    assert module.pan_vault().key_id == vault.key_id
    module.close()
    keys = key_material(vault, lax)
    assert reveals(str(exc.value).encode() + str(exc2.value).encode(), keys) == []


def test_the_keys_commands_drive_a_pkcs11_token_too(tmp_path: Path, request: pytest.FixtureRequest,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    section = security_section("pkcs11", tmp_path, request)
    cfg = write_daemon_config(tmp_path / "gw.toml", 9583, port=free_port(), state_dir=tmp_path / "var",
                              security=section)
    assert main(["keys", "check-values", "--config", str(cfg)]) == 0
    assert "current data key: 1" in capsys.readouterr().out  # made in the token at first open
    assert main(["keys", "rotate-data-key", "--config", str(cfg)]) == 0
    assert "data key 2 is current" in capsys.readouterr().out
    assert main(["keys", "init", "--config", str(cfg)]) == 1
    assert "software module" in capsys.readouterr().err
    assert main(["keys", "check-values", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "current data key: 2" in out and "data/1" in out and "data/2" in out
    assert not (tmp_path / "var").exists()  # nothing of the keys in the state folder
