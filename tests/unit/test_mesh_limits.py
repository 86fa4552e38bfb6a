"""ghostmesh.limits, pure, with hand-stepped time: token buckets, fixed windows, calls in flight, source
addresses, the open-files plan, and the Limits facade counting every refusal."""

from __future__ import annotations

import pytest

from ghostcore.errors import ResourceExhausted
from ghostmesh.config import LimitsConfig
from ghostmesh.limits import (
    FD_RESERVE,
    OVERFLOW,
    WINDOW,
    Buckets,
    Calls,
    Coalesced,
    Limits,
    TokenBucket,
    Windows,
    open_files_needed,
    open_files_plan,
    source_of,
)

T0 = 1_700_000_000.0


def test_token_bucket_allows_a_burst_then_the_rate() -> None:
    b = TokenBucket(rate=2.0, burst=3, now=T0)
    assert [b.take(T0) for _ in range(4)] == [True, True, True, False]
    assert not b.take(T0 + 0.4)  # 0.8 of a token
    assert b.take(T0 + 0.5)
    assert not b.full(T0 + 0.5)
    assert b.full(T0 + 2.0)  # refilled up to the burst, not beyond
    assert [b.take(T0 + 2.0) for _ in range(4)] == [True, True, True, False]


def test_token_bucket_ignores_a_clock_stepping_back() -> None:
    b = TokenBucket(rate=1.0, burst=1, now=T0)
    assert b.take(T0)
    assert not b.take(T0 - 100)
    assert not b.take(T0 + 0.5)
    assert b.take(T0 + 1.0)


def test_buckets_are_per_key_and_full_ones_are_swept() -> None:
    bs = Buckets(rate=1.0, burst=1)
    assert bs.take(1, T0)
    assert not bs.take(1, T0)
    assert bs.take(2, T0)  # another key has its own bucket
    for key in range(3, 65):
        bs.take(key, T0)
    assert len(bs) == 64
    bs.take(999, T0 + 10)  # at the sweep mark; every idle bucket is full again: dropped
    assert len(bs) == 1


def test_windows_admit_the_limit_then_count_the_rest_by_kind() -> None:
    w = Windows(length=60.0, limit=2)
    assert [w.hit("n", "advertise", T0) for _ in range(2)] == [True, True]
    assert w.full("n", T0) is not None
    assert not w.hit("n", "advertise", T0 + 1)
    assert not w.hit("n", "withdraw", T0 + 2)
    assert w.close_due(T0 + 59) == []
    assert w.next_close() == T0 + 60
    [closed] = w.close_due(T0 + 60)
    assert (closed.key, closed.seen, closed.kinds) == ("n", 4, {"advertise": 3, "withdraw": 1})
    assert closed.over == {"advertise": 1, "withdraw": 1}
    assert w.next_close() is None
    assert w.hit("n", "advertise", T0 + 61)  # a new window


def test_a_window_ended_by_a_later_event_is_handed_out_once() -> None:
    w = Windows(length=60.0, limit=1)
    w.hit("n", "x", T0)
    w.hit("n", "x", T0 + 100)  # the first window ended; this opens the next
    assert w.next_close() == T0 + 60  # due already
    assert [c.start for c in w.close_due(T0 + 100)] == [T0]
    assert w.next_close() == T0 + 160
    assert [c.start for c in w.close_due(T0 + 160)] == [T0 + 100]
    assert w.close_due(T0 + 1000) == []


def test_windows_beyond_max_keys_share_the_overflow_key() -> None:
    w = Windows(length=60.0, limit=5, max_keys=2)
    w.hit("a", "x", T0)
    w.hit("b", "x", T0)
    w.hit("c", "x", T0)
    w.hit("d", "x", T0)
    closed = {c.key: c.seen for c in w.close_due(T0 + 60)}
    assert closed == {"a": 1, "b": 1, OVERFLOW: 2}


def test_calls_per_source_and_total() -> None:
    calls = Calls(per_source=2, total=3)
    assert [calls.enter("a"), calls.enter("a"), calls.enter("a")] == [None, None, "calls_per_source"]
    assert calls.enter("b") is None
    assert calls.enter("c") == "calls_total"
    assert (calls.active, calls.in_flight("a")) == (3, 2)
    calls.leave("a")
    assert calls.enter("c") is None
    for s in ("a", "b", "c"):
        calls.leave(s)
    assert (calls.active, calls.in_flight("a")) == (0, 0)


