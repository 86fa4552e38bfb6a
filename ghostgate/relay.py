"""The running ghost relay: one :class:`~ghostgate.relay_core.RelayCore` shared by the QUIC and TLS edges.

:class:`RelayHub` owns the core, its timer and the map from connection id to edge, so a node on QUIC and a
node on TLS-over-TCP reach each other through the one routing table. Edges (:mod:`ghostgate.quic`,
:mod:`ghostgate.stream`) implement :class:`Edge`: they never await in the forwarding path; a delivery to a
connection whose buffer is over its limit is dropped and counted (``dropped_slow``) instead, so one slow
client never stalls the others. :func:`start_relay` builds it all from a :class:`GateConfig`. The core's
clock is ``time.time()`` because relay tokens expire in unix time.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import Protocol

from aioquic.asyncio.server import QuicServer

from ghostcore import relayquic
from ghostcore.aio import CoreTimer
from ghostcore.config import parse_hostport
from ghostgate import quic, stream, tlscert
from ghostgate.config import GateConfig, relay_ports
from ghostgate.relay_core import Action, Close, Deliver, RelayCore, Send

log = logging.getLogger(__name__)

_CLOSE_WAIT = stream.CLOSE_GRACE + 1.0  # TLS closes abort after CLOSE_GRACE; QUIC drains in 3 PTO


class Edge(Protocol):
    """One transport connection, as the hub drives it."""

    def send_frame(self, data: bytes) -> None:
        """Write stream frames on the control stream (best effort; a hopeless backlog closes the edge)."""

    def deliver(self, src: bytes, packet: bytes) -> bool:
        """Queue a RECV without waiting; False when dropped (connection closing or over its buffer limit)."""

    def close_edge(self, reason: str) -> None:
        """Close after flushing what was written (bounded in time); the core has forgotten this connection."""


class RelayHub:
    """Connection ids, the core, the timer; ``attach`` / ``stream`` / ``datagram`` / ``detach`` from edges."""

    def __init__(
        self, core: RelayCore, loop: asyncio.AbstractEventLoop, clock: Callable[[], float] = time.time
    ) -> None:
        self.core = core
        self.loop = loop
        self.clock = clock
        self.edges: dict[int, Edge] = {}  # connections the core knows (open, not yet closed by the core)
        self.live: dict[int, Edge] = {}  # transports not yet gone (a closed connection may still flush)
        self.counters: Counter[str] = Counter()
        self._ids = itertools.count(1)
        self._timer = CoreTimer(loop, clock, self._on_timer)
        self._closed = False

    @property
    def connections(self) -> int:
        """Transport connections still open (closing ones included): 0 once every client is gone."""
        return len(self.live)

    def attach(self, edge: Edge) -> int:
        cid = next(self._ids)
        self.edges[cid] = edge
        self.live[cid] = edge
        self._apply(self.core.open(cid, self.clock()))
        if self._closed:  # a handshake that finished while we shut down
            self._apply(self.core.reject(cid, "relay: shutting down", "shutdown"))
        return cid

    def stream(self, cid: int, data: bytes) -> None:
        self._apply(self.core.stream(cid, data, self.clock()))

    def datagram(self, cid: int, data: bytes) -> None:
        self._apply(self.core.datagram(cid, data, self.clock()))

    def reject(self, cid: int, reason: str, counter: str) -> None:
        self._apply(self.core.reject(cid, reason, counter))

    def detach(self, cid: int) -> None:
        """The edge's transport is gone (whoever closed it)."""
        self._apply(self.core.lost(cid))
        self.edges.pop(cid, None)
        self.live.pop(cid, None)

    def stats(self) -> dict[str, int]:
        """The core's counters and the edges', one dict (for tests and logs)."""
        return {**self.core.counters, **self.counters}

    def _apply(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Send):
                edge = self.edges.get(action.conn)
                if edge is not None:
                    edge.send_frame(action.data)
            elif isinstance(action, Deliver):
                edge = self.edges.get(action.conn)
                if edge is None or not edge.deliver(action.src, action.packet):
                    self.counters["dropped_slow"] += 1
            elif isinstance(action, Close):
                gone = self.edges.pop(action.conn, None)
                if gone is not None:
                    log.debug("relay connection %d closed: %s", action.conn, action.reason)
                    gone.close_edge(action.reason)
        self._schedule()

    def _schedule(self) -> None:
        self._timer.arm(self.core.next_timer())

    def _on_timer(self, now: float) -> None:
        self._apply(self.core.timer(now))

    def close(self) -> None:
        """Close every connection (ERROR "shutting down" first) and stop the timer."""
        self._closed = True
        for cid in list(self.edges):
            self._apply(self.core.reject(cid, "relay: shutting down", "shutdown"))
        self._timer.cancel()


class RelayServer:
    """The QUIC relay (UDP) and the TLS relay (TCP) of one ghostgate, sharing one hub."""

    def __init__(
        self,
        hub: RelayHub,
        tls: asyncio.Server,
        quic_transport: asyncio.DatagramTransport | None,
        quic_server: QuicServer | None,
    ) -> None:
        self.hub = hub
        self.tls = tls
        self._quic_transport = quic_transport
        self._quic_server = quic_server

    @property
    def quic_address(self) -> tuple[str, int] | None:
        if self._quic_transport is None:
            return None
        host, port = self._quic_transport.get_extra_info("sockname")[:2]
        return host, port

    @property
    def tcp_address(self) -> tuple[str, int]:
        host, port = self.tls.sockets[0].getsockname()[:2]
        return host, port

    def stats(self) -> dict[str, int]:
        return self.hub.stats()

    async def close(self) -> None:
        """Stop listening, tell every client (ERROR, CONNECTION_CLOSE), wait (bounded) for them to go."""
        self.tls.close()
        self.hub.close()
        if self._quic_server is not None:
            self._quic_server.close()  # CONNECTION_CLOSE to every QUIC client, then closes the socket
        await self.tls.wait_closed()
        for _ in range(int(_CLOSE_WAIT / 0.05)):
            if not self.hub.live:
                break
            await asyncio.sleep(0.05)


async def start_relay(cfg: GateConfig, secret: bytes, *, core: RelayCore | None = None) -> RelayServer:
    """Serve the TLS relay on TCP ``relay_ports(cfg)[1]`` and, if ``relay.use_quic``, the QUIC relay on UDP
    ``relay_ports(cfg)[0]``, both on relay.listen's IP, until ``await close()``. ``core`` is for tests
    (e.g. a short handshake timeout)."""
    host = parse_hostport(cfg.relay.listen, "relay.listen", ip_only=True)[0]
    quic_port, tcp_port = relay_ports(cfg)
    pair = tlscert.for_config(cfg)
    loop = asyncio.get_running_loop()
    hub = RelayHub(core or RelayCore(secret), loop)
    tls = await stream.serve_tls(hub, host, tcp_port, tlscert.server_ssl_context(pair, relayquic.ALPN))
    if not cfg.relay.use_quic:
        return RelayServer(hub, tls, None, None)
    try:
        transport, server = await quic.serve_quic(hub, host, quic_port, pair)
    except BaseException:
        tls.close()
        await tls.wait_closed()
        raise
    return RelayServer(hub, tls, transport, server)
