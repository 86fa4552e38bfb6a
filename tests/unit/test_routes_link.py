"""ghostlink's router side: masquerade in the nft table, forwarding sysctls on and restored, an exit
node's default routes never installed, route advertisement config."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from ghostcore.errors import ConfigError
from ghostcore.keys import PrivateKey
from ghostcore.pb.ghostmesh.v1 import coordination_pb2 as pb
from ghostlink import engine
from ghostlink.config import load_config
from ghostlink.engine import FilterSpec
from ghostlink.exitroute import commands
from ghostlink.forwarding import Forwarding, is_router
from ghostlink.nft import ROUTED_MARK, render

RULES = (FilterSpec(("100.64.0.1/32",), (("10.1.1.0/24", 22, 22),), ("tcp",)),)


def test_masquerade_marks_forwarded_mesh_traffic_and_nats_it_out() -> None:
    plain = render("gw0", RULES)
    assert "postrouting" not in plain
    assert "meta mark" not in plain
    script = render("gw0", RULES, masquerade=True)
    forward = script.split("chain forward")[1].split("chain postrouting")[0]
    lines = [ln.strip() for ln in forward.splitlines()]
    # the mark comes after "not from the mesh: accept", before the filter decides
    mark = lines.index(f"meta mark set meta mark or {ROUTED_MARK}")
    assert mark == lines.index('iifname != "gw0" accept') + 1
    assert "ip saddr 100.64.0.1/32 ip daddr 10.1.1.0/24 tcp dport 22 accept" in lines
    assert "meta mark set" not in script.split("chain input")[1].split("chain forward")[0]
    assert "type nat hook postrouting priority srcnat; policy accept;" in script
    assert f'meta mark and {ROUTED_MARK} == {ROUTED_MARK} oifname != "gw0" masquerade' in script


def _chain(script: str, name: str) -> list[str]:
    part = script.split(f"chain {name}")[1].split("chain ", maxsplit=1)[0]
    return [ln.strip() for ln in part.splitlines()]


def test_a_device_gateway_forwards_its_devices_packets_into_the_mesh_only() -> None:
    devices = ("100.64.0.9/32", "fd7a:115c:a1e0::9/128", "100.64.0.8/32")
    own = ("100.64.0.1/32", "fd7a:115c:a1e0::1/128")
    script = render("gw0", RULES, devices=devices, own=own)
    forward = _chain(script, "forward")
    v4 = 'oifname "gw0" ip saddr 100.64.0.8/31 ip daddr != 100.64.0.8/31 accept'  # collapsed
    v6 = 'oifname "gw0" ip6 saddr fd7a:115c:a1e0::9/128 ip6 daddr != fd7a:115c:a1e0::9/128 accept'
    # into the mesh, not to another device: after conntrack, before the filter's own rules and the drop
    assert forward.index(v4) == forward.index("ct state invalid drop") + 1
    assert forward.index(v6) == forward.index(v4) + 1
    assert forward.index(v6) < forward.index("drop")
    # a gateway that is no router: nothing out of the mesh, no masquerade, no mark
    assert forward.index('oifname != "gw0" drop') == forward.index('iifname != "gw0" accept') + 1
    assert "postrouting" not in script
    assert "meta mark" not in script
    # a LAN host cannot send into the mesh as this node or a device
    assert forward[forward.index('iifname != "gw0" accept') - 2 :][:2] == [
        'iifname != "gw0" oifname "gw0" ip saddr { 100.64.0.1/32, 100.64.0.8/31 } drop',
        'iifname != "gw0" oifname "gw0" ip6 saddr { fd7a:115c:a1e0::1/128, fd7a:115c:a1e0::9/128 } drop',
    ]
    assert "saddr 100.64.0.8/31" not in "\n".join(_chain(script, "input"))
    # a router with devices: forwards out of the mesh too, as its filter allows
    routed = _chain(render("gw0", RULES, masquerade=True, devices=devices, own=own), "forward")
    assert 'oifname != "gw0" drop' not in routed
    assert v4 in routed
    assert 'oifname "gw0" ip' not in render("gw0", RULES, masquerade=True)
    assert not is_router((), False)


def test_forwarding_is_turned_on_and_restored(tmp_path: Path) -> None:
    v4, v6 = tmp_path / "ip_forward", tmp_path / "forwarding"
    v4.write_text("0\n")
    v6.write_text("1\n")
    fw = Forwarding((v4, v6))

    async def go() -> None:
        await fw.apply(False)
        assert v4.read_text() == "0\n"
        await fw.apply(True)
        assert (v4.read_text(), v6.read_text(), fw.on) == ("1\n", "1\n", True)
        await fw.apply(True)  # idempotent: the saved values stay the originals
        await fw.close()
        assert (v4.read_text(), v6.read_text(), fw.on) == ("0\n", "1\n", False)

    asyncio.run(go())
    assert is_router(("10.1.1.0/24",), False)
    assert is_router((), True)
    assert not is_router((), False)


def test_peer_routes_are_installed_but_never_an_exit_nodes_default_route() -> None:
    me = pb.Node(
        id=1, name="a", node_key=PrivateKey.generate().public_key().base64(), addresses=["100.64.0.1"]
    )
    router = pb.Node(
        id=2,
        name="r",
        node_key=PrivateKey.generate().public_key().base64(),
        allowed_ips=["100.64.0.2/32", "10.1.1.0/24", "0.0.0.0/0", "::/0"],
        primary_routes=["10.1.1.0/24"],
        exit_node=True,
    )
    nm = engine.NetMap()
    nm.apply(pb.MapUpdate(serial=1, full=True, self=me, peers_upserted=[router]))
    assert nm.peers[2].primary_routes == ("10.1.1.0/24",)
    assert nm.peers[2].exit_node
    want = engine.desired_state(nm)
    assert want.routes == {"100.64.0.2/32", "10.1.1.0/24"}
    assert next(iter(want.peers.values())).allowed_ips == ("10.1.1.0/24", "100.64.0.2/32")


def test_advertise_config() -> None:
    cfg = load_config(None, environ={"GHOSTLINK_NODE_ADVERTISE_ROUTES": "10.1.1.0/24, 2001:db8:1::/64"})
    assert cfg.node.advertise_routes == ["10.1.1.0/24", "2001:db8:1::/64"]
    assert not cfg.node.advertise_exit_node
    with pytest.raises(
        ConfigError, match=r"node\.advertise_routes\[0\]: expected a prefix without host bits"
    ):
        load_config(None, environ={}, flags={"node.advertise_routes": "10.1.1.1/24"})
    with pytest.raises(ConfigError, match=r"node\.advertise_routes\[0\]: expected"):
        load_config(None, environ={}, flags={"node.advertise_routes": "fe80::%eth0/64"})
    with pytest.raises(ConfigError, match=r"use node\.advertise_exit_node"):
        load_config(None, environ={}, flags={"node.advertise_routes": "0.0.0.0/0"})


def test_chosen_exit_node_gets_the_default_prefixes_but_no_main_table_route() -> None:
    key = PrivateKey.generate().public_key().base64()
    me = pb.Node(id=1, name="a", node_key=key, addresses=["100.64.0.1"])

    def exit_peer(i: int, name: str, approved: bool) -> pb.Node:
        return pb.Node(
            id=i,
            name=name,
            node_key=PrivateKey.generate().public_key().base64(),
            allowed_ips=[f"100.64.0.{i}/32", "0.0.0.0/0", "::/0"] if approved else [f"100.64.0.{i}/32"],
            endpoints=[f"198.51.100.{i}:41641", f"[2001:db8::{i}]:41641"],
            exit_node=approved,
        )

    nm = engine.NetMap()
    peers = [exit_peer(2, "ex", True), exit_peer(3, "other", True), exit_peer(4, "plain", False)]
    nm.apply(pb.MapUpdate(serial=1, full=True, self=me, peers_upserted=peers))
    assert engine.chosen_exit(nm, "") is None
    assert engine.chosen_exit(nm, "plain") is None  # not an exit node: nothing happens
    chosen = engine.chosen_exit(nm, "ex")
    assert chosen is not None
    assert chosen.id == 2
    assert engine.chosen_exit(nm, "2") == chosen
    want = engine.desired_state(nm, "ex")
    allowed = {p.allowed_ips for p in want.peers.values()}
    assert ("0.0.0.0/0", "100.64.0.2/32", "::/0") in allowed  # only on the chosen one
    assert ("100.64.0.3/32",) in allowed  # never another exit node's 0.0.0.0/0
    assert not want.routes & {"0.0.0.0/0", "::/0"}  # ghostlink.exitroute routes them, in its own table
    assert engine.endpoint_hosts(nm) >= {"198.51.100.2", "2001:db8::2", "198.51.100.4"}


def test_exit_routing_commands_keep_the_ways_out_first() -> None:
    on = commands("gw0", "add", ["192.0.2.1", "2001:db8::7"])
    assert on[0] == ["-4", "rule", "add", "to", "192.0.2.1/32", "lookup", "main", "priority", "5210"]
    assert on[1] == ["-6", "rule", "add", "to", "2001:db8::7/128", "lookup", "main", "priority", "5210"]
    assert ["-4", "route", "replace", "default", "dev", "gw0", "table", "7277"] in on
    suppress = ["-4", "rule", "add", "lookup", "main", "suppress_prefixlength", "0", "priority", "5230"]
    assert on.index(suppress) < on.index(["-4", "rule", "add", "lookup", "7277", "priority", "5270"])
    off = commands("gw0", "del", ["192.0.2.1"])
    assert off[0] == ["-4", "route", "del", "default", "dev", "gw0", "table", "7277"]
    assert off[-1] == ["-4", "rule", "del", "to", "192.0.2.1/32", "lookup", "main", "priority", "5210"]
