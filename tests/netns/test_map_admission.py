"""A real node (ghostlink + wireguard-go in a namespace) fed a hostile map by a patched coordinator.

The coordinator is the component tests' ``FakeCoordination`` (TLS, v2 proofs: a node cannot tell it from
ghostmesh), here sending what ghostmesh itself would refuse at its edge: a peer whose endpoint is an IPv6
zone ID carrying a UAPI line (``[fe80::1%x\\nremove=true]:41641``), a peer that is no exit node offering the
two halves of the IPv4 default route, and a peer with a subnet route nobody approved. The node must refuse
exactly those, install the rest, and go on applying the map: a later removal and addition reach
WireGuard (before, such an endpoint broke the UAPI request and the node never applied a map again).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ghostcore.keys import PrivateKey
from lab import Lab, lab_for
from lab.mesh import GHOSTCTL, GHOSTLINK
from lab.netns import Host

pytestmark = pytest.mark.netns

REPO = Path(__file__).resolve().parents[2]
ZONE_ENDPOINT = "[fe80::1%x\nremove=true]:41641"
COORDINATOR = """
import asyncio, json, pathlib, sys
from tests.component._link_fixtures import FakeCoordination, make_node, start_server
keys = json.loads(sys.argv[2])
async def main():
    c = FakeCoordination()
    good = make_node(2, keys["good"], endpoints=("198.51.100.2:41641",))
    zone = make_node(3, keys["zone"], endpoints=(sys.argv[3],))
    halves = make_node(4, keys["halves"], endpoints=("198.51.100.4:41641",))
    halves.allowed_ips.extend(["0.0.0.0/1", "128.0.0.0/1"])
    router = make_node(5, keys["router"], endpoints=("198.51.100.5:41641",))
    router.allowed_ips.append("10.9.0.0/16")  # in its allowed IPs, not among its approved primary routes
    c.peers = {n.id: n for n in (good, zone, halves, router)}
    server, target, pin = await start_server(c)
    print(target, pin, flush=True)
    trigger = pathlib.Path(sys.argv[1])
    for _ in range(1200):  # bounded: 120 s
        if trigger.exists() and c.streams:
            break
        await asyncio.sleep(0.1)
    c.remove(2)
    c.upsert(make_node(6, keys["later"], endpoints=("198.51.100.6:41641",)))
    await asyncio.Event().wait()
asyncio.run(main())
"""


@pytest.fixture
def lab(request: pytest.FixtureRequest) -> Iterator[Lab]:
    with lab_for(request, name="admit") as lab:
        yield lab
        lab.assert_no_tracebacks()
    assert lab.leftovers() == []


def _allowed_ips(host: Host, ifname: str) -> dict[str, set[str]]:
    out = host.exec(["wg", "show", ifname, "allowed-ips"], timeout=10).stdout
    table: dict[str, set[str]] = {}
    for line in out.splitlines():
        key, _, ips = line.partition("\t")
        table[key] = {ip for ip in ips.split() if ip != "(none)"}
    return table


def _status(host: Host, sock: Path) -> dict[str, Any]:
    cp = host.exec([GHOSTCTL, "--socket", str(sock), "-o", "json", "status"], check=False, timeout=10)
    return json.loads(cp.stdout) if cp.returncode == 0 else {}


@pytest.mark.parametrize("accept_routes", [False, True])
def test_a_hostile_map_is_refused_in_part_and_the_rest_still_applies(
    lab: Lab, tmp_path: Path, accept_routes: bool
) -> None:
    host = lab.host("node")
    keys = {
        n: PrivateKey.generate().public_key().base64() for n in ("good", "zone", "halves", "router", "later")
    }
    trigger = tmp_path / "go"
    coord = host.spawn(
        [sys.executable, "-c", COORDINATOR, str(trigger), json.dumps(keys), ZONE_ENDPOINT],
        "coordinator",
        env={"PYTHONPATH": str(REPO)},
    )
    first = lab.wait_for(lambda: coord.log_text().strip().splitlines()[:1], timeout=15, what="coordinator up")
    target, pin = first[0].split()
    ifname, sock = lab.wg_ifname("adm"), tmp_path / "gl.sock"
    host.spawn(
        [GHOSTLINK, "join", "--server", target, "--auth", f"tskey-good.{pin}", "--hostname", "n1",
         "--state-dir", str(tmp_path / "state"), "--interface", ifname, "--listen-port", "0",
         "--socket", str(sock), "--backend", "wireguard-go", "--log-level", "debug",
         *(["--accept-routes"] if accept_routes else [])],
        "ghostlink",
    )  # fmt: skip
    status = lab.wait_for(
        lambda: (s := _status(host, sock)).get("connected") and s, timeout=20, what="joined"
    )
    table = lab.wait_for(
        lambda: (t := _allowed_ips(host, ifname)) and len(t) == 3 and t, timeout=10, what="wg"
    )
    assert keys["zone"] not in table  # refused whole: its record is malformed
    assert table[keys["good"]] == {"100.64.0.2/32", "fd7a:115c:a1e0::2/128"}
    assert table[keys["halves"]] == {"100.64.0.4/32", "fd7a:115c:a1e0::4/128"}  # no 0.0.0.0/1, 128.0.0.0/1
    assert table[keys["router"]] == {"100.64.0.5/32", "fd7a:115c:a1e0::5/128"}  # no 10.9.0.0/16
    status = _status(host, sock)
    refused = status["refused"]
    assert sum(r.startswith("node3: peer: malformed record") for r in refused) == 1
    # Without --accept-routes no subnet route is taken; with it, the halves are too wide to be one and
    # 10.9.0.0/16 is not a route ghostmesh made this peer the router for.
    why_halves = "wider than /8" if accept_routes else "a subnet route"
    why_route = "ghostmesh does not name this peer its router" if accept_routes else "a subnet route"
    assert any(r.startswith(f"node4: allowed IP 0.0.0.0/1: {why_halves}") for r in refused)
    assert any(r.startswith(f"node4: allowed IP 128.0.0.0/1: {why_halves}") for r in refused)
    assert any(r.startswith(f"node5: allowed IP 10.9.0.0/16: {why_route}") for r in refused)
    assert status["refused_total"] == 4
    assert "\n" not in "".join(refused)
    routes = host.exec(["ip", "route", "show", "dev", ifname], timeout=10).stdout
    assert "0.0.0.0/1" not in routes
    assert "10.9.0.0/16" not in routes
    # The node goes on applying the map: a removal and an addition reach WireGuard.
    trigger.write_text("go\n")
    table = lab.wait_for(
        lambda: (t := _allowed_ips(host, ifname)) and keys["later"] in t and keys["good"] not in t and t,
        timeout=10,
        what="the next delta applied",
    )
    assert set(table) == {keys["halves"], keys["router"], keys["later"]}
    assert _status(host, sock)["connected"]
