"""Session-wide fixtures of the component tests: the private PostgreSQL cluster (one per session, shared by
every module that asks for it) and a fresh database on it per test."""

from tests.component._pg_fixtures import pg_cluster, pg_dsn

__all__ = ["pg_cluster", "pg_dsn"]
