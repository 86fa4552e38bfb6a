"""Zero-loss rotation of the node's WireGuard key (``ghostctl keys rotate`` and automatic rotation).

The flow, in this order (each step is safe to crash after):

1. generate the new key; ``RotateKey`` proves the current key (call metadata) and the new one (request
   body); ghostmesh stores it as the node's *pending* key and changes nothing else;
2. persist it as ``node.key.pending`` (0600) BEFORE WireGuard uses it;
3. switch WireGuard's private key over UAPI (``private_key=`` only: no peer, no port is touched);
4. switch the coordination client's proofs to the new key;
5. ``ReportStatus`` proven with the new key: ghostmesh promotes the pending key to the node key and
   every peer's map gets the node with its new key (the Sync stream opened with the old key goes on);
6. replace ``node.key`` atomically (and note its creation time in ``node.json``); drop the pending file.

Crash safety: ghostmesh accepts calls proven with the node key or the pending key. A leftover pending key
is settled before the daemon starts (:func:`settle_pending`) or before each Sync stream
(:meth:`KeyRotator.resume`): a ``Register`` proven with it succeeds if ghostmesh still holds it as pending
(and promotes it) or already promoted it, and the node then uses it; if ghostmesh refuses it (it never
stored it, or a later rotation replaced it) it is thrown away and the old key stays.

Why no packet is lost (wireguard-go, ``device.SetPrivateKey``): setting a new private key expires the
current keypairs for *sending* but keeps the *receive* keypairs, and outgoing packets wait in the peer's
staged queue (up to 128 per peer) while a new handshake runs. So once the rotating node N has switched:

* packets P->N still decrypt at N on the old session (P keeps sending on it until its map changes);
* N's packets to P wait in N's queue: P does not know N's new key yet and drops N's handshake initiation;
* when P's map carries N's new key, P's plan replaces the peer (old key removed, new key added with the
  same allowed IPs and a persistent keepalive). Adding a peer with a persistent keepalive makes WireGuard
  send a keepalive at once (wireguard-go's UAPI ``persistent_keepalive_interval`` turning on; the kernel's
  ``set_peer`` likewise), which needs a session: P initiates the handshake with N's new key right away,
  N answers, the session is up and N's queued packets flow. ghostlink never configures a peer without a
  keepalive (``engine.NetMap`` keeps the default when the map says 0), which is what this relies on;
  otherwise N would retry its own handshake only after REKEY_TIMEOUT (5 s, WireGuard whitepaper 6.4).
  Measured on wireguard-go with 20 pings/s in both directions: 0 lost, a 20-60 ms delay spike.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from ghostcore.errors import AuthError, GhostError, NotFound, Unavailable
from ghostcore.keys import PrivateKey, PublicKey
from ghostlink.state import StateDir

if TYPE_CHECKING:
    from ghostlink.control import CoordClient, Daemon

log = logging.getLogger(__name__)

MIN_CHECK = 0.5  # automatic rotation: the age check runs every interval/10, within these bounds
MAX_CHECK = 60.0


async def _prove_pending(client: CoordClient, pending: PrivateKey, endpoints: list[str]) -> bool | None:
    """Is ``pending`` this node's key at ghostmesh now? True / False; None if ghostmesh is unreachable.

    A ``ReportStatus`` proven with it: ghostmesh promotes a pending key it holds before any other check,
    so NOT_FOUND means it holds the key nowhere; UNAUTHENTICATED (the node expired) still means the key
    is bound to the node now.
    """
    try:
        await client.report_status(endpoints, key=pending)
    except NotFound as exc:
        log.warning("the key of an interrupted rotation was refused (%s); keeping the old key", exc)
        return False
    except AuthError:
        return True
    except Unavailable:
        return None
    return True


async def settle_pending(state: StateDir, client: CoordClient, key: PrivateKey) -> PrivateKey:
    """At start, before WireGuard is up: the key to run with, finishing an interrupted rotation.

    ``client`` must have the server key pinned. If ghostmesh cannot be reached the pending file is kept
    (the daemon retries, :meth:`KeyRotator.resume`) and the old key is used meanwhile.
    """
    pending = state.pending_key()
    if pending is None:
        return key
    accepted = await _prove_pending(client, pending, [])
    if accepted is None:
        return key
    if not accepted:
        state.discard_pending()
        return key
    state.commit_key(pending, time.time())
    client.key = pending
    log.info("finished an interrupted key rotation: now %s…", pending.public_key().short())
    return pending


class KeyRotator:
    """Runs rotations for one daemon; one at a time."""

    def __init__(self, daemon: Daemon, state: StateDir, *, clock: Callable[[], float] = time.time) -> None:
        self.daemon = daemon
        self.state = state
        self.clock = clock
        self._lock = asyncio.Lock()

    async def rotate(self) -> tuple[PublicKey, PublicKey]:
        """Rotate now (steps 1-6 of the module docstring); returns (old, new) public keys.

        A failure at step 1 changes nothing anywhere. A failure after step 2 leaves a pending key that
        :meth:`resume` (before the next Sync stream) or the next start finishes.
        """
        async with self._lock:
            d = self.daemon
            old = d.key
            new = PrivateKey.generate()
            await d.client.rotate_key(new)  # 1
            self.state.save_pending(new)  # 2
            await self._switch(new)  # 3, 4
            await d.report_endpoints(force=True)  # 5: the first call proven with the new key promotes it
            self.state.commit_key(new, self.clock())  # 6
            log.info("rotated the node key: %s… -> %s…", old.public_key().short(), new.public_key().short())
            return old.public_key(), new.public_key()

    async def _switch(self, new: PrivateKey) -> None:
        d = self.daemon
        if d.key.public_key() != new.public_key():
            await d.backend.set_private_key(new)
        d.key = new
        d.client.key = new
        if d.traversal is not None:
            d.traversal.set_key(new)

    async def resume(self) -> None:
        """Before a Sync stream: finish a rotation whose pending key is still on disk (a failed step 5)."""
        async with self._lock:
            pending = self.state.pending_key()
            if pending is None:
                return
            accepted = await _prove_pending(
                self.daemon.client, pending, self.daemon.reported[0] if self.daemon.reported else []
            )
            if accepted is None:
                raise Unavailable(
                    f"cannot reach ghostmesh at {self.daemon.client.target} to finish a key rotation"
                )
            if accepted:
                await self._switch(pending)
                self.state.commit_key(pending, self.clock())
                log.info("finished an interrupted key rotation: now %s…", pending.public_key().short())
                return
            self.state.discard_pending()
            old = self.state.existing_key()
            if old is not None and old.public_key() != self.daemon.key.public_key():
                await self._switch(old)  # WireGuard had switched already: back to the key ghostmesh knows

    def check_interval(self, interval: float) -> float:
        return min(max(interval / 10, MIN_CHECK), MAX_CHECK)

    def due(self, interval: float) -> bool:
        created = self.state.key_created()
        return created > 0 and self.clock() - created >= interval

    async def run_auto(self, interval: float) -> None:
        """Automatic rotation: rotate whenever the key is ``interval`` old, while connected."""
        period = self.check_interval(interval)
        while True:
            await asyncio.sleep(period)
            if not self.daemon.status.connected or not self.due(interval):
                continue
            try:
                await self.rotate()
            except GhostError as exc:
                log.warning("automatic key rotation failed: %s; retrying in %.0fs", exc, period)
