"""``ghostctl keys rotate``: rotate this node's WireGuard key, answered by the local ghostlink.

ghostlink does the work (``ghostlink.rotate``: prove the old key, switch without losing traffic, every peer
gets the new key). Only public keys are ever printed.
"""

from __future__ import annotations

import argparse
from typing import Any

from ghostcore.pb.ghostmesh.v1 import local_pb2
from ghostctl.context import Context


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    p = sub.add_parser("keys", parents=[common], help="this node's WireGuard key")
    keys_sub = p.add_subparsers(dest="keys_command", metavar="SUBCOMMAND", required=True)
    r = keys_sub.add_parser(
        "rotate", parents=[common], help="rotate this node's WireGuard key now (no traffic is lost)"
    )
    r.set_defaults(func=run_rotate)


def rotate_doc(resp: local_pb2.LocalRotateKeyResponse) -> dict[str, Any]:
    return {"old_node_key": resp.old_node_key, "new_node_key": resp.new_node_key}


def render_rotate(resp: local_pb2.LocalRotateKeyResponse) -> str:
    return f"node key rotated: {resp.old_node_key} -> {resp.new_node_key}"


def run_rotate(ctx: Context, args: argparse.Namespace) -> int:
    stub, where = ctx.local()
    resp = ctx.call(stub.RotateKey, local_pb2.LocalRotateKeyRequest(), where, node=True)
    ctx.emit(rotate_doc(resp), lambda: render_rotate(resp))
    return 0
