"""Dialects: the shipped ones load, read other implementations' bytes, and bad files are refused.

The captures under ``tests/captures/`` were written by other ISO 8583
implementations (jPOS, moov-io); their expected values are those
implementations' own readings, never our codec's output. See the README there.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from iso_gateway.core.dialect import FieldDef, check_field_type, prefix_width
from iso_gateway.specfiles import dialect_paths, get_dialect, load_dialect_file, parse_dialect
from iso_gateway.core.errors import ConfigError, FieldTypeError
from iso_gateway.core.message import build_response, decode, encode

CAPTURES = Path(__file__).parent / "captures"
SHIPPED = ("iso87ascii", "iso87binary", "iso93ascii")


def _load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


MESSAGE_CAPTURES = sorted(p for p in CAPTURES.glob("*.json") if "hex" in _load(p))
STREAM_CAPTURES = sorted(p for p in CAPTURES.glob("*.json") if "stream_hex" in _load(p))


def _as_dialect_shows(kind: str, fd: FieldDef, value: str) -> str:
    """The producer's value in the form our dialect shows it (documented in the capture)."""
    if kind == "sign_byte_as_hex":  # jPOS IFB_AMOUNT: ASCII C/D byte, then BCD digits
        return f"{ord(value[0]):02X}{value[1:]}"
    if kind == "separator_as_D":  # BCD track 2: '=' is the nibble D
        return value.replace("=", "D")
    if kind == "zero_pad_stripped":  # the producer drops the left zero pad of a fixed n field
        return value.zfill(fd.length)
    raise AssertionError(f"unknown representation kind {kind!r}")


def _expected(capture: dict, fields: dict[str, str]) -> dict[str, str]:
    dialect = get_dialect(capture["dialect"])
    mapping = capture.get("representation", {})
    out = {}
    for key, value in fields.items():
        if key in mapping:
            value = _as_dialect_shows(mapping[key]["kind"], dialect.fields[int(key)], value)
        out[key] = value
    return out


def _type_breakers(capture: dict, msg: dict[str, str]) -> set[str]:
    dialect = get_dialect(capture["dialect"])
    return {k for k in msg if k.isdigit() and check_field_type(dialect.fields[int(k)], msg[k]) is not None}


# --------------------------------------------------------------------------- shipped dialects


@pytest.mark.parametrize("name", sorted(dialect_paths()))
def test_every_shipped_dialect_loads_and_is_named_after_its_file(name):
    dialect = get_dialect(name)
    assert dialect.name == name
    assert set(dialect.fields) == set(range(2, 129)) - {65}  # bit 65 marks a tertiary bitmap: never a field
    assert set(dialect.echo) <= set(dialect.fields)


def test_the_dialects_this_gateway_promises_are_all_shipped():
    assert set(SHIPPED) <= set(dialect_paths())


def test_the_1993_dialect_says_1993_and_echoes_original_data_in_56_not_90():
    d93 = get_dialect("iso93ascii")
    assert d93.standard == "1993"
    assert 56 in d93.echo and 90 not in d93.echo
    assert 24 in d93.echo  # the function code comes back unchanged
    assert d93.fields[12].format == "n12"
    assert d93.fields[22].format == "an12"
    assert d93.fields[39].format == "n3"
    assert d93.fields[43].format == "ans..99"
    assert d93.fields[56].format == "n..35"


def test_the_1987_binary_dialect_writes_bcd_numbers_and_bcd_length_prefixes():
    d = get_dialect("iso87binary")
    assert d.mti_encoding == "bcd" and d.bitmap_encoding == "binary"
    pan = d.fields[2]
    assert (pan.encoding, pan.length_encoding, pan.bcd_pad, prefix_width(pan)) == ("bcd", "bcd", "right", 1)
    assert d.fields[3].bcd_pad == "left"
    assert d.fields[49].encoding == "ascii"  # IF_CHAR in the jPOS packager
    assert prefix_width(d.fields[55]) == 2 and d.fields[55].encoding == "raw"


