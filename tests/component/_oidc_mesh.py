"""What the OIDC component tests share: a module's provider, ghostmesh configured for it, a test clock, and
a node client that starts and waits for a login as ghostlink does."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest

from ghostcore.grpcerr import from_rpc_error
from ghostcore.pb.ghostmesh.v1 import coordination_pb2 as pb
from ghostmesh.config import MeshConfig, OidcConfig
from ghostmesh.server import RunningServer, start_server
from tests.component._mesh_fixtures import NodeClient, mesh_config
from tests.component._oidc_fixtures import CLIENT_ID, CLIENT_SECRET, Provider, free_port, provider


def module_provider(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Provider, int]]:
    """The provider, and the port ghostmesh's callback listener must use (the client's redirect_uri):
    what each test module's ``idp`` fixture yields."""
    port = free_port()
    log = tmp_path_factory.mktemp("oidc") / "oidc-provider.log"
    with provider(log, f"http://127.0.0.1:{port}/oidc/callback") as p:
        yield p, port


class Clock:
    def __init__(self) -> None:
        self.offset = 0.0

    """The real clock, shifted by the test (ghostmesh's hub, limits and logins all read it)."""

    def __call__(self) -> float:
        return time.time() + self.offset


def oidc_config(tmp_path: Path, idp: tuple[Provider, int], acl_file: str = "", **oidc: Any) -> MeshConfig:
    p, port = idp
    base = mesh_config(tmp_path)
    return replace(
        base,
        server=replace(base.server, auth_method="oidc", acl_file=acl_file),
        oidc=OidcConfig(
            issuer=p.issuer,
            client_id=CLIENT_ID,
            client_secret=CLIENT_SECRET,
            http_bind=f"127.0.0.1:{port}",
            public_url=f"http://127.0.0.1:{port}",
            allow_insecure_http=True,  # the test provider and listener speak plain http on loopback
            login_timeout=60.0,
            **oidc,
        ),
    )


@contextlib.asynccontextmanager
async def mesh(cfg: MeshConfig, clock: Clock | None = None) -> AsyncIterator[RunningServer]:
    srv = await start_server(cfg, clock=clock or Clock())
    try:
        yield srv
    finally:
        await srv.stop(grace=0.2)


class OidcNode(NodeClient):
    """Register / WaitForLogin as a joining node makes them, refusals as GhostErrors (as ghostlink sees)."""

    async def register_or_login(self, auth_key: str, hostname: str) -> tuple[pb.Node, str]:
        try:
            resp: pb.RegisterResponse = await self.call(
                "Register", pb.RegisterRequest(auth_key=auth_key, hostname=hostname)
            )
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None
        return resp.node, resp.auth_url

    async def wait_for_login(self) -> pb.Node:
        body = pb.WaitForLoginRequest().SerializeToString()
        try:
            resp: pb.RegisterResponse = await self.send("WaitForLogin", body, wait=60)
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None
        return resp.node


@contextlib.asynccontextmanager
async def node(srv: RunningServer) -> AsyncIterator[OidcNode]:
    client = OidcNode(srv)
    try:
        yield client
    finally:
        await client.close()


def snapshot(srv: RunningServer) -> tuple[object, ...]:
    return (tuple(srv.store.list_nodes()), tuple(srv.store.list_users()), len(srv.store.list_audit()))
