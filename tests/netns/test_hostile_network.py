"""The control channel on a hostile network: real ghostmesh, ghostlink, wireguard-go and ghostctl, namespaced.

An attacker host ("evil", on ghostmesh's segment) runs ``lab.tcpproxy`` three ways:

* a byte-forwarding proxy on the path (what an eavesdropper reads): a join, the map with relay
  credentials, a key rotation and a remote ``ghostctl`` call cross it, and none of the auth key, the API
  key, the TURN password, the relay token, the nodes' names, keys or addresses appear in what it saw;
* a TLS-terminating man in the middle with its own key: ``ghostlink join`` and ``ghostlink run`` refuse
  with the one-line pin error before sending anything, and write nothing;
* the same man in the middle trusted by a node (pinned to the attacker's key, as a compromised
  middlebox would be): it reads the node's requests in plaintext and plays them again, rewritten or
  not, straight to ghostmesh; every one is refused and the node keeps its key and name.
"""

from __future__ import annotations

import hashlib
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ghostcore import relaywire, turnrest
from ghostcore.keys import PrivateKey
from lab import tcpproxy
from lab.mesh import GHOSTCTL, SERVER_IP, SERVER_PORT, Mesh, Node, module_mesh
from lab.netns import Host
from lab.procs import Proc

pytestmark = pytest.mark.netns

SECRET = "hostile-network-relay-secret"
LIFETIME = 3600
# A relay region nobody serves: enough for ghostmesh to mint TURN and relay credentials into every map.
RELAY = f"""
[relay]
secret = "{SECRET}"
credential_lifetime = "1h"

[[relay.regions]]
id = 1
name = "nowhere"
host = "192.0.2.250"
"""


class Attacker:
    def __init__(self, mesh: Mesh, host: Host) -> None:
        self.mesh = mesh
        self.host = host
        self.procs: list[Proc] = []

    def proxy(self, port: int, capture: Path, *, mitm: bool) -> str:
        argv = [sys.executable, "-m", "lab.tcpproxy", "--listen", f"{self.host.addr}:{port}",
                "--upstream", f"{SERVER_IP}:{SERVER_PORT}", "--capture", str(capture)]  # fmt: skip
        proc = self.host.spawn([*argv, *(["--mitm"] if mitm else [])], f"proxy{port}")
        self.procs.append(proc)
        self.mesh.lab.wait_for((capture / "ready").exists, timeout=10, what=f"proxy on {port}")
        return f"{self.host.addr}:{port}"

    def replay(self, stream: Path, *substitute: str) -> None:
        args = ["--substitute", *substitute] if substitute else []
        self.host.exec([sys.executable, "-m", "lab.tcpproxy", "--replay", str(stream),
                        "--upstream", f"{SERVER_IP}:{SERVER_PORT}", *args], timeout=30)  # fmt: skip


