"""The audit log in a real mesh: a ``ghostlink join`` and a ``ghostctl nodes delete`` are recorded with
who/what/where, and ``ghostctl audit verify`` accepts the chain (then catches a truncation via checkpoint).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator

import pytest

from lab.mesh import SERVER_IP, Mesh, module_mesh

pytestmark = pytest.mark.netns


@pytest.fixture(scope="module")
def mesh(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    with module_mesh(request, tmp_path_factory, "audit") as m:
        yield m


def test_join_and_delete_are_recorded_and_verify(mesh: Mesh) -> None:
    key = mesh.authkey("--expiration", "10m")
    node = mesh.join("aud1", "lan_a", key)
    node_id = mesh.server_nodes()["aud1"]["id"]
    mesh.ctl("nodes", "delete", "aud1")

    entries = mesh.ctl("audit", "list")
    by_action = {e["action"]: e for e in entries}
    reg, dele = by_action["node.register"], by_action["node.delete"]
    assert (reg["actor"], reg["target"]) == ("node:aud1", "aud1")
    assert reg["remote"].startswith(
        f"ipv4:{node.host.addr}:"
    )  # the router does no NAT: the node's LAN address
    assert node.host.addr != SERVER_IP
    assert (dele["actor"], dele["target"], dele["detail"]) == ("admin@unix", "aud1", {"id": node_id})
    assert reg["seq"] < dele["seq"]

    checkpoint = mesh.workdir / "audit.checkpoint"
    ok = mesh.ctl("audit", "verify", "--checkpoint", str(checkpoint))
    assert ok["ok"] is True
    assert ok["last_seq"] == len(entries)

    # The newest entry removed behind ghostmesh's back: only the checkpoint can tell.
    db = sqlite3.connect(str(mesh.workdir / "mesh" / "ghostmesh.db"))
    with db:
        db.execute("DELETE FROM audit WHERE seq = ?", (len(entries),))
    db.close()
    mesh.ctl("audit", "verify")
    err = mesh.ctl("audit", "verify", "--checkpoint", str(checkpoint), expect_rc=7)
    assert f"entry {len(entries)}: missing" in err
