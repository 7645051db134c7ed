"""The daemon process: configuration, signals, the gateway and its metrics endpoint.

SIGTERM/SIGINT: graceful stop (stop accepting, drain, answer the rest, sign
off, exit 0). SIGHUP: reload routes, rules and limits from the same file; a bad
file is refused with a log line and the running configuration stays.
"""

from __future__ import annotations

import logging
import signal

import trio

from .config import Config, load_config
from .errors import ConfigError
from .gateway import Gateway
from .metrics import Metrics

log = logging.getLogger("iso_gateway.daemon")


def start_metrics_server(config: Config, metrics: Metrics) -> int | None:
    """Serve /metrics from a thread (prometheus-client's own server); returns the port."""
    if not config.metrics.enabled:
        return None
    from prometheus_client import start_http_server

    server, _thread = start_http_server(config.metrics.port, addr=config.metrics.host, registry=metrics.registry)
    port = server.server_address[1]
    log.info("metrics on http://%s:%d/metrics", config.metrics.host, port)
    return port


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
            else:
                log.info("signal %s: shutting down", signal.Signals(signum).name)
                gateway.stop()


async def serve(config: Config, config_path: str | None = None, *, task_status=trio.TASK_STATUS_IGNORED) -> None:  # noqa: ANN001
    """Run a gateway until a stop signal (or ``gateway.stop()``)."""
    gateway = Gateway(config, config_path=config_path)
    gateway.metrics_port = start_metrics_server(config, gateway.metrics)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_signals, gateway, config_path)
        await nursery.start(gateway.run)
        task_status.started(gateway)
        await gateway.wait_stopped()
        nursery.cancel_scope.cancel()
    log.info("gateway stopped")


def run(config_path: str) -> int:
    config = load_config(config_path)
    from .logs import setup_logging

    setup_logging(config.log.level, config.log.format, config.log.file)
    trio.run(serve, config, config_path)
    return 0
