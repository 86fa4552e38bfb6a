"""The one place servicers turn a GhostError into a gRPC status (via ``ghostcore.grpcerr.status_for``)."""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from ghostcore.errors import GhostError
from ghostcore.grpcerr import status_for

log = logging.getLogger(__name__)

R = TypeVar("R")
Handler = Callable[[Any, Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[R]]


async def abort_with(context: grpc.aio.ServicerContext[Any, Any], err: GhostError, method: str) -> None:
    """Abort the call with ``err``'s status and its one-line, secret-free message (raises)."""
    code = status_for(err)
    log.info("%s refused: %s (%s)", method, err, code.name, extra={"method": method})
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
