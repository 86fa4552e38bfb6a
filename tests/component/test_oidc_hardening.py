"""The OIDC login under attack, against the real OpenID provider (tests/fixtures/oidc, see _oidc_fixtures):

- a login URL shows a page naming the node and never redirects by itself; the button's POST needs the
  cookie of the browser that opened the page and the token derived from it, once;
- the provider's callback counts only in the browser that confirmed, once;
- the allow-lists refuse an account with a page, nothing created, one coalesced audit row, counted;
- an OIDC login does not take over a user an admin created until the admin binds it (ghostctl);
- the provider rotates its signing key between two logins: ghostmesh fetches the JWKS again, at most
  once per ``oidc.jwks_refresh_interval``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from joserfc.jwk import RSAKey

from ghostcore.errors import PermissionDenied
from ghostcore.pb.ghostmesh.v1 import admin_pb2 as apb
from ghostctl.cli import main as ghostctl
from ghostmesh.limits import WINDOW
from ghostmesh.oidc import MSG_BAD_STATE, MSG_LOGGED_IN
from ghostmesh.server import RunningServer
from tests.component._mesh_fixtures import admin_unix, auth_key
from tests.component._oidc_fixtures import (
    Provider,
    browser_login,
    confirm,
    csrf_of,
    free_port,
    message,
    provider,
    provider_available,
    provider_login,
)
from tests.component._oidc_mesh import Clock, mesh, module_provider, node, oidc_config, snapshot

pytestmark = pytest.mark.skipif(bool(provider_available()), reason=provider_available() or "ok")


@pytest.fixture(scope="module")
def idp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Provider, int]]:
    yield from module_provider(tmp_path_factory)


class CallbackReached(Exception):
    """The scripted browser was about to follow the provider's redirect to ghostmesh's callback."""


async def _stop_at_callback(request: httpx.Request) -> None:
    if request.url.path == "/oidc/callback":
        raise CallbackReached(str(request.url))


async def test_login_url_shows_the_node_and_never_redirects(
    tmp_path: Path, idp: tuple[Provider, int]
) -> None:
    """Before: GET /oidc/login/<id> answered 302 to the provider, naming nothing."""
    cfg = oidc_config(tmp_path, idp)
    async with mesh(cfg) as srv, node(srv) as n:
        _, url = await n.register_or_login("", "build-box")
        async with httpx.AsyncClient(follow_redirects=False) as browser:
            page = await browser.get(url)
        assert page.status_code == 200
        assert "location" not in page.headers
        assert page.headers["content-type"].startswith("text/html")
        csp = page.headers["content-security-policy"]
        assert "default-src 'none'" in csp
        assert "frame-ancestors 'none'" in csp
        assert f"form-action 'self' {idp[0].issuer}" in csp
        for fact in ("build-box", n.pub, "127.0.0.1", " s ago)"):
            assert fact in page.text
        assert "<script" not in page.text
        (cookie,) = page.headers.get_list("set-cookie")
        assert cookie.startswith(f"ghostmesh-login-{url.rpartition('/')[2]}=")
        assert "HttpOnly" in cookie
        assert "SameSite=Lax" in cookie
        assert srv.store.list_nodes() == []


async def test_confirmation_needs_this_browsers_cookie_and_token_once(
    tmp_path: Path, idp: tuple[Provider, int]
) -> None:
    """The attacker knows the login URL (they started the join) and can read the page's token, but cannot
    make the victim's browser confirm: the token belongs to the attacker's cookie, and another site's
    form post carries no cookie of ours."""
    cfg = oidc_config(tmp_path, idp)
    async with mesh(cfg) as srv, node(srv) as n:
        oidc = srv.oidc
        assert oidc is not None
        _, url = await n.register_or_login("", "laptop")
        async with (
            httpx.AsyncClient() as attacker,
            httpx.AsyncClient() as victim,
            httpx.AsyncClient() as other_site,
        ):
            attackers_token = csrf_of(await attacker.get(url))
            victims_token = csrf_of(await victim.get(url))
            for client, token in ((other_site, victims_token), (victim, attackers_token), (victim, "")):
                page = await client.post(url, data={"csrf": token})
                assert page.status_code == 403
                assert message(page).startswith("login failed: this page is stale or was not opened in")
            login = oidc.pending.for_node(n.pub, oidc.clock())
            assert login is not None
            assert not login.confirmed
            assert srv.hub.limits.refusals.oidc_refused == 3
            page = await victim.post(url, data={"csrf": victims_token})
            assert page.status_code == 303
            assert page.headers["location"].startswith(oidc.provider.metadata["authorization_endpoint"] + "?")
            assert "code_challenge_method=S256" in page.headers["location"]
            again = await victim.post(url, data={"csrf": victims_token})
            assert again.status_code == 403
            assert (
                message(again) == "login failed: this login was confirmed already; run ghostlink join again"
            )
            shown = await victim.get(url)
            assert shown.status_code == 409
            assert 'name="csrf"' not in shown.text
            gone = await victim.post(url.rpartition("/")[0] + "/no-such-login", data={"csrf": victims_token})
            assert gone.status_code == 404


async def test_callback_counts_only_in_the_confirming_browser_once(
    tmp_path: Path, idp: tuple[Provider, int], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    cfg = oidc_config(tmp_path, idp)
    async with mesh(cfg) as srv, node(srv) as n:
        _, url = await n.register_or_login("", "laptop")
        waiter = asyncio.create_task(n.wait_for_login())
        async with (
            httpx.AsyncClient(follow_redirects=True, event_hooks={"request": [_stop_at_callback]}) as victim,
            httpx.AsyncClient() as attacker,
        ):
            at_provider = await confirm(victim, url)
            login_cookie = victim.cookies.get(f"ghostmesh-login-{url.rpartition('/')[2]}") or ""
            with pytest.raises(CallbackReached) as reached:
                await provider_login(victim, at_provider, "alice", None)
            callback = str(reached.value)
            before = snapshot(srv)
            page = await attacker.get(callback)  # the code and state leaked to someone else
            assert page.status_code == 400
            assert message(page).startswith("login failed: this browser did not confirm the login")
            assert snapshot(srv) == before
            assert not waiter.done()
            victim.event_hooks = {"request": []}
            page = await victim.get(callback)
            assert page.status_code == 200, page.text
            assert message(page) == MSG_LOGGED_IN
            assert "Max-Age=0" in page.headers["set-cookie"]  # the login's cookie is spent
            assert (await asyncio.wait_for(waiter, 10)).user == "alice"
            replay = await victim.get(callback)
            assert replay.status_code == 400
            assert message(replay) == MSG_BAD_STATE
            # nothing that grants a login reaches a log: the login id, the code, the state, the cookie
            query = parse_qs(urlsplit(callback).query)
            secrets = [url.rpartition("/")[2], query["code"][0], query["state"][0], login_cookie]
            # the server's loggers (the test's own httpx browser logs the URLs it fetches, as browsers do)
            ours = [r for r in caplog.records if r.name.startswith(("ghostmesh", "aiohttp", "grpc"))]
            logged = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in ours)
            assert "oidc login refused (oidc:browser)" in logged  # the log was captured
            assert all(secret and secret not in logged for secret in secrets)


@pytest.mark.parametrize(
    ("lists", "refused", "why", "allowed"),
    [
        (
            {"allowed_domains": ["example.org"]},
            "alice",
            "login refused: email domain example.com is not in oidc.allowed_domains; ask an admin",
            None,
        ),
        (
            {"allowed_domains": ["example.com"], "allowed_groups": ["engineering"]},
            "bob",
            "login refused: none of this account's groups is in oidc.allowed_groups",
            "alice",
        ),
        (
            {"allowed_users": ["carol@example.com", "alice"]},
            "bob",
            "login refused: user bob is not in oidc.allowed_users; ask an admin",
            "carol",
        ),
    ],
)
async def test_allow_lists_refuse_with_a_page_and_nothing_created(  # noqa: PLR0917 - parametrized
    tmp_path: Path,
    idp: tuple[Provider, int],
    lists: dict[str, list[str]],
    refused: str,
    why: str,
    allowed: str | None,
) -> None:
    """Before: anyone the provider knows could join. The provider's accounts: ``<login>@example.com``
    (verified); alice in engineering and staff, bob in sales, others in no group."""
    clock = Clock()
    cfg = oidc_config(tmp_path, idp, **lists)
    async with mesh(cfg, clock) as srv, node(srv) as n:
        _, url = await n.register_or_login("", "laptop")
        waiter = asyncio.create_task(n.wait_for_login())
        before = snapshot(srv)
        page = await browser_login(url, refused)
        assert page.status_code == 403
        assert message(page) == why
        with pytest.raises(PermissionDenied) as info:
            await asyncio.wait_for(waiter, 10)
        assert str(info.value) == why  # the node's one line: the same reason
        assert snapshot(srv) == before  # no user, no node, no audit row yet
        assert srv.hub.limits.refusals.oidc_refused == 1
        clock.offset += WINDOW + 1  # the source's window closes: one coalesced row
        srv.hub.run_due()
        (row,) = [e for e in srv.store.list_audit() if e.action == "auth.failed"]
        assert (row.actor, row.target) == ("system", "127.0.0.1")
        detail = json.loads(row.detail)
        assert (detail["failures"], detail["methods"]) == (1, {"oidc:not_allowed": 1})
        if allowed is not None:
            _, url = await n.register_or_login("", "laptop")
            waiter = asyncio.create_task(n.wait_for_login())
            assert (await browser_login(url, allowed)).status_code == 200
            assert (await asyncio.wait_for(waiter, 10)).user == allowed


async def _ctl(srv: RunningServer, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    rc = await asyncio.to_thread(ghostctl, ["--server", f"unix:{srv.admin_socket}", *args])
    out, _ = capsys.readouterr()
    return rc, out


async def test_admin_created_users_are_not_taken_over_until_bound(
    tmp_path: Path, idp: tuple[Provider, int], capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: the first OIDC account whose name matched a user an admin made (even ``default``, which
    ``authkeys create`` makes) became that user, with its nodes and its place in the policy."""
    cfg = oidc_config(tmp_path, idp)
    async with mesh(cfg) as srv, node(srv) as n:
        assert (await _ctl(srv, capsys, "users", "create", "alice"))[0] == 0
        await auth_key(srv)  # makes "default"
        for login in ("alice", "default"):
            _, url = await n.register_or_login("", "laptop")
            waiter = asyncio.create_task(n.wait_for_login())
            before = snapshot(srv)
            page = await browser_login(url, login)
            assert page.status_code == 403
            assert message(page) == (
                f"login refused: user '{login}' exists and is bound to no OIDC account; an admin may bind "
                f"it to this account: ghostctl users bind {login} --oidc-subject {login} --issuer "
                f"{idp[0].issuer}"
            )
            with pytest.raises(PermissionDenied, match="exists and is bound to no OIDC account"):
                await asyncio.wait_for(waiter, 10)
            assert snapshot(srv) == before
        rc, out = await _ctl(srv, capsys, "users", "bind", "alice", "--oidc-subject", "alice")
        assert rc == 0
        assert out.strip() == f"bound user alice to OIDC alice at {idp[0].issuer}"
        entry = srv.store.list_audit()[-1]
        assert (entry.actor, entry.action, entry.target) == ("admin@unix", "user.bind", "alice")
        _, url = await n.register_or_login("", "laptop")
        waiter = asyncio.create_task(n.wait_for_login())
        assert (await browser_login(url, "alice")).status_code == 200
        assert (await asyncio.wait_for(waiter, 10)).user == "alice"
        rc, out = await _ctl(srv, capsys, "-o", "json", "users", "list")
        users = {u["name"]: u for u in json.loads(out)}
        assert (users["alice"]["oidc_subject"], users["alice"]["oidc_groups"]) == (
            "alice",
            ["engineering", "staff"],
        )
        assert users["default"]["oidc_subject"] == ""
        async with admin_unix(srv) as admin:
            unbound = await admin.UnbindUser(apb.UnbindUserRequest(name="alice"), timeout=5)
        assert (unbound.oidc_subject, list(unbound.oidc_groups)) == ("", [])
        assert srv.store.list_audit()[-1].action == "user.unbind"


