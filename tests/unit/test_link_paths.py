"""ghostlink.traversal.path_core: relay first, direct on a working check, back to relay on death, direct
again."""

from __future__ import annotations

from ghostlink.traversal.path_core import MAX_LEARNED, PathManager, parse_candidate

A = ("198.51.100.7", 41641)
B = ("192.0.2.9", 5000)


V6 = ("2001:db8::1", 41641)


def test_parse_candidate_both_families_unless_told() -> None:
    assert parse_candidate("198.51.100.7:41641") == A
    assert parse_candidate("[2001:db8::1]:41641") == V6
    assert parse_candidate("[2001:db8::1]:41641", families=(4,)) is None
    assert parse_candidate("198.51.100.7:41641", families=(6,)) is None
    assert parse_candidate("198.51.100.7") is None
    assert parse_candidate("198.51.100.7:0") is None
    assert parse_candidate("nonsense:12") is None


def test_relay_until_a_check_answers_then_direct() -> None:
    pm = PathManager()
    pm.families = frozenset({4})  # a host without IPv6: its candidates are not even checked
    pm.set_peer("k", ["198.51.100.7:41641", "[2001:db8::1]:1"], now=0.0)
    assert pm.direct("k") is None
    assert pm.due(0.0) == [("k", A)]
    assert pm.due(0.1) == []  # in flight: not sent twice
    assert pm.result("k", A, 0.002, now=0.1) is True
    assert pm.direct("k") == A
    assert pm.latency("k") == 0.002


def test_unanswered_candidates_back_off_up_to_the_max() -> None:
    pm = PathManager(probe_interval=1.0, probe_max=8.0)
    pm.set_peer("k", ["198.51.100.7:41641"], now=0.0)
    t, gaps = 0.0, []
    for _ in range(6):
        ((_, addr),) = pm.due(t)
        pm.result("k", addr, None, t)
        nxt = pm.next_due()
        assert nxt is not None
        gaps.append(nxt - t)
        t = nxt
    assert gaps == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert pm.direct("k") is None


def test_direct_dies_after_dead_after_and_returns() -> None:
    pm = PathManager(keep_interval=0.5, dead_after=2.0)
    pm.set_peer("k", ["198.51.100.7:41641"], now=0.0)
    pm.due(0.0)
    pm.result("k", A, 0.001, 0.0)
    assert pm.tick(1.9) == []
    assert pm.due(0.5) == [("k", A)]  # the direct path is kept checked
    pm.result("k", A, None, 1.5)
    assert pm.direct("k") == A  # one lost check is not death
    assert pm.tick(2.0) == ["k"]
    assert pm.direct("k") is None
    # the peer's own check arrives: learn resets the backoff and checks at once
    pm.learn("k", A, 3.0)
    assert pm.due(3.0) == [("k", A)]
    assert pm.result("k", A, 0.001, 3.0) is True
    assert pm.direct("k") == A


def test_peer_reflexive_candidate_learned_only_for_known_peers() -> None:
    pm = PathManager()
    pm.learn("stranger", B, 0.0)
    assert pm.due(0.0) == []
    pm.set_peer("k", [], now=0.0)
    pm.learn("k", B, 0.0)
    assert pm.due(0.0) == [("k", B)]
    pm.result("k", B, 0.003, 0.0)
    assert pm.direct("k") == B
    # a new map without it keeps the learned candidate
    assert pm.set_peer("k", ["198.51.100.7:41641"], now=1.0) is False
    assert pm.direct("k") == B


def test_map_dropping_the_direct_candidate_goes_back_to_relay() -> None:
    pm = PathManager()
    pm.set_peer("k", ["198.51.100.7:41641"], now=0.0)
    pm.due(0.0)
    pm.result("k", A, 0.001, 0.0)
    assert pm.set_peer("k", ["192.0.2.9:5000"], now=1.0) is True
    assert pm.direct("k") is None


def test_much_faster_candidate_wins_with_hysteresis() -> None:
    pm = PathManager()
    pm.set_peer("k", ["198.51.100.7:41641", "192.0.2.9:5000"], now=0.0)
    assert sorted(pm.due(0.0)) == sorted([("k", A), ("k", B)])
    assert pm.result("k", A, 0.010, 0.0) is True
    assert pm.result("k", B, 0.007, 0.0) is False  # not 2x better: stay
    assert pm.direct("k") == A
    pm.learn("k", B, 1.0)
    pm.due(1.0)
    assert pm.result("k", B, 0.002, 1.0) is True
    assert pm.direct("k") == B


def test_disabled_never_checks() -> None:
    pm = PathManager(enabled=False)
    pm.set_peer("k", ["198.51.100.7:41641"], now=0.0)
    assert pm.due(0.0) == []
    pm.remove_peer("k")
    assert pm.peers() == []


