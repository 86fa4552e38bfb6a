"""Benchmark: the ACL policy compiler, incremental node changes as a ratio to a full compile in this run.

1000 nodes (50 users, 30 % tagged with one of 10 tags) and 20 rules (group -> tag, tag -> tag, user + group
-> group, autogroup:member -> autogroup:self). Measures a full compile, then per-node add / remove on the
compiled state (each also yields the exact deltas the mapper ships), then a policy change (rebuild + diff).
Run: `.venv/bin/python -m bench.policy_compile [--nodes N]`. Pure Python, no root needed.
"""

from __future__ import annotations

import argparse
import ipaddress
import random
import time

from ghostmesh.policy import Compiler, NodeIdent, parse_policy

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=1000)
    ap.add_argument("--changes", type=int, default=200)
    args = ap.parse_args()
    text = policy_text()
    pol = parse_policy(text)
    rnd = random.Random(1)  # noqa: S311 - a reproducible node mix, not a secret
    nodes = [node(rnd, i) for i in range(1, args.nodes + 1)]
    t = time.perf_counter()
    c = Compiler(pol, nodes)
    full = time.perf_counter() - t
    extra = [node(rnd, args.nodes + 1 + k) for k in range(args.changes)]
    t = time.perf_counter()
    for n in extra:
        c.upsert(n)
    add = (time.perf_counter() - t) / args.changes
    t = time.perf_counter()
    for n in extra:
        c.remove(n.id)
    rem = (time.perf_counter() - t) / args.changes
    t = time.perf_counter()
    delta = c.set_policy(parse_policy(text.replace("22,443", "22")))
    change = time.perf_counter() - t
    print(f"{args.nodes} nodes x {len(pol.rules)} rules")
    print(f"full compile      {full * 1000:8.1f} ms")
    print(f"node add          {add * 1000:8.2f} ms   ({full / add:5.0f}x cheaper than a full compile)")
    print(f"node remove       {rem * 1000:8.2f} ms   ({full / rem:5.0f}x cheaper)")
    print(f"policy change     {change * 1000:8.1f} ms   ({len(delta.filters)} filters changed)")


if __name__ == "__main__":
    main()
