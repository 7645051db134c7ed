"""The transaction flow, sans-IO: events in, actions out.

Everything the gateway decides about a message is decided here, once: MACs and
identified front ends, validation, the duplicate window, routing, link choice, STAN
remapping, matching, timeouts, late responses, local answers, front-end reversals,
the switch's 0800s (new MAC keys among them) and the link's own. The shell (``gateway.py`` and ``net/``) reads sockets, cuts frames and
feeds them in; it executes what comes out and reports back what happened.

Events (methods of ``Flow``):

==============================  ================================================
``front_frame(front, ...)``     a complete frame from a front connection
``switch_frame(link, ...)``     a complete frame from a switch link
``deadline(link, now)``         a link's earliest deadline was reached
``link_connected/ready/down``   a link's session began, may carry traffic, ended
``journal_done(txn, error)``    the journal has a transaction (or failed to take it)
``lookup_done(txn, found)``     the original a front-end reversal names was looked up
``reversal_stored(txn, now)``   a timed-out transaction's reversal is durable
``delivered(txn, ok)``          the answer reached the front end's socket (or not)
``network_request(link, ...)``  the link wants to send its own 0800 (sign-on, echo)
``send_reversal(link, ...)``    the reversal queue wants to send one attempt
``key_installed(link, ...)``    a new MAC key from the switch is in use (or refused)
==============================  ================================================

Actions are tuples appended to ``Flow.actions``, first element the opcode; the
shell drains the list after each event (or after a round of them) and executes
them in order. Counting goes straight to the ``metrics`` sink the shell hands in
(plain counters, no I/O); log lines are LOG actions; MACs are computed by the
``security`` module the shell hands in, named by key label (keys never reach here).

There is one path for a message to the switch (``_dispatch``): a front end's
authorization and a front end's reversal differ only in what happens before it
(a duplicate check or a journal lookup) and in what their answer means (``Txn.kind``).
The pending and late tables live on ``Link`` (one per switch connection) and the
reversals still owed an acknowledgement on ``UpstreamSide.outstanding``: matching is
the flow's, never a callback into the application.

Nothing here imports trio, opens a socket or a file, logs or reads a clock: times come in
as ``now`` (the shell's monotonic clock) and ``wall`` (``begin_round``), ids from the
``new_id`` the shell passes.
"""

from __future__ import annotations

from collections import OrderedDict
from datetime import datetime, timezone
from hmac import compare_digest
from typing import Any, Callable, Protocol

from .dialect import Dialect, check_field_type
from .duplicates import DuplicateEntry, DuplicateTable
from .errors import DecodeError, DuplicateRecorded, IsoGatewayError, MessageError
from .framing import Framer
from .macs import AFTER_64, BIT_64, ClientTable, MacField, MacHop
from .masking import mask_pan
from .matching import Key, PendingTable, StanAllocator, match_key
from .message import (
    OriginalData, build_response, decode, encode, is_request, is_valid_mti, original_mti, response_mti,
)
from .routing import NoRoute, RouteTable
from .scanner import Scan, Scanner
from .states import ANSWERED, NOT_SENT, REVERSAL_FIELDS, REVERSED, TIMED_OUT
from .validation import RuleSet

# Log levels of LOG actions (the values of the standard library's logging levels).
INFO, WARNING, ERROR = 20, 30, 40

REVERSAL_KEYS = tuple((int(k), k) for k in REVERSAL_FIELDS)

# DE 39 values that approve (ISO 8583:1987): approved; honour with identification; approved for a
# partial amount; approved (VIP); approved, update track 3. Only these leave something to reverse.
APPROVED_CODES = frozenset({"00", "08", "10", "11", "16"})
# The answer to a front-end reversal whose original was declined (or never reached the switch):
# 21, "no action taken", the code for a reversal that found nothing to reverse. It says the
# original was found (unlike 25) and that no funds were held, so the switch is not asked.
NOTHING_TO_REVERSE_CODE = "21"

# How long a timed-out request's key is remembered, so that its response is
# counted as late rather than unknown (jPOS QMUX keeps unhandled ones 120 s).
LATE_WINDOW = 120.0
LATE_MEMORY = 100_000
# Outstanding reversals remembered per upstream past their attempt's deadline (see
# Outstanding): as many as late responses, ample for any SAF backlog that is being worked.
OUTSTANDING_MEMORY = LATE_MEMORY
STAN_BLOCK = 1000  # a link's STAN counter is saved every this many STANs; a restart resumes past it
# A link that took this many requests (echoes included) in a row and answered none in time is not
# "answering": /readyz stops counting it as ready, although it still carries traffic (a switch that
# accepts TCP but never answers looks connected). Why 3: a healthy switch answers nearly everything
# within the route timeout, so one or two timeouts are ordinary slowness, while three in a row with
# not one answer between them is a switch that has stopped answering. An unanswered echo counts as
# the whole run at once: echoes are only sent to an idle link, and the switch always answers them.
UNANSWERED_NOT_READY = 3

# ---------------------------------------------------------------------------- actions
# (SEND, link, frame): write a frame on a switch link.
SEND = 0
# (ANSWER, front, frame | None, txn | None): one of the front connection's requests is done; send
# ``frame`` (None: nothing to send, or the connection is gone). With ``txn``, report the delivery
# (``delivered``).
ANSWER = 1
# (RECORD, txn, row, fields): journal the transaction before it leaves; report ``journal_done``.
RECORD = 2
# (STATE, txn_id, state, response_code, auth_code): a journaled transaction's new state.
STATE = 3
# (CANCEL_SAF, txn_id, why): the transaction's reversals not yet sent are not needed.
CANCEL_SAF = 4
# (LOOKUP, txn, identity, acquirer, terminal, merchant, stan, transmission, mti): find the original a
# front-end reversal names (the journal's ``find_original``); report ``lookup_done``.
LOOKUP = 5
# (REVERSE, txn, reason, auth_code, answer): queue a durable reversal of ``txn``; with ``answer``,
# report ``reversal_stored`` once it is durable (the front end is answered then).
REVERSE = 6
# (LATE, txn, rc): an answer came for ``txn`` after its deadline.
LATE = 7
# (TAKE_OVER, txn): a front end's reversal was out when the switch dropped the link: the gateway
# reverses its original itself from now on (``txn.reversal_of``), alone on a connection of its own.
TAKE_OVER = 8
# (ARM, link, at): the link's earliest deadline is now ``at`` (inf: none); report ``deadline`` then.
ARM = 9
# (SAF_OUTCOME, attempt, outcome, rc): a reversal attempt's outcome ("answer", "timeout", "lost",
# "closed", "late"), for the reversal queue that sent it.
SAF_OUTCOME = 10
# (NET_DONE, exchange): the link's own 0800 has its outcome (``exchange.rc``, None: no answer).
NET_DONE = 11
# (SAVE_STAN, link): the link used another STAN_BLOCK STANs: save its counter.
SAVE_STAN = 12
# (INSTALL_KEY, link, request, label, zone_key, wrapped, check_value, algorithm): the switch sent a new
# MAC key (wrapped under the zone key): install it if its check value matches; report ``key_installed``.
INSTALL_KEY = 14
# (LOG, level, message, args): a line for the log (an exception among ``args`` is logged masked,
# with its traceback). The flow writes nothing itself.
LOG = 13


class FrontSide:
    """What the flow knows of a listener: its name, codec, rules and framing (plain values)."""

    __slots__ = ("name", "dialect", "rules", "framer", "scanner", "mac", "clients")

    def __init__(self, name: str, dialect: Dialect, rules: RuleSet, framer: Framer, scanner: Scanner,
                 mac: MacHop | None = None, clients: ClientTable | None = None) -> None:
        self.name = name
        self.dialect = dialect
        self.rules = rules
        self.framer = framer
        self.scanner = scanner
        self.mac = mac  # MACs on this hop: verified on requests, generated on answers
        self.clients = clients  # front ends must be identified and stay within their ids


