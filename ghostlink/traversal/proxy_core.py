"""The relay proxy's routing, sans-IO: which way each relayed peer's packets go; packets and ``now`` in,
actions out.

The edge (:mod:`ghostlink.traversal.proxy`) owns the sockets, the relay connections and the TURN allocation;
it tells :class:`ProxyCore` what happened (a packet from WireGuard for a peer, a packet from a relay or from
TURN, a relay's liveness or RTT, the allocation coming or going, a PEER_GONE, the map's routes) and carries
out what the core returns: :class:`ToRelay`, :class:`ToTurn` and :class:`ToWireGuard` (a packet to send),
:class:`TurnBinding` (bind a channel to a peer's TURN address, or stop refreshing it), :class:`HomeChanged`
and :class:`TurnChanged` (what this node reports changed). Retries are timers: the edge calls
:meth:`ProxyCore.timer` at :meth:`ProxyCore.next_timer`.

Routing (:func:`pick_route`): the relay of the peer's home region, or any live one (our home first) when
that one is down or unknown; else our TURN allocation to the peer's TURN relayed address, when no relay
connection can be used and both nodes hold an allocation (e.g. a coturn-only region map); else, while
nothing is connected yet, a small per-peer buffer (``MAX_BUFFERED`` packets) flushed the moment a path
comes up, so the first WireGuard handshake does not wait 5 s for WireGuard's retry. Packets from a source
that is no peer are dropped and counted.

First contact (why two small holds): WireGuard retries a lost handshake initiation only after 5 s
(REKEY_TIMEOUT, whitepaper §6.4), so losing the first one costs a new peer 5 s. Two races lose it: the peer
has not connected to the relay yet (the relay drops the packet and answers PEER_GONE, at most once a
second per destination), or its map does not name us yet (it would drop our packet as from an unknown
key). So the last handshake messages to each peer (WireGuard message types 1 and 2, known by type and
size) are kept and re-sent every ``RETRY_INTERVAL`` from the moment one is sent until the peer answers, at
most ``HOLD_SECONDS`` (again after a PEER_GONE). An answer is what shows a session: a handshake
response, a cookie reply or transport data from the peer (types 2, 3, 4). The peer's own initiation is
none (our response to it may be the message lost: two nodes joining at once cross their initiations, and
the relay's PEER_GONE for the second loss within a second is not sent); it only replaces our kept
initiation, which WireGuard no longer waits on. Handshake messages from a key that is not a peer yet are
held for ``HOLD_SECONDS`` and delivered by :meth:`ProxyCore.deliver_held` once the daemon has added that
peer to WireGuard.

Home region (:func:`pick_home`): the live region with the lowest RTT, sticky: it changes only when the
home dies or another region is more than ``HOME_MIN_GAIN_MS`` better *and* less than half the home's RTT,
so two similar relays do not make the node flap between homes (each flap is a map change for every peer).

``counters`` (the routing ones; the edge counts what the sockets did): buffered, drop_buffer_full (no path
yet, the oldest buffered packet went), drop_unknown_key / drop_unknown_turn (a source that is no peer of
ours), from_relay / from_turn (packets for WireGuard), held_unknown (a handshake from a key that is no peer
yet, kept), handshake_retries.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Mapping
from dataclasses import dataclass, field

from ghostcore.addr import AddressError, HostPort, parse_endpoint

MAX_BUFFERED = 32
HOLD_SECONDS = 5.0  # WireGuard's REKEY_TIMEOUT: after that it retries by itself
RETRY_INTERVAL = 0.5
MAX_HELD_KEYS = 256  # handshakes from unknown keys kept at most (a flood cannot grow it)
# WireGuard's messages (whitepaper §5.4): the type is the first byte (a little-endian u32), and each handshake
# message has one size: initiation 148 bytes, response 92, cookie reply 64; transport data is 32 or more.
INITIATION, RESPONSE, COOKIE_REPLY, TRANSPORT = 1, 2, 3, 4
_SIZES = {INITIATION: 148, RESPONSE: 92, COOKIE_REPLY: 64}
MIN_TRANSPORT = 32
HOME_MIN_GAIN_MS = 20.0
HOME_MIN_RATIO = 2.0


def turn_address(text: str) -> HostPort | None:
    """A TURN relayed address as the map carries it (``ip:port`` / ``[ip6]:port``); None when there is none
    or it is malformed (a peer without a usable allocation)."""
    try:
        return parse_endpoint(text, "TURN relayed address")
    except AddressError:
        return None


def pick_home(current: int, live_rtts: Mapping[int, float]) -> int:
    """The home region given the live regions' RTTs (ms, < 0 unknown); 0 when none is live. Sticky."""
    known = {rid: rtt for rid, rtt in live_rtts.items() if rtt >= 0}
    if not live_rtts:
        return 0
    if current in live_rtts:
        home_rtt = live_rtts[current]
        if home_rtt < 0 or not known:
            return current
        best = min(known, key=lambda r: (known[r], r))
        gain = home_rtt - known[best]
        if best != current and gain > HOME_MIN_GAIN_MS and known[best] * HOME_MIN_RATIO < home_rtt:
            return best
        return current
    if known:
        return min(known, key=lambda r: (known[r], r))
    return min(live_rtts)


