"""Request validation: rule files from specs/rules, checked through a real Scanner on encoded bytes."""

from __future__ import annotations

import datetime as dt
import tomllib
from pathlib import Path

import pytest

from iso_gateway.specfiles import get_dialect, parse_dialect
from iso_gateway.core.errors import ConfigError
from iso_gateway.core.message import encode
from iso_gateway.core.scanner import Scanner
from iso_gateway.core.validation import REASONS, Rejection, RuleSet, luhn_ok
from iso_gateway.specfiles import load_rules, parse_rules, rules_paths

UTC = dt.timezone.utc
DIALECT = get_dialect("iso87ascii")
RULES = load_rules("default")
NOW = dt.datetime(2026, 3, 15, 12, 0, 0, tzinfo=UTC)
PAN = "4111111111111111"

# A card-not-present purchase authorization as an e-commerce front end sends it:
# 16 fields, key-entered e-commerce (DE 22 = 812) so the expiry is present.
AUTH = {
    "t": "0100",
    "2": PAN,
    "3": "000000",
    "4": "000000015000",  # 150.00 MAD
    "7": "0315115500",
    "11": "000123",
    "12": "125500",
    "13": "0315",
    "14": "2812",
    "18": "5999",
    "22": "812",
    "25": "59",
    "37": "607411000123",
    "41": "WEB00001",
    "42": "MERCHANT0000001",
    "49": "504",
}
ORIGINAL_DATA = "0100" + "000123" + "0315115500" + "0" * 22
REVERSAL = {k: v for k, v in AUTH.items() if k not in ("14", "18", "22", "25")} | {"t": "0400", "90": ORIGINAL_DATA}
ECHO = {"t": "0800", "7": "0315115500", "11": "000124", "70": "301"}


def check(msg, *, now=NOW, rules=RULES, dialect=DIALECT):
    """Encode, scan with the rule set's wanted fields, validate: the gateway's hot path."""
    raw = encode(dialect, msg, check_types=False)
    scan = Scanner(dialect, rules.fields_needed).scan(raw, full=True)
    return rules.validate(dialect, scan.mti, scan.bitmap, scan.values, now)


def changed(msg, **fields):
    out = dict(msg)
    for key, value in fields.items():
        key = key.lstrip("f")
        if value is None:
            out.pop(key, None)
        else:
            out[key] = value
    return out


def reject(code, reason, field=None):
    return Rejection(code, reason, field)


# --------------------------------------------------------------------------- passing


def test_a_valid_0100_passes():
    assert check(AUTH) is None


@pytest.mark.parametrize(
    "msg",
    [
        changed(AUTH, t="0200"),
        REVERSAL,
        changed(REVERSAL, t="0420"),
        changed(REVERSAL, t="0421"),
        ECHO,
    ],
    ids=["0200", "0400", "0420", "0421", "0800"],
)
def test_a_valid_request_of_every_shipped_mti_passes(msg):
    assert check(msg) is None


def test_the_default_rules_cover_authorizations_purchases_reversals_and_network_management():
    assert RULES.mtis() == frozenset({"0100", "0200", "0400", "0420", "0421", "0800"})
    assert RULES.name == "default"
    assert RULES.source.endswith("default.toml")


def test_a_chip_read_authorization_needs_no_expiry():
    assert check(changed(AUTH, f22="051", f14=None)) is None


# --------------------------------------------------------------------------- MTI and mandatory fields


@pytest.mark.parametrize("mti", ["0101", "0120", "0110", "0810", "0220"])
def test_an_mti_with_no_rules_is_answered_12_unsupported_mti(mti):
    assert check(changed(AUTH, t=mti)) == reject("12", "unsupported_mti")


def test_a_missing_mandatory_field_is_answered_30_naming_the_lowest_missing_field():
    assert check(changed(AUTH, f41=None, f4=None)) == reject("30", "missing_field", "4")
    assert check(changed(AUTH, f2=None)) == reject("30", "missing_field", "2")


@pytest.mark.parametrize("entry_mode", ["012", "812", "102"], ids=["key-entered", "e-commerce", "credential-on-file"])
def test_the_expiry_is_mandatory_when_the_card_data_was_not_read_electronically(entry_mode):
    assert check(changed(AUTH, f22=entry_mode, f14=None)) == reject("30", "missing_field", "14")


@pytest.mark.parametrize("mti", ["0400", "0420", "0421"])
def test_field_90_is_mandatory_in_reversals(mti):
    assert check(changed(REVERSAL, t=mti, f90=None)) == reject("30", "missing_field", "90")


