"""What of a map this node agrees to install: the node's own check of everything ghostmesh sends (pure).

ghostmesh may be compromised, or a bug may put nonsense in a map; WireGuard, ``ip`` and ``nft`` would
install whatever they are given, and a peer whose allowed IPs cover the internet captures all of this
node's traffic. So before anything reaches the engine, :func:`admit` keeps only what makes sense for this
node and says what it refused and why (the daemon logs and counts each refusal; the rest of the map
still applies):

* **A peer whole** is refused when its record is malformed (a key that is not a WireGuard key; an address,
  endpoint or TURN address that is not canonical, ``ghostcore.addr``'s wire rules: no zone IDs, no
  whitespace or control characters), when its key is ours or another admitted peer's, and, with
  node-key signing on, when no valid signature vouches for its key (``ghostcore.lock``). A refused record
  of a peer this node had admitted before leaves that earlier record in force: a swapped key or a broken
  endpoint changes nothing in WireGuard (only a removal in the map removes a peer).
* **One allowed IP** of an admitted peer is refused unless it is one of:
  - the peer's own overlay addresses (each a single unicast address, not ours, not another peer's);
  - ``0.0.0.0/0`` / ``::/0`` from the exit node this node chose (``--exit-node``);
  - a subnet route, only when this node opted in (``--accept-routes``, as ``tailscale up
    --accept-routes``), only if ghostmesh names the peer its primary router for it, only if it is at
    least a /8 (IPv4) or /16 (IPv6) (anything wider carries internet traffic: an exit node's job), and
    never overlapping this node's own addresses. If the admitted routes of one family together cover
    more than a sixteenth of it (sixteen /8s: far beyond private ranges plus some public blocks, and
    what a set built to replace a default route looks like), all of them are refused.
* **Devices** (stock WireGuard peers behind a gateway node, ``NodeInfo.via``): a gateway's
  ``device_prefixes`` are admitted in its allowed IPs like addresses of its own (each the host prefix of
  one unicast address, not ours, not another peer's), with no ``--accept-routes`` needed: a device is a
  member of the mesh, not a network behind it. A device's record is admitted only if its gateway's
  admitted record carries each of its addresses; on the gateway itself, only if this node's own record
  lists them. Nobody but the gateway installs it as a WireGuard peer (:func:`ghostlink.engine.desired_state`).
* **A filter rule** with a non-canonical prefix, a port out of range or a protocol that is not the
  canonical text of :mod:`ghostcore.ipproto` (``tcp``, ``ipv6-icmp``, ``gre``, ``99``...) is dropped
  whole (the filter fails closed: fewer packets are accepted, never more).
* **A relay region** whose host is not a canonical IP address or whose ports are out of range is dropped,
  and so is one with relay ports but no 32-byte TLS pin, or with relay ports while the map's relay static
  key is not an X25519 public key (the node could neither check the relay nor authenticate to it).

With signing on, a signature also carries a sequence number per signing key (``ghostcore.lock``
rotations); a peer presenting a lower one than this node has seen for that key (a superseded key,
replayed) is refused. That memory lives in :class:`SeqMemory`, owned by the caller.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

from ghostcore import addr, lock
from ghostcore import ipproto as protocols
from ghostcore.errors import InvalidArgument
from ghostcore.keys import PublicKey
from ghostlink.engine import EXIT_PREFIXES, FilterSpec, NetMap, NodeInfo, RegionInfo, RelayInfo, chosen_exit

MIN_ROUTE_PREFIX = {4: 8, 6: 16}  # a subnet route must be at least this long
MAX_ROUTED_SHARE = 16  # all subnet routes together may cover at most 1/16 of an address family


@dataclass(frozen=True)
class Refusal:
    """One thing the node did not install: whose (peer name or "filter"/"relay map"), what, why."""

    who: str
    what: str
    why: str

    def line(self) -> str:
        return f"{self.who}: {self.what}: {self.why}"


@dataclass
class SeqMemory:
    """Highest rotation sequence seen per signing key, for this run (refuses superseded signatures)."""

    seen: dict[bytes, int] = field(default_factory=dict)
    MAX_KEYS = 65536  # bounded: the memory restarts empty when a hostile map floods it with signers

    def check(self, verified: lock.Verified) -> bool:
        best = self.seen.get(verified.signer, -1)
        if verified.seq < best:
            return False
        if len(self.seen) >= self.MAX_KEYS and verified.signer not in self.seen:
            self.seen.clear()
        self.seen[verified.signer] = verified.seq
        return True


@dataclass(frozen=True)
class Policy:
    """This node's choices that decide what it accepts."""

    exit_node: str = ""  # name or id of the peer chosen as exit node ("": none)
    accept_routes: bool = False


