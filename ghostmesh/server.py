"""Assembling and running the ghostmesh gRPC server (the I/O edge): store, state, mapper, hub, servicers.

One grpc.aio server serves both services on two ports: the TCP ``server.bind`` address (nodes, and admin
with an API key) and the unix ``server.admin_socket`` (admin without credentials; the socket is created
0600 inside a 0700 directory, so only root reaches it). Server options:

- ``grpc.max_receive_message_length = server.max_message_bytes``: an oversized request is refused with
  RESOURCE_EXHAUSTED before any handler runs;
- ``grpc.server.max_pending_requests`` (and its hard limit) raised: after a restart every node reconnects
  at once, and with the defaults grpc.aio CANCELLED part of a >1000-stream burst (platform notes);
- keepalive pings so dead nodes' streams are noticed (and their ephemeral grace starts) within a minute.

``start_server(cfg)`` is also the programmatic entry used by in-process tests.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

from ghostcore.config import parse_hostport
from ghostcore.errors import ConfigError, Unavailable
from ghostcore.keys import PublicKey
from ghostcore.pb.ghostmesh.v1 import admin_pb2_grpc
from ghostmesh.api.admin import AdminServicer
from ghostmesh.api.coordination import CoordinationServicer, add_coordination_to_server
from ghostmesh.api.policy_admin import POLICY_SET
from ghostmesh.api.routes_admin import apply_policy
from ghostmesh.audit import ACTOR_SYSTEM, Auditor, load_audit_key
from ghostmesh.config import MeshConfig
from ghostmesh.hub import Hub
from ghostmesh.mapper import Mapper
from ghostmesh.policy_source import PolicyManager
from ghostmesh.relaymap import RelayMinter
from ghostmesh.state import State, StateConfig, load_server_key
from ghostmesh.store.sqlite import SqliteStore

if TYPE_CHECKING:
    from ghostmesh.oidc import OidcService

MAX_PENDING_REQUESTS = 65536
_UNIX_PATH_MAX = 107  # sun_path is 108 bytes on Linux, including the NUL


def server_options(cfg: MeshConfig) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", cfg.server.max_message_bytes),
        ("grpc.max_send_message_length", 64 * 1024 * 1024),  # a full map of 10k nodes is a few MB
        ("grpc.server.max_pending_requests", MAX_PENDING_REQUESTS),
        ("grpc.server.max_pending_requests_hard_limit", MAX_PENDING_REQUESTS * 2),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_pings_without_data", 0),
    ]


@contextlib.contextmanager
def _umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


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
    parent = path.parent
    if not parent.exists():
        try:
            parent.mkdir(mode=0o700, parents=True)
        except OSError as exc:
            raise ConfigError(
                f"server.admin_socket: cannot create directory {parent}: {exc.strerror}"
            ) from None
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


def _add_tcp_port(server: grpc.aio.Server, host: str, port: int, text: str) -> int:
    bind = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        bound = server.add_insecure_port(bind)
    except RuntimeError:
        bound = 0
    if not bound:
        raise Unavailable(
            f"server.bind: cannot listen on {text} (address in use, or not an address of this host)"
        )
    return bound


@dataclass
class RunningServer:
    """A started ghostmesh. ``port`` is the bound TCP port (useful with bind port 0)."""

    cfg: MeshConfig
    server: grpc.aio.Server
    host: str
    port: int
    admin_socket: Path
    server_key: PublicKey
    store: SqliteStore
    state: State
    hub: Hub
    policy: PolicyManager | None = None
    oidc: OidcService | None = None
    _stopped: bool = False

    @property
    def target(self) -> str:
        """``host:port`` a client on this machine dials (a wildcard bind is reached over loopback)."""
        host = {"0.0.0.0": "127.0.0.1", "::": "[::1]"}.get(self.host, self.host)
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"{host}:{self.port}"

    async def stop(self, grace: float = 1.0) -> None:
        """Close every stream, stop serving, close the database. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        if self.policy is not None:
            await self.policy.stop()
        if self.oidc is not None:
            await self.oidc.stop()
        await self.hub.stop()
        await self.server.stop(grace)
        self.store.close()
        with contextlib.suppress(FileNotFoundError):
            self.admin_socket.unlink()

    async def wait_for_termination(self) -> None:
        await self.server.wait_for_termination()


async def start_server(cfg: MeshConfig, *, clock: Callable[[], float] = time.time) -> RunningServer:
    """Open the store, load state, listen on ``server.bind`` and ``server.admin_socket``, and serve."""
    host, port = parse_hostport(cfg.server.bind, "server.bind")
    relay_secret = cfg.relay.secret_bytes()  # None: no relay regions; regions without a secret: refused
    relay = None if relay_secret is None else RelayMinter.from_config(cfg.relay, relay_secret)
    db_path = cfg.db_path
    if not db_path.parent.exists():
        try:
            db_path.parent.mkdir(mode=0o700, parents=True)
        except OSError as exc:
            raise ConfigError(f"server.state_dir: cannot create {db_path.parent}: {exc.strerror}") from None
    admin_path = Path(cfg.server.admin_socket)
    _prepare_admin_socket(admin_path)

    store = SqliteStore(db_path)
    oidc: OidcService | None = None
    try:
        now = clock()
        server_key = load_server_key(store)
        state = State(store, StateConfig.from_mesh(cfg), now)
        acl_path = Path(cfg.server.acl_file) if cfg.server.acl_file else None
        policy = PolicyManager(store, acl_path, lambda p: apply_policy(hub, p), clock)
        mapper = Mapper(cfg.nodes.keepalive, policy.load(), relay)  # an invalid acl_file stops the start
        mapper.groups_of = state.groups_of  # OIDC groups ("oidc:<g>" policy group members)
        mapper.load(((n, False) for n in state.nodes()), now)
        auditor = Auditor(store, load_audit_key(store), clock)
        hub = Hub(state, mapper, cfg.mapper.batch_delay, clock, audit=auditor)
        policy.on_file_applied = lambda info: hub.record(
            ACTOR_SYSTEM, POLICY_SET, info.source, {"sha256": info.sha256}
        )
        if cfg.server.auth_method == "oidc":
            from ghostmesh.oidc import OidcService  # noqa: PLC0415 - aiohttp/httpx/authlib only when used

            oidc = OidcService(cfg.oidc, hub, clock)
            await oidc.start()  # discovery; a provider that cannot be reached stops the start here
        server = grpc.aio.server(options=server_options(cfg))
        add_coordination_to_server(CoordinationServicer(hub, server_key, oidc), server)
        admin_pb2_grpc.add_AdminServicer_to_server(AdminServicer(hub, policy), server)
        bound = _add_tcp_port(server, host, port, cfg.server.bind)
        with _umask(0o177):  # the socket file is born 0600: no window where others could connect
            try:
                server.add_insecure_port(f"unix:{admin_path}")
            except RuntimeError:
                raise Unavailable(f"server.admin_socket: cannot listen on {admin_path}") from None
            await server.start()
        os.chmod(admin_path, 0o600)
        hub.start()
        policy.start()
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
        store=store,
        state=state,
        hub=hub,
        policy=policy,
        oidc=oidc,
    )
