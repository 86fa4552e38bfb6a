"""The ACL policy format (``acls.toml``) and its parser. PURE: text in, a validated :class:`Policy` out.

The semantics mirror Tailscale's policy file (tailscale.com/kb/1337/policy-syntax), written in TOML::

    [groups]
    "group:eng" = ["alice", "bob", "oidc:engineering"]  # users and OIDC groups; groups do not nest

    [tag_owners]
    "tag:server" = ["group:eng", "alice"]   # who may put the tag on a node (through an auth key)

    [hosts]
    db = "100.64.0.10"                      # an address or a prefix
    lab = "10.1.1.0/24"

    [[acls]]
    action = "accept"                       # the only action: everything not accepted is denied
    src = ["group:eng", "tag:ci"]           # users, groups, tags, hosts, prefixes, "*", autogroups
    dst = ["tag:server:22,443", "db:5432", "autogroup:self:*"]
    proto = "tcp"                           # optional: "tcp", "udp" or "icmp"; default any

    [auto_approvers]                        # routes approved without an admin when advertised by
    routes = { "10.1.0.0/16" = ["tag:router", "group:ops"] }  # (the prefix or a narrower one)
    exit_node = ["tag:exit"]                # 0.0.0.0/0 + ::/0 advertised by these nodes

    [[tests]]                               # run before a policy is accepted
    src = "alice"
    proto = "tcp"                           # optional, default tcp
    accept = ["tag:server:22"]
    deny = ["db:5432"]

Selectors (``src`` entries, and ``dst`` entries before their ``:ports``):

- ``*``: every node (as a source: any address);
- ``alice``: the untagged nodes of user alice. A tagged node is identified by its tags, not its user;
- ``group:eng``: the untagged nodes of the group's users; a member ``oidc:<name>`` stands for every user
  whose OIDC groups claim (stored at their last login, :mod:`ghostmesh.oidc`) contains ``<name>``;
- ``tag:server``: the nodes carrying the tag (it must be declared in ``[tag_owners]``);
- a ``[hosts]`` alias, an address or a prefix: the nodes whose overlay address lies inside, and as a
  source the prefix itself;
- ``autogroup:member`` (untagged nodes), ``autogroup:tagged`` (tagged nodes), ``autogroup:self``
  (dst only: the source user's own untagged nodes) and ``autogroup:internet`` (dst only: everything
  reached through an exit node; ``*`` as a dst covers it too).

Ports are ``*``, ``N`` or ``N-M``, comma separated. Every error is one line naming its key path
(``acls[2].dst[0]: unknown tag "tag:nope"; declare it in [tag_owners]``); lists are indexed from 0.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from ghostcore.errors import InvalidArgument

Proto = Literal["tcp", "udp", "icmp"]
PROTOS: tuple[Proto, ...] = ("tcp", "udp", "icmp")
IPNet = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddr = ipaddress.IPv4Address | ipaddress.IPv6Address

_USER_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")  # the same rule ghostmesh.state applies to users
_TAG_RE = re.compile(r"^tag:[A-Za-z0-9][A-Za-z0-9._-]{0,59}$")
OIDC_PREFIX = "oidc:"  # a [groups] member naming a group of the OIDC provider's groups claim
_OIDC_GROUP_RE = re.compile(r"^oidc:\S{1,200}$")
_GROUP_RE = re.compile(r"^group:[A-Za-z0-9][A-Za-z0-9._-]{0,59}$")
_HOST_RE = re.compile(r"^[A-Za-z][A-Za-z0-9._-]{0,62}$")
AUTOGROUPS = ("autogroup:self", "autogroup:member", "autogroup:tagged", "autogroup:internet")
ALL_PORTS = ((0, 65535),)


class PolicyError(InvalidArgument):
    """The policy text is invalid. ``errors`` holds one line per problem, each naming its key path."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = errors
        more = f" (and {len(errors) - 1} more; run 'ghostctl acl check')" if len(errors) > 1 else ""
        super().__init__(f"invalid policy: {errors[0]}{more}")


@dataclass(frozen=True, slots=True)
class Selector:
    """One resolved ``src``/``dst`` name. ``kind`` says how it matches a :class:`Principal`."""

    kind: Literal["all", "user", "group", "tag", "prefix", "member", "tagged", "self", "internet"]
    text: str  # as written, for messages
    users: frozenset[str] = frozenset()  # user / group
    tag: str = ""
    net: IPNet | None = None  # prefix / host alias

    def matches(self, p: Principal, src_user: str | None = None) -> bool:
        """Whether the principal is selected. ``src_user``: for ``autogroup:self``, the source's user."""
        k = self.kind
        if k == "all":
            return True
        if k == "tag":
            return self.tag in p.tags
        if k == "tagged":
            return bool(p.tags)
        if k == "internet":
            return False  # no node is "the internet"; the compiler selects exit nodes for it
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


