"""The reconcile core: NetMap folding MapUpdates, desired state, and plans of differences only."""

from __future__ import annotations

import pytest

from ghostcore.errors import ProtocolError
from ghostcore.keys import PrivateKey
from ghostcore.pb.ghostmesh.v1 import coordination_pb2 as pb
from ghostlink import engine
from ghostlink.engine import DesiredState, NetMap, PeerSpec, desired_state, plan
from ghostlink.wg.base import changes_for

KEYS = [PrivateKey.generate().public_key().base64() for _ in range(5)]


def node(i: int, *, endpoints: tuple[str, ...] = (), extra: tuple[str, ...] = ()) -> pb.Node:
    return pb.Node(
        id=i,
        name=f"n{i}",
        node_key=KEYS[i],
        addresses=[f"100.64.0.{i}", f"fd7a:115c:a1e0::{i}"],
        allowed_ips=[f"100.64.0.{i}/32", f"fd7a:115c:a1e0::{i}/128", *extra],
        endpoints=list(endpoints),
        online=True,
    )


def full(serial: int = 1, peers: tuple[int, ...] = (1, 2)) -> pb.MapUpdate:
    return pb.MapUpdate(
        serial=serial, full=True, self=node(0), peers_upserted=[node(i) for i in peers], keepalive_seconds=25
    )


def test_full_map_then_deltas() -> None:
    nm = NetMap()
    nm.apply(full())
    assert set(nm.peers) == {1, 2}
    assert nm.self_node is not None
    assert nm.self_node.name == "n0"
    nm.apply(pb.MapUpdate(serial=2, peers_upserted=[node(3)]))
    nm.apply(pb.MapUpdate(serial=3, peers_removed=[1]))
    assert set(nm.peers) == {2, 3}
    nm.apply(full(serial=4, peers=(4,)))  # a full map replaces everything
    assert set(nm.peers) == {4}
    assert nm.serial == 4


def test_serial_must_increase() -> None:
    nm = NetMap()
    nm.apply(full(serial=5))
    with pytest.raises(ProtocolError, match="serial"):
        nm.apply(pb.MapUpdate(serial=5))
    with pytest.raises(ProtocolError, match="serial"):
        nm.apply(pb.MapUpdate(serial=3))


def test_delta_before_full_and_full_without_self_are_refused() -> None:
    with pytest.raises(ProtocolError, match="before the full map"):
        NetMap().apply(pb.MapUpdate(serial=1, peers_upserted=[node(1)]))
    with pytest.raises(ProtocolError, match="self"):
        NetMap().apply(pb.MapUpdate(serial=1, full=True))


def test_new_stream_restarts_serials_but_keeps_the_map() -> None:
    nm = NetMap()
    nm.apply(full(serial=1))
    nm.apply(pb.MapUpdate(serial=2, peers_upserted=[node(3)]))
    nm.begin_stream()
    assert set(nm.peers) == {1, 2, 3}, "the last map stays while reconnecting"
    nm.apply(full(serial=1))
    assert set(nm.peers) == {1, 2}


def test_desired_state() -> None:
    nm = NetMap()
    nm.apply(full(peers=(1,)))
    nm.apply(
        pb.MapUpdate(
            serial=2,
            peers_upserted=[node(2, endpoints=("192.0.2.2:41641", "198.51.100.2:1"), extra=("10.1.1.0/24",))],
        )
    )
    d = desired_state(nm)
    assert d.addresses == {"100.64.0.0/32", "fd7a:115c:a1e0::/128"}
    assert set(d.peers) == {KEYS[1], KEYS[2]}
    assert d.peers[KEYS[1]].endpoint is None
    assert d.peers[KEYS[2]].endpoint == "192.0.2.2:41641", "the first reported endpoint"
    assert d.peers[KEYS[2]].allowed_ips == ("10.1.1.0/24", "100.64.0.2/32", "fd7a:115c:a1e0::2/128")
    assert d.peers[KEYS[2]].keepalive == 25
    assert "10.1.1.0/24" in d.routes
    assert "fd7a:115c:a1e0::1/128" in d.routes
    assert len(d.routes) == 5


def test_desired_state_skips_self_and_invalid_keys() -> None:
    nm = NetMap()
    bad = pb.Node(id=7, node_key="not-a-key", allowed_ips=["100.64.0.7/32"])
    me_again = pb.Node(id=8, node_key=KEYS[0], allowed_ips=["100.64.0.8/32"])
    nm.apply(pb.MapUpdate(serial=1, full=True, self=node(0), peers_upserted=[bad, me_again, node(1)]))
    assert set(desired_state(nm).peers) == {KEYS[1]}


def spec(i: int, **kw: object) -> PeerSpec:
    base: dict[str, object] = {
        "public_key": KEYS[i],
        "allowed_ips": (f"100.64.0.{i}/32",),
        "endpoint": None,
        "keepalive": 25,
    }
    base.update(kw)
    return PeerSpec(**base)  # type: ignore[arg-type]


def state(*specs: PeerSpec, addrs: tuple[str, ...] = ("100.64.0.0/32",)) -> DesiredState:
    return DesiredState(
        addresses=frozenset(addrs),
        peers={s.public_key: s for s in specs},
        routes=frozenset(a for s in specs for a in s.allowed_ips),
    )


