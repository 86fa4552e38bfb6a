"""ghostmesh in-process: registration, full maps, deltas, removal, restart, ephemeral nodes, bursts."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest

from ghostcore.pb.ghostmesh.v1 import admin_pb2 as apb
from ghostcore.pb.ghostmesh.v1 import coordination_pb2 as pb
from ghostmesh.config import LimitsConfig
from ghostmesh.server import RunningServer
from tests.component._mesh_fixtures import (
    SERVICE,
    Clock,
    NodeClient,
    admin_unix,
    auth_key,
    mesh_config,
    next_update,
    running,
    stream_error,
)


async def test_register_and_sync_full_map(tmp_path: Path) -> None:
    async with running(mesh_config(tmp_path, keepalive=17)) as srv:
        probe = NodeClient(srv)
        info = await probe.call("GetServerInfo", pb.GetServerInfoRequest(), ())
        assert info.server_key == srv.server_key.base64()
        await probe.close()
        key = await auth_key(srv, reusable=True)
        a = NodeClient(srv)
        node = await a.register(key, "alpha")
        assert node.name == "alpha"
        assert list(node.addresses) == ["100.64.0.1", "fd7a:115c:a1e0::1"]
        assert node.node_key == a.pub
        call = a.sync()
        full = await next_update(call)
        assert (full.serial, full.full, full.self.id, full.keepalive_seconds) == (1, True, node.id, 17)
        assert list(full.peers_upserted) == []
        call.cancel()
        await a.close()


async def test_second_node_produces_delta_within_batch_window(tmp_path: Path) -> None:
    async with running(mesh_config(tmp_path, batch_delay=0.05)) as srv:
        key = await auth_key(srv, reusable=True)
        a, b = NodeClient(srv), NodeClient(srv)
        await a.register(key, "a")
        call_a = a.sync()
        await next_update(call_a)
        t0, t0_wall = time.monotonic(), time.time() - 1
        nb = await b.register(key, "b")
        delta = await next_update(call_a, wait=1.0)
        assert time.monotonic() - t0 < 1.0
        assert (delta.serial, delta.full) == (2, False)
        assert [p.id for p in delta.peers_upserted] == [nb.id]
        assert not delta.peers_upserted[0].online
        # b connects: a hears it is online; b's full map has a
        call_b = b.sync()
        full_b = await next_update(call_b)
        assert [p.name for p in full_b.peers_upserted] == ["a"]
        assert full_b.peers_upserted[0].online
        online = await next_update(call_a)
        assert online.serial == 3
        assert online.peers_upserted[0].online
        # endpoints reported by b reach a
        await b.report(endpoints=["192.0.2.7:41641"])
        ep = await next_update(call_a)
        assert list(ep.peers_upserted[0].endpoints) == ["192.0.2.7:41641"]
        # b goes away: a hears it is offline, with its last-seen time
        call_b.cancel()
        offline = await next_update(call_a)
        assert not offline.peers_upserted[0].online
        assert offline.peers_upserted[0].last_seen_unix >= int(t0_wall)
        call_a.cancel()
        await a.close()
        await b.close()


@pytest.mark.parametrize(
    ("action", "code"), [("delete", grpc.StatusCode.NOT_FOUND), ("expire", grpc.StatusCode.UNAUTHENTICATED)]
)
async def test_delete_or_expire_removes_from_peers_and_ends_stream(
    tmp_path: Path, action: str, code: grpc.StatusCode
) -> None:
    async with running(mesh_config(tmp_path)) as srv:
        key = await auth_key(srv, reusable=True)
        a, b = NodeClient(srv), NodeClient(srv)
        await a.register(key, "a")
        nb = await b.register(key, "b")
        call_a, call_b = a.sync(), b.sync()
        await next_update(call_a)
        await next_update(call_b)
        async with admin_unix(srv) as admin:
            if action == "delete":
                await admin.DeleteNode(apb.DeleteNodeRequest(ref="b"), timeout=5)
            else:
                expired = await admin.ExpireNode(apb.ExpireNodeRequest(ref=str(nb.id)), timeout=5)
                assert expired.expires_unix <= time.time()
        # a may first see b online (from b's connect) before the removal: read until the removal
        for _ in range(3):
            upd = await next_update(call_a)
            if list(upd.peers_removed):
                break
        assert list(upd.peers_removed) == [nb.id]
        assert await stream_error(call_b) == code
        # a new Sync by b is refused with the same code
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await next_update(b.sync())
        assert info.value.code() == (code if action == "expire" else grpc.StatusCode.NOT_FOUND)
        call_a.cancel()
        await a.close()
        await b.close()


async def test_reregistration_is_idempotent(tmp_path: Path) -> None:
    async with running(mesh_config(tmp_path)) as srv:
        key = await auth_key(srv)  # single use
        a = NodeClient(srv)
        first = await a.register(key, "a")
        again = await a.register("", "something-else")
        again2 = await a.register(key, "a")  # the spent key is not even looked at for a known node
        for n in (again, again2):
            assert (n.id, n.name, list(n.addresses)) == (first.id, first.name, list(first.addresses))
        assert len(srv.state.list_nodes()) == 1
        await a.close()


async def test_restart_on_same_db_keeps_nodes_ips_and_server_key(tmp_path: Path) -> None:
    cfg = mesh_config(tmp_path)
    a_key = None
    async with running(cfg) as srv:
        key = await auth_key(srv, reusable=True)
        a, b = NodeClient(srv), NodeClient(srv)
        na, nb = await a.register(key, "a"), await b.register(key, "b")
        server_key = srv.server_key
        a_key = a.key
        await a.close()
        await b.close()
    async with running(cfg) as srv2:
        assert srv2.server_key == server_key
        a2 = NodeClient(srv2, a_key)
        again = await a2.register("", "a")
        assert (again.id, list(again.addresses)) == (na.id, list(na.addresses))
        call = a2.sync()
        full = await next_update(call)
        assert [(p.id, list(p.addresses)) for p in full.peers_upserted] == [(nb.id, list(nb.addresses))]
        call.cancel()
        await a2.close()


async def test_ephemeral_node_removed_after_grace(tmp_path: Path) -> None:
    async with running(mesh_config(tmp_path, ephemeral_grace=0.3)) as srv:
        key = await auth_key(srv, reusable=True)
        eph_key = await auth_key(srv, ephemeral=True)
        a, e = NodeClient(srv), NodeClient(srv)
        await a.register(key, "a")
        ne = await e.register(eph_key, "eph")
        assert ne.ephemeral
        call_a, call_e = a.sync(), e.sync()
        await next_update(call_a)
        await next_update(call_e)
        await asyncio.sleep(0.5)  # connected longer than the grace: still there
        assert srv.state.node(ne.id) is not None
        call_e.cancel()
        removed = None
        for _ in range(4):
            upd = await next_update(call_a, wait=3)
            if list(upd.peers_removed):
                removed = list(upd.peers_removed)
                break
        assert removed == [ne.id]
        assert srv.state.node(ne.id) is None
        async with admin_unix(srv) as admin:
            nodes = await admin.ListNodes(apb.ListNodesRequest(), timeout=5)
        assert [n.name for n in nodes.nodes] == ["a"]
        call_a.cancel()
        await a.close()
        await e.close()


async def test_key_expiry_timer_removes_node(tmp_path: Path) -> None:
    async with running(mesh_config(tmp_path, key_expiry=600.0)) as srv:
        key = await auth_key(srv, reusable=True)
        a, b = NodeClient(srv), NodeClient(srv)
        await a.register(key, "a")
        call_a = a.sync()
        await next_update(call_a)
        # shorten b's lifetime through the state, as if it had registered long ago
        srv.state.cfg = replace(srv.state.cfg, key_expiry=0.4)
        nb = await b.register(key, "b")
        call_b = b.sync()
        await next_update(call_b)
        removed = None
        for _ in range(4):
            upd = await next_update(call_a, wait=3)
            if list(upd.peers_removed):
                removed = list(upd.peers_removed)
                break
        assert removed == [nb.id]
        assert await stream_error(call_b) == grpc.StatusCode.UNAUTHENTICATED
        call_a.cancel()
        await a.close()
        await b.close()


async def test_burst_of_50_registrations_is_batched(tmp_path: Path) -> None:
    async with running(mesh_config(tmp_path, batch_delay=0.2)) as srv:
        key = await auth_key(srv, reusable=True)
        watcher = NodeClient(srv)
        await watcher.register(key, "watcher")
        call = watcher.sync()
        await next_update(call)
        clients = [NodeClient(srv) for _ in range(50)]
        nodes = await asyncio.gather(*(c.register(key, f"n{i}") for i, c in enumerate(clients)))
        seen: set[int] = set()
        updates = 0
        serials = []
        while len(seen) < 50:
            upd = await next_update(call, wait=3)
            updates += 1
            serials.append(upd.serial)
            seen.update(p.id for p in upd.peers_upserted)
        assert seen == {n.id for n in nodes}
        assert updates <= 10, f"50 registrations arrived as {updates} updates"
        assert serials == list(range(2, 2 + updates))
        call.cancel()
        await watcher.close()
        for c in clients:
            await c.close()


async def test_signal_rpc_is_gone(tmp_path: Path) -> None:
    async with running(mesh_config(tmp_path)) as srv:
        key = await auth_key(srv, reusable=True)
        a = NodeClient(srv)
        await a.register(key, "a")
        body = b"\x08\x01\x12\x01x"  # what a SignalRequest{to_node_id: 1, payload: "x"} was
        rpc = a.channel.unary_unary(SERVICE + "Signal", request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await rpc(body, metadata=a.signed("Signal", body), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
        await a.close()


async def _a_online_watched_by_b(srv: RunningServer) -> tuple[NodeClient, NodeClient, pb.Node, Any, Any]:
    """Nodes a and b registered; b's stream open and a's stream open, b having heard a come online.
    Returns a, b, a's record, b's stream and a's stream."""
    key = await auth_key(srv, reusable=True)
    a, b = NodeClient(srv), NodeClient(srv)
    na = await a.register(key, "a")
    await b.register(key, "b")
    watch = b.sync()
    await next_update(watch)
    first = a.sync()
    await next_update(first)
    assert [p.online for p in (await next_update(watch)).peers_upserted if p.id == na.id] == [True]
    return a, b, na, watch, first


