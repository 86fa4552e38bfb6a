"""The node daemon: the reconcile loop, and the narrow API the local API and key rotation use.

``Daemon`` owns the node's view of the mesh (the NetMap), what is applied to WireGuard and the interface,
the session state (connected, last error, map serial) and the status reports it sends:

* connect (the server's TLS key checked against the pin again after any failure), open ``Sync``; each
  ``MapUpdate`` is folded into the NetMap, admitted (:class:`ghostlink.trust.NodeTrust`: the lock log,
  signatures, what makes sense for this node) and goes through ``engine``: admitted map -> desired state
  -> ``plan(applied, desired)``; only the plan is applied to the WireGuard backend and the net layer, so a
  change never touches (or resets the session of) a peer it does not concern;
* after the first map of a stream, whenever NAT traversal's view changes (public endpoint, home region,
  TURN address) and every ``endpoint_interval``: ``ReportStatus``, with a :class:`StatusReport` built
  from the parts' state at that moment (endpoints from the net layer and traversal, relay state from
  traversal, advertised routes from the config), sent when it differs from the last one;
* when the stream fails, nothing is torn down: the interface and peers stay exactly as they are, so
  tunnels keep working on the last map. Reconnects back off (``ghostcore.aio.Backoff``) forever; on
  reconnect the new full map is diffed against what is applied, so unchanged peers are not touched.

Its parts come in through the constructor: the coordination client, the WireGuard backend, the net layer,
the node key holder, the node's trust, and optionally the firewall, forwarding, exit routing, NAT traversal (a
:data:`PathLayerFactory`, since traversal needs the port WireGuard actually bound), the key rotator and the
node resolver (:class:`DnsLayer`, fed each admitted map).
``localapi`` and ``rotate`` use only the public methods: :meth:`Daemon.status`, :meth:`Daemon.peers`,
:meth:`Daemon.netcheck`, :meth:`Daemon.ping`, :meth:`Daemon.dns_status` (frozen values of
:mod:`ghostlink.status`), :meth:`Daemon.rotate_key`, and for a rotation :meth:`Daemon.switch_key`,
:meth:`Daemon.report`, :meth:`Daemon.last_report`. ``ping``'s echoes go through an injected
:class:`Pinger` (ICMP in :mod:`ghostlink.pinger`; the component tests pass a loopback one).

Why one module of about 550 lines: the session loop, the reconcile step, the reports and the background
tasks share the daemon's state (map, admitted map, applied state, connection); what could live apart
does (admission, trust, status values, rotation, traversal).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from ghostcore import addr
from ghostcore.aio import Backoff
from ghostcore.errors import GhostError, Unavailable
from ghostcore.keys import PrivateKey, PublicKey
from ghostcore.tlschannel import PinMismatch
from ghostlink import engine
from ghostlink.admission import Policy
from ghostlink.client import CoordClient, StatusReport
from ghostlink.exitroute import ExitRouting
from ghostlink.forwarding import Forwarding, is_router
from ghostlink.net import NetLayer
from ghostlink.nft import NftFirewall
from ghostlink.nodekey import NodeKey
from ghostlink.rotate import KeyRotator
from ghostlink.status import DnsStatus, LockView, Netcheck, NodeStatus, PeerStatus, PingResult, resolve_peer
from ghostlink.traversal.path_core import PeerPath
from ghostlink.traversal.proxy_core import RelayStatus
from ghostlink.traversal.stun_core import NetcheckResult
from ghostlink.trust import NodeTrust
from ghostlink.wg.base import WireGuardBackend

log = logging.getLogger(__name__)

ENDPOINT_GUARD_INTERVAL = 0.5  # how soon an endpoint WireGuard roamed away from the chosen path is put back


class PathLayer(Protocol):
    """NAT traversal as the daemon uses it (:class:`ghostlink.traversal.edge.Traversal`)."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def update(self, nm: engine.NetMap) -> None:
        """Fold a new map in (regions, credentials, peers and their candidates)."""

    def endpoints(self) -> dict[str, str]:
        """Peer key -> the endpoint WireGuard should use (direct candidate or relay proxy socket)."""

    def deliver_held(self) -> None:
        """WireGuard knows the map's peers now: hand it the handshakes held for them."""

    def rekey(self) -> None:
        """The node key holder was switched: read it again."""

    def candidates(self, local: list[str]) -> list[str]:
        """The endpoints to report: ``local`` and what STUN found."""

    def relay_status(self) -> RelayStatus: ...

    def path(self, key: str) -> PeerPath: ...

    async def netcheck(self) -> NetcheckResult | None: ...


