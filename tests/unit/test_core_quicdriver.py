"""The relay's QUIC driver (ghostcore.quicdriver): two real aioquic connections, one per driver, wired through
the drivers' send functions on a hand-stepped loop and clock: no sockets, no real time.

Both ends run the relay profile (tick pacer, ALPN); frames, DATAGRAMs and a packet too big for one arrive
whole; transmits are coalesced per loop iteration; a send that refuses stops the flush and QUIC recovers the
stream data; a timer the loop fires early acts at its deadline; a close flushes stream 0 first; the control
stream's backlog is bounded; a stopped driver hands nothing on and keeps no timer.
"""

from __future__ import annotations

import heapq
import itertools
import ssl
from collections import deque
from collections.abc import Callable

import pytest
from aioquic.buffer import Buffer
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import NetworkAddress, QuicConnection
from aioquic.quic.packet import encode_quic_version_negotiation, pull_quic_header

from ghostcore import relayquic
from ghostcore import relaywire as rw
from ghostcore.quicdriver import QuicDriver
from ghostcore.relayquic import TickPacer
from ghostcore.tlscert import self_signed
from ghostgate.quic import server_configuration

CLIENT_ADDR = ("192.0.2.1", 40000)
RELAY_ADDR = ("192.0.2.2", 3479)
ONE_WAY = 0.005  # the wire's delay, seconds
KEY = b"K" * 32


class Handle:
    def __init__(self, when: float, callback: Callable[[], object], *, wire: bool = False) -> None:
        self.when, self.callback, self.wire, self.cancelled = when, callback, wire, False

    def cancel(self) -> None:
        self.cancelled = True


class SteppedLoop:
    """The driver's Scheduler on a clock that moves only when :meth:`run` reaches the next timer, and by
    ``STEP`` at least (a loop iteration takes time). ``early``: fire every driver timer that much before its
    time (as uvloop's millisecond rounding may)."""

    STEP = 1e-5

    def __init__(self, early: float = 0.0) -> None:
        self.now = 100.0
        self.early = early
        self.fired = 0
        self.armed = 0  # driver timers armed
        self._ready: deque[Callable[[], object]] = deque()
        self._timers: list[tuple[float, int, Handle]] = []
        self._seq = itertools.count()

    def clock(self) -> float:
        return self.now

    def call_soon(self, callback: Callable[[], object], /) -> None:
        self._ready.append(callback)

    def call_later(self, delay: float, callback: Callable[[], object], /) -> Handle:
        self.armed += 1
        return self._push(Handle(self.now + delay, callback))

    def wire_later(self, delay: float, callback: Callable[[], object]) -> None:
        self._push(Handle(self.now + delay, callback, wire=True))

    def _push(self, handle: Handle) -> Handle:
        when = handle.when if handle.wire else handle.when - self.early
        heapq.heappush(self._timers, (when, next(self._seq), handle))
        return handle

    @property
    def ready(self) -> int:
        return len(self._ready)

    def driver_timers(self) -> int:
        """Driver timers armed and not cancelled (each driver keeps at most one)."""
        return sum(1 for _, _, h in self._timers if not h.wire and not h.cancelled)

    def run(self, seconds: float) -> None:
        """Run what is ready, then every timer due within ``seconds``, moving the clock to each."""
        until = self.now + seconds
        while True:
            while self._ready:
                self._ready.popleft()()
            assert self.driver_timers() <= 2
            if not self._timers or self._timers[0][0] > until:
                break
            when, _, handle = heapq.heappop(self._timers)
            if handle.cancelled:
                continue
            self.now = max(self.now + self.STEP, when)
            self.fired += 1
            assert self.fired < 100_000, "timers firing without end"
            handle.callback()
        self.now = max(self.now, until)


