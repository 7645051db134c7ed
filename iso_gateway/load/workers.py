"""Driving more than one core: worker processes, each an ``Engine`` with its own connections.

The parent splits the run (``LoadOptions.split``: connections dealt out, rate
and count in proportion), starts one process per share (spawned, not forked: a
fork would copy a running trio loop), waits until every worker has built its
message pool and opened its connections, then starts them together and
merges their results: counts add up and the latency histograms are merged
from their HdrHistogram encodings. Each worker takes its own block of STANs
and RRNs, so two processes never send the same STAN for a terminal.

Workers report progress (with their interval histogram) through the same
queue; the parent merges it into one line.
"""

from __future__ import annotations

import dataclasses
import gc
import multiprocessing
import os
import queue as queue_module
import signal
import time
from typing import Any, Callable

import trio

from ..core.errors import IsoGatewayError
from .engine import Engine, LoadError, Progress
from .options import LoadOptions
from .report import LoadResult, new_histogram

__all__ = ["run_processes"]

# Seconds the workers may take to start (imports, message pool, connects) before the run fails.
STARTUP_TIMEOUT = 60.0
# Seconds between checks that every worker is still alive while waiting for news.
POLL_INTERVAL = 0.25


def _safe_reason(exc: BaseException) -> str:
    # Our errors and OS errors carry reasons, never message bytes; anything else is named by type only.
    if isinstance(exc, (IsoGatewayError, OSError)):
        return str(exc)
    return f"{type(exc).__name__} (a bug in the load generator)"


def _worker_main(options: LoadOptions, seed: int, index: int, workers: int, queue: Any, go: Any, progress: bool) -> None:
    """A worker process: prepare, report ready, wait for the start, run, report the result.

    A terminal's Ctrl-C reaches every process of the group; the parent alone
    decides, and passes each interrupt on as SIGTERM (see ``run_processes``).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def report(p: Progress) -> None:
        queue.put(("progress", index, dataclasses.asdict(p)))

    async def main() -> None:
        engine = Engine(options, seed=seed, worker=index, workers=workers,
                        progress=report if progress else None, encode_interval=True, signals=(signal.SIGTERM,))
        await engine.prepare()
        gc.collect()
        gc.freeze()  # full collections over the start-up objects (~10 ms each) stay out of the timings
        queue.put(("ready", index, None))
        await trio.to_thread.run_sync(go.wait)
        result = await engine.run()
        queue.put(("result", index, result.to_wire()))

    try:
        trio.run(main)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which fails the run
        queue.put(("error", index, _safe_reason(exc)))


def _merge_progress(snaps: list[dict[str, Any]]) -> Progress:
    interval = new_histogram()
    for s in snaps:
        if s.get("interval"):
            interval.decode_and_add(s["interval"].encode("ascii"))
    n = interval.get_total_count()
    return Progress(
        elapsed=max(s["elapsed"] for s in snaps),
        phase=snaps[0]["phase"],
        sent=sum(s["sent"] for s in snaps),
        answered=sum(s["answered"] for s in snaps),
        timeouts=sum(s["timeouts"] for s in snaps),
        errors=sum(s["errors"] for s in snaps),
        rate=sum(s["rate"] for s in snaps),
        p99_ms=interval.get_value_at_percentile(99.0) / 1000.0 if n else None,
        in_flight=sum(s["in_flight"] for s in snaps),
    )


def run_processes(options: LoadOptions, *, seed: int, progress: Callable[[Progress], None] | None = None,
                  handle_signals: bool = False) -> LoadResult:
    """Run ``options`` over ``options.processes`` worker processes; blocks until they are done.

    With ``handle_signals`` (main thread only): SIGINT before the start stops
    everything (KeyboardInterrupt); after it, each SIGINT is passed to the
    workers as SIGTERM (first: stop sending and drain; second: stop now) and
    their results are still merged; a third gives up on them.
    """
    parts = options.split()
    n = len(parts)
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    go = ctx.Event()
    procs = [
        ctx.Process(target=_worker_main, args=(parts[i], seed, i, n, queue, go, progress is not None),
                    name=f"iso-gateway-load-{i}", daemon=True)
        for i in range(n)
    ]
    for p in procs:
        p.start()
    results: dict[int, LoadResult] = {}
    latest: dict[int, dict[str, Any]] = {}
    interrupts = [0, 0]  # received, passed on
    started = False

    def on_interrupt(_signum: int, _frame: object) -> None:
        interrupts[0] += 1

    previous = signal.signal(signal.SIGINT, on_interrupt) if handle_signals else None

    def check_interrupts() -> None:
        if interrupts[0] and (not started or interrupts[0] > 2):
            raise KeyboardInterrupt
        while interrupts[1] < interrupts[0]:
            interrupts[1] += 1
            for i, p in enumerate(procs):
                if i not in results and p.pid is not None and p.is_alive():
                    os.kill(p.pid, signal.SIGTERM)

    def next_message(deadline: float | None) -> tuple[str, int, Any]:
        while True:
            check_interrupts()
            try:
                return queue.get(timeout=POLL_INTERVAL)
            except queue_module.Empty:
                pass
            for i, p in enumerate(procs):
                if i not in results and p.exitcode not in (None, 0):
                    raise LoadError(f"worker process {i} died (exit code {p.exitcode})")
            if deadline is not None and time.monotonic() > deadline:
                raise LoadError(f"the worker processes did not start within {STARTUP_TIMEOUT:g} s")

    try:
        ready = 0
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while ready < n:
            kind, i, payload = next_message(deadline)
            if kind == "error":
                raise LoadError(f"worker process {i}: {payload}")
            if kind == "ready":
                ready += 1
        go.set()
        started = True
        while len(results) < n:
            kind, i, payload = next_message(None)
            if kind == "error":
                raise LoadError(f"worker process {i}: {payload}")
            if kind == "result":
                results[i] = LoadResult.from_wire(payload)
            elif kind == "progress" and progress is not None:
                latest[i] = payload
                if len(latest) == n:
                    progress(_merge_progress(list(latest.values())))
                    latest.clear()
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
        # Done: the workers exit on their own. Failed or interrupted: stop them now, not start them.
        for p in procs:
            if len(results) == n:
                p.join(timeout=10.0)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5.0)
        queue.close()
    return LoadResult.merge([results[i] for i in range(n)])