async def test_a_newer_stream_of_a_node_ends_the_older_one(tmp_path: Path) -> None:
    async with running(mesh_config(tmp_path)) as srv:
        a, b, na, watch, first = await _a_online_watched_by_b(srv)
        second = a.sync()
        full = await next_update(second)
        assert (full.serial, full.self.id) == (1, na.id)
        assert await stream_error(first) == grpc.StatusCode.ALREADY_EXISTS
        assert srv.state.is_online(na.id)  # the node never looked offline to its peers
        with pytest.raises(TimeoutError):
            await next_update(watch, wait=0.5)
        assert srv.hub.limits.refusals.streams_replaced == 1
        assert len(srv.hub.mapper.streams_of(na.id)) == 1
        for call in (second, watch):
            call.cancel()
        await a.close()
        await b.close()


async def test_a_node_back_within_the_presence_grace_is_no_change_to_its_peers(tmp_path: Path) -> None:
    clock = Clock()
    async with running(mesh_config(tmp_path, presence_grace=30.0), clock) as srv:
        a, b, na, watch, first = await _a_online_watched_by_b(srv)
        stats = srv.hub.mapper.stats

        async def streams(n: int) -> None:
            for _ in range(100):  # bounded: the server notices a cancelled stream
                if srv.hub.stream_count == n:
                    return
                await asyncio.sleep(0.02)
            raise AssertionError(f"{srv.hub.stream_count} streams open, expected {n}")

        deltas = stats.deltas_sent
        first.cancel()
        await streams(1)
        again = a.sync()
        assert (await next_update(again)).self.id == na.id
        again.cancel()
        await streams(1)
        await asyncio.sleep(0.3)  # several flush windows
        assert stats.deltas_sent == deltas  # leaving and coming back cost b nothing
        assert srv.state.is_online(na.id)  # within the grace
        clock.now += 31
        srv.hub.run_due()
        offline = await next_update(watch)
        assert [(p.id, p.online) for p in offline.peers_upserted] == [(na.id, False)]
        watch.cancel()
        await a.close()
        await b.close()


