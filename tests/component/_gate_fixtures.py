"""Helpers for ghostgate's component tests: an in-process ghostgate on 127.0.0.1 and REST credentials."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import time

from ghostgate.config import GateConfig, RelayConfig, TurnConfig
from ghostgate.server import GateServer, start_server

SECRET = "component-secret"


def gate_config(denied: list[str] | None = None) -> GateConfig:
    turn = TurnConfig(secret=SECRET) if denied is None else TurnConfig(secret=SECRET, denied_peers=denied)
    return GateConfig(relay=RelayConfig(listen="127.0.0.1:0"), turn=turn)


async def start(denied: list[str] | None = None) -> GateServer:
    return await start_server(gate_config(denied), SECRET.encode())


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
