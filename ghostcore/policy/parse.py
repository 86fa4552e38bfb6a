"""The ACL policy format (``acls.toml``) and its parser. PURE: text in, a validated :class:`Policy` out.

The semantics are Tailscale's policy file (tailscale.com/kb/1337/policy-syntax, summed up in
:mod:`ghostcore.policy.model`), written in TOML::

    [groups]
    "group:eng" = ["alice", "bob@example.com", "oidc:engineering"]  # users and OIDC groups; no nesting

    [tag_owners]
    "tag:server" = ["group:eng", "alice"]   # who may put the tag on a node (through an auth key)

    [hosts]
    db = "100.64.0.10"                      # an address or a prefix
    lab = "10.1.1.0/24"

    [[acls]]
    action = "accept"                       # the only action: everything not accepted is denied
    src = ["group:eng", "tag:ci"]           # users, groups, tags, hosts, prefixes, "*", autogroups
    dst = ["tag:server:22,443", "db:5432", "autogroup:self:*"]
    proto = "tcp"                           # optional: a name (tcp, udp, icmp, ipv6-icmp, sctp, gre,
                                            # esp, ah, ...) or a number 1-255; default TCP, UDP, ICMP
                                            # and ICMPv6

    [[grants]]                              # Tailscale's newer form of a rule
    src = ["group:eng"]
    dst = ["tag:server", "10.1.0.0/16"]     # selectors without ports
    ip = ["tcp:22", "udp:53", "80-443", "icmp:*", "*"]   # [proto:]ports, or "*"
    via = ["tag:router"]                    # optional: routed destinations only through these routers

    [auto_approvers]                        # routes approved without an admin when advertised by
    routes = { "10.1.0.0/16" = ["tag:router", "group:ops"] }  # (the prefix or a narrower one)
    exit_node = ["tag:exit"]                # 0.0.0.0/0 + ::/0 advertised by these nodes

    [[tests]]                               # run before a policy is accepted
    src = "alice"                           # a user, group, tag, host, address or node name
    proto = "tcp"                           # optional, default tcp
    accept = ["tag:server:22"]              # one address or name and ONE port each
    deny = ["db:5432"]

A policy with neither an ``acls`` nor a ``grants`` key allows everything (``src = ["*"]``,
``dst = ["*:*"]``), as Tailscale's does; ``acls = []`` denies everything.

Selectors (``src`` entries, and ``dst`` entries before their ``:ports``): ``*``; a user (``alice``, or an
e-mail address as Tailscale names users: ``alice@example.com``); ``group:x`` (its members' untagged
nodes; a member ``oidc:<name>`` stands for every user whose OIDC groups claim contains ``<name>``);
``tag:x`` (declared in ``[tag_owners]``); a ``[hosts]`` alias, an address or a prefix;
``autogroup:member`` (untagged nodes), ``autogroup:tagged`` (tagged nodes), ``autogroup:self`` (dst only:
the source user's own untagged nodes; its sources must be users, groups, ``autogroup:member``, or in
``[[acls]]`` ``*``) and ``autogroup:internet`` (dst only: through exit nodes).

Ports are ``*``, ``N`` or ``N-M``, comma separated. Every error is one line naming its key path
(``acls[2].dst[0]: unknown tag "tag:nope"; declare it in [tag_owners]``); lists are indexed from 0.

Addresses and prefixes are read with :mod:`ghostcore.addr`'s human door: any case and compression is
fine and ``10.1.1.7/24`` means ``10.1.1.0/24``, but a zone ID, whitespace or a control character is
refused. What the compiler emits from them (filter rules that end up in ``nft -f`` scripts on the nodes)
is therefore canonical.

Why one module of about 500 lines: the format is one grammar (hosts, groups, tags, rules, grants, tests,
auto-approvers) whose parts refer to each other while parsing; splitting it would split one validation.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from collections.abc import Iterable, Mapping
from typing import Any

from ghostcore import addr
from ghostcore import ipproto as protocols
from ghostcore.policy.model import (
    ALL_PORTS,
    AUTOGROUPS,
    OIDC_PREFIX,
    DstEntry,
    IPNet,
    Policy,
    PolicyError,
    PolicyTest,
    Proto,
    Rule,
    Selector,
)

# A user name, the one rule for ghostmesh's users and policies: a lower-case name, optionally an e-mail
# address (the way Tailscale names its users, so an imported policy's users are ghostmesh users as written)
USER_RE = re.compile(r"^[a-z0-9][a-z0-9._+-]{0,62}(@[a-z0-9][a-z0-9.-]{0,252})?$")
_TAG_RE = re.compile(r"^tag:[A-Za-z][A-Za-z0-9._-]{0,59}$")
_OIDC_GROUP_RE = re.compile(r"^oidc:\S{1,200}$")
_GROUP_RE = re.compile(r"^group:[A-Za-z0-9][A-Za-z0-9._-]{0,59}$")
_HOST_RE = re.compile(r"^[A-Za-z][A-Za-z0-9._-]{0,62}$")
_SELF_SOURCES = {"acls": ("user", "group", "member", "all"), "grants": ("user", "group", "member")}
_SELF_ERROR = "autogroup:self can only be used with users, groups, or supported autogroups"
DEFAULT_RULE = Rule(
    0,
    (Selector("all", "*"),),
    (DstEntry(Selector("all", "*"), ALL_PORTS),),
    (),
    origin="default",
)


def parse_net(text: str) -> IPNet:
    """An address (as /32 or /128) or a prefix (host bits dropped); ``ValueError`` with the one-line
    reason otherwise (:mod:`ghostcore.addr`: no zone ID, whitespace or control character)."""
    try:
        canonical = addr.normalize_prefix(text, host_bits=True) if "/" in text else addr.normalize_ip(text)
    except addr.AddressError as exc:
        raise ValueError(str(exc)) from None
    return ipaddress.ip_network(canonical)


def resolve(
    text: str,
    groups: Mapping[str, frozenset[str]],
    tag_owners: Mapping[str, Any],
    hosts: Mapping[str, IPNet],
    *,
    dst: bool,
) -> Selector:
    """``text`` as a selector; raises ``ValueError`` with a one-line reason."""
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
    except ValueError as exc:
        not_an_address = exc
    if USER_RE.match(text):
        return Selector("user", text, users=frozenset([text]))
    if any(c in text for c in ":/%"):  # no other selector has these: it was meant as an address or prefix
        raise not_an_address
    raise ValueError(f"\"{text}\" is not a user, group:, tag:, host alias, address, prefix, '*' or autogroup")


def parse_ports(text: str, *, grant: bool = False) -> tuple[tuple[int, int], ...]:
    """``*``, ``N``, ``N-M`` or a comma list of those. In a grant a range starting at 0 is refused
    (Tailscale: "use '*' for wildcard")."""
    if text == "*":
        return ALL_PORTS
    out: list[tuple[int, int]] = []
    for part in text.split(","):
        first, sep, last = part.strip().partition("-")
        if not _digits(first) or (sep and not _digits(last)):
            raise ValueError(f"bad port \"{part.strip()}\": use '*', N, N-M or a comma list of those")
        lo, hi = int(first), int(last if sep else first)
        if not 0 <= lo <= hi <= 65535:
            raise ValueError(f'bad port range "{part.strip()}": need 0 <= first <= last <= 65535')
        if grant and lo == 0:
            raise ValueError(
                f"bad port range \"{part.strip()}\": the first port must be > 0; use '*' for all"
            )
        out.append((lo, hi))
    return tuple(out)


def _digits(text: str) -> bool:
    return text.isascii() and text.isdigit()  # str.isdigit alone takes "²" and other scripts' digits


def split_dst(text: str) -> tuple[str, str]:
    """``"tag:server:22,443"`` -> ``("tag:server", "22,443")``: the ports follow the last colon;
    ``"[fd7a::1]:22"`` -> ``("fd7a::1", "22")``."""
    host, sep, ports = text.rpartition(":")
    if not sep or not host or host in ("tag", "group", "autogroup"):
        raise ValueError(f"\"{text}\" needs ':ports' (e.g. 'tag:server:22' or 'db:*')")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, ports


def parse_ip(text: str) -> tuple[Proto | None, tuple[tuple[int, int], ...]]:
    """A grant's ``ip`` entry: ``"*"``, ``"22"``, ``"80-443"``, ``"tcp:22"``, ``"icmp:*"``, ``"47:*"``.
    Returns (protocol or None for the default set, ports)."""
    if text == "*":
        return None, ALL_PORTS
    proto, sep, ports = text.rpartition(":")
    if not sep:
        return None, parse_ports(text, grant=True)
    return protocols.canonical(proto), parse_ports(ports, grant=True)


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
    if isinstance(v, bool) or not isinstance(v, int | str):
        err.add(where, f"expected a protocol name or number, got {v!r}")
        return None
    try:
        return protocols.canonical(str(v))
    except ValueError as exc:
        err.add(where, str(exc))
        return None


def _array(doc: Mapping[str, Any], key: str, err: _Errors) -> list[Any]:
    v = doc.get(key, [])
    if not isinstance(v, list):
        err.add(key, f"expected an array of tables: [[{key}]]")
        return []
    return v


class _Grammar:
    """One parse: the declarations (groups, tags, hosts) the rules refer to, and the errors found."""

    def __init__(self, doc: Mapping[str, Any], err: _Errors) -> None:
        self.err = err
        self.groups = _parse_groups(doc, err)
        self.tag_owners = _parse_tag_owners(doc, self.groups, err)
        self.hosts = _parse_hosts(doc, err)

    def sel(self, text: str, where: str, *, dst: bool) -> Selector | None:
        try:
            return resolve(text, self.groups, self.tag_owners, self.hosts, dst=dst)
        except ValueError as exc:
            self.err.add(where, str(exc))
            return None

    def srcs(self, r: Mapping[str, Any], where: str) -> list[Selector]:
        if "src" not in r:
            self.err.add(f"{where}.src", "missing; give a list of selectors")
        out = []
        for j, s in enumerate(_str_list(r.get("src", []), f"{where}.src", self.err)):
            sel = self.sel(s, f"{where}.src[{j}]", dst=False)
            if sel is not None:
                out.append(sel)
        return out

    def check_self(self, kind: str, where: str, srcs: list[Selector], dsts: Iterable[Selector]) -> None:
        if not any(d.kind == "self" for d in dsts):
            return
        for j, s in enumerate(srcs):
            if s.kind not in _SELF_SOURCES[kind]:
                self.err.add(f"{where}.src[{j}]", f'"{s.text}": {_SELF_ERROR}')

    def acl(self, i: int, r: Any) -> Rule | None:
        where = f"acls[{i}]"
        if not isinstance(r, dict):
            self.err.add(where, "expected a table")
            return None
        _check_keys(r, ("action", "src", "dst", "proto"), where, self.err)
        if r.get("action") != "accept":
            self.err.add(f"{where}.action", f'expected "accept", got {r.get("action")!r}')
        srcs = self.srcs(r, where)
        if "dst" not in r:
            self.err.add(f"{where}.dst", "missing; give a list of selectors")
        dsts: list[DstEntry] = []
        for j, d in enumerate(_str_list(r.get("dst", []), f"{where}.dst", self.err)):
            try:
                host, ports = split_dst(d)
                sel = resolve(host, self.groups, self.tag_owners, self.hosts, dst=True)
                dsts.append(DstEntry(sel, parse_ports(ports)))
            except ValueError as exc:
                self.err.add(f"{where}.dst[{j}]", str(exc))
        self.check_self("acls", where, srcs, (d.sel for d in dsts))
        protos: tuple[Proto, ...] = ()
        if "proto" in r:
            p = _proto(r["proto"], f"{where}.proto", self.err)
            protos = () if p is None else (p,)
        return Rule(i, tuple(srcs), tuple(dsts), protos, origin=where)

    def grant(self, i: int, g: Any) -> list[Rule]:
        where = f"grants[{i}]"
        if not isinstance(g, dict):
            self.err.add(where, "expected a table")
            return []
        _check_keys(g, ("src", "dst", "ip", "via", "app"), where, self.err)
        if "app" in g:
            self.err.add(
                f"{where}.app", "app capabilities are not supported; remove the key (ip grants only)"
            )
        srcs = self.srcs(g, where)
        if "dst" not in g:
            self.err.add(f"{where}.dst", "missing; give a list of selectors")
        dsts: list[Selector] = []
        for j, d in enumerate(_str_list(g.get("dst", []), f"{where}.dst", self.err)):
            sel = self.sel(d, f"{where}.dst[{j}]", dst=True)
            if sel is not None and sel.net is not None and sel.net.prefixlen == 0 and sel.kind == "prefix":
                self.err.add(
                    f"{where}.dst[{j}]", f'"{d}": to allow all IP addresses, use "*" or "autogroup:internet"'
                )
            elif sel is not None:
                dsts.append(sel)
        self.check_self("grants", where, srcs, dsts)
        if "ip" in g and not g["ip"] and not g.get("app"):
            self.err.add(f"{where}.ip", 'empty; give protocols and ports such as ["tcp:22"] or ["*"]')
        via: list[Selector] = []
        for j, v in enumerate(_str_list(g.get("via", []), f"{where}.via", self.err)):
            sel = self.sel(v, f"{where}.via[{j}]", dst=True) if v.startswith("tag:") else None
            if not v.startswith("tag:"):
                self.err.add(f"{where}.via[{j}]", f'"{v}": via can only be a tag (the routers\' tag)')
            elif sel is not None:
                via.append(sel)
        if "ip" not in g and not g.get("app"):
            self.err.add(f"{where}.ip", 'missing; give protocols and ports such as ["tcp:22"] or ["*"]')
        if not g.get("ip"):
            return []
        by_proto: dict[Proto | None, list[tuple[int, int]]] = {}
        for j, text in enumerate(_str_list(g["ip"], f"{where}.ip", self.err)):
            try:
                proto, ports = parse_ip(text)
            except ValueError as exc:
                self.err.add(f"{where}.ip[{j}]", str(exc))
                continue
            by_proto.setdefault(proto, []).extend(ports)
        rules = []
        for proto, merged in by_proto.items():
            entries = tuple(DstEntry(d, tuple(dict.fromkeys(merged))) for d in dsts)
            protos = () if proto is None else (proto,)
            rules.append(Rule(i, tuple(srcs), entries, protos, origin=where, via=tuple(via)))
        return rules


def parse_policy(text: str) -> Policy:
    """Parse and validate ``text``; raises :class:`PolicyError` listing every problem found."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError([f"(toml): {exc}"]) from None
    err = _Errors()
    keys = ("groups", "tag_owners", "hosts", "acls", "grants", "tests", "auto_approvers")
    _check_keys(doc, keys, "", err)
    g = _Grammar(doc, err)
    rules: list[Rule] = []
    for i, r in enumerate(_array(doc, "acls", err)):
        rule = g.acl(i, r)
        if rule is not None:
            rules.append(rule)
    for i, r in enumerate(_array(doc, "grants", err)):
        rules += g.grant(i, r)
    if "acls" not in doc and "grants" not in doc:
        rules.append(DEFAULT_RULE)
    tests = _parse_tests(doc, err)
    auto_routes, auto_exit = _parse_auto_approvers(doc, g.groups, g.tag_owners, err)
    if err.lines:
        raise PolicyError(err.lines)
    return Policy(text, g.groups, g.tag_owners, g.hosts, tuple(rules), tuple(tests), auto_routes, auto_exit)


