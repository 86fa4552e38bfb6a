"""NAT traversal for the daemon: the I/O edge around :mod:`ghostlink.paths` (issue 3, item 2).

It owns, for one node:

* the shared WireGuard port (:mod:`ghostlink.stunport`): STUN to every region from WireGuard's own port
  (the server-reflexive candidate reported to ghostmesh with the host endpoints), connectivity checks to
  each peer's candidates, answers to the peers' checks (which teach us peer-reflexive candidates);
* the relay proxy (:mod:`ghostlink.proxy`): connections to the relay regions, the home region, the TURN
  allocation, and one local socket per peer that WireGuard sends to while the peer is relayed;
* the check loop: :class:`ghostlink.paths.PathManager` says which checks are due and which peers are
  direct; a change of any peer's choice asks the daemon to reconcile, and the engine then points
  WireGuard at the direct candidate or at the proxy's socket (``endpoints()``). Only the endpoint changes,
  through UAPI, so the WireGuard session survives every switch.

Relay first: a peer has the proxy's socket as its endpoint from the first map on (when the map has relay
regions), so its first packet never waits for checks; checks upgrade it in the background. Without relay
regions in the map, peers not (yet) direct keep the map's first endpoint, as before issue 3.
If raw sockets are not permitted (no CAP_NET_RAW), direct paths are off and everything is relayed; the
daemon says so once.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
from collections.abc import Callable

from ghostcore.keys import PrivateKey
from ghostlink.engine import NetMap, RelayInfo
from ghostlink.paths import Addr, PathManager
from ghostlink.proxy import RelayCreds, RelayProxy
from ghostlink.stunport import NetcheckResult, SharedPort

log = logging.getLogger(__name__)

CHECK_TIMEOUT = 1.0
STUN_INTERVAL = 25.0  # keeps the NAT mapping toward the STUN servers and notices a new public address
LOOP_MAX_SLEEP = 0.25


def _raw(key_b64: str) -> bytes:
    return base64.b64decode(key_b64)


class Traversal:
    """Paths to every peer of one node. ``on_paths`` (reconcile WireGuard endpoints) and ``on_status``
    (report home region / TURN address / public endpoint) are called on changes."""

    def __init__(
        self,
        *,
        wg_port: int,
        key: PrivateKey,
        on_paths: Callable[[], None],
        on_status: Callable[[], None],
    ) -> None:
        self.wg_port = wg_port
        self.key = key
        self.on_paths = on_paths
        self.on_status = on_status
        self.pm = PathManager()
        self.port: SharedPort | None = None
        self.proxy = RelayProxy(wg_port=wg_port, node_key=self._key_raw(), on_change=on_status)
        self.relay: RelayInfo | None = None
        self.srflx = ""  # our public endpoint as the first answering STUN server saw it
        self._configured: tuple[RelayInfo, bytes] | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._checks: set[asyncio.Task[None]] = set()
        self._loop = asyncio.get_running_loop()

    def _key_raw(self) -> bytes:
        return self.key.public_key().raw

    async def start(self) -> None:
        try:
            self.port = SharedPort.open(self.wg_port, self.key.public_key().base64())
        except OSError as exc:
            log.warning("direct paths off: no raw socket on WireGuard's port %d (%s)", self.wg_port, exc)
        else:
            self.port.on_check = self._on_check
        self._task = asyncio.create_task(self._run())

    def set_key(self, key: PrivateKey) -> None:
        """The node key was rotated: checks and relay authentication use the new one from now on."""
        self.key = key
        if self.port is not None:
            self.port.local_key = key.public_key().base64()

    async def update(self, nm: NetMap) -> None:
        """Fold a new map in: relay regions and credentials, peers and their candidates."""
        now = self._loop.time()
        self.relay = nm.relay
        fallback = nm.relay.fallback if nm.relay is not None else ("ice", "turn", "stun")
        self.pm.enabled = self.port is not None and "ice" in fallback
        # The relay knows us by the key ghostmesh has for us: the token is bound to it, and peers address
        # relayed packets to it. During a key rotation that is the old key until the server promotes the
        # new one, and the same map update then carries the re-minted token.
        relay_key = _raw(nm.self_node.node_key) if nm.self_node is not None else self._key_raw()
        if nm.relay is not None and self._configured != (nm.relay, relay_key):
            r = nm.relay
            await self.proxy.configure(
                r.regions,
                RelayCreds(r.turn_username, r.turn_password, r.expires_unix, r.relay_token),
                node_key=relay_key,
                use_turn="turn" in r.fallback,
            )
            self._configured = (nm.relay, relay_key)
            self._wake.set()  # STUN the (new) regions now
        me = nm.self_node.node_key if nm.self_node is not None else ""
        keep: set[str] = set()
        changed = False
        for p in nm.peers.values():
            if p.node_key == me:
                continue
            keep.add(p.node_key)
            changed |= self.pm.set_peer(p.node_key, p.endpoints, now)
            self.proxy.set_route(_raw(p.node_key), p.home_region, p.turn_relay)
        for key in set(self.pm.peers()) - keep:
            self.pm.remove_peer(key)
            self.proxy.remove_peer(_raw(key))
        self._wake.set()
        if changed:
            self.on_paths()

    def endpoints(self) -> dict[str, str]:
        """Peer key -> where WireGuard should send: the direct candidate, or the relay proxy's socket."""
        out: dict[str, str] = {}
        for key in self.pm.peers():
            d = self.pm.direct(key)
            if d is not None:
                out[key] = f"{d[0]}:{d[1]}"
            elif self.relay is not None:
                out[key] = self.proxy.endpoint(_raw(key))
        return out

    def path(self, key: str) -> tuple[str, str, float]:
        """(path, relay region name, latency ms) for ``ghostctl peers``; path "" when there is none.

        Latency: of a direct path, the last check's round trip; of a relayed one, our round trip to that
        relay (the part of the path this node can measure; -1 when unknown)."""
        if self.pm.direct(key) is not None:
            rtt = self.pm.latency(key)
            return "direct", "", rtt * 1000.0 if rtt is not None else -1.0
        if self.relay is None:
            return "", "", -1.0
        kind, region = self.proxy.path_of(_raw(key))
        rtts = {name: ms for _, name, _, ms in self.proxy.regions()}
        return kind, region, rtts.get(region, -1.0) if kind == "relay" else -1.0

    def candidates(self, local: list[str]) -> list[str]:
        """What to report to ghostmesh: the host endpoints and the server-reflexive one."""
        return local + ([self.srflx] if self.srflx and self.srflx not in local else [])

    def _stun_servers(self) -> list[tuple[int, str, Addr]]:
        if self.relay is None or "stun" not in self.relay.fallback:
            return []
        return [(g.id, g.name, (g.host, g.stun_port)) for g in self.relay.regions if g.stun_port]

    async def netcheck(self) -> NetcheckResult | None:
        """STUN every region from WireGuard's port now; None when the raw socket is not available."""
        if self.port is None:
            return None
        result = await self.port.netcheck(self._stun_servers())
        self._note_srflx(result.public_endpoint)
        return result

    def _note_srflx(self, endpoint: str) -> None:
        if endpoint and endpoint != self.srflx:
            log.info("public endpoint %s (STUN from WireGuard's port)", endpoint)
            self.srflx = endpoint
            self.on_status()

    def _on_check(self, src: Addr, from_key: str) -> None:
        self.pm.learn(from_key, src, self._loop.time())
        self._wake.set()

    async def _check(self, key: str, addr: Addr) -> None:
        rtt = None
        if self.port is not None:
            rtt = await self.port.check(addr, key, timeout=CHECK_TIMEOUT)
        if self.pm.result(key, addr, rtt, self._loop.time()):
            d = self.pm.direct(key)
            log.info("peer %s…: %s", key[:8], f"direct via {addr[0]}:{addr[1]}" if d else "relayed")
            self.on_paths()

    async def _run(self) -> None:
        next_stun = 0.0
        while True:
            now = self._loop.time()
            dead = self.pm.tick(now)
            for key in dead:
                log.info("peer %s…: direct path lost, relayed", key[:8])
            if dead:
                self.on_paths()
            for key, addr in self.pm.due(now):
                task = asyncio.create_task(self._check(key, addr))
                self._checks.add(task)
                task.add_done_callback(self._checks.discard)
            if self.port is not None and now >= next_stun and self._stun_servers():
                next_stun = now + STUN_INTERVAL
                task = asyncio.create_task(self._stun_once())
                self._checks.add(task)
                task.add_done_callback(self._checks.discard)
            nxt = self.pm.next_due()
            delay = LOOP_MAX_SLEEP if nxt is None else min(LOOP_MAX_SLEEP, max(0.02, nxt - now))
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)

    async def _stun_once(self) -> None:
        result = await self.netcheck()
        if result is not None and not result.udp:
            log.debug("no STUN server answered over UDP")

    async def close(self) -> None:
        tasks = [t for t in (self._task, *self._checks) if t is not None]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        await self.proxy.close()
        if self.port is not None:
            self.port.close()
