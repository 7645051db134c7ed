"""The security module: the software implementation and the PKCS#11 one (on a throwaway SoftHSM2
token) pass the same suite; then what only the software module and the PAN vault do."""

from __future__ import annotations

import json
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from iso_gateway.core.errors import ConfigError
from iso_gateway.security.keys import KeyType, SecretKey, unwrap_working_key, wrap_working_key
from iso_gateway.security.mac import aes_check_value, aes_cmac, retail_mac, tdes_check_value
from iso_gateway.security.module import (
    KekUnavailable,
    KeyCheckError,
    KeyUsage,
    SealError,
    SecurityModule,
    SecurityModuleError,
    UnknownKey,
    parse_sealed,
)
from iso_gateway.security.pan import PanVault, _derive
from iso_gateway.security.software import KEK_ENV, Kek, SoftwareSecurityModule, load_kek, write_kek_file
from softhsm import Token, make_token, softhsm_missing, wipe

H = bytes.fromhex
RETAIL_KEY = H("0123456789ABCDEF" "FEDCBA9876543210")  # KCV 08D7B4
CMAC_KEY = H("2b7e151628aed2a6abf7158809cf4f3c")
TDES_ZMK = H("89ABCDEF01234567" "76543210FEDCBA98")
AES_ZMK = H("000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f")
WORKING_TDES = H("1C2B3A4958677685" "A1B2C3D4E5F60718")
WORKING_AES = H("f0e1d2c3b4a5968778695a4b3c2d1e0f")
ALL_KEYS = (RETAIL_KEY, CMAC_KEY, TDES_ZMK, AES_ZMK, WORKING_TDES, WORKING_AES)
MESSAGE = b"0200\xf2\x3a\x44\x81\x28\xe0\x80\x00" + b"4761739001010010" + b"000000001500" + b"123456"


def contains_key_material(text: str, keys: tuple[bytes, ...] = ALL_KEYS) -> bool:
    low = text.lower()
    return any(k.hex() in low or k[:8].hex() in low or k[-8:].hex() in low for k in keys)


# -- the two implementations ------------------------------------------------------------------


@pytest.fixture(scope="session")
def softhsm_token(tmp_path_factory: pytest.TempPathFactory) -> Token:
    """One token per test process: SoftHSM2 reads its config when its library is first loaded, so
    tokens made later elsewhere would not be seen. Each test wipes it (``wipe``) first."""
    why = softhsm_missing()
    if why:
        pytest.skip(why)
    return make_token(tmp_path_factory.mktemp("softhsm"))


def software_module(tmp_path: Path) -> SoftwareSecurityModule:
    kek = Kek(AES_ZMK[::-1], "test")
    return SoftwareSecurityModule(tmp_path / "state" / "keys.bin", kek, create=True)


