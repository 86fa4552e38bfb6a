"""The address ranges the lab may use, and the checks that refuse every other address.

Only documentation ranges for "public"/LAN segments (RFC 5737: 192.0.2.0/24, 198.51.100.0/24,
203.0.113.0/24; RFC 3849: 2001:db8::/32 for IPv6 LANs) and the overlay ranges 100.64.0.0/10 (RFC 6598) and
fd7a:115c:a1e0::/48. Any other address given to ``segment``/``attach``/``ping``/``wg_pair`` raises
``LabError``, so a typo can never send packets to a real network.
"""

from __future__ import annotations

import ipaddress

from lab.errors import LabError

# RFC 5737 / RFC 3849 documentation ranges for LANs; RFC 6598 CGNAT and the project's ULA for overlays.
ALLOWED_NETWORKS = tuple(
    ipaddress.ip_network(n)
    for n in (
        "192.0.2.0/24",
        "198.51.100.0/24",
        "203.0.113.0/24",
        "2001:db8::/32",
        "100.64.0.0/10",
        "fd7a:115c:a1e0::/48",
    )
)
OVERLAY4 = ipaddress.ip_network("100.64.0.0/10")
OVERLAY6 = ipaddress.ip_network("fd7a:115c:a1e0::/48")


def check_address(addr: str, where: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """The parsed address if it lies in an allowed range, else ``LabError`` (never talk to real networks)."""
    try:
        ip = ipaddress.ip_address(addr.split("%", 1)[0])
    except ValueError as exc:
        raise LabError(f"{where}: not an IP address: {addr!r}") from exc
    if not any(ip.version == n.version and ip in n for n in ALLOWED_NETWORKS):
        raise LabError(
            f"{where}: {addr} is outside the documentation/overlay ranges the lab may use "
            f"({', '.join(str(n) for n in ALLOWED_NETWORKS)})"
        )
    return ip


def check_network(cidr: str, where: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """The parsed prefix if it lies inside an allowed range, else ``LabError``."""
    try:
        net = ipaddress.ip_network(cidr, strict=True)
    except ValueError as exc:
        raise LabError(f"{where}: not a network prefix: {cidr!r}") from exc
    if not any(net.version == n.version and net.subnet_of(n) for n in ALLOWED_NETWORKS):  # type: ignore[arg-type]
        raise LabError(f"{where}: {cidr} is outside the documentation/overlay ranges the lab may use")
    return net
