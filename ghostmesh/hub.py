"""The asyncio glue between the state, the mapper, the audit log and the open Sync streams.

Changes (:meth:`Hub.transaction`). Every control-plane change runs in one store transaction that the
state's writes and the change's audit rows join, and that commits them together or not at all::

    with hub.transaction() as tx:
        node, changes = state.register(...)     # synchronous: the store writes join the transaction
        tx.dispatch(changes)                    # queued for the mapper
        tx.record(actor, action, target, detail, remote)   # sealed and appended in the transaction
    # committed: only now does the mapper fold the changes in and wake the streams they touch

The state stays synchronous and knows nothing of transactions: it refuses before it writes, writes
through the store before it updates its memory, and returns change records, so a refusal (from its own
checks or from the store: a conflict, a spent key) rolls the transaction back with its memory untouched.
What can fail *after* the state returned is the audit append and the COMMIT (disk full, an I/O error).
Then the state's memory holds a change the database does not: the hub is broken. It refuses every later
write (:meth:`ghostmesh.store.base.Store.refuse_writes`), and :attr:`Hub.broken` tells the server to stop;
a restart loads the state from the database, which holds neither the change nor its row. A crash at any
point leaves both or neither. A transaction never spans an await (the store is shared by every handler on
the loop); one opened while another is open joins it.

``Hub.dispatch(changes)`` folds change records into the :class:`~ghostmesh.mapper.Mapper` and marks only
the streams they touched in the :class:`~ghostmesh.flushplan.FlushPlan`. One flusher task releases the
marked streams in rounds: it waits the plan's window (``mapper.batch_delay`` when quiet, twice the last
round's duration under a burst), then sets each released stream's ``asyncio.Event``; each Sync handler
flushes its delta and reports it written (:meth:`Hub.flushed`), which ends the round. A node has one
stream: a new one ends the old one (:meth:`Hub.open_stream`).

A timer task calls :meth:`Hub.run_due` when the next key expiry, ephemeral grace, relay credential
refresh, limit window or audit prune is due: it calls ``State.tick``, writes the audit rows of what the
timer removed and of closed limit windows (:mod:`ghostmesh.limits`), prunes the audit log past
``audit.retention`` (hourly), and wakes the streams whose relay map the mapper marked for re-minting.

Other folds of the same records (the relay roster, :mod:`ghostmesh.api.relaycontrol`) subscribe with
:meth:`Hub.add_listener`: each gets every committed batch, after the mapper, with the time.

``Hub.set_policy(policy)`` is how the policy's owner (:class:`ghostmesh.policy_source.PolicySource`)
hands a new policy to the mapper: it wakes the streams whose peers or filter changed. ``Hub.set_dns(dns)``
is how a config reload (:mod:`ghostmesh.reload`) hands it new DNS settings: every stream, once.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

from ghostcore.errors import Unavailable
from ghostcore.latency import Buckets
from ghostcore.pb.ghostmesh.v1 import coordination_pb2 as pb
from ghostcore.policy import Policy
from ghostmesh import audit
from ghostmesh.audit import Auditor
from ghostmesh.changes import Change, NodeRemoved
from ghostmesh.config import LimitsConfig
from ghostmesh.flushplan import FlushPlan
from ghostmesh.limits import Limits
from ghostmesh.mapper import Mapper
from ghostmesh.state import State
from ghostmesh.store.base import CommitFailed

log = logging.getLogger(__name__)

_MAX_TIMER_SLEEP = 60.0  # re-check at least this often, in case a clock jump moved deadlines
PRUNE_EVERY = 3600.0  # seconds between audit prunes (audit.retention is at least this long)


class Transaction:
    """What one :meth:`Hub.transaction` block changed: audit rows appended now, change records
    dispatched once it committed."""

    def __init__(self, hub: Hub) -> None:
        self._hub = hub
        self.changes: list[Change] = []

    def dispatch(self, changes: Iterable[Change]) -> None:
        """Queue change records; the mapper gets them once the transaction committed."""
        self.changes.extend(changes)

    def record(
        self,
        actor: str,
        action: str,
        target: str,
        detail: Mapping[str, object] | None = None,
        remote: str = "",
    ) -> None:
        """Append one audit entry for what this transaction changed; it commits with the change."""
        auditor = self._hub.audit
        if auditor is None:
            return
        try:
            auditor.record(actor, action, target, detail, remote)
        except Exception as exc:
            reason = f"audit log: {action} {target} could not be recorded ({exc})"
            self._hub.break_down(reason)
            raise Unavailable(f"{reason}; nothing was changed, ghostmesh is stopping") from None


class Hub:
    def __init__(
        self,
        state: State,
        mapper: Mapper,
        batch_delay: float,
        clock: Callable[[], float] = time.time,
        *,
        audit: Auditor | None = None,
        limits: Limits | None = None,
        retention: float = 0.0,
    ) -> None:
        self.state = state
        self.mapper = mapper
        self.clock = clock
        self.stopping = False
        self.audit = audit  # None only for hubs built without a store (unit tests)
        self.limits = limits if limits is not None else Limits(LimitsConfig())
        self.retention = retention  # audit.retention; 0: keep every entry
        self.broken = asyncio.Event()  # set when a change could not be committed after memory moved
        self.broken_reason = ""
        self._woken: dict[int, float] = {}  # stream id -> when a change first woke it (monotonic)
        self.fanout_latency = Buckets()  # change -> delta written, seconds (metrics)
        self.policy_compiles = 0  # policies put in force since start (metrics)
        self.policy_compile_seconds = 0.0  # how long the last one took to compile into the mapper
        self._tx: Transaction | None = None
        self._events: dict[int, asyncio.Event] = {}
        self._ids = itertools.count(1)
        self._listeners: list[Callable[[Sequence[Change], float], None]] = []
        self._timer_wake = asyncio.Event()
        self._timer_task: asyncio.Task[None] | None = None
        self.flush_plan = FlushPlan(batch_delay)
        # full maps built and written at once (limits.full_maps_in_flight): memory for a storm is bounded
        self.full_maps = asyncio.Semaphore(self.limits.cfg.full_maps_in_flight)
        self._flush_wake = asyncio.Event()  # a stream was marked (or finished writing)
        self._round_over = asyncio.Event()  # the released round has been written
        self._flusher_task: asyncio.Task[None] | None = None
        self._next_prune = clock() if retention else None
        # A new stream's relay refresh is never nearer than 35% of the credential lifetime, so sleeping at
        # most the minter's slack notices it in time without waking the timer on every stream opened.
        relay = mapper.relay
        self._max_sleep = _MAX_TIMER_SLEEP if relay is None else min(_MAX_TIMER_SLEEP, relay.slack)

    def now(self) -> float:
        return self.clock()

    # -- changes ---------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Transaction]:
        """One change and its audit rows, committed together; its change records dispatched after."""
        if self._tx is not None:
            yield self._tx  # nested (synchronously, never across an await): part of the open one
            return
        tx = self._tx = Transaction(self)
        try:
            with self.state.store.transaction():
                yield tx
        except CommitFailed as exc:
            self.break_down(str(exc))
            raise
        finally:
            self._tx = None
        self.dispatch(tx.changes)

    def break_down(self, reason: str) -> None:
        """A change is in memory but not in the database: refuse every later write and ask the server
        to stop (:attr:`broken`)."""
        if self.broken_reason:
            return
        log.critical("stopping: %s", reason)
        self.broken_reason = reason
        self.state.store.refuse_writes(reason)
        self.broken.set()

    def add_listener(self, listener: Callable[[Sequence[Change], float], None]) -> None:
        """Hand ``listener`` every dispatched batch of change records (after the mapper) and the time."""
        self._listeners.append(listener)

    def dispatch(self, changes: Iterable[Change]) -> None:
        now = self.now()
        woken_at = time.monotonic()
        batch = list(changes)
        for change in batch:
            self._mark(self.mapper.apply(change, now), woken_at)
        if batch:
            for listener in self._listeners:
                listener(batch, now)
            self._timer_wake.set()  # deadlines may have moved

    def set_policy(self, policy: Policy | None) -> None:
        """Fold a new policy (None: allow all) into the mapper; wake the streams it changed."""
        started = time.perf_counter()
        woken = self.mapper.set_policy(policy)  # compiles the policy for every node
        self.policy_compiles += 1
        self.policy_compile_seconds = time.perf_counter() - started
        self.wake(woken)

    def set_dns(self, dns: pb.DnsConfig | None) -> int:
        """Hand the mapper new DNS settings (None: none); wake every stream if they changed. Returns how
        many streams were woken (0: the settings were the same)."""
        woken = self.mapper.set_dns(dns)
        self.wake(woken)
        return len(woken)

    @property
    def started(self) -> bool:
        """:meth:`start` was called (the server serves): what ``/readyz`` waits for."""
        return self._timer_task is not None

    @property
    def stream_count(self) -> int:
        """Map streams open now."""
        return len(self._events)

    # -- streams ---------------------------------------------------------------------------------------

    def open_stream(self, node_id: int) -> tuple[int, bytes, asyncio.Event]:
        """Mark the node online (peers hear of it) and end its older streams; return the new stream's
        id, encoded full map and wake event."""
        replaced = self.mapper.replace_streams(node_id)
        self.limits.refusals.streams_replaced += len(replaced)
        self.wake(replaced)
        self.dispatch(self.state.connect(node_id, self.now()))
        sid = next(self._ids)
        full = self.mapper.open_stream_bytes(sid, node_id, self.now())
        ev = asyncio.Event()
        self._events[sid] = ev
        return sid, full, ev

    def close_stream(self, sid: int, node_id: int) -> None:
        self.mapper.close_stream(sid)
        self._events.pop(sid, None)
        self._woken.pop(sid, None)
        if self.flush_plan.forget(sid, time.monotonic()):
            self._round_over.set()
        if not self.stopping:
            self.dispatch(self.state.disconnect(node_id, self.now()))

    def wake(self, sids: Iterable[int]) -> None:
        """These streams have something to flush (or are to end): the next flush round releases them."""
        self._mark(sids, time.monotonic())

    def _mark(self, sids: Iterable[int], at: float) -> None:
        marked = [sid for sid in sids if sid in self._events]
        if not marked:
            return
        for sid in marked:
            self._woken.setdefault(sid, at)  # the first change the stream has not been sent yet
        self.flush_plan.mark(marked)
        self._flush_wake.set()

    def flushed(self, sid: int, sent: bool) -> None:
        """The stream wrote what its round released it for (``sent``: a delta went out): observe how
        long the change took to reach it (change -> fan-out latency, the flush window included)."""
        now = time.monotonic()
        woken = self._woken.pop(sid, None)
        if sent and woken is not None:
            self.fanout_latency.observe(now - woken)
        if self.flush_plan.done(sid, now):
            self._round_over.set()
        if self.flush_plan.pending:
            self._flush_wake.set()  # marked again while it was writing

    async def _run_flusher(self) -> None:
        """Release the marked streams in rounds, a window apart (see :mod:`ghostmesh.flushplan`)."""
        plan = self.flush_plan
        while not self.stopping:
            await self._flush_wake.wait()
            self._flush_wake.clear()
            if not plan.pending:
                continue
            await asyncio.sleep(plan.window_at(time.monotonic()))  # a burst piles up into one update
            try:
                self._release(plan)
            except Exception:  # no delta would ever flow again without this loop: log, keep going
                log.exception("flush round failed")
                continue
            if plan.in_round:
                try:
                    await asyncio.wait_for(self._round_over.wait(), plan.max_window)
                except TimeoutError:
                    plan.expire_round(time.monotonic())

    def _release(self, plan: FlushPlan) -> None:
        self._round_over.clear()
        for sid in plan.take(time.monotonic()):
            ev = self._events.get(sid)
            if ev is None:
                plan.forget(sid, time.monotonic())
            else:
                ev.set()

    # -- timers ----------------------------------------------------------------------------------------

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._timer_task = loop.create_task(self._run_timers(), name="ghostmesh-timers")
        self._flusher_task = loop.create_task(self._run_flusher(), name="ghostmesh-flusher")

    def next_deadline(self) -> float | None:
        """When :meth:`run_due` has work next (None: nothing scheduled)."""
        dues = (
            self.state.next_deadline(),
            self.mapper.next_relay_refresh(),
            self.limits.next_deadline(),
            self._next_prune,
        )
        due = [d for d in dues if d is not None]
        return min(due) if due else None

    def run_due(self) -> None:
        """Do the time-driven work due now: expiries, ephemeral removals, the audit rows of closed limit
        windows, the audit prune, relay credential refreshes."""
        now = self.now()
        with self.transaction() as tx:
            changes = self.state.tick(now)
            names = self._names_of_removed(changes)
            tx.dispatch(changes)
            entries = audit.timer_entries(changes, names)
            for row in self.limits.closed(now):
                node = self.state.node(int(row.key)) if row.kind == "routes" else None
                entries.append(audit.coalesced_entry(row, node.name if node is not None else ""))
            for e in entries:
                tx.record(e.actor, e.action, e.target, e.detail, e.remote)
        if self._next_prune is not None and self._next_prune <= now and self.audit is not None:
            self._next_prune = now + PRUNE_EVERY
            removed = self.audit.prune(self.retention)
            if removed:
                log.info("audit log pruned", extra={"removed": removed, "retention_s": self.retention})
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
        for task in (self._timer_task, self._flusher_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