def test_an_0800_needs_only_transmission_time_stan_and_network_code():
    assert check(changed(ECHO, f70=None)) == reject("30", "missing_field", "70")
    assert check(changed(ECHO, f11=None)) == reject("30", "missing_field", "11")


def test_fields_25_32_and_43_are_not_mandatory_by_default_but_are_in_ecom_strict():
    strict = load_rules("ecom-strict")
    assert check(changed(AUTH, f25=None)) is None
    assert check(changed(AUTH, f25=None), rules=strict) == reject("30", "missing_field", "25")
    full = changed(AUTH, f32="123456", f43=f"{'SHOP EXAMPLE':<23}{'CASABLANCA':<13}  MA")
    assert check(full, rules=strict) is None
    assert check(changed(full, f43=None), rules=strict) == reject("30", "missing_field", "43")
    assert check(changed(REVERSAL, f32="123456"), rules=strict) is None
    assert check(REVERSAL, rules=strict) == reject("30", "missing_field", "32")


# --------------------------------------------------------------------------- field types


@pytest.mark.parametrize(
    "field, value",
    [("13", "03A5"), ("12", "12 500"), ("41", "WEB0000\x01"), ("49", "5O4")],
)
def test_a_value_breaking_its_iso_type_is_answered_30_field_type(field, value):
    assert check(changed(AUTH, **{f"f{field}": value})) == reject("30", "field_type", field)


def test_a_non_numeric_amount_is_a_format_error_before_it_is_an_amount_error():
    assert check(changed(AUTH, f4="00000001500X")) == reject("30", "field_type", "4")


def test_the_lowest_field_with_a_bad_type_is_reported_whatever_the_order_of_values():
    values = {49: "X04", 13: "03A5", 2: PAN, 3: "000000", 4: "000000015000", 7: "0315115500", 11: "000123"}
    bitmap = 0
    for n in (2, 3, 4, 7, 11, 12, 13, 22, 37, 41, 42, 49):
        bitmap |= 1 << (128 - n)
    values |= {12: "125500", 22: "051", 37: "607411000123", 41: "WEB00001", 42: "MERCHANT0000001"}
    assert RULES.validate(DIALECT, "0100", bitmap, values, NOW) == reject("30", "field_type", "13")


def test_a_field_the_dialect_does_not_define_is_a_type_failure():
    bitmap = sum(1 << (128 - n) for n in (7, 11, 70))
    values = {7: "0315115500", 11: "000124", 70: "301", 200: "x"}
    assert RULES.validate(DIALECT, "0800", bitmap, values, NOW) == reject("30", "field_type", "200")


def test_an_alphanumeric_rrn_with_spaces_passes_the_type_check():
    assert check(changed(AUTH, f37="ABC 12345678")) is None


# --------------------------------------------------------------------------- PAN


@pytest.mark.parametrize(
    "digits, ok",
    [
        ("4111111111111111", True),
        ("5555555555554444", True),
        ("378282246310005", True),
        ("79927398713", True),
        ("79927398710", False),
        ("4111111111111112", False),
    ],
)
def test_luhn_ok_is_the_iso_7812_mod_10_check(digits, ok):
    assert luhn_ok(digits) is ok


@pytest.mark.parametrize("pan", ["41111111113", "4111111111"])
def test_a_pan_shorter_than_12_digits_is_answered_14_pan_length(pan):
    assert check(changed(AUTH, f2=pan)) == reject("14", "pan_length", "2")


def test_a_pan_of_12_and_of_19_digits_is_accepted():
    assert check(changed(AUTH, f2="000000000000")) is None
    pan19 = next(p for p in (f"601100099013942400{d}" for d in "0123456789") if luhn_ok(p))
    assert check(changed(AUTH, f2=pan19)) is None


def test_a_pan_failing_luhn_is_answered_14_pan_luhn():
    assert check(changed(AUTH, f2="4111111111111112")) == reject("14", "pan_luhn", "2")


# --------------------------------------------------------------------------- expiry


@pytest.mark.parametrize("expiry", ["2813", "2800", "2899"])
def test_an_expiry_month_outside_01_to_12_is_answered_30_bad_expiry(expiry):
    assert check(changed(AUTH, f14=expiry)) == reject("30", "bad_expiry", "14")


