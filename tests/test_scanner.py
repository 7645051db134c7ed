"""The hot-path scanner and splice agree with pyiso8583's full decode and encode, for every shipped dialect."""

import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from iso_gateway.core.dialect import FieldDef
from iso_gateway.specfiles import dialect_paths, get_dialect
from iso_gateway.core.errors import DecodeError
from iso_gateway.core.message import decode, encode
from iso_gateway.core.scanner import Scanner

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


# --------------------------------------------------------------------------- invalid inputs: scan == decode

# Characters a hostile bitmap is written in: hex digits, and what int(x, 16) or bytes.fromhex
# also take (signs, underscores, spaces, "0x"), and some that nothing takes.
HOSTILE_BITMAP = b"0123456789abcdefABCDEF+-_ xX\t\n\x00\xff.gG"


def _mtis() -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.binary(min_size=0, max_size=4),
        st.text("0123456789", min_size=4, max_size=4).map(str.encode),
        st.sampled_from([b"0100", b"0420", b"0190", b"0900", b"01 0", b"+100", b"0\xb20\x00", b"\xf0\xf1\xf0\xf0"]),
    )


@st.composite
def hostile_messages(draw, dialect_name: str):
    """A valid message of the dialect, then 1 to 3 mutations: byte flips, insertions,
    deletions, truncation, bitmap characters from a hostile alphabet, a bit set in the
    bitmap (65 among them), a random MTI."""
    dialect, msg = draw(messages(dialect_name))
    raw = bytearray(encode(dialect, msg, check_types=False))
    mti_len = 2 if dialect.mti_encoding == "bcd" else 4
    bitmap_len = 16 if dialect.bitmap_encoding == "hex" else 8
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "bitmap_char", "bit", "bit65", "mti"]))
        n = len(raw)
        if op == "flip" and n:
            i = draw(st.integers(0, n - 1))
            raw[i] = draw(st.integers(0, 255))
        elif op == "insert":
            i = draw(st.integers(0, n))
            raw[i:i] = draw(st.binary(min_size=1, max_size=4))
        elif op == "delete" and n:
            i = draw(st.integers(0, n - 1))
            del raw[i:i + draw(st.integers(1, 4))]
        elif op == "truncate" and n:
            del raw[draw(st.integers(0, n - 1)):]
        elif op == "bitmap_char" and dialect.bitmap_encoding == "hex" and n > mti_len:
            i = draw(st.integers(mti_len, min(n, mti_len + 2 * bitmap_len) - 1))
            raw[i] = draw(st.sampled_from(HOSTILE_BITMAP))
        elif op in ("bit", "bit65") and n >= mti_len + bitmap_len:
            field = 65 if op == "bit65" else draw(st.integers(1, 128))
            secondary = field > 64
            start = mti_len + (bitmap_len if secondary else 0)
            if secondary and n < start + bitmap_len:
                continue
            chunk = bytes(raw[start:start + bitmap_len])
            try:
                value = int(chunk, 16) if dialect.bitmap_encoding == "hex" else int.from_bytes(chunk, "big")
            except ValueError:
                continue
            value |= 1 << (64 - ((field - 1) % 64) - 1)
            new = f"{value:016X}".encode() if dialect.bitmap_encoding == "hex" else value.to_bytes(8, "big")
            raw[start:start + bitmap_len] = new
        elif op == "mti":
            raw[:mti_len] = draw(_mtis())
    return dialect, bytes(raw)


def _decoded(dialect, raw):
    try:
        return decode(dialect, raw, check_types=False)
    except DecodeError:
        return None


def _scanned(scanner, raw):
    try:
        return scanner.scan(raw, full=True)
    except DecodeError:
        return None


@pytest.mark.parametrize("dialect_name", DIALECTS)
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_a_full_scan_refuses_exactly_what_the_full_decode_refuses_and_reads_the_same_values(dialect_name, data):
    dialect, raw = data.draw(hostile_messages(dialect_name))
    full = _decoded(dialect, raw)
    everything = set(dialect.fields)
    for scanner in (Scanner(dialect, everything), Scanner(dialect, {11, 41}), Scanner(dialect, ())):
        scan = _scanned(scanner, raw)
        assert (scan is None) == (full is None), ("scan accepts" if full is None else "scan refuses", raw)
        if scan is not None:
            assert scan.mti == full["t"]
            assert scan.present() == sorted(int(k) for k in full if k.isdigit())
            assert {str(k): v for k, v in scan.values.items()} == {
                k: v for k, v in full.items() if k.isdigit() and int(k) in scanner.wanted}


# Only dialects whose bitmap is written as hex text: in a binary bitmap every byte value is a bitmap.
HEX_BITMAP_DIALECTS = [name for name in DIALECTS if get_dialect(name).bitmap_encoding == "hex"]


