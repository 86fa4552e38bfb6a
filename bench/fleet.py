"""Benchmark: the control plane at fleet scale, one ghostmesh against N simulated nodes per row.

Run: ``PYTHONPATH=$PWD .venv/bin/python -m bench.fleet --nodes 100,500,1000 [--workers K] [--channels 8 |
--conn-per-node] [--concurrency 64] [--changes 5] [--phase-timeout 120] [--batch-delay S]``; for
10,000 nodes give the phases room: ``--nodes 10000 --phase-timeout 900``.

For each N in ``--nodes`` the parent (this module) starts this checkout's ``ghostmesh`` as a subprocess on
127.0.0.1 (a temporary state directory; :mod:`bench.fanout`'s process handling, proof code and /proc readers),
creates a reusable auth key with ``ghostctl`` and starts ``--workers`` K worker processes
(:mod:`bench.fleet_worker`; default half the cores, 1 to 4, as the server shares the machine). Each runs its
share of the N simulated nodes (N/K, contiguous) in its own asyncio loop over its own gRPC channels:
``--channels`` in all, split between the workers (at least one each), or with ``--conn-per-node`` one channel
and so one TLS connection per node, as real nodes have. Each node has its own X25519 key and makes the calls
ghostlink makes, proven the same way (TLS pinned by the key's pin, v2 proofs over the request bytes). The
wave's bytes are O(N · map size) (every full map holds ~N peers: ~1.8 MB at 10,000 nodes): a process that
parses them slower than they arrive leaves them in its gRPC buffers (a stream waiting for a message lets the
server send all of it), which is how one process parsing whole messages grew past 15 GB at 10,000 nodes. So
the workers parse only the fields they read, and on a machine with more cores the workers' reading grows with
K (on 2 cores, K=1 and K=2 measured alike at 2,000 nodes: the server's loop is the bottleneck). The parent
starts and ends every phase over the workers' pipes, collects their counters and times and prints one row per
N, and one stderr line per phase (its numbers so far, the workers' and the server's RSS):

* **join wave** (``reg/s``, ``maps_s``, ``conv_s``, ``wave_msg``, ``wave_MB``): every node Registers with
  the auth key (``--concurrency`` in flight in all) and opens its map stream (Sync) as soon as it is
  registered: registers per second, the seconds until every node has its full map and until every node
  knows all N-1 peers (the wave has converged), and the messages and bytes the streams received until
  they were quiet; ``srv_cpu``: the server's CPU seconds during the wave; ``sim%``: the simulator's
  (workers' and parent's) share of the CPU both spent then;
* **idle** (``rss_MB``): the server's RSS (``VmRSS``) once the streams have been quiet for a second,
  all N open;
* **one change** (``chg_p50``, ``chg_p99``, ms): ``--changes`` times, one node reports new endpoints;
  the time until every other stream has the delta carrying them, p50 / p99 over all (stream, change)
  samples. The send time is taken in the sender's worker and the arrivals in every worker with
  ``time.monotonic()``, one clock for every process on Linux (CLOCK_MONOTONIC);
* **reconnect storm** (``storm_s``, ``d/node``): every stream is dropped (cancelled by the client), then
  all are reopened at once: the seconds until every node has a full map again, and the deltas each node
  received until quiet;
* ``sim_MB``: the workers' peak RSS (``VmHWM``), summed: what simulating N nodes cost in memory.

The reference, measured in the same run for the same N (``mapper_s``): the in-process mapper
(``ghostmesh.mapper``) seeded with N node records (one policy compile) building every node's encoded
full map, no gRPC, no SQLite, no TLS. The ratio ``cpu/map`` (wave CPU / mapper) shows what the network,
gRPC, TLS and storage add to the map computation itself.

The bench's ghostmesh raises ``[limits] streams_per_connection`` and ``calls_per_source``: every simulated
node shares 127.0.0.1, and many share a connection, which real nodes never do. ``--batch-delay`` sets the
server's ``[mapper] batch_delay``: how often each stream may flush, and so how much of the server's loop
delta flushing takes from accepting Registers and new streams during a wave. Every phase is bounded by
``--phase-timeout`` (in the workers, and in the parent waiting for them), and the run stops when the
machine's ``MemAvailable`` falls below ``--min-available-gib``, naming the RSS of each side (a reconnect
storm holds every node's full map at once, in the server's send buffers and the workers' receive
buffers: ~N² peer records on each side; at 10,000 nodes ~1.8 MB x 10,000 each, more than a 23 GiB
machine has, so there the row ends after the changes); the workers and the server are killed by PID and
the temporary directory removed on the way out, also on errors and Ctrl-C. The simulator shares this
machine's cores with the server, so absolute numbers depend on the machine (and on ``sim%``); compare the
ratios and rows of one run.

This module owns the parent: the server's start, the workers' lifetime and pipes (:class:`_Workers`),
the phases' order and aggregation, the reference and the table. The nodes and their streams are
:mod:`bench.fleet_worker`'s.
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import Any

from bench.fanout import REPO, Procs, _cpu_s, _rss_kib, _wait_listening

QUIET_S = 1.0  # streams silent this long: the server has seen every dropped stream close
CHANGE_GAP_S = 0.1  # pause between changes, so each starts on an idle server
SERVER_LIMITS = "[limits]\nstreams_per_connection = 100000\ncalls_per_source = 100000\ncalls_total = 100000\n"
SLACK_S = 30.0  # the parent's wait for an answer: the worker's own bounds plus this


def _hwm_kib(pid: int) -> int:
    """Peak RSS (``VmHWM``) of process ``pid``."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmHWM for pid {pid}")


