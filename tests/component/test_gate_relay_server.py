"""The ghost relay over real QUIC (aioquic) and real TLS over TCP on 127.0.0.1, with tiny test-only clients.

Two QUIC nodes exchange packets as DATAGRAMs (and a packet too big for one as a RECV on stream 0); a QUIC node
and a TLS node reach each other through the one routing table; unauthenticated SENDs, expired tokens and a
replayed AUTH are refused with ERROR and counted; a newer connection takes a node key over; a client that
never reads loses its own packets (counted) while the others' keep flowing; shutdown closes every client;
every test ends with the relay holding no connection and no route.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import socket
import ssl
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from aioquic.asyncio.client import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration

from ghostcore import relayquic
from ghostcore import relaywire as rw
from ghostcore.keys import PrivateKey
from ghostgate import stream
from ghostgate.config import GateConfig, RelayConfig, TurnConfig
from ghostgate.relay import RelayServer, start_relay
from ghostgate.relay_core import RelayCore

SECRET = "relay-component-secret"
TIMEOUT = 5.0


async def start(core: RelayCore | None = None) -> RelayServer:
    cfg = GateConfig(relay=RelayConfig(listen="127.0.0.1:0"), turn=TurnConfig(secret=SECRET))
    return await start_relay(cfg, SECRET.encode(), core=core)


_PRIVATE: dict[bytes, PrivateKey] = {}
STATIC = rw.relay_static_key(SECRET.encode()).public_key()


def new_key() -> bytes:
    """A node key (raw public bytes) whose private half the test's nodes can prove (relaywire AUTH)."""
    private = PrivateKey.generate()
    _PRIVATE[private.public_key().raw] = private
    return private.public_key().raw


def auth(key: bytes, expiry: int, token: bytes, challenge: bytes) -> bytes:
    return rw.encode_auth(_PRIVATE[key], STATIC, expiry, token, challenge)


def credentials(key: bytes, ttl: int = 3600) -> tuple[int, bytes]:
    expiry = int(time.time()) + ttl
    return expiry, rw.token_mac(SECRET.encode(), base64.b64encode(key).decode(), expiry)


async def until(cond: Any, what: str) -> None:
    for _ in range(int(TIMEOUT / 0.02)):
        if cond():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


class Node:
    """Frames in a queue, whichever the transport; ``send`` writes a stream frame."""

    def __init__(self) -> None:
        self.reader = rw.FrameReader()
        self.frames: asyncio.Queue[rw.Frame] = asyncio.Queue()
        self.closed = asyncio.Event()

    def feed(self, data: bytes) -> None:
        for frame in self.reader.feed(data):
            self.frames.put_nowait(frame)

    def send(self, ftype: int, payload: bytes = b"") -> None:
        raise NotImplementedError

    async def frame(self) -> rw.Frame:
        return await asyncio.wait_for(self.frames.get(), TIMEOUT)

    async def challenge(self) -> bytes:
        self.send(rw.HELLO, rw.MAGIC)
        got = await self.frame()
        assert got.type == rw.CHALLENGE
        assert len(got.payload) == rw.CHALLENGE_LEN
        return got.payload

    async def login(self, key: bytes, ttl: int = 3600) -> rw.Frame:
        challenge = await self.challenge()
        expiry, token = credentials(key, ttl)
        self.send(rw.AUTH, auth(key, expiry, token, challenge))
        return await self.frame()


class QuicNode(QuicConnectionProtocol, Node):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        QuicConnectionProtocol.__init__(self, *args, **kwargs)
        Node.__init__(self)
        self.datagrams: asyncio.Queue[bytes] = asyncio.Queue()
        self.close_reason = ""

    def quic_event_received(self, event: events.QuicEvent) -> None:
        if isinstance(event, events.StreamDataReceived) and event.stream_id == 0:
            self.feed(event.data)
        elif isinstance(event, events.DatagramFrameReceived):
            self.datagrams.put_nowait(event.data)
        elif isinstance(event, events.ConnectionTerminated):
            self.close_reason = event.reason_phrase
            self.closed.set()

    def send(self, ftype: int, payload: bytes = b"") -> None:
        self._quic.send_stream_data(0, rw.encode(ftype, payload))
        self.transmit()

    def send_datagram(self, dst: bytes, packet: bytes) -> None:
        self._quic.send_datagram_frame(rw.encode_datagram(rw.SEND, dst, packet))
        self.transmit()

    async def datagram(self) -> tuple[int, bytes, bytes]:
        return rw.decode_datagram(await asyncio.wait_for(self.datagrams.get(), TIMEOUT))