@pytest.fixture(scope="module")
def mesh(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    with module_mesh(request, tmp_path_factory, "hostile", start=False) as m:
        m.start_server(RELAY)
        yield m


@pytest.fixture(scope="module")
def evil(mesh: Mesh) -> Iterator[Attacker]:
    attacker = Attacker(mesh, mesh.add_host("evil", "pub"))
    yield attacker
    for proc in attacker.procs:
        proc.stop()


def _v4(mesh: Mesh, node: Node) -> str:
    return node.addresses(mesh)[0]


def _credentials(node_id: int, node_key: str, since: float, until: float) -> list[bytes]:
    """Every TURN password and relay token ghostmesh could have minted for the node in [since, until]."""
    out = []
    for expiry in range(int(since) + LIFETIME - 5, int(until) + LIFETIME + 5):
        username = turnrest.rest_username(expiry, str(node_id))
        out.append(turnrest.rest_password(SECRET.encode(), username).encode())
        out.append(relaywire.token_mac(SECRET.encode(), node_key, expiry))
    return out


def test_an_eavesdropper_on_the_path_reads_no_secret(mesh: Mesh, evil: Attacker) -> None:
    capture = mesh.workdir / "tap"
    tap = evil.proxy(7777, capture, mitm=False)
    started = time.time()
    auth = mesh.authkey("--reusable", "--expiration", "1h")
    victim = mesh.join("victim", "lan_a", auth, server=tap)  # every control call of victim crosses the tap
    other = mesh.join("other", "lan_b", auth)
    mesh.lab.wait_for(
        lambda: victim.host.ping(_v4(mesh, other), timeout=1), timeout=15, what="victim pings other"
    )
    old_key = victim.status(mesh)["node_key"]
    rotated = mesh.ctl("--socket", str(victim.socket), "keys", "rotate")["new_node_key"]
    mesh.lab.wait_for(lambda: rotated in mesh.wg_peer_keys(other), timeout=15, what="other has the new key")
    api_key = mesh.ctl("apikeys", "create", "--expiration", "1h")["secret"]
    remote = victim.host.exec(
        [GHOSTCTL, "--server", tap, "--api-key", api_key, "-o", "json", "nodes", "list"], timeout=30
    )
    assert '"victim"' in remote.stdout  # the remote call went through the tap and worked
    time.sleep(1)  # let the last bytes reach the capture files
    seen = tcpproxy.captured(capture, "c2s") + tcpproxy.captured(capture, "s2c")
    # It saw real traffic: TLS records (RFC 8446 section 5.1: type 0x16 handshake, legacy version 0x0303).
    assert len(seen) > 10_000
    assert tcpproxy.captured(capture, "c2s").startswith(b"\x16\x03")
    nodes = mesh.server_nodes()
    secrets: dict[str, bytes] = {
        "auth key": auth.split(".")[0].encode(),
        "auth key secret": auth.split(".")[0].split("_", 2)[2].encode(),
        "API key": api_key.split(".")[0].encode(),
        "API key secret": api_key.split(".")[0].split("_", 2)[2].encode(),
        "node name": b"victim",
        "peer name": b"other",
    }
    for name in ("victim", "other"):
        n = nodes[name]
        for i, a in enumerate(n["addresses"]):
            secrets[f"{name} address {i}"] = a.encode()
        secrets[f"{name} key"] = n["node_key"].encode()
    secrets["victim's old key"] = old_key.encode()
    leaks = [what for what, value in secrets.items() if value in seen]
    assert leaks == []
    for n in (nodes["victim"], nodes["other"]):
        for key in {n["node_key"], old_key, rotated}:
            minted = _credentials(n["id"], key, started, time.time())
            assert not any(c in seen for c in minted), f"a relay credential of {n['name']} leaked"


def _exited(mesh: Mesh, proc: Proc, what: str) -> int:
    code: int = mesh.lab.wait_for(proc.popen.poll, timeout=20, what=what)
    return code


def test_a_man_in_the_middle_with_its_own_key_gets_nothing(mesh: Mesh, evil: Attacker) -> None:
    capture = mesh.workdir / "mitm"
    mitm = evil.proxy(7778, capture, mitm=True)
    mitm_pin = (capture / "pin").read_text().strip()
    real_pin = mesh.pin()
    auth = mesh.authkey()
    # join: refused on the pin, before any request, nothing written
    node = mesh.prepare_node("gullible", "lan_a")
    proc = mesh.start_node(node, "join", "--auth", auth, server=mitm)
    assert _exited(mesh, proc, "join through the man in the middle ends") == 1
    lines = [line for line in proc.log_text().splitlines() if line.startswith("ghostlink: ")]
    assert lines == [
        f"ghostlink: ghostmesh at {mitm} presents TLS key {mitm_pin}, not the pinned {real_pin}: someone may "
        "be intercepting the connection, or the server's TLS key changed (then get a new key from its "
        "admin: `ghostctl server pin` on the server)"
    ]
    assert not node.state_dir.exists()
    # run: a node that joined for real is started against the man in the middle: same refusal
    honest = mesh.join("honest", "lan_b", mesh.authkey())
    assert honest.proc is not None
    honest.proc.stop()
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in honest.state_dir.iterdir()}
    proc = mesh.start_node(honest, "run", server=mitm)
    assert _exited(mesh, proc, "run through the man in the middle ends") == 1
    assert f"presents TLS key {mitm_pin}, not the pinned {real_pin}" in proc.log_text()
    after = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in honest.state_dir.iterdir()}
    assert after == before
    # nothing but TLS handshakes reached the attacker: no HTTP/2 connection preface (RFC 9113 3.4)
    assert b"PRI * HTTP/2.0" not in tcpproxy.captured(capture, "c2s")
    mesh.start_node(honest, "run")  # back on the real server, for the module's other tests
    mesh.wait_connected(honest)


def _stream_with(capture: Path, needle: bytes) -> Path:
    for path in sorted(capture.glob("*.c2s"), key=lambda p: int(p.name.split(".")[0])):
        if needle in path.read_bytes():
            return path
    raise AssertionError(f"no recorded stream holds {needle[:20]!r}")


def test_requests_read_in_plaintext_cannot_be_replayed_or_rewritten(mesh: Mesh, evil: Attacker) -> None:
    capture = mesh.workdir / "trusted-mitm"
    mitm = evil.proxy(7779, capture, mitm=True)
    mitm_pin = (capture / "pin").read_text().strip()
    bare_key = mesh.authkey().split(".")[0]
    # A node that trusts the attacker's key (as if the attacker held the server's): all plaintext to it.
    node = mesh.join("trusting", "lan_a", bare_key, "--pin", mitm_pin, server=mitm)
    rotation = mesh.ctl("--socket", str(node.socket), "keys", "rotate")
    old, new = rotation["old_node_key"], rotation["new_node_key"]
    mesh.lab.wait_for(lambda: mesh.server_nodes()["trusting"]["node_key"] == new, timeout=10, what="rotated")
    assert mesh.server is not None
    log_before = mesh.server.log_text()
    audit_before = len(mesh.ctl("audit", "list"))
    stream = _stream_with(capture, new.encode())  # the connection that carried the RotateKey
    # 1. played again as it was: every request on it is refused as a replay
    evil.replay(stream)
    # 2. the RotateKey rewritten to name the attacker's key instead: its proof no longer verifies
    attacker_key = PrivateKey.generate().public_key().base64()
    evil.replay(stream, new, attacker_key)
    # 3. its ReportStatus requests rewritten to move the node's endpoint elsewhere (same length)
    lan_ip = node.host.addr
    moved = lan_ip.rsplit(".", 1)[0] + ".99"
    assert len(moved) == len(lan_ip)
    evil.replay(stream, f"{lan_ip}:", f"{moved}:")
    server = mesh.server

    def refusals() -> str:
        text = server.log_text()[len(log_before) :]
        return (
            text if text.count("already used once") >= 2 and "failed its proof of possession" in text else ""
        )

    log = mesh.lab.wait_for(
        refusals, timeout=10, what="ghostmesh refuses the replayed and rewritten requests"
    )
    assert "failed its proof of possession" in log  # the rewritten bodies
    nodes = mesh.server_nodes()
    assert nodes["trusting"]["node_key"] == new
    assert old != new
    assert "trusting" in nodes
    assert not any(ep.startswith(f"{moved}:") for ep in nodes["trusting"]["endpoints"])
    entries = mesh.ctl("audit", "list")
    assert len(entries) == audit_before, "nothing the attacker sent changed anything"
