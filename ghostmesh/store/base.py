"""The storage interface of ghostmesh and the plain records it deals in.

``Store`` is a ``Protocol`` so a PostgreSQL backend can implement it later without inheriting anything.
Records are frozen dataclasses with no behaviour; hashes of secrets are excluded from ``repr`` so a record
logged by mistake shows nothing usable. Times are unix seconds as floats; ``expires == 0`` means never.

Contract every backend keeps:

- every mutation is atomic (one transaction); on error nothing is written;
- ``insert_node`` / ``update_node`` with ``consume_auth_key`` count one use of that auth key in the same
  transaction, and refuse (``AuthError``, nothing written) if the key was revoked or is a spent
  single-use key by the time the transaction runs, so two racing registrations cannot both spend it;
- uniqueness of node name, node key, IPv4 and IPv6 is enforced by the store (``Conflict``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from ghostcore.auditchain import AuditRecord


@dataclass(frozen=True, slots=True)
class UserRec:
    id: int
    name: str
    created: float
    oidc_subject: str | None = None  # the provider's `sub` of a user created by an OIDC login
    groups: tuple[str, ...] = ()  # the provider's groups claim at the user's last login (policy "oidc:<g>")


@dataclass(frozen=True, slots=True)
class NodeRec:
    id: int  # 0 until the store assigns one
    name: str
    user: str
    node_key: str  # WireGuard public key, base64
    ipv4: str
    ipv6: str
    ephemeral: bool
    tags: tuple[str, ...]
    created: float
    expires: float  # 0: never
    last_seen: float
    endpoints: tuple[str, ...]
    hostname: str
    auth_key_id: str | None
    pending_key: str | None = None  # key rotation: the new key, proven, until the node proves it switched
    # Derived by ghostmesh.state from the routes table (never written by the store): the approved subnet
    # routes this node is the primary router for, and whether it is an approved, online exit node.
    primary_routes: tuple[str, ...] = ()
    exit_node: bool = False
    # Reported by the node (ReportStatus), kept in memory only (never written by the store): the relay
    # region it is connected to (0: none) and its TURN relayed address ("ip:port", "" none). They describe
    # the node's live relay connections, which a server restart outlives only until the node reconnects,
    # and a node reports them again on every new map stream.
    home_region: int = 0
    turn_relay: str = ""

    def expired(self, now: float) -> bool:
        return self.expires != 0 and self.expires <= now


@dataclass(frozen=True, slots=True)
class RouteRec:
    """One (node, prefix) row of the routes table: who advertised it and whether it is approved."""

    node_id: int
    prefix: str  # normalised network text; "0.0.0.0/0" / "::/0": exit node
    by_node: bool = False  # the node advertises it (ReportStatus)
    by_admin: bool = False  # an admin advertised it on the node's behalf (AddRoute)
    approved: bool = False  # by an admin or an auto-approver of the policy

    @property
    def advertised(self) -> bool:
        return self.by_node or self.by_admin


@dataclass(frozen=True, slots=True)
class AuthKeyRec:
    id: str  # the public 12-character prefix of the key
    hash: bytes = field(repr=False)  # sha256 of the secret part
    user: str = ""
    reusable: bool = False
    ephemeral: bool = False
    tags: tuple[str, ...] = ()
    created: float = 0.0
    expires: float = 0.0  # 0: never
    used_count: int = 0
    revoked: bool = False

    def spent(self) -> bool:
        return not self.reusable and self.used_count > 0

    def unusable(self, now: float) -> bool:
        return self.revoked or self.spent() or (self.expires != 0 and self.expires <= now)


@dataclass(frozen=True, slots=True)
class ApiKeyRec:
    id: str
    hash: bytes = field(repr=False)
    created: float = 0.0
    expires: float = 0.0  # 0: never
    revoked: bool = False
    last_used: float = 0.0

    def unusable(self, now: float) -> bool:
        return self.revoked or (self.expires != 0 and self.expires <= now)


class Store(Protocol):
    """What ghostmesh's state needs from a database. All methods are synchronous and atomic."""

    def close(self) -> None: ...

    # key-value (the server's own X25519 private key lives here)
    def get_kv(self, key: str) -> bytes | None: ...
    def set_kv(self, key: str, value: bytes) -> None: ...
    def set_kv_if_absent(self, key: str, value: bytes) -> bytes:
        """Store ``value`` unless ``key`` exists; return what is stored afterwards."""
        ...

    # users
    def create_user(self, name: str, now: float) -> UserRec: ...
    def get_user(self, name: str) -> UserRec | None: ...
    def list_users(self) -> Sequence[UserRec]: ...
    def delete_user(self, name: str) -> None:
        """Delete a user and its auth keys; ``Conflict`` if nodes still belong to it."""
        ...

    def user_by_oidc_subject(self, subject: str) -> UserRec | None: ...
    def put_oidc_user(self, name: str, subject: str, groups: Sequence[str], now: float) -> UserRec:
        """Create user ``name`` if missing and set its OIDC subject and groups; ``Conflict`` (nothing
        written) if another user has that subject."""
        ...

    # auth keys
    def insert_auth_key(self, rec: AuthKeyRec) -> None: ...
    def get_auth_key(self, key_id: str) -> AuthKeyRec | None: ...
    def list_auth_keys(self, user: str | None = None) -> Sequence[AuthKeyRec]: ...
    def revoke_auth_key(self, key_id: str) -> AuthKeyRec | None: ...

    # API keys
    def insert_api_key(self, rec: ApiKeyRec) -> None: ...
    def get_api_key(self, key_id: str) -> ApiKeyRec | None: ...
    def list_api_keys(self) -> Sequence[ApiKeyRec]: ...
    def revoke_api_key(self, key_id: str) -> ApiKeyRec | None: ...
    def touch_api_key(self, key_id: str, now: float) -> None: ...

    # nodes
    def list_nodes(self) -> Sequence[NodeRec]: ...
    def insert_node(self, rec: NodeRec, consume_auth_key: str | None = None) -> NodeRec:
        """Insert ``rec`` (its id is ignored) and return it with the assigned id."""
        ...

    def update_node(self, rec: NodeRec, consume_auth_key: str | None = None) -> None: ...
    def delete_node(self, node_id: int) -> None: ...

    # subnet routes (rows vanish with their node: ON DELETE CASCADE)
    def list_routes(self) -> Sequence[RouteRec]: ...
    def put_routes(self, recs: Sequence[RouteRec], delete: Sequence[tuple[int, str]] = ()) -> None:
        """Upsert ``recs`` and delete the ``(node_id, prefix)`` rows in ``delete``, in one transaction."""
        ...

    # audit log (append-only; sealing and verification: ghostcore.auditchain)
    def append_audit(self, rec: AuditRecord) -> None:
        """Append a sealed entry; ``Conflict`` (nothing written) unless ``rec.seq`` is the last seq + 1 and
        ``rec.prev_hash`` the last entry's hash (32 zero bytes for seq 1), checked in one transaction."""
        ...

    def list_audit(self, after_seq: int = 0, limit: int = 0) -> Sequence[AuditRecord]:
        """Entries with seq > ``after_seq`` in seq order; at most ``limit`` (0: all)."""
        ...

    def last_audit(self) -> AuditRecord | None: ...
