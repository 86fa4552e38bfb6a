"""ghostgate as a real process in network namespaces, with its default ``denied_peers``.

A public segment 203.0.113.0/24: ghostgate at .10 (no default route, so 198.51.100.99 is unroutable and
its sends fail with ENETUNREACH, the case that makes coturn drop the whole allocation), a peer running a
UDP reflector at .20, and a client at .30. Checks: aioice's TURN client relays to the peer; a loopback peer
is refused with 403 and an unroutable peer fails to send, and the same allocation (same relayed address)
still relays afterwards; coturn's ``turnutils_uclient`` relays between two allocations with the default
configuration (relayed addresses on 203.0.113.10 are not denied).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import shutil
import sys
import time
from pathlib import Path

import pytest

from lab import Host, Lab, Proc, lab_for
from lab.nat import udp_reflector

pytestmark = pytest.mark.netns

SECRET = "netns-secret"
GATE, PEER, CLIENT = "203.0.113.10", "203.0.113.20", "203.0.113.30"
_MAIN = "import sys; from ghostgate.app import main; sys.exit(main())"

_CLIENT = r"""
import asyncio, json, sys
from aioice.turn import create_turn_endpoint

class P(asyncio.DatagramProtocol):
    def __init__(self):
        self.q = asyncio.Queue(); self.errors = []
    def datagram_received(self, data, addr):
        self.q.put_nowait((data, addr))
    def error_received(self, exc):
        self.errors.append(str(exc))

async def main():
    server, user, password, peer = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
    turn, p = await asyncio.wait_for(create_turn_endpoint(P, (server, 3478), user, password), 5)
    out = {"relayed": list(turn.get_extra_info("sockname"))}
    turn.sendto(b"first", (peer, 4000))
    out["first"] = (await asyncio.wait_for(p.q.get(), 5))[0].decode()
    turn.sendto(b"x", ("127.0.0.1", 4000))
    turn.sendto(b"x", ("198.51.100.99", 4000))
    await asyncio.sleep(1.0)
    out["errors"] = list(p.errors)
    turn.sendto(b"again", (peer, 4000))
    out["again"] = (await asyncio.wait_for(p.q.get(), 5))[0].decode()
    turn.close()
    await asyncio.sleep(0.3)
    print(json.dumps(out))

asyncio.run(main())
"""


def _creds(user: str) -> tuple[str, str]:
    username = f"{int(time.time()) + 3600}:{user}"
    mac = hmac.new(SECRET.encode(), username.encode(), hashlib.sha1).digest()
    return username, base64.b64encode(mac).decode()


def _lab(lab: Lab) -> tuple[Host, Host, Host]:
    r = lab.router("r1")
    pub = lab.segment("pub", "203.0.113.0/24", r, "203.0.113.1")
    gate, peer, client = lab.host("gate"), lab.host("peer"), lab.host("client")
    lab.attach(gate, pub, GATE, default_route=False)
    lab.attach(peer, pub, PEER)
    lab.attach(client, pub, CLIENT)
    return gate, peer, client


def _start_gate(lab: Lab, gate: Host, tmp_path: Path) -> Proc:
    conf = tmp_path / "ghostgate.toml"
    conf.write_text(f'[relay]\nlisten = "{GATE}:3478"\n[turn]\nsecret = "{SECRET}"\n')
    proc = gate.spawn(
        [sys.executable, "-c", _MAIN, "--config", str(conf), "--log-level", "debug"],
        "ghostgate",
    )
    lab.wait_for(lambda: "listening on" in proc.log_text(), timeout=10, what="ghostgate ready")
    return proc


def test_denied_and_unroutable_peers_keep_the_allocation(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    with lab_for(request, tmp_path) as lab:
        gate, peer, client = _lab(lab)
        udp_reflector(peer, 4000, max_seconds=60)
        gate_proc = _start_gate(lab, gate, tmp_path)
        username, password = _creds("alice")
        cp = client.exec([sys.executable, "-c", _CLIENT, GATE, username, password, PEER], timeout=40)
        out = json.loads(cp.stdout.strip().splitlines()[-1])
        relayed = f"{out['relayed'][0]}:{out['relayed'][1]}"
        assert out["relayed"][0] == GATE
        assert out["first"] == relayed  # the reflector saw the relayed address
        assert any("403" in e for e in out["errors"])  # 127.0.0.1: denied by default
        assert out["again"] == relayed  # the same allocation still relays
        assert "198.51.100.99" in gate_proc.log_text()
        assert "Network is unreachable" in gate_proc.log_text()  # the send really failed
        lab.assert_no_tracebacks()


@pytest.mark.skipif(shutil.which("turnutils_uclient") is None, reason="apt-get install coturn")
def test_turnutils_uclient_relays_with_default_config(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    with lab_for(request, tmp_path) as lab:
        gate, _, client = _lab(lab)
        _start_gate(lab, gate, tmp_path)
        username, password = _creds("bob")
        cp = client.exec(
            ["turnutils_uclient", "-y", "-c", "-n", "20", "-l", "300", "-z", "5",
             "-u", username, "-w", password, "-L", CLIENT, GATE],
            timeout=40,
            check=False,
        )  # fmt: skip
        assert cp.returncode == 0, cp.stdout + cp.stderr
        assert "start_mclient: tot_send_msgs=40, tot_recv_msgs=40" in cp.stdout, cp.stdout
        assert "Total lost packets 0 " in cp.stdout, cp.stdout
        lab.assert_no_tracebacks()
