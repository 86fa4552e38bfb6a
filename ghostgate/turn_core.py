"""The sans-IO STUN binding + TURN server (RFC 8489, RFC 8656 over UDP): bytes and ``now`` in, actions out.

The STUN codec is aioice's (:mod:`aioice.stun`): it already knows every attribute TURN needs
(XOR-PEER-ADDRESS, XOR-RELAYED-ADDRESS, LIFETIME, REQUESTED-TRANSPORT, CHANNEL-NUMBER, DATA, REALM,
NONCE, ERROR-CODE), MESSAGE-INTEGRITY and FINGERPRINT. Two things it lacks and we do here: the magic
cookie check (RFC 8489 §5: a packet without it is not STUN, aioice does not look) and ChannelData framing
(RFC 8656 §12.4), which is not a STUN message.

Driving it: ``handle_client(data, client_addr, now)`` for datagrams on the listen port,
``handle_peer(data, relay_addr, peer_addr, now)`` for datagrams on a relayed socket, ``handle_timer(now)``
at ``next_timer()``. Each returns a list of :class:`Transmit` / :class:`Release` actions. ``now`` is unix
time (the REST usernames carry a unix expiry, so one clock serves both). Relayed transport addresses come
from the ``bind_relay`` callable the I/O edge injects (it binds a socket and returns its address, or None
when it cannot), so this module never touches a socket.

Robustness against bad input: nothing a client or peer sends raises out of these methods; parse
failures are counted in ``counters["malformed"]``, and allocations exist only after an authenticated
Allocate and within the global and per-user quotas. Refusals for a peer (denied prefix, RFC 8656 §9.1
and §21) answer 403 and leave the allocation as it was.

Forwarding table (the fast path): for every bound channel whose permission is in force, the core keeps a
route in two read-only mappings the edge forwards from without calling in: :attr:`TurnCore.to_peer`
(client address -> channel number -> :data:`PeerRoute`) for ChannelData from clients (RFC 8656 §12.5) and
:attr:`TurnCore.to_client` (relay address -> peer address -> :data:`ClientRoute`, the channel's number as the
two header bytes) for peer datagrams (§12.6). Each route carries its deadline, the earliest of the channel's,
the permission's (§9) and the allocation's expiry, so a route is dead the instant any of them passes, even
before ``handle_timer`` runs and removes it. The core alone writes these mappings: every ChannelBind,
CreatePermission, Refresh, expiry and deletion recomputes the allocation's routes (:meth:`TurnCore._sync`).
What has no route (Send/Data indications, unbound channels, unpermitted peers, STUN) goes through
``handle_client`` / ``handle_peer``, which apply the same rules; the edge reports what it forwarded itself
with :meth:`TurnCore.count_relayed` so the counters stay here.

Revocation (with ``[control]``: a :class:`ghostgate.nodeset.NodeSet` ghostmesh keeps current): the ``<id>`` of
a REST username is the node id, and an authenticated Allocate, Refresh, CreatePermission or ChannelBind of an
id not in the set is refused with 403 Forbidden ("cannot be performed due to administrative or similar
restrictions", RFC 8656 §19; not 401, since the credentials are valid and new ones would not help), signed
like every refusal after authentication and counted (``not_current``). :meth:`TurnCore.revoke` deletes the
allocations of ids that just left the set (``allocations_revoked``), releasing their relayed sockets; what
the client sends afterwards finds no allocation (437, or dropped for indications and ChannelData).

Why one module of about 560 lines: allocations, permissions, channels and the forwarding routes derived
from them are one state that every request and timer reads and writes; the codec, the credentials
(:mod:`ghostgate.creds`) and the sockets already live apart.
"""

from __future__ import annotations

import ipaddress
import os
import struct
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aioice import stun

from ghostcore.addr import HostPort
from ghostgate import creds
from ghostgate.nodeset import NodeSet, Revoked

SOFTWARE = "ghostgate"
UDP_TRANSPORT = 17 << 24  # REQUESTED-TRANSPORT: protocol in the first byte, then RFFU (RFC 8656 §18.7)
PERMISSION_LIFETIME = 300.0  # RFC 8656 §9
CHANNEL_LIFETIME = 600.0  # RFC 8656 §12
# RFC 8656 §12 narrows channels to 0x4000-0x4FFF, but RFC 5766 clients (coturn's turnutils_uclient among
# them) still pick from 0x4000-0x7FFF; we accept the old range too, for interop. Nothing we serve on this port
# starts with 0x50-0x7F otherwise (the DTLS-SRTP demultiplexing that made 8656 narrow it is not ours).
CHANNEL_MIN, CHANNEL_MAX = 0x4000, 0x7FFF
NONCE_LIFETIME = 600.0


