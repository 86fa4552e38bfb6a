"""What one node, one source address or one burst may cost ghostmesh: the limits and their counters. PURE.

Sans-IO: every method takes ``now`` (unix seconds) from its caller, so tests step time by hand. The
I/O edges ask here and act on the answer: the call guard (:mod:`ghostmesh.api.guard`) for calls in
flight and failed authentications, the Coordination servicer for status reports and route audit rows,
the hub's timer for the coalesced audit rows, the server for the open-files limit.

What is bounded here (``[limits]``, :class:`ghostmesh.config.LimitsConfig`):

- status reports per node: a token bucket (``status_reports_per_second``, ``status_report_burst``);
  over it the report is refused (:class:`ResourceExhausted`) before anything changes;
- audit rows a node's route reports write: at most ``audit_rows_per_node_per_minute`` per node per
  window; the rest are counted by action and summarised in one row when the window closes;
- failed authentications per source address (an IPv4 address, or the /64 of an IPv6 one: whoever holds
  one address of a /64 usually holds all of them): every failure is counted and summarised in one audit
  row per source per window; beyond ``auth_failures_per_minute`` in a window, the source's failing
  attempts are refused (RESOURCE_EXHAUSTED) until the window closes, its good ones still pass;
- calls in flight, per source address and in total (``calls_per_source``, ``calls_total``);
- open files: :func:`open_files_needed` (the connections gRPC may accept, plus a reserve).

Every refusal is counted in :class:`Refusals`, the one place metrics read. A window is fixed: it opens
with its key's first event and closes ``WINDOW`` seconds later. The tables keyed by source address hold
at most ``MAX_SOURCES`` keys (sources beyond share one overflow entry), so an attacker spraying addresses
cannot grow them without bound.
"""

from __future__ import annotations

import heapq
import ipaddress
from collections.abc import Hashable
from dataclasses import dataclass, field

from ghostcore.addr import grpc_peer
from ghostcore.errors import ResourceExhausted
from ghostmesh.config import LimitsConfig

WINDOW = 60.0  # seconds: the window of audit rows per node and of failed authentications per source
MAX_SOURCES = 65536  # source addresses tracked at once; more share OVERFLOW
OVERFLOW = "other sources"
FD_RESERVE = 256  # open files beside the connections: database, listeners, logs, gRPC's own pipes


@dataclass
class Refusals:
    """Counters of everything refused or folded because of a limit (what metrics read)."""

    status_reports: int = 0  # ReportStatus over the node's rate
    audit_rows_coalesced: int = 0  # route audit rows folded into a summary row
    auth_failures: int = 0  # failed authentications seen (bad, stale or replayed proofs; bad keys)
    auth_refused: int = 0  # failing calls refused because their source failed too often
    calls_per_source: int = 0  # calls refused over limits.calls_per_source
    calls_total: int = 0  # calls refused over limits.calls_total
    streams_replaced: int = 0  # Sync streams ended because the node opened a newer one
    oidc_pending: int = 0  # OIDC logins refused over oidc.max_pending / max_pending_per_source
    oidc_refused: int = 0  # OIDC login steps refused (bad state, CSRF, token, allow-list, user binding)


class TokenBucket:
    """``burst`` tokens, refilled at ``rate`` per second; each event takes one."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.stamp = now

    def _refill(self, now: float) -> None:
        if now > self.stamp:  # a clock stepping back refills nothing
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now

    def take(self, now: float) -> bool:
        self._refill(now)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    def full(self, now: float) -> bool:
        self._refill(now)
        return self.tokens >= self.burst


class Buckets:
    """One :class:`TokenBucket` per key. Full buckets are dropped now and then (a full bucket is what a
    new one would be), so the table holds only keys that were busy recently."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = burst
        self._buckets: dict[Hashable, TokenBucket] = {}
        self._sweep_at = 64

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, key: Hashable, now: float) -> bool:
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self._sweep_at:
                self._buckets = {k: b for k, b in self._buckets.items() if not b.full(now)}
                self._sweep_at = max(64, 2 * len(self._buckets))
            bucket = self._buckets[key] = TokenBucket(self.rate, self.burst, now)
        return bucket.take(now)


