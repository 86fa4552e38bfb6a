"""``ghostctl acl get | set FILE | check FILE | test [...]``: the ACL policy on ghostmesh's Admin service.

- ``get`` prints the policy text in force (redirect it to a file to edit it); ``--output json`` adds its
  source, sha256 and time.
- ``set FILE`` (``-``: stdin) validates and applies; a policy that does not parse or fails its own
  ``[[tests]]`` is refused and the old one stays (ghostmesh's one-line error, exit 1).
- ``check FILE`` validates and runs the tests without changing anything: each problem on its own line
  (each names its key path), exit 1 if there is any.
- ``test --src S --dst HOST:PORT [--dst ...] [--proto P] [--file FILE]`` asks the server whether S may
  reach each destination under the policy in force (or FILE) with the current nodes; without
  ``--src``/``--dst`` it runs the policy's own tests.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ghostcore import errors as e
from ghostcore.pb.ghostmesh.v1 import admin_pb2
from ghostctl import output
from ghostctl.context import Context


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    group = sub.add_parser("acl", help="ACL policy (acls.toml): get, set, check, test")
    cmds = group.add_subparsers(dest="acl_cmd", metavar="{get,set,check,test}", required=True)
    p = cmds.add_parser("get", parents=[common], help="print the policy in force")
    p.set_defaults(func=run_get)
    p = cmds.add_parser("set", parents=[common], help="validate, test and apply a policy file")
    p.add_argument("file", help="policy file (TOML), or - for stdin")
    p.set_defaults(func=run_set)
    p = cmds.add_parser("check", parents=[common], help="validate a policy file and run its tests")
    p.add_argument("file", help="policy file (TOML), or - for stdin")
    p.set_defaults(func=run_check)
    p = cmds.add_parser("test", parents=[common], help="may SRC reach HOST:PORT? (or run the policy's tests)")
    p.add_argument("--src", help="user, tag:x, node name, host alias or address")
    p.add_argument("--dst", action="append", default=[], help="HOST:PORT, e.g. tag:server:22 (repeatable)")
    p.add_argument("--proto", default="tcp", choices=("tcp", "udp", "icmp"), help="protocol (default tcp)")
    p.add_argument("--file", help="ask about this policy file instead of the one in force")
    p.set_defaults(func=run_test)


def _read(path: str) -> str:
    try:
        if path == "-":
            return sys.stdin.read()
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as exc:
        raise e.InvalidArgument(f"cannot read policy file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise e.InvalidArgument(f"policy file {path} is not UTF-8 text") from None


def policy_doc(p: admin_pb2.Policy) -> dict[str, Any]:
    return {
        "source": p.source,
        "sha256": p.sha256,
        **output.time_fields("updated", p.updated_unix),
        "text": p.text,
    }


def run_get(ctx: Context, args: argparse.Namespace) -> int:
    stub, where = ctx.admin()
    p = ctx.call(stub.GetPolicy, admin_pb2.GetPolicyRequest(), where)
    default = "# no policy set (source: default): every node reaches every node\n"
    ctx.emit(policy_doc(p), lambda: (p.text or default).rstrip("\n"))
    return 0


def run_set(ctx: Context, args: argparse.Namespace) -> int:
    text = _read(args.file)
    stub, where = ctx.admin()
    p = ctx.call(stub.SetPolicy, admin_pb2.SetPolicyRequest(text=text), where)
    ctx.emit(policy_doc(p), lambda: f"policy applied (source {p.source}, sha256 {p.sha256[:12]})")
    return 0


def _report_check(ctx: Context, r: admin_pb2.CheckPolicyResponse) -> int:
    doc = {"ok": r.ok, "errors": list(r.errors), "tests_passed": r.tests_passed}
    ctx.emit(
        doc, lambda: "\n".join(r.errors) if not r.ok else f"ok: policy valid, {r.tests_passed} tests passed"
    )
    return 0 if r.ok else 1


def run_check(ctx: Context, args: argparse.Namespace) -> int:
    text = _read(args.file)
    stub, where = ctx.admin()
    return _report_check(ctx, ctx.call(stub.CheckPolicy, admin_pb2.CheckPolicyRequest(text=text), where))


def run_test(ctx: Context, args: argparse.Namespace) -> int:
    text = _read(args.file) if args.file else ""
    if bool(args.src) != bool(args.dst):
        raise e.InvalidArgument(
            "acl test: give --src and at least one --dst, or neither (run the policy's tests)"
        )
    stub, where = ctx.admin()
    if not args.src:
        if not text:
            text = ctx.call(stub.GetPolicy, admin_pb2.GetPolicyRequest(), where).text
            if not text:
                raise e.InvalidArgument("no policy is in force, so there are no tests to run; pass --file")
        return _report_check(ctx, ctx.call(stub.CheckPolicy, admin_pb2.CheckPolicyRequest(text=text), where))
    queries = [admin_pb2.AccessQuery(src=args.src, dst=d, protocol=args.proto) for d in args.dst]
    r = ctx.call(stub.TestPolicy, admin_pb2.TestPolicyRequest(text=text, queries=queries), where)
    docs = [
        {
            "src": a.query.src,
            "dst": a.query.dst,
            "proto": a.query.protocol,
            "allowed": a.allowed,
            "reason": a.reason,
        }
        for a in r.answers
    ]
    rows = [
        (a.query.src, a.query.dst, a.query.protocol, "accept" if a.allowed else "deny", a.reason)
        for a in r.answers
    ]
    ctx.emit(docs, lambda: output.table(("SRC", "DST", "PROTO", "RESULT", "REASON"), rows))
    return 0
