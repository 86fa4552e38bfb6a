"""The PostgreSQL backend of :class:`ghostmesh.store.base.Store` (``[database] type = "postgres"``).

One psycopg 3 connection in autocommit mode; :class:`~ghostmesh.store.sql.SqlStore` issues BEGIN / COMMIT
itself, so a transaction is exactly the block it wraps and mutations inside it join it, as on SQLite.
The statements are the shared ones (``?`` rewritten to psycopg's ``%s``); this module holds the
connection, the schema and what PostgreSQL does differently:

- Isolation: READ COMMITTED. Spending a single-use auth key is one conditional ``UPDATE`` that locks the
  key's row: a racing registration waits for the first to commit and then finds the key spent (the
  re-check PostgreSQL does on a row updated meanwhile), so two cannot both spend it. Node name, key and
  addresses are ``UNIQUE`` constraints: a registration from another instance whose in-memory view was
  stale gets ``Conflict`` (``UniqueViolation``), nothing written. The audit and lock logs are checked
  then appended; the primary key on ``seq`` refuses a second writer that passed the same check.
- Migrations: ``schema_version`` as on SQLite, applied in one transaction under a transaction-scoped
  advisory lock, so two ghostmesh processes starting at once migrate once (PostgreSQL DDL is
  transactional: a failed migration leaves the previous schema). Version numbers are this backend's own.
- Types: ``BIGSERIAL`` ids, ``BIGINT`` counters and times in ms, ``DOUBLE PRECISION`` unix seconds,
  ``BYTEA`` hashes and signatures, ``BOOLEAN`` flags; tag and endpoint lists are JSON text as on SQLite.
- Secrets: ghostmesh's private keys never go into this database; they are files in
  ``server.state_dir`` (:mod:`ghostmesh.keyfiles`), as with SQLite. :meth:`PostgresStore.delete_secret`
  deletes the row and rewrites the table (``VACUUM FULL``), but PostgreSQL cannot promise the bytes leave
  the server: its WAL, archives, replicas and backups keep older copies until they are recycled.
- One server per database: the server's store holds a session advisory lock while connected, and a
  second ghostmesh on the same database is refused at start (ghostmesh keeps the mesh in memory and
  would not see another's changes). The store itself stays correct with several connections (the
  constraints above); what running several servers would need beyond it is change propagation.
- The DSN (a libpq connection string or ``postgresql://`` URI) may carry a password; it is never in a
  message, log or repr: :func:`describe_dsn` names the server without it, and a driver message quoting
  it has it replaced. A lost connection is reopened at the next call outside a transaction; the call
  that found it lost is ``Unavailable`` (inside a transaction: nothing written; at COMMIT:
  ``CommitFailed``, and the server stops, as when SQLite fails a commit).

Why the synchronous API on the event loop: ghostmesh's state is owned by the loop thread and every
mutation runs in order with it, without locks, and a transaction never spans an await (the contract of
:meth:`Store.transaction`); an async driver would let other coroutines interleave inside a transaction,
and a worker thread would need the same ordering back. The cost: each statement blocks the loop for
one round trip to the server. Measured with ``python -m bench.store`` on a local unix socket (a shared
2-core VM, fsync on; three runs): 0.10-0.14 ms per primary-key read (SQLite in-process: 0.01-0.02 ms),
and 0.8-2.3 ms per registration transaction (BEGIN, key use, node, audit check and entry, COMMIT with
its fsync: 6 round trips), 0.4-0.7x SQLite's registrations per second. A PostgreSQL across a network
adds its round-trip time to every statement, so keep it near ghostmesh.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg import errors as pgerrors
from psycopg import pq
from psycopg.conninfo import conninfo_to_dict

from ghostcore.errors import ConfigError, Unavailable
from ghostmesh.store.sql import SqlStore

# Ordered: MIGRATIONS[i] takes the schema from version i to i + 1. Never edit a shipped entry; append.
MIGRATIONS: tuple[str, ...] = (
    # 1: the schema SQLite reached in its five migrations, in PostgreSQL's types.
    """
    CREATE TABLE users (
        id           BIGSERIAL PRIMARY KEY,
        name         TEXT NOT NULL UNIQUE,
        created      DOUBLE PRECISION NOT NULL,
        oidc_subject TEXT,
        groups       TEXT NOT NULL DEFAULT '[]',
        oidc_issuer  TEXT NOT NULL DEFAULT ''
    );
    CREATE UNIQUE INDEX users_oidc_identity ON users (oidc_issuer, oidc_subject)
        WHERE oidc_subject IS NOT NULL;
    CREATE TABLE auth_keys (
        id         TEXT PRIMARY KEY,
        hash       BYTEA NOT NULL,
        "user"     TEXT NOT NULL REFERENCES users (name) ON DELETE CASCADE,
        reusable   BOOLEAN NOT NULL,
        ephemeral  BOOLEAN NOT NULL,
        tags       TEXT NOT NULL DEFAULT '[]',
        created    DOUBLE PRECISION NOT NULL,
        expires    DOUBLE PRECISION NOT NULL,
        used_count BIGINT NOT NULL DEFAULT 0,
        revoked    BOOLEAN NOT NULL DEFAULT FALSE
    );
    CREATE INDEX auth_keys_user ON auth_keys ("user");
    CREATE TABLE api_keys (
        id        TEXT PRIMARY KEY,
        hash      BYTEA NOT NULL,
        created   DOUBLE PRECISION NOT NULL,
        expires   DOUBLE PRECISION NOT NULL,
        revoked   BOOLEAN NOT NULL DEFAULT FALSE,
        last_used DOUBLE PRECISION NOT NULL DEFAULT 0
    );
    CREATE TABLE nodes (
        id                BIGSERIAL PRIMARY KEY,
        name              TEXT NOT NULL CONSTRAINT nodes_name_key UNIQUE,
        "user"            TEXT NOT NULL REFERENCES users (name) ON DELETE RESTRICT,
        node_key          TEXT NOT NULL CONSTRAINT nodes_node_key_key UNIQUE,
        ipv4              TEXT NOT NULL CONSTRAINT nodes_ipv4_key UNIQUE,
        ipv6              TEXT NOT NULL CONSTRAINT nodes_ipv6_key UNIQUE,
        ephemeral         BOOLEAN NOT NULL,
        tags              TEXT NOT NULL DEFAULT '[]',
        created           DOUBLE PRECISION NOT NULL,
        expires           DOUBLE PRECISION NOT NULL,
        last_seen         DOUBLE PRECISION NOT NULL DEFAULT 0,
        endpoints         TEXT NOT NULL DEFAULT '[]',
        hostname          TEXT NOT NULL DEFAULT '',
        auth_key_id       TEXT REFERENCES auth_keys (id) ON DELETE SET NULL,
        pending_key       TEXT,
        pending_since     DOUBLE PRECISION NOT NULL DEFAULT 0,
        key_signature     BYTEA NOT NULL DEFAULT '',
        pending_signature BYTEA NOT NULL DEFAULT ''
    );
    CREATE INDEX nodes_user ON nodes ("user");
    CREATE UNIQUE INDEX nodes_pending_key ON nodes (pending_key) WHERE pending_key IS NOT NULL;
    CREATE TABLE kv (
        key   TEXT PRIMARY KEY,
        value BYTEA NOT NULL
    );
    CREATE TABLE audit (
        seq       BIGINT PRIMARY KEY,
        ts_ms     BIGINT NOT NULL,
        actor     TEXT NOT NULL,
        action    TEXT NOT NULL,
        target    TEXT NOT NULL,
        detail    TEXT NOT NULL,
        remote    TEXT NOT NULL,
        prev_hash BYTEA NOT NULL,
        hash      BYTEA NOT NULL,
        signature BYTEA NOT NULL
    );
    CREATE TABLE routes (
        node_id  BIGINT NOT NULL REFERENCES nodes (id) ON DELETE CASCADE,
        prefix   TEXT NOT NULL,
        by_node  BOOLEAN NOT NULL DEFAULT FALSE,
        by_admin BOOLEAN NOT NULL DEFAULT FALSE,
        approved BOOLEAN NOT NULL DEFAULT FALSE,
        PRIMARY KEY (node_id, prefix)
    );
    CREATE TABLE lock_log (
        seq          BIGINT PRIMARY KEY,
        update_bytes BYTEA NOT NULL
    );
    """,
    # 2: devices (a static WireGuard peer behind a gateway node): the gateway's id, 0 for a node.
    """
    ALTER TABLE nodes ADD COLUMN via BIGINT NOT NULL DEFAULT 0;
    """,
)

SCHEMA_VERSION = len(MIGRATIONS)

# The advisory lock key migrations take ("ghostmsh" in ASCII): any constant other software is unlikely
# to use on the same database.
_MIGRATION_LOCK = 0x67686F73746D7368

# The session advisory lock an exclusive store (the server's) holds while connected ("ghostone").
_INSTANCE_LOCK = 0x67686F73746F6E65

# The named unique constraints of nodes, by column (for a Conflict that says which one is taken).
_UNIQUE_CONSTRAINTS = {
    "nodes_name_key": "name",
    "nodes_node_key_key": "node_key",
    "nodes_ipv4_key": "ipv4",
    "nodes_ipv6_key": "ipv6",
}
_CONNECT_TIMEOUT = "10"  # seconds, unless the DSN sets connect_timeout: a start never hangs on a dead host


def parse_dsn(dsn: str) -> dict[str, str]:
    """The DSN's parameters; ``ConfigError`` naming ``database.dsn`` (never quoting it) if libpq refuses
    it."""
    try:
        return {k: str(v) for k, v in conninfo_to_dict(dsn).items() if v is not None}
    except psycopg.ProgrammingError:
        # libpq's message may quote a piece of the string, which can be the password: not repeated.
        raise ConfigError(
            "database.dsn: not a libpq connection string (key=value ...) or postgresql:// URI"
        ) from None


def describe_dsn(dsn: str) -> str:
    """Which server and database ``dsn`` names, for messages: user, host, port and dbname, no password."""
    params = parse_dsn(dsn)
    shown = [f"{k}={params[k]}" for k in ("user", "host", "port", "dbname") if params.get(k)]
    return "postgres " + (" ".join(shown) if shown else "(libpq defaults)")


@functools.lru_cache(maxsize=256)
def _pg_sql(sql: str) -> bytes:
    """A shared statement in psycopg's paramstyle (the shared SQL has no literal ``?`` or ``%``)."""
    return sql.replace("?", "%s").encode()


