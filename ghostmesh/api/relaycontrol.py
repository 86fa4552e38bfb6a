"""The RelayControl servicer: relays (ghostgate) watch which nodes may use them (the I/O edge).

``proto/ghostmesh/v1/relaycontrol.proto``, on the same TLS port as Coordination and Admin, served only with
``[[relay.regions]]`` (and so a relay secret) configured. The roster it streams is
:mod:`ghostmesh.relayroster` (pure), seeded from the registry when the server starts and folded every
committed batch of change records (:meth:`ghostmesh.hub.Hub.add_listener`), so deleting or expiring a node,
or promoting a rotated key, reaches every watching gate within ``coalesce`` seconds (half the mapper's
``batch_delay``: the gates hear of a promoted key before the node's own map brings it the token for that
key) plus the network.

A gate proves it holds the relay secret (:mod:`ghostcore.relaycontrol`: an HMAC over its name, its clock and a
nonce). Refusals, each one line, nothing changed, each counted in :attr:`RelayControlServicer.counters`:

- a malformed gate name: INVALID_ARGUMENT (``bad_request``);
- a timestamp beyond 60 s of ours, a proof that does not verify, a nonce used before: UNAUTHENTICATED
  (``stale``, ``bad_proof``, ``replayed``). The call guard (:mod:`ghostmesh.api.guard`) counts these as failed
  authentications of the source, summarised in one ``auth.failed`` audit row per source and minute, and past
  ``limits.auth_failures_per_minute`` refuses that source's failing calls as RESOURCE_EXHAUSTED;
- more than :data:`ghostmesh.relayroster.MAX_WATCHERS` gate names at once, or the nonce memory full:
  RESOURCE_EXHAUSTED / UNAVAILABLE (``too_many``, ``nonces_full``).

One watch per gate name: a newer one ends the older with ALREADY_EXISTS (``replaced``), as a node's newer
Sync does; at shutdown every watch ends UNAVAILABLE and the gates resync from the restarted server's
roster, which the registry gives back unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from typing import Any

import grpc

from ghostcore import relaycontrol
from ghostcore.errors import Conflict, GhostError, InvalidArgument, ResourceExhausted, Unavailable
from ghostcore.pb.ghostmesh.v1 import relaycontrol_pb2 as pb
from ghostcore.pb.ghostmesh.v1 import relaycontrol_pb2_grpc as pb_grpc
from ghostmesh.api.errors import abort_with
from ghostmesh.changes import Change
from ghostmesh.hub import Hub
from ghostmesh.relayroster import Roster

log = logging.getLogger(__name__)

Ctx = grpc.aio.ServicerContext[Any, Any]
_SHUTTING_DOWN = "server is shutting down; the gate reconnects"


class RelayControlServicer(pb_grpc.RelayControlServicer):
    """Gates' watches of the relay roster; see the module docstring."""

    def __init__(
        self, hub: Hub, secret: bytes, *, coalesce: float, clock: Callable[[], float] = time.time
    ) -> None:
        self.hub = hub
        self._secret = secret
        self.coalesce = coalesce
        self._clock = clock  # the gates' proof timestamps are wall-clock time, as the node proofs' are
        self.roster = Roster()
        self.roster.load(hub.state.snapshot(), hub.now())
        self.nonces = relaycontrol.NonceGuard()
        self.counters: Counter[str] = Counter()
        self._wakes: dict[int, asyncio.Event] = {}
        self._stopping = False
        hub.add_listener(self._on_changes)

    def __repr__(self) -> str:  # the secret stays out
        return f"RelayControlServicer({self.roster!r})"

    def _on_changes(self, changes: Sequence[Change], now: float) -> None:
        for wid in self.roster.apply(changes, now):
            wake = self._wakes.get(wid)
            if wake is not None:
                wake.set()

    def stop(self) -> None:
        """End every watch (UNAVAILABLE): the server is stopping."""
        self._stopping = True
        for wake in self._wakes.values():
            wake.set()

    def _authenticate(self, request: pb.WatchNodesRequest) -> str:
        try:
            gate = relaycontrol.check_name(request.gate, "WatchNodesRequest.gate")
        except InvalidArgument:
            self.counters["bad_request"] += 1
            raise
        now = self._clock()
        try:
            relaycontrol.verify(self._secret, gate, request.unix_time, request.nonce, request.proof, now=now)
            self.nonces.admit(request.nonce, request.unix_time, now)
        except relaycontrol.StaleRequest:
            self.counters["stale"] += 1
            raise
        except relaycontrol.BadProof:
            self.counters["bad_proof"] += 1
            raise
        except relaycontrol.Replayed:
            self.counters["replayed"] += 1
            raise
        except Unavailable:
            self.counters["nonces_full"] += 1
            raise
        return gate

    async def WatchNodes(
        self, request: pb.WatchNodesRequest, context: Ctx
    ) -> AsyncIterator[pb.NodeSetUpdate]:
        try:
            # aclosing: when the gate goes away while this generator is suspended, the inner one is closed
            # at once (its finally forgets the watcher), not whenever GC gets to it.
            async with contextlib.aclosing(self._watch(request, context)) as updates:
                async for update in updates:
                    yield update
        except GhostError as err:
            await abort_with(context, err, "WatchNodes")

    async def _watch(
        self, request: pb.WatchNodesRequest, context: Ctx
    ) -> AsyncGenerator[pb.NodeSetUpdate, None]:
        if self._stopping or self.hub.stopping:
            raise Unavailable(_SHUTTING_DOWN)
        gate = self._authenticate(request)
        try:
            watcher, replaced = self.roster.open(gate)
        except ResourceExhausted:
            self.counters["too_many"] += 1
            raise
        if replaced is not None:
            self.counters["replaced"] += 1
            old = self._wakes.get(replaced)
            if old is not None:
                old.set()
        wake = self._wakes[watcher.id] = asyncio.Event()
        self.counters["watches"] += 1
        log.info("relay gate %s watching from %s: %d nodes", gate, context.peer(), len(self.roster.entries))
        try:
            while True:
                for update in self.roster.flush(watcher):
                    yield update
                    self.counters["updates"] += 1
                await wake.wait()
                if self.coalesce > 0 and not (self._stopping or watcher.ended):
                    await asyncio.sleep(self.coalesce)  # a burst of changes goes out as one delta
                wake.clear()
                if self._stopping or self.hub.stopping:
                    raise Unavailable(_SHUTTING_DOWN)
                if watcher.ended:
                    raise Conflict(f"relay gate {gate} opened a newer watch, which replaces this one")
        finally:
            self.roster.close(watcher)
            self._wakes.pop(watcher.id, None)
            log.info("relay gate %s: watch ended", gate)


def add_relay_control(servicer: RelayControlServicer, server: grpc.aio.Server) -> None:
    pb_grpc.add_RelayControlServicer_to_server(servicer, server)