@dataclass(frozen=True, slots=True)
class Principal:
    """What the policy sees of a node (or of a hypothetical one in a test): user, tags, addresses."""

    user: str | None
    tags: frozenset[str]
    addrs: tuple[IPAddr, ...] = ()
    groups: frozenset[str] = frozenset()  # the user's OIDC groups


@dataclass(frozen=True, slots=True)
class DstEntry:
    sel: Selector
    ports: tuple[tuple[int, int], ...]


@dataclass(frozen=True, slots=True)
class Rule:
    index: int
    src: tuple[Selector, ...]
    dst: tuple[DstEntry, ...]
    protos: tuple[Proto, ...]  # empty: any

    def src_matches(self, p: Principal) -> bool:
        return any(s.matches(p) for s in self.src)


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
            if owner == user or (owner.startswith("group:") and user in self.groups.get(owner, ())):
                return True
        return False

    def resolve(self, text: str, *, dst: bool = False) -> Selector:
        """``text`` as a selector of this policy; raises ``ValueError`` with a one-line reason."""
        return _resolve(text, self.groups, self.tag_owners, self.hosts, dst=dst)


def parse_net(text: str) -> IPNet:
    """An address (as /32 or /128) or a prefix; ``ValueError`` otherwise."""
    return ipaddress.ip_network(text, strict=False) if "/" in text else ipaddress.ip_network(text)


def _resolve(
    text: str,
    groups: Mapping[str, frozenset[str]],
    tag_owners: Mapping[str, Any],
    hosts: Mapping[str, IPNet],
    *,
    dst: bool,
) -> Selector:
    if text == "*":
        return Selector("all", text)
    if text.startswith("autogroup:"):
        if text not in AUTOGROUPS:
            raise ValueError(f'unknown autogroup "{text}"; use one of {", ".join(AUTOGROUPS)}')
        if text in ("autogroup:self", "autogroup:internet"):
            if not dst:
                raise ValueError(f'"{text}" is only allowed in dst')
            return Selector("self" if text == "autogroup:self" else "internet", text)
        return Selector("member" if text == "autogroup:member" else "tagged", text)
    if text.startswith("group:"):
        if text not in groups:
            raise ValueError(f'unknown group "{text}"; declare it in [groups]')
        return Selector("group", text, users=groups[text])
    if text.startswith("tag:"):
        if text not in tag_owners:
            raise ValueError(f'unknown tag "{text}"; declare it in [tag_owners]')
        return Selector("tag", text, tag=text)
    if text in hosts:
        return Selector("prefix", text, net=hosts[text])
    try:
        return Selector("prefix", text, net=parse_net(text))
    except ValueError:
        pass
    if _USER_RE.match(text):
        return Selector("user", text, users=frozenset([text]))
    raise ValueError(f"\"{text}\" is not a user, group:, tag:, host alias, address, prefix, '*' or autogroup")


def parse_ports(text: str) -> tuple[tuple[int, int], ...]:
    if text == "*":
        return ALL_PORTS
    out: list[tuple[int, int]] = []
    for part in text.split(","):
        first, sep, last = part.strip().partition("-")
        if not first.isdigit() or (sep and not last.isdigit()):
            raise ValueError(f"bad port \"{part.strip()}\": use '*', N, N-M or a comma list of those")
        lo, hi = int(first), int(last if sep else first)
        if not 0 <= lo <= hi <= 65535:
            raise ValueError(f'bad port range "{part.strip()}": need 0 <= first <= last <= 65535')
        out.append((lo, hi))
    return tuple(out)


def split_dst(text: str) -> tuple[str, str]:
    """``"tag:server:22,443"`` -> ``("tag:server", "22,443")``: the ports follow the last colon."""
    host, sep, ports = text.rpartition(":")
    if not sep or not host or host in ("tag", "group", "autogroup"):
        raise ValueError(f"\"{text}\" needs ':ports' (e.g. 'tag:server:22' or 'db:*')")
    return host, ports


class _Errors:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def add(self, where: str, what: str) -> None:
        self.lines.append(f"{where}: {what}")


def _str_list(v: Any, where: str, err: _Errors) -> list[str]:
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        err.add(where, "expected a list of strings")
        return []
    return list(v)


