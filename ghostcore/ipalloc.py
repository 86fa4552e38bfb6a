"""Overlay IP allocation: pure, deterministic, O(1) amortised per allocation.

Addresses come from an IPv4 prefix (default 100.64.0.0/10, the CGNAT range Tailscale also uses) and an
IPv6 ULA /48 (default fd7a:115c:a1e0::/48). The network and broadcast addresses are never handed out,
nor is any address in ``reserved``. The allocator walks forward from the last address it handed out
(wrapping once), so handing out N addresses costs O(N) in total rather than O(N^2); callers seed it with
the addresses already in use (from the store), which is what makes allocations unique and stable across
restarts: an address, once stored for a node, is never reconsidered.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from ghostcore.errors import ConfigError, Unavailable

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

DEFAULT_IPV4_PREFIX = "100.64.0.0/10"
DEFAULT_IPV6_PREFIX = "fd7a:115c:a1e0::/48"


def parse_prefix(text: str, where: str) -> IPNetwork:
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        raise ConfigError(f"{where}: not a network prefix ({exc}); write it like 100.64.0.0/10") from None


class Allocator:
    """Hands out unused host addresses of one prefix."""

    def __init__(self, prefix: IPNetwork, used: Iterable[IPAddress] = (), reserved: Iterable[IPAddress] = ()):
        if prefix.num_addresses < 4:
            raise ConfigError(f"{prefix}: prefix too small to allocate node addresses from")
        self.prefix = prefix
        self._first = int(prefix.network_address) + 1
        # IPv4 excludes the broadcast address; IPv6 has none but we keep the symmetric bound.
        self._last = int(prefix.broadcast_address) - 1
        self._used: set[int] = set()
        for ip in (*used, *reserved):
            self.mark_used(ip)
        self._cursor = self._first

    @property
    def capacity(self) -> int:
        return self._last - self._first + 1

    def mark_used(self, ip: IPAddress) -> None:
        if ip not in self.prefix:
            return  # an address from an older, different prefix: it cannot collide with new ones
        self._used.add(int(ip))

    def release(self, ip: IPAddress) -> None:
        self._used.discard(int(ip))

    def allocate(self) -> IPAddress:
        """The next free address after the last one handed out; Unavailable when the prefix is full."""
        if len(self._used) >= self.capacity:
            raise Unavailable(f"address pool {self.prefix} is exhausted; widen the prefix or delete nodes")
        candidate = self._cursor
        for _ in range(self.capacity):
            if candidate > self._last:
                candidate = self._first
            if candidate not in self._used:
                self._used.add(candidate)
                self._cursor = candidate + 1
                return ipaddress.ip_address(candidate)
            candidate += 1
        raise Unavailable(f"address pool {self.prefix} is exhausted; widen the prefix or delete nodes")
