"""Tests of the lab's NAT routers: each router kind's mapping and filtering, and the hole-punching grid.

One world per module (building it once keeps the module fast)::

      public 192.0.2.0/24 ("inet" router .254): reflectors r1 .10 (UDP 3478, TCP 443 + 8080),
      │                                         r2 .11 (UDP 3478), stranger c .12, public hosts p1 .30, p2 .31
      ├── easy1 .21 ── 198.51.100.0/26    e1   ├── hard1 .23 ── 198.51.100.128/26  h1
      ├── easy2 .22 ── 198.51.100.64/26   e2   ├── hard2 .24 ── 198.51.100.192/26  h2
      ├── blk1  .25 ── 203.0.113.0/26     u1   (udp_blocked, TCP 443 only)
      └── blk2  .26 ── 203.0.113.64/26    u2   (udp_blocked, TCP 443 only)

Facts measured here (kernel 6.18, nftables 1.0.6), asserted below:

* easy (``masquerade``): one public endpoint for every destination, with the inner source port kept.
* hard (``masquerade random``): a new public port per destination, scattered (1690..62926 seen) with no
  sequence (three destinations from one socket: 22440, 33055, 13788); ``fully-random`` and
  ``random,persistent`` measured the same, so port prediction has nothing to extrapolate from.
* easy filtering (hard has the same filter chain): only datagrams from the exact ip:port contacted
  pass; another port of the same host, another host and a stranger are dropped (a public host gets all
  three: the control).
* udp_blocked: UDP out gets no answer, TCP to the relay port connects (NATed), TCP to another port fails.
* hole punching: ``PUNCH_GRID`` (naive, and with ICE's peer-reflexive answer).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from lab import Host, Lab, LabError, Proc, Segment, lab_for
from lab.nat import punch, tcp_observe, tcp_reflector, udp_observe, udp_reflector

pytestmark = pytest.mark.netns

R1 = ("192.0.2.10", 3478)
R2 = ("192.0.2.11", 3478)
RELAY_TCP = 443
OTHER_TCP = 8080


@dataclass
class World:
    lab: Lab
    pub: Segment
    hosts: dict[str, Host]
    wan: dict[str, str]  # host name -> the public address its traffic leaves with


@pytest.fixture(scope="module")
def world(request: pytest.FixtureRequest) -> Iterator[World]:
    lab = lab_for(request, name="natlab")
    with lab:
        inet = lab.router("inet")
        pub = lab.segment("pub", "192.0.2.0/24", inet, "192.0.2.254")
        hosts: dict[str, Host] = {}
        wan: dict[str, str] = {}
        for name, ip in (("r1", "192.0.2.10"), ("r2", "192.0.2.11"), ("c", "192.0.2.12")):
            hosts[name] = lab.host(name)
            lab.attach(hosts[name], pub, ip)
        for name, ip in (("p1", "192.0.2.30"), ("p2", "192.0.2.31")):  # kind "none": on the public segment
            hosts[name] = lab.host(name)
            lab.attach(hosts[name], pub, ip)
            wan[name] = ip
        routers = (
            ("e1", "easy", "192.0.2.21", "198.51.100.0/26"),
            ("e2", "easy", "192.0.2.22", "198.51.100.64/26"),
            ("h1", "hard", "192.0.2.23", "198.51.100.128/26"),
            ("h2", "hard", "192.0.2.24", "198.51.100.192/26"),
            ("u1", "udp_blocked", "192.0.2.25", "203.0.113.0/26"),
            ("u2", "udp_blocked", "192.0.2.26", "203.0.113.64/26"),
        )
        for name, kind, wan_ip, lan in routers:
            base = lan.split("/")[0].rsplit(".", 1)
            first = int(base[1])
            _, seg = lab.nat_router(
                f"nat-{name}",
                kind,
                pub,
                wan_ip,
                lan_cidr=lan,
                lan_router_ip=f"{base[0]}.{first + 1}",
                tcp_port=RELAY_TCP if kind == "udp_blocked" else None,
            )
            hosts[name] = lab.host(name)
            lab.attach(hosts[name], seg, f"{base[0]}.{first + 10}")
            wan[name] = wan_ip
        udp_reflector(hosts["r1"], R1[1])
        udp_reflector(hosts["r2"], R2[1])
        tcp_reflector(hosts["r1"], RELAY_TCP)
        tcp_reflector(hosts["r1"], OTHER_TCP)
        yield World(lab, pub, hosts, wan)
        lab.assert_no_tracebacks()
    assert lab.leftovers() == []


def test_nat_router_refuses_misuse(world: World) -> None:
    lab, pub = world.lab, world.pub
    with pytest.raises(LabError, match="public host"):
        lab.nat_router(
            "x1", "none", pub, "192.0.2.40", lan_cidr="203.0.113.128/26", lan_router_ip="203.0.113.129"
        )
    with pytest.raises(LabError, match="unknown kind"):
        lab.nat_router(
            "x2", "cone", pub, "192.0.2.41", lan_cidr="203.0.113.128/26", lan_router_ip="203.0.113.129"
        )
    with pytest.raises(LabError, match="tcp_port"):
        lab.nat_router(
            "x3", "udp_blocked", pub, "192.0.2.42", lan_cidr="203.0.113.128/26", lan_router_ip="203.0.113.129"
        )
    with pytest.raises(LabError, match="outside"):
        lab.nat_router("x4", "easy", pub, "192.0.2.43", lan_cidr="10.1.0.0/24", lan_router_ip="10.1.0.1")
    with pytest.raises(LabError, match="outside"):
        lab.nat_router(
            "x5", "easy", pub, "8.8.8.8", lan_cidr="203.0.113.128/26", lan_router_ip="203.0.113.129"
        )


def test_public_host_is_seen_as_itself(world: World) -> None:
    p1 = world.hosts["p1"]
    assert udp_observe(p1, 40000, [R1, R2]) == [(p1.addr, 40000), (p1.addr, 40000)]


def test_easy_mapping_is_endpoint_independent_and_keeps_the_port(world: World) -> None:
    e1 = world.hosts["e1"]
    seen = udp_observe(e1, 40001, [R1, R2])
    # Plain masquerade: one public endpoint for every destination, and it is the inner port.
    assert seen == [(world.wan["e1"], 40001), (world.wan["e1"], 40001)]


def test_hard_mapping_depends_on_destination(world: World) -> None:
    h1 = world.hosts["h1"]
    seen = udp_observe(h1, 40002, [R1, R2])
    assert all(s is not None and s[0] == world.wan["h1"] for s in seen)
    ports = {s[1] for s in seen if s is not None}
    assert len(ports) == 2, f"masquerade random gave the same public port to both destinations: {seen}"


_LISTEN = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.settimeout(0.1)
end = time.monotonic() + float(sys.argv[4])
while time.monotonic() < end:
    s.sendto(b"keepalive", (sys.argv[2], int(sys.argv[3])))
    try:
        data, src = s.recvfrom(2048)
    except TimeoutError:
        continue
    print(f"got {src[0]}:{src[1]} {data.decode(errors='replace')}", flush=True)
"""

