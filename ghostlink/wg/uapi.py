"""Async client for the WireGuard UAPI unix socket (``/var/run/wireguard/<ifname>.sock``).

The wire format is in ``uapi_codec`` (https://www.wireguard.com/xplatform/). One request per connection,
as ``wg(8)`` does: wireguard-go serves a connection until EOF, but a fresh connection per request keeps a
half-read response from ever poisoning the next one. Reads are bounded in size and time.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from ghostcore.errors import Unavailable
from ghostlink.wg import uapi_codec as codec

SOCKET_DIR = Path("/var/run/wireguard")


def socket_path(ifname: str, base: Path = SOCKET_DIR) -> Path:
    return base / f"{ifname}.sock"


class UapiClient:
    def __init__(self, path: Path, timeout: float = 5.0) -> None:
        self.path = path
        self.timeout = timeout

    async def _request(self, data: bytes, what: str) -> str:
        try:
            async with asyncio.timeout(self.timeout):
                reader, writer = await asyncio.open_unix_connection(str(self.path), limit=codec.MAX_RESPONSE)
                try:
                    writer.write(data)
                    await writer.drain()
                    # Every response ends with "errno=N\n\n" (spec); readuntil is bounded by ``limit``.
                    raw = await reader.readuntil(b"\n\n")
                finally:
                    writer.close()
                    # The daemon may close first; the response is already in hand.
                    with contextlib.suppress(OSError):
                        await writer.wait_closed()
        except TimeoutError:
            raise Unavailable(
                f"WireGuard UAPI {self.path} did not answer {what} within {self.timeout}s"
            ) from None
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
            raise Unavailable(
                f"WireGuard UAPI {self.path}: bad answer to {what} ({exc.__class__.__name__})"
            ) from None
        except OSError as exc:
            raise Unavailable(
                f"cannot talk to WireGuard at {self.path}: {exc.strerror or exc}; is wireguard-go running?"
            ) from None
        return raw.decode("ascii", errors="replace")

    async def get(self) -> codec.DeviceState:
        return codec.parse_get(await self._request(codec.GET_REQUEST, "get"))

    async def set(self, request: bytes) -> None:
        codec.check_errno(await self._request(request, "set"), "set")
