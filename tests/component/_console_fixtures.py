"""Helpers for the web console's component and browser tests: a server with the console on loopback, an
API key to log in with, an HTTP client that keeps the session cookie, and the console's OIDC admin login
set up against the test OpenID provider (one provider per test module, its redirect URIs naming both the
nodes' login listener and the console)."""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp

from ghostcore.pb.ghostmesh.v1 import admin_pb2 as apb
from ghostmesh.config import ConsoleConfig, MeshConfig, OidcConfig
from ghostmesh.console_oidc import CALLBACK_PATH
from ghostmesh.server import RunningServer
from tests.component._mesh_fixtures import admin_unix, mesh_config
from tests.component._oidc_fixtures import CLIENT_ID, CLIENT_SECRET, Provider, free_port, provider

CSRF = re.compile(r'name="csrf" value="([^"]+)"')


def console_config(tmp_path: Path, **console: Any) -> MeshConfig:
    return replace(mesh_config(tmp_path), console=ConsoleConfig(listen="127.0.0.1:0", **console))


def base_url(srv: RunningServer) -> str:
    assert srv.console is not None
    return srv.console.url


async def api_key(srv: RunningServer) -> tuple[str, str]:
    """A new API key: (secret, id)."""
    async with admin_unix(srv) as admin:
        resp = await admin.CreateApiKey(apb.CreateApiKeyRequest(), timeout=5)
    return str(resp.secret), str(resp.key.id)


@contextlib.asynccontextmanager
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    """A client keeping cookies set by an IP-addressed host (aiohttp's default jar refuses those);
    redirects are not followed, so a test sees each answer."""
    jar = aiohttp.CookieJar(unsafe=True)
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(cookie_jar=jar, timeout=timeout) as session:
        yield session


async def login(http: aiohttp.ClientSession, base: str, key: str) -> str:
    """Log in with ``key``; the session's CSRF token (from the nodes page)."""
    async with http.post(f"{base}/login", data={"api_key": key}, allow_redirects=False) as resp:
        assert resp.status == 303, await resp.text()
        assert resp.headers["Location"] == "/nodes"
    async with http.get(f"{base}/nodes", allow_redirects=False) as resp:
        assert resp.status == 200
        match = CSRF.search(await resp.text())
    assert match is not None
    return match.group(1)


@dataclass(frozen=True)
class OidcSetup:
    """The module's provider and the ports its redirect URIs name: the console's and the nodes' login
    listener's."""

    provider: Provider
    console_port: int
    node_port: int

    @property
    def console_url(self) -> str:
        return f"http://127.0.0.1:{self.console_port}"


def oidc_setup(log: Path) -> Iterator[OidcSetup]:
    """The provider, knowing the console's callback and the nodes' (what a module's fixture yields). It
    is reached as ``localhost`` and the console as ``127.0.0.1``: another site, as a real provider is, so
    a browser applies its cross-site cookie rules on the way back."""
    console_port, node_port = free_port(), free_port()
    uris = f"http://127.0.0.1:{console_port}{CALLBACK_PATH},http://127.0.0.1:{node_port}/oidc/callback"
    with provider(log, uris, host="localhost") as p:
        yield OidcSetup(p, console_port, node_port)


def oidc_console_config(tmp_path: Path, idp: OidcSetup, admins: list[str], **console: Any) -> MeshConfig:
    """The console on the module's port, OIDC admins ``admins`` at the module's provider (plain http on
    loopback: ``allow_insecure_http``); nodes keep joining with auth keys."""
    base = mesh_config(tmp_path)
    return replace(
        base,
        console=ConsoleConfig(
            listen=f"127.0.0.1:{idp.console_port}",
            public_url=idp.console_url,
            oidc_admins=admins,
            **console,
        ),
        oidc=OidcConfig(
            issuer=idp.provider.issuer,
            client_id=CLIENT_ID,
            client_secret=CLIENT_SECRET,
            http_bind=f"127.0.0.1:{idp.node_port}",
            public_url=f"http://127.0.0.1:{idp.node_port}",
            allow_insecure_http=True,
            login_timeout=60.0,
        ),
    )
