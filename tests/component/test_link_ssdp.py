"""The SSDP search that finds a UPnP Internet Gateway Device (ghostlink.traversal.portmap.igd_location),
over a real link between two network namespaces this test creates (a node and its router, joined by a
veth pair; both deleted afterwards): the router's side answers as a UPnP IGD does, from a process joined
to the SSDP multicast group (Debian's miniupnpd cannot be used here: on the documentation ranges, the
only public addresses the lab may use, it turns UPnP off). The search reaches the group through the
node's default gateway, the answer comes back unicast; an answer naming another host's description
is ignored, as is no answer at all (bounded wait)."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.component._link_fixtures import netns_ctx

pytestmark = pytest.mark.netns

REPO = Path(__file__).resolve().parents[2]
NODE_IP, ROUTER_IP = "198.51.100.10", "198.51.100.1"
IGD = "urn:schemas-upnp-org:device:InternetGatewayDevice:1"

# An IGD's SSDP side: joined to 239.255.255.250 on the router's LAN interface, it answers each search
# for the IGD type with LOCATION sys.argv[1], and logs what it got (for the test to read).
RESPONDER = r"""
import socket, struct, sys, time
location, ip = sys.argv[1], sys.argv[2]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("239.255.255.250", 1900))
mreq = socket.inet_aton("239.255.255.250") + socket.inet_aton(ip)
s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
s.settimeout(0.2)
print("ready", flush=True)
end = time.monotonic() + 20
while time.monotonic() < end:
    try:
        data, src = s.recvfrom(2048)
    except TimeoutError:
        continue
    print("search from", src[0], flush=True)
    if b"ST: urn:schemas-upnp-org:device:InternetGatewayDevice:1" in data:
        answer = ("HTTP/1.1 200 OK\r\nCACHE-CONTROL: max-age=120\r\n"
                  "ST: urn:schemas-upnp-org:device:InternetGatewayDevice:1\r\n"
                  "USN: uuid:0::urn:schemas-upnp-org:device:InternetGatewayDevice:1\r\nEXT:\r\n"
                  f"LOCATION: {location}\r\n\r\n")
        s.sendto(answer.encode(), src)
"""

SEARCH = f"""
import asyncio, time
from ghostlink.traversal.portmap import igd_location
t = time.monotonic()
found = asyncio.run(igd_location("{NODE_IP}", "{ROUTER_IP}", wait=2.0))
print(found, round(time.monotonic() - t, 2))
"""


@pytest.fixture
def lan() -> Iterator[tuple[str, str]]:
    """(node namespace, router namespace) on one LAN, the router as the node's default gateway."""
    with netns_ctx() as node, netns_ctx() as router:
        veth = f"glv{node[-4:]}"
        ip = ["ip", "-n", node]
        subprocess.run(
            [*ip, "link", "add", veth, "type", "veth", "peer", "name", "lan0", "netns", router], check=True
        )
        subprocess.run([*ip, "addr", "add", f"{NODE_IP}/24", "dev", veth], check=True)
        subprocess.run([*ip, "link", "set", veth, "up"], check=True)
        subprocess.run([*ip, "route", "add", "default", "via", ROUTER_IP], check=True)
        subprocess.run(["ip", "-n", router, "addr", "add", f"{ROUTER_IP}/24", "dev", "lan0"], check=True)
        subprocess.run(["ip", "-n", router, "link", "set", "lan0", "up"], check=True)
        yield node, router


def _search(node: str, location: str | None, router: str) -> tuple[str, float, str]:
    """Run the search in ``node`` with (``location`` not None) an IGD answering in ``router``; the
    search's result, its duration, and what the responder saw."""
    responder = None
    if location is not None:
        responder = subprocess.Popen(
            ["ip", "netns", "exec", router, sys.executable, "-c", RESPONDER, location, ROUTER_IP],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert responder.stdout is not None
        assert responder.stdout.readline().strip() == "ready"
    try:
        out = subprocess.run(
            ["ip", "netns", "exec", node, sys.executable, "-c", SEARCH],
            capture_output=True, text=True, timeout=30, check=True, cwd=REPO,
        )  # fmt: skip
    finally:
        seen = ""
        if responder is not None:
            responder.kill()
            seen = responder.communicate(timeout=10)[0]
    found, took = out.stdout.split()
    return found, float(took), seen


def test_the_gateways_igd_is_found_by_its_answer(lan: tuple[str, str]) -> None:
    node, router = lan
    location = f"http://{ROUTER_IP}:5000/rootDesc.xml"
    found, took, seen = _search(node, location, router)
    assert found == location
    assert f"search from {NODE_IP}" in seen
    assert took < 1.5  # the first answer ends the search; no waiting out the MX


def test_an_answer_naming_another_host_is_ignored(lan: tuple[str, str]) -> None:
    node, router = lan
    found, took, seen = _search(node, "http://198.51.100.7:5000/rootDesc.xml", router)
    assert found == "None"
    assert f"search from {NODE_IP}" in seen  # it did answer
    assert 1.9 < took < 5


def test_no_answer_is_none_after_the_wait(lan: tuple[str, str]) -> None:
    node, _ = lan
    started = time.monotonic()
    found, took, _ = _search(node, None, "")
    assert found == "None"
    assert 1.9 < took < 5
    assert time.monotonic() - started < 15
