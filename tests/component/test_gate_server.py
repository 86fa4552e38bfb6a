"""ghostgate over real UDP on 127.0.0.1: STUN binding, and TURN relaying with aioice's TURN client."""

from __future__ import annotations

import asyncio
import re
import socket
import subprocess
import sys
from typing import Any

import pytest
from aioice import stun
from aioice.turn import create_turn_endpoint

from tests.component._gate_fixtures import Collector, gate_process, rest_credentials, start


async def test_stun_binding_from_a_plain_socket() -> None:
    server = await start()
    try:
        loop = asyncio.get_running_loop()
        transport, proto = await loop.create_datagram_endpoint(Collector, local_addr=("127.0.0.1", 0))
        try:
            req = stun.Message(stun.Method.BINDING, stun.Class.REQUEST)
            transport.sendto(bytes(req), server.address)
            data, src = await asyncio.wait_for(proto.queue.get(), 5)
            resp = stun.parse_message(data)
            assert src == server.address
            assert resp.transaction_id == req.transaction_id
            assert resp.attributes["XOR-MAPPED-ADDRESS"] == transport.get_extra_info("sockname")
        finally:
            transport.close()
        assert server.stats()["stun_binding"] == 1
    finally:
        server.close()


async def test_aioice_turn_client_relays_both_ways() -> None:
    server = await start(denied=[])  # the peer is on loopback, which the default denied_peers refuses
    loop = asyncio.get_running_loop()
    peer_t, peer = await loop.create_datagram_endpoint(Collector, local_addr=("127.0.0.1", 0))
    peer_addr = peer_t.get_extra_info("sockname")
    username, password = rest_credentials()
    try:
        turn, client = await asyncio.wait_for(
            create_turn_endpoint(Collector, server.address, username, password), 5
        )
        relayed = turn.get_extra_info("sockname")
        assert relayed[0] == "127.0.0.1"
        assert relayed != server.address
        for i in range(3):
            turn.sendto(b"to-peer-%d" % i, peer_addr)
            data, src = await asyncio.wait_for(peer.queue.get(), 5)
            assert (data, src) == (b"to-peer-%d" % i, relayed)
        peer_t.sendto(b"to-client", relayed)
        assert await asyncio.wait_for(client.queue.get(), 5) == (b"to-client", peer_addr)
        assert len(server.core.allocations) == 1
        turn.close()  # aioice deletes the allocation with Refresh LIFETIME=0
        for _ in range(50):
            if not server.core.allocations:
                break
            await asyncio.sleep(0.05)
        assert not server.core.allocations
        assert not server.relays
        stats = server.stats()
        assert stats["relayed_to_peer"] == 3
        assert stats["relayed_to_client"] == 1
        assert client.errors == []
    finally:
        peer_t.close()
        server.close()


async def test_loopback_peer_refused_and_allocation_kept() -> None:
    server = await start()  # default denied_peers: loopback refused
    username, password = rest_credentials()
    try:
        turn, client = await asyncio.wait_for(
            create_turn_endpoint(Collector, server.address, username, password), 5
        )
        turn.sendto(b"x", ("127.0.0.1", 9))
        for _ in range(50):
            if client.errors:
                break
            await asyncio.sleep(0.05)
        assert client.errors
        assert "403" in str(client.errors[0])
        assert len(server.core.allocations) == 1
        assert server.stats()["denied_peer"] >= 1
        turn.close()
        await asyncio.sleep(0.2)
    finally:
        server.close()


class _FailingSocket:
    """Stands in for a relay socket whose sends fail as to an unroutable peer (ENETUNREACH)."""

    def __init__(self, real: socket.socket) -> None:
        self.real = real

    def sendto(self, data: bytes, addr: Any) -> int:
        raise OSError(101, "Network is unreachable")

    def sendmsg(self, buffers: Any, cmsgs: Any, flags: int, addr: Any) -> int:
        raise OSError(101, "Network is unreachable")

    def fileno(self) -> int:
        return self.real.fileno()

    def close(self) -> None:
        self.real.close()


async def test_unroutable_peer_does_not_kill_the_allocation() -> None:
    server = await start(denied=[])
    loop = asyncio.get_running_loop()
    peer_t, peer = await loop.create_datagram_endpoint(Collector, local_addr=("127.0.0.1", 0))
    peer_addr = peer_t.get_extra_info("sockname")
    username, password = rest_credentials()
    try:
        turn, _ = await asyncio.wait_for(
            create_turn_endpoint(Collector, server.address, username, password), 5
        )
        relayed = turn.get_extra_info("sockname")
        real = server.relays[relayed]
        server.relays[relayed] = _FailingSocket(real)  # type: ignore[assignment]
        turn.sendto(b"lost", peer_addr)
        for _ in range(50):
            if server.stats().get("send_errors"):
                break
            await asyncio.sleep(0.05)
        assert server.stats()["send_errors"] >= 1
        assert len(server.core.allocations) == 1
        server.relays[relayed] = real  # the route comes back: the same allocation relays again
        turn.sendto(b"found", peer_addr)
        assert await asyncio.wait_for(peer.queue.get(), 5) == (b"found", relayed)
        turn.close()
        await asyncio.sleep(0.2)
    finally:
        peer_t.close()
        server.close()


def test_the_command_starts_reports_and_stops_on_sigterm(tmp_path: Any) -> None:
    conf = tmp_path / "g.toml"
    conf.write_text('[relay]\nlisten = "127.0.0.1:0"\n[turn]\nsecret = "x"\n')
    with gate_process(conf) as proc:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        assert line.startswith("ghostgate: listening on 127.0.0.1:")
        assert re.search(r"\(stun, turn, quic relay udp/\d+, tls relay tcp/\d+\)$", line.rstrip()), line
        assert "not served: relay.fallback" in proc.stderr.readline()
        proc.terminate()
        assert proc.wait(timeout=10) == 0


def test_the_command_fails_in_one_line(tmp_path: Any) -> None:
    conf = tmp_path / "g.toml"
    conf.write_text('[relay]\nlisten = "0.0.0.0:0"\n[turn]\nsecret = "x"\n')
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from ghostgate.app import main; sys.exit(main())",
            "--config",
            str(conf),
        ],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert out.returncode == 1
    assert out.stderr.startswith("ghostgate: turn.relay_address")
    assert len(out.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("junk", [b"\x00" * 3, b"\x40\x00\x00\xff", b"\x00\x01\x00\x00" + b"\x00" * 16])
async def test_junk_is_counted_and_the_server_keeps_answering(junk: bytes) -> None:
    server = await start()
    try:
        loop = asyncio.get_running_loop()
        transport, proto = await loop.create_datagram_endpoint(Collector, local_addr=("127.0.0.1", 0))
        try:
            transport.sendto(junk, server.address)
            req = stun.Message(stun.Method.BINDING, stun.Class.REQUEST)
            transport.sendto(bytes(req), server.address)
            data, _ = await asyncio.wait_for(proto.queue.get(), 5)
            assert stun.parse_message(data).transaction_id == req.transaction_id
            stats = server.stats()
            assert stats.get("malformed", 0) + stats.get("channel_unbound", 0) == 1
        finally:
            transport.close()
    finally:
        server.close()
