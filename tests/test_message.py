"""MTI rules, the codec's typed errors, responses, field 90 and masking."""

import pytest

from iso_gateway.specfiles import get_dialect
from iso_gateway.core.errors import DecodeError, EncodeError, FieldTypeError, MessageError
from iso_gateway.core.masking import mask_message, mask_pan, scrub
from iso_gateway.core.message import (
    OriginalData, build_response, decode, encode, is_repeat, match_class, original_mti, repeat_mti, request_mti,
    response_mti,
)

PAN = "4761739001010119"
D = get_dialect("iso87ascii")


def auth(**extra):
    msg = {"t": "0100", "2": PAN, "3": "000000", "4": "000000015000", "7": "1127103000", "11": "000123",
           "14": "2812", "37": "633110000123", "41": "TERM0001", "42": "MERCHANT0000001", "49": "504"}
    msg.update(extra)
    return msg


@pytest.mark.parametrize("req,resp", [("0100", "0110"), ("0200", "0210"), ("0420", "0430"), ("0421", "0430"),
                                      ("0400", "0410"), ("0800", "0810"), ("0120", "0130")])
def test_the_response_mti_of_a_request(req, resp):
    assert response_mti(req) == resp
    assert match_class(req) == match_class(resp)


def test_repeat_flags():
    assert repeat_mti("0420") == "0421" and repeat_mti("0421") == "0421"
    assert is_repeat("0421") and not is_repeat("0420")
    assert original_mti("0421") == "0420" and request_mti("0430") == "0420"
    with pytest.raises(ValueError):
        response_mti("0110")


def test_decode_and_encode_round_trip():
    raw = encode(D, auth())
    assert decode(D, raw) == auth()


def test_letters_in_a_numeric_field_are_a_type_error_pyiso8583_would_let_through():
    raw = encode(D, auth(**{"4": "00000001500A"}), check_types=False)
    with pytest.raises(FieldTypeError) as info:
        decode(D, raw)
    assert info.value.field == "4"
    assert decode(D, raw, check_types=False)["4"] == "00000001500A"


def test_codec_errors_name_the_field_and_never_the_pan():
    with pytest.raises(MessageError) as info:
        encode(D, auth(**{"2": PAN + "1234"}))  # 20 digits: over n..19
    assert "2" in str(info.value) and PAN not in str(info.value)
    raw = encode(D, auth())
    with pytest.raises(DecodeError) as dinfo:
        decode(D, raw[:30])
    assert PAN not in str(dinfo.value) and PAN[:10] not in str(dinfo.value)


def test_a_response_echoes_the_dialect_echo_fields_and_sets_38_only_on_approval():
    approved = build_response(D, auth(), "00", auth_code="A1B2C3")
    assert approved["t"] == "0110" and approved["39"] == "00" and approved["38"] == "A1B2C3"
    assert approved["11"] == "000123" and approved["41"] == "TERM0001" and approved["2"] == PAN
    assert "14" not in approved  # expiry is not echoed
    declined = build_response(D, auth(), "51", auth_code="A1B2C3")
    assert "38" not in declined


def test_field_90_is_right_justified_and_zero_filled():
    f90 = OriginalData.of(auth(**{"32": "123456"})).encode()
    assert f90 == "0100" + "000123" + "1127103000" + "00000123456" + "00000000000"
    assert len(f90) == 42
    back = OriginalData.parse(f90)
    assert (back.mti, back.stan, back.transmission, back.acquirer, back.forwarder) == (
        "0100", "000123", "1127103000", "123456", "")
    assert OriginalData.of(auth(t="0101")).mti == "0100"  # a repeat points at the original


def test_field_90_refuses_bad_parts():
    with pytest.raises(DecodeError):
        OriginalData.parse("0100")
    with pytest.raises(EncodeError):
        OriginalData(mti="0100", stan="12345X", transmission="1127103000").encode()


def test_masking_shows_at_most_first_six_and_last_four():
    assert mask_pan(PAN) == "476173******0119"
    assert mask_pan("123456789012") == "12******9012"
    assert mask_pan("1234") == "****"
    shown = mask_message(D, auth(**{"35": PAN + "=2812", "52": "0123456789ABCDEF", "64": "00" * 8}))
    assert shown["2"] == "476173******0119" and shown["14"] == "****"
    assert shown["35"] == "[removed]" and shown["52"] == "[removed]" and shown["64"] == "[present]"
    assert PAN not in repr(shown)


def test_scrub_masks_pans_in_free_text_but_not_other_digit_runs():
    assert scrub(f"note {PAN} end") == "note 476173******0119 end"
    assert scrub("amount 000000015000 stan 000123") == "amount 000000015000 stan 000123"
    assert scrub("0100000123112710300000000123456") == "0100000123112710300000000123456"  # too long for a PAN


def test_scrub_leaves_a_labelled_rrn_and_grouped_saf_ids_readable_but_still_masks_pans():
    rrn = "100000000008"  # 12 digits that happen to pass Luhn, as one RRN in ten does
    assert scrub(f"late answer (RRN {rrn})") == f"late answer (RRN {rrn})"
    assert scrub(f"value {rrn}") == "value 10******0008"  # unlabelled: masked, to be safe
    assert scrub(f"RRN {PAN}") == "RRN 476173******0119"  # longer than an RRN can be: a PAN
    from iso_gateway.reversals import saf_label
    label = saf_label(1882994020673651200)
    assert scrub(f"reversal {label} queued") == f"reversal {label} queued" and int(label) == 1882994020673651200


def test_a_card_number_in_a_long_fixed_numeric_field_is_masked_like_free_text():
    from iso_gateway.specfiles import get_dialect
    from iso_gateway.core.masking import mask_message
    for name in ("iso87ascii", "iso87binary"):
        d = get_dialect(name)
        shown = mask_message(d, {"t": "0100", "4": "000000012345", "89": "4761739001010119", "88": "0000000000000001"})
        assert shown["89"] == "476173******0119" and shown["4"] == "000000012345"
        assert shown["88"] == "0000000000000001"  # fails Luhn: an amount, shown
