"""The registry facade of ghostmesh: one object through which every mutation goes.

Headscale's pattern (``hscontrol/state``): ``State`` holds the in-memory view of all nodes (loaded from
the store at start), performs each mutation through the :class:`~ghostmesh.store.base.Store` first (so
a failed write leaves memory untouched) and returns the :mod:`ghostmesh.changes` records describing what
changed, which the mapper turns into per-stream deltas. It is synchronous and takes ``now`` from its
caller, so unit tests drive it with hand-stepped time.

Secrets: auth keys look like ``gmauth_<12 hex id>_<43 char secret>`` and API keys ``gmapi_<id>_<secret>``
(secret from ``secrets.token_urlsafe(32)``). Only ``sha256(secret)`` is stored and compared with
``hmac.compare_digest``; the whole key is returned once, at creation. Error messages name the public id
at most, never the secret.

Time-driven work (node keys expiring, ephemeral nodes whose grace ran out) is done by :meth:`State.tick`;
:meth:`State.next_deadline` tells the caller when to call it next. Both use heaps, so neither scans all
nodes.
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import ipaddress
import re
import secrets
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace

from ghostcore.errors import AuthError, Conflict, InvalidArgument, NotFound
from ghostcore.ipalloc import Allocator, parse_prefix
from ghostcore.keys import PrivateKey, PublicKey
from ghostmesh.changes import Change, NodeAdded, NodeChanged, NodeRemoved
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
SERVER_KEY_KV = "server_private_key"

_LABEL_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")  # RFC 1123 section 2.1 host label
_USER_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
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


def validate_endpoint(text: str) -> str:
    """``ip:port`` or ``[ip6]:port``; returns it normalised."""
    bad = InvalidArgument(f"invalid endpoint {text[:60]!r}: expected ip:port or [ip6]:port")
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise bad
    try:
        if host.startswith("[") and host.endswith("]"):
            return f"[{ipaddress.IPv6Address(host[1:-1])}]:{int(port_text)}"
        return f"{ipaddress.IPv4Address(host)}:{int(port_text)}"
    except ValueError:
        raise bad from None


def load_server_key(store: Store) -> PrivateKey:
    """The server's X25519 key: generated on first start, then read from the store's kv table."""
    stored = store.get_kv(SERVER_KEY_KV)
    if stored is None:
        stored = store.set_kv_if_absent(SERVER_KEY_KV, PrivateKey.generate().base64().encode("ascii"))
    return PrivateKey.from_base64(stored.decode("ascii"))


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
    authkey_expiration: float = 3600.0
    relay_regions: frozenset[int] = frozenset()  # configured relay region ids (a node's home_region)

    @classmethod
    def from_mesh(cls, cfg: MeshConfig) -> StateConfig:
        return cls(
            ipv4_prefix=cfg.network.ipv4_prefix,
            ipv6_prefix=cfg.network.ipv6_prefix,
            key_expiry=cfg.nodes.key_expiry,
            ephemeral_grace=cfg.nodes.ephemeral_grace,
            authkey_expiration=cfg.authkeys.default_expiration,
            relay_regions=frozenset(r.id for r in cfg.relay.region_list()),
        )


class State:
    """In-memory registry backed by a Store. Not thread-safe: one event loop drives it."""

    def __init__(self, store: Store, cfg: StateConfig, now: float) -> None:
        self.store = store
        self.cfg = cfg
        self._nodes: dict[int, NodeRec] = {}
        self._by_key: dict[str, int] = {}
        self._by_name: dict[str, int] = {}
        self._by_pending: dict[str, int] = {}  # key rotation: pending node key -> node id
        self._streams: dict[int, int] = {}  # node id -> open Sync streams
        self._expiry_heap: list[tuple[float, int]] = []
        self._ephemeral_due: dict[int, float] = {}
        self._ephemeral_heap: list[tuple[float, int]] = []
        self._v4 = Allocator(parse_prefix(cfg.ipv4_prefix, "network.ipv4_prefix"))
        self._v6 = Allocator(parse_prefix(cfg.ipv6_prefix, "network.ipv6_prefix"))
        self._overlay = (self._v4.prefix, self._v6.prefix)
        self.routes = RouteTable(store.list_routes())  # primaries are elected as routers come online
        # users' OIDC groups (policy group members "oidc:<g>"), see register_oidc
        self._user_groups = {u.name: frozenset(u.groups) for u in store.list_users() if u.groups}
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

    # -- lookups ---------------------------------------------------------------------------------------

    def _index(self, node: NodeRec) -> None:
        old = self._nodes.get(node.id)
        if old is not None:
            self._by_key.pop(old.node_key, None)
            self._by_name.pop(old.name, None)
        self._nodes[node.id] = node
        self._by_key[node.node_key] = node.id
        self._by_name[node.name] = node.id

    def _unindex(self, node: NodeRec) -> None:
        self._nodes.pop(node.id, None)
        self._by_key.pop(node.node_key, None)
        self._by_name.pop(node.name, None)
        self._streams.pop(node.id, None)
        self._ephemeral_due.pop(node.id, None)

    def nodes(self) -> Iterable[NodeRec]:
        return self._nodes.values()

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

    def create_user(self, name: str, now: float) -> UserRec:
        if not _USER_RE.match(name):
            raise InvalidArgument(
                f"invalid user name {name[:70]!r}: use 1-63 lower-case letters, digits, '.', '_' or '-'"
            )
        return self.store.create_user(name, now)

    def list_users(self) -> Sequence[UserRec]:
        return self.store.list_users()

    def delete_user(self, name: str) -> None:
        if self.store.get_user(name) is None:
            raise NotFound(f"user {name[:70]!r} not found; see `ghostctl users list`")
        owned = sum(1 for n in self._nodes.values() if n.user == name)
        if owned:
            raise Conflict(f"user {name!r} still owns {owned} node(s); delete them first")
        self.store.delete_user(name)

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
        for tag in tags:
            if not _TAG_RE.match(tag):
                raise InvalidArgument(f"invalid tag {tag[:70]!r}: use letters, digits, ':', '.', '_' or '-'")
        if user and not _USER_RE.match(user):
            raise InvalidArgument(f"invalid user name {user[:70]!r}")
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
        self, node_key: str, auth_key: str, hostname: str, now: float
    ) -> tuple[NodeRec, list[Change]]:
        """Bind ``node_key`` (proven by the caller) to a node. See the module docstring for the rules.

        - known, unexpired key: the same node, unchanged (no auth key needed);
        - known, expired key: needs a valid auth key; renews the expiry;
        - unknown key: needs a valid auth key; allocates addresses and a unique name.

        Nothing is written when this raises.
        """
        _check_registration_input(node_key, hostname)
        known = self.node_by_key(node_key)
        if known is not None and not known.expired(now):
            return known, []
        if not auth_key:
            if known is not None:
                raise AuthError(f"node {known.name}'s key has expired; register again with an auth key")
            raise AuthError("this node key is not registered; pass an auth key (--auth) to join")
        key = self.check_auth_key(auth_key, now)
        if known is not None:
            renewed = self._renew(known, now, consume_auth_key=key.id)
            return renewed, [NodeChanged(renewed, self.is_online(renewed.id))]
        node = self._create(
            node_key, hostname, key.user, now,
            ephemeral=key.ephemeral, tags=key.tags, auth_key_id=key.id, consume_auth_key=key.id,
        )  # fmt: skip
        if node.ephemeral:
            self._schedule_ephemeral(node.id, now)  # registered but never connecting counts as gone
        return node, [NodeAdded(node, False)]

    def _renew(self, known: NodeRec, now: float, consume_auth_key: str | None = None) -> NodeRec:
        """A re-registration of a known key: a fresh expiry (stored, indexed, scheduled)."""
        renewed = replace(known, expires=self._expires_from(now), last_seen=now)
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
    ) -> NodeRec:
        """A new node: addresses, a unique name, stored (addresses handed back if storing fails)."""
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
            expires=self._expires_from(now),
            last_seen=now,
            endpoints=(),
            hostname=hostname,
            auth_key_id=auth_key_id,
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

    def check_oidc_user(self, name: str, subject: str) -> None:
        """Raise AuthError unless an OIDC login with ``subject`` may act as user ``name``. A user created by
        an admin is bound to the first OIDC account logging in with its name; after that only that account
        (its ``sub``) may. Writes nothing."""
        if not _USER_RE.match(name):
            raise AuthError(f"OIDC login refused: {name[:70]!r} is not a valid ghostmesh user name")
        owner = self.store.user_by_oidc_subject(subject)
        if owner is not None and owner.name != name:
            raise AuthError(f"OIDC login refused: this account is bound to user {owner.name!r}, not {name!r}")
        user = self.store.get_user(name)
        if user is not None and user.oidc_subject not in (None, subject):
            raise AuthError(f"OIDC login refused: user {name!r} belongs to another OIDC account")

    def register_oidc(
        self, node_key: str, hostname: str, user: str, subject: str, *, groups: Iterable[str], now: float
    ) -> tuple[NodeRec, list[Change]]:
        """Register ``node_key`` to ``user`` after an OIDC login, as :meth:`register` does for an auth key
        (new key: addresses and a unique name; known key of the same user: expiry renewed), and store the
        user's groups. Groups that changed are an identity change of the user's other nodes (policy).
        """
        _check_registration_input(node_key, hostname)
        self.check_oidc_user(user, subject)
        known = self.node_by_key(node_key)
        if known is not None and known.user != user:
            raise AuthError(f"OIDC login refused: this node is registered to user {known.user!r}")
        new_groups = frozenset(groups)
        old_groups = self.groups_of(user)
        self.store.put_oidc_user(user, subject, sorted(new_groups), now)
        if new_groups:
            self._user_groups[user] = new_groups
        else:
            self._user_groups.pop(user, None)
        changes: list[Change] = []
        if new_groups != old_groups:
            skip = known.id if known is not None else 0
            changes = [
                NodeChanged(n, self.is_online(n.id))
                for n in self._nodes.values()
                if n.user == user and n.id != skip and not n.expired(now)
            ]
        if known is not None:
            renewed = self._renew(known, now)
            return renewed, [*changes, NodeChanged(renewed, self.is_online(renewed.id))]
        node = self._create(node_key, hostname, user, now)
        return node, [*changes, NodeAdded(node, False)]

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
        return renamed, [NodeChanged(renamed, self.is_online(node.id))]

    def expire_node(self, ref: str, now: float) -> tuple[NodeRec, list[Change]]:
        """Expire a node's key now: it leaves every peer's map; its Sync is refused until it re-registers."""
        node = self.resolve(ref)
        if node.expired(now):
            return node, []
        expired = replace(node, expires=now)
        self.store.update_node(expired)
        self._index(expired)
        return expired, [NodeRemoved(node.id, "expired")]

    def delete_node(self, ref: str) -> list[Change]:
        node = self.resolve(ref)
        return self._delete(node)

    def _delete(self, node: NodeRec) -> list[Change]:
        self.store.delete_node(node.id)  # its route rows go with it (ON DELETE CASCADE)
        self._unindex(node)
        self._v4.release(ipaddress.ip_address(node.ipv4))
        self._v6.release(ipaddress.ip_address(node.ipv6))
        changed = self.routes.forget_node(node.id, self.is_online)
        return [NodeRemoved(node.id, "deleted"), *self._refresh(changed)]

    # -- presence --------------------------------------------------------------------------------------

    def connect(self, node_id: int, now: float) -> list[Change]:
        """A Sync stream of ``node_id`` opened."""
        node = self._nodes.get(node_id)
        if node is None:
            return []
        count = self._streams.get(node_id, 0) + 1
        self._streams[node_id] = count
        self._ephemeral_due.pop(node_id, None)  # reconnected within the grace: keep it
        if count > 1:
            return []
        others = self._reelect_around(node_id)  # a router coming back may take over its prefixes
        seen = replace(self._nodes[node_id], last_seen=now)
        self.store.update_node(seen)
        self._index(seen)
        return [NodeChanged(seen, True), *others]

    def disconnect(self, node_id: int, now: float) -> list[Change]:
        """A Sync stream of ``node_id`` ended."""
        node = self._nodes.get(node_id)
        if node is None or node_id not in self._streams:
            return []
        count = self._streams[node_id] - 1
        if count > 0:
            self._streams[node_id] = count
            return []
        del self._streams[node_id]
        others = self._reelect_around(node_id)  # failover: another router takes over its prefixes
        seen = replace(self._nodes[node_id], last_seen=now)
        self.store.update_node(seen)
        self._index(seen)
        if seen.ephemeral:
            self._schedule_ephemeral(node_id, now)
        if seen.expired(now):
            return others  # peers dropped it already
        return [NodeChanged(seen, False), *others]

    def _schedule_ephemeral(self, node_id: int, now: float) -> None:
        due = now + self.cfg.ephemeral_grace
        self._ephemeral_due[node_id] = due
        heapq.heappush(self._ephemeral_heap, (due, node_id))

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
        try:
            relay = validate_endpoint(turn_relay) if turn_relay else ""
        except InvalidArgument:
            raise InvalidArgument(
                f'invalid turn_relay {turn_relay[:60]!r}: expected ip:port or [ip6]:port ("": none)'
            ) from None
        node = self._nodes.get(node_id)
        if node is None:
            raise NotFound(f"node {node_id} not found")
        updated = replace(node, endpoints=normal, last_seen=now, home_region=home_region, turn_relay=relay)
        self.store.update_node(updated)
        self._index(updated)
        same = (normal, home_region, relay) == (node.endpoints, node.home_region, node.turn_relay)
        if same or updated.expired(now):
            return []
        return [NodeChanged(updated, self.is_online(node_id))]

    # -- key rotation ----------------------------------------------------------------------------------
    # A node rotating its WireGuard key (ghostmesh.api.coordination.RotateKey) first gets its proven new key
    # stored as ``pending_key``; peers keep the old key until a call proven with the pending key shows the
    # node switched (:meth:`promote_pending`), so no peer ever holds a key the node does not use yet.

    def node_by_pending_key(self, key: str) -> NodeRec | None:
        node_id = self._by_pending.get(key)
        node = None if node_id is None else self._nodes.get(node_id)
        return node if node is not None and node.pending_key == key else None

    def begin_rotation(self, node_id: int, new_key: str, now: float) -> NodeRec:
        """Store ``new_key`` (its possession already proven) as the node's pending key; nothing else changes.

        A pending key never proven (the node crashed) is simply replaced. Nothing is written when this raises.
        """
        node = self._nodes.get(node_id)
        if node is None:
            raise NotFound(f"node {node_id} not found")
        if node.expired(now):
            raise AuthError(f"node {node.name}'s key has expired; register again with an auth key")
        PublicKey.from_base64(new_key)
        if new_key == node.node_key:
            raise InvalidArgument("key rotation: the new node key equals the current one; generate a new key")
        if new_key == node.pending_key:
            return node  # a retried request
        holder = self._by_key.get(new_key)
        if holder is None:
            pending_holder = self.node_by_pending_key(new_key)
            holder = None if pending_holder is None else pending_holder.id
        if holder is not None:
            raise Conflict(
                "key rotation: the new node key is already bound to another node; generate a new key"
            )
        pending = replace(node, pending_key=new_key)
        self.store.update_node(pending)
        self._index(pending)
        if node.pending_key:
            self._by_pending.pop(node.pending_key, None)
        self._by_pending[new_key] = node.id
        return pending

    def promote_pending(self, key: str, now: float) -> tuple[NodeRec, list[Change]] | None:
        """``key`` was just proven: if it is a node's pending key, it becomes the node key (peers learn it).

        None when ``key`` is nobody's pending key.
        """
        node = self.node_by_pending_key(key)
        if node is None:
            return None
        promoted = replace(node, node_key=key, pending_key=None, last_seen=now)
        self.store.update_node(promoted)
        self._index(promoted)
        self._by_pending.pop(key, None)
        if promoted.expired(now):
            return promoted, []  # peers dropped it already; re-registration brings it back
        return promoted, [NodeChanged(promoted, self.is_online(node.id))]

    # -- subnet routes and exit nodes (ghostmesh.routes) ------------------------------------------------
    # A node record carries its derived ``primary_routes`` / ``exit_node``; :meth:`_refresh` recomputes
    # them for the nodes an election or approval touched and returns a NodeChanged for each that changed.

    def _with_routes(self, node: NodeRec) -> NodeRec:
        primary = self.routes.primary_routes(node.id)
        exit_node = self.routes.is_exit_node(node.id)
        if node.primary_routes == primary and node.exit_node == exit_node:
            return node
        return replace(node, primary_routes=primary, exit_node=exit_node)

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
                changes.append(NodeChanged(fresh, self.is_online(nid)))
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
        while self._ephemeral_heap:
            due, node_id = self._ephemeral_heap[0]
            if self._ephemeral_due.get(node_id) == due:
                break
            heapq.heappop(self._ephemeral_heap)
        candidates = [h[0][0] for h in (self._expiry_heap, self._ephemeral_heap) if h]
        return min(candidates) if candidates else None

    def tick(self, now: float) -> list[Change]:
        """Expire nodes whose key expiry passed and delete ephemeral nodes whose grace ran out."""
        changes: list[Change] = []
        while self._expiry_heap and self._expiry_heap[0][0] <= now:
            due, node_id = heapq.heappop(self._expiry_heap)
            node = self._nodes.get(node_id)
            if node is not None and node.expires == due:
                changes.append(NodeRemoved(node_id, "expired"))
        while self._ephemeral_heap and self._ephemeral_heap[0][0] <= now:
            due, node_id = heapq.heappop(self._ephemeral_heap)
            if self._ephemeral_due.get(node_id) != due or self.is_online(node_id):
                continue
            node = self._nodes.get(node_id)
            if node is not None:
                changes.extend(self._delete(node))
        return changes