def _check_keys(table: Mapping[str, Any], allowed: Iterable[str], where: str, err: _Errors) -> None:
    allowed = tuple(allowed)
    for k in table:
        if k not in allowed:
            prefix = f"{where}." if where else ""
            err.add(f"{prefix}{k}", f"unknown key; expected one of {', '.join(allowed)}")


def _table(doc: Mapping[str, Any], key: str, err: _Errors) -> dict[str, Any]:
    v = doc.get(key, {})
    if not isinstance(v, dict):
        err.add(key, "expected a table")
        return {}
    return v


def _proto(v: Any, where: str, err: _Errors) -> Proto | None:
    if v not in PROTOS:
        err.add(where, f'expected one of {", ".join(repr(p) for p in PROTOS)}, got "{v}"')
        return None
    p: Proto = v
    return p


def parse_policy(text: str) -> Policy:
    """Parse and validate ``text``; raises :class:`PolicyError` listing every problem found."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError([f"(toml): {exc}"]) from None
    err = _Errors()
    _check_keys(doc, ("groups", "tag_owners", "hosts", "acls", "tests", "auto_approvers"), "", err)
    groups = _parse_groups(doc, err)
    tag_owners = _parse_tag_owners(doc, groups, err)
    hosts = _parse_hosts(doc, err)
    rules = _parse_acls(doc, groups, tag_owners, hosts, err)
    tests = _parse_tests(doc, err)
    auto_routes, auto_exit = _parse_auto_approvers(doc, groups, tag_owners, err)
    if err.lines:
        raise PolicyError(err.lines)
    return Policy(text, groups, tag_owners, hosts, tuple(rules), tuple(tests), auto_routes, auto_exit)


def _approvers(
    v: Any, where: str, groups: Mapping[str, frozenset[str]], tag_owners: Mapping[str, Any], err: _Errors
) -> tuple[Selector, ...]:
    out: list[Selector] = []
    for j, text in enumerate(_str_list(v, where, err)):
        if not text.startswith(("tag:", "group:")) and not _USER_RE.match(text):
            err.add(f"{where}[{j}]", f'"{text}" is not a user, group: or tag:')
            continue
        try:
            out.append(_resolve(text, groups, tag_owners, {}, dst=False))
        except ValueError as exc:
            err.add(f"{where}[{j}]", str(exc))
    return tuple(out)


def _parse_auto_approvers(
    doc: Mapping[str, Any],
    groups: Mapping[str, frozenset[str]],
    tag_owners: Mapping[str, Any],
    err: _Errors,
) -> tuple[tuple[tuple[IPNet, tuple[Selector, ...]], ...], tuple[Selector, ...]]:
    table = _table(doc, "auto_approvers", err)
    _check_keys(table, ("routes", "exit_node"), "auto_approvers", err)
    routes: list[tuple[IPNet, tuple[Selector, ...]]] = []
    raw = table.get("routes", {})
    if not isinstance(raw, dict):
        err.add("auto_approvers.routes", 'expected a table such as { "10.1.0.0/16" = ["tag:router"] }')
        raw = {}
    for prefix, approvers in raw.items():
        where = f'auto_approvers.routes."{prefix}"'
        try:
            net = ipaddress.ip_network(prefix, strict=True)
        except ValueError:
            err.add(where, f'"{prefix}" is not a prefix without host bits, e.g. 10.1.0.0/16')
            continue
        routes.append((net, _approvers(approvers, where, groups, tag_owners, err)))
    exit_node = _approvers(table.get("exit_node", []), "auto_approvers.exit_node", groups, tag_owners, err)
    return tuple(routes), exit_node


def _parse_groups(doc: Mapping[str, Any], err: _Errors) -> dict[str, frozenset[str]]:
    groups: dict[str, frozenset[str]] = {}
    for name, members in _table(doc, "groups", err).items():
        where = f'groups."{name}"'
        if not _GROUP_RE.match(name):
            err.add(where, "a group name looks like 'group:eng'")
            continue
        users = _str_list(members, where, err)
        for i, u in enumerate(users):
            if u.startswith(OIDC_PREFIX):
                if not _OIDC_GROUP_RE.match(u):
                    err.add(f"{where}[{i}]", f'"{u}" is not an OIDC group: write "oidc:<group name>"')
                continue
            if not _USER_RE.match(u):
                err.add(f"{where}[{i}]", f'"{u}" is not a user name (groups hold users only, no nesting)')
        groups[name] = frozenset(users)
    return groups


def _parse_tag_owners(
    doc: Mapping[str, Any], groups: Mapping[str, frozenset[str]], err: _Errors
) -> dict[str, tuple[str, ...]]:
    tag_owners: dict[str, tuple[str, ...]] = {}
    raw_owners = _table(doc, "tag_owners", err)
    for tag in raw_owners:
        if not _TAG_RE.match(tag):
            err.add(f'tag_owners."{tag}"', "a tag looks like 'tag:server'")
    for tag, owners in raw_owners.items():
        if not _TAG_RE.match(tag):
            continue
        where = f'tag_owners."{tag}"'
        lst = _str_list(owners, where, err)
        for i, o in enumerate(lst):
            if o.startswith("group:") and o not in groups:
                err.add(f"{where}[{i}]", f'unknown group "{o}"; declare it in [groups]')
            elif o.startswith("tag:") and o not in raw_owners:
                err.add(f"{where}[{i}]", f'unknown tag "{o}"; declare it in [tag_owners]')
            elif not o.startswith(("group:", "tag:")) and not _USER_RE.match(o):
                err.add(f"{where}[{i}]", f'"{o}" is not a user, group: or tag:')
        tag_owners[tag] = tuple(lst)
    return tag_owners


def _parse_hosts(doc: Mapping[str, Any], err: _Errors) -> dict[str, IPNet]:
    hosts: dict[str, IPNet] = {}
    for name, value in _table(doc, "hosts", err).items():
        where = f"hosts.{name}"
        if not _HOST_RE.match(name) or name in ("autogroup", "group", "tag"):
            err.add(where, "a host alias is a name starting with a letter (letters, digits, '.', '_', '-')")
            continue
        if not isinstance(value, str):
            err.add(where, "expected an address or prefix string")
            continue
        try:
            hosts[name] = parse_net(value)
        except ValueError:
            err.add(where, f'"{value}" is not an address or prefix')
    return hosts


def _parse_acls(
    doc: Mapping[str, Any],
    groups: Mapping[str, frozenset[str]],
    tag_owners: Mapping[str, tuple[str, ...]],
    hosts: Mapping[str, IPNet],
    err: _Errors,
) -> list[Rule]:
    rules: list[Rule] = []
    acls = doc.get("acls", [])
    if not isinstance(acls, list):
        err.add("acls", "expected an array of tables: [[acls]]")
        acls = []
    for i, r in enumerate(acls):
        where = f"acls[{i}]"
        if not isinstance(r, dict):
            err.add(where, "expected a table")
            continue
        _check_keys(r, ("action", "src", "dst", "proto"), where, err)
        if r.get("action") != "accept":
            err.add(f"{where}.action", f'expected "accept", got {r.get("action")!r}')
        for key in ("src", "dst"):
            if key not in r:
                err.add(f"{where}.{key}", "missing; give a list of selectors")
        srcs: list[Selector] = []
        for j, s in enumerate(_str_list(r.get("src", []), f"{where}.src", err)):
            try:
                srcs.append(_resolve(s, groups, tag_owners, hosts, dst=False))
            except ValueError as exc:
                err.add(f"{where}.src[{j}]", str(exc))
        dsts: list[DstEntry] = []
        for j, d in enumerate(_str_list(r.get("dst", []), f"{where}.dst", err)):
            try:
                host, ports = split_dst(d)
                dsts.append(DstEntry(_resolve(host, groups, tag_owners, hosts, dst=True), parse_ports(ports)))
            except ValueError as exc:
                err.add(f"{where}.dst[{j}]", str(exc))
        protos: tuple[Proto, ...] = ()
        if "proto" in r:
            p = _proto(r["proto"], f"{where}.proto", err)
            protos = () if p is None else (p,)
        rules.append(Rule(i, tuple(srcs), tuple(dsts), protos))
    return rules


def _parse_tests(doc: Mapping[str, Any], err: _Errors) -> list[PolicyTest]:
    tests: list[PolicyTest] = []
    raw_tests = doc.get("tests", [])
    if not isinstance(raw_tests, list):
        err.add("tests", "expected an array of tables: [[tests]]")
        raw_tests = []
    for i, t in enumerate(raw_tests):
        where = f"tests[{i}]"
        if not isinstance(t, dict):
            err.add(where, "expected a table")
            continue
        _check_keys(t, ("src", "proto", "accept", "deny"), where, err)
        src = t.get("src")
        if not isinstance(src, str):
            err.add(f"{where}.src", "missing; give one user, tag, host or address")
            src = ""
        proto = _proto(t.get("proto", "tcp"), f"{where}.proto", err) or "tcp"
        accept = _str_list(t.get("accept", []), f"{where}.accept", err)
        deny = _str_list(t.get("deny", []), f"{where}.deny", err)
        tests.append(PolicyTest(i, src, proto, tuple(accept), tuple(deny)))
    return tests
