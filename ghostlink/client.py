"""The coordination client (grpc.aio over TLS): the Coordination RPCs ghostlink makes, nothing else.

``CoordClient`` wraps GetServerInfo, Register, WaitForLogin, Sync, ReportStatus and RotateKey.

* **The channel** is TLS, trusted as :class:`ghostcore.tlschannel.Trust` says: the server's pinned key
  (saved at join from the key the admin handed out) or a certificate authority. :meth:`connect` checks
  the pin before anything is sent; the daemon calls it again before every map stream that follows a
  failure, so every reconnect re-checks the pin (a mismatch is :class:`ghostcore.tlschannel.PinMismatch`).
* **Every call but GetServerInfo** carries a proof of possession of the node key
  (``ghostcore.nodeauth.sign_request``) over the full method path and the exact bytes of the request, with
  a fresh nonce: the client serializes each request itself and sends those bytes, so what was signed is
  what travels. The key is read from the node's :class:`ghostlink.nodekey.NodeKey` at each call, so a
  rotation switches the proofs with it.

The client keeps no node state: what a status report says is a :class:`StatusReport` value the caller
builds when it sends it. Failed calls raise :class:`ghostcore.errors.GhostError` (via
``ghostcore.grpcerr``), never ``grpc.RpcError``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message

from ghostcore import nodeauth, tlschannel
from ghostcore.errors import GhostError, ProtocolError, Unavailable
from ghostcore.grpcerr import from_rpc_error
from ghostcore.keys import PrivateKey, PublicKey
from ghostcore.pb.ghostmesh.v1 import coordination_pb2
from ghostlink.nodekey import NodeKey

Resp = TypeVar("Resp", bound=Message)

SERVICE = "/ghostmesh.v1.Coordination"
M_REGISTER = f"{SERVICE}/Register"
M_WAIT_LOGIN = f"{SERVICE}/WaitForLogin"
LOGIN_WAIT_MAX = 86400.0 + 60.0  # the server ends a login after its oidc.login_timeout (at most 24h)
M_SYNC = f"{SERVICE}/Sync"
M_REPORT = f"{SERVICE}/ReportStatus"
M_ROTATE = f"{SERVICE}/RotateKey"
M_SERVER_INFO = f"{SERVICE}/GetServerInfo"
MAX_MESSAGE = 64 * 1024 * 1024  # a full map of 10k peers is a few MiB; bound it anyway
UNREACHABLE_HINT = "check --server and that ghostmesh is running"
UNTRUSTED_HINT = (
    "its TLS certificate is not trusted: join with the key as `ghostctl authkeys create` prints it (it "
    "carries the server's pin), or pass --pin (`ghostctl server pin` on the server)"
)

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


@dataclass(frozen=True)
class StatusReport:
    """One ``ReportStatus``. ghostmesh takes a report as complete: whatever it leaves out (routes, the relay
    region, the TURN address) is withdrawn, so every report carries all of it."""

    endpoints: tuple[str, ...] = ()
    advertised_routes: tuple[str, ...] = ()
    advertise_exit_node: bool = False
    home_region: int = 0  # the relay region this node is connected to (0: none)
    turn_relay: str = ""  # its TURN relayed address ("" none)

    def to_pb(self) -> coordination_pb2.StatusReport:
        return coordination_pb2.StatusReport(
            endpoints=list(self.endpoints),
            advertised_routes=list(self.advertised_routes),
            advertise_exit_node=self.advertise_exit_node,
            home_region=self.home_region,
            turn_relay=self.turn_relay,
        )


class CoordClient:
    """One TLS channel to ghostmesh at ``target``, trusted as ``trust`` says; :meth:`connect` opens it.

    ``server_key`` (the X25519 key proofs are made for) is None only before GetServerInfo at join.
    ``key``: the node's :class:`NodeKey` (shared with the daemon, which switches it on a rotation), or a
    bare private key for a client used on its own.
    """

    def __init__(
        self,
        target: str,
        key: NodeKey | PrivateKey,
        trust: tlschannel.Trust,
        server_key: PublicKey | None = None,
        timeout: float = 5.0,
    ) -> None:
        self.target = target
        self.trust = trust
        self._keys = key if isinstance(key, NodeKey) else NodeKey(key)
        self.server_key = server_key
        self.timeout = timeout
        self._channel: grpc.aio.Channel | None = None

    @property
    def key(self) -> PrivateKey:
        """The key calls are proven with (unless a call names another)."""
        return self._keys.private

    async def connect(self) -> None:
        """(Re)open the channel: the server's TLS key is checked against the pin first (a blocking TLS
        handshake, run off the event loop). PinMismatch, or Unavailable when the server is unreachable."""
        try:
            setup = await asyncio.to_thread(tlschannel.prepare, self.target, self.trust, self.timeout)
        except Unavailable as exc:
            raise Unavailable(f"{exc}; {UNREACHABLE_HINT}") from None
        await self.close()
        self._channel = grpc.aio.secure_channel(
            self.target, setup.credentials, options=[*CHANNEL_OPTIONS, *setup.options]
        )

    async def close(self) -> None:
        if self._channel is not None:
            channel, self._channel = self._channel, None
            await channel.close(grace=None)

    def _open(self) -> grpc.aio.Channel:
        if self._channel is None:
            raise Unavailable(f"ghostmesh at {self.target}: not connected")
        return self._channel

    def _md(self, method: str, body: bytes, key: PrivateKey | None = None) -> tuple[tuple[str, str], ...]:
        if self.server_key is None:
            raise ProtocolError("internal: the server key is not pinned yet (GetServerInfo first)")
        return nodeauth.sign_request(
            key or self._keys.private, self.server_key, method, body, now_ms=now_ms()
        )

    def _err(self, exc: grpc.RpcError) -> GhostError:
        details = exc.details() if hasattr(exc, "details") else ""
        if "CERTIFICATE_VERIFY_FAILED" in (details or "") or "certificate verify failed" in (details or ""):
            return Unavailable(f"cannot reach ghostmesh at {self.target}: {UNTRUSTED_HINT}")
        return from_rpc_error(exc, f"ghostmesh at {self.target}", UNREACHABLE_HINT)

    async def _call(
        self,
        method: str,
        request: Message,
        response: type[Resp],
        *,
        key: PrivateKey | None = None,
        signed: bool = True,
        deadline: float | None = None,
        **kw: Any,
    ) -> Resp:
        """One unary call: ``request`` serialized once, those bytes signed and sent."""
        body = request.SerializeToString()
        call: grpc.aio.UnaryUnaryMultiCallable[bytes, Resp] = self._open().unary_unary(
            method, response_deserializer=response.FromString
        )
        try:
            result: Resp = await call(
                body,
                metadata=self._md(method, body, key) if signed else None,
                timeout=deadline or self.timeout,
                **kw,
            )
        except grpc.RpcError as exc:
            raise self._err(exc) from None
        return result

    async def server_info(self) -> coordination_pb2.ServerInfo:
        return await self._call(
            M_SERVER_INFO,
            coordination_pb2.GetServerInfoRequest(),
            coordination_pb2.ServerInfo,
            signed=False,
        )

    async def pin_server_key(self, expected: str | None = None) -> PublicKey:
        """GetServerInfo (over the channel already authenticated by TLS) and pin its X25519 key for the
        proofs; if ``expected`` (the key saved at join) differs, refuse."""
        info = await self.server_info()
        try:
            key = PublicKey.from_base64(info.server_key)
        except GhostError:
            raise ProtocolError(f"ghostmesh at {self.target} sent an invalid server key") from None
        if expected is not None and key.base64() != expected:
            raise ProtocolError(
                f"ghostmesh at {self.target} proves with key {key.short()}…, not the {expected[:8]}… saved "
                "at join; if the server was reinstalled, remove the state directory and join again"
            )
        self.server_key = key
        return key

    async def register(
        self, auth_key: str, hostname: str, key_signature: bytes = b""
    ) -> coordination_pb2.Node:
        node, _ = await self.register_or_login(auth_key, hostname, key_signature)
        return node

    async def register_or_login(
        self, auth_key: str, hostname: str, key_signature: bytes = b""
    ) -> tuple[coordination_pb2.Node, str]:
        """Register; ``(node, "")``, or with an OIDC server and no auth key ``(empty node, auth_url)``:
        the user opens the URL and :meth:`wait_for_login` returns the node. ``key_signature``: the node's
        own signature of its key (a pre-signed auth key, ``ghostcore.lock``)."""
        req = coordination_pb2.RegisterRequest(
            auth_key=auth_key, hostname=hostname, key_signature=key_signature
        )
        resp = await self._call(M_REGISTER, req, coordination_pb2.RegisterResponse)
        return resp.node, resp.auth_url

    async def wait_for_login(self) -> coordination_pb2.Node:
        """WaitForLogin: returns once the user logged in (the server bounds the wait); AuthError if the
        login failed or expired."""
        resp = await self._call(
            M_WAIT_LOGIN,
            coordination_pb2.WaitForLoginRequest(),
            coordination_pb2.RegisterResponse,
            deadline=LOGIN_WAIT_MAX,
        )
        return resp.node

    async def rotate_key(self, new: PrivateKey, signature: bytes = b"") -> coordination_pb2.Node:
        """RotateKey: our current key proves the call; ``new`` consents in the body to replace it
        (``nodeauth.rotation_proof``); ``signature`` vouches for it when node-key signing is on."""
        if self.server_key is None:
            raise ProtocolError("internal: the server key is not pinned yet (GetServerInfo first)")
        ts = now_ms()
        req = coordination_pb2.RotateKeyRequest(
            new_node_key=new.public_key().base64(),
            new_ts_ms=ts,
            new_key_proof=nodeauth.rotation_proof(new, self.server_key, self._keys.public, ts),
            new_key_signature=signature,
        )
        resp = await self._call(M_ROTATE, req, coordination_pb2.RotateKeyResponse)
        return resp.node

    async def sync(self) -> AsyncGenerator[coordination_pb2.MapUpdate, None]:
        """One Sync stream's map updates, until it fails (GhostError; Unavailable when the server ends it).

        Close it (``contextlib.aclosing``) when stopping early: that cancels the call.
        """
        body = coordination_pb2.SyncRequest().SerializeToString()
        stream: grpc.aio.UnaryStreamMultiCallable[bytes, coordination_pb2.MapUpdate]
        stream = self._open().unary_stream(
            M_SYNC, response_deserializer=coordination_pb2.MapUpdate.FromString
        )
        call = stream(body, metadata=self._md(M_SYNC, body))
        try:
            async for update in call:
                yield update
        except grpc.RpcError as exc:
            raise self._err(exc) from None
        finally:
            call.cancel()
        raise Unavailable(f"ghostmesh at {self.target} closed the map stream")

    async def report_status(self, report: StatusReport, key: PrivateKey | None = None) -> None:
        """ReportStatus with ``report``, proven with ``key`` if given (a pending rotated key), else ours."""
        await self._call(M_REPORT, report.to_pb(), coordination_pb2.StatusAck, key=key)