class Recorder:
    """A DriverEvents that keeps what it gets."""

    def __init__(self, loop: SteppedLoop) -> None:
        self._loop = loop
        self.ready = False
        self.stream = bytearray()
        self.fin = False
        self.datagrams: list[bytes] = []
        self.bad_streams: list[int] = []
        self.cids: list[tuple[bytes, bool]] = []
        self.lost: list[tuple[str, float]] = []  # (reason, loop time)

    def on_ready(self) -> None:
        self.ready = True

    def on_stream(self, data: bytes, end: bool) -> None:
        self.stream += data
        self.fin = self.fin or end

    def on_datagram(self, data: bytes) -> None:
        self.datagrams.append(data)

    def on_bad_stream(self, stream_id: int) -> None:
        self.bad_streams.append(stream_id)

    def on_cid(self, cid: bytes, issued: bool) -> None:
        self.cids.append((cid, issued))

    def on_lost(self, reason: str) -> None:
        self.lost.append((reason, self._loop.now))


class Pair:
    """A client driver and a relay driver (created on the first datagram, as aioquic's QuicServer does)."""

    def __init__(self, server_config: QuicConfiguration, loop: SteppedLoop | None = None) -> None:
        self.loop = loop or SteppedLoop()
        self.server_config = server_config
        self.up = True  # False: the wire drops everything
        self.refuse = 0  # the client's next sends that return False (a full socket buffer)
        self.client_sends = 0
        self.client_events = Recorder(self.loop)
        self.server_events = Recorder(self.loop)
        config = relayquic.configuration(is_client=True, verify_mode=ssl.CERT_NONE, server_name="relay")
        self.client_quic = QuicConnection(configuration=config)
        self.client = QuicDriver(
            self.client_quic, self._client_send, self.client_events, self.loop, self.loop.clock
        )
        self._server: QuicDriver | None = None
        self.server_quic: QuicConnection | None = None

    @property
    def server(self) -> QuicDriver:
        assert self._server is not None
        return self._server

    def _client_send(self, data: bytes, addr: NetworkAddress) -> bool:
        assert addr == RELAY_ADDR
        self.client_sends += 1
        if self.refuse:
            self.refuse -= 1
            return False
        if self.up:
            self.loop.wire_later(ONE_WAY, lambda: self._to_server(data))
        return True

    def _server_send(self, data: bytes, addr: NetworkAddress) -> bool:
        assert addr == CLIENT_ADDR
        if self.up:
            self.loop.wire_later(ONE_WAY, lambda: self._deliver(self.client, data, RELAY_ADDR))
        return True

    def _to_server(self, data: bytes) -> None:
        if self._server is None:
            header = pull_quic_header(
                Buffer(data=data), host_cid_length=self.server_config.connection_id_length
            )
            quic = QuicConnection(
                configuration=self.server_config, original_destination_connection_id=header.destination_cid
            )
            self.server_quic = quic
            self._server = QuicDriver(quic, self._server_send, self.server_events, self.loop, self.loop.clock)
        self._deliver(self._server, data, CLIENT_ADDR)

    @staticmethod
    def _deliver(driver: QuicDriver, data: bytes, addr: NetworkAddress) -> None:
        driver.feed(data, addr)
        driver.pump()

    def connect(self) -> None:
        self.client.connect(RELAY_ADDR)
        self.loop.run(0.2)
        assert self.client_events.ready
        assert self.server_events.ready


@pytest.fixture(scope="module")
def server_config() -> QuicConfiguration:
    return server_configuration(self_signed("ghostgate"))


@pytest.fixture
def pair(server_config: QuicConfiguration) -> Pair:
    return Pair(server_config)


def test_both_ends_run_the_relay_profile(pair: Pair) -> None:
    pair.connect()
    assert pair.server_quic is not None
    for quic in (pair.client_quic, pair.server_quic):
        assert isinstance(quic._loss._pacer, TickPacer)
        assert quic.tls.alpn_negotiated == relayquic.ALPN