def _peer_record(p: NodeInfo) -> str | None:
    """Why ``p``'s record is malformed, or None."""
    try:
        PublicKey.from_base64(p.node_key)
        for a in p.addresses:
            addr.parse_ip(a, "address")
        for e in p.endpoints:
            addr.parse_endpoint(e)
        if p.turn_relay:
            addr.parse_endpoint(p.turn_relay, "TURN address")
        for r in (*p.allowed_ips, *p.primary_routes, *p.device_prefixes):
            addr.parse_prefix(r, "allowed IP")
    except InvalidArgument as exc:
        return str(exc)
    return None


def _address_ok(ip: addr.IPAddress) -> bool:
    return not (ip.is_unspecified or ip.is_loopback or ip.is_multicast or ip.is_link_local or ip.is_reserved)


class _Admitter:
    def __init__(self, nm: NetMap, policy: Policy, verifier: lock.Verifier | None, seqs: SeqMemory) -> None:
        self.nm = nm
        self.policy = policy
        self.verifier = verifier
        self.seqs = seqs
        self.refused: list[Refusal] = []
        me = nm.self_node
        self.own_key = me.node_key if me is not None else ""
        self.own_id = me.id if me is not None else 0
        self.own_devices = set(me.device_prefixes) if me is not None else set()
        self.own_ips = {ipaddress.ip_address(a) for a in me.addresses} if me is not None else set()
        self.carried: dict[str, int] = {}  # a device's host prefix -> the admitted gateway carrying it
        self.keys: set[str] = set()
        self.claimed: set[addr.IPAddress] = set()
        self.exit_peer = chosen_exit(nm, policy.exit_node)

    def refuse(self, who: NodeInfo | str, what: str, why: str) -> None:
        self.refused.append(Refusal(who if isinstance(who, str) else who.name or f"node {who.id}", what, why))

    def peer(self, p: NodeInfo) -> tuple[NodeInfo, list[str]] | None:
        """``p`` with only its admitted allowed IPs (subnet routes returned apart), or None if refused."""
        why = _peer_record(p)
        if why is not None:
            self.refuse(p, "peer", f"malformed record ({why})")
            return None
        if p.node_key == self.own_key or p.node_key in self.keys:
            self.refuse(p, "peer", "its key is this node's or another peer's")
            return None
        if self.verifier is not None and not self._signed(p, self.verifier):
            return None
        if p.is_device and not self._device_carried(p):
            return None
        self.keys.add(p.node_key)
        own: set[str] = set()
        dropped: set[str] = set()  # the host prefixes of refused addresses: refused once, as addresses
        for a in p.addresses:
            ip = addr.parse_ip(a)
            if not _address_ok(ip) or ip in self.own_ips or ip in self.claimed:
                self.refuse(p, f"address {a}", "not a unicast address of its own")
                dropped.add(addr.host_prefix(ip))
                continue
            self.claimed.add(ip)
            own.add(addr.host_prefix(ip))
        allowed, routes = [], []
        for prefix in p.allowed_ips:
            if prefix in dropped:
                continue
            if prefix in own:
                allowed.append(prefix)
            elif p.is_device:
                self.refuse(p, f"allowed IP {prefix}", "a device carries its own addresses only")
            elif prefix in p.device_prefixes:
                if why := self._device_prefix_problem(prefix):
                    self.refuse(p, f"allowed IP {prefix}", why)
                else:
                    self.carried[prefix] = p.id
                    allowed.append(prefix)
            elif prefix in EXIT_PREFIXES:
                if p is self.exit_peer:
                    allowed.append(prefix)
                elif not p.exit_node:  # an exit node this node did not choose: not installed, by choice
                    self.refuse(p, f"allowed IP {prefix}", "only the exit node this node chose carries it")
            elif why := self._route_problem(p, prefix):
                self.refuse(p, f"allowed IP {prefix}", why)
            else:
                routes.append(prefix)
        if p.is_device and p.via != self.own_id:
            allowed = []  # reached through its gateway's allowed IPs, never a peer of this node's
        return replace(p, allowed_ips=tuple(allowed)), routes

    def _device_prefix_problem(self, prefix: str) -> str | None:
        net = addr.parse_prefix(prefix)
        ip = net.network_address
        if net.prefixlen != net.max_prefixlen or not _address_ok(ip):
            return "a device's prefix must be one unicast address"
        if ip in self.own_ips or ip in self.claimed:
            return "the address is this node's or another peer's"
        self.claimed.add(ip)
        return None

    def _device_carried(self, p: NodeInfo) -> bool:
        """Whether device ``p``'s addresses are all carried by its gateway: this node's own record when
        this node is the gateway, else the admitted record of the peer ``p.via``."""
        hosts = {addr.host_prefix(addr.parse_ip(a)) for a in p.addresses}
        if p.via == self.own_id:
            if hosts and hosts <= self.own_devices:
                return True
            self.refuse(p, "device", "this node's own record does not list it as a device behind it")
            return False
        if hosts and all(self.carried.get(h) == p.via for h in hosts):
            # claimed by the gateway's record for exactly this device: its own addresses again below,
            # and for this one record only (a second device on the same addresses is refused)
            for h in hosts:
                del self.carried[h]
            self.claimed.difference_update(addr.parse_ip(a) for a in p.addresses)
            return True
        self.refuse(p, "device", "its gateway's admitted record does not carry its addresses")
        return False

    def still_trusted(self, earlier: NodeInfo) -> bool:
        """Whether a record admitted before is still vouched for under the current lock (a key removed
        from the lock, or a lock turned on since, takes the peer out), and its key is not taken now."""
        if earlier.node_key == self.own_key or earlier.node_key in self.keys:
            return False
        if self.verifier is not None:
            verdict = self.verifier.check(earlier.key_signature, PublicKey.from_base64(earlier.node_key).raw)
            if isinstance(verdict, str):
                return False
        self.keys.add(earlier.node_key)
        self.claimed.update(addr.parse_ip(a) for a in earlier.addresses)
        return True

    def _signed(self, p: NodeInfo, verifier: lock.Verifier) -> bool:
        verdict = verifier.check(p.key_signature, PublicKey.from_base64(p.node_key).raw)
        if isinstance(verdict, str):
            self.refuse(p, "peer", f"node-key signing is on and {verdict}")
            return False
        if not self.seqs.check(verdict):
            self.refuse(p, "peer", "its signature is superseded by a later rotation of the same node")
            return False
        return True

    def _route_problem(self, p: NodeInfo, prefix: str) -> str | None:
        net = addr.parse_prefix(prefix)
        if not self.policy.accept_routes:
            return "a subnet route, and this node does not accept routes (--accept-routes)"
        # what no approval could make acceptable first, so the reason names the real problem
        if net.prefixlen < MIN_ROUTE_PREFIX[net.version]:
            return f"wider than /{MIN_ROUTE_PREFIX[net.version]}: only an exit node carries such traffic"
        if any(ip in net for ip in self.own_ips):
            return "it covers this node's own address"
        if prefix not in p.primary_routes:
            return "ghostmesh does not name this peer its router for it"
        return None


