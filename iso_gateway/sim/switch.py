"""A bank switch simulator for tests, demos and load tests.

``SwitchSimulator`` listens like a national switch (CMI) or an acquirer host
would: it takes framed ISO 8583 requests on any number of connections and
answers them. What it does with a request is chosen by the request itself,
by the last digits of DE 4 (amount, minor units), so one simulator serves
every scenario (the moov-io test-server idea, STYLE.md):

=============================  ============================================  =======
DE 4 ends in                   What the switch does                          action
=============================  ============================================  =======
05 12 13 14 30 51 54 55 57 61  answers with that code in DE 39 (a decline)   decline
62 65 91 96
97                             never answers                                 drop
98                             closes the connection without answering       close
99                             approves after (DE 4 digits [-4:-2]) x 100    delay
                               ms: ...1599 -> 1.5 s, ...0099 -> at once
anything else (00-04, 06-11,   approves: 39 = 00, a 6-character auth code    approve
15-29, ...)                    (an6) in 38, derived from the transaction
=============================  ============================================  =======

By message type:

- 0100/0101, 0200/0201 (and 0120/0220 advices) -> 0110/0210 (0130/0230) per
  the table. An 0100/0200 without DE 4 is answered 30 (format error).
- 0400/0401 -> 0410 and 0420/0421 -> 0430, always 39 = 00 (a reversal is
  acknowledged, not authorized), but 97/98/99 apply as above so that SAF
  retries can be tested. Reversals are idempotent: the switch keeps the
  originals it has reversed, keyed by field 90 (original MTI, STAN, DE 7,
  acquirer). A repeat (0421) or a duplicate of a reversal already applied is
  acknowledged again and recorded with ``applied=False``; a reversal counts
  as applied when the switch decides to answer it (dropped or closed ones are
  not). A reversal without a readable field 90 is answered 30, not applied.
- 0800 -> 0810 with 39 = 00 echoing 7, 11 and 70 (001 sign-on, 002
  sign-off, 301 echo). The amount rules and chaos never apply to network
  management.
- A 0810 answering the switch's own echo is consumed; other responses are
  counted in ``unexpected`` and ignored. Requests of other classes are
  answered 12 (invalid transaction).
- An undecodable message is counted in ``undecodable`` and ignored; a frame
  error (the stream can't be cut any more) closes the connection; a
  zero-length keep-alive frame is echoed back.

Optional chaos for integrity tests (``SwitchBehaviour``): each authorization,
financial or reversal message draws once from a seeded ``random.Random`` and
may be closed on receipt, dropped, or delayed by a bounded random time, on
top of the table. Everything is 0 by default, and the same seed with the same
arrival order gives the same outcomes. Two options aim at reversals only:
``close_on_reversal`` (amounts whose reversals close the connection on receipt,
while their authorizations follow the table) and ``reversal_delay`` (every
reversal acknowledged that many seconds late).

TLS (``SwitchBehaviour.tls``, an ``ssl.SSLContext`` from ``sim.tlsctx.server_context``, with
client certificates required or not): every connection does its handshake first, within
``tls_handshake_timeout``; a failed one is counted in ``tls_failures`` by reason (the gateway's
reasons, ``net.tls.REASONS``) and closed.

Every message answered, dropped or closed on is kept as a ``Record`` (and
optionally appended as a JSON line to a file for an external reconciliation
script). It must never store or print a clear PAN, CVV2 or track data: a
record holds only the masked PAN and the non-secret fields listed in it.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import hashlib
import hmac
import json
import logging
import random
import signal
import ssl
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import IO, Any, Callable, cast

import trio

from ..core.dialect import Dialect
from ..specfiles import get_dialect
from ..core.errors import ConfigError, DecodeError, FrameError, MessageError
from ..core.framing import TPDU_ID, FrameDecoder, Framer, framer_from_config
from ..core.masking import mask_pan
from ..core.message import (
    Message,
    OriginalData,
    build_response,
    decode,
    encode,
    is_request,
    is_response,
    original_mti,
)
from ..net.writer import FrameWriter
from ..core.macs import MacField
from ..core.scanner import Scanner
from ..security.keys import SecretKey, wrap_working_key
from ..security.mac import CmacKey, RetailMacKey, mac_key
from .tlsctx import TlsHandshakeFailed, handshake, server_context

__all__ = [
    "CLOSE_DIGITS",
    "DECLINE_CODES",
    "DELAY_DIGITS",
    "DROP_DIGITS",
    "Chaos",
    "Outcome",
    "Record",
    "SwitchBehaviour",
    "SwitchSimulator",
    "add_arguments",
    "default_auth_code",
    "outcome_for_amount",
    "run",
]

log = logging.getLogger("iso_gateway.sim.switch")

# --------------------------------------------------------------------------- the table (sans-IO)

#: Last two digits of DE 4 answered with that very code in DE 39.
DECLINE_CODES = frozenset({"05", "12", "13", "14", "30", "51", "54", "55", "57", "61", "62", "65", "91", "96"})
DROP_DIGITS = "97"  # never answer
CLOSE_DIGITS = "98"  # close the connection on receipt
DELAY_DIGITS = "99"  # approve after digits[-4:-2] x DELAY_UNIT seconds
DELAY_UNIT = 0.1

# Longest random chaos delay accepted, in seconds: past any sensible gateway
# timeout (30-45 s, docs/domain.md §3.6), so every scenario stays bounded.
MAX_CHAOS_DELAY = 60.0

APPROVE, DECLINE, DROP, CLOSE, DELAY = "approve", "decline", "drop", "close", "delay"
ACTIONS = (APPROVE, DECLINE, DROP, CLOSE, DELAY)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What to do with one request: the action, the DE 39 to send (None: no answer), and when."""

    action: str
    code: str | None
    delay: float = 0.0