@dataclass
class Window:
    """One key's events in one window: all of them by kind, and those beyond the limit by kind."""

    key: str
    start: float
    seen: int = 0
    kinds: dict[str, int] = field(default_factory=dict)
    over: dict[str, int] = field(default_factory=dict)  # events beyond the limit, by kind
    refused: int = 0  # calls refused while this window was over the limit


class Windows:
    """Fixed windows of ``length`` seconds per key, each admitting ``limit`` events. A window closes
    ``length`` after its first event; :meth:`close_due` hands closed windows out once."""

    def __init__(self, length: float, limit: int, max_keys: int = MAX_SOURCES) -> None:
        self.length = length
        self.limit = limit
        self.max_keys = max_keys
        self._open: dict[str, Window] = {}
        self._closing: list[tuple[float, int, str]] = []  # heap of (close time, tie, key)
        self._closed: list[Window] = []  # closed by a later event of the same key, not handed out yet
        self._tie = 0

    def _key(self, key: str) -> str:
        """``key``, or OVERFLOW when the table is full and ``key`` has no window in it."""
        return key if key in self._open or len(self._open) < self.max_keys else OVERFLOW

    def _peek(self, key: str, now: float) -> Window | None:
        """The key's open window; one that ended by ``now`` is moved aside for :meth:`close_due`."""
        key = self._key(key)
        win = self._open.get(key)
        if win is not None and now >= win.start + self.length:
            self._closed.append(self._open.pop(key))
            return None
        return win

    def _window(self, key: str, now: float) -> Window:
        win = self._peek(key, now)
        if win is None:
            key = self._key(key)
            win = self._open[key] = Window(key, now)
            self._tie += 1
            heapq.heappush(self._closing, (now + self.length, self._tie, key))
        return win

    def hit(self, key: str, kind: str, now: float) -> bool:
        """Count one event of ``kind``; True while the window holds at most ``limit`` events."""
        win = self._window(key, now)
        win.seen += 1
        win.kinds[kind] = win.kinds.get(kind, 0) + 1
        if win.seen <= self.limit:
            return True
        win.over[kind] = win.over.get(kind, 0) + 1
        return False

    def full(self, key: str, now: float) -> Window | None:
        """The key's open window when it holds ``limit`` events or more (None otherwise)."""
        win = self._peek(key, now)
        return win if win is not None and win.seen >= self.limit else None

    def close_due(self, now: float) -> list[Window]:
        """Every window closed by ``now``, each once, oldest first."""
        out, self._closed = self._closed, []
        while self._closing and self._closing[0][0] <= now:
            due, _, key = heapq.heappop(self._closing)
            win = self._open.get(key)
            if win is not None and win.start + self.length == due:
                out.append(self._open.pop(key))
        out.sort(key=lambda w: w.start)
        return out

    def next_close(self) -> float | None:
        """When :meth:`close_due` has a window to hand out next (None: no window is open)."""
        if self._closed:
            return self._closed[0].start + self.length  # closed early by a later event: due already
        while self._closing:
            due, _, key = self._closing[0]
            win = self._open.get(key)
            if win is not None and win.start + self.length == due:
                return due
            heapq.heappop(self._closing)  # stale: closed early by a later event of its key
        return None


class Calls:
    """Calls in flight, per source address and in total."""

    def __init__(self, per_source: int, total: int) -> None:
        self.per_source = per_source
        self.total = total
        self.active = 0
        self._by_source: dict[str, int] = {}

    def in_flight(self, source: str) -> int:
        return self._by_source.get(source, 0)

    def enter(self, source: str) -> str | None:
        """Count a call from ``source``; the refusal (which limit) instead when it would pass a limit."""
        if self.active >= self.total:
            return "calls_total"
        count = self._by_source.get(source, 0)
        if count >= self.per_source:
            return "calls_per_source"
        self._by_source[source] = count + 1
        self.active += 1
        return None

    def leave(self, source: str) -> None:
        count = self._by_source.get(source, 0) - 1
        if count > 0:
            self._by_source[source] = count
        else:
            self._by_source.pop(source, None)
        self.active = max(0, self.active - 1)


