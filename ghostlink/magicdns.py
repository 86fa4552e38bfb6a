"""MagicDNS on a node: the resolver at 100.100.100.100 (and fd7a:115c:a1e0::53) answering the mesh's names
from the map, and the host pointed at it.

:class:`MagicDns` wires three parts and is what the daemon sees (:class:`ghostlink.daemon.DnsLayer`):
the pure core (:func:`ghostlink.dns_core.build_zone` once per admitted map: a rename or a peer gained or
lost is in DNS as soon as the delta is applied), the asyncio server (:mod:`ghostlink.dns_server`) and
the host's resolver settings (:mod:`ghostlink.dns_host`, None with ``--accept-dns=false``: the resolver
still answers whoever asks it, but the host is left alone). The resolver addresses are added to the
WireGuard interface (a local address of the host, so only this host reaches them: peers route nothing
there; never a source address, :func:`ghostlink.net.add_service_addresses`) at start and again after
wireguard-go was restarted with a new interface.

The host is pointed at the resolver while the map carries DNS settings (``[dns]`` in ghostmesh.toml) and
put back when a map comes without them and when ghostlink stops. A failure to configure the host is
logged and retried with the next map; it never stops the mesh.
"""

from __future__ import annotations

import asyncio
import logging

from ghostcore.addr import HostPort, format_endpoint
from ghostcore.dnsname import DNS_PORT, RESOLVER_V4, RESOLVER_V6
from ghostcore.errors import GhostError
from ghostlink.dns_core import Zone, build_zone, describe
from ghostlink.dns_host import HostDns
from ghostlink.dns_server import DnsServer
from ghostlink.engine import NetMap
from ghostlink.net import add_service_addresses
from ghostlink.status import DnsStatus

log = logging.getLogger(__name__)

LISTEN: tuple[HostPort, ...] = ((RESOLVER_V4, DNS_PORT), (RESOLVER_V6, DNS_PORT))
RESOLVERS = (RESOLVER_V4, RESOLVER_V6)  # what the host is pointed at


class MagicDns:
    """The node resolver and the host's use of it; see the module docstring."""

    def __init__(
        self,
        ifname: str,
        host: HostDns | None,
        *,
        accept: bool = True,
        listen: tuple[HostPort, ...] = LISTEN,
        server: DnsServer | None = None,
    ) -> None:
        self._ifname = ifname
        self._host = host  # None: --accept-dns=false, or a host resolver that is not ours to change
        self._accept = accept
        self._listen = listen
        self._server = server or DnsServer()
        self._host_set = False
        self._serving = False  # listening: only then is the host pointed at it
        self._refused: tuple[str, ...] = ()

    async def start(self) -> None:
        """Add the addresses and listen. A resolver that cannot listen (another DNS server holds port 53
        there) is logged and left off, and the host is then never pointed at it: the mesh runs without."""
        try:
            await self.interface_reset()
            await self._server.start(self._listen)
        except OSError as exc:
            log.error("the node resolver cannot listen (%s); running without MagicDNS", exc)  # noqa: TRY400
            return
        self._serving = True
        if self._host is not None:
            self._server.set_zone(Zone(fallback=self._host.previous_upstreams()))

    async def interface_reset(self) -> None:
        """(Re)add the resolver addresses to the WireGuard interface (new, or re-created)."""
        addresses = [h for h, _ in self._listen]
        await asyncio.to_thread(add_service_addresses, self._ifname, addresses)

    async def update(self, nm: NetMap) -> None:
        """Serve the names of the admitted map ``nm``; point the host at the resolver (or put it back)."""
        fallback = self._host.previous_upstreams() if self._host is not None else ()
        zone = build_zone(nm, fallback)
        self._server.set_zone(zone)
        for line in zone.refused:
            if line not in self._refused:
                log.warning("DNS settings: %s", line)
        self._refused = zone.refused
        if self._host is None or not self._serving:
            return
        try:
            if zone.configured:
                await self._host.apply(zone)
                self._host_set = True
            elif self._host_set:
                await self._host.restore()
                self._host_set = False
        except (GhostError, OSError) as exc:
            log.warning("pointing the host at the node resolver failed: %s; retrying with the next map", exc)

    async def close(self) -> None:
        try:
            if self._host is not None:
                await self._host.restore()
        except (GhostError, OSError) as exc:
            log.error("putting the host's resolver settings back failed: %s", exc)  # noqa: TRY400 - one line
        finally:
            await self._server.close()

    def _alone(self) -> str:
        if not self._accept:
            return "--accept-dns=false: the host's resolver is left alone"
        return "the host's resolver is left alone (not this network namespace's to change)"

    def status(self) -> DnsStatus:
        zone, server, host = self._server.zone, self._server, self._host
        return DnsStatus(
            accept_dns=self._accept,
            configured=zone.configured,
            magic_dns=zone.magic_dns,
            base_domain=zone.base_domain,
            names=len(zone.names),
            extra_records=sum(len(v) for v in zone.records.values()),
            split=tuple((d, tuple(describe(s))) for d, s in zone.split),
            upstreams=tuple(describe(zone.upstreams)),
            upstreams_source=zone.upstreams_source,
            search_domains=zone.search_domains,
            listen=tuple(format_endpoint(h, p) for h, p in server.listen),
            host_mode=host.mode if host is not None and self._host_set else "",
            host_detail=host.detail() if host is not None else self._alone(),
            refused=zone.refused,
            queries=server.queries,
            forwarded=server.forwarded,
            dropped=server.dropped,
        )