# jPOS field class -> (encoding, length prefix digits, prefix encoding, wire unit)
_JPOS_CLASSES = {
    "IFA_NUMERIC": ("ascii", 0, None),
    "IFA_LLNUM": ("ascii", 2, "ascii"),
    "IFA_LLCHAR": ("ascii", 2, "ascii"),
    "IFA_LLLCHAR": ("ascii", 3, "ascii"),
    "IFA_BINARY": ("hex", 0, None),
    "IFA_LLBINARY": ("raw", 2, "ascii"),
    "IFA_LLLBINARY": ("raw", 3, "ascii"),
    "IFA_AMOUNT": ("ascii", 0, None),
    "IF_CHAR": ("ascii", 0, None),
    "IFB_NUMERIC": ("bcd", 0, None),
    "IFB_LLNUM": ("bcd", 2, "bcd"),
    "IFB_LLCHAR": ("ascii", 2, "bcd"),
    "IFB_LLLCHAR": ("ascii", 3, "bcd"),
    "IFB_BINARY": ("raw", 0, None),
    "IFB_LLLBINARY": ("raw", 3, "bcd"),
    "IFB_AMOUNT": ("raw", 0, None),  # declared binary: see iso87binary.toml
}


@pytest.mark.parametrize("name", SHIPPED)
def test_each_field_is_written_as_the_jpos_packager_writes_it(name):
    packager = _load(CAPTURES / "jpos-packagers.json")["packagers"][name]
    dialect = get_dialect(name)
    wrong = []
    for key, (cls, length, *pad) in packager.items():
        if key == "65":
            continue  # jPOS packs a field 65; to pyiso8583 bit 65 is a tertiary bitmap, so no dialect defines it
        fd = dialect.fields[int(key)]
        encoding, prefix, prefix_encoding = _JPOS_CLASSES[cls]
        want_length = 1 + length // 2 if cls == "IFB_AMOUNT" else length  # sign byte + BCD bytes
        got = (fd.encoding, fd.prefix, fd.length_encoding if fd.prefix else None, fd.length)
        if got != (encoding, prefix, prefix_encoding, want_length):
            wrong.append((key, cls, length, got))
        if encoding == "bcd" and pad and fd.bcd_pad != ("left" if pad[0] else "right"):
            wrong.append((key, cls, "pad", fd.bcd_pad))
    assert wrong == []


# --------------------------------------------------------------------------- captures


def test_every_shipped_dialect_has_captures_from_another_implementation():
    covered = {_load(p)["dialect"] for p in MESSAGE_CAPTURES + STREAM_CAPTURES}
    assert set(SHIPPED) <= covered


def test_a_1993_capture_carries_more_than_60_fields():
    counts = [len(_load(p)["fields"]) for p in MESSAGE_CAPTURES if _load(p)["dialect"] == "iso93ascii"]
    assert max(counts) > 60


def test_every_capture_says_who_produced_it():
    for p in MESSAGE_CAPTURES + STREAM_CAPTURES:
        c = _load(p)
        assert c["producer"] and c["values"], p.name


@pytest.mark.parametrize("path", MESSAGE_CAPTURES, ids=lambda p: p.stem)
def test_a_capture_decodes_field_for_field_to_the_producers_values(path):
    capture = _load(path)
    dialect = get_dialect(capture["dialect"])
    msg = decode(dialect, bytes.fromhex(capture["hex"]), check_types=False)
    assert msg == _expected(capture, capture["fields"])


@pytest.mark.parametrize("path", MESSAGE_CAPTURES, ids=lambda p: p.stem)
def test_a_capture_re_encodes_byte_for_byte(path):
    capture = _load(path)
    dialect = get_dialect(capture["dialect"])
    raw = bytes.fromhex(capture["hex"])
    msg = decode(dialect, raw, check_types=False)
    assert encode(dialect, msg, check_types=False) == raw
    # and from the producer's values, as the dialect shows them
    assert encode(dialect, _expected(capture, capture["fields"]), check_types=False) == raw


@pytest.mark.parametrize("path", MESSAGE_CAPTURES, ids=lambda p: p.stem)
def test_the_type_check_refuses_exactly_the_fields_a_capture_declares_off_type(path):
    capture = _load(path)
    dialect = get_dialect(capture["dialect"])
    raw = bytes.fromhex(capture["hex"])
    declared = set(capture.get("type_exceptions", {}).get("fields", []))
    assert _type_breakers(capture, decode(dialect, raw, check_types=False)) == declared
    if declared:
        with pytest.raises(FieldTypeError) as err:
            decode(dialect, raw)
        assert err.value.field == min(declared, key=int)
    else:
        decode(dialect, raw)