@pytest.fixture(params=["software", "pkcs11"])
def module(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    if request.param == "software":
        m: Any = software_module(tmp_path)
    else:
        from iso_gateway.security.pkcs11 import Pkcs11SecurityModule

        token: Token = request.getfixturevalue("softhsm_token")
        wipe(token)
        m = Pkcs11SecurityModule(token.library, token_label=token.label, pin=token.pin, host_unwrap_fallback=True)
    m.import_key("link1.mac", RETAIL_KEY, usage=KeyUsage.MAC, algorithm="retail")
    m.import_key("link2.mac", CMAC_KEY, usage="mac", algorithm="aes-cmac")
    m.import_key("zmk.tdes", TDES_ZMK, usage="kek", key_type="tdes")
    m.import_key("zmk.aes", AES_ZMK, usage="kek", key_type="aes")
    try:
        yield m
    finally:
        m.close()


def test_both_implementations_are_security_modules(module: Any) -> None:
    assert isinstance(module, SecurityModule)


def test_macs_are_the_published_algorithms(module: Any) -> None:
    for data in (b"", b"Now is the time for all ", b"Now is the time for it", MESSAGE, MESSAGE * 9):
        assert module.mac("link1.mac", data) == retail_mac(RETAIL_KEY, data)
        assert module.mac("link1.mac", data, padding=2) == retail_mac(RETAIL_KEY, data, padding=2)
        assert module.mac("link2.mac", data) == aes_cmac(CMAC_KEY, data)
    assert module.mac("link1.mac", b"Now is the time for all ")[:4] == H("A1C72E74")


def test_verify_takes_the_full_mac_or_its_leftmost_bytes(module: Any) -> None:
    for label in ("link1.mac", "link2.mac"):
        mac = module.mac(label, MESSAGE)
        assert module.verify_mac(label, MESSAGE, mac)
        assert module.verify_mac(label, MESSAGE, mac[:8])
        assert module.verify_mac(label, MESSAGE, mac[:4])
        assert not module.verify_mac(label, MESSAGE, mac[:3])
        assert not module.verify_mac(label, MESSAGE + b"\1", mac[:8])
    # Padding method 1 can't tell trailing zero bytes from padding (docs/security.md): the framing,
    # not the MAC, fixes where a message ends. Method 2 and CMAC can.
    assert module.verify_mac("link1.mac", MESSAGE + b"\0", module.mac("link1.mac", MESSAGE))
    assert not module.verify_mac("link1.mac", MESSAGE + b"\0", module.mac("link1.mac", MESSAGE, padding=2), padding=2)
    assert not module.verify_mac("link2.mac", MESSAGE + b"\0", module.mac("link2.mac", MESSAGE))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(min_size=1, max_size=120), pos=st.integers(min_value=0), flip=st.integers(1, 255),
       in_mac=st.booleans())
def test_a_changed_byte_anywhere_fails_verification(module: Any, data: bytes, pos: int, flip: int, in_mac: bool) -> None:
    for label in ("link1.mac", "link2.mac"):
        mac = module.mac(label, data)[:8]
        if in_mac:
            i = pos % len(mac)
            assert not module.verify_mac(label, data, mac[:i] + bytes([mac[i] ^ flip]) + mac[i + 1:])
        else:
            i = pos % len(data)
            assert not module.verify_mac(label, data[:i] + bytes([data[i] ^ flip]) + data[i + 1:], mac)
        assert module.verify_mac(label, data, mac)


def test_unknown_labels_and_wrong_usages_are_refused(module: Any) -> None:
    with pytest.raises(UnknownKey):
        module.mac("nope", b"x")
    with pytest.raises(UnknownKey):
        module.mac("zmk.tdes", b"x")  # a zone key is no MAC key
    with pytest.raises(UnknownKey):
        module.check_value("nope")
    with pytest.raises(UnknownKey):
        module.install_key("w", kek="link1.mac", wrapped=bytes(16), check_value="000000", algorithm="retail")
    with pytest.raises(SecurityModuleError):
        module.import_key("bad", RETAIL_KEY[:15], usage="mac", algorithm="retail")


def test_mac_functions_compute_as_mac_does_until_a_key_changes(module: Any) -> None:
    """The transaction path's ``mac_function``: the same MACs as ``mac``; fetched again when
    ``mac_generation`` moves (a key installed), it uses the new key; unknown labels refused at once."""
    retail, retail2, cmac = (module.mac_function("link1.mac"), module.mac_function("link1.mac", padding=2),
                             module.mac_function("link2.mac"))
    for data in (b"", b"Now is the time for all ", MESSAGE, MESSAGE * 9):
        assert retail(data) == module.mac("link1.mac", data) == retail_mac(RETAIL_KEY, data)
        assert retail2(data) == module.mac("link1.mac", data, padding=2)
        assert cmac(data) == module.mac("link2.mac", data) == aes_cmac(CMAC_KEY, data)
    with pytest.raises(UnknownKey):
        module.mac_function("nope")
    with pytest.raises(UnknownKey):
        module.mac_function("zmk.tdes")  # a zone key is no MAC key
    generation = module.mac_generation
    wrapped, kcv = received("zmk.tdes", WORKING_TDES, "retail")
    module.install_key("link1.mac", kek="zmk.tdes", wrapped=wrapped, check_value=kcv, algorithm="retail")
    if module.mac_generation == generation:  # a function that finds its key per call (the token's)
        assert retail(MESSAGE) == retail_mac(WORKING_TDES, MESSAGE)
    assert module.mac_function("link1.mac")(MESSAGE) == retail_mac(WORKING_TDES, MESSAGE)


