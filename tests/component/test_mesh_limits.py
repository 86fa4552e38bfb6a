"""What one node, one source address or a crowd may cost a real ghostmesh: status reports per node, the
route rows they audit, failed authentications per source, calls and connections, the audit page size,
the open-files limit, the gRPC options. Every refusal: RESOURCE_EXHAUSTED, one line, nothing changed,
counted."""

from __future__ import annotations

import asyncio
import json
import resource
import sys
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from ghostcore import auditchain
from ghostcore.errors import ConfigError
from ghostcore.pb.ghostmesh.v1 import admin_pb2 as apb
from ghostcore.pb.ghostmesh.v1 import admin_pb2_grpc as apb_grpc
from ghostcore.pb.ghostmesh.v1 import coordination_pb2 as pb
from ghostctl.cli import main as ghostctl
from ghostmesh.config import LimitsConfig, MeshConfig
from ghostmesh.limits import FD_RESERVE, WINDOW
from ghostmesh.server import RunningServer, raise_open_files, server_options
from tests.component._mesh_fixtures import (
    Clock,
    NodeClient,
    admin_tcp,
    admin_unix,
    auth_key,
    mesh_config,
    next_update,
    running,
    stream_error,
    tls_channel,
)

EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


def limited(tmp_path: Path, **limits: int | float) -> MeshConfig:
    return replace(mesh_config(tmp_path), limits=replace(LimitsConfig(), **limits))


def audit_rows(srv: RunningServer, *actions: str) -> list[auditchain.AuditRecord]:
    return [r for r in srv.store.list_audit() if r.action in actions]


def chain_ok(srv: RunningServer) -> bool:
    assert srv.hub.audit is not None
    return auditchain.verify(srv.store.list_audit(), srv.hub.audit.public_key).ok


async def test_flapping_route_reports_are_rate_limited_and_their_rows_coalesced(tmp_path: Path) -> None:
    clock = Clock()  # frozen: exactly the burst passes
    async with running(mesh_config(tmp_path), clock) as srv:
        key = await auth_key(srv, reusable=True)
        a = NodeClient(srv)
        node = await a.register(key, "router")
        routes = [f"10.{i}.0.0/16" for i in range(64)]
        accepted, refused = 0, []
        for i in range(40):  # 64 routes advertised, withdrawn, advertised, ...
            try:
                await a.report(advertised_routes=routes if i % 2 == 0 else [])
                accepted += 1
            except grpc.aio.AioRpcError as exc:
                refused.append(exc)
        assert accepted == 10  # limits.status_report_burst
        assert {e.code() for e in refused} == {EXHAUSTED}
        assert refused[0].details() == (
            "status reports: more than 2 per second (burst 10) from this node; nothing changed, "
            "report less often"
        )
        assert srv.hub.limits.refusals.status_reports == 30
        assert srv.state.routes.of_node(node.id) == []  # the last accepted report withdrew them all
        rows = audit_rows(srv, "route.advertise", "route.withdraw")
        assert len(rows) == 20  # limits.audit_rows_per_node_per_minute, not 640
        assert srv.hub.limits.refusals.audit_rows_coalesced == 620
        assert audit_rows(srv, "audit.coalesced") == []  # written when the window closes

        clock.now += WINDOW
        srv.hub.run_due()
        [summary] = audit_rows(srv, "audit.coalesced")
        assert (summary.actor, summary.target) == ("node:router", "router")
        assert json.loads(summary.detail)["dropped"] == {"route.advertise": 300, "route.withdraw": 320}
        assert chain_ok(srv)
        clock.now += 1
        await a.report(advertised_routes=routes)  # the bucket refilled: reports pass again
        assert len(srv.state.routes.of_node(node.id)) == 64
        await a.close()


