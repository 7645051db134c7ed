"""Framing: length headers, headers and TPDUs, keep-alives, errors, chunking."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iso_gateway.core.errors import BadFrameHeader, BadLengthHeader, ConfigError, FrameError, FrameTooLarge
from iso_gateway.core.framing import (
    DEFAULT_MAX_FRAME,
    FRAMINGS,
    Frame,
    FrameDecoder,
    Framer,
    FramingOptions,
    LengthHeader,
    encode_frame,
    framer_from_config,
    get_framing,
    keepalive_frame,
    tpdu_reply,
)

# A message that looks like a 0100 with a test PAN in it: no error text may show it.
PAN = b"4761739001010119"
MESSAGE = b"0100" + b"7234054128C28805" + b"16" + PAN + b"000000000000010000"
TPDU = b"\x60\x00\x01\x00\x02"
NETWORK_HEADER = b"ISO026000050"

HEADER_KINDS = {
    "no header": (FramingOptions, b""),
    "fixed header": (lambda **kw: FramingOptions(header=NETWORK_HEADER, **kw), NETWORK_HEADER),
    "TPDU": (lambda **kw: FramingOptions(tpdu=True, **kw), TPDU),
}


def options_for(kind: str, includes: bool) -> tuple[FramingOptions, bytes]:
    make, header = HEADER_KINDS[kind]
    return make(length_includes_header=includes), header


def feed_in_pieces(decoder: FrameDecoder, data: bytes, cuts: list[int]) -> list[Frame]:
    frames: list[Frame] = []
    last = 0
    for cut in sorted(set(cuts)) + [len(data)]:
        frames += decoder.feed(data[last:cut])
        last = cut
    return frames


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("name", sorted(FRAMINGS))
@pytest.mark.parametrize("includes", [False, True], ids=["length excludes itself", "length includes itself"])
@pytest.mark.parametrize("kind", list(HEADER_KINDS))
def test_every_framing_decodes_what_it_encodes(name: str, includes: bool, kind: str) -> None:
    options, header = options_for(kind, includes)
    framer = Framer(name, options)
    wire = framer.encode(MESSAGE, header)
    size = FRAMINGS[name].size
    assert len(wire) == size + len(header) + len(MESSAGE)
    assert framer.framing.read(wire, 0) == len(header) + len(MESSAGE) + (size if includes else 0)

    decoder = framer.decoder()
    assert decoder.feed(wire) == [Frame(MESSAGE, header, False)]
    assert decoder.pending == 0
    assert not decoder.partial


@pytest.mark.parametrize("name", sorted(FRAMINGS))
@pytest.mark.parametrize("includes", [False, True])
@pytest.mark.parametrize("kind", list(HEADER_KINDS))
def test_byte_at_a_time_and_all_at_once_give_the_same_frames(name: str, includes: bool, kind: str) -> None:
    options, header = options_for(kind, includes)
    framer = Framer(name, options)
    messages = [MESSAGE, b"0800" + b"8220000000000000", MESSAGE[:40]]
    wire = b"".join(framer.encode(m, header) for m in messages) + framer.keepalive()

    at_once = framer.decoder().feed(wire)
    trickle = framer.decoder()
    one_by_one = [f for i in range(len(wire)) for f in trickle.feed(wire[i : i + 1])]

    assert at_once == one_by_one
    assert [f.message for f in at_once] == messages + [b""]
    assert [f.keepalive for f in at_once] == [False, False, False, True]
    assert trickle.pending == 0


@settings(max_examples=200, deadline=None)
@given(
    name=st.sampled_from(sorted(FRAMINGS)),
    includes=st.booleans(),
    kind=st.sampled_from(list(HEADER_KINDS)),
    messages=st.lists(st.binary(min_size=0, max_size=300), min_size=1, max_size=8),
    cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=40),
)
def test_any_split_of_the_stream_gives_the_frames_of_the_whole_stream(
    name: str, includes: bool, kind: str, messages: list[bytes], cuts: list[int]
) -> None:
    options, header = options_for(kind, includes)
    framer = Framer(name, options)
    # An empty message stands for a keep-alive in the stream.
    wire = b"".join(framer.encode(m, header) if m else framer.keepalive() for m in messages)

    whole = framer.decoder().feed(wire)
    pieces = framer.decoder()
    split = feed_in_pieces(pieces, wire, [c for c in cuts if c < len(wire)])

    assert split == whole
    assert [f.message for f in whole] == messages
    assert [f.keepalive for f in whole] == [not m for m in messages]
    assert pieces.pending == 0 and not pieces.partial


# --------------------------------------------------------------------------- known wire bytes


@pytest.mark.parametrize(
    ("name", "options", "wire"),
    [
        ("ascii4", FramingOptions(), b"0004ABCD"),
        ("ascii4", FramingOptions(length_includes_header=True), b"0008ABCD"),
        ("binary2", FramingOptions(), b"\x00\x04ABCD"),
        ("binary2", FramingOptions(length_includes_header=True), b"\x00\x06ABCD"),
        ("binary2r", FramingOptions(), b"\x00\x04\x00\x00ABCD"),
        ("binary2r", FramingOptions(length_includes_header=True), b"\x00\x08\x00\x00ABCD"),
        ("bcd2", FramingOptions(), b"\x00\x04ABCD"),
        ("binary4", FramingOptions(), b"\x00\x00\x00\x04ABCD"),
    ],
)
def test_known_wire_examples_encode_and_decode_byte_for_byte(
    name: str, options: FramingOptions, wire: bytes
) -> None:
    assert encode_frame(name, options, b"ABCD") == wire
    assert FrameDecoder(name, options).feed(wire) == [Frame(b"ABCD", b"", False)]


def test_bcd2_writes_the_length_as_decimal_digits() -> None:
    message = b"x" * 1234
    wire = encode_frame("bcd2", None, message)
    assert wire[:2] == b"\x12\x34"
    assert FrameDecoder("bcd2").feed(wire)[0].message == message


def test_ascii4_length_counts_the_tpdu_like_jpos_nacchannel() -> None:
    wire = encode_frame("ascii4", FramingOptions(tpdu=True), b"ABCD", TPDU)
    assert wire == b"0009" + TPDU + b"ABCD"


def test_a_fixed_header_is_sent_from_the_options_when_none_is_given() -> None:
    options = FramingOptions(header=NETWORK_HEADER)
    assert encode_frame("binary2", options, b"ABCD") == b"\x00\x10" + NETWORK_HEADER + b"ABCD"


def test_a_fixed_header_is_handed_over_as_received_not_checked() -> None:
    options = FramingOptions(header=NETWORK_HEADER)
    other = b"ISO026000099"
    frames = FrameDecoder("binary2", options).feed(b"\x00\x10" + other + b"ABCD")
    assert frames == [Frame(b"ABCD", other, False)]


def test_a_framing_can_be_given_as_name_class_or_instance() -> None:
    for framing in ("binary2", FRAMINGS["binary2"], FRAMINGS["binary2"]()):
        assert FrameDecoder(framing).feed(b"\x00\x01A") == [Frame(b"A", b"", False)]
    assert isinstance(get_framing("ascii4"), LengthHeader)


def test_an_unknown_framing_name_is_refused_with_the_known_names() -> None:
    with pytest.raises(ValueError, match="binary2r"):
        FrameDecoder("ascii3")


# --------------------------------------------------------------------------- keep-alives


@pytest.mark.parametrize(
    ("name", "wire"),
    [
        ("ascii4", b"0000"),
        ("binary2", b"\x00\x00"),
        ("binary2r", b"\x00\x00\x00\x00"),
        ("bcd2", b"\x00\x00"),
        ("binary4", b"\x00" * 4),
    ],
)
def test_a_zero_length_frame_is_a_keepalive(name: str, wire: bytes) -> None:
    assert keepalive_frame(name) == wire
    decoder = FrameDecoder(name)
    assert decoder.feed(wire + wire) == [Frame(b"", b"", True)] * 2
    assert not decoder.partial


def test_a_keepalive_carries_no_tpdu() -> None:
    decoder = FrameDecoder("binary2", FramingOptions(tpdu=True))
    assert decoder.feed(b"\x00\x00") == [Frame(b"", b"", True)]


def test_with_length_including_itself_a_keepalive_counts_only_the_length_header() -> None:
    options = FramingOptions(length_includes_header=True)
    assert keepalive_frame("ascii4", options) == b"0004"
    decoder = FrameDecoder("ascii4", options)
    # A literal zero is accepted too: it can only mean a keep-alive.
    assert decoder.feed(b"0004" + b"0000") == [Frame(b"", b"", True)] * 2


def test_a_length_smaller_than_the_length_header_it_counts_is_refused() -> None:
    with pytest.raises(BadLengthHeader):
        FrameDecoder("ascii4", FramingOptions(length_includes_header=True)).feed(b"0002AB")


def test_an_empty_message_is_not_framed_because_it_would_read_as_a_keepalive() -> None:
    with pytest.raises(ValueError):
        encode_frame("ascii4", None, b"")


# --------------------------------------------------------------------------- limits and bad input


@pytest.mark.parametrize("name", sorted(FRAMINGS))
def test_a_frame_over_max_frame_is_refused_from_the_length_header_alone(name: str) -> None:
    framing = FRAMINGS[name]()
    decoder = FrameDecoder(name, FramingOptions(max_frame=100))
    with pytest.raises(FrameTooLarge) as info:
        decoder.feed(framing.write(101))
    assert (info.value.length, info.value.limit) == (101, 100)
    assert decoder.pending == 0


def test_the_default_limit_lets_a_max_frame_body_through_and_refuses_one_more_byte() -> None:
    ok = b"\x20\x00" + b"x" * DEFAULT_MAX_FRAME
    assert FrameDecoder("binary2").feed(ok)[0].message == b"x" * DEFAULT_MAX_FRAME
    with pytest.raises(FrameTooLarge):
        FrameDecoder("binary2").feed(b"\x20\x01")


def test_encoding_over_max_frame_raises_frame_too_large() -> None:
    with pytest.raises(FrameTooLarge) as info:
        encode_frame("binary2", FramingOptions(max_frame=10, tpdu=True), b"x" * 6, TPDU)
    assert (info.value.length, info.value.limit) == (11, 10)


def test_encoding_more_than_the_length_header_can_express_raises_frame_too_large() -> None:
    options = FramingOptions(max_frame=20000, length_includes_header=True)
    with pytest.raises(FrameTooLarge) as info:
        encode_frame("ascii4", options, b"x" * 9996)
    assert info.value.limit == 9995
    assert len(encode_frame("ascii4", options, b"x" * 9995)) == 9999


@pytest.mark.parametrize("wire", [b"00A4", b" 004", b"+004", b"0_04", b"\xd9\xa0\x00\x04"])
def test_ascii4_refuses_a_length_that_is_not_four_digits(wire: bytes) -> None:
    with pytest.raises(BadLengthHeader):
        FrameDecoder("ascii4").feed(wire + b"ABCD")


@pytest.mark.parametrize("wire", [b"\x00\x0a", b"\xa0\x00", b"\x0f\x00", b"\xff\xff"])
def test_bcd2_refuses_a_nibble_over_nine(wire: bytes) -> None:
    with pytest.raises(BadLengthHeader):
        FrameDecoder("bcd2").feed(wire)


@pytest.mark.parametrize("reserved", [b"\x00\x01", b"\x80\x00"])
def test_binary2r_refuses_reserved_bytes_that_are_not_zero(reserved: bytes) -> None:
    with pytest.raises(BadLengthHeader, match="reserved"):
        FrameDecoder("binary2r").feed(b"\x00\x04" + reserved + b"ABCD")


def test_a_tpdu_not_starting_with_0x60_is_refused_as_soon_as_its_first_byte_arrives() -> None:
    decoder = FrameDecoder("binary2", FramingOptions(tpdu=True))
    assert decoder.feed(b"\x00\x20") == []
    assert decoder.partial
    with pytest.raises(BadFrameHeader):
        decoder.feed(b"\x61")


def test_a_length_too_short_for_the_tpdu_is_refused() -> None:
    with pytest.raises(BadLengthHeader):
        FrameDecoder("binary2", FramingOptions(tpdu=True)).feed(b"\x00\x03\x60\x00\x01")


def test_after_an_error_the_decoder_stays_failed() -> None:
    decoder = FrameDecoder("ascii4")
    with pytest.raises(BadLengthHeader):
        decoder.feed(b"00X4ABCD")
    assert isinstance(decoder.error, BadLengthHeader)
    for more in (b"0004ABCD", b"", b"0"):
        with pytest.raises(BadLengthHeader):
            decoder.feed(more)


def test_good_frames_before_a_bad_header_in_one_chunk_are_not_returned() -> None:
    decoder = FrameDecoder("ascii4")
    with pytest.raises(BadLengthHeader):
        decoder.feed(b"0004ABCD" + b"ZZZZ")
    with pytest.raises(FrameError):
        decoder.feed(b"0004ABCD")


def test_error_messages_never_contain_message_bytes() -> None:
    # Each stream loses its framing right where the message sits, so a careless
    # error would quote the PAN in it.
    cases = [
        ("ascii4", FramingOptions(), b"00X4" + MESSAGE),
        ("ascii4", FramingOptions(max_frame=16), PAN),
        ("bcd2", FramingOptions(), b"\xaa\xbb" + MESSAGE),
        ("binary2r", FramingOptions(), b"\x00\x10\x01\x00" + MESSAGE),
        ("binary2", FramingOptions(max_frame=16), b"\x00\x20" + MESSAGE),
        ("binary2", FramingOptions(tpdu=True), b"\x00\x20\x61" + MESSAGE),
        ("binary4", FramingOptions(header=NETWORK_HEADER), b"\x00\x00\x00\x05" + MESSAGE),
        ("ascii4", FramingOptions(length_includes_header=True), b"0001" + MESSAGE),
    ]
    for name, options, wire in cases:
        decoder = FrameDecoder(name, options)
        with pytest.raises(FrameError) as info:
            decoder.feed(encode_frame(name, options, b"0800", TPDU if options.tpdu else b"") + wire)
        again = pytest.raises(FrameError, decoder.feed, b"")
        for exc in (info.value, again.value):
            text = str(exc) + repr(exc) + repr(exc.args) + repr(vars(exc))
            assert PAN.decode() not in text
            assert PAN[6:12].decode() not in text  # the digits no mask may show
            assert "0800" not in text


# --------------------------------------------------------------------------- partial frames


def test_partial_is_true_only_while_a_frame_is_incomplete() -> None:
    decoder = FrameDecoder("ascii4")
    assert not decoder.partial and decoder.pending == 0
    assert decoder.feed(b"00") == []
    assert decoder.partial and decoder.pending == 2
    assert decoder.feed(b"04AB") == []
    assert decoder.partial and decoder.pending == 6
    assert decoder.feed(b"CD00") == [Frame(b"ABCD", b"", False)]
    assert decoder.partial and decoder.pending == 2
    assert decoder.feed(b"00") == [Frame(b"", b"", True)]
    assert not decoder.partial and decoder.pending == 0


def test_a_frame_split_anywhere_completes_once_its_last_byte_arrives() -> None:
    wire = encode_frame("binary2r", FramingOptions(tpdu=True), MESSAGE, TPDU)
    for cut in range(1, len(wire)):
        decoder = FrameDecoder("binary2r", FramingOptions(tpdu=True))
        assert decoder.feed(wire[:cut]) == []
        assert decoder.partial
        assert decoder.feed(wire[cut:]) == [Frame(MESSAGE, TPDU, False)]
        assert not decoder.partial


def test_feeding_nothing_changes_nothing() -> None:
    decoder = FrameDecoder("binary2")
    assert decoder.feed(b"") == []
    assert decoder.feed(b"\x00") == []
    assert decoder.feed(b"") == []
    assert decoder.pending == 1


def test_frames_come_out_as_bytes_whatever_buffer_type_is_fed() -> None:
    frames = FrameDecoder("binary2").feed(bytearray(b"\x00\x02AB"))
    assert type(frames[0].message) is bytes
    decoder = FrameDecoder("binary2", FramingOptions(tpdu=True))
    decoder.feed(b"\x00")
    (frame,) = decoder.feed(memoryview(b"\x07" + TPDU + b"AB"))
    assert type(frame.message) is bytes and type(frame.header) is bytes


def test_a_long_trickled_frame_is_buffered_in_linear_time() -> None:
    # 200 frames fed one byte at a time must not copy the buffer per byte.
    framer = Framer("binary2", FramingOptions(max_frame=DEFAULT_MAX_FRAME))
    wire = framer.encode(b"x" * 8000) * 20
    decoder = framer.decoder()
    count = 0
    for i in range(len(wire)):
        count += len(decoder.feed(wire[i : i + 1]))
    assert count == 20


# --------------------------------------------------------------------------- TPDU and headers


def test_tpdu_reply_swaps_destination_and_source_nii() -> None:
    assert tpdu_reply(b"\x60\x00\x01\x00\x02") == b"\x60\x00\x02\x00\x01"
    assert tpdu_reply(tpdu_reply(TPDU)) == TPDU


def test_tpdu_reply_refuses_what_is_not_a_tpdu() -> None:
    for bad in (b"", b"\x60\x00\x01\x00", b"\x61\x00\x01\x00\x02"):
        with pytest.raises(ValueError):
            tpdu_reply(bad)


def test_a_framer_answers_a_tpdu_frame_with_the_niis_swapped() -> None:
    framer = Framer("binary2", FramingOptions(tpdu=True))
    (request,) = framer.decoder().feed(framer.encode(MESSAGE, TPDU))
    reply = framer.encode(b"0110", framer.reply_header(request.header))
    assert reply == b"\x00\x09\x60\x00\x02\x00\x01" + b"0110"


def test_a_framer_answers_a_fixed_header_frame_with_the_same_header() -> None:
    framer = Framer("ascii4", FramingOptions(header=NETWORK_HEADER))
    assert framer.reply_header(b"ISO026000099") == b"ISO026000099"


def test_encoding_on_a_tpdu_link_without_a_tpdu_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        encode_frame("binary2", FramingOptions(tpdu=True), MESSAGE)
    with pytest.raises(ValueError):
        encode_frame("binary2", FramingOptions(tpdu=True), MESSAGE, b"\x61\x00\x01\x00\x02")


def test_a_header_that_does_not_fit_the_options_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        encode_frame("binary2", FramingOptions(), MESSAGE, TPDU)
    with pytest.raises(ValueError):
        encode_frame("binary2", FramingOptions(header=NETWORK_HEADER), MESSAGE, b"short")


# --------------------------------------------------------------------------- options and config


def test_header_and_tpdu_are_exclusive() -> None:
    with pytest.raises(ValueError):
        FramingOptions(header=b"HDR", tpdu=True)


@pytest.mark.parametrize(
    "kwargs",
    [{"max_frame": 0}, {"max_frame": True}, {"header": b""}, {"tpdu": 1}, {"length_includes_header": "yes"}],
)
def test_options_with_wrong_values_are_refused(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        FramingOptions(**kwargs)


def test_framer_from_config_builds_a_working_framer() -> None:
    framer = framer_from_config("binary2r", max_frame=2048, length_includes_header=False)
    assert framer.name == "binary2r"
    assert framer.options == FramingOptions(max_frame=2048)
    assert framer.decoder().feed(framer.encode(b"ABCD")) == [Frame(b"ABCD", b"", False)]


def test_framer_from_config_reads_a_header_given_as_hex() -> None:
    framer = framer_from_config("ascii4", header="49534f")
    assert framer.options.header == b"ISO"


def test_framer_from_config_names_the_known_framings_for_an_unknown_one() -> None:
    with pytest.raises(ConfigError) as info:
        framer_from_config("ascii2", source="gateway.toml", where="upstreams.cmi.framing")
    exc = info.value
    assert (exc.source, exc.where) == ("gateway.toml", "upstreams.cmi.framing")
    for known in FRAMINGS:
        assert known in exc.reason


@pytest.mark.parametrize(
    ("options", "where"),
    [
        ({"max_size": 10}, "framing.max_size"),
        ({"max_frame": -1}, "framing.max_frame"),
        ({"header": "zz"}, "framing.header"),
        ({"header": "60", "tpdu": True}, "framing.header"),
        ({"tpdu": "true"}, "framing.tpdu"),
        ({"tpdu": True, "max_frame": 5}, "framing.max_frame"),
    ],
)
def test_framer_from_config_reports_a_bad_option_at_its_key(options: dict, where: str) -> None:
    with pytest.raises(ConfigError) as info:
        framer_from_config("binary2", source="gateway.toml", **options)
    assert info.value.where == where


def test_every_framing_name_is_its_class_name_in_the_table() -> None:
    for name, cls in FRAMINGS.items():
        assert cls.name == name
        assert cls().write(0) and len(cls().write(0)) == cls.size
    assert len(set(FRAMINGS.values())) == len(FRAMINGS)
    # Every pair of framings differs on the wire for the same message.
    wires = {name: encode_frame(name, None, b"ABCD") for name in FRAMINGS}
    for a, b in itertools.combinations(FRAMINGS, 2):
        if wires[a] == wires[b]:
            assert {a, b} == {"binary2", "bcd2"}  # 4 is the same in binary and BCD
