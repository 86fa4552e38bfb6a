"""Access questions against a policy ("may alice reach tag:server:22 over tcp?") and the policy's own
``[[tests]]``. PURE.

A question names a source and a ``<host>:<port>`` destination, as Tailscale's policy tests do:

- the source is a user (a hypothetical untagged node of that user), a group (each of its users must
  get the answer), a tag (a node carrying it), ``autogroup:member`` / ``autogroup:tagged`` (each known
  node in it), a ``[hosts]`` alias, an address, or a node name when the caller passes nodes;
- the destination is ONE address or name and ONE port: a user, a tag, a host alias of a single address,
  an address (``[v6]:port`` for IPv6) or a node name. A group, an autogroup, ``*``, a prefix, a port
  list or range is refused (Tailscale refuses them too: a test names one flow);
- an address that belongs to a known node stands for that node.

Ports do not matter for ICMP and ICMPv6; another protocol without ports (GRE, ESP...) is accepted only
by a rule covering every port (:mod:`ghostcore.ipproto`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from ghostcore import ipproto as protocols
from ghostcore.errors import ConfigError
from ghostcore.policy.compiler import NodeIdent
from ghostcore.policy.model import OIDC_PREFIX, IPAddr, Policy, PolicyError, Principal, Proto, Rule
from ghostcore.policy.parse import parse_net, parse_policy, resolve, split_dst


@dataclass(frozen=True, slots=True)
class Answer:
    src: str
    dst: str
    proto: Proto
    allowed: bool
    reason: str


def _by_address(policy: Policy, text: str, nodes: Mapping[str, NodeIdent], single: bool) -> Principal | None:
    net = policy.hosts.get(text)
    if net is None:
        try:
            net = parse_net(text)
        except ValueError:
            return None
        if single and "/" in text:
            raise ValueError(f'"{text}" is a prefix; a test destination is one address')
    if single and net.num_addresses != 1:
        raise ValueError(f'"{text}" is the prefix {net}; a test destination is one address')
    a: IPAddr = net.network_address
    if net.num_addresses > 2:
        a = a + 1  # a prefix (as a source) stands for its first host
    for n in nodes.values():
        if a in n.addrs:
            return n.principal
    return Principal(None, frozenset(), (a,))


def _principals(policy: Policy, text: str, nodes: Mapping[str, NodeIdent], *, dst: bool) -> list[Principal]:
    if not text:
        raise ValueError("empty name")
    if text.startswith("tag:"):
        if text not in policy.tag_owners:
            raise ValueError(f'unknown tag "{text}"; declare it in [tag_owners]')
        return [Principal(None, frozenset([text]))]
    if text in nodes:
        return [nodes[text].principal]
    if not dst and text.startswith("group:"):
        if text not in policy.groups:
            raise ValueError(f'unknown group "{text}"; declare it in [groups]')
        return [
            Principal(None, frozenset(), groups=frozenset([m[len(OIDC_PREFIX) :]]))
            if m.startswith(OIDC_PREFIX)
            else Principal(m, frozenset())
            for m in sorted(policy.groups[text])
        ]
    if not dst and text in ("autogroup:member", "autogroup:tagged"):
        tagged = text == "autogroup:tagged"
        found = [n.principal for n in nodes.values() if bool(n.tags) == tagged]
        if not found:
            raise ValueError(f'"{text}" names no known node; name a user, tag or node instead')
        return found
    if text.startswith(("group:", "autogroup:")) or text == "*":
        where = "destination" if dst else "source"
        raise ValueError(f'"{text}" cannot be a test {where}; name one user, tag, host, address or node')
    p = _by_address(policy, text, nodes, single=dst)
    if p is not None:
        return [p]
    sel = resolve(text, policy.groups, policy.tag_owners, policy.hosts, dst=False)  # ValueError if garbage
    if sel.kind != "user":
        raise ValueError(f'"{text}" is not a user, tag, host, address or node')
    return [Principal(text, frozenset())]


def _accepts(rule: Rule, s: Principal, d: Principal, proto: Proto, port: int) -> bool:
    if proto not in protocols.effective(rule.protos) or not rule.src_matches(s):
        return False
    src_user = None if s.tags else s.user
    for e in rule.dst:
        if not e.sel.matches(d, src_user=src_user):
            continue
        if proto in protocols.PORTLESS_ICMP:
            return True
        if proto in protocols.WITH_PORTS:
            if any(lo <= port <= hi for lo, hi in e.ports):
                return True
        elif protocols.ALL_PORTS in e.ports:
            return True
    return False


def check(policy: Policy, src: str, dst: str, proto: str = "tcp", nodes: Iterable[NodeIdent] = ()) -> Answer:
    """Whether ``src`` may open a ``proto`` flow to ``dst`` (``host:port``); ``ValueError`` if malformed."""
    p = protocols.canonical(proto)
    by_name = {n.name: n for n in nodes if n.name}
    host, port_text = split_dst(dst)
    if not port_text.isascii() or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f'"{dst}": the port must be one number 0..65535')
    port = int(port_text)
    sources = _principals(policy, src, by_name, dst=False)
    (d,) = _principals(policy, host, by_name, dst=True)
    reasons = []
    for s in sources:
        rule = next((r for r in policy.rules if _accepts(r, s, d, p, port)), None)
        if rule is None:
            return Answer(src, dst, p, False, "no rule matches")
        reasons.append(rule.origin)
    return Answer(src, dst, p, True, f"{', '.join(dict.fromkeys(reasons))} accepts")


def run_tests(policy: Policy, nodes: Iterable[NodeIdent] = ()) -> tuple[int, list[str]]:
    """Run the policy's ``[[tests]]``: (assertions passed, one error line per failure)."""
    known = list(nodes)
    passed = 0
    errors: list[str] = []
    for t in policy.tests:
        for key, want in (("accept", True), ("deny", False)):
            for k, dst in enumerate(t.accept if want else t.deny):
                where = f"tests[{t.index}].{key}[{k}]"
                try:
                    ans = check(policy, t.src, dst, t.proto, known)
                except ValueError as exc:
                    errors.append(f"{where}: {exc}")
                    continue
                if ans.allowed == want:
                    passed += 1
                else:
                    got = f"accepted ({ans.reason})" if ans.allowed else "denied (no rule matches)"
                    should = "accepted" if want else "denied"
                    errors.append(f"{where}: {t.src} -> {dst} ({t.proto}) should be {should} but is {got}")
    return passed, errors


def validate(text: str, nodes: Iterable[NodeIdent] = ()) -> tuple[Policy, int]:
    """Parse ``text`` and run its tests; raises :class:`PolicyError` (one line per problem) on failure."""
    policy = parse_policy(text)
    passed, errors = run_tests(policy, nodes)
    if errors:
        raise PolicyTestError(errors)
    return policy, passed


class PolicyTestError(PolicyError, ConfigError):
    """The policy parsed but its own tests fail: FAILED_PRECONDITION on the wire (a ConfigError)."""
