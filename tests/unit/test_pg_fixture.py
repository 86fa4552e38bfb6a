"""The PostgreSQL test fixture's policy without PostgreSQL: skip on a developer machine, fail under
GHOST_REQUIRE_NETNS=1 (CI), so a CI run cannot pass by skipping the PostgreSQL tests."""

from __future__ import annotations

import pytest

from tests.component import _pg_fixtures


def test_missing_postgresql_skips_or_fails_when_required(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_pg_fixtures, "pg_unavailable", lambda: "PostgreSQL is not installed")
    monkeypatch.setenv("GHOST_REQUIRE_NETNS", "1")
    with pytest.raises(pytest.fail.Exception, match=r"required here .* PostgreSQL is not installed"):
        _pg_fixtures.require_pg()
    monkeypatch.setenv("GHOST_REQUIRE_NETNS", "0")
    with pytest.raises(pytest.skip.Exception, match="PostgreSQL is not installed"):
        _pg_fixtures.require_pg()


def test_available_postgresql_neither_skips_nor_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_pg_fixtures, "pg_unavailable", lambda: "")
    monkeypatch.setenv("GHOST_REQUIRE_NETNS", "1")
    _pg_fixtures.require_pg()
