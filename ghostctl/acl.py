"""``ghostctl acl get | set | check | test | import | diff``: the ACL policy, on ghostmesh or offline.

- ``get`` prints the policy text in force (redirect it to a file to edit it); ``--output json`` adds its
  source, sha256 and time.
- ``set FILE`` (``-``: stdin) validates and applies; a policy that does not parse or fails its own
  ``[[tests]]`` is refused and the old one stays (ghostmesh's one-line error, exit 1).
- ``check FILE`` validates and runs the tests without changing anything, offline (no server: the policy
  core is :mod:`ghostcore.policy`, the same code ghostmesh runs): each problem on its own line (each
  names its key path), exit 1 if there is any. With ``--server`` given (flag or ``GHOSTCTL_SERVER``) the
  live nodes are fetched first, so tests may name them and their addresses.
- ``test --src S --dst HOST:PORT [--dst ...] [--proto P] [--file FILE]`` asks the server whether S may
  reach each destination under the policy in force (or FILE) with the current nodes; without
  ``--src``/``--dst`` it runs the policy's own tests.
- ``import FILE`` turns a Tailscale or Headscale policy file (HuJSON) into ``acls.toml`` on stdout
  (:mod:`ghostcore.policy.tsimport`); what it cannot express is listed on stderr, one line each, and
  the exit code is 1 unless ``--skip-unsupported``.
- ``diff FILE`` compares FILE with the policy in force over the live nodes: the pairs of nodes that gain
  or lose access (protocol, ports, destination) and the peers gained or lost (:mod:`ghostcore.policy.diff`).
"""

from __future__ import annotations

import argparse
import ipaddress
import sys
from typing import TYPE_CHECKING, Any

from ghostcore import errors as e
from ghostcore.pb.ghostmesh.v1 import admin_pb2
from ghostctl import output
from ghostctl.context import Context

if TYPE_CHECKING:
    from ghostcore.policy import NodeIdent, Policy

# The policy engine (ghostcore.policy: parser, compiler, import, diff) is imported by the commands that use
# it, not when ghostctl starts: `ghostctl status` and the other commands do not pay for loading it.


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    group = sub.add_parser("acl", help="ACL policy (acls.toml): get, set, check, test, import, diff")
    cmds = group.add_subparsers(dest="acl_cmd", metavar="{get,set,check,test,import,diff}", required=True)
    p = cmds.add_parser("get", parents=[common], help="print the policy in force")
    p.set_defaults(func=run_get)
    p = cmds.add_parser("set", parents=[common], help="validate, test and apply a policy file")
    p.add_argument("file", help="policy file (TOML), or - for stdin")
    p.set_defaults(func=run_set)
    p = cmds.add_parser(
        "check",
        parents=[common],
        help="validate a policy file and run its tests (offline; --server: live nodes)",
    )
    p.add_argument("file", help="policy file (TOML), or - for stdin")
    p.set_defaults(func=run_check)
    p = cmds.add_parser("test", parents=[common], help="may SRC reach HOST:PORT? (or run the policy's tests)")
    p.add_argument("--src", help="user, tag:x, node name, host alias or address")
    p.add_argument("--dst", action="append", default=[], help="HOST:PORT, e.g. tag:server:22 (repeatable)")
    p.add_argument(
        "--proto", default="tcp", help="a protocol name (tcp, udp, icmp, ...) or number (default tcp)"
    )
    p.add_argument("--file", help="ask about this policy file instead of the one in force")
    p.set_defaults(func=run_test)
    p = cmds.add_parser("import", parents=[common], help="a Tailscale/Headscale policy file (HuJSON) as TOML")
    p.add_argument("file", help="policy file (HuJSON), or - for stdin")
    p.add_argument(
        "--skip-unsupported", action="store_true", help="leave out what cannot be expressed and exit 0"
    )
    p.set_defaults(func=run_import)
    p = cmds.add_parser(
        "diff", parents=[common], help="who gains or loses access: FILE vs the policy in force"
    )
    p.add_argument("file", help="policy file (TOML), or - for stdin")
    p.set_defaults(func=run_diff)


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


