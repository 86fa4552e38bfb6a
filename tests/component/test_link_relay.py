"""ghostlink's relayed data path on 127.0.0.1: two RelayProxy instances, each with a fake "WireGuard" UDP
socket, exchange packets through ghostgate's real relay (in-process, QUIC and TLS over TCP), through TURN on
ghostgate and on Debian's coturn; relay connections that go silent are noticed within ~2 s and the home
region moves; packets sent before any relay is connected are delivered once one is.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import shutil
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from aioice import stun

from ghostcore import relaywire as rw
from ghostcore import tlscert
from ghostcore.errors import Unavailable
from ghostcore.keys import PrivateKey
from ghostgate.config import GateConfig, RelayConfig, TurnConfig
from ghostgate.relay import RelayServer, start_relay
from ghostlink.engine import RegionInfo
from ghostlink.nodekey import NodeKey
from ghostlink.traversal import relayclient, turnclient
from ghostlink.traversal.proxy import RelayCreds, RelayProxy
from ghostlink.traversal.proxy_core import turn_address
from ghostlink.traversal.relayclient import RelayClient
from ghostlink.traversal.turnclient import TurnClient
from tests.component._gate_fixtures import SECRET as GATE_SECRET
from tests.component._gate_fixtures import Collector, rest_credentials
from tests.component._gate_fixtures import start as start_gate

SECRET = GATE_SECRET  # one secret for the relay and TURN, as ghostmesh and the gates share it
TIMEOUT = 5.0
# What ghostmesh puts in the relay map for gates with the default certificate
PIN = tlscert.key_pin(tlscert.derived_key(rw.relay_tls_seed(SECRET.encode())))
STATIC = rw.relay_static_key(SECRET.encode()).public_key().raw


async def until(cond: Callable[[], bool], what: str, limit: float = TIMEOUT) -> float:
    """Wait (bounded) for ``cond``; returns the seconds it took."""
    start = time.monotonic()
    while time.monotonic() - start < limit:
        if cond():
            return time.monotonic() - start
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out after {limit} s waiting for {what}")


async def start_relay_server() -> RelayServer:
    cfg = GateConfig(relay=RelayConfig(listen="127.0.0.1:0"), turn=TurnConfig(secret=SECRET))
    return await start_relay(cfg, SECRET.encode())


def creds(key: bytes, ttl: int = 3600) -> RelayCreds:
    expiry = int(time.time()) + ttl
    username, password = rest_credentials(base64.b64encode(key[:6]).decode(), ttl)
    token = rw.token_mac(SECRET.encode(), base64.b64encode(key).decode(), expiry)
    return RelayCreds(username, password, expiry, token, STATIC)


def region(
    rid: int, quic_port: int, tcp_port: int, stun_port: int = 0, *, turn: bool = False, pin: bytes = PIN
) -> RegionInfo:
    return RegionInfo(rid, f"r{rid}", "127.0.0.1", stun_port, quic_port, tcp_port, turn, pin)


def relay_region(rid: int, server: RelayServer, *, quic: bool = True, pin: bytes = PIN) -> RegionInfo:
    quic_port = server.quic_address[1] if quic and server.quic_address else closed_udp_port()
    return region(rid, quic_port, server.tcp_address[1], pin=pin)


def closed_udp_port() -> int:
    """A UDP port nobody listens on (bound, then released)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    port: int = s.getsockname()[1]
    s.close()
    return port


class Node:
    """One RelayProxy, its node key holder and its fake WireGuard socket. ``key``: the raw public key the
    map names this node by (what the relay routes to)."""

    def __init__(self, wg: asyncio.DatagramTransport, coll: Collector, keys: NodeKey) -> None:
        self.wg = wg
        self.coll = coll
        self.keys = keys
        self.key = keys.public.raw
        self.proxy = RelayProxy(wg_port=wg.get_extra_info("sockname")[1], keys=keys, on_change=self._bump)
        self.changes = 0

    def _bump(self) -> None:
        self.changes += 1

    def send_to(self, peer: Node, data: bytes) -> None:
        """What WireGuard does: send to the peer's endpoint, which is our proxy's socket for it."""
        host, port = self.proxy.endpoint(peer.key).split(":")
        self.wg.sendto(data, (host, int(port)))

    async def recv(self) -> tuple[bytes, tuple[str, int]]:
        return await asyncio.wait_for(self.coll.queue.get(), TIMEOUT)


