"""Relay revocation on loopback: an in-process ghostmesh with relay regions and an in-process ghostgate whose
``[control]`` watches it (``RelayControl.WatchNodes`` over ghostmesh's pinned TLS port).

Nodes register and take their relay credentials from their real first map (the token and TURN REST username
ghostmesh minted), then connect to the gate's TLS relay and allocate on its TURN server. Deleting or expiring
a node closes its live relay connection and its TURN allocation within 2 s, and refuses a new AUTH or
Allocate; a rotated node's old key is refused and its new one accepted; a gate with a wrong secret or a wrong
pin is refused with one line and serves as without ``[control]``; a ghostmesh restart is followed by a resync
to the same set; a gate without ``[control]`` keeps serving a deleted node until its credentials expire.
The measured delete → connection closed time is printed (``-s`` shows it).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from aioice.turn import create_turn_endpoint

from ghostcore import relaycontrol
from ghostcore import relaywire as rw
from ghostcore.joinkey import format_pin
from ghostcore.keys import PrivateKey, PublicKey
from ghostcore.pb.ghostmesh.v1 import admin_pb2 as apb
from ghostcore.pb.ghostmesh.v1 import coordination_pb2 as pb
from ghostcore.pb.ghostmesh.v1 import relaycontrol_pb2 as rpb
from ghostcore.pb.ghostmesh.v1 import relaycontrol_pb2_grpc as rpb_grpc
from ghostgate.app import revoker
from ghostgate.config import ControlConfig, GateConfig, RelayConfig, TurnConfig
from ghostgate.control import ControlWatch
from ghostgate.nodeset import NodeSet
from ghostgate.relay import RelayServer, start_relay
from ghostgate.turn_edge import TurnEdge, start_turn
from ghostmesh.config import MeshConfig
from ghostmesh.config import RelayConfig as MeshRelayConfig
from ghostmesh.server import RunningServer, start_server
from tests.component._gate_fixtures import Collector
from tests.component._mesh_fixtures import (
    NodeClient,
    admin_unix,
    auth_key,
    mesh_config,
    next_update,
    tls_channel,
)
from tests.component.test_gate_relay_server import TlsNode, tls_node

SECRET = "revocation-secret"
LIMIT = 2.0  # delete / expire -> closed, and the refusal of what follows


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def relay_mesh(tmp_path: Path, port: int = 0) -> MeshConfig:
    cfg = mesh_config(tmp_path)
    regions = [{"id": 1, "name": "local", "host": "127.0.0.1"}]  # nodes here dial the gate themselves
    return replace(
        cfg,
        server=replace(cfg.server, bind=f"127.0.0.1:{port}"),
        relay=MeshRelayConfig(secret=SECRET, regions=regions),
    )


@contextlib.asynccontextmanager
async def mesh(cfg: MeshConfig) -> AsyncIterator[RunningServer]:
    srv = await start_server(cfg)
    try:
        yield srv
    finally:
        await srv.stop(grace=0.2)


@dataclass
class Gate:
    turn: TurnEdge
    relay: RelayServer
    roster: NodeSet | None
    watch: ControlWatch | None

    def stats(self) -> dict[str, int]:
        return {**self.turn.stats(), **self.relay.stats()}


@contextlib.asynccontextmanager
async def gate(
    target: str = "", pin: str = "", *, name: str = "gate1", secret: str = SECRET
) -> AsyncIterator[Gate]:
    """A ghostgate (TURN + TLS/QUIC relay) on 127.0.0.1, with ``[control]`` when ``target`` is given: the
    parts ``ghostgate.app`` wires, without its signal handling."""
    control = (
        ControlConfig(server=target, pin=pin, name=name, reconnect_max=1.0) if target else ControlConfig()
    )
    cfg = GateConfig(
        relay=RelayConfig(listen="127.0.0.1:0"),
        turn=TurnConfig(secret=secret, denied_peers=[]),
        control=control,
    )
    roster = NodeSet() if target else None
    turn = await start_turn(cfg, secret.encode(), roster=roster)
    relay = await start_relay(cfg, secret.encode(), roster=roster)
    watch = None
    if roster is not None:
        watch = ControlWatch(cfg.control, secret.encode(), name, roster, revoker(turn, relay))
        watch.start()
    try:
        yield Gate(turn, relay, roster, watch)
    finally:
        if watch is not None:
            await watch.close()
        await relay.close()
        turn.close()


async def until(cond: Callable[[], bool], what: str, limit: float = 5.0) -> float:
    """Wait (bounded) for ``cond``; the seconds it took."""
    start = time.monotonic()
    while not cond():
        if time.monotonic() - start > limit:
            raise AssertionError(f"timed out after {limit} s waiting for {what}")
        await asyncio.sleep(0.005)
    return time.monotonic() - start


async def allowed(g: Gate, *members: Member) -> None:
    """Wait until the gate's set names these nodes (a node registered a moment ago may log in to a relay
    before the gate heard of it: refused, and ghostlink's relay client retries within 0.2 s)."""
    roster = g.roster
    assert roster is not None
    want = {m.node.id for m in members}
    await until(lambda: want <= roster.nodes().keys(), f"the gate to allow nodes {sorted(want)}")


