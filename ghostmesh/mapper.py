"""Per-stream peer-map deltas: the O(change) heart of ghostmesh. PURE (no asyncio, grpc or sqlite).

Each open Sync stream has a :class:`Session` holding the delta it has not been sent yet. A change record
from :mod:`ghostmesh.state` is applied once: the changed node's protobuf ``Node`` is built once and the
same message is referenced from every affected session's pending delta, so one change costs work
proportional to the sessions it affects (:meth:`Mapper.affected_by`), never a rebuild of every node's
map (recomputing every node's map per change is what made Headscale unusable at a few hundred nodes).

Coalescing (what makes a burst cheap): pending upserts are keyed by peer id, so a later change of a peer
replaces the earlier one; a peer added and removed before the next flush cancels out; a removal followed
by an upsert (a renewed key) becomes an upsert. :meth:`Mapper.flush` turns a session's pending delta into
the next ``MapUpdate`` with ``serial + 1`` and clears it. The stream's first message is the full map
(:meth:`Mapper.open_stream`: serial 1, ``full=true``, ``self`` set, ``keepalive_seconds``).

Wire bytes, not message copies: for each visible node the mapper keeps the encoded ``peers_upserted``
field (tag, length, serialized ``Node``), made once per change. A protobuf message is a sequence of
fields and a repeated field may be written as many consecutive entries (protobuf encoding guide,
"Message Structure" and "Repeated Elements"), so a full map is the encoded header fields followed by the
concatenation of the peers' cached entries: a memcpy per peer instead of a message copy, which is what
keeps a reconnect storm of thousands of full maps affordable. ``open_stream`` / ``flush`` return parsed
``MapUpdate`` messages for tests and tools; the server sends ``open_stream_bytes`` / ``flush_bytes``.

Expired nodes never appear as peers: a node whose key expired is dropped from the view, and a change
carrying an already-expired record is treated as its removal.

ACL policy: the mapper owns a :class:`ghostcore.policy.Compiler`, and is given the policy (at
construction, then :meth:`Mapper.set_policy`) by the policy's one owner,
:class:`ghostmesh.policy_source.PolicySource`. What the policy sees of a node (user, tags, addresses,
routes, its user's OIDC groups) comes only from the records the mapper is given: :meth:`Mapper.load` at
start, then change records. Each change is first folded into the compiler, which answers which nodes
gained or lost which peers and whose inbound filter changed; a session then gets exactly those
upserts/removals, the changed node's record goes only to the sessions of the nodes that may see it
(:meth:`Mapper.affected_by`), and ``MapUpdate.filter`` is sent whole on the full map and on the next
flush after the node's filter changed. A full map lists only the node's visible peers. With
no policy every node sees every node and the filter accepts everything (the behaviour before ACLs).

Relay map (:mod:`ghostmesh.relaymap`, when relay regions are configured): minted per stream, since the
credentials name the node and its key. The full map carries one; a session's credentials are re-minted
and sent in a delta once :meth:`Mapper.refresh_relays` finds them due (a heap of refresh times, so the
hub's timer pops only the due streams), and at once when the node's key changed (a completed key
rotation: the relay token is bound to the key). Minting needs the time, so ``open_stream`` / ``flush``
take ``now`` when a relay map is configured.

Node-key signing (:mod:`ghostcore.lock`): each ``Node`` carries its ``key_signature``, and the lock log
reaches the mapper as a :class:`~ghostmesh.changes.LockChanged` record (seeded at start, then one per
accepted update). A non-empty log rides whole in every full map; when it grows, every session is marked
and gets it in its next delta: O(sessions) once, for a change an admin makes rarely. The mapper checks no
signature: nodes verify them against the log themselves, which ghostmesh cannot forge.

DNS settings (:mod:`ghostmesh.dnsmap`): the same for every node; they ride whole in every full map. The
server re-reads them from its config file on SIGHUP (:mod:`ghostmesh.reload`) and hands a changed set to
:meth:`Mapper.set_dns`, which, like a grown lock log, marks every session: each stream's next delta
carries ``dns`` once, whole (an empty ``DnsConfig`` when the settings are gone, which ghostlink reads as
"no DNS settings"). Unchanged settings mark nothing.

Why one module of about 510 lines: sessions, their pending deltas and the cached encodings they share
are one state with one owner; the policy compiler and the relay minter already live apart.
"""

