"""The mapper with an ACL policy: full maps hold only visible peers plus the filter, a change reaches only
the sessions that see the node, policy and tag changes become exact upserts/removals and filter updates."""

from __future__ import annotations

from dataclasses import replace

from ghostcore.pb.ghostmesh.v1 import coordination_pb2 as pb
from ghostcore.policy import parse_policy
from ghostmesh.changes import NodeAdded, NodeChanged, NodeRemoved
from ghostmesh.mapper import Mapper
from ghostmesh.store.base import NodeRec

NOW = 1000.0
POLICY = """
[groups]
"group:eng" = ["alice"]
[tag_owners]
"tag:server" = ["group:eng"]
[[acls]]
action = "accept"
src = ["group:eng"]
dst = ["tag:server:22"]
"""
WITH_BOB = POLICY.replace('["alice"]', '["alice", "bob"]', 1)


def rec(i: int, user: str, tags: tuple[str, ...] = ()) -> NodeRec:
    return NodeRec(
        id=i,
        name=f"n{i}",
        user=user,
        node_key=f"key{i}",
        ipv4=f"100.64.0.{i}",
        ipv6=f"fd7a:115c:a1e0::{i:x}",
        ephemeral=False,
        tags=tags,
        created=0.0,
        expires=0.0,
        last_seen=0.0,
        endpoints=(),
        hostname="h",
        auth_key_id=None,
    )


A, B, S = rec(1, "alice"), rec(2, "bob"), rec(3, "carol", ("tag:server",))


def setup() -> Mapper:
    m = Mapper(25, parse_policy(POLICY))
    m.load([NodeAdded(A, True), NodeAdded(B, True), NodeAdded(S, True)], NOW)
    for sid, node in ((10, A), (20, B), (30, S)):
        m.open_stream(sid, node.id)
    return m


def ids(u: pb.MapUpdate | None) -> set[int]:
    assert u is not None
    return {p.id for p in u.peers_upserted}


def test_full_maps_hold_visible_peers_and_filter() -> None:
    m = Mapper(25, parse_policy(POLICY))
    m.load([NodeAdded(A, True), NodeAdded(B, True), NodeAdded(S, True)], NOW)
    assert ids(m.open_stream(1, A.id)) == {S.id}
    assert ids(m.open_stream(2, B.id)) == set()
    full_s = m.open_stream(3, S.id)
    assert ids(full_s) == {A.id}
    assert list(full_s.filter.rules[0].src) == ["100.64.0.1/32", "fd7a:115c:a1e0::1/128"]


def test_a_change_reaches_only_sessions_that_see_the_node() -> None:
    m = setup()
    assert m.apply(NodeChanged(replace(B, endpoints=("192.0.2.1:1",)), True), NOW) == [20]  # own stream only
    assert m.flush(10) is None
    assert m.flush(20) is not None  # its own record (self)
    assert sorted(m.apply(NodeChanged(S, False), NOW)) == [10, 30]
    assert ids(m.flush(10)) == {S.id}
    assert m.flush(20) is None


def test_policy_change_is_exact_deltas() -> None:
    m = setup()
    touched = set(m.set_policy(parse_policy(WITH_BOB)))
    assert touched == {20, 30}
    ub, us = m.flush(20), m.flush(30)
    assert ids(ub) == {S.id}
    assert ids(us) == {B.id}
    assert us is not None
    assert us.HasField("filter")
    assert "100.64.0.2/32" in us.filter.rules[0].src
    assert m.flush(10) is None
    m.set_policy(None)  # back to allow-all: bob and alice meet, everyone's filter accepts everything
    ua = m.flush(10)
    assert ids(ua) == {B.id}
    assert ua is not None
    assert list(ua.filter.rules[0].src) == ["0.0.0.0/0", "::/0"]


def test_tag_change_add_and_remove() -> None:
    m = setup()
    m.apply(NodeChanged(replace(B, tags=("tag:server",)), True), NOW)  # bob's node becomes a server
    assert ids(m.flush(10)) == {B.id}  # alice may now reach it
    ub = m.flush(20)
    assert ids(ub) == {A.id}
    assert ub is not None
    assert ub.HasField("filter")
    m.apply(NodeAdded(rec(4, "alice"), False), NOW)
    assert ids(m.flush(30)) == {4}
    assert m.flush(20) is not None  # the server-tagged bob node sees the new alice node too
    m.apply(NodeRemoved(S.id, "deleted"), NOW)
    u = m.flush(10)
    assert u is not None
    assert list(u.peers_removed) == [S.id]
    assert m.session(30) is not None
    assert m.session(30).ended == "deleted"  # type: ignore[union-attr]
