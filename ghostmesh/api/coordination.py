"""The Coordination servicer: what ghostlink nodes call (``proto/ghostmesh/v1/coordination.proto``).

Every RPC but GetServerInfo carries a node proof (``ghostcore.nodeauth``, v2) verified with the server's
X25519 private key: the caller provably holds the private key of the node key it claims, and the proof
covers the full method path, a timestamp, a nonce and the SHA-256 of the request's serialized bytes. Those
bytes are the ones the server parses: each request deserializer keeps them next to the message
(:class:`Signed`), so a body changed on the way (a proxy swapping the new key inside a RotateKey) fails
the proof. A proof that verifies is then admitted by the servicer's :class:`ghostcore.nodeauth.ReplayGuard`
(only then, so unauthenticated junk cannot fill it): the same request sent twice is refused
(UNAUTHENTICATED), and a guard at capacity refuses new requests (UNAVAILABLE) rather than forget a nonce.

Sync sends the full map, then waits on its stream's event (set by :class:`ghostmesh.hub.Hub`'s flusher when
a round releases the stream, see :mod:`ghostmesh.flushplan`) and flushes one delta. It ends with
NOT_FOUND when its node is deleted, UNAUTHENTICATED when its key expires, ALREADY_EXISTS when the node
opened a newer stream (one stream per node), UNAVAILABLE at shutdown.

Every change a call makes runs in one hub transaction with its audit rows (:meth:`ghostmesh.hub.Hub.
transaction`). ReportStatus is limited per node (``limits.status_reports_per_second``, RESOURCE_EXHAUSTED
before anything changes), and the route rows it audits per node per window too
(``limits.audit_rows_per_node_per_minute``; the rest are summarised when the window closes).

RotateKey stores a node's proven new key as pending; any later call proven with that key promotes it
(:meth:`CoordinationServicer._bound`), so peers learn only a key the node already uses. The new key
consents in the body (``nodeauth.rotation_proof``, bound to the key that proved the call), and while
node-key signing is on it needs a signature (``new_key_signature``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import grpc
from google.protobuf.message import Message

from ghostcore import nodeauth
from ghostcore.errors import AuthError, Conflict, GhostError, InvalidArgument, NotFound, Unavailable
from ghostcore.keys import PrivateKey, PublicKey
from ghostcore.pb.ghostmesh.v1 import coordination_pb2 as pb
from ghostmesh import audit
from ghostmesh.api.errors import AUTH_GATE, abort_with, grpc_errors
from ghostmesh.audit import ROUTE_ADVERTISE, ROUTE_WITHDRAW
from ghostmesh.hub import Hub
from ghostmesh.limits import source_of
from ghostmesh.mapper import node_to_pb
from ghostmesh.policy_source import PolicySource
from ghostmesh.state import refuse_device
from ghostmesh.store.base import NodeRec

if TYPE_CHECKING:  # the OIDC stack (aiohttp, httpx, authlib) loads only when OIDC is configured
    from ghostmesh.oidc import OidcService

log = logging.getLogger(__name__)

SERVICE_NAME = "ghostmesh.v1.Coordination"
SERVICE = f"/{SERVICE_NAME}/"
VERSION = "0.1.0"

Ctx = grpc.aio.ServicerContext[Any, Any]
M = TypeVar("M", bound=Message)


@dataclass(frozen=True, slots=True)
class Signed(Generic[M]):
    """A request as it arrived: the serialized bytes the node's proof covers, and the message parsed
    from exactly those bytes."""

    raw: bytes = field(repr=False)
    msg: M


def _signed(cls: type[M]) -> Callable[[bytes], Signed[M]]:
    """A request deserializer that keeps the raw bytes next to the parsed message."""

    def parse(raw: bytes) -> Signed[M]:
        return Signed(raw, cls.FromString(raw))

    return parse


def _now_ms() -> int:
    return int(time.time() * 1000)


def _metadata(context: Ctx) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in context.invocation_metadata() or ():
        if isinstance(value, str):
            out[key] = value
    return out


def _check_caller_waits(context: Ctx, method: str) -> None:
    """Unavailable when the caller of ``method`` has given up (its deadline passed, or it cancelled).

    Called just before a change is committed: a call that sat in the server's queue past its deadline (a
    join wave, a slow disk) would otherwise store a node whose owner never learns of it, a phantom that
    every peer's map carries until it expires. Nothing after this check awaits, so the commit and the
    reply follow at once; a caller retrying with the same key gets its one node either way (a known,
    unexpired key registers as the same node).
    """
    remaining = context.time_remaining()
    if context.done() or (remaining is not None and remaining <= 0):
        raise Unavailable(f"{method}: the caller gave up (deadline passed or cancelled); nothing stored")


def _serialize_update(update: pb.MapUpdate | bytes) -> bytes:
    return update if isinstance(update, bytes) else update.SerializeToString()


def add_coordination_to_server(servicer: CoordinationServicer, server: grpc.aio.Server) -> None:
    """Register the Coordination service, as ``add_CoordinationServicer_to_server`` does, except that every
    request but GetServerInfo's arrives as :class:`Signed` (the bytes its proof covers, and the message),
    and that Sync may yield ready-encoded ``MapUpdate`` bytes (the mapper's cached peer entries).
    """
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
        "GetServerInfo": grpc.unary_unary_rpc_method_handler(
            servicer.GetServerInfo,
            request_deserializer=pb.GetServerInfoRequest.FromString,
            response_serializer=pb.ServerInfo.SerializeToString,
        ),
        "Register": grpc.unary_unary_rpc_method_handler(
            servicer.Register,
            request_deserializer=_signed(pb.RegisterRequest),
            response_serializer=pb.RegisterResponse.SerializeToString,
        ),
        "WaitForLogin": grpc.unary_unary_rpc_method_handler(
            servicer.WaitForLogin,
            request_deserializer=_signed(pb.WaitForLoginRequest),
            response_serializer=pb.RegisterResponse.SerializeToString,
        ),
        "Sync": grpc.unary_stream_rpc_method_handler(
            servicer.Sync,
            request_deserializer=_signed(pb.SyncRequest),
            response_serializer=_serialize_update,
        ),
        "ReportStatus": grpc.unary_unary_rpc_method_handler(
            servicer.ReportStatus,
            request_deserializer=_signed(pb.StatusReport),
            response_serializer=pb.StatusAck.SerializeToString,
        ),
        "RotateKey": grpc.unary_unary_rpc_method_handler(
            servicer.RotateKey,
            request_deserializer=_signed(pb.RotateKeyRequest),
            response_serializer=pb.RotateKeyResponse.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


class CoordinationServicer:
    """Implements ``ghostmesh.v1.Coordination``; register with :func:`add_coordination_to_server`.

    Not a subclass of the generated ``CoordinationServicer``: its handlers take :class:`Signed` requests and
    its Sync yields bytes too (see above). It owns the replay guard of node proofs.
    """

    def __init__(
        self, hub: Hub, server_key: PrivateKey, policy: PolicySource, oidc: OidcService | None = None
    ) -> None:
        self.hub = hub
        self.state = hub.state
        self.server_key = server_key
        self.policy = policy  # its auto-approvers approve what nodes advertise
        self.oidc = oidc  # set when server.auth_method = "oidc"
        self.replay = nodeauth.ReplayGuard()

    def _prove(self, context: Ctx, method: str, raw: bytes) -> str:
        """The node key (base64) the caller proved it holds, for exactly the request ``raw``, once.

        AuthError: a missing, wrong or stale proof, or a replay; InvalidArgument: malformed credentials;
        Unavailable: the replay guard is full; ResourceExhausted: a key that is no node's from a source over
        its failed-authentication limit (:class:`ghostmesh.api.errors.AuthGate`). The nonce is remembered only
        once the proof verified.
        """
        proof = nodeauth.read_proof(_metadata(context))
        now_ms = _now_ms()
        key = nodeauth.check_proof(self.server_key, proof, SERVICE + method, raw, now_ms).base64()
        gate = AUTH_GATE.get()
        if (
            gate is not None
            and self.state.node_by_key(key) is None
            and self.state.node_by_pending_key(key) is None
        ):
            # anyone can make keys: from a source over its limit, a key that is no node's is not remembered
            raise gate.refuse()
        self.replay.admit(proof, now_ms)
        return key

    def _node(self, context: Ctx, method: str, raw: bytes) -> NodeRec:
        """The registered, unexpired node making this call."""
        return self._known(self._prove(context, method, raw))

    def _known(self, key: str) -> NodeRec:
        """The registered, unexpired node holding the proven ``key``."""
        node = self._bound(key)
        if node is None:
            raise NotFound(f"node key {key[:8]}… is not registered; join with an auth key first")
        refuse_device(node)
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
        with self.hub.transaction() as tx:
            promoted = self.state.promote_pending(key, self.hub.now())
            if promoted is None:
                return None
            node, changes = promoted
            tx.dispatch(changes)
            # no gRPC context here: the remote is recorded on the rotation's start (node.key_rotate)
            tx.record(
                audit.node_actor(node.name),
                audit.NODE_KEY_SWITCH,
                node.name,
                {"id": node.id, "node_key": key},
            )
        log.info("node key rotated", extra={"node": node.name})
        return node

    @grpc_errors
    async def GetServerInfo(self, request: pb.GetServerInfoRequest, context: Ctx) -> pb.ServerInfo:
        return pb.ServerInfo(version=VERSION, server_key=self.server_key.public_key().base64())

    @grpc_errors
    async def Register(self, request: Signed[pb.RegisterRequest], context: Ctx) -> pb.RegisterResponse:
        key = self._prove(context, "Register", request.raw)
        req = request.msg
        self._bound(key)  # a proven pending key (a rotation resumed after a crash) becomes the node key
        if self.oidc is not None and not req.auth_key:
            known = self.state.node_by_key(key)
            if known is None or known.expired(self.hub.now()):  # a login is needed: nothing written yet
                source = source_of(context.peer()) or context.peer()
                url = self.oidc.begin(key, req.hostname, source, context.peer())
                return pb.RegisterResponse(auth_url=url)
        _check_caller_waits(context, "Register")
        with self.hub.transaction() as tx:
            node, changes = self.state.register(
                key, req.auth_key, req.hostname, self.hub.now(), bytes(req.key_signature)
            )
            tx.dispatch(changes)
            if changes:
                tx.record(
                    audit.node_actor(node.name),
                    audit.NODE_REGISTER,
                    node.name,
                    audit.register_detail(node, changes),
                    context.peer(),
                )
        if changes:
            log.info("node registered", extra={"node": node.name})
        return pb.RegisterResponse(node=node_to_pb(node, self.state.is_online(node.id)))

    @grpc_errors
    async def WaitForLogin(
        self, request: Signed[pb.WaitForLoginRequest], context: Ctx
    ) -> pb.RegisterResponse:
        """OIDC: returns the node once the login started by Register completed (:mod:`ghostmesh.oidc`)."""
        key = self._prove(context, "WaitForLogin", request.raw)
        if self.oidc is None:
            raise InvalidArgument("this server does not use OIDC login; join with an auth key (--auth)")
        node = await self.oidc.wait(key)
        return pb.RegisterResponse(node=node_to_pb(node, self.state.is_online(node.id)))

    async def Sync(self, request: Signed[pb.SyncRequest], context: Ctx) -> AsyncIterator[bytes]:
        try:
            # aclosing: when the client goes away while this outer generator is suspended, the inner one
            # is closed at once (its finally marks the node offline), not whenever GC gets to it.
            async with contextlib.aclosing(self._sync(context, request.raw)) as updates:
                async for update in updates:
                    yield update
                    # the full map is O(N) bytes: not kept referenced while the stream waits for a delta
                    del update
        except GhostError as err:
            await abort_with(context, err, "Sync")

    async def _sync(self, context: Ctx, raw: bytes) -> AsyncGenerator[bytes, None]:
        node = self._node(context, "Sync", raw)
        # At most limits.full_maps_in_flight full maps (O(N) bytes each) are built and written at once: a
        # whole fleet reconnecting waits its turn here instead of holding N of them in memory together.
        await self.hub.full_maps.acquire()
        try:
            sid, full, wake = self._open_stream(node)  # full: the encoded full map
        except BaseException:
            self.hub.full_maps.release()
            raise
        log.info("stream opened", extra={"node": node.name})
        stats = self.hub.mapper.stats
        try:
            try:
                stats.full_maps_sent += 1
                stats.full_map_bytes += len(full)
                yield full
                # the encoded full map (O(N) bytes) is sent: holding it for the stream's life would cost
                # O(N) per stream, O(N²) for the server
                del full
            finally:
                self.hub.full_maps.release()
            while True:
                await wake.wait()  # the hub's flusher released this stream's round
                wake.clear()
                session = self.hub.mapper.session(sid)
                if session is None or self.hub.stopping:
                    raise Unavailable("server is shutting down; reconnect shortly")
                if session.ended == "deleted":
                    raise NotFound(f"node {node.name} was deleted")
                if session.ended == "expired":
                    raise AuthError(f"node {node.name}'s key has expired; register again with an auth key")
                if session.ended == "replaced":
                    raise Conflict(f"node {node.name} opened a newer map stream, which replaces this one")
                update = self.hub.mapper.flush_bytes(sid, self.hub.now())
                sent = update is not None
                if update is not None:
                    stats.deltas_sent += 1
                    stats.delta_bytes += len(update)
                    yield update  # returns once gRPC took it: the round counts the write
                    update = None
                self.hub.flushed(sid, sent)
        finally:
            self.hub.close_stream(sid, node.id)
            log.info("stream closed", extra={"node": node.name})

    def _open_stream(self, node: NodeRec) -> tuple[int, bytes, asyncio.Event]:
        """The node's stream, once its turn to get a full map came."""
        if self.hub.stopping:
            raise Unavailable("server is shutting down; reconnect shortly")
        if self.hub.mapper.visible(node.id) is None:  # deleted or expired while it waited
            raise NotFound(f"node {node.name} is not in the map; register again")
        return self.hub.open_stream(node.id)

    @grpc_errors
    async def ReportStatus(self, request: Signed[pb.StatusReport], context: Ctx) -> pb.StatusAck:
        key = self._prove(context, "ReportStatus", request.raw)
        now = self.hub.now()
        reporter = self.state.node_by_key(key) or self.state.node_by_pending_key(key)
        if reporter is not None:  # over its rate: refused before anything (a pending key too) changes
            self.hub.limits.check_status_report(reporter.id, now)
        node = self._known(key)
        report = request.msg
        # refuse a bad advertisement before anything (the endpoints included) changes
        self.state.advertised_set(list(report.advertised_routes), report.advertise_exit_node)
        limits, actor, remote = self.hub.limits, audit.node_actor(node.name), context.peer()
        with self.hub.transaction() as tx:
            tx.dispatch(
                self.state.report_status(
                    node.id,
                    list(report.endpoints),
                    now,
                    home_region=report.home_region,
                    turn_relay=report.turn_relay,
                )
            )
            added, gone, changes = self.state.advertise_routes(
                node.id, list(report.advertised_routes), report.advertise_exit_node, self.policy.auto_approves
            )
            tx.dispatch(changes)
            for rec in added:
                if limits.route_row(node.id, ROUTE_ADVERTISE, now):
                    detail = {"prefix": rec.prefix, "approved": rec.approved}
                    tx.record(actor, ROUTE_ADVERTISE, node.name, detail, remote)
            for rec in gone:
                if limits.route_row(node.id, ROUTE_WITHDRAW, now):
                    tx.record(actor, ROUTE_WITHDRAW, node.name, {"prefix": rec.prefix}, remote)
        return pb.StatusAck()

    @grpc_errors
    async def RotateKey(self, request: Signed[pb.RotateKeyRequest], context: Ctx) -> pb.RotateKeyResponse:
        """Key rotation, step 1 (``coordination.proto``): the metadata proves the current key over the whole
        body, the new key consents to replacing exactly that key (``new_key_proof``); the new key is stored
        as pending and reaches peers only once a call proves it (:meth:`_bound`). Any failure changes
        nothing.
        """
        try:
            node = self._node(context, "RotateKey", request.raw)
        except AuthError as exc:
            raise AuthError(f"key rotation refused: {exc}") from None
        req = request.msg
        new_key = PublicKey.from_base64(req.new_node_key)
        try:
            nodeauth.check_rotation_proof(
                self.server_key,
                new_key,
                PublicKey.from_base64(node.node_key),  # the key that proved this call
                ts_ms=req.new_ts_ms,
                mac=bytes(req.new_key_proof),
                now_ms=_now_ms(),
            )
        except AuthError as exc:
            raise AuthError(
                f"key rotation refused: the new key's proof does not verify ({exc}); "
                "make new_key_proof with the new private key (nodeauth.rotation_proof)"
            ) from None
        retried = node.pending_key == new_key.base64()  # answered again, recorded once
        with self.hub.transaction() as tx:
            rec = self.state.begin_rotation(
                node.id, new_key.base64(), self.hub.now(), bytes(req.new_key_signature)
            )
            if not retried:
                tx.record(
                    audit.node_actor(rec.name),
                    audit.NODE_KEY_ROTATE,
                    rec.name,
                    {"id": rec.id, "node_key": rec.node_key, "new_node_key": new_key.base64()},
                    context.peer(),
                )
        if not retried:
            log.info("node key rotation started", extra={"node": rec.name})
        return pb.RotateKeyResponse(node=node_to_pb(rec, self.state.is_online(rec.id)))