def test_frames_datagrams_and_big_packets_both_ways(pair: Pair) -> None:
    pair.connect()
    hello = rw.encode(rw.HELLO, rw.MAGIC)
    assert pair.client.send_frame(hello)  # opens stream 0
    assert pair.client.queue_packet(rw.SEND, KEY, b"small")
    pair.loop.run(0.1)
    big = bytes(range(256)) * 6  # over DATAGRAM_ROOM: goes as a frame on stream 0
    assert pair.server.queue_packet(rw.RECV, KEY, big)
    pair.loop.run(0.1)
    assert bytes(pair.server_events.stream) == hello
    assert pair.server_events.datagrams == [rw.encode_datagram(rw.SEND, KEY, b"small")]
    assert bytes(pair.client_events.stream) == rw.encode(rw.RECV, KEY + big)
    # the relay issued spare connection IDs (RFC 9000 s5.1.1): a server routing by them must hear of each
    assert pair.server_events.cids
    assert all(issued for _, issued in pair.server_events.cids)
    assert not pair.client_events.lost
    assert not pair.server_events.lost


def test_transmits_coalesce_per_loop_iteration(pair: Pair) -> None:
    pair.connect()
    before = pair.client_sends
    for i in range(20):
        assert pair.client.queue_packet(rw.SEND, KEY, bytes([i]) * 100)
    assert pair.loop.ready == 1  # one transmit scheduled for the lot
    pair.loop.run(0.1)
    assert len(pair.server_events.datagrams) == 20
    assert pair.client_sends - before <= 3  # 20 small DATAGRAMs share packets


def test_a_refusing_send_stops_the_flush_and_quic_recovers_the_stream(pair: Pair) -> None:
    pair.connect()
    frames = [rw.encode(rw.PING, bytes([i]) * 8) + bytes(1000) for i in range(10)]
    for frame in frames:
        assert pair.client.send_frame(frame)
    pair.refuse = 1
    before = pair.client_sends
    pair.client.transmit()
    assert pair.client_sends - before == 1  # the first send refused: nothing more tried in that flush
    pair.loop.run(2.0)  # loss recovery (RFC 9002 s6) resends what was built and never sent
    assert bytes(pair.server_events.stream) == b"".join(frames)


def test_a_timer_fired_early_acts_at_its_deadline(server_config: QuicConfiguration) -> None:
    early = 0.0005
    pair = Pair(server_config, SteppedLoop(early=early))
    pair.connect()
    calls: list[tuple[float, float]] = []  # (now handed to aioquic, the clock then)
    handle_timer = pair.client_quic.handle_timer

    def spy(now: float) -> None:
        calls.append((now, pair.loop.now))
        handle_timer(now)

    pair.client_quic.handle_timer = spy
    pair.up = False  # both ends go silent: each idle timer (RFC 9000 s10.1) must end its connection
    start = pair.loop.now
    pair.loop.run(relayquic.IDLE_TIMEOUT * 4)
    for events in (pair.client_events, pair.server_events):
        assert [reason for reason, _ in events.lost] == ["Idle timeout"]
        assert start + relayquic.IDLE_TIMEOUT - 1 < events.lost[0][1] < start + relayquic.IDLE_TIMEOUT * 3
    # every firing came early and acted at its deadline, the idle timeout's at the first one
    assert calls
    assert all(now - clock == pytest.approx(early) for now, clock in calls)
    assert pair.loop.driver_timers() == 0  # a terminated connection keeps no timer


def test_the_timer_is_rearmed_only_to_fire_earlier(pair: Pair) -> None:
    pair.connect()
    armed = pair.loop.armed
    packets = 500
    for _ in range(packets):  # steady traffic: every transmit moves the ACK / loss deadlines
        assert pair.client.queue_packet(rw.SEND, KEY, bytes(1000))
        pair.loop.run(0.0002)
    pair.loop.run(0.5)
    assert len(pair.server_events.datagrams) == packets
    assert pair.loop.armed - armed < packets  # re-arming on every change would take more than one each


