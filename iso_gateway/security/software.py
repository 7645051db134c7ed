"""The software security module: keys in a wrapped key file, for development and small sites.

The key file holds every key (zone keys, MAC keys, data keys) as JSON sealed whole with AES-256-GCM
under a key-encrypting key (KEK): ``KEYFILE_MAGIC``, a 12-byte nonce, then ciphertext and tag, the
magic bound as associated data. Without the KEK the file is noise, and so is everything its data
keys sealed. The KEK comes from the environment (``ISO_GATEWAY_KEK``: 64 hex digits) or from a file
that must not lie inside the state directory (where the key file and the journal live) and must be
readable by its owner only. The key file is written whole under a temporary name (mode 0600) and
renamed into place, so a crash leaves the old file or the new one.

Each process that opens the file holds its keys in memory; a change one process makes (a working
key installed, a data key rotated) reaches the others when they open the file again (``reload``).
"""

from __future__ import annotations

import hmac
import json
import os
import secrets
import stat
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ..core.errors import ConfigError
from .keys import KeyType, SecretKey, key_type_for, unwrap_working_key
from .mac import CmacKey, MacAlgorithm, RetailMacKey, check_value_matches, mac_matches
from .module import (
    NONCE_LENGTH,
    KekUnavailable,
    KeyCheckError,
    KeyUsage,
    SealError,
    SecurityModuleError,
    UnknownKey,
    check_key_id,
    check_label,
    kcv_hex,
    parse_sealed,
    seal_header,
)
from .pan import PanVault

KEK_ENV: Final = "ISO_GATEWAY_KEK"
KEYFILE_MAGIC: Final = b"iso-gateway keys 1\n"
FORMAT: Final = 1


class Kek:
    """The key-encrypting key of a key file (AES-256). Shows its check value, never its bytes."""

    __slots__ = ("_aead", "kcv", "source")

    def __init__(self, value: bytes, source: str) -> None:
        if len(value) != 32:
            raise KekUnavailable(f"{source}: the key-encrypting key must be 32 bytes (64 hex digits)")
        self._aead = AESGCM(value)
        self.kcv = SecretKey(value, usage=KeyUsage.DATA, key_type=KeyType.AES).kcv
        self.source = source

    def seal(self, plain: bytes) -> bytes:
        nonce = os.urandom(NONCE_LENGTH)
        return KEYFILE_MAGIC + nonce + self._aead.encrypt(nonce, plain, KEYFILE_MAGIC)

    def open(self, blob: bytes, where: str) -> bytes:
        if not blob.startswith(KEYFILE_MAGIC):
            raise SecurityModuleError(f"{where}: not an iso-gateway key file")
        body = blob[len(KEYFILE_MAGIC):]
        try:
            return self._aead.decrypt(body[:NONCE_LENGTH], body[NONCE_LENGTH:], KEYFILE_MAGIC)
        except InvalidTag:
            raise KekUnavailable(
                f"{where}: does not open under the key-encrypting key from {self.source} "
                f"(KCV {kcv_hex(self.kcv)}): a wrong KEK, or a changed file") from None

    def __repr__(self) -> str:
        return f"<Kek from {self.source} kcv={kcv_hex(self.kcv)}>"

    __str__ = __repr__

    def __reduce__(self) -> tuple[object, ...]:
        raise TypeError("a Kek is not pickled")


def _inside(path: Path, directory: Path) -> bool:
    try:
        path.resolve().relative_to(directory.resolve())
    except ValueError:
        return False
    return True