@pytest.mark.parametrize(
    ("peer", "source"),
    [
        ("ipv4:192.0.2.7:50123", "192.0.2.7"),
        ("ipv6:[2001:db8:1:2:aaaa::1]:443", "2001:db8:1:2::/64"),
        ("ipv6:%5B2001:db8:1:2::9%5D:443", "2001:db8:1:2::/64"),  # older gRPC percent-encodes
        ("ipv6:[::ffff:192.0.2.7]:1", "192.0.2.7"),
        ("ipv6:[fe80::1%eth0]:1", "fe80::/64"),
        ("unix:/run/ghostmesh/admin.sock", None),
        ("unix:", None),
        ("vsock:3:1", "vsock:3:1"),
        ("ipv4:garbage:1", "ipv4:garbage:1"),
    ],
)
def test_source_of_gRPC_peers(peer: str, source: str | None) -> None:
    assert source_of(peer) == source


def test_open_files_plan() -> None:
    need = open_files_needed(1000)
    assert need == 1000 + FD_RESERVE
    assert open_files_plan(soft=1024, hard=4096, need=need) == need  # raised to what is needed
    assert open_files_plan(soft=8192, hard=8192, need=need) == 8192  # never lowered
    assert open_files_plan(soft=1024, hard=-1, need=need) == need  # no hard limit
    assert open_files_plan(soft=-1, hard=-1, need=need) == -1
    assert open_files_plan(soft=512, hard=1024, need=need) is None  # cannot reach it


def test_status_reports_over_the_rate_are_refused_and_counted() -> None:
    limits = Limits(LimitsConfig(status_reports_per_second=2.0, status_report_burst=3))
    for _ in range(3):
        limits.check_status_report(1, T0)
    with pytest.raises(
        ResourceExhausted, match=r"more than 2 per second \(burst 3\) from this node; nothing"
    ):
        limits.check_status_report(1, T0)
    limits.check_status_report(2, T0)  # another node
    limits.check_status_report(1, T0 + 0.5)
    assert limits.refusals.status_reports == 1


def test_route_rows_are_admitted_then_folded_into_one_summary() -> None:
    limits = Limits(LimitsConfig(audit_rows_per_node_per_minute=2))
    got = [limits.route_row(7, "route.advertise", T0) for _ in range(5)]
    got.append(limits.route_row(7, "route.withdraw", T0 + 1))
    assert got == [True, True, False, False, False, False]
    assert limits.refusals.audit_rows_coalesced == 4
    assert limits.next_deadline() == T0 + WINDOW
    assert limits.closed(T0 + WINDOW) == [
        Coalesced("routes", "7", T0, {"route.advertise": 3, "route.withdraw": 1})
    ]
    limits.route_row(7, "route.advertise", T0 + 100)
    assert limits.closed(T0 + 200) == []  # a window within the limit needs no summary


def test_failed_authentications_over_the_limit_are_refused_until_the_window_closes() -> None:
    limits = Limits(LimitsConfig(auth_failures_per_minute=3))
    for _ in range(2):
        limits.auth_failed("192.0.2.7", "Sync", T0)
    assert limits.auth_over("192.0.2.7", T0) is None
    limits.auth_failed("192.0.2.7", "Register", T0 + 1)
    assert limits.auth_over("192.0.2.7", T0 + 2) == T0 + WINDOW  # its next failure is refused
    limits.auth_failed("192.0.2.7", "Sync", T0 + 3, refused=True)
    assert limits.auth_over("198.51.100.1", T0 + 3) is None  # other sources are not affected
    assert (limits.refusals.auth_failures, limits.refusals.auth_refused) == (4, 1)
    assert limits.closed(T0 + WINDOW) == [
        Coalesced("auth", "192.0.2.7", T0, {"Sync": 3, "Register": 1}, refused=1)
    ]
    assert limits.auth_over("192.0.2.7", T0 + WINDOW) is None


def test_every_failed_authentication_is_summarised_even_under_the_limit() -> None:
    limits = Limits(LimitsConfig())
    limits.auth_failed("192.0.2.7", "ListNodes", T0)
    assert limits.closed(T0 + WINDOW) == [Coalesced("auth", "192.0.2.7", T0, {"ListNodes": 1})]
