"""Birthday probing, pure: when and how an easy-NAT node and a hard-NAT node open a direct path.

A hard NAT (symmetric, RFC 4787 §4.1 "address and port-dependent mapping") gives every destination a new
random public port, so the peer-reflexive candidate the ordinary checks rely on never reaches the other
side: the port the hard side's router picked for the easy side is one the easy side cannot know, and the
easy side's router drops the hard side's checks because it never sent to that port (its filtering is
address and port-dependent, RFC 4787 §5). Tailscale's magicsock breaks this with the birthday paradox
("How NAT traversal works", the "birthday paradox" section; magicsock's hard-NAT port spraying); so
does this module, with the roles fixed by which side has which NAT:

* the hard side H *listens*: it opens ``sockets`` (K = 256) UDP probe sockets and sends one probe from
  each to the easy side's candidates, so its router creates K mappings (K random public ports) that
  accept packets from the easy side's endpoint, and only from it;
* the easy side E *sprays*: ``probes`` (M = 1024) probes from WireGuard's own port (the shared raw socket,
  so E's router uses the mapping WireGuard uses) to random ports of H's public address, at ``rate``
  packets per second (400: the whole spray takes ~2.6 s, a home router's conntrack table absorbs it).

One probe landing on one of the K ports opens a working 5-tuple: E's WireGuard endpoint <-> H's public
port P, which H's router maps to the probe socket's local port L. With the public ports drawn from the
64512 ports above 1023, P(hit) ~= 1 - (1 - K/64512)^M (the sprayed ports are distinct, which helps a
little; ``hit_probability`` computes it exactly): 98.3 % for K=256, M=1024 (64 % for M=256, 87 % for
M=512). A round that misses is repeated (``max_rounds`` = 3 in all: 99.9995 %), then the pair stays
relayed. The relay carries the traffic the whole time: probing only ever
upgrades a path.

What this core decides, per peer, from the time, whether the peer is direct, its map candidates and our
own NAT's mapping behaviour (netcheck): the role (:func:`role_for`), when a round starts (``start_after``
seconds without a direct path, then every ``round_period``), when the hard side's sockets close
(``window``), which probes the easy side sends now (paced at ``rate``), and what a probe that arrived at
one of the sockets means (:meth:`Birthday.hit`: a :class:`UseRoute`, the route H installs so WireGuard's
packets to E leave with source port L, see :mod:`ghostlink.traversal.birthday`). The edge owns the
sockets, the clock and the nftables table. Everything is bounded: at most ``parallel`` (4) peers in a
round at once and ``max_sockets`` (512) probe sockets in all, M probes per spraying round at ``rate``
each, ``max_rounds`` rounds per peer, at most ``MAX_ROUTES`` routes.

Who is which side. A node knows its own NAT (netcheck's mapping: endpoint-independent or varies by
destination). It reads the peer's from its map candidates, which list the host endpoints first (on the
WireGuard listen port), then the STUN-discovered one, then a port mapping: a peer whose other candidates
are on another port than its first one sits behind a NAT that remapped WireGuard's port (a hard NAT,
or a port-remapping easy one); a peer with two addresses on one port sits behind an easy NAT. So:
we are endpoint-independent and the peer remapped -> spray its remapped addresses; our mapping varies
and the peer has two addresses on one port -> listen toward them; anything else (hard <-> hard, a peer
with one address, no netcheck yet) -> no probing: no chance, and nothing sent. A port-remapping easy peer
(carrier NAT) is taken for hard by the sprayer; since the hard side does not listen toward it, nothing
hits and the rounds end as misses (bounded traffic; the pair is direct through the ordinary checks anyway).

Probes are authenticated (:func:`probe` / :func:`verify`): ``magic | sender key | nonce | tag``, the tag
a truncated HMAC-SHA256 (RFC 2104) keyed from the pair's X25519 shared secret (RFC 7748 §6.1, through
HKDF, RFC 5869), which only the two peers can compute. The hard side takes a hit only when the tag checks
out *and* the packet came from a candidate it probed toward: no one else can make it route WireGuard
elsewhere.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ghostcore.addr import HostPort

MAGIC = b"GLbd"
KEY_LEN = 32
NONCE_LEN = 8
TAG_LEN = 16
PROBE_LEN = len(MAGIC) + KEY_LEN + NONCE_LEN + TAG_LEN
PORTS = (1024, 65535)  # where NATs put mappings of unprivileged ports (Linux: 1024-65535)
MAX_TARGETS = 4  # candidates of one peer a hard side probes toward (each from every socket)
MAX_ROUTES = 64  # ports routed for WireGuard at once (one per peer that went direct this way)

SPRAY = "spray"
LISTEN = "listen"

ENDPOINT_INDEPENDENT = "endpoint-independent"
VARIES = "varies-by-destination"


def hit_probability(sockets: int, probes: int, ports: int = PORTS[1] - PORTS[0] + 1) -> float:
    """P(at least one of ``probes`` distinct random ports is one of ``sockets`` open ones)."""
    if sockets > 0 and probes > ports - sockets:
        return 1.0  # more probes than closed ports: one lands on an open one
    return 1.0 - math.prod((ports - sockets - i) / (ports - i) for i in range(probes))


def probe_key(shared_secret: bytes) -> bytes:
    """The pair's probe key from their X25519 shared secret (RFC 5869 HKDF-SHA256)."""
    return HKDF(hashes.SHA256(), KEY_LEN, None, b"ghostlink birthday probe v1").derive(shared_secret)


