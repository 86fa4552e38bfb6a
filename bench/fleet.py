"""Benchmark: the control plane at fleet scale, one ghostmesh against N simulated nodes per row.

For each N in ``--nodes`` (e.g. 100,500,1000) the parent starts this checkout's ``ghostmesh`` as a
subprocess on 127.0.0.1 (a temporary state directory, as :mod:`bench.fanout` does, whose process
handling, proof code and /proc readers this module reuses), creates a reusable auth key with ``ghostctl``
and runs, in its own asyncio loop, N simulated nodes multiplexed over ``--channels`` gRPC channels (or,
with ``--conn-per-node``, one channel and so one TLS connection per node, as real nodes have). Each node
has its own X25519 key and makes the calls ghostlink makes, proven the same way (TLS pinned by the key's
pin, v2 proofs over the request bytes):

* **join wave**: every node Registers with the auth key (``--concurrency`` in flight) and opens its map
  stream (Sync) as soon as it is registered. Reported: registers per second, the seconds until every node
  has its full map, until every node knows all N-1 peers (the wave has converged), and the messages and
  bytes the streams received until then; the server's CPU seconds during the wave and the simulator's
  share of the CPU both spent;
* **idle**: the server's RSS (``VmRSS``) once the streams have been quiet for a second, all N open;
* **one change**: ``--changes`` times, one node reports new endpoints; the time until every other stream
  has the delta carrying them: p50 / p99 over all (stream, change) samples;
* **reconnect storm**: every stream is dropped (cancelled by the client), then all are reopened at once:
  the seconds until every node has a full map again, and the deltas each node received until quiet.

The reference, measured in the same run for the same N: the in-process mapper (``ghostmesh.mapper``)
seeded with N node records (one policy compile) building every node's encoded full map, no gRPC, no
SQLite, no TLS. The ratio ``wave CPU / mapper`` shows what the network, gRPC, TLS and storage add to the
map computation itself.

The bench's ghostmesh raises ``[limits] streams_per_connection`` and ``calls_per_source``: every simulated
node shares 127.0.0.1, and many share a connection, which real nodes never do. Every phase is bounded by
``--phase-timeout``; the server is killed by its PID and its directory removed on the way out. The
simulator shares this machine's cores with the server and parses every message in one Python process, so
absolute numbers depend on the machine; compare the ratios and rows of one run.

Run: ``PYTHONPATH=$PWD .venv/bin/python -m bench.fleet --nodes 100,500,1000 [--channels 8 |
--conn-per-node] [--concurrency 64] [--changes 5] [--phase-timeout 120] [--batch-delay S]``.
``--batch-delay`` sets the server's ``[mapper] batch_delay``: how often each stream may flush, and so how
much of the server's loop delta flushing takes from accepting Registers and new streams during a wave.

Why one module of about 475 lines: the simulated fleet (:class:`_Fleet`, half of it) and the four phases
it drives share one set of streams and counters, and the reference, the server's start and the report
are a few dozen lines each; the process handling, proofs and /proc readers are :mod:`bench.fanout`'s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from bench.fanout import (
    M_REGISTER,
    M_REPORT,
    M_SERVER_INFO,
    M_SYNC,
    REPO,
    Procs,
    _Change,
    _cpu_s,
    _Protocol,
    _rss_kib,
    _SimNode,
    _wait_listening,
)

QUIET_S = 1.0  # streams silent this long: the traffic of a wave is over
CHANGE_GAP_S = 0.1  # pause between changes, so each starts on an idle server
SERVER_LIMITS = "[limits]\nstreams_per_connection = 100000\ncalls_per_source = 100000\ncalls_total = 100000\n"


@dataclass
class _Wave:
    """What the streams received since the wave began."""

    n: int
    messages: int = 0
    bytes: int = 0
    deltas: int = 0
    have_map: set[int] = field(default_factory=set)
    complete: set[int] = field(default_factory=set)  # nodes that know all N-1 peers
    all_maps: asyncio.Event = field(default_factory=asyncio.Event)
    converged: asyncio.Event = field(default_factory=asyncio.Event)
    maps_at: float = 0.0
    converged_at: float = 0.0


class _Known:
    """The peers one simulated node knows, as a byte per node id: at 10,000 nodes a set of ints per node
    would hold 10^8 entries (gigabytes); this holds 10^8 bytes."""

    __slots__ = ("count", "flags")

    def __init__(self) -> None:
        self.flags = bytearray()
        self.count = 0

    def clear(self) -> None:
        self.flags = bytearray(len(self.flags))
        self.count = 0

    def add(self, peer: int) -> None:
        if peer >= len(self.flags):
            self.flags.extend(bytes(peer + 1 - len(self.flags)))
        if not self.flags[peer]:
            self.flags[peer] = 1
            self.count += 1

    def discard(self, peer: int) -> None:
        if peer < len(self.flags) and self.flags[peer]:
            self.flags[peer] = 0
            self.count -= 1


class _Fleet:
    """N simulated nodes in this process over shared (or per-node) channels."""

    def __init__(self, proto: _Protocol, n: int, opts: argparse.Namespace) -> None:
        self.proto, self.n, self.opts = proto, n, opts
        self.limit: float = opts.phase_timeout
        self.channels: list[grpc.aio.Channel] = []
        self.nodes: list[_SimNode] = []
        self.known = [_Known() for _ in range(n)]  # each node's peers, from its stream
        self.readers: dict[int, asyncio.Task[None]] = {}
        self.wave = _Wave(n)
        self.change: _Change | None = None
        self.errors: list[str] = []
        self.failed = asyncio.Event()
        self.dropping = False  # streams are being cancelled on purpose
        self.last_update = 0.0

    async def open(self) -> None:
        count = self.n if self.opts.conn_per_node else min(self.opts.channels, self.n)
        pb = self.proto.pb
        for _ in range(count):
            channel = await self.proto.open_channel()
            self.channels.append(channel)
        body = pb.GetServerInfoRequest().SerializeToString()
        info = await self.proto.unary(self.channels[0], M_SERVER_INFO, body, None, pb.ServerInfo)
        server_key = self.proto.keys.PublicKey.from_base64(info.server_key)
        self.nodes = [
            _SimNode(i, self.proto.keys.PrivateKey.generate(), self.channels[i % count], server_key)
            for i in range(self.n)
        ]

    def _decode(self, raw: bytes) -> tuple[int, Any]:
        return len(raw), self.proto.pb.MapUpdate.FromString(raw)

    def _on_update(self, node: _SimNode, known: _Known, size: int, upd: Any) -> None:
        """Count one message of ``node``'s stream and fold it into what the node knows."""
        others = self.n - 1
        now = time.perf_counter()
        self.last_update = now
        wave = self.wave
        wave.messages += 1
        wave.bytes += size
        if upd.full:
            known.clear()
            if node.index not in wave.have_map:
                wave.have_map.add(node.index)
                if len(wave.have_map) == self.n:
                    wave.maps_at = now
                    wave.all_maps.set()
        else:
            wave.deltas += 1
        for p in upd.peers_upserted:
            known.add(p.id)
        for gone in upd.peers_removed:
            known.discard(gone)
        if known.count == others and node.index not in wave.complete:
            wave.complete.add(node.index)
            if len(wave.complete) == self.n:
                wave.converged_at = now
                wave.converged.set()
        if self.change is not None:
            self.change.observe(node.index, upd, now)

    async def _read(self, node: _SimNode) -> None:
        body = self.proto.pb.SyncRequest().SerializeToString()
        sync: grpc.aio.UnaryStreamMultiCallable[bytes, Any]
        sync = node.channel.unary_stream(M_SYNC, response_deserializer=self._decode)
        call = sync(body, metadata=self.proto.metadata(node, M_SYNC, body))
        known = self.known[node.index]
        try:
            async for size, upd in call:
                self._on_update(node, known, size, upd)
                del upd  # a parsed full map is megabytes at 10,000 nodes: not kept while waiting
            self.errors.append(f"sim{node.index}: the server ended the map stream")
        except grpc.aio.AioRpcError as exc:
            if self.dropping and exc.code() == grpc.StatusCode.CANCELLED:
                return
            self.errors.append(f"sim{node.index}: Sync {exc.code().name}: {exc.details()}")
        finally:
            call.cancel()
        if not self.dropping:
            self.failed.set()

    async def _until(self, event: asyncio.Event, what: str) -> None:
        """Wait for ``event``, at most the phase timeout; a failed stream ends the wait at once."""
        waits = [asyncio.ensure_future(event.wait()), asyncio.ensure_future(self.failed.wait())]
        try:
            await asyncio.wait(waits, timeout=self.limit, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
        if self.failed.is_set():
            raise RuntimeError(f"{what}: {'; '.join(self.errors[:3])}")
        if not event.is_set():
            raise RuntimeError(f"{what}: not within {self.limit:g}s ({'; '.join(self.errors[:3])})")

    async def _quiet(self) -> None:
        deadline = time.monotonic() + self.limit
        while time.perf_counter() - self.last_update < QUIET_S:
            if time.monotonic() > deadline or self.failed.is_set():
                raise RuntimeError(f"the streams did not go quiet within {self.limit:g}s: {self.errors[:3]}")
            await asyncio.sleep(0.1)

    async def _join(self, node: _SimNode, sem: asyncio.Semaphore) -> float:
        pb = self.proto.pb
        async with sem:
            body = pb.RegisterRequest(
                auth_key=self.proto.auth, hostname=f"sim{node.index}"
            ).SerializeToString()
            md = self.proto.metadata(node, M_REGISTER, body)
            resp = await self.proto.unary(node.channel, M_REGISTER, body, md, pb.RegisterResponse)
        node.node_id = resp.node.id
        self.readers[node.index] = asyncio.create_task(self._read(node))
        return time.perf_counter()

    async def join_wave(self) -> dict[str, float]:
        sem = asyncio.Semaphore(self.opts.concurrency)
        t0 = time.perf_counter()
        joins = asyncio.gather(*(self._join(node, sem) for node in self.nodes))
        registered = await asyncio.wait_for(joins, self.limit)
        await self._until(self.wave.all_maps, "join wave: full maps")
        await self._until(self.wave.converged, "join wave: every node knows every peer")
        await self._quiet()  # the wave's last messages (presence) counted too
        return {
            "register_per_s": self.n / (max(registered) - t0),
            "all_maps_s": self.wave.maps_at - t0,
            "converged_s": self.wave.converged_at - t0,
            "messages": self.wave.messages,
            "bytes": self.wave.bytes,
        }

    async def changes(self) -> list[float]:
        pb, k, n = self.proto.pb, self.opts.changes, self.n
        latencies: list[float] = []
        for j in range(k):
            node = self.nodes[(j * max(1, n // k)) % n]
            port = 41000 + j
            endpoints = (f"198.51.100.{j % 254 + 1}:{port}", f"203.0.113.{j % 254 + 1}:{port}")
            body = pb.StatusReport(endpoints=list(endpoints)).SerializeToString()
            md = self.proto.metadata(node, M_REPORT, body)
            change = _Change(node.node_id, node.index, endpoints, n - 1)
            self.change = change
            change.sent = time.perf_counter()
            await self.proto.unary(node.channel, M_REPORT, body, md, pb.StatusAck)
            await self._until(change.done, f"change {j}: deltas on {n - 1} streams")
            self.change = None
            latencies.extend(change.arrivals.values())
            await asyncio.sleep(CHANGE_GAP_S)
        return latencies

    async def storm(self) -> dict[str, float]:
        """Drop every stream, then reopen all at once: seconds until every node has a map again, and
        the deltas per node until quiet."""
        self.dropping = True
        for task in self.readers.values():
            task.cancel()
        await asyncio.gather(*self.readers.values(), return_exceptions=True)
        self.dropping = False
        await asyncio.sleep(QUIET_S)  # the server has seen every stream close
        self.wave = _Wave(self.n)
        t0 = time.perf_counter()
        self.readers = {node.index: asyncio.create_task(self._read(node)) for node in self.nodes}
        await self._until(self.wave.all_maps, "reconnect storm: full maps")
        maps_s = self.wave.maps_at - t0
        await self._quiet()
        return {"storm_maps_s": maps_s, "storm_deltas_per_node": self.wave.deltas / self.n}

    async def close(self) -> None:
        self.dropping = True
        for task in self.readers.values():
            task.cancel()
        await asyncio.gather(*self.readers.values(), return_exceptions=True)
        closing = asyncio.gather(*(c.close(grace=None) for c in self.channels), return_exceptions=True)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(closing, 10)


async def _simulate(proto: _Protocol, n: int, server: int, opts: argparse.Namespace) -> dict[str, Any]:
    fleet = _Fleet(proto, n, opts)
    me = os.getpid()
    try:
        await fleet.open()
        server0, me0 = _cpu_s(server), _cpu_s(me)
        out: dict[str, Any] = await fleet.join_wave()
        server_wave, me_wave = _cpu_s(server) - server0, _cpu_s(me) - me0
        out["idle_rss_kib"] = _rss_kib(server)
        out["server_cpu_s"] = server_wave
        out["sim_cpu_share"] = me_wave / (me_wave + server_wave) if me_wave + server_wave else 0.0
        lat = await fleet.changes()
        out["change_p50_s"] = statistics.median(lat)
        out["change_p99_s"] = (
            statistics.quantiles(lat, n=100, method="inclusive")[98] if len(lat) > 1 else lat[0]
        )
        out.update(await fleet.storm())
    finally:
        await fleet.close()
    return out


def _mapper_reference(n: int) -> float:
    """Seconds for the in-process mapper to compile the policy for ``n`` nodes and build every node's
    encoded full map: the map computation without gRPC, TLS or storage."""
    from ghostcore.keys import PrivateKey  # noqa: PLC0415 - only for the reference
    from ghostmesh.changes import NodeAdded  # noqa: PLC0415
    from ghostmesh.mapper import Mapper  # noqa: PLC0415
    from ghostmesh.store.base import NodeRec  # noqa: PLC0415

    now = time.time()
    recs = [
        NodeAdded(
            NodeRec(
                id=i + 1,
                name=f"sim{i}",
                user="default",
                node_key=PrivateKey.generate().public_key().base64(),
                ipv4=f"100.64.{i // 250}.{i % 250 + 1}",
                ipv6=f"fd7a:115c:a1e0::{i + 1:x}",
                ephemeral=False,
                tags=(),
                created=now,
                expires=0.0,
                last_seen=now,
                endpoints=(),
                hostname=f"sim{i}",
                auth_key_id=None,
            ),
            True,
            frozenset(),
        )
        for i in range(n)
    ]
    t0 = time.perf_counter()
    mapper = Mapper(25)
    mapper.load(recs, now)
    for i in range(n):
        mapper.open_stream_bytes(i + 1, i + 1, now)
    return time.perf_counter() - t0


def _start_server(
    run_dir: Path, procs: Procs, batch_delay: float | None
) -> tuple[subprocess.Popen[Any], int, str]:
    """This checkout's ghostmesh in ``run_dir`` (TLS, the bench's limits): the process, its port and a
    reusable auth key with the pin, made by ghostctl. The caller stops the process."""
    bindir = Path(sys.executable).parent
    run_dir.mkdir()
    admin = run_dir / "admin.sock"
    config = run_dir / "ghostmesh.toml"
    config.write_text(
        f'[server]\nbind = "127.0.0.1:0"\nadmin_socket = "{admin}"\nstate_dir = "{run_dir / "state"}"\n'
        + SERVER_LIMITS
        + ("" if batch_delay is None else f"[mapper]\nbatch_delay = {batch_delay}\n")
    )
    log = run_dir / "ghostmesh.log"
    with log.open("wb") as out:
        server = procs.start(
            [str(bindir / "ghostmesh"), "--config", str(config)],
            cwd=run_dir, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    port, tls = _wait_listening(server, log, 30)
    if not tls:
        raise RuntimeError("ghostmesh did not start with TLS")
    ctl = subprocess.run(
        [str(bindir / "ghostctl"), "--server", f"unix:{admin}", "-o", "json", "authkeys", "create",
         "--reusable"],
        cwd=run_dir, capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    if ctl.returncode != 0:
        raise RuntimeError(f"ghostctl authkeys create: exit {ctl.returncode}: {ctl.stderr.strip()}")
    return server, port, str(json.loads(ctl.stdout)["secret"])


async def _one_n(n: int, run_dir: Path, procs: Procs, opts: argparse.Namespace) -> dict[str, Any]:
    """One row: a fresh server, the simulated fleet against it, the in-process reference."""
    # blocking, between phases: nothing else runs on this loop then
    server, port, key = _start_server(run_dir, procs, opts.batch_delay)
    try:
        proto = _Protocol(REPO, key, f"127.0.0.1:{port}", opts.phase_timeout)
        budget = opts.phase_timeout * (6 + opts.changes)
        result = await asyncio.wait_for(_simulate(proto, n, server.pid, opts), budget)
        result["mapper_s"] = _mapper_reference(n)
        return result
    finally:
        Procs.stop(server)


def _row(n: int, r: dict[str, Any]) -> str:
    return (
        f"{n:>5} {r['register_per_s']:>7.0f} {r['all_maps_s']:>7.2f} {r['converged_s']:>7.2f} "
        f"{r['messages']:>8} {r['bytes'] / 1e6:>8.1f} {r['idle_rss_kib'] / 1024:>7.0f} "
        f"{r['server_cpu_s']:>7.2f} {r['sim_cpu_share'] * 100:>5.0f}% "
        f"{r['change_p50_s'] * 1000:>7.0f} {r['change_p99_s'] * 1000:>7.0f} "
        f"{r['storm_maps_s']:>7.2f} {r['storm_deltas_per_node']:>7.1f} {r['mapper_s']:>7.3f} "
        f"{r['server_cpu_s'] / r['mapper_s']:>6.0f}x"
    )


HEADER = (
    "    N  reg/s  maps_s  conv_s  wave_msg  wave_MB  rss_MB srv_cpu  sim% chg_p50 chg_p99 "
    "storm_s  d/node mapper_s  cpu/map"
)


def main() -> int:
    ap = argparse.ArgumentParser(prog="bench.fleet", description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", default="100,500,1000", help="comma-separated fleet sizes (at most 10000)")
    ap.add_argument("--channels", type=int, default=8, help="gRPC channels the nodes share")
    ap.add_argument("--conn-per-node", action="store_true", help="one channel (TLS connection) per node")
    ap.add_argument("--concurrency", type=int, default=64, help="Registers in flight")
    ap.add_argument("--changes", type=int, default=5)
    ap.add_argument("--phase-timeout", type=float, default=120.0)
    ap.add_argument(
        "--batch-delay", type=float, help="the server's [mapper] batch_delay in seconds (default: its own)"
    )
    opts = ap.parse_args()
    sizes = [int(x) for x in opts.nodes.split(",")]
    if any(not 2 <= n <= 10000 for n in sizes):
        ap.error("--nodes: each size must be 2..10000")
    procs = Procs()
    print(
        f"channels: {'one per node' if opts.conn_per_node else opts.channels}, "
        f"concurrency {opts.concurrency}, "
        f"batch_delay: {'default' if opts.batch_delay is None else opts.batch_delay}"
    )
    print(
        "reg/s: registers per second; maps_s / conv_s: join wave until every node has its full map /\n"
        "knows all peers; wave_msg, wave_MB: received during the wave; rss_MB: server, idle, all streams\n"
        "open; srv_cpu: server CPU s in the wave; sim%: simulator share of that CPU; chg_p50/p99 ms: one\n"
        "change to all streams; storm_s: all streams reopened until every map; d/node: deltas per node in\n"
        "the storm; mapper_s: in-process compile + all full maps (reference); cpu/map: srv_cpu / mapper_s"
    )
    print(HEADER, flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-fleet-") as tmp:
        try:
            asyncio.run(_all(sizes, Path(tmp), procs, opts))
        finally:
            procs.stop_all()
    return 0


async def _all(sizes: list[int], tmp: Path, procs: Procs, opts: argparse.Namespace) -> None:
    # one event loop for every size: grpc.aio stays bound to the loop it first ran on (a second
    # asyncio.run leaves its poller calling into a closed loop)
    for n in sizes:
        result = await _one_n(n, tmp / f"n{n}", procs, opts)
        print(_row(n, result), flush=True)


if __name__ == "__main__":
    sys.exit(main())