async def test_full_maps_wait_their_turn_and_a_node_deleted_meanwhile_gets_not_found(tmp_path: Path) -> None:
    cfg = replace(mesh_config(tmp_path), limits=LimitsConfig(full_maps_in_flight=1))
    async with running(cfg) as srv:
        key = await auth_key(srv, reusable=True)
        a, b, c = NodeClient(srv), NodeClient(srv), NodeClient(srv)
        for client, name in ((a, "a"), (b, "b"), (c, "c")):
            await client.register(key, name)
        await srv.hub.full_maps.acquire()  # the one turn is taken: every new stream waits
        call_a, call_b, call_c = a.sync(), b.sync(), c.sync()
        await asyncio.sleep(0.5)
        assert srv.hub.stream_count == 0  # queued, not refused, and no full map built yet
        async with admin_unix(srv) as admin:
            await admin.DeleteNode(apb.DeleteNodeRequest(ref="b"), timeout=5)
        srv.hub.full_maps.release()
        for call in (call_a, call_c):  # one after the other, each its full map
            full = await next_update(call)
            assert full.full
            assert {p.name for p in full.peers_upserted} <= {"a", "c"}
        assert await stream_error(call_b) == grpc.StatusCode.NOT_FOUND  # deleted while it waited
        for call in (call_a, call_c):
            call.cancel()
        for client in (a, b, c):
            await client.close()