from __future__ import annotations

import heapq
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from ghostcore.pb.ghostmesh.v1 import coordination_pb2 as pb
from ghostcore.policy import Compiler, Delta, Filter, NodeIdent, Policy
from ghostcore.policy.model import MESH, IPNet
from ghostmesh.changes import Change, LockChanged, NodeAdded, NodeChange, NodeRemoved, RemovalReason
from ghostmesh.relaymap import RelayMinter
from ghostmesh.store.base import NodeRec

EndReason = RemovalReason | Literal["replaced"]

_PEERS_FIELD = pb.MapUpdate.DESCRIPTOR.fields_by_name["peers_upserted"].number
_PEERS_TAG = bytes([(_PEERS_FIELD << 3) | 2])  # wire type 2: length-delimited


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low = n & 0x7F
        n >>= 7
        if n:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def peer_entry(msg: pb.Node) -> bytes:
    """``msg`` encoded as one ``MapUpdate.peers_upserted`` entry."""
    body = msg.SerializeToString()
    return _PEERS_TAG + _varint(len(body)) + body


def node_to_pb(rec: NodeRec, online: bool) -> pb.Node:
    # Routes (ghostmesh.routes): the prefixes this node is primary for, and for an exit node 0.0.0.0/0 +
    # ::/0, ride in allowed_ips; ghostlink installs an exit node's /0s only on the peer it chose as exit.
    # A gateway's devices: their host prefixes too (only the gateway routes to them).
    routed = [*rec.primary_routes, *rec.device_prefixes, *(("0.0.0.0/0", "::/0") if rec.exit_node else ())]
    return pb.Node(
        id=rec.id,
        name=rec.name,
        user=rec.user,
        node_key=rec.node_key,
        addresses=[rec.ipv4, rec.ipv6],
        allowed_ips=[f"{rec.ipv4}/32", f"{rec.ipv6}/128", *routed],
        endpoints=list(rec.endpoints),
        online=online,
        last_seen_unix=int(rec.last_seen),
        expires_unix=int(rec.expires),
        ephemeral=rec.ephemeral,
        tags=list(rec.tags),
        primary_routes=list(rec.primary_routes),
        exit_node=rec.exit_node,
        home_region=rec.home_region,
        turn_relay=rec.turn_relay,
        key_signature=rec.key_signature,
        via=rec.via,
        device_prefixes=list(rec.device_prefixes),
    )


def ident_of(rec: NodeRec, groups: frozenset[str] = frozenset()) -> NodeIdent:
    """What the policy sees of a node record; ``groups``: its user's OIDC groups."""
    addrs = (ipaddress.ip_address(rec.ipv4), ipaddress.ip_address(rec.ipv6))
    # every approved advertiser of a route is a router for the policy (a standby too), not only the primary
    routes = tuple(ipaddress.ip_network(p) for p in rec.approved_routes or rec.primary_routes)
    return NodeIdent(
        rec.id, rec.user, frozenset(rec.tags), addrs, rec.name, routes, rec.exit_node, groups, rec.via
    )


def filter_to_pb(rules: Filter) -> pb.PacketFilter:
    return pb.PacketFilter(
        rules=[
            pb.FilterRule(
                src=list(r.src),
                dst=[pb.DstRange(prefix=p, first_port=lo, last_port=hi) for p, lo, hi in r.dst],
                protocols=list(r.protos),
            )
            for r in rules
        ]
    )


