"""What is SQLite's own in its store: migrations of old schemas, pragmas, file modes, a commit failing on a
deferred key, a locked file, secrets deleted from the files. What every backend must do (uniqueness,
auth-key consumption, joined transactions) is tested on SQLite and PostgreSQL in
tests/component/test_store_contract.py."""

from __future__ import annotations

import os
import sqlite3
import stat
from pathlib import Path

import pytest

from ghostcore.errors import ConfigError, Conflict, NotFound, Unavailable
from ghostmesh.store.base import CommitFailed, RouteRec, UserRec
from ghostmesh.store.sqlite import MIGRATIONS, SCHEMA_VERSION, SqliteStore
from tests.component._store_fixtures import auth_key_rec, node_rec


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
    n = s.insert_node(node_rec())
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


def _files(path: Path) -> bytes:
    return b"".join(p.read_bytes() for p in path.parent.glob(path.name + "*"))


def test_delete_secret_leaves_no_copy_in_the_files(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    s = SqliteStore(path)
    secret = bytes(range(1, 33)) * 2
    s.set_kv("audit_private_key", secret)
    s.set_kv("acl_policy", b"kept")
    s._db.execute("PRAGMA wal_checkpoint(PASSIVE)")  # a copy in the database file too, not only the WAL
    assert secret in _files(path)
    s.delete_secret("audit_private_key")
    assert s.get_kv("audit_private_key") is None
    assert s.get_kv("acl_policy") == b"kept"
    assert secret not in _files(path)
    s.close()


def test_commits_are_synchronous_full(tmp_path: Path) -> None:
    s = SqliteStore(tmp_path / "db.sqlite")
    assert s._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL: the WAL is fsynced per commit
    s.close()


@pytest.mark.parametrize("dir_mode", [0o755, 0o777])
def test_database_wal_and_shm_are_born_private(tmp_path: Path, dir_mode: int) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=dir_mode)
    state.chmod(dir_mode)
    old = os.umask(0o022)
    try:
        s = SqliteStore(state / "ghostmesh.db")
        s.create_user("default", 1.0)
    finally:
        os.umask(old)
    names = sorted(p.name for p in state.iterdir())
    assert names == ["ghostmesh.db", "ghostmesh.db-shm", "ghostmesh.db-wal"]
    assert {stat.S_IMODE((state / n).stat().st_mode) for n in names} == {0o600}
    assert stat.S_IMODE(state.stat().st_mode) == dir_mode  # the directory is not ghostmesh's to change
    s.close()


def test_database_files_left_readable_are_made_private_at_open(tmp_path: Path) -> None:
    path = tmp_path / "ghostmesh.db"
    s = SqliteStore(path)
    s.create_user("default", 1.0)
    other = sqlite3.connect(path)  # keeps the -wal and -shm files while the store closes
    other.execute("SELECT 1 FROM users").fetchall()
    s.close()
    sidecars = [path, path.with_name("ghostmesh.db-wal"), path.with_name("ghostmesh.db-shm")]
    for p in sidecars:
        p.chmod(0o644)
    s = SqliteStore(path)
    assert [stat.S_IMODE(p.stat().st_mode) for p in sidecars] == [0o600] * 3
    assert [u.name for u in s.list_users()] == ["default"]
    other.close()
    s.close()


def test_a_failed_commit_is_commit_failed_and_writes_nothing(store: SqliteStore) -> None:
    def lost_at_commit() -> None:
        with store.transaction():
            store._db.execute("PRAGMA defer_foreign_keys=ON")  # the missing node is noticed at COMMIT
            store.set_kv("k", b"v")
            store.put_routes([RouteRec(99, "10.0.0.0/8", by_node=True)])

    with pytest.raises(CommitFailed, match="commit failed"):
        lost_at_commit()
    assert store.get_kv("k") is None
    assert store.list_routes() == []
    assert not store._db.in_transaction


def test_record_repr_hides_hash() -> None:
    assert "hash" not in repr(auth_key_rec())


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