def load_kek(state_dir: str | os.PathLike[str], kek_file: str | os.PathLike[str] | None = None,
             *, env: Mapping[str, str] | None = None, env_var: str = KEK_ENV) -> Kek:
    """The KEK from the environment variable ``env_var`` (hex), else from ``kek_file`` (hex).

    The file is refused if it lies inside ``state_dir`` (the KEK must not sit beside what it
    protects) or if its group or others may read it. No KEK at all raises KekUnavailable."""
    environ = os.environ if env is None else env
    text = environ.get(env_var)
    if text:
        try:
            return Kek(bytes.fromhex(text.strip()), env_var)
        except ValueError:
            raise ConfigError(env_var, "", "must be 64 hex digits") from None
    if kek_file is None:
        raise KekUnavailable(f"no key-encrypting key: set {env_var} or configure a KEK file outside the state directory")
    path = Path(kek_file)
    if _inside(path, Path(state_dir)):
        raise ConfigError(str(path), "", f"the KEK file must not be inside the state directory {state_dir}")
    try:
        st = path.stat()
    except FileNotFoundError:
        raise KekUnavailable(f"{path}: no such KEK file") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(str(path), "", f"the KEK file must be readable by its owner only (mode {stat.S_IMODE(st.st_mode):04o})")
    try:
        return Kek(bytes.fromhex(path.read_text().strip()), str(path))
    except ValueError:
        raise ConfigError(str(path), "", "the KEK file must hold 64 hex digits") from None


