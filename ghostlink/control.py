"""The coordination client (grpc.aio) and the node daemon loop.

``CoordClient`` wraps the four Coordination RPCs ghostlink uses. Every call but GetServerInfo carries a
proof of possession of the node key (``ghostcore.nodeauth.make_metadata``) bound to the call's full
method path, as ``coordination.proto`` describes.

``Daemon`` owns the reconcile loop (design brief, principles 3 and 5):

* connect, open ``Sync``; each ``MapUpdate`` goes through ``engine``: NetMap -> desired state ->
  ``plan(applied, desired)``; only the plan is applied to the WireGuard backend and the net layer;
* after the first map of a stream and whenever the host's endpoints change: ``ReportStatus``;
* when the stream fails, nothing is torn down: the interface and peers stay exactly as they are, so
  tunnels keep working on the last map. Reconnects back off (``ghostcore.aio.Backoff``) forever; on
  reconnect the new full map is diffed against what is applied, so unchanged peers are not touched.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc

from ghostcore.aio import Backoff
from ghostcore.errors import GhostError, ProtocolError, Unavailable
from ghostcore.grpcerr import from_rpc_error
from ghostcore.keys import PrivateKey, PublicKey
from ghostcore.nodeauth import MD_PROOF, MD_TS, make_metadata
from ghostcore.pb.ghostmesh.v1 import coordination_pb2, coordination_pb2_grpc
from ghostlink import engine
from ghostlink.exitroute import ExitRouting
from ghostlink.forwarding import Forwarding, is_router
from ghostlink.net import NetLayer
from ghostlink.nft import NftFirewall
from ghostlink.wg.base import WireGuardBackend

if TYPE_CHECKING:
    from ghostlink.traversal import Traversal

log = logging.getLogger(__name__)

SERVICE = "/ghostmesh.v1.Coordination"
M_REGISTER = f"{SERVICE}/Register"
M_WAIT_LOGIN = f"{SERVICE}/WaitForLogin"
LOGIN_WAIT_MAX = 86400.0 + 60.0  # the server ends a login after its oidc.login_timeout (at most 24h)
M_SYNC = f"{SERVICE}/Sync"
M_REPORT = f"{SERVICE}/ReportStatus"
M_ROTATE = f"{SERVICE}/RotateKey"
M_ROTATE_NEW = f"{M_ROTATE}#new"  # what RotateKeyRequest.new_key_proof is bound to (coordination.proto)
ENDPOINT_GUARD_INTERVAL = 0.5  # how soon an endpoint WireGuard roamed away from the chosen path is put back
MAX_MESSAGE = 64 * 1024 * 1024  # a full map of 10k peers is a few MiB; bound it anyway

CHANNEL_OPTIONS = (
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    # Keepalive pings notice a silently vanished server (a partition; a killed server resets the TCP
    # connection at once). 5 min is the most frequent rate a default gRPC server accepts
    # (GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS); faster pings earn GOAWAY "too_many_pings",
    # which would drop the Sync stream over and over.
    ("grpc.keepalive_time_ms", 300_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.initial_reconnect_backoff_ms", 500),
    ("grpc.max_reconnect_backoff_ms", 5_000),
)


def now_ms() -> int:
    return int(time.time() * 1000)


class CoordClient:
    """One channel to ghostmesh. ``server_key`` is None only before GetServerInfo at join."""

    def __init__(
        self, target: str, key: PrivateKey, server_key: PublicKey | None = None, timeout: float = 5.0
    ) -> None:
        self.target = target
        self.key = key
        self.server_key = server_key
        self.timeout = timeout
        self.channel = grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
        self.stub = coordination_pb2_grpc.CoordinationStub(self.channel)
        # What this node offers as a router; every status report carries the whole set (the server
        # treats a report as complete, so a report without them would withdraw them).
        self.advertise_routes: list[str] = []
        self.advertise_exit_node = False
        # The relay region this node is connected to and its TURN address (ghostlink.traversal): every
        # report carries them too, for the same reason.
        self.home_region = 0
        self.turn_relay = ""

    async def close(self) -> None:
        await self.channel.close(grace=None)

    def _md(self, method: str, key: PrivateKey | None = None) -> tuple[tuple[str, str], ...]:
        if self.server_key is None:
            raise ProtocolError("internal: the server key is not pinned yet (GetServerInfo first)")
        return make_metadata(key or self.key, self.server_key, method, now_ms())

    def _err(self, exc: grpc.RpcError) -> GhostError:
        return from_rpc_error(exc, self.target)

    async def server_info(self) -> coordination_pb2.ServerInfo:
        try:
            info: coordination_pb2.ServerInfo = await self.stub.GetServerInfo(
                coordination_pb2.GetServerInfoRequest(), timeout=self.timeout, wait_for_ready=True
            )
        except grpc.RpcError as exc:
            if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                detail = (exc.details() or "").splitlines()[0] if exc.details() else ""
                if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    detail = f"no answer within {self.timeout:g}s"
                raise Unavailable(
                    f"cannot reach ghostmesh at {self.target}: {detail}; "
                    "check --server and that ghostmesh is running"
                ) from None
            raise self._err(exc) from None
        return info

    async def pin_server_key(self, expected: str | None = None) -> PublicKey:
        """GetServerInfo and pin its key; if ``expected`` (a saved pin) differs, refuse."""
        info = await self.server_info()
        try:
            key = PublicKey.from_base64(info.server_key)
        except GhostError:
            raise ProtocolError(f"ghostmesh at {self.target} sent an invalid server key") from None
        if expected is not None and key.base64() != expected:
            raise ProtocolError(
                f"ghostmesh at {self.target} presents key {key.short()}…, not the pinned {expected[:8]}…; "
                "if the server was reinstalled, remove the state directory and join again"
            )
        self.server_key = key
        return key

    async def register(self, auth_key: str, hostname: str) -> coordination_pb2.Node:
        node, _ = await self.register_or_login(auth_key, hostname)
        return node

    async def register_or_login(self, auth_key: str, hostname: str) -> tuple[coordination_pb2.Node, str]:
        """Register; ``(node, "")``, or with an OIDC server and no auth key ``(empty node, auth_url)``:
        the user opens the URL and :meth:`wait_for_login` returns the node."""
        try:
            resp: coordination_pb2.RegisterResponse = await self.stub.Register(
                coordination_pb2.RegisterRequest(auth_key=auth_key, hostname=hostname),
                metadata=self._md(M_REGISTER),
                timeout=self.timeout,
            )
        except grpc.RpcError as exc:
            raise self._err(exc) from None
        return resp.node, resp.auth_url

    async def wait_for_login(self) -> coordination_pb2.Node:
        """WaitForLogin: returns once the user logged in (the server bounds the wait); AuthError if the
        login failed or expired."""
        try:
            resp: coordination_pb2.RegisterResponse = await self.stub.WaitForLogin(
                coordination_pb2.WaitForLoginRequest(),
                metadata=self._md(M_WAIT_LOGIN),
                timeout=LOGIN_WAIT_MAX,
            )
        except grpc.RpcError as exc:
            raise self._err(exc) from None
        return resp.node

    async def rotate_key(self, new: PrivateKey) -> coordination_pb2.Node:
        """RotateKey: our current key proven in the metadata, ``new`` proven in the body."""
        md = self._md(M_ROTATE)
        new_md = dict(self._md(M_ROTATE_NEW, new))  # the same MAC as metadata, made with the new key
        req = coordination_pb2.RotateKeyRequest(
            new_node_key=new.public_key().base64(),
            new_ts_ms=int(new_md[MD_TS]),
            new_key_proof=base64.b64decode(new_md[MD_PROOF]),
        )
        try:
            resp: coordination_pb2.RotateKeyResponse = await self.stub.RotateKey(
                req, metadata=md, timeout=self.timeout
            )
        except grpc.RpcError as exc:
            raise self._err(exc) from None
        return resp.node

    def sync(self) -> grpc.aio.UnaryStreamCall[coordination_pb2.SyncRequest, coordination_pb2.MapUpdate]:
        return self.stub.Sync(coordination_pb2.SyncRequest(), metadata=self._md(M_SYNC))

    async def report_status(self, endpoints: list[str], key: PrivateKey | None = None) -> None:
        """ReportStatus, proven with ``key`` if given (a pending rotated key), else ours."""
        try:
            await self.stub.ReportStatus(
                coordination_pb2.StatusReport(
                    endpoints=endpoints,
                    advertised_routes=self.advertise_routes,
                    advertise_exit_node=self.advertise_exit_node,
                    home_region=self.home_region,
                    turn_relay=self.turn_relay,
                ),
                metadata=self._md(M_REPORT, key),
                timeout=self.timeout,
            )
        except grpc.RpcError as exc:
            raise self._err(exc) from None


@dataclass
class DaemonStatus:
    connected: bool = False
    last_error: str = ""
    last_map_unix: int = 0
    listen_port: int = 0


class Daemon:
    """The node agent's main loop. Backend and net layer are injected (tests pass fakes)."""

    def __init__(
        self,
        client: CoordClient,
        backend: WireGuardBackend,
        net: NetLayer,
        *,
        key: PrivateKey,
        listen_port: int,
        mtu: int = 1280,
        reconnect_max: float = 30.0,
        endpoint_interval: float = 10.0,
        on_up: Callable[[engine.NodeInfo], None] | None = None,
        firewall: NftFirewall | None = None,
        forwarding: Forwarding | None = None,
        exit_routing: ExitRouting | None = None,
        exit_node: str = "",
        traversal: bool = False,
    ) -> None:
        self.client = client
        self.use_traversal = (
            traversal  # NAT traversal + relays (needs raw sockets: off in fake-backend tests)
        )
        self.traversal: Traversal | None = None
        self.firewall = firewall  # enforces the map's inbound filter (None: tests with fake backends)
        self.forwarding = forwarding  # IP forwarding while this node routes for the mesh (None: tests)
        self.exit_routing = exit_routing  # default route via the chosen exit node (None: tests)
        self.exit_node = exit_node  # the peer chosen as exit node ("": none)
        self.backend = backend
        self.net = net
        self.key = key
        self.listen_port = listen_port
        self.mtu = mtu
        self.backoff = Backoff(initial=0.5, maximum=reconnect_max)
        self.endpoint_interval = endpoint_interval
        self.on_up = on_up
        self.netmap = engine.NetMap()
        self.applied = engine.DesiredState()
        self.status = DaemonStatus()
        self.reported: tuple[list[str], int, str] | None = None  # (endpoints, home region, TURN address)
        self.sessions = 0  # Sync streams opened (tests watch reconnects)
        self._lock = asyncio.Lock()
        self._announced = False
        self._stop = asyncio.Event()
        self._kicks: dict[str, asyncio.Task[None]] = {}
        self._guard: asyncio.Task[None] | None = None
        self._kick_again: set[str] = set()
        # Key rotation (ghostlink.rotate): run before each Sync stream (finishes a rotation left pending).
        self.before_session: Callable[[], Awaitable[None]] | None = None

    async def start(self) -> None:
        """Bring the interface up (before any map arrives, so the port is bound and reportable)."""
        await self.backend.up(self.key, self.listen_port, self.mtu)
        dev = await self.backend.read()
        self.status.listen_port = dev.listen_port or self.listen_port
        if self.use_traversal:
            # imported here: aioquic and the raw-socket code load only in a daemon that uses them
            from ghostlink.traversal import Traversal  # noqa: PLC0415

            self.traversal = Traversal(
                wg_port=self.status.listen_port,
                key=self.key,
                on_paths=lambda: self._kick("reconcile", self.reconcile),
                on_status=lambda: self._kick("report", self._report_if_connected),
            )
            await self.traversal.start()

            self._guard = asyncio.create_task(self._guard_endpoints())

    async def close(self) -> None:
        """Stop NAT traversal and the relay proxy (WireGuard itself is the backend's to close)."""
        for task in [*self._kicks.values(), *([self._guard] if self._guard is not None else [])]:
            task.cancel()
        if self.traversal is not None:
            await self.traversal.close()

    async def reassert_endpoints(self) -> int:
        """Put back the endpoints WireGuard roamed away from; returns how many.

        WireGuard moves a peer's endpoint to wherever its last authenticated packet came from (roaming).
        While the two ends switch paths at slightly different moments, a packet relayed by the proxy
        can move an end that already chose the direct path back to the proxy's socket (or a stray direct
        packet can move a relayed end to a dead path), and nothing would move it back: the path choice
        of ghostlink.paths is what WireGuard must use. Only peers whose endpoint traversal chose are
        checked (one UAPI get), and only the endpoint is set again: the session is kept.
        """
        chosen = self.traversal.endpoints() if self.traversal is not None else {}
        if not chosen:
            return 0  # nothing chosen by traversal: no UAPI read every guard interval
        async with self._lock:
            dev = await self.backend.read()
            stale = [
                spec
                for key, spec in self.applied.peers.items()
                if spec.endpoint is not None
                and chosen.get(key) == spec.endpoint
                and key in dev.peers
                and dev.peers[key].endpoint not in (None, spec.endpoint)
            ]
            if stale:
                for spec in stale:
                    log.debug(
                        "peer %s…: WireGuard roamed to %s, back to %s",
                        spec.public_key[:8],
                        dev.peers[spec.public_key].endpoint,
                        spec.endpoint,
                    )
                await self.backend.apply(
                    engine.Plan(
                        peers_update=tuple(engine.PeerUpdate(s, frozenset({"endpoint"})) for s in stale)
                    )
                )
            return len(stale)

    async def _guard_endpoints(self) -> None:
        while True:
            await asyncio.sleep(ENDPOINT_GUARD_INTERVAL)
            try:
                await self.reassert_endpoints()
            except (GhostError, OSError) as exc:
                log.debug("endpoint check failed: %s", exc)

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
        if self.status.connected:
            await self.report_endpoints()

    async def on_backend_restart(self) -> None:
        """wireguard-go was restarted: its new TUN has no addresses or routes; re-add them."""
        async with self._lock:
            self.applied = engine.DesiredState(peers=dict(self.applied.peers))
        await self.reconcile()

    async def reconcile(self) -> engine.Plan:
        async with self._lock:
            me = self.netmap.self_node
            router = me is not None and is_router(me.primary_routes, me.exit_node)
            if self.firewall is not None and self.netmap.filter is not None:
                # before the peers: a new peer must never meet a filter older than the map naming it
                await self.firewall.apply(self.netmap.filter, masquerade=router)  # unchanged: no nft call
            if self.forwarding is not None:
                await self.forwarding.apply(router)
            paths = self.traversal.endpoints() if self.traversal is not None else None
            desired = engine.desired_state(self.netmap, self.exit_node, paths)
            p = engine.plan(self.applied, desired)
            if not p.empty:
                log.debug("applying plan: %s", p.summary())
                await self.backend.apply(p)
                await self.net.apply(p)
                self.applied = engine.applied_after(self.applied, p)
                if self.traversal is not None:  # WireGuard knows the new peers now: hand it their handshakes
                    self.traversal.proxy.deliver_held()
            if self.exit_routing is not None:  # after the peer got its 0.0.0.0/0: never a blackhole
                active = engine.chosen_exit(self.netmap, self.exit_node) is not None
                await self.exit_routing.apply(active, engine.endpoint_hosts(self.netmap))
            return p

    async def report_endpoints(self, force: bool = False) -> None:
        eps = await self.net.local_endpoints(self.status.listen_port)
        if self.traversal is not None:
            eps = self.traversal.candidates(eps)
            self.client.home_region = self.traversal.proxy.home_region
            self.client.turn_relay = self.traversal.proxy.turn_relay
        report = (eps, self.client.home_region, self.client.turn_relay)
        if force or report != self.reported:
            await self.client.report_status(eps)
            log.info(
                "reported endpoints %s, home region %d%s",
                ",".join(eps) or "(none)",
                self.client.home_region,
                f", TURN {self.client.turn_relay}" if self.client.turn_relay else "",
            )
            self.reported = report

    async def _endpoint_watch(self) -> None:
        while True:
            await asyncio.sleep(self.endpoint_interval)
            try:
                await self.report_endpoints()
            except GhostError as exc:
                log.debug("endpoint report failed: %s", exc)  # the session loop reports connection errors

    async def session(self) -> None:
        """One Sync stream, until it fails. Raises GhostError; never tears down WireGuard state."""
        if self.before_session is not None:
            await self.before_session()
        self.netmap.begin_stream()
        self.sessions += 1
        call = self.client.sync()
        watcher: asyncio.Task[None] | None = None
        try:
            async for update in call:
                self.netmap.apply(update)
                self.status.last_map_unix = int(time.time())
                if self.traversal is not None:
                    await self.traversal.update(self.netmap)
                await self.reconcile()
                if not self.status.connected:
                    self.status.connected = True
                    self.status.last_error = ""
                    self.backoff.reset()
                    log.info(
                        "connected to ghostmesh at %s (map serial %d, %d peers)",
                        self.client.target,
                        self.netmap.serial,
                        len(self.netmap.peers),
                    )
                    await self.report_endpoints(force=True)
                    watcher = asyncio.create_task(self._endpoint_watch())
                    if not self._announced and self.on_up is not None and self.netmap.self_node is not None:
                        self._announced = True
                        self.on_up(self.netmap.self_node)
            raise Unavailable(f"ghostmesh at {self.client.target} closed the map stream")
        except grpc.RpcError as exc:
            raise self.client._err(exc) from None
        finally:
            self.status.connected = False
            call.cancel()
            if watcher is not None:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher

    async def run(self) -> None:
        """Sessions forever, with backoff between them, until ``stop()``."""
        while not self._stop.is_set():
            try:
                await self.session()
            except GhostError as exc:
                # The same failure repeated every backoff step is logged once at warning, then at debug.
                level = logging.DEBUG if str(exc) == self.status.last_error else logging.WARNING
                self.status.last_error = str(exc)
                log.log(level, "map stream: %s; keeping the last map and WireGuard state, retrying", exc)
            except (OSError, ValueError) as exc:  # e.g. netlink refused a route: retry the whole sync
                self.status.last_error = f"applying the map failed: {exc}"
                log.warning("applying the map failed: %s; retrying", exc, exc_info=True)
            delay = self.backoff.next()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), delay)

    def stop(self) -> None:
        self._stop.set()
