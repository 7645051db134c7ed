"""MAC algorithms and key check values: published known-answer vectors, and an independent
implementation computed another way (block by block with single-DES ECB steps) for everything else."""

from __future__ import annotations

import ctypes.util

import pytest
from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives.ciphers import Cipher, modes
from hypothesis import given, settings
from hypothesis import strategies as st

from iso_gateway.security import des
from iso_gateway.security.mac import (
    CmacKey,
    MacAlgorithm,
    MacError,
    RetailMacKey,
    aes_check_value,
    aes_cmac,
    check_value_matches,
    mac_key,
    mac_matches,
    pad_method1,
    pad_method2,
    retail_mac,
    tdes_check_value,
)

H = bytes.fromhex

# ISO/IEC 9797-1 Annex B examples for MAC algorithm 3 (DES, padding method 1). The standard prints
# the leftmost 32 bits of each MAC; the full 8 bytes are held to the independent implementation below.
ISO_KEY = H("0123456789ABCDEF" "FEDCBA9876543210")
ISO_EXAMPLES = [
    (b"Now is the time for all ", H("A1C72E74")),
    (b"Now is the time for it", H("2E2B1428")),
]

# A worked example of MAC algorithm 3 with padding method 2 (four whole blocks, so a whole block of
# padding), published with its key, data and full result.
PAD2_KEY = H("7962D9ECE03D1ACD" "4C76089DCE131543")
PAD2_DATA = H("72C29C2371CC9BDB" "65B779B8E8D37B29" "ECC154AA56A8799F" "AE2F498F76ED92F2")
PAD2_MAC = H("5F1448EEA8AD90A7")

# NIST SP 800-38B / RFC 4493 AES-CMAC examples.
RFC4493_KEY = H("2b7e151628aed2a6abf7158809cf4f3c")
RFC4493_MSG = H("6bc1bee22e409f96e93d7e117393172a" "ae2d8a571e03ac9c9eb76fac45af8e51"
                "30c81c46a35ce411e5fbc1191a0a52ef" "f69f2445df4f9b17ad2b417be66c3710")
RFC4493_EXAMPLES = [
    (0, H("bb1d6929e95937287fa37d129b756746")),
    (16, H("070a16b46b4d4144f79bdd9dd04a287c")),
    (40, H("dfa66747de9ae63030ca32611497c827")),
    (64, H("51f0bebf7e3b9d92fc49741779363cfe")),
]
SP800_38B_OTHER_SIZES = [  # the empty message under the AES-192 and AES-256 example keys
    (H("8e73b0f7da0e6452c810f32b809079e562f8ead2522c6b7b"), H("d17ddf46adaacde531cac483de7a9367")),
    (H("603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4"), H("028962f61b7bf89efc6b551f4667d983")),
]


def independent_retail_mac(key: bytes, data: bytes, padding: int) -> bytes:
    """MAC algorithm 3 spelled out: pad; H = E_K1(block XOR H) block by block with single-DES ECB
    (TDES with K1 three times); then E_K1(D_K2(H)) as two more single-DES steps."""
    k1, k2 = key[:8], key[8:]

    def des(k: bytes, block: bytes, decrypt: bool = False) -> bytes:
        c = Cipher(TripleDES(k * 3), modes.ECB())
        ctx = c.decryptor() if decrypt else c.encryptor()
        return ctx.update(block) + ctx.finalize()

    if padding == 1:
        padded = data + b"\0" * (-len(data) % 8) if data else b"\0" * 8
    else:
        padded = data + b"\x80" + b"\0" * (-(len(data) + 1) % 8)
    h = bytes(8)
    for i in range(0, len(padded), 8):
        h = des(k1, bytes(a ^ b for a, b in zip(padded[i:i + 8], h, strict=True)))
    return des(k1, des(k2, h, decrypt=True))


@pytest.mark.parametrize("native", [True, False], ids=["openssl-des", "cryptography-tdes"])
@pytest.mark.parametrize(("data", "mac4"), ISO_EXAMPLES)
def test_retail_mac_matches_the_iso_9797_1_examples(data: bytes, mac4: bytes, native: bool) -> None:
    mac = RetailMacKey(ISO_KEY, native=native).mac(data)
    assert len(mac) == 8
    assert mac[:4] == mac4
    assert mac == independent_retail_mac(ISO_KEY, data, 1) == retail_mac(ISO_KEY, data)


@pytest.mark.parametrize("native", [True, False], ids=["openssl-des", "cryptography-tdes"])
def test_retail_mac_with_padding_method_2_matches_the_published_example(native: bool) -> None:
    assert retail_mac(PAD2_KEY, PAD2_DATA, padding=2) == PAD2_MAC
    assert RetailMacKey(PAD2_KEY, padding=2, native=native).mac(PAD2_DATA) == PAD2_MAC
    assert retail_mac(PAD2_KEY, PAD2_DATA, padding=1) != PAD2_MAC  # the padding method matters


