"""The one place that decides what card data looks like in any output.

Everything human-readable (the decode tool, log lines, error text, journal
columns, the simulator's records) goes through these functions. PCI DSS 3.4.1
allows at most the BIN (first six) and the last four digits of a PAN on
display; expiry is hidden; track data, PIN blocks, CVV2-bearing and ICC fields
are dropped; MACs are shown as present only. Which field is which comes from the
dialect's ``[card_data]`` table.

It must never return a full PAN, and it never raises on odd input.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Mapping

if TYPE_CHECKING:  # only for annotations: the journal's indexer process imports this module lean
    from .dialect import Dialect

REMOVED = "[removed]"
PRESENT = "[present]"
HIDDEN = "****"


def mask_pan(pan: str) -> str:
    """First 6 and last 4 digits at most, the middle as '*'.

    Shorter numbers show less: a PAN of 16 keeps 6 + 4, one of 12 keeps 4 + 4
    (never more than half of the digits in clear), anything under 9 is hidden.
    """
    n = len(pan)
    if n < 9:
        return "*" * n
    head = 6 if n >= 16 else max(0, n // 2 - 4)
    return pan[:head] + "*" * (n - head - 4) + pan[-4:]


def mask_field(dialect: Dialect, field: int, value: str) -> str | None:
    """The displayable form of one field, or None when it must not be shown at all."""
    if field in dialect.remove_fields:
        return None
    if field in dialect.pan_fields:
        return mask_pan(value)
    if field in dialect.mask_fields:
        return HIDDEN
    if field in dialect.presence_fields:
        return PRESENT
    fd = dialect.fields.get(field)
    if fd is not None and fd.type == "n" and fd.fixed and fd.length < 12:
        return value  # amounts, dates, codes: structural digits, too short to be a PAN
    # Longer numeric fields (DE 86-89 are n16) could carry a PAN as well as free text can.
    return scrub(value)


def mask_message(dialect: Dialect, msg: Mapping[str, str]) -> dict[str, str]:
    """A copy of a message safe to print or store: masked, removed fields marked as such."""
    out: dict[str, str] = {}
    for key, value in msg.items():
        if not key.isdigit():
            out[key] = value
            continue
        shown = mask_field(dialect, int(key), value)
        out[key] = REMOVED if shown is None else shown
    return out


def luhn_ok(digits: str) -> bool:
    if not digits.isdigit():
        return False
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i & 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


# A run of 12 to 19 digits not inside a longer run of digits. An RRN the gateway
# labels as such ("RRN 633107600003": DE 37 is an12, so at most 12 characters) is
# left alone: one in ten of them passes Luhn, and an operator needs it to search.
_PAN_LIKE = re.compile(r"(?<!\d)(?<!RRN )\d{12,19}(?!\d)|(?<=RRN )\d{13,19}(?!\d)")


def scrub(text: str) -> str:
    """Mask anything in free text that looks like a PAN (12-19 digits passing Luhn).

    The safety net under every log line: a field that is not declared as card
    data but carries a PAN anyway (a private field, a free-text note) is still
    masked. Digit runs that fail Luhn (amounts, STAN + date, RRNs) stay.
    """
    if len(text) < 12:
        return text
    return _PAN_LIKE.sub(lambda m: mask_pan(m.group()) if luhn_ok(m.group()) else m.group(), text)
