"""ghostmesh's audit log writer: who changed what, when and from where, sealed into a hash chain.

The pure part (canonical encoding, hashing, signing, verification) is :mod:`ghostcore.auditchain`, shared
with ghostctl's ``audit verify``. This module is the I/O edge:

- :class:`Auditor`: :meth:`Auditor.record` seals one entry after the last one the store holds and
  appends it, inside the store transaction its caller holds open (:meth:`ghostmesh.hub.Hub.transaction`),
  so the entry commits together with the change it describes or not at all. Entries are sealed from the
  store's own last entry, read in the same transaction, so two writers can never fork the chain. ``detail``
  must never hold a secret: key ids, not keys. The signing key comes from :mod:`ghostmesh.keyfiles`; it is
  never logged, and only its public half leaves (``GetAuditKey``).
- :meth:`Auditor.prune`: a retention. It appends the :data:`AUDIT_PRUNE` entry naming the last entry it
  removes (:func:`ghostcore.auditchain.prune_detail`), then removes the entries up to it, in one
  transaction: what is kept still verifies, from the start the prune entry vouches for.
- the entries the server writes on its own: timer removals (:func:`timer_entries`) and the rows that
  summarise what a limit folded (:func:`coalesced_entry`: route rows of one node beyond
  ``limits.audit_rows_per_node_per_minute``, failed authentications of one source).

The hook other code calls is ``tx.record(actor, action, target, detail, remote)`` on the hub's
transaction; the Admin servicer gets ``actor`` from its ``_authorize`` and ``remote`` from
``context.peer()``. Action names are ``<object>.<verb>``: the constants below.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ghostcore import auditchain, lock
from ghostcore.auditchain import GENESIS, AuditRecord
from ghostcore.pb.ghostmesh.v1 import admin_pb2 as apb
from ghostmesh.changes import Change, NodeAdded, NodeRemoved
from ghostmesh.limits import WINDOW, Coalesced
from ghostmesh.store.base import AuthKeyRec, NodeRec, Store

ACTOR_UNIX = "admin@unix"
ACTOR_SYSTEM = "system"
AUDIT_TARGET = "audit"  # the target of the log's own entries (prune)

USER_CREATE = "user.create"
USER_DELETE = "user.delete"
USER_BIND = "user.bind"  # an admin bound a user to an OIDC account (issuer, subject)
USER_UNBIND = "user.unbind"  # an admin unbound a user from its OIDC account
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
POLICY_SET = "policy.set"  # by an admin (SetPolicy), or "system" when an acl_file edit was applied
ROUTE_ADD = "route.add"
ROUTE_APPROVE = "route.approve"  # by an admin, or "system" for the policy's auto-approvers
ROUTE_DELETE = "route.delete"
ROUTE_ADVERTISE = "route.advertise"  # a node started advertising (actor node:<name>)
ROUTE_WITHDRAW = "route.withdraw"  # a node stopped advertising
LOCK_UPDATE = "lock.update"  # a signed update appended to the node-key signing log (target "lock")
DEVICE_ADD = "device.add"  # a device behind a gateway node (removed as any node: node.delete)
NODE_SIGN = "node.sign"  # a signature stored for a node's key (or its pending key)
DNS_UPDATE = "dns.update"  # a config reload changed [dns] (actor system, target "dns", detail: the keys)
AUTH_FAILED = "auth.failed"  # one source's failed authentications in one window (actor system)
AUDIT_COALESCED = "audit.coalesced"  # a node's route rows beyond the limit in one window, by action
AUDIT_PRUNE = auditchain.PRUNE_ACTION  # entries older than audit.retention removed (actor system)


@dataclass(frozen=True, slots=True)
class Entry:
    """An entry the server writes on its own (what :func:`timer_entries` and :func:`coalesced_entry`
    return, for ``tx.record``)."""

    actor: str
    action: str
    target: str
    detail: Mapping[str, object]
    remote: str = ""


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
        "signed": bool(node.key_signature),  # node-key signing: it came with a signature for its key
    }


def lock_update_detail(update: bytes) -> dict[str, object]:
    """What a ``lock.update`` entry says: the update's kind, keys and signer (``lockkey:…``) and hash."""
    [(kind, keys, signer, digest)] = lock.describe([update])
    return {"kind": kind, "keys": keys, "signer": signer, "hash": digest}


