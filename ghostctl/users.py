"""``ghostctl users create NAME | list | delete NAME`` against ghostmesh's Admin service."""

from __future__ import annotations

import argparse
from typing import Any

from ghostcore.pb.ghostmesh.v1 import admin_pb2
from ghostctl import output
from ghostctl.context import Context


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    group = sub.add_parser("users", help="users (owners of nodes and auth keys)")
    cmds = group.add_subparsers(dest="users_cmd", metavar="{create,list,delete}", required=True)
    p = cmds.add_parser("create", parents=[common], help="create a user")
    p.add_argument("name")
    p.set_defaults(func=run_create)
    p = cmds.add_parser("list", parents=[common], help="list users")
    p.set_defaults(func=run_list)
    p = cmds.add_parser("delete", parents=[common], help="delete a user")
    p.add_argument("name")
    p.set_defaults(func=run_delete)


def user_doc(u: admin_pb2.User) -> dict[str, Any]:
    return {"id": u.id, "name": u.name, **output.time_fields("created", u.created_unix)}


def run_create(ctx: Context, args: argparse.Namespace) -> int:
    stub, where = ctx.admin()
    u = ctx.call(stub.CreateUser, admin_pb2.CreateUserRequest(name=args.name), where)
    ctx.emit(user_doc(u), lambda: f"created user {u.name} (id {u.id})")
    return 0


def run_list(ctx: Context, args: argparse.Namespace) -> int:
    stub, where = ctx.admin()
    users = list(ctx.call(stub.ListUsers, admin_pb2.ListUsersRequest(), where).users)
    rows = [(str(u.id), u.name, output.ago(u.created_unix, ctx.now)) for u in users]
    ctx.emit([user_doc(u) for u in users], lambda: output.table(("ID", "NAME", "CREATED"), rows))
    return 0


def run_delete(ctx: Context, args: argparse.Namespace) -> int:
    stub, where = ctx.admin()
    ctx.call(stub.DeleteUser, admin_pb2.DeleteUserRequest(name=args.name), where)
    ctx.emit({"deleted": args.name}, lambda: f"deleted user {args.name}")
    return 0