def write_kek_file(path: str | os.PathLike[str]) -> None:
    """A new random KEK file (mode 0600), for development set-ups. Refuses to overwrite one
    (FileExistsError). Written whole under a temporary name and linked into place, so a process
    racing this one sees no file or a complete one, never an empty one."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.link(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


class SoftwareSecurityModule:
    """SecurityModule and KeyLoader over a key file wrapped under a KEK (see the module docstring)."""

    def __init__(self, key_file: str | os.PathLike[str], kek: Kek, *, create: bool = False,
                 first_data_key_id: str = "1") -> None:
        self._path = Path(key_file)
        self._kek = kek
        self._lock = threading.RLock()
        self._keys: dict[str, SecretKey] = {}
        self._mac: dict[str, RetailMacKey | CmacKey] = {}
        self._mac_pad2: dict[str, RetailMacKey] = {}  # retail keys asked for with the other padding method
        self.mac_generation = 0
        self._data: dict[str, SecretKey] = {}
        self._data_aead: dict[str, AESGCM] = {}
        self._current = ""
        self._lookup = ""  # the data key whose derived key hashes PANs for lookups: the first, for good
        if not self._path.exists():
            if not create:
                raise SecurityModuleError(f"{self._path}: no key file")
            self._path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._add_data_key(check_key_id(first_data_key_id), os.urandom(32))
            self._save()
        else:
            self.reload()

    @classmethod
    def from_environment(cls, key_file: str | os.PathLike[str], state_dir: str | os.PathLike[str],
                         kek_file: str | os.PathLike[str] | None = None, *, create: bool = False) -> SoftwareSecurityModule:
        """The module over ``key_file``, its KEK from ``ISO_GATEWAY_KEK`` or ``kek_file`` (see load_kek)."""
        return cls(key_file, load_kek(state_dir, kek_file), create=create)

    # -- the file ------------------------------------------------------------------------------

    def reload(self) -> None:
        """Read the key file again (another process may have installed or rotated a key)."""
        where = str(self._path)
        plain = self._kek.open(self._path.read_bytes(), where)
        try:
            doc = json.loads(plain)
            if doc.get("format") != FORMAT:
                raise SecurityModuleError(f"{where}: key file format {doc.get('format')!r} is not {FORMAT}")
            keys = {check_label(label): SecretKey(
                        bytes.fromhex(k["value"]), usage=KeyUsage(k["usage"]), key_type=KeyType(k["type"]),
                        algorithm=MacAlgorithm(k["algorithm"]) if k.get("algorithm") else None)
                    for label, k in doc["keys"].items()}
            data = {check_key_id(kid): bytes.fromhex(v) for kid, v in doc["data"]["keys"].items()}
            current = doc["data"]["current"]
            lookup = doc["data"].get("lookup") or current
        except (KeyError, TypeError, ValueError) as exc:
            raise SecurityModuleError(f"{where}: malformed key file ({type(exc).__name__})") from None
        with self._lock:
            self._keys, self._mac, self._mac_pad2 = {}, {}, {}
            self.mac_generation += 1
            for label, key in keys.items():
                self._set_key(label, key)
            self._data, self._data_aead = {}, {}
            for kid, value in data.items():
                self._add_data_key(kid, value)
            if current not in self._data:
                raise SecurityModuleError(f"{where}: the current data key {current!r} is not in the file")
            if lookup not in self._data:
                raise SecurityModuleError(f"{where}: the lookup data key {lookup!r} is not in the file")
            self._current, self._lookup = current, lookup

    def _save(self) -> None:
        doc = {
            "format": FORMAT,
            "keys": {label: {"usage": str(k.usage), "type": str(k.key_type),
                             "algorithm": str(k.algorithm) if k.algorithm else None, "value": k.reveal().hex()}
                     for label, k in self._keys.items()},
            "data": {"current": self._current, "lookup": self._lookup, "keys": {kid: k.reveal().hex() for kid, k in self._data.items()}},
        }
        _write_atomically(self._path, self._kek.seal(json.dumps(doc, sort_keys=True).encode()))

    # -- keys ----------------------------------------------------------------------------------

    def _set_key(self, label: str, key: SecretKey) -> None:
        self._keys[label] = key
        self.mac_generation += 1
        self._mac.pop(label, None)
        self._mac_pad2.pop(label, None)
        if key.usage is KeyUsage.MAC:
            self._mac[label] = RetailMacKey(key.reveal()) if key.algorithm is MacAlgorithm.RETAIL else CmacKey(key.reveal())

    def _add_data_key(self, key_id: str, value: bytes) -> SecretKey:
        key = SecretKey(value, usage=KeyUsage.DATA, key_type=KeyType.AES)
        self._data[key_id] = key
        self._data_aead[key_id] = AESGCM(value)
        if not self._current:
            self._current = key_id
        if not self._lookup:
            self._lookup = key_id
        return key

    def _key(self, label: str, usage: KeyUsage) -> SecretKey:
        key = self._keys.get(label)
        if key is None or key.usage is not usage:
            raise UnknownKey(f"no {usage} key labelled {label!r}")
        return key

    def _mac_key(self, label: str, padding: int) -> RetailMacKey | CmacKey:
        key = self._mac.get(label)
        if key is None:
            raise UnknownKey(f"no mac key labelled {label!r}")
        if isinstance(key, RetailMacKey) and key.padding != padding:
            other = self._mac_pad2.get(label)
            if other is None or other.padding != padding:
                other = self._mac_pad2[label] = RetailMacKey(self._keys[label].reveal(), padding=padding)
            return other
        return key

    def import_key(self, label: str, value: bytes, *, usage: KeyUsage | str,
                   algorithm: MacAlgorithm | str | None = None, key_type: KeyType | str | None = None) -> str:
        usage = KeyUsage(usage)
        alg = MacAlgorithm(algorithm) if algorithm else None
        with self._lock:
            if usage is KeyUsage.DATA:
                kid = check_key_id(label)
                if kid in self._data:
                    raise SecurityModuleError(f"data key {kid!r} exists already; a data key is never replaced")
                key = self._add_data_key(kid, value)
                self._current = kid
            else:
                key = SecretKey(value, usage=usage, key_type=key_type_for(usage, alg, key_type), algorithm=alg)
                self._set_key(check_label(label), key)
            self._save()
            return kcv_hex(key.kcv)

    def import_legacy_data_key(self, value: bytes) -> tuple[str, bool]:
        """A PAN master key from before the security module (an old ``pan.key``), kept as a retired
        data key: it opens what it sealed and never seals again. Its key id is its check value, the
        id the old vault wrote in its records. It becomes the lookup key: the PAN hashes already
        stored were made with it. Returns (key id, whether it was added now: False when the file
        holds it already)."""
        key = SecretKey(value, usage=KeyUsage.DATA, key_type=KeyType.AES)
        kid = kcv_hex(key.kcv)
        with self._lock:
            have = self._data.get(kid)
            if have is not None:
                if not hmac.compare_digest(have.reveal(), key.reveal()):
                    raise SecurityModuleError(f"data key {kid!r} exists already with another value")
                return kid, False
            self._data[kid] = key
            self._data_aead[kid] = AESGCM(key.reveal())
            self._lookup = kid
            self._save()
            return kid, True

    # -- SecurityModule ------------------------------------------------------------------------

    def mac(self, label: str, data: bytes, *, padding: int = 1) -> bytes:
        with self._lock:
            key = self._mac.get(label)  # the common case first: a message per call on the hot path
            if key is None or (type(key) is RetailMacKey and key.padding != padding):
                key = self._mac_key(label, padding)
            return key.mac(data)

    def mac_function(self, label: str, *, padding: int = 1) -> Callable[[bytes], bytes]:
        # The key object's own method: it keeps its cipher contexts and buffers, so it is for one
        # thread (the module's lock no longer stands around it); a key change makes a new object.
        with self._lock:
            key = self._mac_key(label, padding)
            return key.function() if isinstance(key, RetailMacKey) else key.mac

    def verify_mac(self, label: str, data: bytes, received: bytes, *, padding: int = 1) -> bool:
        with self._lock:
            return mac_matches(self._mac_key(label, padding).mac(data), received)

    def check_value(self, label: str) -> str:
        with self._lock:
            key = self._keys.get(label)
            if key is None:
                raise UnknownKey(f"no key labelled {label!r}")
            return kcv_hex(key.kcv)

    def check_values(self) -> dict[str, str]:
        with self._lock:
            out = {label: kcv_hex(k.kcv) for label, k in sorted(self._keys.items())}
            out.update({f"data/{kid}": kcv_hex(k.kcv) for kid, k in sorted(self._data.items())})
            return out

    def install_key(self, label: str, *, kek: str, wrapped: bytes, check_value: bytes | str,
                    algorithm: MacAlgorithm | str) -> str:
        alg = MacAlgorithm(algorithm)
        check_label(label)
        with self._lock:
            zone = self._key(kek, KeyUsage.KEK)
            value = unwrap_working_key(zone, wrapped)
            key = SecretKey(value, usage=KeyUsage.MAC, key_type=key_type_for(KeyUsage.MAC, alg, None), algorithm=alg)
            if not check_value_matches(check_value, key.kcv):
                raise KeyCheckError(f"key for {label!r} under {kek!r}: check value does not match; not installed")
            self._set_key(label, key)
            self._save()
            return kcv_hex(key.kcv)

    @property
    def data_key_id(self) -> str:
        return self._current

    def seal(self, data: bytes, aad: bytes = b"") -> bytes:
        with self._lock:
            kid = self._current
            aead = self._data_aead[kid]
        header = seal_header(kid)
        nonce = os.urandom(NONCE_LENGTH)
        return header + nonce + aead.encrypt(nonce, data, header + aad)

    def open(self, blob: bytes, aad: bytes = b"") -> bytes:
        parsed = parse_sealed(blob)
        if parsed is None:
            raise SealError("not a sealed blob")
        kid, header, nonce, body = parsed
        with self._lock:
            aead = self._data_aead.get(kid)
        if aead is None:
            raise SealError(f"sealed under data key {kid!r}, which this module does not hold")
        try:
            return aead.decrypt(nonce, body, header + aad)
        except InvalidTag:
            raise SealError(f"does not open under data key {kid!r}: changed, or not sealed by it") from None

    def rotate_data_key(self, key_id: str) -> str:
        kid = check_key_id(key_id)
        with self._lock:
            if kid in self._data:
                raise SecurityModuleError(f"data key {kid!r} exists already; a rotation needs a new id")
            key = self._add_data_key(kid, os.urandom(32))
            self._current = kid
            self._save()
            return kcv_hex(key.kcv)

    def pan_vault(self) -> PanVault:
        """A PanVault over this module's data keys, for the journal (whose seals run in process and in
        its indexer child): the current key seals, every key opens, the first key hashes PANs for
        lookups so that they stay comparable across rotations. Software module only: a token's
        data keys never leave it."""
        with self._lock:
            current = self._data[self._current].reveal()
            retired = {kid: k.reveal() for kid, k in self._data.items() if kid != self._current}
            return PanVault(current, key_id=self._current, retired=retired, lookup_key_id=self._lookup)

    def close(self) -> None:
        with self._lock:
            self._keys, self._mac, self._mac_pad2, self._data, self._data_aead = {}, {}, {}, {}, {}

    def __repr__(self) -> str:
        return f"<SoftwareSecurityModule {self._path} kek={self._kek!r} keys={len(self._keys)} data_key={self._current!r}>"
