"""Subnet routes: prefix validation, primary election and failover, the state facade's route changes,
auto-approvers in the policy, and the compiler treating a router's routes as its destinations."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ghostcore.errors import InvalidArgument, NotFound
from ghostcore.keys import PrivateKey
from ghostcore.policy import Compiler, NodeIdent, PolicyError, parse_policy
from ghostcore.policy.model import Principal
from ghostmesh.changes import NodeAdded, NodeChanged
from ghostmesh.mapper import Mapper, node_to_pb
from ghostmesh.routes import RouteTable, validate_prefix
from ghostmesh.state import State, StateConfig
from ghostmesh.store.base import NodeRec, RouteRec
from ghostmesh.store.sqlite import SqliteStore

T0 = 1_700_000_000.0
OVERLAY = (ipaddress.ip_network("100.64.0.0/10"), ipaddress.ip_network("fd7a:115c:a1e0::/48"))


# -- validation ------------------------------------------------------------------------------------------


def test_valid_prefixes_are_normalised() -> None:
    assert validate_prefix("10.1.1.0/24", OVERLAY) == "10.1.1.0/24"
    assert validate_prefix("2001:DB8:1:0::/64", OVERLAY) == "2001:db8:1::/64"
    assert validate_prefix("0.0.0.0/0", OVERLAY) == "0.0.0.0/0"  # exit node
    assert validate_prefix("::/0", OVERLAY) == "::/0"


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("100.64.5.0/24", "overlaps the overlay range 100.64.0.0/10"),
        ("100.0.0.0/8", "overlaps the overlay range 100.64.0.0/10"),
        ("fd7a:115c:a1e0:ab::/64", "overlaps the overlay range fd7a:115c:a1e0::/48"),
        ("10.1.1.7/24", "host bits are set; did you mean 10.1.1.0/24?"),
        ("10.1.1.0", "expected a prefix such as 10.1.1.0/24"),
        ("banana/24", "expected a prefix"),
        ("10.1.1.0/33", "expected a prefix"),
        (" 2001:db8:1::/64 ", "expected a prefix"),  # whitespace is refused, not stripped
        ("fe80::%eth0/64", "expected a prefix"),  # a zone ID
        ("10.1.1.0/24\n", "expected a prefix"),
    ],
)
def test_bad_prefixes_are_refused_in_one_line(text: str, says: str) -> None:
    with pytest.raises(InvalidArgument) as exc:
        validate_prefix(text, OVERLAY)
    assert says in str(exc.value)
    assert "\n" not in str(exc.value)


# -- election --------------------------------------------------------------------------------------------


def _served(*node_ids: int, prefix: str = "10.1.1.0/24") -> RouteTable:
    return RouteTable(RouteRec(n, prefix, by_node=True, approved=True) for n in node_ids)


def test_primary_is_stable_and_fails_over_to_the_next_online_router() -> None:
    t = _served(3, 5, 7)
    online = {5, 7}
    assert t.elect(["10.1.1.0/24"], online.__contains__) == {5}  # lowest online id
    assert t.primary_routes(5) == ("10.1.1.0/24",)
    online.add(3)
    assert t.elect(["10.1.1.0/24"], online.__contains__) == set()  # stable: 5 keeps it though 3 < 5
    online.discard(5)
    assert t.elect(["10.1.1.0/24"], online.__contains__) == {5, 3}  # failover: both routers changed
    assert t.primary("10.1.1.0/24") == 3
    assert t.primary_routes(5) == ()
    online.clear()
    assert t.elect(["10.1.1.0/24"], online.__contains__) == {3}
    assert t.primary("10.1.1.0/24") is None


def test_unapproved_or_unadvertised_routes_are_never_primary() -> None:
    t = RouteTable(
        [
            RouteRec(1, "10.1.1.0/24", by_node=True, approved=False),
            RouteRec(2, "10.1.1.0/24", by_node=False, by_admin=False, approved=True),
        ]
    )
    assert t.elect(["10.1.1.0/24"], lambda n: True) == set()
    assert t.serving("10.1.1.0/24") == []


def test_exit_prefixes_have_no_primary_and_make_an_exit_node() -> None:
    t = RouteTable([RouteRec(4, "0.0.0.0/0", by_node=True, approved=True), RouteRec(4, "::/0", by_node=True)])
    assert t.elect(["0.0.0.0/0", "::/0"], lambda n: True) == set()
    assert t.is_exit_node(4)
    assert not t.is_exit_node(5)


# -- the state facade ------------------------------------------------------------------------------------


def _state(tmp_path: Path) -> State:
    return State(SqliteStore(tmp_path / "db.sqlite"), StateConfig(), T0)


def _node(st: State, name: str) -> NodeRec:
    _, key = st.create_auth_key(reusable=True, now=T0)
    node, _ = st.register(PrivateKey.generate().public_key().base64(), key, name, T0)
    return node


def test_add_route_then_failover_is_two_node_changes(tmp_path: Path) -> None:
    st = _state(tmp_path)
    r1, r2 = _node(st, "r1"), _node(st, "r2")
    st.connect(r1.id, T0)
    st.connect(r2.id, T0)
    rec, changed, changes = st.add_route("r1", "10.1.1.0/24")
    assert changed
    assert rec == RouteRec(r1.id, "10.1.1.0/24", by_admin=True, approved=True)
    assert [(c.node.name, c.node.primary_routes) for c in changes if isinstance(c, NodeChanged)] == [
        ("r1", ("10.1.1.0/24",))
    ]
    _, changed, changes = st.add_route("r2", "10.1.1.0/24")
    assert changed
    # standby: r2 serves but r1 stays primary; r2 changes only as a router the policy sees (approved)
    assert [(c.node.name, c.node.primary_routes, c.node.approved_routes) for c in changes] == [
        ("r2", (), ("10.1.1.0/24",))
    ]
    changes = st.disconnect(r1.id, T0 + 1)
    got = {c.node.name: (c.online, c.node.primary_routes) for c in changes if isinstance(c, NodeChanged)}
    assert got == {"r1": (False, ()), "r2": (True, ("10.1.1.0/24",))}
    rows = {(n.name, r.prefix, p) for n, r, p in st.list_routes()}
    assert rows == {("r1", "10.1.1.0/24", False), ("r2", "10.1.1.0/24", True)}
    # what peers get: the prefix in the new primary's allowed_ips
    msg = node_to_pb(st.resolve("r2"), True)
    assert "10.1.1.0/24" in msg.allowed_ips
    assert list(msg.primary_routes) == ["10.1.1.0/24"]
    # the rows survive a restart; primaries are elected again as routers come online
    st.store.close()
    st2 = _state(tmp_path)
    assert {(n.name, p) for n, _, p in st2.list_routes()} == {("r1", False), ("r2", False)}
    st2.connect(r2.id, T0 + 2)
    assert st2.resolve("r2").primary_routes == ("10.1.1.0/24",)


def test_overlapping_route_changes_nothing(tmp_path: Path) -> None:
    st = _state(tmp_path)
    _node(st, "r1")
    with pytest.raises(InvalidArgument, match="overlaps the overlay range"):
        st.add_route("r1", "100.64.0.0/16")
    assert st.list_routes() == []
    assert st.store.list_routes() == []


def test_advertise_approve_withdraw_and_delete(tmp_path: Path) -> None:
    st = _state(tmp_path)
    r1 = _node(st, "r1")
    st.connect(r1.id, T0)
    added, gone, changes = st.advertise_routes(r1.id, ["10.2.0.0/16"], False)
    assert [r.prefix for r in added] == ["10.2.0.0/16"]
    assert gone == []
    assert changes == []
    with pytest.raises(NotFound, match=r"does not advertise 10\.9\.0\.0/16"):
        st.approve_route("r1", "10.9.0.0/16")
    _, _, changes = st.approve_route("r1", "10.2.0.0/16")
    assert st.resolve("r1").primary_routes == ("10.2.0.0/16",)
    assert len(changes) == 1
    assert st.advertise_routes(r1.id, ["10.2.0.0/16"], False) == ([], [], [])  # same set: nothing
    _, gone, changes = st.advertise_routes(r1.id, [], False)
    assert [r.prefix for r in gone] == ["10.2.0.0/16"]
    assert st.resolve("r1").primary_routes == ()  # still approved, no longer advertised
    _, _ = st.delete_route("r1", "10.2.0.0/16")
    assert st.list_routes() == []
    with pytest.raises(InvalidArgument, match="advertise-exit-node"):
        st.advertise_routes(r1.id, ["0.0.0.0/0"], False)
    added, _, _ = st.advertise_routes(r1.id, [], True, auto_approve=lambda n, p: True)
    assert {r.prefix for r in added} == {"0.0.0.0/0", "::/0"}
    assert st.resolve("r1").exit_node


def test_deleting_a_primary_router_fails_over(tmp_path: Path) -> None:
    st = _state(tmp_path)
    r1, r2 = _node(st, "r1"), _node(st, "r2")
    for r in (r1, r2):
        st.connect(r.id, T0)
        st.add_route(r.name, "10.1.1.0/24")
    changes = st.delete_node("r1")
    assert [c.node.name for c in changes if isinstance(c, NodeChanged)] == ["r2"]
    assert st.resolve("r2").primary_routes == ("10.1.1.0/24",)


# -- policy: auto-approvers and routes as destinations --------------------------------------------------

AUTO = """
[groups]
"group:ops" = ["olga"]

