"""This node's TURN allocation (RFC 8656) over UDP, built on aioice's TURN client.

aioice's ``TurnClientUdpProtocol`` does the STUN transactions: Allocate with long-term credentials
(RFC 8489 §9.2: the 401 -> REALM/NONCE -> retry dance, 438 stale nonce), the allocation's own Refresh loop
(at 5/6 of its LIFETIME; a failed Refresh closes the transport, which we notice as ``alive = False``),
ChannelBind, and the demultiplexing of ChannelData / Data indications back to a peer address. The
credentials are the map's TURN REST ones (``"<expiry>:<node id>"`` / HMAC password), which both ghostgate
and coturn (``use-auth-secret``) accept.

What we do not take from aioice, and why:

* ``TurnTransport.sendto`` spawns a task per datagram; a relayed WireGuard path needs better, so once a
  peer's channel is bound, :meth:`TurnClient.sendto` writes the ChannelData message (RFC 8656 §12.4) itself,
  straight into the UDP transport. Until then a few packets wait for the binding (bounded).
* aioice refreshes a channel only when something is sent after ``channel_refresh_time``, but a permission
  lasts 300 s (RFC 8656 §9) while a channel lasts 600 s (§12): the permission would lapse under an idle or
  receive-only peer. :meth:`add_peer` binds a channel at once (so the peer's packets are let in before we
  ever send) and a ticker re-binds every ``REBIND_INTERVAL`` (a ChannelBind refreshes the permission too).

* asyncio's own UDP transport reads one datagram per event-loop iteration; :class:`_UdpTransport` (what
  aioice's protocol is given instead) drains the socket in batches from ``loop.add_reader``, as ghostgate's
  server does, so the stock loop keeps up too (bench/link_relay.py).

Closing deletes the allocation (Refresh with LIFETIME 0, bounded by aioice's retransmissions).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import time
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

from aioice import stun
from aioice.turn import CHANNEL_NUMBER_MAX, TurnClientUdpProtocol

from ghostcore.addr import HostPort, format_endpoint
from ghostcore.errors import Unavailable

log = logging.getLogger(__name__)

LIFETIME = 600  # requested allocation lifetime (s); aioice refreshes at 5/6 of what the server grants
REBIND_INTERVAL = 240.0  # < the 300 s permission lifetime (RFC 8656 §9)
ALLOCATE_TIMEOUT = 5.0
MAX_WAITING = 32  # packets per peer waiting for its channel binding
_CHANNEL = struct.Struct("!HH")
_SOCKET_BUFFER = 1 << 20
_BATCH = 64


class _UdpTransport(asyncio.DatagramTransport):
    """A connected non-blocking UDP socket for aioice's protocol: batched reads, sends that never wait (a
    full socket buffer drops the datagram, as the network would)."""

    def __init__(self, sock: socket.socket, protocol: asyncio.DatagramProtocol, peer: HostPort) -> None:
        super().__init__()
        self._loop = asyncio.get_running_loop()
        self._sock = sock
        self._protocol = protocol
        self._peer = peer
        self._closing = False
        self.dropped = 0
        self._loop.add_reader(sock.fileno(), self._read)
        protocol.connection_made(self)

    def _read(self) -> None:
        for _ in range(_BATCH):
            try:
                data = self._sock.recv(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # ICMP errors queued on the socket
                self._protocol.error_received(exc)
                continue
            self._protocol.datagram_received(data, self._peer)
            if self._closing:
                return

    def sendto(self, data: bytes | bytearray | memoryview, addr: Any = None) -> None:
        if self._closing:
            return
        try:
            self._sock.send(data)
        except (BlockingIOError, InterruptedError):
            self.dropped += 1
        except OSError as exc:
            self._protocol.error_received(exc)

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._loop.remove_reader(self._sock.fileno())
        self._sock.close()
        self._loop.call_soon(self._protocol.connection_lost, None)

    def abort(self) -> None:
        self.close()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "socket":
            return self._sock
        if name == "peername":
            return self._peer
        if name == "sockname" and not self._closing:
            return self._sock.getsockname()
        return default


class _Receiver(asyncio.DatagramProtocol):
    """aioice's ``receiver``: relayed data from peers, and the end of the allocation."""

    def __init__(self, owner: TurnClient) -> None:
        self._owner = owner

    def datagram_received(self, data: bytes, addr: HostPort) -> None:
        self._owner.counters["recv"] += 1
        self._owner.on_recv(data, (addr[0], addr[1]))

    def connection_lost(self, exc: Exception | None) -> None:
        self._owner._lost()


