"""Fixtures for ghostlink component tests: an in-test Coordination server and a no-op net layer.

``FakeCoordination`` implements ``coordination.proto`` on grpc.aio over TLS (127.0.0.1, random port, a
self-signed certificate whose pin :func:`start_server` returns) just far enough to drive the daemon: it
verifies every authenticated call's nodeauth proof against the full method path and the request's bytes,
once (as ghostmesh does), sends a full map first on each Sync stream and then the deltas a test pushes,
and can drop or refuse streams to simulate the server going away.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field

import grpc
import pytest
from google.protobuf.message import Message

from ghostcore import nodeauth, tlscert
from ghostcore.errors import AuthError, GhostError
from ghostcore.grpcerr import status_for
from ghostcore.keys import PrivateKey
from ghostcore.pb.ghostmesh.v1 import coordination_pb2 as pb
from ghostcore.pb.ghostmesh.v1 import coordination_pb2_grpc as pb_grpc
from ghostlink.engine import Plan

AUTH_KEY = "tskey-good"
_DROP = object()


def make_node(i: int, key: str, *, endpoints: tuple[str, ...] = ()) -> pb.Node:
    return pb.Node(
        id=i,
        name=f"node{i}",
        user="alice",
        node_key=key,
        addresses=[f"100.64.0.{i}", f"fd7a:115c:a1e0::{i}"],
        allowed_ips=[f"100.64.0.{i}/32", f"fd7a:115c:a1e0::{i}/128"],
        endpoints=list(endpoints),
        online=True,
    )


@dataclass
class FakeCoordination(pb_grpc.CoordinationServicer):
    server_key: PrivateKey = field(default_factory=PrivateKey.generate)
    self_id: int = 1
    peers: dict[int, pb.Node] = field(default_factory=dict)
    self_node: pb.Node | None = None
    reports: list[list[str]] = field(default_factory=list)
    verified: list[str] = field(default_factory=list)  # method paths whose proofs verified
    refuse_sync: bool = False
    _streams: list[asyncio.Queue[object]] = field(default_factory=list)
    syncs: int = 0
    replay: nodeauth.ReplayGuard = field(default_factory=nodeauth.ReplayGuard)

    def _check(self, context: grpc.aio.ServicerContext[object, object], method: str, request: Message) -> str:
        md = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
        proof = nodeauth.read_proof(md)
        now = int(time.time() * 1000)
        # The client signs the bytes it serialized; the same library serializes the parsed message to them.
        key = nodeauth.check_proof(self.server_key, proof, method, request.SerializeToString(), now)
        self.replay.admit(proof, now)
        self.verified.append(method)
        return key.base64()

    async def _abort(self, context: grpc.aio.ServicerContext[object, object], err: GhostError) -> None:
        await context.abort(status_for(err), str(err))

    async def GetServerInfo(self, request: pb.GetServerInfoRequest, context: object) -> pb.ServerInfo:
        return pb.ServerInfo(version="test", server_key=self.server_key.public_key().base64())

    async def Register(
        self, request: pb.RegisterRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.RegisterResponse:
        try:
            key = self._check(context, "/ghostmesh.v1.Coordination/Register", request)
            if request.auth_key != AUTH_KEY:
                raise AuthError("auth key is expired; create a new one with ghostctl authkeys create")
        except GhostError as exc:
            await self._abort(context, exc)
            raise
        self.self_node = make_node(self.self_id, key)
        self.self_node.name = request.hostname or "node1"
        return pb.RegisterResponse(node=self.self_node)

    async def Sync(
        self, request: pb.SyncRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> AsyncIterator[pb.MapUpdate]:
        try:
            key = self._check(context, "/ghostmesh.v1.Coordination/Sync", request)
        except GhostError as exc:
            await self._abort(context, exc)
            return
        if self.refuse_sync:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "shutting down")
            return
        if self.self_node is None:
            self.self_node = make_node(self.self_id, key)
        self.syncs += 1
        q: asyncio.Queue[object] = asyncio.Queue()
        self._streams.append(q)
        try:
            serial = 1
            yield pb.MapUpdate(
                serial=serial,
                full=True,
                self=self.self_node,
                peers_upserted=list(self.peers.values()),
                keepalive_seconds=25,
            )
            while True:
                item = await q.get()
                if item is _DROP:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "server going away")
                    return
                assert isinstance(item, pb.MapUpdate)
                serial += 1
                upd = pb.MapUpdate()
                upd.CopyFrom(item)
                upd.serial = serial
                yield upd
        finally:
            self._streams.remove(q)

    async def ReportStatus(
        self, request: pb.StatusReport, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.StatusAck:
        try:
            self._check(context, "/ghostmesh.v1.Coordination/ReportStatus", request)
        except GhostError as exc:
            await self._abort(context, exc)
            raise
        self.reports.append(list(request.endpoints))
        return pb.StatusAck()

    # -- test controls --------------------------------------------------------------------------------

    @property
    def streams(self) -> int:
        return len(self._streams)

    def upsert(self, node: pb.Node) -> None:
        self.peers[node.id] = node
        for q in self._streams:
            q.put_nowait(pb.MapUpdate(peers_upserted=[node]))

    def remove(self, node_id: int) -> None:
        self.peers.pop(node_id, None)
        for q in self._streams:
            q.put_nowait(pb.MapUpdate(peers_removed=[node_id]))

    def drop_streams(self) -> None:
        for q in self._streams:
            q.put_nowait(_DROP)


async def start_server(servicer: FakeCoordination) -> tuple[grpc.aio.Server, str, str]:
    """Serve ``servicer`` over TLS; (server, "127.0.0.1:port", the certificate's pin "sha256:…")."""
    pair = tlscert.self_signed("ghostmesh")
    server = grpc.aio.server()
    pb_grpc.add_CoordinationServicer_to_server(servicer, server)
    creds = grpc.ssl_server_credentials([(pair.key_pem, pair.cert_pem)])
    port = server.add_secure_port("127.0.0.1:0", creds)
    await server.start()
    return server, f"127.0.0.1:{port}", tlscert.fingerprint(pair.certificate)


@dataclass
class NoopNet:
    """A net layer that records plans instead of touching netlink."""

    endpoints: list[str] = field(default_factory=lambda: ["192.0.2.10:41641"])
    plans: list[Plan] = field(default_factory=list)

    async def apply(self, plan: Plan) -> None:
        self.plans.append(plan)

    async def local_endpoints(self, listen_port: int) -> list[str]:
        return list(self.endpoints)


async def wait_for(cond: Callable[[], bool], limit: float = 5.0, what: str = "condition") -> None:
    """Poll ``cond`` every 10 ms, bounded by ``limit`` seconds."""
    deadline = time.monotonic() + limit
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {limit}s waiting for {what}")
        await asyncio.sleep(0.01)


HAVE_NETNS_WG = os.geteuid() == 0 and all(shutil.which(b) for b in ("wireguard-go", "wg", "ip"))


@contextlib.contextmanager
def netns_ctx() -> Iterator[str]:
    """A fresh network namespace ``gltest<hex4>`` with lo up; deleted afterwards. Skips (or fails, when
    GHOST_REQUIRE_NETNS=1) without root, wireguard-go and wg."""
    if not HAVE_NETNS_WG:
        if os.environ.get("GHOST_REQUIRE_NETNS") == "1":
            pytest.fail("netns tests are required here but need root, wireguard-go, wg and ip")
        pytest.skip("needs root, wireguard-go, wg and ip")
    name = f"gltest{secrets.token_hex(2)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)