def outcome_for_amount(amount: str, *, acknowledge: bool = False) -> Outcome:
    """The table above for one DE 4 value.

    ``acknowledge`` is for reversals and advices: decline digits are approved
    (39 = 00), only never-answer, close and delay apply.
    """
    last = amount[-2:]
    if last == DROP_DIGITS:
        return Outcome(DROP, None)
    if last == CLOSE_DIGITS:
        return Outcome(CLOSE, None)
    if last == DELAY_DIGITS:
        tenths = amount[-4:-2]
        return Outcome(DELAY, "00", int(tenths) * DELAY_UNIT if tenths.isdigit() else 0.0)
    if last in DECLINE_CODES and not acknowledge:
        return Outcome(DECLINE, last)
    return Outcome(APPROVE, "00")


_AUTH_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def default_auth_code(request: Message) -> str:
    """A 6-character DE 38 (an6) derived from the transaction, so a repeat (0101) gets the same one."""
    seed = "|".join(request.get(k, "") for k in ("41", "11", "7", "37", "4")).encode()
    n = int.from_bytes(hashlib.sha256(seed).digest()[:8], "big")
    out = []
    for _ in range(6):
        n, r = divmod(n, 36)
        out.append(_AUTH_ALPHABET[r])
    return "".join(out)


class Chaos:
    """Seeded random faults: one draw per eligible message, bounded delays. No I/O."""

    def __init__(self, behaviour: "SwitchBehaviour") -> None:
        self._rng = random.Random(behaviour.seed)
        self._close = behaviour.close_probability
        self._drop = self._close + behaviour.drop_probability
        self._delay = self._drop + behaviour.delay_probability
        self._range = behaviour.delay_range
        self.enabled = self._delay > 0

    def draw(self) -> Outcome | None:
        """A fault for the next message, or None to follow the table."""
        if not self.enabled:
            return None
        u = self._rng.random()
        if u < self._close:
            return Outcome(CLOSE, None)
        if u < self._drop:
            return Outcome(DROP, None)
        if u < self._delay:
            return Outcome(DELAY, "00", self._rng.uniform(*self._range))
        return None


# --------------------------------------------------------------------------- options and records


