"""Incremental policy compiler: nodes + policy -> each node's visible peers and inbound packet filter. PURE.

Two outputs per node, each updated in O(change), never recomputed for the whole mesh:

- **peers**: the nodes it may send to OR that may send to it (a reply needs the WireGuard peer too).
  Visibility is a symmetric relation that depends only on the two nodes' identities (user, tags,
  addresses, approved routes) and the policy, so a change of node X can only change the pairs (X, *):
  X's own peer set is recomputed, every other node gains or loses at most X.
- **filter**: what may come in, as ``FRule``s (source prefixes, own destination prefixes with port ranges,
  protocols). Node D's filter depends on D and the source prefixes of the rules whose dst selects D, so a
  change of X recomputes the filters of X and of the dst nodes of the rules X's addresses are a source
  of. One exception costs more: ``*`` as a source lists every approved subnet route (Tailscale's
  semantics, :mod:`ghostcore.policy.model`), so when a node's approved routes change, the filters of the
  dst nodes of the rules with a ``*`` source are recomputed too.

Membership is kept per rule: ``_src[i]`` (nodes on the rule's source side for visibility: by identity,
by an address inside a source prefix, or as the router of an approved route overlapping it),
``_ident[i]`` (the nodes whose own addresses its source prefixes list: those selected by user, group,
tag or autogroup) and ``_dst[i][j]`` (nodes its j-th dst entry selects). Each rule's source prefix list
is cached and dropped when what it lists changes. A policy change rebuilds everything and diffs per node,
so the caller hears only of the nodes whose peers or filter changed. With no policy (``policy=None``)
every node sees every node and every filter accepts Tailscale's default protocols from anywhere; peer
sets are then not materialised (``peers()`` returns None).

Routes: ``NodeIdent.routes`` are the node's approved subnet routes, whether it is the primary router or a
standby (every approved advertiser gets the filter for the prefix and is seen by the rule's sources, as
in Tailscale; only the primary carries the prefix in WireGuard's allowed IPs, which the mapper decides).
A dst prefix overlapping one of them selects the router and puts the overlap into its filter, where
ghostlink enforces it on the forward path; a ``*`` dst covers the routes too. A grant's ``via`` limits
that to the routers it names. Exit nodes: ``autogroup:internet`` (or ``*``) as a dst selects every
approved exit node and puts ``0.0.0.0/0`` and ``::/0`` into its filter.

Devices (``NodeIdent.via``: a stock WireGuard peer that runs no ghostlink, reached through its gateway
node): a device is a node to the policy (its user, tags, addresses, name), so rules select it and its
addresses appear in other nodes' filters as a source. Its gateway routes its addresses as a router routes
a subnet: a dst selecting the device selects the gateway too and puts the device's host prefixes into the
gateway's filter, which ghostlink enforces on the forward path (the device has no filter of its own).
Whoever sees a device must see its gateway (the WireGuard peer carrying the device's addresses), and a
gateway sees whoever its devices see: ``peers`` closes over that, which keeps visibility symmetric, and
every pair a device's change can alter involves the device or its gateway, so recomputing those two
keeps updates O(change).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from ghostcore.policy.model import (
    IDENTITY_KINDS,
    MESH,
    IPAddr,
    IPNet,
    Policy,
    Principal,
    Rule,
    Selector,
)

ANY_SRC = ("0.0.0.0/0", "::/0")
EXIT_DST = ("0.0.0.0/0", "::/0")


@dataclass(frozen=True, slots=True)
class NodeIdent:
    """The identity of a node as far as the policy is concerned."""

    id: int
    user: str
    tags: frozenset[str]
    addrs: tuple[IPAddr, ...]
    name: str = ""
    routes: tuple[IPNet, ...] = ()  # approved subnet routes it serves (primary or standby)
    exit_node: bool = False  # an approved exit node (autogroup:internet)
    groups: frozenset[str] = frozenset()  # its user's OIDC groups ("oidc:<g>" group members)
    via: int = 0  # a device: the id of its gateway node; 0 for a node

    @property
    def principal(self) -> Principal:
        return Principal(self.user, self.tags, self.addrs, self.groups, self.routes, self.exit_node)

    def same_identity(self, other: NodeIdent) -> bool:
        return (
            self.user == other.user
            and self.tags == other.tags
            and self.addrs == other.addrs
            and self.routes == other.routes
            and self.exit_node == other.exit_node
            and self.groups == other.groups
            and self.via == other.via
        )


def _routed(rule: Rule, sel: Selector, n: NodeIdent, p: Principal) -> list[str]:
    """What a dst selector covers of a node's routes: all of them for ``*``, the overlaps for a prefix,
    and for an exit node everything (``0.0.0.0/0``, ``::/0``) under ``*`` and ``autogroup:internet``;
    nothing through a router a grant's ``via`` does not name. ``p``: the node's principal."""
    if (not n.routes and not n.exit_node) or not rule.via_ok(p):
        return []
    internet = list(EXIT_DST) if n.exit_node and sel.kind in ("all", "internet") else []
    routes = n.routes
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


def _dst_selects(rule: Rule, sel: Selector, n: NodeIdent, p: Principal) -> bool:
    if sel.kind == "self":
        return sel.matches(p, src_user=n.user)  # every untagged node; paired by user later
    if sel.kind in ("all", "prefix", "internet") and _routed(rule, sel, n, p):
        return True
    return sel.matches(p)


@dataclass(frozen=True, slots=True)
class FRule:
    """One inbound filter rule (mirrors the ``FilterRule`` protobuf message)."""

    src: tuple[str, ...]
    dst: tuple[tuple[str, int, int], ...]  # (prefix, first port, last port)
    protos: tuple[str, ...]  # empty: Tailscale's default (TCP, UDP, ICMP, ICMPv6)


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
    def __init__(
        self, policy: Policy | None = None, nodes: Iterable[NodeIdent] = (), mesh: tuple[IPNet, ...] = MESH
    ) -> None:
        self.policy = policy
        self.mesh = mesh
        self.nodes: dict[int, NodeIdent] = {}
        self._rules: tuple[Rule, ...] = () if policy is None else policy.rules
        self._src: list[set[int]] = [set() for _ in self._rules]
        self._ident: list[set[int]] = [set() for _ in self._rules]
        self._dst: list[list[set[int]]] = [[set() for _ in r.dst] for r in self._rules]
        self._star = [i for i, r in enumerate(self._rules) if any(s.kind == "all" for s in r.src)]
        self._by_user: dict[str, set[int]] = {}  # untagged nodes by user (autogroup:self)
        self._routes: dict[IPNet, int] = {}  # approved subnet routes in the mesh, with their routers
        self._route_text: tuple[str, ...] | None = ()
        self._src_cache: dict[int, tuple[str, ...]] = {}
        self._pfx: dict[int, tuple[str, ...]] = {}  # node -> its /32 and /128 as text (made once)
        self._peers: dict[int, set[int]] = {}
        self._filters: dict[int, Filter] = {}
        self._devices: dict[int, set[int]] = {}  # gateway id -> the ids of the devices behind it
        self.recomputed = 0  # per-node (peers or filter) recomputations, for O(change) tests
        # devices first: a gateway's rule membership depends on its devices (_device_prefixes)
        for n in sorted(nodes, key=lambda n: n.via == 0):
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
        if n.via:
            self._devices.setdefault(n.via, set()).add(n.id)
        for r in n.routes:
            self._routes[r] = self._routes.get(r, 0) + 1
        if n.routes:
            self._route_text = None
        p = n.principal
        if not n.tags:
            self._by_user.setdefault(n.user, set()).add(n.id)
        for i, rule in enumerate(self._rules):
            for s in rule.src:
                if s.kind in IDENTITY_KINDS and s.matches(p):
                    self._src[i].add(n.id)
                    self._ident[i].add(n.id)
                    self._src_cache.pop(i, None)
                    break
            else:
                if rule.src_selects(p):
                    self._src[i].add(n.id)
            for j, e in enumerate(rule.dst):
                if _dst_selects(rule, e.sel, n, p) or (
                    n.id in self._devices and self._device_prefixes(rule, e.sel, n.id, p)
                ):
                    self._dst[i][j].add(n.id)

    def _erase(self, n: NodeIdent) -> None:
        del self.nodes[n.id]
        del self._pfx[n.id]
        if n.via:
            devices = self._devices.get(n.via)
            if devices is not None:
                devices.discard(n.id)
                if not devices:
                    del self._devices[n.via]
        for r in n.routes:
            left = self._routes[r] - 1
            if left:
                self._routes[r] = left
            else:
                del self._routes[r]
        if n.routes:
            self._route_text = None
        if not n.tags:
            users = self._by_user.get(n.user)
            if users is not None:
                users.discard(n.id)
                if not users:
                    del self._by_user[n.user]
        for i, rule in enumerate(self._rules):
            self._src[i].discard(n.id)
            if n.id in self._ident[i]:
                self._ident[i].discard(n.id)
                self._src_cache.pop(i, None)
            for j in range(len(rule.dst)):
                self._dst[i][j].discard(n.id)

    def _filter_dependents(self, n: NodeIdent) -> set[int]:
        """Nodes whose filter lists ``n``'s addresses as a source: the dst nodes of the rules whose
        source selects ``n`` by identity, and for ``autogroup:self`` the untagged nodes of its user (and
        the gateways of those that are devices)."""
        out: set[int] = set()
        for i, rule in enumerate(self._rules):
            if n.id not in self._src[i]:
                continue
            for j, e in enumerate(rule.dst):
                if e.sel.kind == "self":
                    if not n.tags:
                        mates = self._by_user.get(n.user, set())
                        out |= mates
                        if self._devices:  # a gateway holds the rules of its devices
                            out |= {g for m in mates if (g := self.nodes[m].via)}
                elif n.id in self._ident[i]:
                    out |= self._dst[i][j]
        return out

    def _star_dependents(self) -> set[int]:
        """The dst nodes of the rules whose ``*`` source lists the mesh's approved routes."""
        out: set[int] = set()
        for i in self._star:
            for j, e in enumerate(self._rules[i].dst):
                if e.sel.kind != "self":
                    out |= self._dst[i][j]
            self._src_cache.pop(i, None)
        return out

    def _device_prefixes(self, rule: Rule, sel: Selector, gw: int, p: Principal) -> list[str]:
        """The host prefixes of gateway ``gw``'s devices that dst selector ``sel`` covers (``p``: the
        gateway's principal, for a grant's ``via``). For ``autogroup:self``, every untagged device's: the
        sources are paired by user in :meth:`_compute_filter`."""
        devices = self._devices.get(gw)
        if not devices or sel.kind == "internet" or not rule.via_ok(p):
            return []
        out: list[str] = []
        net = sel.net if sel.kind == "prefix" else None
        for d in sorted(devices):
            dev = self.nodes[d]
            if sel.kind == "self":
                if not dev.tags:
                    out += self._pfx[d]
                continue
            if not sel.matches(dev.principal):
                continue
            out += [
                pfx
                for a, pfx in zip(dev.addrs, self._pfx[d], strict=True)
                if net is None or (a.version == net.version and a in net)
            ]
        return out

    # -- per-node computation ----------------------------------------------------------------------------

    def _compute_peers(self, nid: int) -> set[int]:
        out = self._direct_peers(nid)
        if self._devices:
            nodes = self.nodes
            if nodes[nid].via and nodes[nid].via not in nodes:
                return set()  # a device whose gateway is gone (expired) is reachable by no one
            devices = self._devices.get(nid, set())
            for d in devices:  # a gateway sees its devices (it installs them) and whoever they see
                out |= self._direct_peers(d)
            out |= devices
            out.add(nid)  # a device sees its gateway, added with the others' just below
            out |= {g for x in out if (g := nodes[x].via) and g in nodes}  # a device's viewers: its gateway
            out = {
                x for x in out if not nodes[x].via or nodes[x].via in nodes
            }  # no device whose gateway is gone
            out.discard(nid)
        return out

    def _direct_peers(self, nid: int) -> set[int]:
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

    def _mesh_routes(self) -> tuple[str, ...]:
        if self._route_text is None:
            self._route_text = tuple(str(r) for r in self._routes)
        return self._route_text

    def _src_prefixes(self, i: int) -> tuple[str, ...]:
        cached = self._src_cache.get(i)
        if cached is not None:
            return cached
        rule = self._rules[i]
        found: set[str] = set()
        for s in rule.src:
            if s.kind == "all":
                found.update(str(m) for m in self.mesh)
                found.update(self._mesh_routes())
            elif s.kind == "prefix" and s.net is not None:
                found.add(str(s.net))  # the prefix itself, never widened to the nodes inside it
        pfx = self._pfx
        for m in self._ident[i]:
            found.update(pfx[m])
        out = tuple(sorted(found))
        self._src_cache[i] = out
        return out

    def _compute_filter(self, nid: int) -> Filter:
        self.recomputed += 1
        n = self.nodes[nid]
        p = n.principal
        out: list[FRule] = []
        for i, rule in enumerate(self._rules):
            for j, e in enumerate(rule.dst):
                if nid not in self._dst[i][j]:
                    continue
                kind = e.sel.kind
                if kind == "self":
                    out += self._self_rules(i, e.ports, n)
                    continue
                src = self._src_prefixes(i)
                if not src:
                    continue
                net = e.sel.net if kind == "prefix" else None
                own: list[str] = []
                gateway = nid in self._devices
                # an identity selector selected the node itself, unless it may have been for its devices;
                # a prefix or "*" selector only when one of its own addresses is inside
                if (kind not in ("all", "prefix", "internet") and not gateway) or e.sel.matches(p):
                    own = [
                        p
                        for a, p in zip(n.addrs, self._pfx[nid], strict=True)
                        if net is None or (a.version == net.version and a in net)
                    ]
                own += _routed(rule, e.sel, n, p)
                if gateway:
                    own += self._device_prefixes(rule, e.sel, nid, p)
                dst = tuple((p, lo, hi) for p in own for lo, hi in e.ports)
                if dst:
                    out.append(FRule(src, dst, tuple(rule.protos)))
        return tuple(out)

    def _self_rules(self, i: int, ports: tuple[tuple[int, int], ...], n: NodeIdent) -> list[FRule]:
        """An ``autogroup:self`` dst of rule ``i`` in ``n``'s filter: its user's sources to its own
        addresses (untagged), and each untagged device's user's sources to that device's addresses."""
        owners: list[tuple[str, tuple[str, ...]]] = [] if n.tags else [(n.user, self._pfx[n.id])]
        for d in sorted(self._devices.get(n.id, ())):
            dev = self.nodes[d]
            if not dev.tags:
                owners.append((dev.user, self._pfx[d]))
        out = []
        for user, own in owners:
            mates = self._src[i] & self._by_user.get(user, set())
            src = tuple(sorted(p for m in mates for p in self._pfx[m]))
            dst = tuple((p, lo, hi) for p in own for lo, hi in ports)
            if src and dst:
                out.append(FRule(src, dst, tuple(self._rules[i].protos)))
        return out

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
        if old is not None:
            dirty |= self._filter_dependents(old)
            self._erase(old)
        self._insert(n)
        dirty |= self._filter_dependents(n)
        if set(n.routes) != set(old.routes if old is not None else ()):
            dirty |= self._star_dependents()
        gateways = self._reinsert_gateways({n.via, old.via if old is not None else 0})
        delta = Delta()
        # a gateway coming back makes its devices reachable again: pairs of theirs, not of its own
        returning = self._devices.get(n.id, set()) if old is None else set()
        self._repeer([n.id, *gateways, *sorted(returning)], delta)
        self._refilter(dirty | gateways, delta)
        return delta

    def _reinsert_gateways(self, ids: Iterable[int]) -> set[int]:
        """Re-derive the rule membership of these gateways (a device of theirs came, went or changed);
        the ones that exist."""
        out = {g for g in ids if g and g in self.nodes}
        for g in out:
            ident = self.nodes[g]
            self._erase(ident)
            self._insert(ident)
        return out

    def _repeer(self, ids: Iterable[int], delta: Delta) -> None:
        """Recompute the peers of ``ids`` and mirror each gained or lost pair on the other side.
        Correct when every pair that changed has one of ``ids`` in it."""
        for a in ids:
            old = self._peers.get(a, set())
            new = self._compute_peers(a)
            self._peers[a] = new
            for b in new - old:
                self._peers.setdefault(b, set()).add(a)
                delta.added.setdefault(a, set()).add(b)
                delta.added.setdefault(b, set()).add(a)
            for b in old - new:
                self._peers.get(b, set()).discard(a)
                delta.removed.setdefault(a, set()).add(b)
                delta.removed.setdefault(b, set()).add(a)

    def remove(self, node_id: int) -> Delta:
        old = self.nodes.get(node_id)
        if old is None:
            return Delta()
        if self.policy is None:
            self._erase(old)
            return Delta()
        dirty = self._filter_dependents(old)
        self._erase(old)
        if old.routes:
            dirty |= self._star_dependents()
        delta = Delta()
        for a in self._peers.pop(node_id, set()):
            self._peers[a].discard(node_id)
            delta.removed.setdefault(a, set()).add(node_id)
        self._filters.pop(node_id, None)
        gateways = self._reinsert_gateways((old.via,))
        self._repeer([*gateways, *sorted(self._devices.get(node_id, ()))], delta)  # its orphaned devices
        dirty.discard(node_id)
        self._refilter(dirty | gateways, delta)
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
        fresh = Compiler(policy, self.nodes.values(), self.mesh)
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
