"""Assembling and running the ghostmesh gRPC server (the I/O edge): store, state, policy, hub, servicers.

One grpc.aio server serves its services on two ports: the TCP ``server.bind`` address (nodes, admin with
an API key, and, with relay regions, the relays watching which nodes are current: RelayControl) and the unix
``server.admin_socket`` (admin without credentials; the socket file is born 0600, so only root reaches it,
also in a shared directory). The TCP port speaks TLS only (gRPC negotiates
TLS 1.2 or 1.3, RFC 8446, with ALPN "h2"); a plain-text client gets no answer. Its certificate is the
configured ``[tls]`` chain or ghostmesh's own self-signed one (:mod:`ghostmesh.tls`); clients trust it by
the pin of its key (``sha256:…``, logged at start, in ``GetServerIdentity`` and in every key created) or,
for a CA's certificate, by the CA. The unix socket stays plain: it never leaves the machine.

What bounds the load (``[limits]``): every call passes :class:`ghostmesh.api.guard.CallGuard` (calls in
flight per source and in total, sources failing to authenticate), and the server options
(:func:`server_options`) bound what comes before a call is seen:

- ``grpc.max_allowed_incoming_connections = limits.connections_total``: TCP connections accepted at
  once (gRPC closes any beyond at once); the open-files limit is raised to fit them at start
  (:func:`raise_open_files`), or ghostmesh refuses to start;
- ``grpc.max_concurrent_streams = limits.streams_per_connection``: calls at once on one connection;
- ``grpc.server.max_pending_requests = limits.pending_requests`` (hard limit twice that): calls received
  but not yet taken up by the event loop. After a restart every node reconnects at once, and with
  gRPC's default (1000) part of a burst of more than 1000 streams was CANCELLED;
- ``grpc.server_handshake_timeout_ms``: a connection that does not finish its TLS handshake in 10 s is
  closed, so half-open connections do not hold their slot;
- ``grpc.max_receive_message_length = server.max_message_bytes``: an oversized request is refused with
  RESOURCE_EXHAUSTED before any handler runs;
- keepalive pings so dead nodes' streams are noticed (and their ephemeral grace starts) within a minute.

Wiring, once and in one direction (:func:`start_server`): the store (``[database]``: SQLite or
PostgreSQL, :mod:`ghostmesh.store`) feeds the state and the policy read
at start; the mapper is built with that policy and seeded with the state's nodes and node-key signing
log (as change records); the hub joins state, mapper, audit log and limits; the policy's owner
(:class:`~ghostmesh.policy_source.PolicySource`) is built on the hub, and the servicers on the hub and the
policy's owner. The server's private keys are files in ``server.state_dir`` (:mod:`ghostmesh.keyfiles`),
whichever the database; so is its self-signed TLS certificate unless ``database.path`` puts the SQLite
file elsewhere.

``start_server(cfg)`` is also the programmatic entry used by in-process tests. Its ``reload`` (how to load
the config file again) gives the server a :class:`~ghostmesh.reload.ConfigReloader`, which
:mod:`ghostmesh.app` calls on SIGHUP: ``[dns]`` changes reach running nodes as map deltas.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import resource
import socket
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ghostcore import lock, tlscert
from ghostcore.addr import format_endpoint
from ghostcore.config import parse_hostport
from ghostcore.errors import ConfigError, Unavailable
from ghostcore.files import check_socket_dir, make_private_dir, umask
from ghostcore.keys import PublicKey
from ghostcore.metrics_http import MetricsServer, start_metrics
from ghostcore.pb.ghostmesh.v1 import admin_pb2, admin_pb2_grpc
from ghostcore.policy.model import mesh_ranges
from ghostcore.tlscert import CertPair
from ghostmesh import metrics
from ghostmesh.api.admin import AdminServicer
from ghostmesh.api.coordination import VERSION, CoordinationServicer, add_coordination_to_server
from ghostmesh.api.guard import CallGuard
from ghostmesh.api.relaycontrol import RelayControlServicer, add_relay_control
from ghostmesh.audit import Auditor
from ghostmesh.config import LimitsConfig, MeshConfig
from ghostmesh.dnsmap import dns_map
from ghostmesh.hub import Hub
from ghostmesh.keyfiles import load_audit_key, load_server_key
from ghostmesh.limits import Limits, open_files_needed, open_files_plan
from ghostmesh.mapper import Mapper
from ghostmesh.policy_source import LoadedPolicy, PolicySource, load_policy
from ghostmesh.relaymap import RelayMinter
from ghostmesh.reload import ConfigReloader
from ghostmesh.state import State, StateConfig
from ghostmesh.store.sql import SqlStore
from ghostmesh.store.sqlite import SqliteStore
from ghostmesh.tls import CERT_FILE, KEY_FILE, load_identity

if TYPE_CHECKING:
    from ghostmesh.console import ConsoleServer
    from ghostmesh.oidc import OidcService
    from ghostmesh.oidc_client import OidcProvider

log = logging.getLogger(__name__)

_UNIX_PATH_MAX = 107  # sun_path is 108 bytes on Linux, including the NUL
HANDSHAKE_TIMEOUT_MS = 10_000


def server_options(cfg: MeshConfig) -> list[tuple[str, int]]:
    limits = cfg.limits
    return [
        ("grpc.max_receive_message_length", cfg.server.max_message_bytes),
        ("grpc.max_send_message_length", 64 * 1024 * 1024),  # a full map of 10k nodes is a few MB
        ("grpc.max_allowed_incoming_connections", limits.connections_total),
        ("grpc.max_concurrent_streams", limits.streams_per_connection),
        ("grpc.server.max_pending_requests", limits.pending_requests),
        ("grpc.server.max_pending_requests_hard_limit", limits.pending_requests * 2),
        ("grpc.server_handshake_timeout_ms", HANDSHAKE_TIMEOUT_MS),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_pings_without_data", 0),
    ]


def raise_open_files(limits: LimitsConfig) -> int:
    """Raise RLIMIT_NOFILE's soft limit to what ``limits.connections_total`` needs (up to the hard
    limit); the soft limit now in force. ConfigError, one line with the numbers, when the hard limit is
    too low."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = open_files_needed(limits.connections_total)
    plan = open_files_plan(soft, hard, need)
    if plan is None:
        raise ConfigError(
            f"limits.connections_total: {limits.connections_total} connections need {need} open files, "
            f"but RLIMIT_NOFILE's hard limit is {hard}; raise it (LimitNOFILE=, ulimit -Hn) or lower "
            "limits.connections_total"
        )
    if plan != soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (plan, hard))
        log.info("open files limit raised", extra={"from": soft, "to": plan})
    return plan


