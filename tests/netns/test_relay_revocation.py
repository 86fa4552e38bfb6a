"""Relay revocation with real processes in the NAT lab (lab/natmesh.py): ghostmesh, two ghostgate regions
whose ``[control]`` watches ghostmesh (lab/regions.py), and three ghostlink nodes behind symmetric NATs, so
every pair is relayed.

While h1 <-> h2 and h3 -> h1 ping each other at 20 pps through the relays, ``ghostctl nodes delete h3``:
within 3 s both gates have closed h3's relay connections (their log says ``revoked: 1 relay connections``),
h3's ghostlink, which keeps running on its last map and keeps retrying, is refused at AUTH ("node not
current") and has no live relay left (``ghostctl netcheck``: home region 0), h3's relayed pings stop, and
the h1 <-> h2 streams lose nothing worth a second. Before ``[control]`` existed, h3's relay connections stayed
up until its credentials expired.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab import gaps, lab_for, longest_gap
from lab.natmesh import NatMesh, NatNode

pytestmark = pytest.mark.netns

INTERVAL = 0.05  # ping streams: 20 pps
LIMIT = 3.0  # delete -> every gate closed the node's relay connections


@pytest.fixture
def nm(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[NatMesh]:
    lab = lab_for(request, tmp_path, name="revoke")
    with lab:
        nm = NatMesh.build(lab, tmp_path / "mesh", per_kind={"hard": 3})
        nm.start()
        nm.join_all()
        yield nm
        lab.assert_no_tracebacks()
    assert lab.leftovers() == []


def gate_log(nm: NatMesh, region: str) -> str:
    proc = nm.regions[region].proc
    assert proc is not None
    return proc.log_text()


def home_region(nm: NatMesh, n: NatNode) -> int:
    return int(nm.netcheck(n)["home_region"])


def test_a_deleted_nodes_relayed_traffic_stops_within_seconds_while_others_flow(nm: NatMesh) -> None:
    h1, h2, h3 = nm.of_kind("hard")
    for x, y in ((h1, h2), (h1, h3)):
        nm.ping_both(x, y, timeout=20)
        nm.wait_path(x, y, {"relay"}, timeout=10)
        nm.wait_path(y, x, {"relay"}, timeout=10)
    assert home_region(nm, h3) != 0
    for region in nm.regions:  # every gate holds the set, and h3 is connected to every region
        nm.lab.wait_for(
            lambda r=region: "control: watching ghostmesh" in gate_log(nm, r),
            timeout=10,
            what=f"gate {region} watching ghostmesh",
        )
    started = time.monotonic()
    streams = {
        f"{x.name}->{y.name}": x.host.ping_stream(nm.v4(y), interval=INTERVAL, log_name=f"ping-rev-{y.name}")
        for x, y in ((h1, h2), (h2, h1), (h3, h1))
    }
    try:
        time.sleep(1.0)
        deleted_at = time.monotonic()
        nm.mesh.ctl("nodes", "delete", h3.name)
        for region in nm.regions:
            nm.lab.wait_for(
                lambda r=region: "revoked: 1 relay connections" in gate_log(nm, r),
                timeout=LIMIT,
                interval=0.05,
                what=f"gate {region} closing {h3.name}'s relay connection",
            )
        closed = time.monotonic() - deleted_at
        # h3 keeps retrying with its (unexpired) credentials: refused at AUTH, so no relay stays up
        nm.lab.wait_for(
            lambda: any("relay AUTH: node not current" in gate_log(nm, r) for r in nm.regions),
            timeout=10,
            what=f"a gate refusing {h3.name}'s AUTH",
        )
        assert home_region(nm, h3) == 0
        time.sleep(1.0)
    finally:
        stats = {name: s.stop() for name, s in streams.items()}
    report = {n: (s.transmitted, s.lost, [round(g, 2) for g in gaps(s, INTERVAL)]) for n, s in stats.items()}
    print(f"\ndelete -> both gates closed {h3.name}'s relay connections in {closed * 1000:.0f} ms; {report}")
    for name in (f"{h1.name}->{h2.name}", f"{h2.name}->{h1.name}"):
        s = stats[name]
        assert s.transmitted >= 40, (name, s)
        assert longest_gap(s, INTERVAL) <= 1.0, f"{name}: outage over 1 s: {report[name]}"
    deleted = stats[f"{h3.name}->{h1.name}"]
    answered_before = int((deleted_at - started) / INTERVAL) - 2
    assert deleted.received >= answered_before // 2, ("h3's pings flowed before the delete", deleted)
    last_answered = max(set(range(1, deleted.transmitted + 1)) - set(deleted.missing_seqs), default=0)
    assert last_answered * INTERVAL <= (deleted_at - started) + LIMIT, (
        f"{h3.name}'s relayed pings still answered {last_answered * INTERVAL:.1f} s into the stream, "
        f"the delete was at {deleted_at - started:.1f} s"
    )
