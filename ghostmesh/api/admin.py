"""The Admin servicer: users, nodes, auth keys and API keys (``proto/ghostmesh/v1/admin.proto``).

Who may call: a caller on the unix admin socket (``context.peer()`` starts with ``unix:``) needs nothing
more, because the socket file is mode 0600 in a 0700 directory owned by root: reaching it is the check.
On TCP every call needs ``authorization: Bearer <api key>`` metadata, verified against the hashed API
keys; anything else is UNAUTHENTICATED.
"""

from __future__ import annotations

from typing import Any

import grpc

from ghostcore.errors import AuthError
from ghostcore.pb.ghostmesh.v1 import admin_pb2 as apb
from ghostcore.pb.ghostmesh.v1 import admin_pb2_grpc as apb_grpc
from ghostcore.pb.ghostmesh.v1 import coordination_pb2 as pb
from ghostmesh.api.errors import grpc_errors
from ghostmesh.hub import Hub
from ghostmesh.mapper import node_to_pb
from ghostmesh.store.base import ApiKeyRec, AuthKeyRec, NodeRec

Ctx = grpc.aio.ServicerContext[Any, Any]


def auth_key_pb(rec: AuthKeyRec, now: float) -> apb.AuthKey:
    return apb.AuthKey(
        id=rec.id,
        user=rec.user,
        reusable=rec.reusable,
        ephemeral=rec.ephemeral,
        tags=list(rec.tags),
        created_unix=int(rec.created),
        expires_unix=int(rec.expires),
        used_count=rec.used_count,
        expired=rec.unusable(now),
    )


def api_key_pb(rec: ApiKeyRec, now: float) -> apb.ApiKey:
    return apb.ApiKey(
        id=rec.id,
        created_unix=int(rec.created),
        expires_unix=int(rec.expires),
        expired=rec.unusable(now),
        last_used_unix=int(rec.last_used),
    )


class AdminServicer(apb_grpc.AdminServicer):
    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.state = hub.state

    def _authorize(self, context: Ctx) -> None:
        if context.peer().startswith("unix:"):
            return
        for key, value in context.invocation_metadata() or ():
            if key == "authorization" and isinstance(value, str):
                scheme, _, token = value.partition(" ")
                if scheme.lower() == "bearer" and token:
                    self.state.verify_api_key(token.strip(), self.hub.now())
                    return
        raise AuthError("admin over TCP needs an API key: metadata 'authorization: Bearer gmapi_...'")

    def _node_pb(self, node: NodeRec) -> pb.Node:
        return node_to_pb(node, self.state.is_online(node.id))

    # -- users -----------------------------------------------------------------------------------------

    @grpc_errors
    async def CreateUser(self, request: apb.CreateUserRequest, context: Ctx) -> apb.User:
        self._authorize(context)
        rec = self.state.create_user(request.name, self.hub.now())
        return apb.User(id=rec.id, name=rec.name, created_unix=int(rec.created))

    @grpc_errors
    async def ListUsers(self, request: apb.ListUsersRequest, context: Ctx) -> apb.ListUsersResponse:
        self._authorize(context)
        users = [apb.User(id=u.id, name=u.name, created_unix=int(u.created)) for u in self.state.list_users()]
        return apb.ListUsersResponse(users=users)

    @grpc_errors
    async def DeleteUser(self, request: apb.DeleteUserRequest, context: Ctx) -> apb.DeleteUserResponse:
        self._authorize(context)
        self.state.delete_user(request.name)
        return apb.DeleteUserResponse()

    # -- nodes -----------------------------------------------------------------------------------------

    @grpc_errors
    async def ListNodes(self, request: apb.ListNodesRequest, context: Ctx) -> apb.ListNodesResponse:
        self._authorize(context)
        return apb.ListNodesResponse(nodes=[self._node_pb(n) for n in self.state.list_nodes(request.user)])

    @grpc_errors
    async def RenameNode(self, request: apb.RenameNodeRequest, context: Ctx) -> pb.Node:
        self._authorize(context)
        node, changes = self.state.rename(request.ref, request.new_name)
        self.hub.dispatch(changes)
        return self._node_pb(node)

    @grpc_errors
    async def ExpireNode(self, request: apb.ExpireNodeRequest, context: Ctx) -> pb.Node:
        self._authorize(context)
        node, changes = self.state.expire_node(request.ref, self.hub.now())
        self.hub.dispatch(changes)
        return self._node_pb(node)

    @grpc_errors
    async def DeleteNode(self, request: apb.DeleteNodeRequest, context: Ctx) -> apb.DeleteNodeResponse:
        self._authorize(context)
        self.hub.dispatch(self.state.delete_node(request.ref))
        return apb.DeleteNodeResponse()

    # -- auth keys -------------------------------------------------------------------------------------

    @grpc_errors
    async def CreateAuthKey(
        self, request: apb.CreateAuthKeyRequest, context: Ctx
    ) -> apb.CreateAuthKeyResponse:
        self._authorize(context)
        now = self.hub.now()
        rec, secret = self.state.create_auth_key(
            user=request.user,
            reusable=request.reusable,
            ephemeral=request.ephemeral,
            expiration=float(request.expiration_seconds),
            tags=list(request.tags),
            now=now,
        )
        return apb.CreateAuthKeyResponse(key=auth_key_pb(rec, now), secret=secret)

    @grpc_errors
    async def ListAuthKeys(self, request: apb.ListAuthKeysRequest, context: Ctx) -> apb.ListAuthKeysResponse:
        self._authorize(context)
        now = self.hub.now()
        return apb.ListAuthKeysResponse(
            keys=[auth_key_pb(k, now) for k in self.state.list_auth_keys(request.user)]
        )

    @grpc_errors
    async def ExpireAuthKey(self, request: apb.ExpireAuthKeyRequest, context: Ctx) -> apb.AuthKey:
        self._authorize(context)
        return auth_key_pb(self.state.expire_auth_key(request.id), self.hub.now())

    # -- API keys --------------------------------------------------------------------------------------

    @grpc_errors
    async def CreateApiKey(self, request: apb.CreateApiKeyRequest, context: Ctx) -> apb.CreateApiKeyResponse:
        self._authorize(context)
        now = self.hub.now()
        rec, secret = self.state.create_api_key(float(request.expiration_seconds), now)
        return apb.CreateApiKeyResponse(key=api_key_pb(rec, now), secret=secret)

    @grpc_errors
    async def ListApiKeys(self, request: apb.ListApiKeysRequest, context: Ctx) -> apb.ListApiKeysResponse:
        self._authorize(context)
        now = self.hub.now()
        return apb.ListApiKeysResponse(keys=[api_key_pb(k, now) for k in self.state.list_api_keys()])

    @grpc_errors
    async def ExpireApiKey(self, request: apb.ExpireApiKeyRequest, context: Ctx) -> apb.ApiKey:
        self._authorize(context)
        return api_key_pb(self.state.expire_api_key(request.id), self.hub.now())
