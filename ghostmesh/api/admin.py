"""The Admin servicer: users, nodes, auth keys and API keys (``proto/ghostmesh/v1/admin.proto``).

Who may call and how changes are recorded: :mod:`ghostmesh.api.admin_base`. Policy and routes RPCs come
from their mixins (:mod:`ghostmesh.api.policy_admin`, :mod:`ghostmesh.api.routes_admin`). ListAudit and
GetAuditKey serve the log and the public half of the audit key (``ghostmesh.audit``).
"""

from __future__ import annotations

from typing import Any

import grpc

from ghostcore.errors import Unavailable
from ghostcore.pb.ghostmesh.v1 import admin_pb2 as apb
from ghostcore.pb.ghostmesh.v1 import admin_pb2_grpc as apb_grpc
from ghostcore.pb.ghostmesh.v1 import coordination_pb2 as pb
from ghostmesh import audit
from ghostmesh.api.errors import grpc_errors
from ghostmesh.api.policy_admin import PolicyAdminMixin
from ghostmesh.api.routes_admin import RoutesAdminMixin, apply_policy
from ghostmesh.hub import Hub
from ghostmesh.mapper import node_to_pb
from ghostmesh.policy_source import PolicyManager
from ghostmesh.state import DEFAULT_USER
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


class AdminServicer(PolicyAdminMixin, RoutesAdminMixin, apb_grpc.AdminServicer):  # all on AdminBase
    def __init__(self, hub: Hub, policy: PolicyManager | None = None) -> None:
        self.hub = hub
        self.state = hub.state
        # no manager given (tests building a bare servicer): API-set policy in the store, no acl_file
        self.policy = policy or PolicyManager(
            hub.state.store, None, lambda p: apply_policy(hub, p), hub.clock
        )

    def _node_pb(self, node: NodeRec) -> pb.Node:
        return node_to_pb(node, self.state.is_online(node.id))

    # -- users -----------------------------------------------------------------------------------------

    @grpc_errors
    async def CreateUser(self, request: apb.CreateUserRequest, context: Ctx) -> apb.User:
        actor = self._authorize(context)
        rec = self.state.create_user(request.name, self.hub.now())
        self._audit(context, actor, audit.USER_CREATE, rec.name, {"id": rec.id})
        return apb.User(id=rec.id, name=rec.name, created_unix=int(rec.created))

    @grpc_errors
    async def ListUsers(self, request: apb.ListUsersRequest, context: Ctx) -> apb.ListUsersResponse:
        self._authorize(context)
        users = [apb.User(id=u.id, name=u.name, created_unix=int(u.created)) for u in self.state.list_users()]
        return apb.ListUsersResponse(users=users)

    @grpc_errors
    async def DeleteUser(self, request: apb.DeleteUserRequest, context: Ctx) -> apb.DeleteUserResponse:
        actor = self._authorize(context)
        self.state.delete_user(request.name)
        self._audit(context, actor, audit.USER_DELETE, request.name)
        return apb.DeleteUserResponse()

    # -- nodes -----------------------------------------------------------------------------------------

    @grpc_errors
    async def ListNodes(self, request: apb.ListNodesRequest, context: Ctx) -> apb.ListNodesResponse:
        self._authorize(context)
        return apb.ListNodesResponse(nodes=[self._node_pb(n) for n in self.state.list_nodes(request.user)])

    @grpc_errors
    async def RenameNode(self, request: apb.RenameNodeRequest, context: Ctx) -> pb.Node:
        actor = self._authorize(context)
        old_name = self.state.resolve(request.ref).name
        node, changes = self.state.rename(request.ref, request.new_name)
        self.hub.dispatch(changes)
        if changes:
            self._audit(context, actor, audit.NODE_RENAME, node.name, {"id": node.id, "old_name": old_name})
        return self._node_pb(node)

    @grpc_errors
    async def ExpireNode(self, request: apb.ExpireNodeRequest, context: Ctx) -> pb.Node:
        actor = self._authorize(context)
        node, changes = self.state.expire_node(request.ref, self.hub.now())
        self.hub.dispatch(changes)
        if changes:
            self._audit(context, actor, audit.NODE_EXPIRE, node.name, {"id": node.id})
        return self._node_pb(node)

    @grpc_errors
    async def DeleteNode(self, request: apb.DeleteNodeRequest, context: Ctx) -> apb.DeleteNodeResponse:
        actor = self._authorize(context)
        node = self.state.resolve(request.ref)
        self.hub.dispatch(self.state.delete_node(request.ref))
        self._audit(context, actor, audit.NODE_DELETE, node.name, {"id": node.id})
        return apb.DeleteNodeResponse()

    # -- auth keys -------------------------------------------------------------------------------------

    @grpc_errors
    async def CreateAuthKey(
        self, request: apb.CreateAuthKeyRequest, context: Ctx
    ) -> apb.CreateAuthKeyResponse:
        actor = self._authorize(context)
        now = self.hub.now()
        self.policy.authorize_tags(request.user or DEFAULT_USER, request.tags, actor == audit.ACTOR_UNIX)
        rec, secret = self.state.create_auth_key(
            user=request.user,
            reusable=request.reusable,
            ephemeral=request.ephemeral,
            expiration=float(request.expiration_seconds),
            tags=list(request.tags),
            now=now,
        )
        self._audit(context, actor, audit.AUTHKEY_CREATE, rec.id, audit.auth_key_detail(rec))
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
        actor = self._authorize(context)
        rec = self.state.expire_auth_key(request.id)
        self._audit(context, actor, audit.AUTHKEY_EXPIRE, rec.id, {"user": rec.user})
        return auth_key_pb(rec, self.hub.now())

    # -- API keys --------------------------------------------------------------------------------------

    @grpc_errors
    async def CreateApiKey(self, request: apb.CreateApiKeyRequest, context: Ctx) -> apb.CreateApiKeyResponse:
        actor = self._authorize(context)
        now = self.hub.now()
        rec, secret = self.state.create_api_key(float(request.expiration_seconds), now)
        self._audit(context, actor, audit.APIKEY_CREATE, rec.id, {"expires_unix": int(rec.expires)})
        return apb.CreateApiKeyResponse(key=api_key_pb(rec, now), secret=secret)

    @grpc_errors
    async def ListApiKeys(self, request: apb.ListApiKeysRequest, context: Ctx) -> apb.ListApiKeysResponse:
        self._authorize(context)
        now = self.hub.now()
        return apb.ListApiKeysResponse(keys=[api_key_pb(k, now) for k in self.state.list_api_keys()])

    @grpc_errors
    async def ExpireApiKey(self, request: apb.ExpireApiKeyRequest, context: Ctx) -> apb.ApiKey:
        actor = self._authorize(context)
        rec = self.state.expire_api_key(request.id)
        self._audit(context, actor, audit.APIKEY_EXPIRE, rec.id)
        return api_key_pb(rec, self.hub.now())

    # -- audit log -------------------------------------------------------------------------------------

    def _auditor(self) -> audit.Auditor:
        if self.hub.audit is None:
            raise Unavailable("this server has no audit log configured")
        return self.hub.audit

    @grpc_errors
    async def ListAudit(self, request: apb.ListAuditRequest, context: Ctx) -> apb.ListAuditResponse:
        self._authorize(context)
        recs = self._auditor().store.list_audit(request.after_seq, request.limit)
        return apb.ListAuditResponse(entries=[audit.entry_pb(r) for r in recs])

    @grpc_errors
    async def GetAuditKey(self, request: apb.GetAuditKeyRequest, context: Ctx) -> apb.AuditKey:
        self._authorize(context)
        return apb.AuditKey(public_key=self._auditor().public_key)
