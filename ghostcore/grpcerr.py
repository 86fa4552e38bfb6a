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
    (e.ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
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
    grpc.StatusCode.RESOURCE_EXHAUSTED: e.ResourceExhausted,
}


def status_for(err: e.GhostError) -> grpc.StatusCode:
    for cls, code in _TO_CODE:
        if isinstance(err, cls):
            return code
    return grpc.StatusCode.UNKNOWN


DEFAULT_HINT = "is it running and reachable?"


def from_rpc_error(exc: grpc.RpcError, target: str = "", hint: str = DEFAULT_HINT) -> e.GhostError:
    """The GhostError a failed call stands for.

    An unreachable server or a deadline becomes ``Unavailable("cannot reach <target> (<why>); <hint>")``:
    ``target`` names the server, ``hint`` says what to do (each caller knows best: a flag to check, a
    daemon to start). Everything else keeps the server's first line of detail.
    """
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = (exc.details() if hasattr(exc, "details") else None) or str(code)
    first = details.splitlines()[0] if details else ""
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            first = "timed out"
        return e.Unavailable(f"cannot reach {target or 'the server'} ({first}); {hint}")
    cls = _FROM_CODE.get(code, e.GhostError)
    return cls(first or str(code))