@dataclass(frozen=True)
class SwitchBehaviour:
    """How the simulated switch speaks and misbehaves. Every field has a safe default."""

    # Dialect name from specs/dialects or a .toml path. The default is iso87ascii.
    dialect: str = "iso87ascii"
    # Length-header framing: ascii4, binary2, binary2r, bcd2, binary4. The default is ascii4.
    framing: str = "ascii4"
    # Whether the length counts the length header too. The default is False.
    length_includes_header: bool = False
    # Whether a 5-byte TPDU follows the length header; answers swap its NIIs. The default is False.
    tpdu: bool = False
    # Seconds between the switch's own 0800/301 echoes on each connection; 0 (the default) sends none.
    echo_interval: float = 0.0
    # DE 38 for approvals, from the request. None (the default) uses default_auth_code.
    auth_code: Callable[[Message], str] | None = None
    # Seed for the chaos draws; None (the default) seeds from the OS (not reproducible).
    seed: int | None = None
    # Chance (0..1) of answering a message late, by a time drawn from delay_range. The default is 0.
    delay_probability: float = 0.0
    # Bounds of a chaos delay, in seconds, at most MAX_CHAOS_DELAY. The default is 0 to 1 s.
    delay_range: tuple[float, float] = (0.0, 1.0)
    # Chance (0..1) of never answering a message. The default is 0.
    drop_probability: float = 0.0
    # Chance (0..1) of closing the connection when a message arrives. The default is 0.
    close_probability: float = 0.0
    # DE 4 values (12 digits) whose reversals (0400/0401/0420/0421) close the connection on
    # receipt, whatever the table says for their last digits: a switch whose session handler
    # dies on one particular reversal. The default is none.
    close_on_reversal: frozenset[str] = frozenset()
    # Seconds before any reversal (0400/0401/0420/0421) is answered, on top of the table: a switch
    # that acknowledges reversals later than the gateway waits for. The default is 0.
    reversal_delay: float = 0.0
    # File to append each record to as one JSON line. The default is None (no file).
    record_file: str | Path | None = None
    # Whether records are kept in SwitchSimulator.records; a long load run may turn this off. The default is True.
    keep_records: bool = True
    # TLS on every connection (a server context: sim.tlsctx.server_context). The default is None (plaintext).
    tls: ssl.SSLContext | None = None
    # Seconds a TLS handshake may take from the accept. The default is 10 s.
    tls_handshake_timeout: float = 10.0
    # MACs (field 64, or 128 past 64) under this key, in clear (a test switch's key): every
    # authorization, financial message and reversal must carry a good one (else it is answered 63
    # and not applied), and every answer to them is signed. The default is None (no MACs).
    mac_key: bytes | None = None
    # The MAC's algorithm: "retail" (ISO 9797-1 algorithm 3, a 16-byte TDES key) or "aes-cmac".
    mac_algorithm: str = "retail"
    # The zone key new MAC keys are sent under (``SwitchSimulator.change_mac_key``): TDES (16 or 24
    # bytes) or AES (``zone_key_type``). The default is None (keys are never changed).
    zone_key: bytes | None = None
    zone_key_type: str = "tdes"

    def __post_init__(self) -> None:
        where = "switch simulator"
        for name in ("delay_probability", "drop_probability", "close_probability"):
            p = getattr(self, name)
            if not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
                raise ConfigError(where, name, "must be a probability between 0 and 1")
        if self.delay_probability + self.drop_probability + self.close_probability > 1.0 + 1e-9:
            raise ConfigError(where, "probabilities", "delay, drop and close probabilities add up to more than 1")
        lo, hi = self.delay_range
        if not 0.0 <= lo <= hi <= MAX_CHAOS_DELAY:
            raise ConfigError(where, "delay_range", f"must be 0 <= min <= max <= {MAX_CHAOS_DELAY:g} seconds")
        if not 0.0 <= self.reversal_delay <= MAX_CHAOS_DELAY:
            raise ConfigError(where, "reversal_delay", f"must be 0 <= seconds <= {MAX_CHAOS_DELAY:g}")
        if not isinstance(self.echo_interval, (int, float)) or self.echo_interval < 0:
            raise ConfigError(where, "echo_interval", "must be 0 (off) or a number of seconds")


@dataclass(frozen=True, slots=True)
class Record:
    """One message the switch handled. Card data: the masked PAN only, never CVV2 or track data."""

    time: float  # Unix time (UTC seconds) when it was answered, dropped or closed on
    connection: int  # connection id, 1 for the first accepted
    mti: str
    stan: str | None  # DE 11
    rrn: str | None  # DE 37
    amount: str | None  # DE 4, minor units
    currency: str | None  # DE 49
    terminal: str | None  # DE 41
    pan: str | None  # DE 2, masked (first 6, last 4)
    original: str | None  # DE 90 of a reversal
    response_code: str | None  # DE 39 sent; None if not answered
    applied: bool | None  # reversals: True the first time an original is reversed; None for others
    action: str  # approve, decline, drop, close, delay

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), separators=(",", ":"))


# --------------------------------------------------------------------------- the simulator


class _Connection:
    __slots__ = ("id", "stream", "writer", "decoder", "scope", "nursery", "header", "echo_pending", "key_pending")

    def __init__(self, conn_id: int, stream: trio.SocketStream, decoder: FrameDecoder, header: bytes) -> None:
        self.id = conn_id
        self.stream = stream
        self.writer = FrameWriter(stream)
        self.decoder = decoder
        self.scope = trio.CancelScope()
        self.nursery: trio.Nursery | None = None
        self.header = header  # for frames the switch starts (its echoes)
        self.echo_pending: set[str] = set()
        self.key_pending: dict[str, RetailMacKey | CmacKey] = {}  # STAN of a key change 0800 -> its new key


