"""The web console's OIDC login for admins against the real OpenID provider (oidc-provider in node, see
_oidc_fixtures), httpx as the browser: an admitted account gets a session whose actions are the Admin
service's own, audited with ``oidc:<email>``; an account not admitted, a replayed or forged ``state`` and a
callback in a browser without the pre-login cookie get a refusal and no session, each counted as a failed
authentication like a bad API key."""

from __future__ import annotations

import html
import json
import logging
import re
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import pytest

from ghostmesh.config import LimitsConfig
from ghostmesh.console_oidc import CALLBACK_PATH, MSG_BAD_STATE, MSG_NOT_ADMIN, START_PATH
from ghostmesh.server import RunningServer
from tests.component._console_fixtures import CSRF, OidcSetup, oidc_console_config, oidc_setup
from tests.component._mesh_fixtures import Clock, running
from tests.component._oidc_fixtures import provider_available, provider_login

pytestmark = pytest.mark.skipif(bool(provider_available()), reason=provider_available() or "ok")

_ERROR = re.compile(r'<p class="error" id="error">([^<]*)</p>')
_LINK = re.compile(r'<a class="button" id="oidc-login" href="([^"]+)">Log in with ([^<]+)</a>')


@pytest.fixture(scope="module")
def idp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OidcSetup]:
    yield from oidc_setup(tmp_path_factory.mktemp("oidc") / "oidc-provider.log")