@dataclass
class MapperStats:
    """Work counters, so tests can assert O(change) by counting rather than timing."""

    pb_builds: int = 0  # protobuf Node messages built
    delta_writes: int = 0  # (session, peer) pending-delta entries touched
    full_maps_sent: int = 0  # full maps written to streams (counted by the server as it sends them)
    full_map_bytes: int = 0
    deltas_sent: int = 0  # deltas written to streams
    delta_bytes: int = 0


@dataclass
class Session:
    """One open Sync stream and the delta it is owed."""

    stream_id: int
    node_id: int
    serial: int = 0
    upserts: dict[int, bytes] = field(default_factory=dict)  # peer id -> its encoded entry
    added: set[int] = field(default_factory=set)  # upserts of peers the stream has never been sent
    removed: set[int] = field(default_factory=set)
    self_dirty: bool = False
    filter_dirty: bool = False
    ended: EndReason | None = None  # set when the stream's node was deleted / expired, or a newer stream
    # of the same node replaced it
    relay_dirty: bool = False  # the relay map is to be re-minted and sent on the next flush
    relay_refresh_at: float = 0.0  # when its current relay credentials are due for re-minting
    lock_dirty: bool = False  # the lock log grew: it is sent whole on the next flush
    dns_dirty: bool = False  # the DNS settings changed: they are sent whole on the next flush

    @property
    def dirty(self) -> bool:
        return bool(
            self.upserts
            or self.removed
            or self.self_dirty
            or self.filter_dirty
            or self.relay_dirty
            or self.lock_dirty
            or self.dns_dirty
        )


