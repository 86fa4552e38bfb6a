"""The storage interface of ghostmesh and the plain records it deals in.

``Store`` is a ``Protocol``: a backend implements it without inheriting anything. The two there are
(:mod:`ghostmesh.store.sqlite`, :mod:`ghostmesh.store.postgres`) share their statements through
:class:`ghostmesh.store.sql.SqlStore`; the contract below is tested on both.
Records are frozen dataclasses with no behaviour; hashes of secrets are excluded from ``repr`` so a record
logged by mistake shows nothing usable. Times are unix seconds as floats; ``expires == 0`` means never.

Contract every backend keeps:

- every mutation is atomic (one transaction); on error nothing is written;
- :meth:`Store.transaction` opens one transaction that every mutation called inside it joins: what the
  block writes commits together or not at all. That is how a change and its audit row are written as one
  (:meth:`ghostmesh.hub.Hub.transaction`). A COMMIT that fails raises :class:`CommitFailed`, so the caller
  can tell "the block was refused" (nothing written, the block's own error) from "the block's writes were
  lost at the end";
- ``insert_node`` / ``update_node`` with ``consume_auth_key`` count one use of that auth key in the same
  transaction, and refuse (``AuthError``, nothing written) if the key was revoked or is a spent
  single-use key by the time the transaction runs, so two racing registrations cannot both spend it;
- uniqueness of node name, node key, IPv4 and IPv6 is enforced by the store (``Conflict``).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Protocol

from ghostcore.auditchain import AuditRecord
from ghostcore.errors import Unavailable


class CommitFailed(Unavailable):
    """The COMMIT of a transaction failed (disk full, I/O error): everything written in it is lost."""


@dataclass(frozen=True, slots=True)
class UserRec:
    id: int
    name: str
    created: float
    # The OIDC account this user is bound to: (issuer, the provider's `sub`), set when an OIDC login
    # created the user or an admin bound it; None: bound to none (no OIDC login may act as this user).
    oidc_subject: str | None = None
    groups: tuple[str, ...] = ()  # the provider's groups claim at the user's last login (policy "oidc:<g>")
    oidc_issuer: str = ""  # "" with a subject: bound before issuers were recorded (see State.__init__)


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
    pending_since: float = 0.0  # when pending_key was stored (0: no pending key, or stored before this)
    # Node-key signing (ghostcore.lock): the signature chain vouching for node_key, and the one for
    # pending_key; b"": none. Public data, checked against the lock log before they are stored.
    key_signature: bytes = b""
    pending_signature: bytes = b""
    # A device (a stock WireGuard peer that runs no ghostlink: a phone, a router): the id of the node that
    # is its gateway into the mesh; 0 for a node. A device never syncs; its gateway installs it as a peer
    # and carries its addresses for everyone else.
    via: int = 0
    # Derived by ghostmesh.state from the routes table (never written by the store): the approved subnet
    # routes this node is the primary router for, and whether it is an approved, online exit node.
    primary_routes: tuple[str, ...] = ()
    exit_node: bool = False
    # The approved subnet routes it serves, primary or standby (the policy makes every approved
    # advertiser a router for the prefix: seen by the rule's sources, the prefix in its filter).
    approved_routes: tuple[str, ...] = ()
    # Derived by ghostmesh.state from the devices whose gateway this node is: their /32 and /128, which
    # ride in the node's allowed IPs like routes.
    device_prefixes: tuple[str, ...] = ()
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

    def transaction(self) -> AbstractContextManager[None]:
        """One transaction for the block; mutations inside join it (nested blocks join too). On an error
        in the block everything rolls back and the error propagates; a failed COMMIT is CommitFailed.
        Never hold it across an await: every caller on the event loop shares it."""
        ...

    def refuse_writes(self, reason: str) -> None:
        """From now on every transaction is refused (Unavailable naming ``reason``): the server is
        stopping because its memory may hold a change this database lost."""
        ...

    # key-value (the stored ACL policy; earlier versions kept the server's keys here)
    def get_kv(self, key: str) -> bytes | None: ...
    def set_kv(self, key: str, value: bytes) -> None: ...
    def delete_secret(self, key: str) -> None:
        """Delete kv ``key`` so that its value leaves the database's files (not only the table)."""
        ...

    # users
    def create_user(self, name: str, now: float) -> UserRec: ...
    def get_user(self, name: str) -> UserRec | None: ...
    def list_users(self) -> Sequence[UserRec]: ...
    def delete_user(self, name: str) -> None:
        """Delete a user and its auth keys; ``Conflict`` if nodes still belong to it."""
        ...

    def user_by_oidc_identity(self, issuer: str, subject: str) -> UserRec | None:
        """The user bound to this OIDC account (issuer, subject), if any."""
        ...

    def put_oidc_user(
        self, name: str, issuer: str, subject: str, groups: Sequence[str], now: float
    ) -> UserRec:
        """Create user ``name`` if missing and set its OIDC account and groups; ``Conflict`` (nothing
        written) if another user is bound to that account."""
        ...

    def set_oidc_identity(self, name: str, issuer: str, subject: str | None) -> UserRec:
        """Bind user ``name`` to the OIDC account (issuer, subject), or unbind it (``subject`` None; its
        OIDC groups are cleared too). ``NotFound`` for no such user, ``Conflict`` (nothing written) if
        another user is bound to that account."""
        ...

    def adopt_oidc_issuer(self, issuer: str) -> int:
        """Give every binding made before issuers were recorded (issuer "") this issuer; how many."""
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

    def audit_prune_point(self, before_ms: int) -> AuditRecord | None:
        """The newest entry of the oldest run of entries all stamped before ``before_ms`` (what a
        retention may remove); None when the oldest entry is not that old."""
        ...

    def delete_audit(self, through_seq: int) -> int:
        """Delete the entries with seq <= ``through_seq``; how many. Only :meth:`ghostmesh.audit.Auditor.
        prune` calls it, after appending the entry that records the cut."""
        ...

    # node-key signing: the lock log, an append-only list of signed updates (ghostcore.lock)
    def list_lock(self) -> Sequence[bytes]:
        """Every update, in order."""
        ...

    def append_lock(self, seq: int, update: bytes) -> None:
        """Store ``update`` as number ``seq`` (1-based); ``Conflict`` (nothing written) unless the log holds
        exactly ``seq - 1`` updates, checked in one transaction."""
        ...
