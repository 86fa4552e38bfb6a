"""The local relay proxy: WireGuard's endpoint for every relayed peer (issue 3, item 2).

Per relayed peer one UDP socket on ``127.0.0.1:<ephemeral>`` is WireGuard's endpoint for that peer
(:meth:`RelayProxy.endpoint`). What WireGuard sends there (from ``127.0.0.1:<wg port>``) goes to the peer:

* through a relay connection (:mod:`ghostlink.relayclient`, one per region, QUIC else TLS/TCP), by the
  peer's node key: the relay of the peer's home region, or any live one (our home first) when that one is
  down or unknown;
* else through our TURN allocation (:mod:`ghostlink.turnclient`) to the peer's TURN relayed address, when
  no relay connection can be used and both nodes hold an allocation (e.g. a coturn-only region map);
* else, while nothing is connected yet, into a small per-peer buffer (``MAX_BUFFERED`` packets) flushed the
  moment a path comes up, so the first WireGuard handshake does not wait 5 s for WireGuard's retry.

Packets from a relay (RECV, by source key) or from TURN (by the source's relayed address) leave from that
peer's local socket to WireGuard's port, so WireGuard sees each peer at its own stable endpoint (and roams
to it). Unknown sources are dropped and counted.

First contact (why two small holds): WireGuard retries a lost handshake initiation only after 5 s
(REKEY_TIMEOUT, whitepaper §6.4), so losing the first one costs a new peer 5 s. Two races lose it: the peer
has not connected to the relay yet (the relay answers PEER_GONE), or its map does not name us yet (it
would drop our packet as from an unknown key). So the last handshake messages (WireGuard message types 1
and 2) to each peer are kept, and re-sent every ``RETRY_INTERVAL`` for ``HOLD_SECONDS`` after a PEER_GONE
until the peer answers; and handshake messages from a key that is not a peer yet are held for
``HOLD_SECONDS`` and delivered by :meth:`RelayProxy.deliver_held` once the daemon has added that peer to
WireGuard.

Home region (:func:`pick_home`): the live region with the lowest RTT, sticky: it changes only when the
home dies or another region is more than ``HOME_MIN_GAIN_MS`` better *and* less than half the home's RTT,
so two similar relays do not make the node flap between homes (each flap is a map change for every peer).

Speed: local sockets are non-blocking, read with ``loop.add_reader`` in batches; nothing awaits on the data
path, so one slow peer or relay only drops its own packets (counted in ``counters``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from ghostcore.aio import Backoff
from ghostcore.errors import Unavailable
from ghostlink.engine import RegionInfo
from ghostlink.relayclient import RelayClient
from ghostlink.turnclient import Addr, TurnClient, format_addr, parse_addr

log = logging.getLogger(__name__)

MAX_BUFFERED = 32
HOLD_SECONDS = 5.0  # WireGuard's REKEY_TIMEOUT: after that it retries by itself
RETRY_INTERVAL = 0.5
MAX_HELD_KEYS = 256  # handshakes from unknown keys kept at most (a flood cannot grow it)
_HANDSHAKE_TYPES = (1, 2)  # WireGuard handshake initiation and response (first byte, little-endian u32)
HOME_MIN_GAIN_MS = 20.0
HOME_MIN_RATIO = 2.0
_BATCH = 64
_LOCAL = "127.0.0.1"


@dataclass(frozen=True)
class RelayCreds:
    turn_username: str
    turn_password: str = field(repr=False)
    expires_unix: int
    relay_token: bytes = field(repr=False)


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
    if our_turn and parse_addr(peer_turn) is not None:
        return "turn", 0
    return "", 0


@dataclass
class _Peer:
    key: bytes
    home: int = 0
    turn_relay: str = ""
    turn_addr: Addr | None = None
    sock: socket.socket | None = None
    buffered: deque[bytes] = field(default_factory=lambda: deque(maxlen=MAX_BUFFERED))
    handshakes: deque[bytes] = field(default_factory=lambda: deque(maxlen=2))  # last sent, for retries
    retry_until: float = 0.0  # re-send ``handshakes`` until then (a PEER_GONE came back)


class RelayProxy:
    """See the module docstring. ``on_change`` is called (synchronously, from the event loop: it must not
    block) when ``home_region`` or ``turn_relay`` changes.

    ``counters``: to_relay / from_relay, to_turn / from_turn, buffered, and the drops: drop_relay /
    drop_turn (a relay connection's or TURN's buffer full), drop_buffer_full (no path yet, the oldest
    buffered packet went), drop_unknown_key / drop_unknown_turn (a source that is no peer of ours),
    drop_not_wireguard (a local socket got a packet not from WireGuard's port), drop_to_wireguard;
    first contact: held_unknown (a handshake from a key that is no peer yet, kept), handshake_retries.
    """

    def __init__(self, *, wg_port: int, node_key: bytes, on_change: Callable[[], None] | None = None) -> None:
        self.wg_port = wg_port
        self.node_key = node_key
        self.on_change = on_change
        self.home_region = 0
        self.turn_relay = ""
        self.counters: Counter[str] = Counter()
        self._loop = asyncio.get_running_loop()
        self._wg_addr = (_LOCAL, wg_port)
        self._regions: dict[int, RegionInfo] = {}
        self._clients: dict[int, RelayClient] = {}
        self._creds: RelayCreds | None = None
        self._peers: dict[bytes, _Peer] = {}
        self._by_sock: dict[int, _Peer] = {}
        self._by_turn: dict[Addr, _Peer] = {}
        self._held: dict[bytes, tuple[float, bytes]] = {}  # unknown key -> (when, its last handshake)
        self._turn: TurnClient | None = None
        self._turn_want: tuple[RegionInfo, str, str] | None = None
        self._turn_task: asyncio.Task[None] | None = None
        self._turn_wake = asyncio.Event()
        self._closed = False

    # ----- configuration

    async def configure(
        self, regions: Sequence[RegionInfo], creds: RelayCreds, *, node_key: bytes, use_turn: bool
    ) -> None:
        """Connect to every region with a relay port; TURN on the first ``turn`` region when ``use_turn``.
        Idempotent: unchanged regions keep their connections."""
        self.node_key = node_key
        self._creds = creds
        want = {r.id: r for r in regions if r.quic_port or r.tcp_port}
        for rid in list(self._clients):
            if rid not in want or want[rid] != self._regions.get(rid):
                await self._clients.pop(rid).close()
        self._regions = {r.id: r for r in regions}
        for rid, r in want.items():
            c = self._clients.get(rid)
            if c is None:
                c = RelayClient(
                    name=r.name,
                    host=r.host,
                    quic_port=r.quic_port,
                    tcp_port=r.tcp_port,
                    node_key=node_key,
                    expiry=creds.expires_unix,
                    token=creds.relay_token,
                    on_recv=self._on_relay_recv,
                    on_state=self._on_relay_state,
                    on_gone=self._on_relay_gone,
                )
                self._clients[rid] = c
                c.start()
            else:
                c.set_auth(node_key, creds.expires_unix, creds.relay_token)
        turn_region = next((r for r in regions if r.turn and r.stun_port), None) if use_turn else None
        self._turn_want = (
            (turn_region, creds.turn_username, creds.turn_password) if turn_region is not None else None
        )
        if self._turn_task is None and self._turn_want is not None:
            self._turn_task = asyncio.create_task(self._turn_loop(), name="turn-allocation")
        self._turn_wake.set()
        self._on_relay_state()

    # ----- peers

    def endpoint(self, peer_key: bytes) -> str:
        """``"127.0.0.1:<port>"``: WireGuard's endpoint for this (relayed) peer; made on first call."""
        p = self._peer(peer_key)
        sock = self._socket(p)
        return f"{_LOCAL}:{sock.getsockname()[1]}"

    def set_route(self, peer_key: bytes, home_region: int, turn_relay: str) -> None:
        """The peer's home region and TURN relayed address, as the map says."""
        p = self._peer(peer_key)
        p.home = home_region
        if turn_relay != p.turn_relay:
            if p.turn_addr is not None:
                self._by_turn.pop(p.turn_addr, None)
                if self._turn is not None:
                    self._turn.remove_peer(p.turn_addr)
            p.turn_relay = turn_relay
            p.turn_addr = parse_addr(turn_relay) if turn_relay else None
            if p.turn_addr is not None:
                self._by_turn[p.turn_addr] = p
                if self._turn is not None:
                    self._turn.add_peer(p.turn_addr)
        self._flush(p)

    def remove_peer(self, peer_key: bytes) -> None:
        p = self._peers.pop(peer_key, None)
        if p is None:
            return
        if p.turn_addr is not None:
            self._by_turn.pop(p.turn_addr, None)
            if self._turn is not None:
                self._turn.remove_peer(p.turn_addr)
        self._close_socket(p)

    def path_of(self, peer_key: bytes) -> tuple[str, str]:
        """("relay" | "turn" | "", region name) the peer's packets take now."""
        p = self._peers.get(peer_key)
        if p is None:
            return "", ""
        kind, rid = self._route(p)
        if kind == "relay":
            return kind, self._regions[rid].name if rid in self._regions else ""
        if kind == "turn" and self._turn_want is not None:
            return kind, self._turn_want[0].name
        return "", ""

    def regions(self) -> list[tuple[int, str, str, float]]:
        """(id, name, transport, rtt ms) of every configured region ("" / -1 when not connected)."""
        out = []
        for rid, r in sorted(self._regions.items()):
            c = self._clients.get(rid)
            if c is not None and c.alive:
                out.append((rid, r.name, c.transport, c.rtt_ms))
            else:
                out.append((rid, r.name, "", -1.0))
        return out

    def _peer(self, key: bytes) -> _Peer:
        p = self._peers.get(key)
        if p is None:
            p = self._peers[key] = _Peer(key)
        return p

    def _socket(self, p: _Peer) -> socket.socket:
        if p.sock is None:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                s.setblocking(False)
                s.bind((_LOCAL, 0))
            except OSError as exc:
                s.close()
                raise Unavailable(
                    f"relay proxy: cannot bind a UDP socket on {_LOCAL}: {exc.strerror}"
                ) from None
            p.sock = s
            self._by_sock[s.fileno()] = p
            self._loop.add_reader(s.fileno(), self._on_local, p)
        return p.sock

    def _close_socket(self, p: _Peer) -> None:
        if p.sock is not None:
            fd = p.sock.fileno()
            self._by_sock.pop(fd, None)
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_reader(fd)
            p.sock.close()
            p.sock = None

    # ----- routing

    def _live(self) -> dict[int, float]:
        return {rid: c.rtt_ms for rid, c in self._clients.items() if c.alive}

    def _route(self, p: _Peer) -> tuple[str, int]:
        turn_ok = self._turn is not None and self._turn.alive
        return pick_route(p.home, self.home_region, self._live(), turn_ok, p.turn_relay)

    def _send(self, p: _Peer, packet: bytes, *, retry: bool = False) -> bool:
        """Send one packet from WireGuard to peer ``p``; False when no path is up (the caller buffers)."""
        kind, rid = self._route(p)
        if not retry and packet[:1] and packet[0] in _HANDSHAKE_TYPES:
            p.handshakes.append(packet)
        if kind == "relay":
            if self._clients[rid].send(p.key, packet):
                self.counters["to_relay"] += 1
            else:
                self.counters["drop_relay"] += 1
            return True
        if kind == "turn" and self._turn is not None and p.turn_addr is not None:
            if self._turn.sendto(packet, p.turn_addr):
                self.counters["to_turn"] += 1
            else:
                self.counters["drop_turn"] += 1
            return True
        return False

    def _on_local(self, p: _Peer) -> None:
        sock = p.sock
        if sock is None:
            return
        for _ in range(_BATCH):
            try:
                data, src = sock.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self.counters["local_errors"] += 1  # e.g. ICMP unreachable from a restarted WireGuard
                continue
            if src[0] != _LOCAL or src[1] != self.wg_port:
                self.counters["drop_not_wireguard"] += 1
                continue
            if not self._send(p, data):
                if len(p.buffered) == MAX_BUFFERED:
                    self.counters["drop_buffer_full"] += 1
                p.buffered.append(data)
                self.counters["buffered"] += 1

    def _flush(self, p: _Peer) -> None:
        while p.buffered:
            if not self._send(p, p.buffered[0]):
                return
            p.buffered.popleft()

    def _flush_all(self) -> None:
        for p in list(self._peers.values()):
            if p.buffered:
                self._flush(p)

    def _deliver(self, p: _Peer, packet: bytes) -> None:
        sock = self._socket(p)
        try:
            sock.sendto(packet, self._wg_addr)
        except OSError:  # a full buffer or no WireGuard listening: drop, never wait
            self.counters["drop_to_wireguard"] += 1

    def _on_relay_recv(self, src: bytes, packet: bytes) -> None:
        p = self._peers.get(src)
        if p is None:
            self._hold(src, packet)
            return
        p.retry_until = 0.0  # it answers: no more retries
        self.counters["from_relay"] += 1
        self._deliver(p, packet)

    def _hold(self, src: bytes, packet: bytes) -> None:
        """A packet from a key that is no peer (yet): keep a handshake a while, drop anything else."""
        now = self._loop.time()
        if not (packet[:1] and packet[0] in _HANDSHAKE_TYPES):
            self.counters["drop_unknown_key"] += 1
            return
        for key in [k for k, (at, _) in self._held.items() if now - at > HOLD_SECONDS]:
            del self._held[key]
        if src not in self._held and len(self._held) >= MAX_HELD_KEYS:
            self.counters["drop_unknown_key"] += 1
            return
        self._held[src] = (now, packet)
        self.counters["held_unknown"] += 1

    def deliver_held(self) -> None:
        """Deliver handshakes held for keys that are peers now (call once WireGuard knows the peers)."""
        now = self._loop.time()
        for key, (at, packet) in list(self._held.items()):
            p = self._peers.get(key)
            if p is None and now - at <= HOLD_SECONDS:
                continue
            del self._held[key]
            if p is not None and now - at <= HOLD_SECONDS:
                self.counters["from_relay"] += 1
                self._deliver(p, packet)

    def _on_relay_gone(self, key: bytes) -> None:
        """The relay says ``key`` is not connected there: retry its last handshake for a while."""
        p = self._peers.get(key)
        if p is None or not p.handshakes:
            return
        if p.retry_until < self._loop.time():
            p.retry_until = self._loop.time() + HOLD_SECONDS
            self._loop.call_later(RETRY_INTERVAL, self._retry, p)

    def _retry(self, p: _Peer) -> None:
        if self._closed or self._peers.get(p.key) is not p or self._loop.time() > p.retry_until:
            return
        for packet in list(p.handshakes):
            self.counters["handshake_retries"] += 1
            self._send(p, packet, retry=True)
        self._loop.call_later(RETRY_INTERVAL, self._retry, p)

    def _on_turn_recv(self, data: bytes, src: Addr) -> None:
        p = self._by_turn.get(src)
        if p is None:
            self.counters["drop_unknown_turn"] += 1
            return
        self.counters["from_turn"] += 1
        self._deliver(p, data)

    def _on_relay_state(self) -> None:
        if self._closed:
            return
        home = pick_home(self.home_region, self._live())
        if home != self.home_region:
            log.info("home relay region %d -> %d", self.home_region, home)
            self.home_region = home
            self._changed()
        self._flush_all()

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    # ----- TURN

    async def _turn_loop(self) -> None:
        """Hold one allocation on the wanted TURN region; re-allocate when it is lost or the wish changes."""
        backoff = Backoff(initial=0.5, maximum=30.0)
        held: tuple[RegionInfo, str, str] | None = None
        while not self._closed:
            self._turn_wake.clear()
            want = self._turn_want
            turn = self._turn
            if turn is not None and (not turn.alive or want != held):
                self._turn = None
                await turn.close()
                self._set_turn_relay("")
            if want is not None and self._turn is None:
                region, username, password = want
                try:
                    new = await TurnClient.allocate(
                        (region.host, region.stun_port),
                        username,
                        password,
                        on_recv=self._on_turn_recv,
                        on_lost=self._turn_wake.set,
                    )
                except Unavailable as exc:
                    log.info("%s", exc)
                    await asyncio.sleep(backoff.next())
                    continue
                except Exception:  # a bug or an odd answer must not end TURN for the daemon's life
                    log.exception("TURN allocation on %s failed", region.name)
                    await asyncio.sleep(backoff.next())
                    continue
                backoff.reset()
                held = want
                self._turn = new
                for p in self._peers.values():
                    if p.turn_addr is not None:
                        new.add_peer(p.turn_addr)
                self._set_turn_relay(new.relayed)
                self._flush_all()
            await self._turn_wake.wait()

    def _set_turn_relay(self, relayed: str) -> None:
        if relayed != self.turn_relay:
            self.turn_relay = relayed
            self._changed()

    # ----- end

    async def close(self) -> None:
        self._closed = True
        task, self._turn_task = self._turn_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._turn is not None:
            turn, self._turn = self._turn, None
            await turn.close()
        for c in self._clients.values():
            await c.close()
        self._clients.clear()
        for p in self._peers.values():
            self._close_socket(p)
        self._peers.clear()
        self.turn_relay = ""
        self.home_region = 0


__all__ = ["RelayCreds", "RelayProxy", "format_addr", "pick_home", "pick_relay", "pick_route"]
