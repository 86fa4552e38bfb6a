"""PCP, NAT-PMP and SSDP messages, the pure codec: what ghostlink sends to its gateway for a port mapping.

It owns the wire layout of the two UDP protocols home routers speak on port 5351 (and UPnP's search) (what to
send when is :mod:`ghostlink.traversal.portmap_core`; the socket is :mod:`ghostlink.traversal.portmap`).
Only what a WireGuard port needs: a UDP mapping of one internal port, its renewal and deletion, and
NAT-PMP's external address request. Parsing never raises: anything malformed is None.

NAT-PMP (RFC 6886), all integers big-endian::

    external address request (§3.2)   version 0 | opcode 0                               2 bytes
    its response                      version 0 | opcode 128 | result u16 | epoch u32 | external IPv4
                                                                                         12 bytes
    UDP mapping request (§3.3)        version 0 | opcode 1 | reserved u16 | internal port u16 |
                                      suggested external port u16 | requested lifetime u32  12 bytes
    its response                      version 0 | opcode 129 | result u16 | epoch u32 | internal port u16 |
                                      mapped external port u16 | lifetime u32                16 bytes

A deletion is a mapping request with lifetime 0 and suggested external port 0 (§3.4). Result codes
(§3.5): 0 success, 1 unsupported version, 2 not authorized/refused, 3 network failure, 4 out of
resources, 5 unsupported opcode. An error response may stop after the epoch (8 bytes).

PCP (RFC 6887), common header (§7.1 request, §7.2 response) then the MAP opcode's body (§11.1)::

    request   version 2 | R=0,opcode 1 | reserved u16 | requested lifetime u32 | client IP (16, IPv6 or
              IPv4-mapped)                                                                   24 bytes
    response  version 2 | R=1,opcode 1 | reserved u8 | result u8 | lifetime u32 | epoch u32 | reserved 96 bits
                                                                                             24 bytes
    MAP body  nonce (96 bits) | protocol u8 (17 = UDP) | reserved 24 bits | internal port u16 |
              suggested (request) / assigned (response) external port u16 |
              suggested / assigned external IP (16, IPv4-mapped for IPv4)                    36 bytes

A request suggests ``::ffff:0.0.0.0`` for "no preference" (§11.1); a deletion is a MAP with lifetime 0
and the mapping's nonce (§15). Result codes: §7.4. A NAT-PMP-only server answers a PCP request with a
NAT-PMP "unsupported version" response (RFC 6887 §9), which :func:`parse_natpmp` reads.

SSDP search (UPnP Device Architecture 1.1 §1.3.2-1.3.3), which finds a UPnP Internet Gateway Device
before any UPnP library is loaded (that library, and the aiohttp it imports, cost ~13 MiB and ~0.13 s
on every node behind a router that speaks no UPnP)::

    M-SEARCH * HTTP/1.1            to 239.255.255.250:1900, multicast
    HOST: 239.255.255.250:1900
    MAN: "ssdp:discover"
    MX: <seconds a device may wait before answering>
    ST: <search target: the IGD device type>

    HTTP/1.1 200 OK                unicast back, one datagram; LOCATION is the device description's URL
    ST: <the target searched>
    LOCATION: http://192.168.1.1:5000/rootDesc.xml
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from urllib.parse import urlsplit

SERVER_PORT = 5351  # RFC 6886 §3.1, RFC 6887 §19.1
NATPMP_VERSION = 0
PCP_VERSION = 2
NATPMP_OP_EXTERNAL = 0
NATPMP_OP_MAP_UDP = 1
PCP_OP_MAP = 1
UDP = 17
NONCE_SIZE = 12

NATPMP_RESULTS = {
    0: "success",
    1: "unsupported version",
    2: "not authorized",
    3: "network failure",
    4: "out of resources",
    5: "unsupported opcode",
}
PCP_RESULTS = {  # RFC 6887 §7.4
    0: "SUCCESS",
    1: "UNSUPP_VERSION",
    2: "NOT_AUTHORIZED",
    3: "MALFORMED_REQUEST",
    4: "UNSUPP_OPCODE",
    5: "UNSUPP_OPTION",
    6: "MALFORMED_OPTION",
    7: "NETWORK_FAILURE",
    8: "NO_RESOURCES",
    9: "UNSUPP_PROTOCOL",
    10: "USER_EX_QUOTA",
    11: "CANNOT_PROVIDE_EXTERNAL",
    12: "ADDRESS_MISMATCH",
    13: "EXCESSIVE_REMOTE_PEERS",
}
ANY_V4 = "::ffff:0.0.0.0"


def _check_port(port: int, what: str, *, zero: bool = False) -> None:
    if not (0 if zero else 1) <= port <= 65535:
        raise ValueError(f"{what} {port} is not a UDP port")


def _check_lifetime(lifetime: int) -> None:
    if not 0 <= lifetime <= 0xFFFFFFFF:
        raise ValueError(f"lifetime {lifetime} does not fit 32 bits")


def ip16(text: str) -> bytes:
    """An address as PCP carries it: IPv6 as is, IPv4 as an IPv4-mapped IPv6 address (RFC 6887 §5)."""
    ip = ipaddress.ip_address(text)
    if ip.version == 4:
        return ipaddress.IPv6Address(f"::ffff:{ip}").packed
    return ip.packed


def from_ip16(raw: bytes) -> str:
    """The inverse of :func:`ip16`: an IPv4-mapped address comes back as IPv4."""
    ip = ipaddress.IPv6Address(raw)
    return str(ip.ipv4_mapped) if ip.ipv4_mapped is not None else str(ip)


# --- NAT-PMP ------------------------------------------------------------------------------------------


def natpmp_external_request() -> bytes:
    """RFC 6886 §3.2: what is the gateway's external IPv4 address?"""
    return struct.pack("!BB", NATPMP_VERSION, NATPMP_OP_EXTERNAL)


