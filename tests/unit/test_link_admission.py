"""ghostlink.admission and ghostlink.trust: what a node installs of a map ghostmesh (or an attacker) wrote.

Each case builds a map as a hostile coordinator would and checks that exactly the bad part is refused
(with a reason) while the rest of the map still applies. The property at the end feeds arbitrary maps
through admission, the engine, the UAPI encoder and the nft renderer.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ghostcore import lock
from ghostcore.addr import parse_endpoint, parse_prefix
from ghostcore.errors import PermissionDenied
from ghostcore.keys import PrivateKey
from ghostlink import engine, nft
from ghostlink.admission import Policy, SeqMemory, admit
from ghostlink.engine import FilterSpec, NetMap, NodeInfo, RegionInfo, RelayInfo
from ghostlink.trust import NodeTrust
from ghostlink.wg import base as wgbase
from ghostlink.wg.uapi_codec import encode_set

ME = PrivateKey.generate().public_key().base64()
PIN = b"p" * 32
STATIC = PrivateKey.generate().public_key().raw


def _key() -> str:
    return PrivateKey.generate().public_key().base64()


def _peer(pid: int, **kw: object) -> NodeInfo:
    v4, v6 = f"100.64.0.{pid}", f"fd7a:115c:a1e0::{pid:x}"
    base: dict[str, object] = {
        "id": pid,
        "name": f"p{pid}",
        "user": "u",
        "node_key": _key(),
        "addresses": (v4, v6),
        "allowed_ips": (f"{v4}/32", f"{v6}/128"),
        "endpoints": (f"198.51.100.{pid}:41641",),
        "online": True,
        "last_seen_unix": 0,
        "expires_unix": 0,
    }
    base.update(kw)
    return NodeInfo(**base)  # type: ignore[arg-type]


def _map(*peers: NodeInfo) -> NetMap:
    me = NodeInfo(1, "me", "u", ME, ("100.64.0.1", "fd7a:115c:a1e0::1"), (), (), True, 0, 0)
    return NetMap(self_node=me, peers={p.id: p for p in peers})


def _admit(nm: NetMap, policy: Policy | None = None) -> tuple[NetMap, list[str]]:
    out, refused = admit(nm, policy or Policy(), None, SeqMemory())
    return out, [r.line() for r in refused]


def test_a_clean_map_is_admitted_whole() -> None:
    nm = _map(_peer(2), _peer(3))
    out, refused = _admit(nm)
    assert refused == []
    assert out.peers == nm.peers


def test_zone_id_endpoint_refuses_that_peer_only() -> None:
    bad = _peer(2, endpoints=("[fe80::1%x\nremove=true]:41641",))
    out, refused = _admit(_map(bad, _peer(3)))
    assert list(out.peers) == [3]
    assert len(refused) == 1
    assert refused[0].startswith("p2: peer: malformed record")
    assert "\n" not in refused[0]


def test_split_default_halves_from_a_non_exit_peer_are_refused() -> None:
    p = _peer(2)
    p = _peer(2, allowed_ips=(*p.allowed_ips, "0.0.0.0/1", "128.0.0.0/1"), primary_routes=("0.0.0.0/1",))
    for policy in (Policy(), Policy(accept_routes=True)):
        out, refused = _admit(_map(p), policy)
        assert out.peers[2].allowed_ips == ("100.64.0.2/32", "fd7a:115c:a1e0::2/128")
        assert len(refused) == 2


def test_default_route_only_from_the_chosen_exit_node() -> None:
    exit_prefixes = ("0.0.0.0/0", "::/0")
    x = _peer(2, exit_node=True)
    x = _peer(2, exit_node=True, allowed_ips=(*x.allowed_ips, *exit_prefixes))
    y = _peer(3)
    y = _peer(3, allowed_ips=(*y.allowed_ips, "0.0.0.0/0"))  # not an exit node at all
    out, refused = _admit(_map(x, y), Policy(exit_node="p2"))
    assert set(exit_prefixes) <= set(out.peers[2].allowed_ips)
    assert "0.0.0.0/0" not in out.peers[3].allowed_ips
    assert refused == ["p3: allowed IP 0.0.0.0/0: only the exit node this node chose carries it"]
    out, refused = _admit(_map(x), Policy())  # an exit node nobody chose: not installed, not a refusal
    assert "0.0.0.0/0" not in out.peers[2].allowed_ips
    assert refused == []


def test_subnet_routes_need_opt_in_and_approval() -> None:
    p = _peer(2)
    routed = _peer(
        2, allowed_ips=(*p.allowed_ips, "10.1.1.0/24", "10.9.0.0/16"), primary_routes=("10.1.1.0/24",)
    )
    out, refused = _admit(_map(routed))
    assert "10.1.1.0/24" not in out.peers[2].allowed_ips
    assert any("does not accept routes" in r for r in refused)
    out, refused = _admit(_map(routed), Policy(accept_routes=True))
    assert "10.1.1.0/24" in out.peers[2].allowed_ips
    assert "10.9.0.0/16" not in out.peers[2].allowed_ips  # unapproved: not a primary route of the peer
    assert refused == ["p2: allowed IP 10.9.0.0/16: ghostmesh does not name this peer its router for it"]


def test_internet_scale_routes_and_covering_sets_are_refused() -> None:
    wide = _peer(2)
    wide = _peer(2, allowed_ips=(*wide.allowed_ips, "8.0.0.0/7"), primary_routes=("8.0.0.0/7",))
    out, refused = _admit(_map(wide), Policy(accept_routes=True))
    assert "8.0.0.0/7" not in out.peers[2].allowed_ips
    assert "wider than /8" in refused[0]
    # 256 /8s from two peers (one of them, 100/8, covering this node's own address) cover nearly
    # everything together: all of them are refused
    halves = [[f"{i}.0.0.0/8" for i in range(128)], [f"{i}.0.0.0/8" for i in range(128, 256)]]
    peers = []
    for pid, routes in ((2, halves[0]), (3, halves[1])):
        p = _peer(pid)
        peers.append(_peer(pid, allowed_ips=(*p.allowed_ips, *routes), primary_routes=tuple(routes)))
    out, refused = _admit(_map(*peers), Policy(accept_routes=True))
    assert all(parse_prefix(a).prefixlen >= 32 for p in out.peers.values() for a in p.allowed_ips if "." in a)
    assert len(refused) == 256


def test_a_route_covering_our_own_address_is_refused() -> None:
    p = _peer(2)
    p = _peer(2, allowed_ips=(*p.allowed_ips, "100.64.0.0/24"), primary_routes=("100.64.0.0/24",))
    out, refused = _admit(_map(p), Policy(accept_routes=True))
    assert "100.64.0.0/24" not in out.peers[2].allowed_ips
    assert "own address" in refused[0]


def test_stolen_addresses_and_keys_are_refused() -> None:
    mine = _peer(2, addresses=("100.64.0.1",), allowed_ips=("100.64.0.1/32",))  # our own address
    first = _peer(3)
    thief = _peer(4, addresses=("100.64.0.3",), allowed_ips=("100.64.0.3/32",))  # peer 3's address
    same_key = _peer(5, node_key=first.node_key)
    ourselves = _peer(6, node_key=ME)
    loopback = _peer(7, addresses=("127.0.0.1",), allowed_ips=("127.0.0.1/32",))
    out, refused = _admit(_map(mine, first, thief, same_key, ourselves, loopback))
    assert out.peers[2].allowed_ips == ()
    assert out.peers[3].allowed_ips == first.allowed_ips
    assert out.peers[4].allowed_ips == ()
    assert out.peers[7].allowed_ips == ()
    assert 5 not in out.peers
    assert 6 not in out.peers
    assert len(refused) == 5


def test_bad_filter_rules_and_relay_regions_are_dropped() -> None:
    nm = _map(_peer(2))
    nm.filter = (
        FilterSpec(("100.64.0.2/32",), (("100.64.0.1/32", 22, 22),), ("tcp",)),
        FilterSpec(("100.64.0.2/32",), (("100.64.0.1/32\naccept", 0, 65535),), ()),
        FilterSpec(("fe80::%eth0/64",), (("100.64.0.1/32", 0, 65535),), ()),
        FilterSpec(("100.64.0.2/32",), (("100.64.0.1/32", 0, 70000),), ()),
        FilterSpec(("100.64.0.2/32",), (("100.64.0.1/32", 0, 1),), ("sctp; drop",)),
    )
    nm.relay = RelayInfo(
        (
            RegionInfo(1, "a", "192.0.2.7", 3478, 3479, 3478, True, PIN),
            RegionInfo(2, "b", "evil\n", 1, 1, 1, True, PIN),
            RegionInfo(3, "c", "192.0.2.8", 3478, 3479, 3478, True),  # relay ports, no pin
            RegionInfo(4, "d", "192.0.2.9", 3478, 0, 0, True),  # STUN/TURN only: no pin needed
        ),
        "u",
        "p",
        relay_static_key=STATIC,
    )
    out, refused = _admit(nm)
    assert out.filter == nm.filter[:1]
    assert out.relay is not None
    assert [g.id for g in out.relay.regions] == [1, 4]
    assert len(refused) == 6


@pytest.mark.parametrize("static", [b"", b"x" * 31, b"x" * 33])
def test_relay_ports_need_the_relay_static_key(static: bytes) -> None:
    nm = _map(_peer(2))
    nm.relay = RelayInfo(
        (
            RegionInfo(1, "a", "192.0.2.7", 3478, 3479, 3478, True, PIN),
            RegionInfo(2, "b", "192.0.2.8", 3478, 0, 0, True),
        ),
        "u",
        "p",
        relay_static_key=static,
    )
    out, refused = _admit(nm)
    assert out.relay is not None
    assert [g.id for g in out.relay.regions] == [2]
    assert "relay static key" in refused[0]


# ----- node-key signing


def _signed_peer(pid: int, admin: lock.SigningKey, rotation: lock.SigningKey) -> tuple[NodeInfo, PrivateKey]:
    wg = PrivateKey.generate()
    sig = lock.sign_direct(admin, wg.public_key().raw, rotation.public())
    return _peer(pid, node_key=wg.public_key().base64(), key_signature=sig), wg


def test_with_the_lock_on_only_signed_peers_enter() -> None:
    admin, rot = lock.SigningKey.generate(), lock.SigningKey.generate()
    trusted = lock.verify_log([lock.make_update(lock.INIT, bytes(32), [admin.public()], admin)]).trusted
    good, _ = _signed_peer(2, admin, rot)
    unsigned = _peer(3)
    forged = _peer(4, key_signature=lock.sign_direct(lock.SigningKey.generate(), bytes(32), bytes(32)))
    swapped = _peer(5, key_signature=good.key_signature)  # a valid signature for another key
    out, refused = admit(_map(good, unsigned, forged, swapped), Policy(), lock.Verifier(trusted), SeqMemory())
    assert list(out.peers) == [2]
    assert [r.who for r in refused] == ["p3", "p4", "p5"]
    assert "unsigned" in refused[0].why


def test_a_superseded_rotation_is_refused() -> None:
    admin, rot = lock.SigningKey.generate(), lock.SigningKey.generate()
    trusted = lock.verify_log([lock.make_update(lock.INIT, bytes(32), [admin.public()], admin)]).trusted
    first, _ = _signed_peer(2, admin, rot)
    k1, k2 = PrivateKey.generate().public_key(), PrivateKey.generate().public_key()
    sig1 = lock.rotate(first.key_signature, rot, k1.raw)
    sig2 = lock.rotate(sig1, rot, k2.raw)
    seqs, verifier = SeqMemory(), lock.Verifier(trusted)
    newer = _peer(2, node_key=k2.base64(), key_signature=sig2)
    older = _peer(2, node_key=k1.base64(), key_signature=sig1)
    assert list(admit(_map(newer), Policy(), verifier, seqs)[0].peers) == [2]
    out, refused = admit(_map(older), Policy(), verifier, seqs)
    assert out.peers == {}
    assert "superseded" in refused[0].why


def _log(admin: lock.SigningKey) -> tuple[bytes, ...]:
    return (lock.make_update(lock.INIT, bytes(32), [admin.public()], admin),)


def test_trust_takes_a_first_log_then_only_extensions() -> None:
    admin = lock.SigningKey.generate()
    saved: list[tuple[bytes, ...]] = []
    trust = NodeTrust(lock.SigningKey.generate(), save=saved.append)
    first = _log(admin)
    assert trust.observe_log(first)
    assert trust.enabled
    assert saved == [first]
    head = lock.verify_log(first).head
    grown = (*first, lock.make_update(lock.ADD_KEY, head, [lock.SigningKey.generate().public()], admin))
    assert trust.observe_log(grown)
    mallory = lock.SigningKey.generate()
    assert not trust.observe_log(_log(mallory))  # a fork: another genesis
    assert not trust.observe_log(first)  # a rollback
    assert not trust.observe_log(())  # no lock at all
    assert trust.enabled
    assert trust.trusted_keys() == sorted(lock.format_key(k) for k in lock.verify_log(grown).trusted)
    assert saved == [first, grown]
    assert trust.refused()[0].startswith("lock log: ")
    assert trust.refused_total == 3


def test_trust_with_an_anchor_takes_only_that_lock() -> None:
    admin, mallory = lock.SigningKey.generate(), lock.SigningKey.generate()
    genuine = _log(admin)
    trust = NodeTrust(lock.SigningKey.generate(), anchor=lock.verify_log(genuine).genesis)
    assert not trust.observe_log(_log(mallory))
    assert not trust.enabled
    assert trust.observe_log(genuine)


def test_trust_signs_rotations_only_for_a_signed_node() -> None:
    admin, rot = lock.SigningKey.generate(), lock.SigningKey.generate()
    trust = NodeTrust(rot)
    new = PrivateKey.generate().public_key()
    me, _ = _signed_peer(1, admin, rot)
    assert trust.rotation_signature(me, new) == b""  # lock off: nothing to sign
    trust.observe_log(_log(admin))
    assert trust.signed(me)
    sig = trust.rotation_signature(me, new)
    assert lock.verify_signature(sig, new.raw, lock.verify_log(_log(admin)).trusted).seq == 1
    with pytest.raises(PermissionDenied, match="ghostctl lock sign nodekey:"):
        trust.rotation_signature(_peer(1), new)


def test_a_refused_record_leaves_the_earlier_one_in_force() -> None:
    admin, rot = lock.SigningKey.generate(), lock.SigningKey.generate()
    trusted = lock.verify_log([lock.make_update(lock.INIT, bytes(32), [admin.public()], admin)]).trusted
    good, _ = _signed_peer(2, admin, rot)
    verifier, seqs = lock.Verifier(trusted), SeqMemory()
    first, _ = admit(_map(good), Policy(), verifier, seqs)
    swapped = replace(good, node_key=_key())  # the coordinator swaps the key, keeping the signature
    broken = replace(good, endpoints=("[fe80::1%x]:1",))
    for bad in (swapped, broken):
        out, refused = admit(_map(bad), Policy(), verifier, seqs, first.peers)
        assert out.peers == first.peers, "WireGuard keeps the peer as it was"
        assert len(refused) == 1
    # A removal still removes it: the map not naming the peer is not a refusal.
    assert admit(_map(), Policy(), verifier, seqs, first.peers)[0].peers == {}


def test_an_earlier_record_is_dropped_once_the_lock_no_longer_vouches_for_it() -> None:
    unsigned = _peer(2)
    first, _ = admit(_map(unsigned), Policy(), None, SeqMemory())  # lock off: admitted
    admin = lock.SigningKey.generate()
    trusted = lock.verify_log([lock.make_update(lock.INIT, bytes(32), [admin.public()], admin)]).trusted
    out, refused = admit(_map(unsigned), Policy(), lock.Verifier(trusted), SeqMemory(), first.peers)
    assert out.peers == {}
    assert "unsigned" in refused[0].why


# ----- the property: whatever the map holds, what reaches UAPI and nft is well formed and from the map

_TEXT = st.text(alphabet=st.sampled_from("0123456789abcdef.:/%[]\n =x-"), max_size=24)
_ADDR = st.one_of(st.ip_addresses(v=4).map(str), st.ip_addresses(v=6).map(str), _TEXT)
_PREFIX = st.one_of(
    st.tuples(st.ip_addresses(v=4), st.integers(0, 32)).map(
        lambda t: str(ipaddress.ip_network(f"{t[0]}/{t[1]}", strict=False))
    ),
    st.sampled_from(["0.0.0.0/0", "::/0", "0.0.0.0/1", "128.0.0.0/1", "10.1.1.0/24"]),
    _TEXT,
)
_ENDPOINT = st.one_of(
    st.tuples(st.ip_addresses(), st.integers(0, 70000)).map(lambda t: f"{t[0]}:{t[1]}"), _TEXT
)
_NODES = st.builds(
    lambda pid, addrs, allowed, eps, routes, is_exit: _peer(
        pid, addresses=tuple(addrs), allowed_ips=tuple(allowed), endpoints=tuple(eps),
        primary_routes=tuple(routes), exit_node=is_exit,
    ),
    st.integers(2, 40),
    st.lists(_ADDR, max_size=3),
    st.lists(_PREFIX, max_size=4),
    st.lists(_ENDPOINT, max_size=2),
    st.lists(_PREFIX, max_size=2),
    st.booleans(),
)  # fmt: skip
_RULES = st.builds(
    FilterSpec,
    st.lists(_PREFIX, max_size=3).map(tuple),
    st.lists(st.tuples(_PREFIX, st.integers(-1, 70000), st.integers(-1, 70000)), max_size=2).map(tuple),
    st.lists(st.sampled_from(["tcp", "udp", "icmp", "sctp", "tcp accept"]), max_size=2).map(tuple),
)
_SAFE_NFT = re.compile(r"[\sA-Za-z0-9_.:/{},\-\"!=;]*")


@settings(max_examples=200, deadline=None)
@given(
    st.lists(_NODES, max_size=5),
    st.lists(_RULES, max_size=4),
    st.booleans(),
    st.sampled_from(["", "p2", "p3"]),
)
def test_whatever_the_map_holds_uapi_and_nft_get_only_canonical_values_from_it(
    peers: list[NodeInfo], rules: list[FilterSpec], accept_routes: bool, exit_node: str
) -> None:
    nm = _map(*peers)
    nm.filter = tuple(rules)
    out, _ = admit(nm, Policy(exit_node=exit_node, accept_routes=accept_routes), None, SeqMemory())
    desired = engine.desired_state(out, exit_node)
    plan = engine.plan(engine.DesiredState(), desired)
    request = encode_set(wgbase.changes_for(plan)).decode("ascii")
    assert request.endswith("\n\n")
    lines = request.removesuffix("\n\n").split("\n")  # one request: a blank line only at its end
    assert lines[0] == "set=1"
    from_map_prefixes = {a for p in nm.peers.values() for a in p.allowed_ips}
    from_map_endpoints = {e for p in nm.peers.values() for e in p.endpoints}
    for line in lines[1:]:
        key, _, value = line.partition("=")
        assert key in {"public_key", "update_only", "endpoint", "persistent_keepalive_interval",
                       "replace_allowed_ips", "allowed_ip"}  # fmt: skip
        if key == "allowed_ip":
            assert str(parse_prefix(value)) == value
            assert value in from_map_prefixes
        if key == "endpoint":
            parse_endpoint(value)
            assert value in from_map_endpoints
    script = nft.render("ghostx0", out.filter or ())
    assert _SAFE_NFT.fullmatch(script)
    for token in re.findall(r"[0-9a-f.:]+/\d+", script):
        assert token in {s for r in rules for s in (*r.src, *(d[0] for d in r.dst))} or token.endswith("/0")


# -- devices ---------------------------------------------------------------------------------------------


def _gateway_and_device(gw: int = 2, dev: int = 9) -> tuple[NodeInfo, NodeInfo]:
    d4, d6 = f"100.64.0.{dev}/32", f"fd7a:115c:a1e0::{dev:x}/128"
    g = _peer(gw)
    gateway = replace(g, allowed_ips=(*g.allowed_ips, d4, d6), device_prefixes=(d4, d6))
    device = replace(_peer(dev, endpoints=()), via=gw)
    return gateway, device


def test_a_device_is_reached_through_its_gateway_and_never_peered_with() -> None:
    gateway, device = _gateway_and_device()
    out, refused = _admit(_map(gateway, device))
    assert refused == []
    assert set(out.peers[2].allowed_ips) == set(gateway.allowed_ips)  # no --accept-routes needed
    assert out.peers[9].allowed_ips == ()
    desired = engine.desired_state(out)
    assert set(desired.peers) == {gateway.node_key}
    assert "100.64.0.9/32" in desired.peers[gateway.node_key].allowed_ips


def test_the_gateway_peers_with_its_device_without_an_endpoint() -> None:
    _, device = _gateway_and_device(gw=1)
    nm = _map(device)
    me = replace(nm.self_node, device_prefixes=("100.64.0.9/32", "fd7a:115c:a1e0::9/128"))  # type: ignore[type-var]
    out, refused = _admit(replace(nm, self_node=me))
    assert refused == []
    spec = engine.desired_state(out).peers[device.node_key]
    assert spec.endpoint is None
    assert set(spec.allowed_ips) == {"100.64.0.9/32", "fd7a:115c:a1e0::9/128"}


@pytest.mark.parametrize(
    ("prefixes", "why"),
    [
        (("0.0.0.0/1",), "a device's prefix must be one unicast address"),
        (("10.0.0.0/8",), "a device's prefix must be one unicast address"),
        (("100.64.0.1/32",), "the address is this node's or another peer's"),
        (("100.64.0.3/32",), "the address is this node's or another peer's"),
    ],
)
def test_a_gateway_cannot_carry_more_than_single_free_addresses(prefixes: tuple[str, ...], why: str) -> None:
    g = _peer(5)
    gateway = replace(g, allowed_ips=(*g.allowed_ips, *prefixes), device_prefixes=prefixes)
    out, refused = _admit(_map(gateway, _peer(3)))
    assert refused == [f"p5: allowed IP {prefixes[0]}: {why}"]
    assert out.peers[5].allowed_ips == g.allowed_ips


def test_a_device_its_gateway_does_not_carry_is_refused() -> None:
    gateway, device = _gateway_and_device()
    stray = replace(device, via=3)  # names a gateway that does not carry it
    out, refused = _admit(_map(gateway, _peer(3), stray))
    assert refused == ["p9: device: its gateway's admitted record does not carry its addresses"]
    assert 9 not in out.peers
    # on the gateway itself: only the devices its own record lists
    nm = _map(replace(device, via=1))
    _, refused = _admit(nm)
    assert refused == ["p9: device: this node's own record does not list it as a device behind it"]


def test_a_device_record_with_more_than_its_addresses_keeps_only_them() -> None:
    _gateway, device = _gateway_and_device(gw=1)
    nm = _map(replace(device, allowed_ips=(*device.allowed_ips, "10.9.0.0/16")))
    me = replace(nm.self_node, device_prefixes=("100.64.0.9/32", "fd7a:115c:a1e0::9/128"))  # type: ignore[type-var]
    out, refused = _admit(replace(nm, self_node=me), Policy(accept_routes=True))
    assert refused == ["p9: allowed IP 10.9.0.0/16: a device carries its own addresses only"]
    assert "10.9.0.0/16" not in out.peers[9].allowed_ips


def test_two_device_records_on_the_same_addresses_admit_the_first_only() -> None:
    gateway, device = _gateway_and_device()
    twin = replace(device, id=10, name="p10", node_key=_key())
    out, refused = _admit(_map(gateway, device, twin))
    assert refused == ["p10: device: its gateway's admitted record does not carry its addresses"]
    assert set(out.peers) == {2, 9}
