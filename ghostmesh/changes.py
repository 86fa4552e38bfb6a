"""Change records: what a state mutation did, so the mapper fans out only that.

:mod:`ghostmesh.state` returns these from every mutation (Headscale's ``state`` / ``change`` pattern);
:mod:`ghostmesh.mapper` turns them into per-stream deltas. They carry whole records (immutable), so the
mapper never reaches back into the state or the store.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ghostmesh.store.base import NodeRec

RemovalReason = Literal["deleted", "expired"]


@dataclass(frozen=True, slots=True)
class NodeAdded:
    """A node registered: new to every peer."""

    node: NodeRec
    online: bool


@dataclass(frozen=True, slots=True)
class NodeChanged:
    """A node's record or presence changed (rename, endpoints, online, renewed expiry)."""

    node: NodeRec
    online: bool


@dataclass(frozen=True, slots=True)
class NodeRemoved:
    """A node left every peer's map: deleted, or its key expired. Its own streams end."""

    node_id: int
    reason: RemovalReason


Change = NodeAdded | NodeChanged | NodeRemoved