def test_check_values(module: Any) -> None:
    assert module.check_value("link1.mac") == "08D7B4"
    assert module.check_value("link2.mac") == aes_check_value(CMAC_KEY).hex().upper()
    assert module.check_value("zmk.tdes") == tdes_check_value(TDES_ZMK).hex().upper()
    assert module.check_value("zmk.aes") == aes_check_value(AES_ZMK).hex().upper()
    kcvs = module.check_values()
    assert {"link1.mac", "link2.mac", "zmk.tdes", "zmk.aes", f"data/{module.data_key_id}"} <= set(kcvs)
    assert kcvs["link1.mac"] == "08D7B4"
    assert all(len(v) == 6 for v in kcvs.values())
    assert not contains_key_material(repr(kcvs))


def received(zmk_label: str, working: bytes, algorithm: str) -> tuple[bytes, str]:
    """What a switch sends: the working key under the zone key, and its check value in hex."""
    zmk = SecretKey(TDES_ZMK, usage=KeyUsage.KEK, key_type=KeyType.TDES) if zmk_label == "zmk.tdes" \
        else SecretKey(AES_ZMK, usage=KeyUsage.KEK, key_type=KeyType.AES)
    kcv = tdes_check_value(working) if algorithm == "retail" else aes_check_value(working)
    return wrap_working_key(zmk, working), kcv.hex().upper()


@pytest.mark.parametrize(("zmk", "algorithm", "working"), [
    ("zmk.tdes", "retail", WORKING_TDES),
    ("zmk.aes", "aes-cmac", WORKING_AES),
    ("zmk.tdes", "aes-cmac", WORKING_AES),
])
def test_a_working_key_with_a_good_check_value_is_installed_and_used(module: Any, zmk: str, algorithm: str,
                                                                     working: bytes) -> None:
    wrapped, kcv = received(zmk, working, algorithm)
    assert working.hex() not in wrapped.hex()
    assert module.install_key("link1.mac", kek=zmk, wrapped=wrapped, check_value=kcv, algorithm=algorithm) == kcv
    expected = retail_mac(working, MESSAGE) if algorithm == "retail" else aes_cmac(working, MESSAGE)
    assert module.mac("link1.mac", MESSAGE) == expected
    assert module.check_value("link1.mac") == kcv
    assert module.check_values()["link1.mac"] == kcv
    # A shorter check value, as bytes, is fine too; the key replaces the one of that label.
    assert module.install_key("link1.mac", kek=zmk, wrapped=wrapped, check_value=bytes.fromhex(kcv)[:2],
                              algorithm=algorithm) == kcv


@pytest.mark.parametrize(("zmk", "algorithm", "working"), [
    ("zmk.tdes", "retail", WORKING_TDES),
    ("zmk.aes", "aes-cmac", WORKING_AES),
])
def test_a_working_key_with_a_bad_check_value_is_not_installed(module: Any, zmk: str, algorithm: str,
                                                               working: bytes) -> None:
    wrapped, kcv = received(zmk, working, algorithm)
    before = module.mac("link1.mac", MESSAGE)
    bad = f"{(int(kcv, 16) ^ 1):06X}"
    with pytest.raises(KeyCheckError) as info:
        module.install_key("link1.mac", kek=zmk, wrapped=wrapped, check_value=bad, algorithm=algorithm)
    assert not contains_key_material(str(info.value)) and not contains_key_material(repr(info.value))
    assert module.mac("link1.mac", MESSAGE) == before  # the old key stays
    with pytest.raises(KeyCheckError):
        module.install_key("new.mac", kek=zmk, wrapped=wrapped, check_value=bad, algorithm=algorithm)
    with pytest.raises(UnknownKey):
        module.mac("new.mac", MESSAGE)  # nothing half-installed
    assert "new.mac" not in module.check_values()


