"""Benchmark: the web console's nodes page with N nodes in the registry, as a ratio to a static page of the
same size served by the same aiohttp in the same run.

One process: ghostmesh in-process (``start_server``, a temporary state directory, ``[console]`` on
127.0.0.1, port picked by the kernel), N nodes registered through the state in hub transactions (as the
Register RPC does, without the proofs, which are not what is measured), an API key to log in with, and a
second aiohttp listener on the same loop serving, on every GET, the bytes of one nodes page taken before the
timing starts, with the same headers: the reference. An aiohttp client on the same loop logs in, then in
interleaved rounds (the order flips every round) fetches each whole body; reported: median and p90 of each,
and the median ratio. The client shares the loop and the core with the server for both pages alike, so only
the ratio means anything: it is what rendering the page (reading the state, escaping, one form per action)
costs over sending the same bytes.

Run: ``.venv/bin/python -m bench.console [--nodes N] [--rounds R]``. No root needed.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import aiohttp
from aiohttp import web

from ghostcore.keys import PrivateKey
from ghostmesh import console_pages
from ghostmesh.config import ConsoleConfig, MeshConfig, ServerConfig
from ghostmesh.server import RunningServer, start_server


def _config(tmp: Path) -> MeshConfig:
    server = ServerConfig(
        bind="127.0.0.1:0", admin_socket=str(tmp / "run" / "admin.sock"), state_dir=str(tmp / "state")
    )
    return replace(MeshConfig(server=server), console=ConsoleConfig(listen="127.0.0.1:0"))


def _seed(srv: RunningServer, nodes: int) -> str:
    """Register ``nodes`` nodes; an API key to log in with."""
    hub, state = srv.hub, srv.state
    now = hub.now()
    with hub.transaction():
        _, auth = state.create_auth_key(
            user="", reusable=True, ephemeral=False, expiration=3600.0, tags=[], now=now
        )
        _, api = state.create_api_key(3600.0, now)
    for i in range(nodes):
        with hub.transaction() as tx:
            key = PrivateKey.generate().public_key().base64()
            _, changes = state.register(key, auth, f"node-{i}", now)
            tx.dispatch(changes)
    return api


async def _fetch(http: aiohttp.ClientSession, url: str) -> tuple[float, int]:
    started = time.perf_counter()
    async with http.get(url, allow_redirects=False) as resp:
        body = await resp.read()
        assert resp.status == 200, resp.status
    return time.perf_counter() - started, len(body)


async def run(nodes: int, rounds: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        srv = await start_server(_config(Path(tmp)))
        static_runner: web.AppRunner | None = None
        try:
            api = _seed(srv, nodes)
            assert srv.console is not None
            base = srv.console.url
            jar = aiohttp.CookieJar(unsafe=True)
            async with aiohttp.ClientSession(cookie_jar=jar) as http:
                async with http.post(f"{base}/login", data={"api_key": api}, allow_redirects=False) as r:
                    assert r.status == 303, await r.text()
                async with http.get(f"{base}/nodes") as r:
                    page = await r.read()

                async def static(_: web.Request) -> web.Response:
                    return web.Response(body=page, content_type="text/html", headers=console_pages.headers())

                app = web.Application()
                app.router.add_get("/nodes", static)
                static_runner = web.AppRunner(app, access_log=None, handle_signals=False)
                await static_runner.setup()
                site = web.TCPSite(static_runner, "127.0.0.1", 0)
                await site.start()
                ref = f"http://127.0.0.1:{static_runner.addresses[0][1]}/nodes"
                times: dict[str, list[float]] = {"nodes page": [], "static": []}
                for i in range(rounds + 2):  # the first two rounds warm up and are not counted
                    order = [("nodes page", f"{base}/nodes"), ("static", ref)]
                    for name, url in order if i % 2 else reversed(order):
                        took, size = await _fetch(http, url)
                        if i >= 2:
                            times[name].append(took)
            med = {k: statistics.median(v) for k, v in times.items()}
            p90 = {k: statistics.quantiles(v, n=10)[-1] for k, v in times.items()}
            print(f"{nodes} nodes, page {len(page) / 1024:.0f} KiB, {rounds} rounds")
            for name in times:
                print(f"  {name:<11} median {med[name] * 1000:7.2f} ms   p90 {p90[name] * 1000:7.2f} ms")
            print(f"  ratio (nodes page / static, medians): {med['nodes page'] / med['static']:.1f}x")
            print(f"  last body sizes equal: {size == len(page)}")
        finally:
            if static_runner is not None:
                await static_runner.cleanup()
            await srv.stop(grace=0.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(run(args.nodes, args.rounds))


if __name__ == "__main__":
    main()
