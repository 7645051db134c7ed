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

Each sealed record names the id of the key that sealed it, and a vault may hold
several keys: new records are sealed under the current one, older ones still
open (records sealed before key ids existed too). With the software security
module the master keys are its data keys (``SoftwareSecurityModule.pan_vault``),
kept in a key file wrapped under a key-encrypting key outside the state folder.
"""

from __future__ import annotations

import hmac
import json
import marshal
import os
import secrets
from collections.abc import Mapping
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..core.errors import ConfigError
from .mac import aes_check_value
from .module import check_key_id, kcv_hex, parse_sealed, seal_header

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


RING_MAGIC = b"iso-gateway pan keyring 1\n"


def key_check_value(master_key: bytes) -> str:
    """The check value of a master key (6 hex digits): its AES-CMAC KCV when it is an AES key length,
    else that of its HKDF-derived 32 bytes. It names the key in logs and, by default, in sealed blobs."""
    key = master_key if len(master_key) in (16, 24, 32) else _derive(master_key, b"check value")
    return kcv_hex(aes_check_value(key))


class PanVault:
    """Encrypts small records that carry a PAN, and hashes PANs for lookups.

    A vault holds one or more master keys, each with a key id: the current one seals, every one opens
    what it sealed. Sealed blobs name their key id (``module.SEAL_MAGIC``, id length, id, nonce,
    ciphertext and tag; the header authenticated as associated data). Blobs sealed before key ids
    existed (nonce, ciphertext and tag) still open: they are tried under each key, GCM tells which.

    ``PanVault(key)`` is the single-key vault of old, its key id the key's check value. To rotate:
    ``PanVault(new, key_id="2", retired={"1": old}, lookup_key_id="1")``; keep the lookup key id on
    the key that hashed the PANs already stored, or equal PANs across the rotation hash apart.
    """

    def __init__(self, master_key: bytes, *, key_id: str | None = None,
                 retired: Mapping[str, bytes] | None = None, lookup_key_id: str | None = None) -> None:
        if master_key.startswith(RING_MAGIC):
            if key_id is not None or retired or lookup_key_id is not None:
                raise ValueError("an exported key ring carries its own key ids")
            ring = json.loads(master_key[len(RING_MAGIC):])
            keys = {kid: bytes.fromhex(v) for kid, v in ring["keys"].items()}
            key_id, lookup_key_id = ring["current"], ring["lookup"]
            master_key = keys.pop(key_id)
            retired = keys
        self._plain_export = key_id is None and not retired and lookup_key_id is None
        current = check_key_id(key_id if key_id is not None else key_check_value(master_key))
        self._masters: dict[str, bytes] = {current: master_key}
        for kid, key in (retired or {}).items():
            if check_key_id(kid) in self._masters:
                raise ValueError(f"data key id {kid!r} given twice")
            self._masters[kid] = key
        lookup = current if lookup_key_id is None else lookup_key_id
        if lookup not in self._masters:
            raise ValueError(f"lookup key id {lookup!r} is not among the vault's keys")
        self._current, self._lookup = current, lookup
        self._aeads = {kid: AESGCM(_derive(key, b"pan encryption")) for kid, key in self._masters.items()}
        self._master = master_key
        self._aead = self._aeads[current]
        self._header = seal_header(current)
        self._mac_key = _derive(self._masters[lookup], b"pan lookup")

    @property
    def key_id(self) -> str:
        """The id of the key that seals new records."""
        return self._current

    def key_ids(self) -> list[str]:
        return list(self._masters)

    def check_values(self) -> dict[str, str]:
        """Key id -> check value of every key the vault holds, for the log at start and on change."""
        return {kid: key_check_value(key) for kid, key in self._masters.items()}

    def export_key(self) -> bytes:
        """The key material, for the journal's indexer process (handed over a pipe, never written):
        ``PanVault(export_key())`` is the same vault. A single-key vault exports its bare master key,
        as it always has; a vault of several keys (or named ids) exports a key ring."""
        if self._plain_export:
            return self._master
        ring = {"current": self._current, "lookup": self._lookup,
                "keys": {kid: key.hex() for kid, key in self._masters.items()}}
        return RING_MAGIC + json.dumps(ring).encode()

    def pan_hash(self, pan: str) -> str:
        """A keyed hash of the PAN (hex): equal PANs give equal hashes; the PAN can't be recovered."""
        return hmac.digest(self._mac_key, pan.encode("ascii", "replace"), "sha256").hex()[:32]

    def seal(self, record: dict[str, str]) -> bytes:
        """AES-256-GCM of the record, in a blob that names the key id (see the class docstring).

        The plaintext is a zero byte and the marshalled dict (a third of JSON's cost on
        the hot path; only what this key sealed is ever unmarshalled, GCM sees to that).
        Records sealed as JSON by earlier versions still open."""
        return self.seal_bytes(b"\0" + marshal.dumps(record, 4))

    def seal_bytes(self, data: bytes) -> bytes:
        """AES-256-GCM of ``data`` under the current key: header (key id), 12-byte nonce, ciphertext and tag."""
        nonce = os.urandom(12)
        return self._header + nonce + self._aead.encrypt(nonce, data, self._header)

    def open_bytes(self, blob: bytes) -> bytes:
        """What ``seal_bytes`` sealed, under whichever held key sealed it; raises InvalidTag if no key
        held sealed it or the blob was changed."""
        parsed = parse_sealed(blob)
        if parsed is not None:
            kid, header, nonce, body = parsed
            aead = self._aeads.get(kid)
            if aead is not None:
                try:
                    return aead.decrypt(nonce, body, header)
                except InvalidTag:
                    pass  # perhaps an old blob whose random nonce looks like a header: tried below
        # The format without a key id: nonce, then ciphertext and tag, no associated data.
        for aead in self._aeads.values():
            try:
                return aead.decrypt(blob[:12], blob[12:], None)
            except InvalidTag:
                continue
        raise InvalidTag()

    def open(self, blob: bytes) -> dict[str, str]:
        plain = self.open_bytes(blob)
        if plain[:1] == b"\0":
            record = marshal.loads(plain[1:])
            if not isinstance(record, dict):
                raise ValueError("sealed record is not a mapping")
            return record
        return json.loads(plain)

    def __repr__(self) -> str:
        return f"<PanVault key_id={self._current!r} keys={self.check_values()}>"

    __str__ = __repr__