class _Workers:
    """K worker processes, node ``i`` in worker ``i * K // N``'s slice; one JSON line each way per command."""

    def __init__(
        self,
        n: int,
        server: tuple[int, int],
        key: str,
        run_dir: Path,
        *,
        procs: Procs,
        opts: argparse.Namespace,
    ) -> None:
        self.n, self.k = n, min(opts.workers, n)
        self.server_pid, port = server
        self.min_available_kib = int(opts.min_available_gib * 1024 * 1024)
        self.bounds = [n * w // self.k for w in range(self.k + 1)]
        self.logs = [run_dir / f"worker-{w}.log" for w in range(self.k)]
        self.procs: list[subprocess.Popen[bytes]] = []
        self.buffers: list[bytes] = []
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        }
        for w in range(self.k):
            channels = max(1, opts.channels * (w + 1) // self.k - opts.channels * w // self.k)
            argv = [
                sys.executable, "-m", "bench.fleet_worker", "--target", f"127.0.0.1:{port}",
                "--first", str(self.bounds[w]), "--count", str(self.bounds[w + 1] - self.bounds[w]),
                "--total", str(n), "--channels", str(channels), "--phase-timeout", str(opts.phase_timeout),
            ]  # fmt: skip
            if opts.conn_per_node:
                argv.append("--conn-per-node")
            with self.logs[w].open("wb") as log:
                proc = procs.start(
                    argv, cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log
                )
            assert proc.stdin is not None
            proc.stdin.write(key.encode() + b"\n")  # not in argv, where ps shows it
            proc.stdin.flush()
            self.procs.append(proc)
            self.buffers.append(b"")

    def owner(self, index: int) -> int:
        return next(w for w in range(self.k) if index < self.bounds[w + 1])

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def ask(self, msgs: dict[int, dict[str, Any]], timeout: float) -> dict[int, dict[str, Any]]:
        """Send worker ``w`` the command ``msgs[w]``; every worker's answer, within ``timeout`` s."""
        for w, msg in msgs.items():
            stdin = self.procs[w].stdin
            assert stdin is not None
            stdin.write(json.dumps(msg).encode() + b"\n")
            stdin.flush()
        answers: dict[int, dict[str, Any]] = {}
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            for w in msgs:
                stdout = self.procs[w].stdout
                assert stdout is not None
                sel.register(stdout, selectors.EVENT_READ, w)
            while len(answers) < len(msgs):
                left = deadline - time.monotonic()
                if left <= 0:
                    missing = sorted(set(msgs) - set(answers))
                    raise RuntimeError(
                        f"{next(iter(msgs.values()))['op']}: workers {missing} silent for {timeout:g}s"
                    )
                self._check_memory()
                for sk, _ in sel.select(min(left, 1.0)):
                    w = sk.data
                    chunk = os.read(sk.fd, 1 << 20)
                    if not chunk:
                        tail = self.logs[w].read_text(errors="replace").strip()[-2000:]
                        raise RuntimeError(f"worker {w} exited ({self.procs[w].poll()}): {tail}")
                    self.buffers[w] += chunk
                    if b"\n" in self.buffers[w]:
                        line, self.buffers[w] = self.buffers[w].split(b"\n", 1)
                        answers[w] = json.loads(line)
                        sel.unregister(sk.fileobj)
                        if "error" in answers[w]:
                            raise RuntimeError(f"worker {w}: {answers[w]['error']}")
        return answers

    def all(self, msg: dict[str, Any], timeout: float) -> list[dict[str, Any]]:
        answers = self.ask(dict.fromkeys(range(self.k), msg), timeout)
        return [answers[w] for w in range(self.k)]

    def _check_memory(self) -> None:
        """Stop the run before this machine runs out of memory, saying which side holds it."""
        meminfo = Path("/proc/meminfo").read_text().split()
        available = int(meminfo[meminfo.index("MemAvailable:") + 1])
        if available < self.min_available_kib:
            rss = [_rss_kib(pid) // 1024 for pid in self.pids()]
            raise RuntimeError(
                f"N={self.n}: only {available // 1024} MiB of memory left (--min-available-gib): "
                f"workers' RSS {rss} MiB, server's {_rss_kib(self.server_pid) // 1024} MiB"
            )

    def stop(self) -> None:
        """Kill (by PID) every worker still running, and close the pipes to them."""
        for proc in self.procs:
            Procs.stop(proc, grace=5.0)
            for pipe in (proc.stdin, proc.stdout):
                if pipe is not None:
                    pipe.close()

    def close(self, timeout: float) -> None:
        """Close every worker's channels and let it exit (an error here kills them all by PID later)."""
        self.all({"op": "close"}, timeout)
        for proc in self.procs:
            proc.wait(timeout)


def _progress(workers: _Workers, server: int, what: str, since: float, detail: str = "") -> None:
    """One stderr line per phase: how long it took, its numbers so far (a run stopped in a later phase
    still shows them) and the memory of the workers and the server (peak: the workers' ``VmHWM``)."""
    rss = sum(map(_rss_kib, workers.pids())) / 1024
    hwm = sum(map(_hwm_kib, workers.pids())) / 1024
    print(
        f"  N={workers.n} {what}: {time.monotonic() - since:.1f}s; workers RSS {rss:.0f} MiB "
        f"(peak {hwm:.0f}), "
        f"server RSS {_rss_kib(server) / 1024:.0f} MiB{detail}",
        file=sys.stderr,
        flush=True,
    )


def _simulate(workers: _Workers, n: int, server: int, opts: argparse.Namespace, out: dict[str, Any]) -> None:
    """The four phases, each started and ended here; the row's numbers, from the workers' answers, go
    into ``out`` as each phase ends (a later phase's failure leaves the earlier ones' numbers)."""
    limit = opts.phase_timeout
    sims = [os.getpid(), *workers.pids()]
    t = time.monotonic()
    workers.all({"op": "open"}, limit + SLACK_S)
    _progress(workers, server, "channels open", t)
    server0, sim0 = _cpu_s(server), sum(map(_cpu_s, sims))
    t0 = time.monotonic()
    per = max(1, opts.concurrency // workers.k)  # --concurrency in flight in all
    wave = workers.all({"op": "join", "concurrency": per}, 4 * limit + SLACK_S)
    server_wave, sim_wave = _cpu_s(server) - server0, sum(map(_cpu_s, sims)) - sim0
    out |= {
        "register_per_s": n / (max(a["registered_at"] for a in wave) - t0),
        "all_maps_s": max(a["maps_at"] for a in wave) - t0,
        "converged_s": max(a["converged_at"] for a in wave) - t0,
        "messages": sum(a["messages"] for a in wave),
        "bytes": sum(a["bytes"] for a in wave),
        "have_map": sum(a["have_map"] for a in wave),
        "complete": sum(a["complete"] for a in wave),
        "idle_rss_kib": _rss_kib(server),
        "server_cpu_s": server_wave,
        "sim_cpu_share": sim_wave / (sim_wave + server_wave) if sim_wave + server_wave else 0.0,
    }
    _progress(workers, server, "join wave", t0, "; " + ", ".join(f"{k} {v:.4g}" for k, v in out.items()))
    node_ids = [i for a in wave for i in a["node_ids"]]
    t = time.monotonic()
    lat = _changes(workers, n, node_ids, opts)
    out["change_samples"] = len(lat)
    out["change_p50_s"] = statistics.median(lat)
    out["change_p99_s"] = statistics.quantiles(lat, n=100, method="inclusive")[98] if len(lat) > 1 else lat[0]
    _progress(
        workers,
        server,
        f"{opts.changes} changes",
        t,
        f"; p50 {out['change_p50_s']:.3f}s, p99 {out['change_p99_s']:.3f}s",
    )
    workers.all({"op": "drop"}, limit + SLACK_S)
    time.sleep(QUIET_S)  # the server has seen every stream close
    server0, sim0 = _cpu_s(server), sum(map(_cpu_s, sims))
    t0 = time.monotonic()
    storm = workers.all({"op": "reopen"}, 2 * limit + SLACK_S)
    out["storm_server_cpu_s"] = _cpu_s(server) - server0
    out["storm_sim_cpu_s"] = sum(map(_cpu_s, sims)) - sim0
    out["storm_maps_s"] = max(a["maps_at"] for a in storm) - t0
    out["storm_have_map"] = sum(a["have_map"] for a in storm)
    out["storm_deltas_per_node"] = sum(a["deltas"] for a in storm) / n
    out["sim_hwm_kib"] = sum(map(_hwm_kib, workers.pids()))
    _progress(
        workers,
        server,
        "reconnect storm",
        t0,
        f"; maps {out['storm_maps_s']:.2f}s, CPU s: server {out['storm_server_cpu_s']:.1f}, "
        f"simulator {out['storm_sim_cpu_s']:.1f}",
    )


def _changes(workers: _Workers, n: int, node_ids: list[int], opts: argparse.Namespace) -> list[float]:
    """``--changes`` endpoint reports, one at a time: every (stream, change) latency in seconds."""
    k, limit = opts.changes, opts.phase_timeout
    latencies: list[float] = []
    for j in range(k):
        index = (j * max(1, n // k)) % n
        port = 41000 + j
        endpoints = [f"198.51.100.{j % 254 + 1}:{port}", f"203.0.113.{j % 254 + 1}:{port}"]
        # every worker watches before the report is sent, so no arrival can come unwatched
        workers.all(
            {"op": "watch", "index": index, "node_id": node_ids[index], "endpoints": endpoints}, SLACK_S
        )
        owner = workers.owner(index)
        sent = workers.ask({owner: {"op": "report", "index": index, "endpoints": endpoints}}, limit + SLACK_S)
        arrivals = workers.all({"op": "arrivals"}, limit + SLACK_S)
        latencies.extend(t - sent[owner]["sent"] for a in arrivals for t in a["arrivals"])
        time.sleep(CHANGE_GAP_S)
    return latencies


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


def measure(n: int, run_dir: Path, procs: Procs, opts: argparse.Namespace) -> dict[str, Any]:
    """One row: a fresh server, K workers simulating N nodes against it, the in-process reference. The
    server and workers are stopped (by PID) before this returns; ``run_dir`` is left for the caller. A
    phase that fails after the join wave ends the row there: its ``error`` says why, the numbers measured
    until then stay (a failed join wave raises)."""
    server, port, key = _start_server(run_dir, procs, opts.batch_delay)
    try:
        workers = _Workers(n, (server.pid, port), key, run_dir, procs=procs, opts=opts)
        result: dict[str, Any] = {"workers": workers.k}
        try:
            _simulate(workers, n, server.pid, opts, result)
            workers.close(SLACK_S)
        except RuntimeError as exc:
            if "register_per_s" not in result:
                raise
            result["error"] = str(exc)
            result["sim_hwm_kib"] = sum(map(_hwm_kib, workers.pids()))
        finally:
            workers.stop()
        Procs.stop(server)  # before the reference: its memory is free again
        result["mapper_s"] = _mapper_reference(n)
        return result
    finally:
        Procs.stop(server)


# the table: (title, result key, width, format, scale); a "x" format ends the value with an x
COLUMNS = (
    ("reg/s", "register_per_s", 6, ".0f", 1.0),
    ("maps_s", "all_maps_s", 7, ".2f", 1.0),
    ("conv_s", "converged_s", 7, ".2f", 1.0),
    ("wave_msg", "messages", 9, ".0f", 1.0),
    ("wave_MB", "bytes", 8, ".1f", 1e-6),
    ("rss_MB", "idle_rss_kib", 7, ".0f", 1 / 1024),
    ("srv_cpu", "server_cpu_s", 7, ".2f", 1.0),
    ("sim%", "sim_cpu_share", 5, ".0%", 1.0),
    ("chg_p50", "change_p50_s", 7, ".0f", 1000.0),
    ("chg_p99", "change_p99_s", 7, ".0f", 1000.0),
    ("storm_s", "storm_maps_s", 7, ".2f", 1.0),
    ("d/node", "storm_deltas_per_node", 7, ".1f", 1.0),
    ("sim_MB", "sim_hwm_kib", 7, ".0f", 1 / 1024),
    ("mapper_s", "mapper_s", 8, ".3f", 1.0),
    ("cpu/map", "cpu_per_map", 7, ".0fx", 1.0),
)
HEADER = "    N " + " ".join(title.rjust(width) for title, _, width, _, _ in COLUMNS)


def _row(n: int, r: dict[str, Any]) -> str:
    """The table's row; a phase that did not finish shows ``-`` in its columns."""
    if "server_cpu_s" in r and r.get("mapper_s"):
        r = {**r, "cpu_per_map": r["server_cpu_s"] / r["mapper_s"]}
    cells = [f"{n:>5}"]
    for _, key, width, fmt, scale in COLUMNS:
        value = r.get(key)
        if value is None:
            text = "-"
        elif fmt.endswith("x"):
            text = format(value * scale, fmt[:-1]) + "x"
        else:
            text = format(value * scale, fmt)
        cells.append(text.rjust(width))
    return " ".join(cells)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="bench.fleet", description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--nodes", default="100,500,1000", help="comma-separated fleet sizes (at most 10000)")
    ap.add_argument(
        "--workers",
        type=int,
        default=min(4, max(1, (os.cpu_count() or 1) // 2)),
        help="simulator processes (default: half the cores, 1 to 4: the server needs the rest)",
    )
    ap.add_argument("--channels", type=int, default=8, help="gRPC channels the nodes share, in all")
    ap.add_argument("--conn-per-node", action="store_true", help="one channel (TLS connection) per node")
    ap.add_argument("--concurrency", type=int, default=64, help="Registers in flight, in all")
    ap.add_argument("--changes", type=int, default=5)
    ap.add_argument("--phase-timeout", type=float, default=120.0)
    ap.add_argument(
        "--min-available-gib",
        type=float,
        default=2.0,
        help="stop the run when the machine's MemAvailable falls below this (default 2)",
    )
    ap.add_argument(
        "--batch-delay", type=float, help="the server's [mapper] batch_delay in seconds (default: its own)"
    )
    return ap


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> int:
    ap = parser()
    opts = ap.parse_args()
    sizes = [int(x) for x in opts.nodes.split(",")]
    if any(not 2 <= n <= 10000 for n in sizes):
        ap.error("--nodes: each size must be 2..10000")
    if opts.workers < 1 or opts.channels < 1 or opts.concurrency < 1 or opts.changes < 1:
        ap.error("--workers, --channels, --concurrency and --changes must be at least 1")
    signal.signal(signal.SIGTERM, _raise_interrupt)  # a kill of the parent still stops its children
    procs = Procs()
    print(
        f"workers: {opts.workers}, channels: {'one per node' if opts.conn_per_node else opts.channels}, "
        f"concurrency {opts.concurrency}, "
        f"batch_delay: {'default' if opts.batch_delay is None else opts.batch_delay}"
    )
    print(
        "reg/s: registers per second; maps_s / conv_s: join wave until every node has its full map /\n"
        "knows all peers; wave_msg, wave_MB: received during the wave; rss_MB: server, idle, all streams\n"
        "open; srv_cpu: server CPU s in the wave; sim%: simulator share of that CPU; chg_p50/p99 ms: one\n"
        "change to all streams; storm_s: all streams reopened until every map; d/node: deltas per node in\n"
        "the storm; sim_MB: workers' peak RSS, summed; mapper_s: in-process compile + all full maps\n"
        "(reference); cpu/map: srv_cpu / mapper_s"
    )
    print(HEADER, flush=True)
    try:
        with tempfile.TemporaryDirectory(prefix="bench-fleet-") as tmp:
            try:
                for n in sizes:
                    result = measure(n, Path(tmp) / f"n{n}", procs, opts)
                    print(_row(n, result), flush=True)
                    if "error" in result:  # a larger N would fail the same way
                        raise RuntimeError(f"N={n}: {result['error']}")
            finally:
                procs.stop_all()
    except KeyboardInterrupt:
        print("\nbench: interrupted; its processes and temporary directory are gone", file=sys.stderr)
        return 130
    except RuntimeError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
