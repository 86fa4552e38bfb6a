"""The relay proxy's pure rules: home-region choice (lowest RTT, sticky), which relay / TURN carries a peer's
packets, TURN address parsing, and that credentials stay out of reprs. No sockets, no sleeps."""

from __future__ import annotations

import pytest

from ghostlink.proxy import RelayCreds, pick_home, pick_relay, pick_route
from ghostlink.turnclient import format_addr, parse_addr


def test_no_live_region_means_no_home() -> None:
    assert pick_home(0, {}) == 0
    assert pick_home(3, {}) == 0


def test_first_home_is_the_lowest_rtt() -> None:
    assert pick_home(0, {1: 40.0, 2: 12.0, 3: 30.0}) == 2


def test_ties_break_on_the_lowest_id() -> None:
    assert pick_home(0, {2: 10.0, 1: 10.0}) == 1


def test_unknown_rtts_only_still_give_a_home() -> None:
    assert pick_home(0, {4: -1.0, 2: -1.0}) == 2
    assert pick_home(0, {4: -1.0, 2: 50.0}) == 2


@pytest.mark.parametrize(
    ("home_rtt", "other_rtt", "expected"),
    [
        (30.0, 20.0, 1),  # 10 ms better: stay
        (30.0, 14.0, 1),  # 2x better but only 16 ms: stay
        (100.0, 60.0, 1),  # 40 ms better but not 2x: stay
        (100.0, 40.0, 2),  # > 20 ms and > 2x better: move
    ],
)
def test_home_is_sticky(home_rtt: float, other_rtt: float, expected: int) -> None:
    assert pick_home(1, {1: home_rtt, 2: other_rtt}) == expected


def test_home_moves_when_it_dies() -> None:
    assert pick_home(1, {2: 80.0, 3: 50.0}) == 3


def test_home_with_unknown_rtt_is_kept() -> None:
    assert pick_home(1, {1: -1.0, 2: 1.0}) == 1


def test_relay_prefers_the_peers_home_then_ours_then_the_fastest() -> None:
    live = {1: 10.0, 2: 5.0, 3: 50.0}
    assert pick_relay(3, 1, live) == 3
    assert pick_relay(9, 1, live) == 1
    assert pick_relay(0, 0, live) == 2
    assert pick_relay(0, 0, {4: -1.0, 5: 7.0}) == 5
    assert pick_relay(1, 1, {}) == 0


def test_route_relay_before_turn() -> None:
    assert pick_route(1, 1, {1: 5.0}, True, "192.0.2.1:5000") == ("relay", 1)


def test_route_turn_only_when_no_relay_and_both_have_turn() -> None:
    assert pick_route(1, 0, {}, True, "192.0.2.1:5000") == ("turn", 0)
    assert pick_route(1, 0, {}, False, "192.0.2.1:5000") == ("", 0)
    assert pick_route(1, 0, {}, True, "") == ("", 0)
    assert pick_route(1, 0, {}, True, "not an address") == ("", 0)


@pytest.mark.parametrize(
    ("text", "addr"),
    [
        ("192.0.2.1:3478", ("192.0.2.1", 3478)),
        ("[2001:db8::1]:49152", ("2001:db8::1", 49152)),
        ("192.0.2.1", None),
        ("192.0.2.1:0", None),
        ("192.0.2.1:70000", None),
        (":5", None),
        ("", None),
    ],
)
def test_parse_addr(text: str, addr: tuple[str, int] | None) -> None:
    assert parse_addr(text) == addr
    if addr is not None:
        assert format_addr(addr) == text


def test_credentials_stay_out_of_the_repr() -> None:
    c = RelayCreds("1700000000:7", "s3cret-password", 1700000000, b"token-bytes-xyz")
    text = repr(c)
    assert "1700000000:7" in text
    assert "s3cret" not in text
    assert "token-bytes" not in text