def _split(stream: bytes, framing: dict) -> list[tuple[bytes, bytes, bytes]]:
    """(header, tpdu, message) per frame, cut by the capture's own description of its framing."""
    tpdu_len = len(bytes.fromhex(framing["tpdu"])) if framing["tpdu"] else 0
    frames, i = [], 0
    while i < len(stream):
        if framing["length_header"] == "4 ASCII digits":
            header, n = stream[i : i + 4], int(stream[i : i + 4].decode("ascii"))
        elif framing["length_header"] == "2 bytes, binary big-endian":
            header, n = stream[i : i + 2], int.from_bytes(stream[i : i + 2], "big")
        else:
            raise AssertionError(framing)
        i += len(header)
        body = stream[i : i + n]
        assert len(body) == n, "truncated frame"
        i += n
        frames.append((header, body[:tpdu_len], body[tpdu_len:]))
    return frames


@pytest.mark.parametrize("path", STREAM_CAPTURES, ids=lambda p: p.stem)
def test_a_framed_stream_cuts_into_messages_that_decode_to_the_producers_values(path):
    capture = _load(path)
    dialect = get_dialect(capture["dialect"])
    stream = bytes.fromhex(capture["stream_hex"])
    frames = _split(stream, capture["framing"])
    assert len(frames) == len(capture["frames"]) >= 2
    rebuilt = b""
    for (header, tpdu, body), want in zip(frames, capture["frames"], strict=True):
        assert header.hex().upper() == want["header"]
        assert (tpdu.hex().upper() or None) == want["tpdu"]
        assert body.hex().upper() == want["hex"]
        msg = decode(dialect, body, check_types=False)
        assert msg == _expected(capture, want["fields"])
        rebuilt += header + tpdu + encode(dialect, msg, check_types=False)
    assert rebuilt == stream


def test_a_1993_reversal_response_echoes_the_original_data_elements_and_encodes():
    capture = _load(CAPTURES / "jpos-iso93ascii-1420.json")
    dialect = get_dialect("iso93ascii")
    request = decode(dialect, bytes.fromhex(capture["hex"]))
    response = build_response(dialect, request, "000")
    assert response["t"] == "1430"
    assert response["56"] == request["56"] and response["24"] == request["24"]
    assert decode(dialect, encode(dialect, response)) == response


# --------------------------------------------------------------------------- type checks


def test_letters_in_an_n_field_raise_a_field_type_error_from_decode():
    capture = _load(CAPTURES / "jpos-iso87ascii-0800.json")
    dialect = get_dialect("iso87ascii")
    raw = bytes.fromhex(capture["hex"]).replace(b"000001", b"00A001", 1)
    with pytest.raises(FieldTypeError) as err:
        decode(dialect, raw)
    assert err.value.field == "11"
    assert "00A001" not in str(err.value)


def test_a_non_decimal_nibble_in_a_bcd_n_field_raises_a_field_type_error_from_decode():
    capture = _load(CAPTURES / "jpos-iso87binary-0800.json")
    dialect = get_dialect("iso87binary")
    raw = bytes.fromhex(capture["hex"].replace("0611143000" + "000001", "0611143000" + "00A001", 1))
    with pytest.raises(FieldTypeError) as err:
        decode(dialect, raw)
    assert err.value.field == "11"


def test_letters_in_an_n_field_are_refused_on_encode_too():
    with pytest.raises(FieldTypeError) as err:
        encode(get_dialect("iso93ascii"), {"t": "1804", "11": "00A001", "24": "831"})
    assert err.value.field == "11"


# --------------------------------------------------------------------------- bad dialect files

_GOOD = """\
name = "probe"
title = "Probe"
standard = "1987"

[card_data]
pan = [2]
mask = []
remove = []
presence = []

[response]
echo = [11]

[fields]
2 = { type = "n", max = 19, prefix = "LL", name = "PAN" }
11 = { type = "n", len = 6, name = "STAN" }
"""


