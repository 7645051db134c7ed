"""The security module: one interface for every operation that needs a key.

The gateway never holds a MAC key, a zone key or a data key itself; it names keys by label and asks
the module. Two implementations keep the same contract:

- ``software.SoftwareSecurityModule``: keys in a file wrapped under a key-encrypting key (KEK)
  that comes from the environment or from a file outside the state directory. For development
  and for sites without a hardware module.
- ``pkcs11.Pkcs11SecurityModule``: keys in a PKCS#11 token (a network HSM, or SoftHSM2 in tests).

The key hierarchy (see docs/security.md):

- zone keys (``KeyUsage.KEK``): shared with a switch, loaded by people, only ever used to unwrap
  working keys the switch sends;
- working MAC keys (``KeyUsage.MAC``): one per link and direction as configured, each with its
  algorithm (retail MAC with a double-length TDES key, or AES-CMAC with an AES key); installed from
  a network management message after their check value is verified, or loaded directly;
- data keys (``KeyUsage.DATA``): AES-256 keys that seal card data at rest, each with a key id
  written in every record it sealed. Rotation makes a new key current; the old ones still open
  what they sealed.

Errors raised here (``SecurityModuleError`` and its subclasses) carry labels, key ids and check
values, never key bytes.
"""

from __future__ import annotations

import re
from enum import StrEnum
from collections.abc import Callable
from typing import Final, Protocol, runtime_checkable

from .mac import MacAlgorithm


class KeyUsage(StrEnum):
    """What a key may be used for; one usage per key."""

    KEK = "kek"  # a zone key: unwraps working keys received from a switch
    MAC = "mac"  # computes and verifies MACs with its algorithm
    DATA = "data"  # seals card data at rest (these are named by key id, not by label)


class SecurityModuleError(Exception):
    """A key operation that could not be done. The message never carries key material."""


class UnknownKey(SecurityModuleError):
    """No key with this label (or key id), or a key that may not be used this way."""


class KeyCheckError(SecurityModuleError):
    """A received key whose check value does not match: it was not installed."""


class SealError(SecurityModuleError):
    """A sealed blob that does not open: an unknown key id, a wrong key, or changed bytes."""


class KekUnavailable(SecurityModuleError):
    """The key-encrypting key (or the token's PIN) is missing or wrong: no key can be read."""


LABEL_PATTERN: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")
KEY_ID_PATTERN: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,31}")

# A sealed blob: SEAL_MAGIC, one byte of key id length, the key id (ASCII), a 12-byte nonce, then
# AES-256-GCM ciphertext and 16-byte tag. The header (magic, length, key id) is authenticated as
# associated data in front of the caller's own associated data, so a key id can't be swapped.
SEAL_MAGIC: Final = b"\xa5"
NONCE_LENGTH: Final = 12


def check_label(label: str) -> str:
    if not isinstance(label, str) or not LABEL_PATTERN.fullmatch(label):
        raise UnknownKey(f"invalid key label {label!r}: letters, digits and . _ : - (at most 64)")
    return label


def check_key_id(key_id: str) -> str:
    if not isinstance(key_id, str) or not KEY_ID_PATTERN.fullmatch(key_id):
        raise SealError(f"invalid data key id {key_id!r}: letters, digits and . _ - (at most 32)")
    return key_id


def seal_header(key_id: str) -> bytes:
    raw = check_key_id(key_id).encode("ascii")
    return SEAL_MAGIC + bytes([len(raw)]) + raw


def parse_sealed(blob: bytes) -> tuple[str, bytes, bytes, bytes] | None:
    """(key id, header, nonce, ciphertext and tag) of a blob in the key-id format, else None."""
    if len(blob) < 2 or blob[:1] != SEAL_MAGIC:
        return None
    n = blob[1]
    end = 2 + n
    if n == 0 or len(blob) < end + NONCE_LENGTH + 16:
        return None
    try:
        key_id = blob[2:end].decode("ascii")
    except UnicodeDecodeError:
        return None
    if not KEY_ID_PATTERN.fullmatch(key_id):
        return None
    return key_id, blob[:end], blob[end:end + NONCE_LENGTH], blob[end + NONCE_LENGTH:]


