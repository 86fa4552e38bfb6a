"""What every part of the Admin servicer shares: who may call, and recording what they changed.

Who may call: a caller on the unix admin socket (``context.peer()`` starts with ``unix:``) needs nothing
more, because the socket file is root's and mode 0600 from birth: reaching it is the check.
On TCP every call needs ``authorization: Bearer <api key>`` metadata, verified against the hashed API
keys; anything else is UNAUTHENTICATED.

Audit: ``_caller`` checks the caller and returns a :class:`Caller`: the actor ("admin@unix" or
"apikey:<id>") and the remote (``context.peer()``). Every RPC that changes something makes the change in a
hub transaction (:meth:`ghostmesh.hub.Hub.transaction`) and records it there (``tx.record``), so the change
and its row commit together. The RPCs other front ends offer too (the web console,
:mod:`ghostmesh.console`) keep their logic in plain methods taking a :class:`Caller` and the request
message; the RPC only checks the caller and calls that method, so both front ends share one code path and
one audit trail. The Admin servicer is assembled from this base and one mixin per area (policy, routes),
so each area lives in its own module without re-declaring these.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import grpc

from ghostcore.errors import AuthError
from ghostmesh import audit
from ghostmesh.hub import Hub
from ghostmesh.state import State

Ctx = grpc.aio.ServicerContext[Any, Any]


@dataclass(frozen=True, slots=True)
class Caller:
    """An authorized admin: who it is for the audit log and where it called from (the entry's remote)."""

    actor: str
    remote: str

    @property
    def root(self) -> bool:
        """The caller reached the unix admin socket (root on the server's machine)."""
        return self.actor == audit.ACTOR_UNIX


class AdminBase:
    hub: Hub
    state: State

    def api_key_actor(self, token: str) -> str:
        """The audit actor ("apikey:<id>") of a valid API key; AuthError (one line) for any other."""
        rec = self.state.verify_api_key(token.strip(), self.hub.now())
        return audit.api_key_actor(rec.id)

    def api_key_in_force(self, key_id: str) -> bool:
        """The API key ``key_id`` still exists, unrevoked and unexpired (a session made with it lives on)."""
        rec = self.state.store.get_api_key(key_id)
        return rec is not None and not rec.unusable(self.hub.now())

    def _authorize(self, context: Ctx) -> str:
        """Check the caller; return who it is for the audit log ("admin@unix" or "apikey:<id>")."""
        if context.peer().startswith("unix:"):
            return audit.ACTOR_UNIX
        for key, value in context.invocation_metadata() or ():
            if key == "authorization" and isinstance(value, str):
                scheme, _, token = value.partition(" ")
                if scheme.lower() == "bearer" and token:
                    return self.api_key_actor(token)
        raise AuthError("admin over TCP needs an API key: metadata 'authorization: Bearer gmapi_...'")

    def _caller(self, context: Ctx) -> Caller:
        """Check the caller (:meth:`_authorize`); who it is and where it called from."""
        return Caller(self._authorize(context), context.peer())