[tag_owners]
"tag:router" = ["olga"]
"tag:exit" = ["olga"]

[auto_approvers]
routes = { "10.1.0.0/16" = ["tag:router", "group:ops"] }
exit_node = ["tag:exit"]
"""


def test_auto_approvers() -> None:
    p = parse_policy(AUTO)
    router = Principal(None, frozenset({"tag:router"}))
    olga = Principal("olga", frozenset())
    assert p.auto_approves(router, "10.1.0.0/16")
    assert p.auto_approves(olga, "10.1.7.0/24")  # a narrower prefix is approved too
    assert not p.auto_approves(router, "10.0.0.0/8")  # wider: no
    assert not p.auto_approves(router, "0.0.0.0/0")
    assert p.auto_approves(Principal(None, frozenset({"tag:exit"})), "::/0")


def test_auto_approvers_errors_name_key_paths() -> None:
    bad = AUTO.replace('"10.1.0.0/16" = ["tag:router"', '"10.1.0.1/16" = ["tag:nope"').replace(
        'exit_node = ["tag:exit"]', 'exit_node = ["tag:exit", "*"]\nfoo = 1'
    )
    with pytest.raises(PolicyError) as exc:
        parse_policy(bad)
    errs = exc.value.errors
    assert any(
        e.startswith(
            "auto_approvers.routes.\"10.1.0.1/16\": invalid prefix '10.1.0.1/16': expected a prefix "
            "without host bits, e.g. 10.1.0.0/16"
        )
        for e in errs
    )
    assert any(e.startswith("auto_approvers.exit_node[1]:") for e in errs)
    assert any(e.startswith("auto_approvers.foo: unknown key") for e in errs)


ROUTE_POLICY = parse_policy(
    """
