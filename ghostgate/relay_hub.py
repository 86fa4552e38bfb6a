"""The node relay's hub: one :class:`~ghostgate.relay_core.RelayCore` shared by every transport connection.

:class:`RelayHub` owns the core, its timer and the map from connection id to :class:`Edge`, so a node on
QUIC and a node on TLS-over-TCP reach each other through the one routing table (node key -> connection,
kept by the core). It knows no transport: each transport connection (:mod:`ghostgate.quic`,
:mod:`ghostgate.stream`) implements :class:`Edge`, calls :meth:`RelayHub.attach` when it opens and feeds
the hub what it reads. Edges never await in the forwarding path; a delivery to a connection whose buffer is
over its limit is dropped and counted (``dropped_slow``) instead, so one slow client never stalls the
others. The core's clock is ``time.time()`` because relay tokens expire in unix time.

The hub also bounds the connections (:class:`Admission`): at most ``max_total`` at once and
``max_per_source`` from one source address. A transport asks :meth:`RelayHub.admit` before it spends
anything on a connection (before the TLS handshake, before the QUIC connection is attached) and calls
:meth:`RelayHub.release` when it is gone; a refused connection is closed at once and counted
(``refused_total`` / ``refused_source``).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import Protocol

from ghostcore.aio import CoreTimer
from ghostgate.nodeset import Revoked
from ghostgate.relay_core import Action, Close, Deliver, RelayCore, Send

log = logging.getLogger(__name__)


class Edge(Protocol):
    """One transport connection, as the hub drives it."""

    def send_frame(self, data: bytes) -> None:
        """Write stream frames on the control stream (best effort; a hopeless backlog closes the edge)."""

    def deliver(self, src: bytes, packet: bytes) -> bool:
        """Queue a RECV without waiting; False when dropped (connection closing or over its buffer limit)."""

    def close_edge(self, reason: str) -> None:
        """Close after flushing what was written (bounded in time); the core has forgotten this connection."""


class Admission:
    """Open connections in all and per source address, against two limits (pure; the hub owns one)."""

    def __init__(self, max_total: int, max_per_source: int) -> None:
        self.max_total = max_total
        self.max_per_source = max_per_source
        self._per_source: Counter[str] = Counter()
        self.total = 0

    def admit(self, source: str) -> str | None:
        """Take a slot for ``source``; None, or the counter naming why it was refused."""
        if self.total >= self.max_total:
            return "refused_total"
        if self._per_source[source] >= self.max_per_source:
            return "refused_source"
        self._per_source[source] += 1
        self.total += 1
        return None

    def release(self, source: str) -> None:
        if self._per_source[source] > 0:
            self._per_source[source] -= 1
            self.total -= 1
            if not self._per_source[source]:
                del self._per_source[source]  # the table holds only sources with open connections


class RelayHub:
    """Connection ids, the core, the timer; ``attach`` / ``stream`` / ``datagram`` / ``detach`` from edges."""

    def __init__(
        self,
        core: RelayCore,
        loop: asyncio.AbstractEventLoop,
        clock: Callable[[], float] = time.time,
        *,
        max_connections: int = 10_000,
        max_per_source: int = 16,
    ) -> None:
        self.core = core
        self._admission = Admission(max_connections, max_per_source)
        self.loop = loop
        self.clock = clock
        self.edges: dict[int, Edge] = {}  # connections the core knows (open, not yet closed by the core)
        self.live: dict[int, Edge] = {}  # transports not yet gone (a closed connection may still flush)
        self.counters: Counter[str] = Counter()
        self._ids = itertools.count(1)
        self._timer = CoreTimer(loop, clock, self._on_timer)
        self._closed = False

    @property
    def connections(self) -> int:
        """Transport connections still open (closing ones included): 0 once every client is gone."""
        return len(self.live)

    def admit(self, source: str) -> bool:
        """May a new connection from ``source`` be served? If so it holds a slot until :meth:`release`."""
        refused = "refused_total" if self._closed else self._admission.admit(source)
        if refused is not None:
            self.counters[refused] += 1
            return False
        return True

    def release(self, source: str) -> None:
        """An admitted connection from ``source`` is gone."""
        self._admission.release(source)

    def attach(self, edge: Edge) -> int:
        cid = next(self._ids)
        self.edges[cid] = edge
        self.live[cid] = edge
        self._apply(self.core.open(cid, self.clock()))
        if self._closed:  # a handshake that finished while we shut down
            self._apply(self.core.reject(cid, "relay: shutting down", "shutdown"))
        return cid

    def stream(self, cid: int, data: bytes) -> None:
        self._apply(self.core.stream(cid, data, self.clock()))

    def datagram(self, cid: int, data: bytes) -> None:
        self._apply(self.core.datagram(cid, data, self.clock()))

    def reject(self, cid: int, reason: str, counter: str) -> None:
        self._apply(self.core.reject(cid, reason, counter))

    def revoke(self, revoked: Revoked) -> int:
        """Close the connections of node keys that left the roster (ghostgate.control); how many."""
        actions = self.core.revoke(revoked)
        self._apply(actions)
        return sum(isinstance(a, Close) for a in actions)

    def count(self, counter: str) -> None:
        """An edge-side event worth counting (e.g. ``closed_slow``), reported by :meth:`stats`."""
        self.counters[counter] += 1

    def detach(self, cid: int) -> None:
        """The edge's transport is gone (whoever closed it)."""
        self._apply(self.core.lost(cid))
        self.edges.pop(cid, None)
        self.live.pop(cid, None)

    @property
    def closed(self) -> bool:
        """Closing or closed: new connections are refused."""
        return self._closed

    def stats(self) -> dict[str, int]:
        """The core's counters and the edges', one dict (for tests and logs)."""
        return {**self.core.counters, **self.counters}

    def _apply(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Send):
                edge = self.edges.get(action.conn)
                if edge is not None:
                    edge.send_frame(action.data)
            elif isinstance(action, Deliver):
                edge = self.edges.get(action.conn)
                if edge is None or not edge.deliver(action.src, action.packet):
                    self.counters["dropped_slow"] += 1
            elif isinstance(action, Close):
                gone = self.edges.pop(action.conn, None)
                if gone is not None:
                    log.debug("relay connection %d closed: %s", action.conn, action.reason)
                    gone.close_edge(action.reason)
        self._schedule()

    def _schedule(self) -> None:
        self._timer.arm(self.core.next_timer())

    def _on_timer(self, now: float) -> None:
        self._apply(self.core.timer(now))

    def close(self) -> None:
        """Close every connection (ERROR "shutting down" first) and stop the timer."""
        self._closed = True
        for cid in list(self.edges):
            self._apply(self.core.reject(cid, "relay: shutting down", "shutdown"))
        self._timer.cancel()
