"""The ghostlink daemon against an in-test Coordination server, a fake WireGuard and a no-op net layer."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
import stat
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import grpc
import pytest

from ghostcore.errors import Unavailable
from ghostcore.joinkey import parse_pin
from ghostcore.keys import PrivateKey
from ghostcore.lock import SigningKey
from ghostcore.pb.ghostmesh.v1 import local_pb2, local_pb2_grpc
from ghostcore.tlschannel import Trust
from ghostctl.cli import main as ghostctl
from ghostlink import engine
from ghostlink.client import CoordClient
from ghostlink.daemon import ENDPOINT_GUARD_INTERVAL, Daemon, PathLayer, PathLayerFactory, Pinger
from ghostlink.localapi import LocalNodeService, start_local_api, stop_local_api
from ghostlink.nodekey import NodeKey
from ghostlink.traversal.path_core import PeerPath
from ghostlink.traversal.proxy_core import RelayStatus
from ghostlink.traversal.stun_core import NetcheckResult
from ghostlink.trust import NodeTrust
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
    keys: NodeKey
    daemon: Daemon
    task: asyncio.Task[None]
    announced: list[str]


class ChosenPaths:
    """NAT traversal reduced to its choice: a fixed endpoint per peer (the daemon's guard keeps it)."""

    def __init__(self, chosen: dict[str, str]) -> None:
        self.chosen = chosen

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def update(self, nm: engine.NetMap) -> None:
        pass

    def endpoints(self) -> dict[str, str]:
        return dict(self.chosen)

    def deliver_held(self) -> None:
        pass

    def rekey(self) -> None:
        pass

    def candidates(self, local: list[str]) -> list[str]:
        return local

    def relay_status(self) -> RelayStatus:
        return RelayStatus()

    def path(self, key: str) -> PeerPath:
        return PeerPath("direct" if key in self.chosen else "")

    async def netcheck(self) -> NetcheckResult | None:
        return None


def chosen_paths(chosen: dict[str, str]) -> PathLayerFactory:
    def make(wg_port: int, on_paths: Callable[[], None], on_status: Callable[[], None]) -> PathLayer:
        return ChosenPaths(chosen)

    return make


@contextlib.asynccontextmanager
async def running(paths: PathLayerFactory | None = None, pinger: Pinger | None = None) -> AsyncIterator[Rig]:
    coord = FakeCoordination()
    coord.peers = {i: make_node(i, PEER_KEYS[i], endpoints=(f"192.0.2.{i}:41641",)) for i in (2, 3)}
    server, target, pin = await start_server(coord)
    keys = NodeKey(PrivateKey.generate())
    client = CoordClient(target, keys, Trust(pin=parse_pin(pin)), timeout=2.0)
    await client.connect()
    await client.pin_server_key()
    backend, net = FakeBackend(ifname="gltest0"), NoopNet()
    announced: list[str] = []
    daemon = Daemon(
        client,
        backend,
        net,
        keys=keys,
        trust=NodeTrust(SigningKey.generate()),
        listen_port=0,
        reconnect_max=0.2,
        endpoint_interval=0.05,
        on_up=lambda n: announced.append(n.name),
        paths=paths,
        pinger=pinger,
    )
    await daemon.start()
    task = asyncio.create_task(daemon.run())
    r = Rig(coord, server, target, backend, net, keys, daemon, task, announced)
    try:
        await wait_for(lambda: daemon.status().connected and len(backend.device.peers) == 2, what="first map")
        yield r
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await daemon.close()
        await client.close()
        await server.stop(None)


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    async with running() as r:
        yield r


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
    await wait_for(lambda: not rig.daemon.status().connected, what="disconnect")
    await wait_for(lambda: rig.daemon.status().last_error != "", what="error recorded")
    await asyncio.sleep(0.3)  # a few refused reconnects happen meanwhile
    assert rig.backend.device == device_before, "the mesh stays up while the server is away"
    assert len(rig.backend.ops) == ops_before
    assert not rig.backend.closed

    # While away, peer 3 left and peer 5 joined; on reconnect the full map is diffed against what is applied.
    rig.coord.peers.pop(3)
    rig.coord.peers[5] = make_node(5, PEER_KEYS[5])
    rig.coord.refuse_sync = False
    await wait_for(
        lambda: rig.daemon.status().connected and PEER_KEYS[5] in rig.backend.device.peers, what="resync"
    )
    assert PEER_KEYS[3] not in rig.backend.device.peers
    assert rig.backend.touches[PEER_KEYS[2]] == 1, "the unchanged peer was not touched by the resync"
    assert rig.daemon.status().sessions >= 2
    assert rig.daemon.status().last_error == ""


async def test_local_api_status_and_peers(rig: Rig, tmp_path: Path) -> None:
    sock = tmp_path / "run" / "ghostlink.sock"
    sock.parent.mkdir(mode=0o755)
    with socket.socket(socket.AF_UNIX) as crashed:  # a crashed run's socket file is replaced
        crashed.bind(str(sock))
    svc = LocalNodeService(rig.daemon)
    server = await start_local_api(sock, svc)
    try:
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600
        assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o755, "a directory it did not create: as it was"
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
            assert st.node_key == rig.keys.public.base64()
            peers = (await stub.Peers(local_pb2.LocalPeersRequest(), timeout=2)).peers
            assert [p.name for p in peers] == ["node2", "node3"]
            assert peers[0].endpoint == "192.0.2.2:41641"
            assert peers[0].online
            assert peers[0].latest_handshake_unix == 0
            assert peers[0].rx_bytes == 0
    finally:
        await stop_local_api(server, sock)
    assert not sock.exists()


DIRECT = "198.51.100.7:41641"
PROXY = "127.0.0.1:40001"


def _roam(backend: FakeBackend, key: str, endpoint: str) -> None:
    peer = backend.device.peers[key]
    backend.device.peers[key] = dataclasses.replace(peer, endpoint=endpoint)


async def test_endpoint_guard_puts_back_what_wireguard_roamed_away_from() -> None:
    k2, k3 = PEER_KEYS[2], PEER_KEYS[3]
    async with running(chosen_paths({k2: DIRECT})) as r:
        assert r.backend.device.peers[k2].endpoint == DIRECT  # the chosen path, not the map's endpoint
        assert r.backend.device.peers[k3].endpoint == "192.0.2.3:41641"
        await asyncio.sleep(ENDPOINT_GUARD_INTERVAL * 1.5)
        requests = len(r.backend.requests)  # nothing roamed: the guard changed nothing
        _roam(r.backend, k2, PROXY)  # a relayed packet moved the direct peer to the proxy
        _roam(r.backend, k3, "192.0.2.99:5000")  # not chosen by traversal: roaming is WireGuard's
        await wait_for(lambda: r.backend.device.peers[k2].endpoint == DIRECT, what="endpoint put back")
        assert r.backend.device.peers[k3].endpoint == "192.0.2.99:5000"
        assert len(r.backend.requests) == requests + 1
        assert b"endpoint=198.51.100.7:41641" in r.backend.requests[-1]
        assert b"replace_allowed_ips" not in r.backend.requests[-1]  # only the endpoint is set again
        peers = {p.node.node_key: p for p in await r.daemon.peers()}
        assert peers[k2].path == PeerPath("direct")
        assert peers[k2].endpoint == DIRECT


async def test_without_traversal_roaming_is_wireguards(rig: Rig) -> None:
    k2 = PEER_KEYS[2]
    requests = len(rig.backend.requests)
    _roam(rig.backend, k2, PROXY)
    await asyncio.sleep(ENDPOINT_GUARD_INTERVAL * 2)
    assert rig.backend.device.peers[k2].endpoint == PROXY
    assert len(rig.backend.requests) == requests


class _Echo(asyncio.DatagramProtocol):
    """A UDP echo server on loopback: the peer's side of the component test's round trip."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.transport.sendto(data, addr)


class LoopbackPinger:
    """A pinger that makes a real round trip (UDP over loopback to an echo server) for the addresses in
    ``answering`` and none for the others: the tunnel and ICMP are the netns test's."""

    def __init__(self, echo: tuple[str, int], answering: set[str]) -> None:
        self.echo_addr, self.answering = echo, answering
        self.asked: list[tuple[str, float]] = []

    async def echo(self, address: str, wait: float) -> float | None:
        self.asked.append((address, wait))
        loop = asyncio.get_running_loop()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.setblocking(False)
            start = loop.time()
            if address in self.answering:
                await loop.sock_sendto(s, b"echo", self.echo_addr)
            try:
                async with asyncio.timeout(wait):
                    await loop.sock_recv(s, 64)
            except TimeoutError:
                return None
            return loop.time() - start


async def test_ping_through_the_local_api(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(_Echo, local_addr=("127.0.0.1", 0))
    pinger = LoopbackPinger(transport.get_extra_info("sockname"), {"100.64.0.2", "fd7a:115c:a1e0::3"})
    sock = tmp_path / "ghostlink.sock"
    try:
        async with running(chosen_paths({PEER_KEYS[2]: DIRECT}), pinger) as r:
            server = await start_local_api(sock, LocalNodeService(r.daemon))
            try:
                async with grpc.aio.insecure_channel(f"unix://{sock}") as ch:
                    stub = local_pb2_grpc.LocalNodeStub(ch)
                    pong = await stub.Ping(local_pb2.LocalPingRequest(peer="node2", timeout_s=2), timeout=5)
                    assert (pong.name, pong.address, pong.node_key) == ("node2", "100.64.0.2", PEER_KEYS[2])
                    assert pong.answered
                    assert 0 < pong.rtt_ms < 2000
                    assert (pong.path, pong.endpoint) == ("direct", DIRECT)
                    by_addr = await stub.Ping(local_pb2.LocalPingRequest(peer="fd7a:115c:a1e0::3"), timeout=5)
                    assert by_addr.name == "node3"
                    assert by_addr.answered
                    assert pinger.asked[-1] == ("fd7a:115c:a1e0::3", 2.0), "no timeout given: the default"
                    with pytest.raises(grpc.aio.AioRpcError) as nf:
                        await stub.Ping(local_pb2.LocalPingRequest(peer="nobody"), timeout=5)
                    assert nf.value.code() == grpc.StatusCode.NOT_FOUND
                    with pytest.raises(grpc.aio.AioRpcError) as bad:
                        await stub.Ping(local_pb2.LocalPingRequest(peer="node2", timeout_s=31), timeout=5)
                    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT

                # ghostctl itself (blocking: in a thread, while the daemon runs on this loop)
                code = await asyncio.to_thread(
                    ghostctl, ["--socket", str(sock), "ping", PEER_KEYS[2], "-c", "2", "-i", "0.01"]
                )
                out = capsys.readouterr().out
                assert code == 0, out
                assert out.count("pong from node2 (100.64.0.2) via direct 198.51.100.7:41641 in") == 2
                assert "--- node2: 2 sent, 2 answered, 0% loss" in out

                # node3's IPv4 address gets no answer: exit 1, and the line says so
                code = await asyncio.to_thread(
                    ghostctl, ["--socket", str(sock), "ping", "node3", "-c", "1", "-W", "0.2"]
                )
                out = capsys.readouterr().out
                assert code == 1
                assert "no answer from node3 (100.64.0.3) within 0.2 s" in out
                code = await asyncio.to_thread(ghostctl, ["--socket", str(sock), "ping", "nobody"])
                assert code == 4
                assert "no peer 'nobody'" in capsys.readouterr().err
            finally:
                await stop_local_api(server, sock)
    finally:
        transport.close()


async def test_ping_without_a_pinger_is_unavailable(rig: Rig) -> None:
    with pytest.raises(Unavailable, match="ping is not available"):
        await rig.daemon.ping("node2", 1.0)
