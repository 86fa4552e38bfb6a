"""What every part of the Admin servicer shares: who may call, and recording what they changed.

Who may call: a caller on the unix admin socket (``context.peer()`` starts with ``unix:``) needs nothing
more, because the socket file is mode 0600 in a 0700 directory owned by root: reaching it is the check.
On TCP every call needs ``authorization: Bearer <api key>`` metadata, verified against the hashed API
keys; anything else is UNAUTHENTICATED.

Audit: ``_authorize`` returns the caller ("admin@unix" or "apikey:<id>"); every RPC that changes something
calls ``_audit`` (``hub.record``, remote = ``context.peer()``) after the change succeeded.
The Admin servicer is assembled from this base and one mixin per area (policy, routes), so each area
lives in its own module without re-declaring these.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import grpc

from ghostcore.errors import AuthError
from ghostmesh import audit
from ghostmesh.hub import Hub
from ghostmesh.state import State

Ctx = grpc.aio.ServicerContext[Any, Any]


class AdminBase:
    hub: Hub
    state: State

    def _authorize(self, context: Ctx) -> str:
        """Check the caller; return who it is for the audit log ("admin@unix" or "apikey:<id>")."""
        if context.peer().startswith("unix:"):
            return audit.ACTOR_UNIX
        for key, value in context.invocation_metadata() or ():
            if key == "authorization" and isinstance(value, str):
                scheme, _, token = value.partition(" ")
                if scheme.lower() == "bearer" and token:
                    rec = self.state.verify_api_key(token.strip(), self.hub.now())
                    return audit.api_key_actor(rec.id)
        raise AuthError("admin over TCP needs an API key: metadata 'authorization: Bearer gmapi_...'")

    def _audit(
        self, context: Ctx, actor: str, action: str, target: str, detail: Mapping[str, object] | None = None
    ) -> None:
        """Record a change that succeeded: ``actor`` from :meth:`_authorize`, remote = the gRPC peer."""
        self.hub.record(actor, action, target, detail, context.peer())
