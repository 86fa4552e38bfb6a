"""The QUIC edge of the ghost relay (RFC 9000 via aioquic; DATAGRAM frames, RFC 9221).

ALPN ``ghostrelay``. A client opens its first bidirectional stream (id 0) for the control frames
(HELLO, CHALLENGE, AUTH, AUTH_OK, ERROR, PEER_GONE, PING/PONG, and SEND/RECV too) and sends SEND as DATAGRAM
frames (``relaywire.encode_datagram``). The relay delivers RECV as a DATAGRAM when it fits one QUIC packet of
``MAX_DATAGRAM_SIZE`` bytes and the client enabled datagrams, else as a RECV frame on stream 0 (so a
full-size WireGuard packet still gets through a 1500-byte path, reliably). Data on any other stream is a
protocol error (ERROR + close).

aioquic pitfalls handled here (../shared/platform-notes.md): ``max_datagram_size`` must be at least 1450, or a
1200-byte DATAGRAM never fits a packet and blocks every later one; and a DATAGRAM larger than a packet's room
stays at the head of aioquic's queue forever, so we never queue one above ``datagram_room()``. aioquic's
pacer bursts at most 16 packets between event-loop timer ticks of 1 ms, which capped a relay connection well
below what it could carry: ``TickPacer`` lets a burst cover a tick. aioquic's datagram queue and stream send
buffer are unbounded: deliveries to a connection over ``MAX_PENDING_DATAGRAMS`` or ``MAX_STREAM_BACKLOG`` are
dropped (the hub counts them) instead of growing memory or waiting.
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
from aioquic.quic.recovery import QuicPacketPacer

from ghostcore import relaywire as rw
from ghostcore.errors import Unavailable
from ghostgate.tlscert import CertPair

if TYPE_CHECKING:
    from ghostgate.relay import RelayHub

ALPN = "ghostrelay"
CONTROL_STREAM = 0
MAX_DATAGRAM_SIZE = 1452  # UDP payload on a 1500-byte IPv6 path (1500 - 40 - 8); >= 1450, see above
MAX_DATAGRAM_FRAME_SIZE = 65536
IDLE_TIMEOUT = 10.0
# Room lost from a packet of MAX_DATAGRAM_SIZE before the DATAGRAM payload: short header (1 + up to 20 bytes
# of connection id + 4 of packet number), AEAD tag (16), frame type (1) and length varint (2).
_DATAGRAM_OVERHEAD = 1 + 20 + 4 + 16 + 1 + 2
MAX_PENDING_DATAGRAMS = 512
MAX_STREAM_BACKLOG = 1 << 20  # unacknowledged bytes on stream 0 before RECVs to that client are dropped
MAX_CONTROL_BACKLOG = 4 << 20  # beyond this even control frames stop: the client is not reading; close it
# Kernel buffers of the relay's one UDP socket: every client's bursts share it, and a datagram the kernel
# drops is a loss to aioquic's congestion control (RFC 9002 s7), which DATAGRAM frames obey (RFC 9221 s5.4).
SOCKET_BUFFER = 1 << 20
# aioquic's pacer (RFC 9002 s7.7) lets out at most 16 packets, then waits on a loop timer; asyncio's epoll
# timeout and uvloop's timers both have 1 ms resolution, so a relay connection could never pass more than
# ~16 packets per ms, and fewer while the loop is busy (bench.link_relay: ~5-8k packets/s with the senders
# dropping at MAX_PENDING_DATAGRAMS while idle). The burst allowance covers PACING_TICK instead.
PACING_TICK = 0.002


def datagram_room() -> int:
    """The largest DATAGRAM payload the relay queues (bigger RECVs go on stream 0)."""
    return MAX_DATAGRAM_SIZE - _DATAGRAM_OVERHEAD


class TickPacer(QuicPacketPacer):
    """aioquic's pacer with a burst allowance of at least one event-loop timer tick (``PACING_TICK``)."""

    def update_rate(self, congestion_window: int, smoothed_rtt: float) -> None:
        super().update_rate(congestion_window, smoothed_rtt)
        # bucket_max is in seconds of the pacing rate (cwnd / srtt): a tick's worth, never beyond one window
        self.bucket_max = max(self.bucket_max, min(smoothed_rtt, PACING_TICK))


def server_configuration(pair: CertPair) -> QuicConfiguration:
    return QuicConfiguration(
        is_client=False,
        alpn_protocols=[ALPN],
        max_datagram_size=MAX_DATAGRAM_SIZE,
        max_datagram_frame_size=MAX_DATAGRAM_FRAME_SIZE,
        idle_timeout=IDLE_TIMEOUT,
        certificate=pair.certificate,
        private_key=pair.private_key,
    )


class RelayQuicProtocol(QuicConnectionProtocol):
    """One client connection: aioquic events in, hub calls out; an :class:`ghostgate.relay.Edge`."""

    def __init__(
        self, quic: QuicConnection, stream_handler: QuicStreamHandler | None = None, *, hub: RelayHub
    ) -> None:
        super().__init__(quic, stream_handler)
        quic._loss._pacer = TickPacer(max_datagram_size=MAX_DATAGRAM_SIZE)  # no public hook: see PACING_TICK
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
        if self._stream_backlog() > MAX_CONTROL_BACKLOG:
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
        dgram = rw.encode_datagram(rw.RECV, src, packet)
        # aioquic keeps the peer's transport parameter privately; None = the client did not enable DATAGRAM
        remote_max = self._quic._remote_max_datagram_frame_size
        if len(dgram) <= datagram_room() and remote_max is not None and len(dgram) < remote_max:
            if len(self._quic._datagrams_pending) >= MAX_PENDING_DATAGRAMS:
                return False
            self._quic.send_datagram_frame(dgram)
        else:
            if self._stream_backlog() > MAX_STREAM_BACKLOG:
                return False
            try:
                self._quic.send_stream_data(CONTROL_STREAM, rw.encode(rw.RECV, src + packet))
            except ValueError:
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

    def _stream_backlog(self) -> int:
        # Bytes written on stream 0 and not yet acknowledged (aioquic exposes no public accessor).
        stream = self._quic._streams.get(CONTROL_STREAM)
        return 0 if stream is None else len(stream.sender._buffer)


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
