"""The ACL policy core: parse errors with key paths, golden compile output, autogroups, policy tests,
and the incremental compiler agreeing with a full recompute (hypothesis)."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ghostcore.policy import (
    ALLOW_ALL,
    Compiler,
    FRule,
    NodeIdent,
    PolicyError,
    PolicyTestError,
    check,
    parse_policy,
    run_tests,
    validate,
)
from ghostcore.policy.model import MESH

BASE = """
[groups]
"group:eng" = ["alice", "bob"]

[tag_owners]
"tag:server" = ["group:eng"]
"tag:ci" = ["alice"]

[hosts]
db = "100.64.0.10"
lab = "10.1.1.0/24"
"""


def node(i: int, user: str = "alice", tags: tuple[str, ...] = (), name: str = "") -> NodeIdent:
    addrs = (ipaddress.ip_address(f"100.64.0.{i}"), ipaddress.ip_address(f"fd7a:115c:a1e0::{i:x}"))
    return NodeIdent(i, user, frozenset(tags), addrs, name or f"n{i}")


def errors_of(text: str) -> list[str]:
    with pytest.raises(PolicyError) as info:
        parse_policy(text)
    return info.value.errors


# -- parsing ---------------------------------------------------------------------------------------------


def test_unknown_tag_names_key_path() -> None:
    errs = errors_of(
        BASE + '[[acls]]\naction = "accept"\nsrc = ["*"]\ndst = ["tag:server:22"]\n'
        '[[acls]]\naction = "accept"\nsrc = ["*"]\ndst = ["tag:nope:22"]\n'
    )
    assert errs == ['acls[1].dst[0]: unknown tag "tag:nope"; declare it in [tag_owners]']


def test_every_problem_is_one_line_with_its_path() -> None:
    text = """
bogus = 1
[groups]
"group:a" = ["Bad User"]
[tag_owners]
"tag:x" = ["group:missing"]
[hosts]
h = "not-an-ip"
[[acls]]
action = "drop"
src = ["group:zzz", "autogroup:self"]
dst = ["tag:x", "tag:x:99999", "autogroup:nope:*"]
proto = "ssh"
extra = true
[[tests]]
src = "alice"
oops = 1
"""
    errs = errors_of(text)
    prefixes = [e.split(":")[0] for e in errs]
    assert "bogus" in prefixes
    assert 'groups."group' in prefixes  # groups."group:a"[0]
    assert any(e.startswith('tag_owners."tag:x"[0]: unknown group') for e in errs)
    assert any(e.startswith("hosts.h: ") for e in errs)
    assert any(e.startswith("acls[0].action: ") for e in errs)
    assert any(e.startswith("acls[0].src[0]: unknown group") for e in errs)
    assert any(e.startswith("acls[0].src[1]: ") and "only allowed in dst" in e for e in errs)
    assert any(e.startswith("acls[0].dst[0]: ") and ":ports" in e for e in errs)
    assert any(e.startswith("acls[0].dst[1]: bad port range") for e in errs)
    assert any(e.startswith("acls[0].dst[2]: unknown autogroup") for e in errs)
    assert any(e.startswith("acls[0].proto: ") for e in errs)
    assert any(e.startswith("acls[0].extra: unknown key") for e in errs)
    assert any(e.startswith("tests[0].oops: unknown key") for e in errs)
    assert all("\n" not in e for e in errs)


def test_toml_syntax_error_is_one_line() -> None:
    errs = errors_of("[[acls]\n")
    assert len(errs) == 1
    assert errs[0].startswith("(toml): ")


def test_tag_ownership() -> None:
    pol = parse_policy(BASE)
    assert pol.owns_tag("bob", "tag:server")  # through group:eng
    assert pol.owns_tag("alice", "tag:ci")
    assert not pol.owns_tag("bob", "tag:ci")
    assert not pol.owns_tag("alice", "tag:unknown")


# -- policy tests / access checks ------------------------------------------------------------------------

RULES = """
[[acls]]
action = "accept"
src = ["group:eng"]
dst = ["tag:server:22,443"]

[[acls]]
action = "accept"
src = ["autogroup:member"]
dst = ["autogroup:self:*"]

