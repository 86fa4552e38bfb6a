"""Driving one ghost relay QUIC connection on an event loop, the same at the relay and at a node.

:class:`QuicDriver` owns an aioquic sans-IO ``QuicConnection`` (RFC 9000) and its loop timer, and does all
that lies between a socket and the relay protocol: it feeds received datagrams in, hands the connection's
events to the end's :class:`DriverEvents`, transmits (coalesced, at most once per loop iteration), keeps the
timer armed, bounds the control stream's backlog and closes. *What* goes on the wire (ALPN, sizes, the tick
pacer, DATAGRAM or stream 0) stays :mod:`ghostcore.relayquic`'s, which needs no loop; this module adds
*when*. It needs only a loop's ``call_soon`` / ``call_later`` (:class:`Scheduler`: an asyncio loop is one,
and tests step a fake one by hand), so it imports aioquic but not asyncio, and no socket.

The socket stays with each end, because the two read and write differently:

* ghostgate serves every client on one UDP socket, and aioquic's ``QuicServer`` routes each datagram by its
  destination connection ID (RFC 9000 §5.2) to one ``QuicConnectionProtocol`` per connection, which
  :mod:`ghostgate.quic` keeps only as that shell: it feeds one datagram per call, sends with ``sendto``
  (which never raises: asyncio buffers) and keeps QuicServer's map of connection IDs current from
  :meth:`DriverEvents.on_cid`.
* ghostlink has one connection on a connected socket, which it reads in batches, feeding each datagram and
  pumping once (:mod:`ghostlink.traversal.relaylink`); its ``send`` fails on a full socket buffer (stop this
  flush) or with an ICMP error (the connection is lost).

So an end passes a ``send(data, addr) -> bool``; False stops the flush, and what was built but not sent
counts as lost: QUIC resends its stream data (RFC 9002 §6), its DATAGRAMs are gone as any lost UDP packet
would be (RFC 9221 §5.2). The events an end sees are the relay protocol's rather than aioquic's: bytes and
FIN on stream 0 (a FIN ends a relay connection at the server), data on any other stream (a protocol error),
DATAGRAM payloads (RFC 9221), handshake done, connection IDs issued and retired (for a server's routing),
connection lost. Each end says in its handlers what it ignores and why.

The clock is ``time.monotonic()``, not ``loop.time()``: uvloop's has 1 ms resolution and is cached per loop
iteration. Measured, that was not what slowed the relay (aioquic floors RTT samples at 1 ms, so none was 0,
and the stock loop was no faster), but a LAN RTT is well under 1 ms (RFC 9002 §5).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

from aioquic.quic import events
from aioquic.quic.connection import NetworkAddress, QuicConnection

from ghostcore import relayquic


class DriverEvents(Protocol):
    """What one end does with its connection's events (called from :meth:`QuicDriver.pump` and the timer)."""

    def on_ready(self) -> None:
        """The handshake completed (RFC 9001 §4.1.1)."""

    def on_stream(self, data: bytes, end: bool) -> None:
        """Bytes on the control stream (stream 0; ``data`` may be empty); ``end``: the other end sent FIN."""

    def on_datagram(self, data: bytes) -> None:
        """One DATAGRAM frame's payload (RFC 9221)."""

    def on_bad_stream(self, stream_id: int) -> None:
        """Data on a stream other than stream 0, which the relay protocol never uses."""

    def on_cid(self, cid: bytes, issued: bool) -> None:
        """A connection ID this end issued, or (not ``issued``) one the other end retired (RFC 9000 §5.1)."""

    def on_lost(self, reason: str) -> None:
        """The connection terminated (closed by either end, idle timeout: RFC 9000 §10): no more events."""


class Timer(Protocol):
    def cancel(self) -> None: ...


class Scheduler(Protocol):
    """The two event-loop calls the driver makes (an asyncio loop is one)."""

    def call_soon(self, callback: Callable[[], object], /) -> object: ...

    def call_later(self, delay: float, callback: Callable[[], object], /) -> Timer: ...


Send = Callable[[bytes, NetworkAddress], bool]


