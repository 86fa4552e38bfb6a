"""The web console in a real headless Chromium (Debian's chromium + chromium-driver, driven by selenium):
log in, create an auth key (shown once), watch nodes join on the mesh picture without a reload (server-sent
events), rename a node, approve a route, see a policy error inline; and an admin's OIDC login at the real
test provider, through to a session (its ``SameSite=Strict`` cookie sent after the provider's redirect
chain) whose action is audited with the account as the actor. Screenshots of each step are kept under
``test-artifacts/<test id>/``. The browser console must report no Content Security Policy violation: the
pages work with scripts and styles from the console's own files only.

Without chromium the test is skipped, unless ``GHOST_REQUIRE_NETNS=1`` (CI), which makes it fail.
Selenium blocks, and the server runs on this test's event loop: every browser step runs in a thread.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from ghostcore.pb.ghostmesh.v1 import admin_pb2 as apb
from tests.component._console_fixtures import (
    OidcSetup,
    api_key,
    base_url,
    console_config,
    oidc_console_config,
    oidc_setup,
)
from tests.component._mesh_fixtures import NodeClient, admin_unix, next_update, running
from tests.component._oidc_fixtures import provider_available

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
DRIVER = "/usr/bin/chromedriver"
WAIT = 10.0  # seconds any one browser condition may take
T = TypeVar("T")


def _need_chromium() -> None:
    missing = [p for p in (CHROMIUM, DRIVER) if not shutil.which(p)]
    if not missing:
        return
    why = (
        f"{', '.join(missing)} not installed (apt-get install chromium chromium-driver; scripts/bootstrap.sh)"
    )
    if os.environ.get("GHOST_REQUIRE_NETNS") == "1":
        pytest.fail(f"GHOST_REQUIRE_NETNS=1 but {why}", pytrace=False)
    pytest.skip(why)


def test_missing_chromium_fails_when_required(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys.modules[__name__], "CHROMIUM", "/nonexistent/chromium")
    monkeypatch.setenv("GHOST_REQUIRE_NETNS", "1")
    with pytest.raises(pytest.fail.Exception, match="GHOST_REQUIRE_NETNS=1 but /nonexistent/chromium not"):
        _need_chromium()
    monkeypatch.setenv("GHOST_REQUIRE_NETNS", "0")
    with pytest.raises(pytest.skip.Exception, match="not installed"):
        _need_chromium()


@pytest.fixture
def artifacts(request: pytest.FixtureRequest) -> Path:
    node_id = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.nodeid).strip("_")[:150]
    path = REPO / "test-artifacts" / node_id
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


@pytest.fixture
def driver() -> Iterator[Any]:
    _need_chromium()
    from selenium import webdriver  # noqa: PLC0415 - only when chromium is there
    from selenium.webdriver.chrome.service import Service  # noqa: PLC0415

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1100,900", "--no-first-run", "--disable-extensions"):  # fmt: skip
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    drv = webdriver.Chrome(options=opts, service=Service(executable_path=DRIVER))
    try:
        yield drv
    finally:
        drv.quit()


class Browser:
    """The driver's blocking calls, each run in a thread so the server on this loop keeps serving."""

    def __init__(self, drv: Any, base: str, artifacts: Path) -> None:
        self.drv = drv
        self.base = base
        self.artifacts = artifacts
        self.shots = 0

    async def run(self, fn: Callable[[], T]) -> T:
        return await asyncio.to_thread(fn)

    async def get(self, path: str) -> None:
        await self.run(lambda: self.drv.get(self.base + path))

    async def until(self, what: str, cond: Callable[[Any], Any]) -> Any:
        from selenium.common.exceptions import TimeoutException  # noqa: PLC0415
        from selenium.webdriver.support.ui import WebDriverWait  # noqa: PLC0415

        try:
            return await self.run(lambda: WebDriverWait(self.drv, WAIT, poll_frequency=0.1).until(cond))
        except TimeoutException:
            await self.shot(f"timeout-{re.sub(r'[^a-z]+', '-', what)[:40]}")
            raise AssertionError(f"browser: timed out after {WAIT}s waiting for {what}") from None

    async def css(self, selector: str) -> Any:
        from selenium.webdriver.common.by import By  # noqa: PLC0415

        return await self.run(lambda: self.drv.find_element(By.CSS_SELECTOR, selector))

    async def shot(self, name: str) -> None:
        self.shots += 1
        path = self.artifacts / f"{self.shots:02d}-{name}.png"
        await self.run(lambda: self.drv.save_screenshot(str(path)))


def _text_of(selector: str, contains: str) -> Callable[[Any], Any]:
    from selenium.webdriver.common.by import By  # noqa: PLC0415

    def cond(drv: Any) -> Any:
        for el in drv.find_elements(By.CSS_SELECTOR, selector):
            if contains in el.text:
                return el
        return False

    return cond


