"""A change and its audit row commit together or not at all: when the row cannot be written the change
is not committed either (and ghostmesh stops), and ghostmesh killed with SIGKILL at random moments under
a stream of registrations keeps every acknowledged one with its row, its log still verifying."""

from __future__ import annotations

import asyncio
import json
import random
import re
import signal
import sqlite3
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from ghostcore import auditchain, tlschannel
from ghostcore.errors import GhostError
from ghostcore.joinkey import parse_pin
from ghostcore.keys import PrivateKey, PublicKey
from ghostcore.pb.ghostmesh.v1 import admin_pb2 as apb
from ghostcore.pb.ghostmesh.v1 import admin_pb2_grpc as apb_grpc
from ghostcore.pb.ghostmesh.v1 import coordination_pb2 as pb
from ghostcore.pb.ghostmesh.v1 import coordination_pb2_grpc as pb_grpc
from ghostctl.cli import main as ghostctl
from tests.component._mesh_fixtures import NodeClient, admin_unix, auth_key, mesh_config, running

REFUSE_AUDIT = (
    "CREATE TRIGGER refuse_audit BEFORE INSERT ON audit BEGIN SELECT RAISE(ABORT, 'disk full'); END"
)


def _sql(db: Path, statement: str) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(db)
    try:
        with conn:
            return conn.execute(statement).fetchall()
    finally:
        conn.close()


async def test_a_change_whose_audit_row_cannot_be_written_is_not_committed(tmp_path: Path) -> None:
    cfg = mesh_config(tmp_path)
    async with running(cfg) as srv:
        key = await auth_key(srv)  # single use: its use must not be counted either
        _sql(srv.store.path, REFUSE_AUDIT)
        node = NodeClient(srv)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await node.register(key, "web")
        await node.close()
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert info.value.details().startswith("audit log: node.register web could not be recorded (")
        assert info.value.details().endswith("; nothing was changed, ghostmesh is stopping")
        assert _sql(srv.store.path, "SELECT COUNT(*) FROM nodes") == [(0,)]
        assert _sql(srv.store.path, "SELECT used_count FROM auth_keys") == [(0,)]
        assert srv.hub.broken.is_set()
        async with admin_unix(srv) as admin:  # the server's memory may be ahead: no more writes
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await admin.CreateUser(apb.CreateUserRequest(name="alice"), timeout=5)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    _sql(cfg.db_path, "DROP TRIGGER refuse_audit")
    async with running(cfg) as srv:  # a restart loads what was committed: neither the node nor its row
        assert srv.state.list_nodes() == []
        node = NodeClient(srv)
        assert (await node.register(key, "web")).name == "web"  # the key was never spent
        await node.close()
        rows = srv.store.list_audit()
        assert [r.action for r in rows].count("node.register") == 1
        assert srv.hub.audit is not None
        assert auditchain.verify(rows, srv.hub.audit.public_key).ok


@dataclass(frozen=True)
class Proc:
    """A ghostmesh process and what a client needs of it."""

    proc: asyncio.subprocess.Process
    target: str
    tls_pin: str
    server_key: PublicKey
    drain: asyncio.Task[bytes]


async def _start(state: Path, admin: Path, bind: str) -> Proc:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ghostmesh.app", "--bind", bind, "--state-dir", str(state),
        "--admin-socket", str(admin), "--log-level", "error", stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stderr is not None
    try:
        line = (await asyncio.wait_for(proc.stderr.readline(), 30)).decode()
        m = re.match(r"ghostmesh: listening on (\S+) \(TLS, key pin (sha256:\S+)\)", line)
        assert m, line
        target, pin = m.group(1), m.group(2)
        trust = tlschannel.Trust(pin=parse_pin(pin))
        setup = await asyncio.to_thread(tlschannel.prepare, target, trust, 5.0)
        async with grpc.aio.secure_channel(target, setup.credentials, options=setup.options) as channel:
            info = await pb_grpc.CoordinationStub(channel).GetServerInfo(pb.GetServerInfoRequest(), timeout=5)
    except BaseException:
        proc.kill()
        await proc.wait()
        raise
    drain = asyncio.create_task(proc.stderr.read())  # never let a full pipe block the server
    return Proc(proc, target, pin, PublicKey.from_base64(info.server_key), drain)


