"""Per-peer path choice, pure: which candidate (if any) WireGuard should send to directly.

The state machine behind "relay first, then direct; back to the relay when the direct path dies; direct
again when it returns" (NetBird's peer connection priority, Tailscale's magicsock endpoint choice), without
I/O: the caller (:mod:`ghostlink.traversal.edge`) sends the connectivity checks this module asks for, feeds
back their results and the current time, and points WireGuard at :meth:`PathManager.direct` (or at the
relay proxy when it is None). No sockets, no clock of its own. :class:`PeerPath` is how a peer's path is
shown (``ghostctl peers``).

Candidates (ICE's vocabulary, RFC 8445 §5.1.1) come from the peer's map record (its host endpoints and the
server-reflexive one it discovered with STUN) and from checks the peer sent us (peer-reflexive, §7.3.1.3:
the address a symmetric NAT picked for the peer's packets to us — the only way a host behind a hard NAT
can be reached directly, by the one who is not behind one) and from a port mapping the peer's router
granted (PCP, NAT-PMP or UPnP IGD: a public endpoint that accepts anyone, which the peer reports like
the others). IPv4 and IPv6 candidates are checked alike, only in the families this node can send in
(``families``: the shared port's raw sockets), so two hosts with public IPv6 addresses go direct even
when both sit behind IPv4 NATs that no check gets through.

A candidate's port need not be the peer's WireGuard port: a NAT that had to remap it (two nodes behind
one router, both on 41641; a carrier NAT) reports another public port, and checks from the peer may
come from a port its map record does not name yet. Such a candidate stays what it is until checks stop
coming from it: one the map drops while the peer's checks still arrive from it is kept as a learned one.

Timing (why these numbers): a direct path is re-checked every ``keep_interval`` (0.5 s) and declared dead
after ``dead_after`` (2 s) without an answer, so traffic is back on the relay within ~2.5 s of a cut (the
failover budget is 3 s). Candidates that do not answer are re-checked with exponential backoff from
``probe_interval`` up to ``probe_max`` (8 s): an idle mesh of N peers costs at most a few checks per second,
and a path that returns is found within ``probe_max``, sooner when the peer's own check arrives (learning
resets the backoff). One successful check makes a candidate direct; the lowest-RTT answering candidate wins
when several answer, with a 2x hysteresis so two similar paths do not flap.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field

from ghostcore.addr import AddressError, HostPort, parse_endpoint, parse_ip

MAX_LEARNED = 8  # peer-reflexive candidates kept per peer (a NAT gives a peer one per path to us)


def parse_candidate(text: str, families: Collection[int] = (4, 6)) -> HostPort | None:
    """``"ip:port"`` / ``"[ip6]:port"`` -> (ip, port) when its IP version is in ``families``; None for
    another family or anything malformed."""
    try:
        host, port = parse_endpoint(text, "candidate")
    except AddressError:
        return None
    return (host, port) if parse_ip(host).version in families else None


@dataclass(frozen=True)
class PeerPath:
    """The path a peer's packets take now: ``kind`` "direct", "relay", "turn" or "" (none yet); ``relay``
    the relay region's name; ``latency_ms`` of a direct path its last check's round trip, of a relayed one
    our round trip to that relay (the part this node can measure), -1 when unknown."""

    kind: str = ""
    relay: str = ""
    latency_ms: float = -1.0


@dataclass
class _Cand:
    addr: HostPort
    learned: bool  # peer-reflexive (from a check the peer sent), not from the map
    heard: bool = False  # the peer's checks came from it (kept if the map drops it)
    next_check: float = 0.0
    backoff: float = 0.0
    in_flight: bool = False
    again: bool = False  # re-check as soon as the check in flight returns (a route just opened)
    last_ok: float = -math.inf
    rtt: float | None = None


@dataclass
class _Peer:
    cands: dict[HostPort, _Cand] = field(default_factory=dict)
    direct: HostPort | None = None


class PathManager:
    """Path state for every peer; keys are the peers' base64 node keys."""

    def __init__(
        self,
        *,
        keep_interval: float = 0.5,
        dead_after: float = 2.0,
        probe_interval: float = 1.0,
        probe_max: float = 8.0,
        enabled: bool = True,
    ) -> None:
        self.keep_interval = keep_interval
        self.dead_after = dead_after
        self.probe_interval = probe_interval
        self.probe_max = probe_max
        self.enabled = enabled  # "ice" in the map's fallback list: without it, never direct
        self.families: frozenset[int] = frozenset({4, 6})  # IP versions we can send checks in
        self._peers: dict[str, _Peer] = {}

    def set_peer(self, key: str, candidates: Iterable[str], now: float) -> bool:
        """The peer's candidates from the map (replacing earlier map ones; learned ones stay).
        True when the direct choice changed (the direct candidate is gone from the map)."""
        peer = self._peers.setdefault(key, _Peer())
        wanted = {a for a in (parse_candidate(c, self.families) for c in candidates) if a is not None}
        for addr in list(peer.cands):
            cand = peer.cands[addr]
            if addr in wanted or cand.learned:
                continue
            if cand.heard:
                cand.learned = True  # the peer still checks us from there: a peer-reflexive candidate now
            else:
                del peer.cands[addr]
        for addr in wanted:
            if addr not in peer.cands:
                peer.cands[addr] = _Cand(addr, learned=False, next_check=now)
            else:
                peer.cands[addr].learned = False
        if peer.direct is not None and peer.direct not in peer.cands:
            peer.direct = None
            return True
        return False

    def remove_peer(self, key: str) -> None:
        self._peers.pop(key, None)

    def peers(self) -> list[str]:
        return list(self._peers)

    def learn(self, key: str, addr: HostPort, now: float) -> None:
        """The peer checked us from ``addr``: a peer-reflexive candidate, to be checked at once."""
        peer = self._peers.get(key)
        if peer is None:
            return  # not a peer of ours (the map hides it, or it is gone)
        cand = peer.cands.get(addr)
        if cand is None:
            # Anyone who knows a peer's (public) key can send checks in its name: keep a few learned
            # candidates per peer, dropping the oldest one that is not the direct path.
            learned = [a for a, c in peer.cands.items() if c.learned and a != peer.direct]
            if len(learned) >= MAX_LEARNED:
                del peer.cands[learned[0]]
            cand = peer.cands[addr] = _Cand(addr, learned=True)
        cand.heard = True
        if not cand.in_flight:
            cand.next_check = now
            cand.backoff = 0.0

    def check_soon(self, key: str, addr: HostPort, now: float) -> None:
        """Check the peer's candidate ``addr`` at once (a route toward it just opened); else nothing."""
        peer = self._peers.get(key)
        cand = peer.cands.get(addr) if peer is not None else None
        if cand is None:
            return
        cand.backoff = 0.0
        if cand.in_flight:
            cand.again = True  # the check in flight may have left before the route opened
        else:
            cand.next_check = now

    def due(self, now: float) -> list[tuple[str, HostPort]]:
        """Checks to send now; each is in flight until its :meth:`result`."""
        if not self.enabled:
            return []
        out: list[tuple[str, HostPort]] = []
        for key, peer in self._peers.items():
            for cand in peer.cands.values():
                if not cand.in_flight and cand.next_check <= now:
                    cand.in_flight = True
                    out.append((key, cand.addr))
        return out

    def result(self, key: str, addr: HostPort, rtt: float | None, now: float) -> bool:
        """A check's outcome (``rtt`` None: no answer). True when the peer's direct choice changed."""
        peer = self._peers.get(key)
        cand = peer.cands.get(addr) if peer is not None else None
        if peer is None or cand is None:
            return False
        cand.in_flight = False
        if rtt is None:
            cand.backoff = min(self.probe_max, max(self.probe_interval, cand.backoff * 2))
            cand.next_check = now + (self.keep_interval if addr == peer.direct else cand.backoff)
            if cand.again:
                cand.next_check, cand.again = now, False
            return self._expire(peer, now)
        cand.again = False
        cand.last_ok, cand.rtt, cand.backoff = now, rtt, 0.0
        if addr == peer.direct:
            cand.next_check = now + self.keep_interval
        else:  # a working spare: re-checked rarely while another path is direct
            cand.next_check = now + (self.probe_interval if peer.direct is None else self.probe_max)
        current = peer.cands.get(peer.direct) if peer.direct is not None else None
        if current is None or (current.rtt is not None and rtt * 2 < current.rtt):
            peer.direct = addr
            cand.next_check = now + self.keep_interval
            return True
        return False

    def tick(self, now: float) -> list[str]:
        """Peers whose direct path just died (no answer for ``dead_after``): they go back to the relay."""
        return [key for key, peer in self._peers.items() if self._expire(peer, now)]

    def _expire(self, peer: _Peer, now: float) -> bool:
        if peer.direct is None:
            return False
        cand = peer.cands.get(peer.direct)
        if cand is not None and now - cand.last_ok < self.dead_after:
            return False
        peer.direct = None
        if cand is not None:
            cand.backoff = self.probe_interval
            cand.next_check = max(cand.next_check, now + self.probe_interval)
        return True

    def direct(self, key: str) -> HostPort | None:
        peer = self._peers.get(key)
        return peer.direct if peer is not None else None

    def latency(self, key: str) -> float | None:
        """RTT (seconds) of the last answered check on the direct path, or of the best candidate."""
        peer = self._peers.get(key)
        if peer is None:
            return None
        if peer.direct is not None:
            return peer.cands[peer.direct].rtt
        rtts = [c.rtt for c in peer.cands.values() if c.rtt is not None]
        return min(rtts) if rtts else None

    def next_due(self) -> float | None:
        """The earliest time a check or an expiry may be due (for the caller's timer)."""
        times = [c.next_check for p in self._peers.values() for c in p.cands.values() if not c.in_flight]
        times += [
            p.cands[p.direct].last_ok + self.dead_after
            for p in self._peers.values()
            if p.direct is not None and p.direct in p.cands
        ]
        return min(times) if times else None
