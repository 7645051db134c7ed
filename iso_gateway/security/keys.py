"""Key values in memory, and the pure operations on them that both security modules share.

Nothing here reads a file or the clock. A ``SecretKey`` holds its bytes where ``repr``, ``str``,
pickling into a log and f-strings can't show them.
"""

from __future__ import annotations

from enum import StrEnum

from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives import keywrap
from cryptography.hazmat.primitives.ciphers import Cipher, modes

from .mac import MacAlgorithm, aes_check_value, tdes_check_value
from .module import KeyUsage, SecurityModuleError, UnknownKey, kcv_hex


class KeyType(StrEnum):
    TDES = "tdes"  # double (16-byte) or triple (24-byte) length
    AES = "aes"  # 16, 24 or 32 bytes


KEY_LENGTHS: dict[KeyType, tuple[int, ...]] = {KeyType.TDES: (16, 24), KeyType.AES: (16, 24, 32)}


def key_type_for(usage: KeyUsage, algorithm: MacAlgorithm | None, key_type: KeyType | str | None) -> KeyType:
    """The key type a key of this usage must have: MAC keys follow their algorithm, data keys are AES,
    zone keys say which they are."""
    if usage is KeyUsage.MAC:
        if algorithm is None:
            raise UnknownKey("a MAC key needs its algorithm (retail or aes-cmac)")
        implied = KeyType.TDES if algorithm is MacAlgorithm.RETAIL else KeyType.AES
        if key_type is not None and KeyType(key_type) is not implied:
            raise UnknownKey(f"a {algorithm} MAC key is a {implied} key")
        return implied
    if usage is KeyUsage.DATA:
        return KeyType.AES
    if key_type is None:
        raise UnknownKey("a zone key needs its key type (tdes or aes)")
    return KeyType(key_type)


def check_length(key_type: KeyType, usage: KeyUsage, algorithm: MacAlgorithm | None, n: int) -> None:
    allowed = KEY_LENGTHS[key_type]
    if usage is KeyUsage.MAC and algorithm is MacAlgorithm.RETAIL:
        allowed = (16,)  # MAC algorithm 3 with DES: K1 || K2
    if usage is KeyUsage.DATA:
        allowed = (32,)
    if n not in allowed:
        raise UnknownKey(f"a {key_type} {usage} key must be {' or '.join(map(str, allowed))} bytes, got {n}")


def check_value_of(key_type: KeyType, value: bytes) -> bytes:
    """The 3-byte KCV: TDES encrypting zeros, AES-CMAC of zeros (see mac.py)."""
    return tdes_check_value(value) if key_type is KeyType.TDES else aes_check_value(value)


class SecretKey:
    """A key value with its type and usage. Shows its check value, never its bytes."""

    __slots__ = ("_value", "algorithm", "kcv", "key_type", "usage")

    def __init__(self, value: bytes, *, usage: KeyUsage | str, key_type: KeyType | str,
                 algorithm: MacAlgorithm | str | None = None) -> None:
        self.usage = KeyUsage(usage)
        self.key_type = KeyType(key_type)
        self.algorithm = MacAlgorithm(algorithm) if algorithm else None
        check_length(self.key_type, self.usage, self.algorithm, len(value))
        self._value = bytes(value)
        self.kcv = check_value_of(self.key_type, self._value)

    def reveal(self) -> bytes:
        """The key bytes, for the code that computes with them or writes the wrapped key file."""
        return self._value

    def __repr__(self) -> str:
        alg = f" {self.algorithm}" if self.algorithm else ""
        return f"<SecretKey {self.usage} {self.key_type}{alg} kcv={kcv_hex(self.kcv)}>"

    __str__ = __repr__

    def __reduce__(self) -> tuple[object, ...]:
        raise TypeError("a SecretKey is not pickled")


def unwrap_working_key(kek: SecretKey, wrapped: bytes) -> bytes:
    """The clear value of a working key sent under zone key ``kek``.

    TDES zone key: each 8-byte block decrypted alone (TDES-ECB), as ISO 8583 hosts send keys in
    network management messages. AES zone key: AES key wrap (the RFC 3394 algorithm)."""
    if kek.usage is not KeyUsage.KEK:
        raise UnknownKey("this key is not a zone key")
    if kek.key_type is KeyType.TDES:
        if not wrapped or len(wrapped) % 8:
            raise SecurityModuleError(f"a key under a TDES zone key is whole 8-byte blocks, got {len(wrapped)} bytes")
        value = kek.reveal()
        full = value + value[:8] if len(value) == 16 else value
        return Cipher(TripleDES(full), modes.ECB()).decryptor().update(wrapped)
    try:
        return keywrap.aes_key_unwrap(kek.reveal(), wrapped)
    except keywrap.InvalidUnwrap:
        raise SecurityModuleError("the wrapped key does not unwrap under this zone key") from None
    except ValueError:
        raise SecurityModuleError(f"an AES-wrapped key is 24 bytes or more in 8-byte blocks, got {len(wrapped)}") from None


def wrap_working_key(kek: SecretKey, value: bytes) -> bytes:
    """The inverse of ``unwrap_working_key``: what a switch (or the simulator) sends."""
    if kek.key_type is KeyType.TDES:
        if not value or len(value) % 8:
            raise SecurityModuleError("a key wrapped under a TDES zone key is whole 8-byte blocks")
        k = kek.reveal()
        full = k + k[:8] if len(k) == 16 else k
        return Cipher(TripleDES(full), modes.ECB()).encryptor().update(value)
    return keywrap.aes_key_wrap(kek.reveal(), value)
