"""Shared harness: a switch simulator and a gateway on 127.0.0.1, free ports, bounded waits.

Time: a test that takes pytest-trio's ``autojump_clock`` runs on virtual time (the clock jumps to
the next deadline whenever every task waits; sockets on 127.0.0.1 still work, since the kernel has
the bytes before the jump is considered). Use it for timeouts, echoes, backoff and the simulator's
delays whenever nothing the test waits for runs on a thread or in a process: the journal's thread
(reversals stored before a 91, SAF reads, ``journal.call``), its indexer process or a daemon
process would look idle to the clock, which would then jump past their work. Those tests, and the
SAF schedule (due times on ``time.time()``), stay on real time and wait for conditions
(``wait_for``), never for a fixed pause that a loaded machine may outlast.
"""

from __future__ import annotations

import copy
import logging
import os
import resource
import tempfile
from pathlib import Path
from typing import Any, Callable

import pytest
import tomli_w
import trio

from iso_gateway.config import Config

# The development KEK ([security] kek_file empty: $XDG_CONFIG_HOME/iso-gateway/kek.hex) of every
# gateway and daemon the tests start lives in a folder of this test run, never in the user's home.
os.environ["XDG_CONFIG_HOME"] = tempfile.mkdtemp(prefix="iso-gateway-tests-config-")
from iso_gateway.gateway import Gateway
from iso_gateway.metrics import Metrics
from iso_gateway.sim.client import FrontEndClient, sample_auth
from iso_gateway.sim.switch import SwitchSimulator

# Tests open up to ~2,000 sockets in one process.
_soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
if _soft < _hard:
    resource.setrlimit(resource.RLIMIT_NOFILE, (_hard, _hard))

TEST_PAN = "4761739001010119"
OTHER_PANS = ("5413330089020011", "4000056655665556")
# Every card number a test sends, Luhn-failing ones included (masking only recognises
# Luhn-valid runs, so those must never be logged at all): none may reach a log line.
ALL_TEST_PANS = (TEST_PAN, *OTHER_PANS, TEST_PAN[:-1] + "8", "9999990000000006")
# Log files of daemon processes started by tests; the session's log check greps them too.
DAEMON_LOG_FILES: list[Path] = []


def pans_in(text: str) -> list[str]:
    """The test PANs (or their first 15 digits) that appear in ``text``."""
    return [pan for pan in ALL_TEST_PANS if pan in text or pan[:-1] in text]