async def _admin_key(admin: Path) -> str:
    async with grpc.aio.insecure_channel(f"unix:{admin}") as channel:
        resp = await apb_grpc.AdminStub(channel).CreateAuthKey(
            apb.CreateAuthKeyRequest(reusable=True, expiration_seconds=3600), timeout=5
        )
    return str(resp.secret)


async def _register_until(server: list[Proc], key: str, acked: list[str], done: asyncio.Event) -> None:
    """Register fresh node keys one after another; note each key the server acknowledged."""
    client: NodeClient | None = None
    while not done.is_set():
        try:
            if client is None:
                client = NodeClient(server[0])  # its pin check blocks the loop for a moment: fine here
            client.key = PrivateKey.generate()
            await client.register(key, "n")
            acked.append(client.pub)
        except (grpc.aio.AioRpcError, GhostError, OSError):
            if client is not None:
                await client.close()
                client = None
            await asyncio.sleep(0.02)
    if client is not None:
        await client.close()


async def test_ghostmesh_stops_when_a_change_cannot_be_committed(tmp_path: Path) -> None:
    state, admin = tmp_path / "state", tmp_path / "admin.sock"
    server = await _start(state, admin, "127.0.0.1:0")
    try:
        key = await _admin_key(admin)
        _sql(state / "ghostmesh.db", REFUSE_AUDIT)
        node = NodeClient(server)
        with pytest.raises(grpc.aio.AioRpcError):
            await node.register(key, "web")
        await node.close()
        assert await asyncio.wait_for(server.proc.wait(), 20) == 1
        last = (await server.drain).decode().splitlines()[-1]
        assert last.startswith("ghostmesh: stopped: audit log: node.register web could not be recorded (")
        assert last.endswith("; start ghostmesh again (the database holds every change committed before)")
    finally:
        if server.proc.returncode is None:
            server.proc.kill()
            await server.proc.wait()


async def test_sigkill_at_random_moments_loses_no_acknowledged_registration_nor_its_row(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    seed = time.time_ns()  # named in every failure, to replay the same kill moments
    server = [await _start(tmp_path / "state", tmp_path / "admin.sock", "127.0.0.1:0")]
    try:
        await _kill_under_load(server, tmp_path, seed, capsys)
    finally:
        if server[0].proc.returncode is None:
            server[0].proc.kill()
            await server[0].proc.wait()


async def _kill_under_load(
    server: list[Proc], tmp_path: Path, seed: int, capsys: pytest.CaptureFixture[str]
) -> None:
    state, admin, rng = tmp_path / "state", tmp_path / "admin.sock", random.Random(seed)
    port = server[0].target.rpartition(":")[2]
    key = await _admin_key(admin)
    acked: list[str] = []
    done = asyncio.Event()
    workers = [asyncio.create_task(_register_until(server, key, acked, done)) for _ in range(4)]
    kills = 0
    try:
        for _ in range(10):
            await asyncio.sleep(rng.uniform(0.2, 0.9))
            server[0].proc.send_signal(signal.SIGKILL)
            await server[0].proc.wait()
            kills += 1
            server[0] = await _start(state, admin, f"127.0.0.1:{port}")
        await asyncio.sleep(0.3)
    finally:
        done.set()
        await asyncio.gather(*workers)
    assert kills == 10
    assert len(acked) >= 20, f"only {len(acked)} registrations acknowledged (seed {seed})"

    db = state / "ghostmesh.db"
    nodes = {k for (k,) in _sql(db, "SELECT node_key FROM nodes")}
    rows = [json.loads(d) for (d,) in _sql(db, "SELECT detail FROM audit WHERE action = 'node.register'")]
    registered = {r["node_key"] for r in rows}
    assert set(acked) <= nodes, f"acknowledged but lost (seed {seed})"
    assert nodes == registered, f"nodes without their audit row, or rows without their node (seed {seed})"
    code = await asyncio.to_thread(ghostctl, ["--server", f"unix:{admin}", "audit", "verify"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.startswith(f"ok: {len(rows) + 1} entries verified")  # the auth key's row, then the nodes'
    server[0].proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(server[0].proc.wait(), 20) == 0
    await server[0].drain