@asynccontextmanager
async def nodes(n: int = 2) -> AsyncIterator[list[Node]]:
    loop = asyncio.get_running_loop()
    out: list[Node] = []
    try:
        for _ in range(n):
            wg, coll = await loop.create_datagram_endpoint(Collector, local_addr=("127.0.0.1", 0))
            out.append(Node(wg, coll, NodeKey(PrivateKey.generate())))
        yield out
    finally:
        for node in out:
            await node.proxy.close()
            node.wg.close()


async def configure(ns: list[Node], regions: list[RegionInfo], *, use_turn: bool = False) -> None:
    for nd in ns:
        await nd.proxy.configure(regions, creds(nd.key), node_key=nd.key, use_turn=use_turn)


def route_all(ns: list[Node]) -> None:
    for a in ns:
        for b in ns:
            if a is not b:
                a.proxy.set_route(b.key, b.proxy.home_region, b.proxy.turn_relay)


async def exchange(a: Node, b: Node, count: int = 5, size: int = 200) -> None:
    """Packets both ways, each arriving at the other's WireGuard from the sender's local socket there."""
    for i in range(count):
        payload = bytes([i % 256]) * size
        a.send_to(b, payload)
        data, src = await b.recv()
        assert data == payload
        assert f"{src[0]}:{src[1]}" == b.proxy.endpoint(a.key)
        b.send_to(a, payload[::-1] + b"!")
        data, src = await a.recv()
        assert data == payload[::-1] + b"!"
        assert f"{src[0]}:{src[1]}" == a.proxy.endpoint(b.key)


async def test_two_proxies_over_quic() -> None:
    server = await start_relay_server()
    try:
        async with nodes() as (a, b):
            await configure([a, b], [relay_region(1, server)])
            await until(lambda: a.proxy.home_region == 1 and b.proxy.home_region == 1, "home region 1")
            assert a.changes >= 1
            route_all([a, b])
            await exchange(a, b)
            await exchange(a, b, count=3, size=1452)  # too big for one DATAGRAM: SEND / RECV on stream 0
            assert a.proxy.regions()[0][:3] == (1, "r1", "quic")
            assert a.proxy.regions()[0][3] > 0
            assert a.proxy.path_of(b.key) == ("relay", "r1")
            assert a.proxy.counters["to_relay"] == 8
            assert b.proxy.counters["from_relay"] == 8
        assert server.stats()["forwarded"] == 16
    finally:
        await server.close()
    assert not server.hub.live


def test_two_proxies_over_quic_on_uvloop() -> None:
    """The daemon runs on uvloop when installed (ghostcore.aio.run): the same path there."""
    uvloop = pytest.importorskip("uvloop")
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(test_two_proxies_over_quic())


async def test_unknown_and_removed_peers_are_dropped() -> None:
    server = await start_relay_server()
    try:
        async with nodes(3) as (a, b, c):
            await configure([a, b, c], [relay_region(1, server)])
            await until(lambda: all(n.proxy.home_region == 1 for n in (a, b, c)), "all connected")
            route_all([a, b])
            c.proxy.set_route(b.key, 1, "")  # c knows b, b does not know c
            c.send_to(b, b"who am i")
            await until(lambda: b.proxy.counters["drop_unknown_key"] == 1, "unknown key dropped")
            await exchange(a, b, count=1)
            old = b.proxy.endpoint(a.key)
            b.proxy.remove_peer(a.key)
            a.send_to(b, b"after removal")
            await until(lambda: b.proxy.counters["drop_unknown_key"] == 2, "removed peer dropped")
            assert b.coll.queue.empty()
            assert b.proxy.path_of(a.key) == ("", "")
            host, port = old.split(":")
            probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                probe.bind((host, int(port)))  # the removed peer's socket is closed: its port is free again
            finally:
                probe.close()
    finally:
        await server.close()


HANDSHAKE = b"\x01\x00\x00\x00" + b"i" * 144  # a WireGuard handshake initiation's shape (type 1, 148 bytes)
RESPONSE = b"\x02\x00\x00\x00" + b"r" * 88  # a handshake response's shape (type 2, 92 bytes)


