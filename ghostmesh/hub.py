"""The asyncio glue between the state, the mapper and the open Sync streams.

``Hub.dispatch(changes)`` folds change records into the :class:`~ghostmesh.mapper.Mapper` and wakes only
the streams they touched (one ``asyncio.Event`` per stream). Each Sync handler waits on its event, sleeps
``mapper.batch_delay`` so a burst coalesces into one update, then flushes. A timer task calls
:meth:`Hub.run_due` when the next key expiry, ephemeral grace or relay credential refresh is due: it calls
``State.tick`` and wakes the streams whose relay map the mapper marked for re-minting
(``Mapper.refresh_relays``: a heap, so each round costs only the due streams).

``Hub.record(actor, action, target, detail, remote)`` is the audit hook (``ghostmesh.audit``): every
control-plane change calls it once the change succeeded; the timer records its own removals as "system".
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Callable, Iterable, Mapping

from ghostmesh.audit import Auditor
from ghostmesh.changes import Change, NodeRemoved
from ghostmesh.mapper import Mapper
from ghostmesh.state import State

log = logging.getLogger(__name__)

_MAX_TIMER_SLEEP = 60.0  # re-check at least this often, in case a clock jump moved deadlines


class Hub:
    def __init__(
        self,
        state: State,
        mapper: Mapper,
        batch_delay: float,
        clock: Callable[[], float] = time.time,
        audit: Auditor | None = None,
    ) -> None:
        self.state = state
        self.mapper = mapper
        self.batch_delay = batch_delay
        self.clock = clock
        self.stopping = False
        self._events: dict[int, asyncio.Event] = {}
        self._ids = itertools.count(1)
        self._timer_wake = asyncio.Event()
        self._timer_task: asyncio.Task[None] | None = None
        self.audit = audit  # None only for hubs built without a store (unit tests)
        # A new stream's relay refresh is never nearer than 35% of the credential lifetime, so sleeping at
        # most the minter's slack notices it in time without waking the timer on every stream opened.
        relay = mapper.relay
        self._max_sleep = _MAX_TIMER_SLEEP if relay is None else min(_MAX_TIMER_SLEEP, relay.slack)

    def now(self) -> float:
        return self.clock()

    def dispatch(self, changes: Iterable[Change]) -> None:
        now = self.now()
        any_change = False
        for change in changes:
            any_change = True
            for sid in self.mapper.apply(change, now):
                ev = self._events.get(sid)
                if ev is not None:
                    ev.set()
        if any_change:
            self._timer_wake.set()  # deadlines may have moved

    def record(
        self,
        actor: str,
        action: str,
        target: str,
        detail: Mapping[str, object] | None = None,
        remote: str = "",
    ) -> None:
        """Append one audit entry (``ghostmesh.audit``) for a change that already succeeded.

        The one hook for every control-plane change: call it right after the change, in the same turn.
        """
        if self.audit is not None:
            self.audit.record(actor, action, target, detail, remote)

    def open_stream(self, node_id: int) -> tuple[int, bytes, asyncio.Event]:
        """Mark the node online (peers hear of it); return its stream id, encoded full map, wake event."""
        self.dispatch(self.state.connect(node_id, self.now()))
        sid = next(self._ids)
        full = self.mapper.open_stream_bytes(sid, node_id, self.now())
        ev = asyncio.Event()
        self._events[sid] = ev
        return sid, full, ev

    def close_stream(self, sid: int, node_id: int) -> None:
        self.mapper.close_stream(sid)
        self._events.pop(sid, None)
        if not self.stopping:
            self.dispatch(self.state.disconnect(node_id, self.now()))

    def wake(self, sids: Iterable[int]) -> None:
        for sid in sids:
            ev = self._events.get(sid)
            if ev is not None:
                ev.set()

    # -- timers ----------------------------------------------------------------------------------------

    def start(self) -> None:
        self._timer_task = asyncio.get_running_loop().create_task(self._run_timers(), name="ghostmesh-timers")

    def next_deadline(self) -> float | None:
        """When :meth:`run_due` has work next (None: nothing scheduled)."""
        dues = [d for d in (self.state.next_deadline(), self.mapper.next_relay_refresh()) if d is not None]
        return min(dues) if dues else None

    def run_due(self) -> None:
        """Do the time-driven work due now: expiries, ephemeral removals, relay credential refreshes."""
        now = self.now()
        changes = self.state.tick(now)
        names = self._names_of_removed(changes)
        self.dispatch(changes)
        if self.audit is not None:
            self.audit.record_timer_changes(changes, names)
        self.wake(self.mapper.refresh_relays(now))

    async def _run_timers(self) -> None:
        while not self.stopping:
            due = self.next_deadline()
            delay = self._max_sleep if due is None else max(0.0, min(self._max_sleep, due - self.now()))
            self._timer_wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._timer_wake.wait(), timeout=delay)
            try:
                self.run_due()
            except Exception:  # a store error must not kill the timer loop; log and retry next round
                log.exception("timer tick failed")
                await asyncio.sleep(1.0)

    def _names_of_removed(self, changes: Iterable[Change]) -> Mapping[int, str]:
        """Names of removed nodes for the audit log, read before the mapper forgets them."""
        names: dict[int, str] = {}
        for change in changes:
            if isinstance(change, NodeRemoved):
                rec = self.state.node(change.node_id)
                view = self.mapper.visible(change.node_id)
                name = rec.name if rec is not None else view.name if view is not None else ""
                if name:
                    names[change.node_id] = name
        return names

    async def stop(self) -> None:
        """End every stream (handlers see ``stopping``) and the timer task."""
        self.stopping = True
        for ev in self._events.values():
            ev.set()
        if self._timer_task is not None:
            self._timer_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._timer_task
