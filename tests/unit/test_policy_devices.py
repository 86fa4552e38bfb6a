"""Devices in the policy compiler: a device is a node to the rules, its gateway routes its addresses, whoever
sees a device sees its gateway, and the incremental compiler still agrees with a full recompute."""

from __future__ import annotations

import ipaddress

from hypothesis import given, settings
from hypothesis import strategies as st

from ghostcore.policy import Compiler, FRule, NodeIdent, parse_policy

POLICY = parse_policy(
    """
[groups]
"group:eng" = ["alice", "bob"]

[tag_owners]
"tag:gw" = ["group:eng"]
"tag:printer" = ["group:eng"]
"tag:server" = ["group:eng"]

[hosts]
db = "100.64.0.10"

[[acls]]
action = "accept"
src = ["group:eng"]
dst = ["tag:printer:631"]

[[acls]]
action = "accept"
src = ["tag:printer"]
dst = ["tag:server:22"]

[[acls]]
action = "accept"
src = ["autogroup:member"]
dst = ["autogroup:self:*"]

[[acls]]
action = "accept"
src = ["tag:server"]
dst = ["db:5432", "100.64.0.0/10:9"]
"""
)


def node(i: int, user: str = "alice", tags: tuple[str, ...] = (), via: int = 0) -> NodeIdent:
    addrs = (ipaddress.ip_address(f"100.64.0.{i}"), ipaddress.ip_address(f"fd7a:115c:a1e0::{i:x}"))
    return NodeIdent(i, user, frozenset(tags), addrs, f"n{i}", via=via)


def pfx(i: int) -> tuple[str, str]:
    return (f"100.64.0.{i}/32", f"fd7a:115c:a1e0::{i:x}/128")


def test_a_device_is_reached_through_its_gateway_which_enforces_the_devices_rules() -> None:
    laptop = node(1, "alice")  # group:eng
    gateway = node(2, "carol", ("tag:gw",))  # nobody's rules name it
    printer = node(3, "alice", ("tag:printer",), via=2)
    server = node(4, "bob", ("tag:server",))
    stranger = node(5, "carol")
    c = Compiler(POLICY, [laptop, gateway, printer, server, stranger])
    # the laptop may print: it sees the printer and the gateway carrying it
    assert {2, 3} <= (c.peers(1) or set())
    # the printer may reach the server: the server sees it, and its gateway
    assert c.peers(4) >= {3, 2}
    # the gateway sees whoever its device sees, nobody else
    assert c.peers(2) == {1, 3, 4}
    assert 2 not in (c.peers(5) or set())
    assert 3 not in (c.peers(5) or set())
    # the printer's port is in the gateway's filter (forward path), from the laptop's and bob's sources
    gw_filter = c.filter(2)
    printing = FRule(pfx(1), tuple((p, 631, 631) for p in pfx(3)), ())
    assert printing in gw_filter
    assert not any(d[0] in pfx(2) and d[1] == 631 for r in gw_filter for d in r.dst)  # not the gateway's own
    # the server accepts the printer's addresses as a source, not the gateway's
    srcs = {s for r in c.filter(4) for s in r.src}
    assert set(pfx(3)) <= srcs
    assert not set(pfx(2)) & srcs


def test_a_prefix_rule_covering_a_device_selects_its_gateway() -> None:
    server = node(4, "bob", ("tag:server",))
    gateway = node(2, "carol", ("tag:gw",))
    db = node(10, "carol", (), via=2)  # the host alias "db" is this device's address
    c = Compiler(POLICY, [server, gateway, db])
    assert {2, 10} <= (c.peers(4) or set())
    dst = {(p, lo) for r in c.filter(2) for p, lo, _ in r.dst}
    assert ("100.64.0.10/32", 5432) in dst  # db:5432, the device's v4 only
    assert ("100.64.0.10/32", 9) in dst  # inside 100.64.0.0/10
    assert ("fd7a:115c:a1e0::a/128", 5432) not in dst