def test_a_connection_terminated_on_receipt_keeps_no_timer(pair: Pair) -> None:
    pair.up = False
    pair.client.connect(RELAY_ADDR)  # the Initial's loss timer is armed
    assert pair.loop.driver_timers() == 1
    refusal = encode_quic_version_negotiation(  # no version in common (RFC 9000 s6): over, at once
        source_cid=pair.client_quic._peer_cid.cid,
        destination_cid=pair.client_quic.host_cid,
        supported_versions=[0x0A0A0A0A],
    )
    pair.client.feed(refusal, RELAY_ADDR)
    pair.client.pump()
    assert [reason for reason, _ in pair.client_events.lost] == ["Could not find a common protocol version"]
    assert pair.loop.driver_timers() == 0  # aioquic's handle_timer would fail on the terminated connection
    pair.loop.run(5.0)


def test_close_flushes_stream_0_before_the_connection_close(pair: Pair) -> None:
    pair.connect()
    hello = rw.encode(rw.HELLO, rw.MAGIC)
    assert pair.client.send_frame(hello)
    pair.loop.run(0.1)
    error = rw.encode(rw.ERROR, b"relay: go away")
    assert pair.server.send_frame(error)
    pair.server.close("relay: go away")  # in the same loop iteration: the ERROR is not sent yet
    pair.loop.run(relayquic.IDLE_TIMEOUT)
    assert bytes(pair.client_events.stream) == error
    assert [reason for reason, _ in pair.client_events.lost] == ["relay: go away"]
    assert [reason for reason, _ in pair.server_events.lost] == ["relay: go away"]  # after its closing period
    assert pair.loop.driver_timers() == 0


def test_control_stream_backlog_is_bounded(pair: Pair) -> None:
    pair.connect()
    pair.up = False  # nothing is acknowledged
    chunk = bytes(1 << 20)
    accepted = 0
    while pair.client.send_frame(chunk):
        accepted += 1
        assert accepted < 10
    assert accepted * len(chunk) > relayquic.MAX_CONTROL_BACKLOG
    assert relayquic.stream_backlog(pair.client_quic) <= relayquic.MAX_CONTROL_BACKLOG + len(chunk)


def test_a_relay_cannot_write_on_stream_0_before_the_client_opens_it(pair: Pair) -> None:
    pair.connect()
    assert pair.server.send_frame(rw.encode(rw.ERROR, b"early"))  # not over the bound: nothing queued
    pair.loop.run(0.1)
    assert not pair.client_events.stream


def test_data_on_another_stream_is_reported(pair: Pair) -> None:
    pair.connect()
    assert pair.client.send_frame(rw.encode(rw.HELLO, rw.MAGIC))  # opens stream 0
    stream_id = pair.client_quic.get_next_available_stream_id()
    assert stream_id != relayquic.CONTROL_STREAM
    pair.client_quic.send_stream_data(stream_id, b"not here")
    pair.client.transmit()
    pair.loop.run(0.1)
    assert pair.server_events.bad_streams == [stream_id]
    assert bytes(pair.server_events.stream) == rw.encode(rw.HELLO, rw.MAGIC)


def test_fin_on_stream_0_is_reported(pair: Pair) -> None:
    pair.connect()
    pair.client_quic.send_stream_data(relayquic.CONTROL_STREAM, b"last", end_stream=True)
    pair.client.transmit()
    pair.loop.run(0.1)
    assert bytes(pair.server_events.stream) == b"last"
    assert pair.server_events.fin


def test_a_stopped_driver_hands_nothing_on(pair: Pair) -> None:
    pair.connect()
    assert pair.client.send_frame(rw.encode(rw.HELLO, rw.MAGIC))  # opens stream 0
    pair.loop.run(0.1)
    pair.client.stop()
    before = pair.client_sends
    assert pair.client.queue_packet(rw.SEND, KEY, b"x")  # queued in aioquic, never sent
    assert pair.server.send_frame(rw.encode(rw.PING, bytes(8)))
    pair.loop.run(1.0)
    assert pair.client_sends == before
    assert not pair.client_events.stream
    assert not pair.client_events.lost
    assert pair.loop.driver_timers() <= 1  # the relay's only