class TurnClient:
    """One allocation on one TURN server; make it with :meth:`allocate`."""

    def __init__(
        self,
        proto: TurnClientUdpProtocol,
        relayed: HostPort,
        on_recv: Callable[[bytes, HostPort], None],
        on_lost: Callable[[], None] | None,
    ) -> None:
        self._proto = proto
        self.relayed_addr = relayed
        self.relayed = format_endpoint(*relayed)
        self.on_recv = on_recv
        self.on_lost = on_lost
        self.alive = True
        self.counters: Counter[str] = Counter()
        self._waiting: dict[HostPort, deque[bytes]] = {}
        self._binding: dict[HostPort, asyncio.Task[None]] = {}
        self._bound_at: dict[HostPort, float] = {}
        self._ticker = asyncio.create_task(self._rebind_loop())

    def __repr__(self) -> str:
        return f"TurnClient(relayed={self.relayed!r}, alive={self.alive})"

    @classmethod
    async def allocate(
        cls,
        server: HostPort,
        username: str,
        password: str,
        *,
        on_recv: Callable[[bytes, HostPort], None],
        on_lost: Callable[[], None] | None = None,
        lifetime: int = LIFETIME,
    ) -> TurnClient:
        """Allocate a UDP relayed address on ``server``; Unavailable when it cannot be done."""
        loop = asyncio.get_running_loop()
        try:  # the region's host may be a name
            infos = await loop.getaddrinfo(server[0], server[1], type=socket.SOCK_DGRAM)
        except OSError as exc:
            raise Unavailable(f"TURN server {format_endpoint(*server)}: cannot resolve: {exc}") from None
        family, _, _, _, sockaddr = infos[0]
        server = (str(sockaddr[0]), int(sockaddr[1]))
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _SOCKET_BUFFER)
            sock.connect(server)
        except OSError as exc:
            sock.close()
            raise Unavailable(f"TURN server {format_endpoint(*server)}: {exc.strerror}") from None
        proto = TurnClientUdpProtocol(
            server,
            username=username,
            password=password,
            lifetime=lifetime,
            channel_refresh_time=int(REBIND_INTERVAL),
        )
        transport = _UdpTransport(sock, proto, server)
        try:
            relayed = await asyncio.wait_for(proto.connect(), ALLOCATE_TIMEOUT)
        except (TimeoutError, ConnectionError, stun.TransactionError) as exc:
            transport.close()
            raise Unavailable(f"TURN allocation on {format_endpoint(*server)} failed: {exc}") from None
        except BaseException:
            transport.close()
            raise
        client = cls(proto, (relayed[0], relayed[1]), on_recv, on_lost)
        proto.receiver = _Receiver(client)
        log.info("TURN allocation %s on %s", client.relayed, format_endpoint(*server))
        return client

    # ----- peers and sending

    def add_peer(self, peer: HostPort) -> None:
        """Bind a channel to ``peer`` now (and keep it bound), so its packets are let in (RFC 8656 §9)."""
        if self.alive and peer not in self._proto.peer_to_channel and peer not in self._binding:
            self._start_bind(peer)

    def remove_peer(self, peer: HostPort) -> None:
        """Stop refreshing ``peer``'s binding (it lapses on the server; channels cannot be deleted)."""
        self._bound_at.pop(peer, None)
        self._waiting.pop(peer, None)

    def sendto(self, packet: bytes, peer: HostPort) -> bool:
        """Relay ``packet`` to ``peer`` without waiting; False (dropped, counted) when it cannot go now."""
        if not self.alive:
            self.counters["drop_not_allocated"] += 1
            return False
        channel = self._proto.peer_to_channel.get(peer)
        if channel is not None and peer in self._bound_at:
            # ChannelData (RFC 8656 §12.4): channel number, length, data; over UDP no padding is needed
            self._proto.transport.sendto(_CHANNEL.pack(channel, len(packet)) + packet)
            self.counters["sent"] += 1
            return True
        queue = self._waiting.setdefault(peer, deque(maxlen=MAX_WAITING))
        if len(queue) == MAX_WAITING:
            self.counters["drop_waiting"] += 1
        queue.append(packet)
        if peer not in self._binding:
            self._start_bind(peer)
        return True

    def _start_bind(self, peer: HostPort) -> None:
        task = asyncio.create_task(self._bind(peer))
        self._binding[peer] = task
        task.add_done_callback(lambda _t: self._binding.pop(peer, None))

    async def _bind(self, peer: HostPort) -> None:
        proto = self._proto
        channel = proto.peer_to_channel.get(peer)
        if channel is None:
            if proto.channel_number > CHANNEL_NUMBER_MAX:
                self.counters["no_channel"] += 1
                self._waiting.pop(peer, None)
                return
            channel = proto.channel_number
            proto.channel_number += 1
        try:
            await proto.channel_bind(channel, peer)
        except (ConnectionError, stun.TransactionError, OSError) as exc:
            self.counters["bind_failed"] += 1
            self._waiting.pop(peer, None)
            log.info("TURN channel bind to %s failed: %s", format_endpoint(*peer), exc)
            return
        # aioice's demultiplexer reads these maps for ChannelData and Data indications
        proto.channel_to_peer[channel] = peer
        proto.peer_to_channel[peer] = channel
        proto.channel_refresh_at[channel] = time.time() + REBIND_INTERVAL
        self._bound_at[peer] = time.monotonic()
        self.counters["bound"] += 1
        for packet in self._waiting.pop(peer, ()):
            self.sendto(packet, peer)

    async def _rebind_loop(self) -> None:
        while True:
            await asyncio.sleep(REBIND_INTERVAL / 8)
            now = time.monotonic()
            for peer, at in list(self._bound_at.items()):
                if now - at >= REBIND_INTERVAL and peer not in self._binding and self.alive:
                    self._start_bind(peer)

    # ----- end of life

    def _lost(self) -> None:
        if not self.alive:
            return
        self.alive = False
        log.info("TURN allocation %s lost", self.relayed)
        if self.on_lost is not None:
            self.on_lost()

    async def close(self) -> None:
        """Delete the allocation (Refresh LIFETIME=0) and close the socket."""
        self._ticker.cancel()
        tasks = [self._ticker, *self._binding.values()]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self.on_lost = None
        self.alive = False
        try:
            await asyncio.wait_for(self._proto.delete(), ALLOCATE_TIMEOUT)
        except (TimeoutError, ConnectionError, stun.TransactionError, OSError):
            self._proto.transport.close()
