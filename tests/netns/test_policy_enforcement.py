"""The ACL policy on real WireGuard and nftables: a deny matrix at packet level, visibility, stateful
replies, a policy change applied everywhere within 2 s, and bad input that changes nothing.

Nodes: alice1 and alice2 (user alice), bob1 (user bob), srv1 (tag:server). Each namespace runs tiny TCP
and UDP echo servers (``python3 -c``); one client process per source node probes all its flows at once
with 1 s timeouts, so a denied flow costs one timeout, not one per probe.
"""

from __future__ import annotations

import functools
import itertools
import json
import sys
import time
from collections.abc import Iterator

import pytest

from lab import Host, Proc
from lab.mesh import GHOSTCTL, SERVER_IP, SERVER_PORT, Mesh, Node, module_mesh

pytestmark = pytest.mark.netns

TCP_PORTS, UDP_PORTS = (22, 80), (53, 80)

ECHO = """
import socket, sys, threading
def serve(kind, port):
    s = socket.socket(socket.AF_INET6, kind)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("::", port))
    if kind == socket.SOCK_DGRAM:
        while True:
            data, peer = s.recvfrom(100)
            s.sendto(data, peer)
    s.listen(64)
    while True:
        c, _ = s.accept()
        c.settimeout(2)
        try:
            c.sendall(c.recv(100))
        except OSError:
            pass
        c.close()
for p in sys.argv[1].split(","):
    threading.Thread(target=serve, args=(socket.SOCK_STREAM, int(p)), daemon=True).start()
for p in sys.argv[2].split(","):
    threading.Thread(target=serve, args=(socket.SOCK_DGRAM, int(p)), daemon=True).start()
print("ready", flush=True)
threading.Event().wait(900)
"""

PROBE = """
import json, socket, subprocess, sys, threading
qs = json.loads(sys.argv[1])
out = [False] * len(qs)
def run(i, proto, addr, port):
    fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
    try:
        if proto == "tcp":
            s = socket.create_connection((addr, port), timeout=1.0)
            s.settimeout(1.0)
            s.sendall(b"hi")
            out[i] = s.recv(10) == b"hi"
            s.close()
        elif proto == "udp":
            s = socket.socket(fam, socket.SOCK_DGRAM)
            s.settimeout(1.0)
            s.sendto(b"hi", (addr, port))
            out[i] = s.recvfrom(10)[0] == b"hi"
        else:
            argv = ["ping", "-n", "-q", "-c", "1", "-W", "1", addr]
            cp = subprocess.run(argv, capture_output=True, timeout=5)
            out[i] = cp.returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        out[i] = False
ts = [threading.Thread(target=run, args=(i, *q)) for i, q in enumerate(qs)]
for t in ts:
    t.start()
for t in ts:
    t.join()
print(json.dumps(out))
"""

POLICY = """
[groups]
"group:eng" = ["alice"]

[tag_owners]
"tag:server" = ["group:eng"]

[[acls]]
action = "accept"
src = ["group:eng"]
dst = ["tag:server:22"]
proto = "tcp"

[[acls]]
action = "accept"
src = ["group:eng"]
dst = ["tag:server:53"]
proto = "udp"

[[acls]]
action = "accept"
src = ["alice"]
dst = ["tag:server:0"]
proto = "icmp"

[[acls]]
action = "accept"
src = ["alice"]
dst = ["tag:server:0"]
proto = "ipv6-icmp"   # icmp is IPv4's protocol 1: pinging over IPv6 needs ICMPv6 named too

[[acls]]
action = "accept"
src = ["autogroup:member"]
dst = ["autogroup:self:*"]

[[tests]]
src = "alice"
accept = ["tag:server:22"]
deny = ["tag:server:80"]
"""
WITH_BOB = POLICY.replace('["alice"]', '["alice", "bob"]', 1)

FLOWS = [("tcp", 22), ("tcp", 80), ("udp", 53), ("udp", 80), ("icmp", 0)]
# what POLICY allows: (src, dst) -> flows; everything else must fail
ALLOWED = {
    ("alice1", "srv1"): {("tcp", 22), ("udp", 53), ("icmp", 0)},
    ("alice1", "alice2"): set(FLOWS),
    ("alice2", "alice1"): set(FLOWS),
    ("alice2", "srv1"): {("tcp", 22), ("udp", 53), ("icmp", 0)},
}
NAMES = ("alice1", "alice2", "bob1", "srv1")


