"""ghostmesh in-process with ``[relay]`` regions: relay maps in node maps, refresh, rotation, home regions.

The first map's TURN credentials are used for a real TURN Allocate (aioice's client) at an in-process
ghostgate sharing the secret; relay tokens are checked through ``relaywire``'s challenge / AUTH round.
Credential refresh is driven through the hub's clock and :meth:`Hub.run_due` instead of waiting hours.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from aioice.turn import create_turn_endpoint

from ghostcore import relaywire, tlscert
from ghostcore.errors import ConfigError
from ghostcore.keys import PrivateKey, PublicKey
from ghostcore.pb.ghostmesh.v1 import coordination_pb2 as pb
from ghostgate import creds
from ghostgate.config import GateConfig, relay_cert
from ghostmesh.config import MeshConfig, RelayConfig
from ghostmesh.server import RunningServer, start_server
from tests.component._gate_fixtures import SECRET as GATE_SECRET
from tests.component._gate_fixtures import Collector
from tests.component._gate_fixtures import start as start_gate
from tests.component._mesh_fixtures import NodeClient, auth_key, mesh_config, next_update

SECRET = GATE_SECRET  # the mesh mints with the gates' TURN secret
LIFETIME = 3600.0


def relay_config(tmp_path: Path, stun_port: int = 3478, lifetime: float = LIFETIME) -> MeshConfig:
    regions = [
        {"id": 1, "name": "local", "host": "127.0.0.1", "stun_port": stun_port},
        {"id": 2, "name": "other", "host": "127.0.0.2", "quic_port": 0, "tcp_port": 0},
    ]
    relay = RelayConfig(secret=SECRET, regions=regions, credential_lifetime=lifetime)
    return replace(mesh_config(tmp_path), relay=relay)


class Clock:
    """A hand-stepped wall clock for the hub (node proofs keep using the real time)."""

    def __init__(self) -> None:
        self.t = time.time()

    def __call__(self) -> float:
        return self.t


@contextlib.asynccontextmanager
async def running(cfg: MeshConfig, clock: Callable[[], float] = time.time) -> AsyncIterator[RunningServer]:
    srv = await start_server(cfg, clock=clock)
    try:
        yield srv
    finally:
        await srv.stop(grace=0.2)


def assert_token_for(relay_map: pb.RelayMap, node: PrivateKey, now: float) -> None:
    """The token passes a relay's challenge for ``node`` (what ghostgate's relay checks), with the relay
    static key and the certificate pin the map names, which are the ones a gate with the secret uses."""
    static = relaywire.relay_static_key(SECRET.encode())
    assert relay_map.relay_static_key == static.public_key().raw
    cert = relay_cert(GateConfig(), SECRET.encode())
    for region in relay_map.regions:
        assert region.tls_pin == tlscert.spki_sha256(cert.certificate)
    challenge = os.urandom(relaywire.CHALLENGE_LEN)
    payload = relaywire.encode_auth(
        node, PublicKey(relay_map.relay_static_key), relay_map.expires_unix, relay_map.relay_token, challenge
    )
    raw = node.public_key().raw
    assert relaywire.verify_auth(SECRET.encode(), static, payload, challenge, now) == raw


class Stream:
    """A Sync stream read by a task into a queue, so waiting for "nothing" never cancels the call
    (a cancelled ``read()`` cancels the whole gRPC call)."""

    def __init__(self, call: Any) -> None:
        self.call = call
        self.queue: asyncio.Queue[pb.MapUpdate] = asyncio.Queue()
        self.task = asyncio.get_running_loop().create_task(self._pump())

    async def _pump(self) -> None:
        while True:
            msg = await self.call.read()
            if msg is grpc.aio.EOF:
                return
            self.queue.put_nowait(msg)

    async def next(self, wait: float = 3.0) -> pb.MapUpdate:
        try:
            return await asyncio.wait_for(self.queue.get(), wait)
        except TimeoutError:
            pytest.fail(f"no map update within {wait}s")

    async def quiet(self, wait: float = 0.3) -> bool:
        """True when nothing arrives within ``wait`` seconds."""
        await asyncio.sleep(wait)
        return self.queue.empty() and not self.task.done()

    async def close(self) -> None:
        self.call.cancel()
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
            await self.task


async def test_first_map_carries_working_credentials(tmp_path: Path) -> None:
    gate = await start_gate(denied=[])
    try:
        async with running(relay_config(tmp_path, stun_port=gate.address[1])) as srv:
            key = await auth_key(srv)
            a = NodeClient(srv)
            node = await a.register(key, "alpha")
            call = a.sync()
            before = int(time.time())
            full = await next_update(call)
            rm = full.relay_map
            assert [
                (r.id, r.name, r.host, r.stun_port, r.quic_port, r.tcp_port, r.turn) for r in rm.regions
            ] == [
                (1, "local", "127.0.0.1", gate.address[1], gate.address[1] + 1, gate.address[1], True),
                (2, "other", "127.0.0.2", 3478, 0, 0, True),
            ]
            assert list(rm.fallback) == ["ice", "turn", "stun"]
            assert before + LIFETIME <= rm.expires_unix <= time.time() + LIFETIME
            assert rm.turn_username == f"{rm.expires_unix}:{node.id}"
            assert rm.turn_password == creds.rest_password(SECRET.encode(), rm.turn_username)
            assert_token_for(rm, a.key, time.time())
            # ghostgate's TURN server accepts them: a real Allocate with a client that is not ours
            turn, _ = await asyncio.wait_for(
                create_turn_endpoint(Collector, gate.address, rm.turn_username, rm.turn_password), 5
            )
            try:
                assert turn.get_extra_info("sockname")[0] == "127.0.0.1"  # the relayed address
                assert len(gate.core.allocations) == 1
            finally:
                turn.close()
            call.cancel()
            await a.close()
    finally:
        gate.close()


async def test_no_regions_no_relay_map(tmp_path: Path) -> None:
    async with running(mesh_config(tmp_path)) as srv:
        a = NodeClient(srv)
        await a.register(await auth_key(srv), "alpha")
        call = a.sync()
        assert not (await next_update(call)).HasField("relay_map")
        call.cancel()
        await a.close()


async def test_regions_without_secret_do_not_start(tmp_path: Path) -> None:
    cfg = relay_config(tmp_path)
    cfg = replace(cfg, relay=replace(cfg.relay, secret=""))
    with pytest.raises(ConfigError, match=r"relay\.secret: required") as info:
        await start_server(cfg)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "state").exists()  # refused before anything was created


async def test_home_region_reaches_peers_and_bad_reports_are_refused(tmp_path: Path) -> None:
    async with running(relay_config(tmp_path)) as srv:
        key = await auth_key(srv, reusable=True)
        a, b = NodeClient(srv), NodeClient(srv)
        await a.register(key, "alpha")
        nb = await b.register(key, "beta")
        call_a = Stream(a.sync())
        await call_a.next()
        call_b = Stream(b.sync())
        await call_b.next()
        assert (await call_a.next()).peers_upserted[0].online  # b came online

        await b.report(endpoints=["192.0.2.7:41641"], home_region=2, turn_relay="127.0.0.2:50000")
        delta = await call_a.next()
        (peer,) = delta.peers_upserted
        assert (peer.id, peer.home_region, peer.turn_relay) == (nb.id, 2, "127.0.0.2:50000")
        assert not delta.HasField("relay_map")  # a peer's report does not touch our credentials
        own = await call_b.next()  # b's own record, as peers see it
        assert (own.self.home_region, own.self.turn_relay) == (2, "127.0.0.2:50000")

        await b.report(endpoints=["192.0.2.7:41641"], home_region=2, turn_relay="127.0.0.2:50000")
        assert await call_a.quiet()  # unchanged values: nothing sent

        for kw, message in (
            ({"home_region": 9}, "home_region 9 is not a relay region of this server (known: 1, 2)"),
            ({"turn_relay": "127.0.0.2"}, "invalid turn_relay '127.0.0.2'"),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await b.report(endpoints=["192.0.2.99:1"], **kw)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert message in (info.value.details() or "")
            assert "\n" not in (info.value.details() or "")
        rec = srv.state.node(nb.id)
        assert rec is not None
        assert (rec.endpoints, rec.home_region, rec.turn_relay) == (
            ("192.0.2.7:41641",),
            2,
            "127.0.0.2:50000",
        )
        assert await call_a.quiet()  # refused reports changed nothing

        await b.report(endpoints=["192.0.2.7:41641"], home_region=1)
        (peer,) = (await call_a.next()).peers_upserted
        assert (peer.home_region, peer.turn_relay) == (1, "")
        await call_a.close()
        await call_b.close()
        await a.close()
        await b.close()


async def test_credentials_are_refreshed_in_a_delta(tmp_path: Path) -> None:
    clock = Clock()
    async with running(relay_config(tmp_path, lifetime=1000.0), clock) as srv:
        key = await auth_key(srv, reusable=True)
        a, b = NodeClient(srv), NodeClient(srv)
        await a.register(key, "alpha")
        await b.register(key, "beta")
        call_a = Stream(a.sync())
        first = (await call_a.next()).relay_map
        assert first.expires_unix == int(clock.t + 1000.0)
        due = srv.hub.next_deadline()
        assert due is not None
        assert due == pytest.approx(clock.t + 400.0, abs=1)  # before half the lifetime is left
        clock.t += 100.0
        call_b = Stream(b.sync())  # b's credentials fall due 100 s after a's
        await call_b.next()
        await call_a.next()  # b online

        clock.t = due - 50.0 - 1  # the slack (5% of the lifetime) before it is due
        srv.hub.run_due()
        assert await call_a.quiet()  # not due yet: nothing sent

        clock.t = due + 1
        srv.hub.run_due()
        delta = await call_a.next()
        assert not delta.full
        assert list(delta.peers_upserted) == []
        fresh = delta.relay_map
        assert fresh.expires_unix == int(clock.t + 1000.0)
        assert fresh.expires_unix - clock.t > 500  # more than half its life left
        assert fresh.turn_password == creds.rest_password(SECRET.encode(), fresh.turn_username)
        assert_token_for(fresh, a.key, clock.t)
        assert await call_b.quiet(0.1)  # b is not due yet
        assert srv.hub.next_deadline() == pytest.approx(due + 100.0, abs=1)  # b's turn next
        await call_a.close()
        await call_b.close()
        await a.close()
        await b.close()


async def test_key_rotation_remints_the_relay_token(tmp_path: Path) -> None:
    async with running(relay_config(tmp_path)) as srv:
        a = NodeClient(srv)
        await a.register(await auth_key(srv), "alpha")
        call = Stream(a.sync())
        first = (await call.next()).relay_map
        assert_token_for(first, a.key, time.time())

        new = PrivateKey.generate()
        await a.rotate(a.rotate_request(new))
        assert await call.quiet()  # pending only: the old key's token stays
        a.key = new
        await a.report(endpoints=["192.0.2.7:41641"])  # the first call proven with the new key
        delta = await call.next()
        assert delta.self.node_key == a.pub
        assert delta.HasField("relay_map")
        assert_token_for(delta.relay_map, a.key, time.time())
        assert delta.relay_map.relay_token != first.relay_token
        await call.close()
        await a.close()
