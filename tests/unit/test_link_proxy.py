"""The relay proxy's pure core: home-region choice (lowest RTT, sticky), which relay / TURN carries a peer's
packets, TURN address parsing, buffering until a path is up, held first handshakes, re-sends after
PEER_GONE, TURN bindings, and that credentials stay out of reprs. No sockets, no sleeps: time is passed in."""

from __future__ import annotations

import pytest

from ghostcore.addr import format_endpoint
from ghostlink.traversal.proxy import RelayCreds
from ghostlink.traversal.proxy_core import (
    HOLD_SECONDS,
    MAX_BUFFERED,
    RETRY_INTERVAL,
    HomeChanged,
    ProxyCore,
    ToRelay,
    ToTurn,
    ToWireGuard,
    TurnBinding,
    TurnChanged,
    pick_home,
    pick_relay,
    pick_route,
    turn_address,
)


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
def test_turn_address(text: str, addr: tuple[str, int] | None) -> None:
    assert turn_address(text) == addr
    if addr is not None:
        assert format_endpoint(*addr) == text


def test_credentials_stay_out_of_the_repr() -> None:
    c = RelayCreds("1700000000:7", "s3cret-password", 1700000000, b"token-bytes-xyz", b"k" * 32)
    text = repr(c)
    assert "1700000000:7" in text
    assert "s3cret" not in text
    assert "token-bytes" not in text


A, B, C = b"a" * 32, b"b" * 32, b"c" * 32
HANDSHAKE = b"\x01\x00\x00\x00" + b"i" * 144  # a WireGuard handshake initiation (type 1)
DATA = b"\x04\x00\x00\x00" + bytes(28)  # a WireGuard transport data message (type 4, 32 bytes at least)


def test_packets_wait_for_a_path_then_flush_in_order() -> None:
    core = ProxyCore()
    core.add_peer(B)
    assert core.from_wireguard(B, b"early-0", 0.0) is None
    assert core.from_wireguard(B, b"early-1", 0.0) is None
    assert core.counters["buffered"] == 2
    out = core.relays({1: 10.0})
    assert out == [HomeChanged(0, 1), ToRelay(1, B, b"early-0"), ToRelay(1, B, b"early-1")]
    assert core.home_region == 1
    assert core.from_wireguard(B, DATA, 0.0) == ToRelay(1, B, DATA)
    assert core.relays({1: 12.0}) == []  # an RTT sample: same home, nothing buffered


def test_the_buffer_is_bounded() -> None:
    core = ProxyCore()
    core.add_peer(B)
    for i in range(MAX_BUFFERED + 3):
        core.from_wireguard(B, bytes([i]), 0.0)
    assert core.counters["drop_buffer_full"] == 3
    sent = [a for a in core.relays({1: 5.0}) if isinstance(a, ToRelay)]
    assert [a.packet for a in sent] == [bytes([i]) for i in range(3, MAX_BUFFERED + 3)]  # the oldest went


def test_the_peers_home_relay_carries_its_packets() -> None:
    core = ProxyCore()
    core.relays({1: 5.0, 2: 30.0})
    assert core.set_route(B, 2, "") == []
    assert core.from_wireguard(B, DATA, 0.0) == ToRelay(2, B, DATA)
    assert core.route(B) == ("relay", 2)
    assert core.route(C) == ("", 0)


def test_turn_when_no_relay_and_bindings_follow_the_allocation() -> None:
    core = ProxyCore()
    peer_turn = ("192.0.2.7", 49152)
    assert core.set_route(B, 0, "192.0.2.7:49152") == []  # no allocation yet: nothing to bind
    assert core.from_wireguard(B, DATA, 0.0) is None  # buffered
    out = core.turn_up("198.51.100.1:50000")
    assert out == [TurnBinding(peer_turn, True), TurnChanged("198.51.100.1:50000"), ToTurn(peer_turn, DATA)]
    assert core.turn_relay == "198.51.100.1:50000"
    assert core.from_turn(peer_turn, b"from b") == ToWireGuard(B, b"from b")
    assert core.from_turn(("192.0.2.8", 1), b"?") is None
    assert core.counters["drop_unknown_turn"] == 1
    assert core.set_route(B, 0, "192.0.2.9:49153") == [
        TurnBinding(peer_turn, False),
        TurnBinding(("192.0.2.9", 49153), True),
    ]
    core.turn_lost()  # a failed Refresh: no more TURN until the next allocation
    assert core.from_wireguard(B, DATA, 0.0) is None
    assert core.turn_down() == [TurnChanged("")]
    assert core.remove_peer(B) == []  # no allocation held: nothing to unbind
    assert core.turn_down() == []