@dataclass
class Member:
    """A registered node with the relay credentials of its map."""

    client: NodeClient
    node: pb.Node
    relay_map: pb.RelayMap
    stream: Any

    @property
    def raw(self) -> bytes:
        return self.client.key.public_key().raw

    async def close(self) -> None:
        self.stream.cancel()
        await self.client.close()


async def member(srv: RunningServer, name: str, key: str) -> Member:
    c = NodeClient(srv)
    node = await c.register(key, name)
    stream = c.sync()
    full = await next_update(stream)
    assert full.HasField("relay_map")
    return Member(c, node, full.relay_map, stream)


async def relay_login(n: TlsNode, key: PrivateKey, rm: pb.RelayMap) -> rw.Frame:
    challenge = await n.challenge()
    n.send(
        rw.AUTH,
        rw.encode_auth(key, PublicKey(rm.relay_static_key), rm.expires_unix, rm.relay_token, challenge),
    )
    return await n.frame()


async def admin(srv: RunningServer, method: str, ref: str) -> None:
    async with admin_unix(srv) as a:
        if method == "delete":
            await a.DeleteNode(apb.DeleteNodeRequest(ref=ref), timeout=5)
        else:
            await a.ExpireNode(apb.ExpireNodeRequest(ref=ref), timeout=5)


# -- delete / expire -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["delete", "expire"])
async def test_a_removed_nodes_relay_connection_is_closed_and_its_auth_refused(
    tmp_path: Path, how: str
) -> None:
    async with mesh(relay_mesh(tmp_path)) as srv, gate(srv.target, srv.tls_pin) as g:
        key = await auth_key(srv, reusable=True)
        a, b = await member(srv, "alpha", key), await member(srv, "beta", key)
        await allowed(g, a, b)
        async with tls_node(g.relay) as ta, tls_node(g.relay) as tb:
            assert (await relay_login(ta, a.client.key, a.relay_map)).type == rw.AUTH_OK
            assert (await relay_login(tb, b.client.key, b.relay_map)).type == rw.AUTH_OK
            tb.send(rw.SEND, a.raw + b"before")
            got = await ta.frame()
            assert (got.type, got.payload) == (rw.RECV, b.raw + b"before")

            start = time.monotonic()
            await admin(srv, how, "alpha")
            await asyncio.wait_for(ta.closed.wait(), LIMIT)
            took = time.monotonic() - start
            print(f"\n{how} -> relay connection closed: {took * 1000:.0f} ms")
            error = await ta.frame()
            assert (error.type, error.payload.decode()) == (
                rw.ERROR,
                "relay: node not current (deleted, expired or its key replaced at ghostmesh)",
            )
            assert took < LIMIT
            # beta keeps its connection; alpha is gone from the relay
            tb.send(rw.SEND, a.raw + b"after")
            gone = await tb.frame()
            assert (gone.type, gone.payload) == (rw.PEER_GONE, a.raw)
            async with tls_node(g.relay) as again:
                refused = await relay_login(again, a.client.key, a.relay_map)
                assert refused.type == rw.ERROR
                assert refused.payload.decode().startswith("relay AUTH: node not current")
                await asyncio.wait_for(again.closed.wait(), LIMIT)
        stats = g.stats()
        assert (stats["revoked"], stats["not_current"]) == (1, 1)
        for m in (a, b):
            await m.close()