class FrontRef(Protocol):
    """A front connection as the flow sees it: the shell's object, read, never written."""

    side: FrontSide
    closed: bool
    id: int


class UpstreamSide:
    """A switch as the flow sees it: codec, framing, match fields, limits and its links."""

    def __init__(self, name: str, dialect: Dialect, framer: Framer, header: bytes, *,
                 match_fields: tuple[int, ...] = (), max_in_flight: int = 1000, reversal_timeout: float = 30.0,
                 institution_id: str = "") -> None:
        self.name = name
        self.dialect = dialect
        self.framer = framer
        self.header = header  # the TPDU (or fixed header) on frames the gateway starts; replies swap the peer's
        self.match_fields = tuple(match_fields)
        self.max_in_flight = max_in_flight
        self.reversal_timeout = reversal_timeout
        self.institution_id = institution_id
        self.mac: MacHop | None = None  # MACs on this hop: generated on requests, verified on answers
        self.scanner = Scanner(dialect, {11, 38, 39, 41, 70, *self.match_fields})
        self.links: list[Link] = []
        # Reversals whose answer still counts after their attempt's deadline, on any of this
        # upstream's links: a response that matches nothing in flight is offered to them before
        # it is called late or unmatched.
        self.outstanding = Outstanding()
        self._outstanding_keys: dict[int, Key] = {}  # SAF id -> its key in ``outstanding``

    def encode_frame(self, message: bytes, reply_to: bytes | None = None) -> bytes:
        header = self.framer.reply_header(reply_to) if reply_to else self.header
        return self.framer.encode(message, header=header)

    def pick(self) -> Link | None:
        """The least-loaded ready link with room, or None."""
        best: Link | None = None
        best_load = self.max_in_flight
        for link in self.links:
            if link.ready:
                load = len(link.pending)
                if load < best_load:
                    best, best_load = link, load
        return best

    @property
    def ready(self) -> bool:
        return any(link.ready for link in self.links)

    def in_flight(self) -> int:
        return sum(len(link.pending) for link in self.links)


class Outstanding(OrderedDict[Key, "OutstandingReversal"]):
    """An upstream's reversals that outlive their attempt's deadline, by match key, oldest first,
    at most OUTSTANDING_MEMORY of them (past that the oldest is forgotten, and an answer to it is
    unmatched: the worst case is the repeat this table exists to avoid, never a wrong match)."""

    def keep(self, key: Key, entry: OutstandingReversal) -> None:
        self.pop(key, None)
        self[key] = entry
        while len(self) > OUTSTANDING_MEMORY:
            self.popitem(last=False)


class Link:
    """One connection to a switch, as the protocol sees it: what is in flight on it (the pending
    table, with deadlines), what timed out lately (the late table), its STANs, whether it may
    carry traffic and whether the switch answers on it. ``io`` is the shell's connection."""

    def __init__(self, upstream: UpstreamSide, index: int, io: Any = None, metrics: Any = None) -> None:
        self.upstream = upstream
        self.index = index
        self.io = io
        self._metrics = metrics
        self.pending: PendingTable[Any] = PendingTable()
        self.late: OrderedDict[Key, tuple[float, Txn | None]] = OrderedDict()
        self.stans = StanAllocator(1)
        self.connected = False  # a session is up: the link's own 0800s may go
        self.ready = False  # signed on (when configured): traffic may go
        self.closing = False  # the gateway is closing it (shutdown): its end is nobody's fault
        self.armed = float("inf")  # the deadline the shell's timer waits for
        self.last_write = 0.0
        self.last_header = b""  # TPDU or header of the switch's last frame (replies swap it)
        # Requests (echoes too) that timed out in a row with no answer in time between them;
        # an unanswered echo makes it at least UNANSWERED_NOT_READY. Kept across reconnects:
        # a new session to a silent switch is not ready until it answers.
        self.unanswered = 0
        self._silent_counted = False  # counted in the link_not_answering gauge (ready and not answering)

    @property
    def answering(self) -> bool:
        """False after a run of unanswered requests or an unanswered echo (see UNANSWERED_NOT_READY)."""
        return self.unanswered < UNANSWERED_NOT_READY

    def count_silence(self) -> None:
        """Keep the link_not_answering gauge (links ready but not answering) in step."""
        silent = self.ready and self.unanswered >= UNANSWERED_NOT_READY
        if silent is not self._silent_counted:
            self._silent_counted = silent
            if self._metrics is not None:
                g = self._metrics.link_not_answering(self.upstream.name)
                g.inc() if silent else g.dec()

    def echo_missed(self) -> None:
        """An echo went unanswered: the link is not answering until the switch answers something."""
        self.unanswered = max(self.unanswered, UNANSWERED_NOT_READY)
        self.count_silence()

    def remember_late(self, key: Key, txn: Txn | None, now: float) -> None:
        late = self.late
        late[key] = (now, txn)
        while late and (len(late) > LATE_MEMORY or next(iter(late.values()))[0] < now - LATE_WINDOW):
            late.popitem(last=False)


class Txn:
    """A front end's request on its way to a switch (``kind`` "request") or a front end's reversal
    (``kind`` "reversal"): the pending-table entry and everything its answer needs."""

    __slots__ = ("kind", "front", "raw", "header", "mti", "front_stan", "upstream_stan", "upstream", "link",
                 "received_at", "sent_at", "translate", "done", "sent", "txn_id", "original", "frame", "key",
                 "duplicate", "restore", "values", "rc", "auth", "reason", "code", "reversal_of", "timeout", "partial")

    def __init__(self, kind: str, front: FrontRef, raw: bytes, header: bytes, mti: str, front_stan: str,
                 received_at: float) -> None:
        self.kind = kind
        self.front = front
        self.raw = raw
        self.header = header
        self.mti = mti
        self.front_stan = front_stan
        self.upstream_stan = ""
        self.upstream: UpstreamSide | None = None
        self.link: Link | None = None
        self.received_at = received_at
        self.sent_at = received_at
        self.translate = False
        self.done = False
        self.sent = False  # the frame left for the switch (else a timeout needs no reversal)
        self.txn_id: int | None = None
        self.original: dict[str, str] = {}  # the fields a reversal is built from (memory only)
        self.frame = b""  # the framed upstream copy, held until the journal has the transaction
        self.key: Key = ()
        self.duplicate: DuplicateEntry | None = None
        self.restore: dict[str, str] | None = None  # fields other than 11 to give back to the front end
        self.values: dict[int, str] = {}  # a front-end reversal's scanned fields (until it is sent)
        self.rc = ""  # the answer the front end got (the switch's, or the gateway's own)
        self.auth: str | None = None
        self.reason = ""  # why the gateway answered itself (timeout, link_lost, journal_failed)
        self.code = ""
        # A front-end reversal: (original's journal row, its reversal fields) once looked up.
        self.reversal_of: Any = None
        self.timeout = 0.0
        self.partial = False  # a front-end reversal with DE 95 (a partial reversal: its amount may differ)

    def reversal_fields(self) -> dict[str, str]:
        """The fields a reversal of this request is built from: kept when journaled, else decoded now (rare path)."""
        if not self.original:
            try:
                msg = decode(self.front.side.dialect, self.raw, check_types=False)
            except IsoGatewayError:
                return {}
            self.original = {k: msg[k] for k in REVERSAL_FIELDS if k in msg}
        return self.original