def _live_nodes(ctx: Context) -> list[NodeIdent]:
    """The server's nodes as the policy sees them (their users' OIDC groups are not on the Admin API)."""
    from ghostcore.policy import NodeIdent  # noqa: PLC0415 - see the module imports

    stub, where = ctx.admin()
    nodes = ctx.call(stub.ListNodes, admin_pb2.ListNodesRequest(), where).nodes
    routes = ctx.call(stub.ListRoutes, admin_pb2.ListRoutesRequest(), where).routes
    served: dict[int, list[str]] = {}
    for r in routes:
        if r.advertised and r.approved and r.prefix not in ("0.0.0.0/0", "::/0"):
            served.setdefault(r.node_id, []).append(r.prefix)
    return [
        NodeIdent(
            n.id,
            n.user,
            frozenset(n.tags),
            tuple(ipaddress.ip_address(a) for a in n.addresses),
            n.name,
            tuple(ipaddress.ip_network(p) for p in sorted(served.get(n.id, ()))),
            n.exit_node,
        )
        for n in nodes
    ]


def run_check(ctx: Context, args: argparse.Namespace) -> int:
    from ghostcore.policy import PolicyError, parse_policy, run_tests  # noqa: PLC0415 - see the module imports

    text = _read(args.file)
    nodes = _live_nodes(ctx) if getattr(args, "server_given", False) else []
    try:
        policy = parse_policy(text)
        passed, errors = run_tests(policy, nodes)
    except PolicyError as exc:
        passed, errors = 0, exc.errors
    return _report_check(
        ctx, admin_pb2.CheckPolicyResponse(ok=not errors, errors=errors, tests_passed=passed)
    )


def run_import(ctx: Context, args: argparse.Namespace) -> int:
    from ghostcore.policy import PolicyError, parse_policy, tsimport  # noqa: PLC0415 - see the module imports

    text = _read(args.file)
    try:
        imported = tsimport.convert(text, "stdin" if args.file == "-" else args.file)
    except ValueError as exc:
        raise e.InvalidArgument(f"acl import {args.file}: {exc}") from None
    for line in imported.unsupported:
        print(f"ghostctl: acl import: not expressible: {line}", file=sys.stderr)
    problems = []
    try:
        parse_policy(imported.toml)
    except PolicyError as exc:
        problems = exc.errors
    for line in problems:
        print(f"ghostctl: acl import: the result is not a valid policy: {line}", file=sys.stderr)
    doc = {"toml": imported.toml, "unsupported": imported.unsupported, "errors": problems}
    ctx.emit(doc, lambda: imported.toml.rstrip("\n"))
    if imported.unsupported and not args.skip_unsupported:
        print("ghostctl: acl import: pass --skip-unsupported to leave those out", file=sys.stderr)
        return 1
    return 1 if problems else 0


def run_diff(ctx: Context, args: argparse.Namespace) -> int:
    from ghostcore.policy import diff as policy_diff  # noqa: PLC0415 - see the module imports
    from ghostcore.policy import parse_policy  # noqa: PLC0415

    new = parse_policy(_read(args.file))  # PolicyError: one line, exit 2
    stub, where = ctx.admin()
    text = ctx.call(stub.GetPolicy, admin_pb2.GetPolicyRequest(), where).text
    old: Policy | None = parse_policy(text) if text else None
    pairs, peers = policy_diff.diff(old, new, _live_nodes(ctx))
    doc = {
        "pairs": [
            {
                "src": c.src,
                "dst": c.dst,
                "gained": [policy_diff.grant_text(g) for g in c.gained],
                "lost": [policy_diff.grant_text(g) for g in c.lost],
            }
            for c in pairs
        ],
        "peers": [{"node": c.node, "peer": c.peer, "visible": c.visible} for c in peers],
    }

    def render() -> str:
        lines = []
        for c in pairs:
            for sign, grants in (("+", c.gained), ("-", c.lost)):
                if grants:
                    lines.append(
                        f"{sign} {c.src} -> {c.dst}: {', '.join(map(policy_diff.grant_text, grants))}"
                    )
        for v in peers:
            seen = "sees" if v.visible else "no longer sees"
            lines.append(f"{'+' if v.visible else '-'} peer: {v.node} {seen} {v.peer}")
        return "\n".join(lines) or "no change: every node keeps the same access and peers"

    ctx.emit(doc, render)
    return 0


def run_test(ctx: Context, args: argparse.Namespace) -> int:
    from ghostcore.ipproto import NUMBERS  # noqa: PLC0415 - see the module imports

    text = _read(args.file) if args.file else ""
    if args.proto not in NUMBERS and not (args.proto.isdigit() and 1 <= int(args.proto) <= 255):
        raise e.InvalidArgument(
            f"acl test --proto {args.proto!r}: give a protocol name (tcp, udp, icmp...) or 1-255"
        )
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
