"""OIDC join on real WireGuard: ``ghostlink join`` without ``--auth`` in a node namespace prints a login URL;
the user confirms ghostmesh's page naming the node and logs in at a real OpenID provider (oidc-provider, in
the server namespace on 192.0.2.1); the node comes up registered to that user and pings a peer that joined
with a pre-auth key.

The provider and every daemon run as lab processes (stopped by PID, logs under test-artifacts/). The
browser is the httpx script in tests/component/_oidc_fixtures.py, run inside the node's namespace.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest

from lab.mesh import SERVER_IP, Mesh, module_mesh
from tests.component._oidc_fixtures import CLIENT_ID, CLIENT_SECRET, FIXTURE_DIR, provider_available

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(bool(provider_available()), reason=provider_available() or "ok"),
]

IDP_PORT = 9090
CALLBACK = f"http://{SERVER_IP}:7780"
BROWSER = Path(__file__).resolve().parents[1] / "component" / "_oidc_fixtures.py"
URL_RE = re.compile(r"ghostlink: to join, open this URL and log in: (\S+)")


@pytest.fixture(scope="module")
def mesh(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    with module_mesh(request, tmp_path_factory, "oidc", start=False) as m:
        lab = m.lab
        idp = m.srv.spawn(
            ["node", str(FIXTURE_DIR / "provider.js"), SERVER_IP, str(IDP_PORT), CLIENT_ID, CLIENT_SECRET,
             f"{CALLBACK}/oidc/callback"],
            "oidc-provider",
        )  # fmt: skip
        lab.wait_for(lambda: "listening on" in idp.log_text(), timeout=20, interval=0.2, what="provider up")
        oidc = (
            f'\n[oidc]\nissuer = "http://{SERVER_IP}:{IDP_PORT}"\nclient_id = "{CLIENT_ID}"\n'
            f'client_secret = "{CLIENT_SECRET}"\nhttp_bind = "{SERVER_IP}:7780"\npublic_url = "{CALLBACK}"\n'
            "allow_insecure_http = true\n"  # the lab's provider and listener speak plain http
        )
        m.start_server(oidc, server_keys='auth_method = "oidc"\n')
        yield m


def test_join_without_auth_logs_in_and_pings_a_peer(mesh: Mesh) -> None:
    peer = mesh.join("peer", "lan_b", mesh.authkey("--user", "ops"))  # pre-auth keys keep working
    node = mesh.prepare_node("lap", "lan_a")
    proc = mesh.start_node(node, "join", "--pin", mesh.pin())  # no auth key to carry the pin

    def url() -> str:
        m = URL_RE.search(proc.log_text())
        return m.group(1) if m else ""

    auth_url = mesh.lab.wait_for(url, timeout=15, interval=0.2, what="ghostlink prints the login URL")
    assert auth_url.startswith(f"{CALLBACK}/oidc/login/")
    assert "lap" not in mesh.server_nodes()  # nothing registered before the login
    assert not node.state_dir.exists() or not any(node.state_dir.iterdir())  # nothing written either
    page = node.host.exec([sys.executable, str(BROWSER), auth_url, "alice"], check=False, timeout=60)
    assert page.returncode == 0, page.stdout + page.stderr
    assert "logged in; you can close this window" in page.stdout
    mesh.wait_connected(node)
    assert mesh.server_nodes()["lap"]["user"] == "alice"
    assert len(URL_RE.findall(proc.log_text())) == 1  # printed once
    peer_v4, peer_v6 = peer.addresses(mesh)
    for dst in (peer_v4, peer_v6):
        mesh.lab.wait_for(
            partial(node.host.ping, dst, timeout=1), timeout=15, interval=0.2, what=f"lap pings {dst}"
        )
