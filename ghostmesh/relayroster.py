"""Which nodes may use the relays now, and what each watching gate still has to hear of it. PURE.

ghostmesh's relay credentials (:mod:`ghostmesh.relaymap`) are HMACs a gate checks offline, valid until
``relay.credential_lifetime`` runs out, whatever happens to the node meanwhile. This roster is the other
half: derived from the registry (seeded with ``State.snapshot()`` at start, then folded the change records
:meth:`ghostmesh.hub.Hub.dispatch` hands out), it says which node ids and node keys are *current*, and
:mod:`ghostmesh.api.relaycontrol` streams it to every gate watching (``RelayControl.WatchNodes``) so the gate
drops the rest within seconds. Nothing is stored: after a restart the snapshot gives the same set again.

A node is allowed while it is registered and its key has not expired, with its node key and, while a
rotation is pending and its record says so, the pending key (harmless: relay tokens are minted only for the
node key, so a pending key cannot authenticate at a relay before ghostmesh promotes it; the promotion's
record then replaces the keys, and the old key leaves the set). Every node holds relay credentials when relay
regions are configured (every map carries the same regions), and the service is not served without them,
so "has relay regions in its map" needs no per-node test.

Cost is O(change): a record whose node's entry (keys, allowed or not) did not change, e.g. an endpoint
report, touches no watcher. Each watcher keeps the ids changed since its last update (not the updates
themselves), so a burst coalesces into one delta built from the entries as they are when it is sent; a
watcher that does not read while nodes churn is bounded too: past ``CHUNK`` pending ids it is marked to
get a full set again instead, so a delta is never larger than one part of a full set. Full sets go in
parts of at most ``CHUNK`` nodes, the gate swapping its set only once the last part is in.

One watcher per gate name: :meth:`Roster.open` of a name ends the older watcher of that name (its
``ended`` says "replaced"); at most ``max_watchers`` names at once.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable
from dataclasses import dataclass, field

from ghostcore.errors import ResourceExhausted
from ghostcore.pb.ghostmesh.v1 import relaycontrol_pb2 as pb
from ghostmesh.changes import Change, NodeAdded, NodeChanged, NodeRemoved
from ghostmesh.store.base import NodeRec

CHUNK = 4096  # nodes per message (~50 bytes each: well under gRPC's 4 MB default message size)
MAX_WATCHERS = 64


def _raw(key_b64: str) -> bytes | None:
    try:
        raw = base64.b64decode(key_b64, validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw if len(raw) == 32 else None


def allowed_keys(node: NodeRec, now: float) -> frozenset[bytes] | None:
    """The raw keys ``node`` may use the relays with now; None when it may not (expired)."""
    if node.expired(now):
        return None
    keys = {_raw(node.node_key), _raw(node.pending_key) if node.pending_key else None}
    return frozenset(k for k in keys if k is not None)


@dataclass
class Watcher:
    """One gate's watch: the ids it has still to hear of, its serial, and why it ended (if it did)."""

    id: int
    gate: str
    serial: int = 0
    pending: set[int] = field(default_factory=set)
    resync: bool = True  # the next update is a full set (the first one, or after falling too far behind)
    ended: str = ""  # "replaced" once a newer watch of the same gate name took over


class Roster:
    """The allowed set and its watchers; see the module docstring. One event loop drives it."""

    def __init__(self, max_watchers: int = MAX_WATCHERS) -> None:
        self.entries: dict[int, frozenset[bytes]] = {}
        self.max_watchers = max_watchers
        self._watchers: dict[int, Watcher] = {}
        self._by_gate: dict[str, int] = {}
        self._next_id = 1

    def __repr__(self) -> str:
        return f"Roster(nodes={len(self.entries)}, watchers={len(self._watchers)})"

    # -- the set -----------------------------------------------------------------------------------------

    def load(self, snapshot: Iterable[NodeAdded], now: float) -> None:
        """Seed from the registry at start (every node, as ``State.snapshot()`` returns them)."""
        for added in snapshot:
            keys = allowed_keys(added.node, now)
            if keys is not None:
                self.entries[added.node.id] = keys

    def apply(self, changes: Iterable[Change], now: float) -> list[int]:
        """Fold change records in; the watchers with something new to send (to wake)."""
        touched: set[int] = set()
        for change in changes:
            if isinstance(change, NodeRemoved):
                node_id, keys = change.node_id, None
            elif isinstance(change, NodeAdded | NodeChanged):
                node_id, keys = change.node.id, allowed_keys(change.node, now)
            else:
                continue  # the lock log says nothing about relay access
            if self.entries.get(node_id) == keys:
                continue
            if keys is None:
                del self.entries[node_id]
            else:
                self.entries[node_id] = keys
            touched.add(node_id)
        if not touched:
            return []
        woken = []
        for w in self._watchers.values():
            if w.resync or w.ended:
                woken.append(w.id)
                continue
            w.pending |= touched
            if len(w.pending) > CHUNK:
                w.pending.clear()
                w.resync = True
            woken.append(w.id)
        return woken

    # -- watchers ----------------------------------------------------------------------------------------

    def open(self, gate: str) -> tuple[Watcher, int | None]:
        """A new watcher for ``gate`` (its first update a full set) and the older one it replaced (or None).

        ResourceExhausted when ``max_watchers`` other gate names are watching already.
        """
        old = self._by_gate.get(gate)
        if old is None and len(self._by_gate) >= self.max_watchers:
            raise ResourceExhausted(
                f"relay control: {len(self._by_gate)} gates are watching already (at most "
                f"{self.max_watchers} names); stop a gate or reuse a gate name"
            )
        if old is not None:
            self._watchers[old].ended = "replaced"
        w = Watcher(self._next_id, gate)
        self._next_id += 1
        self._watchers[w.id] = w
        self._by_gate[gate] = w.id
        return w, old

    def close(self, watcher: Watcher) -> None:
        self._watchers.pop(watcher.id, None)
        if self._by_gate.get(watcher.gate) == watcher.id:
            del self._by_gate[watcher.gate]

    def watching(self) -> list[str]:
        """The gate names watching now."""
        return sorted(self._by_gate)

    def flush(self, watcher: Watcher) -> list[pb.NodeSetUpdate]:
        """What ``watcher`` has still to hear: a full set in parts, or one delta; [] when up to date."""
        if watcher.resync:
            watcher.resync = False
            watcher.pending.clear()
            return self._full(watcher)
        if not watcher.pending:
            return []
        ids, watcher.pending = sorted(watcher.pending), set()
        watcher.serial += 1
        update = pb.NodeSetUpdate(serial=watcher.serial, complete=True)
        for node_id in ids:
            keys = self.entries.get(node_id)
            if keys is None:
                update.removed.append(node_id)
            else:
                update.nodes.append(pb.AllowedNode(node_id=node_id, keys=sorted(keys)))
        return [update]

    def _full(self, watcher: Watcher) -> list[pb.NodeSetUpdate]:
        items = sorted(self.entries.items())
        out = []
        for start in range(0, len(items), CHUNK) if items else range(1):
            watcher.serial += 1
            part = items[start : start + CHUNK]
            out.append(
                pb.NodeSetUpdate(
                    serial=watcher.serial,
                    reset=start == 0,
                    complete=start + CHUNK >= len(items),
                    nodes=[pb.AllowedNode(node_id=i, keys=sorted(k)) for i, k in part],
                )
            )
        return out
