"""The simulated nodes of :mod:`bench.fleet`: one worker process runs one slice of the fleet.

The parent (:mod:`bench.fleet`) starts K of these (``python -m bench.fleet_worker``), each owning the
nodes ``--first`` .. ``--first + --count - 1`` of an ``--total``-node fleet, with its own asyncio loop and
its own gRPC channels. The wave's bytes are O(N · map size) (each full map holds ~N peers), and whatever
a process does not read in time waits in its gRPC buffers: one process parsing whole messages for
10,000 nodes grew past 15 GB in the join wave. The parent drives the phases over this process's stdin
and stdout, one JSON object per line: the first stdin line is the auth key (kept out of argv, where ps
shows it), then one command per line, each answered by one line (``{"error": ...}`` if it failed). This
module owns:

* the nodes: a key each, the calls ghostlink makes, proven the same way (:class:`bench.fanout._Protocol`);
* the streams: each message counted (messages, bytes, deltas), parsed once through a view that reads
  only the fields used (:func:`_views`), folded into what the node knows (a byte per peer id,
  :class:`_Known`) and dropped, so memory stays small per node. In the reconnect storm only the ``full``
  flag is read: what each node knows is not needed after it;
* the commands: ``open``, ``join``, ``watch`` / ``report`` / ``arrivals`` (one timed change), ``drop`` /
  ``reopen`` (the reconnect storm) and ``close``; each wait bounded by ``--phase-timeout``.

Times sent to the parent are ``time.monotonic()`` (Linux CLOCK_MONOTONIC, one clock for every process on
the machine), so the parent compares a change's send time in one worker with its arrivals in the others.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from bench.fanout import M_REPORT, M_SERVER_INFO, M_SYNC, REPO, _Change, _Protocol, _SimNode

QUIET_S = 1.0  # streams silent this long: the traffic of a wave is over


def _views() -> tuple[Any, Any]:
    """Two views of ``MapUpdate``'s wire format that parse only what the simulator reads: ``Head``
    (serial, full) and ``Peers`` (full, each upserted peer's id and endpoints, the removed ids). Every
    other field is skipped as unknown, so a full map of 10,000 peers parses in ~0.2 ms as ``Head`` and
    in about half the time of the whole message as ``Peers`` (measured here); the field numbers and
    types are coordination.proto's."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory  # noqa: PLC0415

    fd = descriptor_pb2.FileDescriptorProto(
        name="bench_fleet_views.proto", package="benchfleet", syntax="proto3"
    )
    t = descriptor_pb2.FieldDescriptorProto
    opt, rep = t.LABEL_OPTIONAL, t.LABEL_REPEATED
    head = fd.message_type.add(name="Head")
    head.field.add(name="serial", number=1, type=t.TYPE_UINT64, label=opt)
    head.field.add(name="full", number=2, type=t.TYPE_BOOL, label=opt)
    peer = fd.message_type.add(name="Peer")
    peer.field.add(name="id", number=1, type=t.TYPE_UINT64, label=opt)
    peer.field.add(name="endpoints", number=7, type=t.TYPE_STRING, label=rep)
    peers = fd.message_type.add(name="Peers")
    peers.field.add(name="full", number=2, type=t.TYPE_BOOL, label=opt)
    peers.field.add(
        name="peers_upserted", number=4, type=t.TYPE_MESSAGE, label=rep, type_name=".benchfleet.Peer"
    )
    peers.field.add(name="peers_removed", number=5, type=t.TYPE_UINT64, label=rep)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fd)
    head_cls = message_factory.GetMessageClass(pool.FindMessageTypeByName("benchfleet.Head"))
    return head_cls, message_factory.GetMessageClass(pool.FindMessageTypeByName("benchfleet.Peers"))


_HEAD, _PEERS = _views()


class _Known:
    """The peers one simulated node knows, as a byte per node id: at 10,000 nodes a set of ints per node
    would hold 10^8 entries (gigabytes); this holds 10^8 bytes, spread over the workers."""

    __slots__ = ("count", "flags")

    def __init__(self, size: int) -> None:
        self.flags = bytearray(size)
        self.count = 0

    def replace(self, ids: list[int]) -> None:
        """A full map: exactly these peers."""
        size = max(len(self.flags), max(ids, default=0) + 1)
        flags = bytearray(size)
        for peer in ids:  # the one per-peer Python step of a full map: kept to a store
            flags[peer] = 1
        self.flags, self.count = flags, flags.count(1)

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