[[acls]]
action = "accept"
src = ["tag:ci"]
dst = ["db:5432"]
proto = "tcp"
"""


def test_checks() -> None:
    pol = parse_policy(BASE + RULES)
    assert check(pol, "alice", "tag:server:22").allowed
    assert check(pol, "alice", "tag:server:443").reason == "acls[0] accepts"
    assert not check(pol, "alice", "tag:server:80").allowed
    assert not check(pol, "carol", "tag:server:22").allowed
    assert check(pol, "carol", "carol:8080").allowed  # autogroup:self
    assert not check(pol, "carol", "alice:8080").allowed
    assert check(pol, "tag:ci", "db:5432").allowed
    assert not check(pol, "tag:ci", "db:5432", "udp").allowed
    assert check(pol, "alice", "tag:server:1", "icmp").allowed  # ICMP ignores ports
    with pytest.raises(ValueError, match="unknown tag"):
        check(pol, "tag:nope", "db:1")
    # a group as the source: each of its users must get the answer
    assert check(pol, "group:eng", "tag:server:22").allowed
    assert not check(pol, "group:eng", "alice:22").allowed  # bob may not reach alice's nodes
    with pytest.raises(ValueError, match="cannot be a test destination"):
        check(pol, "alice", "group:eng:1")


def test_policy_tests_pass_and_fail() -> None:
    good = BASE + RULES + '[[tests]]\nsrc = "bob"\naccept = ["tag:server:22"]\ndeny = ["db:5432"]\n'
    _pol, passed = validate(good)
    assert passed == 2
    bad = BASE + RULES + '[[tests]]\nsrc = "bob"\naccept = ["db:5432"]\ndeny = ["tag:server:443"]\n'
    with pytest.raises(PolicyTestError) as info:
        validate(bad)
    assert info.value.errors == [
        "tests[0].accept[0]: bob -> db:5432 (tcp) should be accepted but is denied (no rule matches)",
        "tests[0].deny[0]: bob -> tag:server:443 (tcp) should be denied but is accepted (acls[0] accepts)",
    ]
    assert run_tests(parse_policy(bad))[0] == 0


def test_example_config_is_valid() -> None:
    text = (Path(__file__).parents[2] / "configs" / "acls.toml").read_text()
    pol, passed = validate(text)
    assert pol.rules
    assert passed >= 3


# -- compiler: golden output -----------------------------------------------------------------------------


def test_golden_compile() -> None:
    pol = parse_policy(BASE + RULES)
    a1, a2 = node(1, "alice"), node(2, "alice")
    b = node(3, "bob")
    srv = node(4, "alice", ("tag:server",))
    ci = node(5, "carol", ("tag:ci",))
    db = node(10, "dave")
    c = Compiler(pol, [a1, a2, b, srv, ci, db])
    assert c.peers(1) == {2, 4}  # own node (self) and the server
    assert c.peers(4) == {1, 2, 3}  # tagged: not part of alice's autogroup:self
    assert c.peers(5) == {10}
    assert c.peers(10) == {5}
    assert c.filter(4) == (
        FRule(
            (
                "100.64.0.1/32",
                "100.64.0.2/32",
                "100.64.0.3/32",
                "fd7a:115c:a1e0::1/128",
                "fd7a:115c:a1e0::2/128",
                "fd7a:115c:a1e0::3/128",
            ),
            (
                ("100.64.0.4/32", 22, 22),
                ("100.64.0.4/32", 443, 443),
                ("fd7a:115c:a1e0::4/128", 22, 22),
                ("fd7a:115c:a1e0::4/128", 443, 443),
            ),
            (),
        ),
    )
    assert c.filter(1) == (
        FRule(
            ("100.64.0.1/32", "100.64.0.2/32", "fd7a:115c:a1e0::1/128", "fd7a:115c:a1e0::2/128"),
            (("100.64.0.1/32", 0, 65535), ("fd7a:115c:a1e0::1/128", 0, 65535)),
            (),
        ),
    )
    # db is a host alias for one IPv4 address: only that address is the destination
    assert c.filter(10)[-1] == FRule(
        ("100.64.0.5/32", "fd7a:115c:a1e0::5/128"), (("100.64.0.10/32", 5432, 5432),), ("tcp",)
    )


def test_autogroups_member_tagged_and_star() -> None:
    pol = parse_policy(
        BASE
        + '[[acls]]\naction = "accept"\nsrc = ["autogroup:tagged"]\ndst = ["autogroup:member:80"]\n'
        + '[[acls]]\naction = "accept"\nsrc = ["*"]\ndst = ["lab:*"]\nproto = "udp"\n'
    )
    a, srv = node(1, "alice"), node(2, "alice", ("tag:server",))
    c = Compiler(pol, [a, srv])
    assert c.peers(1) == {2}
    assert c.peers(2) == {1}
    assert c.filter(1)[0].src == ("100.64.0.2/32", "fd7a:115c:a1e0::2/128")
    assert c.filter(2) == ()  # nothing may reach the tagged node
    lab = node(3, "bob")
    lab = NodeIdent(3, "bob", frozenset(), (ipaddress.ip_address("10.1.1.7"),), "lab")
    c.upsert(lab)
    # "*" is the mesh (Tailscale's ranges) and the approved routes, never the internet
    assert c.filter(3)[-1] == FRule(
        tuple(sorted(str(m) for m in MESH)), (("10.1.1.7/32", 0, 65535),), ("udp",)
    )


def test_no_policy_is_allow_all() -> None:
    c = Compiler(None, [node(1), node(2)])
    assert c.peers(1) is None
    assert c.can_see(1, 2)
    assert c.filter(1) == ALLOW_ALL
    assert not c.upsert(node(3))


def test_policy_change_reports_only_changed_nodes() -> None:
    pol = parse_policy(BASE + RULES)
    nodes = [node(1, "alice"), node(2, "bob"), node(3, "carol"), node(4, "x", ("tag:server",))]
    c = Compiler(pol, nodes)
    # drop the group:eng -> tag:server rule: alice, bob and the server change; carol does not
    delta = c.set_policy(parse_policy(BASE + RULES.split("[[acls]]", 2)[2].join(["[[acls]]", ""])))
    assert set(delta.removed) == {1, 2, 4}
    assert delta.removed[4] == {1, 2}
    assert delta.filters == {4}
    assert 3 not in delta.added
    assert 3 not in delta.removed


def test_node_change_recomputes_only_what_it_touches() -> None:
    pol = parse_policy(BASE + RULES)
    nodes = [node(i, f"u{i}") for i in range(1, 201)] + [node(250, "alice", ("tag:server",))]
    c = Compiler(pol, nodes)
    c.recomputed = 0
    delta = c.upsert(node(201, "u201"))  # a lone user's node: only autogroup:self applies
    assert c.recomputed <= 2
    assert not delta.added
    assert not delta.removed
    c.recomputed = 0
    delta = c.upsert(node(202, "bob"))  # bob is in group:eng: the server gains a peer and a source
    assert delta.added == {202: {250}, 250: {202}}
    assert delta.filters == {202, 250}
    assert c.recomputed <= 3


# -- incremental == full ---------------------------------------------------------------------------------

POLICY = parse_policy(
    BASE
    + RULES
    + """
