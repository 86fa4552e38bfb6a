"""The registry facade of ghostmesh: one object through which every mutation goes.

Headscale's pattern (``hscontrol/state``): ``State`` holds the in-memory view of all nodes (loaded from
the store at start), performs each mutation through the :class:`~ghostmesh.store.base.Store` first (so
a failed write leaves memory untouched) and returns the :mod:`ghostmesh.changes` records describing what
changed, which the mapper turns into per-stream deltas. The records carry what the mapper needs and only
the state knows, the node's presence and its user's OIDC groups (:meth:`State.snapshot` gives the same
for every node at start). It is synchronous and takes ``now`` from its caller, so unit tests drive it
with hand-stepped time.

Within every mutation that is audited, each store write comes before any memory update (addresses taken
first are handed back on failure), so a mutation refused by its own checks or by the store (a conflict, a
spent key) leaves memory as it was, also when its caller holds a store transaction open: that is how
the caller (:meth:`ghostmesh.hub.Hub.transaction`) commits a mutation and its audit row together, or
neither. The state itself opens no transaction and writes no audit row.

Why one module of about 1170 lines: registration, OIDC users, presence, key rotation, node-key
signatures, routes and timers all read and write the node indexes, the address allocators and the expiry
heaps, and keeping every write to them in one class is what keeps them consistent; so it stays whole, in
one section per area, with the pure rules in :mod:`ghostmesh.routes`, :mod:`ghostcore.ipalloc` and
:mod:`ghostcore.lock`. Auth and API keys touch only the store; they sit here because registration
consumes auth keys.

Secrets: auth keys look like ``gmauth_<12 hex id>_<43 char secret>`` and API keys ``gmapi_<id>_<secret>``
(secret from ``secrets.token_urlsafe(32)``). Only ``sha256(secret)`` is stored and compared with
``hmac.compare_digest``; the whole key is returned once, at creation. Error messages name the public id
at most, never the secret.

Time-driven work (node keys expiring, nodes whose presence grace ran out, ephemeral nodes whose grace ran
out) is done by :meth:`State.tick`;
:meth:`State.next_deadline` tells the caller when to call it next. Both use heaps, so neither scans all
nodes.

Devices (:meth:`State.add_device`): a stock WireGuard peer (a phone, a router) that runs no ghostlink is
a node record with ``via`` naming its gateway node. It has an owner or tags, addresses and a name like any
node, never expires and never connects: its key can neither register, sync, report nor rotate. Its
gateway terminates its tunnel and so could act as the device: a gateway is a tagged node (run by the
admins) or a node of the device's own user. Its
gateway's record carries the devices' host prefixes (``device_prefixes``, derived here like routes), so
adding or removing a device is a change of the gateway too. A gateway with devices can be neither deleted
nor rotated to a new key (the devices' configurations name it): its devices go first.

Node-key signing (:mod:`ghostcore.lock`): the state owns the lock log, verified at load (a stored log
that no longer verifies raises ``LockError`` and the server does not start), and checks every update and
every node-key signature against it before storing anything. It holds no signing key.

What nodes report is parsed strictly (:mod:`ghostcore.addr`): an endpoint that is not canonical
``ip:port`` / ``[ip6]:port`` (a zone ID, whitespace, a control character) is refused before anything
changes, so it never reaches a peer's WireGuard configuration.
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import ipaddress
import re
import secrets
import shlex
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace

from ghostcore import addr, lock
from ghostcore.dnsname import RESOLVER_V4, RESOLVER_V6
from ghostcore.errors import AuthError, Conflict, InvalidArgument, NotFound, PermissionDenied
from ghostcore.ipalloc import Allocator, parse_prefix
from ghostcore.keys import PublicKey
from ghostcore.policy.parse import USER_RE
from ghostmesh.changes import Change, LockChanged, NodeAdded, NodeChanged, NodeRemoved
from ghostmesh.config import MeshConfig
from ghostmesh.routes import EXIT_PREFIXES, MAX_ROUTES, RouteTable, is_exit, validate_prefix
from ghostmesh.store.base import ApiKeyRec, AuthKeyRec, NodeRec, RouteRec, Store, UserRec

AUTH_PREFIX = "gmauth_"
API_PREFIX = "gmapi_"
KEY_ID_LEN = 12
KEY_SECRET_LEN = 43  # len(secrets.token_urlsafe(32))
DEFAULT_USER = "default"
DEFAULT_API_KEY_EXPIRATION = 90 * 86400.0
MAX_ENDPOINTS = 16
PENDING_ROTATION_TTL = 600.0  # seconds a pending key is protected from being replaced by another rotation
ROTATION_SIGNATURE_NEEDED = (
    "node-key signing is on: the new key needs a signature from this node's rotation key"
)

_LABEL_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")  # RFC 1123 section 2.1 host label
_TAG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9:._-]{0,63}$")
_ID_RE = re.compile(r"^[0-9a-f]{12}$")


def hash_secret(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8")).digest()


def new_key(prefix: str) -> tuple[str, str, str]:
    """A fresh ``(id, secret, whole key)``; only ``hash_secret(secret)`` may be stored."""
    key_id = secrets.token_hex(KEY_ID_LEN // 2)
    secret = secrets.token_urlsafe(32)
    return key_id, secret, f"{prefix}{key_id}_{secret}"


def split_key(text: str, prefix: str) -> tuple[str, str] | None:
    """``gmauth_<id>_<secret>`` -> (id, secret); None if it does not have that shape."""
    text = text.strip()
    if not text.startswith(prefix):
        return None
    rest = text[len(prefix) :]
    key_id, sep, secret = rest[:KEY_ID_LEN], rest[KEY_ID_LEN : KEY_ID_LEN + 1], rest[KEY_ID_LEN + 1 :]
    if sep != "_" or not _ID_RE.match(key_id) or len(secret) != KEY_SECRET_LEN:
        return None
    return key_id, secret


def key_id_of(ref: str, prefix: str) -> str:
    """Accept an id, ``<prefix><id>`` or a whole key (as ghostctl users may paste) and return the id."""
    ref = ref.strip()
    if ref.startswith(prefix):
        ref = ref[len(prefix) :][:KEY_ID_LEN]
    if not _ID_RE.match(ref):
        raise InvalidArgument(
            f"invalid key id: expected 12 hex digits (as listed), optionally after {prefix}"
        )
    return ref


def sanitize_name(hostname: str) -> str:
    """A hostname as a DNS label: lower case, [a-z0-9-], at most 63 chars, not all digits."""
    name = re.sub(r"[^a-z0-9-]+", "-", hostname.strip().lower().split(".")[0])
    name = re.sub(r"-{2,}", "-", name).strip("-")[:63].strip("-")
    if not name:
        return "node"
    if name.isdigit():
        name = f"node-{name}"[:63]  # an all-digit name would be taken for a node id
    return name


def validate_name(name: str) -> str:
    if not _LABEL_RE.match(name) or name.isdigit():
        raise InvalidArgument(
            f"invalid node name {name[:70]!r}: use 1-63 lower-case letters, digits and '-', not all digits, "
            "not starting or ending with '-'"
        )
    return name


def validate_endpoint(text: str, what: str = "endpoint") -> str:
    """A reported ``ip:port`` / ``[ip6]:port``, returned as is: it must already be canonical, with a port
    1..65535 and an address a packet can be sent to (:func:`ghostcore.addr.parse_endpoint`); an
    ``AddressError`` (InvalidArgument) naming ``what`` otherwise."""
    addr.parse_endpoint(text, what)
    return text


def canonical_issuer(issuer: str) -> str:
    """An issuer as bindings store it: without a trailing "/" (discovery treats both spellings as one
    issuer, and an ID token's ``iss`` must match the discovered one exactly)."""
    return issuer.strip().rstrip("/")


def _check_oidc_identity(issuer: str, subject: str) -> None:
    """An (issuer, subject) an admin typed: printable, of sane length (OpenID Connect Core 1.0 section 2:
    ``sub`` is at most 255 ASCII characters)."""
    if not subject or len(subject) > 255 or not subject.isprintable() or subject != subject.strip():
        raise InvalidArgument(
            "invalid OIDC subject: expected 1-255 printable characters, as the provider's sub"
        )
    if not issuer.startswith(("https://", "http://")) or len(issuer) > 1000 or not issuer.isprintable():
        raise InvalidArgument(f"invalid OIDC issuer {issuer[:70]!r}: expected the provider's https:// URL")


def refuse_device(node: NodeRec | None) -> None:
    """A device's key registers, syncs, reports and rotates nothing: it runs no ghostlink."""
    if node is not None and node.via:
        raise PermissionDenied(
            f"this key is device {node.name}'s, which reaches the mesh through its gateway and runs no "
            "ghostlink; join with a key of this node's own"
        )


def _check_owner(user: str, tags: Sequence[str]) -> None:
    """The owner and tags given to an auth key's nodes or to a device: well-formed, or InvalidArgument."""
    for tag in tags:
        if not _TAG_RE.match(tag):
            raise InvalidArgument(f"invalid tag {tag[:70]!r}: use letters, digits, ':', '.', '_' or '-'")
    if user and not USER_RE.match(user):
        raise InvalidArgument(f"invalid user name {user[:70]!r}")


def _check_registration_input(node_key: str, hostname: str) -> None:
    PublicKey.from_base64(node_key)  # InvalidArgument for anything that is not a WireGuard key
    if len(hostname) > 255:
        raise InvalidArgument("hostname too long: at most 255 characters")


@dataclass(frozen=True, slots=True)
class StateConfig:
    ipv4_prefix: str = "100.64.0.0/10"
    ipv6_prefix: str = "fd7a:115c:a1e0::/48"
    key_expiry: float = 180 * 86400.0  # 0: never
    ephemeral_grace: float = 30.0
    presence_grace: float = 0.0  # a node whose last stream ended is offline to peers only after this
    authkey_expiration: float = 3600.0
    relay_regions: frozenset[int] = frozenset()  # configured relay region ids (a node's home_region)
    oidc_issuer: str = ""  # with auth_method = "oidc": the provider's issuer, canonical (oidc_issuer())

    @classmethod
    def from_mesh(cls, cfg: MeshConfig) -> StateConfig:
        return cls(
            ipv4_prefix=cfg.network.ipv4_prefix,
            ipv6_prefix=cfg.network.ipv6_prefix,
            key_expiry=cfg.nodes.key_expiry,
            ephemeral_grace=cfg.nodes.ephemeral_grace,
            presence_grace=cfg.nodes.presence_grace,
            authkey_expiration=cfg.authkeys.default_expiration,
            relay_regions=frozenset(r.id for r in cfg.relay.region_list()),
            oidc_issuer=canonical_issuer(cfg.oidc.issuer) if cfg.server.auth_method == "oidc" else "",
        )


class _Deadlines:
    """Node ids each with one deadline, soonest first: the deadline in force per id, and a heap whose stale
    entries (an id cancelled or rescheduled since) are dropped as they surface, so nothing scans all ids."""

    def __init__(self) -> None:
        self._due: dict[int, float] = {}
        self._heap: list[tuple[float, int]] = []

    def __contains__(self, node_id: int) -> bool:
        return node_id in self._due

    def set(self, node_id: int, due: float) -> None:
        self._due[node_id] = due
        heapq.heappush(self._heap, (due, node_id))

    def cancel(self, node_id: int) -> bool:
        """Drop ``node_id``'s deadline; True if it had one."""
        return self._due.pop(node_id, None) is not None

    def next(self) -> float | None:
        while self._heap and self._due.get(self._heap[0][1]) != self._heap[0][0]:
            heapq.heappop(self._heap)
        return self._heap[0][0] if self._heap else None

    def pop_due(self, now: float) -> list[tuple[float, int]]:
        """The (deadline, id) pairs due at ``now``, soonest first, each taken out."""
        out: list[tuple[float, int]] = []
        while self._heap and self._heap[0][0] <= now:
            due, node_id = heapq.heappop(self._heap)
            if self._due.get(node_id) == due:
                del self._due[node_id]
                out.append((due, node_id))
        return out


class State:
    """In-memory registry backed by a Store. Not thread-safe: one event loop drives it."""

    def __init__(self, store: Store, cfg: StateConfig, now: float) -> None:
        self.store = store
        self.cfg = cfg
        self._nodes: dict[int, NodeRec] = {}
        self._by_key: dict[str, int] = {}
        self._by_name: dict[str, int] = {}
        self._by_pending: dict[str, int] = {}  # key rotation: pending node key -> node id
        self._devices: dict[int, set[int]] = {}  # gateway id -> the ids of its devices
        self._streams: dict[int, int] = {}  # node id -> open Sync streams
        self._expiry_heap: list[tuple[float, int]] = []
        self._ephemeral = _Deadlines()  # ephemeral nodes offline: when they are deleted
        self._leaving = _Deadlines()  # nodes whose last stream ended: when they go offline
        # the nodes' resolver addresses are never a node's (ghostlink.magicdns listens on them)
        resolvers = (ipaddress.ip_address(RESOLVER_V4), ipaddress.ip_address(RESOLVER_V6))
        self._v4 = Allocator(parse_prefix(cfg.ipv4_prefix, "network.ipv4_prefix"), reserved=resolvers)
        self._v6 = Allocator(parse_prefix(cfg.ipv6_prefix, "network.ipv6_prefix"), reserved=resolvers)
        self._overlay = (self._v4.prefix, self._v6.prefix)
        self.routes = RouteTable(store.list_routes())  # primaries are elected as routers come online
        # users' OIDC groups (policy group members "oidc:<g>"), see register_oidc
        self._user_groups = {u.name: frozenset(u.groups) for u in store.list_users() if u.groups}
        if cfg.oidc_issuer:
            # Bindings stored before issuers were recorded were made by logins at the issuer configured
            # then; the first start with an issuer takes them as that issuer's (a one-time upgrade).
            store.adopt_oidc_issuer(cfg.oidc_issuer)
        self._lock_log = list(store.list_lock())
        self.lock_state = lock.verify_log(self._lock_log)  # LockError: the stored log no longer verifies
        self._verifier = lock.Verifier(self.lock_state.trusted)  # memoised verdicts for unsigned_nodes
        for stored in store.list_nodes():
            node = self._with_routes(stored)
            self._index(node)
            if node.pending_key:
                self._by_pending[node.pending_key] = node.id
            self._v4.mark_used(ipaddress.ip_address(node.ipv4))
            self._v6.mark_used(ipaddress.ip_address(node.ipv6))
            if node.expires and not node.expired(now):
                heapq.heappush(self._expiry_heap, (node.expires, node.id))
            if node.ephemeral:
                # Nobody is connected right after a start: ephemeral nodes get a fresh grace to come back.
                self._schedule_ephemeral(node.id, now)
        self._refresh(list(self._devices))  # the gateways' device prefixes, now that every device is known

    # -- lookups ---------------------------------------------------------------------------------------

    def _index(self, node: NodeRec) -> None:
        old = self._nodes.get(node.id)
        if old is not None:
            self._by_key.pop(old.node_key, None)
            self._by_name.pop(old.name, None)
        self._nodes[node.id] = node
        self._by_key[node.node_key] = node.id
        self._by_name[node.name] = node.id
        if node.via:
            self._devices.setdefault(node.via, set()).add(node.id)

    def _unindex(self, node: NodeRec) -> None:
        if node.via:
            devices = self._devices.get(node.via, set())
            devices.discard(node.id)
            if not devices:
                self._devices.pop(node.via, None)
        self._nodes.pop(node.id, None)
        self._by_key.pop(node.node_key, None)
        self._by_name.pop(node.name, None)
        self._streams.pop(node.id, None)
        self._ephemeral.cancel(node.id)
        self._leaving.cancel(node.id)

    def snapshot(self) -> list[NodeAdded]:
        """Every node as the record that adds it (presence and its user's OIDC groups included): what the
        mapper is seeded with at start, and what the policy is asked about."""
        return [self._added(n) for n in self._nodes.values()]

    def _added(self, node: NodeRec) -> NodeAdded:
        return NodeAdded(node, self.is_online(node.id), self.groups_of(node.user))

    def _changed(self, node: NodeRec) -> NodeChanged:
        """The record telling peers about ``node`` as it is now. Every NodeAdded / NodeChanged is built by
        these two, so each carries the node's presence and its user's OIDC groups."""
        return NodeChanged(node, self.is_online(node.id), self.groups_of(node.user))

    def node(self, node_id: int) -> NodeRec | None:
        return self._nodes.get(node_id)

    def node_by_key(self, node_key: str) -> NodeRec | None:
        node_id = self._by_key.get(node_key)
        return None if node_id is None else self._nodes[node_id]

    def resolve(self, ref: str) -> NodeRec:
        """A node by name or numeric id; NotFound otherwise."""
        ref = ref.strip()
        if not ref:
            raise InvalidArgument("a node name or id is required")
        node_id = int(ref) if ref.isdigit() else self._by_name.get(ref)
        node = None if node_id is None else self._nodes.get(node_id)
        if node is None:
            raise NotFound(f"node {ref[:70]!r} not found; see `ghostctl nodes list`")
        return node

    def is_online(self, node_id: int) -> bool:
        return self._streams.get(node_id, 0) > 0

    def list_nodes(self, user: str = "") -> list[NodeRec]:
        return [n for n in self._nodes.values() if not user or n.user == user]

    # -- users -----------------------------------------------------------------------------------------

    def create_user(self, name: str, now: float, *, oidc_subject: str = "", oidc_issuer: str = "") -> UserRec:
        """A new user; with ``oidc_subject``, bound to that OIDC account at once (see :meth:`bind_user`)."""
        if not USER_RE.match(name):
            raise InvalidArgument(
                f"invalid user name {name[:70]!r}: use 1-63 lower-case letters, digits, '.', '_', '+' "
                "or '-', optionally followed by @domain (an e-mail address, as Tailscale names users)"
            )
        if not oidc_subject:
            if oidc_issuer:
                raise InvalidArgument("an OIDC issuer without a subject binds nothing; pass --oidc-subject")
            return self.store.create_user(name, now)
        issuer = self._issuer_for_binding(oidc_issuer)
        _check_oidc_identity(issuer, oidc_subject)
        with self.store.transaction():  # created and bound, or neither
            self.store.create_user(name, now)
            return self._bind(name, issuer, oidc_subject)

    def _issuer_for_binding(self, issuer: str) -> str:
        issuer = canonical_issuer(issuer) or self.cfg.oidc_issuer
        if not issuer:
            raise InvalidArgument(
                "this server has no OIDC provider configured; pass the account's issuer (--issuer URL)"
            )
        return issuer

    def _bind(self, name: str, issuer: str, subject: str) -> UserRec:
        owner = self.store.user_by_oidc_identity(issuer, subject)
        if owner is not None and owner.name != name:
            raise Conflict(f"that OIDC account is bound to user {owner.name!r}; unbind it there first")
        return self.store.set_oidc_identity(name, issuer, subject)

    def bind_user(self, name: str, subject: str, issuer: str = "") -> tuple[UserRec, bool]:
        """Bind user ``name`` to the OIDC account (``issuer``, default the configured one; ``subject``, the
        provider's ``sub``): from then on that account's logins act as this user, whatever name their
        claims carry, and no other account's do. Whether anything changed. Conflict (nothing written)
        when the user is bound to another account or the account to another user."""
        issuer = self._issuer_for_binding(issuer)
        _check_oidc_identity(issuer, subject)
        user = self.store.get_user(name)
        if user is None:
            raise NotFound(f"user {name[:70]!r} not found; see `ghostctl users list`")
        if user.oidc_subject is not None:
            if (user.oidc_issuer, user.oidc_subject) == (issuer, subject):
                return user, False
            raise Conflict(
                f"user {name!r} is bound to another OIDC account; `ghostctl users unbind {name}` first"
            )
        return self._bind(name, issuer, subject), True

    def unbind_user(self, name: str, now: float) -> tuple[UserRec, list[Change]]:
        """Unbind user ``name`` from its OIDC account: no OIDC login acts as it any more (its nodes stay).
        The groups that account brought go too, an identity change of the user's nodes (policy)."""
        user = self.store.get_user(name)
        if user is None:
            raise NotFound(f"user {name[:70]!r} not found; see `ghostctl users list`")
        if user.oidc_subject is None:
            return user, []
        had_groups = bool(self.groups_of(name))
        rec = self.store.set_oidc_identity(name, "", None)
        self._user_groups.pop(name, None)
        if not had_groups:
            return rec, []
        return rec, [self._changed(n) for n in self._nodes.values() if n.user == name and not n.expired(now)]

    def list_users(self) -> Sequence[UserRec]:
        return self.store.list_users()

    def delete_user(self, name: str) -> None:
        if self.store.get_user(name) is None:
            raise NotFound(f"user {name[:70]!r} not found; see `ghostctl users list`")
        owned = sum(1 for n in self._nodes.values() if n.user == name)
        if owned:
            raise Conflict(f"user {name!r} still owns {owned} node(s); delete them first")
        self.store.delete_user(name)
        self._user_groups.pop(name, None)  # a user made again under this name starts without them

    def _ensure_user(self, name: str, now: float) -> str:
        name = name or DEFAULT_USER
        if self.store.get_user(name) is None:
            self.create_user(name, now)
        return name

    # -- auth keys -------------------------------------------------------------------------------------

    def create_auth_key(
        self,
        *,
        user: str = "",
        reusable: bool = False,
        ephemeral: bool = False,
        expiration: float = 0.0,
        tags: Sequence[str] = (),
        now: float,
    ) -> tuple[AuthKeyRec, str]:
        """A new pre-auth key and the whole key text (shown once). ``expiration`` 0: the config default."""
        if expiration < 0:
            raise InvalidArgument("auth key expiration cannot be negative")
        _check_owner(user, tags)
        user = self._ensure_user(user, now)
        key_id, secret, whole = new_key(AUTH_PREFIX)
        rec = AuthKeyRec(
            id=key_id,
            hash=hash_secret(secret),
            user=user,
            reusable=reusable,
            ephemeral=ephemeral,
            tags=tuple(tags),
            created=now,
            expires=now + (expiration or self.cfg.authkey_expiration),
        )
        self.store.insert_auth_key(rec)
        return rec, whole

    def list_auth_keys(self, user: str = "") -> Sequence[AuthKeyRec]:
        return self.store.list_auth_keys(user or None)

    def expire_auth_key(self, ref: str) -> AuthKeyRec:
        key_id = key_id_of(ref, AUTH_PREFIX)
        rec = self.store.revoke_auth_key(key_id)
        if rec is None:
            raise NotFound(f"auth key {AUTH_PREFIX}{key_id} not found; see `ghostctl authkeys list`")
        return rec

    def check_auth_key(self, text: str, now: float) -> AuthKeyRec:
        """The usable auth key ``text`` names, or AuthError saying why not (never echoing the secret)."""
        parts = split_key(text, AUTH_PREFIX)
        if parts is None:
            raise AuthError(
                "auth key is malformed: expected gmauth_<id>_<secret> as `ghostctl authkeys create` prints"
            )
        key_id, secret = parts
        rec = self.store.get_auth_key(key_id)
        if rec is None or not hmac.compare_digest(rec.hash, hash_secret(secret)):
            raise AuthError(
                "auth key is not valid: unknown key or wrong secret; check it or create a new one"
            )
        if rec.revoked:
            raise AuthError(f"auth key {AUTH_PREFIX}{key_id} was revoked; create a new one")
        if rec.spent():
            raise AuthError(f"auth key {AUTH_PREFIX}{key_id} was single-use and is spent; create a new one")
        if rec.expires and rec.expires <= now:
            raise AuthError(f"auth key {AUTH_PREFIX}{key_id} has expired; create a new one")
        return rec

    # -- API keys --------------------------------------------------------------------------------------

    def create_api_key(self, expiration: float, now: float) -> tuple[ApiKeyRec, str]:
        if expiration < 0:
            raise InvalidArgument("API key expiration cannot be negative")
        key_id, secret, whole = new_key(API_PREFIX)
        rec = ApiKeyRec(
            id=key_id,
            hash=hash_secret(secret),
            created=now,
            expires=now + (expiration or DEFAULT_API_KEY_EXPIRATION),
        )
        self.store.insert_api_key(rec)
        return rec, whole

    def list_api_keys(self) -> Sequence[ApiKeyRec]:
        return self.store.list_api_keys()

    def expire_api_key(self, ref: str) -> ApiKeyRec:
        key_id = key_id_of(ref, API_PREFIX)
        rec = self.store.revoke_api_key(key_id)
        if rec is None:
            raise NotFound(f"API key {API_PREFIX}{key_id} not found; see `ghostctl apikeys list`")
        return rec

    def verify_api_key(self, text: str, now: float) -> ApiKeyRec:
        parts = split_key(text, API_PREFIX)
        if parts is None:
            raise AuthError("API key is malformed: expected gmapi_<id>_<secret>")
        key_id, secret = parts
        rec = self.store.get_api_key(key_id)
        if rec is None or not hmac.compare_digest(rec.hash, hash_secret(secret)):
            raise AuthError("API key is not valid: unknown key or wrong secret")
        if rec.revoked:
            raise AuthError(f"API key {API_PREFIX}{key_id} was revoked")
        if rec.expires and rec.expires <= now:
            raise AuthError(f"API key {API_PREFIX}{key_id} has expired")
        if now - rec.last_used >= 60:  # one write a minute per key is enough for "last used"
            self.store.touch_api_key(key_id, now)
        return rec

    # -- registration ----------------------------------------------------------------------------------

    def _unique_name(self, base: str, exclude_id: int = 0) -> str:
        taken = self._by_name.get(base)
        if taken is None or taken == exclude_id:
            return base
        for i in range(1, 100_000):
            suffix = f"-{i}"
            cand = base[: 63 - len(suffix)].rstrip("-") + suffix
            taken = self._by_name.get(cand)
            if taken is None or taken == exclude_id:
                return cand
        raise Conflict(f"no free node name left for {base!r}")  # pragma: no cover - 100k same-named nodes

    def _expires_from(self, now: float) -> float:
        return now + self.cfg.key_expiry if self.cfg.key_expiry else 0.0

    def register(
        self, node_key: str, auth_key: str, hostname: str, now: float, key_signature: bytes = b""
    ) -> tuple[NodeRec, list[Change]]:
        """Bind ``node_key`` (proven by the caller) to a node. See the module docstring for the rules.

        - known, unexpired key: the same node (no auth key needed), unchanged unless it brings a new
          signature;
        - known, expired key: needs a valid auth key; renews the expiry;
        - unknown key: needs a valid auth key; allocates addresses and a unique name.

        ``key_signature`` (a node signing its own key with a pre-signed auth key's credential): while the
        lock is on it must vouch for ``node_key`` (``LockError`` otherwise) and is stored; while the lock is
        off it means nothing and is not kept. Nothing is written when this raises.
        """
        _check_registration_input(node_key, hostname)
        signature = self._checked_signature(key_signature, node_key) if key_signature else b""
        known = self.node_by_key(node_key)
        refuse_device(known)
        if known is not None and not known.expired(now):
            if not signature or signature == known.key_signature:
                return known, []
            return self._store_signature(known, signature, now)
        if not auth_key:
            if known is not None:
                raise AuthError(f"node {known.name}'s key has expired; register again with an auth key")
            raise AuthError("this node key is not registered; pass an auth key (--auth) to join")
        key = self.check_auth_key(auth_key, now)
        if known is not None:
            renewed = self._renew(known, now, consume_auth_key=key.id, signature=signature)
            return renewed, [self._changed(renewed)]
        node = self._create(
            node_key, hostname, key.user, now,
            ephemeral=key.ephemeral, tags=key.tags, auth_key_id=key.id, consume_auth_key=key.id,
            key_signature=signature,
        )  # fmt: skip
        if node.ephemeral:
            self._schedule_ephemeral(node.id, now)  # registered but never connecting counts as gone
        return node, [self._added(node)]

    def _renew(
        self, known: NodeRec, now: float, consume_auth_key: str | None = None, signature: bytes = b""
    ) -> NodeRec:
        """A re-registration of a known key: a fresh expiry (stored, indexed, scheduled), and ``signature``
        (checked already) when one came with it."""
        signature = signature or known.key_signature
        renewed = replace(known, expires=self._expires_from(now), last_seen=now, key_signature=signature)
        self.store.update_node(renewed, consume_auth_key=consume_auth_key)
        self._index(renewed)
        if renewed.expires:
            heapq.heappush(self._expiry_heap, (renewed.expires, renewed.id))
        return renewed

    def _create(
        self,
        node_key: str,
        hostname: str,
        user: str,
        now: float,
        *,
        ephemeral: bool = False,
        tags: tuple[str, ...] = (),
        auth_key_id: str | None = None,
        consume_auth_key: str | None = None,
        key_signature: bytes = b"",
        via: int = 0,
    ) -> NodeRec:
        """A new node: addresses, a unique name, stored (addresses handed back if storing fails). A device
        (``via``: its gateway) never expires: it cannot register again."""
        ipv4 = self._v4.allocate()
        try:
            ipv6 = self._v6.allocate()
        except Exception:
            self._v4.release(ipv4)
            raise
        draft = NodeRec(
            id=0,
            name=self._unique_name(sanitize_name(hostname)),
            user=user,
            node_key=node_key,
            ipv4=str(ipv4),
            ipv6=str(ipv6),
            ephemeral=ephemeral,
            tags=tags,
            created=now,
            expires=0.0 if via else self._expires_from(now),
            last_seen=now,
            endpoints=(),
            hostname=hostname,
            auth_key_id=auth_key_id,
            key_signature=key_signature,
            via=via,
        )
        try:
            node = self.store.insert_node(draft, consume_auth_key=consume_auth_key)
        except Exception:
            self._v4.release(ipv4)
            self._v6.release(ipv6)
            raise
        self._index(node)
        if node.expires:
            heapq.heappush(self._expiry_heap, (node.expires, node.id))
        return node

    # -- OIDC login (ghostmesh.oidc) -------------------------------------------------------------------

    def groups_of(self, user: str) -> frozenset[str]:
        """The user's OIDC groups at their last login; empty for users that never logged in with OIDC."""
        return self._user_groups.get(user, frozenset())

    def resolve_oidc_user(self, name: str, issuer: str, subject: str) -> str:
        """The user an OIDC login of the account (``issuer``, ``subject``) acts as; ``name`` is the user
        name its claims give. Writes nothing.

        - the user bound to that account, whatever ``name`` is now (an account renamed at the provider
          stays the same user; an admin may bind an account to a user of another name);
        - else ``name`` when no user has it (the login creates it, bound to the account);
        - else refused (PermissionDenied): a user that exists and is bound to another account, or to
          none, is not taken over by a login that happens to carry its name. An admin created that user
          (or an auth key did, as ``default``): only an admin says which account it is, and the message
          gives the command.
        """
        owner = self.store.user_by_oidc_identity(issuer, subject)
        if owner is not None:
            return owner.name
        if not USER_RE.match(name):
            raise PermissionDenied(f"login refused: {name[:70]!r} is not a valid ghostmesh user name")
        user = self.store.get_user(name)
        if user is None:
            return name
        if user.oidc_subject is not None:
            raise PermissionDenied(f"login refused: user {name!r} belongs to another OIDC account")
        printable = subject.isprintable() and len(subject) <= 255 and issuer.isprintable()
        how = (
            f"ghostctl users bind {name} --oidc-subject {shlex.quote(subject)} --issuer {shlex.quote(issuer)}"
            if printable
            else f"ghostctl users bind {name} --oidc-subject SUB --issuer ISSUER"
        )
        raise PermissionDenied(
            f"login refused: user {name!r} exists and is bound to no OIDC account; an admin may bind it "
            f"to this account: {how}"
        )

    def register_oidc(
        self,
        node_key: str,
        hostname: str,
        user: str,
        subject: str,
        *,
        issuer: str,
        groups: Iterable[str],
        now: float,
    ) -> tuple[NodeRec, list[Change]]:
        """Register ``node_key`` after an OIDC login of the account (``issuer``, ``subject``) whose claims
        name ``user``, to the user :meth:`resolve_oidc_user` picks, as :meth:`register` does for an auth
        key (new key: addresses and a unique name; known key of the same user: expiry renewed), and store
        the user's groups. Groups that changed are an identity change of the user's other nodes (policy).
        """
        _check_registration_input(node_key, hostname)
        issuer = canonical_issuer(issuer)
        user = self.resolve_oidc_user(user, issuer, subject)
        known = self.node_by_key(node_key)
        refuse_device(known)
        if known is not None and known.user != user:
            raise PermissionDenied(f"login refused: this node is registered to user {known.user!r}")
        new_groups = frozenset(groups)
        old_groups = self.groups_of(user)
        # Every write first (one transaction with the caller's), the memory after: a refused write leaves
        # the groups as they were.
        self.store.put_oidc_user(user, issuer, subject, sorted(new_groups), now)
        node = self._renew(known, now) if known is not None else self._create(node_key, hostname, user, now)
        if new_groups:
            self._user_groups[user] = new_groups
        else:
            self._user_groups.pop(user, None)
        changes: list[Change] = []
        if new_groups != old_groups:
            changes = [
                self._changed(n)
                for n in self._nodes.values()
                if n.user == user and n.id != node.id and not n.expired(now)
            ]
        return node, [*changes, self._changed(node) if known is not None else self._added(node)]

    # -- admin mutations -------------------------------------------------------------------------------

    def rename(self, ref: str, new_name: str) -> tuple[NodeRec, list[Change]]:
        node = self.resolve(ref)
        validate_name(new_name)
        if new_name == node.name:
            return node, []
        if new_name in self._by_name:
            raise Conflict(f"node name {new_name!r} is taken; pick another")
        renamed = replace(node, name=new_name)
        self.store.update_node(renamed)
        self._index(renamed)
        return renamed, [self._changed(renamed)]

    def expire_node(self, ref: str, now: float) -> tuple[NodeRec, list[Change]]:
        """Expire a node's key now: it leaves every peer's map; its Sync is refused until it re-registers."""
        node = self.resolve(ref)
        if node.expired(now):
            return node, []
        expired = replace(node, expires=now)
        self.store.update_node(expired)
        self._index(expired)
        return expired, [NodeRemoved(node.id, "expired"), *self._refresh((node.via,) if node.via else ())]

    def delete_node(self, ref: str) -> list[Change]:
        node = self.resolve(ref)
        return self._delete(node)

    def _delete(self, node: NodeRec) -> list[Change]:
        self._refuse_gateway(node, "deleting it")
        self.store.delete_node(node.id)  # its route rows go with it (ON DELETE CASCADE)
        self._unindex(node)
        self._v4.release(ipaddress.ip_address(node.ipv4))
        self._v6.release(ipaddress.ip_address(node.ipv6))
        changed = self.routes.forget_node(node.id, self.is_online)
        if node.via:
            changed.add(node.via)  # its gateway no longer carries its addresses
        return [NodeRemoved(node.id, "deleted"), *self._refresh(changed)]

    # -- devices ---------------------------------------------------------------------------------------

    def devices_of(self, node_id: int) -> list[NodeRec]:
        return [self._nodes[d] for d in sorted(self._devices.get(node_id, ()))]

    def _refuse_gateway(self, node: NodeRec, what: str) -> None:
        devices = self.devices_of(node.id)
        if devices:
            names = ", ".join(d.name for d in devices[:5]) + (", …" if len(devices) > 5 else "")
            raise PermissionDenied(
                f"node {node.name} is the gateway of device(s) {names}, whose configurations name its key; "
                f"{what} would cut them off: remove them first (ghostctl devices remove NAME)"
            )

    def add_device(
        self, name: str, node_key: str, via: str, *, user: str, tags: Sequence[str], now: float
    ) -> tuple[NodeRec, list[Change]]:
        """A device named ``name`` holding ``node_key`` behind the gateway node ``via`` (name or id), owned
        by ``user`` (or ``default``) and carrying ``tags``. Nothing is written when this raises."""
        validate_name(name)
        if name in self._by_name:
            raise Conflict(f"name {name!r} is taken by a node or device; pick another")
        PublicKey.from_base64(node_key)
        if node_key in self._by_key or node_key in self._by_pending:
            raise Conflict("this WireGuard key is registered already; generate a new one for the device")
        gateway = self.resolve(via)
        if gateway.via:
            raise InvalidArgument(f"{gateway.name} is a device: a gateway must be a node running ghostlink")
        if gateway.ephemeral or gateway.expired(now):
            what = "ephemeral" if gateway.ephemeral else "expired"
            raise InvalidArgument(f"node {gateway.name} is {what}: a gateway must be a lasting node")
        if gateway.pending_key:
            raise Conflict(
                f"node {gateway.name} is rotating its key; add the device once the rotation is done"
            )
        _check_owner(user, tags)
        owner = user or DEFAULT_USER
        if not gateway.tags and gateway.user != owner:
            # whoever runs the gateway terminates the device's tunnel and can act as the device
            raise PermissionDenied(
                f"node {gateway.name} belongs to {gateway.user}, and its owner could act as this device: a "
                f"device of {owner}'s goes behind a node of {owner}'s or a tagged node"
            )
        owner = self._ensure_user(user, now)
        device = self._create(node_key, name, owner, now, tags=tuple(tags), via=gateway.id)
        return device, [self._added(device), *self._refresh((gateway.id,))]

    # -- presence --------------------------------------------------------------------------------------

    def connect(self, node_id: int, now: float) -> list[Change]:
        """A Sync stream of ``node_id`` opened."""
        node = self._nodes.get(node_id)
        if node is None:
            return []
        if self._leaving.cancel(node_id):
            return []  # back within the presence grace: it never looked offline, nothing changed
        count = self._streams.get(node_id, 0) + 1
        self._streams[node_id] = count
        self._ephemeral.cancel(node_id)  # reconnected within the grace: keep it
        if count > 1:
            return []
        others = self._reelect_around(node_id)  # a router coming back may take over its prefixes
        seen = replace(self._nodes[node_id], last_seen=now)
        self.store.update_node(seen)
        self._index(seen)
        return [self._changed(seen), *others]  # online now

    def disconnect(self, node_id: int, now: float) -> list[Change]:
        """A Sync stream of ``node_id`` ended.

        When it was the node's last one, the node goes offline after ``presence_grace`` (in
        :meth:`tick`), unless a new stream opens first: a node that reconnects within the grace (a
        restart, a server-side drop, a whole fleet reconnecting at once) is no change to any peer. A node
        that routes for others (an approved subnet route or exit node) goes offline at once, so that
        another router takes over its prefixes without waiting for the grace.
        """
        node = self._nodes.get(node_id)
        if node is None or node_id not in self._streams or node_id in self._leaving:
            return []
        count = self._streams[node_id] - 1
        if count > 0:
            self._streams[node_id] = count
            return []
        if self.cfg.presence_grace > 0 and not self.routes.prefixes_of(node_id):
            self._leaving.set(node_id, now + self.cfg.presence_grace)  # the stream count stays 1 until then
            return []
        return self._go_offline(node_id, now)

    def _go_offline(self, node_id: int, now: float) -> list[Change]:
        del self._streams[node_id]
        others = self._reelect_around(node_id)  # failover: another router takes over its prefixes
        seen = replace(self._nodes[node_id], last_seen=now)
        self.store.update_node(seen)
        self._index(seen)
        if seen.ephemeral:
            self._schedule_ephemeral(node_id, now)
        if seen.expired(now):
            return others  # peers dropped it already
        return [self._changed(seen), *others]  # offline now

    def _schedule_ephemeral(self, node_id: int, now: float) -> None:
        self._ephemeral.set(node_id, now + self.cfg.ephemeral_grace)

    def report_status(
        self,
        node_id: int,
        endpoints: Sequence[str],
        now: float,
        *,
        home_region: int = 0,
        turn_relay: str = "",
    ) -> list[Change]:
        """A node's reported endpoints, home relay region (0: none) and TURN relayed address ("": none).

        All are validated before anything changes (InvalidArgument); peers hear of it only when one of
        them changed.
        """
        if len(endpoints) > MAX_ENDPOINTS:
            raise InvalidArgument(f"too many endpoints: at most {MAX_ENDPOINTS}, got {len(endpoints)}")
        normal = tuple(dict.fromkeys(validate_endpoint(e) for e in endpoints))
        if home_region and home_region not in self.cfg.relay_regions:
            known = ", ".join(str(r) for r in sorted(self.cfg.relay_regions)) or "none configured"
            raise InvalidArgument(
                f"home_region {home_region} is not a relay region of this server (known: {known}); "
                "report 0 or a region id from the relay map"
            )
        relay = validate_endpoint(turn_relay, "turn_relay") if turn_relay else ""
        node = self._nodes.get(node_id)
        if node is None:
            raise NotFound(f"node {node_id} not found")
        updated = replace(node, endpoints=normal, last_seen=now, home_region=home_region, turn_relay=relay)
        self.store.update_node(updated)
        self._index(updated)
        same = (normal, home_region, relay) == (node.endpoints, node.home_region, node.turn_relay)
        if same or updated.expired(now):
            return []
        return [self._changed(updated)]

    # -- key rotation ----------------------------------------------------------------------------------
    # A node rotating its WireGuard key (ghostmesh.api.coordination.RotateKey) first gets its proven new key
    # stored as ``pending_key``; peers keep the old key until a call proven with the pending key shows the
    # node switched (:meth:`promote_pending`), so no peer ever holds a key the node does not use yet.
    # A pending key younger than PENDING_ROTATION_TTL cannot be replaced by another rotation: the node may
    # be switching to it right now. An older one can (a node that crashed before saving it would else be
    # stuck with a pending key it no longer has).

    def node_by_pending_key(self, key: str) -> NodeRec | None:
        node_id = self._by_pending.get(key)
        node = None if node_id is None else self._nodes.get(node_id)
        return node if node is not None and node.pending_key == key else None

    def begin_rotation(self, node_id: int, new_key: str, now: float, signature: bytes = b"") -> NodeRec:
        """Store ``new_key`` (its possession already proven) as the node's pending key, with ``signature``
        (required while the lock is on: it must vouch for ``new_key``); nothing else changes.

        The same key again is a retry (the node, unchanged). Another key is refused (Conflict) while the
        pending one is younger than PENDING_ROTATION_TTL, and replaces it afterwards. Nothing is written
        when this raises.
        """
        node = self._nodes.get(node_id)
        if node is None:
            raise NotFound(f"node {node_id} not found")
        if node.expired(now):
            raise AuthError(f"node {node.name}'s key has expired; register again with an auth key")
        self._refuse_gateway(node, "rotating its key")
        PublicKey.from_base64(new_key)
        if new_key == node.node_key:
            raise InvalidArgument("key rotation: the new node key equals the current one; generate a new key")
        if new_key == node.pending_key:
            return node  # a retried request
        age = now - node.pending_since
        if node.pending_key and age < PENDING_ROTATION_TTL:
            raise Conflict(
                f"key rotation: node {node.name} has a pending key from {max(age, 0.0):.0f} s ago; finish "
                f"that rotation (prove the pending key) or retry after {PENDING_ROTATION_TTL:.0f} s"
            )
        if self.lock_state.enabled and not signature:
            raise InvalidArgument(ROTATION_SIGNATURE_NEEDED)
        try:
            pending_signature = self._checked_signature(signature, new_key)
        except lock.LockError as exc:
            raise InvalidArgument(f"{ROTATION_SIGNATURE_NEEDED} ({exc})") from None
        holder = self._by_key.get(new_key)
        if holder is None:
            pending_holder = self.node_by_pending_key(new_key)
            holder = None if pending_holder is None else pending_holder.id
        if holder is not None:
            raise Conflict(
                "key rotation: the new node key is already bound to another node; generate a new key"
            )
        pending = replace(node, pending_key=new_key, pending_since=now, pending_signature=pending_signature)
        self.store.update_node(pending)
        self._index(pending)
        if node.pending_key:
            self._by_pending.pop(node.pending_key, None)
        self._by_pending[new_key] = node.id
        return pending

    def promote_pending(self, key: str, now: float) -> tuple[NodeRec, list[Change]] | None:
        """``key`` was just proven: if it is a node's pending key, it becomes the node key (peers learn it),
        its signature the node's signature, in one write.

        None when ``key`` is nobody's pending key.
        """
        node = self.node_by_pending_key(key)
        if node is None:
            return None
        promoted = replace(
            node,
            node_key=key,
            key_signature=node.pending_signature,
            pending_key=None,
            pending_since=0.0,
            pending_signature=b"",
            last_seen=now,
        )
        self.store.update_node(promoted)
        self._index(promoted)
        self._by_pending.pop(key, None)
        if promoted.expired(now):
            return promoted, []  # peers dropped it already; re-registration brings it back
        return promoted, [self._changed(promoted)]

    # -- node-key signing (ghostcore.lock) ---------------------------------------------------------------
    # ghostmesh holds no signing key: it keeps the log admins sign and the signatures that vouch for node
    # keys, checks each against the log before storing it, and forwards both. Nodes check them again.

    def lock_log(self) -> tuple[bytes, ...]:
        return tuple(self._lock_log)

    def lock_record(self) -> LockChanged:
        """The log as a change record: what the mapper is seeded with, and what a new update returns."""
        return LockChanged(tuple(self._lock_log))

    def append_lock(self, update: bytes) -> list[Change]:
        """Append one signed update (``LockError`` saying why it cannot follow the log; nothing written).
        Every stream gets the grown log."""
        after = lock.apply_update(self.lock_state, update)
        self.store.append_lock(len(self._lock_log) + 1, update)
        self._lock_log.append(update)
        self.lock_state = after
        if after.trusted != self._verifier.trusted:
            self._verifier = lock.Verifier(after.trusted)
        return [self.lock_record()]

    def _checked_signature(self, signature: bytes, node_key: str) -> bytes:
        """``signature`` when the lock is on and it vouches for ``node_key`` (``LockError`` when it does
        not); b"" when the lock is off: a signature then means nothing and is not kept."""
        if not self.lock_state.enabled:
            return b""
        lock.verify_signature(signature, PublicKey.from_base64(node_key).raw, self.lock_state.trusted)
        return signature

    def _store_signature(self, node: NodeRec, signature: bytes, now: float) -> tuple[NodeRec, list[Change]]:
        signed = replace(node, key_signature=signature)
        self.store.update_node(signed)
        self._index(signed)
        return signed, ([] if signed.expired(now) else [self._changed(signed)])

    def sign_node(
        self, node_key: str, signature: bytes, now: float
    ) -> tuple[NodeRec, lock.Verified, list[Change]]:
        """Store an admin's ``signature`` for the node holding ``node_key`` (or holding it as its pending
        key: then it becomes the pending signature). The lock must be on and the signature must vouch for
        ``node_key`` under its trusted keys (InvalidArgument otherwise); unknown key: NotFound. Returns the
        node, what the signature verified to (its root key), and the changes (peers get the signature)."""
        if not self.lock_state.enabled:
            raise InvalidArgument("node-key signing is off: turn it on with `ghostctl lock init` first")
        raw = PublicKey.from_base64(node_key).raw
        verified = lock.verify_signature(signature, raw, self.lock_state.trusted)
        node = self.node_by_key(node_key)
        if node is not None:
            if node.key_signature == signature:
                return node, verified, []
            signed, changes = self._store_signature(node, signature, now)
            return signed, verified, changes
        node = self.node_by_pending_key(node_key)
        if node is None:
            raise NotFound(f"no node holds the key {node_key[:8]}…; see `ghostctl nodes list`")
        signed = replace(node, pending_signature=signature)
        self.store.update_node(signed)
        self._index(signed)
        return signed, verified, []  # peers see the pending key (and its signature) once it is proven

    def unsigned_nodes(self, now: float) -> list[str]:
        """Names of the unexpired nodes whose key no signature vouches for under the lock (none when the
        lock is off): the nodes peers refuse."""
        if not self.lock_state.enabled:
            return []
        check = self._verifier.check
        return sorted(
            n.name
            for n in self._nodes.values()
            if not n.expired(now)
            and not isinstance(check(n.key_signature, PublicKey.from_base64(n.node_key).raw), lock.Verified)
        )

    # -- subnet routes and exit nodes (ghostmesh.routes) ------------------------------------------------
    # A node record carries its derived ``primary_routes`` / ``exit_node``; :meth:`_refresh` recomputes
    # them for the nodes an election or approval touched and returns a NodeChanged for each that changed.

    def _with_routes(self, node: NodeRec) -> NodeRec:
        primary = self.routes.primary_routes(node.id)
        exit_node = self.routes.is_exit_node(node.id)
        approved = self.routes.approved_routes(node.id)
        # a device's expiry is 0 (never) until an admin expires it
        devices = tuple(
            p for d in self.devices_of(node.id) if not d.expires for p in (f"{d.ipv4}/32", f"{d.ipv6}/128")
        )
        same = node.primary_routes == primary and node.approved_routes == approved
        if same and node.exit_node == exit_node and node.device_prefixes == devices:
            return node
        return replace(
            node,
            primary_routes=primary,
            exit_node=exit_node,
            approved_routes=approved,
            device_prefixes=devices,
        )

    def _refresh(self, node_ids: Iterable[int], skip: int = 0) -> list[Change]:
        changes: list[Change] = []
        for nid in sorted(node_ids):
            node = self._nodes.get(nid)
            if node is None:
                continue
            fresh = self._with_routes(node)
            if fresh is node:
                continue
            self._index(fresh)
            if nid != skip:
                changes.append(self._changed(fresh))
        return changes

    def _reelect_around(self, node_id: int) -> list[Change]:
        """Re-elect the prefixes ``node_id`` serves after its presence changed; its own record is updated
        in place (the caller sends it), the other changed routers are returned as changes."""
        changed = self.routes.elect(self.routes.prefixes_of(node_id), self.is_online)
        changed.add(node_id)
        return self._refresh(changed, skip=node_id)

    def _save_routes(self, recs: Sequence[RouteRec]) -> list[Change]:
        """Write rows (dropping those nobody advertises or approved) in one transaction; re-elect."""
        write = [r for r in recs if r.advertised or r.approved]
        delete = [(r.node_id, r.prefix) for r in recs if not (r.advertised or r.approved)]
        self.store.put_routes(write, delete)
        for r in write:
            self.routes.put(r)
        for nid, prefix in delete:
            self.routes.drop(nid, prefix)
        changed = self.routes.elect({r.prefix for r in recs}, self.is_online)
        changed.update(r.node_id for r in recs)
        return self._refresh(changed)

    @staticmethod
    def _twins(prefix: str) -> tuple[str, ...]:
        """An exit node is 0.0.0.0/0 and ::/0 together: an admin change to one applies to both."""
        return EXIT_PREFIXES if is_exit(prefix) else (prefix,)

    def route_prefix(self, text: str) -> str:
        """``text`` validated as a route (InvalidArgument otherwise; see ghostmesh.routes)."""
        return validate_prefix(text, self._overlay)

    def add_route(self, ref: str, prefix: str) -> tuple[RouteRec, bool, list[Change]]:
        """``ghostctl route add PREFIX via NODE``: advertise on the node's behalf and approve.

        Returns (row, whether a row changed, map changes: none for a standby router)."""
        node = self.resolve(ref)
        prefix = self.route_prefix(prefix)
        olds = [self.routes.get(node.id, p) or RouteRec(node.id, p) for p in self._twins(prefix)]
        recs = [replace(o, by_admin=True, approved=True) for o in olds]
        rec = next(r for r in recs if r.prefix == prefix)
        if recs == olds:
            return rec, False, []
        return rec, True, self._save_routes(recs)

    def approve_route(self, ref: str, prefix: str) -> tuple[RouteRec, bool, list[Change]]:
        node = self.resolve(ref)
        prefix = self.route_prefix(prefix)
        old = self.routes.get(node.id, prefix)
        if old is None or not old.advertised:
            raise NotFound(
                f"node {node.name} does not advertise {prefix}; advertise it with ghostlink "
                "--advertise-routes or use `ghostctl route add`"
            )
        olds = [o for p in self._twins(prefix) if (o := self.routes.get(node.id, p)) and o.advertised]
        recs = [replace(o, approved=True) for o in olds]
        rec = next(r for r in recs if r.prefix == prefix)
        if recs == olds:
            return rec, False, []
        return rec, True, self._save_routes(recs)

    def delete_route(self, ref: str, prefix: str) -> tuple[RouteRec, list[Change]]:
        """Forget the route (advertisement by an admin and approval); a node still advertising it keeps
        an unapproved row, so it shows in ``route list`` and can be approved again."""
        node = self.resolve(ref)
        prefix = self.route_prefix(prefix)
        old = self.routes.get(node.id, prefix)
        if old is None:
            raise NotFound(f"node {node.name} has no route {prefix}; see `ghostctl route list`")
        olds = [o for p in self._twins(prefix) if (o := self.routes.get(node.id, p))]
        return old, self._save_routes([replace(o, by_admin=False, approved=False) for o in olds])

    def advertised_set(self, prefixes: Sequence[str], exit_node: bool) -> set[str]:
        """A node's advertisement validated and normalised (InvalidArgument, one line, otherwise)."""
        wanted = [self.route_prefix(p) for p in prefixes]
        if any(is_exit(p) for p in wanted):
            raise InvalidArgument("advertised route 0.0.0.0/0 or ::/0: use --advertise-exit-node instead")
        if exit_node:
            wanted += list(EXIT_PREFIXES)
        want = set(wanted)
        if len(want) > MAX_ROUTES:
            raise InvalidArgument(f"too many advertised routes: at most {MAX_ROUTES}, got {len(want)}")
        return want

    def advertise_routes(
        self,
        node_id: int,
        prefixes: Sequence[str],
        exit_node: bool,
        auto_approve: Callable[[NodeRec, str], bool] | None = None,
    ) -> tuple[list[RouteRec], list[RouteRec], list[Change]]:
        """The node's whole advertised set (ReportStatus). Returns (newly advertised rows, rows it stopped
        advertising, changes). ``auto_approve``: the policy's auto-approvers. Nothing changes on error."""
        node = self._nodes.get(node_id)
        if node is None:
            raise NotFound(f"node {node_id} not found")
        want = self.advertised_set(prefixes, exit_node)
        added: list[RouteRec] = []
        gone: list[RouteRec] = []
        recs: list[RouteRec] = []
        for p in sorted(want | {r.prefix for r in self.routes.of_node(node_id) if r.by_node}):
            old = self.routes.get(node_id, p) or RouteRec(node_id, p)
            rec = replace(old, by_node=p in want)
            if rec.by_node and not old.by_node:
                if not rec.approved and auto_approve is not None and auto_approve(node, p):
                    rec = replace(rec, approved=True)
                added.append(rec)
            elif old.by_node and not rec.by_node:
                gone.append(old)
            if rec != old:
                recs.append(rec)
        if not recs:
            return [], [], []
        return added, gone, self._save_routes(recs)

    def approve_pending(
        self, auto_approve: Callable[[NodeRec, str], bool]
    ) -> tuple[list[RouteRec], list[Change]]:
        """After a policy change: approve the advertised, unapproved rows its auto-approvers now cover."""
        recs = []
        for r in self.routes.all():
            node = self._nodes.get(r.node_id)
            if r.advertised and not r.approved and node is not None and auto_approve(node, r.prefix):
                recs.append(replace(r, approved=True))
        return recs, (self._save_routes(recs) if recs else [])

    def list_routes(self, ref: str = "") -> list[tuple[NodeRec, RouteRec, bool]]:
        """(node, row, is primary) for every row, or one node's rows."""
        recs = self.routes.of_node(self.resolve(ref).id) if ref else self.routes.all()
        out = []
        for r in recs:
            node = self._nodes.get(r.node_id)
            if node is None:
                continue
            primary = self.routes.primary(r.prefix) == r.node_id or (
                is_exit(r.prefix) and r.advertised and r.approved
            )
            out.append((node, r, primary))
        return out

    # -- timers ----------------------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        """When :meth:`tick` has work next (None: nothing scheduled)."""
        while self._expiry_heap:
            due, node_id = self._expiry_heap[0]
            node = self._nodes.get(node_id)
            if node is not None and node.expires == due:
                break
            heapq.heappop(self._expiry_heap)  # stale: node deleted, renewed or expired by hand
        dues = (
            self._expiry_heap[0][0] if self._expiry_heap else None,
            self._ephemeral.next(),
            self._leaving.next(),
        )
        candidates = [d for d in dues if d is not None]
        return min(candidates) if candidates else None

    def tick(self, now: float) -> list[Change]:
        """Expire nodes whose key expiry passed, take offline the nodes whose presence grace ran out,
        and delete ephemeral nodes whose grace ran out."""
        changes: list[Change] = []
        for due, node_id in self._leaving.pop_due(now):
            if node_id in self._nodes:
                changes.extend(self._go_offline(node_id, due - self.cfg.presence_grace))  # when it left
        while self._expiry_heap and self._expiry_heap[0][0] <= now:
            due, node_id = heapq.heappop(self._expiry_heap)
            node = self._nodes.get(node_id)
            if node is not None and node.expires == due:
                changes.append(NodeRemoved(node_id, "expired"))
        for _, node_id in self._ephemeral.pop_due(now):
            node = self._nodes.get(node_id)
            if node is not None and not self.is_online(node_id):
                changes.extend(self._delete(node))
        return changes