class _Wave:
    """What this worker's streams received since the wave (or storm) began; times are monotonic."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.messages = 0
        self.bytes = 0
        self.deltas = 0
        self.have_map: set[int] = set()
        self.complete: set[int] = set()  # nodes that know all N-1 peers
        self.all_maps = asyncio.Event()
        self.converged = asyncio.Event()
        self.maps_at = 0.0
        self.converged_at = 0.0


class _Slice:
    """This worker's nodes ``first`` .. ``first + count - 1`` of a ``total``-node fleet."""

    def __init__(self, proto: _Protocol, opts: argparse.Namespace) -> None:
        self.proto, self.opts = proto, opts
        self.first, self.count, self.total = opts.first, opts.count, opts.total
        self.limit: float = opts.phase_timeout
        self.channels: list[grpc.aio.Channel] = []
        self.nodes: list[_SimNode] = []
        self.known = [_Known(self.total + 1) for _ in range(self.count)]  # ids are 1..N on a fresh server
        self.readers: dict[int, asyncio.Task[None]] = {}
        self.wave = _Wave(self.count)
        self.change: _Change | None = None
        self.errors: list[str] = []
        self.failed = asyncio.Event()
        self.dropping = False  # streams are being cancelled on purpose
        self.last_update = 0.0
        self.tracking = True  # parse the peers of every message (the storm only counts)

    async def open(self, msg: dict[str, Any]) -> dict[str, Any]:
        count = self.count if self.opts.conn_per_node else min(self.opts.channels, self.count)
        pb = self.proto.pb
        for _ in range(count):
            self.channels.append(await self.proto.open_channel())
        body = pb.GetServerInfoRequest().SerializeToString()
        info = await self.proto.unary(self.channels[0], M_SERVER_INFO, body, None, pb.ServerInfo)
        server_key = self.proto.keys.PublicKey.from_base64(info.server_key)
        self.nodes = [
            _SimNode(
                self.first + i, self.proto.keys.PrivateKey.generate(), self.channels[i % count], server_key
            )
            for i in range(self.count)
        ]
        return {"channels": count}

    def _on_update(self, local: int, raw: bytes) -> None:
        """Count one message of node ``local``'s stream and, while ``tracking``, fold it into what the
        node knows. The parsed message is dropped on return: a full map at 10,000 nodes is ~1.8 MB on the
        wire, more parsed."""
        now = time.monotonic()
        self.last_update = now
        wave = self.wave
        wave.messages += 1
        wave.bytes += len(raw)
        if not self.tracking:  # the storm counts maps and deltas only: 1/20 of a full parse
            if _HEAD.FromString(raw).full:
                self._have_map(local, now)
            else:
                wave.deltas += 1
            return
        upd = _PEERS.FromString(raw)
        known = self.known[local]
        if upd.full:
            known.replace([p.id for p in upd.peers_upserted])
            self._have_map(local, now)
        else:
            wave.deltas += 1
            for p in upd.peers_upserted:
                known.add(p.id)
        for gone in upd.peers_removed:
            known.discard(gone)
        if known.count == self.total - 1 and local not in wave.complete:
            wave.complete.add(local)
            if len(wave.complete) == self.count:
                wave.converged_at = now
                wave.converged.set()
        if self.change is not None:
            self.change.observe(self.first + local, upd, now)

    def _have_map(self, local: int, now: float) -> None:
        wave = self.wave
        if local not in wave.have_map:
            wave.have_map.add(local)
            if len(wave.have_map) == self.count:
                wave.maps_at = now
                wave.all_maps.set()

    async def _read(self, node: _SimNode) -> None:
        body = self.proto.pb.SyncRequest().SerializeToString()
        # no deserializer: the raw bytes, parsed once in _on_update (their length is the bytes counted)
        sync: grpc.aio.UnaryStreamMultiCallable[bytes, bytes] = node.channel.unary_stream(M_SYNC)
        call = sync(body, metadata=self.proto.metadata(node, M_SYNC, body))
        local = node.index - self.first
        try:
            async for raw in call:
                self._on_update(local, raw)
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
        while time.monotonic() - self.last_update < QUIET_S:
            if time.monotonic() > deadline or self.failed.is_set():
                raise RuntimeError(f"the streams did not go quiet within {self.limit:g}s: {self.errors[:3]}")
            await asyncio.sleep(0.1)

    async def _join(self, node: _SimNode, sem: asyncio.Semaphore) -> float:
        async with sem:
            node.node_id = await self.proto.register(node)
        self.readers[node.index] = asyncio.create_task(self._read(node))
        return time.monotonic()

    def _counts(self) -> dict[str, Any]:
        w = self.wave
        return {
            "messages": w.messages,
            "bytes": w.bytes,
            "deltas": w.deltas,
            "have_map": len(w.have_map),
            "complete": len(w.complete),
        }

    async def join(self, msg: dict[str, Any]) -> dict[str, Any]:
        """Register every node (``concurrency`` in flight), each opening its stream once registered;
        answer once every node here knows all N-1 peers and the streams have gone quiet."""
        sem = asyncio.Semaphore(msg["concurrency"])
        joins = asyncio.gather(*(self._join(node, sem) for node in self.nodes))
        registered = await asyncio.wait_for(joins, self.limit)
        await self._until(self.wave.all_maps, "join wave: full maps")
        await self._until(self.wave.converged, "join wave: every node knows every peer")
        await self._quiet()  # the wave's last messages (presence) counted too
        return {
            "registered_at": max(registered),
            "maps_at": self.wave.maps_at,
            "converged_at": self.wave.converged_at,
            "node_ids": [node.node_id for node in self.nodes],
            **self._counts(),
        }

    async def watch(self, msg: dict[str, Any]) -> dict[str, Any]:
        """Time the arrival of node ``index``'s new endpoints on every other stream here. ``sent`` stays 0:
        the arrivals are absolute monotonic times, compared with the sender's (another worker's) send time."""
        index = msg["index"]
        expected = self.count - (self.first <= index < self.first + self.count)
        self.change = _Change(msg["node_id"], index, tuple(msg["endpoints"]), expected)
        if expected == 0:
            self.change.done.set()
        return {}

    async def report(self, msg: dict[str, Any]) -> dict[str, Any]:
        """Node ``index`` (one of this worker's) reports new endpoints; the send time."""
        pb = self.proto.pb
        node = self.nodes[msg["index"] - self.first]
        body = pb.StatusReport(endpoints=list(msg["endpoints"])).SerializeToString()
        md = self.proto.metadata(node, M_REPORT, body)
        sent = time.monotonic()
        await self.proto.unary(node.channel, M_REPORT, body, md, pb.StatusAck)
        return {"sent": sent}

    async def arrivals(self, msg: dict[str, Any]) -> dict[str, Any]:
        change = self.change
        if change is None:
            raise RuntimeError("arrivals without watch")
        await self._until(change.done, f"change: deltas on {change.expected} streams here")
        self.change = None
        return {"arrivals": list(change.arrivals.values())}

    async def drop(self, msg: dict[str, Any]) -> dict[str, Any]:
        """Cancel every stream (the client side of a reconnect storm)."""
        self.dropping = True
        for task in self.readers.values():
            task.cancel()
        await asyncio.gather(*self.readers.values(), return_exceptions=True)
        self.dropping = False
        return {}

    async def reopen(self, msg: dict[str, Any]) -> dict[str, Any]:
        """Reopen every stream at once: when every node here has a map again, and the deltas until quiet.
        What the nodes know is no longer kept up to date from here on: nothing after the storm asks."""
        self.wave = _Wave(self.count)
        self.tracking = False
        self.readers = {node.index: asyncio.create_task(self._read(node)) for node in self.nodes}
        await self._until(self.wave.all_maps, "reconnect storm: full maps")
        await self._quiet()
        return {"maps_at": self.wave.maps_at, **self._counts()}

    async def close(self, msg: dict[str, Any] | None = None) -> dict[str, Any]:
        self.dropping = True
        for task in self.readers.values():
            task.cancel()
        await asyncio.gather(*self.readers.values(), return_exceptions=True)
        closing = asyncio.gather(*(c.close(grace=None) for c in self.channels), return_exceptions=True)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(closing, 10)
        self.channels = []
        return {}


