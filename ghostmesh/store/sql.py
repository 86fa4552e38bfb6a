"""What the SQL backends of :class:`ghostmesh.store.base.Store` share: every statement, the row <-> record
mapping and the transaction logic, written once in the SQL that SQLite (3.35+) and PostgreSQL both speak.

A backend (:mod:`ghostmesh.store.sqlite`, :mod:`ghostmesh.store.postgres`) subclasses :class:`SqlStore`
and supplies the connection: how to run a statement, begin, commit and roll back, whether a transaction
is open, which driver errors mean "a constraint refused it" and "the database is unreachable or busy",
and which column a uniqueness error names. It also owns its schema (DDL differs: types, identity
columns), its migrations and :meth:`Store.delete_secret`, whose promise depends on the engine's files.

The common dialect, and why each choice is portable:

- ``?`` placeholders (sqlite3's paramstyle; the PostgreSQL backend rewrites them to ``%s``);
- ``"user"`` quoted: ``user`` is a reserved word in PostgreSQL, a plain name in SQLite;
- flags compared with ``TRUE`` / ``FALSE`` and passed as Python ``bool``: PostgreSQL stores ``BOOLEAN``,
  SQLite stores the 0 / 1 integers its rows always held (it reads ``TRUE`` as 1 since 3.23);
- ``INSERT ... ON CONFLICT`` and ``RETURNING id`` instead of ``INSERT OR ...`` and ``lastrowid``.

Transactions: a mutation outside :meth:`SqlStore.transaction` opens and commits its own; inside, it
joins the open one, and an error it raises rolls the whole block back (no caller catches a store error
inside a block and goes on, so there is no per-mutation savepoint: PostgreSQL would refuse every later
statement of a transaction that had an error anyway).

Why one module of about 525 lines: it is one class, :class:`SqlStore`, with one short method per
store operation over the same few helpers (``_one``, ``_all``, ``_conflict``, :meth:`SqlStore.transaction`)
and the backend's abstract connection methods; operations cross tables (a node insert consumes an auth
key), so a split by table would be mixins sharing all of that, not modules standing alone.
"""

from __future__ import annotations

import abc
import contextlib
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from typing import Any, Protocol, TypeVar

from ghostcore.auditchain import GENESIS, AuditRecord
from ghostcore.errors import AuthError, Conflict, NotFound, Unavailable
from ghostmesh.store.base import ApiKeyRec, AuthKeyRec, CommitFailed, NodeRec, RouteRec, UserRec

# Written columns (id is assigned by the database); _node_row produces values in this order, _node reads
# "id" + these.
NODE_COLUMNS = (
    "name", '"user"', "node_key", "ipv4", "ipv6", "ephemeral", "tags", "created", "expires", "last_seen",
    "endpoints", "hostname", "auth_key_id", "pending_key", "pending_since", "key_signature",
    "pending_signature", "via",
)  # fmt: skip
# The columns a uniqueness error can name, for a Conflict that says which one.
UNIQUE_NODE_COLUMNS = ("name", "node_key", "ipv4", "ipv6")
_NODE_COLS = "id, " + ", ".join(NODE_COLUMNS)
# Built once from the constant column names above, never from input (hence the S608 waivers).
_INSERT_NODE = (
    f"INSERT INTO nodes ({', '.join(NODE_COLUMNS)}) VALUES ({', '.join('?' * len(NODE_COLUMNS))}) "  # noqa: S608
    "RETURNING id"
)
_UPDATE_NODE = f"UPDATE nodes SET {', '.join(c + ' = ?' for c in NODE_COLUMNS)} WHERE id = ?"  # noqa: S608
_AUTH_COLS = 'id, hash, "user", reusable, ephemeral, tags, created, expires, used_count, revoked'
_API_COLS = "id, hash, created, expires, revoked, last_used"
_AUDIT_COLS = "seq, ts_ms, actor, action, target, detail, remote, prev_hash, hash, signature"
_USER_COLS = "id, name, created, oidc_subject, groups, oidc_issuer"

T = TypeVar("T")


def _node(row: Sequence[Any]) -> NodeRec:
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
        pending_since=float(row[15]),
        key_signature=bytes(row[16]),
        pending_signature=bytes(row[17]),
        via=int(row[18]),
    )


def _node_row(rec: NodeRec) -> tuple[object, ...]:
    return (
        rec.name, rec.user, rec.node_key, rec.ipv4, rec.ipv6, rec.ephemeral,
        json.dumps(list(rec.tags)), rec.created, rec.expires, rec.last_seen,
        json.dumps(list(rec.endpoints)), rec.hostname, rec.auth_key_id, rec.pending_key,
        rec.pending_since, rec.key_signature, rec.pending_signature, rec.via,
    )  # fmt: skip


