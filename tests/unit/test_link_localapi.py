"""The local API socket's place: 0600 from its creation, its directory never chmodded, a directory where
others could replace it refused, missing directories created 0700, only a stale socket replaced."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest

from ghostcore.errors import ConfigError
from ghostlink.daemon import Daemon
from ghostlink.localapi import LocalNodeService, prepare_socket, start_local_api, stop_local_api

SERVICE = LocalNodeService(cast(Daemon, None))  # binding the socket asks nothing of the daemon


@pytest.fixture
def base() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="glapi-"))  # unix socket paths must stay short
    yield d
    shutil.rmtree(d, ignore_errors=True)


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def forbid_chmod(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(path: object, mode: int, **_: object) -> None:
        raise AssertionError(f"chmod({path}, {mode:o}): modes are set at creation, existing ones kept")

    monkeypatch.setattr(os, "chmod", refuse)


async def test_in_a_sticky_shared_directory_the_socket_is_0600_and_the_directory_kept(
    base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shared = base / "tmp"
    shared.mkdir()
    shared.chmod(0o1777)
    forbid_chmod(monkeypatch)
    sock = shared / "ghostlink.sock"
    server = await start_local_api(sock, SERVICE)
    try:
        assert mode(sock) == 0o600
        assert sock.stat().st_uid == os.geteuid()
        assert mode(shared) == 0o1777
    finally:
        await stop_local_api(server, sock)


async def test_missing_directories_are_created_0700(base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    forbid_chmod(monkeypatch)
    sock = base / "run" / "ghostlink" / "ghostlink.sock"
    server = await start_local_api(sock, SERVICE)
    await stop_local_api(server, sock)
    assert [mode(base / "run"), mode(sock.parent)] == [0o700, 0o700]


def test_a_shared_directory_without_the_sticky_bit_is_refused(base: Path) -> None:
    shared = base / "open"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(ConfigError) as err:
        prepare_socket(shared / "ghostlink.sock")
    assert str(err.value) == (
        f"{shared}: other users could replace the socket in this directory (mode 777, owner uid "
        f"{os.geteuid()}, not sticky); choose another --socket (in a directory only root can write to, "
        "or a sticky one such as /tmp)"
    )
    assert mode(shared) == 0o777


def test_only_a_stale_socket_is_replaced(base: Path) -> None:
    path = base / "ghostlink.sock"
    with socket.socket(socket.AF_UNIX) as crashed:
        crashed.bind(str(path))
    prepare_socket(path)
    assert not path.exists(), "a crashed run's socket goes"
    path.write_text("not a socket")
    with pytest.raises(
        ConfigError, match=r"exists and is not a socket ghostlink left .*choose another --socket"
    ):
        prepare_socket(path)
    assert path.read_text() == "not a socket"
