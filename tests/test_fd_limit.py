"""The daemon raises its open-file limit to what its configured connections may need."""

from __future__ import annotations

import resource

from conftest import make_config
from iso_gateway.daemon import FD_SPARE, fd_budget, raise_fd_limit


def test_the_descriptor_budget_counts_every_listener_link_and_the_endpoint():
    cfg = make_config(9, listener={"max_connections": 100}, upstream={"connections": 3})
    assert fd_budget(cfg) == FD_SPARE + 101 + 6
    with_metrics = make_config(9, listener={"max_connections": 100}, upstream={"connections": 3},
                               metrics={"enabled": True, "max_connections": 50})
    assert fd_budget(with_metrics) == FD_SPARE + 101 + 6 + 51


def test_a_low_soft_limit_is_raised_toward_the_need_never_past_the_hard_limit():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        now, _ = raise_fd_limit(900)
        assert now == min(900, hard) == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        # Never lowered: a need below the current soft limit leaves it alone.
        assert raise_fd_limit(100)[0] == now
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