def _auth(row: Sequence[Any]) -> AuthKeyRec:
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


def _api(row: Sequence[Any]) -> ApiKeyRec:
    """An api_keys row selected as ``_API_COLS``."""
    return ApiKeyRec(row[0], bytes(row[1]), float(row[2]), float(row[3]), bool(row[4]), float(row[5]))


def _audit(row: Sequence[Any]) -> AuditRecord:
    """An audit row selected as ``_AUDIT_COLS`` (actor .. remote are text as stored)."""
    seq, ts_ms, actor, action, target, detail, remote, prev_hash, hash_, signature = row
    return AuditRecord(
        int(seq),
        int(ts_ms),
        actor,
        action,
        target,
        detail,
        remote,
        bytes(prev_hash),
        bytes(hash_),
        bytes(signature),
    )


def _user_rec(row: Sequence[Any]) -> UserRec:
    """A users row selected as ``_USER_COLS``."""
    return UserRec(
        int(row[0]), row[1], float(row[2]), row[3], tuple(json.loads(row[4] or "[]")), row[5] or ""
    )


class Cursor(Protocol):
    """What the shared code reads of a driver's cursor (sqlite3's and psycopg's both fit)."""

    @property
    def rowcount(self) -> int: ...
    def fetchone(self) -> Any: ...
    def fetchall(self) -> Sequence[Any]: ...


