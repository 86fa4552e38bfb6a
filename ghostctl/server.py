"""``ghostctl server pin | info``: the server's identity on the control channel.

``pin`` prints what nodes and remote admins trust ghostmesh's TLS key by (``sha256:…``); keys created by
``authkeys create`` and ``apikeys create`` carry it already, so this is for OIDC joins
(``ghostlink join --pin``) and for checking a key out of band. Ask it over the admin unix socket (or an
already pinned connection): a pin read over an unauthenticated channel would be worth nothing.
"""

from __future__ import annotations

import argparse
from typing import Any

from ghostcore.pb.ghostmesh.v1 import admin_pb2
from ghostctl.context import Context


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    group = sub.add_parser("server", help="ghostmesh's identity: its TLS key pin")
    cmds = group.add_subparsers(dest="server_cmd", metavar="{pin,info}", required=True)
    p = cmds.add_parser("pin", parents=[common], help="print the TLS key pin nodes and remote admins trust")
    p.set_defaults(func=run_pin)
    p = cmds.add_parser("info", parents=[common], help="version, TLS pin and certificate kind, server key")
    p.set_defaults(func=run_info)


def identity_doc(ident: admin_pb2.ServerIdentity) -> dict[str, Any]:
    return {
        "version": ident.version,
        "tls_pin": ident.tls_pin,
        "tls_certificate": "self-signed" if ident.tls_self_signed else "configured ([tls] cert_file)",
        "server_key": ident.server_key,
    }


def _identity(ctx: Context) -> admin_pb2.ServerIdentity:
    stub, where = ctx.admin()
    return ctx.call(stub.GetServerIdentity, admin_pb2.GetServerIdentityRequest(), where)


def run_pin(ctx: Context, args: argparse.Namespace) -> int:
    ident = _identity(ctx)
    ctx.emit({"tls_pin": ident.tls_pin}, lambda: ident.tls_pin)
    return 0


def run_info(ctx: Context, args: argparse.Namespace) -> int:
    doc = identity_doc(_identity(ctx))
    ctx.emit(doc, lambda: "\n".join(f"{k.replace('_', ' ')}: {v}" for k, v in doc.items()))
    return 0
