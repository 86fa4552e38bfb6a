"""Addresses, prefixes and endpoints: the one strict parser and formatter every ghost* program uses.

Text that names an address crosses trust boundaries here: a node's status report into ghostmesh, the map
into ghostlink, ghostlink's plan into WireGuard's UAPI text protocol (``key=value`` lines,
wireguard.com/xplatform), ``ip`` and ``nft -f`` scripts. A value that is valid to Python's
:mod:`ipaddress` can still break those formats: ``ipaddress`` accepts an IPv6 zone ID (RFC 4007 section
11, ``fe80::1%eth0``) whose text may hold a newline, ``=`` or ``;``. So every address that enters from
outside goes through one of two doors:

* **wire** (:func:`parse_ip`, :func:`parse_prefix`, :func:`parse_endpoint`): what a program receives from
  another program must already be in canonical form, exactly as :func:`format_endpoint` and
  ``str(ipaddress...)`` print it: IPv4 dotted quad without leading zeros, IPv6 lower case and compressed
  as RFC 5952 section 4 says, a prefix without host bits, a port 1..65535. Anything else is refused, not
  repaired: two programs must never disagree about what a string means.
* **human** (:func:`normalize_ip`, :func:`normalize_prefix`, :func:`split_hostport`): config files and
  policy files may write ``FD7A:115C::1`` or ``10.1.1.7/24``; these return the canonical form (or keep a
  host name in ``host:port``), and refuse the same dangerous inputs.

Both doors refuse: non-ASCII, whitespace and control characters, zone IDs, and IPv6 text with an embedded
IPv4 part (``::ffff:1.2.3.4``: Python releases print such addresses differently, so they have no stable
canonical form; no overlay or endpoint needs them). Errors are :class:`AddressError`, an
``InvalidArgument`` whose message names what was parsed and quotes a truncated, escaped copy of the text.

``HostPort`` is the one ``(host, port)`` tuple type of the code base (sockets use it as is).

This module is pure: no sockets, no I/O.
"""

from __future__ import annotations

import ipaddress
import re
import urllib.parse

from ghostcore.errors import InvalidArgument

HostPort = tuple[str, int]
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# RFC 1123 section 2.1 host names: labels of letters, digits and '-', not starting or ending with '-'.
_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
_HOSTNAME_MAX = 253
_SHOW = 60  # characters of a refused value quoted in an error


def _quote(text: str) -> str:
    return repr(text[:_SHOW] + ("…" if len(text) > _SHOW else ""))


class AddressError(InvalidArgument):
    """A malformed or non-canonical address, prefix or endpoint; ``expected`` says what would do."""

    def __init__(self, what: str, text: str, expected: str) -> None:
        super().__init__(f"invalid {what} {_quote(text)}: expected {expected}")
        self.text = text
        self.expected = expected

    def for_key(self, where: str) -> str:
        """The message for a config key: ``<where>: expected …, got '…'``."""
        return f"{where}: expected {self.expected}, got {_quote(self.text)}"


def _bad(what: str, text: str, expected: str) -> AddressError:
    return AddressError(what, text, expected)


def _clean(text: str, what: str, expected: str) -> None:
    """ASCII, printable, no whitespace, no zone ID, no IPv6-embedded IPv4: or AddressError."""
    if (
        not text
        or not text.isascii()
        or not text.isprintable()
        or any(c.isspace() for c in text)
        or "%" in text
    ):
        raise _bad(what, text, expected)


def _ip(text: str, what: str, expected: str) -> IPAddress:
    _clean(text, what, expected)
    if ":" in text and "." in text:
        raise _bad(what, text, expected + " (IPv6 with an embedded IPv4 part is not accepted)")
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        raise _bad(what, text, expected) from None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        # Python 3.13 prints these with dots, 3.11 in hex: no canonical text two versions agree on.
        raise _bad(what, text, expected + " (IPv4-mapped IPv6 addresses are not accepted)")
    return ip


def parse_ip(text: str, what: str = "address") -> IPAddress:
    """A canonical IPv4 or IPv6 address (``str(result) == text``), or AddressError."""
    expected = "a canonical IPv4 or IPv6 address, e.g. 100.64.0.1 or fd7a:115c:a1e0::1"
    ip = _ip(text, what, expected)
    if str(ip) != text:
        raise _bad(what, text, f"its canonical form {str(ip)!r}")
    return ip


def normalize_ip(text: str, what: str = "address") -> str:
    """An IPv4 or IPv6 address written by a person -> its canonical text, or AddressError."""
    return str(_ip(text, what, "an IPv4 or IPv6 address, e.g. 100.64.0.1 or fd7a:115c:a1e0::1"))


def _network(text: str, what: str, expected: str, *, strict: bool) -> IPNetwork:
    _clean(text, what, expected)
    addr, sep, length = text.partition("/")
    if not sep or not length.isdigit() or (len(length) > 1 and length[0] == "0"):
        raise _bad(what, text, expected)
    _ip(addr, what, expected)
    try:
        return ipaddress.ip_network(text, strict=strict)
    except ValueError as exc:
        if "host bits" in str(exc):
            net = ipaddress.ip_network(text, strict=False)
            raise _bad(what, text, f"a prefix without host bits, e.g. {net}") from None
        raise _bad(what, text, expected) from None


