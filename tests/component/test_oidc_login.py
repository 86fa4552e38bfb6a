"""OIDC login end to end against a real OpenID provider (oidc-provider in node, see _oidc_fixtures):
in-process ghostmesh with ``auth_method = "oidc"``, a node client speaking the wire protocol as ghostlink
does (:class:`OidcNode`), httpx as the browser.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import httpx
import pytest

from ghostcore.errors import AuthError
from ghostcore.pb.ghostmesh.v1 import coordination_pb2 as pb
from ghostmesh.config import OidcConfig
from ghostmesh.oidc import MSG_BAD_STATE, MSG_LOGGED_IN
from ghostmesh.server import start_server
from tests.component._mesh_fixtures import auth_key, mesh_config
from tests.component._oidc_fixtures import Provider, browser_login, free_port, message, provider_available
from tests.component._oidc_mesh import (
    Clock,
    OidcNode,
    mesh,
    module_provider,
    node,
    oidc_config,
    snapshot,
)

pytestmark = pytest.mark.skipif(bool(provider_available()), reason=provider_available() or "ok")


@pytest.fixture(scope="module")
def idp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Provider, int]]:
    yield from module_provider(tmp_path_factory)


POLICY = """
[groups]
"group:eng" = ["oidc:engineering"]

[[acls]]
action = "accept"
src = ["group:eng"]
dst = ["ops:*"]
"""


async def test_login_registers_node_to_user_with_groups(tmp_path: Path, idp: tuple[Provider, int]) -> None:
    (tmp_path / "acls.toml").write_text(POLICY)
    cfg = oidc_config(tmp_path, idp, acl_file=str(tmp_path / "acls.toml"))
    async with mesh(cfg) as srv, node(srv) as alice, node(srv) as bob, node(srv) as ops:
        ops_node = await ops.register(await auth_key(srv, user="ops"), "ops")  # auth keys keep working
        before = snapshot(srv)
        _, url = await alice.register_or_login("", "laptop")
        assert url.startswith(f"{cfg.oidc.public_url}/oidc/login/")
        assert snapshot(srv) == before  # nothing written before the login completes
        waiter = asyncio.create_task(alice.wait_for_login())
        page = await browser_login(url, "alice")
        assert page.status_code == 200, page.text
        assert message(page) == MSG_LOGGED_IN
        got = await asyncio.wait_for(waiter, 10)
        assert (got.name, got.user) == ("laptop", "alice")
        user = srv.store.get_user("alice")
        assert user is not None
        assert user.oidc_subject == "alice"  # the provider's sub: its account id
        assert user.groups == ("engineering", "staff")
        entry = srv.store.list_audit()[-1]
        assert (entry.action, entry.target) == ("node.register", "laptop")
        assert '"via":"oidc"' in entry.detail.replace(" ", "")

        # bob (groups: sales) logs in too; the policy group "oidc:engineering" gives alice access only
        _, url = await bob.register_or_login("", "desk")
        waiter = asyncio.create_task(bob.wait_for_login())
        assert (await browser_login(url, "bob")).status_code == 200
        bob_node = await asyncio.wait_for(waiter, 10)
        compiler = srv.hub.mapper.compiler
        assert compiler.can_see(got.id, ops_node.id)
        assert compiler.can_see(ops_node.id, got.id)
        assert not compiler.can_see(bob_node.id, ops_node.id)
        rules = compiler.filter(ops_node.id)  # ops' inbound filter accepts alice's addresses, not bob's
        assert any(f"{got.addresses[0]}/32" in r.src for r in rules)
        assert not any(f"{bob_node.addresses[0]}/32" in r.src for r in rules)


async def test_authkey_server_refuses_join_without_key(tmp_path: Path) -> None:
    async with mesh(mesh_config(tmp_path)) as srv, node(srv) as n:
        with pytest.raises(AuthError, match=r"pass an auth key \(--auth\) to join"):
            await n.register_or_login("", "x")


async def test_bad_state_is_refused_and_changes_nothing(tmp_path: Path, idp: tuple[Provider, int]) -> None:
    cfg = oidc_config(tmp_path, idp)
    async with mesh(cfg) as srv, node(srv) as n:
        _, url = await n.register_or_login("", "laptop")
        before = snapshot(srv)
        async with httpx.AsyncClient() as browser:
            page = await browser.get(f"{cfg.oidc.public_url}/oidc/callback?code=abc&state=forged")
        assert page.status_code == 400
        assert message(page) == MSG_BAD_STATE
        assert snapshot(srv) == before
        assert srv.oidc is not None
        assert len(srv.oidc.pending) == 1  # the real login is still pending
        # ...and still completes, even when the user is quicker than the node's WaitForLogin
        assert (await browser_login(url, "carol")).status_code == 200
        assert (await n.wait_for_login()).user == "carol"


async def test_bad_nonce_is_refused_and_changes_nothing(tmp_path: Path, idp: tuple[Provider, int]) -> None:
    cfg = oidc_config(tmp_path, idp)
    async with mesh(cfg) as srv, node(srv) as n:
        oidc = srv.oidc
        assert oidc is not None
        _, url = await n.register_or_login("", "laptop")
        waiter = asyncio.create_task(n.wait_for_login())
        before = snapshot(srv)

        def tamper() -> None:  # the provider now holds the real nonce; ghostmesh expects another
            login = oidc.pending.for_node(n.key.public_key().base64(), oidc.clock())
            assert login is not None
            login.nonce = "not-the-nonce-sent"

        page = await browser_login(url, "alice", before_consent=tamper)
        assert page.status_code == 400
        assert message(page).startswith("login failed: the ID token is not valid (nonce")
        with pytest.raises(AuthError, match="ID token is not valid"):
            await asyncio.wait_for(waiter, 10)
        assert snapshot(srv) == before
        assert len(oidc.pending) == 0  # the state was consumed: a replay of the callback is refused too


async def test_expired_login_fails_wait(tmp_path: Path, idp: tuple[Provider, int]) -> None:
    clock = Clock()
    cfg = oidc_config(tmp_path, idp)
    async with mesh(cfg, clock) as srv, node(srv) as n:
        _, url = await n.register_or_login("", "laptop")
        clock.offset = cfg.oidc.login_timeout + 1
        with pytest.raises(AuthError, match="no login in progress for this node"):
            await n.wait_for_login()
        async with httpx.AsyncClient() as browser:
            page = await browser.get(url)
        assert page.status_code == 404
        assert srv.store.list_nodes() == []


async def test_pending_logins_are_capped_per_source(tmp_path: Path, idp: tuple[Provider, int]) -> None:
    base = oidc_config(tmp_path, idp)
    cfg = replace(base, oidc=replace(base.oidc, max_pending_per_source=2))
    async with mesh(cfg) as srv:
        assert srv.oidc is not None
        clients = [OidcNode(srv) for _ in range(3)]
        try:
            for n in clients[:2]:
                _, url = await n.register_or_login("", "laptop")
                assert url
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await clients[2].call("Register", pb.RegisterRequest(hostname="laptop"))
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert info.value.details() == (
                "too many OIDC logins in progress from 127.0.0.1 (2, oidc.max_pending_per_source); "
                "finish or let one expire first"
            )
            assert len(srv.oidc.pending) == 2  # nothing made or replaced
            assert srv.hub.limits.refusals.oidc_pending == 1
            _, again = await clients[0].register_or_login("", "laptop")  # the same node again: it fits
            assert again
        finally:
            for n in clients:
                await n.close()


async def test_discovery_failure_stops_start(tmp_path: Path) -> None:
    base = mesh_config(tmp_path)
    dead = f"http://127.0.0.1:{free_port()}"
    cfg = replace(
        base,
        server=replace(base.server, auth_method="oidc"),
        oidc=OidcConfig(
            issuer=dead,
            client_id="c",
            public_url="http://127.0.0.1:1",
            http_bind="127.0.0.1:0",
            allow_insecure_http=True,
        ),
    )
    with pytest.raises(Exception, match=r"oidc\.issuer: discovery at .* failed"):
        await start_server(cfg)


@pytest.mark.skipif(os.geteuid() != 0, reason="ghostlink join needs root")
async def test_ghostlink_join_prints_url_and_stops_on_ctrl_c(
    tmp_path: Path, idp: tuple[Provider, int]
) -> None:
    cfg = oidc_config(tmp_path, idp)
    state_dir = tmp_path / "link"
    async with mesh(cfg) as srv:
        proc = await asyncio.create_subprocess_exec(
            str(Path(sys.executable).parent / "ghostlink"), "join", "--server", srv.target,
            "--pin", srv.tls_pin,  # an OIDC join has no auth key to carry the pin
            "--state-dir", str(state_dir), "--backend", "wireguard-go", "--hostname", "cli",
            "--socket", str(tmp_path / "link.sock"),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert proc.stderr is not None
        try:
            lines: list[bytes] = []
            for _ in range(50):
                lines.append(await asyncio.wait_for(proc.stderr.readline(), 15))
                if b"open this URL" in lines[-1] or not lines[-1]:
                    break
            assert (
                lines[-1]
                .decode()
                .startswith(
                    f"ghostlink: to join, open this URL and log in: {cfg.oidc.public_url}/oidc/login/"
                )
            ), lines
            key_line = (await asyncio.wait_for(proc.stderr.readline(), 15)).decode()
            assert key_line.startswith("ghostlink: confirm only if the page names this node's key:"), key_line
            proc.send_signal(signal.SIGINT)
            assert await asyncio.wait_for(proc.wait(), 10) == 130
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        rest = await proc.stderr.read()
        assert b"Traceback" not in rest
        assert not state_dir.exists() or not any(state_dir.iterdir())  # nothing written
        assert srv.store.list_nodes() == []
