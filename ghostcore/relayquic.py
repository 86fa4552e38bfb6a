"""The ghost relay's QUIC profile, shared by ghostgate's server and ghostlink's client (imports aioquic).

Both ends of a relay connection must agree on these choices (ALPN, datagram sizes), and both have to work
around the same aioquic behaviour, so the settings and the workarounds live here once:

* ``max_datagram_size`` must be at least 1450 (measured with aioquic 1.7: with the default 1200, a
  1200-byte DATAGRAM frame (RFC 9221) never fits a packet and silently blocks every later one). A DATAGRAM
  larger than a packet's room also stays at the head of aioquic's queue forever, so :func:`queue_packet`
  never queues one above ``DATAGRAM_ROOM``: a bigger packet goes as a frame on stream 0 instead (reliably,
  still whole).
* aioquic's pacer (RFC 9002 §7.7) lets out at most 16 packets, then waits on a loop timer; asyncio's epoll
  timeout and uvloop's timers both have 1 ms resolution, so a relay connection could never pass more than
  ~16 packets per ms, and fewer while the loop is busy (bench.link_relay: ~5-8k packets/s with senders
  dropping at ``MAX_PENDING_DATAGRAMS`` while their loop sat idle). :class:`TickPacer` lets a burst cover
  ``PACING_TICK``, never more than one congestion window, at aioquic's own rate.
* aioquic's datagram queue and stream send buffer are unbounded: :func:`queue_packet` drops (returns False,
  the caller counts) above ``MAX_PENDING_DATAGRAMS`` / ``MAX_STREAM_BACKLOG`` instead of growing memory, and
  control frames stop at ``MAX_CONTROL_BACKLOG`` (:class:`ghostcore.quicdriver.QuicDriver` enforces it).

aioquic offers no public hook for the pacer, the queued datagrams, the peer's DATAGRAM transport parameter,
a stream's unacknowledged bytes or the peer's certificate (which a node checks against the relay map's
pin, :func:`peer_certificate`); the private attributes read here are read nowhere else.
"""

from __future__ import annotations

from typing import Any

from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.recovery import QuicPacketPacer
from cryptography import x509

from ghostcore import relaywire as rw

ALPN = "ghostrelay"
CONTROL_STREAM = 0  # the client's first bidirectional stream carries the control frames
MAX_DATAGRAM_SIZE = 1452  # UDP payload on a 1500-byte IPv6 path (1500 - 40 - 8); >= 1450, see above
MAX_DATAGRAM_FRAME_SIZE = 65536
IDLE_TIMEOUT = 10.0
# Room lost from a packet of MAX_DATAGRAM_SIZE before the DATAGRAM payload: short header (1 + up to 20 bytes
# of connection id + 4 of packet number), AEAD tag (16), frame type (1) and length varint (2).
_DATAGRAM_OVERHEAD = 1 + 20 + 4 + 16 + 1 + 2
DATAGRAM_ROOM = MAX_DATAGRAM_SIZE - _DATAGRAM_OVERHEAD  # the largest DATAGRAM payload queued
MAX_PENDING_DATAGRAMS = 512
MAX_STREAM_BACKLOG = 1 << 20  # unacknowledged bytes on stream 0 before packets to that end are dropped
MAX_CONTROL_BACKLOG = 4 << 20  # ... before even control frames stop: that end is not reading; close it
PACING_TICK = 0.002


class TickPacer(QuicPacketPacer):
    """aioquic's pacer with a burst allowance of at least one event-loop timer tick (``PACING_TICK``)."""

    def update_rate(self, congestion_window: int, smoothed_rtt: float) -> None:
        super().update_rate(congestion_window, smoothed_rtt)
        # bucket_max is in seconds of the pacing rate (cwnd / srtt): a tick's worth, never beyond one window
        self.bucket_max = max(self.bucket_max, min(smoothed_rtt, PACING_TICK))


def configuration(*, is_client: bool, **extra: Any) -> QuicConfiguration:
    """The relay's QuicConfiguration for one end (``extra``: certificate, verify_mode, server_name...)."""
    return QuicConfiguration(
        is_client=is_client,
        alpn_protocols=[ALPN],
        max_datagram_size=MAX_DATAGRAM_SIZE,
        max_datagram_frame_size=MAX_DATAGRAM_FRAME_SIZE,
        idle_timeout=IDLE_TIMEOUT,
        **extra,
    )


def use_tick_pacer(quic: QuicConnection) -> None:
    """Replace the connection's pacer with :class:`TickPacer` (at creation, before any packet)."""
    quic._loss._pacer = TickPacer(max_datagram_size=MAX_DATAGRAM_SIZE)


def peer_certificate(quic: QuicConnection) -> x509.Certificate | None:
    """The certificate the other end presented in the TLS 1.3 handshake (RFC 9001 section 4), None before
    it arrived. Reading it fails closed: if aioquic ever drops the attribute this returns None and a
    pinned connection is refused."""
    cert = getattr(quic.tls, "_peer_certificate", None)
    return cert if isinstance(cert, x509.Certificate) else None


def stream_backlog(quic: QuicConnection) -> int:
    """Bytes written on the control stream and not yet acknowledged."""
    stream = quic._streams.get(CONTROL_STREAM)
    return 0 if stream is None else len(stream.sender._buffer)


def queue_packet(quic: QuicConnection, ftype: int, key: bytes, packet: bytes) -> bool:
    """Queue a SEND / RECV: as a DATAGRAM when it fits and the other end enabled them, else as a frame on
    the control stream. False (dropped) when the matching queue is over its bound or stream 0 is not open."""
    dgram = rw.encode_datagram(ftype, key, packet)
    remote_max = quic._remote_max_datagram_frame_size  # None: the other end did not enable DATAGRAM
    if len(dgram) <= DATAGRAM_ROOM and remote_max is not None and len(dgram) < remote_max:
        if len(quic._datagrams_pending) >= MAX_PENDING_DATAGRAMS:
            return False
        quic.send_datagram_frame(dgram)
        return True
    if stream_backlog(quic) > MAX_STREAM_BACKLOG:
        return False
    try:
        quic.send_stream_data(CONTROL_STREAM, rw.encode(ftype, key + packet))
    except ValueError:  # stream 0 not opened by the client (e.g. a datagram came first)
        return False
    return True