@pytest.fixture(scope="module")
def mesh(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    with module_mesh(request, tmp_path_factory, "policy") as m:
        yield m


def _set_policy(mesh: Mesh, text: str, name: str) -> None:
    path = mesh.workdir / name
    path.write_text(text)
    mesh.ctl("acl", "set", str(path))


@pytest.fixture(scope="module")
def nodes(mesh: Mesh) -> dict[str, Node]:
    _set_policy(mesh, POLICY, "p1.toml")  # before the tagged key: its tag must be declared
    alice = mesh.authkey("--user", "alice", "--reusable", "--expiration", "1h")
    bob = mesh.authkey("--user", "bob", "--expiration", "1h")
    srv = mesh.authkey("--user", "carol", "--tags", "tag:server", "--expiration", "1h")
    out = {
        "alice1": mesh.join("alice1", "lan_a", alice),
        "alice2": mesh.join("alice2", "lan_b", alice),
        "bob1": mesh.join("bob1", "lan_a", bob),
        "srv1": mesh.join("srv1", "lan_b", srv),
    }
    for n in out.values():
        proc = n.host.spawn(
            [sys.executable, "-c", ECHO, ",".join(map(str, TCP_PORTS)), ",".join(map(str, UDP_PORTS))], "echo"
        )
        mesh.lab.wait_for(functools.partial(_ready, proc), timeout=10, interval=0.1, what="echo up")
    return out


def _ready(proc: Proc) -> bool:
    return "ready" in proc.log_text()


def _addrs(mesh: Mesh, nodes: dict[str, Node]) -> dict[str, tuple[str, str]]:
    return {name: n.addresses(mesh) for name, n in nodes.items()}


def _probe(node: Node | Host, queries: list[tuple[str, str, int]]) -> list[bool]:
    host = node.host if isinstance(node, Node) else node
    cp = host.exec([sys.executable, "-c", PROBE, json.dumps(queries)], timeout=30)
    result: list[bool] = json.loads(cp.stdout)
    return result


def _keys(mesh: Mesh, nodes: dict[str, Node]) -> dict[str, str]:
    return {name: str(n.status(mesh)["node_key"]) for name, n in nodes.items()}


def _matrix(
    mesh: Mesh, nodes: dict[str, Node], allowed: dict[tuple[str, str], set[tuple[str, int]]]
) -> list[str]:
    """Probe every flow between every ordered pair over v4 and v6; return the mismatches."""
    addrs = _addrs(mesh, nodes)
    wrong: list[str] = []
    for src in NAMES:
        queries: list[tuple[str, str, int]] = []
        expect: list[tuple[str, bool]] = []
        for dst in NAMES:
            if dst == src:
                continue
            for (proto, port), addr in itertools.product(FLOWS, addrs[dst]):
                queries.append((proto, addr, port))
                ok = (proto, port) in allowed.get((src, dst), set())
                expect.append((f"{src}->{dst} {proto}/{port} via {addr}", ok))
        got = _probe(nodes[src], queries)
        wrong += [
            f"{what}: expected {'pass' if ok else 'fail'}"
            for (what, ok), g in zip(expect, got, strict=True)
            if g != ok
        ]
    return wrong


def test_deny_matrix_tcp_udp_icmp_both_directions(mesh: Mesh, nodes: dict[str, Node]) -> None:
    # allowed flows are up within a bounded wait (first handshakes), then the whole matrix must match
    a1, s1 = nodes["alice1"], nodes["srv1"]
    v4 = s1.addresses(mesh)[0]
    mesh.lab.wait_for(
        lambda: _probe(a1, [("tcp", v4, 22)]) == [True], timeout=10, interval=0.2, what="alice1->srv1:22"
    )
    wrong = _matrix(mesh, nodes, ALLOWED)
    assert wrong == []


def test_nodes_never_learn_of_peers_the_policy_keeps_from_them(mesh: Mesh, nodes: dict[str, Node]) -> None:
    keys = _keys(mesh, nodes)
    expected = {
        "alice1": {"alice2", "srv1"},
        "alice2": {"alice1", "srv1"},
        "bob1": set(),
        "srv1": {"alice1", "alice2"},  # srv1 may not reach them, but they reach it: replies need the peer
    }
    for name, want in expected.items():
        n = nodes[name]
        assert mesh.wg_peer_keys(n) == {keys[w] for w in want}, name
        assert {p["name"] for p in n.peers(mesh)} == want, name


def test_replies_of_an_established_flow_pass(mesh: Mesh, nodes: dict[str, Node]) -> None:
    # srv1 cannot open a connection to alice1 (alice1's filter has no rule for srv1) ...
    a1, s1 = nodes["alice1"], nodes["srv1"]
    a1_v4 = a1.addresses(mesh)[0]
    s1_v4 = s1.addresses(mesh)[0]
    assert _probe(s1, [("tcp", a1_v4, 22), ("udp", a1_v4, 53)]) == [False, False]
    # ... but its replies to the flows alice1 opens pass alice1's filter (conntrack: established)
    assert _probe(a1, [("tcp", s1_v4, 22), ("udp", s1_v4, 53)]) == [True, True]
    table = a1.host.exec(["nft", "list", "table", "inet", f"ghostlink_{a1.ifname.replace('-', '_')}"]).stdout
    assert "ct state established,related accept" in table
    assert s1_v4 not in table  # no rule admits srv1 itself


def test_policy_change_applies_on_every_node_within_2s(mesh: Mesh, nodes: dict[str, Node]) -> None:
    keys = _keys(mesh, nodes)
    b1, s1 = nodes["bob1"], nodes["srv1"]
    s1_v4 = s1.addresses(mesh)[0]
    assert _probe(b1, [("tcp", s1_v4, 22)]) == [False]

    def applied() -> bool:
        return keys["srv1"] in mesh.wg_peer_keys(b1) and keys["bob1"] in mesh.wg_peer_keys(s1)

    start = time.monotonic()
    _set_policy(mesh, WITH_BOB, "p2.toml")
    mesh.lab.wait_for(applied, timeout=2.0, interval=0.05, what="bob1 and srv1 peered")
    mesh.lab.wait_for(
        lambda: _probe(b1, [("tcp", s1_v4, 22)]) == [True], timeout=5, interval=0.05, what="bob1 -> srv1:22"
    )
    took = time.monotonic() - start
    print(f"\npolicy change -> bob1 reaches srv1:22 in {took:.2f}s")
    assert took <= 2.0
    allowed = dict(ALLOWED)
    allowed[("bob1", "srv1")] = {("tcp", 22), ("udp", 53)}  # icmp stays alice-only
    assert _matrix(mesh, nodes, allowed) == []
    # and back: bob1 loses srv1 again (peer removed on both sides) within 2 s
    start = time.monotonic()
    _set_policy(mesh, POLICY, "p1.toml")
    mesh.lab.wait_for(lambda: not applied() and keys["srv1"] not in mesh.wg_peer_keys(b1), timeout=2.0,
                      interval=0.05, what="bob1 and srv1 unpeered")  # fmt: skip
    assert time.monotonic() - start <= 2.0
    assert _probe(b1, [("tcp", s1_v4, 22)]) == [False]


def test_bad_input_is_refused_and_changes_nothing(mesh: Mesh, nodes: dict[str, Node]) -> None:
    before = mesh.ctl("acl", "get")
    group_nope = POLICY.replace('src = ["group:eng"]', 'src = ["group:nope"]', 1)
    failing = POLICY.replace('deny = ["tag:server:80"]', 'deny = ["tag:server:22"]')
    bad = {  # file: (text, what the one-line error must say, ghostctl exit code)
        "malformed.toml": ("[[acls]\n", "(toml)", 2),
        "unknown-group.toml": (group_nope, 'acls[0].src[0]: unknown group "group:nope"', 2),
        "unknown-tag.toml": (
            POLICY.replace("tag:server:22", "tag:nope:22"),
            'acls[0].dst[0]: unknown tag "tag:nope"',
            2,
        ),
        "failing-test.toml": (failing, "tests[0].deny[0]", 1),
    }
    for name, (text, needle, rc) in bad.items():
        path = mesh.workdir / name
        path.write_text(text)
        err = mesh.ctl("acl", "set", str(path), expect_rc=rc)
        assert needle in err, (name, err)
        assert len(err.splitlines()) == 1
        check = mesh.ctl_rc("acl", "check", str(path))
        assert check == 1, name
    assert mesh.ctl("acl", "get") == before
    # still enforced as before
    s1_v4 = nodes["srv1"].addresses(mesh)[0]
    assert _probe(nodes["bob1"], [("tcp", s1_v4, 22)]) == [False]
    # auth keys: an unknown tag is refused even for the admin; over TCP, a user who does not own the tag
    keys_before = len(mesh.ctl("authkeys", "list"))
    err = mesh.ctl("authkeys", "create", "--user", "bob", "--tags", "tag:nope", expect_rc=2)
    assert 'unknown tag "tag:nope"' in err
    api = mesh.ctl("apikeys", "create")["secret"]
    cp = nodes["bob1"].host.exec(
        [GHOSTCTL, "--server", f"{SERVER_IP}:{SERVER_PORT}", "--api-key", api,
         "authkeys", "create", "--user", "bob", "--tags", "tag:server"],
        check=False,
    )  # fmt: skip
    assert cp.returncode != 0
    assert 'user "bob" does not own "tag:server"' in cp.stderr
    assert len(mesh.ctl("authkeys", "list")) == keys_before


# -- grants with via, a subnet as a source, protocols as written ---------------------------------------
# More nodes join the same mesh once the tests above are done: routers r1 (tag:router) and r2 (tag:ha)
# both serve the "site" LAN (203.0.113.0/24, a bridge in r1's namespace with one host that has no
# ghostlink), r1 as the primary; alice3 (user alice) and srv2 (tag:server) accept subnet routes. The site
# reuses lan_b's prefix (the lab allows documentation ranges only), so these nodes all join on lan_a.

SITE, SITE_HOST = "203.0.113.0/24", "203.0.113.10"
ROUTED = """
[groups]
"group:eng" = ["alice"]

[tag_owners]
"tag:server" = ["group:eng"]
"tag:router" = ["group:eng"]
"tag:ha" = ["group:eng"]

[hosts]
site = "203.0.113.0/24"

[[grants]]                # alice reaches the site, only through the tag:router routers
src = ["alice"]
dst = ["site"]
ip = ["tcp:80", "icmp:*"]
via = ["tag:router"]

[[acls]]                  # the site as a source: its hosts reach the servers' port 80
action = "accept"
src = ["site"]
dst = ["tag:server:80"]
proto = "tcp"

[[acls]]                  # no proto: TCP, UDP, ICMP and ICMPv6, never GRE or SCTP
action = "accept"
src = ["alice"]
dst = ["tag:server:*"]

[[acls]]                  # ESP named: shows that a raw protocol the filter admits does arrive
action = "accept"
src = ["alice"]
dst = ["tag:server:*"]
proto = "esp"
"""

RAW_LISTEN = """
import select, socket, sys
socks = {socket.socket(socket.AF_INET, socket.SOCK_RAW, p): p for p in (47, 50, 132)}
print("ready", flush=True)
while True:
    for s in select.select(list(socks), [], [], 60)[0]:
        _, peer = s.recvfrom(2048)
        print(f"got {socks[s]} {peer[0]}", flush=True)
"""

RAW_SEND = """
import socket, sys, time
for _ in range(3):
    for p in (47, 50, 132):
        s = socket.socket(socket.AF_INET, socket.SOCK_RAW, p)
        s.sendto(b"ghost-probe-payload", (sys.argv[1], 0))
        s.close()
    time.sleep(0.2)
"""


@pytest.fixture(scope="module")
def routed(mesh: Mesh, nodes: dict[str, Node]) -> Routed:
    _set_policy(mesh, ROUTED, "routed.toml")
    eng = mesh.authkey("--user", "alice", "--reusable", "--expiration", "1h")
    r1_host = mesh.add_host("r1", "lan_a")
    r2_host = mesh.add_host("r2", "lan_a")
    site = mesh.lab.segment("site", SITE, r1_host, "203.0.113.1")
    mesh.lab.attach(r2_host, site, "203.0.113.2", default_route=False)
    site_host = mesh.lab.host("lanhost")
    mesh.lab.attach(site_host, site, SITE_HOST)  # default route via r1: how the site reaches the mesh
    router_key = mesh.authkey("--user", "alice", "--tags", "tag:router", "--expiration", "1h")
    ha_key = mesh.authkey("--user", "alice", "--tags", "tag:ha", "--expiration", "1h")
    srv_key = mesh.authkey("--user", "alice", "--tags", "tag:server", "--expiration", "1h")
    out = {
        "r1": mesh.join("r1", "lan_a", router_key, host=r1_host),
        "r2": mesh.join("r2", "lan_a", ha_key, host=r2_host),
        "alice3": mesh.join("alice3", "lan_a", eng, "--accept-routes"),
        "srv2": mesh.join("srv2", "lan_a", srv_key, "--accept-routes"),
    }
    assert mesh.ctl("route", "add", SITE, "via", "r1")["primary"] is True
    assert mesh.ctl("route", "add", SITE, "via", "r2")["primary"] is False  # a standby
    for name, host in (("srv2", out["srv2"].host), ("site", site_host)):
        proc = host.spawn([sys.executable, "-c", ECHO, "22,80", "80"], "echo")
        mesh.lab.wait_for(functools.partial(_ready, proc), timeout=10, interval=0.1, what=f"{name} echo up")
    return Routed(out, site_host)


class Routed:
    def __init__(self, nodes: dict[str, Node], site: Host) -> None:
        self.nodes = nodes
        self.site = site

    def __getitem__(self, name: str) -> Node:
        return self.nodes[name]


def _table(node: Node) -> str:
    return node.host.exec(
        ["nft", "list", "table", "inet", f"ghostlink_{node.ifname.replace('-', '_')}"]
    ).stdout


def test_grant_via_reaches_the_site_through_the_named_router_only(mesh: Mesh, routed: Routed) -> None:
    a3 = routed["alice3"]
    mesh.lab.wait_for(
        lambda: _probe(a3, [("tcp", SITE_HOST, 80)]) == [True],
        timeout=10,
        interval=0.2,
        what="alice3 -> site:80",
    )
    assert _probe(a3, [("tcp", SITE_HOST, 22), ("icmp", SITE_HOST, 0)]) == [False, True]
    assert SITE in _table(routed["r1"])  # the router the grant names filters for the site ...
    assert SITE not in _table(routed["r2"])  # ... the standby it does not name gets nothing for it
    peers = {p["name"] for p in a3.peers(mesh)}
    assert {"r1", "srv1", "srv2"} <= peers
    assert "r2" not in peers


def test_a_host_behind_a_router_reaches_a_destination_allowed_from_its_subnet(
    mesh: Mesh, routed: Routed
) -> None:
    srv2_v4 = routed["srv2"].addresses(mesh)[0]
    site = routed.site
    mesh.lab.wait_for(
        lambda: _probe(site, [("tcp", srv2_v4, 80)]) == [True],
        timeout=10,
        interval=0.2,
        what="site -> srv2:80",
    )
    assert _probe(site, [("tcp", srv2_v4, 22)]) == [False]  # only port 80 is granted to the subnet
    assert "r1" in {p["name"] for p in routed["srv2"].peers(mesh)}  # the router is srv2's peer


def test_rule_without_proto_lets_no_gre_or_sctp_through(mesh: Mesh, routed: Routed) -> None:
    a3, s2 = routed["alice3"], routed["srv2"]
    s2_v4, a3_v4 = s2.addresses(mesh)[0], a3.addresses(mesh)[0]
    mesh.lab.wait_for(
        lambda: _probe(a3, [("tcp", s2_v4, 22)]) == [True], timeout=10, interval=0.2, what="alice3 -> srv2:22"
    )
    listener = s2.host.spawn([sys.executable, "-c", RAW_LISTEN], "raw")
    mesh.lab.wait_for(functools.partial(_ready, listener), timeout=10, interval=0.1, what="raw listener up")
    a3.host.exec([sys.executable, "-c", RAW_SEND, s2_v4])
    mesh.lab.wait_for(
        lambda: f"got 50 {a3_v4}" in listener.log_text(), timeout=5, interval=0.1, what="ESP arrives"
    )
    time.sleep(0.5)  # every probe was sent before the ESP ones arrived; give a late one time to show up
    log = listener.log_text()
    assert f"got 47 {a3_v4}" not in log
    assert f"got 132 {a3_v4}" not in log
    table = _table(s2)
    assert "meta l4proto esp accept" in table  # nft lists protocol 50 by its name
    assert "gre" not in table
    assert "sctp" not in table
