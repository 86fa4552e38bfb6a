"""``ghostctl apikeys create [--expiration 90d] | list | expire ID``: keys for the remote admin API.

The secret of a new key is printed exactly once (table: its own line plus a note; JSON: ``secret``).
Use it as ``--api-key`` / ``GHOSTCTL_API_KEY`` with ``--server host:port``.
"""

from __future__ import annotations

import argparse
from typing import Any

from ghostcore.pb.ghostmesh.v1 import admin_pb2
from ghostctl import output
from ghostctl.argtypes import duration_arg
from ghostctl.context import Context, with_pin

KEY_HEADERS = ("ID", "CREATED", "EXPIRES", "LAST USED", "STATE")
SHOWN_ONCE = "This API key is shown only once; store it now (ghostmesh keeps only a hash)."


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    group = sub.add_parser("apikeys", help="API keys for remote admin over TCP")
    cmds = group.add_subparsers(dest="apikeys_cmd", metavar="{create,list,expire}", required=True)
    p = cmds.add_parser("create", parents=[common], help="create an API key (secret shown once)")
    p.add_argument(
        "--expiration", type=duration_arg, default=0, metavar="DURATION", help="e.g. 90d (default: server's)"
    )
    p.set_defaults(func=run_create)
    p = cmds.add_parser("list", parents=[common], help="list API keys")
    p.set_defaults(func=run_list)
    p = cmds.add_parser("expire", parents=[common], help="expire (revoke) an API key now")
    p.add_argument("id", help="the key id shown by 'apikeys list'")
    p.set_defaults(func=run_expire)


def key_doc(k: admin_pb2.ApiKey) -> dict[str, Any]:
    return {
        "id": k.id,
        **output.time_fields("created", k.created_unix),
        **output.time_fields("expires", k.expires_unix),
        **output.time_fields("last_used", k.last_used_unix),
        "expired": k.expired,
    }


def key_row(k: admin_pb2.ApiKey, now: float) -> tuple[str, ...]:
    return (
        k.id,
        output.ago(k.created_unix, now),
        output.until(k.expires_unix, now),
        output.ago(k.last_used_unix, now),
        "expired" if k.expired else "valid",
    )


def run_create(ctx: Context, args: argparse.Namespace) -> int:
    stub, where = ctx.admin()
    resp = ctx.call(
        stub.CreateApiKey, admin_pb2.CreateApiKeyRequest(expiration_seconds=args.expiration), where
    )
    k = resp.key
    secret = with_pin(resp.secret, resp.pin)

    def render() -> str:
        expires = output.until(k.expires_unix, ctx.now)
        return f"created API key {k.id} (expires {expires}):\n{secret}\n{SHOWN_ONCE}"

    ctx.emit({**key_doc(k), "secret": secret}, render)
    return 0


def run_list(ctx: Context, args: argparse.Namespace) -> int:
    stub, where = ctx.admin()
    keys = list(ctx.call(stub.ListApiKeys, admin_pb2.ListApiKeysRequest(), where).keys)
    ctx.emit(
        [key_doc(k) for k in keys], lambda: output.table(KEY_HEADERS, [key_row(k, ctx.now) for k in keys])
    )
    return 0


def run_expire(ctx: Context, args: argparse.Namespace) -> int:
    stub, where = ctx.admin()
    k = ctx.call(stub.ExpireApiKey, admin_pb2.ExpireApiKeyRequest(id=args.id), where)
    ctx.emit(key_doc(k), lambda: f"expired API key {k.id}")
    return 0
