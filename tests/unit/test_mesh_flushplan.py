"""The flush plan: rounds of streams, a window that grows with the last round under a burst, stragglers."""

from __future__ import annotations

import pytest

from ghostmesh.flushplan import FlushPlan


def test_a_quiet_round_waits_the_batch_delay() -> None:
    plan = FlushPlan(batch_delay=0.05)
    assert not plan.pending
    assert plan.window_at(0.0) == 0.05
    plan.mark([3, 1, 2])
    plan.mark([1])
    assert plan.pending
    assert plan.take(10.0) == [1, 2, 3]
    assert not plan.pending
    assert plan.in_round
    assert not plan.done(1, 10.001)
    assert not plan.done(2, 10.002)
    assert plan.done(3, 10.003)  # the last one ends the round
    assert not plan.in_round
    assert plan.rounds == 1


def test_work_coming_back_within_a_round_gets_a_window_twice_that_round() -> None:
    plan = FlushPlan(batch_delay=0.05, max_window=2.0, burst_factor=2.0)
    plan.mark(range(1000))
    for sid in plan.take(0.0):
        plan.done(sid, 0.4)  # a round of 0.4 s
    assert plan.window_at(0.5) == pytest.approx(0.8)  # more work 0.1 s after it: a burst
    assert plan.window_at(5.0) == 0.05  # long after it: quiet
    plan.mark([7])
    assert plan.take(5.0) == [7]
    plan.done(7, 5.01)
    assert plan.window_at(5.02) == 0.05  # the last round was short: twice it is below the delay
    plan.mark(range(10))
    plan.take(6.0)
    assert plan.window_at(6.5) == 0.05  # a round in flight but the last one was short
    plan.expire_round(9.0)  # 3 s: longer than any window
    assert plan.window_at(9.1) == 2.0  # capped


def test_a_stream_still_writing_is_not_released_again_and_cannot_hold_up_rounds() -> None:
    plan = FlushPlan(batch_delay=0.05, max_window=1.0)
    plan.mark([1, 2])
    assert plan.take(0.0) == [1, 2]
    plan.done(1, 0.01)  # 2 is a slow reader: its write has not returned
    plan.mark([1, 2])  # both have news again
    plan.expire_round(1.0)
    assert plan.take(1.1) == [1]  # 2 stays marked, not released twice
    assert plan.done(1, 1.11)  # this round waits only for 1
    assert not plan.pending  # 2 is marked but busy
    assert not plan.done(2, 5.0)  # it finished, outside any round of its own
    assert plan.pending
    assert plan.take(5.1) == [2]  # and goes out with everything it missed


def test_a_closed_stream_leaves_every_set_and_may_end_the_round() -> None:
    plan = FlushPlan(batch_delay=0.05)
    plan.mark([1, 2])
    plan.take(0.0)
    plan.mark([1])
    plan.done(2, 0.01)
    assert plan.forget(1, 0.02)  # closed while writing: the round is over
    assert not plan.pending
    assert plan.take(0.1) == []
    assert plan.rounds == 1