class Mapper:
    """The peer view shared by all streams plus each stream's pending delta."""

    def __init__(
        self,
        keepalive_seconds: int,
        policy: Policy | None = None,
        relay: RelayMinter | None = None,
        mesh: tuple[IPNet, ...] = MESH,
        dns: pb.DnsConfig | None = None,
    ) -> None:
        self.keepalive_seconds = keepalive_seconds
        self.dns = dns  # the DNS settings every full map carries (ghostmesh.dnsmap); None: none
        self.relay = relay  # None: no relay regions configured, no relay map sent
        self.compiler = Compiler(policy, mesh=mesh)  # mesh: what ``*`` as a source covers
        self.stats = MapperStats()
        self._view: dict[int, pb.Node] = {}  # visible (unexpired) nodes, as sent to peers
        self._entries: dict[int, bytes] = {}  # the same, encoded as peers_upserted entries
        self._sessions: dict[int, Session] = {}
        self._by_node: dict[int, set[int]] = {}  # node id -> its open stream ids
        self._relay_due: list[tuple[float, int]] = []  # heap of (relay refresh time, stream id)
        self._lock: pb.LockLog | None = None  # the node-key signing log; None while it is empty

    # -- view ------------------------------------------------------------------------------------------

    def load(self, nodes: Iterable[NodeAdded], now: float) -> None:
        """Seed the view (at server start) with every node, as the records that add it; expired ones are
        skipped."""
        idents = list(self.compiler.nodes.values())
        for added in nodes:
            rec = added.node
            if not rec.expired(now):
                self._set(rec, added.online)
                idents.append(ident_of(rec, added.groups))
        # one full compile, not one per node
        self.compiler = Compiler(self.compiler.policy, idents, self.compiler.mesh)

    def _set(self, rec: NodeRec, online: bool) -> bytes:
        self.stats.pb_builds += 1
        msg = node_to_pb(rec, online)
        entry = peer_entry(msg)
        self._view[rec.id] = msg
        self._entries[rec.id] = entry
        return entry

    def visible(self, node_id: int) -> pb.Node | None:
        return self._view.get(node_id)

    def __len__(self) -> int:
        return len(self._view)

    # -- streams ---------------------------------------------------------------------------------------

    def open_stream(self, stream_id: int, node_id: int, now: float | None = None) -> pb.MapUpdate:
        """Register a stream and return its first message: the full map (serial 1).

        ``now`` (unix seconds) is required when a relay map is configured: its credentials are minted now.
        """
        return pb.MapUpdate.FromString(self.open_stream_bytes(stream_id, node_id, now))

    def open_stream_bytes(self, stream_id: int, node_id: int, now: float | None = None) -> bytes:
        """:meth:`open_stream`, encoded: what the server writes to the wire."""
        me = self._view.get(node_id)
        if me is None:
            raise KeyError(f"node {node_id} is not in the map (unknown or expired)")
        session = Session(stream_id, node_id, serial=1)
        self._sessions[stream_id] = session
        self._by_node.setdefault(node_id, set()).add(stream_id)
        head = pb.MapUpdate(serial=1, full=True, keepalive_seconds=self.keepalive_seconds)
        head.self.CopyFrom(me)
        head.filter.CopyFrom(filter_to_pb(self.compiler.filter(node_id)))
        if self.relay is not None:
            head.relay_map.CopyFrom(self._mint(self.relay, session, me.node_key, now))
        if self._lock is not None:
            head.lock.CopyFrom(self._lock)
        if self.dns is not None:
            head.dns.CopyFrom(self.dns)
        entries = self._entries
        peers = self.compiler.peers(node_id)
        if peers is None:
            body = [e for nid, e in entries.items() if nid != node_id]
        else:
            body = [entries[nid] for nid in sorted(peers) if nid in entries]
        return head.SerializeToString() + b"".join(body)

    def replace_streams(self, node_id: int) -> list[int]:
        """End every open stream of ``node_id`` (a newer one is opening): each is marked ``replaced`` and
        returned, so its handler wakes and stops. One stream per node bounds what one node can hold."""
        sids = sorted(self._by_node.get(node_id, ()))
        for sid in sids:
            self._sessions[sid].ended = "replaced"
        return sids

    def close_stream(self, stream_id: int) -> None:
        session = self._sessions.pop(stream_id, None)
        if session is None:
            return
        streams = self._by_node.get(session.node_id)
        if streams is not None:
            streams.discard(stream_id)
            if not streams:
                del self._by_node[session.node_id]

    # -- relay map -------------------------------------------------------------------------------------

    def _mint(self, relay: RelayMinter, s: Session, node_key: str, now: float | None) -> pb.RelayMap:
        """Fresh relay credentials for ``s``'s node, and its next refresh scheduled."""
        if now is None:
            raise ValueError("Mapper: `now` is required to mint relay maps (relay regions are configured)")
        relay_map = relay.mint(s.node_id, node_key, now)
        s.relay_dirty = False
        s.relay_refresh_at = relay.refresh_at(relay_map.expires_unix)
        if len(self._relay_due) > 2 * len(self._sessions) + 64:  # drop closed streams' and stale entries
            self._relay_due = [(x.relay_refresh_at, x.stream_id) for x in self._sessions.values()]
            heapq.heapify(self._relay_due)
        heapq.heappush(self._relay_due, (s.relay_refresh_at, s.stream_id))
        return relay_map

    def _relay_live(self, due: float, stream_id: int) -> Session | None:
        s = self._sessions.get(stream_id)
        return s if s is not None and s.relay_refresh_at == due and not s.relay_dirty else None

    def next_relay_refresh(self) -> float | None:
        """When :meth:`refresh_relays` has work next (None: no stream holds relay credentials)."""
        while self._relay_due and self._relay_live(*self._relay_due[0]) is None:
            heapq.heappop(self._relay_due)  # stale: stream closed, or re-minted since
        return self._relay_due[0][0] if self._relay_due else None

    def refresh_relays(self, now: float) -> list[int]:
        """Mark the streams whose relay credentials are due for re-minting; return them (to wake).

        Those due within the minter's slack are taken too, so one timer round serves a whole batch.
        """
        if self.relay is None:
            return []
        limit = now + self.relay.slack
        touched: list[int] = []
        while self._relay_due and self._relay_due[0][0] <= limit:
            due, sid = heapq.heappop(self._relay_due)
            s = self._relay_live(due, sid)
            if s is not None:
                s.relay_dirty = True
                touched.append(sid)
        return touched

    def session(self, stream_id: int) -> Session | None:
        return self._sessions.get(stream_id)

    def streams_of(self, node_id: int) -> set[int]:
        return self._by_node.get(node_id, set())

    # -- changes ---------------------------------------------------------------------------------------

    def affected_by(self, change: NodeChange) -> Iterable[Session]:
        """The sessions that see the changed node (other than its own streams): O(affected).

        Without a policy that is every other open stream; with one, the streams of the node's visible
        peers (as the compiler knows them now, i.e. after the change was folded in).
        """
        node_id = change.node_id if isinstance(change, NodeRemoved) else change.node.id
        peers = self.compiler.peers(node_id)
        if peers is None:
            return (s for s in self._sessions.values() if s.node_id != node_id)
        if len(peers) > len(self._by_node):  # walk whichever side is smaller
            return (s for s in self._sessions.values() if s.node_id in peers)
        return (self._sessions[sid] for p in peers for sid in self._by_node.get(p, ()))

    def apply(self, change: Change, now: float) -> list[int]:
        """Fold one change into the view and every affected session; return the stream ids touched."""
        if isinstance(change, LockChanged):
            return self._set_lock(change)
        if isinstance(change, NodeRemoved):
            return self._remove(change, change.node_id, change.reason)
        rec = change.node
        if rec.expired(now):
            return self._remove(change, rec.id, "expired")
        old = self._view.get(rec.id)
        new_key = old is not None and old.node_key != rec.node_key  # a key rotation completed
        entry = self._set(rec, change.online)
        delta = self.compiler.upsert(ident_of(rec, change.groups))
        touched = self._apply_delta(delta, skip_added_of=rec.id)
        for sid in self._by_node.get(rec.id, ()):
            self._sessions[sid].self_dirty = True
            if new_key and self.relay is not None:
                self._sessions[sid].relay_dirty = True  # the relay token is bound to the node key
            touched.append(sid)
        for s in self.affected_by(change):
            self.stats.delta_writes += 1
            s.upserts[rec.id] = entry
            if rec.id in s.removed:
                s.removed.discard(rec.id)  # removed then back (renewed key): an upsert
            elif isinstance(change, NodeAdded) or rec.id in delta.added.get(s.node_id, ()):
                s.added.add(rec.id)
            touched.append(s.stream_id)
        return touched

    def _apply_delta(self, delta: Delta, skip_added_of: int = 0) -> list[int]:
        """Peer upserts/removals and filter marks for the sessions a compiler delta names.

        ``skip_added_of``: the changed node itself, whose upsert :meth:`apply` writes to every session
        that sees it (so it is not written twice here).
        """
        touched: list[int] = []
        for nid, gained in delta.added.items():
            for sid in self._by_node.get(nid, ()):
                s = self._sessions[sid]
                for p in gained:
                    if p == skip_added_of or p not in self._entries:
                        continue
                    self.stats.delta_writes += 1
                    s.upserts[p] = self._entries[p]
                    if p in s.removed:
                        s.removed.discard(p)
                    else:
                        s.added.add(p)
                touched.append(sid)
        for nid, lost in delta.removed.items():
            for sid in self._by_node.get(nid, ()):
                s = self._sessions[sid]
                for p in lost:
                    self.stats.delta_writes += 1
                    s.upserts.pop(p, None)
                    if p in s.added:
                        s.added.discard(p)
                    else:
                        s.removed.add(p)
                touched.append(sid)
        for nid in delta.filters:
            for sid in self._by_node.get(nid, ()):
                self._sessions[sid].filter_dirty = True
                touched.append(sid)
        return touched

    def set_policy(self, policy: Policy | None) -> list[int]:
        """Switch to a new policy (None: allow all); returns the streams whose peers or filter changed.

        Called by the policy's owner through :meth:`ghostmesh.hub.Hub.set_policy`; the policy in force is
        read from that owner, never from here.
        """
        return self._apply_delta(self.compiler.set_policy(policy))

    def _set_lock(self, change: LockChanged) -> list[int]:
        """The lock log as it is now: every session gets it whole on its next flush."""
        self._lock = pb.LockLog(updates=change.updates) if change.updates else None
        for s in self._sessions.values():
            s.lock_dirty = True
        return list(self._sessions)

    def set_dns(self, dns: pb.DnsConfig | None) -> list[int]:
        """New DNS settings (None: none); returns the streams to wake: every one when they changed, none
        when they are the same as before (a reload that changed nothing sends nothing)."""
        if dns == self.dns:
            return []
        self.dns = dns
        for s in self._sessions.values():
            s.dns_dirty = True
        return list(self._sessions)

    def _remove(self, change: NodeChange, node_id: int, reason: RemovalReason) -> list[int]:
        if self._view.pop(node_id, None) is None:
            return []
        del self._entries[node_id]  # never visible (e.g. expired already): nothing to tell anyone
        touched: list[int] = []
        for sid in self._by_node.get(node_id, ()):
            self._sessions[sid].ended = reason
            touched.append(sid)
        sessions = list(self.affected_by(change))  # before the compiler forgets who saw the node
        delta = self.compiler.remove(node_id)
        for nid in delta.removed:
            delta.removed[nid].discard(node_id)  # written below, with the add-then-remove rule
        touched.extend(self._apply_delta(delta))
        for s in sessions:
            self.stats.delta_writes += 1
            s.upserts.pop(node_id, None)
            if node_id in s.added:
                s.added.discard(node_id)  # added and removed within one batch: the stream never hears of it
            else:
                s.removed.add(node_id)
            touched.append(s.stream_id)
        return touched

    def flush(self, stream_id: int, now: float | None = None) -> pb.MapUpdate | None:
        """The stream's next delta (serial + 1), or None if nothing is pending.

        ``now``: required when a relay map is configured (a due relay map is minted now).
        """
        data = self.flush_bytes(stream_id, now)
        return None if data is None else pb.MapUpdate.FromString(data)

    def flush_bytes(self, stream_id: int, now: float | None = None) -> bytes | None:
        """:meth:`flush`, encoded: what the server writes to the wire."""
        s = self._sessions.get(stream_id)
        if s is None or not s.dirty:
            return None
        s.serial += 1
        head = pb.MapUpdate(serial=s.serial, full=False, keepalive_seconds=self.keepalive_seconds)
        if s.self_dirty:
            me = self._view.get(s.node_id)
            if me is not None:
                head.self.CopyFrom(me)
        if s.filter_dirty:
            head.filter.CopyFrom(filter_to_pb(self.compiler.filter(s.node_id)))
        if s.relay_dirty and self.relay is not None:
            me = self._view.get(s.node_id)
            if me is not None:
                head.relay_map.CopyFrom(self._mint(self.relay, s, me.node_key, now))
            s.relay_dirty = False
        if s.lock_dirty and self._lock is not None:
            head.lock.CopyFrom(self._lock)
        if s.dns_dirty:
            # present even when empty: an empty DnsConfig in a delta says the settings are gone
            head.dns.SetInParent()
            if self.dns is not None:
                head.dns.CopyFrom(self.dns)
        head.peers_removed.extend(sorted(s.removed))
        data = head.SerializeToString() + b"".join(s.upserts.values())
        s.upserts = {}
        s.added = set()
        s.removed = set()
        s.self_dirty = False
        s.filter_dirty = False
        s.lock_dirty = False
        s.dns_dirty = False
        return data