@pytest.mark.parametrize("dialect_name", HEX_BITMAP_DIALECTS)
def test_a_bitmap_written_as_signed_hex_or_with_spaces_is_refused_by_scan_and_decode(dialect_name):
    dialect = get_dialect(dialect_name)
    raw = encode(dialect, {"t": "1100" if dialect.standard == "1993" else "0100", "11": "000123", "41": "TERM0001"},
                 check_types=False)
    bitmap = raw[4:20]
    for bad in (b"-" + bitmap[1:], b"+" + bitmap[1:], bitmap[:15] + b" ", b" " + bitmap[:15],
                bitmap[:2] + b"_" + bitmap[3:], b"0x" + bitmap[2:], bitmap[:2] + b" " + bitmap[2:14] + b" "):
        hostile = raw[:4] + bad + raw[20:]
        with pytest.raises(DecodeError):
            Scanner(dialect, {11, 41}).scan(hostile, full=True)
        with pytest.raises(DecodeError):
            decode(dialect, hostile, check_types=False)


@pytest.mark.parametrize("dialect_name", DIALECTS)
def test_bit_65_is_a_format_error_for_scan_and_decode_never_a_key_error(dialect_name):
    dialect = get_dialect(dialect_name)
    mti = "1420" if dialect.standard == "1993" else "0420"
    raw = encode(dialect, {"t": mti, "11": "000123", "41": "TERM0001", "70": "301"}, check_types=False)
    hexmap = dialect.bitmap_encoding == "hex"
    mti_len, size = (4, 16) if hexmap else (2, 8)
    start = mti_len + size
    secondary = int(raw[start:start + size], 16) if hexmap else int.from_bytes(raw[start:start + size], "big")
    secondary |= 1 << 63
    sec = f"{secondary:016X}".encode() if hexmap else secondary.to_bytes(8, "big")
    tertiary = b"8000000000000000" if hexmap else b"\x80" + bytes(7)  # field 129: pyiso8583's KeyError
    for extra in (tertiary, b"00", b""):
        hostile = raw[:start] + sec + extra + raw[start + size:]
        with pytest.raises(DecodeError):
            Scanner(dialect, {11, 41}).scan(hostile, full=True)
        with pytest.raises(DecodeError):
            decode(dialect, hostile, check_types=False)


def test_each_known_difference_between_the_old_scan_and_decode_is_refused_by_both():
    a87, b87 = get_dialect("iso87ascii"), get_dialect("iso87binary")
    ascii_raw = encode(a87, {"t": "0100", "2": "4761739001010119", "11": "000123", "41": "TERM0001"})
    pos = ascii_raw.index(b"164761739001010119")
    binary_raw = encode(b87, {"t": "0100", "11": "000123", "22": "812", "41": "TERM0001", "43": "SHOP".ljust(40)})
    cases = [
        (a87, ascii_raw[:pos] + b"+6" + ascii_raw[pos + 2:], "a signed length prefix"),
        (a87, ascii_raw[:pos] + b" 6" + ascii_raw[pos + 2:], "a length prefix with a space"),
        (a87, b"01\xb200" + ascii_raw[4:], "a non-ASCII digit in the MTI"),
        (a87, b"0900" + ascii_raw[4:], "an MTI of no class"),
        (b87, binary_raw.replace(b"\x08\x12", b"\x18\x12"), "a wrong pad nibble in an odd BCD value"),
        (b87, binary_raw.replace(b"SHOP", b"SH\xd6P"), "a non-ASCII byte in a text field nobody reads"),
    ]
    for dialect, raw, _what in cases:
        with pytest.raises(DecodeError):
            decode(dialect, raw, check_types=False)
        with pytest.raises(DecodeError):
            Scanner(dialect, {11}).scan(raw, full=True)


@pytest.mark.parametrize("name", ["iso87ascii", "iso87binary", "iso93ascii"])
def test_field_64_added_and_dropped_in_place_as_an_encode_would(name: str) -> None:
    """A MAC field added to (or dropped from) the end of a message without a secondary bitmap: the
    bitmap's last bit and the message's last bytes, nothing else; refused where it doesn't apply."""
    d = get_dialect(name)
    sc = Scanner(d)
    mti = "1100" if name.startswith("iso93") else "0100"
    base = {"t": mti, "3": "000000", "4": "000000001500", "11": "000123", "41": "TERM0001"}
    placeholder = "0" * 16
    plain, with64 = encode(d, base), encode(d, {**base, "64": placeholder})
    bitmap = sc.scan(plain, full=True).bitmap
    assert sc.can_add_last_64(bitmap) and not sc.can_drop_last_64(bitmap)
    assert sc.add_last_64(plain) == with64
    bitmap64 = sc.scan(with64, full=True).bitmap
    assert sc.can_drop_last_64(bitmap64) and not sc.can_add_last_64(bitmap64)
    assert sc.drop_last_64(with64) == plain
    # Past field 64 (a secondary bitmap): neither applies; the gateway decodes such a message.
    past = sc.scan(encode(d, {**base, "100": "12345"}), full=True).bitmap
    assert not sc.can_add_last_64(past) and not sc.can_drop_last_64(past)
    past64 = sc.scan(encode(d, {**base, "64": placeholder, "100": "12345"}), full=True).bitmap
    assert not sc.can_add_last_64(past64) and not sc.can_drop_last_64(past64)
    if d.bitmap_encoding == "hex":  # a lower-case hex bitmap keeps its case
        lower = plain[:4] + plain[4:20].lower() + plain[20:]
        added = sc.add_last_64(lower)
        assert added[4:20] == with64[4:20].lower() and added[20:] == with64[20:]
