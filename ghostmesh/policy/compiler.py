"""Incremental policy compiler: nodes + policy -> each node's visible peers and inbound packet filter. PURE.

Two outputs per node (the design brief's principle 2: O(change), never the world):

- **peers**: the nodes it may send to OR that may send to it (a reply needs the WireGuard peer too).
  Visibility is a symmetric relation that depends only on the two nodes' identities (user, tags,
  addresses) and the policy, so a change of node X can only change the pairs (X, *): X's own peer set is
  recomputed, every other node gains or loses at most X.
- **filter**: what may come in, as ``FRule``s (source prefixes, own destination prefixes with port ranges,
  protocols). Node D's filter depends on D and the source sets of the rules whose dst selects D, so a
  change of X recomputes the filters of X and of the dst nodes of the rules X is (or was) a source of.

Membership is kept per rule (``_src[i]``: nodes its src selects; ``_dst[i][j]``: nodes its j-th dst entry
selects); each rule's source prefix list is cached and dropped when its membership changes. A policy
change rebuilds everything and diffs per node, so the caller hears only of the nodes whose peers or filter
changed. With no policy (``policy=None``) every node sees every node and every filter accepts everything:
the behaviour before ACLs existed; peer sets are then not materialised (``peers()`` returns None).

Tailscale semantics: a tagged node is identified by its tags, never by its user, so user, group,
autogroup:member and autogroup:self selectors do not select it.

Subnet routes: a node's primary routes (``NodeIdent.routes``) count as part of the node for destinations.
A dst prefix overlapping one of them selects the router (so the rule's sources see it) and puts the
overlap into the router's filter, where ghostlink enforces it on the forward path; a ``*`` dst covers the
routes too. A route change is an identity change of the router, so it recomputes what any change does.
Exit nodes: ``autogroup:internet`` (or ``*``) as a dst selects every exit node and puts ``0.0.0.0/0`` and
``::/0`` into its filter: the rule's sources may send anything through it. (As in Tailscale, that also
lets them reach the exit node itself on any port.)
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from ghostmesh.policy.model import IPAddr, IPNet, Policy, Principal, Rule, Selector

ANY_SRC = ("0.0.0.0/0", "::/0")


@dataclass(frozen=True, slots=True)
class NodeIdent:
    """The identity of a node as far as the policy is concerned."""

    id: int
    user: str
    tags: frozenset[str]
    addrs: tuple[IPAddr, ...]
    name: str = ""
    routes: tuple[IPNet, ...] = ()  # subnet routes it is the primary router for
    exit_node: bool = False  # an approved exit node (autogroup:internet)
    groups: frozenset[str] = frozenset()  # its user's OIDC groups ("oidc:<g>" group members)

    @property
    def principal(self) -> Principal:
        return Principal(self.user, self.tags, self.addrs, self.groups)

    def same_identity(self, other: NodeIdent) -> bool:
        return (
            self.user == other.user
            and self.tags == other.tags
            and self.addrs == other.addrs
            and self.routes == other.routes
            and self.exit_node == other.exit_node
            and self.groups == other.groups
        )


def _routed(sel: Selector, n: NodeIdent) -> list[str]:
    """What a dst selector covers of a node's routes: all of them for ``*``, the overlaps for a prefix,
    and for an exit node everything (``0.0.0.0/0``, ``::/0``) under ``*`` and ``autogroup:internet``."""
    routes = n.routes
    internet = ["0.0.0.0/0", "::/0"] if n.exit_node and sel.kind in ("all", "internet") else []
    if not routes:
        return internet
    if sel.kind == "all":
        return [str(r) for r in routes] + internet
    net = sel.net
    if sel.kind != "prefix" or net is None:
        return []
    out = []
    for r in routes:
        if r.version != net.version or not r.overlaps(net):
            continue
        out.append(str(net if net.prefixlen >= r.prefixlen else r))  # the narrower one is the overlap
    return out


@dataclass(frozen=True, slots=True)
class FRule:
    """One inbound filter rule (mirrors the ``FilterRule`` protobuf message)."""

    src: tuple[str, ...]
    dst: tuple[tuple[str, int, int], ...]  # (prefix, first port, last port)
    protos: tuple[str, ...]  # empty: any


Filter = tuple[FRule, ...]
ALLOW_ALL: Filter = (FRule(ANY_SRC, (("0.0.0.0/0", 0, 65535), ("::/0", 0, 65535)), ()),)


@dataclass
class Delta:
    """What one change did: per node, the peers it gained / lost, and the nodes whose filter changed."""

    added: dict[int, set[int]] = field(default_factory=dict)
    removed: dict[int, set[int]] = field(default_factory=dict)
    filters: set[int] = field(default_factory=set)

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.filters)


def _host_prefix(a: IPAddr) -> str:
    return f"{a}/{a.max_prefixlen}"


class Compiler:
    def __init__(self, policy: Policy | None = None, nodes: Iterable[NodeIdent] = ()) -> None:
        self.policy = policy
        self.nodes: dict[int, NodeIdent] = {}
        self._rules: tuple[Rule, ...] = () if policy is None else policy.rules
        self._src: list[set[int]] = [set() for _ in self._rules]
        self._dst: list[list[set[int]]] = [[set() for _ in r.dst] for r in self._rules]
        self._by_user: dict[str, set[int]] = {}  # untagged nodes by user (autogroup:self)
        self._src_cache: dict[int, tuple[str, ...]] = {}
        self._pfx: dict[int, tuple[str, ...]] = {}  # node -> its /32 and /128 as text (made once)
        self._peers: dict[int, set[int]] = {}
        self._filters: dict[int, Filter] = {}
        self.recomputed = 0  # per-node (peers or filter) recomputations, for O(change) tests
        for n in nodes:
            self._insert(n)
        if policy is not None:
            for nid in self.nodes:
                self._peers[nid] = self._compute_peers(nid)
                self._filters[nid] = self._compute_filter(nid)

    @property
    def allow_all(self) -> bool:
        return self.policy is None

    # -- queries ---------------------------------------------------------------------------------------

    def peers(self, node_id: int) -> set[int] | None:
        """The node's visible peers; None means every other node (no policy)."""
        if self.policy is None:
            return None
        return self._peers.get(node_id, set())

    def filter(self, node_id: int) -> Filter:
        if self.policy is None:
            return ALLOW_ALL
        return self._filters.get(node_id, ())

    def can_see(self, a: int, b: int) -> bool:
        if a == b or a not in self.nodes or b not in self.nodes:
            return False
        return self.policy is None or b in self._peers.get(a, ())

    # -- membership ------------------------------------------------------------------------------------

    def _insert(self, n: NodeIdent) -> None:
        self.nodes[n.id] = n
        self._pfx[n.id] = tuple(_host_prefix(a) for a in n.addrs)
        p = n.principal
        if not n.tags:
            self._by_user.setdefault(n.user, set()).add(n.id)
        for i, rule in enumerate(self._rules):
            if rule.src_matches(p):
                self._src[i].add(n.id)
                self._src_cache.pop(i, None)
            for j, e in enumerate(rule.dst):
                # "self": every untagged node; paired by user later. A router: also through its routes.
                if e.sel.matches(p, src_user=n.user) or _routed(e.sel, n):
                    self._dst[i][j].add(n.id)

    def _erase(self, n: NodeIdent) -> None:
        del self.nodes[n.id]
        del self._pfx[n.id]
        if not n.tags:
            users = self._by_user.get(n.user)
            if users is not None:
                users.discard(n.id)
                if not users:
                    del self._by_user[n.user]
        for i, rule in enumerate(self._rules):
            if n.id in self._src[i]:
                self._src[i].discard(n.id)
                self._src_cache.pop(i, None)
            for j in range(len(rule.dst)):
                self._dst[i][j].discard(n.id)

    def _filter_dependents(self, n: NodeIdent) -> set[int]:
        """Nodes whose filter lists ``n`` as a source (the dst nodes of the rules ``n`` is a source of)."""
        out: set[int] = set()
        for i, rule in enumerate(self._rules):
            if n.id not in self._src[i]:
                continue
            for j, e in enumerate(rule.dst):
                if e.sel.kind == "self":
                    if not n.tags:
                        out |= self._by_user.get(n.user, set())
                else:
                    out |= self._dst[i][j]
        return out

    # -- per-node computation ----------------------------------------------------------------------------

    def _compute_peers(self, nid: int) -> set[int]:
        self.recomputed += 1
        n = self.nodes[nid]
        own_user = set() if n.tags else self._by_user.get(n.user, set())
        out: set[int] = set()
        for i, rule in enumerate(self._rules):
            src = self._src[i]
            is_src = nid in src
            for j, e in enumerate(rule.dst):
                dst = self._dst[i][j]
                if e.sel.kind == "self":
                    if is_src:
                        out |= own_user
                    if nid in dst:
                        out |= src & own_user
                    continue
                if is_src:
                    out |= dst
                if nid in dst:
                    out |= src
        out.discard(nid)
        return out

    def _src_prefixes(self, i: int) -> tuple[str, ...]:
        cached = self._src_cache.get(i)
        if cached is not None:
            return cached
        rule = self._rules[i]
        if any(s.kind == "all" for s in rule.src):
            out: tuple[str, ...] = ANY_SRC
        else:
            found = {str(s.net) for s in rule.src if s.kind == "prefix" and s.net is not None}
            pfx = self._pfx
            for m in self._src[i]:
                found.update(pfx[m])
            out = tuple(sorted(found))
        self._src_cache[i] = out
        return out

    def _compute_filter(self, nid: int) -> Filter:
        self.recomputed += 1
        n = self.nodes[nid]
        out: list[FRule] = []
        for i, rule in enumerate(self._rules):
            for j, e in enumerate(rule.dst):
                if nid not in self._dst[i][j]:
                    continue
                if e.sel.kind == "self":
                    mates = self._src[i] & self._by_user.get(n.user, set())
                    src = tuple(sorted(p for m in mates for p in self._pfx[m]))
                else:
                    src = self._src_prefixes(i)
                if not src:
                    continue
                net = e.sel.net if e.sel.kind == "prefix" else None
                own = [
                    p
                    for a, p in zip(n.addrs, self._pfx[nid], strict=True)
                    if e.sel.kind != "internet" and (net is None or (a.version == net.version and a in net))
                ]
                own += _routed(e.sel, n)
                dst = tuple((p, lo, hi) for p in own for lo, hi in e.ports)
                out.append(FRule(src, dst, tuple(rule.protos)))
        return tuple(out)

    # -- changes ---------------------------------------------------------------------------------------

    def upsert(self, n: NodeIdent) -> Delta:
        """Add a node or change its identity; returns what changed for whom."""
        old = self.nodes.get(n.id)
        if old is not None and old.same_identity(n):
            self.nodes[n.id] = n  # a rename: nothing the policy sees
            return Delta()
        if self.policy is None:
            if old is not None:
                self._erase(old)
            self._insert(n)
            return Delta()
        dirty: set[int] = {n.id}
        old_peers: set[int] = set()
        if old is not None:
            dirty |= self._filter_dependents(old)
            old_peers = self._peers.get(n.id, set())
            self._erase(old)
        self._insert(n)
        dirty |= self._filter_dependents(n)
        new_peers = self._compute_peers(n.id)
        self._peers[n.id] = new_peers
        delta = Delta()
        gained, lost = new_peers - old_peers, old_peers - new_peers
        if gained:
            delta.added[n.id] = set(gained)
        if lost:
            delta.removed[n.id] = set(lost)
        for a in gained:
            self._peers[a].add(n.id)
            delta.added.setdefault(a, set()).add(n.id)
        for a in lost:
            self._peers[a].discard(n.id)
            delta.removed.setdefault(a, set()).add(n.id)
        self._refilter(dirty, delta)
        return delta

    def remove(self, node_id: int) -> Delta:
        old = self.nodes.get(node_id)
        if old is None:
            return Delta()
        if self.policy is None:
            self._erase(old)
            return Delta()
        dirty = self._filter_dependents(old)
        self._erase(old)
        delta = Delta()
        for a in self._peers.pop(node_id, set()):
            self._peers[a].discard(node_id)
            delta.removed.setdefault(a, set()).add(node_id)
        self._filters.pop(node_id, None)
        dirty.discard(node_id)
        self._refilter(dirty, delta)
        return delta

    def _refilter(self, dirty: Iterable[int], delta: Delta) -> None:
        for d in dirty:
            if d not in self.nodes:
                continue
            f = self._compute_filter(d)
            if self._filters.get(d) != f:
                self._filters[d] = f
                delta.filters.add(d)

    def set_policy(self, policy: Policy | None) -> Delta:
        """Replace the policy: rebuild, then report only the nodes whose peers or filter changed."""
        fresh = Compiler(policy, self.nodes.values())
        delta = Delta()
        everyone = set(self.nodes)
        for nid in self.nodes:
            before = self.peers(nid)
            after = fresh.peers(nid)
            b = everyone - {nid} if before is None else before
            a = everyone - {nid} if after is None else after
            if a - b:
                delta.added[nid] = a - b
            if b - a:
                delta.removed[nid] = b - a
            if self.filter(nid) != fresh.filter(nid):
                delta.filters.add(nid)
        self.__dict__.update(fresh.__dict__)
        return delta