def test_a_working_key_under_the_wrong_zone_key_fails_its_check(module: Any) -> None:
    wrapped, kcv = received("zmk.tdes", WORKING_TDES, "retail")
    module.import_key("zmk.other", TDES_ZMK[::-1], usage="kek", key_type="tdes")
    with pytest.raises(KeyCheckError):
        module.install_key("link1.mac", kek="zmk.other", wrapped=wrapped, check_value=kcv, algorithm="retail")
    wrapped_aes, kcv_aes = received("zmk.aes", WORKING_AES, "aes-cmac")
    with pytest.raises(SecurityModuleError):  # AES key wrap checks its integrity itself
        module.install_key("link2.mac", kek="zmk.aes", wrapped=wrapped_aes[:-1] + b"\0", check_value=kcv_aes,
                           algorithm="aes-cmac")


def test_data_keys_seal_with_their_id_and_rotation_keeps_old_records_readable(module: Any) -> None:
    first = module.data_key_id
    old = module.seal(b"4761739001010010", b"txn-1")
    assert b"4761739001010010" not in old
    assert parse_sealed(old) is not None and parse_sealed(old)[0] == first  # type: ignore[index]
    kcv = module.rotate_data_key("2026-12")
    assert module.data_key_id == "2026-12"
    assert len(kcv) == 6 and module.check_values()["data/2026-12"] == kcv
    new = module.seal(b"5100000000000008")
    assert parse_sealed(new)[0] == "2026-12"  # type: ignore[index]
    assert module.open(old, b"txn-1") == b"4761739001010010"
    assert module.open(new) == b"5100000000000008"
    with pytest.raises(SecurityModuleError):
        module.rotate_data_key("2026-12")  # ids are never reused
    with pytest.raises(SealError):
        module.open(old, b"txn-2")  # associated data bound
    with pytest.raises(SealError):
        module.open(old[:-1] + bytes([old[-1] ^ 1]), b"txn-1")
    with pytest.raises(SealError):
        module.open(b"\xa5\x05other" + old[len(first) + 2:], b"txn-1")  # an id it does not hold
    with pytest.raises(SealError):
        module.open(b"junk")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pos=st.integers(min_value=0), flip=st.integers(1, 255))
def test_a_changed_byte_anywhere_in_a_sealed_record_is_refused(module: Any, pos: int, flip: int) -> None:
    blob = module.seal(b"record", b"aad")
    i = pos % len(blob)
    with pytest.raises(SealError):
        module.open(blob[:i] + bytes([blob[i] ^ flip]) + blob[i + 1:], b"aad")


def test_nothing_shows_key_material(module: Any) -> None:
    texts = [repr(module), str(module), repr(module.check_values())]
    for call in (lambda: module.mac("missing", b""),
                 lambda: module.install_key("x", kek="zmk.tdes", wrapped=bytes(16), check_value="000000",
                                            algorithm="retail"),
                 lambda: module.open(module.seal(b"x")[:-1])):
        with pytest.raises(SecurityModuleError) as info:
            call()
        texts += [str(info.value), repr(info.value)]
    for text in texts:
        assert not contains_key_material(text), text