class PostgresStore(SqlStore):
    """A :class:`~ghostmesh.store.base.Store` in a PostgreSQL database (one connection)."""

    _integrity_errors = (psycopg.IntegrityError,)
    # Connection lost, server shutting down, out of disk: nothing of the transaction was written.
    _transient_errors = (psycopg.OperationalError,)
    _commit_errors = (psycopg.Error,)

    def __init__(self, dsn: str, *, exclusive: bool = False) -> None:
        """Connect and migrate. ``exclusive`` (what the server asks for): hold a session advisory lock
        for as long as the connection lives, and refuse a database another exclusive store holds."""
        params = parse_dsn(dsn)
        super().__init__(f"database {describe_dsn(dsn)}")
        self._password = params.get("password", "")
        self._params = {"connect_timeout": _CONNECT_TIMEOUT, **params}
        self._exclusive = exclusive
        self._conn = self._connect(startup=True)
        try:
            self._migrate()
        except BaseException:
            self._conn.close()
            raise

    def _redact(self, exc: BaseException) -> str:
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return text.replace(self._password, "***") if self._password else text

    def _connect(self, *, startup: bool = False) -> psycopg.Connection[tuple[Any, ...]]:
        error = ConfigError if startup else Unavailable
        try:
            # Named-parameter form: the values (the password too) never pass through a string we build.
            conn = psycopg.connect(autocommit=True, **self._params)  # type: ignore[arg-type]
        except psycopg.Error as exc:
            where = "database.dsn: cannot connect to " if startup else ""
            raise error(f"{where}{self.name}: {self._redact(exc)}") from None
        if self._exclusive:
            try:
                row = conn.execute(f"SELECT pg_try_advisory_lock({_INSTANCE_LOCK})".encode()).fetchone()
            except psycopg.Error as exc:
                conn.close()
                raise error(f"{self.name}: {self._redact(exc)}") from None
            if row is None or row[0] is not True:
                conn.close()
                # Each ghostmesh keeps the mesh in memory: a second one would neither see the first's
                # changes nor tell its nodes about them.
                raise error(
                    f"database.dsn: another ghostmesh is using {self.name}; one server per database "
                    "(stop the other one, or give this one its own database)"
                )
        return conn

    # -- the connection hooks of SqlStore -------------------------------------------------------------

    def _live(self) -> psycopg.Connection[tuple[Any, ...]]:
        """The connection, reopened if it was lost while no transaction was open."""
        if self._conn.closed:
            self._conn = self._connect()
        return self._conn

    def _execute(self, sql: str, params: Sequence[object] = ()) -> psycopg.Cursor[tuple[Any, ...]]:
        conn = self._conn if self._in_transaction() else self._live()
        try:
            return conn.execute(_pg_sql(sql), params)
        except psycopg.OperationalError as exc:
            raise Unavailable(f"{self.name}: {self._redact(exc)}; retry shortly") from None

    def _executemany(self, sql: str, rows: Sequence[Sequence[object]]) -> None:
        try:
            with self._conn.cursor() as cur:
                cur.executemany(_pg_sql(sql), rows)
        except psycopg.OperationalError as exc:
            raise Unavailable(f"{self.name}: {self._redact(exc)}; retry shortly") from None

    def _in_transaction(self) -> bool:
        return self._conn.info.transaction_status in (
            pq.TransactionStatus.INTRANS,
            pq.TransactionStatus.INERROR,
        )

    def _begin(self) -> None:
        self._live().execute(b"BEGIN")

    def _commit(self) -> None:
        if self._conn.info.transaction_status == pq.TransactionStatus.INERROR:
            # PostgreSQL answers COMMIT of a failed transaction with a silent ROLLBACK: say so instead.
            raise pgerrors.InFailedSqlTransaction("a statement of the transaction failed")
        self._conn.execute(b"COMMIT")

    def _rollback(self) -> None:
        if self._conn.closed:
            return  # the server ended the transaction with the connection
        if self._in_transaction():
            try:
                self._conn.execute(b"ROLLBACK")
            except psycopg.OperationalError:
                self._conn.close()  # lost meanwhile: so is the transaction; reopened at the next call

    def _unique_column(self, exc: Exception) -> str | None:
        if isinstance(exc, psycopg.Error) and exc.diag.constraint_name:
            return _UNIQUE_CONSTRAINTS.get(exc.diag.constraint_name)
        return None

    # -- schema ----------------------------------------------------------------------------------------

    def schema_version(self) -> int:
        row = self._execute("SELECT version FROM schema_version").fetchone()
        return int(row[0]) if row else 0

    def _migrate(self) -> None:
        with self.transaction():
            self._execute(f"SELECT pg_advisory_xact_lock({_MIGRATION_LOCK})")
            self._execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = self._execute("SELECT version FROM schema_version").fetchone()
            if row is None:
                self._execute("INSERT INTO schema_version (version) VALUES (0)")
            current = int(row[0]) if row else 0
            if current > SCHEMA_VERSION:
                raise ConfigError(
                    f"database.dsn: {self.name} has schema version {current}, newer than this ghostmesh "
                    f"supports ({SCHEMA_VERSION}); upgrade ghostmesh or point database.dsn elsewhere"
                )
            for version in range(current, SCHEMA_VERSION):
                self._conn.execute(MIGRATIONS[version].encode())  # no parameters: several statements
                self._execute("UPDATE schema_version SET version = ?", (version + 1,))

    def close(self) -> None:
        self._conn.close()

    # -- secrets ---------------------------------------------------------------------------------------

    def delete_secret(self, key: str) -> None:
        with self.transaction():
            self._execute("DELETE FROM kv WHERE key = ?", (key,))
        if not self._in_transaction():  # VACUUM cannot run inside a transaction block
            self._execute("VACUUM FULL kv")  # the table rewritten without the row's dead version
