"""The node-key signing half of the Admin servicer: GetLock / AppendLock / SignNode (``ghostcore.lock``).

A mixin of :class:`ghostmesh.api.admin.AdminServicer` (it reuses that class's caller check and audit
hook), like :mod:`ghostmesh.api.policy_admin`. ghostmesh holds no signing key: ghostctl makes every update
and signature on the admin's machine and sends only the signed bytes; :mod:`ghostmesh.state` checks each
against the lock log before storing it. A refused update or signature (malformed, an untrusted signer, not
following the log's head, vouching for another key) is INVALID_ARGUMENT with the one-line reason, and
nothing is stored. Every stored one is dispatched (an update reaches every stream; a signature the peers
of its node) and recorded in the audit log: ``lock.update`` (kind, keys and signer as ``lockkey:…``) and
``node.sign`` (the node and the trusted key its signature's chain starts at).
"""

from __future__ import annotations

from typing import Any

import grpc

from ghostcore.pb.ghostmesh.v1 import admin_pb2 as apb
from ghostcore.pb.ghostmesh.v1 import coordination_pb2 as pb
from ghostmesh import audit
from ghostmesh.api.admin_base import AdminBase
from ghostmesh.api.errors import grpc_errors
from ghostmesh.mapper import node_to_pb

Ctx = grpc.aio.ServicerContext[Any, Any]

LOCK_TARGET = "lock"  # the audit target of lock.update entries


class LockAdminMixin(AdminBase):
    def _lock_status(self) -> apb.LockStatus:
        return apb.LockStatus(
            log=pb.LockLog(updates=self.state.lock_log()),
            unsigned_nodes=self.state.unsigned_nodes(self.hub.now()),
        )

    @grpc_errors
    async def GetLock(self, request: apb.GetLockRequest, context: Ctx) -> apb.LockStatus:
        self._authorize(context)
        return self._lock_status()

    @grpc_errors
    async def AppendLock(self, request: apb.AppendLockRequest, context: Ctx) -> apb.LockStatus:
        actor = self._authorize(context)
        with self.hub.transaction() as tx:
            tx.dispatch(self.state.append_lock(request.update))
            detail = audit.lock_update_detail(request.update)
            tx.record(actor, audit.LOCK_UPDATE, LOCK_TARGET, detail, context.peer())
        return self._lock_status()

    @grpc_errors
    async def SignNode(self, request: apb.SignNodeRequest, context: Ctx) -> pb.Node:
        actor = self._authorize(context)
        with self.hub.transaction() as tx:
            node, verified, changes = self.state.sign_node(
                request.node_key, request.signature, self.hub.now()
            )
            tx.dispatch(changes)
            detail = audit.node_sign_detail(node, request.node_key, verified)
            tx.record(actor, audit.NODE_SIGN, node.name, detail, context.peer())
        return node_to_pb(node, self.state.is_online(node.id))
