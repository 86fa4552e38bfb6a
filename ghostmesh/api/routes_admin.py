"""The routes half of the Admin servicer: AddRoute / ApproveRoute / DeleteRoute / ListRoutes.

A mixin of :class:`ghostmesh.api.admin.AdminServicer` (it reuses that class's caller check and audit
hook), like :mod:`ghostmesh.api.policy_admin`. The rules live in :mod:`ghostmesh.state` and
:mod:`ghostmesh.routes`; a refused route (overlapping the overlay, host bits set, garbage) is
INVALID_ARGUMENT and nothing changes. Every change is dispatched to the mapper and recorded in the audit
log (``route.add`` / ``route.approve`` / ``route.delete``). Approval by the policy's ``[auto_approvers]``
is not an admin's act: it lives with the policy (:meth:`ghostmesh.policy_source.PolicySource.auto_approves`).
"""

from __future__ import annotations

from typing import Any

import grpc

from ghostcore.pb.ghostmesh.v1 import admin_pb2 as apb
from ghostmesh.api.admin_base import AdminBase, Caller
from ghostmesh.api.errors import grpc_errors
from ghostmesh.audit import ROUTE_ADD, ROUTE_APPROVE, ROUTE_DELETE
from ghostmesh.store.base import NodeRec, RouteRec

Ctx = grpc.aio.ServicerContext[Any, Any]


def route_pb(node: NodeRec, rec: RouteRec, primary: bool) -> apb.Route:
    by = ",".join(w for w, on in (("node", rec.by_node), ("admin", rec.by_admin)) if on)
    return apb.Route(
        node=node.name,
        node_id=node.id,
        prefix=rec.prefix,
        advertised=rec.advertised,
        approved=rec.approved,
        primary=primary,
        advertised_by=by,
    )


class RoutesAdminMixin(AdminBase):
    def _route_pb(self, rec: RouteRec) -> apb.Route:
        node = self.state.resolve(str(rec.node_id))  # resolved by the state call that produced rec
        return route_pb(node, rec, self.state.routes.primary(rec.prefix) == rec.node_id)

    @grpc_errors
    async def AddRoute(self, request: apb.RouteRequest, context: Ctx) -> apb.Route:
        actor = self._authorize(context)
        with self.hub.transaction() as tx:
            rec, changed, changes = self.state.add_route(request.node, request.prefix)
            tx.dispatch(changes)
            if changed:
                tx.record(actor, ROUTE_ADD, self._route_pb(rec).node, {"prefix": rec.prefix}, context.peer())
        return self._route_pb(rec)

    @grpc_errors
    async def ApproveRoute(self, request: apb.RouteRequest, context: Ctx) -> apb.Route:
        return self.approve_route(self._caller(context), request)

    def approve_route(self, caller: Caller, request: apb.RouteRequest) -> apb.Route:
        with self.hub.transaction() as tx:
            rec, changed, changes = self.state.approve_route(request.node, request.prefix)
            tx.dispatch(changes)
            if changed:
                target = self._route_pb(rec).node
                tx.record(caller.actor, ROUTE_APPROVE, target, {"prefix": rec.prefix}, caller.remote)
        return self._route_pb(rec)

    @grpc_errors
    async def DeleteRoute(self, request: apb.RouteRequest, context: Ctx) -> apb.DeleteRouteResponse:
        actor = self._authorize(context)
        node = self.state.resolve(request.node)
        with self.hub.transaction() as tx:
            old, changes = self.state.delete_route(request.node, request.prefix)
            tx.dispatch(changes)
            tx.record(actor, ROUTE_DELETE, node.name, {"prefix": old.prefix}, context.peer())
        return apb.DeleteRouteResponse()

    @grpc_errors
    async def ListRoutes(self, request: apb.ListRoutesRequest, context: Ctx) -> apb.ListRoutesResponse:
        self._authorize(context)
        rows = self.state.list_routes(request.node)
        return apb.ListRoutesResponse(routes=[route_pb(n, r, p) for n, r, p in rows])
