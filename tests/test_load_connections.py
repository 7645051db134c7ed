"""The load generator's connections: each reconnect is a connection of its own.

Memory streams stand in for the sockets and trio's MockClock for time: what is under test is which
cancel scope a writer's failure reaches, not the kernel.
"""

from __future__ import annotations

import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from iso_gateway.load import LoadOptions
from iso_gateway.load.engine import Engine


async def _a_broken_writer_reaches_only_its_own_connection(ended_before: int) -> None:
    engine = Engine(LoadOptions(host="127.0.0.1", port=1, count=1000, seed=7), seed=7)
    conn = engine.conns[0]
    peers: list[trio.testing.MemoryReceiveStream] = []
    opened: list[trio.abc.Stream] = []

    async def open_memory() -> trio.abc.Stream:
        ours, theirs = trio.testing.memory_stream_pair()
        peers.append(theirs)  # type: ignore[arg-type]
        opened.append(ours)
        return ours

    engine._open = open_memory  # type: ignore[method-assign, assignment]
    old_writers = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(engine._connection, conn)
        for _ in range(ended_before):
            await trio.testing.wait_all_tasks_blocked()
            old_writers.append(conn.writer)
            await peers[-1].aclose()  # the switch closes: the generator reconnects
        await trio.testing.wait_all_tasks_blocked()
        current = conn.scope
        assert current is not None and len(opened) == ended_before + 1
        for writer in old_writers:
            writer._break("send_failed")  # a late failure of a connection that has already ended
        await trio.testing.wait_all_tasks_blocked()
        assert not current.cancel_called, "an ended connection's writer cancelled the live connection"
        assert len(opened) == ended_before + 1
        nursery.cancel_scope.cancel()


@settings(max_examples=5, deadline=None)
@given(ended_before=st.integers(min_value=1, max_value=4))
def test_a_writer_failing_after_its_connection_ended_never_cancels_a_later_connection(ended_before: int) -> None:
    trio.run(_a_broken_writer_reaches_only_its_own_connection, ended_before,
             clock=trio.testing.MockClock(autojump_threshold=0))
