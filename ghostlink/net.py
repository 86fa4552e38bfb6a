"""Addresses and routes on the WireGuard interface (pyroute2 netlink), and the host's own endpoints.

Netlink calls are blocking (pyroute2's sync ``IPRoute`` runs its own loop), so they run in a worker
thread. Every operation is idempotent: adding what exists (EEXIST) or removing what is gone
(ESRCH / EADDRNOTAVAIL / ENOENT) is not an error, so re-applying a plan after a crash or a wireguard-go
restart converges instead of failing.

Production code uses ``IPRoute()`` in the current network namespace: ghostlink runs inside the
namespace it configures (the netns tests start it with ``ip netns exec``). ``netns`` exists for tests.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
from collections.abc import Iterable
from typing import Any, Protocol

from ghostcore.addr import format_endpoint
from ghostcore.errors import Unavailable
from ghostlink.engine import Plan

log = logging.getLogger(__name__)

# Overlay ranges (coordination.proto / ghostcore.ipalloc): never advertise them as underlay endpoints.
OVERLAY_NETS = (ipaddress.ip_network("100.64.0.0/10"), ipaddress.ip_network("fd7a:115c:a1e0::/48"))
_IGNORABLE = {errno.EEXIST, errno.ESRCH, errno.EADDRNOTAVAIL, errno.ENOENT}
# Mesh routes get a metric above the kernel's for connected routes (0 for IPv4, 256 for IPv6), so when a
# peer routes a subnet this host is itself on (a standby subnet router on the same LAN), the LAN wins.
ROUTE_METRIC = 2000
_SCOPE_HOST = 254  # RT_SCOPE_HOST (linux/rtnetlink.h)
_IFA_F_NODAD = 0x02  # linux/if_addr.h
_FOREVER = 0xFFFFFFFF  # INFINITY_LIFE_TIME: valid forever


class NetLayer(Protocol):
    """What the daemon needs for the L3 side of the interface (injected; tests pass a no-op)."""

    async def apply(self, plan: Plan) -> None: ...

    async def local_endpoints(self, listen_port: int) -> list[str]: ...


def _iproute(netns: str | None) -> Any:
    from pyroute2 import IPRoute  # noqa: PLC0415 - lazy: unit tests never open netlink

    return IPRoute(netns=netns) if netns else IPRoute()


def _ignorable(exc: OSError) -> bool:
    return getattr(exc, "code", exc.errno) in _IGNORABLE


def _split(prefix: str) -> tuple[str, int, int]:
    net = ipaddress.ip_interface(prefix)
    return str(net.ip), net.network.prefixlen, net.version


def apply_sync(ifname: str, plan: Plan, netns: str | None = None) -> None:
    """Apply the address and route part of ``plan`` to ``ifname``."""
    with _iproute(netns) as ip:
        found = ip.link_lookup(ifname=ifname)
        if not found:
            raise Unavailable(f"interface {ifname} does not exist; is WireGuard running?")
        idx = found[0]
        for a in plan.addresses_remove:
            addr, plen, _ = _split(a)
            try:
                ip.addr("del", index=idx, address=addr, prefixlen=plen)
            except OSError as exc:
                if not _ignorable(exc):
                    raise
        for a in plan.addresses_add:
            addr, plen, _ = _split(a)
            try:
                ip.addr("add", index=idx, address=addr, prefixlen=plen)
            except OSError as exc:
                if not _ignorable(exc):
                    raise
        for r in plan.routes_remove:
            try:
                ip.route("del", dst=r, oif=idx, priority=ROUTE_METRIC)
            except OSError as exc:
                if not _ignorable(exc):
                    raise
        for r in plan.routes_add:
            # "replace" is idempotent: an existing identical route is not an error.
            ip.route("replace", dst=r, oif=idx, priority=ROUTE_METRIC)


def add_service_addresses(ifname: str, addresses: Iterable[str], netns: str | None = None) -> None:
    """Add addresses this host serves on (the node resolver's) to ``ifname``, never to be a source.

    Linux picks a packet's source address among the outgoing interface's addresses: an overlay packet
    leaving from 100.100.100.100 would be dropped by every peer (it is not in our allowed IPs there). So
    the IPv4 address gets host scope (never chosen for a route of wider scope, RFC-less but Linux's
    ``inet_select_addr``) and the IPv6 one is added deprecated (preferred lifetime 0: RFC 6724 section 5,
    rule 3 avoids it as a source), and without DAD; both still take packets addressed to them. Idempotent.
    """
    with _iproute(netns) as ip:
        found = ip.link_lookup(ifname=ifname)
        if not found:
            raise Unavailable(f"interface {ifname} does not exist; is WireGuard running?")
        for text in addresses:
            addr = ipaddress.ip_address(text)
            try:
                if addr.version == 4:
                    ip.addr("add", index=found[0], address=text, prefixlen=32, scope=_SCOPE_HOST)
                else:
                    ip.addr(
                        "add", index=found[0], address=text, prefixlen=128, flags=_IFA_F_NODAD,
                        IFA_CACHEINFO={"ifa_preferred": 0, "ifa_valid": _FOREVER, "cstamp": 0, "tstamp": 0},
                    )  # fmt: skip
            except OSError as exc:
                if not _ignorable(exc):
                    raise


def usable_endpoints(addrs: Iterable[tuple[str, str]], listen_port: int, exclude_ifname: str) -> list[str]:
    """Filter (ifname, address) pairs to advertisable ``ip:port`` / ``[ip6]:port`` endpoints."""
    out: list[str] = []
    for ifname, text in addrs:
        if ifname == exclude_ifname:
            continue
        try:
            ip = ipaddress.ip_address(text.split("%")[0])
        except ValueError:
            continue
        if ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_unspecified:
            continue
        if any(ip in net for net in OVERLAY_NETS):
            continue
        ep = format_endpoint(str(ip), listen_port)
        if ep not in out:
            out.append(ep)
    # IPv4 first: most paths between home networks are v4.
    return sorted(out, key=lambda e: e.startswith("["))


def host_addresses(netns: str | None = None) -> list[tuple[str, str]]:
    with _iproute(netns) as ip:
        names = {link["index"]: link.get("IFLA_IFNAME") for link in ip.get_links()}
        return [
            (names.get(a["index"], ""), a.get("IFA_ADDRESS")) for a in ip.get_addr() if a.get("IFA_ADDRESS")
        ]


def local_endpoints(listen_port: int, exclude_ifname: str, netns: str | None = None) -> list[str]:
    """This host's usable ``ip:port`` endpoints (blocking; see ``LinkNet.local_endpoints``)."""
    return usable_endpoints(host_addresses(netns), listen_port, exclude_ifname)


class LinkNet:
    """The real net layer for one interface."""

    def __init__(self, ifname: str, netns: str | None = None) -> None:
        self.ifname = ifname
        self.netns = netns

    async def apply(self, plan: Plan) -> None:
        if plan.addresses_add or plan.addresses_remove or plan.routes_add or plan.routes_remove:
            await asyncio.to_thread(apply_sync, self.ifname, plan, self.netns)

    async def local_endpoints(self, listen_port: int) -> list[str]:
        return await asyncio.to_thread(local_endpoints, listen_port, self.ifname, self.netns)