def _jwks_file(path: Path, kid: str) -> Path:
    key = RSAKey.generate_key(2048, {"kid": kid, "use": "sig", "alg": "RS256"})
    path.write_text(json.dumps({"keys": [key.as_dict(private=True)]}))
    return path


async def _login(srv: RunningServer, who: str) -> tuple[int, str, Any]:
    async with node(srv) as n:
        _, url = await n.register_or_login("", who)
        waiter = asyncio.create_task(n.wait_for_login())
        page = await browser_login(url, who)
        try:
            got = await asyncio.wait_for(waiter, 10)
        except Exception as exc:  # the refusal is what the test looks at
            got = exc
        return page.status_code, message(page), got


async def test_signing_key_rotated_between_two_logins(tmp_path: Path) -> None:
    """The provider restarts with a new signing key between logins. Before: the JWKS was fetched once at
    start, so every login after a rotation failed until ghostmesh was restarted."""
    port, idp_port = free_port(), free_port()
    redirect = f"http://127.0.0.1:{port}/oidc/callback"
    keys = {kid: _jwks_file(tmp_path / f"jwks-{kid}.json", kid) for kid in ("a", "b", "c")}
    clock = Clock()
    with contextlib.ExitStack() as first:
        p = first.enter_context(
            provider(tmp_path / "idp-a.log", redirect, port=idp_port, jwks_file=keys["a"])
        )
        cfg = oidc_config(tmp_path, (p, port), jwks_refresh_interval=30.0)
        async with mesh(cfg, clock) as srv:
            oidc = srv.oidc
            assert oidc is not None
            assert (await _login(srv, "alice"))[:2] == (200, MSG_LOGGED_IN)
            assert oidc.provider.jwks.fetches == 1
            first.close()  # the provider goes away and comes back with key b only
            with provider(tmp_path / "idp-b.log", redirect, port=idp_port, jwks_file=keys["b"]):
                clock.offset += 31
                status, text, got = await _login(srv, "bob")
                assert (status, text) == (200, MSG_LOGGED_IN)
                assert got.user == "bob"
                assert oidc.provider.jwks.fetches == 2
            with provider(tmp_path / "idp-c.log", redirect, port=idp_port, jwks_file=keys["c"]):
                before = snapshot(srv)
                status, text, got = await _login(srv, "carol")  # within the interval: no fetch
                assert status == 400
                assert text.startswith(
                    "login failed: the ID token is signed by a key the provider did not publish (kid 'c'); "
                    "its keys are fetched again at most every 30 s, retry in "
                )
                assert isinstance(got, Exception)
                assert oidc.provider.jwks.fetches == 2
                assert oidc.provider.jwks.knows("b")  # the keys in hand stay until a new set arrives
                assert snapshot(srv) == before
                clock.offset += 31
                status, text, got = await _login(srv, "carol")
                assert (status, text) == (200, MSG_LOGGED_IN)
                assert oidc.provider.jwks.fetches == 3
                assert not oidc.provider.jwks.knows("b")
