"""MagicDNS on real nodes: each node's resolver (100.100.100.100 and fd7a:115c:a1e0::53) answers the mesh's
names from its map, the node's resolv.conf points at it (so ``getent`` finds peers by bare name), a rename
resolves within a second, a peer the policy hides does not resolve, and resolv.conf comes back after a
clean stop and after a SIGKILL once ``ghostlink run`` starts again. A split domain is answered by a DNS
server on a LAN behind a subnet router, reached through the mesh. Reverse lookups (PTR) name the nodes a
node sees and nothing else. A record added to ghostmesh's config file resolves on a running node within
2 s of a SIGHUP to ghostmesh, without a reconnect; a bad file changes nothing.

Topology (as test_routes_subnet): ghostmesh on pub (192.0.2.0/24); a1 (``--accept-routes``), a2 (user
alice), c1 (user carol) and the subnet router r1 (user ops) on lan_a (198.51.100.0/24). The "site" LAN
203.0.113.0/24 is a bridge inside r1's namespace; on it a small dnspython server at 203.0.113.53 answers
``intranet.corp.example`` (in the split domain) with 203.0.113.80. Policy: alice's nodes see each other and
reach the site (so they see r1, its router); carol's node sees and is seen by nobody. Each node namespace
has its own ``/etc/netns/<ns>/resolv.conf`` (lab.mesh makes it before ghostlink starts); the test reads it
from outside the namespace, at that path.
"""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import dns.reversename
import pytest

from lab import Proc, lab_for
from lab.mesh import GHOSTCTL, SERVER_IP, Mesh, Node
from lab.netns import DEFAULT_RESOLV_CONF, NETNS_ETC

pytestmark = pytest.mark.netns

SITE = "203.0.113.0/24"
SITE_DNS = "203.0.113.53"
SITE_WEB = "203.0.113.80"
DNS = f"""
[dns]
magic_dns = true
base_domain = "mesh.example"
search_domains = ["corp.example"]
[dns.split]
"corp.example" = ["{SITE_DNS}"]
[[dns.extra_records]]
name = "db.mesh.example"
type = "A"
value = "100.64.9.9"
"""
POLICY = f"""
[hosts]
site = "{SITE}"

[[acls]]
action = "accept"
src = ["alice"]
dst = ["alice:*", "site:*"]
"""
# The split domain's server: intranet.corp.example has the A record SITE_WEB, every other name is NXDOMAIN;
# it ends after 900 s without a query.
SITE_SERVER = """
import socket, sys
import dns.message, dns.rrset
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 53))
s.settimeout(900)
print("ready", flush=True)
while True:
    data, peer = s.recvfrom(2048)
    q = dns.message.from_wire(data)
    r = dns.message.make_response(q)
    name = q.question[0].name
    if name.to_text() != "intranet.corp.example.":
        r.set_rcode(3)  # NXDOMAIN
    elif q.question[0].rdtype == 1:
        r.answer.append(dns.rrset.from_text(name, 30, "IN", "A", sys.argv[2]))
    s.sendto(r.to_wire(), peer)
"""