def node_sign_detail(node: NodeRec, node_key: str, verified: lock.Verified) -> dict[str, object]:
    """What a ``node.sign`` entry says: the key signed (the node's, or its pending key) and the trusted
    key the signature's chain starts at."""
    return {
        "id": node.id,
        "node_key": node_key,
        "pending": node_key != node.node_key,
        "root": lock.format_key(verified.root),
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


def timer_entries(changes: Iterable[Change], names: Mapping[int, str]) -> list[Entry]:
    """Entries (actor ``system``) for what the timer did: key expiries and ephemeral deletions.

    ``names`` maps node ids to names as they were before the change (a deleted node is gone from the
    state by now).
    """
    out = []
    for change in changes:
        if isinstance(change, NodeRemoved):
            target = names.get(change.node_id, f"#{change.node_id}")
            action = NODE_EXPIRE if change.reason == "expired" else NODE_DELETE
            reason = "key expiry" if change.reason == "expired" else "ephemeral grace ran out"
            out.append(Entry(ACTOR_SYSTEM, action, target, {"id": change.node_id, "reason": reason}))
    return out


def coalesced_entry(row: Coalesced, node_name: str = "") -> Entry:
    """The one entry for a closed limit window: a node's route rows it did not write (by action;
    ``node_name`` the node's name, the window is keyed by its id), or one source's failed
    authentications (by method, and the calls refused meanwhile)."""
    since = {"since_ms": int(row.start * 1000), "window_s": int(WINDOW)}
    if row.kind == "routes":
        name = node_name or f"#{row.key}"
        return Entry(node_actor(name), AUDIT_COALESCED, name, {"dropped": row.counts, **since})
    detail = {"failures": sum(row.counts.values()), "methods": row.counts, "refused": row.refused, **since}
    return Entry(ACTOR_SYSTEM, AUTH_FAILED, row.key, detail, row.key)


class Auditor:
    """Seals and appends audit entries inside the caller's store transaction; prunes by retention."""

    def __init__(self, store: Store, key: Ed25519PrivateKey, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self._key = key
        self.public_key = auditchain.raw_public_key(key)
        self.clock = clock

    def __repr__(self) -> str:  # never show the key
        return f"Auditor(public_key={self.public_key.hex()[:16]}…)"

    def record(
        self,
        actor: str,
        action: str,
        target: str,
        detail: Mapping[str, object] | None = None,
        remote: str = "",
    ) -> AuditRecord:
        """Seal one entry after the store's last one and append it, in the open store transaction (or
        one of its own); return it. Raises what the store raises (nothing is then appended)."""
        with self.store.transaction():
            last = self.store.last_audit()
            draft = AuditRecord(
                seq=(last.seq if last is not None else 0) + 1,
                ts_ms=int(self.clock() * 1000),
                actor=actor,
                action=action,
                target=target,
                detail=auditchain.canonical_detail(detail),
                remote=remote,
                prev_hash=last.hash if last is not None else GENESIS,
            )
            sealed = auditchain.seal(draft, self._key)
            self.store.append_audit(sealed)
        return sealed

    def prune(self, retention: float) -> int:
        """Remove the oldest entries stamped more than ``retention`` seconds ago, after appending the
        entry that records the cut, in one transaction; how many were removed (0: nothing that old)."""
        now_ms = int(self.clock() * 1000)
        with self.store.transaction():
            cut = self.store.audit_prune_point(now_ms - int(retention * 1000))
            if cut is None:
                return 0
            detail = {**auditchain.prune_detail(cut.seq, cut.hash), "retention_s": int(retention)}
            self.record(ACTOR_SYSTEM, AUDIT_PRUNE, AUDIT_TARGET, detail)
            return self.store.delete_audit(cut.seq)