async def test_handshake_from_a_key_not_yet_a_peer_is_held_until_wireguard_knows_it() -> None:
    """The peer's map may name us a moment after our first handshake reaches it: not a 5 s retry."""
    server = await start_relay_server()
    try:
        async with nodes(2) as (a, b):
            await configure([a, b], [relay_region(1, server)])
            await until(lambda: a.proxy.home_region == 1 and b.proxy.home_region == 1, "both connected")
            a.proxy.set_route(b.key, 1, "")  # a knows b; b's map does not name a yet
            a.send_to(b, b"\x04data before the map")  # not a handshake: dropped as before
            a.send_to(b, HANDSHAKE)
            await until(lambda: b.proxy.counters["held_unknown"] == 1, "handshake held")
            assert b.proxy.counters["drop_unknown_key"] == 1
            b.proxy.deliver_held()  # nothing to deliver yet: a is still unknown
            assert b.coll.queue.empty()
            b.proxy.set_route(a.key, 1, "")  # b's map names a now; the daemon adds a to WireGuard, then:
            b.proxy.deliver_held()
            data, src = await b.recv()
            assert data == HANDSHAKE
            assert f"{src[0]}:{src[1]}" == b.proxy.endpoint(a.key)
            b.proxy.deliver_held()
            assert b.coll.queue.empty()  # delivered once
    finally:
        await server.close()


async def test_handshake_to_a_peer_not_on_the_relay_yet_is_retried_after_peer_gone() -> None:
    """The new peer connects to the relay after our first handshake: PEER_GONE, then retries until it is."""
    server = await start_relay_server()
    try:
        async with nodes(2) as (a, b):
            await configure([a], [relay_region(1, server)])
            await until(lambda: a.proxy.home_region == 1, "a connected")
            a.proxy.set_route(b.key, 1, "")
            a.send_to(b, HANDSHAKE)
            await until(lambda: server.stats().get("unknown_dest", 0) >= 1, "PEER_GONE for b")
            await configure([b], [relay_region(1, server)])  # b comes up later
            b.proxy.set_route(a.key, 1, "")
            data, _ = await b.recv()
            assert data == HANDSHAKE
            assert a.proxy.counters["handshake_retries"] >= 1
            b.send_to(a, RESPONSE)  # the peer answers: retries stop
            await a.recv()
            sent = a.proxy.counters["handshake_retries"]
            await asyncio.sleep(1.2)  # two retry intervals: none may follow an answer
            assert a.proxy.counters["handshake_retries"] == sent
            while not b.coll.queue.empty():
                assert b.coll.queue.get_nowait()[0] == HANDSHAKE  # retries that crossed the answer
    finally:
        await server.close()


async def test_node_key_change_reauthenticates() -> None:
    server = await start_relay_server()
    try:
        async with nodes() as (a, b):
            regions = [relay_region(1, server)]
            await configure([a, b], regions)
            await until(lambda: a.proxy.home_region == 1 and b.proxy.home_region == 1, "connected")
            route_all([a, b])
            await exchange(a, b, count=1)
            old = a.key
            a.keys.switch(PrivateKey.generate())
            a.key = a.keys.public.raw
            await a.proxy.configure(regions, creds(a.key), node_key=a.key, use_turn=False)
            await until(lambda: a.key in server.hub.core.routes, "relay routes the new key")
            await until(lambda: old not in server.hub.core.routes, "old key gone from the relay")
            b.proxy.remove_peer(old)
            route_all([a, b])
            await until(lambda: a.proxy.home_region == 1, "a connected again")
            await exchange(a, b, count=2)
    finally:
        await server.close()


async def test_quic_port_closed_falls_back_to_tls() -> None:
    server = await start_relay_server()
    try:
        async with nodes() as (a, b):
            await configure([a, b], [relay_region(1, server, quic=False)])
            await until(lambda: a.proxy.home_region == 1 and b.proxy.home_region == 1, "home over TLS")
            assert a.proxy.regions()[0][2] == "tcp"
            route_all([a, b])
            await exchange(a, b)
            await exchange(a, b, count=2, size=1452)
    finally:
        await server.close()


