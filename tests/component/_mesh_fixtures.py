"""Helpers for ghostmesh component tests: a real server in-process, node and admin clients.

The server listens on 127.0.0.1 port 0 with SQLite and the admin unix socket under the test's tmp_path.
Node clients use the generated stubs and ``ghostcore.nodeauth.make_metadata`` like ghostlink does.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc

from ghostcore import nodeauth
from ghostcore.keys import PrivateKey, PublicKey
from ghostcore.pb.ghostmesh.v1 import admin_pb2 as apb
from ghostcore.pb.ghostmesh.v1 import admin_pb2_grpc as apb_grpc
from ghostcore.pb.ghostmesh.v1 import coordination_pb2 as pb
from ghostcore.pb.ghostmesh.v1 import coordination_pb2_grpc as pb_grpc
from ghostmesh.config import MapperConfig, MeshConfig, NodesConfig, ServerConfig
from ghostmesh.server import RunningServer, start_server

SERVICE = "/ghostmesh.v1.Coordination/"


def mesh_config(tmp_path: Path, *, batch_delay: float = 0.05, **nodes: Any) -> MeshConfig:
    return MeshConfig(
        server=ServerConfig(
            bind="127.0.0.1:0",
            admin_socket=str(tmp_path / "run" / "admin.sock"),
            state_dir=str(tmp_path / "state"),
            max_message_bytes=65536,
        ),
        nodes=replace(NodesConfig(), **nodes),
        mapper=MapperConfig(batch_delay=batch_delay),
    )


@contextlib.asynccontextmanager
async def running(cfg: MeshConfig) -> AsyncIterator[RunningServer]:
    srv = await start_server(cfg)
    try:
        yield srv
    finally:
        await srv.stop(grace=0.2)


class NodeClient:
    """A fake ghostlink: its own WireGuard key, proofs on every call."""

    def __init__(self, srv: RunningServer, key: PrivateKey | None = None) -> None:
        self.key = key or PrivateKey.generate()
        self.server_pub: PublicKey = srv.server_key
        self.channel = grpc.aio.insecure_channel(srv.target)
        self.stub: Any = pb_grpc.CoordinationStub(self.channel)  # the aio stub; its stubs type it sync

    @property
    def pub(self) -> str:
        return self.key.public_key().base64()

    def md(self, method: str, *, ts_ms: int | None = None) -> tuple[tuple[str, str], ...]:
        now = int(time.time() * 1000) if ts_ms is None else ts_ms
        return nodeauth.make_metadata(self.key, self.server_pub, SERVICE + method, now)

    async def register(self, auth_key: str = "", hostname: str = "host") -> pb.Node:
        resp: pb.RegisterResponse = await self.stub.Register(
            pb.RegisterRequest(auth_key=auth_key, hostname=hostname), metadata=self.md("Register"), timeout=5
        )
        return resp.node

    def sync(self) -> Any:
        return self.stub.Sync(pb.SyncRequest(), metadata=self.md("Sync"))

    async def close(self) -> None:
        await self.channel.close()


async def next_update(call: Any, wait: float = 3.0) -> pb.MapUpdate:
    msg = await asyncio.wait_for(call.read(), wait)
    assert msg is not grpc.aio.EOF, "stream ended"
    assert isinstance(msg, pb.MapUpdate)
    return msg


async def stream_error(call: Any, wait: float = 5.0) -> grpc.StatusCode:
    """Read until the stream fails; return its status code."""
    deadline = asyncio.get_running_loop().time() + wait
    try:
        while True:
            left = deadline - asyncio.get_running_loop().time()
            msg = await asyncio.wait_for(call.read(), max(left, 0.01))
            if msg is grpc.aio.EOF:
                return grpc.StatusCode.OK
    except grpc.aio.AioRpcError as exc:
        return exc.code()


@contextlib.asynccontextmanager
async def admin_unix(srv: RunningServer) -> AsyncIterator[Any]:
    channel = grpc.aio.insecure_channel(f"unix:{srv.admin_socket}")
    try:
        yield apb_grpc.AdminStub(channel)
    finally:
        await channel.close()


async def auth_key(srv: RunningServer, **kw: Any) -> str:
    async with admin_unix(srv) as admin:
        resp = await admin.CreateAuthKey(apb.CreateAuthKeyRequest(**kw), timeout=5)
        return str(resp.secret)