def _covers_too_much(prefixes: Iterable[str], version: int) -> bool:
    """Whether the ``version`` prefixes together cover more than ``1 / MAX_ROUTED_SHARE`` of the family."""
    nets = [addr.parse_prefix(x) for x in prefixes]
    collapsed: list[addr.IPNetwork]
    if version == 4:
        collapsed = list(
            ipaddress.collapse_addresses(n for n in nets if isinstance(n, ipaddress.IPv4Network))
        )
    else:
        collapsed = list(
            ipaddress.collapse_addresses(n for n in nets if isinstance(n, ipaddress.IPv6Network))
        )
    bits = 32 if version == 4 else 128
    return sum(n.num_addresses for n in collapsed) * MAX_ROUTED_SHARE > 1 << bits


def _rule_problem(rule: FilterSpec) -> str | None:
    try:
        for src in rule.src:
            addr.parse_prefix(src, "filter source")
        for prefix, _, _ in rule.dst:
            addr.parse_prefix(prefix, "filter destination")
    except InvalidArgument as exc:
        return str(exc)
    if not all(0 <= first <= last <= 65535 for _, first, last in rule.dst):
        return "a port range is not within 0..65535"
    # canonical protocol text only (ghostcore.ipproto: a name, or a number 1-255 without one)
    unknown = sorted(p for p in rule.protocols if not protocols.is_canonical(p))
    return f"unknown protocol {unknown[0][:20]!r}" if unknown else None


