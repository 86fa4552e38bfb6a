"""A stock WireGuard device behind a gateway node, on real wireguard-go, nftables and the stock ``wg-quick``.

Topology (``lab.mesh``): ghostmesh on pub; the gateway ``gw`` (tag:gw) and the nodes ``alice1`` and
``bob1`` on lan_a; the devices' hosts ``phone`` (alice's) and ``tablet`` (bob's) on lan_b, plain
namespaces with no ghostlink, which run ``wg-quick up`` on the files ``ghostctl devices add`` wrote
(wireguard-go, since this machine has no WireGuard kernel module; wg-quick falls back to it by itself).

Policy: alice's nodes reach each other, her phone included; bob may reach the tagged gateway, so bob1 and
the gateway are peers and the phone's addresses ride in the gateway's allowed IPs on bob1 too. What must
stop bob then is the filter: bob1's own for what the phone sends him, the gateway's forward filter for
what he sends the phone, and for what his tablet, behind the same gateway, sends it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab import Host
from lab.mesh import Mesh, Node, module_mesh

pytestmark = pytest.mark.netns

POLICY = """
[tag_owners]
"tag:gw" = ["ops"]

[[acls]]
action = "accept"
src = ["alice"]
dst = ["alice:*"]

[[acls]]
action = "accept"
src = ["bob", "tag:gw"]
dst = ["tag:gw:*"]
"""
DNS = """
[dns]
magic_dns = true
base_domain = "mesh.example"
"""


class DeviceLab:
    def __init__(self, mesh: Mesh, nodes: dict[str, Node], phone: Host, tablet: Host) -> None:
        self.mesh = mesh
        self.nodes = nodes
        self.phone = phone
        self.tablet = tablet


@pytest.fixture(scope="module")
def dl(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DeviceLab]:
    with module_mesh(request, tmp_path_factory, "devices", start=False) as mesh:
        mesh.start_server(DNS)
        policy = mesh.workdir / "acls.toml"
        policy.write_text(POLICY)
        mesh.ctl("acl", "set", str(policy))
        nodes = {
            "gw": mesh.join("gw", "lan_a", mesh.authkey("--user", "ops", "--tags", "tag:gw")),
            "alice1": mesh.join("alice1", "lan_a", mesh.authkey("--user", "alice")),
            "bob1": mesh.join("bob1", "lan_a", mesh.authkey("--user", "bob")),
        }
        phone = mesh.add_host("phone", "lan_b")
        tablet = mesh.add_host("tablet", "lan_b")
        yield DeviceLab(mesh, nodes, phone, tablet)


def _wg_quick(host: Host, verb: str, conf: Path) -> None:
    host.exec(
        ["wg-quick", verb, str(conf)], env={"WG_QUICK_USERSPACE_IMPLEMENTATION": "wireguard-go"}, timeout=30
    )


def test_a_wg_quick_device_reaches_what_the_policy_allows_and_nothing_else(dl: DeviceLab) -> None:
    mesh, n, phone = dl.mesh, dl.nodes, dl.phone
    lab = mesh.lab
    gw = n["gw"]
    ifname = lab.wg_ifname("dev")  # wg-quick names the interface after the file; registered for cleanup
    conf = mesh.workdir / f"{ifname}.conf"
    gw_addr = gw.host.addr
    added = mesh.ctl(
        "devices", "add", "phone", "--via", "gw", "--user", "alice",
        "--endpoint", f"{gw_addr}:{gw.listen_port}", "--config", str(conf),
    )  # fmt: skip
    assert added["via"] == "gw"
    assert added["config"] == str(conf)
    assert conf.stat().st_mode & 0o777 == 0o600
    text = conf.read_text()
    assert "PrivateKey = " in text
    # the private key never reached ghostmesh: it is in no server log, record or audit row
    private = next(
        line.split("=", 1)[1].strip() for line in text.splitlines() if line.startswith("PrivateKey")
    )
    assert private not in (mesh.workdir / "mesh").joinpath("ghostmesh.db").read_bytes().decode("latin-1")
    assert all(private not in p.log_text() for p in lab.procs)
    phone_v4, phone_v6 = added["addresses"]
    # bob's tablet behind the same gateway
    tablet_if = lab.wg_ifname("tab")
    tablet_conf = mesh.workdir / f"{tablet_if}.conf"
    tablet = mesh.ctl(
        "devices", "add", "tablet", "--via", "gw", "--user", "bob",
        "--endpoint", f"{gw_addr}:{gw.listen_port}", "--config", str(tablet_conf),
    )  # fmt: skip
    tablet_v4 = tablet["addresses"][0]
    try:
        _wg_quick(phone, "up", conf)
        _wg_quick(dl.tablet, "up", tablet_conf)
        alice_v4, alice_v6 = n["alice1"].addresses(mesh)
        bob_v4, _ = n["bob1"].addresses(mesh)
        # allowed: the phone and alice's node, both ways, v4 and v6
        lab.wait_for(lambda: phone.ping(alice_v4, timeout=1), timeout=20, what="the phone pings alice1")
        assert phone.ping(alice_v6, timeout=2)
        lab.wait_for(
            lambda: n["alice1"].host.ping(phone_v4, timeout=1), timeout=10, what="alice1 pings the phone"
        )
        assert n["alice1"].host.ping(phone_v6, timeout=2)
        # ghostctl peers: the phone is reached via the gateway; on the gateway it is a peer with a handshake
        (seen,) = [p for p in n["alice1"].peers(mesh) if p["name"] == "phone"]
        assert seen["via"] == "gw"
        (served,) = [p for p in gw.peers(mesh) if p["name"] == "phone"]
        assert served["latest_handshake"] is not None
        # the gateway forwards now, within the mesh only: its devices' packets into the mesh, nothing out
        assert gw.host.exec(["sysctl", "-n", "net.ipv4.ip_forward"]).stdout.strip() == "1"
        ruleset = gw.host.exec(["nft", "list", "ruleset"]).stdout
        assert f'oifname != "{gw.ifname}" drop' in ruleset
        assert "masquerade" not in ruleset
        # the tablet works (bob may reach the gateway) ...
        gw_v4 = gw.addresses(mesh)[0]
        lab.wait_for(
            lambda: dl.tablet.ping(gw_v4, timeout=1), timeout=20, what="the tablet pings the gateway"
        )
        # ... but two devices behind one gateway are judged by its filter: bob's tablet and alice's phone
        assert not dl.tablet.ping(phone_v4, count=3, timeout=1)
        assert not phone.ping(tablet_v4, count=3, timeout=1)
        # denied: bob1 sees the gateway (and the phone's addresses in its allowed IPs) ...
        lab.wait_for(lambda: f"{phone_v4}/32" in _wg_allowed(n["bob1"]), timeout=10, what="bob1 routes it")
        # ... but his node drops what the phone sends, and the gateway drops what he sends the phone
        assert not phone.ping(bob_v4, count=3, timeout=1)
        assert not n["bob1"].host.ping(phone_v4, count=3, timeout=1)
        # names: alice1 resolves the phone; bob1, who may not reach it, does not
        assert _dig(n["alice1"], "phone.mesh.example") == [phone_v4]
        assert _dig(n["bob1"], "phone.mesh.example") == []
        # removed: the gateway drops the peer at once, and the phone reaches nothing
        mesh.ctl("devices", "remove", "phone")
        lab.wait_for(
            lambda: f"{phone_v4}/32" not in _wg_allowed(gw),
            timeout=5,
            what="the gateway drops the device",
        )
        assert not phone.ping(alice_v4, count=2, timeout=1)
    finally:
        for host, file in ((phone, conf), (dl.tablet, tablet_conf)):
            with contextlib.suppress(Exception):
                _wg_quick(host, "down", file)


def _wg_allowed(node: Node) -> str:
    return node.host.exec(["wg", "show", node.ifname, "allowed-ips"]).stdout


def _dig(node: Node, name: str) -> list[str]:
    cp = node.host.exec(
        ["dig", "+time=1", "+tries=2", "+short", "@100.100.100.100", name, "A"], check=False, timeout=10
    )
    return [line for line in cp.stdout.split() if line]