_SEND = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
for _ in range(10):
    s.sendto(sys.argv[4].encode(), (sys.argv[2], int(sys.argv[3])))
    time.sleep(0.05)
"""


def _has(proc: Proc, text: str) -> bool:
    return text in proc.log_text()


def _exited(proc: Proc) -> bool:
    return not proc.alive()


def _send(host: Host, src_port: int, dst: tuple[str, int], tag: str) -> None:
    host.exec([sys.executable, "-c", _SEND, str(src_port), dst[0], str(dst[1]), tag], timeout=10)


def test_easy_filtering_is_address_and_port_dependent(world: World) -> None:
    lab, h = world.lab, world.hosts
    port = 40003
    listeners = {
        name: h[name].spawn(
            [sys.executable, "-c", _LISTEN, str(port), *R1[0:1], str(R1[1]), "6"], f"listen-{port}"
        )
        for name in ("e1", "p1")
    }
    for proc in listeners.values():
        lab.wait_for(
            functools.partial(_has, proc, f"got {R1[0]}:{R1[1]}"), timeout=5, what="reflector replies"
        )
    for name in ("e1", "p1"):
        target = (world.wan[name], port)
        _send(h["c"], 5000, target, "from-stranger")  # a third host
        _send(h["r1"], 5001, target, "from-r1-other-port")  # the contacted address, another port
        _send(h["r2"], R2[1] + 1, target, "from-r2")
    for proc in listeners.values():
        lab.wait_for(functools.partial(_exited, proc), timeout=10, what="listener to finish")
    easy, public = listeners["e1"].log_text(), listeners["p1"].log_text()
    # The control: a public host (kind "none") gets every unsolicited datagram, so they were really sent.
    assert "from-stranger" in public
    assert "from-r1-other-port" in public
    assert "from-r2" in public
    # Behind easy: only the contacted ip:port gets through (replies kept flowing all along).
    assert "from-stranger" not in easy
    assert "from-r1-other-port" not in easy
    assert "from-r2" not in easy
    assert easy.count(f"got {R1[0]}:{R1[1]} {world.wan['e1']}:{port}") >= 10


def test_udp_blocked_allows_only_tcp_to_the_relay_port(world: World) -> None:
    u1, p1 = world.hosts["u1"], world.hosts["p1"]
    assert udp_observe(u1, 40004, [R1], timeout=1.0) == [None]
    tcp = tcp_observe(u1, R1[0], RELAY_TCP)
    assert tcp is not None
    assert tcp[0] == world.wan["u1"]
    assert tcp_observe(u1, R1[0], OTHER_TCP, timeout=1.0) is None
    # The control: the same port answers a public host, so the refusal above is the firewall.
    assert tcp_observe(p1, R1[0], OTHER_TCP) is not None
    assert udp_observe(p1, 40004, [R1]) == [(p1.addr, 40004)]


# Measured here; test_paths_grid.py judges NAT traversal against these. (naive, with peer-reflexive learning)
PUNCH_GRID: dict[tuple[str, str], tuple[bool, bool]] = {
    ("p1", "p2"): (True, True),  # none <-> none
    ("p1", "e1"): (True, True),  # none <-> easy
    ("p1", "h1"): (False, True),  # none <-> hard: needs answering the peer-reflexive source
    ("p1", "u1"): (False, False),  # none <-> udp_blocked: relay (TCP) only
    ("e1", "e2"): (True, True),  # easy <-> easy: simultaneous send opens both filters
    ("e1", "h1"): (False, False),  # easy <-> hard: needs port guessing (birthday probing) or a relay
    ("e1", "u1"): (False, False),
    ("h1", "h2"): (False, False),  # hard <-> hard: relay
    ("h1", "u1"): (False, False),
    ("u1", "u2"): (False, False),
}


@pytest.mark.parametrize(("pair", "expected"), list(PUNCH_GRID.items()), ids=lambda v: "-".join(map(str, v)))
def test_hole_punching_grid(world: World, pair: tuple[str, str], expected: tuple[bool, bool]) -> None:
    a, b = (world.hosts[n] for n in pair)
    index = list(PUNCH_GRID).index(pair)
    naive = punch(a, 41000 + index, b, 42000 + index, reflector=R1, seconds=2.0)
    learned = punch(a, 43000 + index, b, 44000 + index, reflector=R1, seconds=2.0, learn=True)
    assert (naive, learned) == expected
