"""The node's reconcile core, pure: peer map -> desired state -> plan of differences.

Three steps, all sans-IO (no sockets, no netlink, no clock):

1. ``NetMap.apply(update)`` folds ``coordination_pb2.MapUpdate`` messages into the node's view of the
   mesh: a ``full`` update replaces everything, a delta upserts / removes peers. Serials must strictly
   increase within a stream (``coordination.proto``: "1 is the full map"); ``begin_stream()`` resets the
   expectation on reconnect while keeping the last map, so the mesh keeps running on it meanwhile.
2. ``desired_state(netmap)`` computes what the WireGuard device, addresses and routes should be.
3. ``plan(current, desired)`` lists only the differences, per peer and per field, the way Tailscale's
   ``wgengine.Reconfig`` does: an unchanged peer appears nowhere in a plan, so applying a plan never
   touches (and never resets the session of) a peer the change does not concern.
"""

from __future__ import annotations

import contextlib
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from ghostcore.addr import AddressError, parse_endpoint, parse_ip
from ghostcore.errors import InvalidArgument, ProtocolError
from ghostcore.keys import PublicKey
from ghostcore.pb.ghostmesh.v1 import coordination_pb2

DEFAULT_KEEPALIVE = 25  # seconds; WireGuard's whitepaper suggests 25 s to keep NAT mappings alive


@dataclass(frozen=True)
class NodeInfo:
    """An immutable copy of a ``coordination_pb2.Node`` (protobuf messages are mutable)."""

    id: int
    name: str
    user: str
    node_key: str
    addresses: tuple[str, ...]
    allowed_ips: tuple[str, ...]
    endpoints: tuple[str, ...]
    online: bool
    last_seen_unix: int
    expires_unix: int
    primary_routes: tuple[str, ...] = ()  # subnet routes this node is the primary router for
    exit_node: bool = False
    home_region: int = 0  # relay region the node is connected to (0: none)
    turn_relay: str = ""  # its TURN relayed address, "" none
    key_signature: bytes = field(default=b"", repr=False)  # node-key signing: ghostcore.lock chain
    via: int = 0  # a device (a stock WireGuard peer running no ghostlink): its gateway's id; 0: a node
    device_prefixes: tuple[str, ...] = ()  # a gateway: its devices' /32 and /128 (also in allowed_ips)

    @property
    def is_device(self) -> bool:
        return self.via != 0

    @classmethod
    def from_pb(cls, n: coordination_pb2.Node) -> NodeInfo:
        return cls(
            id=n.id,
            name=n.name,
            user=n.user,
            node_key=n.node_key,
            addresses=tuple(n.addresses),
            allowed_ips=tuple(n.allowed_ips),
            endpoints=tuple(n.endpoints),
            online=n.online,
            last_seen_unix=n.last_seen_unix,
            expires_unix=n.expires_unix,
            primary_routes=tuple(n.primary_routes),
            exit_node=n.exit_node,
            home_region=n.home_region,
            turn_relay=n.turn_relay,
            key_signature=n.key_signature,
            via=n.via,
            device_prefixes=tuple(n.device_prefixes),
        )


@dataclass(frozen=True)
class FilterSpec:
    """One inbound filter rule (an immutable ``coordination_pb2.FilterRule``), enforced by ghostlink.nft."""

    src: tuple[str, ...]
    dst: tuple[tuple[str, int, int], ...]  # (prefix, first port, last port)
    protocols: tuple[str, ...]  # empty: any

    @classmethod
    def from_pb(cls, r: coordination_pb2.FilterRule) -> FilterSpec:
        return cls(
            tuple(r.src), tuple((d.prefix, d.first_port, d.last_port) for d in r.dst), tuple(r.protocols)
        )


@dataclass(frozen=True)
class RegionInfo:
    """One relay region of the map (an immutable ``coordination_pb2.RelayRegion``)."""

    id: int
    name: str
    host: str
    stun_port: int
    quic_port: int
    tcp_port: int
    turn: bool
    tls_pin: bytes = b""  # SHA-256 of the relay certificate's SubjectPublicKeyInfo


@dataclass(frozen=True)
class RelayInfo:
    """The map's relay regions and this node's credentials for them (secrets kept out of the repr)."""

    regions: tuple[RegionInfo, ...]
    turn_username: str
    turn_password: str = field(repr=False)
    expires_unix: int = 0
    relay_token: bytes = field(default=b"", repr=False)
    fallback: tuple[str, ...] = ("ice", "turn", "stun")
    relay_static_key: bytes = b""  # the relays' X25519 public key (relay AUTH key proofs)

    @classmethod
    def from_pb(cls, m: coordination_pb2.RelayMap) -> RelayInfo:
        regions = tuple(
            RegionInfo(r.id, r.name, r.host, r.stun_port, r.quic_port, r.tcp_port, r.turn, r.tls_pin)
            for r in m.regions
        )
        return cls(
            regions,
            m.turn_username,
            m.turn_password,
            m.expires_unix,
            m.relay_token,
            tuple(m.fallback),
            m.relay_static_key,
        )