def parse_prefix(text: str, what: str = "prefix") -> IPNetwork:
    """A canonical prefix ``addr/len`` without host bits (``str(result) == text``), or AddressError."""
    expected = "a canonical prefix such as 10.1.1.0/24 or fd7a:115c:a1e0::1/128"
    net = _network(text, what, expected, strict=True)
    if str(net) != text:
        raise _bad(what, text, f"its canonical form {str(net)!r}")
    return net


def normalize_prefix(text: str, what: str = "prefix", *, host_bits: bool = False) -> str:
    """A prefix written by a person -> canonical text; ``host_bits`` lets ``10.1.1.7/24`` mean 10.1.1.0/24.

    A bare address is refused here (callers that accept one as a /32 or /128 say so themselves).
    """
    expected = "a prefix such as 10.1.1.0/24 or fd7a:115c:a1e0::/48"
    return str(_network(text, what, expected, strict=not host_bits))


def host_prefix(ip: IPAddress) -> str:
    """The single-address prefix of ``ip``: ``100.64.0.1/32``, ``fd7a:115c:a1e0::1/128``."""
    return f"{ip}/{ip.max_prefixlen}"


def url_host(host: str) -> str:
    """``host`` as a URL or an endpoint writes it: an IPv6 address in brackets (RFC 3986 section 3.2.2)."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def format_endpoint(host: str, port: int) -> str:
    """``host:port`` with :func:`url_host`'s host: ``ip:port``, ``[ip6]:port``, a host name as it is.

    The one formatter of endpoints, bind addresses and dial targets: the inverse of
    :func:`split_hostport`, and for a canonical IP of :func:`parse_endpoint`. It checks nothing.
    """
    return f"{url_host(host)}:{port}"


def grpc_peer(peer: str) -> tuple[str, str]:
    """A gRPC peer string as (kind, host): ``ipv4:192.0.2.1:5000`` -> ``("ipv4", "192.0.2.1")``,
    ``ipv6:[2001:db8::1]:5000`` -> ``("ipv6", "2001:db8::1")``, ``unix:/run/x`` -> ``("unix", "/run/x")``;
    any other kind with the rest as it is. gRPC percent-escapes what it puts there; that is undone."""
    kind, _, rest = urllib.parse.unquote(peer).partition(":")
    if kind in ("ipv4", "ipv6"):
        rest = rest.rpartition(":")[0].strip("[]")
    return kind, rest


def grpc_peer_of(host: str, port: int) -> str:
    """The gRPC peer string of a client at ``host``, ``port`` (``ipv4:1.2.3.4:5``, ``ipv6:[::1]:5``)."""
    return f"{'ipv6' if ':' in host else 'ipv4'}:{format_endpoint(host, port)}"


def _port(text: str, what: str, whole: str, expected: str, *, allow_zero: bool) -> int:
    if not text.isdigit() or (len(text) > 1 and text[0] == "0") or len(text) > 5:
        raise _bad(what, whole, expected)
    port = int(text)
    if port > 65535 or (port == 0 and not allow_zero):
        raise _bad(what, whole, expected)
    return port


def parse_endpoint(text: str, what: str = "endpoint") -> HostPort:
    """A canonical ``ip:port`` / ``[ip6]:port`` (port 1..65535) -> (ip, port), or AddressError.

    The address must be one a packet can be sent to: not unspecified (0.0.0.0, ::) and not multicast.
    """
    expected = "ip:port or [ip6]:port in canonical form, port 1..65535"
    _clean(text, what, expected)
    host, sep, port_text = text.rpartition(":")
    if not sep:
        raise _bad(what, text, expected)
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if ":" not in host:
            raise _bad(what, text, expected)
    elif ":" in host:
        raise _bad(what, text, expected)
    ip = _ip(host, what, expected)
    port = _port(port_text, what, text, expected, allow_zero=False)
    if ip.is_unspecified or ip.is_multicast or format_endpoint(str(ip), port) != text:
        raise _bad(what, text, expected)
    return str(ip), port


def is_hostname(text: str) -> bool:
    """An RFC 1123 host name (letters, digits, '-'; dot-separated labels of 1..63; at most 253)."""
    if not text or len(text) > _HOSTNAME_MAX or text.isdigit():
        return False
    labels = text.split(".")
    return all(_LABEL.fullmatch(label) for label in labels) and not labels[-1].isdigit()


def split_hostport(text: str, what: str = "address", *, ip_only: bool = False) -> HostPort:
    """``host:port`` written by a person (config, command line) -> (host, port), port 0..65535.

    ``host`` is an IPv4 address, a bracketed IPv6 address (returned canonical, without brackets) or,
    unless ``ip_only``, an RFC 1123 host name. AddressError otherwise.
    """
    expected = (
        'IP:port (e.g. "0.0.0.0:7777" or "[::]:7777")'
        if ip_only
        else 'host:port (e.g. "203.0.113.1:7777", "[2001:db8::1]:7777" or "mesh.example.com:7777")'
    )
    _clean(text, what, expected)
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise _bad(what, text, expected)
    port = _port(port_text, what, text, expected, allow_zero=True)
    if host.startswith("[") or host.endswith("]"):
        if not (host.startswith("[") and host.endswith("]")) or ":" not in host:
            raise _bad(what, text, expected)
        return normalize_ip(host[1:-1], what), port
    if ":" in host:
        raise _bad(what, text, expected + "; an IPv6 address must be in brackets")
    try:
        return normalize_ip(host, what), port
    except AddressError:
        if ip_only or not is_hostname(host):
            raise _bad(what, text, expected) from None
        return host.lower(), port
