"""Shared harness: a switch simulator and a gateway on 127.0.0.1, free ports, bounded waits."""

from __future__ import annotations

import copy
import resource
from typing import Any, Callable

import pytest
import trio

from iso_gateway.config import Config
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


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def make_config(switch_port: int, *, listener: dict | None = None, upstream: dict | None = None,
                routes: list[dict] | None = None, **top: Any) -> Config:
    raw: dict[str, Any] = {
        "gateway": {"drain_timeout": 2.0},
        "metrics": {"enabled": False},
        "listeners": [merge({"name": "ecom", "host": "127.0.0.1", "port": 0}, listener or {})],
        "upstreams": [merge({"name": "cmi", "hosts": [f"127.0.0.1:{switch_port}"], "connections": 1,
                             "sign_on": True, "echo_interval": 0, "reconnect_initial": 0.05,
                             "reconnect_max": 0.2, "connect_timeout": 1.0}, upstream or {})],
        "routes": routes or [{"name": "all", "upstream": "cmi", "timeout": 1.0}],
    }
    raw = merge(raw, top)
    return Config.model_validate(raw)


async def wait_for(predicate: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    with trio.move_on_after(timeout):
        while not predicate():
            await trio.sleep(0.01)
        return
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class Harness:
    def __init__(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
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
async def harness(nursery):
    h = Harness(nursery)
    yield h
    for c in h.clients:
        with trio.move_on_after(1):
            await c.aclose()
