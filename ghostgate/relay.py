"""The running node relay: the TLS relay (TCP) and the QUIC relay (UDP) of one ghostgate on one hub.

:func:`start_relay` builds it from a :class:`GateConfig`: one :class:`~ghostgate.relay_hub.RelayHub`, the
TLS listener (:mod:`ghostgate.stream`) and, with ``relay.use_quic``, the QUIC server (:mod:`ghostgate.quic`),
both on relay.listen's IP. :class:`RelayServer` holds them for the addresses, the stats and the close.

Both transports present the certificate of :func:`ghostgate.config.relay_cert`; nodes check its key against
the pin ghostmesh publishes in the relay map (for the default certificate, a key derived from the shared
secret, which ghostmesh holds too). Relay auth proves both the node's token and its private key over a
fresh challenge (ghostcore.relaywire), so even a man in the middle with a valid certificate learns nothing
reusable.
"""

from __future__ import annotations

import asyncio

from aioquic.asyncio.server import QuicServer

from ghostcore import relayquic, tlscert
from ghostcore.config import parse_hostport
from ghostgate import quic, stream
from ghostgate.config import GateConfig, relay_cert, relay_ports
from ghostgate.nodeset import NodeSet
from ghostgate.relay_core import RelayCore
from ghostgate.relay_hub import RelayHub

_CLOSE_WAIT = stream.CLOSE_GRACE + 1.0  # TLS closes abort after CLOSE_GRACE; QUIC drains in 3 PTO


class RelayServer:
    """The QUIC relay (UDP) and the TLS relay (TCP) of one ghostgate, sharing one hub."""

    def __init__(
        self,
        hub: RelayHub,
        tls: stream.TlsListener,
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
        return self.tls.address

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
            if not self.hub.connections:
                break
            await asyncio.sleep(0.05)


async def start_relay(
    cfg: GateConfig, secret: bytes, *, core: RelayCore | None = None, roster: NodeSet | None = None
) -> RelayServer:
    """Serve the TLS relay on TCP ``relay_ports(cfg)[1]`` and, if ``relay.use_quic``, the QUIC relay on UDP
    ``relay_ports(cfg)[0]``, both on relay.listen's IP, until ``await close()``. ``roster``: the node keys
    allowed (``[control]``), None for credentials alone. ``core`` is for tests (e.g. a short handshake
    timeout)."""
    host = parse_hostport(cfg.relay.listen, "relay.listen", ip_only=True)[0]
    quic_port, tcp_port = relay_ports(cfg)
    pair = relay_cert(cfg, secret)
    loop = asyncio.get_running_loop()
    hub = RelayHub(
        core or RelayCore(secret, roster=roster),
        loop,
        max_connections=cfg.relay.max_connections,
        max_per_source=cfg.relay.max_connections_per_source,
    )
    tls = await stream.serve_tls(hub, host, tcp_port, tlscert.server_ssl_context(pair, [relayquic.ALPN]))
    if not cfg.relay.use_quic:
        return RelayServer(hub, tls, None, None)
    try:
        transport, server = await quic.serve_quic(hub, host, quic_port, pair, retry=cfg.relay.quic_retry)
    except BaseException:
        tls.close()
        await tls.wait_closed()
        raise
    return RelayServer(hub, tls, transport, server)
