"""ghostlink.paths: relay first, direct on a working check, back to relay on death, direct again."""

from __future__ import annotations

from ghostlink.paths import MAX_LEARNED, PathManager, parse_candidate

A = ("198.51.100.7", 41641)
B = ("192.0.2.9", 5000)


def test_parse_candidate_ipv4_only() -> None:
    assert parse_candidate("198.51.100.7:41641") == A
    assert parse_candidate("[2001:db8::1]:41641") is None
    assert parse_candidate("198.51.100.7") is None
    assert parse_candidate("198.51.100.7:0") is None
    assert parse_candidate("nonsense:12") is None


def test_relay_until_a_check_answers_then_direct() -> None:
    pm = PathManager()
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
