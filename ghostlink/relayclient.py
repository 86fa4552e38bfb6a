"""One authenticated connection from this node to one ghost relay region (QUIC, else TLS over TCP).

Speaks :mod:`ghostcore.relaywire` (read its docstring for the frames and the auth):

* **QUIC** (RFC 9000 via aioquic's sans-IO ``QuicConnection``, ALPN ``ghostrelay``): control frames on the
  client's first bidirectional stream (id 0), SEND as DATAGRAM frames (RFC 9221) when they fit one packet,
  else as SEND frames on stream 0 (so a full-size WireGuard packet still crosses a 1500-byte path);
* **TLS over TCP** on the region's ``tcp_port`` when QUIC does not complete its handshake within
  ``QUIC_CONNECT_TIMEOUT`` (UDP blocked, or no QUIC port): every frame on the one byte stream.

The relay's certificate is self-signed and not verified (documented in notes/issue3.md: payloads are
WireGuard-encrypted end to end and auth is a challenge-response over a fresh challenge, so a man in the
middle learns nothing reusable).

Handshake: HELLO -> CHALLENGE -> AUTH (``relaywire.encode_auth`` with the node key, the map's expiry and
relay token) -> AUTH_OK. Then PING every ``PING_INTERVAL``; the RTT (ms, smoothed) is what the proxy picks
the home region by; no PONG for ``DEAD_AFTER`` seconds means the connection is dead (a killed ghostgate
is noticed within ~2 s even when no FIN / ICMP arrives) and it is reconnected with
:class:`ghostcore.aio.Backoff` (jittered, delay bounded by ``BACKOFF_MAX``; a daemon retries for as long as
it runs). Every (re)connect tries QUIC first.

Speed (issue 3: relayed paths uvloop-class, never blocking): the QUIC edge is a non-blocking connected UDP
socket read with ``loop.add_reader`` and drained in batches; transmits are coalesced into one
``datagrams_to_send`` per loop iteration (``call_soon``); no per-datagram futures or tasks. ``send()`` never
waits: it drops and counts when not connected or when aioquic's datagram queue / stream buffer or the TLS
write buffer is over its limit. Credentials are kept out of reprs and logs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
import struct
import time
from collections import Counter
from collections.abc import Callable
from typing import cast

from aioquic.quic import events
from aioquic.quic.connection import QuicConnection

from ghostcore import relayquic
from ghostcore import relaywire as rw
from ghostcore.aio import Backoff

log = logging.getLogger(__name__)

PING_INTERVAL = 0.5
DEAD_AFTER = 2.0
QUIC_CONNECT_TIMEOUT = 1.0
TCP_CONNECT_TIMEOUT = 3.0
AUTH_TIMEOUT = 3.0
BACKOFF_INITIAL = 0.2
BACKOFF_MAX = 5.0
MAX_TCP_BUFFER = 1 << 20
_BATCH = 64
_SOCKET_BUFFER = 1 << 20
_RTT_ALPHA = 0.3  # EWMA weight of a new RTT sample (smooth enough for the sticky home choice)
_PING = struct.Struct("!Q")


class _Link:
    """One transport connection; the client feeds its bytes in and gets ``lost`` once."""

    kind = ""

    def send_frame(self, data: bytes) -> None:
        raise NotImplementedError

    def send_packet(self, dst: bytes, packet: bytes) -> bool:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class _QuicLink(_Link):
    """aioquic's sans-IO connection over a non-blocking connected UDP socket (add_reader, batched)."""

    kind = "quic"

    def __init__(
        self,
        sock: socket.socket,
        *,
        addr: tuple[str, int],
        server_name: str,
        on_stream: Callable[[bytes], None],
        on_datagram: Callable[[bytes], None],
        on_lost: Callable[[str], None],
        on_ready: Callable[[], None],
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._sock = sock
        self._addr = addr
        self._on_stream = on_stream
        self._on_datagram = on_datagram
        self._on_lost = on_lost
        self._on_ready = on_ready
        config = relayquic.configuration(
            is_client=True,
            verify_mode=ssl.CERT_NONE,  # self-signed relay certificate: see the module docstring
            server_name=server_name,
        )
        self._quic = QuicConnection(configuration=config)
        relayquic.use_tick_pacer(self._quic)
        self._closed = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._tx_pending = False
        self._loop.add_reader(sock.fileno(), self._on_readable)
        self._quic.connect(addr, now=time.monotonic())
        self._transmit()

    def _on_readable(self) -> None:
        now = time.monotonic()
        for _ in range(_BATCH):
            try:
                data = self._sock.recv(65535)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:  # ECONNREFUSED: ICMP port unreachable, nobody serves QUIC there
                self._lose(f"quic: {exc.strerror or exc}")
                return
            self._quic.receive_datagram(data, self._addr, now)
        self._process()
        self._transmit()

    def _process(self) -> None:
        while (event := self._quic.next_event()) is not None:
            if isinstance(event, events.DatagramFrameReceived):
                self._on_datagram(event.data)
            elif isinstance(event, events.StreamDataReceived):
                if event.stream_id == 0 and event.data:
                    self._on_stream(event.data)
            elif isinstance(event, events.HandshakeCompleted):
                self._on_ready()
            elif isinstance(event, events.ConnectionTerminated):
                self._lose(f"quic: closed by the relay ({event.reason_phrase or event.error_code})")
                return
            if self._closed:
                return

    def _transmit_soon(self) -> None:
        if not self._tx_pending:
            self._tx_pending = True
            self._loop.call_soon(self._transmit)

    def _transmit(self) -> None:
        self._tx_pending = False
        if self._closed:
            return
        now = time.monotonic()
        for data, _ in self._quic.datagrams_to_send(now):
            try:
                self._sock.send(data)
            except (BlockingIOError, InterruptedError):
                break  # the socket buffer is full: QUIC recovers what was lost
            except OSError as exc:
                self._lose(f"quic: {exc.strerror or exc}")
                return
        when = self._quic.get_timer()
        if when is None:
            return
        if self._timer is not None:
            if self._timer_at == when:
                return
            self._timer.cancel()
        self._timer_at = when
        self._timer = self._loop.call_later(max(0.0, when - now), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        if self._closed:
            return
        self._quic.handle_timer(time.monotonic())
        self._process()
        self._transmit()

    def send_frame(self, data: bytes) -> None:
        if self._closed:
            return
        self._quic.send_stream_data(relayquic.CONTROL_STREAM, data)
        self._transmit_soon()

    def send_packet(self, dst: bytes, packet: bytes) -> bool:
        if self._closed or not relayquic.queue_packet(self._quic, rw.SEND, dst, packet):
            return False
        self._transmit_soon()
        return True

    def _lose(self, reason: str) -> None:
        if self._closed:
            return
        self._teardown()
        self._on_lost(reason)

    def _teardown(self) -> None:
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_reader(self._sock.fileno())
        self._sock.close()

    def close(self) -> None:
        if self._closed:
            return
        self._quic.close(reason_phrase="bye")
        with contextlib.suppress(OSError):
            for data, _ in self._quic.datagrams_to_send(time.monotonic()):
                self._sock.send(data)
        self._teardown()


class _TlsLink(_Link, asyncio.Protocol):
    """The relay over one TLS byte stream (asyncio Protocol: writes go into the transport's buffer)."""

    kind = "tcp"

    def __init__(self, on_stream: Callable[[bytes], None], on_lost: Callable[[str], None]) -> None:
        self._on_stream = on_stream
        self._on_lost = on_lost
        self._transport: asyncio.Transport | None = None
        self._closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if not self._closed:
            self._on_stream(data)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._closed:
            self._closed = True
            self._on_lost(f"tcp: {exc or 'closed by the relay'}")

    def send_frame(self, data: bytes) -> None:
        if self._transport is not None and not self._closed:
            self._transport.write(data)

    def send_packet(self, dst: bytes, packet: bytes) -> bool:
        t = self._transport
        if t is None or self._closed or t.get_write_buffer_size() > MAX_TCP_BUFFER:
            return False
        t.write(rw.encode(rw.SEND, dst + packet))
        return True

    def close(self) -> None:
        self._closed = True
        if self._transport is not None:
            self._transport.abort()


def _client_tls() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # self-signed relay certificate: see the module docstring
    ctx.set_alpn_protocols([relayquic.ALPN])
    return ctx


class RelayClient:
    """A connection to one relay region, kept up until :meth:`close`. See the module docstring.

    ``on_recv(src_key, packet)`` gets every RECV; ``on_state()`` is called when ``alive`` changes and on
    every RTT sample.
    """

    def __init__(
        self,
        *,
        name: str,
        host: str,
        quic_port: int,
        tcp_port: int,
        node_key: bytes,
        expiry: int,
        token: bytes,
        on_recv: Callable[[bytes, bytes], None],
        on_state: Callable[[], None] | None = None,
        on_gone: Callable[[bytes], None] | None = None,
    ) -> None:
        self.name = name
        self.host = host
        self.quic_port = quic_port
        self.tcp_port = tcp_port
        self._key = node_key
        self._expiry = expiry
        self._token = token
        self.on_recv = on_recv
        self.on_state = on_state
        self.on_gone = on_gone  # PEER_GONE: that node key is not connected to this relay (yet)
        self.counters: Counter[str] = Counter()
        self.transport = ""
        self.rtt_ms = -1.0
        self.alive = False
        self._loop = asyncio.get_running_loop()
        self._link: _Link | None = None
        self._reader = rw.FrameReader()
        self._authed = False
        self._stage: asyncio.Future[str] | None = None
        self._hello_at = 0.0
        self._last_pong = 0.0
        self._pings: dict[int, float] = {}
        self._ping_timer: asyncio.TimerHandle | None = None
        self._lost = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._backoff = Backoff(initial=BACKOFF_INITIAL, maximum=BACKOFF_MAX)

    def __repr__(self) -> str:  # the token stays out
        return f"RelayClient({self.name!r}, {self.host}, transport={self.transport!r}, alive={self.alive})"

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"relay-{self.name}")

    def set_auth(self, node_key: bytes, expiry: int, token: bytes) -> None:
        """New credentials. A new node key reconnects now (the relay routes by key); new credentials for the
        same key are used from the next connect on, because the relay checks expiry only at AUTH."""
        rekey = node_key != self._key
        self._key, self._expiry, self._token = node_key, expiry, token
        if rekey and self._link is not None:
            self._drop("node key changed")
            self._backoff.reset()

    # ----- sending

    def send(self, dst_key: bytes, packet: bytes) -> bool:
        """Queue ``packet`` for ``dst_key`` without waiting; False (dropped, counted) when not possible."""
        link = self._link
        if link is None or not self.alive:
            self.counters["drop_not_connected"] += 1
            return False
        if not link.send_packet(dst_key, packet):
            self.counters["drop_buffer"] += 1
            return False
        self.counters["sent"] += 1
        return True

    # ----- connection life

    async def _run(self) -> None:
        while True:
            reason = await self._connect_once()
            if reason:
                log.debug("relay %s: %s", self.name, reason)
            await asyncio.sleep(self._backoff.next())

    async def _connect_once(self) -> str:
        """One connect + authenticate + serve-until-lost; returns why it ended."""
        self._lost.clear()
        self._reader = rw.FrameReader()
        self._authed = False
        ok = False
        if self.quic_port:
            ok = await self._open_quic()
        if not ok and self.tcp_port:
            ok = await self._open_tcp()
        if not ok:
            self._drop("")
            return "no transport connected"
        self._lost.clear()
        stage: asyncio.Future[str] = self._loop.create_future()
        self._stage = stage
        self._hello_at = time.monotonic()
        link = self._link
        if link is None:
            return "dropped while connecting"
        link.send_frame(rw.encode(rw.HELLO, rw.MAGIC))
        try:
            err = await asyncio.wait_for(stage, AUTH_TIMEOUT)
        except TimeoutError:
            err = "authentication timed out"
        if err:
            self._drop("")
            return err
        self._authed = True
        self.alive = True
        self._last_pong = time.monotonic()
        self._backoff.reset()
        log.info("relay %s: connected over %s, rtt %.1f ms", self.name, self.transport, self.rtt_ms)
        self._ping_timer = self._loop.call_later(PING_INTERVAL, self._ping)
        self._notify()
        await self._lost.wait()
        return "connection lost"

    async def _open_quic(self) -> bool:
        try:
            infos = await self._loop.getaddrinfo(self.host, self.quic_port, type=socket.SOCK_DGRAM)
        except OSError:
            return False
        family, _, _, _, addr = infos[0]
        sock = socket.socket(family, socket.SOCK_DGRAM)
        ready = self._loop.create_future()
        try:
            sock.setblocking(False)
            for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):  # bursts of WireGuard packets, not a trickle
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, opt, _SOCKET_BUFFER)
            sock.connect(addr)
        except OSError:
            sock.close()
            return False

        def on_ready() -> None:
            if not ready.done():
                ready.set_result(True)

        def on_lost(reason: str) -> None:
            if not ready.done():
                ready.set_result(False)  # still connecting: TCP is tried next
            elif self._link is link:
                self._on_lost(reason)

        link = _QuicLink(
            sock,
            addr=(str(addr[0]), int(addr[1])),
            server_name=self.host,
            on_stream=self._on_bytes,
            on_datagram=self._on_datagram,
            on_lost=on_lost,
            on_ready=on_ready,
        )
        self._link = link
        try:
            ok = await asyncio.wait_for(ready, QUIC_CONNECT_TIMEOUT)
        except TimeoutError:
            ok = False
        if not ok:
            self._link = None
            link.close()
            self.counters["quic_failed"] += 1
            return False
        self.transport = "quic"
        return True

    async def _open_tcp(self) -> bool:
        link = _TlsLink(self._on_bytes, self._on_lost)
        try:
            await asyncio.wait_for(
                self._loop.create_connection(
                    lambda: link, self.host, self.tcp_port, ssl=_client_tls(), server_hostname=self.host
                ),
                TCP_CONNECT_TIMEOUT,
            )
        except (OSError, TimeoutError, ssl.SSLError):
            self.counters["tcp_failed"] += 1
            return False
        self._link = link
        self.transport = "tcp"
        return True

    def _on_lost(self, reason: str) -> None:
        self._drop(reason or "lost")

    def _drop(self, reason: str) -> None:
        """Forget the current connection (closing it) and wake the reconnect loop."""
        if self._stage is not None and not self._stage.done():
            self._stage.set_result(reason or "dropped")
        link, self._link = self._link, None
        if link is not None:
            link.close()
        if self._ping_timer is not None:
            self._ping_timer.cancel()
            self._ping_timer = None
        was = self.alive
        self.alive = False
        self.transport = ""
        self._authed = False
        self._pings.clear()
        self._lost.set()
        if was:
            log.info("relay %s: down (%s)", self.name, reason)
            self._notify()

    def _notify(self) -> None:
        if self.on_state is not None:
            self.on_state()

    # ----- frames in

    def _on_bytes(self, data: bytes) -> None:
        try:
            frames = self._reader.feed(data)
        except rw.RelayProtocolError as exc:
            self.counters["malformed"] += 1
            self._on_lost(str(exc))
            return
        for f in frames:
            self._frame(f)
            if self._link is None:
                return

    def _on_datagram(self, data: bytes) -> None:
        try:
            ftype, key, packet = rw.decode_datagram(data)
        except rw.RelayProtocolError:
            self.counters["malformed"] += 1
            return
        if ftype == rw.RECV and self._authed:
            self.counters["recv"] += 1
            self.on_recv(key, packet)
        else:
            self.counters["unexpected"] += 1

    def _frame(self, f: rw.Frame) -> None:
        stage = self._stage
        if f.type == rw.RECV and self._authed:
            if len(f.payload) < rw.KEY_LEN:
                self.counters["malformed"] += 1
                return
            key, packet = rw.split_keyed(f.payload)
            self.counters["recv"] += 1
            self.on_recv(key, packet)
        elif f.type == rw.PONG:
            self._pong(f.payload)
        elif f.type == rw.PING:
            if self._link is not None:
                self._link.send_frame(rw.encode(rw.PONG, f.payload))
        elif f.type == rw.PEER_GONE:
            self.counters["peer_gone"] += 1
            if self.on_gone is not None and len(f.payload) == rw.KEY_LEN:
                self.on_gone(f.payload)
        elif f.type == rw.CHALLENGE and stage is not None and not stage.done():
            self.rtt_ms = (time.monotonic() - self._hello_at) * 1000.0  # first sample: the handshake
            if len(f.payload) != rw.CHALLENGE_LEN or self._link is None:
                stage.set_result("relay sent a malformed CHALLENGE")
                return
            self._link.send_frame(
                rw.encode(rw.AUTH, rw.encode_auth(self._key, self._expiry, self._token, f.payload))
            )
        elif f.type == rw.AUTH_OK and stage is not None and not stage.done():
            stage.set_result("")
        elif f.type == rw.ERROR:
            reason = f.payload.decode(errors="replace")[:200]
            self.counters["error"] += 1
            log.warning("relay %s: refused: %s", self.name, reason)
            if stage is not None and not stage.done():
                stage.set_result(f"relay error: {reason}")
            else:
                self._drop(reason)
        else:
            self.counters["unexpected"] += 1

    # ----- liveness

    def _ping(self) -> None:
        self._ping_timer = None
        if self._link is None or not self.alive:
            return
        now = time.monotonic()
        if now - self._last_pong > DEAD_AFTER:
            self.counters["dead"] += 1
            self._drop(f"no PONG for {DEAD_AFTER:g} s")
            return
        seq = int.from_bytes(os.urandom(8), "big")
        if len(self._pings) > 16:
            self._pings.clear()
        self._pings[seq] = now
        self._link.send_frame(rw.encode(rw.PING, _PING.pack(seq)))
        self._ping_timer = self._loop.call_later(PING_INTERVAL, self._ping)

    def _pong(self, payload: bytes) -> None:
        if len(payload) != _PING.size:
            self.counters["malformed"] += 1
            return
        sent = self._pings.pop(_PING.unpack(payload)[0], None)
        if sent is None:
            return
        now = time.monotonic()
        self._last_pong = now
        sample = (now - sent) * 1000.0
        self.rtt_ms = sample if self.rtt_ms < 0 else (1 - _RTT_ALPHA) * self.rtt_ms + _RTT_ALPHA * sample
        self._notify()

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._drop("closed")
