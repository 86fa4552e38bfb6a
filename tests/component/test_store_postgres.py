"""What is PostgreSQL's own in its store: migrations run once under concurrent starts, a newer schema is
refused, two connections racing for one single-use key or one audit seq, a commit lost with the
connection, a transaction whose statement failed never commits, the DSN's password in no message, and
1,000 registrations from two store instances (two ghostmesh processes) on one database."""

from __future__ import annotations

import contextlib
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

import psycopg
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ghostcore import auditchain as ac
from ghostcore.auditchain import GENESIS, AuditRecord
from ghostcore.errors import AuthError, ConfigError, Conflict
from ghostmesh.store.base import CommitFailed, NodeRec
from ghostmesh.store.postgres import SCHEMA_VERSION, PostgresStore, describe_dsn
from lab.pgcluster import PgCluster
from tests.component._store_fixtures import auth_key_rec, node_rec

KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
WAIT = 10.0  # seconds any wait for another connection may take
POOL = 1100  # addresses for 1,000 registrations: scarce, so stale views collide


@pytest.fixture
def two(pg_dsn: str) -> Iterator[tuple[PostgresStore, PostgresStore]]:
    """Two stores (two connections, as two ghostmesh processes) on one fresh database with user default."""
    a, b = PostgresStore(pg_dsn), PostgresStore(pg_dsn)
    a.create_user("default", 1.0)
    yield a, b
    a.close()
    b.close()


def _in_thread(fn: Callable[[], object]) -> tuple[threading.Thread, list[object]]:
    """Run ``fn`` in a thread; the list gets its result or the exception it raised."""
    out: list[object] = []

    def run() -> None:
        try:
            out.append(fn())
        except Exception as exc:
            out.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def _wait_until_blocked(cluster: PgCluster, dbname: str) -> None:
    """Until a backend of ``dbname`` waits for a lock (the racing statement reached the row)."""
    deadline = time.monotonic() + WAIT
    with cluster.admin() as admin:
        while time.monotonic() < deadline:
            row = admin.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND wait_event_type = 'Lock'",
                (dbname,),
            ).fetchone()
            if row is not None and row[0] > 0:
                return
            time.sleep(0.01)
    raise AssertionError(f"no connection to {dbname} waited for a lock within {WAIT}s")


def _dbname(dsn: str) -> str:
    return dict(p.split("=", 1) for p in dsn.split())["dbname"]


def test_concurrent_starts_migrate_once(pg_dsn: str) -> None:
    results: list[tuple[threading.Thread, list[object]]] = [
        _in_thread(lambda: PostgresStore(pg_dsn)) for _ in range(4)
    ]
    stores = []
    for t, out in results:
        t.join(WAIT)
        assert not t.is_alive()
        assert isinstance(out[0], PostgresStore), out
        stores.append(out[0])
    assert {s.schema_version() for s in stores} == {SCHEMA_VERSION}
    with psycopg.connect(pg_dsn) as conn:
        assert conn.execute("SELECT count(*) FROM schema_version").fetchone() == (1,)
    for s in stores:
        s.close()


def test_newer_schema_is_refused(pg_dsn: str) -> None:
    PostgresStore(pg_dsn).close()
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("UPDATE schema_version SET version = 99")
    with pytest.raises(ConfigError, match="schema version 99, newer than this ghostmesh supports"):
        PostgresStore(pg_dsn)


def test_racing_registrations_spend_a_single_use_key_once(
    two: tuple[PostgresStore, PostgresStore], pg_cluster: PgCluster, pg_dsn: str
) -> None:
    a, b = two
    a.insert_auth_key(auth_key_rec())
    other = node_rec(name="b", key="k2", v4="100.64.0.2", v6="fd7a:115c:a1e0::2")
    with a.transaction():
        a.insert_node(node_rec(), consume_auth_key="aaaaaaaaaaaa")  # spent, not yet committed
        t, out = _in_thread(lambda: b.insert_node(other, consume_auth_key="aaaaaaaaaaaa"))
        _wait_until_blocked(pg_cluster, _dbname(pg_dsn))  # b waits for a's row lock
    t.join(WAIT)
    assert not t.is_alive()
    assert isinstance(out[0], AuthError), out
    assert [n.name for n in b.list_nodes()] == ["a"]
    assert b.get_auth_key("aaaaaaaaaaaa").used_count == 1  # type: ignore[union-attr]


def test_racing_audit_writers_cannot_fork_the_chain(
    two: tuple[PostgresStore, PostgresStore], pg_cluster: PgCluster, pg_dsn: str
) -> None:
    a, b = two
    one = ac.seal(AuditRecord(1, 0, "a", "b", "c", "{}", "", GENESIS), KEY)
    a.append_audit(one)
    mine = ac.seal(AuditRecord(2, 1, "a", "mine", "c", "{}", "", one.hash), KEY)
    theirs = ac.seal(AuditRecord(2, 1, "b", "theirs", "c", "{}", "", one.hash), KEY)
    with a.transaction():
        a.append_audit(mine)
        t, out = _in_thread(lambda: b.append_audit(theirs))  # passes the check: a has not committed
        _wait_until_blocked(pg_cluster, _dbname(pg_dsn))  # its insert waits for a's seq 2
    t.join(WAIT)
    assert not t.is_alive()
    assert isinstance(out[0], Conflict), out
    assert "another writer stored an entry 2 first" in str(out[0])
    assert [e.action for e in b.list_audit()] == ["b", "mine"]


