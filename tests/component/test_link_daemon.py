"""The ghostlink daemon against an in-test Coordination server, a fake WireGuard and a no-op net layer."""

from __future__ import annotations

import asyncio
import contextlib
import stat
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from ghostcore.keys import PrivateKey
from ghostcore.pb.ghostmesh.v1 import local_pb2, local_pb2_grpc
from ghostlink.control import CoordClient, Daemon
from ghostlink.localapi import LocalNodeService, start_local_api, stop_local_api
from ghostlink.wg.fake import FakeBackend
from tests.component._link_fixtures import FakeCoordination, NoopNet, make_node, start_server, wait_for

PEER_KEYS = [PrivateKey.generate().public_key().base64() for _ in range(6)]


@dataclass
class Rig:
    coord: FakeCoordination
    server: grpc.aio.Server
    target: str
    backend: FakeBackend
    net: NoopNet
    daemon: Daemon
    task: asyncio.Task[None]
    announced: list[str]


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    coord = FakeCoordination()
    coord.peers = {i: make_node(i, PEER_KEYS[i], endpoints=(f"192.0.2.{i}:41641",)) for i in (2, 3)}
    server, target = await start_server(coord)
    key = PrivateKey.generate()
    client = CoordClient(target, key, timeout=2.0)
    await client.pin_server_key()
    backend, net = FakeBackend(ifname="gltest0"), NoopNet()
    announced: list[str] = []
    daemon = Daemon(
        client,
        backend,
        net,
        key=key,
        listen_port=0,
        reconnect_max=0.2,
        endpoint_interval=0.05,
        on_up=lambda n: announced.append(n.name),
    )
    await daemon.start()
    task = asyncio.create_task(daemon.run())
    r = Rig(coord, server, target, backend, net, daemon, task, announced)
    try:
        await wait_for(lambda: daemon.status.connected and len(backend.device.peers) == 2, what="first map")
        yield r
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await client.close()
        await server.stop(None)


async def test_full_map_programs_peers(rig: Rig) -> None:
    dev = rig.backend.device
    assert set(dev.peers) == {PEER_KEYS[2], PEER_KEYS[3]}
    p2 = dev.peers[PEER_KEYS[2]]
    assert p2.endpoint == "192.0.2.2:41641"
    assert p2.allowed_ips == ("100.64.0.2/32", "fd7a:115c:a1e0::2/128")
    assert p2.keepalive == 25
    assert b"replace_peers" not in b"".join(rig.backend.requests)
    # Addresses and routes went to the net layer in the same plan.
    first = rig.net.plans[0]
    assert set(first.addresses_add) == {"100.64.0.1/32", "fd7a:115c:a1e0::1/128"}
    assert len(first.routes_add) == 4
    assert rig.announced == ["node1"]
    # Every authenticated call carried a proof bound to its full method path.
    assert "/ghostmesh.v1.Coordination/Sync" in rig.coord.verified
    await wait_for(lambda: rig.coord.reports == [["192.0.2.10:41641"]], what="endpoint report")


async def test_delta_touches_only_the_new_peer(rig: Rig) -> None:
    sessions_before = dict(rig.backend.sessions)
    rig.coord.upsert(make_node(4, PEER_KEYS[4]))
    await wait_for(lambda: PEER_KEYS[4] in rig.backend.device.peers, what="peer 4")
    assert rig.backend.touches[PEER_KEYS[2]] == 1, "unchanged peer was never touched again"
    assert rig.backend.touches[PEER_KEYS[3]] == 1
    assert {k: rig.backend.sessions[k] for k in sessions_before} == sessions_before
    assert rig.backend.requests[-1].count(b"public_key=") == 1
    assert rig.net.plans[-1].routes_add == ("100.64.0.4/32", "fd7a:115c:a1e0::4/128")
    assert rig.net.plans[-1].addresses_add == ()

    # A changed endpoint is an update_only of that peer's endpoint alone.
    rig.coord.upsert(make_node(3, PEER_KEYS[3], endpoints=("198.51.100.3:5",)))
    await wait_for(
        lambda: rig.backend.device.peers[PEER_KEYS[3]].endpoint == "198.51.100.3:5", what="endpoint"
    )
    last = rig.backend.requests[-1].decode()
    assert "update_only=true" in last
    assert "allowed_ip" not in last
    assert rig.backend.touches[PEER_KEYS[2]] == 1

    rig.coord.remove(2)
    await wait_for(lambda: PEER_KEYS[2] not in rig.backend.device.peers, what="removal")
    assert "remove=true" in rig.backend.requests[-1].decode()
    assert rig.backend.touches[PEER_KEYS[4]] == 1


async def test_stream_drop_keeps_wireguard_and_resyncs(rig: Rig) -> None:
    ops_before = len(rig.backend.ops)
    device_before = rig.backend.device
    rig.coord.refuse_sync = True
    rig.coord.drop_streams()
    await wait_for(lambda: not rig.daemon.status.connected, what="disconnect")
    await wait_for(lambda: rig.daemon.status.last_error != "", what="error recorded")
    await asyncio.sleep(0.3)  # a few refused reconnects happen meanwhile
    assert rig.backend.device == device_before, "the mesh stays up while the server is away"
    assert len(rig.backend.ops) == ops_before
    assert not rig.backend.closed

    # While away, peer 3 left and peer 5 joined; on reconnect the full map is diffed against what is applied.
    rig.coord.peers.pop(3)
    rig.coord.peers[5] = make_node(5, PEER_KEYS[5])
    rig.coord.refuse_sync = False
    await wait_for(
        lambda: rig.daemon.status.connected and PEER_KEYS[5] in rig.backend.device.peers, what="resync"
    )
    assert PEER_KEYS[3] not in rig.backend.device.peers
    assert rig.backend.touches[PEER_KEYS[2]] == 1, "the unchanged peer was not touched by the resync"
    assert rig.daemon.sessions >= 2
    assert rig.daemon.status.last_error == ""


async def test_local_api_status_and_peers(rig: Rig, tmp_path: Path) -> None:
    sock = tmp_path / "run" / "ghostlink.sock"
    sock.parent.mkdir(mode=0o755)
    sock.write_text("stale")  # a leftover from a crashed run is replaced
    svc = LocalNodeService(rig.daemon, server=rig.target, backend_name=rig.backend.name, ifname="gltest0")
    server = await start_local_api(sock, svc)
    try:
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600
        assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o700
        async with grpc.aio.insecure_channel(f"unix://{sock}") as ch:
            stub = local_pb2_grpc.LocalNodeStub(ch)
            st = await stub.Status(local_pb2.LocalStatusRequest(), timeout=2)
            assert st.name == "node1"
            assert st.node_id == 1
            assert list(st.addresses) == ["100.64.0.1", "fd7a:115c:a1e0::1"]
            assert st.connected
            assert st.map_serial == 1
            assert st.server == rig.target
            assert st.interface == "gltest0"
            assert st.backend == "fake"
            assert st.listen_port == 51820
            assert st.node_key == rig.daemon.key.public_key().base64()
            peers = (await stub.Peers(local_pb2.LocalPeersRequest(), timeout=2)).peers
            assert [p.name for p in peers] == ["node2", "node3"]
            assert peers[0].endpoint == "192.0.2.2:41641"
            assert peers[0].online
            assert peers[0].latest_handshake_unix == 0
            assert peers[0].rx_bytes == 0
    finally:
        await stop_local_api(server, sock)
    assert not sock.exists()
