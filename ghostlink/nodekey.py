"""The node key holder: the one place the node's current WireGuard private key lives while ghostlink runs.

Three parts act with the node key: the coordination client proves possession of it on every call
(:mod:`ghostlink.client`), WireGuard uses it for its sessions (the daemon hands it to the backend) and NAT
traversal answers the connectivity checks addressed to its public half (:mod:`ghostlink.traversal.edge`).
Each reads it from one :class:`NodeKey` shared by all of them, so a key rotation switches it in one place
(:meth:`ghostlink.daemon.Daemon.switch_key`) and no part can go on with a stale copy.

The key it replaced is kept too, for one reader: the relays know the node by the key ghostmesh has for it,
which stays the old one until ghostmesh promotes the new key, and a relay connection made in that window
proves the old key (:meth:`NodeKey.private_for`).
"""

from __future__ import annotations

from ghostcore.keys import PrivateKey, PublicKey


class NodeKey:
    """The current node key; :meth:`switch` replaces it (a rotation, or finishing an interrupted one)."""

    def __init__(self, key: PrivateKey) -> None:
        self._key = key
        self._previous: PrivateKey | None = None

    def __repr__(self) -> str:  # the private half stays out of reprs and logs
        return f"NodeKey({self._key.public_key().short()}…)"

    @property
    def private(self) -> PrivateKey:
        return self._key

    @property
    def public(self) -> PublicKey:
        return self._key.public_key()

    def switch(self, new: PrivateKey) -> None:
        if new.public_key() != self._key.public_key():
            self._previous = self._key
        self._key = new

    def private_for(self, public: bytes) -> PrivateKey | None:
        """The private half of ``public`` (raw) if it is the current key or the one it replaced."""
        for key in (self._key, self._previous):
            if key is not None and key.public_key().raw == public:
                return key
        return None
