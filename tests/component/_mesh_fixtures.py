"""Helpers for ghostmesh component tests: a real server in-process, node and admin clients.

The server listens on 127.0.0.1 port 0 (TLS only) with SQLite and the admin unix socket under the test's
tmp_path. Every TCP client trusts it the way ghostlink and ghostctl do: by the pin of its TLS key
(:func:`tls_channel`, ``ghostcore.tlschannel.prepare``). A :class:`NodeClient` sends each request as the
exact bytes it signed (``ghostcore.nodeauth.sign_request``), so a test can also send a proof twice or
another body under a valid proof (:meth:`NodeClient.send`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

import grpc
from google.protobuf.message import Message

from ghostcore import nodeauth, tlschannel
from ghostcore.joinkey import parse_pin
from ghostcore.keys import PrivateKey, PublicKey
from ghostcore.pb.ghostmesh.v1 import admin_pb2 as apb
from ghostcore.pb.ghostmesh.v1 import admin_pb2_grpc as apb_grpc
from ghostcore.pb.ghostmesh.v1 import coordination_pb2 as pb
from ghostmesh.config import MapperConfig, MeshConfig, NodesConfig, ServerConfig
from ghostmesh.server import RunningServer, start_server

SERVICE = "/ghostmesh.v1.Coordination/"
Metadata = tuple[tuple[str, str], ...]
RESPONSES: dict[str, type[Message]] = {
    "GetServerInfo": pb.ServerInfo,
    "Register": pb.RegisterResponse,
    "WaitForLogin": pb.RegisterResponse,
    "ReportStatus": pb.StatusAck,
    "RotateKey": pb.RotateKeyResponse,
}


def mesh_config(tmp_path: Path, *, batch_delay: float = 0.05, **nodes: Any) -> MeshConfig:
    return MeshConfig(
        server=ServerConfig(
            bind="127.0.0.1:0",
            admin_socket=str(tmp_path / "run" / "admin.sock"),
            state_dir=str(tmp_path / "state"),
            max_message_bytes=65536,
        ),
        # offline at once unless a test asks for a presence grace: most tests watch a node go offline
        nodes=replace(NodesConfig(), **{"presence_grace": 0.0, **nodes}),
        mapper=MapperConfig(batch_delay=batch_delay),
    )


class Clock:
    """A clock a test steps by hand, starting now (node proofs keep using the real time)."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@contextlib.asynccontextmanager
async def running(cfg: MeshConfig, clock: Clock | None = None) -> AsyncIterator[RunningServer]:
    srv = await (start_server(cfg) if clock is None else start_server(cfg, clock=clock))
    try:
        yield srv
    finally:
        await srv.stop(grace=0.2)


class Reachable(Protocol):
    """What a client needs of a server: where it listens, its TLS pin and its X25519 proof key
    (:class:`RunningServer` in-process; a started process's start line and GetServerInfo)."""

    @property
    def target(self) -> str: ...
    @property
    def tls_pin(self) -> str: ...
    @property
    def server_key(self) -> PublicKey: ...


def tls_channel(srv: Reachable, pin: str = "", *, own_connection: bool = False) -> grpc.aio.Channel:
    """A channel to the server's TCP port trusting only the TLS key ``pin`` (default: the server's);
    ``own_connection``: never share a TCP connection with another channel."""
    trust = tlschannel.Trust(pin=parse_pin(pin or srv.tls_pin))
    setup = tlschannel.prepare(srv.target, trust, 5.0)
    options = [*setup.options, ("grpc.use_local_subchannel_pool", 1)] if own_connection else setup.options
    return grpc.aio.secure_channel(srv.target, setup.credentials, options=options)


def now_ms() -> int:
    return int(time.time() * 1000)


class NodeClient:
    """A fake ghostlink: its own WireGuard key, a pinned TLS channel, a v2 proof on every call."""

    def __init__(self, srv: Reachable, key: PrivateKey | None = None) -> None:
        self.key = key or PrivateKey.generate()
        self.server_pub: PublicKey = srv.server_key
        self.channel = tls_channel(srv)

    @property
    def pub(self) -> str:
        return self.key.public_key().base64()

    def signed(
        self, method: str, body: bytes, *, key: PrivateKey | None = None, ts_ms: int | None = None
    ) -> Metadata:
        """Proof metadata for a call of ``method`` whose request is exactly ``body``."""
        now = now_ms() if ts_ms is None else ts_ms
        return nodeauth.sign_request(key or self.key, self.server_pub, SERVICE + method, body, now_ms=now)

    async def send(self, method: str, body: bytes, md: Metadata | None = None, *, wait: float = 5.0) -> Any:
        """One unary call sending ``body`` as is, with ``md`` (default: a fresh proof for ``body``)."""
        rpc = self.channel.unary_unary(
            SERVICE + method, request_serializer=None, response_deserializer=RESPONSES[method].FromString
        )
        return await rpc(body, metadata=self.signed(method, body) if md is None else md, timeout=wait)

    async def call(self, method: str, request: Message, md: Metadata | None = None) -> Any:
        return await self.send(method, request.SerializeToString(), md)

    async def register(
        self, auth_key: str = "", hostname: str = "host", key_signature: bytes = b""
    ) -> pb.Node:
        req = pb.RegisterRequest(auth_key=auth_key, hostname=hostname, key_signature=key_signature)
        resp: pb.RegisterResponse = await self.call("Register", req)
        return resp.node

    async def report(self, **fields: Any) -> None:
        await self.call("ReportStatus", pb.StatusReport(**fields))

    def sync(self, md: Metadata | None = None) -> Any:
        body = pb.SyncRequest().SerializeToString()
        rpc = self.channel.unary_stream(
            SERVICE + "Sync", request_serializer=None, response_deserializer=pb.MapUpdate.FromString
        )
        return rpc(body, metadata=self.signed("Sync", body) if md is None else md)

    def rotate_request(
        self, new: PrivateKey, *, consent_by: PrivateKey | None = None, signature: bytes = b""
    ) -> pb.RotateKeyRequest:
        """A RotateKeyRequest to ``new``, its consent made by ``consent_by`` (default: ``new`` itself)."""
        ts = now_ms()
        proof = nodeauth.rotation_proof(consent_by or new, self.server_pub, self.key.public_key(), ts)
        return pb.RotateKeyRequest(
            new_node_key=new.public_key().base64(),
            new_ts_ms=ts,
            new_key_proof=proof,
            new_key_signature=signature,
        )

    async def rotate(self, req: pb.RotateKeyRequest, md: Metadata | None = None) -> pb.Node:
        resp: pb.RotateKeyResponse = await self.call("RotateKey", req, md)
        return resp.node

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


@contextlib.asynccontextmanager
async def admin_tcp(srv: RunningServer) -> AsyncIterator[Any]:
    """The Admin service on the TCP port, over a pinned TLS channel (calls need an API key there)."""
    channel = tls_channel(srv)
    try:
        yield apb_grpc.AdminStub(channel)
    finally:
        await channel.close()


async def auth_key(srv: RunningServer, **kw: Any) -> str:
    async with admin_unix(srv) as admin:
        resp = await admin.CreateAuthKey(apb.CreateAuthKeyRequest(**kw), timeout=5)
        return str(resp.secret)