class Turn(asyncio.DatagramProtocol):
    pass


async def test_a_deleted_nodes_turn_allocation_is_removed_and_allocate_refused(tmp_path: Path) -> None:
    async with mesh(relay_mesh(tmp_path)) as srv, gate(srv.target, srv.tls_pin) as g:
        key = await auth_key(srv, reusable=True)
        a, b = await member(srv, "alpha", key), await member(srv, "beta", key)
        await allowed(g, a, b)
        server = g.turn.address
        rm_a, rm_b = a.relay_map, b.relay_map
        assert rm_a.turn_username == f"{rm_a.expires_unix}:{a.node.id}"
        ta, _ = await create_turn_endpoint(Turn, server, rm_a.turn_username, rm_a.turn_password)
        tb, _ = await create_turn_endpoint(Turn, server, rm_b.turn_username, rm_b.turn_password)
        try:
            relayed_a = ta.get_extra_info("sockname")
            assert len(g.turn.core.allocations) == 2
            # a peer reaches alpha's relayed address while the allocation lives
            loop = asyncio.get_running_loop()
            peer, coll = await loop.create_datagram_endpoint(Collector, local_addr=("127.0.0.1", 0))
            ta.sendto(b"hello", peer.get_extra_info("sockname"))  # installs a permission for the peer
            await asyncio.wait_for(coll.queue.get(), 5)

            start = time.monotonic()
            await admin(srv, "delete", "alpha")
            await until(lambda: len(g.turn.core.allocations) == 1, "alpha's allocation to go", LIMIT)
            took = time.monotonic() - start
            print(f"\ndelete -> TURN allocation removed: {took * 1000:.0f} ms")
            assert took < LIMIT
            assert g.turn.stats()["allocations_revoked"] == 1
            # its relayed port is closed: nothing listens there any more
            probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                probe.bind(tuple(relayed_a))  # free again
            finally:
                probe.close()
            # beta's allocation is untouched, and a new Allocate of alpha is refused with 403
            assert [x.user_id for x in g.turn.core.allocations.values()] == [str(b.node.id)]
            with pytest.raises(Exception, match="403"):
                await create_turn_endpoint(Turn, server, rm_a.turn_username, rm_a.turn_password)
            assert g.turn.stats()["not_current"] >= 1
            peer.close()
        finally:
            ta.close()
            tb.close()
            await asyncio.sleep(0.1)
        for m in (a, b):
            await m.close()


# -- key rotation --------------------------------------------------------------------------------------------


async def test_a_rotated_nodes_old_key_is_refused_and_the_new_one_accepted(tmp_path: Path) -> None:
    async with mesh(relay_mesh(tmp_path)) as srv, gate(srv.target, srv.tls_pin) as g:
        key = await auth_key(srv, reusable=True)
        a = await member(srv, "alpha", key)
        await allowed(g, a)
        old = a.client.key
        async with tls_node(g.relay) as t_old:
            assert (await relay_login(t_old, old, a.relay_map)).type == rw.AUTH_OK
            new = PrivateKey.generate()
            await a.client.rotate(a.client.rotate_request(new))
            # pending only: the relay keeps the old key's connection
            await asyncio.sleep(0.3)
            assert not t_old.closed.is_set()
            a.client.key = new  # the node switched; its next proven call promotes the key
            start = time.monotonic()
            await a.client.report(endpoints=["192.0.2.7:41641"])
            await asyncio.wait_for(t_old.closed.wait(), LIMIT)
            took = time.monotonic() - start
            print(f"\nrotation promoted -> old key's relay connection closed: {took * 1000:.0f} ms")
            # the map brings the token for the new key; with it the new key is accepted
            for _ in range(5):
                upd = await next_update(a.stream)
                if upd.HasField("relay_map"):
                    break
            else:
                pytest.fail("no fresh relay credentials after the rotation")
            async with tls_node(g.relay) as t_new:
                assert (await relay_login(t_new, new, upd.relay_map)).type == rw.AUTH_OK
            async with tls_node(g.relay) as t_again:
                refused = await relay_login(t_again, old, a.relay_map)  # the old key, its still-valid token
                assert refused.payload.decode().startswith("relay AUTH: node not current")
        await a.close()


