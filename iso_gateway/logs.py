"""Logging: one event per line, text for people or JSON lines for shippers, always masked.

Every record passes through ``masking.scrub`` after formatting, exception text
included, so a PAN that slipped into a message (a private field, a peer's
garbage quoted in an error) still comes out as first 6 + last 4. That holds for
every logger in the process (the handler sits on the root logger), not only
the gateway's own.

One event per line: in the text format a traceback's lines are joined with
" | "; in JSON the exception is one string field. JSON lines carry ``time``,
``level``, ``logger``, ``message``, the ``node`` (``[gateway] name``) and
``pid`` (several worker processes share one log), and any ``extra={...}`` a
call site adds (``event``, ``upstream``, ...), all masked.

What is logged, and at which level, is decided at the call sites: start and
stop, configuration loaded, reloaded or refused, links up, down and sign-on
results, timeouts, reversals, rejects (WARNING, with the reason). An approved
request is never logged at INFO: at thousands per second the log would be the
bottleneck and a second transaction journal. Metrics count those.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .core.errors import ConfigError
from .core.masking import scrub

TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"

# LogRecord's own attributes: anything else on a record came from ``extra=``.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}


class MaskingFormatter(logging.Formatter):
    """Readable text, one line per event, masked."""

    def format(self, record: logging.LogRecord) -> str:
        return scrub(super().format(record).replace("\r", "").replace("\n", " | "))


class JsonFormatter(logging.Formatter):
    """One JSON object per line, masked."""

    def __init__(self, node: str = "") -> None:
        super().__init__()
        self.node = node

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self.node:
            doc["node"] = self.node
        doc["pid"] = record.process if record.process is not None else os.getpid()
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in doc:
                doc[key] = value if isinstance(value, (str, int, float, bool)) or value is None else str(value)
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return scrub(json.dumps(doc, ensure_ascii=False))


def make_formatter(fmt: str = "text", node: str = "") -> logging.Formatter:
    return JsonFormatter(node) if fmt == "json" else MaskingFormatter(TEXT_FORMAT)


def setup_logging(level: str = "INFO", fmt: str = "text", file: str = "", node: str = "") -> None:
    """Send every log record of the process to stderr or ``file``, formatted and masked."""
    if file:
        try:
            folder = Path(file).parent
            if not folder.exists():
                folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            # Created 0600 whatever the umask: masked as it is, the log traces transactions.
            os.close(os.open(file, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600))
            handler: logging.Handler = logging.FileHandler(file, encoding="utf-8")
        except OSError as exc:
            raise ConfigError(file, "log.file", f"can't open the log file: {exc.strerror}") from None
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(make_formatter(fmt, node))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("iso_gateway").setLevel(level)


def masked_exception(exc: BaseException, *, trace: bool = True) -> str:
    """An exception (with its traceback when ``trace``) as text fit for a log: scrubbed of
    anything that looks like a PAN, since an unexpected error's text can quote a value."""
    try:
        if trace:
            return scrub("".join(traceback.format_exception(exc)).rstrip())
        return scrub(f"{type(exc).__name__}: {exc}")
    except Exception:  # noqa: BLE001 - a broken __str__ must not break the error path
        return type(exc).__name__
