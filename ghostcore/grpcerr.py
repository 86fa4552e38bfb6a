"""The one place that maps ghost* errors to gRPC status codes and back.

Server side: ``status_for(err)`` gives the code to abort a call with; the message is ``str(err)``, a
one-line, secret-free text. Client side: ``from_rpc_error(exc)`` turns an ``AioRpcError``/``RpcError``
back into the matching ``GhostError`` so callers (ghostctl, ghostlink) handle one hierarchy.
"""

from __future__ import annotations

import grpc

from ghostcore import errors as e

_TO_CODE: tuple[tuple[type[e.GhostError], grpc.StatusCode], ...] = (
    (e.ConfigError, grpc.StatusCode.FAILED_PRECONDITION),
    (e.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (e.PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (e.AuthError, grpc.StatusCode.UNAUTHENTICATED),
    (e.NotFound, grpc.StatusCode.NOT_FOUND),
    (e.Conflict, grpc.StatusCode.ALREADY_EXISTS),
    (e.Unavailable, grpc.StatusCode.UNAVAILABLE),
    (e.ProtocolError, grpc.StatusCode.INVALID_ARGUMENT),
)

_FROM_CODE: dict[grpc.StatusCode, type[e.GhostError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: e.InvalidArgument,
    grpc.StatusCode.PERMISSION_DENIED: e.PermissionDenied,
    grpc.StatusCode.UNAUTHENTICATED: e.AuthError,
    grpc.StatusCode.NOT_FOUND: e.NotFound,
    grpc.StatusCode.ALREADY_EXISTS: e.Conflict,
    grpc.StatusCode.FAILED_PRECONDITION: e.ConfigError,
    grpc.StatusCode.UNAVAILABLE: e.Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: e.Unavailable,
    grpc.StatusCode.RESOURCE_EXHAUSTED: e.InvalidArgument,
}


def status_for(err: e.GhostError) -> grpc.StatusCode:
    for cls, code in _TO_CODE:
        if isinstance(err, cls):
            return code
    return grpc.StatusCode.UNKNOWN


def from_rpc_error(exc: grpc.RpcError, target: str = "") -> e.GhostError:
    """The GhostError a failed call stands for; ``target`` names the server in Unavailable messages."""
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = (exc.details() if hasattr(exc, "details") else None) or str(code)
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        where = f" at {target}" if target else ""
        first = details.splitlines()[0] if details else ""
        return e.Unavailable(f"cannot reach the server{where} ({first}); is it running and reachable?")
    cls = _FROM_CODE.get(code, e.GhostError)
    return cls(details.splitlines()[0] if details else str(code))
