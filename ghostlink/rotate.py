"""Zero-loss rotation of the node's WireGuard key (``ghostctl keys rotate`` and automatic rotation).

The flow, in this order (each step is safe to crash after):

1. generate the new key; with node-key signing on, sign it with the node's rotation key (``ghostlink.trust``;
   a node whose key is unsigned refuses to rotate, since peers would refuse the new key); ``RotateKey``
   proves the current key (call metadata) and the new one (request body, with the signature); ghostmesh
   stores it as the node's *pending* key and changes nothing else;
2. persist it as ``node.key.pending`` (0600) BEFORE WireGuard uses it;
3. switch WireGuard's private key over UAPI (``private_key=`` only: no peer, no port is touched);
4. switch the node key holder (:class:`ghostlink.nodekey.NodeKey`), which the coordination client's
   proofs and NAT traversal read (3 and 4 are one call: :meth:`ghostlink.daemon.Daemon.switch_key`);
5. ``ReportStatus`` proven with the new key: ghostmesh promotes the pending key to the node key and
   every peer's map gets the node with its new key (the Sync stream opened with the old key goes on);
6. replace ``node.key`` atomically (and note its creation time in ``node.json``); drop the pending file.

Crash safety: ghostmesh accepts calls proven with the node key or the pending key. A leftover pending key
is settled before the daemon starts (:func:`settle_pending`) or before each Sync stream
(:meth:`KeyRotator.resume`): a ``ReportStatus`` proven with it succeeds if ghostmesh still holds it as
pending (and promotes it) or already promoted it, and the node then uses it; if ghostmesh refuses it (it
never stored it, or a later rotation replaced it) it is thrown away and the old key stays.

The rotator and the daemon need each other: the daemon finishes a pending rotation before every Sync
stream, and a rotation switches the daemon's key and sends its status report. So the daemon is built with
its rotator, and the rotator gets the daemon with each call, as a :class:`RotatingNode`.

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
from typing import Protocol

from ghostcore.errors import AuthError, NotFound, Unavailable
from ghostcore.keys import PrivateKey, PublicKey
from ghostlink.client import CoordClient, StatusReport
from ghostlink.nodekey import NodeKey
from ghostlink.state import StateDir

log = logging.getLogger(__name__)

MIN_CHECK = 0.5  # automatic rotation: the age check runs every interval/10, within these bounds
MAX_CHECK = 60.0


class RotatingNode(Protocol):
    """What a rotation needs of the running node (:class:`ghostlink.daemon.Daemon`)."""

    def sign_new_key(self, new: PublicKey) -> bytes:
        """Step 1: the node-key signature ``new`` needs (empty while signing is off; raises when the lock
        is on and this node cannot sign, before anything changed)."""

    async def switch_key(self, new: PrivateKey) -> None:
        """Steps 3 and 4: WireGuard and the node key holder use ``new`` from now on."""

    async def report(self, *, force: bool = False) -> None:
        """Send the node's status report, proven with the current key."""

    def last_report(self) -> StatusReport:
        """The last status report sent (to prove a pending key with, without asking netlink)."""


async def _prove_pending(client: CoordClient, pending: PrivateKey, report: StatusReport) -> bool | None:
    """Is ``pending`` this node's key at ghostmesh now? True / False; None if ghostmesh is unreachable.

    ``report`` sent proven with it: ghostmesh promotes a pending key it holds before any other check, so
    NOT_FOUND means it holds the key nowhere; UNAUTHENTICATED (the node expired) still means the key is
    bound to the node now.
    """
    try:
        await client.report_status(report, key=pending)
    except NotFound as exc:
        log.warning("the key of an interrupted rotation was refused (%s); keeping the old key", exc)
        return False
    except AuthError:
        return True
    except Unavailable:
        return None
    return True


async def settle_pending(state: StateDir, client: CoordClient, keys: NodeKey) -> None:
    """At start, before WireGuard is up: finish an interrupted rotation, switching ``keys`` if it took.

    ``client`` must have the server key pinned. If ghostmesh cannot be reached the pending file is kept
    (the daemon retries, :meth:`KeyRotator.resume`) and the old key is used meanwhile.
    """
    pending = state.pending_key()
    if pending is None:
        return
    accepted = await _prove_pending(client, pending, StatusReport())
    if accepted is None:
        return
    if not accepted:
        state.discard_pending()
        return
    state.commit_key(pending, time.time())
    keys.switch(pending)
    log.info("finished an interrupted key rotation: now %s…", pending.public_key().short())


class KeyRotator:
    """Runs the rotations of one node, one at a time; ``keys`` is the node's key holder."""

    def __init__(
        self,
        client: CoordClient,
        keys: NodeKey,
        state: StateDir,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._client = client
        self._keys = keys
        self._state = state
        self._clock = clock
        self._lock = asyncio.Lock()

    async def rotate(self, node: RotatingNode) -> tuple[PublicKey, PublicKey]:
        """Rotate now (steps 1-6 of the module docstring); returns (old, new) public keys.

        A failure at step 1 changes nothing anywhere. A failure after step 2 leaves a pending key that
        :meth:`resume` (before the next Sync stream) or the next start finishes.
        """
        async with self._lock:
            old = self._keys.public
            new = PrivateKey.generate()
            await self._client.rotate_key(new, node.sign_new_key(new.public_key()))  # 1
            self._state.save_pending(new)  # 2
            await node.switch_key(new)  # 3, 4
            await node.report(force=True)  # 5: the first call proven with the new key promotes it
            self._state.commit_key(new, self._clock())  # 6
            log.info("rotated the node key: %s… -> %s…", old.short(), new.public_key().short())
            return old, new.public_key()

    async def resume(self, node: RotatingNode) -> None:
        """Before a Sync stream: finish a rotation whose pending key is still on disk (a failed step 5)."""
        async with self._lock:
            pending = self._state.pending_key()
            if pending is None:
                return
            accepted = await _prove_pending(self._client, pending, node.last_report())
            if accepted is None:
                raise Unavailable(f"cannot reach ghostmesh at {self._client.target} to finish a key rotation")
            if accepted:
                await node.switch_key(pending)
                self._state.commit_key(pending, self._clock())
                log.info("finished an interrupted key rotation: now %s…", pending.public_key().short())
                return
            self._state.discard_pending()
            old = self._state.existing_key()
            if old is not None and old.public_key() != self._keys.public:
                await node.switch_key(old)  # WireGuard had switched already: back to the key ghostmesh knows

    def check_interval(self, interval: float) -> float:
        """How often automatic rotation checks the key's age: interval/10, within MIN_CHECK..MAX_CHECK."""
        return min(max(interval / 10, MIN_CHECK), MAX_CHECK)

    def due(self, interval: float) -> bool:
        """Is the key ``interval`` old (automatic rotation)?"""
        created = self._state.key_created()
        return created > 0 and self._clock() - created >= interval
