"""A Register whose caller gave up is not committed: no never-connected node lands in everyone's map.

The server is slowed inside the Register handler (a blocking sleep longer than the client's deadline, as a
busy event loop or a slow disk would); the call then ends with DEADLINE_EXCEEDED on the client and the
registry stays empty. A retry with the same node key gives exactly one node, and another retry the same one.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from ghostcore.pb.ghostmesh.v1 import admin_pb2 as apb
from ghostcore.pb.ghostmesh.v1 import coordination_pb2 as pb
from ghostmesh.api.coordination import CoordinationServicer
from ghostmesh.server import RunningServer
from tests.component._mesh_fixtures import NodeClient, admin_unix, auth_key, mesh_config, running

SLOW_S = 0.5  # the handler's stall
DEADLINE_S = 0.2  # the client's deadline, shorter than the stall


async def _node_names(srv: RunningServer) -> list[str]:
    async with admin_unix(srv) as admin:
        nodes = await admin.ListNodes(apb.ListNodesRequest(), timeout=5)
    return sorted(n.name for n in nodes.nodes)


async def test_register_past_its_deadline_stores_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running(mesh_config(tmp_path)) as srv:
        key = await auth_key(srv, reusable=True)
        client = NodeClient(srv)
        original = CoordinationServicer._bound

        def slowed(self: CoordinationServicer, node_key: str) -> Any:
            time.sleep(SLOW_S)  # blocks the server's loop, past the caller's deadline
            return original(self, node_key)

        monkeypatch.setattr(CoordinationServicer, "_bound", slowed)
        body = pb.RegisterRequest(auth_key=key, hostname="phantom").SerializeToString()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await client.send("Register", body, wait=DEADLINE_S)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await asyncio.sleep(SLOW_S)  # the handler has run to its end
        assert await _node_names(srv) == []

        monkeypatch.setattr(CoordinationServicer, "_bound", original)
        first = await client.register(key, "phantom")
        again = await client.register(key, "phantom")
        assert first.id == again.id
        assert await _node_names(srv) == ["phantom"]
        await client.close()
