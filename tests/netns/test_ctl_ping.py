"""``ghostctl ping`` between real nodes: ICMP echoes through wireguard-go, timed, with the path they took.

A small NAT mesh (lab/natmesh.py: ghostmesh, the two relay regions, two public nodes and one behind a
firewall that blocks UDP). The public pair goes direct, the blocked node is reached through a relay
(TLS over TCP): ``ghostctl ping`` on each side must get answers and name that path, its endpoint and the
relay region; an unknown peer is exit 4.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab import lab_for
from lab.natmesh import NatMesh, NatNode

pytestmark = pytest.mark.netns


@pytest.fixture(scope="module")
def nm(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatMesh]:
    lab = lab_for(request, name="ping")
    with lab:
        nm = NatMesh.build(lab, Path(tmp_path_factory.mktemp("ping")), per_kind={"none": 2, "udp_blocked": 1})
        nm.start()
        nm.join_all()
        yield nm
        lab.assert_no_tracebacks()
    assert lab.leftovers() == []


def _ping(nm: NatMesh, src: NatNode, *args: str) -> tuple[int, str, str]:
    res = nm.mesh.ctl_text("--socket", str(src.node.socket), "ping", *args)
    return res.returncode, res.stdout, res.stderr


def test_direct_peers_ping_each_other_and_see_a_direct_path(nm: NatMesh) -> None:
    a, b = nm.of_kind("none")
    nm.ping_both(a, b)
    nm.wait_path(a, b, {"direct"})
    nm.wait_path(b, a, {"direct"})
    code, out, err = _ping(nm, a, b.name, "-c", "3", "-i", "0.2")
    assert code == 0, f"{out}{err}"
    pongs = re.findall(
        rf"^pong from {b.name} \({re.escape(nm.v4(b))}\) via direct (\S+) in ([\d.]+) ms$", out, re.M
    )
    assert pongs, out
    # the peer's own address (IPv4 or IPv6), never the local relay proxy
    assert all(not ep.startswith("127.0.0.1:") for ep, _ in pongs), out
    assert f"--- {b.name}: 3 sent," in out

    # the other way, by overlay address, as JSON
    doc = nm.mesh.ctl("--socket", str(b.node.socket), "ping", nm.v4(a), "-c", "2", "-i", "0.2")
    assert doc["peer"] == a.name
    assert doc["answered"] >= 1
    answered = [r for r in doc["replies"] if r["rtt_ms"] is not None]
    assert all(r["path"] == "direct" and r["rtt_ms"] > 0 for r in answered), doc


def test_a_relayed_peer_answers_and_the_relay_region_is_named(nm: NatMesh) -> None:
    a = nm.of_kind("none")[0]
    c = nm.of_kind("udp_blocked")[0]
    nm.ping_both(a, c)
    _, region = nm.wait_path(a, c, {"relay"})
    code, out, err = _ping(nm, a, c.name, "-c", "3", "-i", "0.2")
    assert code == 0, f"{out}{err}"
    assert re.search(
        rf"^pong from {c.name} .* via relay {re.escape(region)} \(127\.0\.0\.1:\d+\) in", out, re.M
    ), out
    _, region_c = nm.wait_path(c, a, {"relay"})
    code, out, err = _ping(nm, c, nm.key_of(a), "-c", "2", "-i", "0.2")
    assert code == 0, f"{out}{err}"
    assert f"via relay {region_c} (127.0.0.1:" in out


def test_an_unknown_peer_is_exit_4(nm: NatMesh) -> None:
    code, _, err = _ping(nm, nm.of_kind("none")[0], "nobody", "-c", "1")
    assert code == 4
    assert "no peer 'nobody'" in err
    assert "Traceback" not in err
