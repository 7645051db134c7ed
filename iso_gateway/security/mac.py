"""Message authentication codes for ISO 8583 fields 64 and 128, and key check values.

Pure functions over bytes: no I/O, no clock, no state beyond the cipher contexts a key object keeps.

Two algorithms, chosen per link:

- ``retail``: ISO/IEC 9797-1 MAC algorithm 3 with DES as the block cipher, the "retail MAC" of ANSI
  X9.19. A double-length key K = K1 || K2. The padded data is chained with single DES under K1
  (CBC-MAC, zero IV); the last chaining value is decrypted under K2 and encrypted again under K1.
  The output is 8 bytes. Padding method 1 (zero bytes, as few as make whole blocks, one zero block
  for empty data) is what ISO 8583 hosts use; padding method 2 (0x80 then zeros) is selectable.
  Single DES is OpenSSL's own where the system's libcrypto exports it (des.py), else TDES with the
  key repeated through ``cryptography``; the two give the same MACs.
- ``aes-cmac``: CMAC of NIST SP 800-38B with AES-128, -192 or -256. The output is 16 bytes; a link
  sends its leftmost 8 in field 64/128. CMAC pads by itself, so no padding method applies.

Key check values (KCV): for DES and TDES keys, the key encrypts a block of eight zero bytes (ECB)
and the leftmost 3 bytes are the KCV; for AES keys, the leftmost 3 bytes of the AES-CMAC of a block
of sixteen zero bytes (the CMAC convention; some hosts instead encrypt a block of zeros or of 0x01
bytes: such a host's check values will not match these). A check value says which key is meant and
catches a key mis-typed or mis-decrypted; it is not secret and may be logged. It is never a proof of
anything: an attacker can compute the KCV of a key he chose.

Key objects never show their key bytes in ``repr`` or ``str``; errors never quote key bytes.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from enum import StrEnum
from typing import Final

from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives.ciphers import Cipher, modes
from cryptography.hazmat.primitives.ciphers.algorithms import AES
from cryptography.hazmat.primitives.cmac import CMAC

from . import des

DES_BLOCK: Final = 8
AES_BLOCK: Final = 16
KCV_LENGTH: Final = 3
# A received MAC shorter than this is refused outright: a truncated MAC of a byte or two could be guessed.
MIN_MAC_LENGTH: Final = 4


class MacAlgorithm(StrEnum):
    """The MAC algorithms a link can be configured with (the values are the config spelling)."""

    RETAIL = "retail"  # ISO/IEC 9797-1 MAC algorithm 3, DES, double-length key (ANSI X9.19)
    AES_CMAC = "aes-cmac"  # NIST SP 800-38B CMAC with AES


class MacError(ValueError):
    """A key or an argument the MAC functions can't use. The text never carries key bytes."""


def pad_method1(data: bytes, block: int = DES_BLOCK) -> bytes:
    """ISO/IEC 9797-1 padding method 1: zero bytes up to a whole number of blocks (one block if empty)."""
    short = -len(data) % block
    if not data:
        short = block
    return data + bytes(short)


def pad_method2(data: bytes, block: int = DES_BLOCK) -> bytes:
    """ISO/IEC 9797-1 padding method 2: a 0x80 byte, then zero bytes up to a whole number of blocks."""
    data = data + b"\x80"
    return data + bytes(-len(data) % block)


def _tdes_ecb(key: bytes) -> Cipher[modes.ECB]:
    return Cipher(TripleDES(key), modes.ECB())


def _check_tdes_key(key: bytes, lengths: tuple[int, ...]) -> None:
    if not isinstance(key, bytes | bytearray) or len(key) not in lengths:
        want = " or ".join(str(n) for n in lengths)
        raise MacError(f"a TDES key must be {want} bytes, got {len(key) if isinstance(key, bytes | bytearray) else type(key).__name__}")