class DnsLayer(Protocol):
    """The node resolver and the host's use of it (:class:`ghostlink.magicdns.MagicDns`)."""

    async def start(self) -> None: ...

    async def close(self) -> None:
        """Put the host's resolver settings back, stop serving."""

    async def update(self, nm: engine.NetMap) -> None:
        """Serve the names of the admitted map (and point the host at the resolver, or back)."""

    async def interface_reset(self) -> None:
        """The WireGuard interface was re-created: add the resolver addresses again."""

    def status(self) -> DnsStatus: ...


class Pinger(Protocol):
    """An echo to a peer's overlay address through the tunnel (:class:`ghostlink.pinger.IcmpPinger`)."""

    async def echo(self, address: str, wait: float) -> float | None:
        """The round trip in seconds; None when no answer came within ``wait`` seconds."""


# (WireGuard's bound port, on_paths: reconcile soon, on_status: report soon) -> the node's NAT traversal.
PathLayerFactory = Callable[[int, Callable[[], None], Callable[[], None]], PathLayer]


class Daemon:
    """The node agent's main loop; see the module docstring. Backend and net layer are injected (tests pass
    fakes); ``keys`` must be the holder ``client`` proves with."""

    def __init__(
        self,
        client: CoordClient,
        backend: WireGuardBackend,
        net: NetLayer,
        *,
        keys: NodeKey,
        trust: NodeTrust,
        listen_port: int,
        mtu: int = 1280,
        reconnect_max: float = 30.0,
        endpoint_interval: float = 10.0,
        on_up: Callable[[engine.NodeInfo], None] | None = None,
        firewall: NftFirewall | None = None,
        forwarding: Forwarding | None = None,
        exit_routing: ExitRouting | None = None,
        exit_node: str = "",
        accept_routes: bool = False,
        advertise_routes: Sequence[str] = (),
        advertise_exit_node: bool = False,
        paths: PathLayerFactory | None = None,
        rotator: KeyRotator | None = None,
        key_rotation: float = 0.0,
        pinger: Pinger | None = None,
        dns: DnsLayer | None = None,
    ) -> None:
        self._client = client
        self._backend = backend
        self._net = net
        self._keys = keys
        self._listen_port = listen_port  # as configured until start(), then as WireGuard bound it
        self._mtu = mtu
        self._backoff = Backoff(initial=0.5, maximum=reconnect_max)
        self._endpoint_interval = endpoint_interval
        self._on_up = on_up
        self._firewall = firewall  # enforces the map's inbound filter (None: tests with fake backends)
        self._forwarding = forwarding  # IP forwarding while this node routes for the mesh (None: tests)
        self._exit_routing = exit_routing  # default route via the chosen exit node (None: tests)
        self._exit_node = exit_node  # the peer chosen as exit node ("": none)
        self._trust = trust  # what of each map this node installs (and the lock it verified)
        self._policy = Policy(exit_node=exit_node, accept_routes=accept_routes)
        # What this node offers as a router; every status report carries the whole set.
        self._advertise_routes = tuple(advertise_routes)
        self._advertise_exit_node = advertise_exit_node
        self._make_paths = paths  # NAT traversal + relays (needs raw sockets: None in fake-backend tests)
        self._paths: PathLayer | None = None
        self._rotator = rotator
        self._key_rotation = key_rotation  # rotate automatically once the key is this old (0: never)
        self._pinger = pinger  # ghostctl ping's echoes (None: tests without a tunnel)
        self._dns = dns  # the node resolver (None: tests, or no resolver)
        self._netmap = engine.NetMap()  # the map as ghostmesh sent it
        self._admitted = engine.NetMap()  # the part of it this node installs (ghostlink.admission)
        self._applied = engine.DesiredState()
        self._connected = False
        self.endpoint_switches = 0  # peers' WireGuard endpoints changed by a reconcile (metrics)
        self.endpoint_reasserts = 0  # endpoints put back after WireGuard roamed away (metrics)
        self._device_up = False  # start() brought WireGuard up (what /readyz needs besides a connection)
        self._last_error = ""
        self._last_map_unix = 0
        self._sessions = 0
        self._reconnect = False  # a stream failed: open the channel again (re-checking the pin) first
        self._reported: StatusReport | None = None
        self._lock = asyncio.Lock()
        self._announced = False
        self._stop = asyncio.Event()
        self._kicks: dict[str, asyncio.Task[None]] = {}
        self._kick_again: set[str] = set()
        self._tasks: list[asyncio.Task[None]] = []  # the endpoint guard, automatic key rotation

    # ----- life

    async def start(self) -> None:
        """Bring the interface up (before any map arrives, so the port is bound and reportable)."""
        await self._backend.up(
            self._keys.private, self._listen_port, self._mtu, on_restart=self._on_backend_restart
        )
        dev = await self._backend.read()
        self._listen_port = dev.listen_port or self._listen_port
        if self._make_paths is not None:
            self._paths = self._make_paths(
                self._listen_port,
                lambda: self._kick("reconcile", self._reconcile),
                lambda: self._kick("report", self._report_if_connected),
            )
            await self._paths.start()
            self._tasks.append(asyncio.create_task(self._guard_endpoints()))
        if self._rotator is not None and self._key_rotation > 0:
            self._tasks.append(asyncio.create_task(self._auto_rotate(self._rotator, self._key_rotation)))
        if self._dns is not None:
            await self._dns.start()
        self._device_up = True

    async def run(self) -> None:
        """Sessions forever, with backoff between them, until ``stop()``."""
        while not self._stop.is_set():
            try:
                await self._session()
            except GhostError as exc:
                # The same failure repeated every backoff step is logged once at warning, then at debug.
                # A server presenting another TLS key is worth an error every time: an attack, or a
                # reinstalled server that needs `ghostlink run --pin`.
                level = logging.DEBUG if str(exc) == self._last_error else logging.WARNING
                if isinstance(exc, PinMismatch):
                    level = logging.ERROR
                self._last_error = str(exc)
                log.log(level, "map stream: %s; keeping the last map and WireGuard state, retrying", exc)
            except (OSError, ValueError) as exc:  # e.g. netlink refused a route: retry the whole sync
                self._last_error = f"applying the map failed: {exc}"
                log.warning("applying the map failed: %s; retrying", exc, exc_info=True)
            self._reconnect = True
            delay = self._backoff.next()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), delay)

    def stop(self) -> None:
        self._stop.set()

    async def close(self) -> None:
        """Stop NAT traversal, the relay proxy and the background tasks (WireGuard itself is the backend's
        to close)."""
        tasks = [*self._kicks.values(), *self._tasks]
        for task in tasks:
            task.cancel()
        # Whatever a task ended with, shutdown goes on (the backend, firewall and routes are closed next).
        for result in await asyncio.gather(*tasks, return_exceptions=True):
            if isinstance(result, Exception):
                log.error("background task failed", exc_info=result)
        if self._paths is not None:
            await self._paths.close()
        if self._dns is not None:
            await self._dns.close()

    # ----- what ghostctl and the rotator see

    def status(self) -> NodeStatus:
        return NodeStatus(
            server=self._client.target,
            interface=self._backend.ifname,
            backend=self._backend.name,
            node_key=self._keys.public.base64(),
            connected=self._connected,
            last_error=self._last_error,
            last_map_unix=self._last_map_unix,
            listen_port=self._listen_port,
            map_serial=self._netmap.serial,
            sessions=self._sessions,
            self_node=self._netmap.self_node,
            lock=LockView(
                enabled=self._trust.enabled,
                key_signed=self._trust.signed(self._netmap.self_node),
                request=self._trust.request(self._keys.public),
                trusted=tuple(self._trust.trusted_keys()),
                refused=tuple(self._trust.refused()),
                refused_total=self._trust.refused_total,
            ),
        )

    async def peers(self) -> list[PeerStatus]:
        """Every peer this node installed, by name, with WireGuard's counters and the path it takes."""
        dev = await self._backend.read()
        out = []
        me = self._admitted.self_node
        names = {n.id: n.name for n in (*self._admitted.peers.values(), *((me,) if me is not None else ()))}
        for p in sorted(self._admitted.peers.values(), key=lambda n: n.name):
            wg = dev.peers.get(p.node_key)
            out.append(
                PeerStatus(
                    node=p,
                    endpoint=(wg.endpoint or "") if wg else "",
                    latest_handshake_unix=wg.last_handshake_sec if wg else 0,
                    rx_bytes=wg.rx_bytes if wg else 0,
                    tx_bytes=wg.tx_bytes if wg else 0,
                    path=self._paths.path(p.node_key) if self._paths is not None else PeerPath(),
                    via=names.get(p.via, str(p.via)) if p.is_device else "",
                )
            )
        return out

    async def netcheck(self) -> Netcheck | None:
        """STUN every region now; None when NAT traversal (its raw socket) is not available."""
        if self._paths is None:
            return None
        result = await self._paths.netcheck()
        return Netcheck(result, self._paths.relay_status()) if result is not None else None

    async def ping(self, ref: str, wait: float) -> PingResult:
        """One echo to the installed peer ``ref`` names (:func:`ghostlink.status.resolve_peer`), timed, and
        the path its packets take right after it (the echo may itself have woken a path)."""
        if self._pinger is None:
            raise Unavailable("ping is not available in this ghostlink")
        node, address = resolve_peer(self._admitted.peers.values(), ref)
        rtt = await self._pinger.echo(address, wait)
        dev = await self._backend.read()
        wg = dev.peers.get(node.node_key)
        path = self._paths.path(node.node_key) if self._paths is not None else PeerPath()
        return PingResult(node, address, rtt, (wg.endpoint or "") if wg else "", path)

    async def rotate_key(self) -> tuple[PublicKey, PublicKey]:
        """Rotate the node key now (:mod:`ghostlink.rotate`); returns (old, new)."""
        if self._rotator is None:
            raise Unavailable("key rotation is not available in this ghostlink")
        return await self._rotator.rotate(self)

    async def switch_key(self, new: PrivateKey) -> None:
        """The node key becomes ``new``: WireGuard's private key (only if it differs), then the holder the
        client's proofs read, then NAT traversal's checks."""
        if self._keys.public != new.public_key():
            await self._backend.set_private_key(new)
        self._keys.switch(new)
        if self._paths is not None:
            self._paths.rekey()

    def dns_status(self) -> DnsStatus:
        """What the node resolver serves; Unavailable when this ghostlink runs none."""
        if self._dns is None:
            raise Unavailable("this ghostlink runs no resolver")
        return self._dns.status()

    @property
    def device_up(self) -> bool:
        return self._device_up

    def relay_status(self) -> RelayStatus:
        """The home relay region and how it is reached (nothing when NAT traversal is off)."""
        return self._paths.relay_status() if self._paths is not None else RelayStatus()

    def sign_new_key(self, new: PublicKey) -> bytes:
        """The signature a rotation to ``new`` carries (empty while node-key signing is off)."""
        return self._trust.rotation_signature(self._netmap.self_node, new)

    def last_report(self) -> StatusReport:
        """The last status report sent; before the first one, what it would say without endpoints."""
        return self._reported if self._reported is not None else self._status_report(())

    async def report(self, *, force: bool = False) -> None:
        """Report the node's status now if it changed since the last report (always with ``force``)."""
        eps = await self._net.local_endpoints(self._listen_port)
        if self._paths is not None:
            eps = self._paths.candidates(eps)
        report = self._status_report(tuple(eps))
        if force or report != self._reported:
            await self._client.report_status(report)
            log.info(
                "reported endpoints %s, home region %d%s",
                ",".join(report.endpoints) or "(none)",
                report.home_region,
                f", TURN {report.turn_relay}" if report.turn_relay else "",
            )
            self._reported = report

    def _status_report(self, endpoints: tuple[str, ...]) -> StatusReport:
        relay = self._paths.relay_status() if self._paths is not None else RelayStatus()
        return StatusReport(
            endpoints=endpoints,
            advertised_routes=self._advertise_routes,
            advertise_exit_node=self._advertise_exit_node,
            home_region=relay.home_region,
            turn_relay=relay.turn_relay,
        )

    # ----- the session

    async def _session(self) -> None:
        """One Sync stream, until it fails. Raises GhostError; never tears down WireGuard state."""
        if self._reconnect:
            await self._client.connect()
            self._reconnect = False
        if self._rotator is not None:
            await self._rotator.resume(self)
        self._netmap.begin_stream()
        self._sessions += 1
        watcher: asyncio.Task[None] | None = None
        try:
            async with contextlib.aclosing(self._client.sync()) as updates:
                async for update in updates:
                    self._netmap.apply(update)
                    self._last_map_unix = int(time.time())
                    self._trust.observe_log(self._netmap.lock_log)
                    self._admitted = self._trust.admit(self._netmap, self._policy)
                    if self._paths is not None:
                        await self._paths.update(self._admitted)
                    await self._reconcile()
                    if self._dns is not None:  # after the peers: a name resolves once it is reachable
                        await self._dns.update(self._admitted)
                    if not self._connected:
                        watcher = await self._on_connected()
        finally:
            self._connected = False
            if watcher is not None:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher

    async def _on_connected(self) -> asyncio.Task[None]:
        """The first map of a stream is applied: report, announce once, watch the endpoints."""
        self._connected = True
        self._last_error = ""
        self._backoff.reset()
        log.info(
            "connected to ghostmesh at %s (map serial %d, %d peers)",
            self._client.target,
            self._netmap.serial,
            len(self._netmap.peers),
        )
        await self.report(force=True)
        watcher = asyncio.create_task(self._endpoint_watch())
        me = self._netmap.self_node
        if not self._announced and self._on_up is not None and me is not None:
            self._announced = True
            self._on_up(me)
        return watcher

    async def _reconcile(self) -> engine.Plan:
        async with self._lock:
            nm = self._admitted
            me = nm.self_node
            devices = me.device_prefixes if me is not None else ()
            own = tuple(addr.host_prefix(addr.parse_ip(a)) for a in me.addresses) if me is not None else ()
            router = me is not None and is_router(me.primary_routes, me.exit_node)
            if self._firewall is not None and nm.filter is not None:
                # before the peers: a new peer must never meet a filter older than the map naming it
                await self._firewall.apply(nm.filter, masquerade=router, devices=devices, own=own)
            if self._forwarding is not None:
                await self._forwarding.apply(router or bool(devices))  # a gateway forwards for its devices
            paths = self._paths.endpoints() if self._paths is not None else None
            desired = engine.desired_state(nm, self._exit_node, paths)
            p = engine.plan(self._applied, desired)
            if not p.empty:
                log.debug("applying plan: %s", p.summary())
                await self._backend.apply(p)
                await self._net.apply(p)
                self._applied = engine.applied_after(self._applied, p)
                # a peer's endpoint changed: traversal switched its path (or the map moved it)
                self.endpoint_switches += sum(1 for u in p.peers_update if "endpoint" in u.fields)
                if self._paths is not None:  # WireGuard knows the new peers now: hand it their handshakes
                    self._paths.deliver_held()
            if self._exit_routing is not None:  # after the peer got its 0.0.0.0/0: never a blackhole
                active = engine.chosen_exit(nm, self._exit_node) is not None
                await self._exit_routing.apply(active, engine.endpoint_hosts(nm))
            return p

    async def _on_backend_restart(self) -> None:
        """wireguard-go was restarted: its new TUN has no addresses or routes; re-add them."""
        async with self._lock:
            self._applied = engine.DesiredState(peers=dict(self._applied.peers))
        await self._reconcile()
        if self._dns is not None:
            await self._dns.interface_reset()

    # ----- background work

    async def _reassert_endpoints(self) -> int:
        """Put back the endpoints WireGuard roamed away from (:func:`engine.reassert_plan`); returns how many.

        WireGuard moves a peer's endpoint to wherever its last authenticated packet came from (roaming).
        While the two ends switch paths at slightly different moments, a packet relayed by the proxy
        can move an end that already chose the direct path back to the proxy's socket (or a stray direct
        packet can move a relayed end to a dead path), and nothing would move it back: the path choice
        of NAT traversal is what WireGuard must use. Only peers whose endpoint traversal chose are
        checked (one UAPI get), and only the endpoint is set again: the session is kept.
        """
        chosen = self._paths.endpoints() if self._paths is not None else {}
        if not chosen:
            return 0  # nothing chosen by traversal: no UAPI read every guard interval
        async with self._lock:
            dev = await self._backend.read()
            current = {key: peer.endpoint for key, peer in dev.peers.items()}
            p = engine.reassert_plan(self._applied, current, chosen)
            for u in p.peers_update:
                key = u.spec.public_key
                log.debug(
                    "peer %s…: WireGuard roamed to %s, back to %s", key[:8], current[key], u.spec.endpoint
                )
            if not p.empty:
                await self._backend.apply(p)
            self.endpoint_reasserts += len(p.peers_update)
            return len(p.peers_update)

    async def _guard_endpoints(self) -> None:
        while True:
            await asyncio.sleep(ENDPOINT_GUARD_INTERVAL)
            try:
                await self._reassert_endpoints()
            except (GhostError, OSError) as exc:
                log.debug("endpoint check failed: %s", exc)

    async def _endpoint_watch(self) -> None:
        while True:
            await asyncio.sleep(self._endpoint_interval)
            try:
                await self.report()
            except GhostError as exc:
                log.debug("endpoint report failed: %s", exc)  # the session loop reports connection errors

    async def _auto_rotate(self, rotator: KeyRotator, interval: float) -> None:
        """Automatic rotation: rotate whenever the key is ``interval`` old, while connected."""
        period = rotator.check_interval(interval)
        while True:
            await asyncio.sleep(period)
            if not self._connected or not rotator.due(interval):
                continue
            try:
                await rotator.rotate(self)
            except GhostError as exc:
                log.warning("automatic key rotation failed: %s; retrying in %.0fs", exc, period)

    def _kick(self, name: str, job: Callable[[], Awaitable[object]]) -> None:
        """Run ``job`` soon in the background; kicks while it runs make it run once more after."""
        task = self._kicks.get(name)
        if task is not None and not task.done():
            self._kick_again.add(name)
            return
        self._kicks[name] = asyncio.create_task(self._kicked(name, job))

    async def _kicked(self, name: str, job: Callable[[], Awaitable[object]]) -> None:
        while True:
            self._kick_again.discard(name)
            try:
                await job()
            except (GhostError, OSError, ValueError) as exc:
                log.warning("%s after a path change failed: %s", name, exc)
            if name not in self._kick_again:
                return

    async def _report_if_connected(self) -> None:
        if self._connected:
            await self.report()
