"""The wireguard-go backend with real wireguard-go, in a network namespace this test creates.

Two devices in one namespace peer with each other over 127.0.0.1; persistent keepalive makes them
handshake. Then a third, unrelated peer is added, updated and removed on device A through the
backend's incremental UAPI requests, and ``wg show <if> dump`` plus the handshake timestamps prove the
A<->B session was never touched. Also: a killed wireguard-go is restarted and re-programmed; one a
previous run left is refused until it is reaped, and reaped only while it is still that process.
Cleanup (processes by PID, namespace, sockets) always runs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import secrets
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from ghostcore.errors import ConfigError
from ghostcore.keys import PrivateKey
from ghostlink.engine import DesiredState, PeerSpec, plan
from ghostlink.hostjournal import WireGuardGoRecord
from ghostlink.wg import wggo
from ghostlink.wg.uapi import socket_path
from ghostlink.wg.wggo import WireGuardGoBackend, process_identity, reap_leftover
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

    kb = PrivateKey.generate()
    await a.up(PrivateKey.generate(), 0, 1280, on_restart=on_restart)
    s = DesiredState(peers={kb.public_key().base64(): spec(kb, "10.99.0.2/32", "127.0.0.1:7", keepalive=0)})
    await a.apply(plan(DesiredState(), s))
    old = a.pid
    assert old is not None
    os.kill(old, signal.SIGKILL)
    await wait_for(lambda: bool(restarted), limit=10, what="restart")
    assert a.pid != old
    row = dump(ns, a.ifname)[kb.public_key().base64()]
    assert row[2:4] == ["127.0.0.1:7", "10.99.0.2/32"], "the restarted device got its peers back"


# ----- a wireguard-go a previous run left (ghostlink killed with SIGKILL: the child, in its own session,
# keeps running): stopped at the next start only if it is still that very process


def spawn_wireguard_go(ns: str, ifname: str) -> subprocess.Popen[bytes]:
    """wireguard-go for ``ifname`` started as the backend starts it, but by no backend: a crashed run's."""
    proc = subprocess.Popen(
        ["ip", "netns", "exec", ns, "wireguard-go", "-f", ifname],
        env=dict(os.environ, WG_PROCESS_FOREGROUND="1"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    for _ in range(500):  # bounded: 5 s for the UAPI socket
        if socket_path(ifname).exists():
            return proc
        time.sleep(0.01)
    proc.kill()
    raise AssertionError(f"wireguard-go did not open {socket_path(ifname)}")


def record_of(proc: subprocess.Popen[bytes], ifname: str) -> WireGuardGoRecord:
    identity = process_identity(proc.pid)
    assert identity is not None
    assert identity[1] == ("wireguard-go", "-f", ifname), "ip netns exec became wireguard-go, same PID"
    return WireGuardGoRecord(proc.pid, identity[0], identity[1], str(socket_path(ifname)))


async def test_a_leftover_wireguard_go_is_stopped_and_the_interface_reused(netns: str) -> None:
    ifname = f"glwl{secrets.token_hex(2)}"
    left = spawn_wireguard_go(netns, ifname)
    try:
        rec = record_of(left, ifname)
        fresh = WireGuardGoBackend(ifname, netns=netns)
        with pytest.raises(ConfigError, match="run by a WireGuard process this ghostlink did not start"):
            await fresh.up(PrivateKey.generate(), 0, 1280)  # not reaped yet: not ours to take over
        assert left.poll() is None
        await reap_leftover(rec)
        assert left.wait(timeout=5) == 0, "stopped with SIGTERM: wireguard-go exits cleanly"
        assert not socket_path(ifname).exists()
        await fresh.up(PrivateKey.generate(), 0, 1280)
        await fresh.close()
    finally:
        if left.poll() is None:
            left.kill()
            left.wait(5)


async def test_a_pid_that_is_no_longer_that_wireguard_go_is_left_alone(netns: str) -> None:
    ifname = f"glwl{secrets.token_hex(2)}"
    other = spawn_wireguard_go(netns, ifname)
    try:
        rec = record_of(other, ifname)
        # the same PID started at another time: the journaled process exited and the PID was reused
        await reap_leftover(dataclasses.replace(rec, start_time=rec.start_time + 1))
        # the same PID and start time but another program: never a wireguard-go for this interface
        await reap_leftover(dataclasses.replace(rec, argv=("wireguard-go", "-f", "glother")))
        assert other.poll() is None, "alive"
        assert socket_path(ifname).exists(), "a socket that answers is not stale"
    finally:
        other.terminate()
        other.wait(5)
    await reap_leftover(rec)  # gone: nothing to do, no error


def spawn_stuck(cwd: Path, ifname: str) -> tuple[subprocess.Popen[bytes], WireGuardGoRecord]:
    """A process with a wireguard-go's argv (``tail`` following the file ``ifname``) that ignores SIGTERM
    (a signal ignored before exec stays ignored), and its record."""
    (cwd / ifname).write_text("")
    old = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        proc = subprocess.Popen(
            ["wireguard-go", "-f", ifname], executable="/usr/bin/tail", cwd=cwd, start_new_session=True
        )
    finally:
        signal.signal(signal.SIGTERM, old)
    for _ in range(200):  # bounded: 2 s for the exec to show in /proc
        identity = process_identity(proc.pid)
        # between fork and exec /proc/<pid>/cmdline can read empty: wait for the exec'd argv
        if identity is not None and identity[1][:1] == ("wireguard-go",):
            return proc, WireGuardGoRecord(proc.pid, identity[0], identity[1], str(cwd / f"{ifname}.sock"))
        time.sleep(0.01)
    proc.kill()
    proc.wait(5)
    raise AssertionError("tail did not start")


async def test_a_leftover_that_ignores_sigterm_is_killed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(wggo, "STOP_TIMEOUT", 0.3)
    stuck, rec = spawn_stuck(tmp_path, "glstuck")
    try:
        await reap_leftover(rec)
        assert stuck.wait(timeout=5) == -signal.SIGKILL
    finally:
        if stuck.poll() is None:
            stuck.kill()
            stuck.wait(5)
