"""Routes on a real in-process ghostmesh: AddRoute / ApproveRoute / DeleteRoute / ListRoutes, node
advertisements through ReportStatus (auto-approved by the policy), failover when the primary's stream
ends, audit entries, the overlap refusal changing nothing, and ``ghostctl route`` over the admin socket."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import grpc
import pytest

from ghostcore.pb.ghostmesh.v1 import admin_pb2 as apb
from ghostcore.pb.ghostmesh.v1 import coordination_pb2 as pb
from ghostctl.cli import main
from ghostmesh.server import RunningServer
from tests.component._mesh_fixtures import NodeClient, admin_unix, auth_key, mesh_config, next_update, running

POLICY = """
[tag_owners]
"tag:router" = ["default"]

[auto_approvers]
routes = { "10.9.0.0/16" = ["tag:router"] }

[[acls]]
action = "accept"
src = ["*"]
dst = ["*:*"]
"""


async def _routes(admin: Any, node: str = "") -> set[tuple[str, str, bool, bool, bool, str]]:
    resp = await admin.ListRoutes(apb.ListRoutesRequest(node=node), timeout=5)
    return {(r.node, r.prefix, r.advertised, r.approved, r.primary, r.advertised_by) for r in resp.routes}


async def _audit(admin: Any) -> list[tuple[str, str, str, dict[str, Any]]]:
    resp = await admin.ListAudit(apb.ListAuditRequest(), timeout=5)
    return [(e.actor, e.action, e.target, json.loads(e.detail or "{}")) for e in resp.entries]


async def _until_peer(call: Any, name: str, pred: Any, wait: float = 5.0) -> pb.Node:
    """Read map updates until one upserts peer ``name`` satisfying ``pred``."""
    deadline = asyncio.get_running_loop().time() + wait
    while True:
        up = await next_update(call, max(0.05, deadline - asyncio.get_running_loop().time()))
        for p in up.peers_upserted:
            if p.name == name and pred(p):
                return p


async def _join(srv: RunningServer, key: str, name: str) -> tuple[NodeClient, Any]:
    c = NodeClient(srv)
    await c.register(key, name)
    call = c.sync()
    await next_update(call)  # the full map
    return c, call


async def test_routes_add_failover_advertise_and_refusals(tmp_path: Path) -> None:
    async with running(mesh_config(tmp_path)) as srv, admin_unix(srv) as admin:
        key = await auth_key(srv, reusable=True)
        client, ccall = await _join(srv, key, "client")
        r1, r1call = await _join(srv, key, "r1")
        r2, r2call = await _join(srv, key, "r2")

        await admin.AddRoute(apb.RouteRequest(node="r1", prefix="10.1.1.0/24"), timeout=5)
        got = await _until_peer(ccall, "r1", lambda p: "10.1.1.0/24" in p.allowed_ips)
        assert list(got.primary_routes) == ["10.1.1.0/24"]
        route = await admin.AddRoute(apb.RouteRequest(node="r2", prefix="10.1.1.0/24"), timeout=5)
        assert (route.approved, route.primary, route.advertised_by) == (True, False, "admin")
        assert await _routes(admin) == {
            ("r1", "10.1.1.0/24", True, True, True, "admin"),
            ("r2", "10.1.1.0/24", True, True, False, "admin"),
        }

        # bad input: refused in one line, nothing changes (no row, no audit entry, no map update)
        before = await _audit(admin)
        for bad, says in (
            ("100.64.1.0/24", "overlaps the overlay range 100.64.0.0/10"),
            ("fd7a:115c:a1e0:1::/64", "overlaps the overlay range fd7a:115c:a1e0::/48"),
            ("10.1.1.1/24", "host bits are set"),
            ("nonsense", "expected a prefix"),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await admin.AddRoute(apb.RouteRequest(node="r1", prefix=bad), timeout=5)
            assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert says in (exc.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await admin.AddRoute(apb.RouteRequest(node="nobody", prefix="10.1.1.0/24"), timeout=5)
        assert exc.value.code() == grpc.StatusCode.NOT_FOUND
        assert await _audit(admin) == before
        assert len(await _routes(admin)) == 2

        # failover: the primary's stream ends; the client hears of both routers in one go
        started = asyncio.get_running_loop().time()
        r1call.cancel()
        got = await _until_peer(ccall, "r2", lambda p: "10.1.1.0/24" in p.allowed_ips)
        assert asyncio.get_running_loop().time() - started < 2.0
        assert list(got.primary_routes) == ["10.1.1.0/24"]
        assert ("r1", "10.1.1.0/24", True, True, False, "admin") in await _routes(admin)
        assert ("r2", "10.1.1.0/24", True, True, True, "admin") in await _routes(admin, "r2")

        # delete: the route leaves r2's allowed_ips
        await admin.DeleteRoute(apb.RouteRequest(node="r2", prefix="10.1.1.0/24"), timeout=5)
        await _until_peer(ccall, "r2", lambda p: "10.1.1.0/24" not in p.allowed_ips)
        assert await _routes(admin, "r2") == set()

        # a node's own advertisement: unapproved until an admin approves it
        await r2.report(endpoints=["192.0.2.7:41641"], advertised_routes=["10.2.0.0/16"])
        assert await _routes(admin, "r2") == {("r2", "10.2.0.0/16", True, False, False, "node")}
        await admin.ApproveRoute(apb.RouteRequest(node="r2", prefix="10.2.0.0/16"), timeout=5)
        await _until_peer(ccall, "r2", lambda p: "10.2.0.0/16" in p.allowed_ips)
        # a bad advertisement is refused whole: the endpoints do not change either
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await r2.report(endpoints=["192.0.2.8:41641"], advertised_routes=["10.3.0.0/16", "0.0.0.0/0"])
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        nodes = await admin.ListNodes(apb.ListNodesRequest(), timeout=5)
        assert next(n for n in nodes.nodes if n.name == "r2").endpoints == ["192.0.2.7:41641"]

        log = await _audit(admin)
        mine = [(a, act, t, d.get("prefix")) for a, act, t, d in log if act.startswith("route.")]
        assert mine == [
            ("admin@unix", "route.add", "r1", "10.1.1.0/24"),
            ("admin@unix", "route.add", "r2", "10.1.1.0/24"),
            ("admin@unix", "route.delete", "r2", "10.1.1.0/24"),
            ("node:r2", "route.advertise", "r2", "10.2.0.0/16"),
            ("admin@unix", "route.approve", "r2", "10.2.0.0/16"),
        ]
        for c, call in ((client, ccall), (r1, r1call), (r2, r2call)):
            call.cancel()
            await c.close()


async def test_auto_approvers_and_policy_on_routes(tmp_path: Path) -> None:
    async with running(mesh_config(tmp_path)) as srv, admin_unix(srv) as admin:
        await admin.SetPolicy(apb.SetPolicyRequest(text=POLICY), timeout=5)
        tagged = await auth_key(srv, reusable=True, tags=["tag:router"])
        plain = await auth_key(srv, reusable=True)
        router, rcall = await _join(srv, tagged, "router")
        other, ocall = await _join(srv, plain, "other")
        for c in (router, other):
            await c.report(advertised_routes=["10.9.1.0/24", "10.8.0.0/16"], advertise_exit_node=True)
        rows = await _routes(admin)
        approved = {(n, p) for n, p, _, a, _, _ in rows if a}
        assert approved == {("router", "10.9.1.0/24")}  # inside the auto-approved /16, by a tagged node
        assert len(rows) == 8  # 2 nodes x (2 routes + 0.0.0.0/0 + ::/0)
        log = await _audit(admin)
        adv = [(a, d["prefix"], d["approved"]) for a, act, _, d in log if act == "route.advertise"]
        assert ("node:router", "10.9.1.0/24", True) in adv
        assert ("node:other", "10.9.1.0/24", False) in adv
        # the router's filter (sent on its stream) now covers its route
        deadline = asyncio.get_running_loop().time() + 5
        while True:
            up = await next_update(rcall, max(0.05, deadline - asyncio.get_running_loop().time()))
            if up.HasField("filter") and any(
                d.prefix == "10.9.1.0/24" for r in up.filter.rules for d in r.dst
            ):
                break
        # a new policy's auto-approvers approve what is already advertised (recorded as "system")
        wider = POLICY.replace(
            'routes = { "10.9.0.0/16"', 'routes = { "10.8.0.0/16" = ["tag:router"], "10.9.0.0/16"'
        )
        await admin.SetPolicy(apb.SetPolicyRequest(text=wider), timeout=5)
        assert ("router", "10.8.0.0/16", True, True, True, "node") in await _routes(admin, "router")
        assert ("other", "10.8.0.0/16", True, False, False, "node") in await _routes(admin, "other")
        log = await _audit(admin)
        assert log[-2][:3] == ("system", "route.approve", "router")  # then the admin's policy.set
        assert log[-2][3] == {"prefix": "10.8.0.0/16", "by": "auto_approvers"}
        assert log[-1][1] == "policy.set"
        for c, call in ((router, rcall), (other, ocall)):
            call.cancel()
            await c.close()


async def test_ghostctl_route_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    async def ctl(*args: str) -> tuple[int, str, str]:
        rc = await asyncio.to_thread(main, ["--server", f"unix:{srv.admin_socket}", *args])
        out, err = capsys.readouterr()
        return rc, out, "\n".join(line for line in err.splitlines() if line.startswith("ghostctl"))

    async with running(mesh_config(tmp_path)) as srv:
        key = await auth_key(srv, reusable=True)
        peer, call = await _join(srv, key, "peer01")
        rc, out, _ = await ctl("route", "add", "10.1.1.0/24", "via", "peer01")
        assert (rc, out.strip()) == (0, "route 10.1.1.0/24 via peer01: approved, primary")
        rc, out, _ = await ctl("route", "list")
        assert rc == 0
        lines = out.strip().splitlines()
        assert lines[0].split() == ["NODE", "PREFIX", "ADVERTISED", "APPROVED", "PRIMARY"]
        assert lines[1].split() == ["peer01", "10.1.1.0/24", "yes", "(admin)", "yes", "yes"]
        rc, out, err = await ctl("route", "add", "100.64.0.0/24", "via", "peer01")
        assert rc != 0
        assert "overlaps the overlay range 100.64.0.0/10" in err
        assert len(err.splitlines()) == 1
        rc, out, err = await ctl("route", "approve", "10.3.0.0/16", "via", "peer01")
        assert rc != 0
        assert "does not advertise 10.3.0.0/16" in err
        rc, out, _ = await ctl("-o", "json", "route", "list", "--node", "peer01")
        assert json.loads(out) == [
            {
                "node": "peer01",
                "node_id": peer_id(out),
                "prefix": "10.1.1.0/24",
                "advertised": True,
                "advertised_by": "admin",
                "approved": True,
                "primary": True,
            }
        ]
        rc, out, _ = await ctl("route", "del", "10.1.1.0/24", "via", "peer01")
        assert (rc, out.strip()) == (0, "removed route 10.1.1.0/24 via peer01")
        rc, out, _ = await ctl("-o", "json", "route", "list")
        assert json.loads(out) == []
        call.cancel()
        await peer.close()


def peer_id(out: str) -> int:
    return int(json.loads(out)[0]["node_id"])