def probe(key: bytes, sender: bytes, nonce: bytes | None = None) -> bytes:
    """One probe from the peer whose raw public key is ``sender``."""
    if len(sender) != KEY_LEN:
        raise ValueError("sender must be a 32-byte public key")
    nonce = os.urandom(NONCE_LEN) if nonce is None else nonce
    head = MAGIC + sender + nonce
    return head + hmac.new(key, head, hashlib.sha256).digest()[:TAG_LEN]


def probe_sender(data: bytes) -> bytes | None:
    """The claimed sender of a probe-shaped datagram (not verified), or None."""
    if len(data) != PROBE_LEN or not data.startswith(MAGIC):
        return None
    return data[len(MAGIC) : len(MAGIC) + KEY_LEN]


def verify(data: bytes, keys: Mapping[bytes, bytes]) -> bytes | None:
    """The sender of a genuine probe (``keys``: sender raw key -> probe key), or None."""
    sender = probe_sender(data)
    key = keys.get(sender) if sender is not None else None
    if sender is None or key is None:
        return None
    head = data[:-TAG_LEN]
    good = hmac.new(key, head, hashlib.sha256).digest()[:TAG_LEN]
    return sender if hmac.compare_digest(good, data[-TAG_LEN:]) else None


def role_for(own_mapping: str, candidates: Iterable[HostPort]) -> tuple[str, tuple[HostPort, ...]] | None:
    """(our role, where to probe) with a peer whose IPv4 ``candidates`` are in map order, or None.

    SPRAY: the targets are the peer's remapped candidates (their addresses are sprayed). LISTEN: the
    targets are the peer's candidates (our probe sockets send to them; hits only count from them).
    """
    cands = [c for c in candidates if ":" not in c[0]][: MAX_TARGETS + 1]
    if len(cands) < 2:
        return None
    listen_port = cands[0][1]
    remapped = tuple(c for c in cands if c[1] != listen_port)
    if own_mapping == ENDPOINT_INDEPENDENT and remapped:
        return SPRAY, remapped[:MAX_TARGETS]
    if own_mapping == VARIES and not remapped and len({ip for ip, _ in cands}) >= 2:
        return LISTEN, tuple(cands[:MAX_TARGETS])
    return None


@dataclass(frozen=True)
class OpenProbes:
    """Open ``count`` probe sockets for ``key`` and send one probe from each to every target."""

    key: str
    targets: tuple[HostPort, ...]
    count: int


@dataclass(frozen=True)
class CloseProbes:
    """Close ``key``'s probe sockets (the round ended, or it hit)."""

    key: str


@dataclass(frozen=True)
class Spray:
    """Send one probe from WireGuard's port to each of ``dsts`` now."""

    key: str
    dsts: tuple[HostPort, ...]


@dataclass(frozen=True)
class UseRoute:
    """WireGuard's packets to ``remote`` must leave from ``local_port``."""

    key: str
    local_port: int
    remote: HostPort


