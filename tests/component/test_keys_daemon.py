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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ghostcore.keys import PrivateKey
from ghostctl.cli import main as ghostctl
from ghostlink.control import CoordClient, Daemon
from ghostlink.localapi import LocalNodeService, start_local_api, stop_local_api
from ghostlink.rotate import KeyRotator, settle_pending
from ghostlink.state import SavedNode, StateDir
from ghostlink.wg.fake import FakeBackend
from ghostmesh.server import RunningServer
from tests.component._link_fixtures import NoopNet, wait_for
from tests.component._mesh_fixtures import auth_key, mesh_config, running


@dataclass
class Member:
    daemon: Daemon
    backend: FakeBackend
    client: CoordClient
    state: StateDir
    rotator: KeyRotator
    task: asyncio.Task[None]

    @property
    def pub(self) -> str:
        return self.daemon.key.public_key().base64()


async def _member(srv: RunningServer, secret: str, name: str, state_dir: Path) -> Member:
    state = StateDir(state_dir)
    key = state.key_for_join()
    client = CoordClient(srv.target, key)
    server_key = await client.pin_server_key()
    key = await settle_pending(state, client, key)
    node = await client.register(secret, name)
    state.save(key, SavedNode(srv.target, server_key.base64(), node.id, node.name))
    backend = FakeBackend(ifname=f"fk{name}")
    daemon = Daemon(client, backend, NoopNet(), key=key, listen_port=0)
    rotator = KeyRotator(daemon, state)
    daemon.before_session = rotator.resume
    await daemon.start()
    member = Member(daemon, backend, client, state, rotator, asyncio.create_task(daemon.run()))
    await wait_for(lambda: daemon.status.connected, what=f"{name} connected")
    return member


async def _close(*members: Member) -> None:
    for m in members:
        m.daemon.stop()
        m.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await m.task
        await m.client.close()


@pytest.fixture
def short_dir() -> Any:
    d = Path(tempfile.mkdtemp(prefix="gkeys-"))  # unix socket paths must stay short
    yield d
    shutil.rmtree(d, ignore_errors=True)


@contextlib.asynccontextmanager
async def _local_api(member: Member, sock: Path) -> AsyncIterator[None]:
    svc = LocalNodeService(
        member.daemon, server="test", backend_name="fake", ifname="fk", rotator=member.rotator
    )
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
        a = await _member(srv, secret, "alpha", tmp_path / "a")
        b = await _member(srv, secret, "beta", tmp_path / "b")
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
                tuple(sorted(a.daemon.netmap.self_node.allowed_ips))  # type: ignore[union-attr]
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
        await _close(a, b)


async def test_restart_finishes_a_rotation_interrupted_after_the_switch(tmp_path: Path) -> None:
    async with running(mesh_config(tmp_path)) as srv:
        secret = await auth_key(srv, reusable=True)
        a = await _member(srv, secret, "alpha", tmp_path / "a")
        b = await _member(srv, secret, "beta", tmp_path / "b")
        node_id = a.daemon.netmap.self_node.id  # type: ignore[union-attr]
        # Steps 1-2 of a rotation, then a crash: ghostmesh holds the pending key, node.key is the old one.
        new = PrivateKey.generate()
        await a.client.rotate_key(new)
        a.state.save_pending(new)
        await _close(a)
        a2 = await _member(srv, "", "alpha", tmp_path / "a")  # restart: no auth key needed
        assert a2.pub == new.public_key().base64()
        assert a2.daemon.netmap.self_node.id == node_id  # type: ignore[union-attr]
        assert a2.state.pending_key() is None
        await wait_for(lambda: a2.pub in b.backend.device.peers, what="beta has alpha's new key")
        await _close(a2, b)
