"""Access questions against a policy ("may alice reach tag:server:22 over tcp?") and the policy's own
``[[tests]]``. PURE.

A question names a source and a ``<host>:<port>`` destination. Either side may be a user (a hypothetical
untagged node of that user), a tag (a node carrying it), a ``[hosts]`` alias, an address, or, when the
caller passes the current nodes, a node name; an address that belongs to a node stands for that node. A
group cannot be a source or destination here (it names many users: ask for one of them).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from ghostcore.errors import ConfigError
from ghostmesh.policy.compiler import NodeIdent
from ghostmesh.policy.model import (
    PROTOS,
    IPAddr,
    Policy,
    PolicyError,
    Principal,
    Proto,
    parse_net,
    parse_policy,
    split_dst,
)


@dataclass(frozen=True, slots=True)
class Answer:
    src: str
    dst: str
    proto: Proto
    allowed: bool
    reason: str


def _principal(policy: Policy, text: str, nodes: Mapping[str, NodeIdent]) -> Principal:
    if text.startswith("tag:"):
        if text not in policy.tag_owners:
            raise ValueError(f'unknown tag "{text}"; declare it in [tag_owners]')
        return Principal(None, frozenset([text]))
    if text.startswith(("group:", "autogroup:")) or text == "*":
        raise ValueError(f'"{text}" names many nodes; ask about one user, tag, host or address')
    if text in nodes:
        return nodes[text].principal
    net = policy.hosts.get(text)
    if net is None:
        try:
            net = parse_net(text)
        except ValueError:
            net = None
    if net is not None:
        addr: IPAddr = net.network_address
        if net.num_addresses > 2:
            addr = addr + 1  # a prefix stands for its first host
        for n in nodes.values():
            if addr in n.addrs:
                return n.principal
        return Principal(None, frozenset(), (addr,))
    sel = policy.resolve(text)  # raises ValueError for what is no user name either
    if sel.kind != "user":
        raise ValueError(f'"{text}" is not a user, tag, host, address or node')
    return Principal(text, frozenset())


def check(policy: Policy, src: str, dst: str, proto: str = "tcp", nodes: Iterable[NodeIdent] = ()) -> Answer:
    """Whether ``src`` may open a ``proto`` flow to ``dst`` (``host:port``); ``ValueError`` if malformed."""
    if proto not in PROTOS:
        raise ValueError(f'protocol must be one of {", ".join(PROTOS)}, got "{proto}"')
    p: Proto = proto
    by_name = {n.name: n for n in nodes if n.name}
    host, port_text = split_dst(dst)
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f'"{dst}": the port must be a number 0..65535')
    port = int(port_text)
    s = _principal(policy, src, by_name)
    d = _principal(policy, host, by_name)
    src_user = None if s.tags else s.user
    for rule in policy.rules:
        if rule.protos and p not in rule.protos:
            continue
        if not rule.src_matches(s):
            continue
        for e in rule.dst:
            if not e.sel.matches(d, src_user=src_user):
                continue
            if p == "icmp" or any(lo <= port <= hi for lo, hi in e.ports):
                return Answer(src, dst, p, True, f"acls[{rule.index}] accepts")
    return Answer(src, dst, p, False, "no rule matches")


def run_tests(policy: Policy) -> tuple[int, list[str]]:
    """Run the policy's ``[[tests]]``: (assertions passed, one error line per failure)."""
    passed = 0
    errors: list[str] = []
    for t in policy.tests:
        for key, want in (("accept", True), ("deny", False)):
            for k, dst in enumerate(t.accept if want else t.deny):
                where = f"tests[{t.index}].{key}[{k}]"
                try:
                    ans = check(policy, t.src, dst, t.proto)
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


def validate(text: str) -> tuple[Policy, int]:
    """Parse ``text`` and run its tests; raises :class:`PolicyError` (one line per problem) on failure."""
    policy = parse_policy(text)
    passed, errors = run_tests(policy)
    if errors:
        raise PolicyTestError(errors)
    return policy, passed


class PolicyTestError(PolicyError, ConfigError):
    """The policy parsed but its own tests fail: FAILED_PRECONDITION on the wire (a ConfigError)."""
