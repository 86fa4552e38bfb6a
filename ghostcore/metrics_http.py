"""The metrics and health listener every daemon serves: ``/metrics``, ``/healthz``, ``/readyz`` over HTTP.

Each daemon passes its own :class:`prometheus_client.CollectorRegistry` (never the process-wide default, so
two daemons in one test process never clash) and a ``ready`` callable that returns ``""`` when the daemon is
ready and a short reason otherwise. The listener runs on the daemon's asyncio loop (aiohttp), so collectors
read the daemon's live state at scrape time without locks: nothing on a hot path pays for metrics.
``/healthz`` answers 200 while the loop turns (the process is alive); ``/readyz`` 200 or 503 with the
reason. A daemon whose state needs an await to read (ghostlink's WireGuard device) passes ``refresh``,
awaited before each scrape. No page ever holds a secret: collectors expose counts, never keys or tokens.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from ghostcore import addr
from ghostcore.config import parse_hostport
from ghostcore.errors import Unavailable

log = logging.getLogger(__name__)


class FuncCollector(Collector):
    """A collector whose metric families come from one function called at each scrape."""

    def __init__(self, collect: Callable[[], Iterable[Metric]]) -> None:
        self._collect = collect

    def collect(self) -> Iterable[Metric]:
        return list(self._collect())


class MetricsServer:
    """A started listener; ``port`` is the bound port (useful with port 0)."""

    def __init__(self, runner: web.AppRunner, host: str, port: int) -> None:
        self._runner = runner
        self.host = host
        self.port = port

    @property
    def url_host(self) -> str:
        """The host as a URL writes it (an IPv6 address in brackets)."""
        return addr.url_host(self.host)

    async def close(self) -> None:
        await self._runner.cleanup()


async def start_metrics(
    listen: str,
    registry: CollectorRegistry,
    ready: Callable[[], str],
    *,
    where: str = "metrics.listen",
    refresh: Callable[[], Awaitable[None]] | None = None,
) -> MetricsServer:
    """Serve ``registry`` and the health pages on ``listen`` (``ip:port``); Unavailable if it cannot bind."""
    host, port = parse_hostport(listen, where, ip_only=True)

    async def metrics(_: web.Request) -> web.Response:
        if refresh is not None:
            await refresh()  # what only an await can read (e.g. WireGuard's counters), once per scrape
        body = generate_latest(registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(_: web.Request) -> web.Response:
        reason = ready()
        if reason:
            return web.Response(status=503, text=f"not ready: {reason}\n")
        return web.Response(text="ready\n")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise Unavailable(f"{where}: cannot listen on {listen}: {exc.strerror or exc}") from None
    bound = runner.addresses[0][1] if runner.addresses else port
    served = MetricsServer(runner, host, bound)
    log.debug("metrics on http://%s:%d/metrics", served.url_host, bound)  # the daemons print it
    return served
