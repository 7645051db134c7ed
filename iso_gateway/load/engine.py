"""The load engine of one process: connections, the send schedule, matching, timeouts.

The trio shell around ``RequestFactory`` (requests) and ``Tally`` (counts).
There is no task per request. Each connection has one task that reads: it
matches every answer in a received chunk with the scanner (MTI, 11, 39, 41,
no full decode), records its latency, and in closed loop refills the window
with new requests at once; all frames queued by a chunk go out in one
``send_all`` (``FrameWriter``). One sweeper task per process expires timeouts
(a connection's requests wait in insertion order, so only the oldest are ever
looked at). In open loop one sender task keeps the schedule (in ticks of at
most ``SEND_TICK``): request k is due at ``start + k / rate``, and its latency
is measured from then, not from when it could be sent, so a stalled target
can't hide its stall by slowing the generator down (coordinated omission);
requests over the in-flight cap wait for room, and readers send them as
answers free it.

With ``tls`` each connection does a TLS handshake (trio's ``SSLStream``) after its TCP connect,
within the connect timeout; a failed one counts as a failed connect.

It must never put a PAN in an error or a log line: errors carry reasons only.
"""

from __future__ import annotations

import math
import random
import ssl
import time
from dataclasses import dataclass
from typing import Callable, cast

import trio

from ..specfiles import get_dialect
from ..core.errors import FrameError, IsoGatewayError, MessageError
from ..core.framing import FrameDecoder, framer_from_config
from ..core.message import build_response, decode, encode, match_class
from ..core.scanner import Scanner
from ..security.mac import mac_key
from ..sim.client import DEFAULT_TPDU
from ..sim.tlsctx import TlsHandshakeFailed, client_context, handshake
from ..net.writer import FrameWriter
from .mix import RequestFactory, load_mix
from .options import LoadOptions
from .report import LATENCY_MAX_US, LoadResult, Tally, new_histogram

__all__ = ["Engine", "LoadError", "Progress", "RECEIVE_SIZE"]

# Bytes asked of the socket per read: hundreds of answers (trio's own default).
RECEIVE_SIZE = 65536
# Reconnect delays after a failed connect or a lost connection, doubling (jPOS's
# channel default is a flat 10 s; a load run wants its connections back sooner).
RECONNECT_INITIAL = 0.1
RECONNECT_MAX = 2.0
# The run gives up when no connection has been open for this long.
ABORT_AFTER = 10.0
# Longest pause between two timeout sweeps, in seconds; a sweep also runs 4 times per timeout.
SWEEP_INTERVAL = 0.05
# Open loop: requests due within this many seconds of each other go out in one
# write. Sending each on its own time costs a wake-up and a send_all per request
# (about 40 µs of CPU at 20,000/s here); 200 µs ticks cost 17 µs. Under
# 5,000 requests/s requests are further apart than a tick and nothing changes.
# The wait (at most one tick) is reported as send lag and counts in latency.
SEND_TICK = 0.0002
# Seconds between two progress reports.
PROGRESS_INTERVAL = 1.0


class LoadError(IsoGatewayError):
    """The run could not start or go on (no connection to the target, a worker failed)."""


@dataclass(slots=True)
class Progress:
    """A live snapshot, about once a second; counts include the warm-up."""

    elapsed: float  # seconds since the load started
    phase: str  # "warm-up", "load", "drain" (sending done, waiting for the last answers)
    sent: int
    answered: int
    timeouts: int
    errors: int
    rate: float  # answers/s over the last interval
    p99_ms: float | None  # p99 latency of the answers of the last interval
    in_flight: int
    interval: str | None = None  # the interval's encoded histogram (worker processes only)


class _Conn:
    __slots__ = ("index", "stream", "writer", "decoder", "pending", "scope")

    def __init__(self, index: int) -> None:
        self.index = index
        self.stream: trio.SocketStream | None = None
        self.writer: FrameWriter | None = None
        self.decoder: FrameDecoder | None = None
        # (MTI class, DE 41, DE 11) -> (intended send time, actual send time), in send order.
        self.pending: dict[tuple[str, str, str], tuple[float, float]] = {}
        self.scope: trio.CancelScope | None = None