class QuicDriver:
    """One relay QUIC connection driven on a loop; see the module docstring.

    Measured (bench.link_relay, 1200-byte packets, gate profiled): aioquic's own ``QuicConnectionProtocol``
    runs a full transmit (a ``datagrams_to_send`` pass and a timer cancel / re-arm) for every received
    datagram, most of them building nothing: ~150 us of gate CPU per relayed packet, and the gate is the one
    process every packet crosses twice. So :meth:`pump` only schedules one transmit for the loop iteration
    (coalescing a burst: ~1 transmit per 8 datagrams, ~100 us per packet), and the timer is re-armed only
    when it must fire earlier (a timer firing before the connection's deadline is harmless, see
    :meth:`_on_timer`).
    """

    def __init__(
        self,
        quic: QuicConnection,
        send: Send,
        handler: DriverEvents,
        loop: Scheduler,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        relayquic.use_tick_pacer(quic)  # before any packet: see relayquic
        self._quic = quic
        self._send = send
        self._handler = handler
        self._loop = loop
        self._clock = clock
        self._timer: Timer | None = None
        self._timer_at = 0.0  # the armed timer's deadline (meaningless while _timer is None)
        self._tx_pending = False
        self._stopped = False

    # ----- in

    def connect(self, addr: NetworkAddress) -> None:
        """A client's first flight to ``addr`` (RFC 9000 §7)."""
        self._quic.connect(addr, now=self._clock())
        self.transmit()

    def feed(self, data: bytes, addr: NetworkAddress) -> None:
        """One received datagram; :meth:`pump` after the last of a batch hands its events on."""
        self._quic.receive_datagram(data, addr, now=self._clock())

    def pump(self) -> None:
        """Hand every pending event to the handler, then schedule one transmit (ACKs, answers)."""
        self._drain()
        self._transmit_soon()

    def _drain(self) -> None:
        quic, handler = self._quic, self._handler
        while not self._stopped and (event := quic.next_event()) is not None:
            if isinstance(event, events.DatagramFrameReceived):
                handler.on_datagram(event.data)
            elif isinstance(event, events.StreamDataReceived):
                if event.stream_id == relayquic.CONTROL_STREAM:
                    handler.on_stream(event.data, event.end_stream)
                else:
                    handler.on_bad_stream(event.stream_id)
            elif isinstance(event, events.HandshakeCompleted):
                handler.on_ready()
            elif isinstance(event, events.ConnectionIdIssued):
                handler.on_cid(event.connection_id, True)
            elif isinstance(event, events.ConnectionIdRetired):
                handler.on_cid(event.connection_id, False)
            elif isinstance(event, events.ConnectionTerminated):
                # Nothing is left to time, and aioquic's handle_timer fails on a terminated connection.
                self._cancel_timer()
                handler.on_lost(event.reason_phrase or str(event.error_code))

    # ----- out

    def send_frame(self, data: bytes) -> bool:
        """Queue stream frames on stream 0. False (nothing queued) when more than ``MAX_CONTROL_BACKLOG``
        bytes already wait there unacknowledged: the other end is not reading, and the caller closes."""
        quic = self._quic
        if relayquic.stream_backlog(quic) > relayquic.MAX_CONTROL_BACKLOG:
            return False
        try:
            quic.send_stream_data(relayquic.CONTROL_STREAM, data)
        except ValueError:
            # A server whose client has not opened stream 0 (a DATAGRAM came first): nothing to write on.
            # Such a connection is being refused, and its CONNECTION_CLOSE's reason says why.
            return True
        self._transmit_soon()
        return True

    def queue_packet(self, ftype: int, key: bytes, packet: bytes) -> bool:
        """Queue a SEND / RECV (:func:`ghostcore.relayquic.queue_packet`); False when dropped."""
        if not relayquic.queue_packet(self._quic, ftype, key, packet):
            return False
        self._transmit_soon()
        return True

    def _transmit_soon(self) -> None:
        if not self._tx_pending:
            self._tx_pending = True
            self._loop.call_soon(self.transmit)

    def transmit(self) -> None:
        """Send what the connection has to send now, then make sure the timer fires by its next deadline."""
        self._tx_pending = False
        if self._stopped:
            return
        now = self._clock()
        send = self._send
        for data, addr in self._quic.datagrams_to_send(now=now):
            if not send(data, addr):
                break
        if self._stopped:  # send found the connection lost
            return
        timer_at = self._quic.get_timer()
        if timer_at is None:
            return  # a timer already armed fires harmlessly early
        if self._timer is not None:
            if self._timer_at <= timer_at:
                return  # fires earlier than needed: _on_timer re-arms for the real deadline
            self._timer.cancel()
        self._timer_at = timer_at
        self._timer = self._loop.call_later(max(0.0, timer_at - now), self._on_timer)

    def _on_timer(self) -> None:
        # A loop may fire a timer a little early (uvloop rounds to ms): act as at the armed deadline then, as
        # aioquic's own protocol does; a deadline that moved later since is left alone by handle_timer.
        now = max(self._timer_at, self._clock())
        self._timer = None
        self._quic.handle_timer(now=now)
        self._drain()
        self.transmit()

    # ----- end

    def close(self, reason: str) -> None:
        """Close the connection (RFC 9000 §10.2), flushing what was written first. The timer runs on to the
        end of the closing period (then :meth:`DriverEvents.on_lost`) unless the end stops the driver."""
        # Once a close is pending aioquic sends only the CONNECTION_CLOSE: flush stream 0 (an ERROR frame)
        # first. The reason phrase repeats the ERROR for an end that missed the frame, cut to fit a packet.
        self.transmit()
        self._quic.close(reason_phrase=reason[:200])
        self.transmit()

    def stop(self) -> None:
        """Drive nothing more (the end's socket is gone): cancel the timer, deliver no event, send nothing."""
        self._stopped = True
        self._cancel_timer()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