class NetworkExchange:
    """The link's own 0800 (sign-on, echo, sign-off) waiting for its 0810. ``waker`` is the shell's."""

    __slots__ = ("mti", "code", "sent_at", "rc", "rtt", "done", "waker")

    def __init__(self, code: str, sent_at: float) -> None:
        self.mti = "0800"
        self.code = code
        self.sent_at = sent_at
        self.rc: str | None = None
        self.rtt = 0.0
        self.done = False
        self.waker: Any = None


class ReversalAttempt:
    """One attempt of a queued reversal in flight on a link. ``owner`` is the shell's reversal
    queue (told the outcome through SAF_OUTCOME), ``item`` its own record of the reversal."""

    __slots__ = ("mti", "stan", "owner", "item", "saf_id", "attempts", "alone", "done", "waker")

    def __init__(self, owner: Any, item: Any, saf_id: int, mti: str, stan: str, attempts: int, alone: bool) -> None:
        self.mti = mti
        self.stan = stan
        self.owner = owner
        self.item = item
        self.saf_id = saf_id
        self.attempts = attempts
        self.alone = alone
        self.done = False
        self.waker: Any = None


class OutstandingReversal:
    """A reversal sent and not acknowledged yet, once an attempt's deadline has passed: a 0430/0410
    that matches it, at any time until it is acknowledged or parked, completes it. It holds no
    card data, only what completing the item needs."""

    __slots__ = ("mti", "owner", "saf_id", "txn_id", "rrn")

    def __init__(self, owner: Any, saf_id: int, txn_id: int | None, rrn: str, mti: str) -> None:
        self.mti = mti
        self.owner = owner
        self.saf_id = saf_id
        self.txn_id = txn_id
        self.rrn = rrn


class FlowSettings:
    """The gateway-wide settings the flow decides by (plain values from the config)."""

    __slots__ = ("timeout_code", "unavailable_code", "unknown_original_code", "amount_mismatch_code",
                 "local_network_management", "duplicate_in_flight", "journaling")

    def __init__(self, *, timeout_code: str = "91", unavailable_code: str = "91", unknown_original_code: str = "25",
                 amount_mismatch_code: str = "13", local_network_management: bool = True,
                 duplicate_in_flight: str = "wait", journaling: bool = True) -> None:
        self.timeout_code = timeout_code
        self.unavailable_code = unavailable_code
        self.unknown_original_code = unknown_original_code
        self.amount_mismatch_code = amount_mismatch_code
        self.local_network_management = local_network_management
        self.duplicate_in_flight = duplicate_in_flight
        # Without a journal (measurement only) requests are sent at once, never recorded.
        self.journaling = journaling


def front_identity(front: FrontRef) -> str:
    """Who sent a request, as the journal records it (``txn.listener``) and as a front-end reversal
    must match it to find its original: today the listener it came through, so any client of a
    listener may reverse what another client of the same listener sent (with the same acquirer,
    terminal and merchant). A listener that identifies its clients (``FrontSide.clients``: by TLS
    client certificate or source address) adds the client's identity, so a front end can find and
    reverse only what it sent itself."""
    side = front.side
    if side.clients is None:
        return side.name
    return f"{side.name}/{getattr(front, 'identity', '')}"


