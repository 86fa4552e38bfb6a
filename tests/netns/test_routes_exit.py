"""An exit node on real WireGuard: a node started with ``--exit-node`` reaches an "internet" host that
only the exit node is attached to, through the exit node, while its control connection and its tunnels
to the other peers stay up; a node that did not choose the exit node never installs its 0.0.0.0/0.

Topology: ghostmesh on pub 192.0.2.0/25; the exit node ``ex`` and the client ``c1`` on lan_a
(198.51.100.0/24); a peer ``p1`` on lan_b (203.0.113.0/24), so c1's tunnel to p1 leaves through the
default gateway (the path exit routing must keep out of the tunnel). The "internet" 192.0.2.128/25 is a
bridge inside ex's namespace holding one host, with no route back to the overlay (ex masquerades).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab import Host, lab_for
from lab.mesh import SERVER_IP, Mesh, Node

pytestmark = pytest.mark.netns

INET_HOST = "192.0.2.130"
POLICY = """
[[acls]]
action = "accept"
src = ["*"]
dst = ["autogroup:member:*"]

[[acls]]
action = "accept"
src = ["carol"]
dst = ["autogroup:internet:*"]
"""


@pytest.fixture(scope="module")
def env(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Mesh, dict[str, Node], Host]]:
    lab = lab_for(request, name="exit")
    with lab:
        workdir = Path(tmp_path_factory.mktemp("exit"))
        router = lab.router("rtr")
        segments = {
            "pub": lab.segment("pub", "192.0.2.0/25", router, "192.0.2.126"),
            "lan_a": lab.segment("lana", "198.51.100.0/24", router, "198.51.100.254"),
            "lan_b": lab.segment("lanb", "203.0.113.0/24", router, "203.0.113.254"),
        }
        srv = lab.host("srv")
        lab.attach(srv, segments["pub"], SERVER_IP)
        mesh = Mesh(lab, workdir, router, srv, segments)
        mesh.start_server()
        policy = workdir / "acls.toml"
        policy.write_text(POLICY)
        mesh.ctl("acl", "set", str(policy))
        ex_host = mesh.add_host("ex", "lan_a")
        inet = lab.segment("inet", "192.0.2.128/25", ex_host, "192.0.2.129")
        inet_host = lab.host("inethost")
        lab.attach(inet_host, inet, INET_HOST)
        nodes = {
            "ex": mesh.join(
                "ex", "lan_a", mesh.authkey("--user", "erin"), "--advertise-exit-node", host=ex_host
            ),
            "p1": mesh.join("p1", "lan_b", mesh.authkey("--user", "dave")),
        }
        for prefix in ("0.0.0.0/0", "::/0"):
            mesh.ctl("route", "approve", prefix, "via", "ex")
        nodes["c1"] = mesh.join("c1", "lan_a", mesh.authkey("--user", "carol"), "--exit-node", "ex")
        yield mesh, nodes, inet_host
        lab.assert_no_tracebacks()
    assert lab.leftovers() == []


def _route_dev(host: Host, dst: str) -> str:
    return host.exec(["ip", "route", "get", dst]).stdout


def test_exit_node_carries_the_default_route(env: tuple[Mesh, dict[str, Node], Host]) -> None:
    mesh, n, _ = env
    lab = mesh.lab
    routes = {(r["node"], r["prefix"]): r for r in mesh.ctl("route", "list")}
    assert routes["ex", "0.0.0.0/0"]["approved"]
    assert routes["ex", "::/0"]["advertised_by"] == "node"
    c1, ex, p1 = n["c1"], n["ex"], n["p1"]
    lab.wait_for(lambda: c1.host.ping(INET_HOST, timeout=1), timeout=10, what="c1 reaches the internet host")
    # through the tunnel, and the exit node does the forwarding + NAT
    assert c1.ifname in _route_dev(c1.host, INET_HOST)
    assert ex.host.exec(["sysctl", "-n", "net.ipv4.ip_forward"]).stdout.strip() == "1"
    assert "masquerade" in ex.host.exec(["nft", "list", "ruleset"]).stdout
    # ghostmesh and the peers' endpoints keep the underlay path
    assert c1.ifname not in _route_dev(c1.host, SERVER_IP)
    p1_lan = p1.host.addr
    assert c1.ifname not in _route_dev(c1.host, p1_lan)
    # tunnels to the peers stay up, and the control connection too
    for peer in (p1, ex):
        v4 = peer.addresses(mesh)[0]
        lab.wait_for(functools.partial(c1.host.ping, v4, timeout=1), timeout=10, what=f"c1 pings {v4}")
    assert c1.status(mesh)["connected"]
    assert mesh.server_nodes()["c1"]["online"]
    # a node that did not choose the exit node never installs its 0.0.0.0/0
    allowed = p1.host.exec(["wg", "show", p1.ifname, "allowed-ips"]).stdout
    assert "0.0.0.0/0" not in allowed
    assert not p1.host.ping(INET_HOST, count=2, timeout=2)


def test_stopping_the_client_removes_its_rules(env: tuple[Mesh, dict[str, Node], Host]) -> None:
    _, n, _ = env
    c1 = n["c1"]
    assert "7277" in c1.host.exec(["ip", "rule", "show"]).stdout
    assert c1.proc is not None
    c1.proc.stop()
    rules4 = c1.host.exec(["ip", "-4", "rule", "show"]).stdout
    rules6 = c1.host.exec(["ip", "-6", "rule", "show"]).stdout
    assert "7277" not in rules4
    assert "7277" not in rules6
    assert "suppress_prefixlength" not in rules4
    assert "5210" not in rules4
    assert not c1.host.ping(INET_HOST, timeout=1)  # back to the underlay, which has no such host
