"""What a running node says about itself to ghostctl: frozen values the daemon builds on each request
(:meth:`ghostlink.daemon.Daemon.status`, :meth:`~ghostlink.daemon.Daemon.peers`,
:meth:`~ghostlink.daemon.Daemon.netcheck`, :meth:`~ghostlink.daemon.Daemon.ping`) and
:mod:`ghostlink.localapi` turns into ``local.proto``; and :func:`resolve_peer`, how ``ghostctl ping``
names a peer."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from ghostcore.addr import AddressError, parse_ip
from ghostcore.errors import InvalidArgument, NotFound
from ghostlink.engine import NodeInfo
from ghostlink.traversal.path_core import PeerPath
from ghostlink.traversal.proxy_core import RelayStatus
from ghostlink.traversal.stun_core import NetcheckResult


@dataclass(frozen=True)
class LockView:
    """Node-key signing as this node sees it, and what it refused of the map (:mod:`ghostlink.trust`)."""

    enabled: bool = False
    key_signed: bool = False
    request: str = ""  # "nodekey:…": what an admin signs for this node
    trusted: tuple[str, ...] = ()  # "lockkey:…"
    refused: tuple[str, ...] = ()  # what the current map had refused, one line each
    refused_total: int = 0


@dataclass(frozen=True)
class NodeStatus:
    """The node as ``ghostctl status`` shows it."""

    server: str
    interface: str
    backend: str
    node_key: str  # base64 public key in use
    connected: bool
    last_error: str
    last_map_unix: int
    listen_port: int
    map_serial: int
    sessions: int  # Sync streams opened
    self_node: NodeInfo | None
    lock: LockView = field(default_factory=LockView)


@dataclass(frozen=True)
class PeerStatus:
    """One peer as ``ghostctl peers`` shows it: the map's record, WireGuard's view, and the path."""

    node: NodeInfo
    endpoint: str
    latest_handshake_unix: int
    rx_bytes: int
    tx_bytes: int
    path: PeerPath
    via: str = ""  # a device: the name of its gateway node (this node's own name on the gateway)


@dataclass(frozen=True)
class Netcheck:
    """``ghostctl netcheck``: STUN from WireGuard's port to every region, and how the home is reached."""

    result: NetcheckResult
    relay: RelayStatus


@dataclass(frozen=True)
class PingResult:
    """One ``ghostctl ping`` echo: the peer, the address pinged, the round trip (None: no answer within
    the timeout), and the path WireGuard's packets for that peer take, read right after the echo."""

    node: NodeInfo
    address: str
    rtt: float | None
    endpoint: str
    path: PeerPath


def resolve_peer(peers: Iterable[NodeInfo], ref: str) -> tuple[NodeInfo, str]:
    """The peer ``ref`` names (its name, one of its overlay addresses, or its node key) and the overlay
    address to ping: the one named, else its first IPv4 address, else its first address."""
    ref = ref.strip()
    if not ref:
        raise InvalidArgument("ping: no peer given; name one by its name, overlay address or node key")
    try:
        ip = parse_ip(ref, "peer")
    except AddressError:
        ip = None
    for node in peers:
        if ip is not None:
            for a in node.addresses:
                if parse_ip(a) == ip:
                    return node, a
            continue
        if ref in (node.name, node.node_key) and node.addresses:
            v4 = [a for a in node.addresses if parse_ip(a).version == 4]
            return node, (v4 or list(node.addresses))[0]
    raise NotFound(
        f"ping: no peer {ref!r} among this node's peers; 'ghostctl peers' lists their names and addresses"
    )


@dataclass(frozen=True)
class DnsStatus:
    """The node resolver as ``ghostctl dns status`` shows it (:mod:`ghostlink.magicdns`)."""

    accept_dns: bool  # the host is pointed at the resolver when the map carries DNS settings
    configured: bool  # the map carries DNS settings
    magic_dns: bool
    base_domain: str
    names: int  # node names answered, this node included
    extra_records: int
    split: tuple[tuple[str, tuple[str, ...]], ...]  # (domain, ("ip:port", ...))
    upstreams: tuple[str, ...]
    upstreams_source: str  # "map", "host" or "none"
    search_domains: tuple[str, ...]
    listen: tuple[str, ...]  # "ip:port"
    host_mode: str  # "resolv.conf", "systemd-resolved" or "" (the host is left alone)
    host_detail: str
    refused: tuple[str, ...]  # what of the map's DNS settings was left out, one line each
    queries: int
    forwarded: int
    dropped: int