# -- gate authentication -------------------------------------------------------------------------------------


async def test_a_gate_with_a_wrong_secret_or_pin_is_refused_in_one_line_and_serves_as_before(
    tmp_path: Path,
) -> None:
    async with mesh(relay_mesh(tmp_path)) as srv:
        key = await auth_key(srv, reusable=True)
        a = await member(srv, "alpha", key)
        rc = srv.relay_control
        assert rc is not None
        async with gate(srv.target, srv.tls_pin, secret="another-secret") as g:
            assert g.watch is not None
            await until(lambda: g.watch is not None and g.watch.counters["failures"] >= 1, "a refused watch")
            err = g.watch.last_error
            assert err.startswith(f"ghostmesh at {srv.target} refused the watch: relay control: bad proof")
            assert "\n" not in err
            assert "another-secret" not in err
            assert SECRET not in err
            assert not g.watch.connected
            assert rc.counters["bad_proof"] >= 1
            assert (
                srv.hub.limits.refusals.auth_failures >= 1
            )  # counted, and audited, as a failed authentication
            # never synced: credentials alone decide (its own secret, so a map of the mesh does not verify,
            # but the gate still accepts what does)
            assert g.roster is not None
            assert not g.roster.synced
        wrong_pin = format_pin(os.urandom(32))
        before = (dict(rc.counters), srv.hub.limits.refusals.auth_failures)
        async with gate(srv.target, wrong_pin) as g:
            assert g.watch is not None
            await until(lambda: g.watch is not None and g.watch.counters["failures"] >= 1, "a pin mismatch")
            err = g.watch.last_error
            assert err.startswith(f"ghostmesh at {srv.target} presents TLS key sha256:")
            assert f"not the pinned {wrong_pin}" in err
            assert "\n" not in err
            assert (dict(rc.counters), srv.hub.limits.refusals.auth_failures) == before  # nothing was sent
            async with tls_node(g.relay) as t:  # serves as without [control]
                assert (await relay_login(t, a.client.key, a.relay_map)).type == rw.AUTH_OK
            await admin(srv, "delete", "alpha")
            async with tls_node(g.relay) as t:  # and so a deleted node still gets in (credentials alone)
                assert (await relay_login(t, a.client.key, a.relay_map)).type == rw.AUTH_OK
        await a.close()


def watch_request(gate_name: str, *, secret: str = SECRET, at: float | None = None) -> rpb.WatchNodesRequest:
    now = int(time.time() if at is None else at)
    nonce = os.urandom(relaycontrol.NONCE_LEN)
    proof = relaycontrol.proof(secret.encode(), gate_name, now, nonce)
    return rpb.WatchNodesRequest(gate=gate_name, unix_time=now, nonce=nonce, proof=proof)


async def status_of(call: Any, wait: float = 5.0) -> tuple[grpc.StatusCode, str]:
    try:
        async with asyncio.timeout(wait):
            while await call.read() is not grpc.aio.EOF:
                pass
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


