"""The one place servicers turn a GhostError into a gRPC status (via ``ghostcore.grpcerr.status_for``).

A limit reached (:class:`ghostcore.errors.ResourceExhausted`) is RESOURCE_EXHAUSTED, like every status
mapped by ``status_for``; its refusals are counted, so they are logged at debug level only.

A call from a source that failed to authenticate ``limits.auth_failures_per_minute`` times in its current
window carries an :class:`AuthGate` (set by :mod:`ghostmesh.api.guard` for the call's task): if this call
fails to authenticate too, it is refused as RESOURCE_EXHAUSTED instead (and the gate notes it for the
guard's counters). Calls with good credentials from the same source pass: nodes behind the same NAT as a
misbehaving one keep working.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from ghostcore.errors import AuthError, GhostError, PermissionDenied, ResourceExhausted
from ghostcore.grpcerr import status_for

log = logging.getLogger(__name__)


@dataclass
class AuthGate:
    """The source of this call is over its failed-authentication limit: ``message`` says until when;
    ``refused`` is set once the call was refused for it."""

    message: str
    refused: bool = False

    def refuse(self) -> ResourceExhausted:
        self.refused = True
        return ResourceExhausted(self.message)


AUTH_GATE: ContextVar[AuthGate | None] = ContextVar("ghostmesh_auth_gate", default=None)


def _over_the_limit(err: GhostError) -> GhostError:
    """``err``, or the refusal when it is a failed authentication behind an :class:`AuthGate`."""
    gate = AUTH_GATE.get()
    if gate is None or not isinstance(err, AuthError) or isinstance(err, PermissionDenied):
        return err
    return gate.refuse()


R = TypeVar("R")
Handler = Callable[[Any, Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[R]]


async def abort_with(context: grpc.aio.ServicerContext[Any, Any], err: GhostError, method: str) -> None:
    """Abort the call with ``err``'s status and its one-line, secret-free message (raises)."""
    err = _over_the_limit(err)
    exhausted = isinstance(err, ResourceExhausted)
    code = status_for(err)
    # a limit's refusals are counted (ghostmesh.limits.Refusals); a line each would let a flood fill the log
    level = logging.DEBUG if exhausted else logging.INFO
    log.log(level, "%s refused: %s (%s)", method, err, code.name, extra={"method": method})
    await context.abort(code, str(err))


def grpc_errors(fn: Handler[R]) -> Handler[R]:
    """Decorate a servicer method: a GhostError aborts the call with its status and one-line message."""

    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> R:
        try:
            return await fn(self, request, context)
        except GhostError as err:
            await abort_with(context, err, fn.__name__)
            raise  # unreachable: abort raises

    return wrapper
