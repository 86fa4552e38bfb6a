"""ghostmesh's audit log writer: who changed what, when and from where, sealed into a hash chain.

The pure part (canonical encoding, hashing, signing, verification) is :mod:`ghostcore.auditchain`, shared
with ghostctl's ``audit verify``. This module is the I/O edge:

- :func:`load_audit_key`: the server's Ed25519 audit key, generated on first start and kept in the store's
  kv table (``audit_private_key``, raw 32 bytes). It is never logged; only its public half leaves
  (``GetAuditKey``).
- :class:`Auditor`: :meth:`Auditor.record` seals and appends one entry through the store, synchronously,
  in the same event-loop turn as the change it describes (the store is synchronous and every mutation
  runs on the loop thread, so entries are in the order the changes happened). Call it only after the
  change succeeded. ``detail`` must never hold a secret: key ids, not keys.

The hook other code calls is ``hub.record(actor, action, target, detail, remote)``
(:meth:`ghostmesh.hub.Hub.record`); the Admin servicer gets ``actor`` from its ``_authorize`` and
``remote`` from ``context.peer()``. Action names are ``<object>.<verb>``: the constants below.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ghostcore import auditchain
from ghostcore.auditchain import GENESIS, AuditRecord
from ghostcore.errors import ConfigError, GhostError, Unavailable
from ghostcore.pb.ghostmesh.v1 import admin_pb2 as apb
from ghostmesh.changes import Change, NodeAdded, NodeRemoved
from ghostmesh.store.base import AuthKeyRec, NodeRec, Store

log = logging.getLogger(__name__)

AUDIT_KEY_KV = "audit_private_key"

ACTOR_UNIX = "admin@unix"
ACTOR_SYSTEM = "system"

USER_CREATE = "user.create"
USER_DELETE = "user.delete"
NODE_REGISTER = "node.register"
NODE_RENAME = "node.rename"
NODE_EXPIRE = "node.expire"
NODE_DELETE = "node.delete"
NODE_KEY_ROTATE = "node.key_rotate"  # a node proved a new key; it is pending until used
NODE_KEY_SWITCH = "node.key_switch"  # the node proved the pending key: it is now the node key
AUTHKEY_CREATE = "authkey.create"
AUTHKEY_EXPIRE = "authkey.expire"
APIKEY_CREATE = "apikey.create"
APIKEY_EXPIRE = "apikey.expire"


def api_key_actor(key_id: str) -> str:
    return f"apikey:{key_id}"


def node_actor(name: str) -> str:
    return f"node:{name}"


def register_detail(node: NodeRec, changes: Sequence[Change]) -> dict[str, object]:
    """What a ``node.register`` entry says: public facts only (the auth key's id, never the key)."""
    return {
        "id": node.id,
        "user": node.user,
        "node_key": node.node_key,  # the WireGuard public key
        "ipv4": node.ipv4,
        "ipv6": node.ipv6,
        "auth_key_id": node.auth_key_id or "",
        "ephemeral": node.ephemeral,
        "tags": list(node.tags),
        "renewed": not any(isinstance(c, NodeAdded) for c in changes),
    }


def auth_key_detail(rec: AuthKeyRec) -> dict[str, object]:
    """What an ``authkey.create`` entry says: the key's settings, never its secret or hash."""
    return {
        "user": rec.user,
        "reusable": rec.reusable,
        "ephemeral": rec.ephemeral,
        "tags": list(rec.tags),
        "expires_unix": int(rec.expires),
    }


def entry_pb(rec: AuditRecord) -> apb.AuditEntry:
    return apb.AuditEntry(
        seq=rec.seq,
        ts_unix_ms=rec.ts_ms,
        actor=rec.actor,
        action=rec.action,
        target=rec.target,
        detail=rec.detail,
        remote=rec.remote,
        prev_hash=rec.prev_hash,
        hash=rec.hash,
        signature=rec.signature,
    )


def load_audit_key(store: Store) -> Ed25519PrivateKey:
    """The server's audit signing key: generated on first start, then read from the store's kv table."""
    stored = store.get_kv(AUDIT_KEY_KV)
    if stored is None:
        fresh = Ed25519PrivateKey.generate().private_bytes_raw()
        stored = store.set_kv_if_absent(AUDIT_KEY_KV, fresh)
    if len(stored) != auditchain.KEY_LEN:
        raise ConfigError(
            f"database: kv {AUDIT_KEY_KV} is not a 32-byte ed25519 key; restore the database from a backup"
        )
    return Ed25519PrivateKey.from_private_bytes(stored)


class Auditor:
    """Seals and appends audit entries; keeps the last (seq, hash) so an append costs one transaction."""

    def __init__(self, store: Store, key: Ed25519PrivateKey, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self._key = key
        self.public_key = auditchain.raw_public_key(key)
        self.clock = clock
        self._reload()

    def __repr__(self) -> str:  # never show the key
        return f"Auditor(seq={self._seq})"

    def _reload(self) -> None:
        last = self.store.last_audit()
        self._seq, self._hash = (last.seq, last.hash) if last is not None else (0, GENESIS)

    def record(
        self,
        actor: str,
        action: str,
        target: str,
        detail: Mapping[str, object] | None = None,
        remote: str = "",
    ) -> AuditRecord:
        """Seal and append one entry for a change that already succeeded; return it.

        If the append fails (database error, or another writer moved the chain) the change stays applied
        but unrecorded: that is logged at ERROR and raised as ``Unavailable`` so the caller sees it.
        """
        draft = AuditRecord(
            seq=self._seq + 1,
            ts_ms=int(self.clock() * 1000),
            actor=actor,
            action=action,
            target=target,
            detail=auditchain.canonical_detail(detail),
            remote=remote,
            prev_hash=self._hash,
        )
        sealed = auditchain.seal(draft, self._key)
        try:
            self.store.append_audit(sealed)
        except GhostError as exc:
            log.error("audit append failed for %s %s: %s", action, target, exc)  # noqa: TRY400 - one line
            self._reload()
            raise Unavailable(
                f"audit log: {action} {target} was applied but could not be recorded ({exc}); "
                "check the database"
            ) from None
        self._seq, self._hash = sealed.seq, sealed.hash
        return sealed

    def record_timer_changes(self, changes: Iterable[Change], names: Mapping[int, str]) -> None:
        """Entries (actor ``system``) for what the timer did: key expiries and ephemeral deletions.

        ``names`` maps node ids to names as they were before the change (a deleted node is gone from
        the state by now).
        """
        for change in changes:
            if isinstance(change, NodeRemoved):
                target = names.get(change.node_id, f"#{change.node_id}")
                action = NODE_EXPIRE if change.reason == "expired" else NODE_DELETE
                reason = "key expiry" if change.reason == "expired" else "ephemeral grace ran out"
                self.record(ACTOR_SYSTEM, action, target, {"id": change.node_id, "reason": reason})