def _reply(obj: dict[str, Any]) -> None:
    # stdout carries only these lines; anything else (gRPC's, Python's logs) goes to stderr
    os.write(1, (json.dumps(obj) + "\n").encode())


async def _serve(opts: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader(limit=1 << 20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    key = (await stdin.readline()).decode().strip()
    proto = _Protocol(REPO, key, opts.target, opts.phase_timeout)
    fleet = _Slice(proto, opts)
    ops: dict[str, Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]] = {
        "open": fleet.open,
        "join": fleet.join,
        "watch": fleet.watch,
        "report": fleet.report,
        "arrivals": fleet.arrivals,
        "drop": fleet.drop,
        "reopen": fleet.reopen,
        "close": fleet.close,
    }
    try:
        while line := await stdin.readline():  # EOF: the parent is gone
            msg = json.loads(line)
            try:
                _reply(await ops[msg["op"]](msg))
            except Exception as exc:  # every failure goes to the parent, which stops the run
                _reply({"error": f"{type(exc).__name__}: {exc}"})
            if msg["op"] == "close":
                return
    finally:
        await fleet.close()


def main() -> int:
    ap = argparse.ArgumentParser(prog="bench.fleet_worker", description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", required=True)
    ap.add_argument("--first", type=int, required=True)
    ap.add_argument("--count", type=int, required=True)
    ap.add_argument("--total", type=int, required=True)
    ap.add_argument("--channels", type=int, required=True)
    ap.add_argument("--conn-per-node", action="store_true")
    ap.add_argument("--phase-timeout", type=float, required=True)
    opts = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # a socket per node with --conn-per-node
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))
    asyncio.run(_serve(opts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