class TlsNode(Node):
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        super().__init__()
        self.writer = writer
        self._task = asyncio.create_task(self._read(reader))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        while data := await reader.read(65536):
            self.feed(data)
        self.closed.set()

    def send(self, ftype: int, payload: bytes = b"") -> None:
        self.writer.write(rw.encode(ftype, payload))

    def stop_reading(self) -> None:
        self._task.cancel()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):  # the server may have closed first
            await self.writer.wait_closed()
        try:
            await self._task
        except asyncio.CancelledError:
            assert self._task.cancelled()  # stop_reading() was called; the test goes on


def quic_client_config() -> QuicConfiguration:
    # What a client needs (ghostlink has its own): the ALPN, DATAGRAM support, a packet size >= 1450.
    return QuicConfiguration(
        is_client=True,
        alpn_protocols=[relayquic.ALPN],
        verify_mode=ssl.CERT_NONE,  # self-signed relay cert; see ghostgate.relay for why that is fine
        max_datagram_size=relayquic.MAX_DATAGRAM_SIZE,
        max_datagram_frame_size=relayquic.MAX_DATAGRAM_FRAME_SIZE,
        server_name="ghostgate",
    )


@asynccontextmanager
async def quic_node(server: RelayServer) -> AsyncIterator[QuicNode]:
    assert server.quic_address is not None
    host, port = server.quic_address
    async with connect(host, port, configuration=quic_client_config(), create_protocol=QuicNode) as client:
        assert isinstance(client, QuicNode)
        yield client


@asynccontextmanager
async def tls_node(server: RelayServer, rcvbuf: int = 0) -> AsyncIterator[TlsNode]:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:  # a small receive window (set before connect) makes "never reads" bite sooner
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(sock, server.tcp_address)
    except OSError:
        sock.close()
        raise
    reader, writer = await asyncio.open_connection(sock=sock, ssl=ctx, server_hostname="ghostgate")
    node = TlsNode(reader, writer)
    try:
        yield node
    finally:
        await node.close()


async def finish(server: RelayServer) -> None:
    """Every client is gone: the relay must hold no connection and no route; then shut it down."""
    try:
        await until(lambda: server.hub.connections == 0, "relay connections to drop to 0")
        assert not server.hub.core.conns
        assert not server.hub.core.routes
    finally:
        await server.close()


async def test_two_quic_nodes_exchange_datagrams_and_ping() -> None:
    server = await start()
    a_key, b_key = new_key(), new_key()
    try:
        async with quic_node(server) as a, quic_node(server) as b:
            assert (await a.login(a_key)).type == rw.AUTH_OK
            assert (await b.login(b_key)).type == rw.AUTH_OK
            a.send_datagram(b_key, b"wg-packet-1")
            assert await b.datagram() == (rw.RECV, a_key, b"wg-packet-1")
            b.send_datagram(a_key, b"wg-packet-2")
            assert await a.datagram() == (rw.RECV, b_key, b"wg-packet-2")
            # too big for one DATAGRAM on a 1452-byte packet: comes as a RECV frame on stream 0
            big = os.urandom(relayquic.DATAGRAM_ROOM)
            a.send(rw.SEND, b_key + big)
            got = await b.frame()
            assert (got.type, got.payload) == (rw.RECV, a_key + big)
            a.send(rw.PING, b"12345678")
            pong = await a.frame()
            assert (pong.type, pong.payload) == (rw.PONG, b"12345678")
            stranger = new_key()
            a.send_datagram(stranger, b"x")
            gone = await a.frame()
            assert (gone.type, gone.payload) == (rw.PEER_GONE, stranger)
            assert server.hub.connections == 2
        stats = server.stats()
        assert stats["authenticated"] == 2
        assert stats["forwarded"] == 3
        assert stats["peer_gone"] == 1
    finally:
        await finish(server)