def test_a_card_is_still_valid_on_the_last_second_of_its_expiry_month():
    last_second = dt.datetime(2026, 3, 31, 23, 59, 59, tzinfo=UTC)
    msg = changed(AUTH, f14="2603", f7="0331235000")
    assert check(msg, now=last_second) is None


def test_a_card_is_expired_from_the_first_second_of_the_next_month():
    first_second = dt.datetime(2026, 4, 1, 0, 0, 0, tzinfo=UTC)
    msg = changed(AUTH, f14="2603", f7="0331235000")
    assert check(msg, now=first_second) == reject("54", "expired_card", "14")


def test_an_expiry_in_an_earlier_year_is_answered_54_expired_card():
    assert check(changed(AUTH, f14="2512")) == reject("54", "expired_card", "14")


def test_the_expiry_year_is_read_in_the_century_nearest_to_now():
    assert check(changed(AUTH, f14="7512")) is None  # 2075
    assert check(changed(AUTH, f14="9912")) == reject("54", "expired_card", "14")  # 1999


def test_an_expired_card_can_still_be_reversed():
    assert check(changed(REVERSAL, f14="2001")) is None


# --------------------------------------------------------------------------- amount and currency


def test_a_zero_amount_is_answered_13_bad_amount():
    assert check(changed(AUTH, f4="000000000000")) == reject("13", "bad_amount", "4")


def test_the_smallest_amount_passes():
    assert check(changed(AUTH, f4="000000000001")) is None


@pytest.mark.parametrize(
    "currency", ["000", "123", "999", "959", "931"], ids=["zero", "unassigned", "XXX", "XAU", "CUC-withdrawn"]
)
def test_an_unknown_or_non_payment_currency_is_answered_13_unknown_currency(currency):
    assert check(changed(AUTH, f49=currency)) == reject("13", "unknown_currency", "49")


@pytest.mark.parametrize("currency", ["504", "978", "840", "392", "048", "952", "532"])
def test_payment_currencies_pass(currency):
    assert check(changed(AUTH, f49=currency)) is None


def test_the_shipped_currency_table_is_the_iso_4217_list_with_minor_units():
    assert len(RULES.currencies) >= 170
    mad = RULES.currency("504")
    assert (mad.alpha, mad.minor) == ("MAD", 2)
    assert RULES.currency("392").minor == 0
    assert RULES.currency("048").minor == 3
    assert RULES.currency("959").minor is None
    alphas = [c.alpha for c in RULES.currencies.values()]
    assert len(alphas) == len(set(alphas))


# --------------------------------------------------------------------------- STAN


def test_a_zero_stan_is_answered_30_zero_stan():
    assert check(changed(AUTH, f11="000000")) == reject("30", "zero_stan", "11")
    assert check(changed(ECHO, f11="000000")) == reject("30", "zero_stan", "11")


def test_a_short_stan_is_answered_30_bad_stan_where_the_dialect_lets_it_through():
    # A host whose dialect carries DE 11 as a variable field: the type check
    # passes a 5-digit STAN, the STAN check does not.
    text = (Path(DIALECT.source)).read_text()
    text = text.replace('name = "iso87ascii"', 'name = "varstan"').replace(
        '11 = { type = "n", len = 6,', '11 = { type = "n", max = 6, prefix = "LL",'
    )
    varstan = parse_dialect(text, "varstan.toml")
    assert check(changed(AUTH, f11="12345"), dialect=varstan) == reject("30", "bad_stan", "11")
    assert check(AUTH, dialect=varstan) is None
    assert check(changed(AUTH, f11="01234A")) == reject("30", "field_type", "11")  # the same rules, iso87ascii


# --------------------------------------------------------------------------- transmission date and time (DE 7)


@pytest.mark.parametrize(
    "value",
    ["1315115500", "0015115500", "0230115500", "0431115500", "0300115500", "0315245500", "0315116000", "0315115560"],
    ids=["month-13", "month-00", "feb-30", "apr-31", "day-00", "hour-24", "minute-60", "second-60"],
)
def test_an_impossible_transmission_time_is_answered_30_bad_transmission_time(value):
    assert check(changed(AUTH, f7=value)) == reject("30", "bad_transmission_time", "7")


def test_a_transmission_time_within_a_day_of_now_either_way_passes():
    assert check(changed(AUTH, f7="0314120000")) is None
    assert check(changed(AUTH, f7="0316120000")) is None