async def test_console_in_chromium(tmp_path: Path, driver: Any, artifacts: Path) -> None:
    async with running(console_config(tmp_path)) as srv:
        b = Browser(driver, base_url(srv), artifacts)
        key, key_id = await api_key(srv)

        # login: every page leads to the login form first
        await b.get("/nodes")
        assert (await b.run(lambda: driver.current_url)).endswith("/login")
        field = await b.css("#api_key")
        await b.run(lambda: field.send_keys(key))
        await b.shot("login")
        button = await b.css("#login")
        await b.run(button.click)
        await b.until("the nodes page", lambda d: d.current_url.endswith("/nodes"))

        # an auth key: shown once, on the answer to its creation
        await b.get("/keys")
        reusable = await b.css("input[name=reusable]")
        await b.run(reusable.click)
        button = await b.css("#create")
        await b.run(button.click)
        secret_el = await b.until("the new key", _text_of("#new-secret", "gmauth_"))
        secret = await b.run(lambda: secret_el.text)
        await b.shot("auth-key-created")
        await b.get("/keys")
        assert secret not in await b.run(lambda: driver.page_source)

        # the mesh picture: nodes join while the page is open, and appear without a reload
        await b.get("/mesh")
        await b.until(
            "the first picture", lambda d: d.find_element("id", "mesh").get_attribute("data-count") == "0"
        )
        await b.run(lambda: driver.execute_script("window.notReloaded = true;"))
        alpha, bravo = NodeClient(srv), NodeClient(srv)
        await alpha.register(secret, "alpha")
        await bravo.register(secret, "bravo")
        calls = [alpha.sync(), bravo.sync()]
        for call in calls:
            await next_update(call)
        await alpha.report(endpoints=["192.0.2.10:41641"], advertised_routes=["10.9.0.0/24"])
        await bravo.report(endpoints=["198.51.100.20:41641"])
        await b.until("alpha online", _text_of("#mesh-list li", "alpha (online)"))
        await b.until("bravo online", _text_of("#mesh-list li", "bravo (online)"))
        await b.until("a direct edge", lambda d: d.find_elements("css selector", "line.edge-direct"))
        assert await b.run(lambda: driver.execute_script("return window.notReloaded === true;"))
        await b.shot("mesh-nodes-joined")

        # a node: rename it from its row on the nodes page
        await b.get("/nodes")
        name_field = await b.css("tr[data-node='bravo'] input[name=new_name]")
        await b.run(lambda: name_field.send_keys("charlie"))
        rename = await b.css("tr[data-node='bravo'] button")
        await b.run(rename.click)
        await b.until("the rename", _text_of("#flash", "Renamed to charlie"))
        await b.until("the renamed row", _text_of("tr[data-node='charlie'] td", "online"))
        await b.shot("node-renamed")

        # a route: approve it
        await b.get("/routes")
        approve = await b.until(
            "the approve button", _text_of("tr[data-route='10.9.0.0/24'] button", "Approve")
        )
        await b.run(approve.click)
        await b.until("the approval", _text_of("#flash", "Approved 10.9.0.0/24 via alpha"))
        await b.shot("route-approved")
        assert [r.approved for _, r, _ in srv.state.list_routes()] == [True]

        # the policy: an error shows inline as it is typed
        await b.get("/policy")
        area = await b.css("#policy-text")
        await b.run(area.clear)
        await b.run(lambda: area.send_keys('[[acls]]\naction = "maybe"\nsrc = ["*"]\ndst = ["*:*"]\n'))
        await b.until("the inline error", _text_of("#policy-result li.error", "acls[0]"))
        await b.shot("policy-error-inline")

        # what the browser did went through the Admin service's methods, audited with the key as actor
        async with admin_unix(srv) as admin:
            log = await admin.ListAudit(apb.ListAuditRequest(), timeout=5)
        mine = [(e.action, e.remote.split(":")[0]) for e in log.entries if e.actor == f"apikey:{key_id}"]
        assert mine == [
            ("authkey.create", "console"),
            ("node.rename", "console"),
            ("route.approve", "console"),
        ]
        for call in calls:
            call.cancel()

        logs = await b.run(lambda: driver.get_log("browser"))
        violations = [e["message"] for e in logs if "Content Security Policy" in e["message"]]
        assert violations == []


@pytest.fixture(scope="module")
def idp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OidcSetup]:
    why = provider_available()
    if why:
        pytest.skip(why)
    yield from oidc_setup(tmp_path_factory.mktemp("oidc") / "oidc-provider.log")


async def test_console_oidc_login_in_chromium(
    tmp_path: Path, driver: Any, artifacts: Path, idp: OidcSetup
) -> None:
    async with running(oidc_console_config(tmp_path, idp, ["group:engineering"])) as srv:
        b = Browser(driver, idp.console_url, artifacts)

        # the login page's link goes to the provider; sign in there as alice (group "engineering")
        await b.get("/nodes")
        assert (await b.run(lambda: driver.current_url)).endswith("/login")
        await b.shot("login-with-oidc")
        link = await b.css("#oidc-login")
        await b.run(link.click)
        field = await b.until("the provider's login form", lambda d: d.find_elements("name", "login"))
        await b.run(lambda: field[0].send_keys("alice"))
        password = await b.css("input[name=password]")
        await b.run(lambda: password.send_keys("any"))
        submit = await b.css("button[type=submit]")
        await b.run(submit.click)
        consent = await b.until(
            "the provider's consent form",
            lambda d: d.find_elements("css selector", "input[value=consent] ~ button[type=submit]"),
        )
        await b.run(consent[0].click)

        # back at the console: the session cookie rides on the refresh to the nodes page
        await b.until("the nodes page", lambda d: d.current_url == idp.console_url + "/nodes")
        await b.until("the logout button", _text_of("header button", "Log out"))
        await b.shot("logged-in-with-oidc")

        # an action under that session: audited with the OIDC account as the actor
        await b.get("/keys")
        button = await b.css("#create")
        await b.run(button.click)
        await b.until("the new key", _text_of("#new-secret", "gmauth_"))
        rows = [(e.actor, e.action) for e in srv.store.list_audit(0, 100) if e.action == "authkey.create"]
        assert rows == [("oidc:alice@example.com", "authkey.create")]

        logs = await b.run(lambda: driver.get_log("browser"))
        violations = [
            e["message"]
            for e in logs
            if "Content Security Policy" in e["message"] and idp.console_url in e["message"]
        ]
        assert violations == []