class Engine:
    """One process's share of a run: ``await prepare()`` (connects), then ``await run()``."""

    def __init__(
        self,
        options: LoadOptions,
        *,
        seed: int,
        worker: int = 0,
        workers: int = 1,
        progress: Callable[[Progress], None] | None = None,
        encode_interval: bool = False,
        signals: tuple[int, ...] = (),
    ) -> None:
        self.options = options
        self.seed = seed
        self.dialect = get_dialect(options.dialect)
        framing: dict[str, object] = {}
        if options.length_includes_header:
            framing["length_includes_header"] = True
        if options.tpdu:
            framing["tpdu"] = True
        self.framer = framer_from_config(options.framing, source="load", where="framing", **framing)
        self.header = DEFAULT_TPDU if options.tpdu else b""
        mix, source = load_mix(options.mix)
        self.factory = RequestFactory(
            mix, self.dialect, self.framer, seed=f"{seed}/{worker}", worker=worker, workers=workers,
            source=source, header=self.header,
            mac=mac_key(options.mac_algorithm, options.mac_key) if options.mac_key is not None else None,
        )
        self.scanner = Scanner(self.dialect, (11, 39, 41))
        self.tls: ssl.SSLContext | None = None
        if options.tls:
            self.tls = client_context(ca=options.tls_ca, server_name=options.tls_server_name,
                                      cert_chain=options.tls_cert, key=options.tls_key, insecure=not options.tls_ca)
        self.window = options.window
        self.timeout = options.timeout
        self._progress = progress
        self._encode_interval = encode_interval
        self._signals = signals
        self._classes: dict[str, str] = {}  # response MTI -> match class
        self.conns = [_Conn(i) for i in range(options.connections)]
        self.warm = Tally()
        self.measured = Tally()
        self.interval = new_histogram()  # answers since the last progress report
        self.send_lag = new_histogram() if options.open_loop else None
        self.outstanding = 0  # requests sent and not yet answered, timed out or lost
        self.alive = 0  # connections open
        self.stop_sending = False
        self.aborted: str | None = None
        self.done = trio.Event()
        self._touched: list[_Conn] = []  # connections with frames queued but not flushed
        # The clock: set when the load starts.
        self.t0 = math.inf
        self.measure_start = math.inf
        self.end_time = math.inf
        self.finished = math.inf
        self.cpu_s = 0.0
        # Closed loop with a count: measured requests still to send.
        self.remaining = options.count
        # Open loop: the schedule's length and the next request index to send.
        self.total = 0
        self.next_k = 0
        self.held = False  # requests due but waiting for room on a connection
        self._rr = 0

    # ------------------------------------------------------------------ connecting

    async def _open(self) -> trio.SocketStream:
        opts = self.options
        with trio.move_on_after(opts.connect_timeout):
            stream = await trio.open_tcp_stream(opts.host, opts.port)
            if self.tls is None:
                return stream
            try:
                tls = await handshake(stream, self.tls, server_side=False, server_hostname=opts.tls_server_name,
                                      timeout=opts.connect_timeout)
            except TlsHandshakeFailed as exc:
                raise OSError(str(exc)) from None
            return cast(trio.SocketStream, tls)  # used through the Stream methods only
        raise OSError(f"connect took over {opts.connect_timeout:g} s")

    async def prepare(self) -> None:
        """Open every connection; raise LoadError when none opens."""
        failures: list[str] = []

        async def one(conn: _Conn) -> None:
            try:
                conn.stream = await self._open()
            except OSError as exc:
                self.measured.errors["connect_failed"] += 1  # before the load, but the tester must see it
                failures.append(exc.strerror or str(exc))

        async with trio.open_nursery() as nursery:
            for conn in self.conns:
                nursery.start_soon(one, conn)
        if failures and len(failures) == len(self.conns):
            raise LoadError(f"can't connect to {self.options.target}: {failures[0]}")

    # ------------------------------------------------------------------ running

    async def run(self) -> LoadResult:
        """Run the load to its end (duration, count, or abort) and drain; return the measured result."""
        opts = self.options
        cpu0 = time.process_time()
        self.t0 = trio.current_time()
        self.measure_start = self.t0 + opts.warmup
        duration = opts.measured_duration
        if opts.open_loop:
            rate = opts.rate
            assert rate is not None
            warm_n = math.ceil(opts.warmup * rate)
            self.total = warm_n + (opts.count if duration is None else math.ceil(duration * rate))  # type: ignore[operator]  # count when no duration
        elif duration is not None:
            self.end_time = self.measure_start + duration
        async with trio.open_nursery() as nursery:
            for conn in self.conns:
                nursery.start_soon(self._connection, conn)
            nursery.start_soon(self._sweeper)
            if opts.open_loop:
                nursery.start_soon(self._sender)
            if self._progress is not None:
                nursery.start_soon(self._progress_loop)
            if self._signals:
                nursery.start_soon(self._interrupts)
            await self.done.wait()
            nursery.cancel_scope.cancel()
        self.finished = trio.current_time()
        self.cpu_s = time.process_time() - cpu0
        return self.result()

    def result(self) -> LoadResult:
        opts = self.options
        m = self.measured
        end = m.last_answer if m.last_answer is not None else self.finished
        return LoadResult(
            target=opts.target, dialect=self.dialect.name, framing=self.framer.name, mix=opts.mix,
            mode="open" if opts.open_loop else "closed", rate=opts.rate,
            connections=opts.connections, in_flight=self.window, processes=1,
            warmup_s=opts.warmup, timeout_s=opts.timeout, seed=self.seed,
            sent=m.sent, answered=m.answered, timeouts=m.timeouts,
            codes=dict(m.codes), errors=dict(m.errors), latency=m.latency,
            window_s=max(0.0, end - self.measure_start) if end != math.inf else 0.0,
            elapsed_s=self.finished - self.t0 if self.finished != math.inf else 0.0,
            send_lag=self.send_lag, aborted=self.aborted, cpu_s=self.cpu_s,
        )

    def _stop(self) -> None:
        self.stop_sending = True
        if self.outstanding == 0:
            self.done.set()

    def _tally(self, intended: float) -> Tally:
        return self.measured if intended >= self.measure_start else self.warm

    # ------------------------------------------------------------------ a connection

    async def _connection(self, conn: _Conn) -> None:
        """Keep one connection open (reconnecting) and read it, until the run is done."""
        delay = RECONNECT_INITIAL
        while True:
            if conn.stream is None:
                if self.stop_sending:
                    return
                try:
                    conn.stream = await self._open()
                except OSError:
                    self._tally(trio.current_time()).errors["connect_failed"] += 1
                    await trio.sleep(delay)
                    delay = min(delay * 2, RECONNECT_MAX)
                    continue
            delay = RECONNECT_INITIAL
            stream = conn.stream
            ended = False  # by the peer or a failure (not by the end of the run)
            conn.writer = writer = FrameWriter(stream, send_timeout=self.timeout)
            conn.decoder = self.framer.decoder()
            conn.scope = scope = trio.CancelScope()
            writer.on_broken = lambda _reason, scope=scope: scope.cancel()  # this connection's scope, not a later one's
            self.alive += 1
            try:
                with scope:
                    self._refill(conn, trio.current_time(), time.time())
                    await self._flush()
                    await self._read(conn)
                ended = True
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                ended = True
            finally:
                self.alive -= 1
                conn.stream = None
                conn.writer = None
                self._lose(conn)
                with trio.CancelScope(shield=True):
                    await trio.aclose_forcefully(stream)
            if ended:
                self._tally(trio.current_time()).errors["disconnects"] += 1

    async def _read(self, conn: _Conn) -> None:
        """Read and match answers until the peer closes or the framing is lost."""
        stream = conn.stream
        decoder = conn.decoder
        pending = conn.pending
        assert stream is not None and decoder is not None
        scan = self.scanner.scan
        classes = self._classes
        interval = self.interval
        open_loop = self.options.open_loop
        while True:
            data = await stream.receive_some(RECEIVE_SIZE)
            if not data:
                return
            now = trio.current_time()
            try:
                frames = decoder.feed(data)
            except FrameError:
                self._tally(now).errors["frame_errors"] += 1
                return
            measure_start = self.measure_start
            resolved = 0
            for frame in frames:
                raw = frame.message
                if not raw:
                    continue  # a keep-alive
                try:
                    s = scan(raw)
                except MessageError:
                    self._tally(now).errors["undecodable"] += 1
                    continue
                mti = s.mti
                cls = classes.get(mti)
                if cls is None:
                    if mti[2] in "024":  # a request from the target (its echo test)
                        self._answer_request(conn, frame.header, raw)
                        continue
                    cls = classes[mti] = match_class(mti)
                values = s.values
                entry = pending.pop((cls, values.get(41, ""), values.get(11, "")), None)
                if entry is None:
                    self._tally(now).errors["unmatched"] += 1
                    continue
                resolved += 1
                intended = entry[0]
                tally = self.measured if intended >= measure_start else self.warm
                tally.answered += 1
                code = values.get(39, "none")
                codes = tally.codes
                codes[code] = codes.get(code, 0) + 1
                us = int((now - intended) * 1e6)
                if us > LATENCY_MAX_US:
                    us = LATENCY_MAX_US
                tally.latency.record_value(us)
                interval.record_value(us)
                tally.last_answer = now
            if resolved:
                self.outstanding -= resolved
                if self.stop_sending and self.outstanding == 0:
                    self.done.set()  # the run's nursery closes this connection
            if open_loop:
                if self.held:
                    self._pump(now, time.time())
            else:
                self._refill(conn, now, time.time())
            await self._flush()

    def _answer_request(self, conn: _Conn, header: bytes, raw: bytes) -> None:
        """Answer a network management request (0800 echo) from the target; ignore other requests."""
        try:
            msg = decode(self.dialect, raw)
        except MessageError:
            return
        if msg["t"][1] != "8" or conn.writer is None:
            return
        reply = build_response(self.dialect, msg, "00", extra={k: msg[k] for k in ("7", "11", "70") if k in msg})
        reply_header = self.framer.reply_header(header) if header else self.header
        try:
            conn.writer.enqueue(self.framer.encode(encode(self.dialect, reply), reply_header))
        except (MessageError, FrameError, ValueError):
            return
        if conn not in self._touched:
            self._touched.append(conn)

    def _lose(self, conn: _Conn) -> None:
        """The connection is gone: what it had in flight will never be answered."""
        pending = conn.pending
        if pending:
            for intended, _ in pending.values():
                self._tally(intended).errors["lost"] += 1
            self.outstanding -= len(pending)
            pending.clear()
            if self.stop_sending and self.outstanding == 0:
                self.done.set()

    # ------------------------------------------------------------------ sending

    def _send(self, conn: _Conn, n: int, intended: float, now: float, wall: float) -> None:
        """Queue ``n`` new requests on ``conn``, all due at ``intended``."""
        pending = conn.pending
        enqueue = conn.writer.enqueue  # type: ignore[union-attr]
        make = self.factory.next
        entry = (intended, now)
        for _ in range(n):
            frame, key = make(wall)
            if key in pending:  # its STAN came round again while still in flight
                old = pending.pop(key)
                self._tally(old[0]).errors["lost"] += 1
                self.outstanding -= 1
            pending[key] = entry
            enqueue(frame)
        self._tally(intended).sent += n
        self.outstanding += n
        if conn not in self._touched:
            self._touched.append(conn)

    def _refill(self, conn: _Conn, now: float, wall: float) -> None:
        """Closed loop: top the connection's window up. Open loop: send what is due."""
        if self.options.open_loop:
            self._pump(now, wall)
            return
        if self.stop_sending or conn.writer is None:
            return
        if now >= self.end_time:
            self._stop()
            return
        room = self.window - len(conn.pending)
        if room <= 0:
            return
        if now >= self.measure_start and self.remaining is not None:
            room = min(room, self.remaining)
            self.remaining -= room
            self._send(conn, room, now, now, wall)
            if self.remaining == 0:
                self._stop()
            return
        self._send(conn, room, now, now, wall)

    def _pump(self, now: float, wall: float) -> None:
        """Open loop: send every request whose time has come, where a connection has room.

        Sets ``held`` when requests are due but every connection is full, so
        that readers send them as answers free room (and only then: otherwise
        the sender's own cadence batches the schedule into few writes).
        """
        if self.stop_sending:
            return
        rate = self.options.rate
        assert rate is not None
        t0 = self.t0
        due = min(self.total, int((now - t0) * rate) + 1)
        k = self.next_k
        if k >= due:
            self.held = False
            return
        conns = self.conns
        n = len(conns)
        window = self.window
        lag = self.send_lag
        measure_start = self.measure_start
        make = self.factory.next
        for step in range(n):
            conn = conns[(self._rr + step) % n]
            if conn.writer is None:
                continue
            m = min(window - len(conn.pending), due - k)
            if m <= 0:
                continue
            # Requests due at different times each keep their own intended time.
            pending = conn.pending
            enqueue = conn.writer.enqueue
            measured = 0
            for kk in range(k, k + m):
                intended = t0 + kk / rate
                frame, key = make(wall)
                if key in pending:  # its STAN came round again while still in flight
                    old = pending.pop(key)
                    self._tally(old[0]).errors["lost"] += 1
                    self.outstanding -= 1
                pending[key] = (intended, now)
                enqueue(frame)
                if intended >= measure_start:
                    measured += 1
                    if lag is not None:
                        us = int((now - intended) * 1e6)
                        lag.record_value(us if us < LATENCY_MAX_US else LATENCY_MAX_US)
            self.measured.sent += measured
            self.warm.sent += m - measured
            self.outstanding += m
            if conn not in self._touched:
                self._touched.append(conn)
            k += m
            if k >= due:
                self._rr = (self._rr + step + 1) % n
                break
        self.next_k = k
        self.held = k < due
        if k >= self.total:
            self._stop()

    async def _flush(self) -> None:
        touched = self._touched
        while touched:
            conn = touched.pop()
            if conn.writer is not None:
                await conn.writer.flush()

    async def _sender(self) -> None:
        """Open loop: wake when the next request is due and send what is due."""
        rate = self.options.rate
        assert rate is not None
        while not self.stop_sending:
            now = trio.current_time()
            self._pump(now, time.time())
            await self._flush()
            if self.stop_sending:
                return
            due = min(self.total, int((now - self.t0) * rate) + 1)
            await trio.sleep_until(max(self.t0 + due / rate, now + SEND_TICK))

    # ------------------------------------------------------------------ timeouts

    async def _sweeper(self) -> None:
        """Expire requests past their timeout; stop a duration run; give up without connections."""
        tick = min(SWEEP_INTERVAL, self.timeout / 4)
        dead_since: float | None = None
        while True:
            await trio.sleep(tick)
            now = trio.current_time()
            wall = time.time()
            if not self.options.open_loop and now >= self.end_time and not self.stop_sending:
                self._stop()
            deadline = now - self.timeout
            for conn in self.conns:
                pending = conn.pending
                expired = []
                for key, (_intended, sent) in pending.items():
                    if sent > deadline:
                        break
                    expired.append(key)
                for key in expired:
                    intended, _ = pending.pop(key)
                    self._tally(intended).timeouts += 1
                if expired:
                    self.outstanding -= len(expired)
                    self._refill(conn, now, wall)
            await self._flush()
            if self.alive:
                dead_since = None
            elif not self.stop_sending:
                if dead_since is None:
                    dead_since = now
                elif now - dead_since >= ABORT_AFTER:
                    self.aborted = f"no connection to {self.options.target} for {ABORT_AFTER:g} s"
                    self._stop()
            if self.stop_sending and self.outstanding == 0:
                self.done.set()
                return

    async def _interrupts(self) -> None:
        """First signal: stop sending and wait for the answers in flight. Second: stop now."""
        with trio.open_signal_receiver(*self._signals) as received:
            async for _ in received:
                if not self.stop_sending:
                    self.aborted = "interrupted"
                    self._stop()
                else:
                    self.aborted = f"interrupted; {self.outstanding} requests in flight abandoned"
                    self.done.set()

    # ------------------------------------------------------------------ progress

    def snapshot(self) -> Progress:
        now = trio.current_time()
        w, m = self.warm, self.measured
        iv = self.interval
        n = iv.get_total_count()
        phase = "drain" if self.stop_sending else ("warm-up" if now < self.measure_start else "load")
        return Progress(
            elapsed=now - self.t0, phase=phase, sent=w.sent + m.sent, answered=w.answered + m.answered,
            timeouts=w.timeouts + m.timeouts, errors=w.error_count + m.error_count,
            rate=0.0, p99_ms=iv.get_value_at_percentile(99.0) / 1000.0 if n else None,
            in_flight=self.outstanding,
            interval=iv.encode().decode("ascii") if self._encode_interval else None,
        )

    async def _progress_loop(self) -> None:
        assert self._progress is not None
        last = self.t0
        while True:
            await trio.sleep(PROGRESS_INTERVAL)
            now = trio.current_time()
            snap = self.snapshot()
            snap.rate = self.interval.get_total_count() / (now - last) if now > last else 0.0
            last = now
            self.interval.reset()
            self._progress(snap)


def pick_seed(seed: int | None) -> int:
    return seed if seed is not None else random.randrange(1, 2**31)
