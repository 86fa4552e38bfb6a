"""The routes half of the Admin servicer: AddRoute / ApproveRoute / DeleteRoute / ListRoutes.

A mixin of :class:`ghostmesh.api.admin.AdminServicer` (it reuses that class's caller check and audit
hook), like :mod:`ghostmesh.api.policy_admin`. The rules live in :mod:`ghostmesh.state` and
:mod:`ghostmesh.routes`; a refused route (overlapping the overlay, host bits set, garbage) is
INVALID_ARGUMENT and nothing changes. Every change is dispatched to the mapper and recorded in the audit
log (``route.add`` / ``route.approve`` / ``route.delete``).

:func:`auto_approver` turns the policy's ``[auto_approvers]`` into the callable
:meth:`ghostmesh.state.State.advertise_routes` takes; the coordination API uses it for node reports, and
:func:`apply_policy` (how a new policy is put in force) to approve what a new policy's auto-approvers cover.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import grpc

from ghostcore.pb.ghostmesh.v1 import admin_pb2 as apb
from ghostmesh import audit
from ghostmesh.api.admin_base import AdminBase
from ghostmesh.api.errors import grpc_errors
from ghostmesh.mapper import ident_of
from ghostmesh.store.base import NodeRec, RouteRec

if TYPE_CHECKING:
    from ghostmesh.hub import Hub
    from ghostmesh.policy import Policy

Ctx = grpc.aio.ServicerContext[Any, Any]
ROUTE_ADD = "route.add"  # audit actions
ROUTE_APPROVE = "route.approve"
ROUTE_DELETE = "route.delete"
ROUTE_ADVERTISE = "route.advertise"  # a node started advertising (actor node:<name>)
ROUTE_WITHDRAW = "route.withdraw"  # a node stopped advertising


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


def auto_approver(hub: Hub) -> Callable[[NodeRec, str], bool]:
    """The current policy's auto-approvers as a predicate (no policy: nothing is auto-approved)."""

    def approves(node: NodeRec, prefix: str) -> bool:
        policy = hub.mapper.compiler.policy
        return policy is not None and policy.auto_approves(ident_of(node).principal, prefix)

    return approves


def apply_policy(hub: Hub, policy: Policy | None) -> None:
    """Put a new policy in force (the PolicyManager's callback): recompile, then let its auto-approvers
    approve what nodes advertise and nobody approved yet (recorded as ``system``)."""
    hub.wake(hub.mapper.set_policy(policy))
    if policy is None:
        return
    approved, changes = hub.state.approve_pending(auto_approver(hub))
    hub.dispatch(changes)
    for rec in approved:
        node = hub.state.node(rec.node_id)
        detail = {"prefix": rec.prefix, "by": "auto_approvers"}
        hub.record(audit.ACTOR_SYSTEM, ROUTE_APPROVE, node.name if node else str(rec.node_id), detail)


class RoutesAdminMixin(AdminBase):
    def _route_pb(self, rec: RouteRec) -> apb.Route:
        node = self.state.resolve(str(rec.node_id))  # resolved by the state call that produced rec
        return route_pb(node, rec, self.state.routes.primary(rec.prefix) == rec.node_id)

    @grpc_errors
    async def AddRoute(self, request: apb.RouteRequest, context: Ctx) -> apb.Route:
        actor = self._authorize(context)
        rec, changed, changes = self.state.add_route(request.node, request.prefix)
        self.hub.dispatch(changes)
        if changed:
            self._audit(context, actor, ROUTE_ADD, self._route_pb(rec).node, {"prefix": rec.prefix})
        return self._route_pb(rec)

    @grpc_errors
    async def ApproveRoute(self, request: apb.RouteRequest, context: Ctx) -> apb.Route:
        actor = self._authorize(context)
        rec, changed, changes = self.state.approve_route(request.node, request.prefix)
        self.hub.dispatch(changes)
        if changed:
            self._audit(context, actor, ROUTE_APPROVE, self._route_pb(rec).node, {"prefix": rec.prefix})
        return self._route_pb(rec)

    @grpc_errors
    async def DeleteRoute(self, request: apb.RouteRequest, context: Ctx) -> apb.DeleteRouteResponse:
        actor = self._authorize(context)
        node = self.state.resolve(request.node)
        old, changes = self.state.delete_route(request.node, request.prefix)
        self.hub.dispatch(changes)
        self._audit(context, actor, ROUTE_DELETE, node.name, {"prefix": old.prefix})
        return apb.DeleteRouteResponse()

    @grpc_errors
    async def ListRoutes(self, request: apb.ListRoutesRequest, context: Ctx) -> apb.ListRoutesResponse:
        self._authorize(context)
        rows = self.state.list_routes(request.node)
        return apb.ListRoutesResponse(routes=[route_pb(n, r, p) for n, r, p in rows])
