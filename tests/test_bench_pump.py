"""The benchmark's byte pump (bench/pump.py): the floor row is only a floor if it relays faithfully."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from iso_gateway.sim.integrity import free_port

PUMP = Path(__file__).resolve().parent.parent / "bench" / "pump.py"


def _connect(port: int) -> socket.socket:
    deadline = time.monotonic() + 10
    while True:
        try:
            return socket.create_connection(("127.0.0.1", port), timeout=5)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            break
        out += chunk
    return out


def test_the_byte_pump_relays_each_connection_both_ways_unchanged_and_closes_the_pair_together():
    switch = socket.socket()
    switch.bind(("127.0.0.1", 0))
    switch.listen(8)
    switch.settimeout(10)
    accepted: list[socket.socket] = []

    def accept() -> None:
        for _ in range(2):
            conn, _ = switch.accept()
            accepted.append(conn)

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    port = free_port()
    pump = subprocess.Popen([sys.executable, str(PUMP), str(port), str(switch.getsockname()[1])])
    try:
        fronts = [_connect(port), _connect(port)]
        acceptor.join(10)
        assert len(accepted) == 2
        # Each front connection has its own switch connection; bytes go through as they are.
        payloads = [b"AAAA" + bytes(range(256)) * 40, b"BBBB" + b"\x00\xff" * 3000]
        for front, data in zip(fronts, payloads):
            front.sendall(data)
        partner: dict[int, socket.socket] = {}  # front index -> its switch-side connection
        for conn in accepted:
            conn.settimeout(5)
            head = _recv_exactly(conn, 4)
            i = [p[:4] for p in payloads].index(head)
            assert head + _recv_exactly(conn, len(payloads[i]) - 4) == payloads[i]
            partner[i] = conn
        assert sorted(partner) == [0, 1]
        for i, conn in partner.items():
            conn.sendall(b"answer %d" % i)
        assert [_recv_exactly(front, 8) for front in fronts] == [b"answer 0", b"answer 1"]
        # One side closing closes its partner; the other pair and the pump carry on.
        fronts[0].close()
        assert partner[0].recv(1) == b""
        fronts[1].sendall(b"more")
        assert _recv_exactly(partner[1], 4) == b"more"
        assert pump.poll() is None
        third = _connect(port)
        third.sendall(b"still here")
        conn, _ = switch.accept()
        accepted.append(conn)
        conn.settimeout(5)
        assert _recv_exactly(conn, 10) == b"still here"
        third.close()
        fronts[1].close()
    finally:
        pump.terminate()
        assert pump.wait(10) == 0
        switch.close()
        for conn in accepted:
            conn.close()
