"""Helpers for the metrics component tests: scrape a daemon's listener and parse what it serves."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections.abc import Callable

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def get(port: int, path: str) -> tuple[int, str, str]:
    """(status, content type, body) of GET http://127.0.0.1:<port><path>."""
    timeout = aiohttp.ClientTimeout(total=5)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.get(f"http://127.0.0.1:{port}{path}") as resp,
    ):
        return resp.status, resp.headers.get("Content-Type", ""), await resp.text()


async def scrape(port: int) -> Samples:
    """Every sample of ``/metrics``, parsed by prometheus_client's own parser (which validates it)."""
    status, ctype, body = await get(port, "/metrics")
    assert status == 200
    assert ctype.startswith("text/plain")
    samples: Samples = {}
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            samples[s.name, tuple(sorted(s.labels.items()))] = s.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[name, tuple(sorted(labels.items()))]


async def until(port: int, check: Callable[[Samples], bool], wait: float = 5.0) -> Samples:
    """Scrape until ``check`` holds (bounded by ``wait`` seconds); the last scrape."""
    deadline = time.monotonic() + wait
    while True:
        samples = await scrape(port)
        if check(samples) or time.monotonic() > deadline:
            return samples
        await asyncio.sleep(0.02)


def promtool_check(body: str) -> None:
    """``promtool check metrics`` (Prometheus's own linter) on an exposition; skips without promtool."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (apt-get install prometheus; scripts/bootstrap.sh does)")
    done = subprocess.run(
        [promtool, "check", "metrics"], input=body, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
