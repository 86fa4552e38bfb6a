"""ghostcore.latency: bucket counts become a cumulative Prometheus histogram (``le`` inclusive)."""

from __future__ import annotations

from ghostcore.latency import Buckets


def test_buckets_are_inclusive_and_cumulative() -> None:
    b = Buckets((0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 1.0, 7.0):
        b.observe(v)
    assert b.cumulative() == [("0.1", 2), ("1.0", 4), ("+Inf", 5)]
    assert b.total == 0.05 + 0.1 + 0.5 + 1.0 + 7.0


def test_empty_histogram() -> None:
    assert Buckets((1.0,)).cumulative() == [("1.0", 0), ("+Inf", 0)]
