"""The pending table and STAN allocation, without sockets or sleeping."""

from iso_gateway.core.matching import STAN_MAX, PendingTable, StanAllocator, match_key


def test_a_response_mti_matches_its_request_and_repeat():
    assert match_key("0100", "000001") == match_key("0110", "000001")
    assert match_key("0420", "000001") == match_key("0430", "000001") == match_key("0421", "000001")
    assert match_key("0100", "000001") != match_key("0410", "000001")  # a reversal answer never matches an auth


def test_stans_wrap_at_999999_and_never_give_000000():
    alloc = StanAllocator(STAN_MAX - 1)
    assert [alloc.allocate(set()) for _ in range(3)] == ["999998", "999999", "000001"]


def test_stans_skip_values_still_in_flight():
    table: PendingTable[str] = PendingTable()
    table.add(match_key("0100", "000002"), "a", 10.0)
    alloc = StanAllocator(1)
    assert alloc.allocate(table) == "000001"
    assert alloc.allocate(table) == "000003"


def test_expire_returns_only_entries_past_their_deadline_in_order():
    table: PendingTable[str] = PendingTable()
    table.add(match_key("0100", "000001"), "late", 5.0)
    table.add(match_key("0100", "000002"), "early", 1.0)
    table.add(match_key("0100", "000003"), "later", 9.0)
    assert table.next_deadline() == 1.0
    assert table.expire(5.0) == ["early", "late"]
    assert len(table) == 1 and table.next_deadline() == 9.0


def test_a_matched_entry_never_expires_and_its_stan_is_free_again():
    table: PendingTable[str] = PendingTable()
    key = match_key("0200", "000007")
    table.add(key, "x", 1.0)
    assert "000007" in table
    assert table.pop(match_key("0210", "000007")) == "x"
    assert "000007" not in table
    assert table.expire(100.0) == []
    assert table.next_deadline() is None


def test_drain_empties_the_table():
    table: PendingTable[int] = PendingTable()
    for i in range(1, 50):
        table.add(match_key("0100", f"{i:06d}"), i, float(i))
    assert sorted(table.drain()) == list(range(1, 50))
    assert len(table) == 0 and table.expire(1e9) == []


def test_expiry_cost_does_not_depend_on_matched_entries_left_in_the_heap():
    table: PendingTable[int] = PendingTable()
    for i in range(1, 10_001):
        table.add(match_key("0100", f"{i:06d}"), i, float(i))
    for i in range(1, 10_000):
        table.pop(match_key("0110", f"{i:06d}"))
    assert table.expire(20_000.0) == [10_000]


def test_a_key_reused_after_its_answer_keeps_its_own_deadline():
    table: PendingTable[str] = PendingTable()
    key = match_key("0100", "000001")
    table.add(key, "first", 1.0)
    assert table.pop(key) == "first"
    table.add(key, "second", 10.0)
    assert table.expire(5.0) == []  # the first one's deadline is not the second one's
    assert table.expire(10.0) == ["second"]


def test_the_heap_stays_proportional_to_what_is_in_flight():
    table: PendingTable[int] = PendingTable()
    for i in range(1, 100_001):
        key = match_key("0100", f"{i % 999_999 + 1:06d}")
        table.add(key, i, 30.0 + i)
        table.pop(key)
    assert len(table) == 0 and table.scheduled <= 1024 + 4


def test_a_new_switch_link_starts_its_stans_at_a_random_point_never_at_1():
    """A link a restart can't resume (a fresh journal, a connection of its own for a suspect
    reversal) must not repeat the STANs the switch saw lately: it starts anywhere but 000001."""
    from types import SimpleNamespace

    from iso_gateway.config import UpstreamConfig
    from iso_gateway.net.links import SoloConnection, Upstream
    from iso_gateway.specfiles import get_dialect

    cfg = UpstreamConfig(name="cmi", hosts=["127.0.0.1:9"], connections=2)
    firsts = []
    for _ in range(5):
        up = Upstream(cfg, SimpleNamespace(), None, get_dialect(cfg.dialect))  # type: ignore[arg-type]
        firsts += [c.link.stans.allocate(set()) for c in up.connections]
        firsts.append(SoloConnection(up).link.stans.allocate(set()))
    assert "000001" not in firsts and len(set(firsts)) > 1
