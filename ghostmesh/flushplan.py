"""When each map stream flushes its pending delta: one plan for every stream. PURE (no asyncio, no I/O).

Without a plan, every stream would wait a fixed batch delay after its first pending change and flush on
its own; during a join wave of N nodes lasting T seconds each stream then sends about T / delay deltas,
and since T grows with N, the wave costs O(N²) messages (each one a gRPC write of ~150 µs of server CPU).

The plan gathers the woken streams (:meth:`FlushPlan.mark`) and releases them together in *rounds*
(:meth:`FlushPlan.take`). A round lasts from its release until every stream it released has written its
delta (:meth:`FlushPlan.done`). The window before a round (:meth:`FlushPlan.window_at`, asked when the
round's first stream is marked) depends on how soon that came after the last round: in a quiet mesh the
next change comes long after, and it waits only ``batch_delay``. When changes keep coming (a burst: a
join wave, a reconnect storm), the next mark comes while a round is written or within one round's
duration of its end, and the window is ``burst_factor`` times that round (at least ``batch_delay``, at
most ``max_window``): flushing then takes about a third of the server's loop (with the default factor 2),
the rest serves Registers and new streams, and every stream's next delta carries everything that arrived
meanwhile. (Whether anything was marked *during* a round says little: the round holds the loop, so the
Registers of a wave are served between rounds.) A round of N streams costs O(N), so the window grows
with N, and the deltas each stream gets during a burst of T seconds, about T / (3 x round), stop growing
with N when T grows with N (a wave of joins): the wave's messages are O(N), not O(N²).

A stream whose previous delta is still being written (a slow reader, its HTTP/2 window full) is not
released again: it stays marked and joins the first round after it finished, with all it missed
coalesced. A round that waits only for such stragglers ends at ``max_window`` and is measured as such
once; later rounds no longer include them, so one slow reader cannot slow everybody's updates.

Times are monotonic seconds given by the caller.
"""

from __future__ import annotations

from collections.abc import Iterable


class FlushPlan:
    def __init__(self, batch_delay: float, max_window: float = 2.0, burst_factor: float = 2.0) -> None:
        self.batch_delay = batch_delay
        self.max_window = max(max_window, batch_delay)
        self.burst_factor = burst_factor
        self.rounds = 0  # rounds released since start (metrics)
        self._marked: set[int] = set()  # streams with something to flush, ready to be released
        self._deferred: set[int] = set()  # marked while still writing: ready once written
        self._busy: set[int] = set()  # released, their delta not written yet
        self._round: set[int] = set()  # the current round's streams still writing
        self._round_started = 0.0
        self._last_end: float | None = None  # when the last round ended
        self._last_duration = 0.0  # and how long it took

    @property
    def pending(self) -> bool:
        """Some marked stream can be released now (not only streams still writing)."""
        return bool(self._marked)

    @property
    def in_round(self) -> bool:
        """A released round is still being written."""
        return bool(self._round)

    def mark(self, sids: Iterable[int]) -> None:
        """These streams have something to flush."""
        for sid in sids:
            (self._deferred if sid in self._busy else self._marked).add(sid)

    def window_at(self, now: float) -> float:
        """How long the round that is due now waits: ``batch_delay`` in a quiet mesh, ``burst_factor``
        times the last round when this work came while it was written or within its duration after."""
        if self.in_round or (self._last_end is not None and now - self._last_end < self._last_duration):
            return min(self.max_window, max(self.batch_delay, self.burst_factor * self._last_duration))
        return self.batch_delay

    def take(self, now: float) -> list[int]:
        """Release a round: every marked stream not still writing its previous delta."""
        ready = sorted(self._marked)
        self._marked = set()
        self._busy.update(ready)
        if ready:
            self.rounds += 1
            self._round = set(ready)
            self._round_started = now
        return ready

    def done(self, sid: int, now: float) -> bool:
        """``sid`` wrote its delta (or had none). True when that ended the current round."""
        self._busy.discard(sid)
        if sid in self._deferred:
            self._deferred.discard(sid)
            self._marked.add(sid)
        if sid not in self._round:
            return False
        self._round.discard(sid)
        if self._round:
            return False
        self._end_round(now)
        return True

    def expire_round(self, now: float) -> None:
        """The round is taking ``max_window`` or longer (its stragglers write slowly): measure it as
        such and stop waiting for it; its stragglers stay busy until they finish."""
        if self._round:
            self._round = set()
            self._end_round(now)

    def _end_round(self, now: float) -> None:
        self._last_end = now
        self._last_duration = now - self._round_started

    def forget(self, sid: int, now: float) -> bool:
        """The stream closed: it is in no set any more (and no longer holds up its round). True when
        that ended the current round."""
        self._marked.discard(sid)
        self._deferred.discard(sid)
        return self.done(sid, now)