def test_the_retail_mac_runs_on_openssls_single_des_where_the_system_has_it() -> None:
    # Where libcrypto is there (Debian's libssl3 is), the fast path must be in use, not lost quietly.
    if des.load() is None:
        assert ctypes.util.find_library("crypto") is None, "libcrypto is there but its DES functions did not load"
        pytest.skip("no libcrypto on this system: the MAC runs on cryptography (tested above)")
    assert RetailMacKey(ISO_KEY).native
    assert not RetailMacKey(ISO_KEY, native=False).native


@settings(max_examples=300, deadline=None)
@given(key=st.binary(min_size=16, max_size=16), padding=st.sampled_from([1, 2]),
       messages=st.lists(st.binary(max_size=3000), min_size=1, max_size=6))
def test_openssl_des_and_cryptography_tdes_give_the_same_macs(key: bytes, padding: int, messages: list[bytes]) -> None:
    """The two paths agree on any key, padding and data, message after message on one key object
    (nothing of one message leaks into the next; data past the first buffer's 1,024 bytes grows it)."""
    if des.load() is None:
        pytest.skip("no libcrypto on this system")
    native, reference = RetailMacKey(key, padding=padding), RetailMacKey(key, padding=padding, native=False)
    assert native.native
    for data in messages:
        assert native.mac(data) == reference.mac(data) == independent_retail_mac(key, data, padding)


