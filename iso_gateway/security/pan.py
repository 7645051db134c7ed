"""PANs at rest: encrypted for the gateway's own use, keyed-hashed for lookups, never in clear.

PCI DSS 3.5.1 accepts strong encryption and keyed cryptographic hashes for a
stored PAN. The journal keeps the masked PAN (first 6 + last 4) for people, an
HMAC-SHA-256 of the PAN for lookups, and, only where the gateway itself will
need the PAN again (to build a reversal), AES-256-GCM ciphertext. CVV2, track
data and PIN blocks never reach this module: they are never stored at all
(PCI DSS 3.3.1).

Both keys are derived (HKDF-SHA-256) from one 32-byte master key, read from
the environment variable ``ISO_GATEWAY_PAN_KEY`` (hex) or a key file; a key file
that does not exist is created with fresh random bytes and mode 0600. Losing the
key makes queued reversals unreadable, so the key file belongs in backups kept
apart from the journal.
"""

from __future__ import annotations

import hmac
import json
import marshal
import os
import secrets
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..core.errors import ConfigError

KEY_ENV = "ISO_GATEWAY_PAN_KEY"


def _derive(master: bytes, purpose: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"iso-gateway " + purpose).derive(master)


def load_master_key(key_file: str | os.PathLike[str]) -> bytes:
    """The master key from the environment, else the key file (created when missing)."""
    env = os.environ.get(KEY_ENV)
    if env:
        try:
            key = bytes.fromhex(env)
        except ValueError:
            raise ConfigError(KEY_ENV, "", "must be 64 hex digits") from None
        if len(key) != 32:
            raise ConfigError(KEY_ENV, "", "must be 64 hex digits (32 bytes)")
        return key
    path = Path(key_file)
    if not path.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # the state folder: owner only
        # Written whole under a temporary name, then linked into place: a process
        # racing us (another worker) sees either no key file or a complete one.
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32) + "\n")
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another process created it first: use theirs
        finally:
            os.unlink(tmp)
    try:
        key = bytes.fromhex(path.read_text().strip())
    except (OSError, ValueError):
        raise ConfigError(str(path), "", "the PAN key file must hold 64 hex digits") from None
    if len(key) != 32:
        raise ConfigError(str(path), "", "the PAN key file must hold 64 hex digits (32 bytes)")
    return key


class PanVault:
    """Encrypts small records that carry a PAN, and hashes PANs for lookups."""

    def __init__(self, master_key: bytes) -> None:
        self._master = master_key
        self._aead = AESGCM(_derive(master_key, b"pan encryption"))
        self._mac_key = _derive(master_key, b"pan lookup")

    def export_key(self) -> bytes:
        """The master key, for the journal's indexer process (handed over a pipe, never written)."""
        return self._master

    def pan_hash(self, pan: str) -> str:
        """A keyed hash of the PAN (hex): equal PANs give equal hashes; the PAN can't be recovered."""
        return hmac.digest(self._mac_key, pan.encode("ascii", "replace"), "sha256").hex()[:32]

    def seal(self, record: dict[str, str]) -> bytes:
        """AES-256-GCM of the record: a 12-byte nonce, then ciphertext and tag.

        The plaintext is a zero byte and the marshalled dict (a third of JSON's cost on
        the hot path; only what this key sealed is ever unmarshalled, GCM sees to that).
        Records sealed as JSON by earlier versions still open."""
        return self.seal_bytes(b"\0" + marshal.dumps(record, 4))

    def seal_bytes(self, data: bytes) -> bytes:
        """AES-256-GCM of ``data``: a 12-byte nonce, then ciphertext and tag."""
        nonce = os.urandom(12)
        return nonce + self._aead.encrypt(nonce, data, None)

    def open_bytes(self, blob: bytes) -> bytes:
        """What ``seal_bytes`` sealed; raises if the blob was not sealed by this key or was changed."""
        return self._aead.decrypt(blob[:12], blob[12:], None)

    def open(self, blob: bytes) -> dict[str, str]:
        plain = self.open_bytes(blob)
        if plain[:1] == b"\0":
            record = marshal.loads(plain[1:])
            if not isinstance(record, dict):
                raise ValueError("sealed record is not a mapping")
            return record
        return json.loads(plain)