async def test_quic_and_tls_nodes_reach_each_other() -> None:
    server = await start()
    q_key, t_key = new_key(), new_key()
    try:
        async with quic_node(server) as q, tls_node(server) as t:
            assert (await q.login(q_key)).type == rw.AUTH_OK
            assert (await t.login(t_key)).type == rw.AUTH_OK
            q.send_datagram(t_key, b"from-quic")
            got = await t.frame()
            assert (got.type, got.payload) == (rw.RECV, q_key + b"from-quic")
            t.send(rw.SEND, q_key + b"from-tls")
            assert await q.datagram() == (rw.RECV, t_key, b"from-tls")
            t.send(rw.PING, b"abcdefgh")
            pong = await t.frame()
            assert (pong.type, pong.payload) == (rw.PONG, b"abcdefgh")
    finally:
        await finish(server)


async def test_unauthenticated_send_refused_on_both_transports() -> None:
    server = await start()
    try:
        async with tls_node(server) as t:
            t.send(rw.SEND, new_key() + b"sneaky")
            err = await t.frame()
            assert err.type == rw.ERROR
            assert b"expected HELLO" in err.payload
            await asyncio.wait_for(t.closed.wait(), TIMEOUT)
        async with quic_node(server) as q:
            await q.challenge()
            q.send_datagram(new_key(), b"sneaky")  # after HELLO, before AUTH
            await asyncio.wait_for(q.closed.wait(), TIMEOUT)
            assert "before AUTH_OK" in q.close_reason
        assert server.stats()["unauthenticated"] == 2
        assert server.stats().get("forwarded", 0) == 0
    finally:
        await finish(server)


async def test_expired_and_bad_credentials_refused() -> None:
    server = await start()
    key = new_key()
    try:
        async with tls_node(server) as t:
            err = await t.login(key, ttl=-5)
            assert err.type == rw.ERROR
            assert b"expired" in err.payload
            await asyncio.wait_for(t.closed.wait(), TIMEOUT)
        async with quic_node(server) as q:
            challenge = await q.challenge()
            expiry, _ = credentials(key)
            q.send(rw.AUTH, auth(key, expiry, b"not-the-token", challenge))
            err = await q.frame()
            assert err.type == rw.ERROR
            assert b"bad token proof" in err.payload
        assert server.stats()["auth_expired"] == 1
        assert server.stats()["auth_failed"] == 1
        assert not server.hub.core.routes
    finally:
        await finish(server)


async def test_replayed_auth_refused() -> None:
    server = await start()
    key = new_key()
    try:
        async with tls_node(server) as first:
            challenge = await first.challenge()
            expiry, token = credentials(key)
            recorded = auth(key, expiry, token, challenge)
            first.send(rw.AUTH, recorded)
            assert (await first.frame()).type == rw.AUTH_OK
        async with tls_node(server) as thief:
            await thief.challenge()  # a fresh challenge: the recorded proof is over the old one
            thief.send(rw.AUTH, recorded)
            err = await thief.frame()
            assert err.type == rw.ERROR
            assert b"bad token proof" in err.payload
        assert server.stats()["auth_failed"] == 1
        assert server.stats()["authenticated"] == 1
    finally:
        await finish(server)


async def test_newer_connection_takes_over_the_key() -> None:
    server = await start()
    key, peer = new_key(), new_key()
    try:
        async with tls_node(server) as old, quic_node(server) as new, tls_node(server) as other:
            assert (await old.login(key)).type == rw.AUTH_OK
            assert (await other.login(peer)).type == rw.AUTH_OK
            assert (await new.login(key)).type == rw.AUTH_OK
            err = await old.frame()
            assert err.type == rw.ERROR
            assert b"replaced" in err.payload
            await asyncio.wait_for(old.closed.wait(), TIMEOUT)
            other.send(rw.SEND, key + b"to-the-new-one")
            assert await new.datagram() == (rw.RECV, peer, b"to-the-new-one")
        assert server.stats()["replaced"] == 1
    finally:
        await finish(server)