def pick_relay(peer_home: int, our_home: int, live_rtts: Mapping[int, float]) -> int:
    """Which live relay region carries packets to a peer homed at ``peer_home``; 0 when none is live."""
    if peer_home in live_rtts:
        return peer_home
    if our_home in live_rtts:
        return our_home
    if not live_rtts:
        return 0
    return min(live_rtts, key=lambda r: (live_rtts[r] if live_rtts[r] >= 0 else float("inf"), r))


def pick_route(
    peer_home: int, our_home: int, live_rtts: Mapping[int, float], our_turn: bool, peer_turn: str
) -> tuple[str, int]:
    """("relay", region id) | ("turn", 0) | ("", 0): relay first, TURN when no relay is usable."""
    rid = pick_relay(peer_home, our_home, live_rtts)
    if rid:
        return "relay", rid
    if our_turn and turn_address(peer_turn) is not None:
        return "turn", 0
    return "", 0


@dataclass(frozen=True)
class RelayStatus:
    """What this node reports about its relays: the home region (0: none), how it is reached ("quic",
    "tcp", "" when none), and the TURN relayed address of its allocation ("" none)."""

    home_region: int = 0
    home_transport: str = ""
    turn_relay: str = ""


@dataclass(frozen=True, slots=True)
class ToRelay:
    """Send ``packet`` to node key ``dst`` over the connection to relay region ``region``."""

    region: int
    dst: bytes
    packet: bytes


@dataclass(frozen=True, slots=True)
class ToTurn:
    """Send ``packet`` through our TURN allocation to the peer's relayed address ``peer``."""

    peer: HostPort
    packet: bytes


@dataclass(frozen=True, slots=True)
class ToWireGuard:
    """Hand ``packet`` to WireGuard from the local socket of peer ``src`` (its endpoint for that peer)."""

    src: bytes
    packet: bytes


@dataclass(frozen=True, slots=True)
class TurnBinding:
    """Bind a TURN channel to ``peer`` and keep it bound (``keep``), or stop refreshing it."""

    peer: HostPort
    keep: bool


@dataclass(frozen=True, slots=True)
class HomeChanged:
    """The home region moved from ``old`` to ``new`` (0: none): peers must learn it (a status report)."""

    old: int
    new: int


@dataclass(frozen=True, slots=True)
class TurnChanged:
    """Our TURN relayed address is now ``relayed`` ("" none): peers must learn it (a status report)."""

    relayed: str


Action = ToRelay | ToTurn | ToWireGuard | TurnBinding | HomeChanged | TurnChanged


@dataclass
class _Peer:
    key: bytes
    home: int = 0
    turn_relay: str = ""
    turn_addr: HostPort | None = None
    buffered: deque[bytes] = field(default_factory=lambda: deque(maxlen=MAX_BUFFERED))
    handshakes: deque[bytes] = field(default_factory=lambda: deque(maxlen=2))  # last sent, for retries
    retry_until: float = 0.0  # re-send ``handshakes`` until then, unless the peer answers first
    next_retry: float | None = None


def is_handshake(packet: bytes) -> bool:
    """A WireGuard handshake initiation or response (what first contact keeps and re-sends)."""
    return bool(packet) and packet[0] in (INITIATION, RESPONSE) and len(packet) == _SIZES[packet[0]]


def _is_answer(packet: bytes) -> bool:
    """From a peer: a response, a cookie reply or transport data, each only sent to one who reached it."""
    if not packet:
        return False
    if packet[0] == TRANSPORT:
        return len(packet) >= MIN_TRANSPORT
    return packet[0] in (RESPONSE, COOKIE_REPLY) and len(packet) == _SIZES[packet[0]]


