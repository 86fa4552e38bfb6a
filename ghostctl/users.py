"""``ghostctl users create NAME [--oidc-subject SUB [--issuer URL]] | list | delete NAME | bind NAME
--oidc-subject SUB [--issuer URL] | unbind NAME`` against ghostmesh's Admin service.

A user is bound to at most one OIDC account, (issuer, subject): ``create`` with ``--oidc-subject`` or
``bind`` say which; an OIDC login never takes over a user bound to no account (ghostmesh refuses it and
names the ``bind`` command in its refusal). ``--issuer`` defaults to the server's ``oidc.issuer``.
"""

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
    cmds = group.add_subparsers(dest="users_cmd", metavar="{create,list,delete,bind,unbind}", required=True)
    p = cmds.add_parser("create", parents=[common], help="create a user")
    p.add_argument("name")
    _identity_args(p, required=False)
    p.set_defaults(func=run_create)
    p = cmds.add_parser("list", parents=[common], help="list users")
    p.set_defaults(func=run_list)
    p = cmds.add_parser("delete", parents=[common], help="delete a user")
    p.add_argument("name")
    p.set_defaults(func=run_delete)
    p = cmds.add_parser("bind", parents=[common], help="bind a user to an OIDC account")
    p.add_argument("name")
    _identity_args(p, required=True)
    p.set_defaults(func=run_bind)
    p = cmds.add_parser("unbind", parents=[common], help="unbind a user from its OIDC account")
    p.add_argument("name")
    p.set_defaults(func=run_unbind)


def _identity_args(p: argparse.ArgumentParser, *, required: bool) -> None:
    p.add_argument(
        "--oidc-subject",
        required=required,
        default="",
        metavar="SUB",
        help="the account's sub at the OIDC provider: its logins act as this user",
    )
    p.add_argument(
        "--issuer", default="", metavar="URL", help="the provider issuer URL (default: oidc.issuer)"
    )


def user_doc(u: admin_pb2.User) -> dict[str, Any]:
    return {
        "id": u.id,
        "name": u.name,
        **output.time_fields("created", u.created_unix),
        "oidc_issuer": u.oidc_issuer,
        "oidc_subject": u.oidc_subject,
        "oidc_groups": list(u.oidc_groups),
    }


def _bound(u: admin_pb2.User) -> str:
    return f" (bound to OIDC {u.oidc_subject} at {u.oidc_issuer})" if u.oidc_subject else ""


def run_create(ctx: Context, args: argparse.Namespace) -> int:
    stub, where = ctx.admin()
    req = admin_pb2.CreateUserRequest(name=args.name, oidc_subject=args.oidc_subject, oidc_issuer=args.issuer)
    u = ctx.call(stub.CreateUser, req, where)
    ctx.emit(user_doc(u), lambda: f"created user {u.name} (id {u.id}){_bound(u)}")
    return 0


def run_list(ctx: Context, args: argparse.Namespace) -> int:
    stub, where = ctx.admin()
    users = list(ctx.call(stub.ListUsers, admin_pb2.ListUsersRequest(), where).users)
    rows = [
        (
            str(u.id),
            u.name,
            output.ago(u.created_unix, ctx.now),
            f"{u.oidc_subject}@{u.oidc_issuer}" if u.oidc_subject else "",
        )
        for u in users
    ]
    ctx.emit([user_doc(u) for u in users], lambda: output.table(("ID", "NAME", "CREATED", "OIDC"), rows))
    return 0


def run_delete(ctx: Context, args: argparse.Namespace) -> int:
    stub, where = ctx.admin()
    ctx.call(stub.DeleteUser, admin_pb2.DeleteUserRequest(name=args.name), where)
    ctx.emit({"deleted": args.name}, lambda: f"deleted user {args.name}")
    return 0


def run_bind(ctx: Context, args: argparse.Namespace) -> int:
    stub, where = ctx.admin()
    req = admin_pb2.BindUserRequest(name=args.name, oidc_subject=args.oidc_subject, oidc_issuer=args.issuer)
    u = ctx.call(stub.BindUser, req, where)
    ctx.emit(user_doc(u), lambda: f"bound user {u.name} to OIDC {u.oidc_subject} at {u.oidc_issuer}")
    return 0


def run_unbind(ctx: Context, args: argparse.Namespace) -> int:
    stub, where = ctx.admin()
    u = ctx.call(stub.UnbindUser, admin_pb2.UnbindUserRequest(name=args.name), where)
    ctx.emit(user_doc(u), lambda: f"user {u.name} is bound to no OIDC account")
    return 0