@dataclass(frozen=True)
class DnsInfo:
    """The map's DNS settings (an immutable ``coordination_pb2.DnsConfig``), as sent: the resolver core
    (:mod:`ghostlink.dns_core`) parses each value strictly and skips what does not parse."""

    magic_dns: bool
    base_domain: str
    nameservers: tuple[str, ...] = ()
    split: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (domain, servers)
    search_domains: tuple[str, ...] = ()
    extra_records: tuple[tuple[str, str, str], ...] = ()  # (name, type, value)

    @classmethod
    def from_pb(cls, m: coordination_pb2.DnsConfig) -> DnsInfo:
        return cls(
            m.magic_dns,
            m.base_domain,
            tuple(m.nameservers),
            tuple((s.domain, tuple(s.servers)) for s in m.split),
            tuple(m.search_domains),
            tuple((r.name, r.type, r.value) for r in m.extra_records),
        )


@dataclass
class NetMap:
    """The node's current map of the mesh, built from MapUpdates.

    ``filter``: the node's inbound packet filter, replaced whole whenever an update carries one (always
    on the full map). None: the server sent none (an older ghostmesh): nothing is enforced.
    """

    self_node: NodeInfo | None = None
    peers: dict[int, NodeInfo] = field(default_factory=dict)
    serial: int = 0
    keepalive: int = DEFAULT_KEEPALIVE
    has_full: bool = False  # a full map arrived on the current stream
    filter: tuple[FilterSpec, ...] | None = None
    relay: RelayInfo | None = None  # None: the server has no relay regions
    lock_log: tuple[bytes, ...] = ()  # node-key signing: the lock's signed updates as the map sends them
    dns: DnsInfo | None = None  # None: the server sends no DNS settings (the host's resolver is left alone)

    def begin_stream(self) -> None:
        """A new Sync stream starts: serials restart at 1; keep the map until the full one replaces it."""
        self.serial = 0
        self.has_full = False

    def apply(self, update: coordination_pb2.MapUpdate) -> None:
        if update.serial <= self.serial:
            raise ProtocolError(
                f"map serial went from {self.serial} to {update.serial}; serials must strictly increase"
            )
        if not update.full and not self.has_full:
            raise ProtocolError("the server sent a map delta before the full map on this stream")
        if update.full:
            if not update.HasField("self"):
                raise ProtocolError("a full map must carry the node's own record (self)")
            self.peers = {}
            self.has_full = True
            self.relay = None  # a full map without relay_map: the regions are gone
            self.lock_log = ()  # likewise the lock log (whether to believe that is ghostlink.trust's call)
            self.dns = None  # and the DNS settings
        if update.HasField("self"):
            self.self_node = NodeInfo.from_pb(update.self)
        for rid in update.peers_removed:
            self.peers.pop(rid, None)
        for p in update.peers_upserted:
            self.peers[p.id] = NodeInfo.from_pb(p)
        if update.keepalive_seconds > 0:
            self.keepalive = update.keepalive_seconds
        if update.HasField("filter"):
            self.filter = tuple(FilterSpec.from_pb(r) for r in update.filter.rules)
        if update.HasField("relay_map"):
            self.relay = RelayInfo.from_pb(update.relay_map) if update.relay_map.regions else None
        if update.HasField("lock"):
            self.lock_log = tuple(update.lock.updates)
        if update.HasField("dns"):
            # an empty one (a delta after the server's settings were removed): no DNS settings any more
            self.dns = DnsInfo.from_pb(update.dns) if update.dns.ListFields() else None
        self.serial = update.serial


@dataclass(frozen=True)
class PeerSpec:
    """One WireGuard peer as it should be."""

    public_key: str  # base64
    allowed_ips: tuple[str, ...]  # normalised, sorted
    endpoint: str | None
    keepalive: int
    dials_in: bool = False  # a device: WireGuard learns its endpoint from its handshakes, never from us


@dataclass(frozen=True)
class DesiredState:
    addresses: frozenset[str] = frozenset()  # "100.64.0.1/32", "fd7a:115c:a1e0::1/128"
    peers: dict[str, PeerSpec] = field(default_factory=dict)
    routes: frozenset[str] = frozenset()  # prefixes routed via the WireGuard interface


