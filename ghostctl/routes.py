"""``ghostctl route add PREFIX via NODE | list [--node N] | del PREFIX via NODE | approve PREFIX via NODE``.

Subnet routes and exit nodes on ghostmesh (``admin.proto`` AddRoute / ApproveRoute / DeleteRoute /
ListRoutes). ``add`` advertises on the node's behalf and approves in one step (the spec's
``ghostctl route add 10.1.1.0/24 via peer01``); ``approve`` approves what a node advertises itself
(``ghostlink --advertise-routes``); ``0.0.0.0/0`` or ``::/0`` make an exit node. The server validates
the prefix (a route overlapping the overlay range is refused and nothing changes).
"""

from __future__ import annotations

import argparse
from typing import Any

from ghostcore.pb.ghostmesh.v1 import admin_pb2
from ghostctl import output
from ghostctl.context import Context

ROUTE_HEADERS = ("NODE", "PREFIX", "ADVERTISED", "APPROVED", "PRIMARY")


def _via(p: argparse.ArgumentParser) -> None:
    p.add_argument("prefix", help="e.g. 10.1.1.0/24; 0.0.0.0/0 or ::/0 for an exit node")
    p.add_argument("via", choices=("via",), help="the word 'via'")
    p.add_argument("node", help="node name or id")


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    group = sub.add_parser("route", help="subnet routes and exit nodes")
    cmds = group.add_subparsers(dest="route_cmd", metavar="{add,list,del,approve}", required=True)
    p = cmds.add_parser("add", parents=[common], help="make NODE a router for PREFIX (advertise + approve)")
    _via(p)
    p.set_defaults(func=run_add)
    p = cmds.add_parser("list", parents=[common], help="list routes")
    p.add_argument("--node", default="", help="only this node's routes")
    p.set_defaults(func=run_list)
    p = cmds.add_parser("del", parents=[common], help="remove a route from NODE")
    _via(p)
    p.set_defaults(func=run_del)
    p = cmds.add_parser("approve", parents=[common], help="approve a route NODE advertises")
    _via(p)
    p.set_defaults(func=run_approve)


def route_doc(r: admin_pb2.Route) -> dict[str, Any]:
    return {
        "node": r.node,
        "node_id": r.node_id,
        "prefix": r.prefix,
        "advertised": r.advertised,
        "advertised_by": r.advertised_by,
        "approved": r.approved,
        "primary": r.primary,
    }


def route_row(r: admin_pb2.Route) -> tuple[str, ...]:
    adv = f"yes ({r.advertised_by})" if r.advertised else "no"
    return (r.node, r.prefix, adv, output.yes_no(r.approved), output.yes_no(r.primary))


def _req(args: argparse.Namespace) -> admin_pb2.RouteRequest:
    return admin_pb2.RouteRequest(node=args.node, prefix=args.prefix)


def run_add(ctx: Context, args: argparse.Namespace) -> int:
    stub, where = ctx.admin()
    r = ctx.call(stub.AddRoute, _req(args), where)
    state = "primary" if r.primary else "standby (another router is primary or the node is offline)"
    ctx.emit(route_doc(r), lambda: f"route {r.prefix} via {r.node}: approved, {state}")
    return 0


def run_approve(ctx: Context, args: argparse.Namespace) -> int:
    stub, where = ctx.admin()
    r = ctx.call(stub.ApproveRoute, _req(args), where)
    ctx.emit(route_doc(r), lambda: f"route {r.prefix} via {r.node}: approved")
    return 0


def run_del(ctx: Context, args: argparse.Namespace) -> int:
    stub, where = ctx.admin()
    ctx.call(stub.DeleteRoute, _req(args), where)
    ctx.emit(
        {"deleted": args.prefix, "node": args.node}, lambda: f"removed route {args.prefix} via {args.node}"
    )
    return 0


def run_list(ctx: Context, args: argparse.Namespace) -> int:
    stub, where = ctx.admin()
    routes = list(ctx.call(stub.ListRoutes, admin_pb2.ListRoutesRequest(node=args.node), where).routes)
    ctx.emit(
        [route_doc(r) for r in routes],
        lambda: output.table(ROUTE_HEADERS, [route_row(r) for r in routes]),
    )
    return 0