class HoldCallback(httpx.AsyncHTTPTransport):
    """A browser's transport that delivers everything but the provider's redirect back to the console,
    which it keeps (a test then delivers it where it likes)."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list[str] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == CALLBACK_PATH:
            self.held.append(str(request.url))
            return httpx.Response(204, request=request)
        return await super().handle_async_request(request)


def browser(transport: httpx.AsyncBaseTransport | None = None) -> httpx.AsyncClient:
    return httpx.AsyncClient(follow_redirects=True, timeout=10.0, transport=transport)


def error_of(page: httpx.Response) -> str:
    m = _ERROR.search(page.text)
    assert m is not None, f"no error at {page.url} ({page.status_code}): {page.text[:300]}"
    return html.unescape(m.group(1))


async def oidc_login(b: httpx.AsyncClient, base: str, login: str) -> httpx.Response:
    """Open the login page, follow its "Log in with" link, sign in at the provider as ``login``; the
    console's answer to the provider's redirect back."""
    page = await b.get(f"{base}/login")
    m = _LINK.search(page.text)
    assert m is not None, page.text
    assert html.unescape(m.group(1)) == base + START_PATH
    return await provider_login(b, await b.get(html.unescape(m.group(1))), login, None)


async def session_page(b: httpx.AsyncClient, base: str) -> httpx.Response:
    """``/nodes`` without following a redirect: 200 with a session, 303 to the login page without."""
    return await b.get(f"{base}/nodes", follow_redirects=False)


def failures(srv: RunningServer) -> int:
    return srv.hub.limits.refusals.auth_failures


@pytest.fixture
def clock() -> Clock:
    return Clock()


async def test_an_admitted_account_administers_as_itself(tmp_path: Path, idp: OidcSetup) -> None:
    cfg = oidc_console_config(tmp_path, idp, ["bob@example.com", "group:engineering"])
    async with running(cfg) as srv, browser() as b:
        base = idp.console_url
        assert (await session_page(b, base)).headers["location"] == "/login"
        page = await oidc_login(b, base, "alice")  # alice is in the provider's group "engineering"
        assert page.status_code == 200, page.text
        assert 'Logged in as <span class="mono">oidc:alice@example.com</span>' in page.text
        nodes = await session_page(b, base)
        assert nodes.status_code == 200
        m = CSRF.search(nodes.text)
        assert m is not None
        csrf = m.group(1)
        assert failures(srv) == 0

        # an action: the Admin method's own, audited with the OIDC account as the actor
        seq = srv.store.last_audit()
        after = seq.seq if seq is not None else 0
        made = await b.post(f"{base}/keys/create", data={"csrf": csrf, "user": "ops", "reusable": "1"})
        assert made.status_code == 200
        assert "gmauth_" in made.text
        [entry] = srv.store.list_audit(after, 100)
        assert (entry.actor, entry.action) == ("oidc:alice@example.com", "authkey.create")
        assert entry.remote.startswith("console:ipv4:127.0.0.1:")

        # logout ends it
        await b.post(f"{base}/logout", data={"csrf": csrf})
        assert (await session_page(b, base)).headers["location"] == "/login"
        assert srv.console is not None
        assert len(srv.console.console.sessions) == 0


async def test_nodes_and_admins_share_one_provider_client(tmp_path: Path, idp: OidcSetup) -> None:
    base = oidc_console_config(tmp_path, idp, ["alice@example.com"])
    cfg = replace(base, server=replace(base.server, auth_method="oidc"))  # nodes log in at [oidc] too
    async with running(cfg) as srv, browser() as b:
        assert srv.oidc is not None
        assert srv.console is not None
        console_oidc = srv.console.console.oidc
        assert console_oidc is not None
        assert console_oidc.provider is srv.oidc.provider  # one discovery, one JWKS cache
        page = await oidc_login(b, idp.console_url, "alice")
        assert page.status_code == 200, page.text
        assert srv.oidc.provider.jwks.fetches == 1


async def test_an_account_not_admitted_gets_a_refusal_and_no_session(tmp_path: Path, idp: OidcSetup) -> None:
    cfg = oidc_console_config(tmp_path, idp, ["alice@example.com", "group:engineering"])
    async with running(cfg) as srv, browser() as b:
        page = await oidc_login(b, idp.console_url, "bob")  # bob: bob@example.com, group "sales"
        assert page.status_code == 403
        assert error_of(page) == MSG_NOT_ADMIN
        assert (await session_page(b, idp.console_url)).headers["location"] == "/login"
        assert srv.console is not None
        assert len(srv.console.console.sessions) == 0
        assert failures(srv) == 1


async def test_a_replayed_or_forged_state_is_refused(
    tmp_path: Path, idp: OidcSetup, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    cfg = oidc_console_config(tmp_path, idp, ["alice@example.com"])
    async with running(cfg, clock) as srv, browser() as b:
        base = idp.console_url
        page = await oidc_login(b, base, "alice")
        assert page.status_code == 200, page.text
        callback = str(page.url)
        assert callback.startswith(base + CALLBACK_PATH + "?")
        m = CSRF.search((await session_page(b, base)).text)
        assert m is not None
        await b.post(f"{base}/logout", data={"csrf": m.group(1)})

        replayed = await b.get(callback)  # the same code and state again, in the same browser
        assert replayed.status_code == 400
        assert error_of(replayed) == MSG_BAD_STATE
        forged = await b.get(f"{base}{CALLBACK_PATH}", params={"code": "x", "state": "forged-state"})
        assert forged.status_code == 400
        assert error_of(forged) == MSG_BAD_STATE
        assert (await session_page(b, base)).headers["location"] == "/login"
        assert failures(srv) == 2

        query = dict(httpx.URL(callback).params)
        # the server's own records (the test's browser, httpx, logs its URLs): neither code nor state
        logged = "".join(
            repr(r.__dict__) for r in caplog.records if r.name.startswith(("ghostmesh", "aiohttp"))
        )
        assert "console oidc login" in logged
        assert query["code"] not in logged
        assert query["state"] not in logged

        clock.now += 61  # the window closes: one summary row per source, the kinds named
        srv.hub.run_due()
        rows = [e for e in srv.store.list_audit(0, 100) if e.action == "auth.failed"]
        assert json.loads(rows[-1].detail)["methods"] == {"console.oidc:bad_state": 2}


async def test_a_callback_without_the_pre_login_cookie_is_refused(tmp_path: Path, idp: OidcSetup) -> None:
    cfg = oidc_console_config(tmp_path, idp, ["alice@example.com"])
    hold = HoldCallback()
    async with running(cfg) as srv, browser(hold) as admin, browser() as other:
        base = idp.console_url
        await oidc_login(admin, base, "alice")  # the provider's redirect back is held, not delivered
        [callback] = hold.held
        # another browser (an attacker pushing their own login into a victim's browser) has no cookie
        pushed = await other.get(callback)
        assert pushed.status_code == 400
        assert "this browser did not start this login" in error_of(pushed)
        assert (await session_page(other, base)).headers["location"] == "/login"
        assert srv.console is not None
        assert len(srv.console.console.sessions) == 0
        assert failures(srv) == 1
        # the browser that started it still can finish it (the refusal did not consume it)
        async with httpx.AsyncClient(cookies=admin.cookies, timeout=10.0) as same:
            done = await same.get(callback)
            assert done.status_code == 200, done.text
            assert (await session_page(same, base)).status_code == 200


async def test_refused_oidc_logins_count_with_api_key_ones(tmp_path: Path, idp: OidcSetup) -> None:
    cfg = oidc_console_config(tmp_path, idp, ["alice@example.com"])
    cfg = replace(cfg, limits=LimitsConfig(auth_failures_per_minute=2))
    async with running(cfg) as srv, browser() as b:
        base = idp.console_url
        bad = await b.post(f"{base}/login", data={"api_key": "gmapi_nope"}, follow_redirects=False)
        assert bad.status_code == 401
        forged = await b.get(f"{base}{CALLBACK_PATH}", params={"code": "x", "state": "forged"})
        assert forged.status_code == 400
        limited = await oidc_login(b, base, "bob")  # the third failure from this source in the window
        assert limited.status_code == 429
        assert "Too many failed logins from 127.0.0.1" in error_of(limited)
        assert failures(srv) == 3
        assert srv.hub.limits.refusals.auth_refused == 1
        async with browser() as fresh:  # b's provider session is bob's
            page = await oidc_login(fresh, base, "alice")  # a good login passes while the source is limited
            assert page.status_code == 200, page.text
            assert (await session_page(fresh, base)).status_code == 200
