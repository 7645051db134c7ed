"""The daemon process: configuration, signals, the gateway and its observability endpoint.

SIGTERM/SIGINT: graceful stop (stop accepting, drain, answer the rest, sign
off, exit 0). SIGHUP: reload routes, rules and limits from the same file, read
every TLS certificate, key and CA file again (new connections get them, established
ones keep theirs; a TLS file that does not load keeps the old one, with a log line)
and the security module's keys (a data key rotated by ``iso-gateway keys``); a bad
configuration file is refused with a log line and the running configuration stays.
"""

from __future__ import annotations

import gc
import logging
import os
import resource
import signal
from functools import partial

import trio

from .config import Config, load_config
from .core.errors import ConfigError
from .gateway import Gateway
from .net.http import Limits, ObservabilityServer, start_server
from .metrics import Metrics

log = logging.getLogger("iso_gateway.daemon")


def start_endpoint(config: Config, metrics: Metrics, gateway: Gateway | None = None,
                   source: str = "config") -> ObservabilityServer | None:
    """Serve /metrics, /healthz and /readyz from a thread of their own (see ``http``), or None when disabled.

    Call inside ``trio.run``. An address that can't be bound is a ConfigError naming ``metrics.port``.
    """
    if not config.metrics.enabled:
        return None
    host, port = config.metrics.host, config.metrics.port
    try:
        server = start_server(host, port, metrics.registry, gateway.readiness if gateway is not None else None,
                              before_scrape=metrics.flush, limits=Limits.from_config(config.metrics))
    except OSError as exc:
        raise ConfigError(source, "metrics.port", f"can't serve on {host}:{port}: {exc.strerror or exc}") from None
    log.info("observability endpoint on %s: /metrics, /healthz, /readyz", server.url)
    return server


def start_metrics_server(config: Config, metrics: Metrics, gateway: Gateway | None = None) -> int | None:
    """``start_endpoint`` for the life of the process; returns the port (None when disabled)."""
    server = start_endpoint(config, metrics, gateway)
    return server.port if server is not None else None


async def _signals(gateway: Gateway, config_path: str | None) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            if signum == signal.SIGHUP:
                if config_path is None:
                    continue
                try:
                    gateway.reload(load_config(config_path))
                except ConfigError as exc:
                    log.error("reload refused, the running configuration stays: %s", exc)
                if gateway.keys is not None:  # a data key rotated or a key loaded by another process
                    gateway.keys.reload()
            else:
                log.info("signal %s: shutting down", signal.Signals(signum).name)
                gateway.stop()


async def serve(config: Config, config_path: str | None = None, *, worker: int | None = None,
                task_status: trio.TaskStatus[Gateway] = trio.TASK_STATUS_IGNORED) -> None:
    """Run a gateway until a stop signal (or ``gateway.stop()``)."""
    gateway = Gateway(config, config_path=config_path, worker=worker)
    # A worker's metrics go to the shared multiprocess folder; the supervisor serves them.
    endpoint = start_endpoint(config, gateway.metrics, gateway, config_path or "config") if worker is None else None
    gateway.metrics_port = endpoint.port if endpoint is not None else None
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_signals, gateway, config_path)
            await nursery.start(gateway.run)
            # Everything built at start (dialects, rules, routes, tables) lives as long as the
            # process: keep it out of every future garbage collection, whose pauses would
            # otherwise grow with it (a full collection walks every tracked object).
            gc.freeze()
            task_status.started(gateway)
            await gateway.wait_stopped()
            nursery.cancel_scope.cancel()
    finally:
        if endpoint is not None:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(endpoint.close)
    log.info("gateway stopped")


# Descriptors beyond the configured connections: the journal (database, WAL, shared memory,
# log segment), the event loop's own (epoll, wake-up pipes), log files, the indexer's pipes.
FD_SPARE = 64


def fd_budget(config: Config) -> int:
    """File descriptors the configuration can hold open at once: every listener's connections,
    the upstream links (and one spare each for a reversal sent alone), the endpoint's connections."""
    need = FD_SPARE + sum(lc.max_connections + 1 for lc in config.listeners)
    need += sum(2 * up.connections for up in config.upstreams)
    if config.metrics.enabled:
        need += config.metrics.max_connections + 1
    return need


def raise_fd_limit(need: int) -> tuple[int, int]:
    """Raise this process's soft RLIMIT_NOFILE to ``need`` (up to the hard limit): a login
    shell or a service manager often starts a process at 1,024, fewer than the default
    listener alone may accept. Returns (soft limit now, hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = need if hard == resource.RLIM_INFINITY else min(need, hard)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError):
            pass
    return soft, hard


def run(config_path: str, worker: int | None = None) -> int:
    """Run the daemon in this process; ``worker`` is set for one of ``--workers`` (see workers.py)."""
    from . import __version__
    from .logs import setup_logging

    os.umask(0o077)  # before anything is created: owner only (see cli.PRIVATE_UMASK)
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        setup_logging()  # the file's own [log] settings are unknown: text on stderr
        log.error("configuration refused, not starting: %s", exc)
        return 2
    node = config.gateway.name if worker is None else f"{config.gateway.name}/w{worker}"
    setup_logging(config.log.level, config.log.format, config.log.file, node=node)
    log.info("iso-gateway %s starting (pid %d); configuration %s loaded: %d listeners, %d upstreams, %d routes",
             __version__, os.getpid(), config_path, len(config.listeners), len(config.upstreams), len(config.routes))
    need = fd_budget(config)
    soft, _hard = raise_fd_limit(need)
    if soft != resource.RLIM_INFINITY and soft < need:
        # Past the limit, accept() fails: new front ends wait and are counted, nothing else breaks.
        log.warning("open-file limit %d is below the %d the configured connections may need; raise LimitNOFILE "
                    "(systemd) or ulimit -n", soft, need)
    try:
        trio.run(partial(serve, config, config_path, worker=worker))
    except ConfigError as exc:  # what the file names (dialects, rules, the endpoint's address) is unusable
        log.error("configuration refused, not starting: %s", exc)
        return 2
    return 0
