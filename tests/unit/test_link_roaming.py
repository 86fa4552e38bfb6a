"""engine.reassert_plan: WireGuard's roaming never overrides the path NAT traversal chose (the daemon's
endpoint guard applies this plan; tests/component/test_link_daemon.py runs the guard itself)."""

from __future__ import annotations

import dataclasses

from ghostcore.keys import PrivateKey
from ghostlink import engine
from ghostlink.wg.fake import FakeBackend

DIRECT = "198.51.100.7:41641"
PROXY = "127.0.0.1:40001"


async def _applied(peers: dict[str, str | None]) -> tuple[engine.DesiredState, FakeBackend]:
    backend = FakeBackend()
    await backend.up(PrivateKey.generate(), 41641, 1280)
    specs = tuple(
        engine.PeerSpec(public_key=k, allowed_ips=(f"100.64.0.{i + 2}/32",), endpoint=ep, keepalive=25)
        for i, (k, ep) in enumerate(peers.items())
    )
    plan = engine.Plan(peers_add=specs)
    await backend.apply(plan)
    return engine.applied_after(engine.DesiredState(), plan), backend


def _roam(backend: FakeBackend, key: str, endpoint: str) -> None:
    peer = backend.device.peers[key]
    backend.device.peers[key] = dataclasses.replace(peer, endpoint=endpoint)


def _current(backend: FakeBackend) -> dict[str, str | None]:
    return {key: peer.endpoint for key, peer in backend.device.peers.items()}


async def test_a_roamed_endpoint_is_put_back_and_others_are_untouched() -> None:
    k1, k2, k3 = (PrivateKey.generate().public_key().base64() for _ in range(3))
    applied, backend = await _applied({k1: DIRECT, k2: PROXY, k3: "192.0.2.8:41641"})
    chosen = {k1: DIRECT, k2: PROXY}
    assert engine.reassert_plan(applied, _current(backend), chosen).empty
    requests = len(backend.requests)
    _roam(backend, k1, PROXY)  # a relayed packet moved the direct peer to the proxy
    _roam(backend, k3, "192.0.2.99:5000")  # not chosen by traversal (no relay map): roaming is WireGuard's
    plan = engine.reassert_plan(applied, _current(backend), chosen)
    assert [(u.spec.public_key, u.fields) for u in plan.peers_update] == [(k1, frozenset({"endpoint"}))]
    assert plan.touched_peers() == {k1}
    await backend.apply(plan)
    assert backend.device.peers[k1].endpoint == DIRECT
    assert backend.device.peers[k3].endpoint == "192.0.2.99:5000"
    assert len(backend.requests) == requests + 1
    assert b"endpoint=198.51.100.7:41641" in backend.requests[-1]
    assert b"replace_allowed_ips" not in backend.requests[-1]  # only the endpoint is set again


async def test_nothing_chosen_means_nothing_is_reasserted() -> None:
    k1 = PrivateKey.generate().public_key().base64()
    applied, backend = await _applied({k1: DIRECT})
    _roam(backend, k1, PROXY)
    assert engine.reassert_plan(applied, _current(backend), {}).empty