async def test_failed_authentications_beyond_the_limit_are_refused_and_audited_once_a_minute(
    tmp_path: Path,
) -> None:
    clock = Clock()
    async with running(limited(tmp_path, auth_failures_per_minute=5), clock) as srv:
        key = await auth_key(srv, reusable=True)
        good = NodeClient(srv)
        await good.register(key, "good")
        body = pb.StatusReport().SerializeToString()

        async def bad_proof() -> grpc.StatusCode:  # a proof made for another body
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await good.send("ReportStatus", body, good.signed("ReportStatus", b"other"))
            return info.value.code()

        async def stranger() -> grpc.aio.AioRpcError:  # a valid proof, for a key that is no node's
            client = NodeClient(srv)
            try:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await client.report()
                return info.value
            finally:
                await client.close()

        assert [await bad_proof() for _ in range(3)] == [grpc.StatusCode.UNAUTHENTICATED] * 3
        assert (await stranger()).code() == grpc.StatusCode.NOT_FOUND
        async with admin_tcp(srv) as tcp:  # a bad API key counts too
            bearer = (("authorization", "Bearer gmapi_000000000000_" + "x" * 43),)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await tcp.ListNodes(apb.ListNodesRequest(), metadata=bearer, timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # 5 failures: from now on this source's failing attempts are refused, its good ones pass
        assert await bad_proof() == EXHAUSTED
        refused = await stranger()
        assert refused.code() == EXHAUSTED
        assert refused.details() == "too many failed authentications from 127.0.0.1; retry in 60 s"
        await good.report()  # a node with good credentials behind the same address is not locked out
        info_resp = await good.call("GetServerInfo", pb.GetServerInfoRequest(), ())
        assert info_resp.server_key == srv.server_key.base64()
        async with admin_unix(srv) as admin:  # the local admin is never limited
            await admin.ListNodes(apb.ListNodesRequest(), timeout=5)
        assert (srv.hub.limits.refusals.auth_failures, srv.hub.limits.refusals.auth_refused) == (7, 2)
        assert audit_rows(srv, "auth.failed") == []

        clock.now += WINDOW
        srv.hub.run_due()
        [row] = audit_rows(srv, "auth.failed")
        assert (row.actor, row.target, row.remote) == ("system", "127.0.0.1", "127.0.0.1")
        detail = json.loads(row.detail)
        assert (detail["failures"], detail["refused"]) == (7, 2)
        assert detail["methods"] == {"ReportStatus": 6, "ListNodes": 1}
        assert await bad_proof() == grpc.StatusCode.UNAUTHENTICATED  # a new window
        assert chain_ok(srv)
        await good.close()


async def test_calls_in_flight_are_limited_per_source_and_in_total(tmp_path: Path) -> None:
    async with running(limited(tmp_path, calls_per_source=2, calls_total=3)) as srv:
        key = await auth_key(srv, reusable=True)
        nodes = [NodeClient(srv) for _ in range(3)]
        for i, n in enumerate(nodes):
            await n.register(key, f"n{i}")
        streams = [n.sync() for n in nodes[:2]]
        for call in streams:
            await next_update(call)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await nodes[2].register(key, "n2")
        assert info.value.code() == EXHAUSTED
        assert info.value.details() == (
            "too many calls: 2 calls in flight from 127.0.0.1 (limits.calls_per_source); retry shortly"
        )
        assert srv.hub.limits.refusals.calls_per_source == 1
        async with admin_unix(srv) as admin:  # the admin socket is not counted
            await admin.ListNodes(apb.ListNodesRequest(), timeout=5)
        streams[0].cancel()
        await asyncio.sleep(0.2)
        await nodes[2].register(key, "n2")  # a slot is free again
        streams[1].cancel()
        for n in nodes:
            await n.close()

    async with running(limited(tmp_path / "total", calls_per_source=2, calls_total=2)) as srv:
        key = await auth_key(srv, reusable=True)
        nodes = [NodeClient(srv) for _ in range(3)]
        for i, n in enumerate(nodes):
            await n.register(key, f"n{i}")
        streams = [n.sync() for n in nodes[:2]]
        for call in streams:
            await next_update(call)
        third = nodes[2].sync()
        assert await stream_error(third) == EXHAUSTED
        assert srv.hub.limits.refusals.calls_total == 1
        for call in streams:
            call.cancel()
        for n in nodes:
            await n.close()


async def test_connections_beyond_the_total_are_closed_at_once(tmp_path: Path) -> None:
    async with running(limited(tmp_path, connections_total=2)) as srv:
        channels = [tls_channel(srv, own_connection=True) for _ in range(3)]
        try:
            answers = []
            for ch in channels:
                stub = apb_grpc.AdminStub(ch)
                try:
                    await stub.GetServerIdentity(apb.GetServerIdentityRequest(), timeout=2)
                except grpc.aio.AioRpcError as exc:
                    answers.append(exc.code())
            assert answers == [  # the first two are answered (UNAUTHENTICATED: no API key), not the third
                grpc.StatusCode.UNAUTHENTICATED,
                grpc.StatusCode.UNAUTHENTICATED,
                grpc.StatusCode.UNAVAILABLE,
            ]
            async with admin_unix(srv) as admin:
                await admin.ListNodes(apb.ListNodesRequest(), timeout=5)
        finally:
            for ch in channels:
                await ch.close()


def test_server_options_carry_the_limits(tmp_path: Path) -> None:
    cfg = limited(tmp_path, connections_total=100, streams_per_connection=8, pending_requests=500)
    opts = dict(server_options(cfg))
    assert opts["grpc.max_allowed_incoming_connections"] == 100
    assert opts["grpc.max_concurrent_streams"] == 8
    assert opts["grpc.server.max_pending_requests"] == 500
    assert opts["grpc.server.max_pending_requests_hard_limit"] == 1000
    assert opts["grpc.server_handshake_timeout_ms"] == 10_000


async def test_list_audit_is_paged_and_verify_still_reads_all(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with running(mesh_config(tmp_path)) as srv:
        with srv.hub.transaction() as tx:
            for i in range(1001):
                tx.record("system", "node.delete", f"n{i}")
        async with admin_unix(srv) as admin:
            for limit in (0, 5000):
                got = await admin.ListAudit(apb.ListAuditRequest(limit=limit), timeout=10)
                assert [e.seq for e in got.entries] == list(range(1, 1001))
            rest = await admin.ListAudit(apb.ListAuditRequest(after_seq=1000), timeout=10)
            assert [e.seq for e in rest.entries] == [1001]
        argv = ["--server", f"unix:{srv.admin_socket}", "audit", "verify"]
        assert await asyncio.to_thread(ghostctl, argv) == 0
        assert "ok: 1001 entries verified (last seq 1001)" in capsys.readouterr().out


@pytest.fixture
def nofile() -> object:
    """RLIMIT_NOFILE as it was, put back after the test."""
    before = resource.getrlimit(resource.RLIMIT_NOFILE)
    yield before
    resource.setrlimit(resource.RLIMIT_NOFILE, before)


async def test_open_files_limit_is_raised_to_what_the_connections_need(
    tmp_path: Path, nofile: tuple[int, int]
) -> None:
    hard = nofile[1]
    want = 2000
    if hard != resource.RLIM_INFINITY and hard < want + FD_RESERVE:
        pytest.skip(f"the hard limit {hard} is too low for this test")
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
    async with running(limited(tmp_path, connections_total=want)) as srv:
        assert srv.open_files == want + FD_RESERVE
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (want + FD_RESERVE, hard)


def test_a_hard_limit_below_the_need_is_refused_naming_the_numbers(nofile: tuple[int, int]) -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (512, nofile[1]))
    assert raise_open_files(LimitsConfig(connections_total=100)) == 512  # enough already: kept
    with pytest.raises(ConfigError) as info:
        raise_open_files(LimitsConfig(connections_total=nofile[1]))
    assert str(info.value) == (
        f"limits.connections_total: {nofile[1]} connections need {nofile[1] + FD_RESERVE} open files, but "
        f"RLIMIT_NOFILE's hard limit is {nofile[1]}; raise it (LimitNOFILE=, ulimit -Hn) or lower "
        "limits.connections_total"
    )


async def test_ghostmesh_refuses_to_start_when_the_hard_limit_is_too_low(tmp_path: Path) -> None:
    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))

    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ghostmesh.app", "--bind", "127.0.0.1:0",
        "--state-dir", str(tmp_path / "state"), "--admin-socket", str(tmp_path / "admin.sock"),
        stderr=asyncio.subprocess.PIPE, preexec_fn=low_limit,
    )  # fmt: skip
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 1
    assert err.decode().splitlines() == [
        f"ghostmesh: limits.connections_total: 16384 connections need {16384 + FD_RESERVE} open files, "
        "but RLIMIT_NOFILE's hard limit is 1024; raise it (LimitNOFILE=, ulimit -Hn) or lower "
        "limits.connections_total"
    ]
    assert not (tmp_path / "state").exists()  # refused before anything was made
