"""Subnet routers on real WireGuard and nftables: a host behind a router is reachable from a node the
policy allows and not from one it denies, and failover to a second router when the primary goes away.

Topology: ghostmesh on pub (192.0.2.0/24); clients alice1 (user alice) and bob1 (user bob) and the
routers r1, r2 (user ops) on lan_a (198.51.100.0/24), all behind the lab router. The "site" LAN
203.0.113.0/24 is a bridge inside r1's namespace that only r1 and r2 are attached to; the site host has
no ghostlink and no route to the overlay (the routers masquerade). r1 and r2 are plain hosts (forwarding
off): ghostlink turns forwarding on when ghostmesh makes the node a primary router.

Policy: alice may reach the site; bob may reach the routers themselves (so he learns of them and their
route, and his packets reach r1) but not the site: r1's forward filter must drop them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab import Host, Segment, lab_for
from lab.mesh import SERVER_IP, Mesh, Node

pytestmark = pytest.mark.netns

SITE = "203.0.113.0/24"
SITE_HOST = "203.0.113.10"
POLICY = """
[hosts]
site = "203.0.113.0/24"

[[acls]]
action = "accept"
src = ["alice"]
dst = ["site:*"]

[[acls]]
action = "accept"
src = ["bob", "ops"]
dst = ["ops:*"]
"""


class RouteLab:
    def __init__(self, mesh: Mesh, site: Segment, site_host: Host, nodes: dict[str, Node]) -> None:
        self.mesh = mesh
        self.site = site
        self.site_host = site_host
        self.nodes = nodes


@pytest.fixture(scope="module")
def rl(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RouteLab]:
    lab = lab_for(request, name="routes")
    with lab:
        workdir = Path(tmp_path_factory.mktemp("routes"))
        workdir.mkdir(parents=True, exist_ok=True)
        router = lab.router("rtr")
        segments = {
            "pub": lab.segment("pub", "192.0.2.0/24", router, "192.0.2.254"),
            "lan_a": lab.segment("lana", "198.51.100.0/24", router, "198.51.100.254"),
        }
        srv = lab.host("srv")
        lab.attach(srv, segments["pub"], SERVER_IP)
        mesh = Mesh(lab, workdir, router, srv, segments)
        mesh.start_server()
        policy = workdir / "acls.toml"
        policy.write_text(POLICY)
        mesh.ctl("acl", "set", str(policy))
        r1_host = mesh.add_host("r1", "lan_a")
        r2_host = mesh.add_host("r2", "lan_a")
        site = lab.segment("site", SITE, r1_host, "203.0.113.1")  # the bridge lives in r1's namespace
        lab.attach(r2_host, site, "203.0.113.2", default_route=False)
        site_host = lab.host("lanhost")
        lab.attach(site_host, site, SITE_HOST)  # default route via r1: never used (masquerade)
        ops = mesh.authkey("--user", "ops", "--reusable", "--expiration", "1h")
        nodes = {
            "r1": mesh.join("r1", "lan_a", ops, host=r1_host),  # joins first: the lower id, primary
            "r2": mesh.join("r2", "lan_a", ops, host=r2_host),
            # clients opt in to subnet routes, as `tailscale up --accept-routes`
            "alice1": mesh.join("alice1", "lan_a", mesh.authkey("--user", "alice"), "--accept-routes"),
            "bob1": mesh.join("bob1", "lan_a", mesh.authkey("--user", "bob"), "--accept-routes"),
        }
        yield RouteLab(mesh, site, site_host, nodes)
        lab.assert_no_tracebacks()
    assert lab.leftovers() == []


def _forwarding(host: Host) -> str:
    return host.exec(["sysctl", "-n", "net.ipv4.ip_forward"]).stdout.strip()


def _routes(mesh: Mesh) -> dict[str, dict[str, bool]]:
    return {r["node"]: r for r in mesh.ctl("route", "list") if r["prefix"] == SITE}


def test_site_host_reachable_only_where_the_policy_allows(rl: RouteLab) -> None:
    mesh, n = rl.mesh, rl.nodes
    lab = mesh.lab
    assert not n["alice1"].host.ping(SITE_HOST, timeout=1)  # no route yet
    assert _forwarding(n["r1"].host) == "0"
    added = mesh.ctl("route", "add", SITE, "via", "r1")
    assert (added["approved"], added["primary"]) == (True, True)
    lab.wait_for(
        lambda: n["alice1"].host.ping(SITE_HOST, timeout=1), timeout=10, what="alice1 pings the site"
    )
    # r1 became a router: forwarding on, masquerading in its nft table
    assert _forwarding(n["r1"].host) == "1"
    ruleset = n["r1"].host.exec(["nft", "list", "ruleset"]).stdout
    assert "masquerade" in ruleset
    # bob learns of r1 (and its route) but r1's forward filter drops his packets to the site
    r1_v4 = n["r1"].addresses(mesh)[0]
    lab.wait_for(lambda: n["bob1"].host.ping(r1_v4, timeout=1), timeout=10, what="bob1 pings r1 itself")
    bob_routes = n["bob1"].host.exec(["ip", "route", "show", SITE]).stdout
    assert n["bob1"].ifname in bob_routes  # he has the route: the filter, not ignorance, stops him
    assert not n["bob1"].host.ping(SITE_HOST, count=3, timeout=3)
    assert "203.0.113.0/24" in ruleset
    # alice is still fine (both directions of her flow pass the router)
    assert n["alice1"].host.ping(SITE_HOST, count=3, timeout=3)


def test_router_failover(rl: RouteLab) -> None:
    mesh, n = rl.mesh, rl.nodes
    lab = mesh.lab
    added = mesh.ctl("route", "add", SITE, "via", "r2")
    assert (added["approved"], added["primary"]) == (True, False)  # standby
    routes = _routes(mesh)
    assert (routes["r1"]["primary"], routes["r2"]["primary"]) == (True, False)
    assert _forwarding(n["r2"].host) == "0"  # a standby does not route
    assert n["alice1"].host.ping(SITE_HOST, timeout=1)
    proc = n["r1"].proc
    assert proc is not None
    started = time.monotonic()
    proc.stop()
    lab.wait_for(
        lambda: n["alice1"].host.ping(SITE_HOST, timeout=0.5), timeout=15, interval=0.05,
        what="alice1 reaches the site through r2",
    )  # fmt: skip
    failover = time.monotonic() - started
    print(f"subnet router failover: traffic resumed {failover:.2f} s after the primary's ghostlink stopped")
    assert failover < 5.0
    routes = _routes(mesh)
    assert (routes["r1"]["primary"], routes["r2"]["primary"]) == (False, True)
    assert _forwarding(n["r2"].host) == "1"
    assert _forwarding(n["r1"].host) == "0"  # r1's ghostlink restored what it found on the way out
    assert "ghostlink_" not in n["r1"].host.exec(["nft", "list", "tables"]).stdout
    assert not n["bob1"].host.ping(SITE_HOST, count=2, timeout=2)  # the policy follows the route to r2


def test_a_returning_router_stays_standby_and_a_crash_fails_over(rl: RouteLab) -> None:
    mesh, n = rl.mesh, rl.nodes
    lab = mesh.lab
    r1, r2 = n["r1"], n["r2"]
    mesh.start_node(r1, "run")
    mesh.wait_connected(r1)
    routes = _routes(mesh)
    assert (routes["r1"]["primary"], routes["r2"]["primary"]) == (False, True)  # stable: r2 keeps it
    assert _forwarding(r1.host) == "0"
    assert r2.proc is not None
    started = time.monotonic()
    # a crash of the whole node agent: ghostlink and its wireguard-go (its own session) die at once, by
    # PID, with no goodbye; the kernel closes the control connection
    pids = subprocess.run(
        ["ip", "netns", "pids", r2.host.netns], capture_output=True, text=True, check=True, timeout=10
    ).stdout.split()
    assert len(pids) >= 2  # ghostlink + wireguard-go
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)
    r2.proc.kill()  # reap
    lab.wait_for(
        lambda: n["alice1"].host.ping(SITE_HOST, timeout=0.5), timeout=15, interval=0.05,
        what="alice1 reaches the site through r1 again",
    )  # fmt: skip
    failover = time.monotonic() - started
    print(f"subnet router failover after a crash: traffic resumed in {failover:.2f} s")
    assert failover < 5.0
    routes = _routes(mesh)
    assert (routes["r1"]["primary"], routes["r2"]["primary"]) == (True, False)
    assert _forwarding(r1.host) == "1"
