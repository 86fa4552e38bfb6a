"""``ghostctl keys rotate`` end to end in process: ghostctl -> ghostlink's LocalNode socket -> KeyRotator ->
a real ghostmesh -> the peer daemon's WireGuard (the fake backend) gets the new key.

Two real Daemons with real CoordClients against a real in-process ghostmesh; only WireGuard and netlink
are fakes. A restart finishes a rotation left pending by a crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from ghostcore.keys import PrivateKey
from ghostctl.cli import main as ghostctl
from ghostlink.localapi import LocalNodeService, start_local_api, stop_local_api
from tests.component._link_fixtures import wait_for
from tests.component._members import Member, close_members, join_member
from tests.component._mesh_fixtures import auth_key, mesh_config, running


@pytest.fixture
def short_dir() -> Any:
    d = Path(tempfile.mkdtemp(prefix="gkeys-"))  # unix socket paths must stay short
    yield d
    shutil.rmtree(d, ignore_errors=True)


@contextlib.asynccontextmanager
async def _local_api(member: Member, sock: Path) -> AsyncIterator[None]:
    svc = LocalNodeService(member.daemon)
    server = await start_local_api(sock, svc)
    try:
        yield
    finally:
        await stop_local_api(server, sock)


async def test_ghostctl_keys_rotate_reaches_the_peer(
    tmp_path: Path, short_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with running(mesh_config(tmp_path)) as srv:
        secret = await auth_key(srv, reusable=True)
        a = await join_member(srv, secret, "alpha", tmp_path / "a")
        b = await join_member(srv, secret, "beta", tmp_path / "b")
        old = a.pub
        await wait_for(lambda: old in b.backend.device.peers, what="beta has alpha")
        sock = short_dir / "a.sock"
        async with _local_api(a, sock):
            code = await asyncio.to_thread(ghostctl, ["--socket", str(sock), "-o", "json", "keys", "rotate"])
            doc = json.loads(capsys.readouterr().out)
            assert code == 0
            assert doc["old_node_key"] == old
            new = doc["new_node_key"]
            assert new == a.pub != old
            await wait_for(
                lambda: new in b.backend.device.peers and old not in b.backend.device.peers,
                what="beta replaced alpha's key",
            )
            peer = b.backend.device.peers[new]
            assert peer.allowed_ips == (
                tuple(sorted(a.daemon.status().self_node.allowed_ips))  # type: ignore[union-attr]
            )
            # alpha's own WireGuard got exactly one private_key change and no peer change for it.
            assert ("private_key", new) in a.backend.ops
            # Table output: old -> new.
            code = await asyncio.to_thread(ghostctl, ["--socket", str(sock), "keys", "rotate"])
            out = capsys.readouterr().out
            assert code == 0
            assert out.startswith(f"node key rotated: {new} -> ")
            assert "PRIVATE" not in out.upper()
            assert a.state.existing_key().public_key().base64() == a.pub  # type: ignore[union-attr]
        await close_members(a, b)


async def test_restart_finishes_a_rotation_interrupted_after_the_switch(tmp_path: Path) -> None:
    async with running(mesh_config(tmp_path)) as srv:
        secret = await auth_key(srv, reusable=True)
        a = await join_member(srv, secret, "alpha", tmp_path / "a")
        b = await join_member(srv, secret, "beta", tmp_path / "b")
        node_id = a.daemon.status().self_node.id  # type: ignore[union-attr]
        # Steps 1-2 of a rotation, then a crash: ghostmesh holds the pending key, node.key is the old one.
        new = PrivateKey.generate()
        await a.client.rotate_key(new)
        a.state.save_pending(new)
        await close_members(a)
        a2 = await join_member(srv, "", "alpha", tmp_path / "a")  # restart: no auth key needed
        assert a2.pub == new.public_key().base64()
        assert a2.daemon.status().self_node.id == node_id  # type: ignore[union-attr]
        assert a2.state.pending_key() is None
        await wait_for(lambda: a2.pub in b.backend.device.peers, what="beta has alpha's new key")
        await close_members(a2, b)