class Flow:
    """The gateway's decisions about every message; see the module's docstring."""

    def __init__(self, settings: FlowSettings, routes: RouteTable, upstreams: dict[str, UpstreamSide],
                 metrics: Any, new_id: Callable[[], int], duplicate_window: float = 0.0) -> None:
        self.settings = settings
        self.routes = routes
        self.upstreams = upstreams
        self.metrics = metrics
        self.new_id = new_id
        self.duplicates = DuplicateTable(duplicate_window)
        self.actions: list[tuple[Any, ...]] = []
        # The security module that computes and checks MACs (mac, verify_mac): the shell's, set
        # when a hop has MACs. Only key labels cross; keys stay in the module.
        self.security: Any = None
        self.draining = False  # shutting down: nothing new goes to a switch
        self.in_flight = 0  # front-end requests at a switch (drain waits for 0)
        # The wall clock of the current round (``begin_round``): validation's "now" for DE 7.
        self.wall = 0.0
        self._now_utc = datetime.fromtimestamp(0, timezone.utc)
        # Per dialect: a scanner reading the fields a response echoes, for local answers.
        self._echo_scanners: dict[str, tuple[Dialect, Scanner]] = {}

    # ================================================================== events: the shell's clock

    def begin_round(self, wall: float) -> None:
        """A round of events starts at wall-clock ``wall``: DE 7 is checked against it."""
        self.wall = wall
        self._now_utc = datetime.fromtimestamp(wall, timezone.utc)

    # ================================================================== events: front ends

    def front_frame(self, front: FrontRef, raw: bytes, header: bytes, now: float) -> None:
        """A complete request from a front connection. Every request ends in exactly one ANSWER
        action for ``front`` (now or later), whatever happens: this is its boundary."""
        try:
            self._on_request(front, raw, header, now)
        except Exception as exc:  # noqa: BLE001 - the per-message boundary: answer, never lose the connection
            self.request_failed(front, raw, header, exc, "request", now)

    def _on_request(self, front: FrontRef, raw: bytes, header: bytes, now: float) -> None:
        side = front.side
        m = self.metrics
        found: dict[int, str] = {}
        try:
            scan = side.scanner.scan(raw, full=True, found=found)
        except MessageError as exc:
            self._undecodable(front, raw, header, found, exc, now)
            return
        mti = scan.mti
        m.front_received(side.name, mti).inc()
        if not is_valid_mti(mti) or not is_request(mti):
            m.decode_errors("front", side.name, "not_a_request").inc()
            self._log(WARNING, "listener %s: %s is not a request; dropped", side.name, mti if mti.isdigit() else "MTI")
            self.actions.append((ANSWER, front, None, None))
            return
        if mti[1] == "8" and self.settings.local_network_management:
            self.answer_locally(front, raw, header, "00", "network_management", now)
            return
        values = scan.values
        if side.mac is not None and self._mac_refused("front", side.name, side.mac, scan.bitmap, raw):
            self.answer_locally(front, raw, header, side.mac.code, "bad_mac", now)
            return
        if side.clients is not None and self._client_refused(front, side.clients, mti, values):
            self.answer_locally(front, raw, header, side.clients.code, "not_authorized", now)
            return
        rejection = side.rules.validate(side.dialect, mti, scan.bitmap, values, self._now_utc)
        if rejection is not None:
            m.rejections(side.name, rejection.reason, rejection.code).inc()
            self._log(WARNING, "listener %s: %s rejected with %s (%s%s)", side.name, mti, rejection.code,
                        rejection.reason, f", field {rejection.field}" if rejection.field else "")
            self.answer_locally(front, raw, header, rejection.code, rejection.reason, now)
            return
        if mti[1] == "4":
            self._front_reversal(front, raw, header, scan, now)
            return
        dup_key: str | None = None
        if self.duplicates.window:
            get = values.get
            dup_key = "|".join((side.name, get(41, ""), get(42, ""), get(11, ""), get(7, ""), get(4, ""),
                                get(37, "")))
            entry = self.duplicates.lookup(dup_key, now)
            if entry is not None:
                self._on_duplicate(front, raw, header, entry, now)
                return
        route = self.routes.lookup(mti, values.get(2), values.get(49), values.get(41), values.get(42))
        if isinstance(route, NoRoute):
            m.rejections(side.name, route.reason, route.code).inc()
            pan = values.get(2)
            self._log(WARNING, "listener %s: %s has no route (%s, PAN %s); answered %s", side.name, mti, route.reason,
                        mask_pan(pan) if pan else "none", route.code)
            self.answer_locally(front, raw, header, route.code, route.reason, now)
            return
        upstream = self.upstreams[route.upstream]
        link = upstream.pick()
        if link is None or self.draining:
            self._no_link(front, raw, header, upstream, now)
            return
        txn = Txn("request", front, raw, header, mti, values.get(11, ""), now)
        txn.timeout = route.timeout
        if dup_key is not None:
            txn.duplicate = self.duplicates.start(dup_key, txn, now)
        mode = _mac_mode(side.scanner, scan.bitmap, upstream.mac) if side.dialect is upstream.dialect else None
        if mode is not None:
            stan = self._allocate_stan(link)
            out = side.scanner.splice(raw, scan, 11, stan)
            if mode != _KEEP:
                out = self._respliced(side.scanner, out, mode, upstream.mac)
            self._dispatch(txn, link, stan, out, values, now)
        else:
            msg = decode(side.dialect, raw, check_types=False)
            self._dispatch_message(txn, link, msg, values, now)

    def _no_link(self, front: FrontRef, raw: bytes, header: bytes, upstream: UpstreamSide, now: float) -> None:
        code = self.settings.unavailable_code
        name = front.side.name
        self.metrics.rejections(name, "no_link", code).inc()
        self._log(WARNING, "listener %s: no usable link to %s; answered %s", name, upstream.name, code)
        self.answer_locally(front, raw, header, code, "no_link", now)

    # ------------------------------------------------------------------ the one path to a switch

    def _dispatch_message(self, txn: Txn, link: Link, msg: dict[str, str], values: dict[int, str],
                          now: float) -> None:
        """Send a decoded message (another dialect, a MAC to add or drop, or a reversal the gateway
        rewrote) on ``link``."""
        stan = self._allocate_stan(link)
        msg["11"] = stan
        txn.translate = True
        if txn.kind == "reversal":
            txn.original = {k: msg[k] for k in REVERSAL_FIELDS if k in msg}
        self._dispatch(txn, link, stan, self._encode(link.upstream.dialect, link.upstream.mac, msg), values, now)

    def _dispatch(self, txn: Txn, link: Link, stan: str, out: bytes, values: dict[int, str], now: float) -> None:
        """``txn`` goes to the switch on ``link`` as ``out`` (its STAN already ``stan``): pending
        from now, journaled first (RECORD, then ``journal_done`` sends it) unless the journal is off."""
        upstream = link.upstream
        txn.upstream = upstream
        txn.link = link
        txn.upstream_stan = stan
        match_fields = upstream.match_fields
        key = txn.key = match_key(txn.mti, stan, tuple(values.get(f, "") for f in match_fields) if match_fields else ())
        frame = self._register(link, txn, out, key, now + txn.timeout, now)
        self.in_flight += 1
        m = self.metrics
        m.upstream_sent(upstream.name, txn.mti).inc()
        m.in_flight(upstream.name).inc()
        if txn.kind == "request":
            if not self.settings.journaling:
                txn.sent = True
                self.actions.append((SEND, link, frame))
                return
            txn.original = {key_: values[k] for k, key_ in REVERSAL_KEYS if k in values}
        txn.frame = frame
        txn.txn_id = self.new_id()
        row = {"id": txn.txn_id, "listener": front_identity(txn.front), "mti": txn.mti, "upstream": upstream.name,
               "link": link.index, "upstream_stan": stan,
               # A store shared by several nodes refuses a second record with this key (DuplicateRecorded).
               "dup_key": txn.duplicate.key if txn.duplicate is not None else ""}
        self.actions.append((RECORD, txn, row, txn.original))

    def _register(self, link: Link, entry: Any, out: bytes, key: Key, deadline: float, now: float) -> bytes:
        """Put ``entry`` in ``link``'s pending table under ``key``; the frame to send.

        The frame is encoded first, so a message that can't be framed leaves nothing pending."""
        frame = link.upstream.encode_frame(out)
        link.pending.add(key, entry, deadline)
        if deadline < link.armed:
            link.armed = deadline
            self.actions.append((ARM, link, deadline))
        link.last_write = now
        return frame

    def _allocate_stan(self, link: Link) -> str:
        stan = link.stans.allocate(link.pending)
        if link.stans.last % STAN_BLOCK == 0:
            self.actions.append((SAVE_STAN, link))
        return stan

    def journal_done(self, txn: Txn, error: BaseException | None, now: float) -> None:
        """The journal has ``txn`` (``error`` None): send it, unless it ended meanwhile. Else refuse
        it: what a crash would forget is never sent."""
        if error is None:
            if not txn.done and txn.frame and txn.link is not None:
                self.actions.append((SEND, txn.link, txn.frame))
                txn.sent = True
                txn.frame = b""
            return
        link = txn.link
        if txn.done or link is None or link.pending.pop(txn.key) is not txn:
            return
        if isinstance(error, DuplicateRecorded):
            self._recorded_elsewhere(txn, error, now)
            return
        self._log(ERROR, "journal write failed (%s): %s answered 96 without being sent", type(error).__name__, txn.mti)
        self._fail(txn, "96", "journal_failed", now)

    def _recorded_elsewhere(self, txn: Txn, dup: DuplicateRecorded, now: float) -> None:
        """Another node journaled the same request first: never sent twice. Answered as a duplicate is
        here: the first one's answer, or 94 while it is still in flight there."""
        txn.done = True
        self.in_flight -= 1
        upstream = txn.upstream
        assert upstream is not None
        self.metrics.in_flight(upstream.name).dec()
        self.metrics.duplicates(txn.front.side.name).inc()
        code = dup.rc or "94"
        self._log(WARNING, "listener %s: the same request is journaled by another node; answered %s",
                  txn.front.side.name, code)
        txn.code, txn.reason = code, "duplicate"
        txn.txn_id = None  # its row is the other node's
        self._complete_duplicates(txn, code, dup.auth_code, None, now)
        self.answer_locally(txn.front, txn.raw, txn.header, code, "duplicate", now, txn.received_at,
                            auth_code=dup.auth_code)

    # ------------------------------------------------------------------ answers from a switch

    def _on_answer(self, txn: Txn, link: Link, raw: bytes, scan: Scan, now: float) -> None:
        upstream = link.upstream
        if upstream.mac is not None and self._mac_refused("upstream", upstream.name, upstream.mac, scan.bitmap, raw):
            # Not trusted: the front end hears the timeout code and what was sent is reversed.
            self._fail(txn, self.settings.timeout_code, "bad_mac", now)
            return
        txn.done = True
        self.in_flight -= 1
        m = self.metrics
        values = scan.values
        rc = txn.rc = values.get(39, "")
        auth = txn.auth = values.get(38)
        m.upstream_latency(upstream.name, txn.mti).observe(now - txn.sent_at)
        m.in_flight(upstream.name).dec()
        if txn.kind == "reversal" and rc == "00":
            original = txn.reversal_of[0]
            self.actions.append((STATE, original.id, REVERSED, None, None))
            self.actions.append((CANCEL_SAF, original.id, "reversed by the front end"))
        front = txn.front
        if front.closed:
            self._complete_duplicates(txn, rc, auth, None, now)
            self.actions.append((ANSWER, front, None, None))
            self._undeliverable(txn)
            return
        side = front.side
        try:
            mode = None if txn.translate or txn.restore else _mac_mode(upstream.scanner, scan.bitmap, side.mac)
            if mode is None:
                msg = decode(upstream.dialect, raw, check_types=False)
                msg["11"] = txn.front_stan
                msg.update(txn.restore or {})
                out = self._encode(side.dialect, side.mac, msg)
            else:
                out = upstream.scanner.splice(raw, scan, 11, txn.front_stan) if 11 in scan.spans else raw
                if mode != _KEEP:
                    out = self._respliced(upstream.scanner, out, mode, side.mac)
        except IsoGatewayError as exc:
            self._log(WARNING, "response from %s can't be returned to the front end (%s); answering 96", upstream.name, exc)
            txn.rc, txn.auth = "96", None
            self._complete_duplicates(txn, "96", None, None, now)
            self.answer_locally(front, txn.raw, txn.header, "96", "bad_response", now, txn.received_at)
            return
        self._complete_duplicates(txn, rc, auth, out, now)
        framer = side.framer
        self.actions.append((ANSWER, front, framer.encode(out, header=framer.reply_header(txn.header)), txn))
        m.front_sent(side.name, scan.mti, rc).inc()
        m.request_latency(upstream.name, txn.mti).observe(now - txn.received_at)

    def delivered(self, txn: Txn, ok: bool) -> None:
        """The switch's answer to ``txn`` was handed to the front end's socket (``ok``), or could not
        be. Only an answer handed over counts as answered: after a crash, anything less is in
        doubt and reversed."""
        if ok:
            if txn.txn_id is not None:
                self.actions.append((STATE, txn.txn_id, ANSWERED, txn.rc, txn.auth))
        else:
            self._undeliverable(txn)

    def _undeliverable(self, txn: Txn) -> None:
        """The switch answered, the front end can't be told: an approval is reversed."""
        if txn.rc == "00" and txn.mti[1] in "12":
            self._log(WARNING, "approval for a front end that is gone: reversing it")
            self.actions.append((REVERSE, txn, "undeliverable", txn.auth, False))
        elif txn.txn_id is not None:
            self.actions.append((STATE, txn.txn_id, ANSWERED, txn.rc, None))

    def _on_txn_timeout(self, txn: Txn, link: Link, now: float) -> None:
        code = self.settings.timeout_code
        name = link.upstream.name
        if txn.sent:
            self.metrics.timeouts(name, txn.mti).inc()
            self._log(WARNING, "upstream %s: no answer to %s (upstream STAN %s) in time; answered %s",
                        name, txn.mti, txn.upstream_stan, code)
            link.remember_late(txn.key, txn, now)
        else:
            self._log(WARNING, "upstream %s: %s could not be sent in time (journal slow or failing); answered %s",
                        name, txn.mti, code)
        self._fail(txn, code, "timeout", now)

    def _on_txn_link_lost(self, txn: Txn, link: Link, now: float) -> None:
        if txn.kind == "reversal" and txn.sent and not link.closing and txn.reversal_of[1]:
            self.actions.append((TAKE_OVER, txn))
        self._fail(txn, self.settings.unavailable_code, "link_lost", now)

    def _fail(self, txn: Txn, code: str, reason: str, now: float) -> None:
        """The gateway answers ``txn`` itself with ``code``: at once, or once its reversal (if one is
        owed) is durable (REVERSE, then ``reversal_stored``)."""
        txn.done = True
        self.in_flight -= 1
        upstream = txn.upstream
        assert upstream is not None
        m = self.metrics
        m.in_flight(upstream.name).dec()
        # The front end waited this long too: p99 latency must see timeouts, not only answers.
        m.request_latency(upstream.name, txn.mti).observe(now - txn.received_at)
        txn.rc, txn.code, txn.reason = code, code, reason
        if txn.sent and txn.mti[1] in "12":
            self.actions.append((REVERSE, txn, reason, None, True))
            return
        if txn.txn_id is not None:
            self.actions.append((STATE, txn.txn_id, TIMED_OUT if txn.sent else NOT_SENT, None, None))
        self.reversal_stored(txn, now)

    def reversal_stored(self, txn: Txn, now: float) -> None:
        """What ``txn`` owed is durable (or nothing was owed): the front end hears ``txn.code``."""
        self._complete_duplicates(txn, txn.code, None, None, now)
        self.answer_locally(txn.front, txn.raw, txn.header, txn.code, txn.reason, now, txn.received_at)

    # ------------------------------------------------------------------ duplicates

    def _on_duplicate(self, front: FrontRef, raw: bytes, header: bytes, entry: DuplicateEntry | tuple,
                      now: float) -> None:
        name = front.side.name
        self.metrics.duplicates(name).inc()
        if isinstance(entry, DuplicateEntry):
            if self.settings.duplicate_in_flight == "94":
                self._log(WARNING, "listener %s: duplicate of a request still in flight; answered 94", name)
                self.answer_locally(front, raw, header, "94", "duplicate", now)
                return
            self._log(INFO, "listener %s: duplicate of a request still in flight; it will get the same answer", name)
            entry.followers.append((front, raw, header))
            return
        _, rc, auth_code = entry
        self._log(INFO, "listener %s: duplicate request; the stored answer %s is replayed", name, rc)
        self.answer_locally(front, raw, header, rc or "96", "duplicate", now, auth_code=auth_code)

    def _complete_duplicates(self, txn: Txn, rc: str, auth_code: str | None, out: bytes | None, now: float) -> None:
        """The first of a set of duplicates has its answer: keep it for replays, and answer the waiting ones."""
        entry = txn.duplicate
        if entry is None:
            return
        self.duplicates.complete(entry, rc, auth_code)
        followers, entry.followers = entry.followers, []
        for front, raw, header in followers:
            if front.closed:
                self.actions.append((ANSWER, front, None, None))
            elif out is not None:
                framer = front.side.framer
                self.actions.append((ANSWER, front, framer.encode(out, header=framer.reply_header(header)), None))
            else:
                self.answer_locally(front, raw, header, rc, "duplicate", now, auth_code=auth_code)

    # ------------------------------------------------------------------ front-end reversals

    def _front_reversal(self, front: FrontRef, raw: bytes, header: bytes, scan: Scan, now: float) -> None:
        """A 0400/0420/0421 from a front end: its original is looked up through field 90 (LOOKUP),
        then it goes the way every request goes (``lookup_done``)."""
        values = scan.values
        try:
            f90 = OriginalData.parse(values.get(90, ""))
        except MessageError:
            self._reversal_answered(front, raw, header, scan.mti, "30", "bad_original_data", now)
            return
        # A reversal that names another acquirer in field 90 than in its DE 32 points at nothing
        # it may reverse: answered as an unknown original, like one naming another merchant's.
        acquirer = values.get(32, "")
        if f90.acquirer and f90.acquirer != acquirer.lstrip("0"):
            self._reversal_answered(front, raw, header, scan.mti, self.settings.unknown_original_code,
                                    "unknown_original", now)
            return
        txn = Txn("reversal", front, raw, header, scan.mti, values.get(11, ""), now)
        txn.values = values
        txn.partial = scan.has(95)
        self.actions.append((LOOKUP, txn, front_identity(front), acquirer, values.get(41, ""), values.get(42, ""),
                             f90.stan, f90.transmission, original_mti(f90.mti)))

    def lookup_done(self, txn: Txn, found: Any, now: float) -> None:
        """The journal's answer for a front-end reversal's original: None, or (row, the original's
        reversal fields, the states of reversals the gateway queued for it)."""
        try:
            self._reversal_found(txn, found, now)
        except Exception as exc:  # noqa: BLE001 - the reversal's boundary, as front_frame's
            self.request_failed(txn.front, txn.raw, txn.header, exc, "reversal", txn.received_at)

    def lookup_failed(self, txn: Txn, exc: Exception) -> None:
        self.request_failed(txn.front, txn.raw, txn.header, exc, "reversal", txn.received_at)

    def _reversal_found(self, txn: Txn, found: Any, now: float) -> None:
        front, raw, header, mti, values = txn.front, txn.raw, txn.header, txn.mti, txn.values
        at = txn.received_at
        settings = self.settings
        if found is None:
            self._reversal_answered(front, raw, header, mti, settings.unknown_original_code, "unknown_original", at)
            return
        original, fields, saf_states = found
        if values.get(4) != original.amount and not txn.partial:
            self._reversal_answered(front, raw, header, mti, settings.amount_mismatch_code, "amount_mismatch", at)
            return
        if original.state == REVERSED:
            self._reversal_answered(front, raw, header, mti, "00", "already_reversed", at)  # never twice
            return
        if original.state == NOT_SENT or (original.response_code and original.response_code not in APPROVED_CODES):
            # Declined (in time or late), or it never left: no funds are held, the switch has
            # nothing to undo, and asking it would only add a message it must reconcile.
            self._reversal_answered(front, raw, header, mti, NOTHING_TO_REVERSE_CODE, "nothing_to_reverse", at)
            return
        if saf_states:
            self._reversal_answered(front, raw, header, mti, "00", "already_reversed", at)  # the gateway reverses it
            return
        upstream = self.upstreams.get(original.upstream)
        link = upstream.pick() if upstream is not None else None
        if upstream is None or link is None or self.draining:
            self._reversal_answered(front, raw, header, mti, settings.unavailable_code, "no_link", at)
            return
        msg = decode(front.side.dialect, raw, check_types=False)
        f90 = OriginalData.parse(values.get(90, ""))
        msg["90"] = OriginalData(mti=original.mti, stan=original.upstream_stan, transmission=original.transmission,
                                 acquirer=f90.acquirer, forwarder=f90.forwarder).encode()
        txn.restore = {"90": values[90]}
        txn.reversal_of = (original, fields)
        txn.timeout = upstream.reversal_timeout
        txn.values = {}
        self._dispatch_message(txn, link, msg, values, now)

    def _reversal_answered(self, front: FrontRef, raw: bytes, header: bytes, mti: str, code: str, reason: str,
                           at: float) -> None:
        if code != "00":
            self.metrics.rejections(front.side.name, reason, code).inc()
        self._log(INFO, "listener %s: %s answered %s (%s)", front.side.name, mti, code, reason)
        self.answer_locally(front, raw, header, code, reason, at, at)

    # ------------------------------------------------------------------ local answers

    def answer_locally(self, front: FrontRef, raw: bytes, header: bytes, code: str, reason: str, now: float,
                       received_at: float | None = None, *, auth_code: str | None = None,
                       known: dict[int, str] | None = None, mti: str | None = None) -> None:
        """Answer a request with the gateway's own response (echo fields, 39 = ``code``). Raises nothing.

        The echo fields come from what is known already (``known``, the values a failed
        scan read, with ``mti``), else from a scan of ``raw`` for the echo fields: ``raw``
        passed the listener's full scan, which refuses exactly what a decode refuses, so
        that scan reads it too; nothing here decodes again what failed to decode. A
        response that can't be encoded falls back to a minimal one (see _local_response).
        """
        side = front.side
        if front.closed:
            self.actions.append((ANSWER, front, None, None))
            return
        try:
            values = known
            if values is None:
                found: dict[int, str] = {}
                try:
                    scan = self._echo_scanner(side.dialect).scan(raw, full=True, found=found)
                    mti, values = scan.mti, scan.values
                except MessageError:
                    values = found
            if mti is None:
                mti = peek_mti(side.dialect, raw)
            mac = side.mac if mti is not None and mti[1:2] != "8" else None
            out = self._local_response(side.dialect, mti, values, code, auth_code, mac is not None)
            if out is not None and mac is not None:
                out = self._sign(mac, out)
            if out is None:
                self.metrics.request_errors(side.name, "no_answer").inc()
                self._log(WARNING, "listener %s: no %s answer (%s) can be built for %s", side.name, code, reason,
                            mti if mti is not None and mti.isdigit() else "an unreadable MTI")
                self.actions.append((ANSWER, front, None, None))
                return
            frame = side.framer.encode(out, header=side.framer.reply_header(header))
        except Exception as exc:  # noqa: BLE001 - an error path must not raise: count it and give up on this one
            self.metrics.request_errors(side.name, "no_answer").inc()
            self._log(ERROR, "listener %s: answering %s (%s) failed: %s", side.name, code, reason, exc)
            self.actions.append((ANSWER, front, None, None))
            return
        self.actions.append((ANSWER, front, frame, None))
        self.metrics.front_sent(side.name, response_mti(mti), code).inc()  # type: ignore[arg-type]

    def _echo_scanner(self, dialect: Dialect) -> Scanner:
        entry = self._echo_scanners.get(dialect.name)
        if entry is None or entry[0] is not dialect:
            entry = self._echo_scanners[dialect.name] = (dialect, Scanner(dialect, dialect.echo))
        return entry[1]

    @staticmethod
    def _local_response(dialect: Dialect, mti: str | None, values: dict[int, str], code: str,
                        auth_code: str | None, mac: bool = False) -> bytes | None:
        """The encoded response to a request of ``mti`` whose echo fields are in ``values``; None when
        ``mti`` has no response or not even the minimal one encodes. In order: every echo field; the
        echo fields whose value fits its ISO type; the response MTI and DE 39 alone. With ``mac``,
        each ends with an empty MAC field, for the caller to sign."""
        if mti is None or not is_valid_mti(mti) or not is_request(mti):
            return None
        request = {str(k): v for k, v in values.items() if k not in (64, 128)}
        request["t"] = mti
        resp = build_response(dialect, request, code, auth_code=auth_code)
        fitting = {k: v for k, v in resp.items()
                   if k in ("t", "39") or (int(k) in dialect.fields and check_field_type(dialect.fields[int(k)], v) is None)}
        for attempt in (resp, fitting, {"t": resp["t"], "39": code}):
            if mac:
                attempt[MacField.field_for(attempt)] = "0" * 16
            try:
                return encode(dialect, attempt, check_types=False)
            except MessageError:
                continue
        return None

    def request_failed(self, front: FrontRef, raw: bytes, header: bytes, exc: Exception, where: str,
                       now: float) -> None:
        """The boundary around one request's handling: what escaped it is counted, logged masked and
        answered (30 for bytes that do not decode, 96 for anything else). Raises nothing."""
        name = front.side.name
        code, reason = ("30", "format_error") if isinstance(exc, DecodeError) else ("96", "internal_error")
        try:
            self.metrics.request_errors(name, reason).inc()
            self._log(ERROR, "listener %s: %s handling failed (%s); answered %s\n%s", name, where, reason, code,
                      exc)
        except Exception:  # noqa: BLE001 - counting and logging must not stop the answer
            pass
        self.answer_locally(front, raw, header, code, reason, now)

    def _undecodable(self, front: FrontRef, raw: bytes, header: bytes, found: dict[int, str],
                     exc: MessageError, now: float) -> None:
        """A request that does not decode: answered 30 if its MTI can be read, else counted and dropped.

        The answer echoes the values the scan read before it failed (``found``): the bytes are
        never decoded again."""
        side = front.side
        m = self.metrics
        m.decode_errors("front", side.name, "decode").inc()
        mti = peek_mti(side.dialect, raw)
        if mti is None or not is_request(mti):
            self._log(WARNING, "listener %s connection %d: undecodable frame dropped (%s)", side.name, front.id, exc)
            self.actions.append((ANSWER, front, None, None))
            return
        self._log(WARNING, "listener %s: %s does not decode (%s); answered 30", side.name, mti, exc)
        m.rejections(side.name, "format_error", "30").inc()
        self.answer_locally(front, raw, header, "30", "format_error", now, known=found, mti=mti)

    # ================================================================== events: switch links

    def switch_frame(self, link: Link, raw: bytes, header: bytes, now: float) -> None:
        """A complete frame from a switch: an answer to something in flight, a late one, or the
        switch's own request."""
        up = link.upstream
        link.last_header = header
        m = self.metrics
        try:
            scan = up.scanner.scan(raw)
        except MessageError as exc:
            self._log(WARNING, "upstream %s: undecodable message dropped: %s", up.name, exc)
            m.decode_errors("upstream", up.name, "decode").inc()
            return
        mti = scan.mti
        values = scan.values
        m.upstream_received(up.name, mti, values.get(39, "")).inc()
        if is_request(mti):
            self._switch_request(link, raw, mti)
            return
        fields = up.match_fields
        key = match_key(mti, values.get(11, ""), tuple(values.get(f, "") for f in fields) if fields else ())
        entry = link.pending.pop(key)
        if entry is None:
            outstanding = up.outstanding.get(key)
            if outstanding is not None:  # an answer past its attempt's deadline that still counts
                if up.mac is None or not self._mac_refused("upstream", up.name, up.mac, scan.bitmap, raw):
                    self.actions.append((SAF_OUTCOME, outstanding, "late", values.get(39, "")))
                return
            late = link.late.pop(key, None)
            self._unmatched(link, scan, late is not None, late[1] if late is not None else None)
            return
        if link.unanswered:  # an answer in time: the switch answers (readiness)
            link.unanswered = 0
            link.count_silence()
        if type(entry) is Txn:
            self._on_answer(entry, link, raw, scan, now)
        elif type(entry) is ReversalAttempt:
            entry.done = True
            if up.mac is not None and self._mac_refused("upstream", up.name, up.mac, scan.bitmap, raw):
                # Not trusted: as if unanswered; the reversal stays outstanding and is repeated.
                self.actions.append((SAF_OUTCOME, entry, "timeout", ""))
            else:
                self.actions.append((SAF_OUTCOME, entry, "answer", values.get(39, "")))
        else:
            entry.rc = values.get(39, "")
            entry.rtt = now - entry.sent_at
            entry.done = True
            self.actions.append((NET_DONE, entry))

    def _unmatched(self, link: Link, scan: Scan, late: bool, txn: Txn | None) -> None:
        rc = scan.values.get(39, "")
        name = link.upstream.name
        if late:
            self.metrics.late_responses(name, rc).inc()
            self._log(WARNING, "upstream %s: late %s (STAN %s, response code %s) not forwarded",
                        name, scan.mti, scan.values.get(11, "?"), rc or "none")
            if txn is not None and txn.txn_id is not None:
                self.actions.append((LATE, txn, rc))
        else:
            self.metrics.unmatched_responses(name).inc()
            self._log(WARNING, "upstream %s: unmatched %s (STAN %s, response code %s) dropped",
                        name, scan.mti, scan.values.get(11, "?"), rc or "none")

    def _switch_request(self, link: Link, raw: bytes, mti: str) -> None:
        """The switch's own 0800 (echo, sign-on): answer 0810 with 00. Others are refused with 12."""
        up = link.upstream
        if not link.connected:
            return
        try:
            req = decode(up.dialect, raw, check_types=False)
        except IsoGatewayError:
            return
        if mti[1] != "8":
            self._log(WARNING, "upstream %s: switch sent an unsupported %s; answered 12", up.name, mti)
            code = "12"
        else:
            change = up.dialect.key_change
            if change is not None and req.get("70") == change.code:
                mac = up.mac
                if mac is None or not mac.zone_key:
                    self._log(WARNING, "upstream %s: the switch sent a new MAC key, but no zone key is configured "
                              "for it ([upstreams.mac] zone_key); answered 96", up.name)
                    code = "96"
                else:
                    self.actions.append((INSTALL_KEY, link, req, mac.key, mac.zone_key,
                                         req.get(str(change.key_field), ""), req.get(str(change.check_field), ""),
                                         mac.algorithm))
                    return
            else:
                code = "00"
        self._answer_switch(link, req, code)

    def key_installed(self, link: Link, request: dict[str, str], check_value: str | None) -> None:
        """The new MAC key a switch sent is in use from the next message (``check_value``: its own,
        for the log), or could not be installed (None: a check value that does not match, a key that
        does not unwrap): the switch hears 00 or 96."""
        up = link.upstream
        if check_value is None:
            self.metrics.mac_failures("upstream", up.name, "key_change").inc()
            self._log(ERROR, "upstream %s: the new MAC key was refused (check value or unwrap failed); "
                      "the old key stays in use; answered 96", up.name)
            self._answer_switch(link, request, "96")
            return
        self._log(INFO, "upstream %s: new MAC key installed (check value %s)", up.name, check_value)
        self._answer_switch(link, request, "00")

    def _answer_switch(self, link: Link, req: dict[str, str], code: str) -> None:
        up = link.upstream
        if not link.connected:
            return
        answer = build_response(up.dialect, req, code)
        try:
            resp = encode(up.dialect, answer, check_types=False)
        except IsoGatewayError:
            return
        self.actions.append((SEND, link, up.encode_frame(resp, reply_to=link.last_header)))
        self.metrics.upstream_sent(up.name, answer["t"]).inc()

    def deadline(self, link: Link, now: float) -> None:
        """The shell's timer for ``link`` fired: everything due by ``now`` times out; the next
        deadline is armed."""
        for entry in link.pending.expire(now):
            link.unanswered += 1
            if link.unanswered == UNANSWERED_NOT_READY:
                link.count_silence()
            self._timed_out(entry, link, now)
        self._rearm(link)

    def _rearm(self, link: Link) -> None:
        nxt = link.pending.next_deadline()
        link.armed = nxt if nxt is not None else float("inf")
        self.actions.append((ARM, link, link.armed))

    def _timed_out(self, entry: Any, link: Link, now: float) -> None:
        if type(entry) is Txn:
            self._on_txn_timeout(entry, link, now)
        elif type(entry) is ReversalAttempt:
            # The reversal stays outstanding: a 0430 that comes after this still completes it.
            entry.done = True
            self.actions.append((SAF_OUTCOME, entry, "timeout", ""))
        else:
            entry.done = True
            self.actions.append((NET_DONE, entry))

    def link_connected(self, link: Link) -> None:
        """A session to the switch is up: the link's own 0800s may go (sign-on)."""
        link.connected = True

    def link_ready(self, link: Link) -> None:
        """The link may carry traffic (signed on when the upstream signs on)."""
        link.ready = True
        link.count_silence()

    def link_down(self, link: Link, now: float) -> None:
        """The session ended: everything in flight on it is answered (``link.closing``: the gateway
        closed it, else the switch or the network did)."""
        link.ready = link.connected = False
        link.count_silence()
        for entry in link.pending.drain():
            if type(entry) is Txn:
                self._on_txn_link_lost(entry, link, now)
            elif type(entry) is ReversalAttempt:
                entry.done = True
                self.actions.append((SAF_OUTCOME, entry, "closed" if link.closing else "lost", ""))
            else:
                entry.done = True
                self.actions.append((NET_DONE, entry))
        link.armed = float("inf")
        self.actions.append((ARM, link, link.armed))

    def expire_all(self, now: float) -> None:
        """Shutdown's drain deadline passed: everything still in flight times out now."""
        for up in self.upstreams.values():
            for link in up.links:
                for entry in link.pending.drain():
                    self._timed_out(entry, link, now)
                self._rearm(link)

    # ------------------------------------------------------------------ the link's own messages

    def network_request(self, link: Link, code: str, transmission: str, timeout: float,
                        now: float) -> NetworkExchange | None:
        """An 0800 with DE 70 = ``code`` (DE 7 ``transmission``) from the link itself; NET_DONE tells
        its outcome. None when the link has no session."""
        if not link.connected:
            return None
        up = link.upstream
        stan = self._allocate_stan(link)
        msg = {"t": "0800", "7": transmission, "11": stan, "70": code}
        if up.institution_id:
            msg["32"] = up.institution_id
        exchange = NetworkExchange(code, now)
        frame = self._register(link, exchange, encode(up.dialect, msg), match_key("0800", stan, ()), now + timeout, now)
        self.actions.append((SEND, link, frame))
        self.metrics.upstream_sent(up.name, "0800").inc()
        return exchange

    # ------------------------------------------------------------------ reversal attempts

    def send_reversal(self, link: Link, owner: Any, item: Any, saf_id: int, txn_id: int | None, message: dict[str, str],
                      mti: str, stan: str, now: float, alone: bool = False) -> ReversalAttempt | str:
        """Send one attempt of a queued reversal (``message``, a plain dict of fields) as ``mti`` on
        ``link``, with ``stan`` (empty: a new one). The attempt, or why it did not go ("busy": the
        STAN is in flight or held by another outstanding reversal; else the encode error)."""
        up = link.upstream
        stan = stan or self._allocate_stan(link)
        if stan in link.pending:
            return "busy"  # that STAN is busy on this link right now: try on the next round
        msg = dict(message)
        key = match_key(mti, stan, tuple(msg.get(str(f), "") for f in up.match_fields))
        held = up.outstanding.get(key)
        if held is not None and held.saf_id != saf_id:
            return "busy"  # another outstanding reversal has this STAN: try on the next round
        msg["t"] = mti
        msg["11"] = stan
        try:
            raw = self._encode(up.dialect, up.mac, msg)
        except IsoGatewayError as exc:
            return f"encode failed: {exc}"
        attempts = getattr(item, "attempts", 0) + 1
        attempt = ReversalAttempt(owner, item, saf_id, mti, stan, attempts, alone)
        up.outstanding.keep(key, OutstandingReversal(owner, saf_id, txn_id, message.get("37", "?"), mti))
        up._outstanding_keys[saf_id] = key
        frame = self._register(link, attempt, raw, key, now + up.reversal_timeout, now)
        self.actions.append((SEND, link, frame))
        self.metrics.upstream_sent(up.name, mti).inc()
        return attempt

    def release_outstanding(self, upstream: UpstreamSide, saf_id: int) -> None:
        """``saf_id`` is no longer outstanding: a 0430/0410 for it from now on is unmatched."""
        key = upstream._outstanding_keys.pop(saf_id, None)
        if key is not None:
            held = upstream.outstanding.get(key)
            if held is not None and held.saf_id == saf_id:
                del upstream.outstanding[key]

    # ------------------------------------------------------------------ MACs and identities

    def _mac_refused(self, side: str, name: str, hop: MacHop, bitmap: int, raw: bytes) -> bool:
        """Whether a message received on a MAC'd hop fails its MAC (counted and logged if so). The MAC
        of the bytes before it, as this hop writes it, must equal what came, byte for byte (hex in
        upper case), compared in constant time."""
        field = hop.field
        # The MAC field is the last one: 128 (its bit is the bitmap's lowest), or 64 with nothing after it.
        if bitmap & 1 or (bitmap & BIT_64 and not bitmap & AFTER_64):
            width = field.width
            try:
                compute = hop.compute if hop.generation == self.security.mac_generation else self._mac_function(hop)
                expected = field.wire(compute(raw[:-width]))
            except Exception as exc:  # noqa: BLE001 - a module that can't compute a MAC is a MAC that does not check
                self._log(ERROR, "%s %s: the MAC could not be checked: %s", side, name, exc)
                why = "error"
            else:
                if compare_digest(expected, raw[-width:]):
                    return False
                why = "bad"
        else:
            why = "missing"
        self.metrics.mac_failures(side, name, why).inc()
        self._log(WARNING, "%s %s: MAC %s; not trusted", "listener" if side == "front" else "upstream", name, why)
        return True

    def _respliced(self, scanner: Scanner, raw: bytes, mode: str, hop: MacHop | None) -> bytes:
        """``raw`` (spliced already) with its MAC field as the next hop wants it (``_mac_mode``)."""
        if mode == _RESIGN or mode == _ADD:
            assert hop is not None
            return self._sign(hop, raw if mode == _RESIGN else scanner.add_last_64(raw))
        if mode == _DROP:
            return scanner.drop_last_64(raw)
        return raw

    def _sign(self, hop: MacHop, out: bytes) -> bytes:
        """``out`` (whose last field is the MAC field) with the MAC of every byte before it."""
        field = hop.field
        body = out[:-field.width]
        compute = hop.compute if hop.generation == self.security.mac_generation else self._mac_function(hop)
        return body + field.wire(compute(body))

    def _mac_function(self, hop: MacHop) -> Callable[[bytes], bytes]:
        """The security module's MAC function for the hop's key, kept on the hop until the module's
        keys change (so the key a switch installs is used from the next message)."""
        security = self.security
        generation = security.mac_generation
        hop.compute = compute = security.mac_function(hop.key, padding=hop.padding)
        hop.generation = generation
        return compute

    def _encode(self, dialect: Dialect, mac: MacHop | None, msg: dict[str, str]) -> bytes:
        """``msg`` encoded for a hop: its MAC field dropped, or set to this hop's MAC."""
        msg.pop("64", None)
        msg.pop("128", None)
        if mac is None or msg.get("t", "")[1:2] == "8":
            return encode(dialect, msg, check_types=False)
        msg[MacField.field_for(msg)] = mac.field.placeholder
        return self._sign(mac, encode(dialect, msg, check_types=False))

    def _client_refused(self, front: FrontRef, clients: ClientTable, mti: str, values: dict[int, str]) -> bool:
        """Whether an identified front end asks outside what it may (counted and logged if so)."""
        identity = getattr(front, "identity", "")
        scope = clients.scopes.get(identity)
        why = "unknown_client" if scope is None else scope.refuses(values)
        if why is None:
            return False
        name = front.side.name
        self.metrics.rejections(name, "not_authorized", clients.code).inc()
        self._log(WARNING, "listener %s: %s from %s refused (%s); answered %s", name, mti, identity or "an unidentified client",
                  why, clients.code)
        return True

    def _log(self, level: int, message: str, *args: Any) -> None:
        self.actions.append((LOG, level, message, args))

    def take_actions(self) -> list[tuple[Any, ...]]:
        """The actions decided so far, in order (the list is handed over and a new one started)."""
        actions, self.actions = self.actions, []
        return actions


