"""The daemon's keys: the security module from ``[security]``, the journal's PAN vault from its data
keys, the old ``pan.key`` migrated into it, check values in the log; and ``iso-gateway keys``.

Where each key lives (docs/security.md, "Operations"):

- ``module = "software"``: every key in a key file (``keys.bin`` in the state directory, the
  journal's folder, unless ``key_file`` says otherwise) sealed under a key-encrypting key (KEK) from
  ``ISO_GATEWAY_KEK`` or a KEK file that must lie outside the state directory. For development the
  KEK file defaults to ``$XDG_CONFIG_HOME/iso-gateway/kek.hex`` (``~/.config/...``) and both are
  created when missing (``create = true``), so a fresh checkout runs with one command.
- ``module = "pkcs11"``: keys in a PKCS#11 token; the user PIN from ``ISO_GATEWAY_PKCS11_PIN`` or a
  PIN file outside the state directory.

The journal seals with a ``PanVault`` the module gives (``pan_vault``): the module's current data
key seals, every older one (and a migrated ``pan.key``) still opens. Nothing here logs, raises or
counts key bytes: check values and key ids only.
"""

from __future__ import annotations

import argparse
import logging
import os
import stat
from pathlib import Path
from typing import Protocol

from .config import Config, SecurityConfig, load_config
from .core.errors import ConfigError, IsoGatewayError
from .security.module import SecurityModule, SecurityModuleError
from .security.pan import KEY_ENV as LEGACY_KEY_ENV
from .security.pan import PanVault

log = logging.getLogger("iso_gateway.keys")

KEK_ENV = "ISO_GATEWAY_KEK"
PIN_ENV = "ISO_GATEWAY_PKCS11_PIN"
DEFAULT_KEY_FILE = "keys.bin"


class GatewayKeys(SecurityModule, Protocol):
    """What the daemon needs of a security module beyond the SecurityModule interface (both
    implementations have it): read the keys again, the journal's vault, the old key migrated."""

    def reload(self) -> None: ...

    def pan_vault(self) -> PanVault: ...

    def import_legacy_data_key(self, value: bytes) -> tuple[str, bool]: ...


# --------------------------------------------------------------------------- paths


def state_dir(config: Config) -> Path:
    """The state directory: the journal's folder (where the journal, its log segments and the
    software module's key file live)."""
    return Path(config.journal.path).expanduser().parent


def _path(value: str) -> Path:
    return Path(os.path.expandvars(value)).expanduser()


def key_file_path(config: Config) -> Path:
    sec = config.security
    return _path(sec.key_file) if sec.key_file else state_dir(config) / DEFAULT_KEY_FILE