@dataclass(frozen=True)
class DropRoute:
    """The route of ``key`` is not wanted any more (the path went, or never came)."""

    key: str


Action = OpenProbes | CloseProbes | Spray | UseRoute | DropRoute


@dataclass
class _Peer:
    candidates: tuple[HostPort, ...] = ()
    direct: bool = False
    since: float = 0.0  # not direct since (first seen, or the direct path's loss)
    rounds: int = 0
    round_end: float = 0.0  # the current round's end (0.0: none running)
    role: str = ""
    targets: tuple[HostPort, ...] = ()
    spray: list[HostPort] = field(default_factory=list)
    spray_start: float = 0.0
    sprayed: int = 0
    route: UseRoute | None = None
    route_since: float = 0.0


class Birthday:
    """Birthday probing toward every peer of one node; keys are the peers' base64 node keys.

    Rounds are slots on a schedule both sides compute alike from the moment the peer was last not
    direct (it appeared in the map, or its direct path died): slot ``r`` opens at ``since + start_after
    + r * round_period``. A round that cannot start within ``slack`` of its slot (too many rounds
    running here) skips it rather than start late, so the two sides' rounds stay together. The two
    sides see that moment at slightly different times (a map reaches them apart; a dead path is
    noticed ~2 s after it died, a restarted peer sees us when it is back), so a listening round lasts
    the whole ``window`` = ``round_period``: the rounds run back to back, sockets open from the first
    slot to the last, and a spray a few seconds off its listener's schedule still lands in a round. At most
    ``parallel`` peers are in a round at once, and listening rounds hold at most ``max_sockets``
    sockets in all (a process's descriptors are bounded too).
    """

    def __init__(
        self,
        *,
        rng: random.Random | None = None,
        sockets: int = 256,
        probes: int = 1024,
        rate: float = 400.0,
        start_after: float = 3.0,
        spray_delay: float = 2.0,
        window: float = 15.0,
        round_period: float = 15.0,
        slack: float = 2.0,
        max_rounds: int = 3,
        parallel: int = 4,
        max_sockets: int = 512,
        confirm_within: float = 5.0,
    ) -> None:
        self._rng = rng or random.SystemRandom()
        self.sockets = sockets
        self.probes = probes
        self.rate = rate
        self.start_after = start_after
        self.spray_delay = spray_delay  # the listening side opens its sockets first
        self.window = window
        self.round_period = round_period
        self.slack = slack
        self.max_rounds = max_rounds
        self.parallel = parallel
        self.max_sockets = max_sockets
        self.confirm_within = confirm_within  # a route whose path is not direct by then is dropped
        self.mapping = ""  # our NAT's mapping behaviour, from netcheck ("" until known)
        self._peers: dict[str, _Peer] = {}

    def set_peer(self, key: str, candidates: Iterable[HostPort], now: float) -> None:
        """The peer's map candidates (in map order; none for an offline peer)."""
        peer = self._peers.get(key)
        if peer is None:
            peer = self._peers[key] = _Peer(since=now)
        cands = tuple(candidates)
        if cands and not peer.candidates and not peer.direct:
            # It came online: its schedule starts now, as the peer's own does with its first map of us.
            peer.since, peer.rounds = now, 0
        peer.candidates = cands

    def remove_peer(self, key: str) -> list[Action]:
        peer = self._peers.pop(key, None)
        if peer is None:
            return []
        out = self._end_round(key, peer)
        if peer.route is not None:
            out.append(DropRoute(key))
        return out

    def set_direct(self, key: str, direct: bool, now: float) -> list[Action]:
        """Whether the path manager has a direct path to the peer now."""
        peer = self._peers.get(key)
        if peer is None or direct == peer.direct:
            return []
        peer.direct = direct
        out: list[Action] = []
        if direct:
            out += self._end_round(key, peer)
        else:  # a new schedule of rounds from now on
            peer.since, peer.rounds = now, 0
            if peer.route is not None:  # the routed path died: its NAT mapping is likely gone too
                peer.route = None
                out.append(DropRoute(key))
        return out

    def routes(self) -> list[UseRoute]:
        return [p.route for p in self._peers.values() if p.route is not None]

    def listening(self, key: str) -> tuple[HostPort, ...]:
        """Where ``key``'s probe sockets may be hit from (empty: not listening)."""
        peer = self._peers.get(key)
        return peer.targets if peer is not None and peer.role == LISTEN and peer.round_end else ()

    def hit(self, key: str, local_port: int, src: HostPort, now: float) -> list[Action]:
        """A genuine probe from ``key`` arrived from ``src`` at the probe socket on ``local_port``."""
        peer = self._peers.get(key)
        if peer is None or src not in self.listening(key) or not 0 < local_port < 65536:
            return []
        out = self._end_round(key, peer)
        if len(self.routes()) >= MAX_ROUTES:
            return out
        peer.route = UseRoute(key, local_port, src)
        peer.route_since = now
        out.append(peer.route)
        return out

    def poll(self, now: float) -> list[Action]:
        """What to do now: rounds to start or end, probes due, routes that did not deliver."""
        out: list[Action] = []
        for key, peer in self._peers.items():
            if peer.route is not None and not peer.direct and now - peer.route_since >= self.confirm_within:
                peer.route = None
                out.append(DropRoute(key))
            if peer.round_end and now >= peer.round_end:
                out += self._end_round(key, peer)
        out += self._start_rounds(now)
        for key, peer in self._peers.items():
            if peer.role != SPRAY or now < peer.spray_start:
                continue
            due = min(len(peer.spray), math.floor((now - peer.spray_start) * self.rate) + 1 - peer.sprayed)
            if due > 0:
                batch, peer.spray = peer.spray[:due], peer.spray[due:]
                peer.sprayed += due
                out.append(Spray(key, tuple(batch)))
        return out

    def _slot_start(self, peer: _Peer, r: int) -> float:
        return peer.since + self.start_after + r * self.round_period

    def _open_slot(self, peer: _Peer, now: float) -> int | None:
        """The slot of a round the peer may start now, if any."""
        if peer.direct or peer.route is not None or peer.round_end:
            return None
        r = math.floor((now - peer.since - self.start_after) / self.round_period)
        if r < peer.rounds or r >= self.max_rounds or now - self._slot_start(peer, r) > self.slack:
            return None
        return r

    def _start_rounds(self, now: float) -> list[Action]:
        out: list[Action] = []
        for key, peer in self._peers.items():
            running = [p for p in self._peers.values() if p.round_end]
            if len(running) >= self.parallel:
                break
            r = self._open_slot(peer, now)
            role = role_for(self.mapping, peer.candidates) if r is not None else None
            if r is None or role is None:
                continue
            listening = sum(1 for p in running if p.role == LISTEN)
            if role[0] == LISTEN and (listening + 1) * self.sockets > self.max_sockets:
                continue
            peer.role, peer.targets = role
            peer.rounds = r + 1
            peer.round_end = now + self.window
            if peer.role == LISTEN:
                out.append(OpenProbes(key, peer.targets, self.sockets))
                continue
            ports = self._rng.sample(range(PORTS[0], PORTS[1] + 1), self.probes)
            ips = [ip for ip, _ in peer.targets]
            peer.spray = [(ips[i % len(ips)], port) for i, port in enumerate(ports)]
            peer.spray_start = now + self.spray_delay
            peer.sprayed = 0
        return out

    def _end_round(self, key: str, peer: _Peer) -> list[Action]:
        if not peer.round_end:
            return []
        was = peer.role
        peer.round_end = 0.0
        peer.role, peer.targets, peer.spray = "", (), []
        return [CloseProbes(key)] if was == LISTEN else []

    def next_due(self, now: float) -> float | None:
        """When :meth:`poll` has something to do next (None: nothing planned)."""
        times: list[float] = []
        for peer in self._peers.values():
            if peer.round_end:
                times.append(peer.round_end)
                if peer.role == SPRAY and peer.spray:
                    times.append(max(peer.spray_start, now + 1.0 / self.rate))
            if peer.route is not None and not peer.direct:
                times.append(peer.route_since + self.confirm_within)
            if peer.direct or peer.route is not None or peer.round_end:
                continue
            if role_for(self.mapping, peer.candidates) is None:
                continue  # a new map or netcheck comes with a poll of its own
            r = max(peer.rounds, math.ceil((now - peer.since - self.start_after) / self.round_period))
            if r < self.max_rounds:
                times.append(self._slot_start(peer, r))
        return min(times) if times else None