def admit_filter(rules: tuple[FilterSpec, ...]) -> tuple[tuple[FilterSpec, ...], list[Refusal]]:
    """The filter rules that are well formed; the others dropped (fail closed)."""
    kept, refused = [], []
    for rule in rules:
        if why := _rule_problem(rule):
            refused.append(Refusal("filter", "rule", f"dropped ({why})"))
        else:
            kept.append(rule)
    return tuple(kept), refused


def _region_problem(g: RegionInfo, static_ok: bool) -> str | None:
    try:
        addr.parse_ip(g.host, "relay host")
    except InvalidArgument as exc:
        return str(exc)
    ports = (g.stun_port, g.quic_port, g.tcp_port)
    if not all(0 <= port <= 65535 for port in ports):
        return "a port is out of range"
    if g.quic_port or g.tcp_port:
        if len(g.tls_pin) != 32:
            return "relay ports without a 32-byte TLS pin"
        if not static_ok:
            return "relay ports, but the map's relay static key is not an X25519 public key"
    return None


def _static_key_ok(raw: bytes) -> bool:
    try:
        PublicKey(raw)
    except InvalidArgument:
        return False
    return True


def _admit_relay(relay: RelayInfo) -> tuple[RelayInfo, list[Refusal]]:
    kept: list[RegionInfo] = []
    refused = []
    static_ok = _static_key_ok(relay.relay_static_key)
    for g in relay.regions:
        if why := _region_problem(g, static_ok):
            refused.append(Refusal("relay map", f"region {g.id}", f"dropped ({why})"))
        else:
            kept.append(g)
    return replace(relay, regions=tuple(kept)), refused


def admit(
    nm: NetMap,
    policy: Policy,
    verifier: lock.Verifier | None,
    seqs: SeqMemory,
    previous: Mapping[int, NodeInfo] | None = None,
) -> tuple[NetMap, list[Refusal]]:
    """The part of ``nm`` this node installs, and what it refused (see the module docstring).

    ``verifier``: the trusted keys of this node's verified lock log, or None when signing is off.
    ``previous``: the peers admitted from the last map (by node id), kept when their new record is refused.
    """
    a = _Admitter(nm, policy, verifier, seqs)
    peers: dict[int, NodeInfo] = {}
    routes: dict[int, list[str]] = {}
    # first by id wins a clash, the same every time; devices after the nodes, whose gateways carry them
    for p in sorted(nm.peers.values(), key=lambda n: (n.is_device, n.id)):
        got = a.peer(p)
        if got is not None:
            peers[p.id], routes[p.id] = got
        elif previous is not None and p.id in previous and a.still_trusted(previous[p.id]):
            peers[p.id], routes[p.id] = previous[p.id], []  # its earlier record, routes and all, stays
    for version in (4, 6):
        if _covers_too_much((r for rs in routes.values() for r in rs), version):
            for pid, rs in routes.items():
                for r in [r for r in rs if addr.parse_prefix(r).version == version]:
                    a.refuse(
                        peers[pid], f"allowed IP {r}", "the routes together cover too much of the internet"
                    )
                    rs.remove(r)
    for pid, rs in routes.items():
        peers[pid] = replace(peers[pid], allowed_ips=tuple(sorted((*peers[pid].allowed_ips, *rs))))
    out = replace(nm, peers=peers)
    if nm.filter is not None:
        rules, refused = admit_filter(nm.filter)
        out = replace(out, filter=rules)
        a.refused.extend(refused)
    if nm.relay is not None:
        relay, refused = _admit_relay(nm.relay)
        out = replace(out, relay=relay)
        a.refused.extend(refused)
    return out, a.refused
