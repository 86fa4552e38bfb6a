"""The embedded SQLite backend of :class:`ghostmesh.store.base.Store`.

- WAL journal (readers never block the writer), ``synchronous=FULL`` (the WAL is fsynced at every
  commit: a change acknowledged to a node survives a power loss, not only a crash), ``foreign_keys=ON``
  (SQLite leaves them off unless asked, per connection).
- The database, its ``-wal`` and its ``-shm`` are private (0600) whatever the directory's mode and the
  umask: the file is created 0600 before SQLite opens it, SQLite gives its sidecar files the database's
  mode, they are opened under a 0077 umask anyway, and files left with other modes are chmodded at open.
- Every mutation runs in one ``BEGIN IMMEDIATE`` transaction (the writer lock taken at BEGIN, so two
  ghostmesh processes on one file serialise): on any error it rolls back, so a failed registration
  writes nothing. Inside :meth:`SqliteStore.transaction` mutations join the open transaction instead
  (SQLite's own ``in_transaction`` says whether one is open), so a caller can make several of them, and
  the audit row describing them, one commit. The statements and the transaction logic are shared with
  the PostgreSQL backend (:mod:`ghostmesh.store.sql`); this module holds what is SQLite's own.
- Versioned schema: ``schema_version`` holds the number of migrations applied; ``MIGRATIONS`` is the
  ordered list, applied at open, each in its own transaction. A database written by a newer ghostmesh
  (higher version than we know) is refused rather than guessed at.

Calls are synchronous and short (indexed single-row statements); ghostmesh runs them on the event loop
thread, which keeps every mutation ordered with the in-memory state without locks.

The schema lives here: the SQL of every table and every migration of one backend belong together (a
schema change touches this list, :mod:`ghostmesh.store.postgres`'s, and the shared statements).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Sequence
from pathlib import Path

from ghostcore.errors import ConfigError, GhostError
from ghostcore.files import PRIVATE, umask
from ghostmesh.store.sql import UNIQUE_NODE_COLUMNS, SqlStore

# Ordered: MIGRATIONS[i] takes the schema from version i to i + 1. Never edit a shipped entry; append.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE users (
        id      INTEGER PRIMARY KEY AUTOINCREMENT,
        name    TEXT NOT NULL UNIQUE,
        created REAL NOT NULL
    );
    CREATE TABLE auth_keys (
        id         TEXT PRIMARY KEY,
        hash       BLOB NOT NULL,
        user       TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
        reusable   INTEGER NOT NULL,
        ephemeral  INTEGER NOT NULL,
        tags       TEXT NOT NULL DEFAULT '[]',
        created    REAL NOT NULL,
        expires    REAL NOT NULL,
        used_count INTEGER NOT NULL DEFAULT 0,
        revoked    INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE api_keys (
        id        TEXT PRIMARY KEY,
        hash      BLOB NOT NULL,
        created   REAL NOT NULL,
        expires   REAL NOT NULL,
        revoked   INTEGER NOT NULL DEFAULT 0,
        last_used REAL NOT NULL DEFAULT 0
    );
    CREATE TABLE nodes (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,
        name        TEXT NOT NULL UNIQUE,
        user        TEXT NOT NULL REFERENCES users(name) ON DELETE RESTRICT,
        node_key    TEXT NOT NULL UNIQUE,
        ipv4        TEXT NOT NULL UNIQUE,
        ipv6        TEXT NOT NULL UNIQUE,
        ephemeral   INTEGER NOT NULL,
        tags        TEXT NOT NULL DEFAULT '[]',
        created     REAL NOT NULL,
        expires     REAL NOT NULL,
        last_seen   REAL NOT NULL DEFAULT 0,
        endpoints   TEXT NOT NULL DEFAULT '[]',
        hostname    TEXT NOT NULL DEFAULT '',
        auth_key_id TEXT REFERENCES auth_keys(id) ON DELETE SET NULL
    );
    CREATE INDEX nodes_user ON nodes(user);
    CREATE INDEX auth_keys_user ON auth_keys(user);
    CREATE TABLE kv (
        key   TEXT PRIMARY KEY,
        value BLOB NOT NULL
    );
    """,
    # 2: key rotation (a node's proven-but-not-yet-switched key) and the signed audit log.
    """
    ALTER TABLE nodes ADD COLUMN pending_key TEXT;
    CREATE UNIQUE INDEX nodes_pending_key ON nodes(pending_key) WHERE pending_key IS NOT NULL;
    CREATE TABLE audit (
        seq       INTEGER PRIMARY KEY,
        ts_ms     INTEGER NOT NULL,
        actor     TEXT NOT NULL,
        action    TEXT NOT NULL,
        target    TEXT NOT NULL,
        detail    TEXT NOT NULL,
        remote    TEXT NOT NULL,
        prev_hash BLOB NOT NULL,
        hash      BLOB NOT NULL,
        signature BLOB NOT NULL
    );
    """,
    # 3: subnet routes / exit nodes, and the user's OIDC groups (for policy groups).
    """
    CREATE TABLE routes (
        node_id        INTEGER NOT NULL REFERENCES nodes(id) ON DELETE CASCADE,
        prefix         TEXT NOT NULL,
        by_node        INTEGER NOT NULL DEFAULT 0,
        by_admin       INTEGER NOT NULL DEFAULT 0,
        approved       INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (node_id, prefix)
    );
    ALTER TABLE users ADD COLUMN oidc_subject TEXT;
    ALTER TABLE users ADD COLUMN groups TEXT NOT NULL DEFAULT '[]';
    CREATE UNIQUE INDEX users_oidc_subject ON users(oidc_subject) WHERE oidc_subject IS NOT NULL;
    """,
    # 4: when a pending key was stored (a pending rotation is not overwritten while young), node-key
    # signatures, and the lock log they are checked against.
    """
    ALTER TABLE nodes ADD COLUMN pending_since REAL NOT NULL DEFAULT 0;
    ALTER TABLE nodes ADD COLUMN key_signature BLOB NOT NULL DEFAULT x'';
    ALTER TABLE nodes ADD COLUMN pending_signature BLOB NOT NULL DEFAULT x'';
    CREATE TABLE lock_log (
        seq          INTEGER PRIMARY KEY,
        update_bytes BLOB NOT NULL
    );
    """,
    # 5: a user is bound to an OIDC account by (issuer, subject): a ``sub`` is unique only within its
    # issuer (OpenID Connect Core 1.0 section 2). Bindings made before have issuer "" until the state
    # adopts them for the configured issuer (State.__init__).
    """
    ALTER TABLE users ADD COLUMN oidc_issuer TEXT NOT NULL DEFAULT '';
    DROP INDEX users_oidc_subject;
    CREATE UNIQUE INDEX users_oidc_identity ON users(oidc_issuer, oidc_subject)
        WHERE oidc_subject IS NOT NULL;
    """,
    # 6: devices (a static WireGuard peer behind a gateway node): the gateway's id, 0 for a node.
    """
    ALTER TABLE nodes ADD COLUMN via INTEGER NOT NULL DEFAULT 0;
    """,
)

