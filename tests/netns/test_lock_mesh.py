"""Node-key signing on real WireGuard (wireguard-go) in namespaces, with the admin's ghostctl.

The admin turns the lock on (``ghostctl lock init``) and pre-signs an auth key (``ghostctl lock sign
gmauth_…``); nodes joining with it sign their own keys, so joins and rotations need no admin and lose no
ping (20 pings/s each way). A node joining with a plain key stays out of every peer's WireGuard until
the admin signs what it shows. Then the coordinator is compromised the way an attacker with its
database would do it: ghostmesh is stopped, the SQLite file edited (a peer added, a node's key swapped),
ghostmesh started again. No node installs either: WireGuard stays as it was, and each refusal is counted
and logged.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ghostcore import lock
from ghostcore.keys import PrivateKey, PublicKey
from lab.mesh import Mesh, Node, module_mesh

pytestmark = pytest.mark.netns


@pytest.fixture(scope="module")
def mesh(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    with module_mesh(request, tmp_path_factory, "lock") as m:
        yield m


@pytest.fixture(scope="module")
def admin_key(mesh: Mesh) -> Path:
    path = mesh.workdir / "admin.lock.key"
    doc = mesh.ctl("lock", "init", "--key-file", str(path))
    assert doc["enabled"]
    return path


@pytest.fixture(scope="module")
def signed(mesh: Mesh, admin_key: Path) -> list[Node]:
    key = mesh.authkey("--reusable", "--expiration", "1h")
    presigned = mesh.ctl("lock", "sign", key, "--key-file", str(admin_key))["auth_key"]
    return [mesh.join("la", "lan_a", presigned), mesh.join("lb", "lan_b", presigned)]


def _v4(mesh: Mesh, node: Node) -> str:
    return node.addresses(mesh)[0]


def _lock(mesh: Mesh, node: Node) -> dict[str, object]:
    doc: dict[str, object] = node.status(mesh)["lock"]
    return doc


def test_signed_joins_and_rotations_lose_no_ping(mesh: Mesh, signed: list[Node]) -> None:
    a, b = signed
    assert _lock(mesh, a)["key_signed"]
    assert _lock(mesh, b)["key_signed"]
    mesh.lab.wait_for(lambda: a.host.ping(_v4(mesh, b), timeout=1), timeout=15, what="la pings lb")
    fwd = a.host.ping_stream(_v4(mesh, b), interval=0.05, log_name="ping-la-lb")
    back = b.host.ping_stream(_v4(mesh, a), interval=0.05, log_name="ping-lb-la")
    time.sleep(1.0)
    new = mesh.ctl("--socket", str(a.socket), "keys", "rotate")["new_node_key"]
    mesh.lab.wait_for(
        lambda: new in mesh.wg_peer_keys(b), timeout=10, interval=0.05, what="lb has la's new key"
    )
    time.sleep(2.0)  # traffic keeps flowing well past the switch
    for stats in (fwd.stop(), back.stop()):
        assert stats.transmitted > 40
        assert stats.lost == 0, f"{stats.lost} of {stats.transmitted} pings lost across a signed rotation"
    assert _lock(mesh, a)["key_signed"]  # the rotated key carries the node's own signature


def test_an_unsigned_node_waits_for_the_admin(mesh: Mesh, signed: list[Node], admin_key: Path) -> None:
    a, b = signed
    c = mesh.join("lc", "lan_a", mesh.authkey())  # a plain key: not pre-signed
    c_key = c.status(mesh)["node_key"]
    mesh.lab.wait_for(
        lambda: any(r.startswith("lc: peer:") for r in a.status(mesh)["refused"]),
        timeout=10,
        what="la refuses lc",
    )
    assert c_key not in mesh.wg_peer_keys(a)
    assert c_key not in mesh.wg_peer_keys(b)
    request = _lock(mesh, c)["request"]
    assert isinstance(request, str)
    assert request.startswith("nodekey:")
    mesh.ctl("lock", "sign", request, "--key-file", str(admin_key))
    for n in (a, b):
        mesh.lab.wait_for(lambda n=n: c_key in mesh.wg_peer_keys(n), timeout=10, what=f"{n.name} installs lc")
    mesh.lab.wait_for(lambda: a.host.ping(_v4(mesh, c), timeout=1), timeout=15, what="la pings lc")
    assert mesh.ctl("lock", "status")["unsigned_nodes"] == []


def test_a_coordinator_with_an_edited_database_gets_no_node_to_install_anything(
    mesh: Mesh, signed: list[Node]
) -> None:
    a, b = signed
    wg_before = {n.name: mesh.wg_peer_keys(n) for n in signed}
    refused_before = a.status(mesh)["refused_total"]
    b_key = b.status(mesh)["node_key"]
    assert mesh.server is not None
    mesh.server.stop()
    db = mesh.workdir / "mesh" / "ghostmesh.db"
    evil_key = PrivateKey.generate().public_key().base64()
    intruder_key = PrivateKey.generate().public_key()
    mallory = lock.SigningKey.generate()
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        # lb's key swapped for the attacker's (its signature kept: it vouches for another key now)
        assert conn.execute("UPDATE nodes SET node_key = ? WHERE name = 'lb'", (evil_key,)).rowcount == 1
        # a peer of the attacker's, signed with a signing key of the attacker's
        cols = [r[1] for r in conn.execute("PRAGMA table_info(nodes)") if r[1] != "id"]
        select = f"SELECT {', '.join(cols)} FROM nodes WHERE name = 'la'"  # noqa: S608 - column names
        row = dict(zip(cols, conn.execute(select).fetchone(), strict=True))
        row.update(
            name="intruder", hostname="intruder", node_key=intruder_key.base64(), ipv4="100.64.0.200",
            ipv6="fd7a:115c:a1e0::c8", pending_key=None,
            key_signature=lock.sign_direct(mallory, intruder_key.raw, mallory.public()),
        )  # fmt: skip
        conn.execute(
            f"INSERT INTO nodes ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",  # noqa: S608
            tuple(row.values()),
        )
    mesh.start_server()
    mesh.wait_connected(a, timeout=30)
    mesh.lab.wait_for(
        lambda: a.status(mesh)["refused_total"] >= refused_before + 2, timeout=15, what="la refuses both"
    )
    refused = a.status(mesh)["refused"]
    assert any(r.startswith("lb: peer:") for r in refused)
    assert any(r.startswith("intruder: peer:") for r in refused)
    assert mesh.wg_peer_keys(a) == wg_before["la"], "la's WireGuard is unchanged"
    assert b_key in mesh.wg_peer_keys(a)
    assert PublicKey.from_base64(evil_key).base64() not in mesh.wg_peer_keys(a)
    assert a.proc is not None
    assert "refused from the map: intruder: peer:" in a.proc.log_text()
