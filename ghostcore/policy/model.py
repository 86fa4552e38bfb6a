"""What a parsed ACL policy is: selectors, principals, rules, tests and the :class:`Policy`. PURE.

The grammar that builds these from ``acls.toml`` lives in :mod:`ghostcore.policy.parse`; the compiler
(:mod:`ghostcore.policy.compiler`) and the access checks (:mod:`ghostcore.policy.evaluate`) read them.

Tailscale's semantics (tailscale.com/kb/1337/policy-syntax), which these types encode:

- ``*`` as a source is the mesh, never the internet: 100.64.0.0/10 less 100.115.92.0/23 (a range
  Tailscale keeps for itself), fd7a:115c:a1e0::/48, and every approved subnet route. As a destination it
  is every node, its approved subnet routes, and an approved exit node's ``0.0.0.0/0`` and ``::/0``.
- A tagged node is identified by its tags, never by its user: user, group, ``autogroup:member`` and
  ``autogroup:self`` do not select it.
- An address or prefix is itself the source (it is not widened to the nodes inside it), and a node whose
  address lies inside, or a subnet router whose approved route overlaps it, is a source for deciding
  who sees whom. As a destination it selects the nodes inside and the routers whose approved routes
  overlap it (they get the overlap in their filter).
- Every approved advertiser of a route counts (a standby router too, not only the primary).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from ghostcore import ipproto as protocols
from ghostcore.errors import InvalidArgument

IPNet = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddr = ipaddress.IPv4Address | ipaddress.IPv6Address
Proto = str  # canonical protocol text (ghostcore.ipproto)
PROTOS: tuple[str, ...] = tuple(sorted(protocols.NUMBERS))  # the names a policy may use (or numbers)

# Tailscale's mesh: its CGNAT range less the /23 it reserves, and its ULA /48.
_V4 = ipaddress.ip_network("100.64.0.0/10")
_V4_RESERVED = ipaddress.ip_network("100.115.92.0/23")
MESH: tuple[IPNet, ...] = (
    *sorted(_V4.address_exclude(_V4_RESERVED)),  # type: ignore[arg-type]
    ipaddress.ip_network("fd7a:115c:a1e0::/48"),
)


def mesh_ranges(prefixes: tuple[IPNet, ...]) -> tuple[IPNet, ...]:
    """What ``*`` as a source means for a mesh whose addresses come from ``prefixes``: Tailscale's ranges,
    plus any configured prefix they do not cover (a ghostmesh with another ``network.ipv4_prefix``)."""
    extra = tuple(
        p
        for p in prefixes
        if not any(p.version == m.version and p.subnet_of(m) for m in MESH)  # type: ignore[arg-type]
    )
    return MESH + extra


OIDC_PREFIX = "oidc:"  # a [groups] member naming a group of the OIDC provider's groups claim
AUTOGROUPS = ("autogroup:self", "autogroup:member", "autogroup:tagged", "autogroup:internet")
ALL_PORTS = ((0, 65535),)

Kind = Literal["all", "user", "group", "tag", "prefix", "member", "tagged", "self", "internet"]
IDENTITY_KINDS = frozenset({"user", "group", "tag", "member", "tagged"})  # select nodes, not addresses


class PolicyError(InvalidArgument):
    """The policy text is invalid. ``errors`` holds one line per problem, each naming its key path."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = errors
        more = f" (and {len(errors) - 1} more; run 'ghostctl acl check')" if len(errors) > 1 else ""
        super().__init__(f"invalid policy: {errors[0]}{more}")


@dataclass(frozen=True, slots=True)
class Principal:
    """What the policy sees of a node (or of a hypothetical one in a test)."""

    user: str | None
    tags: frozenset[str]
    addrs: tuple[IPAddr, ...] = ()
    groups: frozenset[str] = frozenset()  # the user's OIDC groups
    routes: tuple[IPNet, ...] = ()  # approved subnet routes (primary or standby), no exit routes
    exit_node: bool = False  # an approved exit node