async def test_udp_dropped_silently_is_tls_after_quics_head_start_only() -> None:
    server = await start_relay_server()
    assert server.quic_address is not None
    hole = Blackhole(server.quic_address)
    hole.silent = True  # a firewall that drops UDP: no answer, no ICMP
    try:
        async with nodes(1) as (a,):
            await a.proxy.configure(
                [region(1, hole.port, server.tcp_address[1])], creds(a.key), node_key=a.key, use_turn=False
            )
            took = await until(lambda: a.proxy.home_region == 1, "connected over TLS")
            # TLS is raced against QUIC from TCP_HEAD_START on, not tried after QUIC's whole timeout
            assert relayclient.TCP_HEAD_START <= took < relayclient.QUIC_CONNECT_TIMEOUT, took
            assert a.proxy.regions()[0][2] == "tcp"
    finally:
        await server.close()
        hole.close()


async def test_tls_wins_over_a_slow_quic_whose_attempt_then_stops() -> None:
    server = await start_relay_server()
    assert server.quic_address is not None
    hole = Blackhole(server.quic_address)
    hole.delay = 0.5  # QUIC's handshake would need > 1 s here (it gives up first); TLS over TCP a few ms
    try:
        async with nodes(1) as (a,):
            await a.proxy.configure(
                [region(1, hole.port, server.tcp_address[1])], creds(a.key), node_key=a.key, use_turn=False
            )
            took = await until(lambda: a.proxy.home_region == 1, "connected")
            assert took < relayclient.QUIC_CONNECT_TIMEOUT, took
            assert a.proxy.regions()[0][2] == "tcp"
            await asyncio.sleep(relayclient.QUIC_CONNECT_TIMEOUT)  # past any QUIC attempt's end
            sent = hole.forwarded
            await asyncio.sleep(1.5)  # QUIC would retransmit its Initial within this
            assert hole.forwarded == sent, "the losing QUIC attempt still sends"
            assert a.proxy.regions()[0][2] == "tcp"
    finally:
        await server.close()
        hole.close()


async def _slow_tcp(target: tuple[str, int], delay: float) -> tuple[asyncio.Server, list[float]]:
    """A TCP forwarder to ``target`` that holds each connection ``delay`` s before forwarding (a TLS
    handshake still in flight when QUIC wins); the times its connections closed, for the test."""
    closed: list[float] = []

    async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await r.read(65536):
                w.write(data)
                await w.drain()
        w.close()

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await asyncio.sleep(delay)
        ur, uw = await asyncio.open_connection(*target)
        await asyncio.gather(pipe(r, uw), pipe(ur, w))
        closed.append(time.monotonic())

    return await asyncio.start_server(handle, "127.0.0.1", 0), closed


async def _quic_wins_over_a_tls_handshake_in_flight(caplog: pytest.LogCaptureFixture) -> None:
    server = await start_relay_server()
    assert server.quic_address is not None
    slow, closed = await _slow_tcp(server.tcp_address, 0.8)
    hole = Blackhole(server.quic_address)
    hole.delay = 0.1  # QUIC completes after its head start: the TLS attempt has begun
    try:
        async with nodes(1) as (a,):
            tcp_port = slow.sockets[0].getsockname()[1]
            await a.proxy.configure(
                [region(1, hole.port, tcp_port)], creds(a.key), node_key=a.key, use_turn=False
            )
            await until(lambda: a.proxy.home_region == 1, "connected")
            assert a.proxy.regions()[0][2] == "quic"
            await until(lambda: bool(closed), "the losing TLS connection closed, once its handshake ended")
    finally:
        await server.close()
        hole.close()
        slow.close()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], [r.getMessage() for r in errors]


