"""Bad input against a real ghostmesh: each gets its gRPC status, nothing is written, the server serves on."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest

from ghostcore import nodeauth
from ghostcore.keys import PrivateKey
from ghostcore.pb.ghostmesh.v1 import admin_pb2 as apb
from ghostcore.pb.ghostmesh.v1 import coordination_pb2 as pb
from ghostmesh.server import RunningServer
from tests.component._mesh_fixtures import NodeClient, admin_unix, auth_key, mesh_config, running


async def _snapshot(srv: RunningServer) -> tuple[list[str], list[tuple[str, int]]]:
    async with admin_unix(srv) as admin:
        nodes = await admin.ListNodes(apb.ListNodesRequest(), timeout=5)
        keys = await admin.ListAuthKeys(apb.ListAuthKeysRequest(), timeout=5)
    return sorted(n.name for n in nodes.nodes), sorted((k.id, k.used_count) for k in keys.keys)


async def _refused(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call  # type: ignore[misc]
    return info.value


@pytest.mark.parametrize("case", ["wrong", "expired", "spent", "revoked", "malformed", "missing"])
async def test_bad_auth_keys(tmp_path: Path, case: str) -> None:
    async with running(mesh_config(tmp_path)) as srv:
        single = await auth_key(srv)
        short = await auth_key(srv, expiration_seconds=1)
        first = NodeClient(srv)
        await first.register(single, "first")  # spends the single-use key
        if case == "revoked":
            reusable = await auth_key(srv, reusable=True)
            async with admin_unix(srv) as admin:
                expired = await admin.ExpireAuthKey(
                    apb.ExpireAuthKeyRequest(id=reusable.split("_")[1]), timeout=5
                )
                assert expired.expired
        if case == "expired":
            srv.hub.clock = lambda: time.time() + 5  # the server's clock moves past the key's expiry
        text = {
            "wrong": single[:-4] + "AAAA",
            "expired": short,
            "spent": single,
            "revoked": reusable if case == "revoked" else "",
            "malformed": "gmauth_nonsense",
            "missing": "",
        }[case]
        before = await _snapshot(srv)
        node = NodeClient(srv)
        err = await _refused(node.register(text, "intruder"))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        expected = {
            "wrong": "not valid",
            "expired": "has expired",
            "spent": "spent",
            "revoked": "revoked",
            "malformed": "malformed",
            "missing": "not registered",
        }[case]
        assert expected in (err.details() or "")
        if text:
            assert text.split("_", 2)[-1] not in (err.details() or "")  # the secret is never echoed
        assert await _snapshot(srv) == before
        await first.close()
        await node.close()


async def test_invalid_wireguard_key_in_metadata(tmp_path: Path) -> None:
    async with running(mesh_config(tmp_path)) as srv:
        key = await auth_key(srv)
        client = NodeClient(srv)
        body = pb.RegisterRequest(auth_key=key).SerializeToString()
        md = dict(client.signed("Register", body))
        md[nodeauth.MD_NODE_KEY] = "not-a-wireguard-key"
        before = await _snapshot(srv)
        err = await _refused(client.send("Register", body, tuple(md.items())))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "invalid public key" in (err.details() or "")
        err = await _refused(client.send("Register", body, ()))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED  # no credentials at all
        assert await _snapshot(srv) == before
        await client.close()


async def test_claiming_another_nodes_identity(tmp_path: Path) -> None:
    async with running(mesh_config(tmp_path)) as srv:
        key = await auth_key(srv, reusable=True)
        victim = NodeClient(srv)
        nv = await victim.register(key, "victim")
        attacker = NodeClient(srv)
        before = await _snapshot(srv)
        # the attacker signs with its own private key but claims the victim's public key
        for method, request in (
            ("Register", pb.RegisterRequest(auth_key=key, hostname="x")),
            ("ReportStatus", pb.StatusReport(endpoints=["198.51.100.1:1"])),
        ):
            body = request.SerializeToString()
            md = dict(attacker.signed(method, body))
            md[nodeauth.MD_NODE_KEY] = victim.pub
            err = await _refused(attacker.send(method, body, tuple(md.items())))
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "failed its proof of possession" in (err.details() or "")
        md = dict(attacker.signed("Sync", b""))
        md[nodeauth.MD_NODE_KEY] = victim.pub
        call = attacker.sync(tuple(md.items()))
        err = await _refused(call.read())
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        # a proof for one method replayed on another fails too
        replay = victim.signed("ReportStatus", b"")
        err = await _refused(victim.send("Register", b"", replay))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        assert await _snapshot(srv) == before
        assert srv.state.node(nv.id).endpoints == ()  # type: ignore[union-attr]
        await victim.close()
        await attacker.close()


async def test_stale_timestamp(tmp_path: Path) -> None:
    async with running(mesh_config(tmp_path)) as srv:
        key = await auth_key(srv)
        client = NodeClient(srv)
        before = await _snapshot(srv)
        body = pb.RegisterRequest(auth_key=key).SerializeToString()
        stale = client.signed("Register", body, ts_ms=int(time.time() * 1000) - 120_000)
        err = await _refused(client.send("Register", body, stale))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "stale" in (err.details() or "")
        assert await _snapshot(srv) == before
        await client.close()


async def test_oversized_request(tmp_path: Path) -> None:
    async with running(mesh_config(tmp_path)) as srv:
        key = await auth_key(srv)
        client = NodeClient(srv)
        before = await _snapshot(srv)
        big = pb.RegisterRequest(auth_key=key, hostname="x" * 100_000)  # max_message_bytes is 65536 here
        err = await _refused(client.call("Register", big))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert await _snapshot(srv) == before
        # a long hostname under the limit is refused by validation instead
        long_name = pb.RegisterRequest(auth_key=key, hostname="x" * 300)
        err = await _refused(client.call("Register", long_name))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert await _snapshot(srv) == before
        await client.close()


async def test_malformed_bytes_then_server_still_serves(tmp_path: Path) -> None:
    async with running(mesh_config(tmp_path)) as srv:
        key = await auth_key(srv)
        client = NodeClient(srv)
        before = await _snapshot(srv)
        for garbage in (b"\xff\xff\xff\xff", b"\x0a\xff\x01", bytes(range(256))):
            err = await _refused(client.send("Register", garbage))  # signed, but not a message
            assert err.code() != grpc.StatusCode.OK
        assert await _snapshot(srv) == before
        node = await client.register(key, "fine")
        assert node.name == "fine"
        info = await client.send("GetServerInfo", b"", ())
        assert info.server_key == srv.server_key.base64()
        await client.close()


async def test_unregistered_node_cannot_sync_or_report(tmp_path: Path) -> None:
    async with running(mesh_config(tmp_path)) as srv:
        client = NodeClient(srv, PrivateKey.generate())
        err = await _refused(client.sync().read())
        assert err.code() == grpc.StatusCode.NOT_FOUND
        err = await _refused(client.report())
        assert err.code() == grpc.StatusCode.NOT_FOUND
        await client.close()


async def test_bad_endpoints_refused(tmp_path: Path) -> None:
    async with running(mesh_config(tmp_path)) as srv:
        key = await auth_key(srv)
        client = NodeClient(srv)
        n = await client.register(key, "a")
        for eps in (["not-an-endpoint"], [f"192.0.2.1:{p}" for p in range(1, 18)]):
            err = await _refused(client.report(endpoints=eps))
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert srv.state.node(n.id).endpoints == ()  # type: ignore[union-attr]
        await client.close()


@pytest.mark.parametrize("where", ["endpoints", "turn_relay"])
@pytest.mark.parametrize(
    "text",
    [
        "[fe80::1%x\nremove=true]:41641",  # a zone ID carrying a newline: a second line of UAPI text
        "[fe80::1%eth0]:41641",  # any zone ID
        "192.0.2.1:41641\n",
        " 192.0.2.1:41641",
        "[FE80::1]:41641",  # not canonical (RFC 5952: lower case)
        "192.0.2.1:041641",
        "0.0.0.0:41641",  # unspecified: nowhere to send to
    ],
)
async def test_non_canonical_endpoint_is_refused_and_changes_nothing(
    tmp_path: Path, where: str, text: str
) -> None:
    async with running(mesh_config(tmp_path)) as srv:
        key = await auth_key(srv, reusable=True)
        client, peer = NodeClient(srv), NodeClient(srv)
        n = await client.register(key, "a")
        await peer.register(key, "b")
        await client.report(endpoints=["192.0.2.1:41641"], turn_relay="198.51.100.1:50000")
        before = (srv.state.node(n.id), list(srv.store.list_nodes()), len(srv.store.list_audit()))
        report = {"endpoints": [text]} if where == "endpoints" else {"turn_relay": text}
        err = await _refused(client.report(**report))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        details = err.details() or ""
        assert details.startswith(f"invalid {where.rstrip('s')} ")
        assert "\n" not in details
        assert (srv.state.node(n.id), list(srv.store.list_nodes()), len(srv.store.list_audit())) == before
        await client.close()
        await peer.close()