def test_keys_persist_across_a_reopen(module: Any, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    blob = module.seal(b"kept")
    wrapped, kcv = received("zmk.tdes", WORKING_TDES, "retail")
    module.install_key("link9.mac", kek="zmk.tdes", wrapped=wrapped, check_value=kcv, algorithm="retail")
    kid = module.data_key_id
    module.close()
    if isinstance(module, SoftwareSecurityModule):
        again: Any = SoftwareSecurityModule(tmp_path / "state" / "keys.bin", Kek(AES_ZMK[::-1], "test"))
    else:
        from iso_gateway.security.pkcs11 import Pkcs11SecurityModule

        token: Token = request.getfixturevalue("softhsm_token")
        again = Pkcs11SecurityModule(token.library, token_label=token.label, pin=token.pin)
    try:
        assert again.data_key_id == kid
        assert again.open(blob) == b"kept"
        assert again.mac("link9.mac", MESSAGE) == retail_mac(WORKING_TDES, MESSAGE)
        assert again.check_value("link1.mac") == "08D7B4"
    finally:
        again.close()


def test_without_the_kek_nothing_decrypts(module: Any, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    blob = module.seal(b"4761739001010010")
    module.close()
    if isinstance(module, SoftwareSecurityModule):
        path = tmp_path / "state" / "keys.bin"
        raw = path.read_bytes()
        assert not contains_key_material(raw.hex()) and b"08D7B4" not in raw
        with pytest.raises(KekUnavailable):
            load_kek(tmp_path / "state", None, env={})
        with pytest.raises(KekUnavailable) as info:
            SoftwareSecurityModule(path, Kek(secrets.token_bytes(32), "a wrong one"))
        assert not contains_key_material(str(info.value))
    else:
        from iso_gateway.security.pkcs11 import Pkcs11SecurityModule

        token: Token = request.getfixturevalue("softhsm_token")
        with pytest.raises(KekUnavailable) as info:
            Pkcs11SecurityModule(token.library, token_label=token.label, pin="000000")
        assert "000000" not in str(info.value) and token.pin not in str(info.value)
    # And a module with other keys does not open it either.
    with pytest.raises(SealError):
        software_module(tmp_path / "elsewhere").open(blob)


# -- what only the software module does ----------------------------------------------------------


def test_the_key_file_is_owner_only_and_written_whole(tmp_path: Path) -> None:
    m = software_module(tmp_path)
    path = tmp_path / "state" / "keys.bin"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    m.rotate_data_key("2")
    m.import_key("link1.mac", RETAIL_KEY, usage="mac", algorithm="retail")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in path.parent.iterdir()) == ["keys.bin"]  # no temporary file left behind
    with pytest.raises(SecurityModuleError):
        SoftwareSecurityModule(tmp_path / "none.bin", Kek(AES_ZMK, "t"))  # no file and not asked to create


def test_the_kek_comes_from_the_environment_or_a_file_outside_the_state_directory(tmp_path: Path,
                                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    state = tmp_path / "state"
    state.mkdir()
    inside = state / "kek.hex"
    write_kek_file(inside)
    with pytest.raises(ConfigError, match="inside the state directory"):
        load_kek(state, inside, env={})
    os.symlink(inside, tmp_path / "link.hex")  # a way in by symlink is still inside
    with pytest.raises(ConfigError, match="inside the state directory"):
        load_kek(state, tmp_path / "link.hex", env={})
    outside = tmp_path / "secrets" / "kek.hex"
    outside.parent.mkdir()
    write_kek_file(outside)
    assert stat.S_IMODE(outside.stat().st_mode) == 0o600
    kek = load_kek(state, outside, env={})
    assert not contains_key_material(repr(kek), (H(outside.read_text().strip()),))
    outside.chmod(0o644)
    with pytest.raises(ConfigError, match="owner only"):
        load_kek(state, outside, env={})
    with pytest.raises(KekUnavailable):
        load_kek(state, tmp_path / "missing.hex", env={})
    monkeypatch.setenv(KEK_ENV, AES_ZMK.hex())
    assert load_kek(state, None).source == KEK_ENV
    with pytest.raises(ConfigError):
        load_kek(state, None, env={KEK_ENV: "zz"})
    with pytest.raises(KekUnavailable):
        load_kek(state, None, env={KEK_ENV: "00" * 16})
    m = SoftwareSecurityModule.from_environment(state / "keys.bin", state, create=True)
    assert m.open(m.seal(b"x")) == b"x"


def test_secret_key_objects_are_not_shown_nor_pickled() -> None:
    import pickle

    key = SecretKey(RETAIL_KEY, usage=KeyUsage.MAC, key_type=KeyType.TDES, algorithm="retail")
    assert "08D7B4" in repr(key) and not contains_key_material(repr(key) + str(key) + f"{key}")
    with pytest.raises(TypeError):
        pickle.dumps(key)
    with pytest.raises(TypeError):
        pickle.dumps(Kek(AES_ZMK, "t"))


def test_working_keys_under_a_tdes_zone_key_are_ecb_block_by_block() -> None:
    zmk = SecretKey(TDES_ZMK, usage=KeyUsage.KEK, key_type=KeyType.TDES)
    wrapped = wrap_working_key(zmk, WORKING_TDES)
    assert wrapped[:8] == wrap_working_key(zmk, WORKING_TDES[:8])  # each block alone
    assert unwrap_working_key(zmk, wrapped) == WORKING_TDES
    with pytest.raises(SecurityModuleError):
        unwrap_working_key(zmk, wrapped[:-1])


# -- the PAN vault: key ids, rotation, the format of old ------------------------------------------


def legacy_blob(master: bytes, data: bytes) -> bytes:
    """A record as sealed before key ids: nonce, ciphertext and tag, no associated data."""
    nonce = os.urandom(12)
    return nonce + AESGCM(_derive(master, b"pan encryption")).encrypt(nonce, data, None)


def test_pan_vault_records_name_their_key_and_old_records_still_open() -> None:
    master = secrets.token_bytes(32)
    vault = PanVault(master)
    assert vault.key_id == vault.check_values()[vault.key_id]  # the default id is the key's check value
    blob = vault.seal_bytes(b"data")
    assert parse_sealed(blob)[0] == vault.key_id  # type: ignore[index]
    assert vault.open_bytes(blob) == b"data"
    for _ in range(300):  # whatever the first bytes of an old blob's nonce look like
        assert vault.open_bytes(legacy_blob(master, b"old")) == b"old"
    assert vault.open(vault.seal({"2": "4761739001010010"})) == {"2": "4761739001010010"}
    with pytest.raises(InvalidTag):
        PanVault(secrets.token_bytes(32)).open_bytes(blob)
    with pytest.raises(InvalidTag):
        vault.open_bytes(blob[:-1] + bytes([blob[-1] ^ 1]))


def test_pan_vault_rotation_and_export_to_the_indexer() -> None:
    old, new = secrets.token_bytes(32), secrets.token_bytes(32)
    v1 = PanVault(old)
    assert v1.export_key() == old  # a single-key vault hands over its bare key, as before
    sealed_old, legacy = v1.seal_bytes(b"one"), legacy_blob(old, b"legacy")
    v2 = PanVault(new, key_id="2", retired={v1.key_id: old}, lookup_key_id=v1.key_id)
    assert v2.key_id == "2" and set(v2.key_ids()) == {"2", v1.key_id}
    assert v2.open_bytes(sealed_old) == b"one" and v2.open_bytes(legacy) == b"legacy"
    sealed_new = v2.seal_bytes(b"two")
    assert parse_sealed(sealed_new)[0] == "2"  # type: ignore[index]
    with pytest.raises(InvalidTag):
        v1.open_bytes(sealed_new)
    assert v2.pan_hash("4761739001010010") == v1.pan_hash("4761739001010010")  # lookups survive rotation
    child = PanVault(bytes.fromhex(v2.export_key().hex()))  # as the indexer receives it
    assert child.key_id == "2" and child.open_bytes(sealed_old) == b"one" and child.open_bytes(sealed_new) == b"two"
    assert child.pan_hash("4761739001010010") == v2.pan_hash("4761739001010010")
    assert not contains_key_material(repr(v2) + str(v2), (old, new))
    with pytest.raises(ValueError):
        PanVault(new, key_id="2", retired={"2": old})
    with pytest.raises(ValueError):
        PanVault(new, lookup_key_id="9")


def test_the_software_module_gives_the_journal_a_vault_over_its_data_keys(tmp_path: Path) -> None:
    m = software_module(tmp_path)
    v1 = m.pan_vault()
    assert v1.key_id == m.data_key_id == "1"
    assert v1.check_values() == {"1": m.check_values()["data/1"]}
    r1 = v1.seal({"2": "4761739001010010"})
    m.rotate_data_key("2")
    v2 = m.pan_vault()
    assert v2.key_id == "2" and v2.open(r1) == {"2": "4761739001010010"}
    assert v2.pan_hash("4761739001010010") == v1.pan_hash("4761739001010010")
    reopened = SoftwareSecurityModule(tmp_path / "state" / "keys.bin", Kek(AES_ZMK[::-1], "test")).pan_vault()
    assert reopened.open(r1)["2"] == "4761739001010010" and reopened.key_id == "2"
    assert json.loads(reopened.export_key()[len(b"iso-gateway pan keyring 1\n"):])["lookup"] == "1"