def test_learned_candidates_are_bounded_and_the_direct_one_is_kept() -> None:
    pm = PathManager()
    pm.set_peer("k", [], now=0.0)
    pm.learn("k", B, 0.0)
    pm.due(0.0)
    pm.result("k", B, 0.001, 0.0)
    assert pm.direct("k") == B
    for i in range(3 * MAX_LEARNED):  # a flood of checks in the peer's name from many addresses
        pm.learn("k", ("203.0.113.5", 1000 + i), 1.0)
    due = [addr for _, addr in pm.due(1.0)]
    assert B in due  # the direct path is still checked
    assert len(due) == MAX_LEARNED + 1
    assert ("203.0.113.5", 1000 + 3 * MAX_LEARNED - 1) in due  # the newest are kept
    assert pm.direct("k") == B


def test_ipv6_candidate_goes_direct_when_ipv4_is_dead() -> None:
    """Two hosts with public IPv6 behind IPv4 NATs: the v4 checks never answer, the v6 one does."""
    pm = PathManager()
    pm.set_peer("k", ["198.51.100.7:41641", "[2001:db8::1]:41641"], now=0.0)
    assert sorted(pm.due(0.0)) == sorted([("k", A), ("k", V6)])
    assert pm.result("k", A, None, now=1.0) is False
    assert pm.result("k", V6, 0.003, now=1.0) is True
    assert pm.direct("k") == V6


def test_remapped_public_port_the_map_does_not_name_yet() -> None:
    """Two nodes behind one NAT: the router kept 41641 for one and gave the other a new public port.

    The map names the peer's LAN address (WireGuard's port) and the public endpoint STUN saw (the
    remapped port). A check from the peer arrives from its LAN address; one that crossed a NAT arrives
    from a public port no map record had: both are learned, checked at once, and the lowest RTT wins.
    """
    lan, public = ("198.51.100.11", 41641), ("192.0.2.20", 28756)
    seen_from = ("192.0.2.20", 28757)  # the router's mapping toward us, not the one STUN reported
    pm = PathManager()
    pm.set_peer("k", ["198.51.100.11:41641", "192.0.2.20:28756"], now=0.0)
    assert sorted(a for _, a in pm.due(0.0)) == sorted([lan, public])
    pm.learn("k", seen_from, now=0.1)  # learned while both checks are in flight
    assert pm.due(0.1) == [("k", seen_from)]
    assert pm.result("k", public, None, now=1.0) is False  # no hairpin in this router
    assert pm.result("k", seen_from, 0.004, now=1.0) is True
    assert pm.direct("k") == seen_from
    assert pm.result("k", lan, 0.0004, now=1.0) is True  # the LAN path: 10x faster, taken
    assert pm.direct("k") == lan


def test_candidate_dropped_by_the_map_is_kept_while_the_peer_checks_from_it() -> None:
    """A remapped public port can change in the map (a new STUN answer) while the old mapping still
    carries the peer's checks: dropping it would cut the path that works."""
    old, new = ("192.0.2.20", 20001), ("192.0.2.20", 20002)
    pm = PathManager()
    pm.set_peer("k", ["192.0.2.20:20001"], now=0.0)
    pm.learn("k", old, now=0.1)
    assert pm.result("k", old, 0.002, now=0.2) is True
    assert pm.set_peer("k", ["192.0.2.20:20002"], now=0.3) is False  # still direct via old
    assert pm.direct("k") == old
    assert any(a == new for _, a in pm.due(0.4))
    # One that never carried a check goes with the map.
    pm.set_peer("k2", ["192.0.2.30:1000"], now=0.0)
    pm.set_peer("k2", [], now=0.1)
    assert [k for k, _ in pm.due(5.0) if k == "k2"] == []


def test_check_soon_checks_at_once_even_when_a_check_was_in_flight() -> None:
    pm = PathManager(probe_interval=1.0, probe_max=8.0)
    pm.set_peer("k", ["198.51.100.7:41641"], now=0.0)
    for t in (0.0, 1.0, 3.0, 7.0):  # backed off: the next check would be 8 s away
        assert pm.due(t) == [("k", A)]
        pm.result("k", A, None, now=t)
    assert pm.due(8.0) == []
    pm.check_soon("k", A, now=8.0)
    assert pm.due(8.0) == [("k", A)]
    # A check in flight when the route opened left before it: the next one goes as soon as it fails.
    pm.check_soon("k", A, now=8.1)
    pm.result("k", A, None, now=9.0)
    assert pm.due(9.0) == [("k", A)]
    pm.result("k", A, None, now=10.0)
    assert pm.due(10.5) == []  # once only: back to the backoff
    pm.check_soon("k", B, now=11.0)  # not a candidate: nothing
    pm.check_soon("other", A, now=11.0)
    assert pm.due(11.0) == []
