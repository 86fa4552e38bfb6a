"""``ghostlink join`` failures against a real in-test gRPC server: one line, exit 1, nothing written."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from ghostcore import tlscert
from ghostlink import app, node
from ghostlink.wg.select import Choice
from tests.component._link_fixtures import AUTH_KEY, FakeCoordination, start_server


@pytest.fixture
def coord_target() -> Iterator[tuple[FakeCoordination, str, str]]:
    """The fake server on its own loop in a thread (main() runs its own event loop)."""
    coord = FakeCoordination()
    loop = asyncio.new_event_loop()
    started: list[tuple[str, str]] = []
    ready = threading.Event()
    stop = asyncio.Event()

    async def serve() -> None:
        server, target, pin = await start_server(coord)
        started.append((target, pin))
        ready.set()
        await stop.wait()
        await server.stop(None)

    t = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    t.start()
    assert ready.wait(5)
    try:
        yield coord, *started[0]
    finally:
        loop.call_soon_threadsafe(stop.set)
        t.join(5)
        loop.close()


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """main() configures the root logger for a real process; undo it so other tests keep theirs."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_auth_key_refused_writes_nothing(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    coord_target: tuple[FakeCoordination, str, str],
) -> None:
    coord, target, pin = coord_target
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(node, "choose", lambda *a, **k: Choice("wireguard-go", "test"))
    state = tmp_path / "state"
    rc = app.main(
        [
            "join",
            "--server",
            target,
            "--auth",
            f"tskey-wrong.{pin}",
            "--state-dir",
            str(state),
            "--backend",
            "wireguard-go",
            "--socket",
            str(tmp_path / "gl.sock"),
        ]
    )
    assert rc == 1
    err = capsys.readouterr().err
    assert err.endswith(
        "ghostlink: auth key refused: auth key is expired; create a new one with ghostctl authkeys create\n"
    )
    assert "tskey-wrong" not in err
    assert not state.exists(), "a failed join writes nothing"
    assert coord.verified == ["/ghostmesh.v1.Coordination/Register"], "the proof verified; the key did not"


def test_unreachable_server(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(node, "choose", lambda *a, **k: Choice("wireguard-go", "test"))
    monkeypatch.setenv("GHOSTLINK_CONTROL_CONNECT_TIMEOUT", "0.5s")
    target = f"127.0.0.1:{_free_port()}"
    rc = app.main(
        [
            "join",
            "--server",
            target,
            "--auth",
            "k",
            "--state-dir",
            str(tmp_path / "s"),
            "--backend",
            "wireguard-go",
        ]
    )
    assert rc == 1
    err = capsys.readouterr().err
    assert err.startswith(f"ghostlink: cannot reach ghostmesh at {target} (")
    assert err.endswith("; check --server and that ghostmesh is running\n")
    assert err.count("\n") == 1
    assert not (tmp_path / "s").exists()


def _join(tmp_path: Path, target: str, auth: str) -> int:
    return app.main(
        ["join", "--server", target, "--auth", auth, "--state-dir", str(tmp_path / "state"),
         "--backend", "wireguard-go", "--socket", str(tmp_path / "gl.sock")]
    )  # fmt: skip


def test_pin_mismatch_sends_nothing_and_writes_nothing(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    coord_target: tuple[FakeCoordination, str, str],
) -> None:
    """A man in the middle with its own key: the join stops on the pin, before any request."""
    coord, target, pin = coord_target
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(node, "choose", lambda *a, **k: Choice("wireguard-go", "test"))
    other = tlscert.fingerprint(tlscert.self_signed("ghostmesh").certificate)
    assert _join(tmp_path, target, f"{AUTH_KEY}.{other}") == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"ghostlink: ghostmesh at {target} presents TLS key {pin}, not the pinned {other}")
    assert AUTH_KEY not in err
    assert coord.verified == []
    assert not (tmp_path / "state").exists()


def test_untrusted_certificate_without_a_pin(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    coord_target: tuple[FakeCoordination, str, str],
) -> None:
    coord, target, _ = coord_target
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(node, "choose", lambda *a, **k: Choice("wireguard-go", "test"))
    monkeypatch.setenv("GHOSTLINK_CONTROL_CONNECT_TIMEOUT", "1s")
    assert _join(tmp_path, target, AUTH_KEY) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "its TLS certificate is not trusted" in err
    assert coord.verified == []
    assert not (tmp_path / "state").exists()


def test_pin_flag_and_key_pin_must_agree(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    coord_target: tuple[FakeCoordination, str, str],
) -> None:
    coord, target, pin = coord_target
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    other = tlscert.fingerprint(tlscert.self_signed("ghostmesh").certificate)
    monkeypatch.setenv("GHOSTLINK_NODE_PIN", other)
    assert _join(tmp_path, target, f"{AUTH_KEY}.{pin}") == 1
    assert "differ" in capsys.readouterr().err
    assert coord.verified == []
