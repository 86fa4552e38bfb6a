"""ghostcore.grpcerr (errors <-> gRPC codes, both ways), ghostcore.aio.Backoff and CoreTimer."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from typing import cast

import grpc
import pytest

from ghostcore import errors as e
from ghostcore.aio import Backoff, CoreTimer
from ghostcore.grpcerr import from_rpc_error, status_for


class _FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


@pytest.mark.parametrize(
    ("err", "code"),
    [
        (e.InvalidArgument("x"), grpc.StatusCode.INVALID_ARGUMENT),
        (e.AuthError("x"), grpc.StatusCode.UNAUTHENTICATED),
        (e.PermissionDenied("x"), grpc.StatusCode.PERMISSION_DENIED),
        (e.NotFound("x"), grpc.StatusCode.NOT_FOUND),
        (e.Conflict("x"), grpc.StatusCode.ALREADY_EXISTS),
        (e.Unavailable("x"), grpc.StatusCode.UNAVAILABLE),
        (e.ConfigError("x"), grpc.StatusCode.FAILED_PRECONDITION),
        (e.GhostError("x"), grpc.StatusCode.UNKNOWN),
    ],
)
def test_each_error_class_has_its_status_and_comes_back_as_itself(
    err: e.GhostError, code: grpc.StatusCode
) -> None:
    assert status_for(err) == code
    back = from_rpc_error(_FakeRpcError(code, "what happened\nsecond line"))
    if code != grpc.StatusCode.UNAVAILABLE:
        assert type(back) is type(err)
        assert str(back) == "what happened"


def test_unavailable_names_the_target_and_what_to_do() -> None:
    back = from_rpc_error(_FakeRpcError(grpc.StatusCode.UNAVAILABLE, "connect failed"), "192.0.2.1:7777")
    assert isinstance(back, e.Unavailable)
    assert "192.0.2.1:7777" in str(back)
    assert "is it running" in str(back)


def test_backoff_grows_to_its_bound_and_resets() -> None:
    b = Backoff(initial=0.5, maximum=4.0, rng=random.Random(1))
    delays = [b.next() for _ in range(8)]
    assert all(0.25 <= d <= 4.0 for d in delays)
    assert max(delays[5:]) > 2.0  # reached the top band
    b.reset()
    assert b.next() <= 0.5


class _Handle:
    def __init__(self, delay: float, cb: Callable[[], None]) -> None:
        self.delay, self.cb, self.cancelled = delay, cb, False

    def cancel(self) -> None:
        self.cancelled = True


class _Loop:
    """Records call_later; the test fires handles by hand (no real loop, no sleeping)."""

    def __init__(self) -> None:
        self.handles: list[_Handle] = []

    def call_later(self, delay: float, cb: Callable[[], None]) -> _Handle:
        self.handles.append(_Handle(delay, cb))
        return self.handles[-1]


def test_core_timer_only_moves_earlier_and_fires_with_the_clock() -> None:
    loop, fired, now = _Loop(), [], [100.0]
    timer = CoreTimer(cast(asyncio.AbstractEventLoop, loop), lambda: now[0], fired.append)
    timer.arm(None)
    assert loop.handles == []
    timer.arm(110.0)
    timer.arm(120.0)  # later than armed: kept at 110
    assert [h.delay for h in loop.handles] == [10.0]
    timer.arm(105.0)  # earlier: the old handle goes
    assert loop.handles[0].cancelled
    assert loop.handles[1].delay == 5.0
    now[0] = 105.0
    loop.handles[1].cb()
    assert fired == [105.0]
    timer.arm(130.0)  # after firing, any deadline arms again
    assert loop.handles[2].delay == 25.0
    timer.cancel()
    assert loop.handles[2].cancelled
