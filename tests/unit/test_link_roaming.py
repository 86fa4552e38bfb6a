"""Daemon.reassert_endpoints: WireGuard's roaming never overrides the path ghostlink.paths chose."""

from __future__ import annotations

import dataclasses
from typing import Any, cast

from ghostcore.keys import PrivateKey
from ghostlink import engine
from ghostlink.control import CoordClient, Daemon
from ghostlink.traversal import Traversal
from ghostlink.wg.fake import FakeBackend

DIRECT = "198.51.100.7:41641"
PROXY = "127.0.0.1:40001"


class ChosenPaths:
    """The part of Traversal the guard reads: the endpoint chosen per peer."""

    def __init__(self, chosen: dict[str, str]) -> None:
        self.chosen = chosen

    def endpoints(self) -> dict[str, str]:
        return dict(self.chosen)


async def _daemon_with_peers(peers: dict[str, str | None]) -> tuple[Daemon, FakeBackend]:
    backend = FakeBackend()
    key = PrivateKey.generate()
    daemon = Daemon(cast(CoordClient, object()), backend, cast(Any, object()), key=key, listen_port=41641)
    await backend.up(key, 41641, 1280)
    specs = tuple(
        engine.PeerSpec(public_key=k, allowed_ips=(f"100.64.0.{i + 2}/32",), endpoint=ep, keepalive=25)
        for i, (k, ep) in enumerate(peers.items())
    )
    plan = engine.Plan(peers_add=specs)
    await backend.apply(plan)
    daemon.applied = engine.applied_after(daemon.applied, plan)
    return daemon, backend


def _roam(backend: FakeBackend, key: str, endpoint: str) -> None:
    peer = backend.device.peers[key]
    backend.device.peers[key] = dataclasses.replace(peer, endpoint=endpoint)


async def test_a_roamed_endpoint_is_put_back_and_others_are_untouched() -> None:
    k1, k2, k3 = (PrivateKey.generate().public_key().base64() for _ in range(3))
    daemon, backend = await _daemon_with_peers({k1: DIRECT, k2: PROXY, k3: "192.0.2.8:41641"})
    daemon.traversal = cast(Traversal, ChosenPaths({k1: DIRECT, k2: PROXY}))
    assert await daemon.reassert_endpoints() == 0
    requests = len(backend.requests)
    _roam(backend, k1, PROXY)  # a relayed packet moved the direct peer to the proxy
    _roam(backend, k3, "192.0.2.99:5000")  # not chosen by traversal (no relay map): roaming is WireGuard's
    assert await daemon.reassert_endpoints() == 1
    assert backend.device.peers[k1].endpoint == DIRECT
    assert backend.device.peers[k3].endpoint == "192.0.2.99:5000"
    assert len(backend.requests) == requests + 1
    assert b"endpoint=198.51.100.7:41641" in backend.requests[-1]
    assert b"replace_allowed_ips" not in backend.requests[-1]  # only the endpoint is set again


async def test_no_traversal_means_nothing_is_reasserted() -> None:
    k1 = PrivateKey.generate().public_key().base64()
    daemon, backend = await _daemon_with_peers({k1: DIRECT})
    _roam(backend, k1, PROXY)
    assert await daemon.reassert_endpoints() == 0
    assert backend.device.peers[k1].endpoint == PROXY