def natpmp_map_request(internal_port: int, external_port: int, lifetime: int) -> bytes:
    """RFC 6886 §3.3 (UDP); lifetime 0 with external port 0 deletes the mapping (§3.4)."""
    _check_port(internal_port, "internal port")
    _check_port(external_port, "external port", zero=True)
    _check_lifetime(lifetime)
    return struct.pack(
        "!BBHHHI", NATPMP_VERSION, NATPMP_OP_MAP_UDP, 0, internal_port, external_port, lifetime
    )


@dataclass(frozen=True)
class NatPmpResponse:
    opcode: int  # the request's opcode (the response's minus 128)
    result: int
    epoch: int  # seconds since the gateway's mapping table was (re)started
    external_ip: str = ""  # opcode 0
    internal_port: int = 0  # opcode 1
    external_port: int = 0
    lifetime: int = 0


def parse_natpmp(data: bytes) -> NatPmpResponse | None:
    """A NAT-PMP response, or None for anything else (a request, another version, truncated)."""
    if len(data) < 4 or data[0] != NATPMP_VERSION or data[1] < 128:
        return None
    opcode, result = data[1] - 128, struct.unpack_from("!H", data, 2)[0]
    if len(data) < 8:
        return NatPmpResponse(opcode, result, 0) if result else None
    epoch = struct.unpack_from("!I", data, 4)[0]
    if result:
        return NatPmpResponse(opcode, result, epoch)
    if opcode == NATPMP_OP_EXTERNAL:
        if len(data) < 12:
            return None
        return NatPmpResponse(opcode, 0, epoch, external_ip=str(ipaddress.IPv4Address(data[8:12])))
    if opcode == NATPMP_OP_MAP_UDP:
        if len(data) < 16:
            return None
        internal, external, lifetime = struct.unpack_from("!HHI", data, 8)
        return NatPmpResponse(
            opcode, 0, epoch, internal_port=internal, external_port=external, lifetime=lifetime
        )
    return None


