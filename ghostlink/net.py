"""Addresses and routes on the WireGuard interface, and the host's own endpoints.

The changes go through :mod:`ghostlink.iproute` (iproute2's ``ip``; its docstring says why not netlink
from Python). Those calls block, so they run in a worker thread. Every operation is idempotent, so
re-applying a plan after a crash or a wireguard-go restart converges instead of failing.

Production code works in the current network namespace: ghostlink runs inside the namespace it configures
(the netns tests start it with ``ip netns exec``). ``netns`` exists for tests.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Iterable
from typing import Protocol

from ghostcore.addr import format_endpoint
from ghostcore.errors import Unavailable
from ghostlink import iproute
from ghostlink.engine import Plan

log = logging.getLogger(__name__)

# Overlay ranges (coordination.proto / ghostcore.ipalloc): never advertise them as underlay endpoints.
OVERLAY_NETS = (ipaddress.ip_network("100.64.0.0/10"), ipaddress.ip_network("fd7a:115c:a1e0::/48"))
# Mesh routes get a metric above the kernel's for connected routes (0 for IPv4, 256 for IPv6), so when a
# peer routes a subnet this host is itself on (a standby subnet router on the same LAN), the LAN wins.
ROUTE_METRIC = 2000


class NetLayer(Protocol):
    """What the daemon needs for the L3 side of the interface (injected; tests pass a no-op)."""

    async def apply(self, plan: Plan) -> None: ...

    async def local_endpoints(self, listen_port: int) -> list[str]: ...


def _require_link(ifname: str, netns: str | None) -> None:
    if not iproute.link_exists(ifname, netns):
        raise Unavailable(f"interface {ifname} does not exist; is WireGuard running?")


def apply_sync(ifname: str, plan: Plan, netns: str | None = None) -> None:
    """Apply the address and route part of ``plan`` to ``ifname``."""
    _require_link(ifname, netns)
    iproute.apply(
        ifname,
        addresses_remove=plan.addresses_remove,
        addresses_add=plan.addresses_add,
        routes_remove=plan.routes_remove,
        routes_add=plan.routes_add,
        metric=ROUTE_METRIC,
        netns=netns,
    )


def service_address_lines(ifname: str, addresses: Iterable[str]) -> list[str]:
    """The ``ip -batch`` lines adding the resolver's addresses (see :func:`add_service_addresses`)."""
    out = []
    for text in addresses:
        if ipaddress.ip_address(text).version == 4:
            out.append(f"address replace {text}/32 dev {ifname} scope host")
        else:
            out.append(f"address replace {text}/128 dev {ifname} nodad preferred_lft 0 valid_lft forever")
    return out


def add_service_addresses(ifname: str, addresses: Iterable[str], netns: str | None = None) -> None:
    """Add addresses this host serves on (the node resolver's) to ``ifname``, never to be a source.

    Linux picks a packet's source address among the outgoing interface's addresses: an overlay packet
    leaving from 100.100.100.100 would be dropped by every peer (it is not in our allowed IPs there). So
    the IPv4 address gets host scope (never chosen for a route of wider scope, RFC-less but Linux's
    ``inet_select_addr``) and the IPv6 one is added deprecated (preferred lifetime 0: RFC 6724 section 5,
    rule 3 avoids it as a source), and without DAD; both still take packets addressed to them. Idempotent.
    """
    _require_link(ifname, netns)
    lines = service_address_lines(ifname, addresses)
    if lines:
        iproute.run(["-batch", "-"], netns, stdin="\n".join(lines) + "\n")


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
    return iproute.addresses(netns=netns)


def local_endpoints(listen_port: int, exclude_ifname: str, netns: str | None = None) -> list[str]:
    """This host's usable ``ip:port`` endpoints (blocking; see ``LinkNet.local_endpoints``)."""
    return usable_endpoints(iproute.addresses(netns=netns), listen_port, exclude_ifname)


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