@pytest.fixture(scope="module")
def mesh(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    lab = lab_for(request, name="dns")
    with lab:
        workdir = Path(tmp_path_factory.mktemp("dns"))
        router = lab.router("rtr")
        segments = {
            "pub": lab.segment("pub", "192.0.2.0/24", router, "192.0.2.254"),
            "lan_a": lab.segment("lana", "198.51.100.0/24", router, "198.51.100.254"),
        }
        srv = lab.host("srv")
        lab.attach(srv, segments["pub"], SERVER_IP)
        m = Mesh(lab, workdir, router, srv, segments)
        m.start_server(extra_config=DNS)
        yield m
        lab.assert_no_tracebacks()
    assert lab.leftovers() == []


@pytest.fixture(scope="module")
def nodes(mesh: Mesh) -> dict[str, Node]:
    policy = mesh.workdir / "acls.toml"
    policy.write_text(POLICY)
    mesh.ctl("acl", "set", str(policy))
    r1_host = mesh.add_host("r1", "lan_a")
    site = mesh.lab.segment("site", SITE, r1_host, "203.0.113.1")  # the bridge lives in r1's namespace
    site_dns = mesh.lab.host("sitedns")
    mesh.lab.attach(site_dns, site, SITE_DNS)
    server = site_dns.spawn([sys.executable, "-c", SITE_SERVER, SITE_DNS, SITE_WEB], "dns-server")
    mesh.lab.wait_for(lambda: _ready(server), timeout=10, what="the site's DNS server")
    alice = mesh.authkey("--user", "alice", "--reusable", "--expiration", "1h")
    out = {
        "r1": mesh.join("r1", "lan_a", mesh.authkey("--user", "ops"), host=r1_host),
        "a1": mesh.join("a1", "lan_a", alice, "--accept-routes"),
        "a2": mesh.join("a2", "lan_a", alice),
        "c1": mesh.join("c1", "lan_a", mesh.authkey("--user", "carol")),
    }
    mesh.ctl("route", "add", SITE, "via", "r1")
    return out


def _ready(proc: Proc) -> bool:
    return "ready" in proc.log_text()


def resolv_conf(node: Node) -> Path:
    return NETNS_ETC / node.host.netns / "resolv.conf"


def dig(node: Node, name: str, rdtype: str = "A", server: str = "100.100.100.100") -> tuple[str, list[str]]:
    """(status, answers) of one ``dig`` run in the node's namespace."""
    cp = node.host.exec(
        ["dig", "+time=1", "+tries=1", "+noall", "+comments", "+answer", f"@{server}", name, rdtype],
        check=False,
        timeout=10,
    )
    status = ""
    for line in cp.stdout.splitlines():
        if "status:" in line:
            status = line.split("status:")[1].split(",")[0].strip()
    answers = [line.split()[-1] for line in cp.stdout.splitlines() if line and not line.startswith(";")]
    return status, answers


def getent(node: Node, name: str) -> tuple[int, set[str]]:
    cp = node.host.exec(["getent", "ahosts", name], check=False, timeout=10)
    return cp.returncode, {line.split()[0] for line in cp.stdout.splitlines() if line.strip()}


def test_peers_and_self_resolve_by_name_on_every_node(mesh: Mesh, nodes: dict[str, Node]) -> None:
    a1, a2 = nodes["a1"], nodes["a2"]
    addrs = {n: nodes[n].addresses(mesh) for n in ("a1", "a2")}
    for me, other in ((a1, "a2"), (a2, "a1"), (a1, "a1")):
        v4, v6 = addrs[other]
        assert dig(me, f"{other}.mesh.example") == ("NOERROR", [v4])
        assert dig(me, f"{other}.mesh.example", "AAAA") == ("NOERROR", [v6])
        assert dig(me, f"{other}.mesh.example", server="fd7a:115c:a1e0::53") == ("NOERROR", [v4])
        # through the host's resolver: resolv.conf's search list makes the bare name work
        assert getent(me, other) == (0, {v4, v6})
    assert dig(a1, "db.mesh.example") == ("NOERROR", ["100.64.9.9"])
    assert dig(a1, "nobody.mesh.example")[0] == "NXDOMAIN"


def test_resolver_addresses_are_never_a_source(mesh: Mesh, nodes: dict[str, Node]) -> None:
    a1, a2 = nodes["a1"], nodes["a2"]
    (a1_v4, a1_v6), (a2_v4, a2_v6) = a1.addresses(mesh), a2.addresses(mesh)
    assert f"src {a1_v4} " in a1.host.exec(["ip", "-4", "route", "get", a2_v4]).stdout
    assert f"src {a1_v6} " in a1.host.exec(["ip", "-6", "route", "get", a2_v6]).stdout
    assert mesh.lab.wait_for(lambda: a1.host.ping(a2_v6, timeout=1), timeout=10, what="a1 pings a2 over v6")
    assert a1.host.ping(a2_v4, timeout=2)


def test_a_peer_hidden_by_policy_does_not_resolve(mesh: Mesh, nodes: dict[str, Node]) -> None:
    a1, c1 = nodes["a1"], nodes["c1"]
    assert dig(a1, "c1.mesh.example")[0] == "NXDOMAIN"
    assert getent(a1, "c1")[0] != 0
    assert dig(c1, "a1.mesh.example")[0] == "NXDOMAIN"
    assert dig(c1, "c1.mesh.example") == ("NOERROR", [c1.addresses(mesh)[0]])  # itself it knows


def test_dns_status_and_query_through_ghostctl(mesh: Mesh, nodes: dict[str, Node]) -> None:
    a1 = nodes["a1"]
    st = mesh.ctl("--socket", str(a1.socket), "dns", "status")
    assert st["configured"]
    assert st["magic_dns"]
    assert st["base_domain"] == "mesh.example"
    assert st["names"] == 3  # a1, a2 and r1 (the router of the site alice may reach): c1 is hidden
    assert st["extra_records"] == 1
    assert st["search_domains"] == ["mesh.example", "corp.example"]
    assert st["split"] == {"corp.example": [f"{SITE_DNS}:53"]}
    assert st["host_mode"] == "resolv.conf"
    assert st["upstreams"] == ["192.0.2.53:53"]  # the namespace's original resolv.conf
    assert st["upstreams_source"] == "host"
    assert set(st["listen"]) == {"100.100.100.100:53", "[fd7a:115c:a1e0::53]:53"}
    cp = a1.host.exec([GHOSTCTL, "--output", "json", "dns", "query", "a2", "--type", "AAAA"], check=False)
    assert cp.returncode == 0, cp.stderr
    assert '"value": "' + nodes["a2"].addresses(mesh)[1] + '"' in cp.stdout
    cp = a1.host.exec([GHOSTCTL, "dns", "query", "c1.mesh.example"], check=False)
    assert cp.returncode == 4, cp.stdout + cp.stderr  # not found: NXDOMAIN


def test_reverse_lookups_name_visible_nodes_only(mesh: Mesh, nodes: dict[str, Node]) -> None:
    a1, a2, c1 = nodes["a1"], nodes["a2"], nodes["c1"]
    for addr in a2.addresses(mesh):
        assert dig(a1, dns.reversename.from_address(addr).to_text(), "PTR") == (
            "NOERROR",
            ["a2.mesh.example."],
        )
    hidden = dns.reversename.from_address(c1.addresses(mesh)[0]).to_text()
    assert dig(a1, hidden, "PTR")[0] == "NXDOMAIN"  # hidden by the policy: not even its name leaks
    v4 = a2.addresses(mesh)[0]
    cp = a1.host.exec([GHOSTCTL, "--output", "json", "dns", "query", v4, "--type", "PTR"], check=False)
    assert cp.returncode == 0, cp.stderr
    assert '"value": "a2.mesh.example."' in cp.stdout


def test_a_rename_resolves_within_a_second(mesh: Mesh, nodes: dict[str, Node]) -> None:
    a1, a2 = nodes["a1"], nodes["a2"]
    v4 = a2.addresses(mesh)[0]
    mesh.ctl("nodes", "rename", "a2", "a2new")
    start = time.monotonic()
    found = mesh.lab.wait_for(
        lambda: dig(a1, "a2new.mesh.example") == ("NOERROR", [v4]), timeout=3, interval=0.05, what="rename"
    )
    elapsed = time.monotonic() - start
    assert found
    assert elapsed < 1.0, f"the new name resolved after {elapsed:.2f} s"
    assert dig(a1, "a2.mesh.example")[0] == "NXDOMAIN"
    mesh.ctl("nodes", "rename", "a2new", "a2")


def test_resolv_conf_restored_after_sigterm_and_after_sigkill(mesh: Mesh, nodes: dict[str, Node]) -> None:
    c1 = nodes["c1"]
    path = resolv_conf(c1)
    backup = c1.state_dir / "resolv.conf.backup"
    assert path.read_text().startswith("# Written by ghostlink")
    assert "nameserver 100.100.100.100\n" in path.read_text()
    assert c1.proc is not None
    c1.proc.stop(grace=10)
    assert path.read_text() == DEFAULT_RESOLV_CONF
    assert not backup.exists()

    mesh.start_node(c1, "run")
    mesh.wait_connected(c1)
    mesh.lab.wait_for(lambda: path.read_text().startswith("# Written"), timeout=5, what="resolv.conf ours")
    mesh.crash_node(c1)  # SIGKILL: no restore
    assert path.read_text().startswith("# Written by ghostlink")
    assert backup.exists()

    mesh.start_node(c1, "run")  # undoes the crashed run's leftovers first, then writes its own again
    mesh.wait_connected(c1)
    mesh.lab.wait_for(lambda: path.read_text().startswith("# Written"), timeout=5, what="resolv.conf ours")
    assert c1.proc is not None
    assert "the previous run's resolver settings: /etc/resolv.conf restored" in c1.proc.log_text()
    # the backup holds the namespace's original, not the crashed run's file
    assert "192.0.2.53" in backup.read_text()
    assert dig(c1, "c1.mesh.example")[0] == "NOERROR"
    c1.proc.stop(grace=10)
    assert path.read_text() == DEFAULT_RESOLV_CONF


def test_a_split_domain_is_answered_through_the_mesh(mesh: Mesh, nodes: dict[str, Node]) -> None:
    a1 = nodes["a1"]
    mesh.lab.wait_for(
        lambda: dig(a1, "intranet.corp.example") == ("NOERROR", [SITE_WEB]),
        timeout=10,
        interval=0.2,
        what="the split domain answered by the site's server, through r1",
    )
    assert getent(a1, "intranet") == (0, {SITE_WEB})  # the search list: mesh.example (NXDOMAIN), corp.example
    st = mesh.ctl("--socket", str(a1.socket), "dns", "status")
    assert st["forwarded"] >= 2


NEW_RECORD = """
[[dns.extra_records]]
name = "new.mesh.example"
type = "A"
value = "100.64.9.10"
"""
BAD_RECORD = """
[[dns.extra_records]]
name = "bad.mesh.example"
type = "A"
value = "not-an-address"
"""


def test_a_dns_change_reaches_running_nodes_on_sighup(mesh: Mesh, nodes: dict[str, Node]) -> None:
    a1, server = nodes["a1"], mesh.server
    assert server is not None
    assert dig(a1, "new.mesh.example")[0] == "NXDOMAIN"
    serial = a1.status(mesh)["map_serial"]
    mesh.write_server_config(DNS + NEW_RECORD)
    server.signal(signal.SIGHUP)
    start = time.monotonic()
    found = mesh.lab.wait_for(
        lambda: dig(a1, "new.mesh.example") == ("NOERROR", ["100.64.9.10"]),
        timeout=5,
        interval=0.05,
        what="the record added to the config file",
    )
    elapsed = time.monotonic() - start
    assert found
    assert elapsed < 2.0, f"the new record resolved after {elapsed:.2f} s"
    # the same stream carried it as a delta: a reconnect would have restarted the serials at 1
    assert a1.status(mesh)["map_serial"] > serial
    assert "config reload: [dns] applied (extra_records changed)" in server.log_text()

    mesh.write_server_config(DNS + NEW_RECORD + BAD_RECORD)  # refused: nothing changes
    server.signal(signal.SIGHUP)
    mesh.lab.wait_for(
        lambda: "config reload refused, nothing changed" in server.log_text(), timeout=5, what="the refusal"
    )
    assert "dns.extra_records[2].value" in server.log_text()
    assert dig(a1, "new.mesh.example") == ("NOERROR", ["100.64.9.10"])

    mesh.write_server_config(DNS)  # back as the module started
    server.signal(signal.SIGHUP)
    assert mesh.lab.wait_for(
        lambda: dig(a1, "new.mesh.example")[0] == "NXDOMAIN", timeout=5, interval=0.05, what="record removed"
    )