@dataclass(frozen=True)
class PeerUpdate:
    spec: PeerSpec  # the whole desired peer; only ``fields`` differ from what is applied
    fields: frozenset[str]  # subset of {"allowed_ips", "endpoint", "keepalive"}


@dataclass(frozen=True)
class Plan:
    peers_add: tuple[PeerSpec, ...] = ()
    peers_update: tuple[PeerUpdate, ...] = ()
    peers_remove: tuple[str, ...] = ()
    addresses_add: tuple[str, ...] = ()
    addresses_remove: tuple[str, ...] = ()
    routes_add: tuple[str, ...] = ()
    routes_remove: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return not any(
            (
                self.peers_add,
                self.peers_update,
                self.peers_remove,
                self.addresses_add,
                self.addresses_remove,
                self.routes_add,
                self.routes_remove,
            )
        )

    def touched_peers(self) -> set[str]:
        return (
            {p.public_key for p in self.peers_add}
            | {u.spec.public_key for u in self.peers_update}
            | set(self.peers_remove)
        )

    def summary(self) -> str:
        """One line for debug logs (keys shortened; no secrets exist in a plan)."""

        def keys(ks: list[str]) -> str:
            return ",".join(k[:8] for k in ks) or "-"

        upd = ",".join(f"{u.spec.public_key[:8]}({'+'.join(sorted(u.fields))})" for u in self.peers_update)
        return (
            f"peers +[{keys([p.public_key for p in self.peers_add])}] ~[{upd or '-'}] "
            f"-[{keys(list(self.peers_remove))}] "
            f"addrs +{list(self.addresses_add)} -{list(self.addresses_remove)} "
            f"routes +{len(self.routes_add)} -{len(self.routes_remove)}"
        )


def _prefix(text: str) -> str:
    return str(ipaddress.ip_network(text, strict=False))


def _host_prefix(addr: str) -> str:
    ip = ipaddress.ip_address(addr)
    return f"{ip}/{ip.max_prefixlen}"


EXIT_PREFIXES = frozenset({"0.0.0.0/0", "::/0"})


def chosen_exit(nm: NetMap, exit_node: str) -> NodeInfo | None:
    """The peer named (or numbered) ``exit_node`` if it is an approved exit node in the map, else None."""
    if not exit_node:
        return None
    for p in nm.peers.values():
        if exit_node in (p.name, str(p.id)) and p.exit_node:
            return p
    return None


def endpoint_hosts(nm: NetMap) -> frozenset[str]:
    """The underlay addresses of every peer's endpoints and of the relays (never routed into the tunnel).

    Malformed endpoints and relay hosts given by name are skipped: only addresses can be routed around.
    """
    out: set[str] = set()
    for ep in (e for p in nm.peers.values() for e in (*p.endpoints, p.turn_relay) if e):
        with contextlib.suppress(AddressError):
            out.add(parse_endpoint(ep)[0])
    for g in nm.relay.regions if nm.relay is not None else ():
        with contextlib.suppress(AddressError):
            out.add(str(parse_ip(g.host, "relay host")))
    return frozenset(out)


def reassert_plan(
    applied: DesiredState, current: Mapping[str, str | None], chosen: Mapping[str, str]
) -> Plan:
    """The endpoints to set again because WireGuard roamed away from the path traversal chose.

    ``chosen``: peer key -> the endpoint traversal chose (direct candidate or relay proxy socket);
    ``current``: peer key -> the endpoint WireGuard reports now. A peer is stale when what was applied is
    the chosen endpoint and WireGuard moved elsewhere (a relayed packet during a switch, or a stray direct
    one). Only the endpoint is set again, so the session is kept; peers traversal did not choose an
    endpoint for roam as WireGuard likes.
    """
    stale = tuple(
        spec
        for key, spec in applied.peers.items()
        if spec.endpoint is not None
        and chosen.get(key) == spec.endpoint
        and key in current
        and current[key] not in (None, spec.endpoint)
    )
    return Plan(peers_update=tuple(PeerUpdate(s, frozenset({"endpoint"})) for s in stale))


