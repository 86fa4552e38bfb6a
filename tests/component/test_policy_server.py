"""ghostmesh in-process with an ACL policy: visible peers and filters in maps, policy changes as deltas,
acl_file polling, the policy RPCs, refusals that change nothing, and tag ownership on auth keys."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest

from ghostcore.errors import ConfigError
from ghostcore.pb.ghostmesh.v1 import admin_pb2 as apb
from ghostcore.pb.ghostmesh.v1 import coordination_pb2 as pb
from ghostmesh.app import main
from ghostmesh.server import RunningServer, start_server
from tests.component._mesh_fixtures import (
    NodeClient,
    admin_tcp,
    admin_unix,
    auth_key,
    mesh_config,
    next_update,
    running,
)

POLICY = """
[groups]
"group:eng" = ["alice"]
[tag_owners]
"tag:server" = ["group:eng"]
[[acls]]
action = "accept"
src = ["group:eng"]
dst = ["tag:server:22"]
[[tests]]
src = "alice"
accept = ["tag:server:22"]
deny = ["tag:server:80"]
"""
WITH_BOB = POLICY.replace('["alice"]', '["alice", "bob"]', 1)


def peer_ids(u: pb.MapUpdate) -> set[int]:
    return {p.id for p in u.peers_upserted}


def online(u: pb.MapUpdate, node_id: int) -> bool:
    """Whether ``u`` upserts ``node_id`` as online."""
    return any(p.online for p in u.peers_upserted if p.id == node_id)


class Stream:
    """A Sync stream read by a task into a queue, so waiting for silence does not cancel the call."""

    def __init__(self, call: Any) -> None:
        self.call = call
        self.queue: asyncio.Queue[pb.MapUpdate] = asyncio.Queue()
        self.task = asyncio.get_running_loop().create_task(self._pump())

    async def _pump(self) -> None:
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.CancelledError):
            async for msg in self.call:
                self.queue.put_nowait(msg)

    async def next(self, wait: float = 3.0) -> pb.MapUpdate:
        return await asyncio.wait_for(self.queue.get(), wait)

    async def quiet(self, wait: float = 0.4) -> bool:
        """True if the stream sends nothing for ``wait`` seconds."""
        await asyncio.sleep(wait)
        return self.queue.empty()

    def cancel(self) -> None:
        self.call.cancel()
        self.task.cancel()


async def until_online(stream: Stream, full: pb.MapUpdate, node_id: int) -> None:
    """Read ``stream`` (whose full map was ``full``) until it has upserted ``node_id`` as online; every
    update on the way may carry that node and no other."""
    seen = online(full, node_id)
    for _ in range(10):  # bounded; each read waits at most Stream.next's timeout
        if seen:
            return
        u = await stream.next()
        assert peer_ids(u) <= {node_id}
        seen = online(u, node_id)
    raise AssertionError(f"node {node_id} never came online in this stream")


@contextlib.asynccontextmanager
async def mesh(tmp_path: Path, text: str = POLICY) -> AsyncIterator[tuple[RunningServer, Path]]:
    acl = tmp_path / "acls.toml"
    acl.write_text(text)
    cfg = mesh_config(tmp_path)
    cfg = replace(cfg, server=replace(cfg.server, acl_file=str(acl)))
    async with running(cfg) as srv:
        yield srv, acl


async def join(
    srv: RunningServer, user: str, name: str, tags: tuple[str, ...] = ()
) -> tuple[NodeClient, int]:
    c = NodeClient(srv)
    node = await c.register(await auth_key(srv, user=user, tags=list(tags)), name)
    return c, node.id


async def test_maps_hold_only_visible_peers_and_policy_changes_are_deltas(tmp_path: Path) -> None:
    async with mesh(tmp_path) as (srv, acl):
        a, a_id = await join(srv, "alice", "a")
        b, b_id = await join(srv, "bob", "b")
        s, s_id = await join(srv, "carol", "s", ("tag:server",))
        ca, cb, cs = Stream(a.sync()), Stream(b.sync()), Stream(s.sync())
        full_a, full_b, full_s = await ca.next(), await cb.next(), await cs.next()
        assert peer_ids(full_a) == {s_id}
        assert peer_ids(full_b) == set()  # bob may reach nothing and nothing may reach bob
        assert peer_ids(full_s) == {a_id}
        assert full_b.HasField("filter")
        assert list(full_b.filter.rules) == []
        (rule,) = full_s.filter.rules
        assert sorted(rule.src) == ["100.64.0.1/32", "fd7a:115c:a1e0::1/128"]
        assert [(d.prefix, d.first_port, d.last_port) for d in rule.dst] == [
            ("100.64.0.3/32", 22, 22),
            ("fd7a:115c:a1e0::3/128", 22, 22),
        ]
        # deltas while streams run: online changes reach only the peers that see the node. Each stream
        # may have opened before the other's full map was built (then that map already has it online) or
        # after (then a delta brings it); either way a and s hear of nobody but each other, b of nobody.
        await until_online(ca, full_a, s_id)
        await until_online(cs, full_s, a_id)
        assert await cb.quiet()

        async with admin_unix(srv) as admin:
            got = await admin.SetPolicy(apb.SetPolicyRequest(text=WITH_BOB), timeout=5)
            assert got.source == f"file:{acl}"
        assert acl.read_text() == WITH_BOB  # written through to the file
        ub = await cb.next()
        assert peer_ids(ub) == {s_id}
        us = await cs.next()
        assert peer_ids(us) == {b_id}
        assert us.HasField("filter")
        assert "100.64.0.2/32" in us.filter.rules[0].src
        assert await ca.quiet()  # alice's view did not change

        # the file is the source of truth: an edit applies without a restart
        tmp = acl.with_suffix(".new")
        tmp.write_text(POLICY)
        os.replace(tmp, acl)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        ub = await cb.next()
        assert list(ub.peers_removed) == [s_id]
        assert loop.time() - t0 < 2.0
        async with admin_unix(srv) as admin:
            log = await admin.ListAudit(apb.ListAuditRequest(), timeout=5)
        changes = [(e.actor, e.target) for e in log.entries if e.action == "policy.set"]
        assert changes == [("admin@unix", f"file:{acl}"), ("system", f"file:{acl}")]
        # an invalid edit is logged and ignored: the old policy stays
        acl.write_text(POLICY.replace("tag:server:22", "tag:nope:22"))
        await asyncio.sleep(1.2)
        async with admin_unix(srv) as admin:
            cur = await admin.GetPolicy(apb.GetPolicyRequest(), timeout=5)
        assert cur.text == POLICY
        assert await cb.quiet(0.2)
        for c in (ca, cb, cs):
            c.cancel()
        for n in (a, b, s):
            await n.close()


async def test_bad_policies_are_refused_and_change_nothing(tmp_path: Path) -> None:
    async with mesh(tmp_path) as (srv, acl), admin_unix(srv) as admin:
        before = await admin.GetPolicy(apb.GetPolicyRequest(), timeout=5)
        bad_tag = POLICY.replace('dst = ["tag:server:22"]', 'dst = ["tag:nope:22"]')
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await admin.SetPolicy(apb.SetPolicyRequest(text=bad_tag), timeout=5)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert 'acls[0].dst[0]: unknown tag "tag:nope"; declare it in [tag_owners]' in (
            info.value.details() or ""
        )
        failing = POLICY.replace('deny = ["tag:server:80"]', 'deny = ["tag:server:22"]')
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await admin.SetPolicy(apb.SetPolicyRequest(text=failing), timeout=5)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "tests[0].deny[0]" in (info.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await admin.SetPolicy(apb.SetPolicyRequest(text="[[acls]\n"), timeout=5)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        after = await admin.GetPolicy(apb.GetPolicyRequest(), timeout=5)
        assert after == before
        assert acl.read_text() == POLICY
        check = await admin.CheckPolicy(apb.CheckPolicyRequest(text=bad_tag + "\nbogus = 1\n"), timeout=5)
        assert not check.ok
        assert check.errors[0] == 'acls[0].dst[0]: unknown tag "tag:nope"; declare it in [tag_owners]'
        assert check.errors[1].startswith("tests[0].bogus: unknown key")  # the key lands in the last table
        ok = await admin.CheckPolicy(apb.CheckPolicyRequest(text=WITH_BOB), timeout=5)
        assert (ok.ok, ok.tests_passed) == (True, 2)
        answers = await admin.TestPolicy(
            apb.TestPolicyRequest(
                queries=[
                    apb.AccessQuery(src="alice", dst="tag:server:22"),
                    apb.AccessQuery(src="bob", dst="tag:server:22"),
                ]
            ),
            timeout=5,
        )
        assert [(a.allowed, a.reason) for a in answers.answers] == [
            (True, "acls[0] accepts"),
            (False, "no rule matches"),
        ]


async def test_auth_key_tags_need_an_owner(tmp_path: Path) -> None:
    async with mesh(tmp_path) as (srv, _), admin_unix(srv) as admin:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await admin.CreateAuthKey(apb.CreateAuthKeyRequest(user="bob", tags=["tag:nope"]), timeout=5)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "unknown tag" in (info.value.details() or "")
        # the admin (unix socket) may use any declared tag, for anyone
        await admin.CreateAuthKey(apb.CreateAuthKeyRequest(user="bob", tags=["tag:server"]), timeout=5)
        api = await admin.CreateApiKey(apb.CreateApiKeyRequest(), timeout=5)
        keys_before = len((await admin.ListAuthKeys(apb.ListAuthKeysRequest(), timeout=5)).keys)
        md = (("authorization", f"Bearer {api.secret}"),)
        async with admin_tcp(srv) as tcp:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await tcp.CreateAuthKey(
                    apb.CreateAuthKeyRequest(user="bob", tags=["tag:server"]), metadata=md, timeout=5
                )
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert 'user "bob" does not own "tag:server"' in (info.value.details() or "")
            await tcp.CreateAuthKey(
                apb.CreateAuthKeyRequest(user="alice", tags=["tag:server"]), metadata=md, timeout=5
            )
        keys_after = len((await admin.ListAuthKeys(apb.ListAuthKeysRequest(), timeout=5)).keys)
        assert keys_after == keys_before + 1  # only alice's key was created


async def test_invalid_acl_file_stops_the_start(tmp_path: Path) -> None:
    acl = tmp_path / "acls.toml"
    acl.write_text(
        POLICY.replace('group:eng"]\n[[acls]]', 'group:eng"]\n[[acls]]').replace("alice", "Alice!")
    )
    cfg = mesh_config(tmp_path)
    cfg = replace(cfg, server=replace(cfg.server, acl_file=str(acl)))
    with pytest.raises(ConfigError, match=r"^server\.acl_file: .*acls\.toml: invalid policy: groups\."):
        await start_server(cfg)
    acl.unlink()
    with pytest.raises(ConfigError, match=r"cannot read"):
        await start_server(cfg)


async def test_api_policy_is_stored_and_survives_restart(tmp_path: Path) -> None:
    cfg = mesh_config(tmp_path)
    async with running(cfg) as srv, admin_unix(srv) as admin:
        assert (await admin.GetPolicy(apb.GetPolicyRequest(), timeout=5)).source == "default"
        a, _ = await join(srv, "alice", "a")
        b, _ = await join(srv, "bob", "b")
        ca = a.sync()
        assert len((await next_update(ca)).peers_upserted) == 1  # no policy: everyone sees everyone
        await admin.SetPolicy(apb.SetPolicyRequest(text=POLICY), timeout=5)
        while True:
            u = await next_update(ca)
            if u.peers_removed:
                break
        ca.cancel()
        await a.close()
        await b.close()
    async with running(cfg) as srv, admin_unix(srv) as admin:
        got = await admin.GetPolicy(apb.GetPolicyRequest(), timeout=5)
        assert (got.source, got.text) == ("api", POLICY)


def test_ghostmesh_cli_refuses_an_invalid_acl_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "acls.toml").write_text(POLICY.replace("tag:server:22", "tag:nope:22"))
    cfg = tmp_path / "ghostmesh.toml"
    cfg.write_text(
        f'[server]\nbind = "127.0.0.1:0"\nacl_file = "acls.toml"\nadmin_socket = "{tmp_path}/a.sock"\n'
        f'state_dir = "{tmp_path}/state"\n'
    )
    assert main(["config", "check", "--config", str(cfg)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (
        f"ghostmesh: server.acl_file: {tmp_path}/acls.toml: invalid policy: "
        'acls[0].dst[0]: unknown tag "tag:nope"; declare it in [tag_owners]'
    )
    assert main(["--config", str(cfg)]) == 1  # the server does not start either
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("ghostmesh:")]
    assert lines == [err]
    (tmp_path / "acls.toml").write_text(POLICY)
    assert main(["config", "check", "--config", str(cfg)]) == 0
