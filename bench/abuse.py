"""Soak: one misbehaving node floods ghostmesh while honest nodes keep their map streams.

The parent starts this tree's ``ghostmesh`` on 127.0.0.1 (a temporary state directory) and two children
(the simulator of ``bench.fanout``, this tree's protocol: TLS with the pin, v2 proofs):

* **honest**: N nodes join and hold a Sync stream each; on each ``changes`` command on its stdin it makes
  K endpoint changes one at a time and reports how long every other stream took to see each one;
* **abuser**: one registered node that, for ``--seconds``, as fast as its concurrency allows, sends
  ReportStatus with 64 subnet routes that flap on and off (each report would be 64 audit rows), opens a
  new Sync stream every ``--stream-interval`` (keeping them), and makes calls with bad credentials from
  fresh keys (failed authentication); every answer is counted by gRPC status.

Measured: the honest change -> map p50 / p99 in a quiet run and during the flood (the ratio), ghostmesh's RSS
(quiet, and the highest sampled every 0.25 s during the flood), the audit rows the flood added, and what
the abuser got (calls and refusals by status). The run fails (exit 1) when a bound is crossed: p99 during
the flood over ``--max-p99-ratio`` times the quiet one (default 2), RSS over the quiet one plus
``--max-rss-growth-mib`` (default 64), or more audit rows than ``--max-audit-rows`` (default 200; the
server coalesces a node's route changes and a source's failed authentications, so a flood of any length
adds a few rows a minute).

Run: ``.venv/bin/python -m bench.abuse [--nodes 200] [--seconds 60]``. Every wait is bounded, every process
stopped by its PID, every temporary directory removed, also on errors and Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from bench.fanout import (
    M_REGISTER,
    M_REPORT,
    M_SYNC,
    REPO,
    Procs,
    _p99,
    _Protocol,
    _rss_kib,
    _SimNode,
    _Simulator,
    _wait_listening,
)

RESULT_TAG = "ABUSE-RESULT "
READY = "ready"
ROUTES = [f"10.{i // 256}.{i % 256}.0/24" for i in range(64)]


# --- the children -------------------------------------------------------------------------------------


async def _honest(proto: _Protocol, opts: argparse.Namespace) -> None:
    sim = _Simulator(proto, opts)
    loop = asyncio.get_running_loop()
    try:
        await sim.join_all()
        await sim.sync_all()
        print(READY, flush=True)
        while (await loop.run_in_executor(None, sys.stdin.readline)).strip() == "changes":
            latencies, _ = await sim.changes()
            print(RESULT_TAG + json.dumps({"latencies_s": latencies}), flush=True)
    finally:
        await sim.close()


async def _abuser(proto: _Protocol, opts: argparse.Namespace) -> dict[str, Any]:
    pb = proto.pb
    sim = _Simulator(proto, argparse.Namespace(**{**vars(opts), "nodes": 1}))
    await sim.join_all()
    node = sim.nodes[0]
    codes: Counter[str] = Counter()
    streams: list[grpc.aio.UnaryStreamCall[bytes, Any]] = []
    stop_at = time.monotonic() + opts.seconds

    async def call(method: str, body: bytes, md: Any, resp: Any, what: str) -> None:
        try:
            await proto.unary(node.channel, method, body, md, resp)
            codes[f"{what} OK"] += 1
        except grpc.aio.AioRpcError as exc:
            codes[f"{what} {exc.code().name}"] += 1

    async def flap(worker: int) -> None:
        i = worker
        while time.monotonic() < stop_at:
            routes = ROUTES if i % 2 else []
            body = pb.StatusReport(
                endpoints=["192.0.2.66:41641"], advertised_routes=routes
            ).SerializeToString()
            await call(M_REPORT, body, proto.metadata(node, M_REPORT, body), pb.StatusAck, "ReportStatus")
            i += 1

    async def bad_auth() -> None:
        while time.monotonic() < stop_at:
            stranger = proto.keys.PrivateKey.generate()
            body = pb.RegisterRequest(auth_key="gmauth_00000000_wrong", hostname="x").SerializeToString()
            md = proto.metadata(_SimNode(0, stranger, node.channel, node.server_key), M_REGISTER, body)
            await call(M_REGISTER, body, md, pb.RegisterResponse, "Register(bad key)")
            forged = tuple((k, "AAAA" + v[4:]) if k == "x-ghost-proof" else (k, v) for k, v in md)
            await call(M_REGISTER, body, forged, pb.RegisterResponse, "Register(bad proof)")

    async def open_streams() -> None:
        body = pb.SyncRequest().SerializeToString()
        sync: grpc.aio.UnaryStreamMultiCallable[bytes, Any]
        sync = node.channel.unary_stream(M_SYNC, response_deserializer=pb.MapUpdate.FromString)
        while time.monotonic() < stop_at:
            streams.append(sync(body, metadata=proto.metadata(node, M_SYNC, body)))
            codes["Sync opened"] += 1
            await asyncio.sleep(opts.stream_interval)

    try:
        await asyncio.gather(*(flap(w) for w in range(opts.concurrency)), bad_auth(), open_streams())
    finally:
        for s in streams:
            if s.done():  # ended by the server (one stream per node: a newer one replaces it)
                codes[f"Sync ended {(await s.code()).name}"] += 1
            s.cancel()
        await sim.close()
    return {"codes": dict(codes)}


def _child_main(role: str, argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog=f"abuse {role}")
    ap.add_argument("--target", required=True)
    ap.add_argument("--nodes", type=int, default=1)
    ap.add_argument("--changes", type=int, default=10)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--timeout", type=float, default=10.0)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--stream-interval", type=float, default=0.1)
    opts = ap.parse_args(argv)
    key_text = sys.stdin.readline().strip()  # not in argv, where ps shows it
    proto = _Protocol(REPO, key_text, opts.target, opts.timeout)
    if role == "honest":
        asyncio.run(_honest(proto, opts))
    else:
        print(RESULT_TAG + json.dumps(asyncio.run(_abuser(proto, opts))), flush=True)
    return 0


# --- the parent ---------------------------------------------------------------------------------------


def _audit_rows(ctl: list[str], env: dict[str, str]) -> int:
    """How many audit entries ghostmesh holds (paged, as ghostctl pages them)."""
    res = subprocess.run([*ctl, "-o", "json", "audit", "verify"], env=env, capture_output=True, text=True,
                         timeout=120, check=False)  # fmt: skip
    if res.returncode != 0:
        raise RuntimeError(f"ghostctl audit verify: exit {res.returncode}: {res.stderr.strip()}")
    return int(json.loads(res.stdout)["entries"])


class _RssSampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak_kib, self._halt = pid, 0, threading.Event()

    def run(self) -> None:
        while not self._halt.wait(0.25):
            self.peak_kib = max(self.peak_kib, _rss_kib(self.pid))

    def stop(self) -> int:
        self._halt.set()
        self.join(5)
        return self.peak_kib


def _changes(honest: subprocess.Popen[str], budget: float) -> list[float]:
    assert honest.stdin is not None
    assert honest.stdout is not None
    honest.stdin.write("changes\n")
    honest.stdin.flush()
    deadline = time.monotonic() + budget
    while time.monotonic() < deadline:
        line = honest.stdout.readline()
        if not line:
            raise RuntimeError(f"the honest simulator exited ({honest.poll()})")
        if line.startswith(RESULT_TAG):
            lat: list[float] = json.loads(line[len(RESULT_TAG) :])["latencies_s"]
            return lat
    raise RuntimeError("the honest simulator did not answer in time")


@dataclass
class _Result:
    quiet: list[float]
    flooded: list[float]
    rss_quiet_kib: int
    rss_peak_kib: int
    audit_rows_added: int
    codes: dict[str, int]


def _start_server(
    procs: Procs, run_dir: Path, timeout: float
) -> tuple[subprocess.Popen[Any], int, list[str]]:
    """This tree's ghostmesh on 127.0.0.1: (process, port, the ghostctl argv for its admin socket)."""
    bindir = Path(sys.executable).parent
    admin = run_dir / "admin.sock"
    config = run_dir / "ghostmesh.toml"
    config.write_text(
        f'[server]\nbind = "127.0.0.1:0"\nadmin_socket = "{admin}"\nstate_dir = "{run_dir / "state"}"\n'
    )
    log = run_dir / "ghostmesh.log"
    with log.open("wb") as out:
        argv = [str(bindir / "ghostmesh"), "--config", str(config)]
        server = procs.start(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    port, _ = _wait_listening(server, log, timeout)
    return server, port, [str(bindir / "ghostctl"), "--server", f"unix:{admin}"]


def _child(procs: Procs, role: str, key: str, argv: list[str]) -> subprocess.Popen[str]:
    proc = procs.start(
        [sys.executable, "-m", "bench.abuse", role, *argv],
        cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdin is not None
    proc.stdin.write(key + "\n")  # the auth key: on stdin, not in argv where ps shows it
    proc.stdin.flush()
    return proc


def _run(args: argparse.Namespace, procs: Procs, run_dir: Path) -> _Result:
    server, port, ctl = _start_server(procs, run_dir, args.timeout)
    env = dict(os.environ)
    created = subprocess.run([*ctl, "-o", "json", "authkeys", "create", "--reusable"], env=env,
                             capture_output=True, text=True, timeout=30, check=True)  # fmt: skip
    key = json.loads(created.stdout)["secret"]
    common = ["--target", f"127.0.0.1:{port}", "--timeout", str(args.timeout)]
    honest = _child(
        procs, "honest", key, [*common, "--nodes", str(args.nodes), "--changes", str(args.changes)]
    )
    assert honest.stdout is not None
    if honest.stdout.readline().strip() != READY:
        raise RuntimeError(f"the honest simulator did not get ready ({honest.poll()})")
    budget = args.changes * (args.timeout + 1)
    quiet = _changes(honest, budget)
    rss_quiet = _rss_kib(server.pid)
    rows_before = _audit_rows(ctl, env)
    abuser = _child(procs, "abuser", key, [*common, "--seconds", str(args.seconds)])
    sampler = _RssSampler(server.pid)
    sampler.start()
    flooded: list[float] = []
    started = time.monotonic()
    while abuser.poll() is None and time.monotonic() - started < args.seconds + 3 * args.timeout:
        flooded += _changes(honest, budget)
    rss_peak = sampler.stop()
    out_text, _ = abuser.communicate(timeout=args.timeout * 3)
    lines = [ln for ln in out_text.splitlines() if ln.startswith(RESULT_TAG)]
    if not lines:
        raise RuntimeError(f"the abuser printed no result (exit {abuser.returncode})")
    codes: dict[str, int] = json.loads(lines[-1][len(RESULT_TAG) :])["codes"]
    return _Result(quiet, flooded, rss_quiet, rss_peak, _audit_rows(ctl, env) - rows_before, codes)


def _report(r: _Result, args: argparse.Namespace) -> list[str]:
    """Print the table; the bounds crossed (empty: all kept)."""
    q50, q99 = statistics.median(r.quiet), _p99(r.quiet)
    f50, f99 = statistics.median(r.flooded), _p99(r.flooded)
    growth = (r.rss_peak_kib - r.rss_quiet_kib) / 1024
    print(f"\n{'metric':44} {'quiet':>10} {'flooded':>10} {'ratio':>7}")
    print(f"{'honest change -> map p50 (ms)':44} {q50 * 1000:>10.1f} {f50 * 1000:>10.1f} {f50 / q50:>7.2f}")
    print(f"{'honest change -> map p99 (ms)':44} {q99 * 1000:>10.1f} {f99 * 1000:>10.1f} {f99 / q99:>7.2f}")
    rss = f"{r.rss_quiet_kib / 1024:>10.1f} {r.rss_peak_kib / 1024:>10.1f}"
    print(f"{'ghostmesh RSS (MiB; flooded: peak)':44} {rss}")
    print(f"{'audit rows added by the flood':44} {'':>10} {r.audit_rows_added:>10}")
    print(f"\nsamples: quiet {len(r.quiet)}, flooded {len(r.flooded)}; the abuser's {args.seconds:g} s:")
    for what, n in sorted(r.codes.items()):
        print(f"  {what:40} {n:>8}")
    failures = []
    if f99 / q99 > args.max_p99_ratio:
        failures.append(f"p99 ratio {f99 / q99:.2f} > {args.max_p99_ratio}")
    if growth > args.max_rss_growth_mib:
        failures.append(f"RSS grew {growth:.1f} MiB > {args.max_rss_growth_mib}")
    if r.audit_rows_added > args.max_audit_rows:
        failures.append(f"{r.audit_rows_added} audit rows > {args.max_audit_rows}")
    return failures


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] in ("honest", "abuser"):
        return _child_main(sys.argv[1], sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=200)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--changes", type=int, default=10, help="changes per measurement batch")
    ap.add_argument("--timeout", type=float, default=10.0)
    ap.add_argument("--max-p99-ratio", type=float, default=2.0)
    ap.add_argument("--max-rss-growth-mib", type=float, default=64.0)
    ap.add_argument("--max-audit-rows", type=int, default=200)
    args = ap.parse_args()
    procs = Procs()
    with tempfile.TemporaryDirectory(prefix="ghost-abuse-") as tmp:
        try:
            result = _run(args, procs, Path(tmp))
        finally:
            procs.stop_all()
    failures = _report(result, args)
    print("\nbounds: " + ("all kept" if not failures else "CROSSED: " + "; ".join(failures)))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
