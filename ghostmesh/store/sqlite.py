"""The embedded SQLite backend of :class:`ghostmesh.store.base.Store`.

- WAL journal (readers never block the writer), ``synchronous=NORMAL`` (durable at checkpoints, the usual
  WAL trade-off), ``foreign_keys=ON`` (SQLite leaves them off unless asked, per connection).
- Every mutation runs in one ``BEGIN IMMEDIATE`` transaction (``_tx``): on any error it rolls back, so a
  failed registration writes nothing.
- Versioned schema: ``schema_version`` holds the number of migrations applied; ``MIGRATIONS`` is the
  ordered list, applied at open, each in its own transaction. A database written by a newer ghostmesh
  (higher version than we know) is refused rather than guessed at.

Calls are synchronous and short (indexed single-row statements); ghostmesh runs them on the event loop
thread, which keeps every mutation ordered with the in-memory state without locks.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from ghostcore.auditchain import GENESIS, AuditRecord
from ghostcore.errors import AuthError, ConfigError, Conflict, NotFound, Unavailable
from ghostmesh.store.base import ApiKeyRec, AuthKeyRec, NodeRec, RouteRec, UserRec

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
)

SCHEMA_VERSION = len(MIGRATIONS)

# Written columns (id is the rowid); _node_row produces values in this order, _node reads "id" + these.
_NODE_COLUMNS = (
    "name", "user", "node_key", "ipv4", "ipv6", "ephemeral", "tags", "created", "expires", "last_seen",
    "endpoints", "hostname", "auth_key_id", "pending_key",
)  # fmt: skip
_NODE_COLS = "id, " + ", ".join(_NODE_COLUMNS)
# Built once from the constant column names above, never from input (hence the S608 waivers).
_INSERT_NODE = (
    f"INSERT INTO nodes ({', '.join(_NODE_COLUMNS)}) VALUES ({', '.join('?' * len(_NODE_COLUMNS))})"  # noqa: S608
)
_UPDATE_NODE = f"UPDATE nodes SET {', '.join(c + ' = ?' for c in _NODE_COLUMNS)} WHERE id = ?"  # noqa: S608
_AUTH_COLS = "id, hash, user, reusable, ephemeral, tags, created, expires, used_count, revoked"
_API_COLS = "id, hash, created, expires, revoked, last_used"
_AUDIT_COLS = "seq, ts_ms, actor, action, target, detail, remote, prev_hash, hash, signature"


def _node(row: sqlite3.Row) -> NodeRec:
    return NodeRec(
        id=int(row[0]),
        name=row[1],
        user=row[2],
        node_key=row[3],
        ipv4=row[4],
        ipv6=row[5],
        ephemeral=bool(row[6]),
        tags=tuple(json.loads(row[7])),
        created=float(row[8]),
        expires=float(row[9]),
        last_seen=float(row[10]),
        endpoints=tuple(json.loads(row[11])),
        hostname=row[12],
        auth_key_id=row[13],
        pending_key=row[14],
    )


def _node_row(rec: NodeRec) -> tuple[object, ...]:
    return (
        rec.name, rec.user, rec.node_key, rec.ipv4, rec.ipv6, int(rec.ephemeral),
        json.dumps(list(rec.tags)), rec.created, rec.expires, rec.last_seen,
        json.dumps(list(rec.endpoints)), rec.hostname, rec.auth_key_id, rec.pending_key,
    )  # fmt: skip


def _auth(row: sqlite3.Row) -> AuthKeyRec:
    return AuthKeyRec(
        id=row[0],
        hash=bytes(row[1]),
        user=row[2],
        reusable=bool(row[3]),
        ephemeral=bool(row[4]),
        tags=tuple(json.loads(row[5])),
        created=float(row[6]),
        expires=float(row[7]),
        used_count=int(row[8]),
        revoked=bool(row[9]),
    )


def _api(row: sqlite3.Row) -> ApiKeyRec:
    return ApiKeyRec(
        id=row[0],
        hash=bytes(row[1]),
        created=float(row[2]),
        expires=float(row[3]),
        revoked=bool(row[4]),
        last_used=float(row[5]),
    )


def _audit(row: sqlite3.Row) -> AuditRecord:
    return AuditRecord(
        seq=int(row[0]),
        ts_ms=int(row[1]),
        actor=row[2],
        action=row[3],
        target=row[4],
        detail=row[5],
        remote=row[6],
        prev_hash=bytes(row[7]),
        hash=bytes(row[8]),
        signature=bytes(row[9]),
    )


def _conflict(exc: sqlite3.IntegrityError, what: str) -> Conflict:
    text = str(exc)
    for col in ("name", "node_key", "ipv4", "ipv6"):
        if text.endswith(f".{col}"):
            return Conflict(f"{what}: {col} is already taken")
    return Conflict(f"{what}: clashes with existing data ({text})")


def _user_rec(row: Sequence[Any]) -> UserRec:
    """A users row selected as (id, name, created, oidc_subject, groups)."""
    return UserRec(int(row[0]), row[1], float(row[2]), row[3], tuple(json.loads(row[4] or "[]")))


class SqliteStore:
    """A :class:`~ghostmesh.store.base.Store` in one SQLite file."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        try:
            # isolation_level=None: we issue BEGIN/COMMIT ourselves (autocommit mode otherwise).
            self._db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise ConfigError(f"database.path: cannot open {self.path}: {exc}") from None
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.execute("PRAGMA busy_timeout=5000")
            self._migrate()
        except sqlite3.DatabaseError as exc:
            self._db.close()
            raise ConfigError(f"database.path: {self.path} is not a usable SQLite database: {exc}") from None
        except ConfigError:
            self._db.close()
            raise

    # -- plumbing --------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            raise Unavailable(f"database {self.path}: {exc}; retry shortly") from None
        try:
            yield self._db
        except sqlite3.OperationalError as exc:
            self._db.execute("ROLLBACK")
            # disk full, locked by another process, I/O error: nothing was written, the caller may retry
            raise Unavailable(f"database {self.path}: {exc}; nothing was written, retry shortly") from None
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        else:
            self._db.execute("COMMIT")

    def schema_version(self) -> int:
        row = self._db.execute("SELECT version FROM schema_version").fetchone()
        return int(row[0]) if row else 0

    def _migrate(self) -> None:
        with self._tx() as db:
            db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            if db.execute("SELECT COUNT(*) FROM schema_version").fetchone()[0] == 0:
                db.execute("INSERT INTO schema_version (version) VALUES (0)")
        current = self.schema_version()
        if current > SCHEMA_VERSION:
            raise ConfigError(
                f"database.path: {self.path} has schema version {current}, newer than this ghostmesh "
                f"supports ({SCHEMA_VERSION}); upgrade ghostmesh or point database.path elsewhere"
            )
        for version in range(current, SCHEMA_VERSION):
            with self._tx() as db:
                # executescript would COMMIT our transaction; run the statements one by one instead.
                for stmt in MIGRATIONS[version].split(";"):
                    if stmt.strip():
                        db.execute(stmt)
                db.execute("UPDATE schema_version SET version = ?", (version + 1,))

    def close(self) -> None:
        self._db.close()

    # -- kv --------------------------------------------------------------------------------------------

    def get_kv(self, key: str) -> bytes | None:
        row = self._db.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
        return bytes(row[0]) if row else None

    def set_kv(self, key: str, value: bytes) -> None:
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO kv (key, value) VALUES (?, ?)", (key, value))

    def set_kv_if_absent(self, key: str, value: bytes) -> bytes:
        with self._tx() as db:
            db.execute("INSERT OR IGNORE INTO kv (key, value) VALUES (?, ?)", (key, value))
            return bytes(db.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()[0])

    # -- users -----------------------------------------------------------------------------------------

    def create_user(self, name: str, now: float) -> UserRec:
        try:
            with self._tx() as db:
                cur = db.execute("INSERT INTO users (name, created) VALUES (?, ?)", (name, now))
        except sqlite3.IntegrityError:
            raise Conflict(f"user {name!r} exists already") from None
        return UserRec(int(cur.lastrowid or 0), name, now)

    def get_user(self, name: str) -> UserRec | None:
        row = self._db.execute(
            "SELECT id, name, created, oidc_subject, groups FROM users WHERE name = ?", (name,)
        ).fetchone()
        return _user_rec(row) if row else None

    def list_users(self) -> Sequence[UserRec]:
        rows = self._db.execute(
            "SELECT id, name, created, oidc_subject, groups FROM users ORDER BY id"
        ).fetchall()
        return [_user_rec(r) for r in rows]

    def user_by_oidc_subject(self, subject: str) -> UserRec | None:
        row = self._db.execute(
            "SELECT id, name, created, oidc_subject, groups FROM users WHERE oidc_subject = ?", (subject,)
        ).fetchone()
        return _user_rec(row) if row else None

    def put_oidc_user(self, name: str, subject: str, groups: Sequence[str], now: float) -> UserRec:
        try:
            with self._tx() as db:
                db.execute("INSERT OR IGNORE INTO users (name, created) VALUES (?, ?)", (name, now))
                db.execute(
                    "UPDATE users SET oidc_subject = ?, groups = ? WHERE name = ?",
                    (subject, json.dumps(sorted(set(groups))), name),
                )
        except sqlite3.IntegrityError:
            raise Conflict(f"OIDC subject of user {name!r} belongs to another user already") from None
        user = self.get_user(name)
        if user is None:  # pragma: no cover - written in the transaction above
            raise NotFound(f"user {name!r} vanished while being written")
        return user

    def delete_user(self, name: str) -> None:
        try:
            with self._tx() as db:
                cur = db.execute("DELETE FROM users WHERE name = ?", (name,))
                if cur.rowcount == 0:
                    raise NotFound(f"user {name!r} not found; see `ghostctl users list`")
        except sqlite3.IntegrityError:
            raise Conflict(f"user {name!r} still owns nodes; delete them first") from None

    # -- auth keys -------------------------------------------------------------------------------------

    def insert_auth_key(self, rec: AuthKeyRec) -> None:
        try:
            with self._tx() as db:
                db.execute(
                    f"INSERT INTO auth_keys ({_AUTH_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",  # noqa: S608
                    (
                        rec.id,
                        rec.hash,
                        rec.user,
                        int(rec.reusable),
                        int(rec.ephemeral),
                        json.dumps(list(rec.tags)),
                        rec.created,
                        rec.expires,
                        rec.used_count,
                        int(rec.revoked),
                    ),
                )
        except sqlite3.IntegrityError as exc:
            raise Conflict(f"auth key {rec.id}: cannot store ({exc})") from None

    def get_auth_key(self, key_id: str) -> AuthKeyRec | None:
        row = self._db.execute(f"SELECT {_AUTH_COLS} FROM auth_keys WHERE id = ?", (key_id,)).fetchone()  # noqa: S608
        return _auth(row) if row else None

    def list_auth_keys(self, user: str | None = None) -> Sequence[AuthKeyRec]:
        if user:
            rows = self._db.execute(
                f"SELECT {_AUTH_COLS} FROM auth_keys WHERE user = ? ORDER BY created, id",  # noqa: S608
                (user,),
            ).fetchall()
        else:
            rows = self._db.execute(f"SELECT {_AUTH_COLS} FROM auth_keys ORDER BY created, id").fetchall()  # noqa: S608
        return [_auth(r) for r in rows]

    def revoke_auth_key(self, key_id: str) -> AuthKeyRec | None:
        with self._tx() as db:
            db.execute("UPDATE auth_keys SET revoked = 1 WHERE id = ?", (key_id,))
        return self.get_auth_key(key_id)

    # -- API keys --------------------------------------------------------------------------------------

    def insert_api_key(self, rec: ApiKeyRec) -> None:
        with self._tx() as db:
            db.execute(
                f"INSERT INTO api_keys ({_API_COLS}) VALUES (?, ?, ?, ?, ?, ?)",  # noqa: S608
                (rec.id, rec.hash, rec.created, rec.expires, int(rec.revoked), rec.last_used),
            )

    def get_api_key(self, key_id: str) -> ApiKeyRec | None:
        row = self._db.execute(f"SELECT {_API_COLS} FROM api_keys WHERE id = ?", (key_id,)).fetchone()  # noqa: S608
        return _api(row) if row else None

    def list_api_keys(self) -> Sequence[ApiKeyRec]:
        rows = self._db.execute(f"SELECT {_API_COLS} FROM api_keys ORDER BY created, id").fetchall()  # noqa: S608
        return [_api(r) for r in rows]

    def revoke_api_key(self, key_id: str) -> ApiKeyRec | None:
        with self._tx() as db:
            db.execute("UPDATE api_keys SET revoked = 1 WHERE id = ?", (key_id,))
        return self.get_api_key(key_id)

    def touch_api_key(self, key_id: str, now: float) -> None:
        with self._tx() as db:
            db.execute("UPDATE api_keys SET last_used = ? WHERE id = ?", (now, key_id))

    # -- nodes -----------------------------------------------------------------------------------------

    def list_nodes(self) -> Sequence[NodeRec]:
        rows = self._db.execute(f"SELECT {_NODE_COLS} FROM nodes ORDER BY id").fetchall()  # noqa: S608
        return [_node(r) for r in rows]

    @staticmethod
    def _consume(db: sqlite3.Connection, key_id: str) -> None:
        # The check and the count in one statement, inside the node's transaction: two racing
        # registrations cannot both spend a single-use key.
        cur = db.execute(
            "UPDATE auth_keys SET used_count = used_count + 1 "
            "WHERE id = ? AND revoked = 0 AND (reusable = 1 OR used_count = 0)",
            (key_id,),
        )
        if cur.rowcount != 1:
            raise AuthError(f"auth key gmauth_{key_id} was revoked or spent meanwhile; create a new one")

    def insert_node(self, rec: NodeRec, consume_auth_key: str | None = None) -> NodeRec:
        try:
            with self._tx() as db:
                if consume_auth_key is not None:
                    self._consume(db, consume_auth_key)
                cur = db.execute(_INSERT_NODE, _node_row(rec))
        except sqlite3.IntegrityError as exc:
            raise _conflict(exc, f"node {rec.name!r}") from None
        return replace(rec, id=int(cur.lastrowid or 0))

    def update_node(self, rec: NodeRec, consume_auth_key: str | None = None) -> None:
        try:
            with self._tx() as db:
                if consume_auth_key is not None:
                    self._consume(db, consume_auth_key)
                cur = db.execute(_UPDATE_NODE, (*_node_row(rec), rec.id))
                if cur.rowcount != 1:
                    raise NotFound(f"node {rec.id} not found")
        except sqlite3.IntegrityError as exc:
            raise _conflict(exc, f"node {rec.name!r}") from None

    def delete_node(self, node_id: int) -> None:
        with self._tx() as db:
            cur = db.execute("DELETE FROM nodes WHERE id = ?", (node_id,))
            if cur.rowcount != 1:
                raise NotFound(f"node {node_id} not found")

    # -- routes ----------------------------------------------------------------------------------------

    def list_routes(self) -> Sequence[RouteRec]:
        rows = self._db.execute(
            "SELECT node_id, prefix, by_node, by_admin, approved FROM routes ORDER BY node_id, prefix"
        ).fetchall()
        return [RouteRec(int(r[0]), r[1], bool(r[2]), bool(r[3]), bool(r[4])) for r in rows]

    def put_routes(self, recs: Sequence[RouteRec], delete: Sequence[tuple[int, str]] = ()) -> None:
        try:
            with self._tx() as db:
                db.executemany("DELETE FROM routes WHERE node_id = ? AND prefix = ?", list(delete))
                db.executemany(
                    "INSERT INTO routes (node_id, prefix, by_node, by_admin, approved) "
                    "VALUES (?, ?, ?, ?, ?) "
                    "ON CONFLICT (node_id, prefix) DO UPDATE SET by_node = excluded.by_node, "
                    "by_admin = excluded.by_admin, approved = excluded.approved",
                    [(r.node_id, r.prefix, int(r.by_node), int(r.by_admin), int(r.approved)) for r in recs],
                )
        except sqlite3.IntegrityError as exc:
            raise _conflict(exc, "route") from None

    # -- audit log -------------------------------------------------------------------------------------

    def append_audit(self, rec: AuditRecord) -> None:
        with self._tx() as db:
            # The link check and the insert in one BEGIN IMMEDIATE transaction: a second writer (another
            # ghostmesh on the same file) cannot slip an entry in between and fork the chain.
            row = db.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
            last_seq, last_hash = (int(row[0]), bytes(row[1])) if row else (0, GENESIS)
            if rec.seq != last_seq + 1 or rec.prev_hash != last_hash:
                raise Conflict(
                    f"audit entry {rec.seq}: the log ends at seq {last_seq} with another hash; "
                    "reload the last entry and seal again"
                )
            db.execute(
                f"INSERT INTO audit ({_AUDIT_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",  # noqa: S608
                (rec.seq, rec.ts_ms, rec.actor, rec.action, rec.target, rec.detail, rec.remote,
                 rec.prev_hash, rec.hash, rec.signature),
            )  # fmt: skip

    def list_audit(self, after_seq: int = 0, limit: int = 0) -> Sequence[AuditRecord]:
        rows = self._db.execute(
            f"SELECT {_AUDIT_COLS} FROM audit WHERE seq > ? ORDER BY seq LIMIT ?",  # noqa: S608
            (after_seq, limit if limit > 0 else -1),  # LIMIT -1: no limit in SQLite
        ).fetchall()
        return [_audit(r) for r in rows]

    def last_audit(self) -> AuditRecord | None:
        row = self._db.execute(
            f"SELECT {_AUDIT_COLS} FROM audit ORDER BY seq DESC LIMIT 1"  # noqa: S608
        ).fetchone()
        return _audit(row) if row else None
