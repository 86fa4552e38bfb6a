"""Helpers for OIDC tests: the real OpenID provider (tests/fixtures/oidc/provider.js, panva/oidc-provider)
as a child process, and a scripted browser (httpx with cookies) that confirms ghostmesh's page and logs in
through the provider's forms.

The provider is started and stopped by PID, with bounded waits; its output goes to a log file the caller
keeps as an artefact. ``npm ci --prefix tests/fixtures/oidc`` (scripts/bootstrap.sh) installs it.
"""

from __future__ import annotations

import contextlib
import html
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

FIXTURE_DIR = Path(__file__).resolve().parents[1] / "fixtures" / "oidc"
CLIENT_ID = "ghostmesh"
CLIENT_SECRET = "test-client-secret-0123456789"  # a test fixture, not a real secret
START_TIMEOUT = 20.0

_FORM_RE = re.compile(r'<form[^>]*action="([^"]+)"')
_CSRF_RE = re.compile(r'<input type="hidden" name="csrf" value="([^"]+)">')
_MESSAGE_RE = re.compile(r'<p id="message">([^<]*)</p>')


def provider_available() -> str:
    """Empty when the provider can run here, else why not (for pytest.skip)."""
    if shutil.which("node") is None:
        return "node is not installed (scripts/bootstrap.sh installs it)"
    if not (FIXTURE_DIR / "node_modules" / "oidc-provider").is_dir():
        return "oidc-provider is not installed; run: npm ci --prefix tests/fixtures/oidc"
    return ""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class Provider:
    issuer: str
    proc: subprocess.Popen[bytes]
    log: Path


@contextlib.contextmanager
def provider(
    log_path: Path,
    redirect_uri: str,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    wrap: Sequence[str] = (),
    jwks_file: Path | None = None,
) -> Iterator[Provider]:
    """Run provider.js until the block ends (``wrap``: a command prefix, e.g. ``ip netns exec NS``;
    ``jwks_file``: the private JWKS it signs with, else the library's development key)."""
    port = port or free_port(host)
    issuer = f"http://{host}:{port}"
    cmd = [*wrap, "node", str(FIXTURE_DIR / "provider.js"), host, str(port), CLIENT_ID, CLIENT_SECRET]
    env = {**os.environ, "OIDC_JWKS_FILE": str(jwks_file)} if jwks_file is not None else None
    with log_path.open("wb") as log:
        proc = subprocess.Popen([*cmd, redirect_uri], stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while b"listening on" not in log_path.read_bytes():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"oidc-provider did not start; see {log_path}")
            time.sleep(0.1)
        yield Provider(issuer, proc, log_path)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def _form_action(resp: httpx.Response) -> str:
    m = _FORM_RE.search(resp.text)
    if m is None:
        raise AssertionError(f"no form at {resp.url} ({resp.status_code}): {resp.text[:300]}")
    return str(resp.url.join(html.unescape(m.group(1))))


def message(page: httpx.Response) -> str:
    """The one-line message of a ghostmesh login page (unescaped)."""
    m = _MESSAGE_RE.search(page.text)
    if m is None:
        raise AssertionError(f"no message at {page.url} ({page.status_code}): {page.text[:300]}")
    return html.unescape(m.group(1))


def csrf_of(page: httpx.Response) -> str:
    """The CSRF token of ghostmesh's confirmation page."""
    m = _CSRF_RE.search(page.text)
    if m is None:
        raise AssertionError(f"no confirmation form at {page.url} ({page.status_code}): {page.text[:300]}")
    return html.unescape(m.group(1))


async def confirm(browser: httpx.AsyncClient, auth_url: str) -> httpx.Response:
    """Open ghostmesh's confirmation page and press its button; the provider's login page (the
    redirects followed)."""
    page = await browser.get(auth_url)
    assert page.status_code == 200, page.text
    return await browser.post(_form_action(page), data={"csrf": csrf_of(page)})


async def provider_login(
    browser: httpx.AsyncClient, page: httpx.Response, login: str, before_consent: Callable[[], None] | None
) -> httpx.Response:
    """Sign in as ``login`` on the provider's login ``page`` and give consent; the callback's page."""
    page = await browser.post(_form_action(page), data={"prompt": "login", "login": login, "password": "any"})
    if before_consent is not None:
        before_consent()
    if 'value="consent"' not in page.text:
        return page  # the provider asked for no consent: this is the callback page already
    return await browser.post(_form_action(page), data={"prompt": "consent"})


async def browser_login(
    auth_url: str, login: str, *, before_consent: Callable[[], None] | None = None
) -> httpx.Response:
    """What a user does in a browser: open ``auth_url``, confirm ghostmesh's page naming the node, sign
    in as ``login`` on the provider's login form, confirm the consent form; returns the final response
    (ghostmesh's callback page). ``before_consent`` runs after ghostmesh redirected to the provider (the
    login was handed over) and before the provider redirects back, for tests that tamper with server
    state in between.
    """
    async with httpx.AsyncClient(follow_redirects=True, timeout=10.0) as browser:
        page = await confirm(browser, auth_url)
        return await provider_login(browser, page, login, before_consent)


def _main(argv: Sequence[str]) -> int:
    """``python _oidc_fixtures.py AUTH_URL LOGIN``: the browser part, for tests that must run it inside a
    network namespace (``ip netns exec``). Prints the status and the page ghostmesh answered."""
    import asyncio  # noqa: PLC0415 - only the command line needs it

    page = asyncio.run(browser_login(argv[0], argv[1]))
    print(page.status_code, message(page) if 'id="message"' in page.text else page.text[:300])
    return 0 if page.status_code == 200 else 1


if __name__ == "__main__":
    import sys

    raise SystemExit(_main(sys.argv[1:]))
