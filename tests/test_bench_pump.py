"""The benchmark's floor (bench/pump.py) is only a floor if it relays faithfully."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from iso_gateway.sim.integrity import free_port
from realtime import poll_real_sync

PUMP = Path(__file__).resolve().parent.parent / "bench" / "pump.py"


def _connect(port: int) -> socket.socket:
    """A connection to the pump (a process of its own) once it listens."""
    got: list[socket.socket] = []

    def connected() -> bool:
        try:
            got.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        except OSError:
            return False
        return True

    assert poll_real_sync(connected, 10), f"the pump did not listen on {port} within 10 s"
    return got[0]


def _frame(body: bytes) -> bytes:
    return b"%04d" % len(body) + body


def _read_frame(sock: socket.socket) -> bytes:
    head = _exactly(sock, 4)
    return _exactly(sock, int(head))


def _exactly(sock: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise EOFError(f"closed after {len(out)} of {n} bytes")
        out += chunk
    return out


class InOrderSwitch:
    """Answers every frame, in order, with "ok:" + the request (and records what it saw)."""

    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(1)
        self.port = self.listener.getsockname()[1]
        self.seen: list[bytes] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            try:
                while True:
                    body = _read_frame(conn)
                    self.seen.append(body)
                    conn.sendall(_frame(b"ok:" + body))
            except (EOFError, OSError):
                pass

    def close(self) -> None:
        self.listener.close()


def test_the_pump_cuts_frames_multiplexes_fronts_onto_one_switch_link_and_answers_each_its_own():
    switch = InOrderSwitch()
    port = free_port()
    pump = subprocess.Popen([sys.executable, str(PUMP), str(port), str(switch.port)])
    try:
        a, b = _connect(port), _connect(port)
        # Two frames in one send, and one frame split across two sends.
        a.sendall(_frame(b"a1") + _frame(b"a2" * 300))
        first = _frame(b"b1" + bytes(range(256)))
        b.sendall(first[:7])
        time.sleep(0.1)  # real time on purpose: the pump is a process; a moment to read the first piece alone
        b.sendall(first[7:])
        assert [_read_frame(a), _read_frame(a)] == [b"ok:a1", b"ok:" + b"a2" * 300]
        assert _read_frame(b) == b"ok:b1" + bytes(range(256))
        assert sorted(switch.seen) == sorted([b"a1", b"a2" * 300, b"b1" + bytes(range(256))])
        # A front end that closes loses its answers to come; the others carry on.
        a.sendall(_frame(b"a3"))
        a.close()
        b.sendall(_frame(b"b2"))
        assert _read_frame(b) == b"ok:b2"
        # A frame length that is not 4 digits closes that connection only.
        bad = _connect(port)
        bad.sendall(b"12x4hello")
        assert bad.recv(16) == b""
        b.sendall(_frame(b"b3"))
        assert _read_frame(b) == b"ok:b3"
        assert pump.poll() is None
        b.close()
        bad.close()
    finally:
        pump.terminate()
        assert pump.wait(10) == 0
        switch.close()
