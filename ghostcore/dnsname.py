"""DNS names and resolver addresses as ghostmesh sends them and ghostlink serves them. PURE (no I/O).

Two doors, as in :mod:`ghostcore.addr`: :func:`normalize_domain` and :func:`normalize_server` take what a
person wrote in ``ghostmesh.toml`` (any case, one trailing dot, a bare IP) and return the canonical form;
:func:`parse_domain` and :func:`parse_server` take what arrives in a map and refuse anything not already
canonical, so ghostmesh and ghostlink never disagree about what a name means.

Canonical domain: lower case, no trailing dot, dot-separated labels of letters, digits and ``-`` (not at
either end), 1..63 characters each, 253 in all (RFC 1035 section 2.3.4; RFC 1123 section 2.1 allows a
leading digit). A label that is all digits may not be last (it would read as an address).
Canonical server: ``ip:port`` / ``[ip6]:port`` as :func:`ghostcore.addr.format_endpoint` prints it.

:func:`node_label` maps a node's name to the DNS label it is answered under, or None when the name is
not one (such a node is simply not in DNS).
"""

from __future__ import annotations

import re

from ghostcore.addr import (
    AddressError,
    HostPort,
    format_endpoint,
    normalize_ip,
    parse_endpoint,
    split_hostport,
)
from ghostcore.errors import InvalidArgument

DNS_PORT = 53
# Where every node's resolver listens (as Tailscale's does): never handed out to a node.
RESOLVER_V4 = "100.100.100.100"
RESOLVER_V6 = "fd7a:115c:a1e0::53"
_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")
_NAME_MAX = 253


class DomainError(InvalidArgument):
    """A malformed or non-canonical domain name."""


def _valid(name: str) -> bool:
    if not name or len(name) > _NAME_MAX or not name.isascii():
        return False
    labels = name.split(".")
    return all(_LABEL.fullmatch(label) for label in labels) and not labels[-1].isdigit()


def normalize_domain(text: str, where: str) -> str:
    """A domain name written by a person -> canonical (lower case, no trailing dot); or DomainError."""
    name = text.lower()
    name = name.removesuffix(".")
    if not _valid(name):
        raise DomainError(
            f"{where}: expected a DNS name such as mesh.example (letters, digits, '-', dot-separated "
            f"labels of 1-63 characters), got {text[:80]!r}"
        )
    return name


def parse_domain(text: str, where: str = "domain") -> str:
    """A domain name from the wire: must be canonical already; or DomainError."""
    if not _valid(text):
        raise DomainError(f"{where}: not a canonical DNS name: {text[:80]!r}")
    return text


def in_domain(name: str, domain: str) -> bool:
    """``name`` is ``domain`` or a name under it (both canonical)."""
    return name == domain or name.endswith("." + domain)


def node_label(name: str) -> str | None:
    """The label a node named ``name`` is answered under (lower-cased), or None if it cannot be one."""
    label = name.lower()
    return label if _LABEL.fullmatch(label) and not label.isdigit() else None


def normalize_server(text: str, where: str) -> str:
    """A resolver written by a person: ``ip`` (port 53), ``ip:port`` or ``[ip6]:port`` -> canonical
    ``ip:port``; or AddressError naming ``where``."""
    expected = 'an IP address, "ip:port" or "[ip6]:port"'
    try:
        return format_endpoint(normalize_ip(text), DNS_PORT)
    except AddressError:
        pass
    try:
        host, port = split_hostport(text, where, ip_only=True)
    except AddressError:
        port = 0
    if port == 0:
        raise AddressError(where, text, expected)
    return format_endpoint(host, port)


def parse_server(text: str, where: str = "server") -> HostPort:
    """A resolver from the wire (canonical ``ip:port``) -> (ip, port); or AddressError."""
    return parse_endpoint(text, where)