class ProxyCore:
    """The relayed peers, the home region and the TURN allocation's state; see the module docstring.

    Peers are keyed by their raw 32-byte node keys. Times are the edge's monotonic clock, in seconds.
    """

    def __init__(self) -> None:
        self.counters: Counter[str] = Counter()
        self.home_region = 0
        self.turn_relay = ""  # our allocation's relayed address; "" while we hold none
        self._turn_alive = False  # the allocation can carry packets (it may be lost before it is replaced)
        self._live: dict[int, float] = {}  # live relay regions -> RTT ms (< 0 unknown)
        self._peers: dict[bytes, _Peer] = {}
        self._by_turn: dict[HostPort, bytes] = {}
        self._held: dict[bytes, tuple[float, bytes]] = {}  # unknown key -> (when, its last handshake)

    # ----- relays and TURN, as the edge sees them

    def relays(self, live_rtts: Mapping[int, float]) -> list[Action]:
        """The live relay regions and their RTTs now (after any connect, loss or RTT sample)."""
        self._live = dict(live_rtts)
        out: list[Action] = []
        home = pick_home(self.home_region, self._live)
        if home != self.home_region:
            out.append(HomeChanged(self.home_region, home))
            self.home_region = home
        return out + self._flush_all()

    def turn_up(self, relayed: str) -> list[Action]:
        """A new TURN allocation with relayed address ``relayed``: bind every peer's TURN address on it."""
        self._turn_alive = True
        out: list[Action] = [TurnBinding(p.turn_addr, True) for p in self._peers.values() if p.turn_addr]
        if relayed != self.turn_relay:
            self.turn_relay = relayed
            out.append(TurnChanged(relayed))
        return out + self._flush_all()

    def turn_lost(self) -> None:
        """The allocation stopped working (a failed Refresh): no packet goes to TURN until the next one."""
        self._turn_alive = False

    def turn_down(self) -> list[Action]:
        """The allocation is released."""
        self._turn_alive = False
        if not self.turn_relay:
            return []
        self.turn_relay = ""
        return [TurnChanged("")]

    # ----- peers

    def add_peer(self, key: bytes) -> None:
        """Know ``key`` as a peer (its route comes with :meth:`set_route`); no-op when known."""
        self._peer(key)

    def set_route(self, key: bytes, home_region: int, turn_relay: str) -> list[Action]:
        """The peer's home region and TURN relayed address, as the map says."""
        p = self._peer(key)
        p.home = home_region
        out: list[Action] = []
        if turn_relay != p.turn_relay:
            if p.turn_addr is not None:
                self._by_turn.pop(p.turn_addr, None)
                if self.turn_relay:
                    out.append(TurnBinding(p.turn_addr, False))
            p.turn_relay = turn_relay
            p.turn_addr = turn_address(turn_relay)
            if p.turn_addr is not None:
                self._by_turn[p.turn_addr] = key
                if self.turn_relay:
                    out.append(TurnBinding(p.turn_addr, True))
        return out + self._flush(p)

    def remove_peer(self, key: bytes) -> list[Action]:
        p = self._peers.pop(key, None)
        if p is None or p.turn_addr is None:
            return []
        self._by_turn.pop(p.turn_addr, None)
        return [TurnBinding(p.turn_addr, False)] if self.turn_relay else []

    def route(self, key: bytes) -> tuple[str, int]:
        """("relay", region id) | ("turn", 0) | ("", 0): the way the peer's packets take now."""
        p = self._peers.get(key)
        return self._route(p) if p is not None else ("", 0)

    def _peer(self, key: bytes) -> _Peer:
        p = self._peers.get(key)
        if p is None:
            p = self._peers[key] = _Peer(key)
        return p

    def _route(self, p: _Peer) -> tuple[str, int]:
        return pick_route(p.home, self.home_region, self._live, self._turn_alive, p.turn_relay)

    # ----- packets

    def from_wireguard(self, key: bytes, packet: bytes, now: float) -> ToRelay | ToTurn | None:
        """WireGuard sent ``packet`` to peer ``key``'s local socket: where it goes (None: buffered)."""
        p = self._peers.get(key)
        if p is None:
            return None
        if is_handshake(packet):
            p.handshakes.append(packet)
            self._arm(p, now)
        action = self._send(p, packet)
        if action is None:
            if len(p.buffered) == MAX_BUFFERED:
                self.counters["drop_buffer_full"] += 1
            p.buffered.append(packet)
            self.counters["buffered"] += 1
        return action

    def from_relay(self, src: bytes, packet: bytes, now: float) -> ToWireGuard | None:
        """A relay delivered ``packet`` from node key ``src``."""
        p = self._peers.get(src)
        if p is None:
            self._hold(src, packet, now)
            return None
        if _is_answer(packet):
            p.retry_until, p.next_retry = 0.0, None  # it answers: no more retries
        elif is_handshake(packet) and packet[0] == INITIATION:  # WireGuard answers it; ours is moot
            kept = [h for h in p.handshakes if h[0] != INITIATION]
            p.handshakes.clear()
            p.handshakes.extend(kept)
        self.counters["from_relay"] += 1
        return ToWireGuard(src, packet)

    def from_turn(self, src: HostPort, packet: bytes) -> ToWireGuard | None:
        """Our TURN allocation delivered ``packet`` from relayed address ``src``."""
        key = self._by_turn.get(src)
        if key is None:
            self.counters["drop_unknown_turn"] += 1
            return None
        self.counters["from_turn"] += 1
        return ToWireGuard(key, packet)

    def _send(self, p: _Peer, packet: bytes) -> ToRelay | ToTurn | None:
        """The way for one packet from WireGuard to peer ``p``; None when no path is up."""
        kind, rid = self._route(p)
        if kind == "relay":
            return ToRelay(rid, p.key, packet)
        if kind == "turn" and p.turn_addr is not None:
            return ToTurn(p.turn_addr, packet)
        return None

    def _flush(self, p: _Peer) -> list[Action]:
        out: list[Action] = []
        while p.buffered:
            action = self._send(p, p.buffered[0])
            if action is None:
                break
            out.append(action)
            p.buffered.popleft()
        return out

    def _flush_all(self) -> list[Action]:
        return [a for p in self._peers.values() if p.buffered for a in self._flush(p)]

    # ----- first contact

    def _hold(self, src: bytes, packet: bytes, now: float) -> None:
        """A packet from a key that is no peer (yet): keep a handshake a while, drop anything else."""
        if not is_handshake(packet):
            self.counters["drop_unknown_key"] += 1
            return
        for key in [k for k, (at, _) in self._held.items() if now - at > HOLD_SECONDS]:
            del self._held[key]
        if src not in self._held and len(self._held) >= MAX_HELD_KEYS:
            self.counters["drop_unknown_key"] += 1
            return
        self._held[src] = (now, packet)
        self.counters["held_unknown"] += 1

    def deliver_held(self, now: float) -> list[Action]:
        """Handshakes held for keys that are peers now (call once WireGuard knows the peers)."""
        out: list[Action] = []
        for key, (at, packet) in list(self._held.items()):
            known = key in self._peers
            if not known and now - at <= HOLD_SECONDS:
                continue
            del self._held[key]
            if known and now - at <= HOLD_SECONDS:
                self.counters["from_relay"] += 1
                out.append(ToWireGuard(key, packet))
        return out

    def peer_gone(self, key: bytes, now: float) -> None:
        """The relay says ``key`` is not connected there: re-send its last handshakes for a while."""
        p = self._peers.get(key)
        if p is not None and p.handshakes:
            self._arm(p, now)

    @staticmethod
    def _arm(p: _Peer, now: float) -> None:
        """Re-send ``p``'s kept handshakes from ``RETRY_INTERVAL`` on, for ``HOLD_SECONDS`` (unless armed)."""
        if p.retry_until < now or p.next_retry is None:
            p.retry_until = now + HOLD_SECONDS
            p.next_retry = now + RETRY_INTERVAL

    def next_timer(self) -> float | None:
        """When :meth:`timer` has work next (None: nothing scheduled). It may be early, never late: a
        peer that answered or left meanwhile just has nothing due then."""
        due = [p.next_retry for p in self._peers.values() if p.next_retry is not None]
        return min(due) if due else None

    def timer(self, now: float) -> list[Action]:
        """Handshake re-sends that are due."""
        out: list[Action] = []
        for p in self._peers.values():
            if p.next_retry is None or p.next_retry > now:
                continue
            if now > p.retry_until:
                p.next_retry = None
                continue
            for packet in list(p.handshakes):
                self.counters["handshake_retries"] += 1
                action = self._send(p, packet)
                if action is not None:
                    out.append(action)
            p.next_retry = now + RETRY_INTERVAL
        return out

    def clear(self) -> None:
        """Forget every peer, held handshake, relay and the allocation (the edge closed everything)."""
        self._peers.clear()
        self._by_turn.clear()
        self._held.clear()
        self._live.clear()
        self._turn_alive = False
        self.turn_relay = ""
        self.home_region = 0
