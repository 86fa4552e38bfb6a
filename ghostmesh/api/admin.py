"""The Admin servicer: users (and their OIDC bindings), nodes, auth keys and API keys
(``proto/ghostmesh/v1/admin.proto``).

Who may call and how changes are recorded: :mod:`ghostmesh.api.admin_base`. Policy, routes and node-key
signing RPCs come from their mixins (:mod:`ghostmesh.api.policy_admin`, :mod:`ghostmesh.api.routes_admin`,
:mod:`ghostmesh.api.lock_admin`). ListAudit and GetAuditKey serve the log (at most ``MAX_AUDIT_PAGE``
entries per call; limit 0 means that many, never all: a client pages with ``after_seq``) and the public
half of the audit key (``ghostmesh.audit``). GetServerIdentity serves what clients trust the server by:
the pin of its TLS key (also in every CreateAuthKey / CreateApiKey response, so the key handed out
carries it) and its X25519 proof key.
"""

from __future__ import annotations

from typing import Any

import grpc

from ghostcore.errors import Unavailable
from ghostcore.pb.ghostmesh.v1 import admin_pb2 as apb
from ghostcore.pb.ghostmesh.v1 import admin_pb2_grpc as apb_grpc
from ghostcore.pb.ghostmesh.v1 import coordination_pb2 as pb
from ghostmesh import audit
from ghostmesh.api.admin_base import Caller
from ghostmesh.api.errors import grpc_errors
from ghostmesh.api.lock_admin import LockAdminMixin
from ghostmesh.api.policy_admin import PolicyAdminMixin
from ghostmesh.api.routes_admin import RoutesAdminMixin
from ghostmesh.hub import Hub
from ghostmesh.mapper import node_to_pb
from ghostmesh.policy_source import PolicySource
from ghostmesh.state import DEFAULT_USER
from ghostmesh.store.base import ApiKeyRec, AuthKeyRec, NodeRec, UserRec

Ctx = grpc.aio.ServicerContext[Any, Any]
MAX_AUDIT_PAGE = 1000  # entries per ListAudit reply at most (limit 0 asks for this many): replies stay small


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