class SqlStore(abc.ABC):
    """Every :class:`~ghostmesh.store.base.Store` method over a backend's connection hooks."""

    # Set by the backend: the driver's "a constraint refused it" errors, its "unreachable, busy or out of
    # space: nothing was written" errors, and any error a COMMIT can raise.
    _integrity_errors: tuple[type[Exception], ...]
    _transient_errors: tuple[type[Exception], ...]
    _commit_errors: tuple[type[Exception], ...]

    def __init__(self, name: str) -> None:
        self.name = name  # "database <where>", for messages: never a secret
        self._refused = ""  # set by refuse_writes

    # -- the backend's hooks ---------------------------------------------------------------------------

    @abc.abstractmethod
    def _execute(self, sql: str, params: Sequence[object] = ()) -> Cursor: ...

    @abc.abstractmethod
    def _executemany(self, sql: str, rows: Sequence[Sequence[object]]) -> None: ...

    @abc.abstractmethod
    def _in_transaction(self) -> bool: ...

    @abc.abstractmethod
    def _begin(self) -> None: ...

    @abc.abstractmethod
    def _commit(self) -> None: ...

    @abc.abstractmethod
    def _rollback(self) -> None:
        """Roll back the open transaction, if one is still open (some errors end it already)."""

    @abc.abstractmethod
    def _unique_column(self, exc: Exception) -> str | None:
        """The node column of :data:`UNIQUE_NODE_COLUMNS` a uniqueness error is about, if any."""

    @abc.abstractmethod
    def close(self) -> None: ...

    @abc.abstractmethod
    def delete_secret(self, key: str) -> None: ...

    # -- plumbing --------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        if self._in_transaction():
            yield  # join: the transaction's owner commits or rolls back what is written here too
            return
        if self._refused:
            raise Unavailable(f"{self.name}: writes refused ({self._refused}); restart ghostmesh")
        try:
            self._begin()
        except self._transient_errors as exc:
            raise Unavailable(f"{self.name}: {exc}; retry shortly") from None
        try:
            yield
        except self._transient_errors as exc:
            self._rollback()
            # disk full, locked by another writer, connection lost: nothing was written, the caller may retry
            raise Unavailable(f"{self.name}: {exc}; nothing was written, retry shortly") from None
        except BaseException:
            self._rollback()
            raise
        try:
            self._commit()
        except self._commit_errors as exc:
            self._rollback()
            raise CommitFailed(f"{self.name}: commit failed ({exc}); nothing was written") from None

    def refuse_writes(self, reason: str) -> None:
        self._refused = reason

    def _conflict(self, exc: Exception, what: str) -> Conflict:
        col = self._unique_column(exc)
        if col is not None:
            return Conflict(f"{what}: {col} is already taken")
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return Conflict(f"{what}: clashes with existing data ({first})")

    def _one(self, sql: str, params: Sequence[object], record: Callable[[Sequence[Any]], T]) -> T | None:
        row = self._execute(sql, params).fetchone()
        return record(row) if row else None

    def _all(self, sql: str, params: Sequence[object], record: Callable[[Sequence[Any]], T]) -> list[T]:
        return [record(r) for r in self._execute(sql, params).fetchall()]

    # -- kv --------------------------------------------------------------------------------------------

    def get_kv(self, key: str) -> bytes | None:
        row = self._execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
        return bytes(row[0]) if row else None

    def set_kv(self, key: str, value: bytes) -> None:
        with self.transaction():
            self._execute(
                "INSERT INTO kv (key, value) VALUES (?, ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (key, value),
            )

    # -- users -----------------------------------------------------------------------------------------

    def create_user(self, name: str, now: float) -> UserRec:
        try:
            with self.transaction():
                row = self._execute(
                    "INSERT INTO users (name, created) VALUES (?, ?) RETURNING id", (name, now)
                ).fetchone()
        except self._integrity_errors:
            raise Conflict(f"user {name!r} exists already") from None
        return UserRec(int(row[0]), name, now)

    def get_user(self, name: str) -> UserRec | None:
        return self._one(f"SELECT {_USER_COLS} FROM users WHERE name = ?", (name,), _user_rec)  # noqa: S608

    def list_users(self) -> Sequence[UserRec]:
        return self._all(f"SELECT {_USER_COLS} FROM users ORDER BY id", (), _user_rec)  # noqa: S608

    def user_by_oidc_identity(self, issuer: str, subject: str) -> UserRec | None:
        return self._one(
            f"SELECT {_USER_COLS} FROM users WHERE oidc_issuer = ? AND oidc_subject = ?",  # noqa: S608
            (issuer, subject),
            _user_rec,
        )

    def _written_user(self, name: str) -> UserRec:
        user = self.get_user(name)
        if user is None:  # pragma: no cover - written in the caller's transaction
            raise NotFound(f"user {name!r} vanished while being written")
        return user

    def put_oidc_user(
        self, name: str, issuer: str, subject: str, groups: Sequence[str], now: float
    ) -> UserRec:
        try:
            with self.transaction():
                self._execute(
                    "INSERT INTO users (name, created) VALUES (?, ?) ON CONFLICT (name) DO NOTHING",
                    (name, now),
                )
                self._execute(
                    "UPDATE users SET oidc_issuer = ?, oidc_subject = ?, groups = ? WHERE name = ?",
                    (issuer, subject, json.dumps(sorted(set(groups))), name),
                )
        except self._integrity_errors:
            raise Conflict(f"OIDC account of user {name!r} belongs to another user already") from None
        return self._written_user(name)

    def set_oidc_identity(self, name: str, issuer: str, subject: str | None) -> UserRec:
        try:
            with self.transaction():
                if subject is None:  # unbound: the groups came from that account, they go with it
                    cur = self._execute(
                        "UPDATE users SET oidc_issuer = '', oidc_subject = NULL, groups = '[]' "
                        "WHERE name = ?",
                        (name,),
                    )
                else:
                    cur = self._execute(
                        "UPDATE users SET oidc_issuer = ?, oidc_subject = ? WHERE name = ?",
                        (issuer, subject, name),
                    )
                if cur.rowcount == 0:
                    raise NotFound(f"user {name!r} not found; see `ghostctl users list`")
        except self._integrity_errors:
            raise Conflict(
                f"that OIDC account is bound to another user already; {name!r} was not bound"
            ) from None
        return self._written_user(name)

    def adopt_oidc_issuer(self, issuer: str) -> int:
        with self.transaction():
            cur = self._execute(
                "UPDATE users SET oidc_issuer = ? WHERE oidc_subject IS NOT NULL AND oidc_issuer = ''",
                (issuer,),
            )
            return cur.rowcount

    def delete_user(self, name: str) -> None:
        try:
            with self.transaction():
                cur = self._execute("DELETE FROM users WHERE name = ?", (name,))
                if cur.rowcount == 0:
                    raise NotFound(f"user {name!r} not found; see `ghostctl users list`")
        except self._integrity_errors:
            raise Conflict(f"user {name!r} still owns nodes; delete them first") from None

    # -- auth keys -------------------------------------------------------------------------------------

    def insert_auth_key(self, rec: AuthKeyRec) -> None:
        try:
            with self.transaction():
                self._execute(
                    f"INSERT INTO auth_keys ({_AUTH_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",  # noqa: S608
                    (rec.id, rec.hash, rec.user, rec.reusable, rec.ephemeral, json.dumps(list(rec.tags)),
                     rec.created, rec.expires, rec.used_count, rec.revoked),
                )  # fmt: skip
        except self._integrity_errors as exc:
            raise Conflict(f"auth key {rec.id}: cannot store ({str(exc).splitlines()[0]})") from None

    def get_auth_key(self, key_id: str) -> AuthKeyRec | None:
        return self._one(f"SELECT {_AUTH_COLS} FROM auth_keys WHERE id = ?", (key_id,), _auth)  # noqa: S608

    def list_auth_keys(self, user: str | None = None) -> Sequence[AuthKeyRec]:
        if user:
            sql = f'SELECT {_AUTH_COLS} FROM auth_keys WHERE "user" = ? ORDER BY created, id'  # noqa: S608
            return self._all(sql, (user,), _auth)
        return self._all(f"SELECT {_AUTH_COLS} FROM auth_keys ORDER BY created, id", (), _auth)  # noqa: S608

    def revoke_auth_key(self, key_id: str) -> AuthKeyRec | None:
        with self.transaction():
            self._execute("UPDATE auth_keys SET revoked = TRUE WHERE id = ?", (key_id,))
        return self.get_auth_key(key_id)

    # -- API keys --------------------------------------------------------------------------------------

    def insert_api_key(self, rec: ApiKeyRec) -> None:
        with self.transaction():
            self._execute(
                f"INSERT INTO api_keys ({_API_COLS}) VALUES (?, ?, ?, ?, ?, ?)",  # noqa: S608
                (rec.id, rec.hash, rec.created, rec.expires, rec.revoked, rec.last_used),
            )

    def get_api_key(self, key_id: str) -> ApiKeyRec | None:
        return self._one(f"SELECT {_API_COLS} FROM api_keys WHERE id = ?", (key_id,), _api)  # noqa: S608

    def list_api_keys(self) -> Sequence[ApiKeyRec]:
        return self._all(f"SELECT {_API_COLS} FROM api_keys ORDER BY created, id", (), _api)  # noqa: S608

    def revoke_api_key(self, key_id: str) -> ApiKeyRec | None:
        with self.transaction():
            self._execute("UPDATE api_keys SET revoked = TRUE WHERE id = ?", (key_id,))
        return self.get_api_key(key_id)

    def touch_api_key(self, key_id: str, now: float) -> None:
        with self.transaction():
            self._execute("UPDATE api_keys SET last_used = ? WHERE id = ?", (now, key_id))

    # -- nodes -----------------------------------------------------------------------------------------

    def list_nodes(self) -> Sequence[NodeRec]:
        return self._all(f"SELECT {_NODE_COLS} FROM nodes ORDER BY id", (), _node)  # noqa: S608

    def _consume(self, key_id: str) -> None:
        # The check and the count in one statement, inside the node's transaction: two racing
        # registrations cannot both spend a single-use key. SQLite: the writer holds the database lock.
        # PostgreSQL (READ COMMITTED): the UPDATE locks the row; a second one waits for the first to
        # commit, then re-checks its WHERE against the committed row (used_count 1: no row, AuthError).
        cur = self._execute(
            "UPDATE auth_keys SET used_count = used_count + 1 "
            "WHERE id = ? AND revoked = FALSE AND (reusable = TRUE OR used_count = 0)",
            (key_id,),
        )
        if cur.rowcount != 1:
            raise AuthError(f"auth key gmauth_{key_id} was revoked or spent meanwhile; create a new one")

    def insert_node(self, rec: NodeRec, consume_auth_key: str | None = None) -> NodeRec:
        try:
            with self.transaction():
                if consume_auth_key is not None:
                    self._consume(consume_auth_key)
                row = self._execute(_INSERT_NODE, _node_row(rec)).fetchone()
        except self._integrity_errors as exc:
            raise self._conflict(exc, f"node {rec.name!r}") from None
        return replace(rec, id=int(row[0]))

    def update_node(self, rec: NodeRec, consume_auth_key: str | None = None) -> None:
        try:
            with self.transaction():
                if consume_auth_key is not None:
                    self._consume(consume_auth_key)
                cur = self._execute(_UPDATE_NODE, (*_node_row(rec), rec.id))
                if cur.rowcount != 1:
                    raise NotFound(f"node {rec.id} not found")
        except self._integrity_errors as exc:
            raise self._conflict(exc, f"node {rec.name!r}") from None

    def delete_node(self, node_id: int) -> None:
        with self.transaction():
            cur = self._execute("DELETE FROM nodes WHERE id = ?", (node_id,))
            if cur.rowcount != 1:
                raise NotFound(f"node {node_id} not found")

    # -- routes ----------------------------------------------------------------------------------------

    def list_routes(self) -> Sequence[RouteRec]:
        rows = self._execute(
            "SELECT node_id, prefix, by_node, by_admin, approved FROM routes ORDER BY node_id, prefix"
        ).fetchall()
        return [RouteRec(int(r[0]), r[1], bool(r[2]), bool(r[3]), bool(r[4])) for r in rows]

    def put_routes(self, recs: Sequence[RouteRec], delete: Sequence[tuple[int, str]] = ()) -> None:
        try:
            with self.transaction():
                if delete:
                    self._executemany("DELETE FROM routes WHERE node_id = ? AND prefix = ?", list(delete))
                if recs:
                    self._executemany(
                        "INSERT INTO routes (node_id, prefix, by_node, by_admin, approved) "
                        "VALUES (?, ?, ?, ?, ?) "
                        "ON CONFLICT (node_id, prefix) DO UPDATE SET by_node = excluded.by_node, "
                        "by_admin = excluded.by_admin, approved = excluded.approved",
                        [(r.node_id, r.prefix, r.by_node, r.by_admin, r.approved) for r in recs],
                    )
        except self._integrity_errors as exc:
            raise self._conflict(exc, "route") from None

    # -- audit log -------------------------------------------------------------------------------------

    def append_audit(self, rec: AuditRecord) -> None:
        try:
            with self.transaction():
                # The link check and the insert in one transaction. SQLite's writer lock keeps a second
                # writer (another ghostmesh on the same file) out in between; on PostgreSQL two writers
                # can both pass the check, and the primary key on seq refuses the second insert.
                row = self._execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
                last_seq, last_hash = (int(row[0]), bytes(row[1])) if row else (0, GENESIS)
                if rec.seq != last_seq + 1 or rec.prev_hash != last_hash:
                    raise Conflict(
                        f"audit entry {rec.seq}: the log ends at seq {last_seq} with another hash; "
                        "reload the last entry and seal again"
                    )
                self._execute(
                    f"INSERT INTO audit ({_AUDIT_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",  # noqa: S608
                    (rec.seq, rec.ts_ms, rec.actor, rec.action, rec.target, rec.detail, rec.remote,
                     rec.prev_hash, rec.hash, rec.signature),
                )  # fmt: skip
        except self._integrity_errors:
            raise Conflict(
                f"audit entry {rec.seq}: another writer stored an entry {rec.seq} first; reload the last "
                "entry and seal again"
            ) from None

    def list_audit(self, after_seq: int = 0, limit: int = 0) -> Sequence[AuditRecord]:
        sql = f"SELECT {_AUDIT_COLS} FROM audit WHERE seq > ? ORDER BY seq"  # noqa: S608
        if limit > 0:
            return self._all(sql + " LIMIT ?", (after_seq, limit), _audit)
        return self._all(sql, (after_seq,), _audit)

    def last_audit(self) -> AuditRecord | None:
        return self._one(f"SELECT {_AUDIT_COLS} FROM audit ORDER BY seq DESC LIMIT 1", (), _audit)  # noqa: S608

    def audit_prune_point(self, before_ms: int) -> AuditRecord | None:
        # Walks from the oldest entry to the first young one: as many rows as a prune removes.
        young = self._execute(
            "SELECT seq FROM audit WHERE ts_ms >= ? ORDER BY seq LIMIT 1", (before_ms,)
        ).fetchone()
        if young is not None:
            through = int(young[0]) - 1
        else:
            last = self.last_audit()
            through = last.seq if last is not None else 0
        return self._one(f"SELECT {_AUDIT_COLS} FROM audit WHERE seq = ?", (through,), _audit)  # noqa: S608

    def delete_audit(self, through_seq: int) -> int:
        with self.transaction():
            return self._execute("DELETE FROM audit WHERE seq <= ?", (through_seq,)).rowcount

    # -- lock log --------------------------------------------------------------------------------------

    def list_lock(self) -> Sequence[bytes]:
        rows = self._execute("SELECT update_bytes FROM lock_log ORDER BY seq").fetchall()
        return [bytes(r[0]) for r in rows]

    def append_lock(self, seq: int, update: bytes) -> None:
        try:
            with self.transaction():
                # The length check and the insert in one transaction; as for the audit log, the primary
                # key refuses a second PostgreSQL writer that passed the check at the same time.
                count = int(self._execute("SELECT COUNT(*) FROM lock_log").fetchone()[0])
                if seq != count + 1:
                    raise Conflict(
                        f"lock update {seq}: the log holds {count} updates; reload it and try again"
                    )
                self._execute("INSERT INTO lock_log (seq, update_bytes) VALUES (?, ?)", (seq, update))
        except self._integrity_errors:
            raise Conflict(f"lock update {seq}: another writer stored it first; reload the log") from None