@dataclass(frozen=True, slots=True)
class Selector:
    """One resolved ``src``/``dst`` name. ``kind`` says how it matches a :class:`Principal`."""

    kind: Kind
    text: str  # as written, for messages
    users: frozenset[str] = frozenset()  # user / group
    tag: str = ""
    net: IPNet | None = None  # prefix / host alias

    def matches(self, p: Principal, src_user: str | None = None) -> bool:
        """Whether the principal itself is selected, by identity or by one of its own addresses.
        ``src_user``: for ``autogroup:self``, the source's user."""
        k = self.kind
        if k == "all":
            return True
        if k == "tag":
            return self.tag in p.tags
        if k == "tagged":
            return bool(p.tags)
        if k == "internet":
            return False  # no node is "the internet"; exit nodes are selected through their routes
        if k == "prefix":
            net = self.net
            return net is not None and any(a.version == net.version and a in net for a in p.addrs)
        if p.tags or p.user is None:  # user-based selectors never select tagged nodes
            return False
        if k == "member":
            return True
        if k == "self":
            return src_user is not None and p.user == src_user
        return p.user in self.users or any(f"{OIDC_PREFIX}{g}" in self.users for g in p.groups)

    def route_overlap(self, p: Principal) -> bool:
        """Whether an approved subnet route of ``p`` falls in this selector (``*``, or an overlapping
        prefix): such a router stands for the addresses behind it."""
        if not p.routes:
            return False
        if self.kind == "all":
            return True
        net = self.net
        if self.kind != "prefix" or net is None:
            return False
        return any(r.version == net.version and r.overlaps(net) for r in p.routes)

    def selects(self, p: Principal) -> bool:
        """Whether ``p`` is on this side of a rule for deciding who sees whom (its addresses, its
        approved routes, or, for ``autogroup:internet``, being an exit node). Not for ``self``."""
        if self.kind == "internet":
            return p.exit_node
        return self.matches(p) or self.route_overlap(p)


@dataclass(frozen=True, slots=True)
class DstEntry:
    sel: Selector
    ports: tuple[tuple[int, int], ...]


@dataclass(frozen=True, slots=True)
class Rule:
    """One accept rule: an ``[[acls]]`` entry, or one protocol group of a ``[[grants]]`` entry."""

    index: int
    src: tuple[Selector, ...]
    dst: tuple[DstEntry, ...]
    protos: tuple[Proto, ...]  # empty: Tailscale's default (TCP, UDP, ICMP, ICMPv6)
    origin: str = ""  # "acls[0]", "grants[2]" or "default" (no acls and no grants: allow all)
    via: tuple[Selector, ...] = ()  # grants: the routers through which routed destinations are reached

    def __post_init__(self) -> None:
        if not self.origin:
            object.__setattr__(self, "origin", f"acls[{self.index}]")

    def src_matches(self, p: Principal) -> bool:
        return any(s.matches(p) for s in self.src)

    def src_selects(self, p: Principal) -> bool:
        return any(s.selects(p) for s in self.src)

    def via_ok(self, p: Principal) -> bool:
        return not self.via or any(v.matches(p) for v in self.via)


@dataclass(frozen=True, slots=True)
class PolicyTest:
    index: int
    src: str
    proto: Proto
    accept: tuple[str, ...]
    deny: tuple[str, ...]


@dataclass(frozen=True)
class Policy:
    text: str
    groups: Mapping[str, frozenset[str]]
    tag_owners: Mapping[str, tuple[str, ...]]
    hosts: Mapping[str, IPNet]
    rules: tuple[Rule, ...]
    tests: tuple[PolicyTest, ...]
    auto_routes: tuple[tuple[IPNet, tuple[Selector, ...]], ...] = ()  # [auto_approvers].routes
    auto_exit: tuple[Selector, ...] = ()  # [auto_approvers].exit_node
    warnings: tuple[str, ...] = field(default=())

    def auto_approves(self, p: Principal, prefix: str) -> bool:
        """Whether an auto-approver lets a node like ``p`` serve ``prefix`` ("0.0.0.0/0"/"::/0": exit)."""
        net = ipaddress.ip_network(prefix)
        if net.prefixlen == 0:
            return any(s.matches(p) for s in self.auto_exit)
        for approved, sels in self.auto_routes:
            same = approved.version == net.version
            if same and net.subnet_of(approved) and any(s.matches(p) for s in sels):  # type: ignore[arg-type]
                return True
        return False

    def owns_tag(self, user: str, tag: str) -> bool:
        """Whether ``user`` may put ``tag`` on a node: listed in [tag_owners] directly or via a group."""
        for owner in self.tag_owners.get(tag, ()):
            if owner in (user, "autogroup:member"):
                return True
            if owner.startswith("group:") and user in self.groups.get(owner, ()):
                return True
        return False
