"""The whole ``ghostlink join`` process in a network namespace, with real wireguard-go, against the
in-test Coordination server (run in the same namespace as its own process): the up line, WireGuard,
addresses and routes as programmed, state files, the local API, and a clean SIGTERM shutdown (nothing
left to undo: no journal of host changes).
"""

from __future__ import annotations

import os
import secrets
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from ghostcore.pb.ghostmesh.v1 import local_pb2, local_pb2_grpc
from tests.component._link_fixtures import netns_ctx

pytestmark = pytest.mark.netns

REPO = Path(__file__).resolve().parents[2]
SERVER = """
import asyncio
from ghostcore.keys import PrivateKey
from tests.component._link_fixtures import FakeCoordination, make_node, start_server
async def main():
    c = FakeCoordination()
    c.peers = {2: make_node(2, PrivateKey.generate().public_key().base64(), endpoints=("192.0.2.2:41641",))}
    server, target, pin = await start_server(c)
    print(target, pin, flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""


@pytest.fixture
def netns() -> Iterator[str]:
    with netns_ctx() as name:
        yield name


def _wait_file(path: Path, text: str, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        content = path.read_text() if path.exists() else ""
        if text in content:
            return content
        if proc.poll() is not None:
            raise AssertionError(f"process exited {proc.returncode}: {content[-2000:]}")
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {text!r}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(5)


def test_join_runs_and_stops_cleanly(netns: str, tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    srv_out = tmp_path / "server.out"
    ifname = f"glp{secrets.token_hex(2)}"
    state, sock = tmp_path / "state", tmp_path / "run" / "gl.sock"
    with srv_out.open("wb") as out:
        server = subprocess.Popen(
            ["ip", "netns", "exec", netns, sys.executable, "-c", SERVER],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=REPO,
        )
    link: subprocess.Popen[bytes] | None = None
    try:
        target, pin = _wait_file(srv_out, "127.0.0.1:", server).strip().splitlines()[0].split()
        err = tmp_path / "ghostlink.err"
        with err.open("wb") as fh:
            link = subprocess.Popen(
                [
                    "ip",
                    "netns",
                    "exec",
                    netns,
                    sys.executable,
                    "-m",
                    "ghostlink.app",
                    "join",
                    "--server",
                    target,
                    "--auth",
                    f"tskey-good.{pin}",
                    "--hostname",
                    "proc1",
                    "--state-dir",
                    str(state),
                    "--socket",
                    str(sock),
                    "--interface",
                    ifname,
                    "--listen-port",
                    "0",
                    "--backend",
                    "wireguard-go",
                ],
                stderr=fh,
                stdout=subprocess.DEVNULL,
                env=env,
                cwd=tmp_path,
            )
        text = _wait_file(err, "ghostlink: joined as", link)
        assert (
            "ghostlink: joined as proc1 (100.64.0.1, fd7a:115c:a1e0::1) via wireguard-go on " + ifname in text
        )
        assert "Traceback" not in text

        dump = subprocess.run(
            ["ip", "netns", "exec", netns, "wg", "show", ifname, "dump"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.splitlines()
        peer = dump[1].split("\t")
        assert peer[2] == "192.0.2.2:41641"
        assert peer[3] == "100.64.0.2/32,fd7a:115c:a1e0::2/128"
        addrs = subprocess.run(
            ["ip", "-n", netns, "addr", "show", ifname], check=True, capture_output=True, text=True
        ).stdout
        assert "inet 100.64.0.1/32" in addrs
        assert "fd7a:115c:a1e0::1/128" in addrs
        assert "mtu 1280" in addrs
        routes = subprocess.run(
            ["ip", "-n", netns, "route", "show", "dev", ifname], check=True, capture_output=True, text=True
        ).stdout
        assert "100.64.0.2" in routes

        assert stat.S_IMODE(state.stat().st_mode) == 0o700
        assert stat.S_IMODE((state / "node.key").stat().st_mode) == 0o600
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600
        with grpc.insecure_channel(f"unix://{sock}") as ch:
            st = local_pb2_grpc.LocalNodeStub(ch).Status(local_pb2.LocalStatusRequest(), timeout=5)
            assert (st.name, st.backend, st.interface, st.connected) == (
                "proc1",
                "wireguard-go",
                ifname,
                True,
            )
            assert st.listen_port > 0

        link.send_signal(signal.SIGTERM)
        assert link.wait(15) == 0
        assert not sock.exists(), "the local socket is removed"
        assert not (state / "host.json").exists(), "everything it changed undone: no journal left"
        assert not Path(f"/var/run/wireguard/{ifname}.sock").exists(), "wireguard-go's socket is gone"
        gone = subprocess.run(["ip", "-n", netns, "link", "show", ifname], capture_output=True, check=False)
        assert gone.returncode != 0, "the interface vanished with wireguard-go"
    finally:
        if link is not None:
            _stop(link)
        _stop(server)
