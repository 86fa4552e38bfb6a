"""The Admin service: unix socket without credentials, TCP only with a valid API key."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import grpc
import pytest

from ghostcore.pb.ghostmesh.v1 import admin_pb2 as apb
from ghostcore.pb.ghostmesh.v1 import admin_pb2_grpc as apb_grpc
from tests.component._mesh_fixtures import NodeClient, admin_unix, mesh_config, running, tls_channel


async def test_admin_socket_is_root_only_and_needs_no_credentials(tmp_path: Path) -> None:
    async with running(mesh_config(tmp_path)) as srv:
        mode = srv.admin_socket.stat().st_mode
        assert stat.S_ISSOCK(mode)
        assert stat.S_IMODE(mode) == 0o600
        assert stat.S_IMODE(os.stat(srv.admin_socket.parent).st_mode) == 0o700
        async with admin_unix(srv) as admin:
            user = await admin.CreateUser(apb.CreateUserRequest(name="alice"), timeout=5)
            assert user.name == "alice"
            users = await admin.ListUsers(apb.ListUsersRequest(), timeout=5)
            assert [u.name for u in users.users] == ["alice"]
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await admin.CreateUser(apb.CreateUserRequest(name="alice"), timeout=5)
            assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
            created = await admin.CreateAuthKey(
                apb.CreateAuthKeyRequest(user="alice", reusable=True, tags=["tag:web"]), timeout=5
            )
            assert created.secret.startswith(f"gmauth_{created.key.id}_")
            listed = await admin.ListAuthKeys(apb.ListAuthKeysRequest(user="alice"), timeout=5)
            assert [k.id for k in listed.keys] == [created.key.id]
            assert all(created.secret.split("_", 2)[2] not in str(k) for k in listed.keys)
            node = NodeClient(srv)
            registered = await node.register(created.secret, "web")
            assert list(registered.tags) == ["tag:web"]
            assert registered.user == "alice"
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await admin.DeleteUser(apb.DeleteUserRequest(name="alice"), timeout=5)
            assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS  # Conflict: still owns nodes
            renamed = await admin.RenameNode(apb.RenameNodeRequest(ref="web", new_name="www"), timeout=5)
            assert renamed.name == "www"
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await admin.RenameNode(apb.RenameNodeRequest(ref="www", new_name="Not Valid"), timeout=5)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await admin.DeleteNode(apb.DeleteNodeRequest(ref="nope"), timeout=5)
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
            nodes = await admin.ListNodes(apb.ListNodesRequest(user="alice"), timeout=5)
            assert [n.name for n in nodes.nodes] == ["www"]
            await admin.DeleteNode(apb.DeleteNodeRequest(ref=str(registered.id)), timeout=5)
            await admin.DeleteUser(apb.DeleteUserRequest(name="alice"), timeout=5)
            await node.close()


async def test_admin_over_tcp_needs_api_key(tmp_path: Path) -> None:
    async with running(mesh_config(tmp_path)) as srv:
        async with admin_unix(srv) as local:
            created = await local.CreateApiKey(apb.CreateApiKeyRequest(expiration_seconds=3600), timeout=5)
            short = await local.CreateApiKey(apb.CreateApiKeyRequest(), timeout=5)
            await local.ExpireApiKey(apb.ExpireApiKeyRequest(id=short.key.id), timeout=5)
        api_key = created.secret
        assert api_key.startswith(f"gmapi_{created.key.id}_")
        channel = tls_channel(srv)
        remote: Any = apb_grpc.AdminStub(channel)
        wrong = api_key[:-4] + ("AAAA" if not api_key.endswith("AAAA") else "BBBB")
        for md in (
            (),
            (("authorization", f"Bearer {wrong}"),),
            (("authorization", f"Bearer {short.secret}"),),
            (("authorization", "Basic abc"),),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await remote.ListNodes(apb.ListNodesRequest(), metadata=md, timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert api_key.split("_", 2)[2] not in (info.value.details() or "")
        ok = (("authorization", f"Bearer {api_key}"),)
        nodes = await remote.ListNodes(apb.ListNodesRequest(), metadata=ok, timeout=5)
        assert list(nodes.nodes) == []
        keys = await remote.ListApiKeys(apb.ListApiKeysRequest(), metadata=ok, timeout=5)
        by_id = {k.id: k for k in keys.keys}
        assert not by_id[created.key.id].expired
        assert by_id[created.key.id].last_used_unix > 0
        assert by_id[short.key.id].expired
        await channel.close()


async def test_user_bindings_over_the_admin_api(tmp_path: Path) -> None:
    """CreateUser with an OIDC subject, BindUser, UnbindUser: one-line refusals with the right code and
    nothing changed; each change audited. This server has no [oidc]: the issuer must be given."""
    iss = "https://idp.example.com"
    async with running(mesh_config(tmp_path)) as srv, admin_unix(srv) as admin:

        async def refused(call: Any, request: Any) -> tuple[grpc.StatusCode, str]:
            before = (list(srv.store.list_users()), len(srv.store.list_audit()))
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call(request, timeout=5)
            assert (list(srv.store.list_users()), len(srv.store.list_audit())) == before
            assert "\n" not in (info.value.details() or "")
            return info.value.code(), info.value.details() or ""

        code, why = await refused(admin.CreateUser, apb.CreateUserRequest(name="alice", oidc_subject="s1"))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert why.endswith("pass the account's issuer (--issuer URL)")
        alice = await admin.CreateUser(
            apb.CreateUserRequest(name="alice", oidc_subject="s1", oidc_issuer=iss + "/"), timeout=5
        )
        assert (alice.oidc_issuer, alice.oidc_subject) == (iss, "s1")
        entry = srv.store.list_audit()[-1]
        assert (entry.action, entry.target) == ("user.create", "alice")
        assert '"oidc_subject":"s1"' in entry.detail.replace(" ", "")
        await admin.CreateUser(apb.CreateUserRequest(name="bob"), timeout=5)
        bind = apb.BindUserRequest
        code, _ = await refused(admin.BindUser, bind(name="bob", oidc_subject="s1", oidc_issuer=iss))
        assert code == grpc.StatusCode.ALREADY_EXISTS  # alice's account
        code, _ = await refused(admin.BindUser, bind(name="bob", oidc_subject="", oidc_issuer=iss))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        code, _ = await refused(admin.BindUser, bind(name="nobody", oidc_subject="s2", oidc_issuer=iss))
        assert code == grpc.StatusCode.NOT_FOUND
        bob = await admin.BindUser(bind(name="bob", oidc_subject="s2", oidc_issuer=iss), timeout=5)
        assert (bob.oidc_issuer, bob.oidc_subject) == (iss, "s2")
        rows = len(srv.store.list_audit())
        await admin.BindUser(bind(name="bob", oidc_subject="s2", oidc_issuer=iss), timeout=5)
        assert len(srv.store.list_audit()) == rows  # the same binding again changes nothing
        unbound = await admin.UnbindUser(apb.UnbindUserRequest(name="alice"), timeout=5)
        assert (unbound.oidc_issuer, unbound.oidc_subject) == ("", "")
        entry = srv.store.list_audit()[-1]
        assert (entry.actor, entry.action, entry.target) == ("admin@unix", "user.unbind", "alice")
        listed = await admin.ListUsers(apb.ListUsersRequest(), timeout=5)
        assert [(u.name, u.oidc_subject) for u in listed.users] == [("alice", ""), ("bob", "s2")]
