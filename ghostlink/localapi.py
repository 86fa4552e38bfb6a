"""The LocalNode gRPC service (``proto/ghostmesh/v1/local.proto``) on ghostlink's root-only unix socket.

ghostctl's ``status``, ``peers`` and ``keys rotate`` talk to it. Access control is the file system: the
socket's parent directory is 0700 and the socket 0600 (created under a 0077 umask so there is no window
where it is wider), so only root reaches it. A stale socket from a crashed run is removed at start.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import grpc

from ghostcore.errors import GhostError, Unavailable
from ghostcore.grpcerr import status_for
from ghostcore.pb.ghostmesh.v1 import local_pb2, local_pb2_grpc
from ghostlink.control import Daemon
from ghostlink.rotate import KeyRotator


class LocalNodeService(local_pb2_grpc.LocalNodeServicer):
    def __init__(
        self,
        daemon: Daemon,
        *,
        server: str,
        backend_name: str,
        ifname: str,
        rotator: KeyRotator | None = None,
    ) -> None:
        self.daemon = daemon
        self.rotator = rotator
        self.server = server
        self.backend_name = backend_name
        self.ifname = ifname

    async def Status(
        self, request: local_pb2.LocalStatusRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> local_pb2.LocalStatus:
        d = self.daemon
        me = d.netmap.self_node
        st = local_pb2.LocalStatus(
            node_key=d.key.public_key().base64(),
            server=self.server,
            connected=d.status.connected,
            map_serial=d.netmap.serial,
            interface=self.ifname,
            backend=self.backend_name,
            listen_port=d.status.listen_port,
            last_map_unix=d.status.last_map_unix,
            last_error=d.status.last_error,
        )
        if me is not None:
            st.name, st.node_id, st.user, st.expires_unix = me.name, me.id, me.user, me.expires_unix
            st.addresses.extend(me.addresses)
        return st

    async def Peers(
        self, request: local_pb2.LocalPeersRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> local_pb2.LocalPeersResponse:
        d = self.daemon
        dev = await d.backend.read()
        out = local_pb2.LocalPeersResponse()
        for p in sorted(d.netmap.peers.values(), key=lambda n: n.name):
            wg = dev.peers.get(p.node_key)
            path, relay, latency = d.traversal.path(p.node_key) if d.traversal is not None else ("", "", -1.0)
            out.peers.append(
                local_pb2.LocalPeer(
                    node_id=p.id,
                    name=p.name,
                    node_key=p.node_key,
                    addresses=list(p.addresses),
                    endpoint=(wg.endpoint or "") if wg else "",
                    latest_handshake_unix=wg.last_handshake_sec if wg else 0,
                    rx_bytes=wg.rx_bytes if wg else 0,
                    tx_bytes=wg.tx_bytes if wg else 0,
                    online=p.online,
                    path=path,
                    relay=relay,
                    latency_ms=latency,
                )
            )
        return out

    async def Netcheck(
        self, request: local_pb2.NetcheckRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> local_pb2.NetcheckReport:
        t = self.daemon.traversal
        result = await t.netcheck() if t is not None else None
        if t is None or result is None:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                "netcheck needs NAT traversal, which is off in this ghostlink (no raw socket on its port)",
            )
            raise AssertionError("unreachable: abort raises")
        home = t.proxy.home_region
        transports = {rid: transport for rid, _, transport, _ in t.proxy.regions()}
        return local_pb2.NetcheckReport(
            udp=result.udp,
            public_endpoint=result.public_endpoint,
            mapping=result.mapping,
            home_region=home,
            relay_transport=transports.get(home, ""),
            relays=[
                local_pb2.RelayLatency(
                    region=r.region,
                    name=r.name,
                    address=r.address,
                    latency_ms=r.latency_ms,
                    mapped=r.mapped,
                    home=r.region == home,
                )
                for r in result.relays
            ],
        )

    async def RotateKey(
        self, request: local_pb2.LocalRotateKeyRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> local_pb2.LocalRotateKeyResponse:
        try:
            if self.rotator is None:
                raise Unavailable("key rotation is not available in this ghostlink")
            old, new = await self.rotator.rotate()
        except GhostError as exc:
            await context.abort(status_for(exc), f"key rotation failed: {exc}")
            raise  # unreachable: abort raises
        return local_pb2.LocalRotateKeyResponse(old_node_key=old.base64(), new_node_key=new.base64())


def prepare_socket(path: Path) -> None:
    """Parent dir 0700 (created if missing), stale socket removed."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


async def start_local_api(path: Path, service: LocalNodeService) -> grpc.aio.Server:
    prepare_socket(path)
    server = grpc.aio.server(options=(("grpc.max_receive_message_length", 64 * 1024),))
    local_pb2_grpc.add_LocalNodeServicer_to_server(service, server)
    server.add_insecure_port(f"unix://{path}")
    old = os.umask(0o077)
    try:
        await server.start()
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    return server


async def stop_local_api(server: grpc.aio.Server, path: Path) -> None:
    await server.stop(grace=1.0)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # one syscall on a local file; no thread needed
