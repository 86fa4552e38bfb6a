"""The ghostmesh command: config check, startup errors, a real process serving and stopping on SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from ghostcore import tlscert, tlschannel
from ghostcore.errors import Unavailable
from ghostcore.joinkey import parse_pin
from ghostcore.pb.ghostmesh.v1 import admin_pb2 as apb
from ghostcore.pb.ghostmesh.v1 import coordination_pb2 as pb
from ghostcore.pb.ghostmesh.v1 import coordination_pb2_grpc as pb_grpc
from ghostmesh.app import main
from ghostmesh.server import start_server
from tests.component._mesh_fixtures import admin_unix, mesh_config, running

EXAMPLE = Path(__file__).resolve().parents[2] / "configs" / "ghostmesh.toml"


@pytest.fixture(autouse=True)
def _root_logger_restored() -> Iterator[None]:
    """``main`` configures the root logger onto this test's captured stderr, which is closed afterwards:
    put the logger back, so later tests' log lines do not hit a closed stream."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_config_check_ok(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "check", "--config", str(EXAMPLE)]) == 0
    assert capsys.readouterr().out.strip() == f"ok: {EXAMPLE}"
    assert main(["--config", str(EXAMPLE), "config", "check"]) == 0
    assert capsys.readouterr().out.strip() == f"ok: {EXAMPLE}"
    assert main(["config", "check"]) == 2
    assert "needs --config" in capsys.readouterr().err


def test_config_check_bad(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[server]\nauth_method = "mtls"\n')
    assert main(["config", "check", "--config", str(bad)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("ghostmesh: ")
    assert 'server.auth_method: expected "authkey" or "oidc"' in err
    assert len(err.splitlines()) == 1


def test_config_check_loads_the_tls_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pair, other = tlscert.self_signed("mesh.example.com"), tlscert.self_signed("other")
    (tmp_path / "chain.pem").write_bytes(pair.cert_pem)
    (tmp_path / "key.pem").write_bytes(other.key_pem)  # not the certificate's key
    cfg = tmp_path / "ghostmesh.toml"
    cfg.write_text('[tls]\ncert_file = "chain.pem"\nkey_file = "key.pem"\n')  # relative to the file
    assert main(["config", "check", "--config", str(cfg)]) == 1
    err = capsys.readouterr().err.strip()
    key, chain = tmp_path / "key.pem", tmp_path / "chain.pem"
    assert err == f"ghostmesh: tls.key_file: {key} does not match the certificate in {chain}"
    (tmp_path / "key.pem").write_bytes(pair.key_pem)
    assert main(["config", "check", "--config", str(cfg)]) == 0
    assert capsys.readouterr().out.strip() == f"ok: {cfg}"


def test_startup_error_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    rc = main(
        [
            "--bind",
            "127.0.0.1:0",
            "--state-dir",
            str(blocker / "state"),
            "--admin-socket",
            str(tmp_path / "a.sock"),
        ]
    )
    assert rc == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("ghostmesh: ")
    assert "cannot create the state directory (Not a directory); choose another server.state_dir" in err
    assert "Traceback" not in err


async def test_process_serves_and_stops_on_sigterm(tmp_path: Path) -> None:
    cfg = tmp_path / "ghostmesh.toml"
    cfg.write_text('[server]\nbind = "127.0.0.1:7777"\n[log]\nlevel = "warning"\n')
    env = {**os.environ, "GHOSTMESH_MAPPER_BATCH_DELAY": "10ms"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "ghostmesh.app",
        "--config",
        str(cfg),
        "--bind",
        "127.0.0.1:0",
        "--state-dir",
        str(tmp_path / "state"),
        "--admin-socket",
        str(tmp_path / "run" / "admin.sock"),
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        assert proc.stderr is not None
        line = (await asyncio.wait_for(proc.stderr.readline(), 20)).decode()
        m = re.match(
            r"ghostmesh: listening on 127\.0\.0\.1:(\d+) \(TLS, key pin (sha256:\S+)\) admin socket (\S+)$",
            line.strip(),
        )
        assert m, line
        sock = Path(m.group(3))
        assert await asyncio.to_thread(sock.is_socket)
        target = f"127.0.0.1:{m.group(1)}"
        trust = tlschannel.Trust(pin=parse_pin(m.group(2)))  # the pin printed is the key served
        setup = await asyncio.to_thread(tlschannel.prepare, target, trust, 5.0)
        async with grpc.aio.secure_channel(target, setup.credentials, options=setup.options) as channel:
            info = await pb_grpc.CoordinationStub(channel).GetServerInfo(pb.GetServerInfoRequest(), timeout=5)
            assert len(info.server_key) == 44
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 20) == 0
        rest = (await proc.stderr.read()).decode()
        assert "Traceback" not in rest
        assert await asyncio.to_thread((tmp_path / "state" / "ghostmesh.db").exists)
        assert not await asyncio.to_thread(sock.exists)  # the socket file is cleaned up on a graceful stop
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def test_busy_port_is_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        rc = main(
            [
                "--bind",
                f"127.0.0.1:{port}",
                "--state-dir",
                str(tmp_path / "state"),
                "--admin-socket",
                str(tmp_path / "run" / "a.sock"),
            ]
        )
    assert rc == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"ghostmesh: server.bind: cannot listen on 127.0.0.1:{port}")
    assert len(err.splitlines()) == 1


async def test_live_admin_socket_is_not_stolen_but_stale_one_is_replaced(tmp_path: Path) -> None:
    cfg = mesh_config(tmp_path)
    async with running(cfg) as srv:
        with pytest.raises(Unavailable, match="in use by a running ghostmesh"):
            await start_server(cfg)
        assert await asyncio.to_thread(srv.admin_socket.is_socket)
    # a socket file nobody listens on (a crashed run) is replaced
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(cfg.server.admin_socket)
    stale.close()
    async with running(cfg) as srv2, admin_unix(srv2) as admin:
        users = await admin.ListUsers(apb.ListUsersRequest(), timeout=5)
        assert list(users.users) == []
