"""The node resolver's asyncio edge: DNS over UDP and TCP (RFC 1035 section 4.2) on the resolver addresses,
answering from :func:`ghostlink.dns_core.resolve` and forwarding what the core says to forward.

It owns the sockets, the forwarded queries in flight and the counters; the names come from the
:class:`~ghostlink.dns_core.Zone` it is handed (:meth:`DnsServer.set_zone`, once per map).

Bounds: at most ``max_inflight`` forwarded queries at once (beyond: SERVFAIL at once, counted as dropped);
each upstream gets ``timeout`` seconds (dnspython's ``udp_with_fallback``: UDP, then TCP when the answer is
truncated), the servers of one query are tried in order; at most ``max_tcp`` TCP connections, each
closed after ``tcp_idle`` seconds without a query. Nothing is cached. A forwarded query leaves with a
new random ID from a new random port, and dnspython accepts only a reply matching it (ID, question,
source). UDP replies larger than the asker's limit (512 bytes, or its EDNS payload size, RFC 6891
section 6.2.5) are truncated to the header and question with TC set, so the asker retries over TCP.

The sockets are bound with ``IP_FREEBIND``: the resolver addresses live on the WireGuard interface, which
a restarted wireguard-go re-creates, and the sockets must not depend on the address being there yet.

dnspython is imported at the first query (:meth:`DnsServer._parse`), not with this module: the resolver
listens on every node, but most are never asked anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import socket
import struct
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, cast

from ghostcore.addr import HostPort, format_endpoint
from ghostlink.dns_core import Answer, Forward, Zone, resolve, servfail

if TYPE_CHECKING:
    import dns.message

log = logging.getLogger(__name__)

IP_FREEBIND = getattr(socket, "IP_FREEBIND", 15)  # linux/in.h; Python exposes it only on some builds
UDP_LIMIT = 512  # RFC 1035 section 4.2.1, without EDNS
TCP_LIMIT = 65535

_Send = Callable[["dns.message.Message"], None]  # delivers a response to whoever asked


def _truncated(query: dns.message.Message, response: dns.message.Message, limit: int) -> bytes:
    import dns.exception  # noqa: PLC0415 - loaded by _parse already (the module docstring)
    import dns.flags  # noqa: PLC0415
    import dns.message  # noqa: PLC0415

    try:
        return response.to_wire(max_size=limit)
    except dns.exception.TooBig:
        short = dns.message.make_response(query)
        short.set_rcode(response.rcode())
        short.flags = response.flags | dns.flags.TC
        return short.to_wire(max_size=limit)


def _socket(host: str, port: int, kind: socket.SocketKind) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, kind)
    try:
        sock.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        # TCP: restart without waiting out TIME_WAIT. UDP: a program on the node that binds port 53 on the
        # wildcard address with SO_REUSEADDR (a local DNS server, a test's echo server) can coexist with
        # the resolver's specific addresses; port 53 is privileged, so only root can bind beside it.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, server: DnsServer) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # asyncio's selector datagram transport does not subclass DatagramTransport, though it is one
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if self.transport is not None:
            self.server.on_datagram(self.transport, data, addr)


class DnsServer:
    """DNS over UDP and TCP on the given addresses; see the module docstring."""

    def __init__(
        self,
        zone: Zone | None = None,
        *,
        max_inflight: int = 256,
        timeout: float = 2.0,
        max_tcp: int = 64,
        tcp_idle: float = 10.0,
    ) -> None:
        self._zone = zone or Zone()
        self._max_inflight = max_inflight
        self._timeout = timeout
        self._max_tcp = max_tcp
        self._tcp_idle = tcp_idle
        self._transports: list[asyncio.DatagramTransport] = []
        self._tcp_servers: list[asyncio.Server] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._tcp_open = 0
        self._inflight = 0
        self.listen: list[HostPort] = []  # as bound
        self.queries = 0
        self.forwarded = 0
        self.dropped = 0

    @property
    def zone(self) -> Zone:
        return self._zone

    def set_zone(self, zone: Zone) -> None:
        self._zone = zone

    async def start(self, addresses: Sequence[HostPort]) -> None:
        """Listen on UDP and TCP at each address (port 0: the port UDP got, for TCP too)."""
        loop = asyncio.get_running_loop()
        try:
            for host, port in addresses:
                udp = _socket(host, port, socket.SOCK_DGRAM)
                bound = udp.getsockname()[1]
                transport, _ = await loop.create_datagram_endpoint(lambda: _Udp(self), sock=udp)
                self._transports.append(transport)
                tcp = _socket(host, bound, socket.SOCK_STREAM)
                self._tcp_servers.append(await asyncio.start_server(self._tcp, sock=tcp, limit=TCP_LIMIT + 2))
                self.listen.append((host, bound))
        except OSError:
            await self.close()
            raise
        log.info("resolver listening on %s", ", ".join(format_endpoint(h, p) for h, p in self.listen))

    async def close(self) -> None:
        for transport in self._transports:
            transport.close()
        for server in self._tcp_servers:
            server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for server in self._tcp_servers:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(server.wait_closed(), 1.0)
        self._transports, self._tcp_servers = [], []

    # ----- queries

    def _parse(self, data: bytes) -> dns.message.Message | None:
        # lazy: the first query loads dnspython (the module docstring)
        import dns.exception  # noqa: PLC0415
        import dns.flags  # noqa: PLC0415
        import dns.message  # noqa: PLC0415

        try:
            query = dns.message.from_wire(data)
        except (dns.exception.DNSException, ValueError, UnicodeError):
            self.dropped += 1
            return None
        if query.flags & dns.flags.QR:  # a response sent to us: never answer one (no loops)
            self.dropped += 1
            return None
        self.queries += 1
        return query

    def on_datagram(self, transport: asyncio.DatagramTransport, data: bytes, addr: tuple[str, int]) -> None:
        query = self._parse(data)
        if query is None:
            return
        limit = max(UDP_LIMIT, query.payload) if query.edns >= 0 else UDP_LIMIT

        def send(response: dns.message.Message) -> None:
            if not transport.is_closing():
                transport.sendto(_truncated(query, response, limit), addr)

        self._dispatch(query, send)

    def _dispatch(self, query: dns.message.Message, send: _Send) -> None:
        decision = resolve(self._zone, query)
        if isinstance(decision, Answer):
            send(decision.response)
            return
        if self._inflight >= self._max_inflight:
            self.dropped += 1
            send(servfail(query))
            return
        self._inflight += 1
        self.forwarded += 1
        task = asyncio.create_task(self._forward(query, decision, send))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _forward(self, query: dns.message.Message, decision: Forward, send: _Send) -> None:
        try:
            response = await self._ask_upstreams(query, decision)
            send(response if response is not None else servfail(query))
        finally:
            self._inflight -= 1

    async def _ask_upstreams(
        self, query: dns.message.Message, decision: Forward
    ) -> dns.message.Message | None:
        # lazy: dnspython's query machinery costs ~0.1 s of imports, and only forwarding needs it
        import dns.asyncquery  # noqa: PLC0415
        import dns.exception  # noqa: PLC0415
        import dns.message  # noqa: PLC0415

        out = dns.message.from_wire(query.to_wire())  # a copy with its own ID
        out.id = secrets.randbits(16)
        for host, port in decision.servers:
            try:
                response, _ = await dns.asyncquery.udp_with_fallback(
                    out, host, timeout=self._timeout, port=port
                )
            except (dns.exception.DNSException, OSError, EOFError) as exc:
                log.debug("upstream %s: %s", format_endpoint(host, port), exc)
                continue
            response.id = query.id
            return response
        return None

    async def _tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._tcp_open >= self._max_tcp:
            self.dropped += 1
            writer.close()
            return
        self._tcp_open += 1
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)  # so close() ends the connection too
        try:
            while True:
                try:
                    head = await asyncio.wait_for(reader.readexactly(2), self._tcp_idle)
                    (length,) = struct.unpack("!H", head)
                    data = await asyncio.wait_for(reader.readexactly(length), self._tcp_idle)
                except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
                    return
                query = self._parse(data)
                if query is None:
                    return
                done: asyncio.Future[dns.message.Message] = asyncio.get_running_loop().create_future()

                def deliver(
                    response: dns.message.Message, done: asyncio.Future[dns.message.Message] = done
                ) -> None:
                    if not done.done():
                        done.set_result(response)

                self._dispatch(query, deliver)
                wire = _truncated(query, await done, TCP_LIMIT)
                writer.write(struct.pack("!H", len(wire)) + wire)
                await writer.drain()
        finally:
            self._tcp_open -= 1
            if task is not None:
                self._tasks.discard(task)
            writer.close()