@dataclass(frozen=True)
class Transmit:
    """Send ``data`` to ``dest``: from the listen socket if ``relay`` is None, else from that relay socket."""

    data: bytes
    dest: HostPort
    relay: HostPort | None = None


@dataclass(frozen=True)
class Release:
    """Close the relay socket bound at ``relay``: its allocation is gone."""

    relay: HostPort


Action = Transmit | Release

PeerRoute = tuple[HostPort, HostPort, float]
"""Where a client's ChannelData goes: (relay address to send from, peer address, deadline)."""
ClientRoute = tuple[HostPort, bytes, float]
"""Where a peer's datagram goes: (client address, the channel number as two bytes, deadline)."""


@dataclass(frozen=True)
class CoreConfig:
    secret: bytes | None  # None: TURN off, STUN binding only
    realm: str = "ghostmesh"
    max_allocations: int = 1000
    max_allocations_per_user: int = 10
    default_lifetime: float = 600.0
    max_lifetime: float = 3600.0
    denied_peers: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    allowed_peers: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()


@dataclass
class Allocation:
    client: HostPort
    relay: HostPort
    username: str
    user_id: str
    expires: float
    allocate_txid: bytes
    allocate_response: bytes
    permissions: dict[str, float] = field(default_factory=dict)  # peer IP -> expiry
    channels: dict[int, tuple[HostPort, float]] = field(default_factory=dict)  # number -> (peer, expiry)
    peer_channels: dict[HostPort, int] = field(default_factory=dict)


@dataclass(frozen=True)
class _Auth:
    key: bytes = field(repr=False)
    username: str
    user_id: str