def test_quic_wins_over_a_tls_handshake_in_flight_which_is_closed_once_done_on_uvloop(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """On uvloop, as the daemon runs: QUIC wins, and the TLS attempt still in its handshake is closed once
    that ends, with nothing logged at error. (Cancelling it instead made uvloop's SSL protocol log "Fatal
    error on SSL protocol" with a trace when the server's answer arrived just then, seen once in a netns
    run; this test cannot force that timing, it checks the path that replaced the cancel.)"""
    uvloop = pytest.importorskip("uvloop")
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(_quic_wins_over_a_tls_handshake_in_flight(caplog))


async def test_first_packets_buffered_until_a_relay_connects() -> None:
    server = await start_relay_server()
    try:
        async with nodes() as (a, b):
            # Routes and endpoints before any relay: WireGuard's first handshake goes out at once.
            a.proxy.set_route(b.key, 1, "")
            b.proxy.set_route(a.key, 1, "")
            b.proxy.endpoint(a.key)
            for i in range(3):
                a.send_to(b, b"early-%d" % i)
            await until(lambda: a.proxy.counters["buffered"] == 3, "buffered packets")
            await configure([b], [relay_region(1, server)])
            await until(lambda: b.proxy.home_region == 1, "b connected")
            await configure([a], [relay_region(1, server)])
            got = [(await b.recv())[0] for _ in range(3)]
            assert got == [b"early-0", b"early-1", b"early-2"]
    finally:
        await server.close()


class Blackhole:
    """A UDP forwarder in front of a QUIC relay (one upstream socket per client) that can go silent: a relay
    host that vanished without a FIN, a CONNECTION_CLOSE or an ICMP error."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.loop = asyncio.get_running_loop()
        self.target = target
        self.silent = False
        self.delay = 0.0  # seconds each datagram is held, each way (a long path)
        self.forwarded = 0  # datagrams from clients passed on
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        self.sock.bind(("127.0.0.1", 0))
        self.port: int = self.sock.getsockname()[1]
        self.ups: dict[tuple[str, int], socket.socket] = {}
        self.loop.add_reader(self.sock.fileno(), self._down)

    def _down(self) -> None:
        data, addr = self.sock.recvfrom(65535)
        up = self.ups.get(addr)
        if up is None:
            up = self.ups[addr] = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            up.setblocking(False)
            up.connect(self.target)
            self.loop.add_reader(up.fileno(), self._up, up, addr)
        if not self.silent:
            self.forwarded += 1
            self.loop.call_later(self.delay, self._send, up, data, None)

    def _up(self, up: socket.socket, addr: tuple[str, int]) -> None:
        with contextlib.suppress(OSError):  # the relay went away (ICMP refused): nothing to pass on
            data = up.recv(65535)
            if not self.silent:
                self.loop.call_later(self.delay, self._send, self.sock, data, addr)

    @staticmethod
    def _send(sock: socket.socket, data: bytes, addr: tuple[str, int] | None) -> None:
        with contextlib.suppress(OSError):  # a datagram held past the close of either end is lost
            if addr is None:
                sock.send(data)
            else:
                sock.sendto(data, addr)

    def close(self) -> None:
        for s in (self.sock, *self.ups.values()):
            self.loop.remove_reader(s.fileno())
            s.close()


async def test_silent_relay_is_noticed_and_home_moves() -> None:
    servers = [await start_relay_server(), await start_relay_server()]
    holes = []
    for srv in servers:
        assert srv.quic_address is not None
        holes.append(Blackhole(srv.quic_address))
    try:
        async with nodes() as (a, b):
            regions = [region(i + 1, h.port, 0) for i, h in enumerate(holes)]  # QUIC only, behind the holes
            await configure([a, b], regions)
            await until(lambda: all(r[2] for n in (a, b) for r in n.proxy.regions()), "both regions up")
            route_all([a, b])
            await exchange(a, b, count=2)
            home = a.proxy.home_region
            other = 3 - home
            assert home in (1, 2)
            holes[home - 1].silent = True  # a's home relay vanishes without a word
            took = await until(lambda: a.proxy.home_region == other, "a's home moves", 5.0)
            assert took < 3.5, took
            await until(lambda: b.proxy.home_region == other, "b's home moves", 5.0)
            assert a.proxy.regions()[home - 1][2] == ""  # no longer connected
            # The peers' homes from the map may be the dead region: any live relay carries the packets.
            await exchange(a, b, count=2)
            assert a.proxy.path_of(b.key) == ("relay", f"r{other}")
    finally:
        for srv in servers:
            await srv.close()
        for h in holes:
            h.close()


async def test_bad_token_is_refused_and_retried_without_alive() -> None:
    server = await start_relay_server()
    got: list[bytes] = []
    keys = NodeKey(PrivateKey.generate())
    try:
        client = RelayClient(
            name="r1",
            host="127.0.0.1",
            quic_port=server.quic_address[1] if server.quic_address else 0,
            tcp_port=0,
            tls_pin=PIN,
            keys=keys,
            node_key=keys.public.raw,
            relay_static=STATIC,
            expiry=int(time.time()) + 60,
            token=b"\0" * 32,
            on_recv=lambda k, p: got.append(p),
        )
        client.start()
        await until(lambda: client.counters["error"] >= 1, "ERROR from the relay")
        assert not client.alive
        assert not client.send(os.urandom(32), b"x")
        assert client.counters["drop_not_connected"] == 1
        await client.close()
        assert server.stats()["auth_failed"] >= 1
    finally:
        await server.close()


def _client(
    server: RelayServer,
    keys: NodeKey,
    node_key: bytes,
    *,
    pin: bytes = PIN,
    quic: bool = True,
    tcp: bool = True,
) -> RelayClient:
    expiry = int(time.time()) + 60
    return RelayClient(
        name="r1",
        host="127.0.0.1",
        quic_port=server.quic_address[1] if quic and server.quic_address else 0,
        tcp_port=server.tcp_address[1] if tcp else 0,
        tls_pin=pin,
        keys=keys,
        node_key=node_key,
        relay_static=STATIC,
        expiry=expiry,
        token=rw.token_mac(SECRET.encode(), base64.b64encode(node_key).decode(), expiry),
        on_recv=lambda k, p: None,
    )


@pytest.mark.parametrize("transport", ["quic", "tcp"])
async def test_relay_certificate_not_matching_the_pin_is_refused_before_any_frame(transport: str) -> None:
    server = await start_relay_server()
    keys = NodeKey(PrivateKey.generate())
    try:
        wrong = _client(
            server,
            keys,
            keys.public.raw,
            pin=os.urandom(32),
            quic=transport == "quic",
            tcp=transport == "tcp",
        )
        wrong.start()
        await until(lambda: wrong.counters["pin_mismatch"] >= 2, "two refused handshakes")
        assert not wrong.alive
        assert wrong.counters["recv"] == wrong.counters["error"] == 0
        await wrong.close()
        assert (
            server.stats().get("auth_failed", 0) == server.stats().get("authenticated", 0) == 0
        )  # no AUTH sent
        right = _client(server, keys, keys.public.raw, quic=transport == "quic", tcp=transport == "tcp")
        right.start()
        await until(lambda: right.alive, "the same relay accepted with the right pin")
        assert right.transport == transport
        await right.close()
    finally:
        await server.close()


async def test_mid_rotation_the_replaced_key_still_authenticates() -> None:
    """The node switched to its new key, ghostmesh has not promoted it yet: the map (and the token) name the
    old key, whose private half the holder keeps for exactly this."""
    server = await start_relay_server()
    old = PrivateKey.generate()
    keys = NodeKey(old)
    keys.switch(PrivateKey.generate())
    stranger = NodeKey(PrivateKey.generate())  # holds neither: a leaked map is not enough
    try:
        mid = _client(server, keys, old.public_key().raw)
        mid.start()
        await until(lambda: mid.alive, "authenticated with the replaced key")
        await mid.close()
        thief = _client(server, stranger, old.public_key().raw)
        thief.start()
        await until(lambda: thief.counters["no_private_key"] >= 1, "no proof possible")
        assert not thief.alive
        await thief.close()
    finally:
        await server.close()


# ----- TURN


async def _turn_pair(server_port: int) -> None:
    async with nodes() as (a, b):
        regions = [region(1, 0, 0, stun_port=server_port, turn=True)]
        await configure([a, b], regions, use_turn=True)
        await until(lambda: bool(a.proxy.turn_relay and b.proxy.turn_relay), "TURN allocations", 10.0)
        assert a.changes >= 1
        assert a.proxy.home_region == 0
        route_all([a, b])
        assert a.proxy.path_of(b.key) == ("turn", "r1")
        # Each side binds a channel to the other's relayed address at set_route. A packet can reach the
        # peer's allocation before the server installed the peer's own permission for us (coturn handles
        # the two allocations independently) and is then dropped, as RFC 8656 §9 says; WireGuard retries
        # its handshake, so do we here: the first packet each way is sent until it arrives (bounded).
        sent = 0
        for x, y in ((a, b), (b, a)):
            for _ in range(20):
                x.send_to(y, b"hello")
                sent += x is a
                try:
                    data, _ = await asyncio.wait_for(y.coll.queue.get(), 0.25)
                except TimeoutError:
                    continue
                assert data == b"hello"
                break
            else:
                raise AssertionError("no packet through TURN after 20 tries")
        for n in (a, b):  # a retried packet that was only late, not dropped
            while not n.coll.queue.empty():
                assert n.coll.queue.get_nowait()[0] == b"hello"
        await exchange(a, b, count=5, size=1200)
        assert a.proxy.counters["to_turn"] == 5 + sent
        assert b.proxy.counters["from_turn"] >= 5


async def test_turn_path_through_ghostgate() -> None:
    gate = await start_gate(denied=[])  # the relayed addresses are on loopback, which the default refuses
    try:
        await _turn_pair(gate.address[1])
        for _ in range(50):
            if not gate.core.allocations:
                break
            await asyncio.sleep(0.05)
        assert not gate.core.allocations  # closing the proxies released both allocations
        assert gate.stats()["relayed_to_peer"] >= 10
    finally:
        gate.close()


async def test_turn_peer_let_in_before_we_send_and_binding_kept_fresh(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(turnclient, "REBIND_INTERVAL", 0.3)  # the real one is 240 s (permissions last 300 s)
    gate = await start_gate(denied=[])
    loop = asyncio.get_running_loop()
    peer_t, peer = await loop.create_datagram_endpoint(Collector, local_addr=("127.0.0.1", 0))
    peer_addr = peer_t.get_extra_info("sockname")
    got: list[tuple[bytes, tuple[str, int]]] = []
    username, password = rest_credentials("turn-test")
    try:
        client = await TurnClient.allocate(
            gate.address, username, password, on_recv=lambda d, a: got.append((d, a))
        )
        try:
            relayed = turn_address(client.relayed)
            assert relayed is not None
            client.add_peer(peer_addr)
            await until(lambda: client.counters["bound"] >= 1, "channel bound")
            peer_t.sendto(b"hello first", relayed)  # we never sent to the peer: the binding let it in
            await until(lambda: bool(got), "data from the peer")
            assert got == [(b"hello first", peer_addr)]
            await until(lambda: client.counters["bound"] >= 3, "binding refreshed")
            assert client.sendto(b"back", peer_addr)
            assert (await asyncio.wait_for(peer.queue.get(), TIMEOUT)) == (b"back", relayed)
        finally:
            await client.close()
        assert not client.alive
        await until(lambda: not gate.core.allocations, "allocation released")
    finally:
        peer_t.close()
        gate.close()


async def test_turn_with_wrong_password_is_unavailable() -> None:
    gate = await start_gate(denied=[])
    username, _ = rest_credentials("turn-test")
    try:
        with pytest.raises(Unavailable, match="TURN allocation"):
            await TurnClient.allocate(gate.address, username, "wrong", on_recv=lambda d, a: None)
        assert gate.stats()["auth_failed"] >= 1
        assert not gate.core.allocations
    finally:
        gate.close()


TURNSERVER = shutil.which("turnserver")


@pytest.mark.skipif(TURNSERVER is None, reason="coturn's turnserver missing: apt-get install coturn")
async def test_turn_path_through_coturn(tmp_path: Path) -> None:
    assert TURNSERVER is not None
    port = closed_udp_port()
    proc = await asyncio.create_subprocess_exec(
        TURNSERVER, "-n", "--listening-ip", "127.0.0.1", "--listening-port", str(port), "--relay-ip",
         "127.0.0.1", "--use-auth-secret", "--static-auth-secret", SECRET, "--realm", "ghost",
         "--allow-loopback-peers", "--no-tls", "--no-dtls", "--no-cli", "--no-tcp-relay", "--simple-log",
         "--log-file", str(tmp_path / "coturn.log"), "--pidfile", str(tmp_path / "coturn.pid"),
         "--db", str(tmp_path / "turndb"),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        await _wait_stun(port)
        await _turn_pair(port)
    finally:
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 5)
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def _wait_stun(port: int) -> None:
    """Until coturn answers a STUN binding request (bounded)."""
    loop = asyncio.get_running_loop()
    t, coll = await loop.create_datagram_endpoint(Collector, local_addr=("127.0.0.1", 0))
    try:
        for _ in range(50):
            t.sendto(bytes(stun.Message(stun.Method.BINDING, stun.Class.REQUEST)), ("127.0.0.1", port))
            try:
                await asyncio.wait_for(coll.queue.get(), 0.2)
                return
            except TimeoutError:
                continue
        raise AssertionError("coturn never answered STUN")
    finally:
        t.close()