def default_kek_path() -> Path:
    """The development KEK file: in the user's configuration folder, outside any state directory."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "iso-gateway" / "kek.hex"


def kek_file_path(config: Config) -> Path:
    sec = config.security
    return _path(sec.kek_file) if sec.kek_file else default_kek_path()


def _inside(path: Path, directory: Path) -> bool:
    try:
        path.resolve().relative_to(directory.resolve())
    except ValueError:
        return False
    return True


def check_security_config(config: Config, source: str = "config") -> None:
    """What can be checked without opening anything (``check-config`` runs it too): a KEK or PIN
    file inside the state directory is refused, with the key that names it and why."""
    sec, state = config.security, state_dir(config)
    if sec.module == "software":
        if not os.environ.get(KEK_ENV):
            kek = kek_file_path(config)
            key = "security.kek_file" if sec.kek_file else "security.kek_file (default)"
            if _inside(kek, state):
                raise ConfigError(source, key, f"the KEK file {kek} is inside the state directory {state} "
                                  "(beside the keys and data it protects); put it elsewhere or set " + KEK_ENV)
            if _inside(kek, key_file_path(config).parent):
                raise ConfigError(source, key, f"the KEK file {kek} is in the key file's folder; put it elsewhere")
    else:
        if sec.pin_file and _inside(_path(sec.pin_file), state):
            raise ConfigError(source, "security.pin_file", f"the PIN file is inside the state directory {state}")
        if sec.library and not _path(sec.library).is_file():
            raise ConfigError(source, "security.library", f"no PKCS#11 library at {sec.library}")


# --------------------------------------------------------------------------- opening the module


def _read_secret_file(path: Path, source: str, key: str, what: str) -> str:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ConfigError(source, key, f"no {what} file at {path}") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(source, key, f"the {what} file {path} must be readable by its owner only "
                          f"(mode {stat.S_IMODE(st.st_mode):04o})")
    try:
        return path.read_text().strip()
    except OSError as exc:
        raise ConfigError(source, key, f"can't read the {what} file {path}: {exc.strerror}") from None


def _create_kek(path: Path) -> None:
    from .security.software import write_kek_file

    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        write_kek_file(path)
    except FileExistsError:
        return  # another process made it first: use theirs
    log.warning("created a development key-encrypting key at %s (outside the state directory): for production "
                "set %s, or [security] kek_file to a file you keep and back up apart from the journal, and "
                "create = false, or use module = \"pkcs11\"", path, KEK_ENV)


def open_security_module(config: Config, source: str = "config", *, create: bool | None = None) -> GatewayKeys:
    """The security module ``[security]`` describes, opened. Problems (no KEK, a refused PIN, a KEK
    file in the state directory, a key file that does not open) are ConfigErrors naming the key and
    the reason: the daemon refuses to start with them. ``create`` overrides ``[security] create``."""
    check_security_config(config, source)
    sec = config.security
    try:
        if sec.module == "software":
            return _open_software(config, sec, source, sec.create if create is None else create)
        return _open_pkcs11(config, sec, source)
    except SecurityModuleError as exc:  # its text names files, labels, key ids, check values: never keys
        raise ConfigError(source, f"security ({sec.module})", str(exc)) from None
    except OSError as exc:  # a folder that can't be made, a file that can't be read or written
        raise ConfigError(source, f"security ({sec.module})", f"{exc.filename}: {exc.strerror or exc}") from None


def _open_software(config: Config, sec: SecurityConfig, source: str, create: bool) -> GatewayKeys:
    from .security.software import SoftwareSecurityModule, load_kek

    key_file, kek_file, state = key_file_path(config), kek_file_path(config), state_dir(config)
    if not os.environ.get(KEK_ENV) and not kek_file.exists():
        if key_file.exists():
            raise ConfigError(source, "security.kek_file",
                              f"no KEK file at {kek_file} and {KEK_ENV} is not set: the key file {key_file} "
                              "can't be opened (a new KEK would not open it)")
        if not create:
            raise ConfigError(source, "security.kek_file", f"no KEK file at {kek_file} and {KEK_ENV} is not set "
                              "(iso-gateway keys init creates both for development)")
        _create_kek(kek_file)
    if not key_file.exists() and not create:
        raise ConfigError(source, "security.key_file", f"no key file at {key_file} (iso-gateway keys init)")
    if os.environ.get(KEK_ENV):
        kek = load_kek(state, None)
    else:
        try:
            kek = load_kek(state, kek_file)
        except ConfigError as exc:  # load_kek names the file; say which key of the configuration it is
            raise ConfigError(source, "security.kek_file", f"{kek_file}: {exc.reason}") from None
    existed = key_file.exists()
    module = SoftwareSecurityModule(key_file, kek, create=create)
    if not existed:
        log.warning("created the key file %s with a first data key (sealed under the KEK from %s)",
                    key_file, kek.source)
    return module


def _open_pkcs11(config: Config, sec: SecurityConfig, source: str) -> GatewayKeys:
    from .security.pkcs11 import Pkcs11SecurityModule, find_softhsm2

    library = str(_path(sec.library)) if sec.library else find_softhsm2()
    if library is None:
        raise ConfigError(source, "security.library", "no PKCS#11 library configured and SoftHSM2's is not installed")
    pin = os.environ.get(PIN_ENV)
    if not pin:
        if not sec.pin_file:
            raise ConfigError(source, "security.pin_file", f"no PIN: set {PIN_ENV} or [security] pin_file")
        pin = _read_secret_file(_path(sec.pin_file), source, "security.pin_file", "PIN")
    return Pkcs11SecurityModule(library, token_label=sec.token_label, pin=pin)


# --------------------------------------------------------------------------- the journal's keys


def _legacy_keys(config: Config) -> list[tuple[str, bytes]]:
    """(where from, value) of the pre-security-module PAN keys present: the env var, the key file."""
    found: list[tuple[str, bytes]] = []
    env = os.environ.get(LEGACY_KEY_ENV)
    if env:
        try:
            value = bytes.fromhex(env)
        except ValueError:
            raise ConfigError(LEGACY_KEY_ENV, "", "must be 64 hex digits") from None
        if len(value) != 32:
            raise ConfigError(LEGACY_KEY_ENV, "", "must be 64 hex digits (32 bytes)")
        found.append((LEGACY_KEY_ENV, value))
    path = _path(config.journal.key_file)
    if path.is_file():
        try:
            value = bytes.fromhex(path.read_text().strip())
        except (OSError, ValueError):
            raise ConfigError(str(path), "", "the old PAN key file must hold 64 hex digits") from None
        if len(value) != 32:
            raise ConfigError(str(path), "", "the old PAN key file must hold 64 hex digits (32 bytes)")
        found.append((str(path), value))
    return found


def migrate_legacy_key(module: GatewayKeys, config: Config) -> list[str]:
    """Import an old ``[journal] key_file`` (``pan.key``) or ``ISO_GATEWAY_PAN_KEY`` into the module
    as a retired data key, once, so what it sealed stays readable. The file is left where it is
    (the operator's to back up and remove); the log says so at every start while it is there.
    Returns the key ids imported or found."""
    ids = []
    for where, value in _legacy_keys(config):
        kid, added = module.import_legacy_data_key(value)
        ids.append(kid)
        if added:
            log.warning("old PAN key %s imported into the security module as retired data key %s (check value %s): "
                        "records it sealed stay readable, new ones are sealed under data key %s. It is no longer "
                        "needed: keep a copy apart from the journal, then remove it", where, kid, kid,
                        module.data_key_id)
        else:
            log.warning("old PAN key %s is already in the security module (retired data key %s) and no longer "
                        "needed: keep a copy apart from the journal, then remove it", where, kid)
    return ids


def log_check_values(module: SecurityModule, why: str) -> dict[str, str]:
    """One log line with every key's check value (never key material); returns them."""
    values = module.check_values()
    log.info("key check values (%s): current data key %s; %s", why, module.data_key_id,
             " ".join(f"{label}={kcv}" for label, kcv in values.items()) or "no keys")
    return values


class JournalKeys:
    """The daemon's side of the security module: the journal's vault, reloads and rotations.

    ``vault`` is what the journal seals with; ``attach`` gives it the journal, to which a new vault is
    handed (``Journal.set_vault``) after ``reload`` (SIGHUP) or ``rotate_data_key`` changed the keys."""

    def __init__(self, module: GatewayKeys, config: Config) -> None:
        self.module = module
        migrate_legacy_key(module, config)
        self.vault = module.pan_vault()
        self._journal: object | None = None
        self.check_values = log_check_values(module, "start")

    def attach(self, journal: object) -> None:
        self._journal = journal

    def _refresh(self, why: str) -> bool:
        values = self.module.check_values()
        changed = values != self.check_values or self.vault.key_id != self.module.data_key_id
        if changed:
            self.vault = self.module.pan_vault()
            set_vault = getattr(self._journal, "set_vault", None)
            if set_vault is not None:
                set_vault(self.vault)
            self.check_values = log_check_values(self.module, why)
        return changed

    def reload(self) -> bool:
        """Read the module's keys again (SIGHUP: another process may have rotated or installed one);
        a change is logged with the check values and reaches the journal. True when keys changed.
        A module that can't be read now keeps the keys this process holds, and says why."""
        try:
            self.module.reload()
            return self._refresh("reload")
        except SecurityModuleError as exc:
            log.error("keys not reloaded, the running keys stay: %s", exc)
            return False

    def rotate_data_key(self, key_id: str) -> str:
        """A new data key, current from now on in this process and its indexer; returns its KCV."""
        kcv = self.module.rotate_data_key(key_id)
        self._refresh("data key rotated")
        return kcv


def open_gateway_keys(config: Config, source: str = "config") -> JournalKeys:
    """The module opened, the old key migrated, the vault built, the check values logged."""
    module = open_security_module(config, source)
    try:
        return JournalKeys(module, config)
    except SecurityModuleError as exc:
        module.close()
        raise ConfigError(source, f"security ({config.security.module})", str(exc)) from None


# --------------------------------------------------------------------------- iso-gateway keys


def _config(args: argparse.Namespace) -> Config:
    return load_config(args.config)


def cmd_check_values(args: argparse.Namespace) -> int:
    config = _config(args)
    module = open_security_module(config, args.config, create=False)
    try:
        print(f"security module: {config.security.module}; current data key: {module.data_key_id}")
        for label, kcv in module.check_values().items():
            print(f"{label:<32} {kcv}")
    finally:
        module.close()
    return 0


def cmd_rotate_data_key(args: argparse.Namespace) -> int:
    config = _config(args)
    module = open_security_module(config, args.config, create=False)
    try:
        kid = args.key_id
        if not kid:
            numbers = [int(k[5:]) for k in module.check_values() if k.startswith("data/") and k[5:].isdigit()]
            kid = str(max(numbers, default=0) + 1)
        try:
            kcv = module.rotate_data_key(kid)
        except SecurityModuleError as exc:
            raise IsoGatewayError(str(exc)) from None
        print(f"data key {kid} is current (check value {kcv}); older data keys still open their records")
        print("a running gateway seals under it after a reload: systemctl reload iso-gateway (SIGHUP)")
    finally:
        module.close()
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    """A software key file and its KEK file, for development (or a first production set-up)."""
    config = _config(args)
    if config.security.module != "software":
        raise IsoGatewayError("keys init is for the software module; a PKCS#11 token is set up with its own tools "
                              "(docs/security.md), and its first data key is made at first start")
    key_file = key_file_path(config)
    if key_file.exists():
        raise IsoGatewayError(f"{key_file} exists already; keys init never replaces a key file")
    module = open_security_module(config, args.config, create=True)
    try:
        print(f"key file {key_file}, sealed under the KEK from "
              f"{KEK_ENV if os.environ.get(KEK_ENV) else kek_file_path(config)}")
        print(f"data key {module.data_key_id}: check value {module.check_values()[f'data/{module.data_key_id}']}")
    finally:
        module.close()
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    """A key in clear (a zone key for development, a MAC key for tests), checked against its KCV first."""
    import getpass
    import sys

    from .security.keys import KeyType, check_value_of
    from .security.mac import check_value_matches
    from .security.module import kcv_hex

    config = _config(args)
    if args.value_env:
        text = os.environ.get(args.value_env, "")
    else:
        text = getpass.getpass("key (hex): ") if sys.stdin.isatty() else sys.stdin.readline()
    try:
        value = bytes.fromhex(text.strip())
    except ValueError:
        raise IsoGatewayError("the key must be hex") from None
    usage = "kek" if args.usage == "zone" else "mac"
    key_type = KeyType(args.type) if usage == "kek" else KeyType.TDES if args.algorithm == "retail" else KeyType.AES
    if args.kcv:
        try:
            expected = check_value_of(key_type, value)
        except (ValueError, SecurityModuleError):
            raise IsoGatewayError(f"not a {key_type} key ({len(value)} bytes)") from None
        if not check_value_matches(args.kcv, expected):
            raise IsoGatewayError(f"check value {kcv_hex(expected)} does not match the expected "
                                  f"{args.kcv.upper()}: not imported")
    module = open_security_module(config, args.config, create=False)
    try:
        try:
            kcv = module.import_key(args.label, value, usage=usage,  # type: ignore[attr-defined]
                                    algorithm=args.algorithm if usage == "mac" else None,
                                    key_type=key_type if usage == "kek" else None)
        except (SecurityModuleError, ValueError) as exc:
            raise IsoGatewayError(f"not imported: {exc}") from None
        print(f"{args.label}: {args.usage} key imported, check value {kcv}")
    finally:
        module.close()
    return 0


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("keys", help="the security module's keys: check values, data key rotation, set-up")
    ksub = p.add_subparsers(dest="keys_command", metavar="SUBCOMMAND", required=True)

    c = ksub.add_parser("check-values", help="print every key's check value (never a key)")
    c.add_argument("--config", required=True, help="the gateway's configuration (its [security] section)")
    c.set_defaults(handler=cmd_check_values)

    c = ksub.add_parser("rotate-data-key", help="make a new data key current for card data at rest")
    c.add_argument("--config", required=True, help="the gateway's configuration (its [security] section)")
    c.add_argument("--key-id", help="the new key's id (default: the highest numeric id + 1)")
    c.set_defaults(handler=cmd_rotate_data_key)

    c = ksub.add_parser("init", help="create a software key file and, when none is set, its KEK file")
    c.add_argument("--config", required=True, help="the gateway's configuration (its [security] section)")
    c.set_defaults(handler=cmd_init)

    c = ksub.add_parser("import", help="load a zone or MAC key given in clear (development, first key loading)")
    c.add_argument("--config", required=True, help="the gateway's configuration (its [security] section)")
    c.add_argument("label", help="the key's label")
    c.add_argument("--usage", choices=("zone", "mac"), default="zone", help="zone key (default) or MAC key")
    c.add_argument("--type", choices=("tdes", "aes"), default="tdes", help="a zone key's type (default tdes)")
    c.add_argument("--algorithm", choices=("retail", "aes-cmac"), default="retail", help="a MAC key's algorithm")
    c.add_argument("--kcv", help="the check value the key must have (hex, 4 or 6 digits)")
    c.add_argument("--value-env", metavar="VAR",
                   help="read the key (hex) from this environment variable instead of asking on stdin")
    c.set_defaults(handler=cmd_import)
