"""One authenticated connection from this node to one ghost relay region, kept up until closed.

Speaks :mod:`ghostcore.relaywire` (read its docstring for the frames and the auth) over a
:mod:`ghostlink.traversal.relaylink` transport: QUIC preferred, TLS over TCP on the region's ``tcp_port``
raced against it (RFC 8305's "Happy Eyeballs", §5: the second attempt starts ``TCP_HEAD_START`` after the
first, not after the first gave up). QUIC done within its head start wins outright (any network passing
UDP); a QUIC handshake that cannot complete (UDP blocked) no longer costs its whole
``QUIC_CONNECT_TIMEOUT`` before TCP is even tried, which is what a UDP-blocked node's first relayed
packet used to wait for. When both connect, QUIC is kept and TCP closed.

Handshake: the transport's certificate is checked against the region's pin (:mod:`ghostlink.traversal
.relaylink`), then HELLO -> CHALLENGE -> AUTH (``relaywire.encode_auth``: the map's expiry and relay token,
and a proof made with the private half of the node key the token is bound to, which the node's
:class:`ghostlink.nodekey.NodeKey` holds, also for the key a half-done rotation replaced) -> AUTH_OK. Then
PING every ``PING_INTERVAL``; the RTT (ms, smoothed) is what the proxy picks the home region by; no PONG for
``DEAD_AFTER`` seconds means the connection is dead (a killed ghostgate is noticed within ~2 s even when no
FIN / ICMP arrives) and it is reconnected with :class:`ghostcore.aio.Backoff` (jittered, delay bounded by
``BACKOFF_MAX``; a daemon retries for as long as it runs). Every (re)connect tries QUIC first.

Speed (relayed paths must keep up on uvloop and never block the loop): ``send()`` never waits: it drops and
counts when not connected or when aioquic's datagram queue / stream buffer or the TLS write buffer is over
its limit. Credentials are kept out of reprs and logs.
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

from ghostcore import relaywire as rw
from ghostcore.aio import Backoff
from ghostcore.errors import InvalidArgument
from ghostcore.keys import PublicKey
from ghostlink.nodekey import NodeKey
from ghostlink.traversal.relaylink import PIN_MISMATCH, Link, QuicLink, TlsLink, client_tls

log = logging.getLogger(__name__)

PING_INTERVAL = 0.5
DEAD_AFTER = 2.0
QUIC_CONNECT_TIMEOUT = 1.0
TCP_HEAD_START = 0.15  # QUIC's head start (RFC 8305 §5 suggests 250 ms, and 100 ms at the least)
TCP_CONNECT_TIMEOUT = 3.0
AUTH_TIMEOUT = 3.0
BACKOFF_INITIAL = 0.2
BACKOFF_MAX = 5.0
_SOCKET_BUFFER = 1 << 20
_RTT_ALPHA = 0.3  # EWMA weight of a new RTT sample (smooth enough for the sticky home choice)
_PING = struct.Struct("!Q")


def _link_of(task: asyncio.Task[QuicLink | None] | asyncio.Task[TlsLink | None]) -> Link | None:
    """The link a finished connect attempt made (None: still running, cancelled, failed or refused)."""
    if task.done() and not task.cancelled() and task.exception() is None:
        return task.result()
    return None


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
        tls_pin: bytes,
        keys: NodeKey,
        node_key: bytes,
        relay_static: bytes,
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
        self._pin = tls_pin
        self._keys = keys
        self._key = node_key
        self._relay_static = relay_static
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
        self._link: Link | None = None
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
        self._stray: set[asyncio.Task[TlsLink | None]] = set()  # losing TLS attempts, closed once done

    def __repr__(self) -> str:  # the token stays out
        return f"RelayClient({self.name!r}, {self.host}, transport={self.transport!r}, alive={self.alive})"

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"relay-{self.name}")

    def set_auth(self, node_key: bytes, relay_static: bytes, expiry: int, token: bytes) -> None:
        """New credentials. A new node key reconnects now (the relay routes by key); new credentials for the
        same key are used from the next connect on, because the relay checks expiry only at AUTH."""
        rekey = node_key != self._key
        self._key, self._relay_static, self._expiry, self._token = node_key, relay_static, expiry, token
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
        link = await self._open()
        if link is None:
            self._drop("")
            return "no transport connected"
        self._link = link
        self.transport = "quic" if isinstance(link, QuicLink) else "tcp"
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

    async def _open(self) -> Link | None:
        """The first transport to connect (see the module docstring), or None."""
        if not self.quic_port:
            return await self._open_tcp() if self.tcp_port else None
        quic = asyncio.create_task(self._open_quic())
        try:
            await asyncio.wait({quic}, timeout=TCP_HEAD_START)
        except asyncio.CancelledError:  # closing: asyncio.wait leaves the attempt running
            quic.cancel()
            raise
        if not self.tcp_port or (quic.done() and quic.result() is not None):
            return await quic
        tcp = asyncio.create_task(self._open_tcp())
        chosen: Link | None = None
        try:
            await asyncio.wait({quic, tcp}, return_when=asyncio.FIRST_COMPLETED)
            if quic.done() and quic.result() is None:
                await tcp  # QUIC gave up: TCP is the answer, whatever it is
            elif tcp.done() and tcp.result() is None:
                await quic
            # QUIC first: when both are connected, it is the one kept
            chosen = next((t.result() for t in (quic, tcp) if t.done() and t.result() is not None), None)
            return chosen
        finally:  # the loser: a connected one is closed, a QUIC attempt still running is stopped
            if not quic.done():
                quic.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await quic
            if not tcp.done():
                # A TLS handshake in flight is left to finish (TCP_CONNECT_TIMEOUT bounds it) and closed
                # then: cancelling it mid-handshake makes uvloop's SSL protocol write to the transport
                # the cancellation closed, and log a "Fatal error on SSL protocol" with its trace.
                self._stray.add(tcp)
                tcp.add_done_callback(self._close_stray)
            for task in (quic, tcp):
                link = _link_of(task)
                if link is not None and link is not chosen:
                    link.close()

    def _close_stray(self, task: asyncio.Task[TlsLink | None]) -> None:
        self._stray.discard(task)
        link = _link_of(task)
        if link is not None:
            link.close()

    async def _open_quic(self) -> QuicLink | None:
        try:
            infos = await self._loop.getaddrinfo(self.host, self.quic_port, type=socket.SOCK_DGRAM)
        except OSError:
            return None
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
            return None

        def on_ready() -> None:
            if not ready.done():
                ready.set_result(True)

        def on_lost(reason: str) -> None:
            if not ready.done():
                ready.set_result(False)  # still connecting: TCP is tried next
            elif self._link is link:
                self._on_lost(reason)

        link = QuicLink(
            sock,
            addr=(str(addr[0]), int(addr[1])),
            server_name=self.host,
            pin=self._pin,
            on_stream=self._on_bytes,
            on_datagram=self._on_datagram,
            on_lost=on_lost,
            on_ready=on_ready,
        )
        try:
            ok = await asyncio.wait_for(ready, QUIC_CONNECT_TIMEOUT)
        except TimeoutError:
            ok = False
        except asyncio.CancelledError:  # TCP won the race
            link.close()
            raise
        if not ok:
            link.close()
            self.counters["quic_failed"] += 1
            log.debug(
                "relay %s: quic to %s:%d did not complete its handshake", self.name, self.host, self.quic_port
            )
            if link.pin_refused:
                self._pin_refused("quic")
            return None
        return link

    async def _open_tcp(self) -> TlsLink | None:
        def on_lost(reason: str) -> None:
            if self._link is link:
                self._on_lost(reason)

        link = TlsLink(self._pin, self._on_bytes, on_lost)
        try:
            await asyncio.wait_for(
                self._loop.create_connection(
                    lambda: link, self.host, self.tcp_port, ssl=client_tls(), server_hostname=self.host
                ),
                TCP_CONNECT_TIMEOUT,
            )
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            self.counters["tcp_failed"] += 1
            log.debug("relay %s: tcp to %s:%d: %s", self.name, self.host, self.tcp_port, exc or "timed out")
            return None
        if not link.pinned:
            self.counters["tcp_failed"] += 1
            self._pin_refused("tcp")
            return None
        return link

    def _pin_refused(self, transport: str) -> None:
        self.counters["pin_mismatch"] += 1
        log.warning(
            "relay %s: %s over %s (a man in the middle, or a relay with another key)",
            self.name,
            PIN_MISMATCH,
            transport,
        )

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

    def _auth(self, challenge: bytes) -> bytes | None:
        """The AUTH payload for ``challenge``; None when the holder has no private half for the map's key."""
        private = self._keys.private_for(self._key)
        if private is None:
            return None
        try:
            return rw.encode_auth(
                private, PublicKey(self._relay_static), self._expiry, self._token, challenge
            )
        except InvalidArgument:  # a low-order relay key (admission refuses a malformed one)
            return None

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
            auth = self._auth(f.payload)
            if auth is None:
                self.counters["no_private_key"] += 1
                stage.set_result(
                    "cannot authenticate: no private key for the map's node key, or a bad relay key"
                )
                return
            self._link.send_frame(rw.encode(rw.AUTH, auth))
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
        if self._stray:  # a losing TLS attempt still in its handshake: let it end (see _open), bounded
            await asyncio.wait(set(self._stray), timeout=TCP_CONNECT_TIMEOUT)
            for stray in list(self._stray):
                stray.cancel()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._drop("closed")