def test_a_transmission_time_more_than_a_day_away_is_answered_30_bad_transmission_time():
    assert check(changed(AUTH, f7="0314115959")) == reject("30", "bad_transmission_time", "7")
    assert check(changed(AUTH, f7="0316120001")) == reject("30", "bad_transmission_time", "7")
    assert check(changed(AUTH, f7="0915120000")) == reject("30", "bad_transmission_time", "7")


def test_a_december_transmission_time_received_in_january_is_last_year():
    new_year = dt.datetime(2027, 1, 1, 0, 10, 0, tzinfo=UTC)
    assert check(changed(AUTH, f7="1231235500"), now=new_year) is None


def test_a_january_transmission_time_received_in_december_is_next_year():
    new_years_eve = dt.datetime(2026, 12, 31, 23, 55, 0, tzinfo=UTC)
    assert check(changed(AUTH, f7="0101000500"), now=new_years_eve) is None


def test_the_29th_of_february_is_a_real_transmission_date_in_a_leap_year():
    leap_day = dt.datetime(2028, 2, 29, 12, 0, 0, tzinfo=UTC)
    assert check(changed(AUTH, f7="0229115959", f14="2812"), now=leap_day) is None
    day_after = dt.datetime(2028, 3, 1, 0, 30, 0, tzinfo=UTC)
    assert check(changed(AUTH, f7="0229233000", f14="2812"), now=day_after) is None


def test_the_29th_of_february_is_refused_when_no_nearby_year_has_one():
    no_leap_day = dt.datetime(2027, 2, 28, 23, 0, 0, tzinfo=UTC)
    assert check(changed(AUTH, f7="0229001000"), now=no_leap_day) == reject("30", "bad_transmission_time", "7")


def test_a_reversal_advice_may_carry_a_transmission_time_days_old():
    three_days_old = changed(REVERSAL, t="0420", f7="0312120000")
    assert check(three_days_old) is None
    assert check(changed(three_days_old, t="0421")) is None
    assert check(changed(three_days_old, t="0400")) == reject("30", "bad_transmission_time", "7")


# --------------------------------------------------------------------------- processing code


@pytest.mark.parametrize("code", ["310000", "010000", "090000"])
def test_a_transaction_type_not_offered_for_the_mti_is_answered_12_processing_code(code):
    assert check(changed(AUTH, f3=code)) == reject("12", "processing_code", "3")


def test_purchases_and_refunds_are_offered():
    assert check(changed(AUTH, f3="003000")) is None
    assert check(changed(AUTH, f3="200000")) is None


# --------------------------------------------------------------------------- order of checks


def test_a_missing_field_is_reported_before_a_bad_value():
    assert check(changed(AUTH, f2="4111111111111112", f41=None)) == reject("30", "missing_field", "41")


def test_a_bad_type_is_reported_before_a_bad_value():
    assert check(changed(AUTH, f4="000000000000", f13="03A5")) == reject("30", "field_type", "13")


def test_value_checks_run_stan_then_time_then_processing_code_then_card_then_money():
    bad = changed(AUTH, f11="000000", f7="0101000000", f3="310000", f2="4111111111111112", f14="2001", f4="0" * 12)
    expected = [
        ("f11", "000123", reject("30", "zero_stan", "11")),
        ("f7", "0315115500", reject("30", "bad_transmission_time", "7")),
        ("f3", "000000", reject("12", "processing_code", "3")),
        ("f2", PAN, reject("14", "pan_luhn", "2")),
        ("f14", "2812", reject("54", "expired_card", "14")),
        ("f4", "000000015000", reject("13", "bad_amount", "4")),
    ]
    for key, good, rejection in expected:
        assert check(bad) == rejection
        bad = changed(bad, **{key: good})
    assert check(changed(bad, f49="000")) == reject("13", "unknown_currency", "49")
    assert check(bad) is None


# --------------------------------------------------------------------------- rule files


def test_every_response_code_can_be_set_in_a_rule_file(tmp_path):
    (tmp_path / "host.toml").write_text(
        'name = "host"\nextends = "default"\n[codes]\nexpired_card = "33"\nunknown_currency = "57"\n'
    )
    host = load_rules("host", (str(tmp_path),))
    assert check(changed(AUTH, f14="2001"), rules=host) == reject("33", "expired_card", "14")
    assert check(changed(AUTH, f49="000"), rules=host) == reject("57", "unknown_currency", "49")
    assert check(changed(AUTH, f2="4111111111111112"), rules=host) == reject("14", "pan_luhn", "2")


