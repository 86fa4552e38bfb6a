"""A crashed ghostlink leaves nothing that stops the next start, and a clean stop leaves the host as found.

Real processes in namespaces (ghostmesh, ghostlink, wireguard-go, nft, ip). ghostlink is killed with
SIGKILL by PID: its wireguard-go (in a session of its own) keeps running and its nft table, ``ip rule``s
and sysctls stay behind. ``ghostlink run`` right after must bring the node back with no manual step, from
what the previous run journaled in its state directory (``host.json``): the old wireguard-go gone (checked
by the PID it had), one nft table, the same ``ip rule``s as a fresh start made, and the sysctls' journaled
originals those the host had before ghostlink ever ran. Then a clean stop leaves the host as it was.

Topology (as ``test_routes_exit``): ghostmesh on pub 192.0.2.0/25; the exit node ``ex`` (a router:
forwarding on, masquerading) and its user ``c1`` (``--exit-node ex``: policy routing) on lan_a; a plain peer
``p1`` on lan_b; the "internet" 192.0.2.128/25 behind ``ex`` only.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from lab import Host, lab_for
from lab.mesh import SERVER_IP, Mesh, Node
from lab.procs import pid_alive

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
SYSCTLS = ("net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding")
EXTRA = {"ex": ("--advertise-exit-node",), "c1": ("--exit-node", "ex"), "p1": ()}


@dataclass(frozen=True)
class HostView:
    """What ghostlink may change on a host: its ip rules, nft tables and forwarding sysctls."""

    rules: tuple[str, ...]
    tables: tuple[str, ...]
    sysctls: tuple[str, ...]


def view(host: Host) -> HostView:
    rules = [
        line.strip()
        for fam in ("-4", "-6")
        for line in host.exec(["ip", fam, "rule", "show"]).stdout.splitlines()
        if line.strip()
    ]
    tables = host.exec(["nft", "list", "tables"]).stdout.split("\n")
    values = host.exec(["sysctl", "-n", *SYSCTLS]).stdout.split()
    return HostView(tuple(sorted(rules)), tuple(t for t in tables if t.strip()), tuple(values))


@dataclass
class CrashLab:
    mesh: Mesh
    nodes: dict[str, Node]
    before: dict[str, HostView]  # each node's host before ghostlink ever ran there


@pytest.fixture(scope="module")
def cl(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CrashLab]:
    lab = lab_for(request, name="crash")
    with lab:
        workdir = Path(tmp_path_factory.mktemp("crash"))
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
        hosts = {"ex": mesh.add_host("ex", "lan_a"), "p1": mesh.add_host("p1", "lan_b")}
        inet = lab.segment("inet", "192.0.2.128/25", hosts["ex"], "192.0.2.129")
        lab.attach(lab.host("inethost"), inet, INET_HOST)
        hosts["c1"] = mesh.add_host("c1", "lan_a")
        before = {name: view(h) for name, h in hosts.items()}
        users = {"ex": "erin", "p1": "dave", "c1": "carol"}
        nodes: dict[str, Node] = {}
        for name in ("ex", "p1", "c1"):
            if name == "c1":  # the exit node's routes are approved before its user joins
                for prefix in ("0.0.0.0/0", "::/0"):
                    mesh.ctl("route", "approve", prefix, "via", "ex")
            key = mesh.authkey("--user", users[name])
            nodes[name] = mesh.join(name, "", key, *EXTRA[name], host=hosts[name])
        yield CrashLab(mesh, nodes, before)
        lab.assert_no_tracebacks()
    assert lab.leftovers() == []


def journal(node: Node) -> dict[str, object]:
    doc: dict[str, object] = json.loads((node.state_dir / "host.json").read_text())
    return doc


def wait_exit_path(mesh: Mesh, c1: Node) -> None:
    mesh.lab.wait_for(
        lambda: c1.host.ping(INET_HOST, timeout=1), timeout=15, what="c1 reaches the internet host via ex"
    )


def crash_and_run(mesh: Mesh, node: Node) -> HostView:
    """SIGKILL the node's ghostlink, check the debris is there, ``ghostlink run`` it again; returns the
    host as the run before the crash had made it."""
    fresh = view(node.host)
    wg_pid = mesh.crash_node(node)
    assert pid_alive(wg_pid), "wireguard-go outlives a SIGKILLed ghostlink"
    recorded = journal(node)["wireguard_go"]
    assert isinstance(recorded, dict)
    assert recorded["pid"] == wg_pid, "the journal names that wireguard-go"
    assert view(node.host) == fresh, "the crash left the rules, the table and the sysctls"
    mesh.start_node(node, "run", *EXTRA[node.name])
    mesh.wait_connected(node)
    assert not pid_alive(wg_pid), "the previous run's wireguard-go was stopped"
    assert mesh.wireguard_go_pid(node) != wg_pid
    return fresh


def test_an_exit_node_restarts_after_sigkill(cl: CrashLab) -> None:
    mesh, n = cl.mesh, cl.nodes
    wait_exit_path(mesh, n["c1"])
    ex = n["ex"]
    fresh = crash_and_run(mesh, ex)
    wait_exit_path(mesh, n["c1"])  # routing for the mesh again: forwarding on, masquerading
    assert view(ex.host) == fresh, "one nft table, and the rules and sysctls as a fresh start makes them"
    assert fresh.sysctls == ("1", "1")
    assert journal(ex)["sysctls"] == {
        "/proc/sys/net/ipv4/ip_forward": cl.before["ex"].sysctls[0],
        "/proc/sys/net/ipv6/conf/all/forwarding": cl.before["ex"].sysctls[1],
    }, "the originals journaled are the host's, not what the crashed run had set"


def test_an_exit_node_user_restarts_after_sigkill(cl: CrashLab) -> None:
    mesh, n = cl.mesh, cl.nodes
    c1 = n["c1"]
    wait_exit_path(mesh, c1)
    fresh = crash_and_run(mesh, c1)
    wait_exit_path(mesh, c1)
    for peer in (n["p1"], n["ex"]):
        v4 = peer.addresses(mesh)[0]
        mesh.lab.wait_for(functools.partial(c1.host.ping, v4, timeout=1), timeout=10, what=f"c1 pings {v4}")
    after = view(c1.host)
    assert after.rules == fresh.rules, "the exit rules exactly once, as a fresh start makes them"
    assert after == fresh


def test_a_clean_stop_leaves_the_host_as_found(cl: CrashLab) -> None:
    for name in ("c1", "ex", "p1"):
        node = cl.nodes[name]
        assert node.proc is not None
        assert node.proc.stop() == 0
        assert view(node.host) == cl.before[name], f"{name}: the host as it was before ghostlink"
        assert not (node.state_dir / "host.json").exists(), f"{name}: nothing left to undo"


def test_an_interface_it_did_not_create_is_refused(cl: CrashLab) -> None:
    mesh, p1 = cl.mesh, cl.nodes["p1"]
    # someone else's TUN under the name: wireguard-go would take it over, and stopping would delete it
    p1.host.exec(["ip", "tuntap", "add", "dev", p1.ifname, "mode", "tun"])
    try:
        proc = mesh.start_node(p1, "run")
        rc = proc.popen.wait(timeout=20)
        lines = [ln for ln in proc.log_text().splitlines() if ln.startswith("ghostlink: ")]
        assert rc == 1
        assert lines[-1] == (
            f"ghostlink: interface {p1.ifname} exists and this ghostlink did not create it; "
            f"remove it (ip link del {p1.ifname}) or choose another --interface"
        )
        assert p1.host.exec(["ip", "link", "show", p1.ifname]).returncode == 0, "left untouched"
    finally:
        p1.host.exec(["ip", "link", "del", p1.ifname])
