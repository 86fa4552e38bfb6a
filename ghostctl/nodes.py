"""``ghostctl nodes list [--user U] | rename REF NEW | expire REF | delete REF`` (REF: name or id).

Every node of the mesh, administered on ghostmesh (the Admin service, with an API key or its admin socket);
what this machine's own ghostlink says of itself and its peers is :mod:`ghostctl.local_node`.
"""

from __future__ import annotations

import argparse
from typing import Any

from ghostcore.pb.ghostmesh.v1 import admin_pb2, coordination_pb2
from ghostctl import output
from ghostctl.context import Context

NODE_HEADERS = ("ID", "NAME", "USER", "ADDRESSES", "ONLINE", "LAST SEEN", "EXPIRES", "TAGS")


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    group = sub.add_parser("nodes", help="nodes registered with ghostmesh")
    cmds = group.add_subparsers(dest="nodes_cmd", metavar="{list,rename,expire,delete}", required=True)
    p = cmds.add_parser("list", parents=[common], help="list nodes")
    p.add_argument("--user", default="", help="only this user's nodes")
    p.set_defaults(func=run_list)
    p = cmds.add_parser("rename", parents=[common], help="rename a node")
    p.add_argument("ref", help="node name or id")
    p.add_argument("new_name")
    p.set_defaults(func=run_rename)
    p = cmds.add_parser("expire", parents=[common], help="expire a node now (it must log in again)")
    p.add_argument("ref", help="node name or id")
    p.set_defaults(func=run_expire)
    p = cmds.add_parser("delete", parents=[common], help="delete a node (peers drop it)")
    p.add_argument("ref", help="node name or id")
    p.set_defaults(func=run_delete)


def node_doc(n: coordination_pb2.Node) -> dict[str, Any]:
    return {
        "id": n.id,
        "name": n.name,
        "user": n.user,
        "node_key": n.node_key,
        "addresses": list(n.addresses),
        "allowed_ips": list(n.allowed_ips),
        "endpoints": list(n.endpoints),
        "online": n.online,
        **output.time_fields("last_seen", n.last_seen_unix),
        **output.time_fields("expires", n.expires_unix),
        "ephemeral": n.ephemeral,
        "tags": list(n.tags),
        "primary_routes": list(n.primary_routes),
        "exit_node": n.exit_node,
    }


def node_row(n: coordination_pb2.Node, now: float) -> tuple[str, ...]:
    return (
        str(n.id),
        n.name,
        n.user,
        output.joined(n.addresses),
        output.yes_no(n.online),
        output.ago(n.last_seen_unix, now),
        output.until(n.expires_unix, now),
        output.joined(n.tags),
    )


def run_list(ctx: Context, args: argparse.Namespace) -> int:
    stub, where = ctx.admin()
    nodes = list(ctx.call(stub.ListNodes, admin_pb2.ListNodesRequest(user=args.user), where).nodes)
    ctx.emit(
        [node_doc(n) for n in nodes],
        lambda: output.table(NODE_HEADERS, [node_row(n, ctx.now) for n in nodes]),
    )
    return 0


def run_rename(ctx: Context, args: argparse.Namespace) -> int:
    stub, where = ctx.admin()
    req = admin_pb2.RenameNodeRequest(ref=args.ref, new_name=args.new_name)
    n = ctx.call(stub.RenameNode, req, where)
    ctx.emit(node_doc(n), lambda: f"renamed node {args.ref} to {n.name} (id {n.id})")
    return 0


def run_expire(ctx: Context, args: argparse.Namespace) -> int:
    stub, where = ctx.admin()
    n = ctx.call(stub.ExpireNode, admin_pb2.ExpireNodeRequest(ref=args.ref), where)
    ctx.emit(node_doc(n), lambda: f"expired node {n.name} (id {n.id})")
    return 0


def run_delete(ctx: Context, args: argparse.Namespace) -> int:
    stub, where = ctx.admin()
    ctx.call(stub.DeleteNode, admin_pb2.DeleteNodeRequest(ref=args.ref), where)
    ctx.emit({"deleted": args.ref}, lambda: f"deleted node {args.ref}")
    return 0
