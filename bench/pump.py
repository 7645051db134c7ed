"""The floor under any Python gateway: a byte pump that does no ISO 8583 work at all.

Each front connection gets a switch connection of its own, and whatever one side
sends is copied to the other as it is: no framing, parsing, validation, routing,
STAN remapping, matching, journal or metrics. One thread, one epoll set, the
stdlib socket calls a gateway can't avoid (accept, recv, send).

The benchmark (bench_gateway.py) runs the same loads through it: its CPU per
transaction is what the kernel and the interpreter cost before a gateway does
anything, so "gateway − pump" is the cost of the gateway's own work.

    python bench/pump.py FRONT_PORT SWITCH_PORT      # 127.0.0.1 only; stop with SIGTERM
"""

from __future__ import annotations

import select
import signal
import socket
import sys


def _nodelay(sock: socket.socket) -> socket.socket:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def serve(front_port: int, switch_port: int) -> None:
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", front_port))
    listener.listen(1024)
    epoll = select.epoll()
    epoll.register(listener.fileno(), select.EPOLLIN)
    socks: dict[int, socket.socket] = {}
    peer: dict[int, socket.socket] = {}

    def drop(fd: int) -> None:
        other = peer.pop(fd, None)
        for s in (socks.pop(fd, None), other):
            if s is not None:
                epoll.unregister(s.fileno())
                peer.pop(s.fileno(), None)
                socks.pop(s.fileno(), None)
                s.close()

    while True:
        for fd, _ in epoll.poll():
            if fd == listener.fileno():
                front, _ = listener.accept()
                try:
                    switch = socket.create_connection(("127.0.0.1", switch_port))
                except OSError:
                    front.close()
                    continue
                for a, b in ((_nodelay(front), _nodelay(switch)), (switch, front)):
                    socks[a.fileno()] = a
                    peer[a.fileno()] = b
                    epoll.register(a.fileno(), select.EPOLLIN)
                continue
            sock = socks.get(fd)
            if sock is None:
                continue
            try:
                data = sock.recv(65536)
                if data:
                    peer[fd].sendall(data)  # blocking: a full buffer waits (it never fills here)
                    continue
            except OSError:
                pass
            drop(fd)


def main() -> int:
    if len(sys.argv) != 3:
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    serve(int(sys.argv[1]), int(sys.argv[2]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