# Bytes asked of the socket per read (trio's own default size).
RECEIVE_SIZE = 65536


class SwitchSimulator:
    """The simulated switch. ``await serve()`` in a nursery; read the counters and records any time.

    Counters: ``connections`` open now, ``accepted`` in total, ``received``
    (a Counter by MTI, also ``count(mti)``), ``undecodable`` messages,
    ``frame_errors``, ``keepalives`` echoed, ``unexpected`` responses,
    ``echo_sent``/``echo_answered``/``echo_missed`` for the switch's own
    echoes, ``closes`` (a Counter by reason: peer, reset, frame_error, close,
    stopped, error), ``reversed`` (the set of reversed originals).
    """

    def __init__(self, behaviour: SwitchBehaviour | None = None, **options: object) -> None:
        if behaviour is None:
            behaviour = SwitchBehaviour(**options)  # type: ignore[arg-type]
        elif options:
            behaviour = dataclasses.replace(behaviour, **options)  # type: ignore[arg-type]
        self.behaviour = behaviour
        self.dialect: Dialect = get_dialect(behaviour.dialect)
        framing_options: dict[str, Any] = {}
        if behaviour.length_includes_header:
            framing_options["length_includes_header"] = True
        if behaviour.tpdu:
            framing_options["tpdu"] = True
        self.framer: Framer = framer_from_config(behaviour.framing, source="switch simulator", **framing_options)
        self._auth_code = behaviour.auth_code or default_auth_code
        self._chaos = Chaos(behaviour)
        self.port: int | None = None
        self.records: list[Record] = []
        self.received: collections.Counter[str] = collections.Counter()
        self.actions: collections.Counter[str] = collections.Counter()
        self.closes: collections.Counter[str] = collections.Counter()
        self.reversed: set[tuple[str, str, str, str]] = set()
        self.connections = 0
        self.accepted = 0
        self.undecodable = 0
        self.frame_errors = 0
        self.keepalives = 0
        self.unexpected = 0
        self.echo_sent = 0
        self.echo_answered = 0
        self.echo_missed = 0
        # Set to stop answering network management (0800) while still answering
        # traffic: a switch whose echo handling hangs, for link-health tests.
        self.mute_network = False
        # TLS: handshakes done, failed ones by reason, and the client certificates' CNs seen.
        self.tls_handshakes = 0
        self.tls_failures: collections.Counter[str] = collections.Counter()
        self.tls_clients: list[str] = []
        self._conns: dict[int, _Connection] = {}
        self._next_conn = 0
        self._next_stan = 0
        self._serve_scope: trio.CancelScope | None = None
        self._record_fh: IO[str] | None = None
        # MACs: the key in use, the dialect's MAC field, failures seen, key changes the gateway took.
        self._mac = mac_key(behaviour.mac_algorithm, behaviour.mac_key) if behaviour.mac_key is not None else None
        self._mac_field = MacField(self.dialect) if self._mac is not None else None
        self._mac_scanner = Scanner(self.dialect, ())
        self.mac_failures = 0
        self.key_changes = 0
        self.key_changes_refused = 0

    # ----------------------------------------------------------------- control

    async def serve(self, host: str = "127.0.0.1", port: int = 0, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen and answer until ``stop()`` or cancellation; ``task_status.started(bound_port)``.

        Give an IP address: with a host name that resolves to several
        addresses and port 0, each would get a different port. May be called
        again after it returns (a switch coming back up on the same port).
        """
        listeners = await trio.open_tcp_listeners(port, host=host)
        self.port = listeners[0].socket.getsockname()[1]
        try:
            with trio.CancelScope() as scope:
                self._serve_scope = scope
                async with trio.open_nursery() as nursery:
                    await nursery.start(partial(trio.serve_listeners, self._handle, listeners, handler_nursery=nursery))
                    task_status.started(self.port)
        finally:
            # Synchronous on purpose: an await here would raise Cancelled again
            # when the caller's scope is cancelled, and skip the rest.
            self._serve_scope = None
            for listener in listeners:
                listener.socket.close()
            if self._record_fh is not None:
                self._record_fh.close()
                self._record_fh = None

    def stop(self) -> None:
        """The switch goes down: stop listening and close every connection; ``serve`` returns."""
        if self._serve_scope is not None:
            self._serve_scope.cancel()
        self.close_connections()

    def close_connections(self) -> None:
        """Close every open connection (a link drop) and keep listening."""
        for conn in list(self._conns.values()):
            conn.scope.cancel()

    def count(self, mti: str) -> int:
        """Messages received with this MTI (0100, 0421, 0810, ...)."""
        return self.received[mti]

    def records_jsonl(self, path: str | Path) -> int:
        """Write every kept record to ``path`` as JSON lines; returns how many."""
        with open(path, "w", encoding="utf-8") as fh:
            for rec in self.records:
                fh.write(rec.to_json() + "\n")
        return len(self.records)

    def summary(self) -> str:
        """One line of counts for a person."""
        received = " ".join(f"{mti}={n}" for mti, n in sorted(self.received.items())) or "nothing"
        actions = " ".join(f"{a}={self.actions[a]}" for a in ACTIONS)
        return (
            f"{self.accepted} connection{'' if self.accepted == 1 else 's'}; received {received}; {actions}; "
            f"reversals applied={len(self.reversed)}; undecodable={self.undecodable} "
            f"frame_errors={self.frame_errors} keepalives={self.keepalives} "
            f"echoes sent={self.echo_sent} answered={self.echo_answered} missed={self.echo_missed}"
        )

    # ----------------------------------------------------------------- connections

    async def _handle(self, plain: trio.SocketStream) -> None:
        stream = plain
        if self.behaviour.tls is not None:
            try:
                tls = await handshake(plain, self.behaviour.tls, server_side=True,
                                      timeout=self.behaviour.tls_handshake_timeout)
            except TlsHandshakeFailed as exc:
                self.tls_failures[exc.reason] += 1
                return
            self.tls_handshakes += 1
            peer = tls.getpeercert()
            if peer:
                cn = [v for rdn in peer.get("subject", ()) for k, v in rdn if k == "commonName"]
                self.tls_clients.append(cn[0] if cn else "")
            stream = cast(trio.SocketStream, tls)  # used through the Stream methods only
        self._next_conn += 1
        header = bytes((TPDU_ID, 0, 0, 0, 0)) if self.behaviour.tpdu else b""
        conn = _Connection(self._next_conn, stream, self.framer.decoder(), header)
        self._conns[conn.id] = conn
        self.connections += 1
        self.accepted += 1
        reason = "stopped"  # unless it ends otherwise: cancelled by stop() or by the caller of serve()
        try:
            with conn.scope:
                async with trio.open_nursery() as nursery:
                    conn.nursery = nursery
                    if self.behaviour.echo_interval > 0:
                        nursery.start_soon(self._echo_loop, conn)
                    reason = await self._read_loop(conn)
                    nursery.cancel_scope.cancel()  # pending delayed answers and echoes go with the connection
        except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            reason = "reset"
        except* Exception as group:
            # A bug here must not reach serve_listeners (it would take the
            # listener down with it); our errors never carry card data.
            reason = "error"
            log.error("switch connection %d failed", conn.id, exc_info=group)
        finally:
            self.connections -= 1
            self._conns.pop(conn.id, None)
            self.closes[reason] += 1
            await trio.aclose_forcefully(stream)

    async def _read_loop(self, conn: _Connection) -> str:
        """Read and answer until the connection should close; returns why."""
        while True:
            data = await conn.stream.receive_some(RECEIVE_SIZE)
            if not data:
                return "peer"
            try:
                frames = conn.decoder.feed(data)
            except FrameError:
                self.frame_errors += 1
                return "frame_error"
            for frame in frames:
                if frame.keepalive:
                    self.keepalives += 1
                    await conn.writer.send(self.framer.keepalive())
                    continue
                reply_header = self.framer.reply_header(frame.header) if frame.header else frame.header
                if frame.header:
                    conn.header = frame.header
                if await self._on_message(conn, frame.message, reply_header):
                    return "close"

    async def _echo_loop(self, conn: _Connection) -> None:
        interval = self.behaviour.echo_interval
        while True:
            await trio.sleep(interval)
            self.echo_missed += len(conn.echo_pending)
            conn.echo_pending.clear()
            self._next_stan = self._next_stan % 999_999 + 1
            stan = f"{self._next_stan:06d}"
            echo = {"t": "0800", "7": datetime.now(timezone.utc).strftime("%m%d%H%M%S"), "11": stan, "70": "301"}
            conn.echo_pending.add(stan)
            await conn.writer.send(self.framer.encode(encode(self.dialect, echo), conn.header))
            self.echo_sent += 1

    # ----------------------------------------------------------------- messages

    async def _on_message(self, conn: _Connection, raw: bytes, header: bytes) -> bool:
        """Handle one message; True when the connection must close."""
        try:
            msg = decode(self.dialect, raw)
        except MessageError:
            self.undecodable += 1
            return False
        mti = msg["t"]
        self.received[mti] += 1
        if is_response(mti):
            stan = msg.get("11", "")
            if mti[1] == "8" and stan in conn.echo_pending:
                conn.echo_pending.discard(stan)
                self.echo_answered += 1
            elif mti[1] == "8" and stan in conn.key_pending:
                new = conn.key_pending.pop(stan)
                if msg.get("39") == "00":  # the gateway checked and installed it: used from now on
                    self._mac = new
                    self.key_changes += 1
                else:
                    self.key_changes_refused += 1
            else:
                self.unexpected += 1
            return False
        if not is_request(mti):
            self.unexpected += 1
            return False

        applied: bool | None = None
        extra: Message | None = None
        cls = mti[1]
        if cls == "8":
            outcome = Outcome(DROP, None) if self.mute_network else Outcome(APPROVE, "00")
            extra = {k: msg[k] for k in ("7", "11", "70") if k in msg}
        elif cls in "124" and self._mac is not None and not self._mac_ok(raw):
            self.mac_failures += 1
            outcome = Outcome(DECLINE, "63")  # a security violation: not applied, not approved
        elif cls in "124":
            outcome = self._plan(msg)
            if cls == "4":
                applied = self._apply_reversal(msg, outcome)
                if applied is None:
                    outcome, applied = Outcome(DECLINE, "30"), False
        else:
            outcome = Outcome(DECLINE, "12")

        if outcome.action in (DROP, CLOSE):
            self._record(conn, msg, None, applied, outcome.action)
            return outcome.action == CLOSE
        if outcome.action == DELAY:
            assert conn.nursery is not None
            conn.nursery.start_soon(self._answer_later, conn, msg, outcome, header, applied, extra)
            return False
        data = self._response_frame(msg, outcome.code, header, extra)  # type: ignore[arg-type]
        self._record(conn, msg, outcome.code, applied, outcome.action)
        await conn.writer.send(data)
        return False

    def _plan(self, msg: Message) -> Outcome:
        """The table, then chaos, for an authorization, financial or reversal message."""
        fault = self._chaos.draw()  # drawn for every eligible message, so a seed replays exactly
        mti = msg["t"]
        acknowledge = mti[1] == "4" or mti[2] == "2"  # reversals and advices are acknowledged
        amount = msg.get("4")
        if amount is None:
            outcome = Outcome(APPROVE, "00") if acknowledge else Outcome(DECLINE, "30")
        else:
            outcome = outcome_for_amount(amount, acknowledge=acknowledge)
        if fault is not None and outcome.action in (APPROVE, DECLINE):
            outcome = Outcome(fault.action, outcome.code if fault.action == DELAY else None, fault.delay)
        if mti[1] == "4":
            behaviour = self.behaviour
            if amount in behaviour.close_on_reversal:
                return Outcome(CLOSE, None)
            if behaviour.reversal_delay and outcome.action in (APPROVE, DELAY):
                return Outcome(DELAY, outcome.code, outcome.delay + behaviour.reversal_delay)
        return outcome

    def _apply_reversal(self, msg: Message, outcome: Outcome) -> bool | None:
        """Whether this reversal is applied now (False: already was, or not answered); None: no field 90."""
        try:
            original = OriginalData.parse(msg.get("90", ""))
        except DecodeError:
            return None
        if outcome.action not in (APPROVE, DELAY):
            return False
        key = (original_mti(original.mti), original.stan, original.transmission, original.acquirer)
        if key in self.reversed:
            return False
        self.reversed.add(key)
        return True

    def _response_frame(self, msg: Message, code: str, header: bytes, extra: Message | None) -> bytes:
        auth = self._auth_code(msg) if code == "00" and msg["t"][1] in "12" else None
        response = build_response(self.dialect, msg, code, auth_code=auth, extra=extra)
        if self._mac is not None and self._mac_field is not None and msg["t"][1] in "124":
            response.pop("64", None)
            response.pop("128", None)
            response[MacField.field_for(response)] = self._mac_field.placeholder
            raw = encode(self.dialect, response)
            body = raw[:-self._mac_field.width]
            return self.framer.encode(body + self._mac_field.wire(self._mac.mac(body)), header)
        return self.framer.encode(encode(self.dialect, response), header)

    def _mac_ok(self, raw: bytes) -> bool:
        """Whether a request carries the right MAC as its last field (64, or 128 past 64)."""
        field = self._mac_field
        assert field is not None and self._mac is not None
        try:
            scan = self._mac_scanner.scan(raw)
            if field.last(scan.bitmap) is None:
                return False
            return hmac.compare_digest(field.value(raw), self._mac.mac(raw[:-field.width])[:8])
        except (ValueError, MessageError):
            return False

    async def change_mac_key(self, new_key: bytes) -> int:
        """Send every open connection a new MAC key (0800 with DE 70 161, the key wrapped under the zone
        key in DE 96, its check value in DE 48: the dialect's [key_change]); the switch uses it once
        the gateway answers 0810 with 00. Returns how many connections were sent it."""
        behaviour = self.behaviour
        change = self.dialect.key_change
        if behaviour.zone_key is None or change is None:
            raise ConfigError("switch simulator", "zone_key", "a key change needs a zone key and a dialect [key_change]")
        zone = SecretKey(behaviour.zone_key, usage="kek", key_type=behaviour.zone_key_type)
        wrapped = wrap_working_key(zone, new_key)
        new = mac_key(behaviour.mac_algorithm, new_key)
        check = new.check_value().hex().upper()
        sent = 0
        for conn in list(self._conns.values()):
            self._next_stan = self._next_stan % 999_999 + 1
            stan = f"{self._next_stan:06d}"
            msg = {"t": "0800", "7": datetime.now(timezone.utc).strftime("%m%d%H%M%S"), "11": stan,
                   "70": change.code, str(change.key_field): wrapped.hex().upper(), str(change.check_field): check}
            conn.key_pending[stan] = new
            try:
                await conn.writer.send(self.framer.encode(encode(self.dialect, msg), conn.header))
                sent += 1
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                conn.key_pending.pop(stan, None)
        return sent

    async def _answer_later(
        self, conn: _Connection, msg: Message, outcome: Outcome, header: bytes, applied: bool | None, extra: Message | None
    ) -> None:
        recorded = False
        try:
            await trio.sleep(outcome.delay)
            data = self._response_frame(msg, outcome.code, header, extra)  # type: ignore[arg-type]
            self._record(conn, msg, outcome.code, applied, DELAY)
            recorded = True
            await conn.writer.send(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the front end went away meanwhile
        finally:
            if not recorded:
                self._record(conn, msg, None, applied, DELAY)

    def _record(self, conn: _Connection, msg: Message, code: str | None, applied: bool | None, action: str) -> None:
        self.actions[action] += 1
        pan = msg.get("2")
        rec = Record(
            time=time.time(),
            connection=conn.id,
            mti=msg["t"],
            stan=msg.get("11"),
            rrn=msg.get("37"),
            amount=msg.get("4"),
            currency=msg.get("49"),
            terminal=msg.get("41"),
            pan=mask_pan(pan) if pan is not None else None,
            original=msg.get("90"),
            response_code=code,
            applied=applied,
            action=action,
        )
        if self.behaviour.keep_records:
            self.records.append(rec)
        if self.behaviour.record_file is not None:
            if self._record_fh is None:
                self._record_fh = open(self.behaviour.record_file, "a", encoding="utf-8")
            self._record_fh.write(rec.to_json() + "\n")
            self._record_fh.flush()  # an external script may be reading it live


# --------------------------------------------------------------------------- CLI hooks


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``iso-gateway sim-switch``."""
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=9583, help="port to listen on, 0 for any (default: 9583)")
    parser.add_argument("--dialect", default="iso87ascii", help="dialect name or .toml path (default: iso87ascii)")
    parser.add_argument("--framing", default="ascii4", help="length header: ascii4, binary2, binary2r, bcd2, binary4 (default: ascii4)")
    parser.add_argument("--length-includes-header", action="store_true", help="the length header counts itself")
    parser.add_argument("--tpdu", action="store_true", help="a 5-byte TPDU follows the length header")
    parser.add_argument("--echo-interval", type=float, default=0.0, metavar="SECONDS", help="send an 0800/301 echo on each connection every SECONDS (default: 0, off)")
    parser.add_argument("--seed", type=int, help="seed for the chaos options, for a reproducible run")
    parser.add_argument("--delay-probability", type=float, default=0.0, metavar="P", help="chance of answering late (default: 0)")
    parser.add_argument("--delay-range", default="0:1", metavar="MIN:MAX", help="seconds of a chaos delay (default: 0:1)")
    parser.add_argument("--drop-probability", type=float, default=0.0, metavar="P", help="chance of never answering (default: 0)")
    parser.add_argument("--close-probability", type=float, default=0.0, metavar="P", help="chance of closing the connection on receipt (default: 0)")
    parser.add_argument("--record", metavar="FILE", help="append one JSON line per message handled to FILE (PAN masked)")
    parser.add_argument("--tls-cert", metavar="PEM", help="TLS: our certificate chain (with --tls-key); default: plaintext")
    parser.add_argument("--tls-key", metavar="PEM", help="TLS: its private key")
    parser.add_argument("--tls-client-ca", metavar="PEM", action="append", default=[],
                        help="TLS: a CA that signs client certificates (repeatable)")
    parser.add_argument("--tls-require-client-cert", action="store_true",
                        help="TLS: refuse a client without a certificate signed by a --tls-client-ca")
    parser.add_argument("--mac-key", metavar="HEX", type=bytes.fromhex,
                        help="MACs: check every request's and sign every answer's with this test key (hex, in clear)")
    parser.add_argument("--mac-algorithm", choices=("retail", "aes-cmac"), default="retail", help="the MAC (default: retail)")
    parser.add_argument("--zone-key", metavar="HEX", type=bytes.fromhex,
                        help="the zone key new MAC keys are sent under (TDES, hex, in clear)")
    parser.add_argument("--key-change-every", type=float, default=0.0, metavar="SECONDS",
                        help="send a new random MAC key every SECONDS (needs --mac-key and --zone-key; default: 0, never)")


def tls_from_args(args: argparse.Namespace) -> ssl.SSLContext | None:
    """The server context the --tls-* options ask for (None: plaintext); ConfigError when unusable."""
    from ..net.tls import TlsConfigError

    cert, key = getattr(args, "tls_cert", None), getattr(args, "tls_key", None)
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise ConfigError("sim-switch", "--tls-cert" if cert is None else "--tls-key", "give --tls-cert and --tls-key together")
    try:
        return server_context(cert, key, client_ca=tuple(args.tls_client_ca),
                              require_client_cert=args.tls_require_client_cert)
    except TlsConfigError as exc:
        raise ConfigError("sim-switch", f"--tls-{exc.key.replace('_', '-')}", exc.reason) from None


def behaviour_from_args(args: argparse.Namespace) -> SwitchBehaviour:
    try:
        lo, hi = (float(x) for x in args.delay_range.split(":"))
    except ValueError:
        raise ConfigError("sim-switch", "--delay-range", "give MIN:MAX in seconds, e.g. 0:1.5") from None
    return SwitchBehaviour(
        tls=tls_from_args(args),
        dialect=args.dialect,
        framing=args.framing,
        length_includes_header=args.length_includes_header,
        tpdu=args.tpdu,
        echo_interval=args.echo_interval,
        seed=args.seed,
        delay_probability=args.delay_probability,
        delay_range=(lo, hi),
        drop_probability=args.drop_probability,
        close_probability=args.close_probability,
        record_file=args.record,
        keep_records=False,  # the CLI prints counts; --record keeps the detail on disk
        mac_key=args.mac_key,
        mac_algorithm=args.mac_algorithm,
        zone_key=args.zone_key,
    )


def run(args: argparse.Namespace) -> int:
    """Run the simulator until Ctrl-C or SIGTERM, then print a one-line summary. Returns an exit code."""
    try:
        sim = SwitchSimulator(behaviour_from_args(args))
        if args.key_change_every and (args.mac_key is None or args.zone_key is None):
            raise ConfigError("sim-switch", "--key-change-every", "needs --mac-key and --zone-key")
    except ConfigError as exc:
        print(f"iso-gateway sim-switch: {exc}", file=sys.stderr)
        return 2

    async def change_keys(every: float) -> None:
        while True:
            await trio.sleep(every)
            sent = await sim.change_mac_key(random.SystemRandom().randbytes(len(args.mac_key)))
            print(f"sim-switch: a new MAC key sent on {sent} connections", file=sys.stderr, flush=True)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                port = await nursery.start(sim.serve, args.host, args.port)
                b = sim.behaviour
                print(f"sim-switch listening on {args.host}:{port} ({b.dialect}, {b.framing})", file=sys.stderr, flush=True)
                if args.key_change_every:
                    nursery.start_soon(change_keys, args.key_change_every)
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    break

    failed: list[str] = []
    try:
        try:
            trio.run(main)
        except* OSError as group:
            failed.extend(str(getattr(e, "strerror", None) or e) for e in group.exceptions)
    except KeyboardInterrupt:
        pass  # a Ctrl-C before the signal receiver was in place
    if failed:
        print(f"iso-gateway sim-switch: can't listen on {args.host}:{args.port}: {'; '.join(failed)}", file=sys.stderr)
        return 1
    print(f"sim-switch: {sim.summary()}", file=sys.stderr)
    return 0
