"""Benchmark: the ACL policy compiler, incremental node changes as a ratio to a full compile in this run.

1000 nodes (50 users, 30 % tagged with one of 10 tags) and 20 rules (group -> tag, tag -> tag, user + group
-> group, autogroup:member -> autogroup:self). Measures a full compile, then per-node add / remove on the
compiled state (each also yields the exact deltas the mapper ships), then a policy change (rebuild + diff).
The reference is the full compile of the same run: a node add must stay at least 20x cheaper.

``--baseline REV`` also measures that git revision's compiler (``bench.baseline`` checks it out) in
interleaved rounds, each tree in its own process (this file run with the tree's packages first on
``PYTHONPATH``), and prints this code's times as a ratio of the baseline's: before / after in one run.
Run: `.venv/bin/python -m bench.policy_compile [--nodes N] [--rounds R] [--baseline REV]`. No root needed.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

from ghostcore.policy import Compiler, NodeIdent, parse_policy

USERS = [f"u{i}" for i in range(50)]


def policy_text() -> str:
    groups = "\n".join(
        f'"group:g{g}" = [{", ".join(f"{chr(34)}{u}{chr(34)}" for u in USERS[g * 5 : (g + 1) * 5])}]'
        for g in range(10)
    )
    tags = "\n".join(f'"tag:t{t}" = ["group:g{t}"]' for t in range(10))
    rules = []
    for r in range(20):
        if r % 4 == 0:
            src, dst, proto = f'"group:g{r % 10}"', f'"tag:t{r % 10}:22,443"', ""
        elif r % 4 == 1:
            src, dst, proto = f'"tag:t{r % 10}"', f'"tag:t{(r + 1) % 10}:5432"', 'proto = "tcp"'
        elif r % 4 == 2:
            src, dst, proto = '"autogroup:member"', '"autogroup:self:*"', ""
        else:
            src, dst, proto = f'"u{r}", "group:g{(r + 3) % 10}"', f'"group:g{(r + 5) % 10}:80"', ""
        rules.append(f'[[acls]]\naction = "accept"\nsrc = [{src}]\ndst = [{dst}]\n{proto}')
    return f"[groups]\n{groups}\n[tag_owners]\n{tags}\n" + "\n".join(rules)


def node(rnd: random.Random, i: int) -> NodeIdent:
    tags = frozenset([f"tag:t{rnd.randrange(10)}"]) if rnd.random() < 0.3 else frozenset()
    v4 = ipaddress.ip_address(f"100.64.{i // 250}.{i % 250 + 1}")
    v6 = ipaddress.ip_address(f"fd7a:115c:a1e0::{i:x}")
    return NodeIdent(i, rnd.choice(USERS), tags, (v4, v6), f"n{i}")


def measure(nodes_n: int, changes: int) -> dict[str, float]:
    """One run in this process: seconds for a full compile, per node add / remove, a policy change."""
    text = policy_text()
    pol = parse_policy(text)
    rnd = random.Random(1)  # noqa: S311 - a reproducible node mix, not a secret
    nodes = [node(rnd, i) for i in range(1, nodes_n + 1)]
    t = time.perf_counter()
    c = Compiler(pol, nodes)
    full = time.perf_counter() - t
    extra = [node(rnd, nodes_n + 1 + k) for k in range(changes)]
    t = time.perf_counter()
    for n in extra:
        c.upsert(n)
    add = (time.perf_counter() - t) / changes
    t = time.perf_counter()
    for n in extra:
        c.remove(n.id)
    rem = (time.perf_counter() - t) / changes
    t = time.perf_counter()
    delta = c.set_policy(parse_policy(text.replace("22,443", "22")))
    change = time.perf_counter() - t
    return {"full": full, "add": add, "remove": rem, "change": change, "filters": len(delta.filters)}


def _run_tree(pythonpath: str | None, args: argparse.Namespace) -> dict[str, float]:
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath  # that tree's ghostmesh / ghostcore ahead of this checkout's
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", "--nodes", str(args.nodes)]
    argv += ["--changes", str(args.changes)]
    out = subprocess.run(argv, env=env, capture_output=True, text=True, check=True).stdout
    result: dict[str, float] = json.loads(out)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--nodes", type=int, default=1000)
    ap.add_argument("--changes", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds per tree; the best counts")
    ap.add_argument("--baseline", metavar="REV", help="also measure this git revision, in the same run")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(args.nodes, args.changes)))
        return
    from bench.baseline import checkout  # noqa: PLC0415 - only the parent needs git

    here = str(Path(__file__).resolve().parent.parent)
    with contextlib.ExitStack() as stack:
        trees = [("this", here)]
        if args.baseline:
            env = stack.enter_context(checkout(args.baseline))
            trees.append((f"baseline {env['GHOST_BASELINE'][:7]}", env["PYTHONPATH"]))
        best: dict[str, dict[str, float]] = {}
        for r in range(args.rounds):
            for name, path in trees if r % 2 == 0 else trees[::-1]:
                got = _run_tree(path, args)
                prev = best.setdefault(name, got)
                for k in ("full", "add", "remove", "change"):
                    prev[k] = min(prev[k], got[k])
    print(f"{args.nodes} nodes x 20 rules, {args.changes} node changes, best of {args.rounds} rounds")
    for name, _ in trees:
        m = best[name]
        print(f"[{name}]")
        print(f"  full compile   {m['full'] * 1000:8.1f} ms   (the reference)")
        cheaper = m["full"] / m["add"]
        print(f"  node add       {m['add'] * 1000:8.2f} ms   ({cheaper:5.0f}x cheaper than a full compile)")
        print(f"  node remove    {m['remove'] * 1000:8.2f} ms   ({m['full'] / m['remove']:5.0f}x cheaper)")
        print(f"  policy change  {m['change'] * 1000:8.1f} ms   ({m['filters']:.0f} filters changed)")
    if args.baseline:
        this, base = best["this"], best[trees[1][0]]
        print(
            "this / baseline: "
            + ", ".join(f"{k} {this[k] / base[k]:.2f}" for k in ("full", "add", "remove", "change"))
        )
    ratio = best["this"]["full"] / best["this"]["add"]
    verdict = "ok" if ratio >= 20 else "FAIL"
    print(f"node add is {ratio:.0f}x cheaper than a full compile (need >= 20): {verdict}")
    if ratio < 20:
        sys.exit(1)


if __name__ == "__main__":
    main()
