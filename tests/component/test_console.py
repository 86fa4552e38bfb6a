"""The web console over real HTTP on loopback: every page needs a login, every POST its CSRF token (a
refused one changes nothing), the security headers are on every answer, failed logins count like failed
gRPC authentications, and each action is made and audited as the Admin service makes it."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import ssl
import sys
from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest

from ghostcore.pb.ghostmesh.v1 import admin_pb2 as apb
from ghostmesh.config import LimitsConfig
from ghostmesh.server import RunningServer
from tests.component._console_fixtures import api_key, base_url, client, console_config, login
from tests.component._mesh_fixtures import Clock, NodeClient, admin_unix, auth_key, next_update, running

PAGES = ("/nodes", "/users", "/keys", "/routes", "/policy", "/audit", "/mesh")
ACTIONS = (
    "/nodes/rename", "/nodes/expire", "/nodes/delete", "/keys/create", "/keys/revoke", "/routes/approve",
    "/policy/check", "/policy/apply", "/audit/verify", "/logout",
)  # fmt: skip


def last_seq(srv: RunningServer) -> int:
    last = srv.store.last_audit()
    return last.seq if last is not None else 0


def entries_after(srv: RunningServer, seq: int) -> list[tuple[str, str, str, str]]:
    return [(e.actor, e.action, e.target, e.remote) for e in srv.store.list_audit(seq, 100)]


async def test_every_page_and_action_needs_a_login(tmp_path: Path) -> None:
    async with running(console_config(tmp_path)) as srv, client() as http:
        base = base_url(srv)
        for path in PAGES:
            async with http.get(base + path, allow_redirects=False) as resp:
                assert (resp.status, resp.headers["Location"]) == (303, "/login"), path
        before = last_seq(srv)
        for path in ACTIONS:
            async with http.post(base + path, data={"ref": "1", "csrf": "x"}, allow_redirects=False) as resp:
                assert resp.status == 401, path
        async with http.get(base + "/events") as resp:
            assert resp.status == 401
        async with http.get(base + "/nodes", cookies={"ghostmesh_console": "forged"}) as resp:
            assert "Log in" in await resp.text()
        assert last_seq(srv) == before


async def test_security_headers_and_cookie(tmp_path: Path) -> None:
    async with running(console_config(tmp_path)) as srv, client() as http:
        base = base_url(srv)
        key, _ = await api_key(srv)
        async with http.post(f"{base}/login", data={"api_key": key}, allow_redirects=False) as resp:
            cookie = resp.headers["Set-Cookie"]
        assert "HttpOnly" in cookie
        assert "SameSite=Strict" in cookie
        assert "Path=/" in cookie
        assert "Secure" not in cookie  # plain http on loopback: a browser would drop a Secure cookie
        for path in ("/login", *PAGES, "/static/console.js", "/static/console.css"):
            async with http.get(base + path) as resp:
                assert resp.status == 200, path
                csp = resp.headers["Content-Security-Policy"]
                assert "unsafe-inline" not in csp
                assert "script-src 'self'" in csp
                assert "frame-ancestors 'none'" in csp
                assert resp.headers["X-Frame-Options"] == "DENY"
                assert resp.headers["Cache-Control"] == "no-store"
                body = await resp.text()
                assert "<script>" not in body
                assert "style=" not in body
        async with http.get(base + "/static/console.js") as resp:
            assert resp.content_type == "text/javascript"


async def test_tls_console_sets_a_secure_host_cookie(tmp_path: Path) -> None:
    async with running(console_config(tmp_path, tls=True)) as srv, client() as http:
        base = base_url(srv)
        assert base.startswith("https://127.0.0.1:")
        key, _ = await api_key(srv)
        ctx = ssl.create_default_context()
        ctx.load_verify_locations(cadata=srv.tls_cert_pem.decode())
        ctx.check_hostname = False  # the self-signed certificate names "ghostmesh", not 127.0.0.1
        url = f"{base}/login"
        async with http.post(url, data={"api_key": key}, allow_redirects=False, ssl=ctx) as resp:
            assert resp.status == 303
            cookie = resp.headers["Set-Cookie"]
        assert cookie.startswith("__Host-ghostmesh_console=")
        assert "Secure" in cookie
        with pytest.raises(aiohttp.ClientError):  # plain http gets no answer from a TLS port
            async with http.get(base.replace("https", "http") + "/login") as resp:
                await resp.read()


async def test_failed_logins_are_counted_and_limited(tmp_path: Path) -> None:
    cfg = replace(console_config(tmp_path), limits=LimitsConfig(auth_failures_per_minute=2))
    clock = Clock()
    async with running(cfg, clock) as srv, client() as http:
        base = base_url(srv)
        key, _ = await api_key(srv)
        bad = key[:-4] + ("aaaa" if not key.endswith("aaaa") else "bbbb")
        statuses = []
        for _ in range(3):
            async with http.post(f"{base}/login", data={"api_key": bad}, allow_redirects=False) as resp:
                statuses.append(resp.status)
                text = await resp.text()
        assert statuses == [401, 401, 429]
        assert "Too many failed logins from 127.0.0.1" in text
        assert key not in text
        assert bad not in text
        assert srv.hub.limits.refusals.auth_failures == 3
        assert srv.hub.limits.refusals.auth_refused == 1
        csrf = await login(http, base, key)  # a good key passes while the source is limited, like gRPC
        assert csrf
        clock.now += 61  # the window closes: its summary row is written by the hub's timer
        srv.hub.run_due()
        rows = [e for e in srv.store.list_audit(0, 100) if e.action == "auth.failed"]
        assert [(e.actor, e.target) for e in rows] == [("system", "127.0.0.1")]
        assert json.loads(rows[0].detail)["methods"] == {"console.login": 3}


async def test_csrf_refusal_changes_nothing(tmp_path: Path) -> None:
    async with running(console_config(tmp_path)) as srv, client() as http:
        base = base_url(srv)
        node = await NodeClient(srv).register(await auth_key(srv), "alpha")
        key, _ = await api_key(srv)
        csrf = await login(http, base, key)
        before = last_seq(srv)
        for token in (None, "", csrf[:-1] + ("A" if csrf[-1] != "A" else "B")):
            data = {"ref": str(node.id), "new_name": "mallory"}
            if token is not None:
                data["csrf"] = token
            async with http.post(f"{base}/nodes/rename", data=data, allow_redirects=False) as resp:
                assert resp.status == 403
            async with http.post(f"{base}/nodes/delete", data=data, allow_redirects=False) as resp:
                assert resp.status == 403
        assert [n.name for n in srv.state.list_nodes()] == ["alpha"]
        assert last_seq(srv) == before


async def test_each_action_is_made_and_audited_like_the_admin_service(tmp_path: Path) -> None:
    async with running(console_config(tmp_path)) as srv, client() as http:
        base = base_url(srv)
        node_client = NodeClient(srv)
        node = await node_client.register(await auth_key(srv), "alpha")
        await node_client.report(advertised_routes=["10.9.0.0/24"])
        key, key_id = await api_key(srv)
        csrf = await login(http, base, key)
        actor = f"apikey:{key_id}"

        async def post(path: str, **data: str) -> tuple[int, str]:
            async with http.post(base + path, data={"csrf": csrf, **data}, allow_redirects=False) as resp:
                return resp.status, await resp.text()

        before = last_seq(srv)
        assert (await post("/nodes/rename", ref=str(node.id), new_name="bravo"))[0] == 303
        status, page = await post("/keys/create", user="", tags="", expiration="600", reusable="1")
        assert status == 200
        created = [k for k in srv.state.list_auth_keys() if k.reusable and k.expires - k.created == 600]
        assert len(created) == 1
        secret_start = f"gmauth_{created[0].id}_"
        assert secret_start in page  # shown once, on the answer to the creation
        async with http.get(base + "/keys") as resp:
            assert secret_start not in await resp.text()  # and never again
        assert (await post("/keys/revoke", id=created[0].id))[0] == 303
        assert (await post("/routes/approve", node=str(node.id), prefix="10.9.0.0/24"))[0] == 303
        policy = '[[acls]]\naction = "accept"\nsrc = ["*"]\ndst = ["*:*"]\n'
        assert (await post("/policy/apply", text=policy))[0] == 303
        assert (await post("/nodes/expire", ref=str(node.id)))[0] == 303
        assert (await post("/nodes/delete", ref=str(node.id)))[0] == 303
        rows = entries_after(srv, before)
        assert [r[1] for r in rows] == [
            "node.rename", "authkey.create", "authkey.expire", "route.approve", "policy.set",
            "node.expire", "node.delete",
        ]  # fmt: skip
        for who, _, _, remote in rows:
            assert who == actor
            assert remote.startswith("console:ipv4:127.0.0.1:")
        assert srv.state.list_nodes() == []
        async with http.get(base + "/audit") as resp:
            assert "node.delete" in await resp.text()
        status, page = await post("/audit/verify")
        assert status == 200
        assert f"ok: {last_seq(srv)} entries verified" in page


async def test_refused_actions_and_policy_errors_show_inline(tmp_path: Path) -> None:
    async with running(console_config(tmp_path)) as srv, client() as http:
        base = base_url(srv)
        key, _ = await api_key(srv)
        csrf = await login(http, base, key)
        before = last_seq(srv)
        data = {"csrf": csrf, "text": '[[acls]]\naction = "maybe"\n'}
        headers = {"Accept": "application/json"}
        async with http.post(f"{base}/policy/check", data=data, headers=headers) as resp:
            doc = json.loads(await resp.text())
        assert doc["ok"] is False
        assert any("acls[0]" in e for e in doc["errors"])
        async with http.post(f"{base}/policy/apply", data=data, allow_redirects=False) as resp:
            assert resp.status == 400
            page = await resp.text()
        assert 'class="error"' in page
        assert "acls[0]" in page
        assert "&lt;" not in data["text"]
        data = {"csrf": csrf, "ref": "nosuchnode"}
        async with http.post(f"{base}/nodes/delete", data=data) as resp:  # follows to /nodes
            assert "Refused:" in await resp.text()
        assert last_seq(srv) == before


async def test_session_ends_with_its_api_key(tmp_path: Path) -> None:
    async with running(console_config(tmp_path)) as srv, client() as http:
        base = base_url(srv)
        key, key_id = await api_key(srv)
        await login(http, base, key)
        async with admin_unix(srv) as admin:
            await admin.ExpireApiKey(apb.ExpireApiKeyRequest(id=key_id), timeout=5)
        async with http.get(f"{base}/nodes", allow_redirects=False) as resp:
            assert (resp.status, resp.headers["Location"]) == (303, "/login")
        assert srv.console is not None
        assert len(srv.console.console.sessions) == 0


async def test_events_stream_shows_a_node_joining(tmp_path: Path) -> None:
    async with running(console_config(tmp_path)) as srv, client() as http:
        base = base_url(srv)
        key, _ = await api_key(srv)
        await login(http, base, key)
        async with http.get(f"{base}/events") as resp:
            assert resp.content_type == "text/event-stream"

            async def picture() -> dict[str, list[object]]:
                while True:  # bounded by the wait_for around each call
                    line = await resp.content.readline()
                    if line.startswith(b"data: "):
                        doc: dict[str, list[object]] = json.loads(line[6:])
                        return doc

            first = await asyncio.wait_for(picture(), 5)
            assert first["nodes"] == []
            a = NodeClient(srv)
            await a.register(await auth_key(srv), "<script>x</script>")
            call = a.sync()
            await next_update(call)
            doc = first
            for _ in range(10):  # the registration, then the stream opening (each may be a picture)
                doc = await asyncio.wait_for(picture(), 5)
                if doc["nodes"] and doc["nodes"][0]["online"]:  # type: ignore[index]
                    break
            assert [(p["name"], p["online"]) for p in doc["nodes"]] == [("script-x-script", True)]  # type: ignore[index]
            call.cancel()


async def test_the_process_prints_and_serves_its_console(tmp_path: Path) -> None:
    cfg = tmp_path / "ghostmesh.toml"
    cfg.write_text('[console]\nlisten = "127.0.0.1:0"\n[log]\nlevel = "warning"\n')
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ghostmesh.app", "--config", str(cfg), "--bind", "127.0.0.1:0",
        "--state-dir", str(tmp_path / "state"), "--admin-socket", str(tmp_path / "run" / "admin.sock"),
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        lines = [(await asyncio.wait_for(proc.stderr.readline(), 20)).decode() for _ in range(2)]
        found = re.match(r"ghostmesh: web console on (http://127\.0\.0\.1:\d+)/$", lines[1].strip())
        assert found, lines
        async with client() as http, http.get(found.group(1) + "/login") as resp:
            assert resp.status == 200
            assert "API key" in await resp.text()
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 20) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