def source_of(peer: str) -> str | None:
    """The source address a gRPC peer string (``ipv4:1.2.3.4:5``, ``ipv6:[::1]:5``, ``unix:…``) is
    limited as: an IPv4 address, or an IPv6 /64 (an IPv4-mapped address counts as IPv4). None for a unix
    socket (local root); the string itself for any other kind."""
    kind, host = grpc_peer(peer)
    if kind == "unix":
        return None
    if kind not in ("ipv4", "ipv6"):
        return peer
    host = host.partition("%")[0]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return peer
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def open_files_needed(connections: int) -> int:
    """The RLIMIT_NOFILE soft limit ``connections`` accepted TCP connections need."""
    return connections + FD_RESERVE


def open_files_plan(soft: int, hard: int, need: int) -> int | None:
    """The soft limit to set: ``need`` when the current one is lower (never above ``hard``, never lower
    than it is); None when even ``hard`` is below ``need``. ``-1`` (RLIM_INFINITY) means no limit."""
    if soft == -1 or soft >= need:
        return soft
    if hard != -1 and hard < need:
        return None
    return need


@dataclass(frozen=True, slots=True)
class Coalesced:
    """A closed window to be written as one audit row: ``kind`` ``"routes"`` (``key`` a node id in
    decimal, ``counts`` the rows dropped by action) or ``"auth"`` (``key`` a source, ``counts`` the
    failures by method, ``refused`` the calls refused)."""

    kind: str
    key: str
    start: float
    counts: dict[str, int]
    refused: int = 0


class Limits:
    """Every per-node and per-source limit of one server, and its :class:`Refusals`."""

    def __init__(self, cfg: LimitsConfig) -> None:
        self.cfg = cfg
        self.refusals = Refusals()
        self.calls = Calls(cfg.calls_per_source, cfg.calls_total)
        self._reports = Buckets(cfg.status_reports_per_second, cfg.status_report_burst)
        self._route_rows = Windows(WINDOW, cfg.audit_rows_per_node_per_minute)
        self._auth = Windows(WINDOW, cfg.auth_failures_per_minute)

    # -- nodes -----------------------------------------------------------------------------------------

    def check_status_report(self, node_id: int, now: float) -> None:
        """Take one status report of ``node_id``; :class:`ResourceExhausted` (counted) over its rate."""
        if not self._reports.take(node_id, now):
            self.refusals.status_reports += 1
            raise ResourceExhausted(
                f"status reports: more than {self.cfg.status_reports_per_second:g} per second (burst "
                f"{self.cfg.status_report_burst}) from this node; nothing changed, report less often"
            )

    def route_row(self, node_id: int, action: str, now: float) -> bool:
        """Whether to write one route audit row of ``node_id`` now; False: it is counted for the summary
        row written when the node's window closes."""
        if self._route_rows.hit(str(node_id), action, now):
            return True
        self.refusals.audit_rows_coalesced += 1
        return False

    # -- sources ---------------------------------------------------------------------------------------

    def auth_over(self, source: str, now: float) -> float | None:
        """When ``source``'s window of failed authentications closes, if it holds the limit already (its
        next failure is then refused); None otherwise."""
        win = self._auth.full(source, now)
        return None if win is None else win.start + self._auth.length

    def auth_failed(self, source: str, method: str, now: float, *, refused: bool = False) -> None:
        """Count one failed authentication of ``source`` calling ``method``; ``refused``: it was refused
        as over the limit."""
        self.refusals.auth_failures += 1
        self._auth.hit(source, method, now)
        if refused:
            self.refusals.auth_refused += 1
            win = self._auth.full(source, now)
            if win is not None:
                win.refused += 1

    def call_refused(self, which: str) -> None:
        if which == "calls_total":
            self.refusals.calls_total += 1
        else:
            self.refusals.calls_per_source += 1

    # -- coalesced audit rows --------------------------------------------------------------------------

    def closed(self, now: float) -> list[Coalesced]:
        """Windows closed by ``now`` that need an audit row: a node's route rows beyond the limit, every
        source's failed authentications."""
        out = [
            Coalesced("routes", w.key, w.start, dict(w.over))
            for w in self._route_rows.close_due(now)
            if w.over
        ]
        out += [
            Coalesced("auth", w.key, w.start, dict(w.kinds), w.refused) for w in self._auth.close_due(now)
        ]
        return out

    def next_deadline(self) -> float | None:
        dues = [d for d in (self._route_rows.next_close(), self._auth.next_close()) if d is not None]
        return min(dues) if dues else None
