"""ghostcore.files: a replaced file is durable (its directory fsynced after the rename), a new secret is
born 0600 and never written over an existing file, a secret others may use is refused, directories are
created 0700 but an existing one is never chmodded (and refused when others may write to it), a socket's
directory may be shared only when sticky."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from ghostcore import files
from ghostcore.errors import ConfigError


def _trace(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Record os.replace and os.fsync calls (the path an fsynced descriptor names), in order."""
    events: list[tuple[str, str]] = []
    real_fsync: Callable[[int], None] = os.fsync
    real_replace = os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src: str | Path, dst: str | Path) -> None:
        events.append(("replace", str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


def test_replace_file_fsyncs_the_directory_after_the_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "acls.toml"
    path.write_text("old")
    path.chmod(0o640)
    events = _trace(monkeypatch)
    files.replace_file(path, b"new", mode=None)
    assert path.read_bytes() == b"new"
    assert stat.S_IMODE(path.stat().st_mode) == 0o640  # kept
    assert events[-2:] == [("replace", str(path)), ("fsync", str(tmp_path))]
    assert events[0][0] == "fsync"  # the data first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["acls.toml"]  # no temporary file left
    files.replace_file(tmp_path / "tls.crt", b"pem", 0o644)
    assert stat.S_IMODE((tmp_path / "tls.crt").stat().st_mode) == 0o644
    files.replace_file(path, b"secret")  # the default: private, whatever the file replaced was
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_create_private_is_born_0600_and_never_overwrites(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        files.create_private(tmp_path / "server.key", b"secret\n")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "server.key").stat().st_mode) == 0o600
    with pytest.raises(FileExistsError):
        files.create_private(tmp_path / "server.key", b"other\n")
    assert (tmp_path / "server.key").read_bytes() == b"secret\n"


def test_read_private_refuses_group_and_other_permissions(tmp_path: Path) -> None:
    key = tmp_path / "k"
    key.write_bytes(b"x")
    key.chmod(0o600)
    assert files.read_private(key, "the key") == b"x"
    key.chmod(0o610)
    with pytest.raises(ConfigError, match=r"^the key .*/k: others may read it \(mode 610\); chmod 600 it$"):
        files.read_private(key, "the key")
    with pytest.raises(ConfigError, match=r"^cannot read the key .*/missing: No such file"):
        files.read_private(tmp_path / "missing", "the key")


def test_remove_file_fsyncs_the_directory_and_tolerates_a_missing_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "node.key.pending"
    path.write_bytes(b"k")
    events = _trace(monkeypatch)
    files.remove_file(path)
    files.remove_file(path)  # gone already: nothing to do
    assert not path.exists()
    assert events == [("fsync", str(tmp_path))]


def test_make_private_dir_creates_each_missing_component_0700(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "state"
    old = os.umask(0)
    try:
        files.make_private_dir(target, "state directory", "--state-dir")
    finally:
        os.umask(old)
    for d in (tmp_path / "a", tmp_path / "a" / "b", target):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700


@pytest.mark.parametrize("mode", [0o755, 0o700, 0o1755])
def test_make_private_dir_leaves_an_existing_directory_as_it_is(tmp_path: Path, mode: int) -> None:
    d = tmp_path / "state"
    d.mkdir()
    d.chmod(mode)
    files.make_private_dir(d, "state directory", "--state-dir")
    assert stat.S_IMODE(d.stat().st_mode) == mode


@pytest.mark.parametrize("mode", [0o775, 0o777, 0o1777])
def test_make_private_dir_refuses_a_directory_others_may_write_to(tmp_path: Path, mode: int) -> None:
    d = tmp_path / "state"
    d.mkdir()
    d.chmod(mode)
    with pytest.raises(ConfigError, match=r"other users can write to the state directory .*--state-dir$"):
        files.make_private_dir(d, "state directory", "--state-dir")
    assert stat.S_IMODE(d.stat().st_mode) == mode  # untouched


def test_make_private_dir_refuses_a_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"is not a directory; choose another server.state_dir$"):
        files.make_private_dir(tmp_path / "f", "state directory", "server.state_dir")


@pytest.mark.parametrize(("mode", "ok"), [(0o700, True), (0o755, True), (0o1777, True), (0o777, False)])
def test_a_socket_directory_may_be_shared_only_when_sticky(tmp_path: Path, mode: int, ok: bool) -> None:
    d = tmp_path / "run"
    d.mkdir()
    d.chmod(mode)
    if ok:
        files.check_socket_dir(d, "server.admin_socket")
    else:
        with pytest.raises(ConfigError, match=r"could replace the socket .*another server.admin_socket"):
            files.check_socket_dir(d, "server.admin_socket")
    assert stat.S_IMODE(d.stat().st_mode) == mode
    files.check_socket_dir(tmp_path / "new" / "dir", "--socket")
    assert stat.S_IMODE((tmp_path / "new" / "dir").stat().st_mode) == 0o700
