"""Benchmark: answers/s and latency of ghostlink's node resolver against a reference responder, same run.

Each server runs in its own process on 127.0.0.1 (one core each, as on a node): the node resolver
(``ghostlink.dns_server.DnsServer`` over ``dns_core.build_zone`` of a map with ``--peers`` peers, answering
``peerN.mesh.example`` A queries from the map) and the reference: a minimal asyncio responder built on the
same dnspython (parse the query, ``make_response``, one A record, ``to_wire``): the least any dnspython
server can do, so the ratio is the cost of the resolver's own logic. dnsmasq is measured too when it is
installed (``--dnsmasq``: answers from an ``--address`` rule, C, no Python).

The load generator (this process) keeps ``--concurrency`` queries in flight over UDP for ``--seconds``
against one server at a time, each query a random peer's name, and times every answer. Printed per server:
answers/s, p50 and p99 latency, and the node resolver's figures as a ratio of the reference's. Run:
``.venv/bin/python -m bench.dns [--seconds S] [--concurrency C] [--peers N] [--dnsmasq]``. Loopback only;
every process started here is stopped by PID.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import socket
import struct
import subprocess
import sys
import time
from typing import cast

import dns.message
import dns.rrset

from ghostcore.pb.ghostmesh.v1 import coordination_pb2 as pb
from ghostlink.dns_core import build_zone
from ghostlink.dns_server import DnsServer
from ghostlink.engine import NetMap

LO = "127.0.0.1"
PORTS = {"node": 35353, "reference": 35354, "dnsmasq": 35355}


def _netmap(peers: int) -> NetMap:
    def node(i: int) -> pb.Node:
        return pb.Node(
            id=i,
            name=f"peer{i}",
            node_key=f"k{i}",
            addresses=[f"100.64.{i // 250}.{i % 250 + 1}", f"fd7a:115c:a1e0::{i:x}"],
        )

    nm = NetMap()
    dns_cfg = pb.DnsConfig(magic_dns=True, base_domain="mesh.example")
    nm.apply(
        pb.MapUpdate(
            serial=1,
            full=True,
            self=node(0),
            peers_upserted=[node(i) for i in range(1, peers + 1)],
            dns=dns_cfg,
        )
    )
    return nm


class _Reference(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        q = dns.message.from_wire(data)
        r = dns.message.make_response(q)
        r.answer.append(dns.rrset.from_text(q.question[0].name, 10, "IN", "A", "100.64.0.1"))
        self.transport.sendto(r.to_wire(), addr)


async def _serve(kind: str, peers: int) -> None:
    if kind == "node":
        server = DnsServer(build_zone(_netmap(peers)))
        await server.start([(LO, PORTS["node"])])
    else:
        loop = asyncio.get_running_loop()
        await loop.create_datagram_endpoint(_Reference, local_addr=(LO, PORTS["reference"]))
    print("ready", flush=True)
    await asyncio.Event().wait()


class _Load(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.sent: dict[int, float] = {}
        self.latencies: list[float] = []
        self.free: asyncio.Queue[None] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        (qid,) = struct.unpack("!H", data[:2])
        start = self.sent.pop(qid, None)
        if start is not None:
            self.latencies.append(time.perf_counter() - start)
            self.free.put_nowait(None)


async def _load(port: int, seconds: float, concurrency: int, peers: int) -> tuple[float, float, float]:
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(_Load, remote_addr=(LO, port))
    wires = [dns.message.make_query(f"peer{i}.mesh.example", "A").to_wire()[2:] for i in range(1, peers + 1)]
    rng = random.Random(7)  # noqa: S311 - which peer to ask, not a secret
    qid = 0
    for _ in range(concurrency):
        proto.free.put_nowait(None)
    end = time.perf_counter() + seconds
    try:
        while time.perf_counter() < end:
            try:
                await asyncio.wait_for(proto.free.get(), 1.0)
            except TimeoutError:  # a lost datagram: its slot comes back
                proto.sent.clear()
                for _ in range(concurrency):
                    proto.free.put_nowait(None)
                continue
            qid = (qid + 1) & 0xFFFF
            proto.sent[qid] = time.perf_counter()
            transport.sendto(struct.pack("!H", qid) + rng.choice(wires))
    finally:
        transport.close()
    lat = sorted(proto.latencies)
    if not lat:
        return 0.0, 0.0, 0.0
    return len(lat) / seconds, lat[len(lat) // 2] * 1000, lat[int(len(lat) * 0.99)] * 1000


def _start(argv: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_ready(proc: subprocess.Popen[str], port: int) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stdout.read() if proc.stdout else ''}")
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(0.2)
        try:
            s.sendto(dns.message.make_query("peer1.mesh.example", "A").to_wire(), (LO, port))
            s.recvfrom(512)
            return
        except OSError:
            time.sleep(0.1)
        finally:
            s.close()
    raise RuntimeError(f"no answer on port {port}")


def _stop(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--peers", type=int, default=1000)
    ap.add_argument("--dnsmasq", action="store_true", help="also measure dnsmasq (when installed)")
    ap.add_argument("--serve", choices=("node", "reference"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        asyncio.run(_serve(args.serve, args.peers))
        return
    servers: dict[str, list[str]] = {
        kind: [sys.executable, "-m", "bench.dns", "--serve", kind, "--peers", str(args.peers)]
        for kind in ("reference", "node")
    }
    dnsmasq = shutil.which("dnsmasq")
    if args.dnsmasq and dnsmasq:
        servers["dnsmasq"] = [
            dnsmasq, "-k", "-C", "/dev/null", "-p", str(PORTS["dnsmasq"]), "--listen-address", LO,
            "--bind-interfaces", "--no-resolv", "--no-hosts", "--address=/mesh.example/100.64.0.1",
        ]  # fmt: skip
    results: dict[str, tuple[float, float, float]] = {}
    for kind, argv in servers.items():
        proc = _start(argv)
        try:
            _wait_ready(proc, PORTS[kind])
            results[kind] = asyncio.run(_load(PORTS[kind], args.seconds, args.concurrency, args.peers))
        finally:
            _stop(proc)
    print(
        f"UDP A queries, {args.concurrency} in flight, {args.seconds:g} s each, {args.peers} peers in the map"
    )
    print(f"{'server':<12}{'answers/s':>12}{'p50 ms':>10}{'p99 ms':>10}")
    for kind, (rate, p50, p99) in results.items():
        print(f"{kind:<12}{rate:>12.0f}{p50:>10.3f}{p99:>10.3f}")
    ref, node = results["reference"], results["node"]
    if ref[0] and node[0]:
        print(
            f"node resolver / dnspython reference: answers/s x{node[0] / ref[0]:.2f}, "
            f"p99 x{node[2] / ref[2]:.2f}"
        )
    if "dnsmasq" in results and results["dnsmasq"][0] and node[0]:
        print(f"node resolver / dnsmasq: answers/s x{node[0] / results['dnsmasq'][0]:.2f}")


if __name__ == "__main__":
    main()
