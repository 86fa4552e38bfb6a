"""Change records: what a state mutation did, so the mapper fans out only that.

:mod:`ghostmesh.state` returns these from every mutation (Headscale's ``state`` / ``change`` pattern);
:mod:`ghostmesh.mapper` turns them into per-stream deltas. They carry whole records (immutable), and with
a node its user's OIDC groups (what policy group members ``"oidc:<group>"`` match), so the mapper never
reaches back into the state or the store. A node record is about one node; :class:`LockChanged` (the
node-key signing log grew) is about the whole mesh: every stream gets the log.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ghostmesh.store.base import NodeRec

RemovalReason = Literal["deleted", "expired"]


@dataclass(frozen=True, slots=True)
class NodeAdded:
    """A node registered: new to every peer. At server start, the mapper is seeded with one per node."""

    node: NodeRec
    online: bool
    groups: frozenset[str] = frozenset()  # its user's OIDC groups at their last login


@dataclass(frozen=True, slots=True)
class NodeChanged:
    """A node's record, presence or user's OIDC groups changed (rename, endpoints, online, renewed
    expiry, a login with other groups)."""

    node: NodeRec
    online: bool
    groups: frozenset[str] = frozenset()  # its user's OIDC groups at their last login


@dataclass(frozen=True, slots=True)
class NodeRemoved:
    """A node left every peer's map: deleted, or its key expired. Its own streams end."""

    node_id: int
    reason: RemovalReason


@dataclass(frozen=True, slots=True)
class LockChanged:
    """The node-key signing log (:mod:`ghostcore.lock`) as it is now, verified; at server start, the
    mapper is seeded with one. Rare (an admin's act) and sent to every stream whole."""

    updates: tuple[bytes, ...]


NodeChange = NodeAdded | NodeChanged | NodeRemoved
Change = NodeChange | LockChanged
