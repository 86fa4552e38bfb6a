"""The TLS-over-TCP edge of the ghost relay, for hosts where UDP is blocked (issue 3: only TCP to the relay's
port gets through). Every relay frame (ghostcore.relaywire) travels on the one TLS byte stream.

An ``asyncio.Protocol`` (no streams, no awaits): ``data_received`` feeds the hub, and writes go straight into
the transport's buffer. A delivery to a client whose write buffer already holds ``MAX_WRITE_BUFFER`` bytes is
dropped (the hub counts ``dropped_slow``) rather than awaiting ``drain()``, so one slow reader never holds up
the others; a client that lets even control frames pile past ``MAX_CONTROL_BUFFER`` is aborted. TCP
keepalive (about a minute) finds peers that vanished without a FIN; a close that cannot flush is aborted
after ``CLOSE_GRACE`` seconds. Nothing here outlives its connection.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from typing import TYPE_CHECKING, cast

from ghostcore import relaywire as rw
from ghostcore.errors import Unavailable

if TYPE_CHECKING:
    from ghostgate.relay import RelayHub

MAX_WRITE_BUFFER = 1 << 20
MAX_CONTROL_BUFFER = 4 << 20
TLS_HANDSHAKE_TIMEOUT = 10.0
CLOSE_GRACE = 2.0
_KEEPALIVE = (("TCP_KEEPIDLE", 30), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 3))


class RelayTlsProtocol(asyncio.Protocol):
    """One TLS client connection; an :class:`ghostgate.relay.Edge`."""

    def __init__(self, hub: RelayHub) -> None:
        self._hub = hub
        self._transport: asyncio.Transport | None = None
        self._cid: int | None = None
        self._closing = False
        self._abort_handle: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            for name, value in _KEEPALIVE:
                if hasattr(socket, name):
                    sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)
        self._cid = self._hub.attach(self)

    def data_received(self, data: bytes) -> None:
        if self._cid is not None and not self._closing:
            self._hub.stream(self._cid, data)

    def eof_received(self) -> bool:
        return False  # the client is done: close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        if self._abort_handle is not None:
            self._abort_handle.cancel()
            self._abort_handle = None
        if self._cid is not None:
            self._hub.detach(self._cid)

    # ----- Edge

    def send_frame(self, data: bytes) -> None:
        t = self._transport
        if t is None or self._closing:
            return
        if t.get_write_buffer_size() > MAX_CONTROL_BUFFER:
            self._hub.counters["closed_slow"] += 1
            self._closing = True
            t.abort()
            return
        t.write(data)

    def deliver(self, src: bytes, packet: bytes) -> bool:
        t = self._transport
        if t is None or self._closing or t.get_write_buffer_size() > MAX_WRITE_BUFFER:
            return False
        t.write(rw.encode(rw.RECV, src + packet))
        return True

    def close_edge(self, reason: str) -> None:
        t = self._transport
        if t is None or self._closing:
            return
        self._closing = True
        t.close()  # flushes the ERROR frame first; a client that never reads is aborted after the grace
        self._abort_handle = asyncio.get_running_loop().call_later(CLOSE_GRACE, t.abort)


async def serve_tls(hub: RelayHub, host: str, port: int, ctx: ssl.SSLContext) -> asyncio.Server:
    """Listen on TCP ``host:port`` with TLS and serve the relay into ``hub`` until the server is closed."""
    loop = asyncio.get_running_loop()
    try:
        return await loop.create_server(
            lambda: RelayTlsProtocol(hub),
            host,
            port,
            ssl=ctx,
            ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT,
            reuse_address=True,
        )
    except OSError as exc:
        raise Unavailable(f"relay.tcp_port: cannot bind TCP {host}:{port}: {exc.strerror}") from None
