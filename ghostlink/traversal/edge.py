"""NAT traversal for the daemon: the I/O edge around the pure path state machine
(:mod:`ghostlink.traversal.path_core`).

It owns, for one node:

* the shared WireGuard port (:mod:`ghostlink.traversal.stunport`): STUN to every region from WireGuard's
  own port (the server-reflexive candidate reported to ghostmesh with the host endpoints), connectivity
  checks to each peer's candidates, answers to the peers' checks (which teach us peer-reflexive candidates);
* the relay proxy (:mod:`ghostlink.traversal.proxy`): connections to the relay regions, the home region, the
  TURN allocation, and one local socket per peer that WireGuard sends to while the peer is relayed;
* the port mapping of WireGuard's port on the gateway (:mod:`ghostlink.traversal.portmap`: PCP, NAT-PMP,
  UPnP IGD), whose public endpoint is reported with the other candidates (``port_mapping`` off: none);
* birthday probing (:mod:`ghostlink.traversal.birthday`) toward peers that neither side's checks can
  reach because one NAT is symmetric and the other is not: fed with our netcheck's mapping, the peers'
  candidates (none while a peer is offline) and which peers are direct; a hit routes WireGuard's packets
  to that peer through the mapping it opened, and the candidate is checked at once;
* the check loop: :class:`ghostlink.traversal.path_core.PathManager` says which checks are due and which
  peers are direct; a change of any peer's choice asks the daemon to reconcile, and the engine then points
  WireGuard at the direct candidate or at the proxy's socket (``endpoints()``). Only the endpoint changes,
  through UAPI, so the WireGuard session survives every switch.

Relay first: a peer has the proxy's socket as its endpoint from the first map on (when the map has relay
regions), so its first packet never waits for checks; checks upgrade it in the background. Without relay
regions in the map, peers not (yet) direct keep the map's first endpoint, as a plain routed network would.
If raw sockets are not permitted (no CAP_NET_RAW), direct paths are off and everything is relayed; the
daemon says so once.

The node key is read from the node's :class:`ghostlink.nodekey.NodeKey`; after a rotation :meth:`rekey`
makes the checks addressed to the new key answered. The relays know us by the key ghostmesh has for us (the
map's own record), which :meth:`update` follows.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
from collections.abc import Callable

from ghostcore.addr import HostPort, format_endpoint
from ghostlink.engine import NetMap, RelayInfo
from ghostlink.hostjournal import HostJournal
from ghostlink.nodekey import NodeKey
from ghostlink.traversal.birthday import DEFAULT_TABLE, BirthdayProber
from ghostlink.traversal.path_core import PathManager, PeerPath, parse_candidate
from ghostlink.traversal.portmap import PortMapper
from ghostlink.traversal.proxy import RelayCreds, RelayProxy
from ghostlink.traversal.proxy_core import RelayStatus
from ghostlink.traversal.stun_core import NetcheckResult
from ghostlink.traversal.stunport import SharedPort

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
        keys: NodeKey,
        on_paths: Callable[[], None],
        on_status: Callable[[], None],
        port_mapping: bool = True,
        route_table: str = DEFAULT_TABLE,
        journal: HostJournal | None = None,
    ) -> None:
        self._wg_port = wg_port
        self._keys = keys
        self._on_paths = on_paths
        self._on_status = on_status
        self._pm = PathManager()
        self._port: SharedPort | None = None
        self._proxy = RelayProxy(wg_port=wg_port, keys=keys, on_change=on_status)
        self._relay: RelayInfo | None = None
        self._srflx = ""  # our public endpoint as the first answering STUN server saw it
        self._configured: tuple[RelayInfo, bytes] | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._checks: set[asyncio.Task[None]] = set()
        self._loop = asyncio.get_running_loop()
        self._mapper = PortMapper(wg_port, on_status) if port_mapping else None
        self._route_table = route_table
        self._journal = journal
        self._bd: BirthdayProber | None = None  # birthday probing: needs the shared port to spray

    async def start(self) -> None:
        try:
            self._port = SharedPort.open(self._wg_port, self._keys.public.base64(), on_check=self._on_check)
        except OSError as exc:
            log.warning("direct paths off: no raw socket on WireGuard's port %d (%s)", self._wg_port, exc)
        else:
            self._pm.families = self._port.families
            self._bd = BirthdayProber(
                wg_port=self._wg_port,
                keys=self._keys,
                send=self._port.send_raw,
                on_route=self._on_route,
                table=self._route_table,
                journal=self._journal,
            )
        if self._mapper is not None:
            await self._mapper.start()
        self._task = asyncio.create_task(self._run())

    def rekey(self) -> None:
        """The node key was switched: checks addressed to the new one are answered from now on."""
        if self._port is not None:
            self._port.local_key = self._keys.public.base64()
        if self._bd is not None:
            self._bd.rekey()

    async def update(self, nm: NetMap) -> None:
        """Fold a new map in: relay regions and credentials, peers and their candidates."""
        now = self._loop.time()
        self._relay = nm.relay
        fallback = nm.relay.fallback if nm.relay is not None else ("ice", "turn", "stun")
        self._pm.enabled = self._port is not None and "ice" in fallback
        # The relay knows us by the key ghostmesh has for us: the token is bound to it, and peers address
        # relayed packets to it. During a key rotation that is the old key until the server promotes the
        # new one, and the same map update then carries the re-minted token.
        relay_key = _raw(nm.self_node.node_key) if nm.self_node is not None else self._keys.public.raw
        if nm.relay is not None and self._configured != (nm.relay, relay_key):
            r = nm.relay
            await self._proxy.configure(
                r.regions,
                RelayCreds(
                    r.turn_username, r.turn_password, r.expires_unix, r.relay_token, r.relay_static_key
                ),
                node_key=relay_key,
                use_turn="turn" in r.fallback,
            )
            self._configured = (nm.relay, relay_key)
            self._wake.set()  # STUN the (new) regions now
        me = nm.self_node.node_key if nm.self_node is not None else ""
        keep: set[str] = set()
        changed = False
        for p in nm.peers.values():
            if p.node_key == me or p.is_device:  # a device runs no ghostlink: nothing to probe or relay
                continue
            keep.add(p.node_key)
            changed |= self._pm.set_peer(p.node_key, p.endpoints, now)
            if self._bd is not None:
                v4 = (parse_candidate(c, (4,)) for c in p.endpoints)
                self._bd.set_peer(p.node_key, [c for c in v4 if c is not None] if p.online else [], now)
            self._proxy.set_route(_raw(p.node_key), p.home_region, p.turn_relay)
        for key in set(self._pm.peers()) - keep:
            self._pm.remove_peer(key)
            self._proxy.remove_peer(_raw(key))
            if self._bd is not None:
                self._bd.remove_peer(key)
        self._wake.set()
        if changed:
            self._on_paths()

    def endpoints(self) -> dict[str, str]:
        """Peer key -> where WireGuard should send: the direct candidate, or the relay proxy's socket."""
        out: dict[str, str] = {}
        for key in self._pm.peers():
            d = self._pm.direct(key)
            if d is not None:
                out[key] = format_endpoint(*d)
            elif self._relay is not None:
                out[key] = self._proxy.endpoint(_raw(key))
        return out

    def deliver_held(self) -> None:
        """WireGuard knows the map's peers now: hand it the handshakes the proxy held for them."""
        self._proxy.deliver_held()

    def path(self, key: str) -> PeerPath:
        """The path to peer ``key`` for ``ghostctl peers`` (see :class:`PeerPath`)."""
        if self._pm.direct(key) is not None:
            rtt = self._pm.latency(key)
            return PeerPath("direct", "", rtt * 1000.0 if rtt is not None else -1.0)
        if self._relay is None:
            return PeerPath()
        kind, region = self._proxy.path_of(_raw(key))
        rtts = {name: ms for _, name, _, ms in self._proxy.regions()}
        return PeerPath(kind, region, rtts.get(region, -1.0) if kind == "relay" else -1.0)

    def relay_status(self) -> RelayStatus:
        """The home region, how it is reached, and our TURN relayed address."""
        return self._proxy.status()

    def candidates(self, local: list[str]) -> list[str]:
        """What to report to ghostmesh: the host endpoints, the server-reflexive one and the endpoint the
        gateway mapped for us (PCP / NAT-PMP / UPnP), each once, in the map's ``endpoints`` list."""
        out = list(local)
        mapped = self._mapper.mapping if self._mapper is not None else None
        for extra in (self._srflx, format_endpoint(*mapped) if mapped is not None else ""):
            if extra and extra not in out:
                out.append(extra)
        return out

    def _stun_servers(self) -> list[tuple[int, str, HostPort]]:
        if self._relay is None or "stun" not in self._relay.fallback:
            return []
        return [(g.id, g.name, (g.host, g.stun_port)) for g in self._relay.regions if g.stun_port]

    async def netcheck(self) -> NetcheckResult | None:
        """STUN every region from WireGuard's port now; None when the raw socket is not available."""
        if self._port is None:
            return None
        result = await self._port.netcheck(self._stun_servers())
        self._note_srflx(result.public_endpoint)
        if self._bd is not None and result.udp:
            self._bd.set_mapping(result.mapping)
        return result

    def _note_srflx(self, endpoint: str) -> None:
        if endpoint and endpoint != self._srflx:
            log.info("public endpoint %s (STUN from WireGuard's port)", endpoint)
            self._srflx = endpoint
            self._on_status()

    def _on_check(self, src: HostPort, from_key: str) -> None:
        self._pm.learn(from_key, src, self._loop.time())
        self._wake.set()

    def _on_route(self, key: str, remote: HostPort) -> None:
        # WireGuard's packets to the peer's endpoint now leave from the port a birthday probe opened:
        # check it now instead of after the candidate's backoff.
        self._pm.check_soon(key, remote, self._loop.time())
        self._wake.set()

    async def _check(self, key: str, addr: HostPort) -> None:
        rtt = None
        if self._port is not None:
            rtt = await self._port.check(addr, key, timeout=CHECK_TIMEOUT)
        if self._pm.result(key, addr, rtt, self._loop.time()):
            d = self._pm.direct(key)
            log.info("peer %s…: %s", key[:8], f"direct via {format_endpoint(*addr)}" if d else "relayed")
            self._on_paths()

    async def _run(self) -> None:
        next_stun = 0.0
        while True:
            now = self._loop.time()
            dead = self._pm.tick(now)
            for key in dead:
                log.info("peer %s…: direct path lost, relayed", key[:8])
            if dead:
                self._on_paths()
            for key, addr in self._pm.due(now):
                task = asyncio.create_task(self._check(key, addr))
                self._checks.add(task)
                task.add_done_callback(self._checks.discard)
            if self._port is not None and now >= next_stun and self._stun_servers():
                next_stun = now + STUN_INTERVAL
                task = asyncio.create_task(self._stun_once())
                self._checks.add(task)
                task.add_done_callback(self._checks.discard)
            nxt = self._pm.next_due()
            if self._bd is not None and self._pm.enabled:
                bd_next = self._bd.step({k: self._pm.direct(k) is not None for k in self._pm.peers()}, now)
                nxt = bd_next if nxt is None or (bd_next is not None and bd_next < nxt) else nxt
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
        await self._proxy.close()
        if self._bd is not None:
            await self._bd.close()
        if self._mapper is not None:
            await self._mapper.close()
        if self._port is not None:
            self._port.close()