def _database_at(path: Path, version: int) -> sqlite3.Connection:
    """A database as an earlier ghostmesh left it: the first ``version`` migrations applied."""
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    db.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))
    for script in MIGRATIONS[:version]:
        db.executescript(script)
    return db


def test_migration_4_keeps_rows_of_a_version_3_database(tmp_path: Path) -> None:
    """A database written before node-key signing: its nodes gain empty signatures and no pending age."""
    path = tmp_path / "db.sqlite"
    db = _database_at(path, 3)
    db.execute("INSERT INTO users (name, created) VALUES ('default', 1)")
    db.execute(
        "INSERT INTO nodes (name, user, node_key, ipv4, ipv6, ephemeral, created, expires, pending_key) "
        "VALUES ('a', 'default', 'k1', '100.64.0.1', 'fd7a:115c:a1e0::1', 0, 1, 0, 'k2')"
    )
    db.commit()
    db.close()
    s = SqliteStore(path)
    assert s.schema_version() == SCHEMA_VERSION >= 4
    (node,) = s.list_nodes()
    assert (node.pending_key, node.pending_since, node.key_signature, node.pending_signature) == (
        "k2",
        0.0,
        b"",
        b"",
    )
    assert s.list_lock() == []
    s.close()


def test_migration_5_binds_users_by_issuer_and_subject(tmp_path: Path) -> None:
    """A database of schema 4 (a user's OIDC binding was its sub alone): the binding is kept with issuer
    "" (the state adopts it for the configured issuer), and from then on a sub is unique per issuer."""
    path = tmp_path / "db.sqlite"
    db = _database_at(path, 4)
    db.execute(
        "INSERT INTO users (name, created, oidc_subject, groups) VALUES ('alice', 1, 's1', '[\"eng\"]')"
    )
    db.commit()
    db.close()
    s = SqliteStore(path)
    assert s.schema_version() == SCHEMA_VERSION >= 5
    assert s.list_users() == [UserRec(1, "alice", 1.0, "s1", ("eng",), "")]
    assert s.adopt_oidc_issuer("https://a.example") == 1
    assert s.user_by_oidc_identity("https://a.example", "s1") == UserRec(
        1, "alice", 1.0, "s1", ("eng",), "https://a.example"
    )
    s.put_oidc_user("bob", "https://b.example", "s1", [], 2.0)  # the same sub at another issuer
    with pytest.raises(Conflict, match="belongs to another user"):
        s.put_oidc_user("carol", "https://a.example", "s1", [], 3.0)
    s.create_user("carol", 3.0)
    with pytest.raises(Conflict, match="bound to another user already; 'carol' was not bound"):
        s.set_oidc_identity("carol", "https://b.example", "s1")
    assert s.set_oidc_identity("alice", "", None) == UserRec(1, "alice", 1.0, None, (), "")
    with pytest.raises(NotFound):
        s.set_oidc_identity("nobody", "", None)
    s.close()


def test_migration_6_makes_every_existing_node_a_node_not_a_device(tmp_path: Path) -> None:
    """A database of schema 5 (before devices): its nodes gain ``via`` 0 and keep everything else."""
    path = tmp_path / "db.sqlite"
    db = _database_at(path, 5)
    db.execute("INSERT INTO users (name, created) VALUES ('default', 1)")
    db.execute(
        "INSERT INTO nodes (name, user, node_key, ipv4, ipv6, ephemeral, created, expires, key_signature) "
        "VALUES ('a', 'default', 'k1', '100.64.0.1', 'fd7a:115c:a1e0::1', 0, 1, 0, x'00ff')"
    )
    db.commit()
    db.close()
    s = SqliteStore(path)
    assert s.schema_version() == SCHEMA_VERSION >= 6
    (node,) = s.list_nodes()
    assert (node.name, node.node_key, node.key_signature, node.via) == ("a", "k1", b"\x00\xff", 0)
    s.close()