[[acls]]
action = "accept"
src = ["tag:server", "lab"]
dst = ["autogroup:tagged:80-90", "bob:7"]
proto = "udp"
"""
)
USERS = ["alice", "bob", "carol"]
TAGSETS: list[tuple[str, ...]] = [(), (), ("tag:server",), ("tag:ci",), ("tag:server", "tag:ci")]

op = st.tuples(
    st.sampled_from(["upsert", "remove"]),
    st.integers(1, 12),
    st.sampled_from(USERS),
    st.sampled_from(TAGSETS),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(op, max_size=25), st.booleans())
def test_incremental_equals_full(ops: list[tuple[str, int, str, tuple[str, ...]]], start_open: bool) -> None:
    c = Compiler(None if start_open else POLICY)
    if start_open:
        c.set_policy(POLICY)
    seen: dict[int, set[int]] = {}
    for kind, i, user, tags in ops:
        before = {n: set(c.peers(n) or ()) for n in c.nodes}
        filters_before = {n: c.filter(n) for n in c.nodes}
        delta = c.upsert(node(i, user, tags)) if kind == "upsert" else c.remove(i)
        full = Compiler(POLICY, c.nodes.values())
        for n in c.nodes:
            assert c.peers(n) == full.peers(n)
            assert c.filter(n) == full.filter(n)
            # the delta says exactly what changed
            after = set(c.peers(n) or ())
            old = before.get(n, set())
            assert delta.added.get(n, set()) == after - old
            assert delta.removed.get(n, set()) == old - after
            if n in filters_before and filters_before[n] != c.filter(n):
                assert n in delta.filters
        seen = {n: set(c.peers(n) or ()) for n in c.nodes}
    for n, peers in seen.items():
        for p in peers:
            assert n in seen[p]  # visibility is symmetric
