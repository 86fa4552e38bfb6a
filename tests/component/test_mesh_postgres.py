"""ghostmesh in-process on PostgreSQL (``[database] type = "postgres"`` against the session's private
cluster): nodes register with a single-use and a reusable key and get their maps; a restart on the same
database keeps nodes, addresses and the server key (a file in state_dir, not in the database); the audit
log is in PostgreSQL and verifies; a second server on the same database is refused."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from ghostcore import auditchain as ac
from ghostcore.errors import ConfigError
from ghostmesh.config import DatabaseConfig
from ghostmesh.server import start_server
from ghostmesh.store.postgres import PostgresStore
from tests.component._mesh_fixtures import NodeClient, auth_key, mesh_config, next_update, running


async def test_register_and_map_on_postgres_survive_a_restart(tmp_path: Path, pg_dsn: str) -> None:
    cfg = replace(mesh_config(tmp_path), database=DatabaseConfig(type="postgres", dsn=pg_dsn))
    async with running(cfg) as srv:
        assert isinstance(srv.store, PostgresStore)
        single = await auth_key(srv)
        reusable = await auth_key(srv, reusable=True)
        a, b, c = NodeClient(srv), NodeClient(srv), NodeClient(srv)
        na = await a.register(single, "alpha")
        with pytest.raises(grpc.aio.AioRpcError) as spent:
            await c.register(single, "gamma")  # the single-use key is spent in the database
        assert spent.value.code() == grpc.StatusCode.UNAUTHENTICATED
        nb = await b.register(reusable, "beta")
        second = replace(mesh_config(tmp_path / "second"), database=cfg.database)
        with pytest.raises(ConfigError, match="another ghostmesh is using"):
            await start_server(second)  # one server per database
        assert list(na.addresses) == ["100.64.0.1", "fd7a:115c:a1e0::1"]
        call = a.sync()
        full = await next_update(call)
        assert (full.full, full.self.id) == (True, na.id)
        assert [p.id for p in full.peers_upserted] == [nb.id]
        call.cancel()
        server_key = srv.server_key
        a_key = a.key
        for client in (a, b, c):
            await client.close()
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == [
        "audit.key",
        "server.key",
        "tls.crt",
        "tls.key",
    ]
    async with running(cfg) as srv2:
        assert srv2.server_key == server_key
        a2 = NodeClient(srv2, a_key)
        again = await a2.register("", "alpha")
        assert (again.id, list(again.addresses)) == (na.id, list(na.addresses))
        entries = srv2.store.list_audit()
        assert {"node.register"} <= {e.action for e in entries}
        assert ac.verify(entries, srv2.hub.audit.public_key).ok
        await a2.close()
