"""Logging: one event per line, text for people or JSON lines for shippers, always masked.

Every record passes through ``masking.scrub`` after formatting, exception text
included, so a PAN that slipped into a message (a private field, a peer's
garbage quoted in an error) still comes out as first 6 + last 4.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone

from .masking import scrub


class MaskingFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return scrub(super().format(record))


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return scrub(json.dumps(doc, ensure_ascii=False))


def setup_logging(level: str = "INFO", fmt: str = "text", file: str = "") -> None:
    handler: logging.Handler = logging.FileHandler(file, encoding="utf-8") if file else logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(MaskingFormatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("iso_gateway").setLevel(level)
