"""The PKCS#11 security module: keys held in a token (a network HSM; SoftHSM2 in the tests).

Through python-pkcs11. Every key is a token object (CKA_TOKEN, CKA_PRIVATE, CKA_SENSITIVE, not
extractable) named by CKA_LABEL; its CKA_ID says what it is for (``iso-gateway:kek``,
``iso-gateway:mac:retail``, ``iso-gateway:mac:aes-cmac``, ``iso-gateway:data``). Without the user
PIN no key can be found or used: the PIN plays the part the KEK plays in the software module.

How each operation maps onto mechanisms a token has (SoftHSM2 has no CKM_DES3_X919_MAC):

- retail MAC (ISO/IEC 9797-1 algorithm 3): built from CKM_DES3_CBC and CKM_DES3_ECB. The key is
  two objects: ``label`` holds K1 || K2 (CKK_DES2, i.e. EDE with K1, K2, K1) and ``label#k1`` holds
  K1 || K1 (EDE with K1 twice is single DES under K1). The CBC-MAC of all blocks but the last runs
  under ``label#k1``; the last block, XORed with that chaining value, is encrypted under ``label``:
  E_K1(D_K2(E_K1(x))) is exactly the algorithm's last step followed by its output transformation.
  So both objects carry CKA_ENCRYPT: whoever holds the session can encrypt with a MAC key, which
  gives him no more than the MAC itself would.
- AES-CMAC: CKM_AES_CMAC.
- check values: TDES keys encrypt a zero block (CKM_DES3_ECB), or the token's CKA_CHECK_VALUE
  (same convention) for zone keys, which may not encrypt; AES keys are CMACed over a zero block,
  so AES keys (zone and data keys too) carry CKA_SIGN.
- a working key under an AES zone key: C_UnwrapKey with CKM_AES_KEY_WRAP, the key never leaves the
  token. Under a TDES zone key the usual form is TDES-ECB, and SoftHSM2 can't C_UnwrapKey with
  CKM_DES3_ECB (nor with CKM_DES3_CBC). A token that can does it inside; otherwise, only if the module
  was opened with ``host_unwrap_fallback=True``, the zone key decrypts the key into this process's
  memory (CKM_DES3_ECB C_Decrypt) and it is imported: acceptable for development on SoftHSM2, not
  for production, where the HSM's own key-import command belongs. A retail key under an AES zone
  key takes the same path (its K1 || K1 half can't be unwrapped alone).
- the data key: AES-256 generated in the token; CKM_AES_GCM with a 12-byte nonce from the host
  (``os.urandom``) and the blob header as associated data, the same blob format as the software
  module's. Which data key is current is a CKO_DATA object ``iso-gateway/current-data-key`` holding
  ``<generation>:<key id>``; after a crash mid-rotation the highest generation wins.

One session per module, behind a lock; each worker process opens its own module.
"""

from __future__ import annotations

import hmac
import os
import threading
from collections.abc import Callable
from functools import partial
from typing import Any, Final

import pkcs11
from pkcs11 import Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass
from pkcs11.exceptions import MechanismInvalid, PinIncorrect, PKCS11Error, UserAlreadyLoggedIn
from pkcs11.mechanisms import GCMParams

from .keys import KeyType as IgKeyType
from .keys import check_length, key_type_for
from .mac import MacAlgorithm, aes_check_value, check_value_matches, mac_matches, pad_method1, pad_method2
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

ID_PREFIX: Final = b"iso-gateway:"
ID_KEK: Final = ID_PREFIX + b"kek"
ID_DATA: Final = ID_PREFIX + b"data"
ID_K1: Final = ID_PREFIX + b"mac-k1"
K1_SUFFIX: Final = "#k1"
DATA_PREFIX: Final = "data/"
CURRENT_LABEL: Final = "iso-gateway/current-data-key"
LOOKUP_LABEL: Final = "iso-gateway/lookup-data-key"
LEGACY_PREFIX: Final = "iso-gateway/legacy-data-key/"
LEGACY_AAD: Final = b"iso-gateway legacy data key "
VAULT_INFO: Final = b"iso-gateway journal key"
APPLICATION: Final = "iso-gateway"

# Usual places of SoftHSM2's library on Debian and elsewhere, for development set-ups.
SOFTHSM2_LIBRARIES: Final = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
)


def find_softhsm2() -> str | None:
    """The SoftHSM2 PKCS#11 library on this machine, if there is one."""
    return next((p for p in SOFTHSM2_LIBRARIES if os.path.exists(p)), None)


