"""The UAPI client against an in-test unix socket server: one request per connection, errno, bounds."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from ghostcore.errors import Unavailable
from ghostcore.keys import PrivateKey
from ghostlink.wg import uapi_codec as codec
from ghostlink.wg.uapi import UapiClient

KEY = PrivateKey.generate().public_key().base64()

Handler = Callable[[bytes], bytes | None]


@pytest.fixture
async def uapi(tmp_path: Path) -> AsyncIterator[tuple[Path, list[bytes], list[Handler]]]:
    path = tmp_path / "wgtest.sock"
    requests: list[bytes] = []
    handler: list[Handler] = [lambda req: b"errno=0\n\n"]

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        req = await reader.readuntil(b"\n\n")
        requests.append(req)
        answer = handler[0](req)
        if answer is None:
            await reader.read()  # never answer; the client gives up and closes (EOF)
        else:
            writer.write(answer)
            await writer.drain()
        writer.close()
        await writer.wait_closed()

    server = await asyncio.start_unix_server(serve, path=str(path))
    try:
        yield path, requests, handler
    finally:
        server.close()
        await server.wait_closed()


async def test_get_and_set_one_connection_each(uapi: tuple[Path, list[bytes], list[Handler]]) -> None:
    path, requests, handler = uapi
    dev = codec.DeviceState(listen_port=4242, peers={KEY: codec.PeerState(KEY, rx_bytes=7)})
    handler[0] = lambda req: codec.encode_get_response(dev) if req == codec.GET_REQUEST else b"errno=0\n\n"
    client = UapiClient(path, timeout=2)
    assert await client.get() == dev
    await client.set(codec.encode_set([codec.PeerChange(KEY, remove=True)]))
    assert requests[0] == b"get=1\n\n"
    assert requests[1].startswith(b"set=1\npublic_key=")


async def test_errno_is_an_error(uapi: tuple[Path, list[bytes], list[Handler]]) -> None:
    path, _, handler = uapi
    handler[0] = lambda req: b"errno=22\n\n"
    with pytest.raises(codec.UapiError, match="errno=22"):
        await UapiClient(path, timeout=2).set(b"set=1\n\n")


async def test_silent_daemon_times_out(uapi: tuple[Path, list[bytes], list[Handler]]) -> None:
    path, _, handler = uapi
    handler[0] = lambda req: None
    with pytest.raises(Unavailable, match=r"did not answer get within 0\.2s"):
        await UapiClient(path, timeout=0.2).get()


async def test_truncated_answer(uapi: tuple[Path, list[bytes], list[Handler]]) -> None:
    path, _, handler = uapi
    handler[0] = lambda req: b"listen_port=1\n"
    with pytest.raises(Unavailable, match="bad answer"):
        await UapiClient(path, timeout=2).get()


async def test_missing_socket(tmp_path: Path) -> None:
    with pytest.raises(Unavailable, match="is wireguard-go running"):
        await UapiClient(tmp_path / "nope.sock", timeout=1).get()