def _socket_alive(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(0.5)
        try:
            probe.connect(str(path))
        except OSError:
            return False  # ECONNREFUSED: nobody listens, the file is left over
        return True


def _prepare_admin_socket(path: Path) -> None:
    if len(os.fsencode(path)) > _UNIX_PATH_MAX:
        raise ConfigError(
            f"server.admin_socket: path {path} is longer than {_UNIX_PATH_MAX} bytes; use a shorter one"
        )
    check_socket_dir(path.parent, "server.admin_socket")
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise ConfigError(
                f"server.admin_socket: {path} exists and is not a socket; remove it or pick another path"
            )
        if _socket_alive(path):
            raise Unavailable(
                f"server.admin_socket: {path} is in use by a running ghostmesh; stop it or pick another path"
            )
        path.unlink()  # stale socket of a previous run: binding over it would fail with EADDRINUSE


def _add_tls_port(server: grpc.aio.Server, host: str, port: int, text: str, pair: CertPair) -> int:
    """Listen on ``host:port`` with TLS only, presenting ``pair``'s whole chain; the bound port."""
    bind = format_endpoint(host, port)
    credentials = grpc.ssl_server_credentials([(pair.key_pem, pair.cert_pem)])
    try:
        bound = server.add_secure_port(bind, credentials)
    except RuntimeError:
        bound = 0
    if not bound:
        raise Unavailable(
            f"server.bind: cannot listen on {text} (address in use, or not an address of this host)"
        )
    return bound


def _load_state(store: SqlStore, cfg: MeshConfig, now: float) -> State:
    try:
        return State(store, StateConfig.from_mesh(cfg), now)
    except lock.LockError as exc:
        raise ConfigError(
            f"{store.name}: the stored node-key signing log does not verify ({exc}); restore the "
            "database from a backup"
        ) from None


def _build_hub(
    cfg: MeshConfig,
    store: SqlStore,
    *,
    audit_key: Ed25519PrivateKey,
    relay: RelayMinter | None,
    clock: Callable[[], float],
) -> tuple[Hub, LoadedPolicy]:
    """The state, the mapper (seeded with the state and the policy read at start), the audit log and the
    limits, joined in a hub; and that policy, for its owner."""
    now = clock()
    state = _load_state(store, cfg, now)
    acl_path = Path(cfg.server.acl_file) if cfg.server.acl_file else None
    loaded = load_policy(store, acl_path)  # an invalid acl_file stops the start
    prefixes = (ipaddress.ip_network(cfg.network.ipv4_prefix), ipaddress.ip_network(cfg.network.ipv6_prefix))
    mapper = Mapper(cfg.nodes.keepalive, loaded.policy, relay, mesh_ranges(prefixes), dns_map(cfg.dns))
    mapper.load(state.snapshot(), now)
    mapper.apply(state.lock_record(), now)
    hub = Hub(
        state,
        mapper,
        cfg.mapper.batch_delay,
        clock,
        audit=Auditor(store, audit_key, clock),
        limits=Limits(cfg.limits),
        retention=cfg.audit.retention,
    )
    return hub, loaded


@dataclass
class RunningServer:
    """A started ghostmesh. ``port`` is the bound TCP port (useful with bind port 0); ``tls_pin`` the pin
    of its TLS key and ``tls_cert_pem`` the certificate chain that port presents."""

    cfg: MeshConfig
    server: grpc.aio.Server
    host: str
    port: int
    admin_socket: Path
    server_key: PublicKey
    tls_pin: str
    tls_cert_pem: bytes
    store: SqlStore
    state: State
    hub: Hub
    policy: PolicySource
    oidc: OidcService | None = None
    relay_control: RelayControlServicer | None = None  # served with [[relay.regions]] only
    open_files: int = 0  # RLIMIT_NOFILE's soft limit after start
    guard: CallGuard | None = None  # the interceptor counting calls by method (metrics)
    metrics: MetricsServer | None = None  # [metrics] listen set: /metrics, /healthz, /readyz
    console: ConsoleServer | None = None  # [console] listen set: the web admin console
    reloader: ConfigReloader | None = None  # re-reads [dns] from the config file (SIGHUP, ghostmesh.app)
    _stopped: bool = False

    @property
    def target(self) -> str:
        """``host:port`` a client on this machine dials (a wildcard bind is reached over loopback)."""
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(self.host, self.host)
        return format_endpoint(host, self.port)

    async def stop(self, grace: float = 1.0) -> None:
        """Close every stream, stop serving, close the database. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        if self.console is not None:
            await self.console.close()
        if self.metrics is not None:
            await self.metrics.close()
        await self.policy.stop()
        if self.relay_control is not None:
            self.relay_control.stop()
        if self.oidc is not None:
            await self.oidc.stop()
        await self.hub.stop()
        await self.server.stop(grace)
        self.store.close()
        with contextlib.suppress(FileNotFoundError):
            self.admin_socket.unlink()

    async def wait_for_termination(self) -> None:
        await self.server.wait_for_termination()


async def _start_metrics(
    cfg: MeshConfig, hub: Hub, store: SqlStore, guard: CallGuard, reloader: ConfigReloader
) -> MetricsServer | None:
    """``[metrics]``: the listener, or None when ``metrics.listen`` is empty (ready once the hub runs)."""
    if not cfg.metrics.listen:
        return None
    return await start_metrics(
        cfg.metrics.listen,
        metrics.registry(hub, store, guard, reloader),
        lambda: metrics.ready(hub),
    )


def _open_store(cfg: MeshConfig) -> SqlStore:
    """``[database]``: the SQLite file, or the PostgreSQL database the DSN names (migrated either way)."""
    if cfg.database.type == "postgres":
        # Imported here: psycopg is loaded only by servers that use PostgreSQL.
        from ghostmesh.store.postgres import PostgresStore  # noqa: PLC0415

        return PostgresStore(cfg.database.dsn, exclusive=True)  # one ghostmesh per database
    return SqliteStore(cfg.db_path)


async def _discover_provider(cfg: MeshConfig, clock: Callable[[], float]) -> OidcProvider | None:
    """The OpenID provider of ``[oidc]``, discovered, when a login uses it (nodes with
    ``server.auth_method = "oidc"``, admins with ``console.oidc_admins``); one instance serves both. A
    provider that cannot be reached stops the start here."""
    if cfg.server.auth_method != "oidc" and not cfg.console.oidc_admins:
        return None
    from ghostmesh.oidc_client import OidcProvider  # noqa: PLC0415 - httpx/authlib only when used

    provider = OidcProvider(cfg.oidc, clock)
    await provider.discover()
    return provider


async def _start_oidc(
    cfg: MeshConfig, hub: Hub, clock: Callable[[], float]
) -> tuple[OidcProvider | None, OidcService | None]:
    """The provider (:func:`_discover_provider`) and, with ``server.auth_method = "oidc"``, the nodes'
    login listener."""
    provider = await _discover_provider(cfg, clock)
    if cfg.server.auth_method != "oidc" or provider is None:
        return provider, None
    from ghostmesh.oidc import OidcService  # noqa: PLC0415 - aiohttp only when used

    oidc = OidcService(cfg.oidc, hub, provider, clock)
    await oidc.start()  # a port it cannot bind stops the start; it closed what it opened
    return provider, oidc


async def _start_console(
    cfg: MeshConfig, admin: AdminServicer, provider: OidcProvider | None
) -> ConsoleServer | None:
    """``[console]``: the web admin console, or None when ``console.listen`` is empty."""
    if not cfg.console.listen:
        return None
    from ghostmesh.console import start_console  # noqa: PLC0415 - its pages load only when served

    tls_dir = cfg.db_path.parent
    if cfg.tls.cert_file:
        files = (Path(cfg.tls.cert_file), Path(cfg.tls.key_file))
    else:
        files = (tls_dir / CERT_FILE, tls_dir / KEY_FILE)
    oidc = (cfg.oidc, provider) if cfg.console.oidc_admins and provider is not None else None
    return await start_console(cfg.console, admin, files, oidc)


async def _start_http(
    cfg: MeshConfig,
    hub: Hub,
    store: SqlStore,
    guard: CallGuard,
    admin: AdminServicer,
    *,
    provider: OidcProvider | None,
    reloader: ConfigReloader,
) -> tuple[MetricsServer | None, ConsoleServer | None]:
    """The HTTP listeners (metrics, console); a port that cannot be bound closes what was started."""
    served = await _start_metrics(cfg, hub, store, guard, reloader)
    try:
        return served, await _start_console(cfg, admin, provider)
    except BaseException:
        if served is not None:
            await served.close()
        raise


async def start_server(
    cfg: MeshConfig,
    *,
    clock: Callable[[], float] = time.time,
    reload: Callable[[], MeshConfig] | None = None,
) -> RunningServer:
    """Open the store, load state, listen on ``server.bind`` (TLS) and ``server.admin_socket``, and serve.

    ``reload`` loads the config file again as ``cfg`` was loaded (None: there is no file): what
    :attr:`RunningServer.reloader` re-reads ``[dns]`` with."""
    host, port = parse_hostport(cfg.server.bind, "server.bind")
    relay_secret = cfg.relay.secret_bytes()  # None: no relay regions; regions without a secret: refused
    relay = None if relay_secret is None else RelayMinter.from_config(cfg.relay, relay_secret)
    open_files = raise_open_files(cfg.limits)
    db_path = cfg.db_path
    state_dir = Path(cfg.server.state_dir)
    make_private_dir(state_dir, "state directory", "server.state_dir")
    if cfg.database.path:
        make_private_dir(db_path.parent, "database's directory", "database.path")
    admin_path = Path(cfg.server.admin_socket)
    _prepare_admin_socket(admin_path)
    tls = load_identity(cfg.tls, db_path.parent)
    tls_pin = tlscert.fingerprint(tls.certificate)

    store = _open_store(cfg)
    oidc: OidcService | None = None
    try:
        server_key = load_server_key(store, state_dir)
        audit_key = load_audit_key(store, state_dir, cfg.audit.key_file)
        hub, loaded = _build_hub(cfg, store, audit_key=audit_key, relay=relay, clock=clock)
        policy = PolicySource(store, hub, loaded)
        reloader = ConfigReloader(hub, cfg, reload)
        provider, oidc = await _start_oidc(cfg, hub, clock)
        server = grpc.aio.server(interceptors=[guard := CallGuard(hub)], options=server_options(cfg))
        add_coordination_to_server(CoordinationServicer(hub, server_key, policy, oidc), server)
        identity = admin_pb2.ServerIdentity(
            version=VERSION,
            tls_pin=tls_pin,
            tls_self_signed=tls.self_signed,
            server_key=server_key.public_key().base64(),
        )
        admin = AdminServicer(hub, policy, identity)
        admin_pb2_grpc.add_AdminServicer_to_server(admin, server)
        relay_control = None
        if relay_secret is not None:  # gates watch which nodes may use the relays (api/relaycontrol.py)
            relay_control = RelayControlServicer(hub, relay_secret, coalesce=cfg.mapper.batch_delay / 2)
            add_relay_control(relay_control, server)
        bound = _add_tls_port(server, host, port, cfg.server.bind, tls)
        # before serving: a port it cannot bind stops the start with nothing to undo
        served, console = await _start_http(
            cfg, hub, store, guard, admin, provider=provider, reloader=reloader
        )
        with umask(0o177):  # the socket file is born 0600: no window where others could connect
            try:
                server.add_insecure_port(f"unix:{admin_path}")
            except RuntimeError:
                raise Unavailable(f"server.admin_socket: cannot listen on {admin_path}") from None
            await server.start()
        hub.start()
        policy.start()
        log.info(
            "TLS key pin %s (certificate %s)",
            tls_pin,
            "self-signed" if tls.self_signed else f"from {cfg.tls.cert_file}",
        )
    except BaseException:
        if oidc is not None:
            await oidc.stop()
        store.close()
        raise
    return RunningServer(
        cfg=cfg,
        server=server,
        host=host,
        port=bound,
        admin_socket=admin_path,
        server_key=server_key.public_key(),
        tls_pin=tls_pin,
        tls_cert_pem=tls.cert_pem,
        store=store,
        state=hub.state,
        hub=hub,
        policy=policy,
        oidc=oidc,
        relay_control=relay_control,
        open_files=open_files,
        guard=guard,
        metrics=served,
        console=console,
        reloader=reloader,
    )
