"""The QUIC edge of the ghost relay (RFC 9000 via aioquic; DATAGRAM frames, RFC 9221).

ALPN ``ghostrelay``. A client opens its first bidirectional stream (id 0) for the control frames
(HELLO, CHALLENGE, AUTH, AUTH_OK, ERROR, PEER_GONE, PING/PONG, and SEND/RECV too) and sends SEND as DATAGRAM
frames (``relaywire.encode_datagram``). The relay delivers RECV as a DATAGRAM when it fits one QUIC packet of
``MAX_DATAGRAM_SIZE`` bytes and the client enabled datagrams, else as a RECV frame on stream 0 (so a
full-size WireGuard packet still gets through a 1500-byte path, reliably). Data on any other stream is a
protocol error (ERROR + close).

The QUIC settings both ends share and the aioquic workarounds (datagram sizes, the tick pacer, bounded
queues: a delivery over a bound is dropped and the hub counts it) are :mod:`ghostcore.relayquic`'s; feeding
aioquic, its events, transmits and timer are :class:`ghostcore.quicdriver.QuicDriver`'s, as in ghostlink's
client. This module keeps what only a server has: aioquic's ``QuicServer`` on the one UDP socket, and one
protocol per connection wiring the driver to the hub.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import socket
from typing import cast

from aioquic.asyncio.protocol import QuicConnectionProtocol, QuicStreamHandler
from aioquic.asyncio.server import QuicServer
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import NetworkAddress, QuicConnection

from ghostcore import relaywire as rw
from ghostcore.errors import Unavailable, os_reason
from ghostcore.quicdriver import QuicDriver
from ghostcore.relayquic import configuration
from ghostcore.tlscert import CertPair
from ghostgate.relay_hub import RelayHub

# Kernel buffers of the relay's one UDP socket: every client's bursts share it, and a datagram the kernel
# drops is a loss to aioquic's congestion control (RFC 9002 s7), which DATAGRAM frames obey (RFC 9221 s5.4).
SOCKET_BUFFER = 1 << 20


def server_configuration(pair: CertPair) -> QuicConfiguration:
    return configuration(is_client=False, certificate=pair.certificate, private_key=pair.private_key)


class RelayQuicProtocol(QuicConnectionProtocol):
    """One client connection: driver events in, hub calls out; an :class:`ghostgate.relay_hub.Edge`.

    A ``QuicConnectionProtocol`` only because ``QuicServer`` creates, feeds and closes one per connection;
    its own receive / transmit / timer are replaced by the driver's.
    """

    def __init__(
        self, quic: QuicConnection, stream_handler: QuicStreamHandler | None = None, *, hub: RelayHub
    ) -> None:
        super().__init__(quic, stream_handler)
        self._hub = hub
        self._cid: int | None = None
        self._source: str | None = None  # admitted by the hub; released when the connection is lost
        self._closing = False
        self._driver = QuicDriver(quic, self._sendto, self, self._loop)

    def datagram_received(self, data: bytes | str, addr: NetworkAddress) -> None:
        if self._source is None and not self._closing:
            # QuicServer makes this protocol for the connection's first packet (after address validation
            # with Retry, RFC 9000 section 8.1, when on) and hands it the packet at once: admit its source
            # address, then attach from that first packet, so the core's handshake timeout covers the QUIC
            # handshake too. A refused connection is closed before aioquic spends a handshake on it.
            source = str(addr[0])
            if not self._hub.admit(source):
                self._closing = True
                self._driver.close("relay: too many connections")  # on_lost follows; nothing to release
                return
            self._source = source
            self._cid = self._hub.attach(self)
        self._driver.feed(cast(bytes, data), addr)
        self._driver.pump()

    def transmit(self) -> None:  # QuicConnectionProtocol.close (QuicServer.close) sends through here
        self._driver.transmit()

    def _sendto(self, data: bytes, addr: NetworkAddress) -> bool:
        transport = self._transport
        if transport is None:  # not before connection_made
            return False
        transport.sendto(data, addr)  # never raises: asyncio buffers what the kernel does not take yet
        return True

    # ----- DriverEvents

    def on_ready(self) -> None:
        """Nothing to do: the core's handshake timeout has been running since the first packet."""

    def on_stream(self, data: bytes, end: bool) -> None:
        cid = self._cid
        if cid is None:
            return
        if data:
            self._hub.stream(cid, data)
        if end and not self._closing:
            self.close_edge("client closed stream 0")
            self._hub.detach(cid)

    def on_datagram(self, data: bytes) -> None:
        if self._cid is not None:
            self._hub.datagram(self._cid, data)

    def on_bad_stream(self, stream_id: int) -> None:
        if self._cid is not None:
            self._hub.reject(self._cid, "relay: control frames go on stream 0 only", "malformed")

    def on_cid(self, cid: bytes, issued: bool) -> None:
        # QuicServer routes datagrams by destination connection ID: keep its map of this connection's IDs
        if issued:
            self._connection_id_issued_handler(cid)
        else:
            self._connection_id_retired_handler(cid)

    def on_lost(self, reason: str) -> None:
        self._closing = True
        self._connection_terminated_handler()  # QuicServer forgets this connection's IDs
        if self._cid is not None:
            self._hub.detach(self._cid)
        if self._source is not None:
            self._hub.release(self._source)
            self._source = None

    # ----- Edge

    def send_frame(self, data: bytes) -> None:
        if self._closing:
            return
        if not self._driver.send_frame(data):
            self._hub.count("closed_slow")
            self.close_edge("relay: client is not reading")

    def deliver(self, src: bytes, packet: bytes) -> bool:
        return not self._closing and self._driver.queue_packet(rw.RECV, src, packet)

    def close_edge(self, reason: str) -> None:
        if self._closing:
            return
        self._closing = True
        self._driver.close(reason)


async def serve_quic(
    hub: RelayHub, host: str, port: int, pair: CertPair, *, retry: bool = True
) -> tuple[asyncio.DatagramTransport, QuicServer]:
    """Bind UDP ``host:port`` and serve the QUIC relay into ``hub`` until the server is closed.

    ``retry``: validate every client's address with a Retry token first (RFC 9000 section 8.1.2), one
    extra round trip per connection, so a spoofed source cannot make the relay create connections or
    answer with more bytes than it received.
    """
    config = server_configuration(pair)
    loop = asyncio.get_running_loop()
    try:
        transport, server = await loop.create_datagram_endpoint(
            lambda: QuicServer(
                configuration=config,
                create_protocol=functools.partial(RelayQuicProtocol, hub=hub),
                retry=retry,
            ),
            local_addr=(host, port),
        )
    except OSError as exc:
        raise Unavailable(f"relay.quic_port: cannot bind UDP {host}:{port}: {os_reason(exc)}") from None
    sock = transport.get_extra_info("socket")
    if sock is not None:
        for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):  # capped by net.core.[rw]mem_max; best effort
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
    return transport, server