def test_the_native_des_takes_bytes_of_any_length_and_nothing_else() -> None:
    lib = des.load()
    if lib is None:
        pytest.skip("no libcrypto on this system")
    for padding in (1, 2):
        n = des.NativeRetail(lib, ISO_KEY[:8], ISO_KEY[8:], padding)
        for size in (0, 1, 7, 8, 9, 1023, 1024, 1025, 1032, 5000, 17):  # the buffer grows past 1,024, stays grown
            data = bytes(range(256)) * (size // 256) + bytes(range(size % 256))
            assert n.mac(data) == independent_retail_mac(ISO_KEY, data, padding)
        for bad in (bytearray(8), memoryview(bytes(8)), "12345678"):
            with pytest.raises(ValueError):
                n.mac(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        des.NativeRetail(lib, ISO_KEY[:7], ISO_KEY[8:])
    with pytest.raises(ValueError):
        des.NativeRetail(lib, ISO_KEY[:8], ISO_KEY[8:], padding=3)
    assert repr(n) == "NativeRetail()"
    assert RetailMacKey(ISO_KEY).mac(bytearray(b"Now is the time for all ")) == H("A1C72E74") + RetailMacKey(
        ISO_KEY).mac(b"Now is the time for all ")[4:]


def test_the_native_des_can_be_switched_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(des, "_loaded", False)
    monkeypatch.setenv(des.ENV_SWITCH, "0")
    assert des.load() is None
    key = RetailMacKey(ISO_KEY)
    assert not key.native
    assert key.mac(b"Now is the time for all ") == independent_retail_mac(ISO_KEY, b"Now is the time for all ", 1)


@pytest.mark.parametrize(("length", "expected"), RFC4493_EXAMPLES)
def test_aes_cmac_matches_the_rfc_4493_examples(length: int, expected: bytes) -> None:
    assert aes_cmac(RFC4493_KEY, RFC4493_MSG[:length]) == expected
    assert CmacKey(RFC4493_KEY).mac(RFC4493_MSG[:length]) == expected


@pytest.mark.parametrize(("key", "expected"), SP800_38B_OTHER_SIZES)
def test_aes_cmac_with_192_and_256_bit_keys_matches_the_sp_800_38b_examples(key: bytes, expected: bytes) -> None:
    assert aes_cmac(key, b"") == expected


@settings(max_examples=300, deadline=None)
@given(key=st.binary(min_size=16, max_size=16), data=st.binary(max_size=300), padding=st.sampled_from([1, 2]))
def test_retail_mac_equals_the_independent_block_by_block_implementation(key: bytes, data: bytes, padding: int) -> None:
    assert retail_mac(key, data, padding=padding) == independent_retail_mac(key, data, padding)


@settings(max_examples=200, deadline=None)
@given(key=st.binary(min_size=16, max_size=16), data=st.binary(max_size=200), pos=st.integers(min_value=0),
       flip=st.integers(min_value=1, max_value=255))
def test_changing_any_byte_changes_the_mac(key: bytes, data: bytes, pos: int, flip: int) -> None:
    if not data:
        data = b"\x01"
    i = pos % len(data)
    tampered = data[:i] + bytes([data[i] ^ flip]) + data[i + 1:]
    assert retail_mac(key, tampered) != retail_mac(key, data)
    assert aes_cmac(key, tampered) != aes_cmac(key, data)


def test_padding_methods() -> None:
    assert pad_method1(b"") == bytes(8)
    assert pad_method1(b"12345678") == b"12345678"
    assert pad_method1(b"123") == b"123" + bytes(5)
    assert pad_method2(b"") == b"\x80" + bytes(7)
    assert pad_method2(b"12345678") == b"12345678\x80" + bytes(7)
    assert pad_method2(b"1234567") == b"1234567\x80"
    assert pad_method1(b"x", 16) == b"x" + bytes(15)


def test_tdes_check_value_is_the_key_encrypting_a_zero_block() -> None:
    assert tdes_check_value(ISO_KEY).hex().upper() == "08D7B4"
    # Single and triple length agree with double length where the key halves repeat.
    assert tdes_check_value(ISO_KEY[:8]) == tdes_check_value(ISO_KEY[:8] * 2) == tdes_check_value(ISO_KEY[:8] * 3)
    assert tdes_check_value(ISO_KEY + ISO_KEY[:8]) == tdes_check_value(ISO_KEY)
    enc = Cipher(TripleDES(ISO_KEY + ISO_KEY[:8]), modes.ECB()).encryptor()
    assert tdes_check_value(ISO_KEY) == enc.update(bytes(8))[:3]
    assert RetailMacKey(ISO_KEY).check_value() == tdes_check_value(ISO_KEY)


def test_aes_check_value_is_the_cmac_of_a_zero_block() -> None:
    # The RFC 4493 example for one block of data is not over zeros; the KCV is the CMAC's own first 3 bytes.
    assert aes_check_value(RFC4493_KEY) == aes_cmac(RFC4493_KEY, bytes(16))[:3]
    assert len(aes_check_value(RFC4493_KEY)) == 3
    assert CmacKey(RFC4493_KEY).check_value() == aes_check_value(RFC4493_KEY)


def test_check_values_received_as_hex_or_bytes_and_shorter_ones_match() -> None:
    kcv = tdes_check_value(ISO_KEY)
    assert check_value_matches("08D7B4", kcv)
    assert check_value_matches("08d7b4", kcv)
    assert check_value_matches(H("08D7"), kcv)
    assert not check_value_matches("08", kcv)  # too short to say anything
    assert not check_value_matches("08D7B5", kcv)
    assert not check_value_matches("not hex", kcv)
    assert not check_value_matches(kcv + b"\0", kcv)


def test_a_mac_may_arrive_truncated_but_not_below_four_bytes() -> None:
    full = retail_mac(ISO_KEY, b"data")
    assert mac_matches(full, full) and mac_matches(full, full[:4])
    assert not mac_matches(full, full[:3])
    assert not mac_matches(full, b"")
    assert not mac_matches(full, full + b"\0")
    assert not mac_matches(full, bytes([full[0] ^ 1]) + full[1:])


def test_mac_key_objects_by_algorithm_name_and_bad_keys_refused_without_their_bytes() -> None:
    assert isinstance(mac_key("retail", ISO_KEY), RetailMacKey)
    assert isinstance(mac_key(MacAlgorithm.AES_CMAC, RFC4493_KEY), CmacKey)
    with pytest.raises(ValueError):
        mac_key("des-mac", ISO_KEY)
    for bad in (ISO_KEY[:15], ISO_KEY + ISO_KEY[:8]):
        with pytest.raises(MacError) as info:
            RetailMacKey(bad)
        assert bad.hex() not in str(info.value).lower()
    with pytest.raises(MacError):
        RetailMacKey(ISO_KEY, padding=3)
    with pytest.raises(MacError):
        CmacKey(RFC4493_KEY[:15])


def test_key_objects_show_their_check_value_never_their_bytes() -> None:
    for key, obj in ((ISO_KEY, RetailMacKey(ISO_KEY)), (RFC4493_KEY, CmacKey(RFC4493_KEY))):
        for text in (repr(obj), str(obj), f"{obj}"):
            assert key.hex() not in text.lower()
            assert key[:8].hex() not in text.lower() and key[8:].hex() not in text.lower()
    assert "08D7B4" in repr(RetailMacKey(ISO_KEY))


def test_the_native_des_shared_by_threads_never_writes_out_of_bounds() -> None:
    """Not a supported use (one thread per key object), but it must not corrupt memory: threads
    growing the buffer while others use it. The MACs of a serial run afterwards are still right."""
    import threading

    lib = des.load()
    if lib is None:
        pytest.skip("no libcrypto on this system")
    n = des.NativeRetail(lib, ISO_KEY[:8], ISO_KEY[8:])
    sizes = [9, 700, 1500, 3000, 6000, 12000]

    def hammer(seed: int) -> None:
        for i in range(300):
            n.mac(bytes(sizes[(seed + i) % len(sizes)]))

    threads = [threading.Thread(target=hammer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for size in sizes:
        assert n.mac(bytes(size)) == independent_retail_mac(ISO_KEY, bytes(size), 1)