def peek_mti(dialect: Dialect, raw: bytes) -> str | None:
    """The MTI at the start of ``raw`` if it reads as one, else None (for answering what does not decode)."""
    try:
        if dialect.mti_encoding == "bcd":
            mti = raw[:2].hex()
        else:
            mti = raw[:4].decode("cp500" if dialect.mti_encoding == "ebcdic" else "ascii")
    except UnicodeDecodeError:
        return None
    return mti if len(mti) == 4 and is_valid_mti(mti) else None


# What happens to a message's MAC field on its way to a hop of its own dialect, by splicing bytes
# rather than decoding and encoding the message: nothing (neither carries a MAC), signed again (the
# MAC is its last field), field 64 added and signed (the message has no MAC and no secondary
# bitmap), field 64 dropped (it is the message's last field and the hop takes no MAC).
_KEEP, _RESIGN, _ADD, _DROP = "keep", "resign", "add", "drop"


def _mac_mode(scanner: Scanner, bitmap: int, mac: MacHop | None) -> str | None:
    """How a message with ``bitmap`` goes on a hop with ``mac`` by splicing, or None (decode it)."""
    if mac is None:
        if not MacField.present(bitmap):
            return _KEEP
        return _DROP if scanner.can_drop_last_64(bitmap) else None
    if MacField.last(bitmap) is not None:
        return _RESIGN
    return _ADD if scanner.can_add_last_64(bitmap) else None
