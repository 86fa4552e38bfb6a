"""The transports of a relay connection (:mod:`ghostlink.traversal.relayclient`): QUIC, else TLS over TCP.

A :class:`Link` carries :mod:`ghostcore.relaywire` frames to one relay and hands what arrives to its
owner's callbacks; it knows nothing of the handshake, pings or routing (the client's), only bytes:

* :class:`QuicLink` (RFC 9000 via aioquic's sans-IO ``QuicConnection``, ALPN ``ghostrelay``): control
  frames on the client's first bidirectional stream (id 0), SEND as DATAGRAM frames (RFC 9221) when they fit
  one packet, else as SEND frames on stream 0 (so a full-size WireGuard packet still crosses a 1500-byte
  path). aioquic is driven by :class:`ghostcore.quicdriver.QuicDriver`, as at the relay (transmits coalesced
  into one ``datagrams_to_send`` per loop iteration); the link owns the socket: non-blocking, connected,
  read with ``loop.add_reader`` and drained in batches of ``BATCH`` (one wake-up and one event pass per
  burst; no per-datagram futures or tasks), its send errors and ICMP errors losing the connection.
* :class:`TlsLink` (an asyncio Protocol): every frame on the one TLS byte stream; writes go into the
  transport's buffer, and a packet is dropped (never waited for) once that buffer is over
  ``MAX_TCP_BUFFER``.

The relay's certificate is self-signed: it is checked against the pin the relay map carries for its region
(SHA-256 of its SubjectPublicKeyInfo, :func:`ghostcore.tlscert.spki_sha256`), on both transports, before
the first frame is sent. ghostmesh computes the pin from the secret it shares with the relays (the relay's
TLS key is derived from it) or takes it from its configuration for a relay with its own certificate. A man
in the middle is refused at the handshake, so it cannot see who talks to whom through the relay, nor drop
or inject frames; payloads are WireGuard-encrypted end to end either way, and authentication
(:mod:`ghostcore.relaywire`) holds without the pin too.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Callable
from typing import cast

from aioquic.quic.connection import NetworkAddress, QuicConnection
from cryptography import x509

from ghostcore import relayquic
from ghostcore import relaywire as rw
from ghostcore.quicdriver import QuicDriver
from ghostcore.tlscert import spki_sha256

MAX_TCP_BUFFER = 1 << 20
BATCH = 64  # datagrams read per wake-up: bounds the time one burst holds the loop
PIN_MISMATCH = "the relay's certificate does not match the relay map's pin"


def pin_matches(cert: x509.Certificate | None, pin: bytes) -> bool:
    return cert is not None and spki_sha256(cert) == pin


class Link:
    """One transport connection; the client feeds its bytes in and gets ``lost`` once."""

    kind = ""

    def send_frame(self, data: bytes) -> None:
        raise NotImplementedError

    def send_packet(self, dst: bytes, packet: bytes) -> bool:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class QuicLink(Link):
    """A :class:`~ghostcore.quicdriver.QuicDriver` over a non-blocking connected UDP socket (add_reader,
    batched); it is the driver's :class:`~ghostcore.quicdriver.DriverEvents`."""

    kind = "quic"

    def __init__(
        self,
        sock: socket.socket,
        *,
        addr: tuple[str, int],
        server_name: str,
        pin: bytes,
        on_stream: Callable[[bytes], None],
        on_datagram: Callable[[bytes], None],
        on_lost: Callable[[str], None],
        on_ready: Callable[[], None],
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._sock = sock
        self._addr = addr
        self._stream_cb = on_stream
        self._datagram_cb = on_datagram
        self._lost_cb = on_lost
        self._ready_cb = on_ready
        self._pin = pin
        self.pin_refused = False  # the handshake completed with a certificate that is not the pinned one
        config = relayquic.configuration(
            is_client=True,
            verify_mode=ssl.CERT_NONE,  # pinned, not chained: see the module docstring
            server_name=server_name,
        )
        self._closed = False
        self._quic = QuicConnection(configuration=config)
        self._driver = QuicDriver(self._quic, self._send, self, self._loop)
        self._loop.add_reader(sock.fileno(), self._on_readable)
        self._driver.connect(addr)

    def _on_readable(self) -> None:
        driver = self._driver
        for _ in range(BATCH):
            try:
                data = self._sock.recv(65535)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:  # ECONNREFUSED: ICMP port unreachable, nobody serves QUIC there
                self._lose(f"quic: {exc.strerror or exc}")
                return
            driver.feed(data, self._addr)
        driver.pump()

    def _send(self, data: bytes, addr: NetworkAddress) -> bool:
        try:
            self._sock.send(data)
        except (BlockingIOError, InterruptedError):
            return False  # the socket buffer is full: QUIC recovers what was lost
        except OSError as exc:
            self._lose(f"quic: {exc.strerror or exc}")
            return False
        return True

    # ----- DriverEvents

    def on_ready(self) -> None:
        if not pin_matches(relayquic.peer_certificate(self._quic), self._pin):
            self.pin_refused = True
            self._lose(f"quic: {PIN_MISMATCH}")
            return
        self._ready_cb()

    def on_stream(self, data: bytes, end: bool) -> None:
        # The relay never ends stream 0 (it closes the connection), so a FIN is ignored: the client's PINGs
        # notice a relay that has gone quiet.
        if data:
            self._stream_cb(data)

    def on_datagram(self, data: bytes) -> None:
        self._datagram_cb(data)

    def on_bad_stream(self, stream_id: int) -> None:
        """Ignored: the relay opens no stream; nothing on one can matter to the client."""

    def on_cid(self, cid: bytes, issued: bool) -> None:
        """Ignored: one connection on a connected socket, nothing routes by connection ID."""

    def on_lost(self, reason: str) -> None:
        self._lose(f"quic: closed by the relay ({reason})")

    # ----- Link

    def send_frame(self, data: bytes) -> None:
        if not self._closed and not self._driver.send_frame(data):
            self._lose("quic: the relay is not reading")

    def send_packet(self, dst: bytes, packet: bytes) -> bool:
        return not self._closed and self._driver.queue_packet(rw.SEND, dst, packet)

    def _lose(self, reason: str) -> None:
        if self._closed:
            return
        self._teardown()
        self._lost_cb(reason)

    def _teardown(self) -> None:
        self._closed = True
        self._driver.stop()
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_reader(self._sock.fileno())
        self._sock.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True  # a send error while closing is no loss to report
        self._driver.close("bye")
        self._teardown()


class TlsLink(Link, asyncio.Protocol):
    """The relay over one TLS byte stream (asyncio Protocol: writes go into the transport's buffer)."""

    kind = "tcp"

    def __init__(
        self, pin: bytes, on_stream: Callable[[bytes], None], on_lost: Callable[[str], None]
    ) -> None:
        self._pin = pin
        self._on_stream = on_stream
        self._on_lost = on_lost
        self._transport: asyncio.Transport | None = None
        self._closed = False
        self.pinned = False  # the handshake completed and the certificate matched the pin

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # asyncio calls this once the TLS handshake is done: the certificate is known, no frame sent yet
        self._transport = cast(asyncio.Transport, transport)
        ssl_object = transport.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        try:
            cert = x509.load_der_x509_certificate(der) if der else None
        except ValueError:
            cert = None
        self.pinned = pin_matches(cert, self._pin)
        if not self.pinned:
            self.close()

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


def client_tls() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # pinned, not chained: see the module docstring
    ctx.set_alpn_protocols([relayquic.ALPN])
    return ctx
