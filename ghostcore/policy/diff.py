"""Who gains or loses access between two policies, over the same nodes (``ghostctl acl diff``). PURE.

Both policies are compiled (:class:`~ghostcore.policy.compiler.Compiler`) over the nodes; for every node
whose filter differs, each node that may send to it is compared: what it may reach there (protocol,
destination prefix, ports) under the old and under the new policy. Visibility changes (peers gained or
lost) are listed too, since a node that loses a peer also loses its replies. Only the destinations whose
filter changed are examined, so a small edit of a large mesh costs little.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from ghostcore import ipproto as protocols
from ghostcore.policy.compiler import Compiler, Filter, NodeIdent
from ghostcore.policy.model import Policy

Grant = tuple[str, str, int, int]  # (protocol, destination prefix, first port, last port)


@dataclass(frozen=True, slots=True)
class PairChange:
    src: str  # node name
    dst: str
    gained: tuple[Grant, ...]
    lost: tuple[Grant, ...]


@dataclass(frozen=True, slots=True)
class PeerChange:
    node: str
    peer: str
    visible: bool  # True: gained, False: lost


def _reach(f: Filter, src: NodeIdent) -> frozenset[Grant]:
    out: set[Grant] = set()
    for r in f:
        nets = [ipaddress.ip_network(s) for s in r.src]
        if not any(a.version == n.version and a in n for a in src.addrs for n in nets):
            continue
        for proto in protocols.effective(r.protos):
            for prefix, lo, hi in r.dst:
                v6 = ":" in prefix
                if proto in protocols.PORTLESS_ICMP:
                    if (proto == "ipv6-icmp") == v6:  # ICMP is IPv4's, ICMPv6 is IPv6's
                        out.add((proto, prefix, 0, 65535))
                elif proto in protocols.WITH_PORTS or (lo, hi) == protocols.ALL_PORTS:
                    out.add((proto, prefix, lo, hi))  # other protocols match only on every port
    return frozenset(out)


def diff(
    old: Policy | None, new: Policy | None, nodes: Iterable[NodeIdent]
) -> tuple[list[PairChange], list[PeerChange]]:
    """(pairs whose access changed, visibility changes), sorted by name."""
    nodes = list(nodes)
    a, b = Compiler(old, nodes), Compiler(new, nodes)
    name = {n.id: n.name or str(n.id) for n in nodes}
    pairs: list[PairChange] = []
    for d in nodes:
        fa, fb = a.filter(d.id), b.filter(d.id)
        if fa == fb:
            continue
        for s in nodes:
            if s.id == d.id:
                continue
            ra, rb = _reach(fa, s), _reach(fb, s)
            if ra != rb:
                pairs.append(
                    PairChange(name[s.id], name[d.id], tuple(sorted(rb - ra)), tuple(sorted(ra - rb)))
                )
    peers: list[PeerChange] = []
    everyone = set(name)
    for n in nodes:
        pa = a.peers(n.id)
        pb = b.peers(n.id)
        before = everyone - {n.id} if pa is None else pa
        after = everyone - {n.id} if pb is None else pb
        peers += [PeerChange(name[n.id], name[p], True) for p in after - before]
        peers += [PeerChange(name[n.id], name[p], False) for p in before - after]
    pairs.sort(key=lambda c: (c.src, c.dst))
    peers.sort(key=lambda c: (c.node, c.peer, c.visible))
    return pairs, peers


def grant_text(g: Grant) -> str:
    proto, prefix, lo, hi = g
    if proto in protocols.PORTLESS_ICMP:
        return f"{proto} {prefix}"
    ports = "*" if (lo, hi) == (0, 65535) else str(lo) if lo == hi else f"{lo}-{hi}"
    return f"{proto}:{ports} {prefix}"