class RetailMacKey:
    """A double-length TDES key ready to compute ISO/IEC 9797-1 MAC algorithm 3 (X9.19 retail MAC).

    Keeps its cipher contexts, so that a MAC per message costs the cipher work and little else; so
    one object serves one thread at a time (the security modules hold a lock around it)."""

    __slots__ = ("_chain", "_last", "_final", "_kcv", "_native", "padding")

    def __init__(self, key: bytes, *, padding: int = 1, native: bool = True) -> None:
        _check_tdes_key(key, (16,))
        if padding not in (1, 2):
            raise MacError(f"padding method must be 1 or 2, got {padding!r}")
        k1, k2 = bytes(key[:8]), bytes(key[8:16])
        self.padding = padding
        # Single DES under K1 is TDES with K1 in all three places (EDE collapses to E). One CBC context
        # for the key's life: making one per message costs a third of a MAC. It carries the last
        # ciphertext block into the next message, so each message's first block is XORed with that
        # block (``_last``) first: E(M1 xor last xor last) = E(M1), the chain of a zero IV.
        self._chain = Cipher(TripleDES(k1 * 3), modes.CBC(bytes(DES_BLOCK))).encryptor()
        self._last = 0
        # The output transformation: decrypt the last chaining value under K2, encrypt it under K1. ECB
        # contexts carry nothing from one block to the next, so these two live as long as the key.
        # (DES runs as TDES with a repeated key: three times the cipher work of single DES, which
        # OpenSSL 3 keeps in its legacy provider.)
        self._final = (Cipher(TripleDES(k2 * 3), modes.ECB()).decryptor(),
                       Cipher(TripleDES(k1 * 3), modes.ECB()).encryptor())
        self._kcv = _tdes_ecb(bytes(key) + bytes(key[:8])).encryptor().update(bytes(DES_BLOCK))[:KCV_LENGTH]
        # OpenSSL's own single DES where the system's libcrypto has it (des.py): a third of the
        # cipher work of the TDES contexts above, which remain the path where it does not.
        lib = des.load() if native else None
        self._native = des.NativeRetail(lib, k1, k2, padding) if lib is not None else None

    @property
    def native(self) -> bool:
        """Whether this key's MACs run on OpenSSL's single DES (else on ``cryptography``'s TDES)."""
        return self._native is not None

    def function(self) -> Callable[[bytes], bytes]:
        """``mac`` itself, or the native path's own (one call less per message)."""
        return self._native.mac if self._native is not None else self.mac

    def mac(self, data: bytes) -> bytes:
        """The 8-byte MAC of ``data``."""
        native = self._native
        if native is not None:
            return native.mac(bytes(data))
        padded = pad_method1(data) if self.padding == 1 else pad_method2(data)
        first = (int.from_bytes(padded[:DES_BLOCK], "big") ^ self._last).to_bytes(DES_BLOCK, "big")
        chained = self._chain.update(first + padded[DES_BLOCK:])[-DES_BLOCK:]
        self._last = int.from_bytes(chained, "big")
        dec, enc = self._final
        return enc.update(dec.update(chained))

    def check_value(self) -> bytes:
        return self._kcv

    def __repr__(self) -> str:
        return f"RetailMacKey(kcv={self._kcv.hex().upper()}, padding={self.padding})"

    __str__ = __repr__


class CmacKey:
    """An AES key ready to compute CMAC (NIST SP 800-38B)."""

    __slots__ = ("_cmac", "_kcv")

    def __init__(self, key: bytes) -> None:
        if not isinstance(key, bytes | bytearray) or len(key) not in (16, 24, 32):
            raise MacError("an AES key must be 16, 24 or 32 bytes")
        self._cmac = CMAC(AES(bytes(key)))
        self._kcv = self.mac(bytes(AES_BLOCK))[:KCV_LENGTH]

    def mac(self, data: bytes) -> bytes:
        """The 16-byte CMAC of ``data``."""
        c = self._cmac.copy()
        c.update(data)
        return c.finalize()

    def check_value(self) -> bytes:
        return self._kcv

    def __repr__(self) -> str:
        return f"CmacKey(kcv={self._kcv.hex().upper()})"

    __str__ = __repr__


def retail_mac(key: bytes, data: bytes, *, padding: int = 1) -> bytes:
    """ISO/IEC 9797-1 MAC algorithm 3 (DES, double-length ``key``): 8 bytes."""
    return RetailMacKey(key, padding=padding).mac(data)


def aes_cmac(key: bytes, data: bytes) -> bytes:
    """AES-CMAC (NIST SP 800-38B): 16 bytes."""
    return CmacKey(key).mac(data)


def tdes_check_value(key: bytes) -> bytes:
    """KCV of a DES/TDES key (8, 16 or 24 bytes): leftmost 3 bytes of the key encrypting 8 zero bytes."""
    _check_tdes_key(key, (8, 16, 24))
    full = bytes(key) * 3 if len(key) == 8 else bytes(key) + bytes(key[:8]) if len(key) == 16 else bytes(key)
    return _tdes_ecb(full).encryptor().update(bytes(DES_BLOCK))[:KCV_LENGTH]


def aes_check_value(key: bytes) -> bytes:
    """KCV of an AES key: leftmost 3 bytes of its AES-CMAC over 16 zero bytes."""
    return CmacKey(key).check_value()


def check_value_matches(expected: bytes | str, actual: bytes) -> bool:
    """Whether a received check value (bytes, or hex as the wire carries it) matches ``actual``.

    A received KCV may be shorter than ours (2 bytes is common on old hosts), never shorter than 2."""
    if isinstance(expected, str):
        try:
            expected = bytes.fromhex(expected)
        except ValueError:
            return False
    if not 2 <= len(expected) <= len(actual):
        return False
    return hmac.compare_digest(expected, actual[: len(expected)])


def mac_matches(expected_full: bytes, received: bytes) -> bool:
    """Whether ``received`` (a MAC as carried, possibly the leftmost bytes only) matches the full MAC.

    Constant-time in the MAC's value; refuses MACs shorter than ``MIN_MAC_LENGTH`` bytes."""
    if not MIN_MAC_LENGTH <= len(received) <= len(expected_full):
        return False
    return hmac.compare_digest(expected_full[: len(received)], received)


def mac_key(algorithm: MacAlgorithm | str, key: bytes, *, padding: int = 1) -> RetailMacKey | CmacKey:
    """A key object for ``algorithm`` (``padding`` applies to the retail MAC only)."""
    algorithm = MacAlgorithm(algorithm)
    if algorithm is MacAlgorithm.RETAIL:
        return RetailMacKey(key, padding=padding)
    return CmacKey(key)
