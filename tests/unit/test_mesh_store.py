"""SQLite store: migrations, pragmas, transactions, uniqueness, auth-key consumption."""

from __future__ import annotations

import sqlite3
from dataclasses import replace
from pathlib import Path

import pytest

from ghostcore.errors import AuthError, ConfigError, Conflict, NotFound, Unavailable
from ghostmesh.state import hash_secret
from ghostmesh.store.base import AuthKeyRec, NodeRec
from ghostmesh.store.sqlite import SCHEMA_VERSION, SqliteStore


def _node(name: str = "a", key: str = "k1", v4: str = "100.64.0.1", v6: str = "fd7a:115c:a1e0::1") -> NodeRec:
    return NodeRec(
        id=0,
        name=name,
        user="default",
        node_key=key,
        ipv4=v4,
        ipv6=v6,
        ephemeral=False,
        tags=("tag:x",),
        created=1.0,
        expires=0.0,
        last_seen=1.0,
        endpoints=("1.2.3.4:5",),
        hostname=name,
        auth_key_id=None,
    )


def _key(key_id: str = "aaaaaaaaaaaa", *, reusable: bool = False) -> AuthKeyRec:
    return AuthKeyRec(
        id=key_id, hash=hash_secret("s"), user="default", reusable=reusable, created=1.0, expires=100.0
    )


@pytest.fixture
def store(tmp_path: Path) -> SqliteStore:
    s = SqliteStore(tmp_path / "db.sqlite")
    s.create_user("default", 1.0)
    return s


def test_fresh_db_is_migrated_with_wal_and_foreign_keys(tmp_path: Path) -> None:
    s = SqliteStore(tmp_path / "db.sqlite")
    assert s.schema_version() == SCHEMA_VERSION
    assert s._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert s._db.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    tables = {r[0] for r in s._db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"users", "auth_keys", "api_keys", "nodes", "kv", "schema_version"} <= tables
    s.close()


def test_reopen_is_idempotent_and_keeps_data(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    s = SqliteStore(path)
    s.create_user("default", 1.0)
    n = s.insert_node(_node())
    s.set_kv("k", b"v")
    s.close()
    for _ in range(2):
        s = SqliteStore(path)
        assert s.schema_version() == SCHEMA_VERSION
        assert s._db.execute("SELECT COUNT(*) FROM schema_version").fetchone()[0] == 1
        assert [x.id for x in s.list_nodes()] == [n.id]
        assert s.list_nodes()[0] == n
        assert s.get_kv("k") == b"v"
        s.close()


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    SqliteStore(path).close()
    db = sqlite3.connect(path)
    db.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 5,))
    db.commit()
    db.close()
    with pytest.raises(ConfigError, match=r"schema version \d+, newer than this ghostmesh supports"):
        SqliteStore(path)


def test_not_a_database_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(ConfigError, match="not a usable SQLite database"):
        SqliteStore(path)


def test_uniqueness_is_enforced(store: SqliteStore) -> None:
    store.insert_node(_node())
    with pytest.raises(Conflict, match="name is already taken"):
        store.insert_node(_node(key="k2", v4="100.64.0.2", v6="fd7a:115c:a1e0::2"))
    with pytest.raises(Conflict, match="node_key"):
        store.insert_node(_node(name="b", v4="100.64.0.2", v6="fd7a:115c:a1e0::2"))
    with pytest.raises(Conflict, match="ipv4"):
        store.insert_node(_node(name="b", key="k2", v6="fd7a:115c:a1e0::2"))
    assert len(store.list_nodes()) == 1


def test_single_use_key_consumed_once_and_failure_writes_nothing(store: SqliteStore) -> None:
    store.insert_auth_key(_key())
    store.insert_node(_node(), consume_auth_key="aaaaaaaaaaaa")
    assert store.get_auth_key("aaaaaaaaaaaa").used_count == 1  # type: ignore[union-attr]
    with pytest.raises(AuthError, match="spent"):
        store.insert_node(
            _node(name="b", key="k2", v4="100.64.0.2", v6="fd7a:115c:a1e0::2"),
            consume_auth_key="aaaaaaaaaaaa",
        )
    assert [n.name for n in store.list_nodes()] == ["a"]
    assert store.get_auth_key("aaaaaaaaaaaa").used_count == 1  # type: ignore[union-attr]


def test_conflict_rolls_back_key_consumption(store: SqliteStore) -> None:
    store.insert_auth_key(_key(reusable=True))
    store.insert_node(_node())
    with pytest.raises(Conflict):
        store.insert_node(
            _node(key="k2", v4="100.64.0.2", v6="fd7a:115c:a1e0::2"), consume_auth_key="aaaaaaaaaaaa"
        )
    assert store.get_auth_key("aaaaaaaaaaaa").used_count == 0  # type: ignore[union-attr]


def test_revoked_key_cannot_be_consumed(store: SqliteStore) -> None:
    store.insert_auth_key(_key(reusable=True))
    rec = store.revoke_auth_key("aaaaaaaaaaaa")
    assert rec is not None
    assert rec.revoked
    with pytest.raises(AuthError):
        store.insert_node(_node(), consume_auth_key="aaaaaaaaaaaa")
    assert store.list_nodes() == []


def test_delete_user_with_nodes_conflicts_and_cascades_keys(store: SqliteStore) -> None:
    store.insert_auth_key(_key())
    n = store.insert_node(_node())
    with pytest.raises(Conflict, match="still owns nodes"):
        store.delete_user("default")
    store.delete_node(n.id)
    store.delete_user("default")
    assert store.list_auth_keys() == []
    with pytest.raises(NotFound):
        store.delete_user("default")


def test_update_and_delete_node(store: SqliteStore) -> None:
    n = store.insert_node(_node())
    store.update_node(replace(n, name="renamed", endpoints=("[::1]:5",)))
    assert store.list_nodes()[0].name == "renamed"
    assert store.list_nodes()[0].endpoints == ("[::1]:5",)
    store.delete_node(n.id)
    with pytest.raises(NotFound):
        store.delete_node(n.id)
    with pytest.raises(NotFound):
        store.update_node(n)


def test_kv_set_if_absent(store: SqliteStore) -> None:
    assert store.set_kv_if_absent("server", b"one") == b"one"
    assert store.set_kv_if_absent("server", b"two") == b"one"


def test_record_repr_hides_hash() -> None:
    assert "hash" not in repr(_key())


def test_locked_database_is_unavailable_and_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    s = SqliteStore(path)
    s._db.execute("PRAGMA busy_timeout=0")  # fail at once instead of waiting 5 s for the lock
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another writer holds the lock
    with pytest.raises(Unavailable, match="retry shortly"):
        s.create_user("default", 1.0)
    other.execute("ROLLBACK")
    other.close()
    assert s.list_users() == []
    s.create_user("default", 1.0)
    assert [u.name for u in s.list_users()] == ["default"]
