"""The QUIC edge of the ghost relay (RFC 9000 via aioquic; DATAGRAM frames, RFC 9221).

ALPN ``ghostrelay``. A client opens its first bidirectional stream (id 0) for the control frames
(HELLO, CHALLENGE, AUTH, AUTH_OK, ERROR, PEER_GONE, PING/PONG, and SEND/RECV too) and sends SEND as DATAGRAM
frames (``relaywire.encode_datagram``). The relay delivers RECV as a DATAGRAM when it fits one QUIC packet of
``MAX_DATAGRAM_SIZE`` bytes and the client enabled datagrams, else as a RECV frame on stream 0 (so a
full-size WireGuard packet still gets through a 1500-byte path, reliably). Data on any other stream is a
protocol error (ERROR + close).

The QUIC settings both ends share and the aioquic workarounds (datagram sizes, the tick pacer, bounded
queues: a delivery over a bound is dropped and the hub counts it) are :mod:`ghostcore.relayquic`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import socket
import time
from typing import TYPE_CHECKING, cast

from aioquic.asyncio.protocol import QuicConnectionProtocol, QuicStreamHandler
from aioquic.asyncio.server import QuicServer
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import NetworkAddress, QuicConnection

from ghostcore import relaywire as rw
from ghostcore.errors import Unavailable
from ghostcore.relayquic import (
    CONTROL_STREAM,
    configuration,
    queue_packet,
    stream_backlog,
    use_tick_pacer,
)
from ghostgate.tlscert import CertPair

if TYPE_CHECKING:
    from ghostgate.relay import RelayHub

MAX_CONTROL_BACKLOG = 4 << 20  # beyond this even control frames stop: the client is not reading; close it
# Kernel buffers of the relay's one UDP socket: every client's bursts share it, and a datagram the kernel
# drops is a loss to aioquic's congestion control (RFC 9002 s7), which DATAGRAM frames obey (RFC 9221 s5.4).
SOCKET_BUFFER = 1 << 20


def server_configuration(pair: CertPair) -> QuicConfiguration:
    return configuration(is_client=False, certificate=pair.certificate, private_key=pair.private_key)


class RelayQuicProtocol(QuicConnectionProtocol):
    """One client connection: aioquic events in, hub calls out; an :class:`ghostgate.relay.Edge`."""

    def __init__(
        self, quic: QuicConnection, stream_handler: QuicStreamHandler | None = None, *, hub: RelayHub
    ) -> None:
        super().__init__(quic, stream_handler)
        use_tick_pacer(quic)
        self._hub = hub
        self._cid: int | None = None
        self._closing = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        # Attached from the first packet, so the core's handshake timeout covers the QUIC handshake too.
        self._cid = self._hub.attach(self)

    def quic_event_received(self, event: events.QuicEvent) -> None:
        cid = self._cid
        if cid is None:
            return
        if isinstance(event, events.DatagramFrameReceived):
            self._hub.datagram(cid, event.data)
        elif isinstance(event, events.StreamDataReceived):
            if event.stream_id != CONTROL_STREAM:
                self._hub.reject(cid, "relay: control frames go on stream 0 only", "malformed")
                return
            if event.data:
                self._hub.stream(cid, event.data)
            if event.end_stream and not self._closing:
                self.close_edge("client closed stream 0")
                self._hub.detach(cid)
        elif isinstance(event, events.ConnectionTerminated):
            self._closing = True
            self._hub.detach(cid)

    # ----- driving aioquic (replaces QuicConnectionProtocol's own datagram_received / transmit / timer)
    #
    # Measured (bench.link_relay, 1200-byte packets, gate profiled): aioquic's protocol runs a full
    # ``transmit()`` (a ``datagrams_to_send`` pass + a timer cancel/re-arm) for every received datagram, most
    # of them building nothing: ~150 us of gate CPU per relayed packet, and the gate is the one process every
    # packet crosses twice. So a received datagram only schedules one transmit for the loop iteration
    # (coalescing a burst: ~1 transmit per 8 datagrams, ~100 us per packet), and the loss/idle timer is
    # re-armed only when it must fire earlier (aioquic's ``handle_timer`` ignores an early call).
    # ``now`` is ``time.monotonic()``: uvloop's ``loop.time()`` has 1 ms resolution and is cached per loop
    # iteration. Measured, that was not what slowed the relay (aioquic floors RTT samples at 1 ms, so none
    # was 0 and the gate on the stock loop was no faster), but a LAN RTT is well under 1 ms (RFC 9002 s5).

    def datagram_received(self, data: bytes | str, addr: NetworkAddress) -> None:
        self._quic.receive_datagram(cast(bytes, data), addr, time.monotonic())
        self._process_events()
        self._transmit_soon()

    def transmit(self) -> None:
        self._transmit_task = None
        transport = self._transport
        if transport is None:
            return
        now = time.monotonic()
        for data, addr in self._quic.datagrams_to_send(now=now):
            transport.sendto(data, addr)
        timer_at = self._quic.get_timer()
        if timer_at is None:
            return  # a timer already armed fires harmlessly early
        if self._timer is not None:
            if self._timer_at is not None and self._timer_at <= timer_at:
                return  # fires earlier than needed: _handle_timer re-arms for the real deadline
            self._timer.cancel()
        self._timer_at = timer_at
        self._timer = self._loop.call_later(max(0.0, timer_at - now), self._handle_timer)

    def _handle_timer(self) -> None:
        # A loop may fire a timer a little early (uvloop rounds to ms): act as at the armed deadline then,
        # as aioquic's own handler does; a deadline that moved later since is left alone by handle_timer.
        now = max(self._timer_at or 0.0, time.monotonic())
        self._timer = None
        self._timer_at = None
        self._quic.handle_timer(now=now)
        self._process_events()
        self.transmit()

    # ----- Edge

    def send_frame(self, data: bytes) -> None:
        if self._closing:
            return
        if stream_backlog(self._quic) > MAX_CONTROL_BACKLOG:
            self._hub.counters["closed_slow"] += 1
            self.close_edge("relay: client is not reading")
            return
        try:
            self._quic.send_stream_data(CONTROL_STREAM, data)
        except ValueError:
            return  # stream 0 not opened by the client (e.g. a datagram came first): the close says why
        self._transmit_soon()

    def deliver(self, src: bytes, packet: bytes) -> bool:
        if self._closing:
            return False
        if not queue_packet(self._quic, rw.RECV, src, packet):
            return False
        self._transmit_soon()
        return True

    def close_edge(self, reason: str) -> None:
        if self._closing:
            return
        self._closing = True
        # Flush the ERROR frame queued on stream 0 first: once a close is pending aioquic sends only the
        # CONNECTION_CLOSE. Its reason phrase repeats the ERROR for a client that missed the frame.
        self.transmit()
        self.close(reason_phrase=reason[:200])


async def serve_quic(
    hub: RelayHub, host: str, port: int, pair: CertPair
) -> tuple[asyncio.DatagramTransport, QuicServer]:
    """Bind UDP ``host:port`` and serve the QUIC relay into ``hub`` until the server is closed."""
    config = server_configuration(pair)
    loop = asyncio.get_running_loop()
    try:
        transport, server = await loop.create_datagram_endpoint(
            lambda: QuicServer(
                configuration=config, create_protocol=functools.partial(RelayQuicProtocol, hub=hub)
            ),
            local_addr=(host, port),
        )
    except OSError as exc:
        raise Unavailable(f"relay.quic_port: cannot bind UDP {host}:{port}: {exc.strerror}") from None
    sock = transport.get_extra_info("socket")
    if sock is not None:
        for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):  # capped by net.core.[rw]mem_max; best effort
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
    return transport, server
