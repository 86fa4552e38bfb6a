"""The LocalNode gRPC service (``proto/ghostmesh/v1/local.proto``) on ghostlink's root-only unix socket.

ghostctl's ``status``, ``peers``, ``netcheck``, ``ping``, ``dns status`` and ``keys rotate`` talk to it;
every answer comes from the daemon's public API (:class:`ghostlink.daemon.Daemon`). Access control is the
file system: the socket is root's and 0600 from its creation (bound under a 0177 umask, so there is no
moment where it is wider), so only root reaches it. Its directory is created 0700 when missing; one that
exists is never chmodded (it may be shared, e.g. ``/tmp``) but must keep others from replacing the socket:
root's and writable only by root, or sticky (:func:`ghostcore.files.check_socket_dir`). A stale socket from
a crashed run (a socket, root's) is removed at start; anything else at that path is refused.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

import grpc

from ghostcore.errors import ConfigError, GhostError
from ghostcore.files import check_socket_dir, umask
from ghostcore.grpcerr import status_for
from ghostcore.pb.ghostmesh.v1 import local_pb2, local_pb2_grpc
from ghostlink.daemon import Daemon

DEFAULT_PING_TIMEOUT = 2.0  # seconds an echo waits for its reply when ghostctl gives none
MAX_PING_TIMEOUT = 30.0  # one call must not hold a gRPC handler (and a raw socket) for long


class LocalNodeService(local_pb2_grpc.LocalNodeServicer):
    """The LocalNode RPCs, answered from the daemon's API (:class:`ghostlink.daemon.Daemon`)."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    async def Status(
        self, request: local_pb2.LocalStatusRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> local_pb2.LocalStatus:
        s = self.daemon.status()
        st = local_pb2.LocalStatus(
            node_key=s.node_key,
            server=s.server,
            connected=s.connected,
            map_serial=s.map_serial,
            interface=s.interface,
            backend=s.backend,
            listen_port=s.listen_port,
            last_map_unix=s.last_map_unix,
            last_error=s.last_error,
            lock_enabled=s.lock.enabled,
            key_signed=s.lock.key_signed,
            lock_request=s.lock.request,
            lock_trusted=s.lock.trusted,
            refused=s.lock.refused,
            refused_total=s.lock.refused_total,
        )
        me = s.self_node
        if me is not None:
            st.name, st.node_id, st.user, st.expires_unix = me.name, me.id, me.user, me.expires_unix
            st.addresses.extend(me.addresses)
        return st

    async def Peers(
        self, request: local_pb2.LocalPeersRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> local_pb2.LocalPeersResponse:
        return local_pb2.LocalPeersResponse(
            peers=[
                local_pb2.LocalPeer(
                    node_id=p.node.id,
                    name=p.node.name,
                    node_key=p.node.node_key,
                    addresses=list(p.node.addresses),
                    endpoint=p.endpoint,
                    latest_handshake_unix=p.latest_handshake_unix,
                    rx_bytes=p.rx_bytes,
                    tx_bytes=p.tx_bytes,
                    online=p.node.online,
                    path=p.path.kind,
                    relay=p.path.relay,
                    latency_ms=p.path.latency_ms,
                    via=p.via,
                )
                for p in await self.daemon.peers()
            ]
        )

    async def Netcheck(
        self, request: local_pb2.NetcheckRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> local_pb2.NetcheckReport:
        nc = await self.daemon.netcheck()
        if nc is None:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                "netcheck needs NAT traversal, which is off in this ghostlink (no raw socket on its port)",
            )
            raise AssertionError("unreachable: abort raises")
        home = nc.relay.home_region
        return local_pb2.NetcheckReport(
            udp=nc.result.udp,
            public_endpoint=nc.result.public_endpoint,
            mapping=nc.result.mapping,
            home_region=home,
            relay_transport=nc.relay.home_transport,
            relays=[
                local_pb2.RelayLatency(
                    region=r.region,
                    name=r.name,
                    address=r.address,
                    latency_ms=r.latency_ms,
                    mapped=r.mapped,
                    home=r.region == home,
                )
                for r in nc.result.relays
            ],
        )

    async def Ping(
        self, request: local_pb2.LocalPingRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> local_pb2.LocalPingResponse:
        timeout = request.timeout_s or DEFAULT_PING_TIMEOUT
        if not 0 < timeout <= MAX_PING_TIMEOUT:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"ping: timeout {timeout:g} s is out of range; give 0 < timeout <= {MAX_PING_TIMEOUT:g} s",
            )
            raise AssertionError("unreachable: abort raises")
        try:
            r = await self.daemon.ping(request.peer, timeout)
        except GhostError as exc:
            await context.abort(status_for(exc), str(exc))
            raise  # unreachable: abort raises
        except OSError as exc:  # the raw socket: no route into the tunnel, interface gone, …
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"ping: sending the echo failed: {exc}")
            raise AssertionError("unreachable: abort raises") from exc
        return local_pb2.LocalPingResponse(
            name=r.node.name,
            node_key=r.node.node_key,
            address=r.address,
            answered=r.rtt is not None,
            rtt_ms=r.rtt * 1000 if r.rtt is not None else -1.0,
            path=r.path.kind,
            relay=r.path.relay,
            endpoint=r.endpoint,
            path_latency_ms=r.path.latency_ms,
        )

    async def DnsStatus(
        self, request: local_pb2.LocalDnsStatusRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> local_pb2.LocalDnsStatus:
        try:
            d = self.daemon.dns_status()
        except GhostError as exc:
            await context.abort(status_for(exc), str(exc))
            raise  # unreachable: abort raises
        return local_pb2.LocalDnsStatus(
            accept_dns=d.accept_dns,
            configured=d.configured,
            magic_dns=d.magic_dns,
            base_domain=d.base_domain,
            names=d.names,
            extra_records=d.extra_records,
            split=[local_pb2.LocalSplitDomain(domain=dom, servers=list(srv)) for dom, srv in d.split],
            upstreams=list(d.upstreams),
            upstreams_source=d.upstreams_source,
            search_domains=list(d.search_domains),
            listen=list(d.listen),
            host_mode=d.host_mode,
            host_detail=d.host_detail,
            queries=d.queries,
            forwarded=d.forwarded,
            dropped=d.dropped,
            refused=list(d.refused),
        )

    async def RotateKey(
        self, request: local_pb2.LocalRotateKeyRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> local_pb2.LocalRotateKeyResponse:
        try:
            old, new = await self.daemon.rotate_key()
        except GhostError as exc:
            await context.abort(status_for(exc), f"key rotation failed: {exc}")
            raise  # unreachable: abort raises
        return local_pb2.LocalRotateKeyResponse(old_node_key=old.base64(), new_node_key=new.base64())


def prepare_socket(path: Path) -> None:
    """The directory checked (created 0700 if missing), a stale socket of ours removed."""
    check_socket_dir(path.parent, "--socket")
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode) or st.st_uid not in (0, os.geteuid()):
        raise ConfigError(
            f"{path}: exists and is not a socket ghostlink left (uid {st.st_uid}); remove it or choose "
            "another --socket"
        )
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


async def start_local_api(path: Path, service: LocalNodeService) -> grpc.aio.Server:
    prepare_socket(path)
    server = grpc.aio.server(options=(("grpc.max_receive_message_length", 64 * 1024),))
    local_pb2_grpc.add_LocalNodeServicer_to_server(service, server)
    # gRPC binds the socket here, not in start(): the umask must cover this call for a 0600 socket
    with umask(0o177):
        server.add_insecure_port(f"unix://{path}")
    await server.start()
    return server


async def stop_local_api(server: grpc.aio.Server, path: Path) -> None:
    await server.stop(grace=1.0)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # one syscall on a local file; no thread needed
