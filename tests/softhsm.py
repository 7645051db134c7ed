"""A throwaway SoftHSM2 token for tests: its own config and token directory under a temp dir.

Nothing is assumed to exist beyond the ``softhsm2`` package (``softhsm2-util`` and the library); the
tests that need it skip, saying so, only when it is not installed. ``.ci/run`` installs it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from iso_gateway.security.pkcs11 import find_softhsm2

PIN = "123456"
SO_PIN = "12345678"


@dataclass(frozen=True)
class Token:
    library: str
    label: str
    pin: str
    conf: Path


def softhsm_missing() -> str | None:
    """Why a SoftHSM2 token can't be made here, or None when it can."""
    if shutil.which("softhsm2-util") is None:
        return "softhsm2-util is not installed (Debian package softhsm2; .ci/run installs it)"
    if find_softhsm2() is None:
        return "the SoftHSM2 PKCS#11 library is not installed (Debian package softhsm2)"
    return None


_made: dict[str, Token] = {}


def make_token(directory: Path, label: str = "iso-gateway-test") -> Token:
    """Initialise a fresh token under ``directory`` and point SOFTHSM2_CONF at its config.

    SoftHSM2 reads SOFTHSM2_CONF when its library is first loaded in a process; tokens made later
    by softhsm2-util in other directories are not seen by a library already loaded with another
    config. So there is one config (and token directory) per process: a second call (another test
    module's session fixture) gets the token the first one made, and its ``directory`` is unused.
    Daemon processes the tests start inherit SOFTHSM2_CONF, and see the same token."""
    if label in _made:
        return _made[label]
    tokens = directory / "tokens"
    tokens.mkdir(parents=True, exist_ok=True)
    conf = directory / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    subprocess.run(
        ["softhsm2-util", "--init-token", "--free", "--label", label, "--pin", PIN, "--so-pin", SO_PIN],
        check=True, capture_output=True, env={**os.environ, "SOFTHSM2_CONF": str(conf)}, timeout=60)
    library = find_softhsm2()
    assert library is not None
    _made[label] = Token(library, label, PIN, conf)
    return _made[label]


def wipe(token: Token) -> None:
    """Destroy every object on the token, so that each test starts from an empty one."""
    import pkcs11

    with pkcs11.lib(token.library).get_token(token_label=token.label).open(rw=True, user_pin=token.pin) as session:
        for obj in list(session.get_objects()):
            obj.destroy()