def _mac_id(algorithm: MacAlgorithm) -> bytes:
    return ID_PREFIX + b"mac:" + str(algorithm).encode()


# Attributes every key this module creates carries: on the token, private, never leaving it in clear.
_KEEP: Final[dict[Attribute, Any]] = {
    Attribute.TOKEN: True, Attribute.PRIVATE: True, Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False,
}
_SESSION: Final[dict[Attribute, Any]] = {**_KEEP, Attribute.TOKEN: False}


class Pkcs11SecurityModule:
    """SecurityModule and KeyLoader over a PKCS#11 token (see the module docstring)."""

    def __init__(self, library: str, *, token_label: str, pin: str, host_unwrap_fallback: bool = False,
                 first_data_key_id: str | None = "1") -> None:
        self._lock = threading.RLock()
        self._host_unwrap = host_unwrap_fallback
        self._token_label = token_label
        try:
            lib = pkcs11.lib(library)
            token = lib.get_token(token_label=token_label)
        except PKCS11Error as exc:
            raise SecurityModuleError(f"PKCS#11 token {token_label!r}: not found ({type(exc).__name__})") from None
        try:
            self._session = token.open(rw=True, user_pin=pin)
        except UserAlreadyLoggedIn:
            # PKCS#11 logs in per process, not per session: another module of this process is logged
            # in, and a new session shares its login (the PIN was checked when it logged in).
            self._session = token.open(rw=True)
        except PinIncorrect:
            raise KekUnavailable(f"PKCS#11 token {token_label!r}: the PIN was refused") from None
        except PKCS11Error as exc:
            raise KekUnavailable(f"PKCS#11 token {token_label!r}: no session ({type(exc).__name__})") from None
        self._closed = False
        self._macs: dict[str, tuple[MacAlgorithm, Any, Any]] = {}
        self._data: dict[str, Any] = {}
        self._current = ""
        self._generation = 0
        self.reload()
        if not self._current and first_data_key_id is not None:
            self.rotate_data_key(first_data_key_id)

    # -- objects -------------------------------------------------------------------------------

    def _find(self, label: str, id_: bytes | None = None) -> list[Any]:
        attrs: dict[Attribute, Any] = {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.LABEL: label}
        if id_ is not None:
            attrs[Attribute.ID] = id_
        return list(self._session.get_objects(attrs))

    def _one(self, label: str, ids: tuple[bytes, ...], what: str) -> Any:
        for obj in self._find(label):
            if obj[Attribute.ID] in ids:
                return obj
        raise UnknownKey(f"no {what} labelled {label!r} in token {self._token_label!r}")

    def reload(self) -> None:
        """Read which data keys exist and which is current (another process may have rotated)."""
        with self._lock:
            data: dict[str, Any] = {}
            for obj in list(self._session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.ID: ID_DATA})):
                label = obj[Attribute.LABEL]
                if label.startswith(DATA_PREFIX):
                    data[label[len(DATA_PREFIX):]] = obj
            best = (0, "")
            for obj in list(self._session.get_objects({Attribute.CLASS: ObjectClass.DATA, Attribute.LABEL: CURRENT_LABEL})):
                gen, _, kid = bytes(obj[Attribute.VALUE]).decode("ascii", "replace").partition(":")
                if gen.isdigit() and kid in data and (int(gen), kid) > best:
                    best = (int(gen), kid)
            self._data = data
            self._generation, self._current = best

    def _replace(self, label: str, objs: list[tuple[dict[Attribute, Any], Any]]) -> None:
        """Make session objects ``objs`` (with their final attributes) token objects, replacing any key
        of that label (and its helper): the new ones exist before the old ones go."""
        self._macs.pop(label, None)
        old = self._find(label) + self._find(label + K1_SUFFIX)
        for attrs, obj in objs:
            obj.copy({**attrs, Attribute.TOKEN: True})
            obj.destroy()
        for obj in old:
            obj.destroy()

    def _kcv(self, obj: Any, key_type: IgKeyType) -> bytes:
        if key_type is IgKeyType.AES:
            return bytes(obj.sign(bytes(16), mechanism=Mechanism.AES_CMAC))[:3]
        try:
            return bytes(obj.encrypt(bytes(8), mechanism=Mechanism.DES3_ECB))[:3]
        except PKCS11Error:
            return bytes(obj[Attribute.CHECK_VALUE])[:3]  # a zone key that may not encrypt

    def _create_mac_objects(self, value: bytes, algorithm: MacAlgorithm) -> list[tuple[dict[Attribute, Any], Any]]:
        """Session objects for a MAC key given in clear, with the attributes their token copies get."""
        check_length(key_type_for(KeyUsage.MAC, algorithm, None), KeyUsage.MAC, algorithm, len(value))
        if algorithm is MacAlgorithm.RETAIL:
            base = {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: KeyType.DES2,
                    Attribute.ENCRYPT: True, **_SESSION}
            main = self._session.create_object({**base, Attribute.VALUE: value, Attribute.ID: _mac_id(algorithm)})
            k1 = self._session.create_object({**base, Attribute.VALUE: value[:8] * 2, Attribute.ID: ID_K1})
            return [({}, main), ({}, k1)]
        obj = self._session.create_object({Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: KeyType.AES,
                                           Attribute.VALUE: value, Attribute.SIGN: True, Attribute.VERIFY: True,
                                           Attribute.ID: _mac_id(algorithm), **_SESSION})
        return [({}, obj)]

    def _labelled(self, label: str, objs: list[tuple[dict[Attribute, Any], Any]]) -> list[tuple[dict[Attribute, Any], Any]]:
        out = []
        for i, (attrs, obj) in enumerate(objs):
            out.append(({**attrs, Attribute.LABEL: label if i == 0 else label + K1_SUFFIX}, obj))
        return out

    def import_key(self, label: str, value: bytes, *, usage: KeyUsage | str,
                   algorithm: MacAlgorithm | str | None = None, key_type: IgKeyType | str | None = None) -> str:
        usage = KeyUsage(usage)
        alg = MacAlgorithm(algorithm) if algorithm else None
        with self._lock:
            if usage is KeyUsage.DATA:
                raise SecurityModuleError("data keys are generated in the token (rotate_data_key), never imported")
            kt = key_type_for(usage, alg, key_type)
            check_length(kt, usage, alg, len(value))
            check_label(label)
            if usage is KeyUsage.MAC:
                assert alg is not None
                objs = self._create_mac_objects(value, alg)
            else:
                attrs: dict[Attribute, Any] = {
                    Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.VALUE: value, Attribute.ID: ID_KEK,
                    Attribute.UNWRAP: True, **_SESSION}
                if kt is IgKeyType.AES:
                    attrs.update({Attribute.KEY_TYPE: KeyType.AES, Attribute.SIGN: True})
                else:
                    attrs[Attribute.KEY_TYPE] = KeyType.DES2 if len(value) == 16 else KeyType.DES3
                    # Only for the host fallback (see the module docstring): C_Decrypt of a received key.
                    attrs[Attribute.DECRYPT] = self._host_unwrap
                objs = [({}, self._session.create_object(attrs))]
            kcv = self._kcv(objs[0][1], kt)
            self._replace(label, self._labelled(label, objs))
            return kcv_hex(kcv)

    # -- SecurityModule ------------------------------------------------------------------------

    def _mac_objects(self, label: str) -> tuple[MacAlgorithm, Any, Any]:
        """The MAC key's algorithm and objects (K1 || K2 and K1 || K1 for retail), found once and kept
        until this module replaces the key; a search per message would cost more than the MAC."""
        found = self._macs.get(label)
        if found is None:
            for obj in self._find(label):
                id_ = obj[Attribute.ID]
                if id_ == _mac_id(MacAlgorithm.AES_CMAC):
                    found = (MacAlgorithm.AES_CMAC, obj, None)
                elif id_ == _mac_id(MacAlgorithm.RETAIL):
                    found = (MacAlgorithm.RETAIL, obj, self._one(label + K1_SUFFIX, (ID_K1,), "retail MAC key half"))
            if found is None:
                raise UnknownKey(f"no mac key labelled {label!r}")
            self._macs[label] = found
        return found

    def mac(self, label: str, data: bytes, *, padding: int = 1) -> bytes:
        if padding not in (1, 2):
            raise SecurityModuleError(f"padding method must be 1 or 2, got {padding!r}")
        with self._lock:
            try:
                return self._mac_with(self._mac_objects(label), data, padding)
            except PKCS11Error:
                # Another process may have replaced the key (its objects are gone): find it again, once.
                self._macs.pop(label, None)
                try:
                    return self._mac_with(self._mac_objects(label), data, padding)
                except PKCS11Error as exc:
                    raise SecurityModuleError(f"MAC under {label!r} failed ({type(exc).__name__})") from None

    @staticmethod
    def _mac_with(objects: tuple[MacAlgorithm, Any, Any], data: bytes, padding: int) -> bytes:
        algorithm, key, k1 = objects
        if algorithm is MacAlgorithm.AES_CMAC:
            return bytes(key.sign(data, mechanism=Mechanism.AES_CMAC))
        padded = pad_method1(data) if padding == 1 else pad_method2(data)
        chain = bytes(8)
        if len(padded) > 8:
            chain = bytes(k1.encrypt(padded[:-8], mechanism=Mechanism.DES3_CBC, mechanism_param=bytes(8)))[-8:]
        last = bytes(a ^ b for a, b in zip(padded[-8:], chain, strict=True))
        return bytes(key.encrypt(last, mechanism=Mechanism.DES3_ECB))

    # The token's keys are found again when they change (``mac`` retries a search once), so a
    # function from ``mac_function`` stays good: this never changes.
    mac_generation = 0

    def mac_function(self, label: str, *, padding: int = 1) -> Callable[[bytes], bytes]:
        with self._lock:
            self._mac_objects(label)  # UnknownKey now, as the protocol says
        return partial(self.mac, label, padding=padding)

    def verify_mac(self, label: str, data: bytes, received: bytes, *, padding: int = 1) -> bool:
        return mac_matches(self.mac(label, data, padding=padding), received)

    def _key_type_of(self, obj: Any) -> IgKeyType:
        return IgKeyType.AES if obj.key_type == KeyType.AES else IgKeyType.TDES

    def check_value(self, label: str) -> str:
        with self._lock:
            for obj in self._find(label):
                if obj[Attribute.ID] in (ID_KEK, _mac_id(MacAlgorithm.RETAIL), _mac_id(MacAlgorithm.AES_CMAC)):
                    return kcv_hex(self._kcv(obj, self._key_type_of(obj)))
            raise UnknownKey(f"no key labelled {label!r}")

    def check_values(self) -> dict[str, str]:
        with self._lock:
            out: dict[str, str] = {}
            for obj in list(self._session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY})):
                id_ = obj[Attribute.ID]
                if id_.startswith(ID_PREFIX) and id_ != ID_K1:
                    out[obj[Attribute.LABEL]] = kcv_hex(self._kcv(obj, self._key_type_of(obj)))
            for kid in self._legacy_keys():
                out[DATA_PREFIX + kid] = kid  # a legacy key's id is its check value
            return dict(sorted(out.items()))

    def install_key(self, label: str, *, kek: str, wrapped: bytes, check_value: bytes | str,
                    algorithm: MacAlgorithm | str) -> str:
        alg = MacAlgorithm(algorithm)
        check_label(label)
        with self._lock:
            zone = self._one(kek, (ID_KEK,), "kek key")
            objs = self._unwrap(zone, wrapped, alg)
            try:
                kt = IgKeyType.TDES if alg is MacAlgorithm.RETAIL else IgKeyType.AES
                kcv = self._kcv(objs[0][1], kt)
                if not check_value_matches(check_value, kcv):
                    raise KeyCheckError(f"key for {label!r} under {kek!r}: check value does not match; not installed")
            except BaseException:
                for _, obj in objs:
                    obj.destroy()
                raise
            self._replace(label, self._labelled(label, objs))
            return kcv_hex(kcv)

    def _unwrap(self, zone: Any, wrapped: bytes, alg: MacAlgorithm) -> list[tuple[dict[Attribute, Any], Any]]:
        zone_aes = zone.key_type == KeyType.AES
        if zone_aes and alg is MacAlgorithm.AES_CMAC:
            try:
                obj = zone.unwrap_key(ObjectClass.SECRET_KEY, KeyType.AES, wrapped, mechanism=Mechanism.AES_KEY_WRAP,
                                      capabilities=MechanismFlag.SIGN | MechanismFlag.VERIFY,
                                      template={**_SESSION, Attribute.ID: _mac_id(alg)})
            except PKCS11Error as exc:
                raise SecurityModuleError(f"the received key does not unwrap ({type(exc).__name__})") from None
            return [({}, obj)]
        if not zone_aes and alg is MacAlgorithm.RETAIL and len(wrapped) == 16:
            try:
                base = dict(mechanism=Mechanism.DES3_ECB, capabilities=MechanismFlag.ENCRYPT)
                main = zone.unwrap_key(ObjectClass.SECRET_KEY, KeyType.DES2, wrapped,
                                       template={**_SESSION, Attribute.ID: _mac_id(alg)}, **base)
                # ECB: the first 8 bytes alone decrypt to K1; twice over they are K1 || K1.
                k1 = zone.unwrap_key(ObjectClass.SECRET_KEY, KeyType.DES2, wrapped[:8] * 2,
                                     template={**_SESSION, Attribute.ID: ID_K1}, **base)
                return [({}, main), ({}, k1)]
            except MechanismInvalid:
                pass  # SoftHSM2: no TDES unwrap; below
            except PKCS11Error as exc:
                raise SecurityModuleError(f"the received key does not unwrap ({type(exc).__name__})") from None
        if not self._host_unwrap:
            raise SecurityModuleError(
                f"token {self._token_label!r} can't unwrap a {alg} key under this zone key inside the token, "
                "and host_unwrap_fallback is off")
        return self._create_mac_objects(self._host_decrypt(zone, wrapped), alg)

    def _host_decrypt(self, zone: Any, wrapped: bytes) -> bytes:
        # Development fallback (module docstring): the clear key passes through this process's memory.
        try:
            if zone.key_type == KeyType.AES:
                raise SecurityModuleError("an AES zone key unwraps inside the token only")
            if not wrapped or len(wrapped) % 8:
                raise SecurityModuleError(f"a key under a TDES zone key is whole 8-byte blocks, got {len(wrapped)} bytes")
            return bytes(zone.decrypt(wrapped, mechanism=Mechanism.DES3_ECB))
        except PKCS11Error as exc:
            raise SecurityModuleError(f"the received key does not decrypt ({type(exc).__name__})") from None

    @property
    def data_key_id(self) -> str:
        if not self._current:
            raise UnknownKey(f"token {self._token_label!r} holds no data key")
        return self._current

    def seal(self, data: bytes, aad: bytes = b"") -> bytes:
        with self._lock:
            kid = self.data_key_id
            header = seal_header(kid)
            nonce = os.urandom(NONCE_LENGTH)
            body = self._data[kid].encrypt(data, mechanism=Mechanism.AES_GCM,
                                           mechanism_param=GCMParams(nonce, header + aad, 128))
            return header + nonce + bytes(body)

    def open(self, blob: bytes, aad: bytes = b"") -> bytes:
        parsed = parse_sealed(blob)
        if parsed is None:
            raise SealError("not a sealed blob")
        kid, header, nonce, body = parsed
        with self._lock:
            if kid not in self._data:
                self.reload()  # another process may have rotated
            key = self._data.get(kid)
            if key is None:
                raise SealError(f"sealed under data key {kid!r}, which token {self._token_label!r} does not hold")
            try:
                return bytes(key.decrypt(body, mechanism=Mechanism.AES_GCM,
                                         mechanism_param=GCMParams(nonce, header + aad, 128)))
            except PKCS11Error:
                raise SealError(f"does not open under data key {kid!r}: changed, or not sealed by it") from None

    def rotate_data_key(self, key_id: str) -> str:
        kid = check_key_id(key_id)
        with self._lock:
            self.reload()
            if kid in self._data:
                raise SecurityModuleError(f"data key {kid!r} exists already; a rotation needs a new id")
            key = self._session.generate_key(
                KeyType.AES, 256, label=DATA_PREFIX + kid, id=ID_DATA, store=True,
                capabilities=MechanismFlag.ENCRYPT | MechanismFlag.DECRYPT | MechanismFlag.SIGN, template=dict(_KEEP))
            old = list(self._session.get_objects({Attribute.CLASS: ObjectClass.DATA, Attribute.LABEL: CURRENT_LABEL}))
            gen = self._generation + 1
            self._session.create_object({
                Attribute.CLASS: ObjectClass.DATA, Attribute.TOKEN: True, Attribute.PRIVATE: True,
                Attribute.LABEL: CURRENT_LABEL, Attribute.APPLICATION: APPLICATION,
                Attribute.VALUE: f"{gen}:{kid}".encode("ascii")})
            for obj in old:
                obj.destroy()
            self._data[kid] = key
            self._current, self._generation = kid, gen
            return kcv_hex(self._kcv(key, IgKeyType.AES))

    # -- the journal's vault --------------------------------------------------------------------

    def _data_objects(self, label: str | None = None) -> list[Any]:
        attrs: dict[Attribute, Any] = {Attribute.CLASS: ObjectClass.DATA}
        if label is not None:
            attrs[Attribute.LABEL] = label
        return list(self._session.get_objects(attrs))

    def _set_data_object(self, label: str, value: bytes) -> None:
        """A private token data object ``label`` holding ``value``; the new one exists before the old goes."""
        old = self._data_objects(label)
        self._session.create_object({
            Attribute.CLASS: ObjectClass.DATA, Attribute.TOKEN: True, Attribute.PRIVATE: True,
            Attribute.LABEL: label, Attribute.APPLICATION: APPLICATION, Attribute.VALUE: value})
        for obj in old:
            obj.destroy()

    def _legacy_keys(self) -> dict[str, bytes]:
        """Key id -> value of the legacy data keys, each kept sealed under a token data key."""
        out: dict[str, bytes] = {}
        for obj in self._data_objects():
            label = obj[Attribute.LABEL]
            if label.startswith(LEGACY_PREFIX):
                kid = label[len(LEGACY_PREFIX):]
                out[kid] = self.open(bytes(obj[Attribute.VALUE]), LEGACY_AAD + kid.encode("ascii"))
        return out

    def _lookup_key_id(self) -> str | None:
        for obj in self._data_objects(LOOKUP_LABEL):
            return bytes(obj[Attribute.VALUE]).decode("ascii", "replace")
        return None

    def _vault_master(self, key: Any, kid: str) -> bytes:
        # Counter-mode key derivation with AES-CMAC as the PRF, inside the token: two blocks, 32 bytes.
        label = VAULT_INFO + b"\0" + kid.encode("ascii")
        return b"".join(bytes(key.sign(bytes([i]) + label, mechanism=Mechanism.AES_CMAC)) for i in (1, 2))

    def import_legacy_data_key(self, value: bytes) -> tuple[str, bool]:
        """A PAN master key from before the security module (an old ``pan.key``), kept as a retired
        data key for the journal's vault: stored sealed under the current token data key, in a
        private data object of the token, so it opens only with the PIN. Its key id is its check
        value (the id the old vault wrote in its records); it becomes the lookup key. Returns (key
        id, whether it was added now)."""
        if len(value) != 32:
            raise UnknownKey(f"a data key must be 32 bytes, got {len(value)}")
        kid = kcv_hex(aes_check_value(value))
        with self._lock:
            self.reload()
            have = self._legacy_keys()
            if kid in have:
                if not hmac.compare_digest(have[kid], value):
                    raise SecurityModuleError(f"legacy data key {kid!r} exists already with another value")
                return kid, False
            if kid in self._data:
                raise SecurityModuleError(f"data key {kid!r} exists already")
            blob = self.seal(value, LEGACY_AAD + kid.encode("ascii"))
            self._set_data_object(LEGACY_PREFIX + kid, blob)
            self._set_data_object(LOOKUP_LABEL, kid.encode("ascii"))
            return kid, True

    def pan_vault(self) -> PanVault:
        """A PanVault for the journal, whose seals run in process and in its indexer child.

        The token's data keys never leave it: each one derives, inside the token (AES-CMAC in counter
        mode), the vault's master key of the same key id, which lives in this process's memory (and the
        indexer's) and nowhere else. Without the token and its PIN none of them can be made again.
        Legacy keys (``import_legacy_data_key``) join as retired keys. The lookup key (PAN hashes) is
        fixed for good on first use, so that equal PANs keep equal hashes across rotations."""
        with self._lock:
            self.reload()
            current = self.data_key_id
            masters = {kid: self._vault_master(key, kid) for kid, key in self._data.items()}
            masters.update(self._legacy_keys())
            lookup = self._lookup_key_id()
            if lookup is None or lookup not in masters:
                lookup = current
                self._set_data_object(LOOKUP_LABEL, lookup.encode("ascii"))
            master = masters.pop(current)
            return PanVault(master, key_id=current, retired=masters, lookup_key_id=lookup)

    def close(self) -> None:
        """Release the session (and with the last one the login). Closing twice is harmless."""
        with self._lock:
            self._data, self._current, self._macs = {}, "", {}
            if not self._closed:
                self._closed = True
                self._session.close()

    def __repr__(self) -> str:
        return f"<Pkcs11SecurityModule token={self._token_label!r} data_key={self._current!r}>"
