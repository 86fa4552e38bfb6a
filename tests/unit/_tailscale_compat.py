"""Replaying captures of Tailscale's control plane against ghostmesh's policy (the compatibility test).

Each capture (``tests/fixtures/tailscale/captures.json.gz``, reduced from Headscale's test data by
``tests/fixtures/tailscale/extract.py``) holds the policy posted to Tailscale, whether Tailscale accepted
it, the topology (users, nodes, approved routes) and per node the packet filter and peer list Tailscale
sent. :func:`replay` translates the policy with ``acl import`` (:mod:`ghostcore.policy.tsimport`), then
compares: validity (parse + the file's own tests, run against the topology), and per captured node the
peer names and the filter.

Filters are compared by what they admit, not by how the rules are cut: Tailscale writes ``*`` as a
destination and splits rules differently, so both filters are expanded on one grid of (protocol,
destination range, port range) cells, each holding the merged source prefixes that may send there. Only
destinations the node can receive are compared (its own addresses, its approved routes, and everything
for an approved exit node: Tailscale's client drops the rest before its filter). Protocols follow
Tailscale's client filter: ports count for TCP, UDP and SCTP, ICMP and ICMPv6 match whatever the
ports, another protocol only through a rule covering every port.
"""

from __future__ import annotations

import gzip
import ipaddress
import itertools
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ghostcore import ipproto as ip_protos
from ghostcore.policy import Compiler, NodeIdent, PolicyError, parse_policy, run_tests, tsimport
from ghostcore.policy.compiler import Filter
from ghostcore.policy.model import Policy, Principal

CAPTURES = Path(__file__).resolve().parents[1] / "fixtures" / "tailscale" / "captures.json.gz"
Net = ipaddress.IPv4Network | ipaddress.IPv6Network
EXIT = {"0.0.0.0/0", "::/0"}
DEFAULT = [6, 17, 1, 58]


def load() -> list[dict[str, Any]]:
    with gzip.open(CAPTURES, "rt", encoding="utf-8") as f:
        doc: list[dict[str, Any]] = json.load(f)
    return doc


@dataclass
class Result:
    id: str
    expressible: bool
    features: list[str] = field(default_factory=list)  # why not expressible
    problems: list[str] = field(default_factory=list)  # disagreements with Tailscale


def nodes_of(cap: dict[str, Any], policy: Policy | None = None) -> list[NodeIdent]:
    """The topology as nodes. A route is served when advertised and approved, by the topology or by
    the policy's auto-approvers (Tailscale applies them as ghostmesh does, when the policy is set)."""
    out = []
    for i, (name, n) in enumerate(sorted(cap["nodes"].items()), start=1):
        who = Principal(n["user"] or None, frozenset(n["tags"]))
        auto = {r for r in n["routable_ips"] if policy is not None and policy.auto_approves(who, r)}
        served = (set(n["approved_routes"]) | auto) & set(n["routable_ips"])
        routes = tuple(sorted((ipaddress.ip_network(r) for r in served - EXIT), key=str))
        addrs = (ipaddress.ip_address(n["ipv4"]), ipaddress.ip_address(n["ipv6"]))
        tags = frozenset(n["tags"])
        out.append(NodeIdent(i, n["user"], tags, addrs, name, routes, bool(served & EXIT)))
    return out


def _feature(line: str) -> str:
    where, _, what = line.partition(": ")
    last = re.sub(r"\[\d+\]", "", where.split(".")[-1])
    if last in ("src", "dst", "via"):
        return what.split(" ")[0]  # the selector, e.g. autogroup:danger-all
    return last


