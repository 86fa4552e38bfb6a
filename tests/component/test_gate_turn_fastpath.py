"""ghostgate's TURN fast path over real UDP on 127.0.0.1: ChannelData relayed from the core's routes both
ways (in order, through GSO trains), dead routes and unpermitted peers not relayed (RFC 8656 §9, §12)."""

from __future__ import annotations

import asyncio
import hashlib
import time
from dataclasses import replace
from typing import Any

import pytest
from aioice import stun

from ghostcore.addr import HostPort
from ghostcore.errors import Unavailable
from ghostgate.turn_edge import TurnEdge, start_turn
from tests.component._gate_fixtures import SECRET, Collector, gate_config, rest_credentials

CHANNEL = 0x4001


class Clock:
    """Unix time that a test can move forward."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


class TurnClient:
    """A hand-written TURN client on an asyncio socket: Allocate, ChannelBind, ChannelData."""

    def __init__(self, transport: asyncio.DatagramTransport, proto: Collector, server: HostPort) -> None:
        self.transport, self.proto, self.server = transport, proto, server
        username, password = rest_credentials()
        self.key = hashlib.md5(f"{username}:ghostmesh:{password}".encode(), usedforsecurity=False).digest()
        self.auth: dict[str, Any] = {"USERNAME": username, "REALM": "ghostmesh"}

    async def transact(self, method: stun.Method, attrs: dict[str, Any], sign: bool = True) -> stun.Message:
        msg = stun.Message(method, stun.Class.REQUEST, attributes=dict(attrs))
        if sign:
            msg.attributes.update(self.auth)
            msg.add_message_integrity(self.key)
        self.transport.sendto(bytes(msg), self.server)
        for _ in range(100):  # skip relayed data, bounded
            data, _ = await asyncio.wait_for(self.proto.queue.get(), 5)
            if data[:1] in (b"\x00", b"\x01"):
                resp = stun.parse_message(data)
                if resp.transaction_id == msg.transaction_id:
                    return resp
        raise AssertionError("no response")

    def send(self, data: bytes) -> None:
        self.transport.sendto(data, self.server)

    async def allocate(self) -> HostPort:
        first = await self.transact(stun.Method.ALLOCATE, {"REQUESTED-TRANSPORT": 17 << 24}, sign=False)
        self.auth["NONCE"] = first.attributes["NONCE"]
        resp = await self.transact(stun.Method.ALLOCATE, {"REQUESTED-TRANSPORT": 17 << 24})
        relay: HostPort = resp.attributes["XOR-RELAYED-ADDRESS"]
        return relay

    async def bind(self, peer: HostPort) -> None:
        resp = await self.transact(
            stun.Method.CHANNEL_BIND, {"CHANNEL-NUMBER": CHANNEL, "XOR-PEER-ADDRESS": peer}
        )
        assert resp.message_class == stun.Class.RESPONSE


async def _setup(
    clock: Clock | None = None,
) -> tuple[TurnEdge, TurnClient, Any, Collector, HostPort, HostPort]:
    server = await start_turn(gate_config(denied=[]), SECRET.encode(), clock=clock or time.time)
    loop = asyncio.get_running_loop()
    ct, cp = await loop.create_datagram_endpoint(Collector, local_addr=("127.0.0.1", 0))
    pt, pp = await loop.create_datagram_endpoint(Collector, local_addr=("127.0.0.1", 0))
    client = TurnClient(ct, cp, server.address)
    relay = await client.allocate()
    peer: HostPort = pt.get_extra_info("sockname")
    await client.bind(peer)
    return server, client, pt, pp, relay, peer


async def _quiet(queue: asyncio.Queue[Any], seconds: float = 0.3) -> bool:
    try:
        await asyncio.wait_for(queue.get(), seconds)
    except TimeoutError:
        return True
    return False


async def test_a_burst_of_channel_data_is_relayed_in_order_both_ways() -> None:
    server, client, pt, peer, relay, _ = await _setup()
    try:
        # Bursts of 50: trains of many datagrams, within a default receive buffer so nothing is lost.
        n, burst = 300, 50
        for start in range(0, n, burst):
            for i in range(start, start + burst):
                payload = i.to_bytes(2, "big") * 600
                client.send(CHANNEL.to_bytes(2, "big") + len(payload).to_bytes(2, "big") + payload)
            for i in range(start, start + burst):
                data, src = await asyncio.wait_for(peer.queue.get(), 5)
                assert (data, src) == (i.to_bytes(2, "big") * 600, relay)
        for start in range(0, n, burst):
            for i in range(start, start + burst):
                pt.sendto(i.to_bytes(2, "big") * (1 + i % 7), relay)  # sizes vary: trains end and restart
            for i in range(start, start + burst):
                data, src = await asyncio.wait_for(client.proto.queue.get(), 5)
                payload = i.to_bytes(2, "big") * (1 + i % 7)
                assert src == server.address
                assert data == CHANNEL.to_bytes(2, "big") + len(payload).to_bytes(2, "big") + payload
        stats = server.stats()
        assert stats["relayed_to_peer"] == n
        assert stats["relayed_to_peer_bytes"] == n * 1200
        assert stats["relayed_to_client"] == n
        assert stats.get("send_errors", 0) == 0
    finally:
        client.transport.close()
        pt.close()
        server.close()


async def test_an_expired_permission_stops_relaying_at_once() -> None:
    clock = Clock()
    server, client, pt, peer, relay, _ = await _setup(clock)
    try:
        frame = CHANNEL.to_bytes(2, "big") + b"\x00\x02hi"
        client.send(frame)
        assert await asyncio.wait_for(peer.queue.get(), 5) == (b"hi", relay)
        clock.offset = 301.0  # past the permission (RFC 8656 §9: 300 s); the core's timer has not run
        client.send(frame)
        pt.sendto(b"late", relay)
        assert await _quiet(peer.queue)
        assert await _quiet(client.proto.queue)
        stats = server.stats()
        assert stats["no_permission"] == 1
        assert stats["peer_dropped"] == 1
        assert stats["relayed_to_peer"] == 1
        assert stats.get("relayed_to_client", 0) == 0
    finally:
        client.transport.close()
        pt.close()
        server.close()


async def test_peer_data_from_an_address_without_permission_is_dropped() -> None:
    server, client, pt, _, relay, _ = await _setup()
    loop = asyncio.get_running_loop()
    other_t, _ = await loop.create_datagram_endpoint(Collector, local_addr=("127.0.0.2", 0))
    same_ip_t, _ = await loop.create_datagram_endpoint(Collector, local_addr=("127.0.0.1", 0))
    try:
        other_t.sendto(b"stranger", relay)  # another IP: no permission
        assert await _quiet(client.proto.queue)
        assert server.stats()["peer_dropped"] == 1
        # The permitted IP from another port has a permission but no channel: a Data indication (§11.3).
        same_ip_t.sendto(b"neighbour", relay)
        data, _ = await asyncio.wait_for(client.proto.queue.get(), 5)
        ind = stun.parse_message(data)
        assert ind.message_method == stun.Method.DATA
        assert ind.attributes["DATA"] == b"neighbour"
        assert ind.attributes["XOR-PEER-ADDRESS"] == same_ip_t.get_extra_info("sockname")
        pt.sendto(b"friend", relay)  # the bound peer: ChannelData
        data, _ = await asyncio.wait_for(client.proto.queue.get(), 5)
        assert data == CHANNEL.to_bytes(2, "big") + b"\x00\x06friend"
    finally:
        other_t.close()
        same_ip_t.close()
        client.transport.close()
        pt.close()
        server.close()


async def test_a_busy_listen_port_is_named_with_its_errno() -> None:
    server = await start_turn(gate_config(denied=[]), SECRET.encode())
    port = server.address[1]
    try:
        cfg = gate_config(denied=[])
        busy = replace(cfg, relay=replace(cfg.relay, listen=f"127.0.0.1:{port}"))
        with pytest.raises(Unavailable) as err:
            await start_turn(busy, SECRET.encode())
        assert f"relay.listen: cannot bind UDP 127.0.0.1 port {port}: " in str(err.value)
        assert str(err.value).endswith("(EADDRINUSE)")
    finally:
        server.close()
