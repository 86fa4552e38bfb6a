"""Helpers for the web console's component and browser tests: a server with the console on loopback, an
API key to log in with, and an HTTP client that keeps the session cookie."""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp

from ghostcore.pb.ghostmesh.v1 import admin_pb2 as apb
from ghostmesh.config import ConsoleConfig, MeshConfig
from ghostmesh.server import RunningServer
from tests.component._mesh_fixtures import admin_unix, mesh_config

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