class AdminServicer(
    PolicyAdminMixin, RoutesAdminMixin, LockAdminMixin, apb_grpc.AdminServicer
):  # all on AdminBase
    def __init__(self, hub: Hub, policy: PolicySource, identity: apb.ServerIdentity) -> None:
        self.hub = hub
        self.state = hub.state
        self.policy = policy
        self.identity = identity  # fixed for the process's life

    def _node_pb(self, node: NodeRec) -> pb.Node:
        return node_to_pb(node, self.state.is_online(node.id))

    # -- users -----------------------------------------------------------------------------------------

    def _user_pb(self, rec: UserRec) -> apb.User:
        return apb.User(
            id=rec.id,
            name=rec.name,
            created_unix=int(rec.created),
            oidc_issuer=rec.oidc_issuer if rec.oidc_subject is not None else "",
            oidc_subject=rec.oidc_subject or "",
            oidc_groups=list(rec.groups),
        )

    @grpc_errors
    async def CreateUser(self, request: apb.CreateUserRequest, context: Ctx) -> apb.User:
        actor = self._authorize(context)
        with self.hub.transaction() as tx:
            rec = self.state.create_user(
                request.name,
                self.hub.now(),
                oidc_subject=request.oidc_subject,
                oidc_issuer=request.oidc_issuer,
            )
            detail: dict[str, object] = {"id": rec.id}
            if rec.oidc_subject is not None:
                detail.update({"oidc_issuer": rec.oidc_issuer, "oidc_subject": rec.oidc_subject})
            tx.record(actor, audit.USER_CREATE, rec.name, detail, context.peer())
        return self._user_pb(rec)

    @grpc_errors
    async def ListUsers(self, request: apb.ListUsersRequest, context: Ctx) -> apb.ListUsersResponse:
        self._authorize(context)
        return apb.ListUsersResponse(users=[self._user_pb(u) for u in self.state.list_users()])

    @grpc_errors
    async def DeleteUser(self, request: apb.DeleteUserRequest, context: Ctx) -> apb.DeleteUserResponse:
        actor = self._authorize(context)
        with self.hub.transaction() as tx:
            self.state.delete_user(request.name)
            tx.record(actor, audit.USER_DELETE, request.name, None, context.peer())
        return apb.DeleteUserResponse()

    @grpc_errors
    async def BindUser(self, request: apb.BindUserRequest, context: Ctx) -> apb.User:
        actor = self._authorize(context)
        with self.hub.transaction() as tx:
            rec, changed = self.state.bind_user(request.name, request.oidc_subject, request.oidc_issuer)
            if changed:
                detail = {"oidc_issuer": rec.oidc_issuer, "oidc_subject": rec.oidc_subject}
                tx.record(actor, audit.USER_BIND, rec.name, detail, context.peer())
        return self._user_pb(rec)

    @grpc_errors
    async def UnbindUser(self, request: apb.UnbindUserRequest, context: Ctx) -> apb.User:
        actor = self._authorize(context)
        before = self.state.store.get_user(request.name)
        with self.hub.transaction() as tx:
            rec, changes = self.state.unbind_user(request.name, self.hub.now())
            tx.dispatch(changes)
            if before is not None and before.oidc_subject is not None:
                detail = {"oidc_issuer": before.oidc_issuer, "oidc_subject": before.oidc_subject}
                tx.record(actor, audit.USER_UNBIND, rec.name, detail, context.peer())
        return self._user_pb(rec)

    # -- nodes -----------------------------------------------------------------------------------------

    @grpc_errors
    async def ListNodes(self, request: apb.ListNodesRequest, context: Ctx) -> apb.ListNodesResponse:
        self._authorize(context)
        return apb.ListNodesResponse(nodes=[self._node_pb(n) for n in self.state.list_nodes(request.user)])

    @grpc_errors
    async def RenameNode(self, request: apb.RenameNodeRequest, context: Ctx) -> pb.Node:
        return self.rename_node(self._caller(context), request)

    def rename_node(self, caller: Caller, request: apb.RenameNodeRequest) -> pb.Node:
        old_name = self.state.resolve(request.ref).name
        with self.hub.transaction() as tx:
            node, changes = self.state.rename(request.ref, request.new_name)
            tx.dispatch(changes)
            if changes:
                detail = {"id": node.id, "old_name": old_name}
                tx.record(caller.actor, audit.NODE_RENAME, node.name, detail, caller.remote)
        return self._node_pb(node)

    @grpc_errors
    async def ExpireNode(self, request: apb.ExpireNodeRequest, context: Ctx) -> pb.Node:
        return self.expire_node(self._caller(context), request)

    def expire_node(self, caller: Caller, request: apb.ExpireNodeRequest) -> pb.Node:
        with self.hub.transaction() as tx:
            node, changes = self.state.expire_node(request.ref, self.hub.now())
            tx.dispatch(changes)
            if changes:
                tx.record(caller.actor, audit.NODE_EXPIRE, node.name, {"id": node.id}, caller.remote)
        return self._node_pb(node)

    @grpc_errors
    async def DeleteNode(self, request: apb.DeleteNodeRequest, context: Ctx) -> apb.DeleteNodeResponse:
        return self.delete_node(self._caller(context), request)

    def delete_node(self, caller: Caller, request: apb.DeleteNodeRequest) -> apb.DeleteNodeResponse:
        node = self.state.resolve(request.ref)
        with self.hub.transaction() as tx:
            tx.dispatch(self.state.delete_node(request.ref))
            tx.record(caller.actor, audit.NODE_DELETE, node.name, {"id": node.id}, caller.remote)
        return apb.DeleteNodeResponse()

    @grpc_errors
    async def AddDevice(self, request: apb.AddDeviceRequest, context: Ctx) -> pb.Node:
        return self.add_device(self._caller(context), request)

    def add_device(self, caller: Caller, request: apb.AddDeviceRequest) -> pb.Node:
        """A device behind a gateway node (see :meth:`ghostmesh.state.State.add_device`); its tags need
        the same ownership an auth key's do."""
        self.policy.authorize_tags(request.user or DEFAULT_USER, request.tags, caller.root)
        with self.hub.transaction() as tx:
            device, changes = self.state.add_device(
                request.name,
                request.node_key,
                request.via,
                user=request.user,
                tags=list(request.tags),
                now=self.hub.now(),
            )
            tx.dispatch(changes)
            gateway = self.state.node(device.via)
            detail = {
                "id": device.id,
                "node_key": device.node_key,
                "via": gateway.name if gateway is not None else device.via,
                "user": device.user,
                "tags": list(device.tags),
                "addresses": [device.ipv4, device.ipv6],
            }
            tx.record(caller.actor, audit.DEVICE_ADD, device.name, detail, caller.remote)
        return self._node_pb(device)

    # -- auth keys -------------------------------------------------------------------------------------

    @grpc_errors
    async def CreateAuthKey(
        self, request: apb.CreateAuthKeyRequest, context: Ctx
    ) -> apb.CreateAuthKeyResponse:
        return self.create_auth_key(self._caller(context), request)

    def create_auth_key(self, caller: Caller, request: apb.CreateAuthKeyRequest) -> apb.CreateAuthKeyResponse:
        now = self.hub.now()
        self.policy.authorize_tags(request.user or DEFAULT_USER, request.tags, caller.root)
        with self.hub.transaction() as tx:
            rec, secret = self.state.create_auth_key(
                user=request.user,
                reusable=request.reusable,
                ephemeral=request.ephemeral,
                expiration=float(request.expiration_seconds),
                tags=list(request.tags),
                now=now,
            )
            tx.record(caller.actor, audit.AUTHKEY_CREATE, rec.id, audit.auth_key_detail(rec), caller.remote)
        return apb.CreateAuthKeyResponse(key=auth_key_pb(rec, now), secret=secret, pin=self.identity.tls_pin)

    @grpc_errors
    async def ListAuthKeys(self, request: apb.ListAuthKeysRequest, context: Ctx) -> apb.ListAuthKeysResponse:
        self._authorize(context)
        now = self.hub.now()
        return apb.ListAuthKeysResponse(
            keys=[auth_key_pb(k, now) for k in self.state.list_auth_keys(request.user)]
        )

    @grpc_errors
    async def ExpireAuthKey(self, request: apb.ExpireAuthKeyRequest, context: Ctx) -> apb.AuthKey:
        return self.expire_auth_key(self._caller(context), request)

    def expire_auth_key(self, caller: Caller, request: apb.ExpireAuthKeyRequest) -> apb.AuthKey:
        with self.hub.transaction() as tx:
            rec = self.state.expire_auth_key(request.id)
            tx.record(caller.actor, audit.AUTHKEY_EXPIRE, rec.id, {"user": rec.user}, caller.remote)
        return auth_key_pb(rec, self.hub.now())

    # -- API keys --------------------------------------------------------------------------------------

    @grpc_errors
    async def CreateApiKey(self, request: apb.CreateApiKeyRequest, context: Ctx) -> apb.CreateApiKeyResponse:
        actor = self._authorize(context)
        now = self.hub.now()
        with self.hub.transaction() as tx:
            rec, secret = self.state.create_api_key(float(request.expiration_seconds), now)
            tx.record(actor, audit.APIKEY_CREATE, rec.id, {"expires_unix": int(rec.expires)}, context.peer())
        return apb.CreateApiKeyResponse(key=api_key_pb(rec, now), secret=secret, pin=self.identity.tls_pin)

    @grpc_errors
    async def ListApiKeys(self, request: apb.ListApiKeysRequest, context: Ctx) -> apb.ListApiKeysResponse:
        self._authorize(context)
        now = self.hub.now()
        return apb.ListApiKeysResponse(keys=[api_key_pb(k, now) for k in self.state.list_api_keys()])

    @grpc_errors
    async def ExpireApiKey(self, request: apb.ExpireApiKeyRequest, context: Ctx) -> apb.ApiKey:
        actor = self._authorize(context)
        with self.hub.transaction() as tx:
            rec = self.state.expire_api_key(request.id)
            tx.record(actor, audit.APIKEY_EXPIRE, rec.id, None, context.peer())
        return api_key_pb(rec, self.hub.now())

    # -- audit log -------------------------------------------------------------------------------------

    def auditor(self) -> audit.Auditor:
        if self.hub.audit is None:
            raise Unavailable("this server has no audit log configured")
        return self.hub.audit

    @grpc_errors
    async def ListAudit(self, request: apb.ListAuditRequest, context: Ctx) -> apb.ListAuditResponse:
        self._authorize(context)
        limit = min(request.limit or MAX_AUDIT_PAGE, MAX_AUDIT_PAGE)
        recs = self.auditor().store.list_audit(request.after_seq, limit)
        return apb.ListAuditResponse(entries=[audit.entry_pb(r) for r in recs])

    @grpc_errors
    async def GetAuditKey(self, request: apb.GetAuditKeyRequest, context: Ctx) -> apb.AuditKey:
        self._authorize(context)
        return apb.AuditKey(public_key=self.auditor().public_key)

    # -- identity --------------------------------------------------------------------------------------

    @grpc_errors
    async def GetServerIdentity(
        self, request: apb.GetServerIdentityRequest, context: Ctx
    ) -> apb.ServerIdentity:
        self._authorize(context)
        return self.identity