def test_a_rule_file_can_extend_another_and_drop_a_check(tmp_path):
    (tmp_path / "lenient.toml").write_text(
        'name = "lenient"\nextends = "default"\n[mti.0100]\nchecks = { 14 = "off" }\nclock_skew = 3600\n'
    )
    lenient = load_rules("lenient", (str(tmp_path),))
    assert check(changed(AUTH, f14="2001"), rules=lenient) is None
    assert check(changed(AUTH, f2="4111111111111112"), rules=lenient) == reject("14", "pan_luhn", "2")
    assert check(changed(AUTH, f7="0315100000"), rules=lenient) == reject("30", "bad_transmission_time", "7")
    assert lenient.currency("504").alpha == "MAD"


def test_a_rule_file_path_is_loaded_and_extends_a_sibling_by_path(tmp_path):
    base = tmp_path / "base.toml"
    base.write_text('name = "base"\n[mti.0800]\nmandatory = [7, 11, 70]\nchecks = { 11 = "stan" }\n')
    child = tmp_path / "child.toml"
    child.write_text('name = "child"\nextends = "base.toml"\n[mti.0800]\nmandatory = [7, 11, 70, 33]\n')
    rules = load_rules(str(child))
    assert rules.mtis() == frozenset({"0800"})
    assert check(ECHO, rules=rules) == reject("30", "missing_field", "33")
    assert check(changed(ECHO, f33="1234", f11="000000"), rules=rules) == reject("30", "zero_stan", "11")


def test_a_cycle_of_extends_is_refused(tmp_path):
    (tmp_path / "a.toml").write_text('name = "a"\nextends = "b.toml"\n[mti.0800]\n')
    (tmp_path / "b.toml").write_text('name = "b"\nextends = "a.toml"\n[mti.0800]\n')
    with pytest.raises(ConfigError) as err:
        load_rules(str(tmp_path / "a.toml"))
    assert err.value.where == "extends"
    assert "cycle" in err.value.reason


def test_a_rule_file_whose_name_is_not_its_file_name_is_refused(tmp_path):
    (tmp_path / "foo.toml").write_text('name = "bar"\n[mti.0800]\n')
    with pytest.raises(ConfigError) as err:
        load_rules("foo", (str(tmp_path),))
    assert err.value.where == "name"


def test_an_unknown_rule_set_name_is_refused_naming_the_known_ones():
    with pytest.raises(ConfigError) as err:
        load_rules("nosuchrules")
    assert "default" in err.value.reason


def test_the_shipped_rule_files_all_load():
    for name in rules_paths():
        assert isinstance(load_rules(name), RuleSet)


def test_load_rules_is_cached():
    assert load_rules("default") is RULES


BASE = 'name = "t"\n[mti.0100]\nmandatory = [2]\n'


@pytest.mark.parametrize(
    "text, where",
    [
        ("name = ", ""),
        ('title = "no name"\n[mti.0100]\n', "name"),
        ('name = "t"\n', "mti"),
        ('name = "t"\n[mti.0100]\nmandatory = [1]\n', "mti.0100.mandatory.0"),
        ('name = "t"\n[mti.0100]\nmandatory = [129]\n', "mti.0100.mandatory.0"),
        ('name = "t"\n[mti.0100]\nmandtory = [2]\n', "mti.0100.mandtory"),
        ('name = "t"\n[mti.0190]\n', "mti"),
        ('name = "t"\n[mti.0100]\nchecks = { 2 = "luhn" }\n', "mti.0100.checks.2"),
        ('name = "t"\n[mti.0100]\nchecks = { 0 = "pan" }\n', "mti.0100.checks"),
        ('name = "t"\n[mti.0100]\nchecks = { 49 = "currency" }\n', "mti.0100.checks.49"),
        ('name = "t"\n[mti.0100]\nprocessing_codes = ["0"]\n', "mti.0100.processing_codes.0"),
        ('name = "t"\n[mti.0100]\nprocessing_codes = []\n', "mti.0100.processing_codes"),
        (
            'name = "t"\n[mti.0100]\nconditional = [{ field = 14, when = 22, starts_with = [] }]\n',
            "mti.0100.conditional.0.starts_with",
        ),
        ('name = "t"\n[mti.0100]\nconditional = [{ field = 14 }]\n', "mti.0100.conditional.0.when"),
        ('name = "t"\n[mti.0100]\nclock_skew = 0\n', "mti.0100.clock_skew"),
        (BASE + "[codes]\npan_luhn = \"1\"\n", "codes.pan_luhn"),
        (BASE + "[codes]\nluhn = \"14\"\n", "codes.luhn"),
        ('name = "t"\nclock_skew = 31536000\n[mti.0100]\n', "clock_skew"),
        ('name = "t"\n[mti.0100]\n[currencies]\nMAD = { alpha = "MAD", minor = 2 }\n', "currencies"),
        ('name = "t"\n[mti.0100]\n[currencies]\n504 = { alpha = "mad", minor = 2 }\n', "currencies.504.alpha"),
        ('name = "t"\nextends = "nosuchrules"\n[mti.0100]\n', "extends"),
        ('name = "t"\nextends = 3\n[mti.0100]\n', "extends"),
        ('name = "t"\ntype_checked = ["x"]\n[mti.0100]\n', "type_checked.0"),
    ],
)
def test_a_bad_rule_file_is_refused_with_the_file_and_the_key_path(text, where):
    with pytest.raises(ConfigError) as err:
        parse_rules(text, "rules/bad.toml")
    assert err.value.source == "rules/bad.toml"
    assert err.value.where == where
    assert str(err.value).startswith(f"rules/bad.toml: {where}" if where else "rules/bad.toml")