async def test_garbage_closes_and_is_counted() -> None:
    server = await start()
    try:
        async with tls_node(server) as t:
            t.writer.write(b"\x7f\x00\x00\x00\x01x")  # unknown frame type
            err = await t.frame()
            assert err.type == rw.ERROR
            await asyncio.wait_for(t.closed.wait(), TIMEOUT)
        async with quic_node(server) as q:
            assert (await q.login(new_key())).type == rw.AUTH_OK
            q._quic.send_datagram_frame(b"\x99short")
            q.transmit()
            await asyncio.wait_for(q.closed.wait(), TIMEOUT)
        assert server.stats()["malformed"] == 2
    finally:
        await finish(server)


async def test_shutdown_closes_connected_clients() -> None:
    server = await start()
    async with tls_node(server) as t, quic_node(server) as q:
        assert (await t.login(new_key())).type == rw.AUTH_OK
        assert (await q.login(new_key())).type == rw.AUTH_OK
        await server.close()
        err = await t.frame()
        assert (err.type, err.payload) == (rw.ERROR, b"relay: shutting down")
        await asyncio.wait_for(t.closed.wait(), TIMEOUT)
        await asyncio.wait_for(q.closed.wait(), TIMEOUT)
    assert server.hub.connections == 0


async def test_a_client_that_never_reads_loses_packets_not_the_others() -> None:
    server = await start()
    slow_key, fast_key, sender_key = new_key(), new_key(), new_key()
    try:
        async with (
            tls_node(server, rcvbuf=4096) as slow,
            tls_node(server) as fast,
            tls_node(server) as sender,
        ):
            for node, key in ((slow, slow_key), (fast, fast_key), (sender, sender_key)):
                assert (await node.login(key)).type == rw.AUTH_OK
            slow.stop_reading()  # its socket buffers, then the relay's write buffer, fill up
            flood = rw.encode(rw.SEND, slow_key + b"\0" * 1200)
            sender.writer.write(flood * 8000)  # ~10 MB: more than the kernel's socket buffers hold
            sender.send(rw.SEND, fast_key + b"after the flood")
            got = await fast.frame()
            assert (got.type, got.payload) == (rw.RECV, sender_key + b"after the flood")
            stats = server.stats()
            assert stats["forwarded"] == 8001
            assert stats["dropped_slow"] > 0
    finally:
        await finish(server)


async def test_silent_connections_are_closed_at_the_handshake_timeout() -> None:
    server = await start(RelayCore(SECRET.encode(), handshake_timeout=0.3))
    try:
        async with tls_node(server) as t, quic_node(server) as q:
            await q.challenge()  # HELLO, then nothing
            err = await t.frame()  # never said a word
            assert (err.type, err.payload) == (rw.ERROR, b"relay: handshake timed out")
            await asyncio.wait_for(t.closed.wait(), TIMEOUT)
            await asyncio.wait_for(q.closed.wait(), TIMEOUT)
            assert "handshake timed out" in q.close_reason
        assert server.stats()["handshake_timeout"] == 2
    finally:
        await finish(server)


async def _start_limited(per_source: int, total: int = 10_000) -> RelayServer:
    cfg = GateConfig(
        relay=RelayConfig(listen="127.0.0.1:0", max_connections=total, max_connections_per_source=per_source),
        turn=TurnConfig(secret=SECRET),
    )
    return await start_relay(cfg, SECRET.encode())


async def test_connections_over_the_per_source_limit_are_closed_before_tls() -> None:
    server = await _start_limited(per_source=2)
    try:
        async with tls_node(server) as a, tls_node(server) as b:
            assert (await a.login(new_key())).type == rw.AUTH_OK
            assert (await b.login(new_key())).type == rw.AUTH_OK
            # a third TCP connection from the same address: closed at once, no TLS handshake answered
            reader, writer = await asyncio.open_connection(*server.tcp_address)
            writer.write(b"\x16\x03\x01\x00\x05hello")  # the start of a ClientHello
            assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""
            writer.close()
            assert server.stats()["refused_source"] == 1
            assert server.hub.connections == 2
        # once they are gone their slots are free again
        await until(lambda: server.hub.connections == 0, "the two connections to go")
        async with tls_node(server) as c:
            assert (await c.login(new_key())).type == rw.AUTH_OK
    finally:
        await finish(server)


