"""``ghostctl authkeys create | list | expire``: pre-auth keys that let nodes join.

A new key's secret is printed exactly once (the server stores only a hash): in table mode on its own
line followed by a note saying so, in JSON as the ``secret`` field.
"""

from __future__ import annotations

import argparse
from typing import Any

from ghostcore.pb.ghostmesh.v1 import admin_pb2
from ghostctl import output
from ghostctl.argtypes import duration_arg, tags_arg
from ghostctl.context import Context, with_pin

KEY_HEADERS = ("ID", "USER", "REUSABLE", "EPHEMERAL", "TAGS", "CREATED", "EXPIRES", "USED", "STATE")
SHOWN_ONCE = "This key is shown only once; store it now (ghostmesh keeps only a hash)."


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    group = sub.add_parser("authkeys", help="pre-auth keys for joining nodes")
    cmds = group.add_subparsers(dest="authkeys_cmd", metavar="{create,list,expire}", required=True)
    p = cmds.add_parser("create", parents=[common], help="create an auth key (secret shown once)")
    p.add_argument("--user", default="", help='owner (default: the user "default")')
    p.add_argument("--reusable", action="store_true", help="may register many nodes (default: single use)")
    p.add_argument("--ephemeral", action="store_true", help="nodes are removed after they disconnect")
    p.add_argument(
        "--expiration",
        type=duration_arg,
        default=0,
        metavar="DURATION",
        help="e.g. 1h, 7d (default: server's)",
    )
    p.add_argument("--tags", type=tags_arg, default=[], metavar="tag:a,tag:b", help="tags given to its nodes")
    p.set_defaults(func=run_create)
    p = cmds.add_parser("list", parents=[common], help="list auth keys")
    p.add_argument("--user", default="", help="only this user's keys")
    p.set_defaults(func=run_list)
    p = cmds.add_parser("expire", parents=[common], help="expire (revoke) an auth key now")
    p.add_argument("id", help="the key id shown by 'authkeys list'")
    p.set_defaults(func=run_expire)


def key_doc(k: admin_pb2.AuthKey) -> dict[str, Any]:
    return {
        "id": k.id,
        "user": k.user,
        "reusable": k.reusable,
        "ephemeral": k.ephemeral,
        "tags": list(k.tags),
        **output.time_fields("created", k.created_unix),
        **output.time_fields("expires", k.expires_unix),
        "used_count": k.used_count,
        "expired": k.expired,
    }


def key_row(k: admin_pb2.AuthKey, now: float) -> tuple[str, ...]:
    return (
        k.id,
        k.user,
        output.yes_no(k.reusable),
        output.yes_no(k.ephemeral),
        output.joined(k.tags),
        output.ago(k.created_unix, now),
        output.until(k.expires_unix, now),
        str(k.used_count),
        "expired" if k.expired else "valid",
    )


def run_create(ctx: Context, args: argparse.Namespace) -> int:
    stub, where = ctx.admin()
    req = admin_pb2.CreateAuthKeyRequest(
        user=args.user,
        reusable=args.reusable,
        ephemeral=args.ephemeral,
        expiration_seconds=args.expiration,
        tags=args.tags,
    )
    resp = ctx.call(stub.CreateAuthKey, req, where)
    k = resp.key
    secret = with_pin(resp.secret, resp.pin)

    def render() -> str:
        kind = ", ".join(
            [
                "reusable" if k.reusable else "single use",
                *(["ephemeral"] if k.ephemeral else []),
                f"expires {output.until(k.expires_unix, ctx.now)}",
                *([f"tags {output.joined(k.tags)}"] if k.tags else []),
            ]
        )
        return f"created auth key {k.id} for user {k.user} ({kind}):\n{secret}\n{SHOWN_ONCE}"

    ctx.emit({**key_doc(k), "secret": secret}, render)
    return 0


def run_list(ctx: Context, args: argparse.Namespace) -> int:
    stub, where = ctx.admin()
    keys = list(ctx.call(stub.ListAuthKeys, admin_pb2.ListAuthKeysRequest(user=args.user), where).keys)
    ctx.emit(
        [key_doc(k) for k in keys], lambda: output.table(KEY_HEADERS, [key_row(k, ctx.now) for k in keys])
    )
    return 0


def run_expire(ctx: Context, args: argparse.Namespace) -> int:
    stub, where = ctx.admin()
    k = ctx.call(stub.ExpireAuthKey, admin_pb2.ExpireAuthKeyRequest(id=args.id), where)
    ctx.emit(key_doc(k), lambda: f"expired auth key {k.id}")
    return 0