def test_a_rule_file_error_does_not_repeat_the_offending_value():
    with pytest.raises(ConfigError) as err:
        parse_rules(f'name = "t"\n[mti.0100]\nprocessing_codes = ["{PAN}"]\n', "bad.toml")
    assert PAN not in str(err.value)
    with pytest.raises(ConfigError) as err:
        parse_rules(f'name = "t"\n[mti.0100]\ntitle = "x"\nchecks = {{ 2 = "{PAN}" }}\n', "bad.toml")
    assert PAN not in str(err.value)


def test_check_dialect_names_a_rule_field_the_dialect_does_not_define():
    RULES.check_dialect(DIALECT)
    text = Path(DIALECT.source).read_text().replace('name = "iso87ascii"', 'name = "no70"')
    text = "\n".join(line for line in text.splitlines() if not line.startswith("70 = "))
    text = text.replace(", 70, 90]", ", 90]")
    with pytest.raises(ConfigError) as err:
        RULES.check_dialect(parse_dialect(text, "no70.toml"))
    assert "field 70" in err.value.reason


# --------------------------------------------------------------------------- fields_needed


@pytest.mark.parametrize("name", ["default", "ecom-strict"])
def test_fields_needed_covers_every_field_a_rule_names(name):
    rules = load_rules(name)
    needed = rules.fields_needed
    raw = tomllib.loads(Path(rules.source).read_text())
    if name != "default":
        raw = tomllib.loads(Path(RULES.source).read_text())["mti"] | raw["mti"]
        raw = {"mti": raw}
    for mti, m in raw["mti"].items():
        assert set(m.get("mandatory", [])) <= needed, mti
        for cond in m.get("conditional", []):
            assert {cond["field"], cond["when"]} <= needed, mti
        assert {int(k) for k in m.get("checks", {})} <= needed, mti
        if "processing_codes" in m:
            assert 3 in needed
    assert {2, 3, 4, 7, 11, 14, 22, 41, 42, 49, 70, 90} <= needed


def test_the_scanner_reads_only_the_fields_the_rules_need():
    raw = encode(DIALECT, changed(AUTH, f48="CVV2=123"))
    scan = Scanner(DIALECT, RULES.fields_needed).scan(raw, full=True)
    assert set(scan.values) <= RULES.fields_needed
    assert 48 not in scan.values
    assert RULES.validate(DIALECT, scan.mti, scan.bitmap, scan.values, NOW) is None


# --------------------------------------------------------------------------- card data and labels


def test_no_rejection_carries_a_pan_or_any_field_value():
    bad_pans = ["4111111111111112", "41111111113"]
    for pan in bad_pans:
        for msg in (changed(AUTH, f2=pan), changed(AUTH, f2=pan, f14="2001"), changed(AUTH, f2=pan, f13="03A5")):
            r = check(msg)
            assert r is not None
            text = f"{r} {r!r} {r.code} {r.reason} {r.field}"
            assert pan not in text and pan[-8:] not in text
            assert r.reason in REASONS
            assert r.field is None or r.field.isdigit()


def test_default_toml_writes_out_the_code_of_every_reason_label():
    raw = tomllib.loads(Path(RULES.source).read_text())
    assert set(raw["codes"]) == set(REASONS)