def test_commit_lost_with_the_connection_is_commit_failed_and_reconnects(
    pg_dsn: str, pg_cluster: PgCluster
) -> None:
    s = PostgresStore(pg_dsn, exclusive=True)  # the reconnection takes the instance lock again
    pid = s._conn.info.backend_pid

    def lost() -> None:
        with s.transaction():
            s.set_kv("k", b"v")
            with pg_cluster.admin() as admin:
                admin.execute("SELECT pg_terminate_backend(%s)", (pid,))

    with pytest.raises(CommitFailed, match="commit failed"):
        lost()
    assert s.get_kv("k") is None  # on a new connection: nothing was written
    assert s._conn.info.backend_pid != pid
    s.set_kv("k", b"v")
    assert s.get_kv("k") == b"v"
    s.close()


def test_an_exclusive_store_refuses_a_second_exclusive_one(pg_dsn: str) -> None:
    first = PostgresStore(pg_dsn, exclusive=True)
    with pytest.raises(ConfigError, match=r"another ghostmesh is using database postgres .*dbname=t_"):
        PostgresStore(pg_dsn, exclusive=True)
    PostgresStore(pg_dsn).close()  # a plain store (tests, tools) is not refused
    first.close()  # the lock goes with the connection
    PostgresStore(pg_dsn, exclusive=True).close()


def test_a_swallowed_statement_error_never_commits(pg_dsn: str) -> None:
    s = PostgresStore(pg_dsn)
    s.create_user("default", 1.0)

    def swallowed() -> None:
        with s.transaction():
            s.set_kv("k", b"v")
            with contextlib.suppress(Conflict):
                s.create_user("default", 2.0)  # PostgreSQL aborts the transaction; the caller goes on

    with pytest.raises(CommitFailed, match="a statement of the transaction failed"):
        swallowed()
    assert s.get_kv("k") is None
    s.set_kv("k", b"v")  # the connection is usable again
    s.close()


def test_the_dsns_password_is_in_no_message(pg_cluster: PgCluster) -> None:
    dsn = f"host={pg_cluster.socket_dir} user=ghost password=hunter2-not-logged dbname=no_such_db"
    with pytest.raises(ConfigError) as err:
        PostgresStore(dsn)
    assert "cannot connect" in str(err.value)
    assert "no_such_db" in str(err.value)
    assert "hunter2" not in str(err.value)
    uri = "postgresql://ghost:hunter2-not-logged@db.example:5433/mesh?sslmode=require"
    assert describe_dsn(uri) == "postgres user=ghost host=db.example port=5433 dbname=mesh"
    with pytest.raises(ConfigError, match=r"^database\.dsn: not a libpq connection string") as bad:
        describe_dsn("host=x password=hunter2-not-logged dbname")
    assert "hunter2" not in str(bad.value)


@dataclass
class _Instance:
    """One ghostmesh's registrations: its own connection and its own, stale, view of the addresses taken
    (as ghostmesh.state's in-memory allocator would have without change propagation between instances).
    It picks a free address of its view at random; a Conflict makes it re-read the view and retry."""

    store: PostgresStore
    prefix: str
    taken: set[int] = field(default_factory=set)
    done: list[NodeRec] = field(default_factory=list)
    conflicts: int = 0
    spent_elsewhere: int = 0
    error: BaseException | None = None
    rng: random.Random = field(default_factory=lambda: random.Random(7))

    def register(self, i: int, key_id: str | None) -> None:
        name, attempts = f"node-{i}", 0
        while True:
            attempts += 1
            assert attempts <= 100, f"{self.prefix}: registration {i} still conflicting"
            n = self.rng.choice([x for x in range(1, POOL + 1) if x not in self.taken])  # free in its view
            rec = replace(
                node_rec(
                    name, f"{self.prefix}-key-{i}", f"100.64.{n >> 8}.{n & 255}", f"fd7a:115c:a1e0::{n:x}"
                ),
                auth_key_id=key_id,
            )
            try:
                self.done.append(self.store.insert_node(rec, consume_auth_key=key_id))
                self.taken.add(n)
                return
            except Conflict as exc:  # the other instance took it meanwhile: refresh the view, retry
                self.conflicts += 1
                if "name is already taken" in str(exc):
                    name = f"node-{i}-{self.prefix}"
                else:
                    self.taken |= {int(x.ipv6.rsplit(":", 1)[1], 16) for x in self.store.list_nodes()}
            except AuthError:  # the other instance spent this single-use key: join without it
                self.spent_elsewhere += 1
                key_id = None

    def run(self, count: int, keys: list[str]) -> None:
        try:
            for i in range(count):
                self.register(i, keys[i] if i < len(keys) else None)
        except BaseException as exc:  # handed to the test: a thread's exception would be lost
            self.error = exc


def test_two_instances_register_1000_nodes_without_duplicates_or_losses(
    two: tuple[PostgresStore, PostgresStore],
) -> None:
    a, b = two
    keys = [f"k{j:011d}" for j in range(100)]  # single-use keys both instances try to spend
    for k in keys:
        a.insert_auth_key(auth_key_rec(k))
    first, second = _Instance(a, "a"), _Instance(b, "b")
    threads = [threading.Thread(target=inst.run, args=(500, keys)) for inst in (first, second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
        assert not t.is_alive()
    assert (first.error, second.error) == (None, None)
    stored = a.list_nodes()
    returned = first.done + second.done
    assert len(returned) == 1000  # every registration succeeded, after retries
    assert sorted(stored, key=lambda n: n.id) == sorted(returned, key=lambda n: n.id)  # none lost
    for column in ("name", "node_key", "ipv4", "ipv6"):
        assert len({getattr(n, column) for n in stored}) == 1000, column
    assert first.conflicts + second.conflicts > 0  # the stale views did collide, and were caught
    assert first.spent_elsewhere + second.spent_elsewhere == len(keys)  # each key refused once
    assert [k.used_count for k in a.list_auth_keys()] == [1] * len(keys)
    assert sorted(n.auth_key_id for n in stored if n.auth_key_id) == keys  # each spent by one node
