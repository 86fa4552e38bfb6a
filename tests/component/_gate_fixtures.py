"""Helpers for ghostgate's component tests: an in-process ghostgate on 127.0.0.1, the ``ghostgate`` command as
a child process, and REST credentials."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ghostgate.config import GateConfig, RelayConfig, TurnConfig
from ghostgate.turn_edge import TurnEdge, start_turn

SECRET = "component-secret"


def gate_config(denied: list[str] | None = None) -> GateConfig:
    turn = TurnConfig(secret=SECRET) if denied is None else TurnConfig(secret=SECRET, denied_peers=denied)
    return GateConfig(relay=RelayConfig(listen="127.0.0.1:0"), turn=turn)


async def start(denied: list[str] | None = None) -> TurnEdge:
    return await start_turn(gate_config(denied), SECRET.encode())


@contextmanager
def gate_process(conf: Path) -> Iterator[subprocess.Popen[str]]:
    """The ghostgate command on ``conf``, stderr piped; killed and reaped on the way out whatever happened."""
    code = "import sys; from ghostgate.app import main; sys.exit(main())"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "--config", str(conf)], stderr=subprocess.PIPE, text=True
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


def rest_credentials(user: str = "node1", ttl: int = 3600) -> tuple[str, str]:
    username = f"{int(time.time()) + ttl}:{user}"
    password = base64.b64encode(hmac.new(SECRET.encode(), username.encode(), hashlib.sha1).digest()).decode()
    return username, password


class Collector(asyncio.DatagramProtocol):
    """Keeps every datagram received, with its source, in a queue."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[bytes, tuple[str, int]]] = asyncio.Queue()
        self.errors: list[Exception] = []

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.queue.put_nowait((data, addr))

    def error_received(self, exc: Exception) -> None:
        self.errors.append(exc)