async def test_watch_refusals_stale_replayed_malformed_and_replaced(tmp_path: Path) -> None:
    async with mesh(relay_mesh(tmp_path)) as srv:
        rc = srv.relay_control
        assert rc is not None
        channel = tls_channel(srv)
        stub = rpb_grpc.RelayControlStub(channel)
        try:
            code, text = await status_of(stub.WatchNodes(watch_request("g", at=time.time() - 120)))
            assert code == grpc.StatusCode.UNAUTHENTICATED
            assert re.search(r"gate g's clock is -12[01] s off ghostmesh's \(at most 60 s", text)
            code, text = await status_of(stub.WatchNodes(watch_request("bad name")))
            assert code == grpc.StatusCode.INVALID_ARGUMENT
            assert "WatchNodesRequest.gate" in text
            # a good request: the full set, then it stays open; the same request again is a replay
            req = watch_request("g")
            first = stub.WatchNodes(req)
            full = await asyncio.wait_for(first.read(), 5)
            assert (full.serial, full.reset, full.complete, list(full.nodes)) == (1, True, True, [])
            code, text = await status_of(stub.WatchNodes(req))
            assert (code, "already used once" in text) == (grpc.StatusCode.UNAUTHENTICATED, True)
            # a newer watch of the same name ends the older
            second = stub.WatchNodes(watch_request("g"))
            await asyncio.wait_for(second.read(), 5)
            code, text = await status_of(first)
            assert code == grpc.StatusCode.ALREADY_EXISTS
            assert "newer watch" in text
            second.cancel()
            assert (rc.counters["stale"], rc.counters["bad_request"], rc.counters["replayed"]) == (1, 1, 1)
            assert rc.counters["replaced"] == 1
            assert srv.hub.limits.refusals.auth_failures == 2  # the stale and the replayed one
        finally:
            await channel.close()


# -- ghostmesh restart, and no [control] ---------------------------------------------------------------------


async def test_after_a_ghostmesh_restart_the_gate_resyncs_to_the_same_set(tmp_path: Path) -> None:
    cfg = relay_mesh(tmp_path, free_port())
    srv = await start_server(cfg)
    target, pin = srv.target, srv.tls_pin
    try:
        async with gate(target, pin) as g:
            assert g.watch is not None
            assert g.roster is not None
            key = await auth_key(srv, reusable=True)
            a, b = await member(srv, "alpha", key), await member(srv, "beta", key)
            await admin(srv, "delete", "beta")
            await until(lambda: g.roster is not None and len(g.roster) == 1, "the set {alpha}")
            before = g.roster.nodes()
            assert set(before) == {a.node.id}
            for m in (a, b):
                await m.close()
            await srv.stop(grace=0.2)
            await until(lambda: g.watch is not None and not g.watch.connected, "the watch to drop")
            # ghostmesh away: the last set stays in force
            async with tls_node(g.relay) as t:
                assert (await relay_login(t, a.client.key, a.relay_map)).type == rw.AUTH_OK
            async with tls_node(g.relay) as t:
                assert (await relay_login(t, b.client.key, b.relay_map)).type == rw.ERROR
            full_sets = g.watch.counters["full_sets"]
            srv = await start_server(cfg)
            assert (srv.target, srv.tls_pin) == (target, pin)
            await until(
                lambda: g.watch is not None and g.watch.counters["full_sets"] > full_sets, "a resync", 10
            )
            assert g.roster.nodes() == before
            # and revocations flow again
            async with tls_node(g.relay) as t:
                assert (await relay_login(t, a.client.key, a.relay_map)).type == rw.AUTH_OK
                await admin(srv, "delete", "alpha")
                await asyncio.wait_for(t.closed.wait(), LIMIT)
    finally:
        await srv.stop(grace=0.2)


async def test_a_gate_without_control_serves_a_deleted_node_until_its_credentials_expire(
    tmp_path: Path,
) -> None:
    async with mesh(relay_mesh(tmp_path)) as srv, gate() as g:
        assert (g.roster, g.watch) == (None, None)
        key = await auth_key(srv, reusable=True)
        a = await member(srv, "alpha", key)
        async with tls_node(g.relay) as t:
            assert (await relay_login(t, a.client.key, a.relay_map)).type == rw.AUTH_OK
            await admin(srv, "delete", "alpha")
            await asyncio.sleep(0.5)
            assert not t.closed.is_set()
        async with tls_node(g.relay) as t:
            assert (await relay_login(t, a.client.key, a.relay_map)).type == rw.AUTH_OK
        rm = a.relay_map
        turn, _ = await create_turn_endpoint(Turn, g.turn.address, rm.turn_username, rm.turn_password)
        turn.close()
        assert "revoked" not in g.stats()
        await a.close()
