"""The local relay proxy, the I/O edge: WireGuard's endpoint for every relayed peer.

Per relayed peer one UDP socket on ``127.0.0.1:<ephemeral>`` is WireGuard's endpoint for that peer
(:meth:`RelayProxy.endpoint`). What WireGuard sends there (from ``127.0.0.1:<wg port>``) is handed to the
routing core (:class:`ghostlink.traversal.proxy_core.ProxyCore`, which decides where each packet goes and
why; read its docstring), and this edge sends it: through a relay connection
(:mod:`ghostlink.traversal.relayclient`, one per region) or through our TURN allocation
(:mod:`ghostlink.traversal.turnclient`). Packets from a relay or from TURN leave from that peer's local
socket to WireGuard's port, so WireGuard sees each peer at its own stable endpoint (and roams to it).

It owns the sockets, the relay connections (one per region with a relay port), the one TURN allocation
(held by :meth:`RelayProxy._turn_loop`, re-allocated when it is lost or the map names another region) and
the core's retry timer.

Speed: local sockets are non-blocking, read with ``loop.add_reader`` in batches; nothing awaits on the data
path, so one slow peer or relay only drops its own packets (counted in ``counters``).

The relay client and the TURN client are imported when first used (a map with a relay port, a TURN
allocation), not with this module: with them come aioquic, TLS and aioice, which a node whose map has
no relay region never needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ghostcore.addr import HostPort, format_endpoint
from ghostcore.aio import Backoff
from ghostcore.errors import Unavailable
from ghostlink.engine import RegionInfo
from ghostlink.nodekey import NodeKey
from ghostlink.traversal.proxy_core import (
    Action,
    HomeChanged,
    ProxyCore,
    RelayStatus,
    ToRelay,
    ToTurn,
    ToWireGuard,
    TurnBinding,
    TurnChanged,
    is_handshake,
)

if TYPE_CHECKING:
    from ghostlink.traversal.relayclient import RelayClient
    from ghostlink.traversal.turnclient import TurnClient

log = logging.getLogger(__name__)

_BATCH = 64
_LOCAL = "127.0.0.1"


@dataclass(frozen=True)
class RelayCreds:
    turn_username: str
    turn_password: str = field(repr=False)
    expires_unix: int
    relay_token: bytes = field(repr=False)
    relay_static_key: bytes  # the relays' X25519 public key the AUTH key proof is made against


class RelayProxy:
    """See the module docstring. ``on_change`` is called (synchronously, from the event loop: it must not
    block) when ``home_region`` or ``turn_relay`` changes.

    ``counters``: the core's (see :mod:`ghostlink.traversal.proxy_core`) and what the sockets did:
    to_relay / to_turn, drop_relay / drop_turn (a relay connection's or TURN's buffer full),
    drop_not_wireguard (a local socket got a packet not from WireGuard's port), drop_to_wireguard,
    local_errors.
    """

    def __init__(self, *, wg_port: int, keys: NodeKey, on_change: Callable[[], None] | None = None) -> None:
        self._wg_port = wg_port
        self._keys = keys
        self._on_change = on_change
        self._core = ProxyCore()
        self._counters: Counter[str] = Counter()
        self._loop = asyncio.get_running_loop()
        self._wg_addr = (_LOCAL, wg_port)
        self._regions: dict[int, RegionInfo] = {}
        self._clients: dict[int, RelayClient] = {}
        self._socks: dict[bytes, socket.socket] = {}
        self._turn: TurnClient | None = None
        self._turn_want: tuple[RegionInfo, str, str] | None = None
        self._turn_task: asyncio.Task[None] | None = None
        self._turn_wake = asyncio.Event()
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False

    @property
    def home_region(self) -> int:
        return self._core.home_region

    @property
    def turn_relay(self) -> str:
        return self._core.turn_relay

    @property
    def counters(self) -> Counter[str]:
        """The core's counters and the sockets' (the names do not overlap)."""
        return self._core.counters + self._counters

    def status(self) -> RelayStatus:
        home = self._core.home_region
        client = self._clients.get(home)
        transport = client.transport if client is not None and client.alive else ""
        return RelayStatus(home, transport, self._core.turn_relay)

    # ----- configuration

    async def configure(
        self, regions: Sequence[RegionInfo], creds: RelayCreds, *, node_key: bytes, use_turn: bool
    ) -> None:
        """Connect to every region with a relay port; TURN on the first ``turn`` region when ``use_turn``.
        Idempotent: unchanged regions keep their connections."""
        want = {r.id: r for r in regions if r.quic_port or r.tcp_port}
        for rid in list(self._clients):
            if rid not in want or want[rid] != self._regions.get(rid):
                await self._clients.pop(rid).close()
        self._regions = {r.id: r for r in regions}
        for rid, r in want.items():
            c = self._clients.get(rid)
            if c is None:
                from ghostlink.traversal.relayclient import RelayClient  # noqa: PLC0415 - lazy (docstring)

                c = RelayClient(
                    name=r.name,
                    host=r.host,
                    quic_port=r.quic_port,
                    tcp_port=r.tcp_port,
                    tls_pin=r.tls_pin,
                    keys=self._keys,
                    node_key=node_key,
                    relay_static=creds.relay_static_key,
                    expiry=creds.expires_unix,
                    token=creds.relay_token,
                    on_recv=self._on_relay_recv,
                    on_state=self._on_relay_state,
                    on_gone=self._on_relay_gone,
                )
                self._clients[rid] = c
                c.start()
            else:
                c.set_auth(node_key, creds.relay_static_key, creds.expires_unix, creds.relay_token)
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
        self._core.add_peer(peer_key)
        return format_endpoint(_LOCAL, self._socket(peer_key).getsockname()[1])

    def set_route(self, peer_key: bytes, home_region: int, turn_relay: str) -> None:
        """The peer's home region and TURN relayed address, as the map says."""
        self._do(self._core.set_route(peer_key, home_region, turn_relay))

    def remove_peer(self, peer_key: bytes) -> None:
        self._do(self._core.remove_peer(peer_key))
        self._close_socket(peer_key)

    def path_of(self, peer_key: bytes) -> tuple[str, str]:
        """("relay" | "turn" | "", region name) the peer's packets take now."""
        kind, rid = self._core.route(peer_key)
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

    def deliver_held(self) -> None:
        """Deliver handshakes held for keys that are peers now (call once WireGuard knows the peers)."""
        self._do(self._core.deliver_held(self._loop.time()))

    def _socket(self, peer_key: bytes) -> socket.socket:
        sock = self._socks.get(peer_key)
        if sock is None:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                sock.setblocking(False)
                sock.bind((_LOCAL, 0))
            except OSError as exc:
                sock.close()
                raise Unavailable(
                    f"relay proxy: cannot bind a UDP socket on {_LOCAL}: {exc.strerror}"
                ) from None
            self._socks[peer_key] = sock
            self._loop.add_reader(sock.fileno(), self._on_local, peer_key, sock)
        return sock

    def _close_socket(self, peer_key: bytes) -> None:
        sock = self._socks.pop(peer_key, None)
        if sock is not None:
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_reader(sock.fileno())
            sock.close()

    # ----- carrying out the core's actions

    def _do(self, actions: Iterable[Action]) -> None:
        for action in actions:
            self._act(action)

    def _act(self, action: Action) -> None:
        if isinstance(action, ToRelay):
            client = self._clients.get(action.region)  # None: closed by configure(), not yet told to the core
            if client is not None and client.send(action.dst, action.packet):
                self._counters["to_relay"] += 1
            else:
                self._counters["drop_relay"] += 1
        elif isinstance(action, ToTurn):
            if self._turn is not None and self._turn.sendto(action.packet, action.peer):
                self._counters["to_turn"] += 1
            else:
                self._counters["drop_turn"] += 1
        elif isinstance(action, ToWireGuard):
            self._deliver(action.src, action.packet)
        elif isinstance(action, TurnBinding):
            if self._turn is not None:
                if action.keep:
                    self._turn.add_peer(action.peer)
                else:
                    self._turn.remove_peer(action.peer)
        elif isinstance(action, HomeChanged):
            log.info("home relay region %d -> %d", action.old, action.new)
            self._changed()
        elif isinstance(action, TurnChanged):
            self._changed()

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change()

    def _deliver(self, peer_key: bytes, packet: bytes) -> None:
        try:
            self._socket(peer_key).sendto(packet, self._wg_addr)
        except OSError:  # a full buffer or no WireGuard listening: drop, never wait
            self._counters["drop_to_wireguard"] += 1

    # ----- events from the sockets, the relays and TURN

    def _on_local(self, peer_key: bytes, sock: socket.socket) -> None:
        for _ in range(_BATCH):
            try:
                data, src = sock.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._counters["local_errors"] += 1  # e.g. ICMP unreachable from a restarted WireGuard
                continue
            if src[0] != _LOCAL or src[1] != self._wg_port:
                self._counters["drop_not_wireguard"] += 1
                continue
            action = self._core.from_wireguard(peer_key, data, self._loop.time())
            if action is not None:
                self._act(action)
            if is_handshake(data):  # it armed re-sends (proxy_core's "first contact")
                self._schedule()

    def _on_relay_recv(self, src: bytes, packet: bytes) -> None:
        action = self._core.from_relay(src, packet, self._loop.time())
        if action is not None:
            self._deliver(action.src, action.packet)

    def _on_relay_gone(self, key: bytes) -> None:
        self._core.peer_gone(key, self._loop.time())
        self._schedule()

    def _on_relay_state(self) -> None:
        if self._closed:
            return
        live = {rid: c.rtt_ms for rid, c in self._clients.items() if c.alive}
        self._do(self._core.relays(live))

    def _on_turn_recv(self, data: bytes, src: HostPort) -> None:
        action = self._core.from_turn(src, data)
        if action is not None:
            self._deliver(action.src, action.packet)

    def _on_turn_lost(self) -> None:
        self._core.turn_lost()
        self._turn_wake.set()

    def _schedule(self) -> None:
        """Arm the loop timer for the core's next retry (re-armed after every retry event)."""
        when = self._core.next_timer()
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_at(when, self._on_timer) if when is not None else None

    def _on_timer(self) -> None:
        self._timer = None
        if self._closed:
            return
        self._do(self._core.timer(self._loop.time()))
        self._schedule()

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
                self._do(self._core.turn_down())  # first: packets wait in the buffers, not for a closing one
                await turn.close()
            if want is not None and self._turn is None:
                region, username, password = want
                from ghostlink.traversal.turnclient import TurnClient  # noqa: PLC0415 - lazy (docstring)

                try:
                    new = await TurnClient.allocate(
                        (region.host, region.stun_port),
                        username,
                        password,
                        on_recv=self._on_turn_recv,
                        on_lost=self._on_turn_lost,
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
                self._do(self._core.turn_up(new.relayed))
            await self._turn_wake.wait()

    # ----- end

    async def close(self) -> None:
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
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
        for key in list(self._socks):
            self._close_socket(key)
        self._core.clear()
