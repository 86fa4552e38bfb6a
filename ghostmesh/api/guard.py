"""The door every call passes first: calls in flight and sources that fail to authenticate (the I/O edge).

A grpc.aio server interceptor over both services; the rules and counters are :mod:`ghostmesh.limits`.
For a call on the TCP port, from source address S (an IPv4 address or an IPv6 /64):

1. S has ``limits.calls_per_source`` calls in flight, or the server ``limits.calls_total``: refused;
2. the call runs; if it ends UNAUTHENTICATED (a missing, bad, stale or replayed proof, a bad auth key or
   API key, an expired node), or NOT_FOUND on the Coordination service (a valid proof for a key that is
   no node's: anyone can make keys, and each such proof fills the replay guard), that is one failed
   authentication of S: counted, and summarised in the audit log once per source and window
   (``auth.failed``, by the hub's timer);
3. once S failed ``limits.auth_failures_per_minute`` times in its window, its calls run behind an
   :class:`ghostmesh.api.errors.AuthGate` until the window closes: one that fails to authenticate, or
   proves a key that is no node's (refused before its nonce is remembered), is RESOURCE_EXHAUSTED
   instead. Calls with good credentials pass, so the nodes sharing S with a misbehaving one keep working.

Calls on the unix admin socket pass untouched: reaching that socket is already root's privilege, and
an admin must get in while the TCP port is flooded.

What this cannot see: grpc.aio offers no hook when a connection is accepted, nor before a call's request
has arrived, so connections and requests still on their way are bounded by gRPC's own options instead
(:func:`ghostmesh.server.server_options`: connections in total, streams per connection, pending calls,
the TLS handshake's deadline), not per source.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextvars import Token
from typing import Any, cast

import grpc

from ghostmesh.api.errors import AUTH_GATE, AuthGate
from ghostmesh.hub import Hub
from ghostmesh.limits import source_of

Ctx = grpc.aio.ServicerContext[Any, Any]
Unary = Callable[[Any, Ctx], Awaitable[Any]]
Streaming = Callable[[Any, Ctx], AsyncIterator[Any]]
COORDINATION = "/ghostmesh.v1.Coordination/"
OPEN_METHODS = frozenset({COORDINATION + "GetServerInfo"})  # calls needing no credentials


class CallGuard(grpc.aio.ServerInterceptor):
    """Wraps every handler of the server it is given to (see the module docstring)."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.limits = hub.limits
        # Calls and failed calls by full method name (bounded: only methods a service defines get here).
        self.calls: Counter[str] = Counter()
        self.failures: Counter[str] = Counter()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        # grpc's handler type names synchronous behaviours; on a grpc.aio server they are coroutines
        # (unary) and async generators (server streaming), the only two kinds these services have.
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._streaming(method, cast(Streaming, handler.unary_stream)),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_unary is None:
            raise TypeError(f"{method}: the call guard knows only unary and server-streaming methods")
        return grpc.unary_unary_rpc_method_handler(
            self._unary(method, cast(Unary, handler.unary_unary)),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _unary(self, method: str, behavior: Unary) -> Unary:
        async def guarded(request: Any, context: Ctx) -> Any:
            self.calls[method] += 1
            source = source_of(context.peer())
            entered: tuple[str, AuthGate | None, Token[AuthGate | None]] | None = None
            try:
                if source is not None:
                    await self._enter(source, context)
                    gate = self._gate(source, method)
                    entered = (source, gate, AUTH_GATE.set(gate))
                return await behavior(request, context)
            except Exception:
                self.failures[method] += 1  # context.abort raises: every refused call lands here
                raise
            finally:
                if entered is not None:
                    AUTH_GATE.reset(entered[2])
                    self._leave(entered[0], method, context, entered[1])

        return guarded

    def _streaming(self, method: str, behavior: Streaming) -> Streaming:
        async def guarded(request: Any, context: Ctx) -> AsyncIterator[Any]:
            self.calls[method] += 1
            source = source_of(context.peer())
            entered: tuple[str, AuthGate | None, Token[AuthGate | None]] | None = None
            try:
                if source is not None:
                    await self._enter(source, context)
                    gate = self._gate(source, method)
                    entered = (source, gate, AUTH_GATE.set(gate))
                async for item in behavior(request, context):
                    yield item
            except Exception:
                self.failures[method] += 1  # an abort raises; a client going away is a cancellation
                raise
            finally:
                if entered is not None:
                    AUTH_GATE.reset(entered[2])
                    self._leave(entered[0], method, context, entered[1])

        return guarded

    async def _enter(self, source: str, context: Ctx) -> None:
        """Count the call in, or abort it (raises) with RESOURCE_EXHAUSTED and one line saying why."""
        limits = self.limits
        which = limits.calls.enter(source)
        if which is not None:
            limits.call_refused(which)
            if which == "calls_per_source":
                why = f"{limits.calls.in_flight(source)} calls in flight from {source}"
            else:
                why = f"{limits.calls.active} calls in flight"
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED, f"too many calls: {why} (limits.{which}); retry shortly"
            )

    def _gate(self, source: str, method: str) -> AuthGate | None:
        """The gate for a call from a source over its failed-authentication limit (None: no gate)."""
        now = self.hub.now()
        reopens = None if method in OPEN_METHODS else self.limits.auth_over(source, now)
        if reopens is None:
            return None
        return AuthGate(
            f"too many failed authentications from {source}; retry in {max(1, round(reopens - now))} s"
        )

    def _leave(self, source: str, method: str, context: Ctx, gate: AuthGate | None) -> None:
        self.limits.calls.leave(source)
        code = context.code()
        unknown_node = code == grpc.StatusCode.NOT_FOUND and method.startswith(COORDINATION)
        refused = gate is not None and gate.refused
        if refused or code == grpc.StatusCode.UNAUTHENTICATED or unknown_node:
            self.limits.auth_failed(source, method.rpartition("/")[2], self.hub.now(), refused=refused)
