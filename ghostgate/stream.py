"""The TLS-over-TCP edge of the ghost relay, for hosts where UDP is blocked and only TCP to the relay's
port gets through. Every relay frame (ghostcore.relaywire) travels on the one TLS byte stream.

An ``asyncio.Protocol`` (no streams, no awaits): ``data_received`` feeds the hub, and writes go straight into
the transport's buffer. A delivery to a client whose write buffer already holds ``MAX_WRITE_BUFFER`` bytes is
dropped (the hub counts ``dropped_slow``) rather than awaiting ``drain()``, so one slow reader never holds up
the others; a client that lets even control frames pile past ``MAX_CONTROL_BUFFER`` is aborted. TCP
keepalive (about a minute) finds peers that vanished without a FIN; a close that cannot flush is aborted
after ``CLOSE_GRACE`` seconds. Nothing here outlives its connection.

The listener (:class:`TlsListener`) accepts plain TCP sockets itself and asks the hub to admit the source
address (the connection limits, :class:`ghostgate.relay_hub.Admission`) before the TLS handshake starts,
so a flood of connections costs neither handshakes nor file descriptors beyond the limits: a refused one is
closed at once. An admitted socket is handed to ``loop.connect_accepted_socket`` with TLS, which runs the
handshake (bounded by ``TLS_HANDSHAKE_TIMEOUT``) and then gives it to :class:`RelayTlsProtocol`. Upgrading
an accepted transport with ``loop.start_tls`` instead loses most server-side handshakes on uvloop 0.23 (the
ClientHello is never answered), which is why the accept is ours.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from typing import cast

from ghostcore import relaywire as rw
from ghostcore.errors import Unavailable, os_reason
from ghostgate.relay_hub import RelayHub

MAX_WRITE_BUFFER = 1 << 20
MAX_CONTROL_BUFFER = 4 << 20
TLS_HANDSHAKE_TIMEOUT = 10.0
ACCEPT_BACKOFF = 0.1
LISTEN_BACKLOG = 1024
CLOSE_GRACE = 2.0
_KEEPALIVE = (("TCP_KEEPIDLE", 30), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 3))


class RelayTlsProtocol(asyncio.Protocol):
    """One TLS client connection; an :class:`ghostgate.relay_hub.Edge`."""

    def __init__(self, hub: RelayHub, source: str) -> None:
        self._hub = hub
        self._source = source  # admitted by the hub; released when the connection is lost
        self._transport: asyncio.Transport | None = None
        self._cid: int | None = None
        self._closing = False
        self._abort_handle: asyncio.TimerHandle | None = None
        self._released = False

    def release(self) -> None:
        """Give the admission slot back (once, whichever way the connection ends)."""
        if not self._released:
            self._released = True
            self._hub.release(self._source)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
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
        self.release()

    # ----- Edge

    def send_frame(self, data: bytes) -> None:
        t = self._transport
        if t is None or self._closing:
            return
        if t.get_write_buffer_size() > MAX_CONTROL_BUFFER:
            self._hub.count("closed_slow")
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


class TlsListener:
    """The relay's TCP listener: accept, admit, then a bounded TLS handshake per connection (see above)."""

    def __init__(self, hub: RelayHub, sock: socket.socket, ctx: ssl.SSLContext) -> None:
        self._hub = hub
        self._sock = sock
        self._ctx = ctx
        self._loop = asyncio.get_running_loop()
        self._handshakes: set[asyncio.Task[None]] = set()  # under way (a task must be referenced to run)
        self._task = self._loop.create_task(self._accept())

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._sock.getsockname()[:2]
        return str(host), int(port)

    async def _accept(self) -> None:
        while True:
            try:
                conn, peer = await self._loop.sock_accept(self._sock)
            except OSError:  # EMFILE, ENFILE, ENOBUFS...: the limits did not keep us under the fd limit
                self._hub.count("accept_failed")
                await asyncio.sleep(ACCEPT_BACKOFF)
                continue
            source = str(peer[0]) if peer else "?"
            if not self._hub.admit(source):
                conn.close()
                continue
            with contextlib.suppress(OSError):
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
                for name, value in _KEEPALIVE:
                    if hasattr(socket, name):
                        conn.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)
            task = self._loop.create_task(self._handshake(conn, source))
            task.add_done_callback(self._handshakes.discard)
            self._handshakes.add(task)

    async def _handshake(self, conn: socket.socket, source: str) -> None:
        relay = RelayTlsProtocol(self._hub, source)
        try:
            # From here the loop owns ``conn``: a failed or cancelled handshake closes it there.
            await self._loop.connect_accepted_socket(
                lambda: relay, conn, ssl=self._ctx, ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT
            )
        except asyncio.CancelledError:
            relay.release()
            raise
        except (OSError, ssl.SSLError, ConnectionError, TimeoutError):
            self._hub.count("tls_handshake_failed")
            relay.release()

    def close(self) -> None:
        """Stop accepting and abandon the handshakes under way (established connections are the hub's)."""
        task = self._task
        if not task.done():
            # the socket is closed once the accept is cancelled (the loop still watches its descriptor)
            task.add_done_callback(lambda _: self._sock.close())
            task.cancel()
        else:
            self._sock.close()
        for t in list(self._handshakes):
            t.cancel()

    async def wait_closed(self) -> None:
        for t in [self._task, *self._handshakes]:
            with contextlib.suppress(asyncio.CancelledError):
                await t


async def serve_tls(hub: RelayHub, host: str, port: int, ctx: ssl.SSLContext) -> TlsListener:
    """Listen on TCP ``host:port`` with TLS and serve the relay into ``hub`` until the listener is closed."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)
        family = infos[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as exc:
        raise Unavailable(f"relay.tcp_port: cannot bind TCP {host}:{port}: {os_reason(exc)}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise Unavailable(f"relay.tcp_port: cannot bind TCP {host}:{port}: {os_reason(exc)}") from None
    return TlsListener(hub, sock, ctx)