SCHEMA_VERSION = len(MIGRATIONS)


def _make_private(path: Path) -> None:
    """The database file created 0600 if missing; it and its sidecars chmodded to 0600 if not."""
    os.close(os.open(path, os.O_RDWR | os.O_CREAT, PRIVATE))
    for p in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        with contextlib.suppress(FileNotFoundError):
            if p.stat().st_mode & 0o777 != PRIVATE:
                os.chmod(p, PRIVATE)


class SqliteStore(SqlStore):
    """A :class:`~ghostmesh.store.base.Store` in one SQLite file."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        super().__init__(f"database {self.path}")
        with umask(0o077):  # the -wal and -shm SQLite creates below are born private too
            try:
                _make_private(self.path)
                # isolation_level=None: we issue BEGIN/COMMIT ourselves (autocommit mode otherwise).
                self._db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
            except (OSError, sqlite3.Error) as exc:
                raise ConfigError(f"database.path: cannot open {self.path}: {exc}") from None
            try:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=FULL")
                self._db.execute("PRAGMA foreign_keys=ON")
                self._db.execute("PRAGMA busy_timeout=5000")
                self._migrate()
            except sqlite3.DatabaseError as exc:
                self._db.close()
                raise ConfigError(
                    f"database.path: {self.path} is not a usable SQLite database: {exc}"
                ) from None
            except GhostError:
                self._db.close()
                raise

    # -- the connection hooks of SqlStore -------------------------------------------------------------

    _integrity_errors = (sqlite3.IntegrityError,)
    _transient_errors = (sqlite3.OperationalError,)  # disk full, locked by another process, I/O error
    _commit_errors = (sqlite3.Error,)

    def _execute(self, sql: str, params: Sequence[object] = ()) -> sqlite3.Cursor:
        return self._db.execute(sql, params)

    def _executemany(self, sql: str, rows: Sequence[Sequence[object]]) -> None:
        self._db.executemany(sql, rows)

    def _in_transaction(self) -> bool:
        return self._db.in_transaction

    def _begin(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")  # the writer lock now, not at the first write

    def _commit(self) -> None:
        self._db.execute("COMMIT")

    def _rollback(self) -> None:
        # Some errors (disk full, I/O) make SQLite roll the transaction back itself.
        if self._db.in_transaction:
            self._db.execute("ROLLBACK")

    def _unique_column(self, exc: Exception) -> str | None:
        text = str(exc)  # "UNIQUE constraint failed: nodes.name"
        return next((c for c in UNIQUE_NODE_COLUMNS if text.endswith(f".{c}")), None)

    # -- schema ----------------------------------------------------------------------------------------

    def schema_version(self) -> int:
        row = self._db.execute("SELECT version FROM schema_version").fetchone()
        return int(row[0]) if row else 0

    def _migrate(self) -> None:
        with self.transaction():
            self._db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            if self._db.execute("SELECT COUNT(*) FROM schema_version").fetchone()[0] == 0:
                self._db.execute("INSERT INTO schema_version (version) VALUES (0)")
        current = self.schema_version()
        if current > SCHEMA_VERSION:
            raise ConfigError(
                f"database.path: {self.path} has schema version {current}, newer than this ghostmesh "
                f"supports ({SCHEMA_VERSION}); upgrade ghostmesh or point database.path elsewhere"
            )
        for version in range(current, SCHEMA_VERSION):
            with self.transaction():
                # executescript would COMMIT our transaction; run the statements one by one instead.
                for stmt in MIGRATIONS[version].split(";"):
                    if stmt.strip():
                        self._db.execute(stmt)
                self._db.execute("UPDATE schema_version SET version = ?", (version + 1,))

    def close(self) -> None:
        self._db.close()

    # -- secrets ---------------------------------------------------------------------------------------

    def delete_secret(self, key: str) -> None:
        # secure_delete zeroes the freed bytes in the page, and a TRUNCATE checkpoint writes that page
        # over the database file's copy and empties the WAL, which held the earlier versions.
        self._db.execute("PRAGMA secure_delete=ON")
        try:
            with self.transaction():
                self._db.execute("DELETE FROM kv WHERE key = ?", (key,))
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            self._db.execute("PRAGMA secure_delete=OFF")
