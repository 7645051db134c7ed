"""``iso-gateway load``: a raw-socket ISO 8583 load generator for any host, not only this gateway.

Closed loop (each connection keeps ``in_flight`` requests outstanding and sends
the next as soon as an answer comes) or open loop (a fixed rate, latency from
each request's intended send time); a duration or an exact count; a warm-up left
out of the figures; a message mix from ``specs/load/*.toml``; answers matched
by MTI class + DE 41 + DE 11; counts per response code, timeouts, errors and
HdrHistogram latency percentiles, as text or JSON; several processes when one
core is not enough.

    from iso_gateway.load import LoadOptions, run_load
    result = await run_load(LoadOptions(host="127.0.0.1", port=9583, connections=4, count=10_000))
    result.throughput, result.percentile_ms(99), result.codes, result.to_json()

Modules: ``mix`` (mix files, pre-encoded requests; sans-IO), ``report`` (counts,
histograms, text and JSON; sans-IO), ``options``, ``engine`` (one process, trio),
``workers`` (several processes), ``responder`` (an instant target for measuring),
``command`` (the CLI).
"""

from __future__ import annotations

import signal
from functools import partial
from typing import Callable

import trio

from .engine import Engine, LoadError, Progress, pick_seed
from .mix import DEFAULT_MIX, Mix, RequestFactory, load_mix, luhn_check_digit
from .options import LoadOptions, parse_target
from .report import JSON_SCHEMA, LoadResult

__all__ = [
    "DEFAULT_MIX",
    "JSON_SCHEMA",
    "LoadError",
    "LoadOptions",
    "LoadResult",
    "Mix",
    "Progress",
    "RequestFactory",
    "load_mix",
    "luhn_check_digit",
    "parse_target",
    "run_load",
    "run_load_sync",
]


def _check(options: LoadOptions) -> None:
    """Refuse a bad dialect, framing or mix before any process starts (ConfigError)."""
    from ..specfiles import get_dialect
    from ..core.framing import framer_from_config

    get_dialect(options.dialect)
    framer_from_config(options.framing, source="load", where="framing")
    load_mix(options.mix)


async def run_load(options: LoadOptions, *, progress: Callable[[Progress], None] | None = None) -> LoadResult:
    """Run one load and return its measured result (warm-up excluded).

    Waits for the whole run: the load, then the answers still in flight (each
    at most ``options.timeout``). ``progress`` is called about once a second.
    Raises ConfigError for bad options or files, LoadError when the target
    can't be reached at all or a worker process fails. With ``processes`` > 1
    the workers run in other processes, waited for from a thread.
    """
    seed = pick_seed(options.seed)
    if options.processes > 1:
        from .workers import run_processes

        _check(options)
        return await trio.to_thread.run_sync(partial(run_processes, options, seed=seed, progress=progress),
                                             abandon_on_cancel=True)
    engine = Engine(options, seed=seed, progress=progress)
    await engine.prepare()
    return await engine.run()


def run_load_sync(options: LoadOptions, *, progress: Callable[[Progress], None] | None = None,
                  handle_signals: bool = False) -> LoadResult:
    """``run_load`` for callers without a trio loop (the CLI, a benchmark script).

    With ``handle_signals`` (main thread only), a first SIGINT or SIGTERM stops
    sending and waits for the answers in flight, a second stops at once; the
    result is returned either way, with ``aborted`` saying so.
    """
    seed = pick_seed(options.seed)
    if options.processes > 1:
        from .workers import run_processes

        _check(options)
        return run_processes(options, seed=seed, progress=progress, handle_signals=handle_signals)

    async def main() -> LoadResult:
        engine = Engine(options, seed=seed, progress=progress,
                        signals=(signal.SIGINT, signal.SIGTERM) if handle_signals else ())
        await engine.prepare()
        return await engine.run()

    return trio.run(main)
