"""Where a message carries its MAC, and what a hop and a front end's identity are allowed.

The MAC of an ISO 8583 message sits in field 64, or in field 128 when the message has
a secondary bitmap; it is the message's last field, 8 bytes, computed over every byte
before it (the MTI, the bitmaps with the MAC field's bit set, every other field) as
the message travels on that hop. A gateway that changes a byte (its own STAN) signs
again for the next hop. Computing it is the security module's job (a key never
reaches this package); this module only finds it, reads it and writes it, per dialect
(``MacField``), and holds a hop's settings (``MacHop``).

Network management messages (08xx) carry no MAC here: keys are exchanged with them.

Sans-IO: plain values in and out.
"""

from __future__ import annotations

from binascii import hexlify
from collections.abc import Callable

from .dialect import Dialect
from .errors import ConfigError

# A field's bit in a scan's bitmap is 1 << (128 - n): field 64 at 1 << 64, field 128 at 1 << 0.
BIT_64 = 1 << 64
AFTER_64 = BIT_64 - 1  # fields 65..128
MAC_LENGTH = 8


class MacField:
    """How a dialect carries fields 64 and 128 (8 bytes each: raw, or as 16 hex characters)."""

    __slots__ = ("width", "hex", "placeholder")

    def __init__(self, dialect: Dialect) -> None:
        encodings = {dialect.fields[f].encoding for f in (64, 128) if f in dialect.fields}
        if len(encodings) != 1 or not encodings <= {"hex", "raw"}:
            raise ConfigError(dialect.name, "fields.64", "a MAC needs fields 64 and 128 as 8 bytes, raw or hex")
        self.hex = encodings == {"hex"}
        self.width = 2 * MAC_LENGTH if self.hex else MAC_LENGTH  # bytes on the wire
        self.placeholder = "0" * (2 * MAC_LENGTH)  # the codec's value for 8 bytes, whatever the wire form

    @staticmethod
    def last(bitmap: int) -> int | None:
        """The MAC field (64 or 128) if it is the message's last field, else None."""
        if bitmap & 1:
            return 128
        if bitmap & BIT_64 and not bitmap & AFTER_64:
            return 64
        return None

    @staticmethod
    def present(bitmap: int) -> bool:
        """Whether the message carries field 64 or 128 at all."""
        return bool(bitmap & (BIT_64 | 1))

    @staticmethod
    def field_for(message: dict[str, str]) -> str:
        """The MAC field a message built from ``message`` gets: 128 if it has a field past 64, else 64."""
        return "128" if any(k.isdigit() and 64 < int(k) < 128 for k in message) else "64"

    def value(self, raw: bytes) -> bytes:
        """The MAC a message whose last field is the MAC carries. Hex must be upper case, as the
        gateway writes it: ValueError otherwise (a MAC'd message is bytes, not what they mean, so
        "0a" for "0A" is a tampered message)."""
        tail = raw[-self.width:]
        if not self.hex:
            return bytes(tail)
        if tail.strip(b"0123456789ABCDEF"):
            raise ValueError("the MAC is not upper-case hex")
        return bytes.fromhex(tail.decode("ascii"))

    def wire(self, mac: bytes) -> bytes:
        return hexlify(mac[:MAC_LENGTH]).upper() if self.hex else mac[:MAC_LENGTH]


def _not_fetched(data: bytes) -> bytes:
    raise RuntimeError("no MAC function fetched for this hop yet")


class MacHop:
    """One hop's MAC settings: the key's label in the security module, the padding (ISO 9797-1
    method 1 or 2), on a listener the answer to a request whose MAC is missing or wrong, and on
    a switch link the zone key new MAC keys come under (empty: the switch can't change keys)
    with the algorithm of those keys."""

    __slots__ = ("key", "padding", "code", "field", "zone_key", "algorithm", "compute", "generation")

    def __init__(self, key: str, field: MacField, padding: int = 1, code: str = "63", zone_key: str = "",
                 algorithm: str = "retail") -> None:
        self.key = key
        self.field = field
        self.padding = padding
        self.code = code
        self.zone_key = zone_key
        self.algorithm = algorithm
        # The security module's function for this key (``mac_function``), fetched by the flow and
        # fetched again when the module's ``mac_generation`` moves on from ``generation``.
        self.compute: Callable[[bytes], bytes] = _not_fetched
        self.generation = -1


class ClientScope:
    """What one authenticated front end may use: its acquirer ids (DE 32), merchants (DE 42) and
    terminals (DE 41); an empty set allows any."""

    __slots__ = ("acquirers", "merchants", "terminals")

    def __init__(self, acquirers: frozenset[str] = frozenset(), merchants: frozenset[str] = frozenset(),
                 terminals: frozenset[str] = frozenset()) -> None:
        self.acquirers = acquirers
        self.merchants = merchants
        self.terminals = terminals

    def refuses(self, values: dict[int, str]) -> str | None:
        """Which of the request's ids lies outside this scope ("acquirer", "merchant", "terminal"), or None."""
        if self.acquirers and values.get(32, "").lstrip("0") not in self.acquirers:
            return "acquirer"
        if self.merchants and values.get(42, "").rstrip(" ") not in self.merchants:
            return "merchant"
        if self.terminals and values.get(41, "").rstrip(" ") not in self.terminals:
            return "terminal"
        return None


class ClientTable:
    """A listener's authenticated front ends: identity (``cert:<name>``, ``addr:<ip>``) -> scope,
    and the code a request outside its scope (or from an unknown identity) is answered with."""

    __slots__ = ("scopes", "code")

    def __init__(self, scopes: dict[str, ClientScope], code: str = "58") -> None:
        self.scopes = scopes
        self.code = code