def test_a_handshake_from_an_unknown_key_is_held_until_it_is_a_peer() -> None:
    core = ProxyCore()
    assert core.from_relay(A, DATA, now=0.0) is None
    assert core.counters["drop_unknown_key"] == 1  # not a handshake: dropped
    assert core.from_relay(A, HANDSHAKE, now=0.0) is None
    assert core.counters["held_unknown"] == 1
    assert core.deliver_held(now=0.1) == []  # still no peer
    core.set_route(A, 1, "")
    assert core.deliver_held(now=0.2) == [ToWireGuard(A, HANDSHAKE)]
    assert core.deliver_held(now=0.3) == []  # delivered once
    core.from_relay(C, HANDSHAKE, now=1.0)
    core.set_route(C, 1, "")
    assert core.deliver_held(now=1.0 + HOLD_SECONDS + 0.1) == []  # too old: WireGuard has retried itself


def test_a_handshake_is_re_sent_until_the_peer_answers() -> None:
    """A relay drops a packet for a peer not connected yet, and says PEER_GONE at most once a second per
    destination: the re-sends start with the send, not with a PEER_GONE that may not come."""
    core = ProxyCore()
    core.relays({1: 5.0})
    core.set_route(B, 1, "")
    assert core.from_wireguard(B, HANDSHAKE, 10.0) == ToRelay(1, B, HANDSHAKE)
    assert core.next_timer() == 10.0 + RETRY_INTERVAL
    assert core.timer(10.0 + RETRY_INTERVAL) == [ToRelay(1, B, HANDSHAKE)]
    assert core.timer(10.0 + RETRY_INTERVAL + 0.1) == []  # not due yet
    assert core.counters["handshake_retries"] == 1
    core.peer_gone(B, now=10.6)  # already re-sending: no second schedule
    assert core.next_timer() == 10.0 + 2 * RETRY_INTERVAL
    assert core.from_relay(B, DATA, now=11.1) == ToWireGuard(B, DATA)  # a session: it answered
    assert core.timer(11.5) == []
    assert core.next_timer() is None
    assert core.counters["handshake_retries"] == 1


def test_the_peers_initiation_is_no_answer_and_replaces_ours() -> None:
    """Crossing initiations (two nodes joining at once): the peer's initiation reaching us does not show
    that our messages reach it; our response to it is what is re-sent, not our moot initiation."""
    core = ProxyCore()
    core.relays({1: 5.0})
    core.set_route(B, 1, "")
    response = b"\x02\x00\x00\x00" + b"r" * 88  # a WireGuard handshake response (type 2)
    core.from_wireguard(B, HANDSHAKE, 10.0)
    assert core.from_relay(B, HANDSHAKE, now=10.1) == ToWireGuard(B, HANDSHAKE)  # its initiation
    assert core.from_wireguard(B, response, 10.1) == ToRelay(1, B, response)
    assert core.timer(10.0 + RETRY_INTERVAL) == [ToRelay(1, B, response)]
    assert core.from_relay(B, response, now=10.7) == ToWireGuard(B, response)  # an answer: done
    assert core.next_timer() is None


def test_a_peer_gone_after_the_peer_answered_re_arms_the_re_sends() -> None:
    core = ProxyCore()
    core.relays({1: 5.0})
    core.set_route(B, 1, "")
    core.from_wireguard(B, HANDSHAKE, 10.0)
    core.from_relay(B, DATA, now=10.1)
    assert core.next_timer() is None
    core.peer_gone(B, now=10.2)  # the relay lost it after all (the peer reconnected elsewhere)
    assert core.next_timer() == 10.2 + RETRY_INTERVAL
    assert core.timer(10.2 + RETRY_INTERVAL) == [ToRelay(1, B, HANDSHAKE)]


def test_handshake_re_sends_stop_after_the_hold() -> None:
    core = ProxyCore()
    core.relays({1: 5.0})
    core.set_route(B, 1, "")
    core.from_wireguard(B, HANDSHAKE, 100.0)
    sent = 0
    now = 100.0
    while (when := core.next_timer()) is not None:
        now = when
        sent += len(core.timer(now))
    assert sent == int(HOLD_SECONDS / RETRY_INTERVAL)
    assert now > 100.0 + HOLD_SECONDS
    core.peer_gone(C, now=now)  # no handshake sent to C: nothing to re-send
    assert core.next_timer() is None
