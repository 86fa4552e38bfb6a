"""The Coordination servicer: what ghostlink nodes call (``proto/ghostmesh/v1/coordination.proto``).

Every RPC but GetServerInfo carries a node proof (``ghostcore.nodeauth``) bound to the full method path,
verified with the server's X25519 private key: the caller provably holds the private key of the node key
it claims, so a node key cannot be used (or taken over) by anyone else.

Sync sends the full map, then waits on its stream's event (set by :class:`ghostmesh.hub.Hub` when a change
touches it), sleeps ``mapper.batch_delay`` to coalesce bursts and flushes one delta. It ends with
NOT_FOUND when its node is deleted, UNAUTHENTICATED when its key expires, UNAVAILABLE at shutdown.

RotateKey stores a node's proven new key as pending; any later call proven with that key promotes it
(:meth:`CoordinationServicer._bound`), so peers learn only a key the node already uses.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import TYPE_CHECKING, Any

import grpc

from ghostcore import nodeauth
from ghostcore.errors import AuthError, GhostError, InvalidArgument, NotFound, Unavailable
from ghostcore.keys import PrivateKey, PublicKey
from ghostcore.pb.ghostmesh.v1 import coordination_pb2 as pb
from ghostmesh import audit
from ghostmesh.api.errors import abort_with, grpc_errors
from ghostmesh.api.routes_admin import ROUTE_ADVERTISE, ROUTE_WITHDRAW, auto_approver
from ghostmesh.hub import Hub
from ghostmesh.mapper import node_to_pb
from ghostmesh.store.base import NodeRec

if TYPE_CHECKING:  # the OIDC stack (aiohttp, httpx, authlib) loads only when OIDC is configured
    from ghostmesh.oidc import OidcService

log = logging.getLogger(__name__)

SERVICE_NAME = "ghostmesh.v1.Coordination"
SERVICE = f"/{SERVICE_NAME}/"
MAX_SIGNAL_BYTES = 4096
VERSION = "0.1.0"
ROTATE_NEW_METHOD = f"{SERVICE}RotateKey#new"  # what RotateKeyRequest.new_key_proof is bound to

Ctx = grpc.aio.ServicerContext[Any, Any]


def _metadata(context: Ctx) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in context.invocation_metadata() or ():
        if isinstance(value, str):
            out[key] = value
    return out


def _serialize_update(update: pb.MapUpdate | bytes) -> bytes:
    return update if isinstance(update, bytes) else update.SerializeToString()


def add_coordination_to_server(servicer: CoordinationServicer, server: grpc.aio.Server) -> None:
    """Register the Coordination service, as ``add_CoordinationServicer_to_server`` does, except that Sync
    may yield ready-encoded ``MapUpdate`` bytes (the mapper's cached peer entries) as well as messages.
    """
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
        "GetServerInfo": grpc.unary_unary_rpc_method_handler(
            servicer.GetServerInfo,
            request_deserializer=pb.GetServerInfoRequest.FromString,
            response_serializer=pb.ServerInfo.SerializeToString,
        ),
        "Register": grpc.unary_unary_rpc_method_handler(
            servicer.Register,
            request_deserializer=pb.RegisterRequest.FromString,
            response_serializer=pb.RegisterResponse.SerializeToString,
        ),
        "WaitForLogin": grpc.unary_unary_rpc_method_handler(
            servicer.WaitForLogin,
            request_deserializer=pb.WaitForLoginRequest.FromString,
            response_serializer=pb.RegisterResponse.SerializeToString,
        ),
        "Sync": grpc.unary_stream_rpc_method_handler(
            servicer.Sync,
            request_deserializer=pb.SyncRequest.FromString,
            response_serializer=_serialize_update,
        ),
        "ReportStatus": grpc.unary_unary_rpc_method_handler(
            servicer.ReportStatus,
            request_deserializer=pb.StatusReport.FromString,
            response_serializer=pb.StatusAck.SerializeToString,
        ),
        "Signal": grpc.unary_unary_rpc_method_handler(
            servicer.Signal,
            request_deserializer=pb.SignalRequest.FromString,
            response_serializer=pb.SignalAck.SerializeToString,
        ),
        "RotateKey": grpc.unary_unary_rpc_method_handler(
            servicer.RotateKey,
            request_deserializer=pb.RotateKeyRequest.FromString,
            response_serializer=pb.RotateKeyResponse.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


class CoordinationServicer:
    """Implements ``ghostmesh.v1.Coordination``; register with :func:`add_coordination_to_server`.

    Not a subclass of the generated ``CoordinationServicer``: its Sync yields bytes too (see above).
    """

    def __init__(self, hub: Hub, server_key: PrivateKey, oidc: OidcService | None = None) -> None:
        self.hub = hub
        self.state = hub.state
        self.server_key = server_key
        self.oidc = oidc  # set when server.auth_method = "oidc"

    def _prove(self, context: Ctx, method: str) -> str:
        """The node key the caller proved it holds (base64), or AuthError / InvalidArgument."""
        proof = nodeauth.parse_metadata(_metadata(context))
        key = nodeauth.verify(self.server_key, proof, SERVICE + method, int(time.time() * 1000))
        return key.base64()

    def _node(self, context: Ctx, method: str) -> NodeRec:
        """The registered, unexpired node making this call."""
        key = self._prove(context, method)
        node = self._bound(key)
        if node is None:
            raise NotFound(f"node key {key[:8]}… is not registered; join with an auth key first")
        if node.expired(self.hub.now()):
            raise AuthError(f"node {node.name}'s key has expired; register again with an auth key")
        return node

    def _bound(self, key: str) -> NodeRec | None:
        """The node bound to the proven ``key``. A node's pending key (key rotation) proven here shows the
        node switched to it: it is promoted to the node key and every peer gets it (NodeChanged).
        """
        node = self.state.node_by_key(key)
        if node is not None:
            return node
        promoted = self.state.promote_pending(key, self.hub.now())
        if promoted is None:
            return None
        node, changes = promoted
        self.hub.dispatch(changes)
        log.info("node key rotated", extra={"node": node.name})
        # no gRPC context here: the remote is recorded on the rotation's start (node.key_rotate)
        self.hub.record(
            audit.node_actor(node.name), audit.NODE_KEY_SWITCH, node.name, {"id": node.id, "node_key": key}
        )
        return node

    @grpc_errors
    async def GetServerInfo(self, request: pb.GetServerInfoRequest, context: Ctx) -> pb.ServerInfo:
        return pb.ServerInfo(version=VERSION, server_key=self.server_key.public_key().base64())

    @grpc_errors
    async def Register(self, request: pb.RegisterRequest, context: Ctx) -> pb.RegisterResponse:
        key = self._prove(context, "Register")
        self._bound(key)  # a proven pending key (a rotation resumed after a crash) becomes the node key
        if self.oidc is not None and not request.auth_key:
            known = self.state.node_by_key(key)
            if known is None or known.expired(self.hub.now()):  # a login is needed: nothing written yet
                return pb.RegisterResponse(auth_url=self.oidc.begin(key, request.hostname))
        node, changes = self.state.register(key, request.auth_key, request.hostname, self.hub.now())
        self.hub.dispatch(changes)
        if changes:
            log.info("node registered", extra={"node": node.name})
            self.hub.record(
                audit.node_actor(node.name),
                audit.NODE_REGISTER,
                node.name,
                audit.register_detail(node, changes),
                context.peer(),
            )
        return pb.RegisterResponse(node=node_to_pb(node, self.state.is_online(node.id)))

    @grpc_errors
    async def WaitForLogin(self, request: pb.WaitForLoginRequest, context: Ctx) -> pb.RegisterResponse:
        """OIDC: returns the node once the login started by Register completed (:mod:`ghostmesh.oidc`)."""
        key = self._prove(context, "WaitForLogin")
        if self.oidc is None:
            raise InvalidArgument("this server does not use OIDC login; join with an auth key (--auth)")
        node = await self.oidc.wait(key)
        return pb.RegisterResponse(node=node_to_pb(node, self.state.is_online(node.id)))

    async def Sync(self, request: pb.SyncRequest, context: Ctx) -> AsyncIterator[bytes]:
        try:
            # aclosing: when the client goes away while this outer generator is suspended, the inner one
            # is closed at once (its finally marks the node offline), not whenever GC gets to it.
            async with contextlib.aclosing(self._sync(context)) as updates:
                async for update in updates:
                    yield update
        except GhostError as err:
            await abort_with(context, err, "Sync")

    async def _sync(self, context: Ctx) -> AsyncGenerator[bytes, None]:
        node = self._node(context, "Sync")
        if self.hub.stopping:
            raise Unavailable("server is shutting down; reconnect shortly")
        sid, full, wake = self.hub.open_stream(node.id)  # full: the encoded full map
        log.info("stream opened", extra={"node": node.name})
        try:
            yield full
            while True:
                await wake.wait()
                if self.hub.stopping:
                    raise Unavailable("server is shutting down; reconnect shortly")
                if self.hub.batch_delay > 0:
                    await asyncio.sleep(self.hub.batch_delay)  # let a burst pile up into one update
                wake.clear()
                session = self.hub.mapper.session(sid)
                if session is None or self.hub.stopping:
                    raise Unavailable("server is shutting down; reconnect shortly")
                if session.ended == "deleted":
                    raise NotFound(f"node {node.name} was deleted")
                if session.ended == "expired":
                    raise AuthError(f"node {node.name}'s key has expired; register again with an auth key")
                update = self.hub.mapper.flush_bytes(sid, self.hub.now())
                if update is not None:
                    yield update
        finally:
            self.hub.close_stream(sid, node.id)
            log.info("stream closed", extra={"node": node.name})

    @grpc_errors
    async def ReportStatus(self, request: pb.StatusReport, context: Ctx) -> pb.StatusAck:
        node = self._node(context, "ReportStatus")
        # refuse a bad advertisement before anything (the endpoints included) changes
        self.state.advertised_set(list(request.advertised_routes), request.advertise_exit_node)
        self.hub.dispatch(
            self.state.report_status(
                node.id,
                list(request.endpoints),
                self.hub.now(),
                home_region=request.home_region,
                turn_relay=request.turn_relay,
            )
        )
        added, gone, changes = self.state.advertise_routes(
            node.id, list(request.advertised_routes), request.advertise_exit_node, auto_approver(self.hub)
        )
        self.hub.dispatch(changes)
        actor, remote = f"node:{node.name}", context.peer()
        for rec in added:
            detail = {"prefix": rec.prefix, "approved": rec.approved}
            self.hub.record(actor, ROUTE_ADVERTISE, node.name, detail, remote)
        for rec in gone:
            self.hub.record(actor, ROUTE_WITHDRAW, node.name, {"prefix": rec.prefix}, remote)
        return pb.StatusAck()

    @grpc_errors
    async def Signal(self, request: pb.SignalRequest, context: Ctx) -> pb.SignalAck:
        node = self._node(context, "Signal")
        if len(request.payload) > MAX_SIGNAL_BYTES:
            raise InvalidArgument(f"signal payload too large: at most {MAX_SIGNAL_BYTES} bytes")
        target = self.state.node(request.to_node_id)
        if target is None or target.expired(self.hub.now()):
            raise NotFound(f"node {request.to_node_id} not found")
        sids = self.hub.mapper.queue_signal(target.id, node.id, request.payload)
        if not sids:
            raise Unavailable(f"node {target.name} is offline; try again when it is connected")
        self.hub.wake(sids)
        return pb.SignalAck()

    @grpc_errors
    async def RotateKey(self, request: pb.RotateKeyRequest, context: Ctx) -> pb.RotateKeyResponse:
        """Key rotation, step 1 (``coordination.proto``): the metadata proves the current key, the body the
        new one; the new key is stored as pending and reaches peers only once a call proves it
        (:meth:`_bound`). Any failure changes nothing.
        """
        try:
            node = self._node(context, "RotateKey")
        except AuthError as exc:
            raise AuthError(f"key rotation refused: {exc}") from None
        new_key = PublicKey.from_base64(request.new_node_key)
        proof = nodeauth.NodeProof(new_key, request.new_ts_ms, bytes(request.new_key_proof))
        try:
            nodeauth.verify(self.server_key, proof, ROTATE_NEW_METHOD, int(time.time() * 1000))
        except AuthError as exc:
            raise AuthError(
                f"key rotation refused: the new key's proof does not verify ({exc}); "
                "sign new_key_proof with the new private key"
            ) from None
        rec = self.state.begin_rotation(node.id, new_key.base64(), self.hub.now())
        log.info("node key rotation started", extra={"node": rec.name})
        self.hub.record(
            audit.node_actor(rec.name),
            audit.NODE_KEY_ROTATE,
            rec.name,
            {"id": rec.id, "node_key": rec.node_key, "new_node_key": new_key.base64()},
            context.peer(),
        )
        return pb.RotateKeyResponse(node=node_to_pb(rec, self.state.is_online(rec.id)))
