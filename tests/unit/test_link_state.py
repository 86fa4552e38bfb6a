"""The state directory: modes, key created once, nothing written before a successful registration; every
write or removal durable (its directory fsynced after it); never a chmod of a directory it did not make."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from ghostcore.errors import ConfigError
from ghostcore.keys import PrivateKey
from ghostcore.lock import SigningKey
from ghostlink.hostjournal import HostJournal, Origin
from ghostlink.state import SavedNode, StateDir

SERVER_KEY = PrivateKey.generate().public_key().base64()


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_key_for_join_writes_nothing(tmp_path: Path) -> None:
    d = tmp_path / "state"
    StateDir(d).key_for_join()
    assert not d.exists(), "a join that has not registered yet writes nothing"


PIN = "sha256:" + "A" * 43


def test_save_modes_and_reload(tmp_path: Path) -> None:
    d = StateDir(tmp_path / "state")
    key = d.key_for_join()
    rotation = SigningKey.generate()
    d.save(
        key, SavedNode("127.0.0.1:7777", SERVER_KEY, 3, "n3", server_pin=PIN, lock_anchor="ab" * 32), rotation
    )
    assert mode(d.path) == 0o700
    assert mode(d.key_path) == 0o600
    assert mode(d.node_path) == 0o600
    assert mode(d.rotation_path) == 0o600
    assert json.loads(d.node_path.read_text()) == {
        "server": "127.0.0.1:7777",
        "server_key": SERVER_KEY,
        "server_pin": PIN,
        "node_id": 3,
        "name": "n3",
        "lock_anchor": "ab" * 32,
    }
    key2, node = d.load()
    assert key2.public_key() == key.public_key()
    assert (node.name, node.server_pin) == ("n3", PIN)
    assert d.rotation_key().public() == rotation.public()
    assert sorted(p.name for p in d.path.iterdir()) == ["node.json", "node.key", "rotation.key"], (
        "no temp files"
    )


def test_rotation_key_made_for_an_older_state_dir_and_kept(tmp_path: Path) -> None:
    d = StateDir(tmp_path / "state")
    d.save(d.key_for_join(), SavedNode("a:1", SERVER_KEY, 1, "x"))
    assert d.existing_rotation_key() is None
    first = d.rotation_key()
    assert mode(d.rotation_path) == 0o600
    assert d.rotation_key().public() == first.public()


def test_lock_log_round_trip_and_corrupt(tmp_path: Path) -> None:
    d = StateDir(tmp_path / "state")
    d.save(d.key_for_join(), SavedNode("a:1", SERVER_KEY, 1, "x"))
    assert d.lock_log() == ()
    d.save_lock_log((b"\x01\x02", b"\x03"))
    assert d.lock_log() == (b"\x01\x02", b"\x03")
    assert mode(d.path / "lock.json") == 0o600
    (d.path / "lock.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"lock\.json"):
        d.lock_log()


def test_a_bad_saved_pin_is_refused(tmp_path: Path) -> None:
    d = StateDir(tmp_path / "state")
    d.save(d.key_for_join(), SavedNode("a:1", SERVER_KEY, 1, "x", server_pin="sha256:short"))
    with pytest.raises(ConfigError, match="malformed"):
        d.load()


def test_key_created_once(tmp_path: Path) -> None:
    d = StateDir(tmp_path / "state")
    key = d.key_for_join()
    d.save(key, SavedNode("a:1", SERVER_KEY, 1, "x"))
    assert d.key_for_join().public_key() == key.public_key(), "a re-join keeps the node's identity"
    with pytest.raises(ConfigError, match="different key"):
        d.save(PrivateKey.generate(), SavedNode("a:1", SERVER_KEY, 1, "x"))


def test_load_without_join_and_corrupt(tmp_path: Path) -> None:
    d = StateDir(tmp_path / "state")
    with pytest.raises(ConfigError, match="ghostlink join"):
        d.load()
    d.path.mkdir()
    d.key_path.write_text("garbage")
    with pytest.raises(ConfigError, match="not a valid WireGuard private key") as exc:
        d.load()
    assert "garbage" not in str(exc.value)


def test_key_never_in_errors_or_repr(tmp_path: Path) -> None:
    d = StateDir(tmp_path / "state")
    key = d.key_for_join()
    d.save(key, SavedNode("a:1", SERVER_KEY, 1, "x"))
    d.node_path.write_text("{")
    with pytest.raises(ConfigError) as exc:
        d.load()
    assert key.base64() not in str(exc.value)
    assert key.base64() not in repr(key)


@pytest.fixture
def dir_syncs(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Every rename, unlink and directory fsync, in order: (what, the inode of the directory)."""
    events: list[tuple[str, str]] = []
    real_fsync, real_replace, real_unlink = os.fsync, os.replace, os.unlink

    def fsync(fd: int) -> None:
        real_fsync(fd)
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            events.append(("fsync-dir", str(st.st_ino)))

    def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        real_replace(src, dst)
        events.append(("rename", str(Path(dst).parent.stat().st_ino)))

    def unlink(path: str | os.PathLike[str], *, dir_fd: int | None = None) -> None:
        real_unlink(path, dir_fd=dir_fd)
        events.append(("unlink", str(Path(path).parent.stat().st_ino)))

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "unlink", unlink)
    return events


