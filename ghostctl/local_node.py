"""This node's commands, answered by the local ghostlink over its root-only unix socket (LocalNode service);
the mesh's nodes as ghostmesh administers them are :mod:`ghostctl.nodes`.

``ghostctl status``  this node: name, overlay addresses, server, connected or not, backend, interface,
                     map serial, last error.
``ghostctl peers``   one row per peer: NAME, ADDRESSES, PATH (direct, relay <region>, turn <region>, -),
                     ENDPOINT (where WireGuard sends: the peer, or the local relay proxy), LATENCY (direct:
                     the last check's round trip; relay: ours to the relay), HANDSHAKE, RX, TX, ONLINE.
``ghostctl netcheck`` STUN from WireGuard's port to every relay now: UDP works or not, the NAT's mapping
                     behaviour (endpoint-independent or varies by destination), the public endpoint, each
                     relay's latency and what it saw, the home relay and how it is reached (quic / tcp).
"""

from __future__ import annotations

import argparse
from typing import Any

from ghostcore.pb.ghostmesh.v1 import local_pb2
from ghostctl import output
from ghostctl.context import Context

PEER_HEADERS = ("NAME", "ADDRESSES", "PATH", "ENDPOINT", "LATENCY", "HANDSHAKE", "RX", "TX", "ONLINE")
RELAY_HEADERS = ("REGION", "NAME", "STUN", "LATENCY", "SEEN AS", "HOME")


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    p = sub.add_parser("status", parents=[common], help="this node's state (from the local ghostlink)")
    p.set_defaults(func=run_status)
    p = sub.add_parser("peers", parents=[common], help="this node's peers and their WireGuard sessions")
    p.set_defaults(func=run_peers)
    p = sub.add_parser(
        "netcheck", parents=[common], help="NAT behaviour, public endpoint and relay latencies (measured now)"
    )
    p.set_defaults(func=run_netcheck)


def status_doc(st: local_pb2.LocalStatus) -> dict[str, Any]:
    return {
        "name": st.name,
        "node_id": st.node_id,
        "user": st.user,
        "node_key": st.node_key,
        "addresses": list(st.addresses),
        "server": st.server,
        "connected": st.connected,
        "map_serial": st.map_serial,
        "interface": st.interface,
        "backend": st.backend,
        "listen_port": st.listen_port,
        **output.time_fields("last_map", st.last_map_unix),
        "last_error": st.last_error,
        **output.time_fields("expires", st.expires_unix),
        "lock": {
            "enabled": st.lock_enabled,
            "key_signed": st.key_signed,
            "request": st.lock_request,
            "trusted_keys": list(st.lock_trusted),
        },
        "refused": list(st.refused),
        "refused_total": st.refused_total,
    }


def render_status(st: local_pb2.LocalStatus, now: float) -> str:
    iface = st.interface
    if iface and st.listen_port:
        iface = f"{iface} (udp port {st.listen_port})"
    serial = str(st.map_serial) if st.map_serial else "none yet"
    if st.last_map_unix:
        serial += f" (last map {output.ago(st.last_map_unix, now)})"
    return output.key_values(
        [
            ("name", st.name),
            ("node id", str(st.node_id) if st.node_id else ""),
            ("user", st.user),
            ("node key", st.node_key),
            ("addresses", ", ".join(st.addresses)),
            ("server", st.server),
            ("connected", output.yes_no(st.connected)),
            ("backend", st.backend),
            ("interface", iface),
            ("map serial", serial),
            ("expires", output.until(st.expires_unix, now)),
            ("last error", st.last_error),
            ("node-key signing", _lock_line(st)),
            ("signing request", st.lock_request if st.lock_enabled and not st.key_signed else ""),
            *(("refused", line) for line in st.refused),
        ]
    )


def _lock_line(st: local_pb2.LocalStatus) -> str:
    if not st.lock_enabled:
        return "off"
    signed = "this node is signed" if st.key_signed else "this node is NOT signed: peers refuse it"
    return f"on ({len(st.lock_trusted)} trusted keys); {signed}"


