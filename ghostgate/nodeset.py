"""The nodes this gate lets use its relay and TURN, as ghostmesh last said. PURE.

Without ``[control]`` a gate accepts every node whose HMAC credentials verify (:mod:`ghostgate.relay_core`,
:mod:`ghostgate.turn_core`), and a node that ghostmesh deleted, expired or rotated away keeps that access
until its credentials expire (``relay.credential_lifetime``, 24 h by default). With ``[control]``,
:mod:`ghostgate.control` watches ghostmesh's roster (``RelayControl.WatchNodes``) and feeds every update here;
the cores ask :meth:`NodeSet.allows_key` (relay AUTH) and :meth:`NodeSet.allows_user` (TURN requests, by the
``<id>`` of the REST username ``"<expiry>:<id>"``, which is the node id), and :meth:`NodeSet.apply` says what
just left the set so the edges close those connections and allocations at once.

States, and why each answers as it does:

* **never synced** (the gate just started, ghostmesh unreachable): everything with valid credentials is
  allowed, as without ``[control]``: a gate must not take a region down because the coordinator is away.
* **synced**: exactly the set; a key or id not in it is refused.
* **disconnected after a sync**: the last set stays in force. Nodes in it keep their access on their HMAC
  credentials, so a node deleted meanwhile keeps it until the gate resyncs or its credentials expire (fail
  open, bounded by the credentials' lifetime); a node registered meanwhile is refused here until the resync
  (it still has direct paths, and other regions).

Updates (``NodeSetUpdate``): a full set comes in parts, the first with ``reset``, the last with ``complete``;
the parts are staged and swapped in whole, so a set is never half-applied. A delta is complete by itself.
Serials must follow each other on one watch (:meth:`NodeSet.begin` starts a watch); anything else raises
:class:`NodeSetError` and the watch is restarted (a full set again). Memory is the size of ghostmesh's
registry: one entry per node id, one per key.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from ghostcore.errors import ProtocolError
from ghostcore.pb.ghostmesh.v1 import relaycontrol_pb2 as pb

KEY_LEN = 32


class NodeSetError(ProtocolError):
    """An update that does not follow the watch so far (a gap, a part outside a full set, a bad key)."""


@dataclass(frozen=True)
class Revoked:
    """What an applied update took away: node keys (raw) and TURN user ids ("<node id>"). ``everything``:
    the first set ever, against "everything allowed": the edges check every connection and allocation."""

    keys: frozenset[bytes] = frozenset()
    users: frozenset[str] = frozenset()
    everything: bool = False

    def __bool__(self) -> bool:
        return bool(self.keys or self.users or self.everything)


class NodeSet:
    """The allowed node keys and ids; see the module docstring."""

    def __init__(self) -> None:
        self._nodes: dict[int, frozenset[bytes]] | None = None  # None: never synced, everything allowed
        self._owner: dict[bytes, int] = {}  # allowed key -> its node id
        self._staging: dict[int, frozenset[bytes]] | None = None
        self._serial = 0
        self.counters: Counter[str] = Counter()

    def __repr__(self) -> str:
        size = "unsynced" if self._nodes is None else f"{len(self._nodes)} nodes"
        return f"NodeSet({size})"

    @property
    def synced(self) -> bool:
        """A complete set was received at least once."""
        return self._nodes is not None

    def __len__(self) -> int:
        return 0 if self._nodes is None else len(self._nodes)

    def nodes(self) -> dict[int, frozenset[bytes]]:
        """The allowed node ids and their keys (a copy; empty before the first set)."""
        return dict(self._nodes or {})

    # -- asking ----------------------------------------------------------------------------------------

    def allows_key(self, key: bytes) -> bool:
        return self._nodes is None or key in self._owner

    def allows_user(self, user_id: str) -> bool:
        """May the TURN REST user ``user_id`` (the part after the expiry) allocate? A node id in the set."""
        if self._nodes is None:
            return True
        return user_id.isdigit() and len(user_id) <= 20 and int(user_id) in self._nodes

    # -- updating --------------------------------------------------------------------------------------

    def begin(self) -> None:
        """A new watch starts: its serials start at 1 and a half-received full set is dropped."""
        self._serial = 0
        self._staging = None

    def apply(self, update: pb.NodeSetUpdate) -> Revoked:
        """Fold one update in; what it took away (nothing while a full set is still arriving)."""
        if update.serial != self._serial + 1:
            raise NodeSetError(f"relay control: update {update.serial} after {self._serial}; resyncing")
        self._serial = update.serial
        self.counters["updates"] += 1
        if update.reset:
            self._staging = {}
        if self._staging is not None:
            if update.removed:
                raise NodeSetError("relay control: removals inside a full set; resyncing")
            for node in update.nodes:
                self._staging[node.node_id] = _keys(node)
            if not update.complete:
                return Revoked()
            new, self._staging = self._staging, None
            self.counters["full_sets"] += 1
            return self._replace(new)
        if not update.complete:
            raise NodeSetError("relay control: a partial update outside a full set; resyncing")
        if self._nodes is None:
            raise NodeSetError("relay control: a delta before the first full set; resyncing")
        return self._delta(self._nodes, update)

    def _delta(self, nodes: dict[int, frozenset[bytes]], update: pb.NodeSetUpdate) -> Revoked:
        """O(update): only the nodes it names are looked at."""
        upserts = [(node.node_id, _keys(node)) for node in update.nodes]  # all checked before any change
        gone_keys: set[bytes] = set()
        gone_users: set[str] = set()
        for node_id in update.removed:
            keys = nodes.pop(node_id, None)
            if keys is not None:
                gone_users.add(str(node_id))
                gone_keys |= self._unown(node_id, keys)
        for node_id, keys in upserts:
            gone_keys |= self._unown(node_id, nodes.get(node_id, frozenset()) - keys)
            nodes[node_id] = keys
            for key in keys:
                self._owner[key] = node_id
        gone_keys -= self._owner.keys()  # a key that moved to another node in the same update stays
        return self._revoked(frozenset(gone_keys), frozenset(gone_users))

    def _unown(self, node_id: int, keys: frozenset[bytes]) -> set[bytes]:
        out = set()
        for key in keys:
            if self._owner.get(key) == node_id:
                del self._owner[key]
                out.add(key)
        return out

    def _replace(self, new: dict[int, frozenset[bytes]]) -> Revoked:
        old, old_keys = self._nodes, set(self._owner)
        self._nodes = new
        self._owner = {k: node_id for node_id, keys in new.items() for k in keys}
        if old is None:
            return Revoked(everything=True)
        users = frozenset(str(i) for i in old.keys() - new.keys())
        return self._revoked(frozenset(old_keys - self._owner.keys()), users)

    def _revoked(self, keys: frozenset[bytes], users: frozenset[str]) -> Revoked:
        self.counters["keys_revoked"] += len(keys)
        self.counters["users_revoked"] += len(users)
        return Revoked(keys, users)


def _keys(node: pb.AllowedNode) -> frozenset[bytes]:
    for key in node.keys:
        if len(key) != KEY_LEN:
            raise NodeSetError(f"relay control: node {node.node_id} has a key of {len(key)} bytes, not 32")
    return frozenset(node.keys)