def assert_each_change_synced(events: list[tuple[str, str]]) -> None:
    """Every rename or unlink is followed by an fsync of its directory before the next change."""
    changes = [i for i, (what, _) in enumerate(events) if what in ("rename", "unlink")]
    assert changes, "something was written"
    for i in changes:
        assert events[i + 1 : i + 2] == [("fsync-dir", events[i][1])], f"no directory fsync after {events[i]}"


def test_every_write_and_removal_in_the_state_dir_syncs_the_directory(
    tmp_path: Path, dir_syncs: list[tuple[str, str]]
) -> None:
    d = StateDir(tmp_path / "state")
    d.save(d.key_for_join(), SavedNode("a:1", SERVER_KEY, 1, "x"), SigningKey.generate())
    d.save_lock_log((b"\x01",))
    new = PrivateKey.generate()
    d.save_pending(new)
    d.commit_key(new, 1.0)  # node.key, node.json, then node.key.pending removed
    d.save_pending(PrivateKey.generate())
    d.discard_pending()
    journal = HostJournal(d.journal_path, "gl0", Origin("boot", "net:[1]"))
    journal.record_nft_table("ghostlink_gl0")
    journal.record_nft_table("")  # the last entry forgotten: the file removed
    assert [what for what, _ in dir_syncs].count("unlink") == 3
    assert_each_change_synced(dir_syncs)


def test_an_existing_shared_directory_is_refused_never_chmodded(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)  # noqa: S103 - shared, as /tmp is
    d = StateDir(shared)
    with pytest.raises(ConfigError) as err:
        d.save(d.key_for_join(), SavedNode("a:1", SERVER_KEY, 1, "x"))
    assert str(err.value) == (
        f"{shared}: other users can write to the state directory (mode 1777, owner uid {os.geteuid()}); "
        "make it root's and not group/world-writable (chmod go-w) or choose another --state-dir"
    )
    assert mode(shared) == 0o1777
    assert list(shared.iterdir()) == [], "nothing written"
    kept = tmp_path / "kept"
    kept.mkdir(mode=0o755)
    StateDir(kept).save(StateDir(kept).key_for_join(), SavedNode("a:1", SERVER_KEY, 1, "x"))
    assert mode(kept) == 0o755, "a directory only root can write to is used as it is"


def test_missing_directories_are_created_0700(tmp_path: Path) -> None:
    d = StateDir(tmp_path / "var" / "lib" / "ghostlink")
    d.save(d.key_for_join(), SavedNode("a:1", SERVER_KEY, 1, "x"))
    assert [mode(p) for p in (tmp_path / "var", tmp_path / "var" / "lib", d.path)] == [0o700] * 3