def _nets(text: str) -> list[Net]:
    if text == "*":
        return [ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0")]
    if "-" in text and "/" not in text:
        a, b = (ipaddress.ip_address(x) for x in text.split("-"))
        return list(ipaddress.summarize_address_range(a, b))  # type: ignore[arg-type]
    return [ipaddress.ip_network(text, strict=False)]


Flat = list[tuple[frozenset[int], list[Net], list[tuple[Net, int, int]]]]


def _theirs(rules: list[dict[str, Any]]) -> Flat:
    out: Flat = []
    for r in rules:
        srcs = [n for s in r.get("SrcIPs", []) for n in _nets(s)]
        dsts = [(n, d["Ports"]["First"], d["Ports"]["Last"]) for d in r["DstPorts"] for n in _nets(d["IP"])]
        out.append((frozenset(r.get("IPProto") or DEFAULT), srcs, dsts))
    return out


def _ours(rules: Filter) -> Flat:
    out: Flat = []
    for r in rules:
        protos = frozenset(ip_protos.number(p) for p in ip_protos.effective(r.protos))
        srcs = [ipaddress.ip_network(s) for s in r.src]
        out.append((protos, srcs, [(ipaddress.ip_network(p), lo, hi) for p, lo, hi in r.dst]))
    return out


def _span(n: Net) -> tuple[int, int, int]:
    return n.version, int(n.network_address), int(n.broadcast_address)


def _cells(bounds: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    points = sorted({p for lo, hi in bounds for p in (lo, hi + 1)})
    return list(itertools.pairwise(points))


def admitted(flat: Flat, local: list[Net], grid: tuple[list[Any], list[Any]]) -> dict[Any, frozenset[str]]:
    """{(proto, version, dst cell, port cell): merged sources} over the grid (cells of dst, port)."""
    dst_cells, port_cells = grid
    out: dict[Any, set[Net]] = {}
    for protos, srcs, dsts in flat:
        for proto in protos:
            for net, first, last in dsts:
                v, a, b = _span(net)
                lo, hi = (0, 65535) if proto in (1, 58) else (first, last)
                if proto not in (1, 6, 17, 58, 132) and (lo, hi) != (0, 65535):
                    continue
                for cv, ca, cb in dst_cells:
                    if cv != v or ca < a or cb - 1 > b:
                        continue
                    if not any(
                        _span(m)[0] == v and _span(m)[1] <= ca and cb - 1 <= _span(m)[2] for m in local
                    ):
                        continue
                    for pa, pb in port_cells:
                        if lo <= pa and pb - 1 <= hi:
                            out.setdefault((proto, cv, ca, cb, pa, pb), set()).update(srcs)
    return {
        k: frozenset(
            str(n) for v in (4, 6) for n in ipaddress.collapse_addresses(x for x in s if x.version == v)
        )
        for k, s in out.items()
    }


def _grid(flats: Iterable[Flat], local: list[Net]) -> tuple[list[Any], list[Any]]:
    spans: dict[int, list[tuple[int, int]]] = {4: [], 6: []}
    ports: list[tuple[int, int]] = [(0, 65535)]
    for flat in flats:
        for _, _, dsts in flat:
            for net, lo, hi in dsts:
                v, a, b = _span(net)
                spans[v].append((a, b))
                ports.append((lo, hi))
    for m in local:
        v, a, b = _span(m)
        spans[v].append((a, b))
    dst_cells = [(v, a, b) for v in (4, 6) for a, b in _cells(spans[v])]
    return dst_cells, _cells(ports)


def local_of(n: NodeIdent) -> list[Net]:
    if n.exit_node:
        return [ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0")]
    return [ipaddress.ip_network(a) for a in n.addrs] + list(n.routes)


def compare_filter(want_rules: list[dict[str, Any]], got: Filter, n: NodeIdent) -> str | None:
    theirs, ours = _theirs(want_rules), _ours(got)
    local = local_of(n)
    grid = _grid((theirs, ours), local)
    a, b = admitted(theirs, local, grid), admitted(ours, local, grid)
    if a == b:
        return None
    only_t = sorted(set(a.items()) - set(b.items()))[:2]
    only_o = sorted(set(b.items()) - set(a.items()))[:2]
    return f"filter differs: tailscale-only {only_t} ours-only {only_o}"


def replay(cap: dict[str, Any]) -> Result:
    res = Result(cap["id"], True)
    imported = tsimport.convert(cap["policy"], cap["id"])
    if imported.unsupported:
        res.expressible = False
        res.features = sorted({_feature(line) for line in imported.unsupported})
        return res
    nodes = nodes_of(cap)
    try:
        policy = parse_policy(imported.toml)
        nodes = nodes_of(cap, policy)
        _, errors = run_tests(policy, nodes)
        ours_ok, why = not errors, "; ".join(errors[:2])
    except PolicyError as exc:
        ours_ok, why = False, "; ".join(exc.errors[:2])
    if ours_ok != cap["accepted"]:
        verdict = "accepts" if ours_ok else f"refuses ({why})"
        res.problems.append(
            f"validity: tailscale {'accepted' if cap['accepted'] else 'refused'} "
            f"({cap['error']}), ghostmesh {verdict}"
        )
        return res
    if not ours_ok:
        return res
    c = Compiler(policy, nodes)
    by_name = {n.name: n for n in nodes}
    for name, want in sorted(cap["captures"].items()):
        n = by_name[name]
        peers = sorted(by_name_of(c, n.id))
        if peers != want["peers"]:
            extra, missing = sorted(set(peers) - set(want["peers"])), sorted(set(want["peers"]) - set(peers))
            res.problems.append(f"{name}: peers: ghostmesh adds {extra}, lacks {missing}")
        why = compare_filter(want["filter"], c.filter(n.id), n)
        if why:
            res.problems.append(f"{name}: {why}")
    return res


def by_name_of(c: Compiler, nid: int) -> list[str]:
    return [c.nodes[p].name for p in c.peers(nid) or ()]
