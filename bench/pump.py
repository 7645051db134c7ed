"""The floor under any Python gateway: a relay that does no ISO 8583 work at all.

It does only what no gateway can skip: it accepts front connections, cuts their
bytes into 4-digit ASCII length-prefixed frames, sends them to the switch over one
connection (several frames read in one go leave in one send), and hands each answer
to the connection whose request went first. Answers are matched by order alone,
so the switch must answer in the order it was asked, as the benchmark's instant
responder does. No parsing, validation, routing, STAN remapping, journal,
metrics or timeouts; one thread, one epoll set, stdlib socket calls.

The benchmark (bench_gateway.py) runs the same loads through it: its CPU per
transaction is what the kernel and the interpreter cost before a gateway does
any work of its own, so "gateway − pump" is the cost of that work.

    python bench/pump.py FRONT_PORT SWITCH_PORT      # 127.0.0.1 only; stop with SIGTERM
"""

from __future__ import annotations

import collections
import select
import signal
import socket
import sys


def cut(buf: bytes) -> tuple[list[bytes], bytes]:
    """The complete frames at the start of ``buf`` and what is left; ValueError on a bad length."""
    frames = []
    i = 0
    while len(buf) - i >= 4:
        size = int(buf[i:i + 4].decode("ascii"))
        if len(buf) - i - 4 < size:
            break
        frames.append(buf[i:i + 4 + size])
        i += 4 + size
    return frames, buf[i:]


def serve(front_port: int, switch_port: int) -> None:
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", front_port))
    listener.listen(1024)
    switch = socket.create_connection(("127.0.0.1", switch_port))
    switch.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    epoll = select.epoll()
    epoll.register(listener.fileno(), select.EPOLLIN)
    epoll.register(switch.fileno(), select.EPOLLIN)
    fronts: dict[int, socket.socket] = {}
    pending: dict[int, bytes] = {}  # a front connection's partial frame
    waiting: collections.deque[socket.socket] = collections.deque()  # who asked, in the order sent
    switch_rest = b""

    def drop(fd: int) -> None:
        sock = fronts.pop(fd)
        pending.pop(fd, None)
        epoll.unregister(fd)
        sock.close()  # its answers still to come are discarded (fileno() is -1 then)

    while True:
        for fd, _ in epoll.poll():
            if fd == listener.fileno():
                sock, _ = listener.accept()
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                fronts[sock.fileno()] = sock
                pending[sock.fileno()] = b""
                epoll.register(sock.fileno(), select.EPOLLIN)
            elif fd == switch.fileno():
                data = switch.recv(65536)
                if not data:
                    return  # the switch went away: nothing left to measure
                answers, switch_rest = cut(switch_rest + data)
                batches: dict[socket.socket, list[bytes]] = {}
                for answer in answers:
                    batches.setdefault(waiting.popleft(), []).append(answer)
                for sock, frames in batches.items():
                    if sock.fileno() >= 0:
                        try:
                            sock.sendall(b"".join(frames))
                        except OSError:
                            drop(sock.fileno())
            elif fd in fronts:
                sock = fronts[fd]
                try:
                    data = sock.recv(65536)
                    frames, pending[fd] = cut(pending[fd] + data) if data else ([], b"")
                except (OSError, ValueError):
                    data = b""
                if not data:
                    drop(fd)
                    continue
                if frames:
                    waiting.extend([sock] * len(frames))
                    switch.sendall(b"".join(frames))


def main() -> int:
    if len(sys.argv) != 3:
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    serve(int(sys.argv[1]), int(sys.argv[2]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