def kcv_hex(kcv: bytes) -> str:
    """A check value as it is logged and compared by people: upper-case hex."""
    return kcv.hex().upper()


@runtime_checkable
class SecurityModule(Protocol):
    """Key operations by label. Implementations: SoftwareSecurityModule, Pkcs11SecurityModule.

    Not safe to share between threads without the implementation's own lock (both have one); the
    gateway's workers each open their own module."""

    def mac(self, label: str, data: bytes, *, padding: int = 1) -> bytes:
        """The full MAC of ``data`` under MAC key ``label`` with the key's algorithm: 8 bytes for the
        retail MAC (``padding`` is its ISO/IEC 9797-1 padding method, 1 or 2), 16 for AES-CMAC (which
        ignores ``padding``). A link that carries 8 bytes sends the leftmost 8."""
        ...

    # Goes up whenever a MAC key may have changed (installed, imported, reloaded): a function from
    # ``mac_function`` is good while it stays the same.
    mac_generation: int

    def mac_function(self, label: str, *, padding: int = 1) -> Callable[[bytes], bytes]:
        """``mac(label, ., padding=padding)`` as a function of the data alone, for the gateway's
        transaction path: no search by label and no lock per message. It computes with the key
        ``label`` had when it was made (fetch a new one when ``mac_generation`` changes) and is for
        one thread, the caller's. An unknown label raises UnknownKey here."""
        ...

    def verify_mac(self, label: str, data: bytes, received: bytes, *, padding: int = 1) -> bool:
        """Whether ``received`` (the full MAC or its leftmost 4 bytes or more) is the MAC of ``data``.

        Constant-time in the MAC's value. An unknown label raises UnknownKey (a configuration fault,
        not a bad message)."""
        ...

    def check_value(self, label: str) -> str:
        """The key check value of key ``label``: 6 upper-case hex digits (docs/security.md)."""
        ...

    def check_values(self) -> dict[str, str]:
        """Every key's check value, for the log at start and after each change: label -> KCV.
        Data keys appear as ``data/<key id>``; the current one is ``data_key_id``."""
        ...

    def install_key(self, label: str, *, kek: str, wrapped: bytes, check_value: bytes | str,
                    algorithm: MacAlgorithm | str) -> str:
        """Unwrap a working MAC key received under zone key ``kek``, check it, and install it as
        ``label`` (replacing any key of that label), for ``algorithm``.

        Under a TDES zone key the working key is TDES-ECB encrypted (each 8-byte block alone, the
        usual form in ISO 8583 network management messages); under an AES zone key it is wrapped
        with AES key wrap. ``check_value`` is the KCV that came with it (bytes, or hex as the wire
        carries it; 2 to 3 bytes): on a mismatch KeyCheckError is raised and nothing changes.
        Returns the new key's KCV."""
        ...

    @property
    def data_key_id(self) -> str:
        """The id of the data key that seals new records."""
        ...

    def seal(self, data: bytes, aad: bytes = b"") -> bytes:
        """AES-256-GCM of ``data`` under the current data key; the blob names the key id."""
        ...

    def open(self, blob: bytes, aad: bytes = b"") -> bytes:
        """What ``seal`` sealed, under whichever data key the blob names; SealError otherwise."""
        ...

    def rotate_data_key(self, key_id: str) -> str:
        """Create a new data key ``key_id`` and make it current; older keys still open their records.
        Returns its KCV."""
        ...

    def close(self) -> None:
        """Forget keys held in memory and release the token session."""
        ...


class KeyLoader(Protocol):
    """Loading keys in clear: development, tests, and first key loading by key custodians. The gateway
    never calls these on its transaction path."""

    def import_key(self, label: str, value: bytes, *, usage: KeyUsage | str,
                   algorithm: MacAlgorithm | str | None = None) -> str:
        """Install a clear key as ``label``; returns its KCV. MAC keys need ``algorithm``."""
        ...
