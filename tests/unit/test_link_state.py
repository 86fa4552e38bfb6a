"""The state directory: modes, key created once, nothing written before a successful registration."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from ghostcore.errors import ConfigError
from ghostcore.keys import PrivateKey
from ghostlink.state import SavedNode, StateDir

SERVER_KEY = PrivateKey.generate().public_key().base64()


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_key_for_join_writes_nothing(tmp_path: Path) -> None:
    d = tmp_path / "state"
    StateDir(d).key_for_join()
    assert not d.exists(), "a join that has not registered yet writes nothing"


def test_save_modes_and_reload(tmp_path: Path) -> None:
    d = StateDir(tmp_path / "state")
    key = d.key_for_join()
    d.save(key, SavedNode("127.0.0.1:7777", SERVER_KEY, 3, "n3"))
    assert mode(d.path) == 0o700
    assert mode(d.key_path) == 0o600
    assert mode(d.node_path) == 0o600
    assert json.loads(d.node_path.read_text()) == {
        "server": "127.0.0.1:7777",
        "server_key": SERVER_KEY,
        "node_id": 3,
        "name": "n3",
    }
    key2, node = d.load()
    assert key2.public_key() == key.public_key()
    assert node.name == "n3"
    assert sorted(p.name for p in d.path.iterdir()) == ["node.json", "node.key"], "no temp files left"


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
