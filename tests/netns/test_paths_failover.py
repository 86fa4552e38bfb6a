"""Path failover on real WireGuard in the NAT lab: a cut direct path, a dead relay region, and coturn as TURN.

One NAT mesh (lab/natmesh.py) for the first two tests: ghostmesh, two ghostgate regions r1/r2, two easy
and two hard nodes, each behind its own router.

* A cut direct path: two easy nodes on a direct path, 20 pps ping streams both ways; an nftables rule in
  one router drops UDP between the two public addresses (the relays stay reachable). Traffic must flow
  through a relay within 3 s (longest run of lost pings) and ``ghostctl peers`` must say "relay"; after the
  rule goes, both sides go back to "direct" with no second outage, and the WireGuard session is the same one
  (latest handshake unchanged: only WireGuard's endpoint moved, by UAPI, never the session; a scheduled
  rekey 120 s after the last handshake is allowed, nothing earlier).
* A dead region: two hard nodes relayed; the region one of them relays through is SIGKILLed: within 5 s
  both sides show a relayed path through the other region, and pings flow again (longest outage <= 5 s);
  ``ghostctl netcheck`` then names a live home region on both.
* Key rotation on a relayed path: a hard node rotates its WireGuard key during 20 pps ping streams with the
  other hard node (relayed): the relay must learn the new key (its token is bound to the key ghostmesh
  holds) and the stream loses at most a few pings; the path stays relayed and pings still flow after.
* coturn interop: a mesh whose only region is Debian's coturn (TURN REST secret shared with ghostmesh, no
  QUIC/TLS relay): two hard nodes relay through TURN (path "turn", WireGuard's endpoint the local proxy)
  and ping each other; coturn's own log shows the allocations and the permissions to the peers.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab import PingStats, gaps, lab_for, longest_gap
from lab.natmesh import REKEY_AFTER_TIME, NatMesh
from lab.regions import coturn_available, coturn_region

pytestmark = pytest.mark.netns

INTERVAL = 0.05  # ping stream: 20 pps


@pytest.fixture(scope="module")
def nm(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatMesh]:
    lab = lab_for(request, name="failover")
    with lab:
        nm = NatMesh.build(lab, Path(tmp_path_factory.mktemp("failover")), per_kind={"easy": 2, "hard": 2})
        nm.start()
        nm.join_all()
        yield nm
        lab.assert_no_tracebacks()
    assert lab.leftovers() == []


def _lost_after(stats: PingStats, seconds: float) -> list[int]:
    """Sequence numbers lost among the pings sent ``seconds`` or more after the stream started."""
    first = int(seconds / INTERVAL) + 1
    return [s for s in stats.missing_seqs if s >= first and s != stats.transmitted]


def test_cut_direct_path_fails_over_to_a_relay_within_3s_and_returns_with_the_session_kept(
    nm: NatMesh,
) -> None:
    e1, e2 = nm.of_kind("easy")
    nm.ping_both(e1, e2, timeout=15)
    for x, y in ((e1, e2), (e2, e1)):
        nm.wait_path(x, y, {"direct"}, timeout=15)
    hs_before = {(x.name, y.name): nm.handshake(x, y) for x, y in ((e1, e2), (e2, e1))}
    assert all(hs > 0 for hs in hs_before.values()), hs_before
    started = time.monotonic()
    streams = {
        f"{x.name}->{y.name}": x.host.ping_stream(nm.v4(y), interval=INTERVAL, log_name=f"ping-cut-{y.name}")
        for x, y in ((e1, e2), (e2, e1))
    }
    try:
        time.sleep(1.0)
        cut_at = time.monotonic()
        with nm.direct_cut(e1, e2):  # lifted in the middle; on a failure, on the way out
            relayed = [nm.wait_path(x, y, {"relay"}, timeout=5) for x, y in ((e1, e2), (e2, e1))]
            to_relay = time.monotonic() - cut_at
            assert all(r in nm.regions for _, r in relayed), relayed
            time.sleep(2.0)  # a while on the relay
            assert all(nm.path_of(x, y)[0] == "relay" for x, y in ((e1, e2), (e2, e1)))
            restored_at = time.monotonic()
            nm.restore_direct(e1, e2)
        for x, y in ((e1, e2), (e2, e1)):
            nm.wait_path(x, y, {"direct"}, timeout=15)
        to_direct = time.monotonic() - restored_at
        time.sleep(1.5)  # a while back on the direct path
    finally:
        stats = {name: s.stop() for name, s in streams.items()}
    report = {n: (s.transmitted, s.lost, [round(g, 2) for g in gaps(s, INTERVAL)]) for n, s in stats.items()}
    print(f"\ncut: relay after {to_relay:.2f}s, direct again {to_direct:.2f}s after restore; {report}")
    for name, s in stats.items():
        assert s.transmitted >= int((restored_at - started) / INTERVAL), (name, s)
        assert longest_gap(s, INTERVAL) <= 3.0, f"{name}: outage over 3 s after the cut: {report[name]}"
        # Back to direct without a second outage: at most 0.5 s of pings lost from the restore on.
        late = _lost_after(s, restored_at - started)
        assert len(late) * INTERVAL <= 0.5, f"{name}: lost {late} after the direct path returned"
    for (a, b), before in hs_before.items():
        x, y = nm.nodes[a], nm.nodes[b]
        after = nm.handshake(x, y)
        assert after == before or after - before >= REKEY_AFTER_TIME, (
            f"{a}: WireGuard session with {b} was renewed {after - before}s after the last handshake "
            "(a path switch must only move the endpoint)"
        )
    for x, y in ((e1, e2), (e2, e1)):
        entry = nm.peer_entry(x, y)
        assert entry is not None
        assert str(entry["endpoint"]).rsplit(":", 1)[0] == y.public_ip, entry


def test_killing_a_relay_region_moves_relayed_nodes_to_the_other_within_5s(nm: NatMesh) -> None:
    h1, h2 = nm.of_kind("hard")
    nm.ping_both(h1, h2, timeout=15)
    _, via = nm.wait_path(h1, h2, {"relay"}, timeout=10)
    nm.wait_path(h2, h1, {"relay"}, timeout=10)
    assert via in nm.regions
    others = set(nm.regions) - {via}
    started = time.monotonic()
    streams = {
        f"{x.name}->{y.name}": x.host.ping_stream(nm.v4(y), interval=INTERVAL, log_name=f"ping-gate-{y.name}")
        for x, y in ((h1, h2), (h2, h1))
    }
    last: list[object] = [None]

    def moved() -> bool:
        paths = (nm.path_of(h1, h2), nm.path_of(h2, h1))
        last[0] = paths
        return all(p == "relay" and r in others for p, r in paths)

    try:
        time.sleep(1.0)
        killed_at = time.monotonic()
        nm.regions[via].kill()
        nm.lab.wait_for(moved, timeout=5, interval=0.1, what=f"both hard nodes off region {via}: {last}")
        switched = time.monotonic() - killed_at
        nm.ping_both(h1, h2, timeout=5)
        time.sleep(1.0)
        dead = nm.regions[via].spec.id
        homes = {n.name: nm.netcheck(n)["home_region"] for n in (h1, h2)}
        assert all(h not in (0, dead) for h in homes.values()), f"home regions after {via} died: {homes}"
    finally:
        stats = {name: s.stop() for name, s in streams.items()}
        region = nm.regions[via]
        if region.proc is not None and not region.proc.alive():
            region.start()  # leave the module's mesh whole
    report = {n: (s.transmitted, s.lost, [round(g, 2) for g in gaps(s, INTERVAL)]) for n, s in stats.items()}
    print(f"\nregion {via} killed: paths {last[0]} after {switched:.2f}s; {report}")
    for name, s in stats.items():
        assert s.transmitted >= int((killed_at - started) / INTERVAL), (name, s)
        assert longest_gap(s, INTERVAL) <= 5.0, f"{name}: outage over 5 s: {report[name]}"
        assert not _lost_after(s, killed_at - started + 5.0), f"{name}: still losing pings 5 s after the kill"


def test_key_rotation_on_a_relayed_path_keeps_traffic_flowing(nm: NatMesh) -> None:
    h1, h2 = nm.of_kind("hard")
    nm.ping_both(h1, h2, timeout=15)
    nm.wait_path(h1, h2, {"relay"}, timeout=10)
    old_key = nm.key_of(h1)
    streams = {
        f"{x.name}->{y.name}": x.host.ping_stream(nm.v4(y), interval=INTERVAL, log_name=f"ping-rot-{y.name}")
        for x, y in ((h1, h2), (h2, h1))
    }
    try:
        time.sleep(1.0)
        doc = nm.mesh.ctl("--socket", str(h1.node.socket), "keys", "rotate")
        assert doc["old_node_key"] == old_key, doc
        assert nm.key_of(h1, fresh=True) == doc["new_node_key"] != old_key, doc
        nm.lab.wait_for(lambda: nm.peer_entry(h2, h1), timeout=5, what="h2 lists h1 with its new key")
        time.sleep(2.0)
        nm.ping_both(h1, h2, timeout=5)
    finally:
        stats = {name: s.stop() for name, s in streams.items()}
    report = {n: (s.transmitted, s.lost, [round(g, 2) for g in gaps(s, INTERVAL)]) for n, s in stats.items()}
    print(f"\nkey rotation on a relayed path: {report}")
    for x, y in ((h1, h2), (h2, h1)):
        assert nm.path_of(x, y)[0] == "relay", (x.name, y.name, nm.path_of(x, y))
    for name, s in stats.items():
        assert s.transmitted >= 50, (name, s)
        assert longest_gap(s, INTERVAL) <= 1.0, f"{name}: outage over 1 s across the rotation: {report[name]}"


@pytest.mark.skipif(not coturn_available(), reason="coturn's turnserver missing: apt-get install coturn")
def test_two_hard_nodes_relay_through_coturn_as_turn(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    with lab_for(request, tmp_path, name="coturn") as lab:
        nm = NatMesh.build(lab, tmp_path / "mesh", per_kind={"hard": 2}, regions=(coturn_region(),))
        nm.start()
        nm.join_all()
        h1, h2 = nm.of_kind("hard")
        nm.ping_both(h1, h2, timeout=20)
        for x, y in ((h1, h2), (h2, h1)):
            path, relay = nm.wait_path(x, y, {"turn"}, timeout=10)
            assert relay == "coturn", (x.name, y.name, path, relay)
            entry = nm.peer_entry(x, y)
            assert entry is not None
            assert str(entry["endpoint"]).rsplit(":", 1)[0] == "127.0.0.1", entry
        stream = h1.host.ping_stream(nm.v4(h2), interval=INTERVAL, log_name="ping-turn")
        time.sleep(2.0)
        stats = stream.stop()
        assert stats.transmitted >= 30
        assert stats.lost <= 1, stats  # the last one may be in flight
        coturn = nm.regions["coturn"].proc
        assert coturn is not None
        log = coturn.log_text()
        # coturn itself allocated for both nodes and let them talk to each other's relayed address.
        assert log.count("ALLOCATE processed, success") >= 2, coturn.log_path
        assert "CREATE_PERMISSION processed, success" in log or "CHANNEL_BIND processed, success" in log
        lab.assert_no_tracebacks()
    assert lab.leftovers() == []