class _Refused(Exception):
    """An error response to send; internal control flow only."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


Nets = tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]


def is_denied(ip: str, denied: Nets, allowed: Nets = ()) -> bool:
    """In ``denied`` and not opened in ``allowed``; an IPv4-mapped IPv6 address is judged as its IPv4."""
    addr = ipaddress.ip_address(ip)
    mapped = addr.ipv4_mapped if isinstance(addr, ipaddress.IPv6Address) else None

    def within(nets: Nets) -> bool:
        return any(addr in net or (mapped is not None and mapped in net) for net in nets)

    return within(denied) and not within(allowed)


class TurnCore:
    """One server's STUN/TURN state: allocations by client 5-tuple (UDP: the client address) and by relay."""

    def __init__(
        self,
        config: CoreConfig,
        bind_relay: Callable[[], HostPort | None],
        nonce_key: bytes | None = None,
        roster: NodeSet | None = None,
    ) -> None:
        self.config = config
        self.roster = roster  # None: no [control], credentials alone decide
        self._bind_relay = bind_relay
        self._nonce_key = nonce_key if nonce_key is not None else os.urandom(32)
        self.allocations: dict[HostPort, Allocation] = {}
        self._by_relay: dict[HostPort, Allocation] = {}
        self._per_user: Counter[str] = Counter()
        self._to_peer: dict[HostPort, dict[int, PeerRoute]] = {}
        self._to_client: dict[HostPort, dict[HostPort, ClientRoute]] = {}
        self._next: float | None = None
        self.counters: Counter[str] = Counter()

    # ---- the forwarding table (module docstring) ------------------------------------------------

    @property
    def to_peer(self) -> Mapping[HostPort, Mapping[int, PeerRoute]]:
        """Client address -> channel number -> route, for ChannelData; read-only for the edge."""
        return self._to_peer

    @property
    def to_client(self) -> Mapping[HostPort, Mapping[HostPort, ClientRoute]]:
        """Relay address -> peer address -> route, for peer datagrams; read-only for the edge."""
        return self._to_client

    def count_relayed(self, to_peer: int, to_peer_bytes: int, to_client: int, to_client_bytes: int) -> None:
        """What the edge forwarded on its own from the routes (called once per batch, not per packet)."""
        counters = self.counters
        counters["relayed_to_peer"] += to_peer
        counters["relayed_to_peer_bytes"] += to_peer_bytes
        counters["relayed_to_client"] += to_client
        counters["relayed_to_client_bytes"] += to_client_bytes

    def _sync(self, alloc: Allocation) -> None:
        """Recompute ``alloc``'s routes from its channels, permissions and lifetime. A whole inner mapping
        is replaced, never edited, so a reader holding the old one sees a consistent (older) table."""
        to_peer: dict[int, PeerRoute] = {}
        to_client: dict[HostPort, ClientRoute] = {}
        for number, (peer, channel_expiry) in alloc.channels.items():
            permission = alloc.permissions.get(peer[0])
            if permission is None:
                continue  # no permission for the peer's IP: nothing is relayed on this channel (§12.5, §12.6)
            deadline = min(channel_expiry, permission, alloc.expires)
            to_peer[number] = (alloc.relay, peer, deadline)
            to_client[peer] = (alloc.client, number.to_bytes(2, "big"), deadline)
        if to_peer:
            self._to_peer[alloc.client] = to_peer
            self._to_client[alloc.relay] = to_client
        else:
            self._to_peer.pop(alloc.client, None)
            self._to_client.pop(alloc.relay, None)

    # ---- timers -------------------------------------------------------------------------------

    def next_timer(self) -> float | None:
        """When ``handle_timer`` should next run (may be early: a refresh does not push it back)."""
        return self._next

    def _arm(self, when: float) -> None:
        if self._next is None or when < self._next:
            self._next = when

    def handle_timer(self, now: float) -> list[Action]:
        """Expire allocations, permissions and channels whose time has come (RFC 8656 §7, §9, §12)."""
        actions: list[Action] = []
        self._next = None
        for alloc in list(self.allocations.values()):
            if alloc.expires <= now:
                self.counters["allocations_expired"] += 1
                actions.append(self._delete(alloc))
                continue
            self._arm(alloc.expires)
            changed = False
            for ip, exp in list(alloc.permissions.items()):
                if exp <= now:
                    del alloc.permissions[ip]
                    changed = True
                else:
                    self._arm(exp)
            for num, (peer, exp) in list(alloc.channels.items()):
                if exp <= now:
                    del alloc.channels[num]
                    alloc.peer_channels.pop(peer, None)
                    changed = True
                else:
                    self._arm(exp)
            if changed:
                self._sync(alloc)
        return actions

    def revoke(self, revoked: Revoked) -> list[Action]:
        """Delete the allocations of users that left the roster (``revoked.everything``: check every one,
        after the first set a gate ever got); the edge closes their relayed sockets."""
        roster = self.roster
        if roster is None or not revoked:
            return []
        actions: list[Action] = []
        for alloc in list(self.allocations.values()):
            gone = revoked.everything or alloc.user_id in revoked.users
            if gone and not roster.allows_user(alloc.user_id):
                self.counters["allocations_revoked"] += 1
                actions.append(self._delete(alloc))
        return actions

    def _delete(self, alloc: Allocation) -> Release:
        del self.allocations[alloc.client]
        del self._by_relay[alloc.relay]
        self._to_peer.pop(alloc.client, None)
        self._to_client.pop(alloc.relay, None)
        self._per_user[alloc.user_id] -= 1
        if self._per_user[alloc.user_id] <= 0:
            del self._per_user[alloc.user_id]
        return Release(alloc.relay)

    # ---- datagrams from clients --------------------------------------------------------------

    def handle_client(self, data: bytes, client: HostPort, now: float) -> list[Action]:
        """A datagram that arrived on the listen port from ``client``."""
        try:
            if len(data) >= 4 and 0x40 <= data[0] <= 0x7F:
                return self._channel_data(data, client, now)
            return self._stun(data, client, now)
        except (ValueError, struct.error, IndexError, KeyError, TypeError):
            # Every parse failure of aioice's codec or ours ends here: counted, never raised.
            self.counters["malformed"] += 1
            return []

    def _channel_data(self, data: bytes, client: HostPort, now: float) -> list[Action]:
        # RFC 8656 §12.4: 2 bytes channel number, 2 bytes length, then data; over UDP the padding to 4
        # bytes may or may not be there (§12.5), so the datagram may be longer than 4 + length, never shorter.
        number, length = struct.unpack_from("!HH", data)
        if len(data) < 4 + length or len(data) > 4 + length + 3:
            self.counters["malformed"] += 1
            return []
        routes = self._to_peer.get(client)
        route = routes.get(number) if routes is not None else None
        if route is None or route[2] <= now:
            # No channel, or its permission or allocation lapsed (the timer removes the route soon).
            alloc = self.allocations.get(client)
            bound = alloc.channels.get(number) if alloc is not None else None
            self.counters["no_permission" if bound is not None and bound[1] > now else "channel_unbound"] += 1
            return []
        relay, peer, _ = route
        self.counters["relayed_to_peer"] += 1
        self.counters["relayed_to_peer_bytes"] += length
        return [Transmit(data[4 : 4 + length], peer, relay)]

    def _stun(self, data: bytes, client: HostPort, now: float) -> list[Action]:
        if len(data) < stun.HEADER_LENGTH or data[0] & 0xC0 or data[4:8] != b"\x21\x12\xa4\x42":
            self.counters["malformed"] += 1  # RFC 8489 §5: top two bits zero and the magic cookie
            return []
        msg = stun.parse_message(data)
        method, cls = msg.message_method, msg.message_class
        if method == stun.Method.BINDING:
            if cls != stun.Class.REQUEST:
                return []  # a Binding indication is a keepalive (RFC 8489 §6.3.2): nothing to answer
            self.counters["stun_binding"] += 1
            resp = self._response(msg, stun.Class.RESPONSE, {"XOR-MAPPED-ADDRESS": client})
            resp.add_fingerprint()
            return [Transmit(bytes(resp), client)]
        secret = self.config.secret
        if secret is None:
            self.counters["turn_disabled"] += 1
            return self._error(msg, client, 400, "TURN not served here")  # no secret configured
        if method == stun.Method.SEND and cls == stun.Class.INDICATION:
            return self._send_indication(msg, client, now)
        if cls != stun.Class.REQUEST or method not in _REQUESTS:
            self.counters["unsupported"] += 1
            return []
        try:
            auth = self._authenticate(msg, secret, now)
        except _Refused as refused:
            return self._error(msg, client, refused.code, refused.reason, now=now)
        try:
            self._check_current(auth)
            return _REQUESTS[method](self, msg, client, now, auth)
        except _Refused as refused:
            # Signed, so a client that checks integrity (aioice does) accepts the refusal (RFC 8489 §9.2.4).
            return self._error(msg, client, refused.code, refused.reason, key=auth.key)

    # ---- authentication (RFC 8489 §9.2.4, long-term credentials, TURN REST usernames) ----------

    def _authenticate(self, msg: stun.Message, secret: bytes, now: float) -> _Auth:
        attrs = msg.attributes
        if "MESSAGE-INTEGRITY" not in attrs:
            self.counters["auth_challenge"] += 1
            raise _Refused(401, "Unauthorized")
        if not all(k in attrs for k in ("USERNAME", "REALM", "NONCE")):
            raise _Refused(400, "Bad Request")
        if not creds.nonce_fresh(self._nonce_key, attrs["NONCE"], now, NONCE_LIFETIME):
            self.counters["stale_nonce"] += 1
            raise _Refused(438, "Stale Nonce")
        username: str = attrs["USERNAME"]
        parsed = creds.parse_rest_username(username)
        if parsed is None or parsed[0] <= now or attrs["REALM"] != self.config.realm:
            self.counters["auth_failed"] += 1
            raise _Refused(401, "Unauthorized")
        key = creds.long_term_key(username, self.config.realm, creds.rest_password(secret, username))
        if not msg.check_message_integrity(key):
            self.counters["auth_failed"] += 1
            raise _Refused(401, "Unauthorized")
        return _Auth(key, username, parsed[1])

    def _check_current(self, auth: _Auth) -> None:
        """403 for a node the roster no longer lists (module docstring: revocation)."""
        if self.roster is not None and not self.roster.allows_user(auth.user_id):
            self.counters["not_current"] += 1
            raise _Refused(403, "Forbidden (node not current)")

    # ---- requests ------------------------------------------------------------------------------

    def _allocate(self, msg: stun.Message, client: HostPort, now: float, auth: _Auth) -> list[Action]:
        existing = self.allocations.get(client)
        if existing is not None:
            if existing.allocate_txid == msg.transaction_id:  # a retransmission (RFC 8656 §7.2)
                return [Transmit(existing.allocate_response, client)]
            self.counters["allocation_mismatch"] += 1
            raise _Refused(437, "Allocation Mismatch")
        transport = msg.attributes.get("REQUESTED-TRANSPORT")
        if transport is None:
            raise _Refused(400, "Bad Request")
        if transport != UDP_TRANSPORT:
            raise _Refused(442, "Unsupported Transport Protocol")
        user_id = auth.user_id
        if (
            len(self.allocations) >= self.config.max_allocations
            or self._per_user[user_id] >= self.config.max_allocations_per_user
        ):
            self.counters["quota_refused"] += 1
            raise _Refused(486, "Allocation Quota Reached")
        relay = self._bind_relay()
        if relay is None:
            self.counters["relay_bind_failed"] += 1
            raise _Refused(508, "Insufficient Capacity")
        lifetime = self._lifetime(msg)
        resp = self._response(
            msg,
            stun.Class.RESPONSE,
            {"XOR-RELAYED-ADDRESS": relay, "LIFETIME": int(lifetime), "XOR-MAPPED-ADDRESS": client},
        )
        resp.add_message_integrity(auth.key)
        wire = bytes(resp)
        alloc = Allocation(
            client=client,
            relay=relay,
            username=auth.username,
            user_id=user_id,
            expires=now + lifetime,
            allocate_txid=msg.transaction_id,
            allocate_response=wire,
        )
        self.allocations[client] = alloc
        self._by_relay[relay] = alloc
        self._per_user[user_id] += 1
        self._arm(alloc.expires)
        self.counters["allocations_created"] += 1
        return [Transmit(wire, client)]

    def _lifetime(self, msg: stun.Message) -> float:
        # RFC 8656 §7.2 step 7 / §7.4: min(requested, max), but never below the default.
        requested = msg.attributes.get("LIFETIME")
        if requested is None:
            return self.config.default_lifetime
        return max(self.config.default_lifetime, min(float(requested), self.config.max_lifetime))

    def _owned(self, client: HostPort, username: str) -> Allocation:
        alloc = self.allocations.get(client)
        if alloc is None:
            self.counters["allocation_mismatch"] += 1
            raise _Refused(437, "Allocation Mismatch")
        if alloc.username != username:
            raise _Refused(441, "Wrong Credentials")  # RFC 8656 §5: same credentials for the allocation
        return alloc

    def _refresh(self, msg: stun.Message, client: HostPort, now: float, auth: _Auth) -> list[Action]:
        alloc = self._owned(client, auth.username)
        actions: list[Action] = []
        if msg.attributes.get("LIFETIME") == 0:  # RFC 8656 §7.5: zero deletes the allocation
            actions.append(self._delete(alloc))
            lifetime = 0
        else:
            lifetime = int(self._lifetime(msg))
            alloc.expires = now + lifetime
            self._arm(alloc.expires)
            self._sync(alloc)
        resp = self._response(msg, stun.Class.RESPONSE, {"LIFETIME": lifetime})
        resp.add_message_integrity(auth.key)
        return [Transmit(bytes(resp), client), *actions]

    def _peer(self, msg: stun.Message, alloc: Allocation) -> HostPort:
        peer: HostPort | None = msg.attributes.get("XOR-PEER-ADDRESS")
        if peer is None:
            raise _Refused(400, "Bad Request")
        if ipaddress.ip_address(peer[0]).version != ipaddress.ip_address(alloc.relay[0]).version:
            raise _Refused(443, "Peer Address Family Mismatch")
        if is_denied(peer[0], self.config.denied_peers, self.config.allowed_peers):
            # RFC 8656 §21.2 (relay to the server's own network): refused, the allocation stays.
            self.counters["denied_peer"] += 1
            raise _Refused(403, "Forbidden")
        return peer

    def _create_permission(
        self, msg: stun.Message, client: HostPort, now: float, auth: _Auth
    ) -> list[Action]:
        alloc = self._owned(client, auth.username)
        peer = self._peer(msg, alloc)
        alloc.permissions[peer[0]] = now + PERMISSION_LIFETIME
        self._arm(now + PERMISSION_LIFETIME)
        self._sync(alloc)  # the channels to this IP live longer now
        resp = self._response(msg, stun.Class.RESPONSE, {})
        resp.add_message_integrity(auth.key)
        return [Transmit(bytes(resp), client)]

    def _channel_bind(self, msg: stun.Message, client: HostPort, now: float, auth: _Auth) -> list[Action]:
        alloc = self._owned(client, auth.username)
        number = msg.attributes.get("CHANNEL-NUMBER")
        if number is None or not CHANNEL_MIN <= number <= CHANNEL_MAX:
            raise _Refused(400, "Bad Request")
        peer = self._peer(msg, alloc)
        # RFC 8656 §12.2: a channel is bound to one peer and a peer to one channel, for their lifetime.
        bound = alloc.channels.get(number)
        if (bound is not None and bound[0] != peer) or alloc.peer_channels.get(peer, number) != number:
            raise _Refused(400, "Bad Request")
        alloc.channels[number] = (peer, now + CHANNEL_LIFETIME)
        alloc.peer_channels[peer] = number
        alloc.permissions[peer[0]] = now + PERMISSION_LIFETIME  # binding also installs a permission
        self._arm(now + PERMISSION_LIFETIME)
        self._sync(alloc)
        resp = self._response(msg, stun.Class.RESPONSE, {})
        resp.add_message_integrity(auth.key)
        return [Transmit(bytes(resp), client)]

    def _send_indication(self, msg: stun.Message, client: HostPort, now: float) -> list[Action]:
        # RFC 8656 §11.2: indications are not authenticated; anything wrong is silently dropped.
        alloc = self.allocations.get(client)
        peer: HostPort | None = msg.attributes.get("XOR-PEER-ADDRESS")
        data: bytes | None = msg.attributes.get("DATA")
        if alloc is None or peer is None or data is None:
            self.counters["send_dropped"] += 1
            return []
        if alloc.permissions.get(peer[0], 0.0) <= now or alloc.expires <= now:
            self.counters["no_permission"] += 1
            return []
        self.counters["relayed_to_peer"] += 1
        self.counters["relayed_to_peer_bytes"] += len(data)
        return [Transmit(data, peer, alloc.relay)]

    # ---- datagrams from peers ------------------------------------------------------------------

    def handle_peer(self, data: bytes, relay: HostPort, peer: HostPort, now: float) -> list[Action]:
        """A datagram from ``peer`` on the relay socket ``relay`` (RFC 8656 §11.3, §12.6)."""
        routes = self._to_client.get(relay)
        route = routes.get(peer) if routes is not None else None
        if route is not None and route[2] > now:
            self.counters["relayed_to_client"] += 1
            self.counters["relayed_to_client_bytes"] += len(data)
            return [Transmit(route[1] + len(data).to_bytes(2, "big") + data, route[0])]
        alloc = self._by_relay.get(relay)
        if alloc is None or alloc.permissions.get(peer[0], 0.0) <= now or alloc.expires <= now:
            self.counters["peer_dropped"] += 1
            return []
        self.counters["relayed_to_client"] += 1
        self.counters["relayed_to_client_bytes"] += len(data)
        # No live channel to this exact peer address: a Data indication (RFC 8656 §11.3).
        ind = stun.Message(
            stun.Method.DATA, stun.Class.INDICATION, attributes={"XOR-PEER-ADDRESS": peer, "DATA": data}
        )
        return [Transmit(bytes(ind), alloc.client)]

    # ---- responses -----------------------------------------------------------------------------

    def _response(self, msg: stun.Message, cls: stun.Class, attrs: dict[str, Any]) -> stun.Message:
        return stun.Message(msg.message_method, cls, msg.transaction_id, {**attrs, "SOFTWARE": SOFTWARE})

    def _error(
        self,
        msg: stun.Message,
        client: HostPort,
        code: int,
        reason: str,
        *,
        now: float | None = None,
        key: bytes | None = None,
    ) -> list[Action]:
        self.counters[f"error_{code}"] += 1
        attrs: dict[str, Any] = {"ERROR-CODE": (code, reason)}
        if code in (401, 438) and now is not None:
            attrs["REALM"] = self.config.realm
            attrs["NONCE"] = creds.make_nonce(self._nonce_key, now)
        resp = self._response(msg, stun.Class.ERROR, attrs)
        if key is not None:
            resp.add_message_integrity(key)
        else:
            resp.add_fingerprint()
        return [Transmit(bytes(resp), client)]


_REQUESTS: dict[stun.Method, Callable[..., list[Action]]] = {
    stun.Method.ALLOCATE: TurnCore._allocate,
    stun.Method.REFRESH: TurnCore._refresh,
    stun.Method.CREATE_PERMISSION: TurnCore._create_permission,
    stun.Method.CHANNEL_BIND: TurnCore._channel_bind,
}
