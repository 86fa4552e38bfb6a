"""The wireguard-go backend with real wireguard-go, in a network namespace this test creates.

Two devices in one namespace peer with each other over 127.0.0.1; persistent keepalive makes them
handshake. Then a third, unrelated peer is added, updated and removed on device A through the
backend's incremental UAPI requests, and ``wg show <if> dump`` plus the handshake timestamps prove the
A<->B session was never touched. Also: a killed wireguard-go is restarted and re-programmed.
Cleanup (processes by PID, namespace, sockets) always runs.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import subprocess
from collections.abc import AsyncIterator, Iterator

import pytest

from ghostcore.keys import PrivateKey
from ghostlink.engine import DesiredState, PeerSpec, plan
from ghostlink.wg.wggo import WireGuardGoBackend
from tests.component._link_fixtures import netns_ctx, wait_for

pytestmark = pytest.mark.netns


@pytest.fixture
def netns() -> Iterator[str]:
    with netns_ctx() as name:
        yield name


@pytest.fixture
async def pair(netns: str) -> AsyncIterator[tuple[WireGuardGoBackend, WireGuardGoBackend, str]]:
    tag = secrets.token_hex(2)
    a = WireGuardGoBackend(f"glwa{tag}", netns=netns)
    b = WireGuardGoBackend(f"glwb{tag}", netns=netns)
    try:
        yield a, b, netns
    finally:
        for be in (a, b):
            pid = be.pid
            await be.close()
            assert not be.sock.exists(), "the UAPI socket is removed"
            if pid is not None:
                with pytest.raises(ProcessLookupError):
                    os.kill(pid, 0)


def dump(ns: str, ifname: str) -> dict[str, list[str]]:
    out = subprocess.run(
        ["ip", "netns", "exec", ns, "wg", "show", ifname, "dump"], check=True, capture_output=True, text=True
    ).stdout
    rows = [line.split("\t") for line in out.strip().splitlines()]
    # First row is the device; peer rows: key, psk, endpoint, allowed-ips, handshake, rx, tx, keepalive.
    return {r[0]: r for r in rows[1:]}


def spec(key: PrivateKey, allowed: str, endpoint: str | None, keepalive: int = 1) -> PeerSpec:
    return PeerSpec(key.public_key().base64(), (allowed,), endpoint, keepalive)


async def test_incremental_updates_keep_unrelated_session(
    pair: tuple[WireGuardGoBackend, WireGuardGoBackend, str],
) -> None:
    a, b, ns = pair
    ka, kb, kc = PrivateKey.generate(), PrivateKey.generate(), PrivateKey.generate()
    await a.up(ka, 0, 1280)
    await b.up(kb, 0, 1280)
    pa, pb = (await a.read()).listen_port, (await b.read()).listen_port
    assert pa
    assert pb
    assert pa != pb

    sa = DesiredState(peers={kb.public_key().base64(): spec(kb, "10.99.0.2/32", f"127.0.0.1:{pb}")})
    sb = DesiredState(peers={ka.public_key().base64(): spec(ka, "10.99.0.1/32", f"127.0.0.1:{pa}")})
    await a.apply(plan(DesiredState(), sa))
    await b.apply(plan(DesiredState(), sb))

    kb64 = kb.public_key().base64()

    async def handshake() -> tuple[int, int]:
        p = (await a.read()).peers[kb64]
        return p.last_handshake_sec, p.last_handshake_nsec

    for _ in range(500):  # bounded: up to 5 s for the keepalive-triggered handshake
        if (await handshake())[0] > 0:
            break
        await asyncio.sleep(0.01)
    hs = await handshake()
    assert hs[0] > 0, "A and B completed a real WireGuard handshake"
    before = dump(ns, a.ifname)[kb64]

    # Add C, change C's endpoint and allowed IPs, then remove C: each a separate incremental request.
    sc = spec(kc, "10.99.0.3/32", "127.0.0.1:9", keepalive=0)
    s1 = DesiredState(peers={**sa.peers, sc.public_key: sc})
    await a.apply(plan(sa, s1))
    kc64 = kc.public_key().base64()
    assert dump(ns, a.ifname)[kc64][2:4] == ["127.0.0.1:9", "10.99.0.3/32"]
    sc2 = PeerSpec(kc64, ("10.99.0.3/32", "10.98.0.0/16"), "127.0.0.1:10", 0)
    s2 = DesiredState(peers={**sa.peers, kc64: sc2})
    p = plan(s1, s2)
    assert p.touched_peers() == {kc64}
    await a.apply(p)
    row = dump(ns, a.ifname)[kc64]
    assert row[2] == "127.0.0.1:10"
    assert set(row[3].split(",")) == {"10.99.0.3/32", "10.98.0.0/16"}
    await a.apply(plan(s2, sa))
    after_rows = dump(ns, a.ifname)
    assert kc64 not in after_rows

    after = after_rows[kb64]
    assert after[2:5] == before[2:5], "B's endpoint, allowed IPs and handshake stayed as they were"
    assert await handshake() == hs, "B's session was never reset"


async def test_killed_wireguard_go_is_restarted_and_reprogrammed(
    pair: tuple[WireGuardGoBackend, WireGuardGoBackend, str],
) -> None:
    a, _, ns = pair
    restarted: list[bool] = []

    async def on_restart() -> None:
        restarted.append(True)

    a.on_restart = on_restart
    kb = PrivateKey.generate()
    await a.up(PrivateKey.generate(), 0, 1280)
    s = DesiredState(peers={kb.public_key().base64(): spec(kb, "10.99.0.2/32", "127.0.0.1:7", keepalive=0)})
    await a.apply(plan(DesiredState(), s))
    old = a.pid
    assert old is not None
    os.kill(old, signal.SIGKILL)
    await wait_for(lambda: bool(restarted), limit=10, what="restart")
    assert a.pid != old
    row = dump(ns, a.ifname)[kb.public_key().base64()]
    assert row[2:4] == ["127.0.0.1:7", "10.99.0.2/32"], "the restarted device got its peers back"
