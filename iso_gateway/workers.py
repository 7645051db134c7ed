"""``iso-gateway run --workers N``: several gateway processes sharing the listening port.

Python runs one core per process, so past one core the gateway scales out:
the supervisor starts N worker processes; each binds the listeners with
SO_REUSEPORT (the kernel spreads new front-end connections among them) and
keeps its own upstream links. What must stay whole across workers stays whole:

- the journal is one SQLite file (WAL serialises the workers' group commits);
  each row carries its worker's number, so each worker sends the reversals
  and recovers the in-doubt transactions it owns, and operator tools see all;
- metrics: workers write prometheus-client's multiprocess files into one
  folder, and the supervisor serves /metrics over all of them (one scrape,
  the whole picture), with /healthz (every worker alive) and /readyz (a ready
  upstream link in some worker, every worker alive);
- signals: SIGTERM/SIGINT and SIGHUP go to every worker; a worker that dies
  is restarted with the same number (its journal rows are recovered then).

Must be entered before prometheus-client is imported in this process.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile

import trio

log = logging.getLogger("iso_gateway.workers")

# A worker that dies is started again after this many seconds (doubling up to 30 s while it keeps dying).
RESTART_DELAY = 1.0


def supervise(config_path: str, workers: int) -> int:
    mp_dir = tempfile.mkdtemp(prefix="iso-gateway-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = mp_dir  # before prometheus-client is imported, here and in workers
    from .config import load_config
    from .core.errors import ConfigError
    from .journal import MAX_WORKERS, SQLiteStore, replay_segments
    from .logs import setup_logging
    from .keys import open_gateway_keys

    config = load_config(config_path)
    setup_logging(config.log.level, config.log.format, config.log.file, config.gateway.name)
    if workers > MAX_WORKERS:
        raise ConfigError("--workers", "", f"at most {MAX_WORKERS} workers")
    if config.journal.enabled:  # the keys once (and an old key migrated), before the workers race to
        keys = open_gateway_keys(config, config_path)
        if config.journal.backend != "postgresql":  # on PostgreSQL each worker is a node of the database
            conn = SQLiteStore.connect(config.journal.path, config.journal.synchronous)
            # What any worker logged before a crash of the whole group (a restarted worker replays its own).
            replay_segments(conn, SQLiteStore(keys.vault), None)
            conn.close()
        keys.module.close()  # each worker opens its own
    try:
        return trio.run(_supervise, config_path, workers, mp_dir)
    finally:
        shutil.rmtree(mp_dir, ignore_errors=True)


async def _supervise(config_path: str, workers: int, mp_dir: str) -> int:
    from prometheus_client import CollectorRegistry, multiprocess

    from .config import load_config
    from .net.http import Limits, start_server

    config = load_config(config_path)
    procs: dict[int, trio.Process] = {}
    stopping = False

    def readiness() -> tuple[bool, str]:
        dead = [i for i in range(workers) if i not in procs or procs[i].returncode is not None]
        if dead:
            return False, f"worker(s) {dead} not running"
        ready = _ready_links(mp_dir)
        if ready <= 0:
            return False, "no upstream link is ready in any worker"
        return True, f"{workers} workers, {int(ready)} upstream connections ready"

    server = None
    if config.metrics.enabled:
        server = start_server(config.metrics.host, config.metrics.port, CollectorRegistry(), readiness,
                              limits=Limits.from_config(config.metrics))
        log.info("observability endpoint on %s for %d workers", server.url, workers)

    async def run_worker(index: int) -> None:
        delay = RESTART_DELAY
        while not stopping:
            proc = await trio.lowlevel.open_process(
                [sys.executable, "-m", "iso_gateway", "run", "--config", config_path, "--worker-index", str(index)],
                stdin=subprocess.DEVNULL)
            procs[index] = proc
            log.info("worker %d started (pid %d)", index, proc.pid)
            code = await proc.wait()
            multiprocess.mark_process_dead(proc.pid, mp_dir)
            if stopping:
                log.info("worker %d stopped (exit %d)", index, code)
                return
            log.error("worker %d (pid %d) exited with %d; restarting it in %.0f s", index, proc.pid, code, delay)
            await trio.sleep(delay)
            delay = min(delay * 2, 30.0)

    try:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async with trio.open_nursery() as nursery:
                for i in range(workers):
                    nursery.start_soon(run_worker, i)

                async def forward() -> None:
                    nonlocal stopping
                    async for signum in signals:
                        for proc in list(procs.values()):
                            if proc.returncode is None:
                                proc.send_signal(signal.SIGHUP if signum == signal.SIGHUP else signal.SIGTERM)
                        if signum != signal.SIGHUP:
                            stopping = True
                            log.info("signal %s: stopping %d workers", signal.Signals(signum).name, workers)
                            return

                nursery.start_soon(forward)
    finally:
        if server is not None:
            server.close()
    return 0 if all(p.returncode == 0 for p in procs.values()) else 1


def _ready_links(mp_dir: str) -> float:
    from prometheus_client import CollectorRegistry, multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=mp_dir)
    total = 0.0
    for family in registry.collect():
        if family.name == "iso_gateway_link_state":
            total += sum(s.value for s in family.samples if s.labels.get("state") == "ready")
        elif family.name == "iso_gateway_link_not_answering":  # ready, but the switch does not answer
            total -= sum(s.value for s in family.samples)
    return total