def _approvers(
    v: Any, where: str, groups: Mapping[str, frozenset[str]], tag_owners: Mapping[str, Any], err: _Errors
) -> tuple[Selector, ...]:
    out: list[Selector] = []
    for j, text in enumerate(_str_list(v, where, err)):
        if not text.startswith(("tag:", "group:")) and not USER_RE.match(text):
            err.add(f"{where}[{j}]", f'"{text}" is not a user, group: or tag:')
            continue
        try:
            out.append(resolve(text, groups, tag_owners, {}, dst=False))
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
            net = ipaddress.ip_network(addr.normalize_prefix(prefix))
        except addr.AddressError as exc:
            err.add(where, str(exc))
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
            if not USER_RE.match(u):
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
            err.add(f'tag_owners."{tag}"', "a tag looks like 'tag:server' (a letter after 'tag:')")
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
            elif o == "autogroup:member":
                continue
            elif not o.startswith(("group:", "tag:")) and not USER_RE.match(o):
                err.add(f"{where}[{i}]", f'"{o}" is not a user, group:, tag: or autogroup:member')
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
        except ValueError as exc:
            err.add(where, str(exc))
    return hosts


def _parse_tests(doc: Mapping[str, Any], err: _Errors) -> list[PolicyTest]:
    tests: list[PolicyTest] = []
    for i, t in enumerate(_array(doc, "tests", err)):
        where = f"tests[{i}]"
        if not isinstance(t, dict):
            err.add(where, "expected a table")
            continue
        _check_keys(t, ("src", "proto", "accept", "deny"), where, err)
        src = t.get("src")
        if not isinstance(src, str) or not src:
            err.add(f"{where}.src", "missing; give one user, group, tag, host, address or node name")
            src = ""
        proto = _proto(t.get("proto", "tcp"), f"{where}.proto", err) or "tcp"
        accept = _str_list(t.get("accept", []), f"{where}.accept", err)
        deny = _str_list(t.get("deny", []), f"{where}.deny", err)
        if not accept and not deny:
            err.add(where, 'a test needs "accept" or "deny" (a list of HOST:PORT)')
        tests.append(PolicyTest(i, src, proto, tuple(accept), tuple(deny)))
    return tests
