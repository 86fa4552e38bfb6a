"""The store tests' backend matrix: every test taking ``store`` (or ``backend``, to open the same database
again) runs on SQLite (a file under tmp_path) and on PostgreSQL (a fresh database on the session's private
cluster, :mod:`tests.component._pg_fixtures`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ghostmesh.state import hash_secret
from ghostmesh.store.base import AuthKeyRec, NodeRec
from ghostmesh.store.postgres import PostgresStore
from ghostmesh.store.sql import SqlStore
from ghostmesh.store.sqlite import SqliteStore


def node_rec(
    name: str = "a", key: str = "k1", v4: str = "100.64.0.1", v6: str = "fd7a:115c:a1e0::1"
) -> NodeRec:
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


def auth_key_rec(key_id: str = "aaaaaaaaaaaa", *, reusable: bool = False) -> AuthKeyRec:
    return AuthKeyRec(
        id=key_id, hash=hash_secret("s"), user="default", reusable=reusable, created=1.0, expires=100.0
    )


@dataclass(frozen=True)
class Backend:
    kind: str  # "sqlite" or "postgres"
    open: Callable[[], SqlStore]  # a new store on the test's database (the same one each call)


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "sqlite":
        path = tmp_path / "db.sqlite"
        return Backend("sqlite", lambda: SqliteStore(path))
    dsn: str = request.getfixturevalue("pg_dsn")  # only the postgres runs start the cluster
    return Backend("postgres", lambda: PostgresStore(dsn))


@pytest.fixture
def store(backend: Backend) -> Iterator[SqlStore]:
    """An empty store on the test's database."""
    s = backend.open()
    yield s
    s.close()
