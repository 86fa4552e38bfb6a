"""The tests' PostgreSQL: one private cluster per test session (:mod:`lab.pgcluster`), a fresh database
per test.

Missing binaries skip the tests that need them, or fail them when ``GHOST_REQUIRE_NETNS=1`` (CI, as
root), like the netns helpers: a CI run must not pass by skipping them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from lab.pgcluster import PgCluster, cluster, pg_unavailable


def require_pg() -> None:
    """Skip the calling test without PostgreSQL, or fail it when GHOST_REQUIRE_NETNS=1 (CI)."""
    why = pg_unavailable()
    if why:
        if os.environ.get("GHOST_REQUIRE_NETNS") == "1":
            pytest.fail(f"PostgreSQL tests are required here (GHOST_REQUIRE_NETNS=1) but: {why}")
        pytest.skip(why)


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    require_pg()
    with cluster() as c:
        yield c


@pytest.fixture
def pg_dsn(pg_cluster: PgCluster) -> str:
    """The DSN of a fresh database on the session's cluster."""
    return pg_cluster.create_database()