async def test_quic_connections_over_the_limit_are_refused_and_retry_validates_addresses() -> None:
    server = await _start_limited(per_source=16, total=1)
    try:
        async with quic_node(server) as a:  # the server demands a Retry round trip; aioquic's client does it
            assert (await a.login(new_key())).type == rw.AUTH_OK
            with contextlib.suppress(ConnectionError, TimeoutError):
                async with quic_node(server) as b:
                    await asyncio.wait_for(b.closed.wait(), TIMEOUT)
                    assert b.close_reason == "relay: too many connections"
            assert server.stats()["refused_total"] >= 1
            assert server.hub.connections == 1
    finally:
        await finish(server)


async def test_a_first_initial_gets_a_retry_and_no_connection() -> None:
    """RFC 9000 section 8.1.2: an Initial without a token is answered with a Retry (long header, packet type
    3, RFC 9000 section 17.2.5) and nothing else; the relay creates no connection for an unvalidated
    address, so a spoofed source costs it one small packet."""
    from aioquic.quic.connection import QuicConnection  # noqa: PLC0415 - only this test drives one by hand

    server = await start()
    try:
        assert server.quic_address is not None
        client = QuicConnection(configuration=quic_client_config())
        client.connect(server.quic_address, now=time.monotonic())
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setblocking(False)
        try:
            for data, addr in client.datagrams_to_send(now=time.monotonic()):
                await loop.sock_sendto(sock, data, addr)
            answer = await asyncio.wait_for(loop.sock_recv(sock, 2048), TIMEOUT)
        finally:
            sock.close()
        assert answer[0] & 0x80  # a long header...
        assert (answer[0] & 0x30) >> 4 == 3  # ...of type Retry
        assert server.hub.connections == 0
    finally:
        await finish(server)


def _blocking_handshakes(addr: tuple[str, int], count: int) -> list[str]:
    """``count`` TLS handshakes with a plain blocking client; what went wrong, one line per failure."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    failures = []
    for _ in range(count):
        try:
            with (
                socket.create_connection(addr, timeout=TIMEOUT) as raw,
                ctx.wrap_socket(raw, server_hostname="ghostgate"),
            ):
                pass
        except OSError as exc:
            failures.append(repr(exc))
    return failures


async def _handshakes_complete_and_failed_ones_free_their_slots() -> None:
    server = await _start_limited(per_source=3)
    try:
        # Failed handshakes: garbage instead of a ClientHello, and a client that says nothing until the
        # (shortened) handshake timeout. Each must give its admission slot back, or the limit of 3 bites.
        for _ in range(4):
            reader, writer = await asyncio.open_connection(*server.tcp_address)
            writer.write(b"GET / HTTP/1.1\r\n\r\n")
            assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""
            writer.close()
        for _ in range(4):
            reader, writer = await asyncio.open_connection(*server.tcp_address)
            assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""  # closed at the timeout
            writer.close()
        await until(lambda: server.stats()["tls_handshake_failed"] == 8, "8 failed handshakes counted")
        # Then every handshake completes, one after another, each on a fresh connection, from a client
        # outside the loop (its ClientHello is there before the server's accept callback has run).
        assert await asyncio.to_thread(_blocking_handshakes, server.tcp_address, 25) == []
        async with tls_node(server) as node:
            assert (await node.login(new_key())).type == rw.AUTH_OK
        assert server.stats().get("refused_source", 0) == 0
    finally:
        await finish(server)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_every_tls_handshake_completes_and_failed_ones_free_their_slots(
    loop: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The TLS listener answers every ClientHello on both loops the gate runs on (upgrading an accepted
    transport with start_tls lost most of them on uvloop), and a failed handshake releases its slot."""
    monkeypatch.setattr(stream, "TLS_HANDSHAKE_TIMEOUT", 0.3)
    factory = asyncio.new_event_loop if loop == "asyncio" else pytest.importorskip("uvloop").new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(_handshakes_complete_and_failed_ones_free_their_slots())
