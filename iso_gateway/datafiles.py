"""Reading the project's data files (dialects, rule sets, the configuration): TOML in, ConfigError out.

One place decides how a file that can't be read, isn't TOML, or doesn't fit its
model is reported: the file, the key path and the reason, never a traceback.
Nothing here touches a socket.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from .core.errors import ConfigError

M = TypeVar("M", bound=BaseModel)


def specs_dir() -> Path:
    """Where the shipped specs live: next to the package in a checkout, inside it when installed."""
    env = os.environ.get("ISO_GATEWAY_SPECS")
    if env:
        return Path(env)
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "specs", here / "specs"):
        if (candidate / "dialects").is_dir():
            return candidate
    return here.parent / "specs"


def read_text(path: str | os.PathLike[str]) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(path), "", f"can't read: {exc.strerror}") from None


def parse_toml(text: str, source: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, "", f"not valid TOML: {exc}") from None


def validate(model: type[M], raw: dict[str, Any], source: str) -> M:
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise pydantic_to_config_error(source, exc) from None


def pydantic_to_config_error(source: str, exc: ValidationError) -> ConfigError:
    """The first problem of a pydantic error as a ConfigError naming the key path."""
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "missing":
        msg = "required key is missing"
    elif err["type"] == "extra_forbidden":
        msg = "unknown key"
    more = len(exc.errors()) - 1
    if more:
        msg += f" (and {more} more problem{'s' if more > 1 else ''})"
    return ConfigError(source, loc, msg)


def spec_files(kind: str, extra_dirs: tuple[str, ...] = ()) -> dict[str, Path]:
    """Name -> file for ``specs/<kind>/*.toml``, shipped ones first; ``extra_dirs`` override by name."""
    found: dict[str, Path] = {}
    for d in (specs_dir() / kind, *map(Path, extra_dirs)):
        if d.is_dir():
            for p in sorted(d.glob("*.toml")):
                found[p.stem] = p
    return found