def _refusal(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as err:
        parse_dialect(text, "probe.toml")
    assert err.value.source == "probe.toml"
    assert str(err.value).startswith("probe.toml")
    return err.value


def test_the_minimal_probe_dialect_is_accepted():
    assert parse_dialect(_GOOD, "probe.toml").fields[11].format == "n6"


@pytest.mark.parametrize(
    ("text", "where", "reason"),
    [
        pytest.param(
            _GOOD.replace('type = "n", len = 6', 'type = "num", len = 6'),
            "fields.11.type",
            "unknown type 'num'",
            id="an unknown field type",
        ),
        pytest.param(
            _GOOD.replace('type = "n", len = 6,', 'type = "n",'),
            "fields.11",
            "give exactly one of 'len'",
            id="a field without len or max",
        ),
        pytest.param(
            _GOOD.replace('max = 19, prefix = "LL",', "max = 19,"),
            "fields.2",
            "needs a 'prefix'",
            id="a variable field without a prefix",
        ),
        pytest.param(
            _GOOD.replace('max = 19, prefix = "LL"', 'max = 190, prefix = "LL"'),
            "fields.2",
            "max 190 does not fit a LL prefix",
            id="a prefix too small for the maximum",
        ),
        pytest.param(
            _GOOD.replace("len = 6,", "len = 6, lenght = 6,"),
            "fields.11.lenght",
            "unknown key",
            id="an unknown key in a field",
        ),
        pytest.param(
            _GOOD.replace("[card_data]", '[wire]\nmti = "bcd"\nbitmpa = "binary"\n\n[card_data]'),
            "wire.bitmpa",
            "unknown key",
            id="an unknown key in wire",
        ),
        pytest.param(_GOOD + "\n[extra]\nx = 1\n", "extra", "unknown key", id="an unknown section"),
        pytest.param(
            _GOOD + '129 = { type = "b", len = 8, name = "x" }\n',
            "fields",
            "field number '129' is not 2..128",
            id="a field number above 128",
        ),
        pytest.param(
            _GOOD + '1 = { type = "b", len = 8, name = "x" }\n',
            "fields",
            "field number '1' is not 2..128",
            id="field 1, the secondary bitmap",
        ),
        pytest.param(
            _GOOD.replace("echo = [11]", "echo = [11, 90]"),
            "response.echo",
            "field 90 is not defined",
            id="an echo naming an undefined field",
        ),
        pytest.param(
            _GOOD.replace("pan = [2]", "pan = [2, 34]"),
            "card_data.pan",
            "field 34 is not defined",
            id="card data naming an undefined field",
        ),
        pytest.param(
            _GOOD.replace("len = 6,", 'len = 6, encoding = "raw",'),
            "fields.11.encoding",
            "'raw' can't carry type 'n'",
            id="an encoding the field type can't use",
        ),
        pytest.param(
            _GOOD.replace('standard = "1987"', 'standard = "1988"'),
            "standard",
            "'1993'",
            id="an unknown standard",
        ),
        pytest.param(_GOOD.replace("[fields]", "[fields"), "", "not valid TOML", id="a file that is not TOML"),
    ],
)
def test_a_bad_dialect_is_refused_with_file_key_path_and_reason(text, where, reason):
    err = _refusal(text)
    assert err.where == where
    assert reason in err.reason


def test_a_bad_dialect_file_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "probe.toml"
    path.write_text(_GOOD.replace("echo = [11]", "echo = [11, 90]"), encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        load_dialect_file(path)
    assert err.value.source == str(path)
    assert err.value.where == "response.echo"


def test_a_dialect_whose_name_differs_from_its_file_name_is_refused(tmp_path):
    (tmp_path / "other.toml").write_text(_GOOD, encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        get_dialect("other", (str(tmp_path),))
    assert err.value.where == "name"
    assert "does not match the file name" in err.value.reason


def test_an_unknown_dialect_name_lists_the_known_ones():
    with pytest.raises(ConfigError) as err:
        get_dialect("iso87nonesuch")
    for name in SHIPPED:
        assert name in err.value.reason


def test_a_dialect_that_defines_field_65_is_refused_with_the_reason():
    text = dialect_paths()["iso87ascii"].read_text().replace("[fields]\n", '[fields]\n65 = { type = "b", len = 1, name = "Bitmap, extended" }\n', 1)
    with pytest.raises(ConfigError, match="tertiary bitmap"):
        parse_dialect(text, "custom.toml")
