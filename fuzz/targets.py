"""Fuzz targets over the wire-facing code: framing, scanner, decode, validation, splice, masking.

One entry point, ``run_one(data)``: the first byte picks a target and its variant
(dialect, framing style and options), the rest is the input. Each target asserts
properties that hold for every input, hostile or not:

- nothing raises but the project's typed errors (a KeyError out of pyiso8583 is a bug);
- differential: a full scan accepts exactly what ``message.decode`` accepts, and
  reads the same values;
- splicing a field then scanning gives the spliced value, and nothing else moves;
- framing: chunking does not change the frames; a frame encoded and decoded again
  is the same frame;
- masking never leaves a Luhn-valid run of 13 to 19 digits of its input in clear;
- every request whose MTI can be read gets a local answer that encodes (see Gateway.answer_locally).

``fuzz/fuzz_wire.py`` drives these with atheris (coverage-guided) for long runs;
``tests/test_fuzz.py`` drives them with hypothesis for a few seconds in the suite.
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Callable, Iterator

from iso_gateway.core.dialect import Dialect
from iso_gateway.specfiles import get_dialect
from iso_gateway.core.errors import DecodeError, EncodeError, FrameError
from iso_gateway.core.framing import FRAMINGS, FrameDecoder, Framer, FramingOptions
from iso_gateway.core.masking import luhn_ok, mask_message, mask_pan, scrub
from iso_gateway.core.message import decode, encode
from iso_gateway.core.scanner import Scanner
from iso_gateway.specfiles import load_rules

ROOT = Path(__file__).resolve().parents[1]
CAPTURES = ROOT / "tests" / "captures"
DIALECTS = ("iso87ascii", "iso87binary", "iso93ascii")
NOW = datetime(2026, 6, 11, 14, 30, tzinfo=timezone.utc)  # fixed: a fuzz run must be repeatable

_dialects: dict[str, Dialect] = {name: get_dialect(name) for name in DIALECTS}
_rules = load_rules("default")
# Per dialect: a scanner reading every field, the listener's (what rules and routing need), none.
_scanners: dict[str, tuple[Scanner, Scanner, Scanner]] = {
    name: (Scanner(d, set(d.fields)),
           Scanner(d, (_rules.fields_needed | {2, 7, 11, 32, 37, 41, 42, 49, 90}) & set(d.fields)),
           Scanner(d, ()))
    for name, d in _dialects.items()
}

_OPTIONS = (
    FramingOptions(),
    FramingOptions(tpdu=True),
    FramingOptions(header=b"HDR01"),
    FramingOptions(length_includes_header=True, max_frame=64),
)
_FRAMERS = tuple(Framer(style, options) for style in sorted(FRAMINGS) for options in _OPTIONS)

_DIGIT_RUN = re.compile(r"\d+")


# --------------------------------------------------------------------------- codec targets


def _decoded(dialect: Dialect, raw: bytes) -> dict[str, str] | None:
    try:
        return decode(dialect, raw, check_types=False)
    except DecodeError as exc:
        _no_card_number_left(raw.decode("latin-1"), str(exc))  # errors name fields, never values
        return None


def scan_vs_decode(name: str, raw: bytes) -> None:
    """A full scan refuses exactly what decode refuses and reads the same values; a partial
    scan raises nothing but DecodeError; validation of what a scan read raises nothing."""
    dialect = _dialects[name]
    full = _decoded(dialect, raw)
    for scanner in _scanners[name]:
        try:
            scan = scanner.scan(raw, full=True)
        except DecodeError as exc:
            _no_card_number_left(raw.decode("latin-1"), str(exc))
            scan = None
        assert (scan is None) == (full is None), f"{name}: scan {'refuses' if scan is None else 'accepts'}, decode not"
        if scan is not None and full is not None:
            assert scan.mti == full["t"]
            assert scan.present() == sorted(int(k) for k in full if k.isdigit())
            for num, value in scan.values.items():
                assert full[str(num)] == value, f"{name}: field {num} scanned differently"
        try:
            scanner.scan(raw)
        except DecodeError:
            pass
    if full is not None:
        scan = _scanners[name][1].scan(raw, full=True)
        _rules.validate(dialect, scan.mti, scan.bitmap, scan.values, NOW)
        # What a decode gives, encode takes back (the gateway re-encodes when it translates).
        again = encode(dialect, full, check_types=False)
        assert decode(dialect, again, check_types=False) == full, f"{name}: decode(encode(m)) != m"


def splice(name: str, raw: bytes) -> None:
    """Splicing a fixed field and scanning again gives the new value; every other field is unchanged."""
    dialect = _dialects[name]
    reader = _scanners[name][0]
    try:
        scan = reader.scan(raw, full=True)
    except DecodeError:
        return
    fixed = [n for n in scan.values if dialect.fields[n].fixed]
    if not fixed:
        return
    num = fixed[len(raw) % len(fixed)]
    old = scan.values[num]
    new = old[::-1]  # same length, same alphabet: encodable wherever the old value was
    try:
        spliced = reader.splice(raw, scan, num, new)
    except EncodeError:
        return
    after = reader.scan(spliced, full=True)
    assert after.values[num] == new, f"{name}: spliced field {num} reads back differently"
    assert {k: v for k, v in after.values.items() if k != num} == {k: v for k, v in scan.values.items() if k != num}
    assert len(spliced) == len(raw)


def masking(name: str, raw: bytes) -> None:
    """scrub, mask_pan and mask_message never leave a Luhn-valid 13-19 digit run of their input."""
    text = raw.decode("latin-1")
    _no_card_number_left(text, scrub(text))
    digits = "".join(ch for ch in text if ch.isascii() and ch.isdigit())[:19]
    shown = sum(ch.isdigit() for ch in mask_pan(digits))
    assert shown <= 10 and (len(digits) >= 16 or shown * 2 <= len(digits)), "mask_pan shows too much"
    dialect = _dialects[name]
    full = _decoded(dialect, raw)
    if full is None:
        return
    for key, value in mask_message(dialect, full).items():
        if key.isdigit():
            _no_card_number_left(full[key], value)


def _card_numbers(text: str) -> set[str]:
    return {m for m in _DIGIT_RUN.findall(text) if 13 <= len(m) <= 19 and luhn_ok(m)}


def _no_card_number_left(before: str, after: str) -> None:
    left = _card_numbers(before) & set(_DIGIT_RUN.findall(after))
    assert not left, "a Luhn-valid 13-19 digit run is still in clear after masking"


def local_answer(name: str, raw: bytes) -> None:
    """Every request whose MTI can be read gets an answer built from what the scan read (the
    gateway's 30 for a format error, or any local answer): never an exception, never nothing."""
    from iso_gateway.core.flow import Flow
    from iso_gateway.core.message import is_request, is_valid_mti

    dialect = _dialects[name]
    found: dict[int, str] = {}
    try:
        scan = _scanners[name][1].scan(raw, full=True, found=found)
        mti: str | None = scan.mti
    except DecodeError:
        mti = raw[:2].hex() if dialect.mti_encoding == "bcd" else raw[:4].decode("latin-1")
    code = "000" if dialect.fields[39].length == 3 else "30"
    out = Flow._local_response(dialect, mti, found, code, None)
    if mti is not None and is_valid_mti(mti) and is_request(mti):
        assert out is not None, f"{name}: no answer for a request with a readable MTI"
        resp = decode(dialect, out, check_types=False)
        assert resp["39"] == code and resp["t"][2] == str(int(mti[2]) + 1)
    else:
        assert out is None


# --------------------------------------------------------------------------- framing target


def framing(index: int, data: bytes) -> None:
    """Feeding in chunks gives what one feed gives; only FrameError is raised; every frame
    re-encodes to bytes that decode to the same frame; any message encodes and decodes back."""
    framer = _FRAMERS[index % len(_FRAMERS)]
    step = 1 + (data[0] if data else 0) % 7
    body = data[1:]
    whole, whole_error = _feed(framer, [body])
    chunks = [body[i:i + step] for i in range(0, len(body), step)]
    parts, part_error = _feed(framer, chunks)
    assert type(whole_error) is type(part_error), "chunking changed the framing error"
    if whole_error is None:
        assert parts == whole, "chunking changed the frames"
    else:
        assert parts[:len(whole)] == whole
    for frame in whole:
        if frame.keepalive:
            wire = framer.keepalive()
        elif not frame.message:
            # A length that covers only the TPDU or header: a frame with no message, which the
            # gateway counts and drops (no MTI to answer); the encoder refuses to make one.
            assert frame.header and len(frame.header) == framer.options.header_size
            continue
        else:
            wire = framer.encode(frame.message, frame.header)
        again, error = _feed(framer, [wire])
        assert error is None and again == [frame], "a frame does not survive encode then decode"
    if body:
        header = b"\x60" + body[:4].ljust(4, b"\0") if framer.options.tpdu else b""
        try:
            wire = framer.encode(body, header)
        except FrameError:
            return
        again, error = _feed(framer, [wire[:step], wire[step:]])
        assert error is None and [f.message for f in again] == [body], "a message does not survive framing"


def _feed(framer: Framer, chunks: list[bytes]) -> tuple[list, FrameError | None]:
    decoder: FrameDecoder = framer.decoder()
    frames: list = []
    try:
        for chunk in chunks:
            frames.extend(decoder.feed(chunk))
    except FrameError as exc:
        return frames, exc
    return frames, None


# --------------------------------------------------------------------------- dispatch

Target = Callable[[bytes], None]
TARGETS: list[tuple[str, Target]] = []
for _name in DIALECTS:
    TARGETS.append((f"scan_vs_decode/{_name}", partial(scan_vs_decode, _name)))
    TARGETS.append((f"splice/{_name}", partial(splice, _name)))
    TARGETS.append((f"masking/{_name}", partial(masking, _name)))
    TARGETS.append((f"local_answer/{_name}", partial(local_answer, _name)))
for _i, _framer in enumerate(_FRAMERS):
    TARGETS.append((f"framing/{_framer.name}/{_i % len(_OPTIONS)}", partial(framing, _i)))


def run_one(data: bytes) -> None:
    """Run the target the first byte picks on the rest. Raises only on a broken property."""
    if not data:
        return
    TARGETS[data[0] % len(TARGETS)][1](data[1:])


def selector(prefix: str) -> list[int]:
    """The first bytes that pick the targets whose name starts with ``prefix``."""
    return [i for i, (name, _) in enumerate(TARGETS) if name.startswith(prefix)]


def seeds() -> Iterator[bytes]:
    """Inputs to start from: every captured message and stream, for every target that reads them."""
    messages: dict[str, list[bytes]] = {name: [] for name in DIALECTS}
    streams: list[bytes] = []
    for path in sorted(CAPTURES.glob("*.json")):
        try:
            capture = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        name = capture.get("dialect")
        if name in messages and isinstance(capture.get("hex"), str):
            messages[name].append(bytes.fromhex(capture["hex"]))
        if isinstance(capture.get("stream_hex"), str):
            streams.append(bytes.fromhex(capture["stream_hex"]))
        for frame in capture.get("frames") or ():
            if name in messages and isinstance(frame, dict) and isinstance(frame.get("hex"), str):
                messages[name].append(bytes.fromhex(frame["hex"]))
    for i, (target, _) in enumerate(TARGETS):
        kind, _, rest = target.partition("/")
        if kind == "framing":
            for stream in streams:
                yield bytes([i, 0]) + stream
        else:
            for raw in messages[rest]:
                yield bytes([i]) + raw