[groups]
"group:eng" = ["alice"]

[tag_owners]
"tag:router" = ["alice"]

[hosts]
lab = "10.1.1.0/24"

[[acls]]
action = "accept"
src = ["group:eng"]
dst = ["lab:22,80"]

[[acls]]
action = "accept"
src = ["bob"]
dst = ["10.1.1.5:443", "10.0.0.0/8:53"]
proto = "udp"
"""
)


def ident(i: int, user: str, tags: tuple[str, ...] = (), routes: tuple[str, ...] = ()) -> NodeIdent:
    addrs = (ipaddress.ip_address(f"100.64.0.{i}"), ipaddress.ip_address(f"fd7a:115c:a1e0::{i:x}"))
    nets = tuple(ipaddress.ip_network(r) for r in routes)
    return NodeIdent(i, user, frozenset(tags), addrs, f"n{i}", nets)


def test_a_route_makes_its_router_a_destination() -> None:
    c = Compiler(ROUTE_POLICY, [ident(1, "alice"), ident(2, "bob"), ident(3, "carol", ("tag:router",))])
    assert c.peers(1) == set()
    assert c.filter(3) == ()
    delta = c.upsert(ident(3, "carol", ("tag:router",), ("10.1.1.0/24",)))
    assert delta.added == {3: {1, 2}, 1: {3}, 2: {3}}  # both rules' sources now see the router
    f = c.filter(3)
    assert [(r.src, r.dst, r.protos) for r in f] == [
        (("100.64.0.1/32", "fd7a:115c:a1e0::1/128"), (("10.1.1.0/24", 22, 22), ("10.1.1.0/24", 80, 80)), ()),
        # the overlaps with the route, never the wider 10.0.0.0/8
        (("100.64.0.2/32", "fd7a:115c:a1e0::2/128"), (("10.1.1.5/32", 443, 443),), ("udp",)),
        (("100.64.0.2/32", "fd7a:115c:a1e0::2/128"), (("10.1.1.0/24", 53, 53),), ("udp",)),
    ]
    assert c.filter(1) == ()
    assert c.filter(2) == ()
    # failover: the route moves to another router; the old one drops out of the sources' views
    c.upsert(ident(3, "carol", ("tag:router",)))
    c.upsert(ident(4, "dave", ("tag:router",), ("10.1.1.0/24",)))
    assert c.peers(1) == {4}
    assert c.filter(3) == ()
    assert c.filter(4)[0].dst[0] == ("10.1.1.0/24", 22, 22)


def test_star_destination_covers_routes() -> None:
    p = parse_policy('[[acls]]\naction = "accept"\nsrc = ["*"]\ndst = ["*:*"]\n')
    c = Compiler(p, [ident(1, "alice", routes=("192.168.7.0/24",))])
    assert ("192.168.7.0/24", 0, 65535) in c.filter(1)[0].dst


def test_mapper_sends_the_new_primary_to_the_sources_only() -> None:
    m = Mapper(keepalive_seconds=25, policy=ROUTE_POLICY)

    def rec(i: int, user: str, routes: tuple[str, ...] = ()) -> NodeRec:
        return NodeRec(
            i, f"n{i}", user, PrivateKey.generate().public_key().base64(), f"100.64.0.{i}",
            f"fd7a:115c:a1e0::{i:x}", False, ("tag:router",) if user == "carol" else (), T0, 0.0, T0, (),
            f"n{i}", None, primary_routes=routes,
        )  # fmt: skip

    m.load(
        [NodeAdded(rec(1, "alice"), True), NodeAdded(rec(2, "carol"), True), NodeAdded(rec(3, "eve"), True)],
        T0,
    )
    s1 = m.open_stream(1, 1)
    s3 = m.open_stream(3, 3)
    assert len(s1.peers_upserted) == 0
    assert len(s3.peers_upserted) == 0
    m.open_stream(2, 2)
    m.apply(NodeChanged(rec(2, "carol", ("10.1.1.0/24",)), True), T0)
    up = m.flush(1)
    assert up is not None
    assert [p.name for p in up.peers_upserted] == ["n2"]
    assert "10.1.1.0/24" in up.peers_upserted[0].allowed_ips
    assert m.flush(3) is None  # eve may not reach the LAN: she never hears of the router
    own = m.flush(2)
    assert own is not None
    assert [r.dst[0].prefix for r in own.filter.rules] == ["10.1.1.0/24"]


# -- incremental == full, with routes moving between routers -------------------------------------------

ROUTES = [(), ("10.1.1.0/24",), ("10.0.0.0/8",), ("10.1.1.0/24", "192.168.0.0/16")]
op = st.tuples(
    st.sampled_from(["upsert", "remove"]),
    st.integers(1, 8),
    st.sampled_from(["alice", "bob", "carol"]),
    st.sampled_from(ROUTES),
    st.booleans(),
)
PROP_POLICY = parse_policy(
    ROUTE_POLICY.text + '\n[[acls]]\naction = "accept"\nsrc = ["carol"]\ndst = ["autogroup:internet:*"]\n'
)


@settings(max_examples=150, deadline=None)
@given(st.lists(op, max_size=20))
def test_incremental_equals_full_with_routes(ops: list[tuple[str, int, str, tuple[str, ...], bool]]) -> None:
    c = Compiler(PROP_POLICY)
    for kind, i, user, routes, exit_node in ops:
        before = {n: set(c.peers(n) or ()) for n in c.nodes}
        filters_before = {n: c.filter(n) for n in c.nodes}
        n_ident = NodeIdent(
            i,
            user,
            frozenset(),
            ident(i, user).addrs,
            f"n{i}",
            ident(i, user, routes=routes).routes,
            exit_node,
        )
        delta = c.upsert(n_ident) if kind == "upsert" else c.remove(i)
        full = Compiler(PROP_POLICY, c.nodes.values())
        for n in c.nodes:
            assert c.peers(n) == full.peers(n)
            assert c.filter(n) == full.filter(n)
            after = set(c.peers(n) or ())
            assert delta.added.get(n, set()) == after - before.get(n, set())
            assert delta.removed.get(n, set()) == before.get(n, set()) - after
            if n in filters_before and filters_before[n] != c.filter(n):
                assert n in delta.filters


def test_autogroup_internet_selects_exit_nodes_only() -> None:
    p = parse_policy('[[acls]]\naction = "accept"\nsrc = ["alice"]\ndst = ["autogroup:internet:*"]\n')
    ex = NodeIdent(2, "erin", frozenset(), (ipaddress.ip_address("100.64.0.2"),), "ex", (), exit_node=True)
    c = Compiler(p, [ident(1, "alice"), ident(3, "bob"), ex])
    assert c.peers(1) == {2}
    assert c.peers(3) == set()
    assert c.filter(2)[0].dst == (("0.0.0.0/0", 0, 65535), ("::/0", 0, 65535))
    delta = c.upsert(NodeIdent(2, "erin", frozenset(), ex.addrs, "ex", (), exit_node=False))
    assert delta.removed == {2: {1}, 1: {2}}  # no longer an exit node: alice loses it
    with pytest.raises(PolicyError, match="only allowed in dst"):
        parse_policy('[[acls]]\naction = "accept"\nsrc = ["autogroup:internet"]\ndst = ["*:*"]\n')


def test_an_exit_node_is_both_default_prefixes(tmp_path: Path) -> None:
    st = _state(tmp_path)
    ex = _node(st, "ex")
    rec, changed, changes = st.add_route("ex", "0.0.0.0/0")
    assert rec.prefix == "0.0.0.0/0"
    assert changed
    assert {(r.prefix, r.approved) for _, r, _ in st.list_routes()} == {("0.0.0.0/0", True), ("::/0", True)}
    assert [c.node.exit_node for c in changes if isinstance(c, NodeChanged)] == [True]
    assert "::/0" in node_to_pb(st.resolve("ex"), False).allowed_ips
    _, changes = st.delete_route("ex", "::/0")
    assert st.list_routes() == []
    assert not st.resolve("ex").exit_node
    assert len(changes) == 1
    # a node's own advertisement: approving one prefix approves both
    st.advertise_routes(ex.id, [], True)
    st.approve_route("ex", "::/0")
    assert all(r.approved for _, r, _ in st.list_routes())
