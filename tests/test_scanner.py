"""The hot-path scanner and splice agree with pyiso8583's full decode and encode, for every shipped dialect."""

import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from iso_gateway.dialect import FieldDef, dialect_paths, get_dialect
from iso_gateway.errors import DecodeError
from iso_gateway.message import decode, encode
from iso_gateway.scanner import Scanner

DIALECTS = sorted(dialect_paths())
PRINTABLE = string.ascii_letters + string.digits + " .,-/=*"


def value_strategy(fd: FieldDef) -> st.SearchStrategy[str]:
    """Random values that fit the field's type, length and wire encoding."""
    if fd.type == "b":
        size = st.just(fd.length) if fd.fixed else st.integers(0, min(fd.length, 40))
        return size.flatmap(lambda n: st.binary(min_size=n, max_size=n).map(lambda b: b.hex().upper()))
    if fd.type in ("n", "z"):
        alphabet = string.digits
    elif fd.type == "x+n":
        return st.sampled_from("CD").flatmap(
            lambda s: st.text(string.digits, min_size=fd.length - 1, max_size=fd.length - 1).map(lambda d: s + d))
    elif fd.type == "a":
        alphabet = string.ascii_letters + " "
    elif fd.type in ("an", "anp"):
        alphabet = string.ascii_letters + string.digits + " "
    else:
        alphabet = PRINTABLE
    if fd.fixed:
        return st.text(alphabet, min_size=fd.length, max_size=fd.length)
    return st.text(alphabet, min_size=1, max_size=min(fd.length, 60))


@st.composite
def messages(draw, dialect_name: str):
    dialect = get_dialect(dialect_name)
    numbers = sorted(n for n in dialect.fields if n not in (65,))
    chosen = draw(st.lists(st.sampled_from(numbers), min_size=1, max_size=25, unique=True))
    for must in (11, 41):
        if must in dialect.fields and must not in chosen:
            chosen.append(must)
    msg = {"t": draw(st.sampled_from(["0100", "0110", "0200", "0420", "0800"]))}
    for n in chosen:
        msg[str(n)] = draw(value_strategy(dialect.fields[n]))
    return dialect, msg


@pytest.mark.parametrize("dialect_name", DIALECTS)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_scan_reads_the_same_values_as_a_full_decode(dialect_name, data):
    dialect, msg = data.draw(messages(dialect_name))
    raw = encode(dialect, msg, check_types=False)
    wanted = {11, 37, 38, 39, 41, 42} & set(dialect.fields)
    scan = Scanner(dialect, wanted).scan(raw, full=True)
    full = decode(dialect, raw, check_types=False)
    assert scan.mti == full["t"]
    assert scan.end == len(raw)
    assert {str(k): v for k, v in scan.values.items()} == {k: full[k] for k in map(str, wanted) if k in full}
    assert scan.present() == sorted(int(k) for k in full if k.isdigit())


@pytest.mark.parametrize("dialect_name", DIALECTS)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), full=st.booleans())
def test_every_field_read_equals_the_full_decode_on_the_text_walk_and_the_byte_walk(dialect_name, data, full):
    dialect, msg = data.draw(messages(dialect_name))
    raw = encode(dialect, msg, check_types=False)
    everything = set(dialect.fields) - {1}
    decoded = decode(dialect, raw, check_types=False)
    byte_walk = Scanner(dialect, everything)
    byte_walk._text = [False] * 129  # as if no field were plain text: the general walk
    scans = [scanner.scan(raw, full=full) for scanner in (Scanner(dialect, everything), byte_walk)]
    assert scans[0] == scans[1]
    assert {str(k): v for k, v in scans[0].values.items()} == {k: v for k, v in decoded.items() if k.isdigit()
                                                               and k not in ("1", "p", "s")}


@pytest.mark.parametrize("dialect_name", DIALECTS)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), stan=st.integers(1, 999_999))
def test_splicing_the_stan_equals_encoding_with_the_new_stan(dialect_name, data, stan):
    dialect, msg = data.draw(messages(dialect_name))
    if not dialect.fields[11].fixed:
        pytest.skip("STAN is not fixed-length in this dialect")
    raw = encode(dialect, msg, check_types=False)
    scanner = Scanner(dialect, {11})
    new = f"{stan:0{dialect.fields[11].length}d}"
    spliced = scanner.splice(raw, scanner.scan(raw), 11, new)
    assert spliced == encode(dialect, {**msg, "11": new}, check_types=False)


@pytest.mark.parametrize("dialect_name", DIALECTS)
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_every_truncation_is_a_decode_error_never_a_crash(dialect_name, data):
    dialect, msg = data.draw(messages(dialect_name))
    raw = encode(dialect, msg, check_types=False)
    cut = data.draw(st.integers(0, len(raw) - 1))
    with pytest.raises(DecodeError):
        Scanner(dialect, {11}).scan(raw[:cut], full=True)


@pytest.mark.parametrize("dialect_name", DIALECTS)
@settings(max_examples=200, deadline=None)
@given(garbage=st.binary(max_size=200))
def test_garbage_gives_a_typed_error_or_a_scan_and_never_leaks_bytes(dialect_name, garbage):
    dialect = get_dialect(dialect_name)
    try:
        Scanner(dialect, {2, 11}).scan(garbage, full=True)
    except DecodeError as exc:
        assert garbage[4:].hex() not in str(exc) or len(garbage) <= 8


def test_a_pan_in_a_broken_message_is_not_in_the_error_text():
    dialect = get_dialect("iso87ascii")
    raw = encode(dialect, {"t": "0100", "2": "4761739001010119", "11": "000001"})
    with pytest.raises(DecodeError) as info:
        Scanner(dialect, {2, 11}).scan(raw[:-3], full=True)
    assert "4761739001010119" not in str(info.value)
    assert "field 11" in str(info.value)


def test_values_read_before_an_error_are_kept_for_the_reject():
    dialect = get_dialect("iso87ascii")
    raw = encode(dialect, {"t": "0100", "11": "000123", "41": "TERM0001", "42": "MERCHANT0000001"})
    found: dict[int, str] = {}
    with pytest.raises(DecodeError):
        Scanner(dialect, {11, 41, 42}).scan(raw[:-4], full=True, found=found)
    assert found == {11: "000123", 41: "TERM0001"}
