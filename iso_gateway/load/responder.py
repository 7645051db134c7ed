"""An instant responder: a target that answers every request at once, for measuring the load generator.

The switch simulator decodes and encodes every message with pyiso8583 (about
60 µs each way), so it tops out near the load generator's own speed. This
responder answers from a prebuilt response per request MTI (response MTI,
11, 39 = 00, 41), copying the request's DE 11 and DE 41 bytes into it as they
came on the wire: no decode, no encode, one ``send_all`` per received chunk.
It is a measuring tool, not a switch: no amount rules, no reversals.

    python -m iso_gateway.load.responder --port 9600 [--dialect D --framing F --tpdu] [--tls-cert C --tls-key K]

With a TLS context (``--tls-cert``/``--tls-key``) every connection is TLS (trio's ``SSLStream``).
"""

from __future__ import annotations

import argparse
import signal
import ssl
import sys
from functools import partial
from typing import Any, cast

import trio

from ..specfiles import get_dialect
from ..core.errors import FrameError, MessageError
from ..core.framing import framer_from_config
from ..core.message import encode, response_mti
from ..core.scanner import Scanner
from ..net.writer import FrameWriter
from ..core.macs import MacField
from ..security.mac import CmacKey, RetailMacKey, mac_key
from ..sim.tlsctx import TlsHandshakeFailed, handshake, server_context

__all__ = ["InstantResponder", "main"]

RECEIVE_SIZE = 65536


class InstantResponder:
    """``await serve(host, port)`` in a nursery; ``answered`` counts the answers sent."""

    def __init__(self, dialect: str = "iso87ascii", framing: str = "ascii4", *,
                 length_includes_header: bool = False, tpdu: bool = False, tls: ssl.SSLContext | None = None,
                 mac: RetailMacKey | CmacKey | None = None) -> None:
        self.tls = tls
        # With a MAC key every answer is signed (field 64): requests are not checked.
        self.mac = mac
        self.dialect = get_dialect(dialect)
        options: dict[str, Any] = {}
        if length_includes_header:
            options["length_includes_header"] = True
        if tpdu:
            options["tpdu"] = True
        self.framer = framer_from_config(framing, source="responder", **options)
        self.scanner = Scanner(self.dialect, (11, 41))
        # (request MTI, has DE 41) -> response cut around 11 and 41: (head, middle, tail); None: not answered.
        self._templates: dict[tuple[str, bool], tuple[bytes, bytes, bytes] | None] = {}
        self.port: int | None = None
        self.answered = 0
        self.ignored = 0

    def _template(self, mti: str, with_terminal: bool) -> tuple[bytes, bytes, bytes] | None:
        key = (mti, with_terminal)
        if key not in self._templates:
            try:
                msg = {"t": response_mti(mti), "11": "000000", "39": "00"}
                if with_terminal:
                    msg["41"] = "        "
                if self.mac is not None:
                    msg["64"] = "0" * 16
                raw = encode(self.dialect, msg)
                spans = Scanner(self.dialect, (11, 41)).scan(raw).spans
                s11, e11 = spans[11]
                s41, e41 = spans.get(41, (len(raw), len(raw)))
                self._templates[key] = (raw[:s11], raw[e11:s41], raw[e41:])
            except (ValueError, MessageError):
                self._templates[key] = None  # a response, or an MTI with no response: not answered
        return self._templates[key]

    async def serve(self, host: str = "127.0.0.1", port: int = 0, *,
                    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(port, host=host)
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(trio.serve_listeners, self._handle, listeners, handler_nursery=nursery))
            task_status.started(self.port)

    async def _handle(self, stream: trio.SocketStream) -> None:
        if self.tls is not None:
            try:
                stream = cast(trio.SocketStream, await handshake(stream, self.tls, server_side=True))
            except TlsHandshakeFailed:
                self.ignored += 1
                return
        writer = FrameWriter(stream)
        decoder = self.framer.decoder()
        scan = self.scanner.scan
        frame_of = self.framer.encode
        reply_header = self.framer.reply_header
        mac = self.mac
        mac_field = MacField(self.dialect) if mac is not None else None
        try:
            while True:
                data = await stream.receive_some(RECEIVE_SIZE)
                if not data:
                    return
                try:
                    frames = decoder.feed(data)
                except FrameError:
                    return
                for frame in frames:
                    raw = frame.message
                    if not raw:
                        continue
                    try:
                        s = scan(raw)
                    except MessageError:
                        self.ignored += 1
                        continue
                    spans = s.spans
                    if 11 not in spans:
                        self.ignored += 1
                        continue
                    t = self._template(s.mti, 41 in spans)
                    if t is None:
                        self.ignored += 1
                        continue
                    a, b = spans[11]
                    if 41 in spans:
                        c, d = spans[41]
                        body = b"".join((t[0], raw[a:b], t[1], raw[c:d], t[2]))
                    else:
                        body = b"".join((t[0], raw[a:b], t[1], t[2]))
                    if mac_field is not None:
                        assert mac is not None
                        signed = body[:-mac_field.width]
                        body = signed + mac_field.wire(mac.mac(signed))
                    header = reply_header(frame.header) if frame.header else b""
                    writer.enqueue(frame_of(body, header))
                    self.answered += 1
                await writer.flush()
                if writer.broken:
                    return
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            return
        finally:
            await trio.aclose_forcefully(stream)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m iso_gateway.load.responder",
                                     description="answer every ISO 8583 request at once (39 = 00), to measure a load generator")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9600)
    parser.add_argument("--dialect", default="iso87ascii")
    parser.add_argument("--framing", default="ascii4")
    parser.add_argument("--length-includes-header", action="store_true")
    parser.add_argument("--tpdu", action="store_true")
    parser.add_argument("--tls-cert", metavar="PEM", help="TLS: our certificate chain (with --tls-key)")
    parser.add_argument("--tls-key", metavar="PEM", help="TLS: its private key")
    parser.add_argument("--mac-key", metavar="HEX", type=bytes.fromhex,
                        help="sign every answer (field 64) with this test key (hex, in clear)")
    parser.add_argument("--mac-algorithm", choices=("retail", "aes-cmac"), default="retail")
    args = parser.parse_args(argv)
    tls = server_context(args.tls_cert, args.tls_key) if args.tls_cert and args.tls_key else None
    responder = InstantResponder(args.dialect, args.framing, length_includes_header=args.length_includes_header,
                                 tpdu=args.tpdu, tls=tls,
                                 mac=mac_key(args.mac_algorithm, args.mac_key) if args.mac_key else None)

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                port = await nursery.start(responder.serve, args.host, args.port)
                print(f"instant responder listening on {args.host}:{port}", file=sys.stderr, flush=True)
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    break

    trio.run(run)
    print(f"instant responder: {responder.answered} answered, {responder.ignored} ignored", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