@pytest.fixture(scope="session", autouse=True)
def no_test_pan_in_anything_the_daemon_logged(tmp_path_factory):
    """Log every gateway record of the session as the daemon would (text and JSON lines, at INFO) and grep it.

    In-process gateways log through the same formatters as ``iso-gateway run``;
    daemon processes add their log files to ``DAEMON_LOG_FILES``. A test PAN in
    any of them fails the session (an error at teardown of the last test).
    """
    from iso_gateway.logs import JsonFormatter, MaskingFormatter, TEXT_FORMAT

    folder = tmp_path_factory.mktemp("gateway-logs")
    logger = logging.getLogger("iso_gateway")
    handlers: list[logging.Handler] = []
    for name, formatter in (("text.log", MaskingFormatter(TEXT_FORMAT)), ("json.log", JsonFormatter("test"))):
        handler = logging.FileHandler(folder / name, encoding="utf-8")
        handler.setFormatter(formatter)
        handler.setLevel(logging.INFO)
        logger.addHandler(handler)
        handlers.append(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    yield folder
    logger.setLevel(level)
    for handler in handlers:
        logger.removeHandler(handler)
        handler.close()
    leaks = []
    for path in [folder / "text.log", folder / "json.log", *DAEMON_LOG_FILES]:
        if path.is_file():
            for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
                if pans_in(line):
                    leaks.append(f"{path}:{n}: {pans_in(line)}")
    assert not leaks, "test PANs in clear in the gateway's logs:\n" + "\n".join(leaks[:20])


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def config_dict(switch_port: int, *, listener: dict | None = None, upstream: dict | None = None,
                routes: list[dict] | None = None, state_dir: Path | None = None, **top: Any) -> dict[str, Any]:
    """The raw configuration of a gateway under test (as a TOML file would give it), not validated.

    ``listener`` and ``upstream`` are merged into the one listener and the one upstream; other
    keyword arguments are merged into the top-level sections (``gateway={...}``, ``journal={...}``).
    """
    state = state_dir or Path(tempfile.mkdtemp(prefix="iso-gw-test-"))
    raw: dict[str, Any] = {
        "gateway": {"drain_timeout": 2.0},
        "journal": {"path": str(state / "journal.sqlite3"), "key_file": str(state / "pan.key")},
        "metrics": {"enabled": False},
        "listeners": [merge({"name": "ecom", "host": "127.0.0.1", "port": 0}, listener or {})],
        "upstreams": [merge({"name": "cmi", "hosts": [f"127.0.0.1:{switch_port}"], "connections": 1,
                             "sign_on": True, "echo_interval": 0, "reconnect_initial": 0.05,
                             "reconnect_max": 0.2, "connect_timeout": 1.0}, upstream or {})],
        "routes": routes or [{"name": "all", "upstream": "cmi", "timeout": 1.0}],
    }
    return merge(raw, top)


def make_config(switch_port: int, **options: Any) -> Config:
    """A validated configuration for an in-process gateway (options as ``config_dict``)."""
    return Config.model_validate(config_dict(switch_port, **options))


def write_daemon_config(path: Path, switch_port: int, *, port: int, log_file: Path | None = None,
                        **options: Any) -> Path:
    """The same configuration as ``make_config``, as the TOML file a daemon process reads.

    The listener takes ``port`` (a daemon's port is chosen before it starts), the journal and
    its key live beside ``path`` unless ``state_dir`` says otherwise, and ``log_file`` (added to
    the session's PAN check) gets the daemon's log. The dict is written as it is, unvalidated:
    a test can write a file the daemon must refuse.
    """
    options.setdefault("state_dir", path.parent)
    options["listener"] = merge({"port": port}, options.get("listener") or {})
    if log_file is not None:
        options["log"] = merge({"level": "INFO", "file": str(log_file)}, options.get("log") or {})
        if log_file not in DAEMON_LOG_FILES:
            DAEMON_LOG_FILES.append(log_file)
    path.write_text(tomli_w.dumps(config_dict(switch_port, **options)), encoding="utf-8")
    return path


async def wait_for(predicate: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    with trio.move_on_after(timeout):
        while not predicate():
            await trio.sleep(0.01)
        return
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class Harness:
    def __init__(self, nursery: trio.Nursery, state_dir: Path) -> None:
        self.nursery = nursery
        self.state_dir = state_dir  # the journal and the PAN key of the gateway under test
        self.switch: SwitchSimulator | None = None
        self.switch_port = 0
        self.switch_scope: trio.CancelScope | None = None
        self.gateway: Gateway | None = None
        self.clients: list[FrontEndClient] = []
        self._stan = 0

    async def start_switch(self, port: int = 0, **options: Any) -> SwitchSimulator:
        sim = SwitchSimulator(**options)
        scope = trio.CancelScope()

        async def serve(task_status=trio.TASK_STATUS_IGNORED):
            with scope:
                await sim.serve("127.0.0.1", port, task_status=task_status)

        self.switch_port = await self.nursery.start(serve)
        self.switch, self.switch_scope = sim, scope
        return sim

    def stop_switch(self) -> None:
        assert self.switch is not None and self.switch_scope is not None
        self.switch.stop()
        self.switch_scope.cancel()

    async def start_gateway(self, *, wait_ready: bool = True, **config_kw: Any) -> Gateway:
        config_kw.setdefault("state_dir", self.state_dir)
        cfg = make_config(self.switch_port, **config_kw)
        gw = Gateway(cfg, metrics=Metrics(process=False))
        await self.nursery.start(gw.run)
        self.gateway = gw
        if wait_ready:
            await wait_for(lambda: all(u.ready for u in gw.upstreams.values()), 5.0, "upstream ready")
        return gw

    @property
    def port(self) -> int:
        assert self.gateway is not None
        return self.gateway.listeners[0].port

    async def client(self) -> FrontEndClient:
        c = await FrontEndClient.connect("127.0.0.1", self.port, "iso87ascii", "ascii4")
        self.clients.append(c)
        return c

    def next_stan(self) -> int:
        self._stan += 1
        return self._stan

    def auth(self, amount: int = 15000, **kw: Any) -> dict[str, str]:
        return sample_auth(self.next_stan(), amount, **kw)


@pytest.fixture
async def harness(nursery, tmp_path):
    h = Harness(nursery, tmp_path)
    yield h
    for c in h.clients:
        with trio.move_on_after(1):
            await c.aclose()
