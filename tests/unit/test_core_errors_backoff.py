"""ghostcore.grpcerr (errors <-> gRPC codes, both ways) and ghostcore.aio.Backoff."""

from __future__ import annotations

import random

import grpc
import pytest

from ghostcore import errors as e
from ghostcore.aio import Backoff
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
