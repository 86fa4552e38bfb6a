"""Benchmark: ghostmesh's map fan-out, this code against an earlier commit's, measured in the same run.

For each code tree under test (this one and, with ``--baseline REV``, that git revision's, checked out by
``bench.baseline``), in interleaved rounds (the order flips every round), the parent process:

1. starts that tree's ``ghostmesh`` on 127.0.0.1 (a port the kernel picks, a temporary state directory
   and admin socket, default ``[mapper] batch_delay``);
2. creates a reusable auth key with that tree's ``ghostctl`` over the admin socket (this code's carries the
   server's TLS pin, ``<key>.sha256:<pin>``; an older tree's may be the bare key);
3. runs the simulator, this same file copied into its own directory and run by path with
   ``PYTHONPATH`` set to the tree, so that it imports the tree's ``ghostcore`` (``python -m`` would put the
   current directory, i.e. this checkout, first). It asserts that every ghostcore module it uses comes
   from the tree.

The simulator, in one asyncio process, speaks the protocol of the tree it runs with. It detects that
protocol from the tree's modules: ``ghostcore.nodeauth.sign_request`` means TLS with the pin from the key
(``ghostcore.joinkey``, ``ghostcore.tlschannel``) and v2 proofs over the exact request bytes. Otherwise
it uses clear-text gRPC and v1 proofs (``make_metadata``). It then:

* connects N simulated nodes. Each has a fresh X25519 key and its own channel, and so its own TCP (and
  TLS) connection, opened as ghostlink opens one (with a pin: a pin check first). Each then calls
  GetServerInfo, which makes the channel connect. It then registers them (Register with the auth key),
  each phase with ``--concurrency`` nodes in flight. Reported: connects per second and registers per
  second;
* opens N Sync streams and times them until every stream has its full map with N-1 peers (from the
  first Sync sent to the last full map received), then waits until the streams have been quiet for 1 s;
* makes K changes, one at a time. One node calls ReportStatus with new endpoints (documentation addresses
  198.51.100.x / 203.0.113.x). On every other stream, the arrival of the delta that carries exactly those
  endpoints for that node is timed from the moment the call was sent (``time.perf_counter`` in the same
  process). Reported: p50 / p99 over all (stream, change) samples of all rounds, and the
  ReportStatus round trip;
* reads the server's RSS (``VmRSS``) while all N streams are still open, after the changes;
* reads the CPU time (user + system, ``/proc/<pid>/stat``) that ghostmesh spent per join (connect and
  register phases) and per change, and that the simulator spent per change. CPU time is what each side
  pays, whatever else this machine runs, and it separates the server's share of a fan-out from the
  simulator's (which reads every stream's delta, a share that a real mesh spreads over N machines).

Server and simulator share this machine's cores, and the simulator decrypts and parses every delta in one
Python process, so absolute numbers depend on the machine. Only the ratios of trees measured in the same
run mean anything. Every wait is bounded; every process is killed by its PID and every temporary
directory removed on the way out, also on errors and Ctrl-C.

Run: ``.venv/bin/python -m bench.fanout [--nodes N] [--changes K] [--rounds R] [--baseline REV]``
(e.g. ``--baseline d795a60``). Prints a table: each metric for this code, the baseline and their ratio.

Why one module of about 640 lines: the parent and the simulator it copies into another checkout must be
one self-contained file (the copy runs against that checkout's ghostcore, importing nothing of this tree).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import grpc

REPO = Path(__file__).resolve().parent.parent
SIMULATE = "simulate"  # argv[1] of the simulator child
RESULT_TAG = "FANOUT-RESULT "
SERVICE = "/ghostmesh.v1.Coordination"
M_SERVER_INFO = f"{SERVICE}/GetServerInfo"
M_REGISTER = f"{SERVICE}/Register"
M_SYNC = f"{SERVICE}/Sync"
M_REPORT = f"{SERVICE}/ReportStatus"
QUIET_S = 1.0  # streams silent this long: the map traffic of the joins is over
CHANGE_GAP_S = 0.1  # pause between changes, so each starts on an idle server
CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    # without it, channels with equal arguments share one connection (gRPC's global subchannel pool):
    # every simulated node must have its own, as real nodes do
    ("grpc.use_local_subchannel_pool", 1),
)


# --- the simulator (runs in a child, importing ghostcore from PYTHONPATH) ------------------------------


@dataclass
class _Change:
    node_id: int
    index: int  # the changing node's stream: it does not count
    endpoints: tuple[str, ...]
    expected: int
    sent: float = 0.0
    arrivals: dict[int, float] = field(default_factory=dict)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def observe(self, index: int, upd: Any, now: float) -> None:
        """Stream ``index`` received ``upd`` at ``now``: time it if it carries this change."""
        if index == self.index or index in self.arrivals:
            return
        for peer in upd.peers_upserted:
            if peer.id == self.node_id and tuple(peer.endpoints) == self.endpoints:
                self.arrivals[index] = now - self.sent
                if len(self.arrivals) == self.expected:
                    self.done.set()
                return


@dataclass
class _SimState:
    n: int
    full_at: dict[int, float] = field(default_factory=dict)
    full_short: int = 0  # full maps with fewer than N-1 peers
    all_full: asyncio.Event = field(default_factory=asyncio.Event)
    failed: asyncio.Event = field(default_factory=asyncio.Event)
    errors: list[str] = field(default_factory=list)
    last_update: float = 0.0
    current: _Change | None = None


@dataclass
class _SimNode:
    index: int
    key: Any  # the tree's ghostcore.keys.PrivateKey
    channel: grpc.aio.Channel
    server_key: Any  # the tree's ghostcore.keys.PublicKey
    node_id: int = 0


def _established(port: int) -> int:
    """Established TCP connections to ``port``, seen from the client side (gRPC's client sockets are
    dual-stack IPv6 ones, listed in tcp6 with v4-mapped addresses)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] == "01" and int(cols[2].rsplit(":", 1)[1], 16) == port:
                count += 1
    return count


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far, all threads (proc(5): fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _under(path: str | None, tree: Path) -> bool:
    return path is not None and Path(path).resolve().is_relative_to(tree)


class _Protocol:
    """What the tree on PYTHONPATH speaks, from its own modules: channel, proofs, pb messages."""

    def __init__(self, tree: Path, key_text: str, target: str, timeout: float) -> None:
        import ghostcore  # noqa: PLC0415 - the tree on PYTHONPATH, only in the child
        from ghostcore import keys, nodeauth  # noqa: PLC0415
        from ghostcore.pb.ghostmesh.v1 import coordination_pb2  # noqa: PLC0415

        self.ghostcore_file = str(ghostcore.__file__)
        self.nodeauth: Any = nodeauth  # Any: one tree's module has sign_request, the other make_metadata
        self.keys, self.pb = keys, coordination_pb2
        self.target, self.timeout = target, timeout
        modules: list[Any] = [ghostcore, nodeauth, keys, coordination_pb2]
        self.v2 = hasattr(nodeauth, "sign_request")
        self.trust: Any = None
        if self.v2:
            # imported by name from the tree: for a module the tree lacks, the editable install would
            # quietly supply this checkout's, hence the check below
            from ghostcore import joinkey, tlschannel  # noqa: PLC0415

            modules += [joinkey, tlschannel]
            self.tlschannel = tlschannel
            parsed = joinkey.parse_join_key(key_text)
            if parsed.pin is None:
                raise RuntimeError("the tree speaks TLS but its ghostctl printed a key without a pin")
            self.auth, self.trust = parsed.key, tlschannel.Trust(pin=parsed.pin)
        else:
            if "." in key_text:
                raise RuntimeError(f"a v1 tree's key should be bare, got {key_text[:12]}…")
            self.auth = key_text
        wrong = [m.__name__ for m in modules if not _under(m.__file__, tree)]
        if wrong:
            raise RuntimeError(f"imported from outside {tree}: {wrong} (ghostcore: {ghostcore.__file__})")

    @property
    def name(self) -> str:
        return "TLS + v2 proofs" if self.v2 else "clear text + v1 proofs"

    def metadata(self, node: _SimNode, method: str, body: bytes) -> tuple[tuple[str, str], ...]:
        now_ms = int(time.time() * 1000)
        if self.v2:
            return tuple(self.nodeauth.sign_request(node.key, node.server_key, method, body, now_ms=now_ms))
        return tuple(self.nodeauth.make_metadata(node.key, node.server_key, method, now_ms))

    async def open_channel(self) -> grpc.aio.Channel:
        """A channel of its own, opened as ghostlink opens it (with a pin: the pin check first)."""
        if self.trust is None:
            return grpc.aio.insecure_channel(self.target, options=list(CHANNEL_OPTIONS))
        setup = await asyncio.to_thread(self.tlschannel.prepare, self.target, self.trust, self.timeout)
        return grpc.aio.secure_channel(
            self.target, setup.credentials, options=[*CHANNEL_OPTIONS, *setup.options]
        )

    async def unary(self, channel: grpc.aio.Channel, method: str, body: bytes, md: Any, resp: Any) -> Any:
        """One call with ``body`` as serialized (the bytes a v2 proof covers)."""
        call: grpc.aio.UnaryUnaryMultiCallable[bytes, Any]
        call = channel.unary_unary(method, response_deserializer=resp.FromString)
        return await call(body, metadata=md, timeout=self.timeout)

    async def register(self, node: _SimNode) -> int:
        """Register ``node`` with the auth key, proven as ghostlink proves it; its node id."""
        body = self.pb.RegisterRequest(auth_key=self.auth, hostname=f"sim{node.index}").SerializeToString()
        resp = await self.unary(
            node.channel, M_REGISTER, body, self.metadata(node, M_REGISTER, body), self.pb.RegisterResponse
        )
        return int(resp.node.id)


class _Simulator:
    """N simulated nodes in one process: join, Sync streams, timed changes."""

    def __init__(self, proto: _Protocol, opts: argparse.Namespace) -> None:
        self.proto, self.opts = proto, opts
        self.n: int = opts.nodes
        self.timeout: float = opts.timeout
        self.nodes: list[_SimNode] = []  # in join order; every channel here is closed at the end
        self.state = _SimState(self.n)
        self._reports = 0  # status reports sent: each change gets endpoints never sent before
        self.readers: list[asyncio.Task[None]] = []

    async def _connect(self, i: int, sem: asyncio.Semaphore) -> _SimNode:
        pb = self.proto.pb
        async with sem:
            channel = await self.proto.open_channel()
            try:
                body = pb.GetServerInfoRequest().SerializeToString()
                info = await self.proto.unary(channel, M_SERVER_INFO, body, None, pb.ServerInfo)
            except BaseException:
                await channel.close(grace=None)
                raise
            server_key = self.proto.keys.PublicKey.from_base64(info.server_key)
            node = _SimNode(i, self.proto.keys.PrivateKey.generate(), channel, server_key)
            self.nodes.append(node)
            return node

    async def _register(self, node: _SimNode, sem: asyncio.Semaphore) -> None:
        async with sem:
            node.node_id = await self.proto.register(node)

    async def join_all(self) -> tuple[float, float]:
        """Connect every node, then register every node; the seconds each phase took."""
        sem = asyncio.Semaphore(self.opts.concurrency)
        t0 = time.perf_counter()
        connects = asyncio.gather(*(self._connect(i, sem) for i in range(self.n)))
        self.nodes = sorted(await asyncio.wait_for(connects, self.timeout * 4), key=lambda nd: nd.index)
        t1 = time.perf_counter()
        registers = asyncio.gather(*(self._register(node, sem) for node in self.nodes))
        await asyncio.wait_for(registers, self.timeout * 4)
        return t1 - t0, time.perf_counter() - t1

    async def _read(self, node: _SimNode) -> None:
        st, n = self.state, self.n
        body = self.proto.pb.SyncRequest().SerializeToString()
        sync: grpc.aio.UnaryStreamMultiCallable[bytes, Any]
        sync = node.channel.unary_stream(M_SYNC, response_deserializer=self.proto.pb.MapUpdate.FromString)
        call = sync(body, metadata=self.proto.metadata(node, M_SYNC, body))
        try:
            async for upd in call:
                now = time.perf_counter()
                st.last_update = now
                if upd.full and node.index not in st.full_at:
                    st.full_at[node.index] = now
                    st.full_short += len(upd.peers_upserted) != n - 1
                    if len(st.full_at) == n:
                        st.all_full.set()
                if st.current is not None:
                    st.current.observe(node.index, upd, now)
            st.errors.append(f"sim{node.index}: the server ended the map stream")
        except grpc.aio.AioRpcError as exc:
            st.errors.append(f"sim{node.index}: Sync {exc.code().name}: {exc.details()}")
        finally:
            call.cancel()
        st.failed.set()

    async def _until(self, event: asyncio.Event, what: str, limit: float) -> None:
        """Wait for ``event``, at most ``limit`` s; a failed stream ends the wait at once."""
        waits = [asyncio.ensure_future(event.wait()), asyncio.ensure_future(self.state.failed.wait())]
        try:
            await asyncio.wait(waits, timeout=limit, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
        if self.state.failed.is_set():
            raise RuntimeError(f"{what}: {'; '.join(self.state.errors[:3])}")
        if not event.is_set():
            raise RuntimeError(f"{what}: not within {limit:g}s")

    async def sync_all(self) -> float:
        """Open every stream; seconds until the last full map (N-1 peers each); then wait for quiet."""
        st = self.state
        t0 = time.perf_counter()
        self.readers = [asyncio.create_task(self._read(node)) for node in self.nodes]
        await self._until(st.all_full, "full maps", self.timeout * 4)
        full_s = max(st.full_at.values()) - t0
        if st.full_short:
            raise RuntimeError(f"{st.full_short} full maps had fewer than {self.n - 1} peers")
        deadline = time.monotonic() + self.timeout
        while time.perf_counter() - st.last_update < QUIET_S:
            if time.monotonic() > deadline or st.failed.is_set():
                raise RuntimeError(f"the streams did not go quiet for {QUIET_S:g}s within {self.timeout:g}s")
            await asyncio.sleep(0.1)
        return full_s

    async def changes(self) -> tuple[list[float], list[float]]:
        """K endpoint changes, one at a time: (change -> delta latencies, ReportStatus round trips)."""
        pb, k, n = self.proto.pb, self.opts.changes, self.n
        latencies: list[float] = []
        acks: list[float] = []
        stride = max(1, n // k)
        for j in range(k):
            node = self.nodes[(j * stride + j // n) % n]
            self._reports += 1
            port = 41000 + self._reports % 20000  # new endpoints every time, across calls too
            endpoints = (f"198.51.100.{j % 254 + 1}:{port}", f"203.0.113.{j % 254 + 1}:{port}")
            body = pb.StatusReport(endpoints=list(endpoints)).SerializeToString()
            md = self.proto.metadata(node, M_REPORT, body)
            change = _Change(node.node_id, node.index, endpoints, n - 1)
            self.state.current = change
            change.sent = time.perf_counter()
            await self.proto.unary(node.channel, M_REPORT, body, md, pb.StatusAck)
            acks.append(time.perf_counter() - change.sent)
            await self._until(change.done, f"change {j}: deltas on {n - 1} streams", self.timeout)
            self.state.current = None
            latencies.extend(change.arrivals.values())
            await asyncio.sleep(CHANGE_GAP_S)
        return latencies, acks

    async def close(self) -> None:
        for task in self.readers:
            task.cancel()
        await asyncio.gather(*self.readers, return_exceptions=True)
        closing = asyncio.gather(*(nd.channel.close(grace=None) for nd in self.nodes), return_exceptions=True)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(closing, 10)


async def _simulate(proto: _Protocol, opts: argparse.Namespace) -> dict[str, Any]:
    sim = _Simulator(proto, opts)
    server, me = opts.server_pid, os.getpid()
    try:
        server_cpu0 = _cpu_s(server)
        connect_s, register_s = await sim.join_all()
        server_cpu_join = _cpu_s(server) - server_cpu0
        connections = _established(int(opts.target.rsplit(":", 1)[1]))
        full_s = await sim.sync_all()
        server_cpu0, sim_cpu0 = _cpu_s(server), _cpu_s(me)
        latencies, acks = await sim.changes()
        server_cpu_changes, sim_cpu_changes = _cpu_s(server) - server_cpu0, _cpu_s(me) - sim_cpu0
        rss = _rss_kib(server)  # all N streams still open
    finally:
        await sim.close()
    return {
        "ghostcore": proto.ghostcore_file,
        "protocol": proto.name,
        "connections": connections,
        "connect_per_s": opts.nodes / connect_s,
        "register_per_s": opts.nodes / register_s,
        "full_map_s": full_s,
        "latencies_s": latencies,
        "ack_s": acks,
        "rss_kib": rss,
        "server_cpu_per_join_s": server_cpu_join / opts.nodes,
        "server_cpu_per_change_s": server_cpu_changes / opts.changes,
        "sim_cpu_per_change_s": sim_cpu_changes / opts.changes,
    }


def _simulator_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="fanout simulator")
    ap.add_argument("--target", required=True)
    ap.add_argument("--tree", required=True, help="where ghostcore must come from")
    ap.add_argument("--server-pid", type=int, required=True)
    ap.add_argument("--nodes", type=int, required=True)
    ap.add_argument("--changes", type=int, required=True)
    ap.add_argument("--concurrency", type=int, required=True)
    ap.add_argument("--timeout", type=float, required=True)
    opts = ap.parse_args(argv)
    key_text = sys.stdin.readline().strip()  # not in argv, where ps shows it
    proto = _Protocol(Path(opts.tree).resolve(), key_text, opts.target, opts.timeout)
    print(f"simulator: {proto.name}, ghostcore from {proto.ghostcore_file}", file=sys.stderr, flush=True)
    result = asyncio.run(_simulate(proto, opts))
    print(RESULT_TAG + json.dumps(result), flush=True)
    return 0


# --- the parent: servers, keys, rounds, table ---------------------------------------------------------


@dataclass
class Tree:
    label: str
    path: Path
    env: dict[str, str]
    rounds: list[dict[str, Any]] = field(default_factory=list)


class Procs:
    """Every child process started, so that each is killed by its PID on the way out."""

    def __init__(self) -> None:
        self._procs: list[subprocess.Popen[Any]] = []

    def start(self, argv: list[str], **kw: Any) -> subprocess.Popen[Any]:
        # own session: a Ctrl-C at the terminal reaches only the parent, which stops them in order
        proc = subprocess.Popen(argv, start_new_session=True, **kw)
        self._procs.append(proc)
        return proc

    @staticmethod
    def stop(proc: subprocess.Popen[Any], grace: float = 10.0) -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                proc.wait(5)

    def stop_all(self) -> None:
        for proc in reversed(self._procs):
            self.stop(proc, grace=5.0)
        self._procs.clear()


def _wait_listening(proc: subprocess.Popen[Any], log: Path, timeout: float) -> tuple[int, bool]:
    """The bound port from ghostmesh's start line, and whether that line says TLS."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace") if log.exists() else ""
        if m := re.search(r"listening on 127\.0\.0\.1:(\d+)(.*)", text):
            return int(m.group(1)), "TLS" in m.group(2)
        if proc.poll() is not None:
            raise RuntimeError(f"ghostmesh exited ({proc.returncode}): {text.strip()[-2000:]}")
        time.sleep(0.05)
    raise RuntimeError(f"ghostmesh did not report listening within {timeout:g}s; see {log}")


def _one_run(tree: Tree, run_dir: Path, sim: Path, procs: Procs, args: argparse.Namespace) -> dict[str, Any]:
    """One server of ``tree``, one auth key, one simulator run; the simulator's result."""
    bindir = Path(sys.executable).parent
    env = {**os.environ, **tree.env}
    run_dir.mkdir()
    admin = run_dir / "admin.sock"
    config = run_dir / "ghostmesh.toml"
    config.write_text(
        f'[server]\nbind = "127.0.0.1:0"\nadmin_socket = "{admin}"\nstate_dir = "{run_dir / "state"}"\n'
    )
    log = run_dir / "ghostmesh.log"
    with log.open("wb") as out:
        server = procs.start(
            [str(bindir / "ghostmesh"), "--config", str(config)],
            env=env, cwd=run_dir, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        port, tls = _wait_listening(server, log, args.timeout)
        ctl = subprocess.run(
            [str(bindir / "ghostctl"), "--server", f"unix:{admin}", "-o", "json", "authkeys", "create",
             "--reusable"],
            env=env, cwd=run_dir, capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        if ctl.returncode != 0:
            raise RuntimeError(f"ghostctl authkeys create: exit {ctl.returncode}: {ctl.stderr.strip()}")
        key: str = json.loads(ctl.stdout)["secret"]
        if tls != (".sha256:" in key):
            raise RuntimeError(f"{tree.label}: server TLS={tls} but ghostctl's key pin={'.sha256:' in key}")
        child = procs.start(
            [sys.executable, str(sim), SIMULATE, "--target", f"127.0.0.1:{port}", "--tree", str(tree.path),
             "--server-pid", str(server.pid), "--nodes", str(args.nodes), "--changes", str(args.changes),
             "--concurrency", str(args.concurrency), "--timeout", str(args.timeout)],
            env=env, cwd=sim.parent, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        budget = args.timeout * 12 + args.changes * (args.timeout + 1)  # the sum of the child's own bounds
        try:
            stdout, stderr = child.communicate(key + "\n", timeout=budget)
        except subprocess.TimeoutExpired:
            Procs.stop(child)
            raise RuntimeError(f"{tree.label}: the simulator did not finish within {budget:g}s") from None
        lines = [ln for ln in stdout.splitlines() if ln.startswith(RESULT_TAG)]
        if child.returncode != 0 or not lines:
            raise RuntimeError(f"{tree.label}: simulator exit {child.returncode}:\n{stderr.strip()[-3000:]}")
        result: dict[str, Any] = json.loads(lines[-1][len(RESULT_TAG) :])
        if not _under(result["ghostcore"], tree.path.resolve()):
            raise RuntimeError(f"{tree.label}: simulator imported ghostcore from {result['ghostcore']}")
        if tls != result["protocol"].startswith("TLS"):
            raise RuntimeError(f"{tree.label}: server TLS={tls}, simulator spoke {result['protocol']}")
        return result
    finally:
        Procs.stop(server)
        shutil.rmtree(run_dir, ignore_errors=True)


def _p99(xs: list[float]) -> float:
    return statistics.quantiles(xs, n=100, method="inclusive")[98] if len(xs) > 1 else xs[0]


def _summary(tree: Tree) -> dict[str, float]:
    lat = [x for r in tree.rounds for x in r["latencies_s"]]
    acks = [x for r in tree.rounds for x in r["ack_s"]]
    return {
        "connects/s (channel + GetServerInfo, median of rounds)": statistics.median(
            r["connect_per_s"] for r in tree.rounds
        ),
        "registers/s (Register calls, median of rounds)": statistics.median(
            r["register_per_s"] for r in tree.rounds
        ),
        "all N full maps (s, median of rounds)": statistics.median(r["full_map_s"] for r in tree.rounds),
        "change -> delta p50 (ms)": statistics.median(lat) * 1000,
        "change -> delta p99 (ms)": _p99(lat) * 1000,
        "ReportStatus round trip p50 (ms)": statistics.median(acks) * 1000,
        "ghostmesh CPU per join (ms, connect + register)": _mean(tree, "server_cpu_per_join_s") * 1000,
        "ghostmesh CPU per change (ms, one fan-out)": _mean(tree, "server_cpu_per_change_s") * 1000,
        "simulator CPU per change (ms, N-1 deltas read)": _mean(tree, "sim_cpu_per_change_s") * 1000,
        "ghostmesh RSS at end (MiB, median)": statistics.median(r["rss_kib"] for r in tree.rounds) / 1024,
    }


def _mean(tree: Tree, key: str) -> float:
    """Over all rounds (CPU times: each round's is a mean already, at clock-tick resolution)."""
    return statistics.fmean(r[key] for r in tree.rounds)


def _print_table(trees: list[Tree], args: argparse.Namespace) -> None:
    rounds = len(trees[0].rounds)
    print(
        f"\nmap fan-out: N={args.nodes} nodes, K={args.changes} changes, {rounds} round(s) per tree, "
        f"{args.concurrency} connects / registers in flight; latency samples pooled over rounds"
    )
    for t in trees:
        r0 = t.rounds[0]
        samples = sum(len(r["latencies_s"]) for r in t.rounds)
        print(
            f"  {t.label}: {r0['protocol']}, {r0['connections']} client connections, {samples} samples, "
            f"ghostcore from {Path(r0['ghostcore']).parent.parent}"
        )
    sums = [_summary(t) for t in trees]
    head = f"\n{'metric':54}" + "".join(f"{t.label:>20}" for t in trees)
    print(head + (f"{'this/baseline':>15}" if len(trees) > 1 else ""))
    for name in sums[0]:
        line = f"{name:54}" + "".join(f"{s[name]:>20.2f}" for s in sums)
        if len(trees) > 1:
            line += f"{sums[0][name] / sums[1][name]:>15.2f}"
        print(line)
    for t in trees:
        per = ", ".join(
            f"[conn {r['connect_per_s']:.0f}/s, reg {r['register_per_s']:.0f}/s, {r['full_map_s']:.2f}s, p50 "
            f"{statistics.median(r['latencies_s']) * 1000:.1f}ms, p99 {_p99(r['latencies_s']) * 1000:.1f}ms]"
            for r in t.rounds
        )
        print(f"  rounds, {t.label}: {per}")


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def _no_baseline() -> Iterator[None]:
    yield None


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--nodes", type=int, default=200, help="simulated nodes (default 200)")
    ap.add_argument("--changes", type=int, default=20, help="endpoint changes timed per round (default 20)")
    ap.add_argument("--rounds", type=int, default=2, help="rounds per tree, interleaved (default 2)")
    ap.add_argument("--concurrency", type=int, default=16, help="connects / registers in flight (default 16)")
    ap.add_argument("--timeout", type=float, default=30.0, help="bound of each single wait, s (default 30)")
    ap.add_argument(
        "--baseline",
        metavar="REV",
        help="also measure this git revision's code in the same run, interleaved (e.g. the commit before a "
        "change), and print this code's numbers as ratios of it",
    )
    args = ap.parse_args()
    if args.nodes < 2 or args.changes < 1 or args.rounds < 1 or args.concurrency < 1:
        ap.error("need --nodes >= 2, --changes >= 1, --rounds >= 1, --concurrency >= 1")
    from bench.baseline import checkout  # noqa: PLC0415 - only the parent has this checkout's bench

    signal.signal(signal.SIGTERM, _raise_interrupt)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # a socket per node, on both ends
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))
    procs = Procs()
    try:
        with contextlib.ExitStack() as stack:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ghost-fanout-")))
            sim_dir = tmp / "sim"  # nothing importable beside the simulator: sys.path[0] of the child
            sim_dir.mkdir()
            sim = sim_dir / "fanout_sim.py"
            shutil.copyfile(Path(__file__), sim)
            trees = [Tree("this code", REPO, {"PYTHONPATH": str(REPO)})]
            if args.baseline:
                env = stack.enter_context(checkout(args.baseline))
                trees.append(Tree(f"baseline {env['GHOST_BASELINE'][:7]}", Path(env["PYTHONPATH"]), env))
            stack.callback(procs.stop_all)  # runs first: no process outlives the worktree or temp dir
            for r in range(args.rounds):
                order = trees if r % 2 == 0 else trees[::-1]  # ABBA: drift in load hits both alike
                for i, tree in enumerate(order):
                    print(f"round {r + 1}/{args.rounds}: {tree.label} ...", file=sys.stderr, flush=True)
                    tree.rounds.append(_one_run(tree, tmp / f"run-{r}-{i}", sim, procs, args))
            _print_table(trees, args)
    except KeyboardInterrupt:
        print("\nbench: interrupted; its processes and temporary directories are gone", file=sys.stderr)
        return 130
    except RuntimeError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    except subprocess.CalledProcessError as exc:  # git, from bench.baseline (e.g. an unknown revision)
        print(f"bench: {' '.join(exc.cmd)}: {(exc.stderr or '').strip()}", file=sys.stderr)
        return 1
    finally:
        procs.stop_all()  # in case the interrupt came before the callback was registered
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == [SIMULATE]:
        sys.exit(_simulator_main(sys.argv[2:]))
    sys.exit(main())