def run_status(ctx: Context, args: argparse.Namespace) -> int:
    stub, where = ctx.local()
    st = ctx.call(stub.Status, local_pb2.LocalStatusRequest(), where, node=True)
    ctx.emit(status_doc(st), lambda: render_status(st, ctx.now))
    return 0


def peer_doc(p: local_pb2.LocalPeer) -> dict[str, Any]:
    return {
        "node_id": p.node_id,
        "name": p.name,
        "node_key": p.node_key,
        "addresses": list(p.addresses),
        "path": p.path,
        "relay": p.relay,
        "endpoint": p.endpoint,
        "latency_ms": round(p.latency_ms, 3) if p.latency_ms > 0 else None,
        "via": p.via,
        **output.time_fields("latest_handshake", p.latest_handshake_unix),
        "rx_bytes": p.rx_bytes,
        "tx_bytes": p.tx_bytes,
        "online": p.online,
    }


def render_peers(peers: list[local_pb2.LocalPeer], now: float) -> str:
    rows = [
        (
            p.name,
            output.joined(p.addresses),
            path_text(p.path, p.relay) if p.path or not p.via else f"via {p.via}",
            p.endpoint,
            ms_text(p.latency_ms),
            output.ago(p.latest_handshake_unix, now),
            output.human_bytes(p.rx_bytes),
            output.human_bytes(p.tx_bytes),
            output.yes_no(p.online),
        )
        for p in peers
    ]
    return output.table(PEER_HEADERS, rows)


def run_peers(ctx: Context, args: argparse.Namespace) -> int:
    stub, where = ctx.local()
    resp = ctx.call(stub.Peers, local_pb2.LocalPeersRequest(), where, node=True)
    peers = sorted(resp.peers, key=lambda p: (p.name, p.node_id))
    ctx.emit([peer_doc(p) for p in peers], lambda: render_peers(peers, ctx.now))
    return 0


def ms_text(ms: float) -> str:
    return f"{ms:.1f} ms" if ms > 0 else "-"  # 0 or negative: not measured


def path_text(path: str, relay: str) -> str:
    if not path:
        return "-"
    return f"{path} {relay}" if relay else path


def netcheck_doc(r: local_pb2.NetcheckReport) -> dict[str, Any]:
    return {
        "udp": r.udp,
        "public_endpoint": r.public_endpoint,
        "mapping": r.mapping,
        "home_region": r.home_region,
        "relay_transport": r.relay_transport,
        "relays": [
            {
                "region": x.region,
                "name": x.name,
                "address": x.address,
                "latency_ms": round(x.latency_ms, 3) if x.latency_ms > 0 else None,
                "mapped": x.mapped,
                "home": x.home,
            }
            for x in r.relays
        ],
    }


def render_netcheck(r: local_pb2.NetcheckReport) -> str:
    mapping = {
        "endpoint-independent": "endpoint-independent (easy NAT or none: direct paths work)",
        "varies-by-destination": "varies by destination (hard NAT: direct to easy NATs by birthday probing)",
    }.get(r.mapping, r.mapping or "unknown")
    home = next((x.name for x in r.relays if x.home), "")
    head = output.key_values(
        [
            ("udp", output.yes_no(r.udp)),
            ("public endpoint", r.public_endpoint or "-"),
            ("mapping", mapping),
            ("home relay", f"{home} ({r.relay_transport})" if home else "none"),
        ]
    )
    rows = [
        (str(x.region), x.name, x.address, ms_text(x.latency_ms), x.mapped or "-", "*" if x.home else "")
        for x in r.relays
    ]
    return head + "\n" + output.table(RELAY_HEADERS, rows)


def run_netcheck(ctx: Context, args: argparse.Namespace) -> int:
    stub, where = ctx.local()
    r = ctx.call(stub.Netcheck, local_pb2.NetcheckRequest(), where, node=True)
    ctx.emit(netcheck_doc(r), lambda: render_netcheck(r))
    return 0
