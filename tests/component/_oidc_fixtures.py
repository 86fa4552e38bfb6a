"""Helpers for OIDC tests: the real OpenID provider (tests/fixtures/oidc/provider.js, panva/oidc-provider)
as a child process, and a scripted browser (httpx with cookies) that logs in through its forms.

The provider is started and stopped by PID, with bounded waits; its output goes to a log file the caller
keeps as an artefact. ``npm ci --prefix tests/fixtures/oidc`` (scripts/bootstrap.sh) installs it.
"""

from __future__ import annotations

import contextlib
import html
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
    log_path: Path, redirect_uri: str, *, host: str = "127.0.0.1", port: int = 0, wrap: Sequence[str] = ()
) -> Iterator[Provider]:
    """Run provider.js until the block ends (``wrap``: a command prefix, e.g. ``ip netns exec NS``)."""
    port = port or free_port(host)
    issuer = f"http://{host}:{port}"
    cmd = [*wrap, "node", str(FIXTURE_DIR / "provider.js"), host, str(port), CLIENT_ID, CLIENT_SECRET]
    with log_path.open("wb") as log:
        proc = subprocess.Popen([*cmd, redirect_uri], stdout=log, stderr=subprocess.STDOUT)
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


async def browser_login(
    auth_url: str, login: str, *, before_consent: Callable[[], None] | None = None
) -> httpx.Response:
    """What a user does in a browser: open ``auth_url``, sign in as ``login`` on the provider's login form,
    confirm the consent form; returns the final response (ghostmesh's callback page).
    ``before_consent`` runs after ghostmesh redirected to the provider (the login was handed over) and
    before the provider redirects back, for tests that tamper with server state in between.
    """
    async with httpx.AsyncClient(follow_redirects=True, timeout=10.0) as browser:
        page = await browser.get(auth_url)
        page = await browser.post(
            _form_action(page), data={"prompt": "login", "login": login, "password": "any"}
        )
        if before_consent is not None:
            before_consent()
        if 'value="consent"' not in page.text:
            return page  # the provider asked for no consent: this is the callback page already
        return await browser.post(_form_action(page), data={"prompt": "consent"})


def _main(argv: Sequence[str]) -> int:
    """``python _oidc_fixtures.py AUTH_URL LOGIN``: the browser part, for tests that must run it inside a
    network namespace (``ip netns exec``). Prints the status and the page ghostmesh answered."""
    import asyncio  # noqa: PLC0415 - only the command line needs it

    page = asyncio.run(browser_login(argv[0], argv[1]))
    print(page.status_code, page.text.strip())
    return 0 if page.status_code == 200 else 1


if __name__ == "__main__":
    import sys

    raise SystemExit(_main(sys.argv[1:]))