def desired_state(
    nm: NetMap, exit_node: str = "", endpoints: Mapping[str, str] | None = None
) -> DesiredState:
    """What the device should look like for ``nm``. Malformed peers are skipped (the server validates).

    ``endpoints`` (peer key -> "ip:port") is the path choice of NAT traversal (ghostlink.traversal): a
    direct endpoint that passed connectivity checks, or the local relay proxy's socket. A peer not in it
    keeps the first endpoint the map lists (no relays configured: the behaviour of a plain routed network).

    An exit node's 0.0.0.0/0 and ::/0 are kept only on the peer chosen with ``exit_node`` (see
    :func:`chosen_exit`) and never become routes here: ghostlink.exitroute installs the default routes
    in a table of their own, so they cannot capture the traffic to ghostmesh and to the peers.

    A device (``NodeInfo.via``) is a WireGuard peer only of its gateway, with no endpoint (it dials in:
    WireGuard learns where it is from its handshake); to every other node it is a name and addresses
    reached through the gateway, whose allowed IPs carry them.
    """
    if nm.self_node is None:
        return DesiredState()
    exit_peer = chosen_exit(nm, exit_node)
    addresses = frozenset(_host_prefix(a) for a in nm.self_node.addresses)
    peers: dict[str, PeerSpec] = {}
    routes: set[str] = set()
    for p in sorted(nm.peers.values(), key=lambda n: n.id):
        try:
            key = PublicKey.from_base64(p.node_key).base64()
            prefixes = {_prefix(a) for a in p.allowed_ips}
        except (InvalidArgument, ValueError):
            continue
        if key == nm.self_node.node_key:
            continue  # never peer with ourselves, whatever the server says
        if p.is_device and p.via != nm.self_node.id:
            continue
        endpoint = (endpoints or {}).get(key) or (p.endpoints[0] if p.endpoints else None)
        if p.is_device:
            endpoint = None
        routed = prefixes - EXIT_PREFIXES
        allowed = tuple(sorted(prefixes if p is exit_peer else routed))
        peers[key] = PeerSpec(
            public_key=key,
            allowed_ips=allowed,
            endpoint=endpoint,
            keepalive=nm.keepalive,
            dials_in=p.is_device,
        )
        routes.update(routed)
    return DesiredState(addresses=addresses, peers=peers, routes=frozenset(routes))


def plan(current: DesiredState, desired: DesiredState) -> Plan:
    """Only the differences between ``current`` (applied) and ``desired``.

    An endpoint that becomes unknown (None) is not a change: UAPI cannot unset an endpoint, and
    WireGuard's own roaming (it learns a peer's address from authenticated packets) keeps it right.

    A peer gets its persistent keepalive together with its first endpoint, not before: WireGuard (kernel
    and wireguard-go) sends a keepalive, so a handshake initiation, the moment a peer's keepalive goes
    from off to on. Without an endpoint that initiation goes nowhere, and WireGuard then sends the next
    one only after REKEY_TIMEOUT (5 s, whitepaper §6.4): a peer whose endpoint came a moment after the
    peer itself (a new node's, once its first status report reached the map) waited 5 s for its first
    packet. With the endpoint, it is the initiation that opens the session at once.
    """
    add: list[PeerSpec] = []
    update: list[PeerUpdate] = []
    for key in sorted(desired.peers):
        want = desired.peers[key]
        have = current.peers.get(key)
        unarmed = want.endpoint is None and not want.dials_in  # see the docstring
        if have is None:
            add.append(replace(want, keepalive=0) if unarmed else want)
            continue
        if unarmed and have.endpoint is None and have.keepalive == 0:
            want = replace(want, keepalive=0)
        changed = set()
        if want.allowed_ips != have.allowed_ips:
            changed.add("allowed_ips")
        if want.endpoint is not None and want.endpoint != have.endpoint:
            changed.add("endpoint")
        if want.keepalive != have.keepalive:
            changed.add("keepalive")
        if changed:
            update.append(PeerUpdate(spec=want, fields=frozenset(changed)))
    remove = tuple(sorted(k for k in current.peers if k not in desired.peers))
    return Plan(
        peers_add=tuple(add),
        peers_update=tuple(update),
        peers_remove=remove,
        addresses_add=tuple(sorted(desired.addresses - current.addresses)),
        addresses_remove=tuple(sorted(current.addresses - desired.addresses)),
        routes_add=tuple(sorted(desired.routes - current.routes)),
        routes_remove=tuple(sorted(current.routes - desired.routes)),
    )


def applied_after(current: DesiredState, p: Plan) -> DesiredState:
    """The state once ``p`` has been applied to ``current`` (endpoint None keeps the old endpoint)."""
    peers = dict(current.peers)
    for k in p.peers_remove:
        peers.pop(k, None)
    for s in p.peers_add:
        peers[s.public_key] = s
    for u in p.peers_update:
        old = peers.get(u.spec.public_key)
        endpoint = u.spec.endpoint if "endpoint" in u.fields or old is None else old.endpoint
        peers[u.spec.public_key] = replace(u.spec, endpoint=endpoint)
    return DesiredState(
        addresses=(current.addresses - set(p.addresses_remove)) | set(p.addresses_add),
        peers=peers,
        routes=(current.routes - set(p.routes_remove)) | set(p.routes_add),
    )