def test_autogroup_self_reaches_a_users_device_behind_another_users_gateway() -> None:
    alice = node(1, "alice")
    gateway = node(2, "bob", ("tag:gw",))
    phone = node(3, "alice", (), via=2)
    c = Compiler(POLICY, [alice, gateway, phone])
    assert c.peers(1) == {2, 3}
    rule = FRule(tuple(sorted(pfx(1) + pfx(3))), tuple((p, 0, 65535) for p in pfx(3)), ())
    assert c.filter(2) == (rule,)  # alice's sources to her phone; nothing to the tagged gateway


def test_removing_a_device_drops_its_gateway_from_those_who_saw_only_it() -> None:
    c = Compiler(POLICY, [node(1, "alice"), node(2, "carol", ("tag:gw",))])
    assert c.peers(1) == set()
    delta = c.upsert(node(3, "alice", ("tag:printer",), via=2))
    assert delta.added == {1: {2, 3}, 2: {1, 3}, 3: {1, 2}}
    assert 2 in delta.filters
    delta = c.remove(3)
    assert delta.removed == {1: {2, 3}, 2: {1, 3}}
    assert c.peers(1) == set()
    assert c.peers(2) == set()
    assert c.filter(2) == ()


USERS = ["alice", "bob", "carol"]
TAGSETS: list[tuple[str, ...]] = [(), (), ("tag:server",), ("tag:printer",), ("tag:gw",)]
op = st.tuples(
    st.sampled_from(["upsert", "remove"]),
    st.integers(1, 12),
    st.sampled_from(USERS),
    st.sampled_from(TAGSETS),
    st.sampled_from([0, 0, 1, 2]),  # nodes 1 and 2 may be gateways, never devices
)


@settings(max_examples=200, deadline=None)
@given(st.lists(op, max_size=25))
def test_incremental_equals_full_with_devices(ops: list[tuple[str, int, str, tuple[str, ...], int]]) -> None:
    c = Compiler(POLICY)
    for kind, i, user, tags, gateway in ops:
        via = 0 if i <= 2 else gateway
        before = {n: set(c.peers(n) or ()) for n in c.nodes}
        filters_before = {n: c.filter(n) for n in c.nodes}
        delta = c.upsert(node(i, user, tags, via)) if kind == "upsert" else c.remove(i)
        full = Compiler(POLICY, c.nodes.values())
        for n in c.nodes:
            assert c.peers(n) == full.peers(n)
            assert c.filter(n) == full.filter(n)
            after = set(c.peers(n) or ())
            old = before.get(n, set())
            assert delta.added.get(n, set()) == after - old
            assert delta.removed.get(n, set()) == old - after
            if n in filters_before and filters_before[n] != c.filter(n):
                assert n in delta.filters
            if c.nodes[n].via and c.nodes[n].via not in c.nodes:
                assert after == set()  # its gateway is gone: nobody reaches it
            for p in after:
                assert n in (c.peers(p) or set())  # symmetric
                if c.nodes[p].via in c.nodes:
                    assert c.nodes[p].via in after or c.nodes[p].via == n  # a device's gateway comes along


def test_a_device_whose_gateway_is_gone_is_reachable_again_when_it_returns() -> None:
    c = Compiler(POLICY, [node(1, "alice"), node(2, "carol", ("tag:gw",)), node(3, "alice", (), via=2)])
    assert c.peers(1) == {2, 3}
    delta = c.remove(2)  # the gateway expired: its device stays, reachable by no one
    assert delta.removed == {1: {2, 3}, 3: {1, 2}}
    assert c.peers(3) == set()
    assert c.peers(1) == set()
    delta = c.upsert(node(2, "carol", ("tag:gw",)))
    assert delta.added == {1: {2, 3}, 2: {1, 3}, 3: {1, 2}}
    assert c.peers(3) == {1, 2}