# --- PCP ----------------------------------------------------------------------------------------------


def pcp_map_request(
    client_ip: str,
    nonce: bytes,
    internal_port: int,
    *,
    external_port: int = 0,
    external_ip: str = ANY_V4,
    lifetime: int,
) -> bytes:
    """RFC 6887 §11.1: a MAP request for UDP ``internal_port`` (lifetime 0: delete it, §15)."""
    if len(nonce) != NONCE_SIZE:
        raise ValueError(f"a PCP nonce is {NONCE_SIZE} bytes, got {len(nonce)}")
    _check_port(internal_port, "internal port")
    _check_port(external_port, "external port", zero=True)
    _check_lifetime(lifetime)
    header = struct.pack("!BBHI", PCP_VERSION, PCP_OP_MAP, 0, lifetime) + ip16(client_ip)
    body = nonce + struct.pack("!B3xHH", UDP, internal_port, external_port) + ip16(external_ip)
    return header + body


@dataclass(frozen=True)
class PcpResponse:
    opcode: int
    result: int
    lifetime: int
    epoch: int
    nonce: bytes = b""
    protocol: int = 0
    internal_port: int = 0
    external_port: int = 0
    external_ip: str = ""


def parse_pcp(data: bytes) -> PcpResponse | None:
    """A PCP response (MAP body read when present and complete), or None."""
    if len(data) < 24 or data[0] != PCP_VERSION or not data[1] & 0x80:
        return None
    opcode = data[1] & 0x7F
    result = data[3]
    lifetime, epoch = struct.unpack_from("!II", data, 4)
    if opcode != PCP_OP_MAP or len(data) < 60:
        return PcpResponse(opcode, result, lifetime, epoch)
    nonce = data[24:36]
    protocol = data[36]
    internal, external = struct.unpack_from("!HH", data, 40)
    return PcpResponse(
        opcode, result, lifetime, epoch, nonce, protocol, internal, external, from_ip16(data[44:60])
    )


SSDP_GROUP = ("239.255.255.250", 1900)
SSDP_MAX = 2048  # one response datagram (UDA 1.1 §1.3.3: a few hundred bytes); more is not an answer


def ssdp_search(search_target: str, mx: int) -> bytes:
    if not 1 <= mx <= 5:  # UDA 1.1 §1.3.2: MX is 1 to 5
        raise ValueError(f"SSDP MX {mx}: 1 to 5 seconds")
    if not search_target or any(c in search_target for c in "\r\n"):
        raise ValueError("SSDP search target: one non-empty line")
    lines = (
        "M-SEARCH * HTTP/1.1",
        f"HOST: {SSDP_GROUP[0]}:{SSDP_GROUP[1]}",
        'MAN: "ssdp:discover"',
        f"MX: {mx}",
        f"ST: {search_target}",
    )
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


def parse_ssdp_location(data: bytes, search_target: str) -> str | None:
    """The LOCATION of a search response for ``search_target`` (an ``http://`` URL), or None."""
    if len(data) > SSDP_MAX:
        return None
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        return None
    head, sep, _ = text.partition("\r\n\r\n")
    if not sep:
        return None
    status, *fields = head.split("\r\n")
    parts = status.split(None, 2)
    if len(parts) < 2 or parts[0].upper() != "HTTP/1.1" or parts[1] != "200":
        return None
    headers: dict[str, str] = {}
    for line in fields:
        name, colon, value = line.partition(":")
        if not colon or not name.strip():
            return None
        headers.setdefault(name.strip().lower(), value.strip())
    location = headers.get("location", "")
    if headers.get("st") != search_target or not location:
        return None
    try:
        url = urlsplit(location)
        url.port  # noqa: B018 - raises on a port out of range
    except ValueError:
        return None
    if url.scheme != "http" or not url.hostname:
        return None
    return location
