"""Routing: longest BIN match, ranges, catch-alls, criteria, no-route answers, bad BINs."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iso_gateway.config import RouteConfig, RoutingConfig, route_table
from iso_gateway.core.errors import ConfigError
from iso_gateway.core.routing import NoRoute, Route, RouteTable

VISA = "4761739001010119"
MASTERCARD = "5413330089020011"
AMEX = "371449635398431"


def route(name: str, **kw) -> RouteConfig:
    kw.setdefault("upstream", f"up-{name}")
    return RouteConfig(name=name, **kw)


def table(*routes: RouteConfig, **routing) -> RouteTable:
    return route_table(list(routes), RoutingConfig(**routing))


def name_of(result: Route | NoRoute) -> str:
    assert isinstance(result, Route), result
    return result.name


def find(t: RouteTable, pan: str | None, mti: str = "0100", currency: str | None = "504",
         terminal: str | None = "TERM0001", merchant: str | None = "MERCHANT0000001") -> Route | NoRoute:
    return t.lookup(mti, pan, currency, terminal, merchant)


# -- longest prefix --------------------------------------------------------------------------------


def test_the_longest_matching_prefix_wins_whatever_the_order() -> None:
    t = table(route("visa", bins=["4"]), route("visa-local", bins=["476173"]), route("visa-47", bins=["47"]))
    assert name_of(find(t, VISA)) == "visa-local"
    assert name_of(find(t, "4799999999999999")) == "visa-47"
    assert name_of(find(t, "4000000000000002")) == "visa"


def test_the_route_returned_carries_upstream_and_timeout() -> None:
    t = table(route("visa", upstream="cmi", bins=["4"], timeout=12.5))
    assert find(t, VISA) == Route("visa", "cmi", 12.5)


def test_a_prefix_longer_than_the_pan_does_not_match() -> None:
    t = table(route("long", bins=["4761739001010119000"]), route("short", bins=["4"]))
    assert name_of(find(t, VISA)) == "short"


def test_a_pan_longer_than_19_digits_is_still_routed_by_its_prefix() -> None:
    t = table(route("visa", bins=["4"]))
    assert name_of(find(t, "4" * 25)) == "visa"


# -- ranges ----------------------------------------------------------------------------------------


def test_a_range_matches_pans_whose_first_digits_fall_between_its_bounds_inclusive() -> None:
    t = table(route("mc", bins=["510000-559999"]))
    assert name_of(find(t, "5100000000000008")) == "mc"
    assert name_of(find(t, "5599999999999997")) == "mc"
    assert name_of(find(t, MASTERCARD)) == "mc"
    assert find(t, "5099999999999999") == NoRoute("15", "unknown_bin")
    assert find(t, "5600000000000000") == NoRoute("15", "unknown_bin")


def test_a_range_counts_as_a_prefix_of_its_bound_length() -> None:
    t = table(route("mc-range", bins=["510000-559999"]), route("mc-5", bins=["5"]), route("mc-5413", bins=["5413"]))
    assert name_of(find(t, MASTERCARD)) == "mc-range"  # 6 digits beat 4
    t = table(route("mc-range", bins=["51-55"]), route("mc-5413", bins=["5413"]))
    assert name_of(find(t, MASTERCARD)) == "mc-5413"  # 4 digits beat 2


def test_overlapping_ranges_of_one_length_each_find_their_pans() -> None:
    t = table(
        route("wide", bins=["400000-499999"], currencies=["978"]),
        route("narrow", bins=["476000-476999"], currencies=["504"]),
        route("middle", bins=["450000-480000"], currencies=["840"]),
    )
    assert name_of(find(t, VISA, currency="504")) == "narrow"
    assert name_of(find(t, VISA, currency="978")) == "wide"
    assert name_of(find(t, VISA, currency="840")) == "middle"
    assert name_of(find(t, "4800009999999999", currency="840")) == "middle"
    assert find(t, "4800019999999999", currency="840") == NoRoute("15", "unknown_bin")


def test_a_range_ending_in_nines_runs_to_the_end_of_its_length() -> None:
    t = table(route("top", bins=["990-999"]), route("low", bins=["000-009"]))
    assert name_of(find(t, "9999999999999995")) == "top"
    assert name_of(find(t, "0050000000000000")) == "low"


def test_a_prefix_and_a_range_of_one_length_tie_by_route_order() -> None:
    t = table(route("range", bins=["470000-479999"]), route("prefix", bins=["476173"]))
    assert name_of(find(t, VISA)) == "range"
    t = table(route("prefix", bins=["476173"]), route("range", bins=["470000-479999"]))
    assert name_of(find(t, VISA)) == "prefix"


# -- catch-all and ties ----------------------------------------------------------------------------


def test_a_route_without_bins_catches_every_pan_no_bin_route_claims() -> None:
    t = table(route("default"), route("visa", bins=["4"]))
    assert name_of(find(t, VISA)) == "visa"
    assert name_of(find(t, AMEX)) == "default"


def test_a_message_without_a_pan_only_matches_routes_without_bins() -> None:
    t = table(route("visa", bins=["4"]), route("network", mti=["0800"]))
    assert name_of(find(t, None, mti="0800")) == "network"
    assert name_of(find(t, "", mti="0800")) == "network"
    assert find(t, None, mti="0100") == NoRoute("92", "no_route")


def test_a_tie_goes_to_the_route_listed_first() -> None:
    t = table(route("first", bins=["4"]), route("second", bins=["4"]))
    assert name_of(find(t, VISA)) == "first"
    t = table(route("first"), route("second"))
    assert name_of(find(t, VISA)) == "first"


# -- other criteria --------------------------------------------------------------------------------


def test_every_criterion_a_route_gives_must_match() -> None:
    t = table(
        route("narrow", bins=["4"], mti=["0100"], currencies=["504"], terminals=["TERM0001"], merchants=["M1"]),
        route("fallback"),
    )
    assert name_of(find(t, VISA, mti="0100", currency="504", terminal="TERM0001", merchant="M1")) == "narrow"
    assert name_of(find(t, VISA, mti="0200", currency="504", terminal="TERM0001", merchant="M1")) == "fallback"
    assert name_of(find(t, VISA, mti="0100", currency="978", terminal="TERM0001", merchant="M1")) == "fallback"
    assert name_of(find(t, VISA, mti="0100", currency="504", terminal="TERM0002", merchant="M1")) == "fallback"
    assert name_of(find(t, VISA, mti="0100", currency="504", terminal="TERM0001", merchant="M2")) == "fallback"
    assert name_of(find(t, VISA, mti="0100", currency=None, terminal="TERM0001", merchant="M1")) == "fallback"


def test_a_longer_bin_loses_to_a_shorter_one_when_its_other_criteria_do_not_match() -> None:
    t = table(route("local-mad", bins=["476173"], currencies=["504"]), route("visa", bins=["4"]))
    assert name_of(find(t, VISA, currency="504")) == "local-mad"
    assert name_of(find(t, VISA, currency="978")) == "visa"


def test_a_list_of_values_matches_any_of_them() -> None:
    t = table(route("auth", mti=["0100", "0200"]), route("rev", mti=["0400", "0420", "0421"]))
    assert name_of(find(t, VISA, mti="0200")) == "auth"
    assert name_of(find(t, VISA, mti="0421")) == "rev"


def test_terminal_and_merchant_ids_match_whatever_their_trailing_space_padding() -> None:
    t = table(route("shop", terminals=["TERM1"], merchants=["SHOP42   "]))
    assert name_of(find(t, VISA, terminal="TERM1   ", merchant="SHOP42         ")) == "shop"
    assert name_of(find(t, VISA, terminal="TERM1", merchant="SHOP42")) == "shop"
    assert find(t, VISA, terminal="  TERM1 ", merchant="SHOP42") == NoRoute("92", "no_route")


# -- no route --------------------------------------------------------------------------------------


def test_a_pan_no_bin_covers_gets_the_unknown_bin_code_when_other_criteria_match() -> None:
    t = table(route("visa", bins=["4"], mti=["0100"]))
    assert find(t, MASTERCARD, mti="0100") == NoRoute("15", "unknown_bin")


def test_a_message_no_route_accepts_even_ignoring_bins_gets_the_no_route_code() -> None:
    t = table(route("visa", bins=["4"], mti=["0100"]))
    assert find(t, MASTERCARD, mti="0200") == NoRoute("92", "no_route")
    assert find(t, VISA, mti="0200") == NoRoute("92", "no_route")


def test_the_codes_come_from_the_routing_config() -> None:
    t = table(route("visa", bins=["4"], mti=["0100"]), no_route_code="12", unknown_bin_code="14")
    assert find(t, MASTERCARD, mti="0100") == NoRoute("14", "unknown_bin")
    assert find(t, VISA, mti="0200") == NoRoute("12", "no_route")


def test_an_empty_unknown_bin_code_falls_back_to_the_no_route_code() -> None:
    t = table(route("visa", bins=["4"]), no_route_code="05", unknown_bin_code="")
    assert find(t, MASTERCARD) == NoRoute("05", "unknown_bin")


def test_a_message_without_a_pan_is_never_an_unknown_bin() -> None:
    t = table(route("visa", bins=["4"]))
    assert find(t, None) == NoRoute("92", "no_route")


def test_only_the_leading_digits_of_a_pan_are_compared_with_bins() -> None:
    t = table(route("visa", bins=["476173"]), route("range", bins=["40-49"]))
    assert name_of(find(t, "4761739=2512")) == "visa"
    assert name_of(find(t, "47X")) == "range"
    assert find(t, "4X") == NoRoute("15", "unknown_bin")


# -- bad bins --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "entry, reason",
    [
        ("", "digit prefix"),
        ("4a", "digit prefix"),
        (" 4", "digit prefix"),
        ("٤", "digit prefix"),  # an Arabic-Indic digit is a digit to str.isdigit, not to a switch
        ("51-5", "same number of digits"),
        ("559999-510000", "starts after it ends"),
        ("51-55-59", "digit prefix"),
        ("-55", "digit prefix"),
        ("4" * 20, "1 to 19 digits"),
    ],
)
def test_a_bad_bin_entry_is_refused_with_file_key_path_and_reason(entry: str, reason: str) -> None:
    routes = [route("ok", bins=["4"]), route("bad", bins=["5", entry])]
    with pytest.raises(ConfigError) as info:
        route_table(routes, RoutingConfig(), source="gw.toml")
    assert info.value.source == "gw.toml"
    assert info.value.where == "routes[1].bins"
    assert reason in info.value.reason
    assert str(info.value).startswith("gw.toml: routes[1].bins: ")


def test_a_19_digit_prefix_and_a_one_digit_range_are_accepted() -> None:
    t = table(route("full", bins=["4" * 19]), route("digit", bins=["3-3"]))
    assert name_of(find(t, "4" * 19)) == "full"
    assert name_of(find(t, AMEX)) == "digit"


# -- the index against the obvious implementation ---------------------------------------------------


def reference_lookup(routes: list[RouteConfig], routing: RoutingConfig, mti, pan, currency, terminal, merchant):
    """Every route, every entry, no index: the definition written out."""
    terminal = terminal.rstrip(" ") if terminal else terminal
    merchant = merchant.rstrip(" ") if merchant else merchant
    digits = ""
    for ch in pan or "":
        if not "0" <= ch <= "9":
            break
        digits += ch

    def others_match(r: RouteConfig) -> bool:
        return (
            (not r.mti or mti in r.mti)
            and (not r.currencies or currency in r.currencies)
            and (not r.terminals or terminal in [v.rstrip(" ") for v in r.terminals])
            and (not r.merchants or merchant in [v.rstrip(" ") for v in r.merchants])
        )

    def bin_length(r: RouteConfig) -> int | None:
        if not r.bins:
            return 0
        best = None
        for entry in r.bins:
            low, _, high = entry.partition("-")
            high = high or low
            n = len(low)
            if len(digits) >= n and int(low) <= int(digits[:n]) <= int(high):
                best = n if best is None else max(best, n)
        return best

    best_route, best_len = None, -1
    for r in routes:
        if not others_match(r):
            continue
        n = bin_length(r)
        if n is not None and n > best_len:
            best_route, best_len = r, n
    if best_route is not None:
        return Route(best_route.name, best_route.upstream, best_route.timeout)
    if digits and any(r.bins and others_match(r) for r in routes):
        return NoRoute(routing.unknown_bin_code or routing.no_route_code, "unknown_bin")
    return NoRoute(routing.no_route_code, "no_route")


# Few digits and short BINs so that PANs often hit entries, overlap and tie.
DIGITS = "0123"


@st.composite
def bin_entries(draw) -> str:
    n = draw(st.integers(1, 4))
    low = draw(st.text(DIGITS, min_size=n, max_size=n))
    if draw(st.booleans()):
        return low
    high = draw(st.text(DIGITS, min_size=n, max_size=n))
    low, high = min(low, high), max(low, high)
    return f"{low}-{high}"


def maybe(values: list[str]) -> st.SearchStrategy[list[str]]:
    return st.one_of(st.just([]), st.lists(st.sampled_from(values), min_size=1, max_size=2))


@st.composite
def route_sets(draw) -> list[RouteConfig]:
    count = draw(st.integers(1, 6))
    return [
        RouteConfig(
            name=f"r{i}",
            upstream=f"u{i}",
            timeout=float(i + 1),
            mti=draw(maybe(["0100", "0200"])),
            bins=draw(st.one_of(st.just([]), st.lists(bin_entries(), min_size=1, max_size=4))),
            currencies=draw(maybe(["504", "978"])),
            terminals=draw(maybe(["T1", "T2  "])),
            merchants=draw(maybe(["M1", "M2"])),
        )
        for i in range(count)
    ]


messages = st.tuples(
    st.sampled_from(["0100", "0200"]),
    st.one_of(st.none(), st.text(DIGITS, max_size=6), st.text(DIGITS + "=", max_size=6)),
    st.sampled_from([None, "504", "978"]),
    st.sampled_from([None, "T1", "T1      ", "T2", "T3"]),
    st.sampled_from([None, "M1", "M2 ", "M3"]),
)


@settings(max_examples=400, deadline=None)
@given(
    routes=route_sets(),
    msgs=st.lists(messages, min_size=1, max_size=8),
    unknown_bin_code=st.sampled_from(["15", ""]),
)
def test_lookup_agrees_with_the_obvious_implementation(routes, msgs, unknown_bin_code) -> None:
    routing = RoutingConfig(unknown_bin_code=unknown_bin_code)
    t = route_table(routes, routing)
    for msg in msgs:
        assert t.lookup(*msg) == reference_lookup(routes, routing, *msg)
