"""ghostmesh's metrics listener in-process: the exposition parses, health and readiness answer, and the
numbers follow what happens (a node registers and syncs, a policy is put in force)."""

from __future__ import annotations

import asyncio
import logging
import re
import signal
import socket
import sys
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from ghostcore.config import MetricsConfig
from ghostcore.pb.ghostmesh.v1 import coordination_pb2 as pb
from ghostmesh.app import main
from tests.component._mesh_fixtures import SERVICE, NodeClient, auth_key, mesh_config, next_update, running
from tests.component._metrics import get, promtool_check, scrape, until, value

SYNC = SERVICE + "Sync"
INFO = SERVICE + "GetServerInfo"
REGISTER = SERVICE + "Register"


async def test_mesh_metrics_follow_nodes_and_streams(tmp_path: Path) -> None:
    cfg = replace(mesh_config(tmp_path), metrics=MetricsConfig(listen="127.0.0.1:0"))
    async with running(cfg) as srv:
        assert srv.metrics is not None
        port = srv.metrics.port
        assert (await get(port, "/healthz"))[0] == 200
        assert (await get(port, "/readyz"))[0] == 200
        before = await scrape(port)
        assert value(before, "ghostmesh_nodes", state="online") == 0
        assert value(before, "ghostmesh_map_streams") == 0
        key = await auth_key(srv, reusable=True)
        a = NodeClient(srv)
        await a.register(key, "alpha")
        call = a.sync()
        await next_update(call)
        after = await until(port, lambda s: value(s, "ghostmesh_map_streams") == 1)
        assert value(after, "ghostmesh_map_streams") == 1
        assert value(after, "ghostmesh_nodes", state="online") == 1
        assert value(after, "ghostmesh_map_full_sent_total") == 1
        assert value(after, "ghostmesh_map_full_sent_bytes_total") > 0
        assert value(after, "ghostmesh_rpc_calls_total", method=SYNC) == 1
        assert value(after, "ghostmesh_audit_entries_total") > value(before, "ghostmesh_audit_entries_total")
        b = NodeClient(srv)
        await b.register(key, "beta")
        await next_update(call)  # alpha hears of beta: one delta
        moved = await until(port, lambda s: value(s, "ghostmesh_map_deltas_sent_total") >= 1)
        assert value(moved, "ghostmesh_map_deltas_sent_total") >= 1
        assert value(moved, "ghostmesh_fanout_latency_seconds_count") >= 1
        assert value(moved, "ghostmesh_fanout_latency_seconds_bucket", le="+Inf") >= 1
        assert value(moved, "ghostmesh_nodes", state="offline") == 1  # beta registered, no stream
        call.cancel()
        gone = await until(port, lambda s: value(s, "ghostmesh_map_streams") == 0)
        assert value(gone, "ghostmesh_nodes", state="online") == 0
        await a.close()
        await b.close()
        probe = NodeClient(srv)
        info = await probe.call("GetServerInfo", pb.GetServerInfoRequest(), ())
        assert info.server_key
        with pytest.raises(grpc.aio.AioRpcError):
            await probe.register("gmauth_nosuchkey_secret", "gamma")  # refused: counted as a failure
        await probe.close()
        last = await scrape(port)
        assert value(last, "ghostmesh_rpc_calls_total", method=INFO) == 1
        assert value(last, "ghostmesh_rpc_failures_total", method=REGISTER) == 1
        promtool_check((await get(port, "/metrics"))[2])
        # not ready once the hub stops; /healthz still answers while the loop turns
        srv.hub.stopping = True
        status, _, body = await get(port, "/readyz")
        assert (status, body) == (503, "not ready: stopping\n")
        assert (await get(port, "/healthz"))[0] == 200
        srv.hub.stopping = False


async def test_mesh_without_metrics_listens_nowhere(tmp_path: Path) -> None:
    async with running(mesh_config(tmp_path)) as srv:
        assert srv.metrics is None


async def test_the_process_prints_and_serves_its_metrics(tmp_path: Path) -> None:
    cfg = tmp_path / "ghostmesh.toml"
    cfg.write_text('[metrics]\nlisten = "127.0.0.1:0"\n[log]\nlevel = "warning"\n')
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ghostmesh.app", "--config", str(cfg), "--bind", "127.0.0.1:0",
        "--state-dir", str(tmp_path / "state"), "--admin-socket", str(tmp_path / "run" / "admin.sock"),
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        lines = [(await asyncio.wait_for(proc.stderr.readline(), 20)).decode() for _ in range(2)]
        found = re.match(r"ghostmesh: metrics on http://127\.0\.0\.1:(\d+)/metrics$", lines[1].strip())
        assert found, lines
        port = int(found.group(1))
        assert (await get(port, "/readyz"))[0] == 200
        samples = await scrape(port)
        assert value(samples, "ghostmesh_nodes", state="online") == 0
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 20) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def test_a_busy_metrics_port_is_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()  # main configures the root logger onto captured stderr: put it back after
    handlers, level = root.handlers[:], root.level
    try:
        _busy_metrics_port(tmp_path, capsys)
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def _busy_metrics_port(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cfg = tmp_path / "ghostmesh.toml"
        cfg.write_text(f'[metrics]\nlisten = "127.0.0.1:{port}"\n')
        rc = main(
            ["--config", str(cfg), "--bind", "127.0.0.1:0", "--state-dir", str(tmp_path / "state"),
             "--admin-socket", str(tmp_path / "run" / "a.sock")]
        )  # fmt: skip
    assert rc == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"ghostmesh: metrics.listen: cannot listen on 127.0.0.1:{port}")
    assert len(err.splitlines()) == 1