def test_plan_unchanged_is_empty() -> None:
    s = state(spec(1), spec(2))
    p = plan(s, s)
    assert p.empty
    assert changes_for(p) == []


def test_plan_adding_one_peer_touches_only_it() -> None:
    cur = state(spec(1), spec(2))
    p = plan(cur, state(spec(1), spec(2), spec(3)))
    assert [s.public_key for s in p.peers_add] == [KEYS[3]]
    assert p.peers_update == ()
    assert p.peers_remove == ()
    assert p.routes_add == ("100.64.0.3/32",)
    assert p.routes_remove == ()
    assert p.touched_peers() == {KEYS[3]}
    assert p.addresses_add == p.addresses_remove == ()


def test_plan_update_names_changed_fields_only() -> None:
    cur = state(spec(1), spec(2, endpoint="192.0.2.2:1"))
    want = state(
        spec(1, keepalive=10), spec(2, endpoint="192.0.2.2:2", allowed_ips=("100.64.0.2/32", "10.0.0.0/8"))
    )
    p = plan(cur, want)
    fields = {u.spec.public_key: u.fields for u in p.peers_update}
    assert fields == {KEYS[1]: {"keepalive"}, KEYS[2]: {"endpoint", "allowed_ips"}}
    assert p.routes_add == ("10.0.0.0/8",)
    by_key = {c.public_key: c for c in changes_for(p)}
    assert by_key[KEYS[1]].allowed_ips is None
    assert by_key[KEYS[1]].endpoint is None
    assert by_key[KEYS[1]].keepalive == 10
    assert not by_key[KEYS[1]].create
    assert by_key[KEYS[2]].allowed_ips == ("100.64.0.2/32", "10.0.0.0/8")


def test_plan_endpoint_becoming_unknown_is_not_a_change() -> None:
    cur = state(spec(1, endpoint="192.0.2.1:5"))
    p = plan(cur, state(spec(1)))
    assert p.empty
    assert engine.applied_after(cur, p).peers[KEYS[1]].endpoint == "192.0.2.1:5"


def test_plan_remove_and_addresses() -> None:
    cur = state(spec(1), spec(2), addrs=("100.64.0.9/32",))
    p = plan(cur, state(spec(1), addrs=("100.64.0.0/32",)))
    assert p.peers_remove == (KEYS[2],)
    assert p.routes_remove == ("100.64.0.2/32",)
    assert (p.addresses_add, p.addresses_remove) == (("100.64.0.0/32",), ("100.64.0.9/32",))
    assert changes_for(p)[0].remove


def test_applied_after_converges() -> None:
    cur = state(spec(1), spec(2))
    want = state(spec(2, keepalive=5), spec(3, endpoint="192.0.2.3:41641"), addrs=("100.64.0.1/32",))
    after = engine.applied_after(cur, plan(cur, want))
    assert after == want
    assert plan(after, want).empty


def test_a_peer_gets_its_keepalive_with_its_first_endpoint() -> None:
    """WireGuard initiates a handshake when a keepalive is switched on: with no endpoint yet it would be
    lost, and the next one would wait 5 s (REKEY_TIMEOUT)."""
    p = plan(DesiredState(), state(spec(1)))
    assert [(a.endpoint, a.keepalive) for a in p.peers_add] == [(None, 0)]
    after = engine.applied_after(DesiredState(), p)
    assert plan(after, state(spec(1))).empty  # still no endpoint: nothing to arm yet
    p = plan(after, state(spec(1, endpoint="192.0.2.1:41641")))
    (u,) = p.peers_update
    assert u.fields == {"endpoint", "keepalive"}
    assert (u.spec.endpoint, u.spec.keepalive) == ("192.0.2.1:41641", 25)
    (c,) = changes_for(p)
    assert (c.endpoint, c.keepalive) == ("192.0.2.1:41641", 25)  # one UAPI peer block: both at once
    after = engine.applied_after(after, p)
    assert after == state(spec(1, endpoint="192.0.2.1:41641"))
    assert plan(after, state(spec(1))).empty  # the endpoint unknown again: the keepalive stays


def test_a_device_dials_in_and_keeps_its_keepalive_without_an_endpoint() -> None:
    device = spec(1, dials_in=True)
    p = plan(DesiredState(), state(device))
    assert [(a.endpoint, a.keepalive) for a in p.peers_add] == [(None, 25)]


def test_a_replaced_peer_is_added_before_the_old_one_is_removed() -> None:
    """Key rotation: the new key takes the allowed IPs before the old key goes, so no packet finds no peer."""
    old, new = spec(1), spec(3, allowed_ips=("100.64.0.1/32",))
    moved_from, moved_to = spec(2, allowed_ips=("10.1.1.0/24",)), spec(4)
    p = plan(
        state(old, moved_from, spec(4)),
        state(new, spec(2, allowed_ips=()), spec(4, allowed_ips=("10.1.1.0/24",))),
    )
    order = [(c.public_key, c.remove) for c in changes_for(p)]
    assert order[0] == (KEYS[3], False)  # the new peer first
    assert order[-1] == (KEYS[1], True)  # the old one last
    assert [k for k, removed in order if removed] == [KEYS[1]]
    assert moved_to.public_key in [
        k for k, _ in order[:-1]
    ]  # the failover target is updated before any removal
    assert moved_from.public_key in [k for k, _ in order[:-1]]
