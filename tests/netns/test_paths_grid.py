"""The NAT grid: every pair of NAT kinds reaches each other over the mesh, on the path class it must get.

One NAT mesh for the whole module (lab/natmesh.py: ghostmesh, two ghostgate regions, two nodes of each
kind none / easy / hard / udp_blocked, each NATed node behind its own router). For each of the 10 kind pairs
(same-kind pairs included) the two nodes ping each other both ways, then both sides' ``ghostctl peers``
must show the expected path class:

* direct: none <-> none / easy / hard, easy <-> easy (STUN from WireGuard's port + checks open the NATs),
  easy <-> hard (birthday probing, ghostlink/traversal/birthday_core.py: a round misses with ~2 % odds,
  so these pairs get ``BIRTHDAY_WITHIN``, the bound of all its rounds). WireGuard's endpoint is then the
  peer's public address (no local proxy, so no Python on the path);
* relay (QUIC or TLS relay of one of the regions): hard <-> hard (no probing: no chance between two
  symmetric NATs), and every pair with a udp_blocked node (TLS over TCP to the relay's port is all it
  has). WireGuard's endpoint is then the local proxy on 127.0.0.1, and the relay named is one of the
  regions.

Before the pairs, ``ghostctl netcheck`` on every node must describe its NAT: UDP or not, the mapping
(endpoint-independent behind none/easy, varies-by-destination behind hard), the public endpoint seen from
WireGuard's own port, and the home relay reached over QUIC (TLS over TCP behind udp_blocked).

After the per-kind pairs, a snapshot of all 56 ordered node pairs must match the same table, and every
relay that answered netcheck's STUN and every direct peer in ``ghostctl peers`` must have a latency.

Direct pairs run first; a relayed pair is judged only once the mesh has been up for ``SETTLE`` seconds (so
connectivity checks had every chance to upgrade it) and must keep its class over consecutive reads.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab import NAT_KINDS, lab_for
from lab.natmesh import NatMesh, NatNode

pytestmark = pytest.mark.netns

SETTLE = 8.0  # seconds after the last join before a "relay" verdict counts (checks run every ~1 s)
DIRECT_WITHIN = 15.0
BIRTHDAY_WITHIN = 55.0  # start_after 3 s + 3 rounds of 15 s + the confirming check, after the join


def _expected(a: str, b: str) -> str:
    kinds = {a, b}
    if "udp_blocked" in kinds:
        return "relay"
    if kinds == {"hard"}:
        return "relay"  # two symmetric NATs: no probing
    return "direct"  # none with anything, easy <-> easy, easy <-> hard (birthday probing)


KIND_PAIRS = [(a, b) for i, a in enumerate(NAT_KINDS) for b in NAT_KINDS[i:]]
# Direct pairs first: by the time a relayed pair is judged, the mesh has settled.
GRID = sorted(((p, _expected(*p)) for p in KIND_PAIRS), key=lambda pe: pe[1] != "direct")


@pytest.fixture(scope="module")
def nm(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatMesh]:
    lab = lab_for(request, name="grid")
    with lab:
        nm = NatMesh.build(lab, Path(tmp_path_factory.mktemp("grid")), per_kind=2)
        nm.start()
        nm.join_all()
        yield nm
        lab.assert_no_tracebacks()
    assert lab.leftovers() == []


def _pick(nm: NatMesh, a: str, b: str) -> tuple[NatNode, NatNode]:
    if a == b:
        first, second = nm.of_kind(a)[:2]
        return first, second
    return nm.of_kind(a)[0], nm.of_kind(b)[1]


def _direct_within(nm: NatMesh, kinds: tuple[str, str]) -> float:
    """Seconds left to wait for a direct path: birthday pairs are bounded from the join on."""
    if set(kinds) == {"easy", "hard"}:
        return max(DIRECT_WITHIN, nm.joined_at + BIRTHDAY_WITHIN - time.monotonic())
    return DIRECT_WITHIN


def _endpoint_ip(nm: NatMesh, node: NatNode, peer: NatNode) -> str:
    entry = nm.peer_entry(node, peer)
    assert entry is not None, f"{node.name} does not list {peer.name} as a peer"
    return str(entry["endpoint"]).rsplit(":", 1)[0]


# What `ghostctl netcheck` must say behind each kind: (udp works, mapping, how the home relay is reached).
NETCHECK = {
    "none": (True, "endpoint-independent", "quic"),
    "easy": (True, "endpoint-independent", "quic"),
    "hard": (True, "varies-by-destination", "quic"),
    "udp_blocked": (False, "unknown", "tcp"),
}


@pytest.mark.parametrize("kind", NAT_KINDS)
def test_netcheck_tells_each_kind_of_nat(nm: NatMesh, kind: str) -> None:
    for n in nm.of_kind(kind):
        doc = nm.netcheck(n)
        assert (doc["udp"], doc["mapping"], doc["relay_transport"]) == NETCHECK[kind], (n.name, doc)
        assert doc["home_region"] in {r.spec.id for r in nm.regions.values()}, (n.name, doc)
        if doc["udp"]:
            # The public endpoint is the NAT's (or the host's own) address, seen from WireGuard's port.
            ip, port = doc["public_endpoint"].rsplit(":", 1)
            assert ip == n.public_ip, (n.name, doc)
            if kind in ("none", "easy"):  # the port kept by the NAT is WireGuard's own: STUN ran from it
                assert int(port) == n.node.listen_port, (n.name, doc)


def test_netcheck_gives_a_latency_for_every_relay_that_answered(nm: NatMesh) -> None:
    for kind in ("none", "easy", "hard"):
        for n in nm.of_kind(kind):
            relays = nm.netcheck(n)["relays"]
            answered = [r for r in relays if r["mapped"]]
            assert len(answered) == len(nm.regions), (n.name, relays)
            # latency_ms is null only for "not measured"; a relay that answered was measured.
            unmeasured = [
                (r["name"], r["mapped"], r["latency_ms"]) for r in answered if r["latency_ms"] is None
            ]
            assert not unmeasured, f"{n.name} ({kind}): relays answered but have no latency: {unmeasured}"


def test_grid_covers_every_kind_pair() -> None:
    assert len(KIND_PAIRS) == 10
    assert {p for p, _ in GRID} == set(KIND_PAIRS)
    assert sum(1 for _, e in GRID if e == "direct") == 5


@pytest.mark.parametrize(("kinds", "expected"), GRID, ids=[f"{a}-{b}" for (a, b), _ in GRID])
def test_pair_pings_both_ways_on_its_path_class(nm: NatMesh, kinds: tuple[str, str], expected: str) -> None:
    a, b = _pick(nm, *kinds)
    nm.ping_both(a, b, timeout=15)
    regions = set(nm.regions)
    if expected == "direct":
        for x, y in ((a, b), (b, a)):
            within = _direct_within(nm, kinds)
            path, _ = nm.wait_path(x, y, {"direct"}, timeout=within)
            assert path == "direct"
            # WireGuard itself sends to the peer's public address: no proxy of ours on the path.
            assert _endpoint_ip(nm, x, y) == y.public_ip, (x.name, y.name, nm.peer_entry(x, y))
    else:
        time.sleep(max(0.0, nm.joined_at + SETTLE - time.monotonic()))
        for _ in range(3):  # the class holds over consecutive reads, ~0.5 s apart
            for x, y in ((a, b), (b, a)):
                path, relay = nm.wait_path(x, y, {"relay"}, timeout=5)
                assert relay in regions, f"{x.name} -> {y.name}: relay {relay!r} is not a region {regions}"
                assert _endpoint_ip(nm, x, y) == "127.0.0.1", (x.name, y.name, nm.peer_entry(x, y))
            time.sleep(0.5)
    nm.ping_both(a, b, timeout=5)  # still reachable on the path asserted


def test_all_node_pairs_are_on_their_path_class(nm: NatMesh) -> None:
    """After the grid: all 56 ordered pairs of the 8 nodes at once, not only one pair per kind pair."""
    time.sleep(max(0.0, nm.joined_at + SETTLE - time.monotonic()))
    wrong: dict[str, tuple[str, tuple[str, str] | None]] = {"-": ("", None)}
    # Reads only, bounded: a birthday pair whose first rounds missed may still be probing.
    for _ in range(int(BIRTHDAY_WITHIN / 0.5) + 1):
        snap = nm.snapshot()
        wrong = {}
        for a in nm.nodes.values():
            for b in nm.nodes.values():
                if a is b:
                    continue
                row = snap.get((a.name, b.name))
                want = _expected(a.kind, b.kind)
                if row is None or row["path"] != want:
                    got = None if row is None else (str(row["path"]), str(row["endpoint"]))
                    wrong[f"{a.name}->{b.name}"] = (want, got)
        if not wrong or time.monotonic() > nm.joined_at + BIRTHDAY_WITHIN:
            break
        time.sleep(0.5)
    assert not wrong, f"(expected, (path, endpoint)) per pair: {wrong}"


def test_peers_give_a_latency_for_every_direct_path(nm: NatMesh) -> None:
    """``ghostctl peers`` shows each direct peer's latency (the last connectivity check's round trip)."""
    readers = {n.name for n in nm.nodes.values()}
    snap = nm.snapshot()
    for _ in range(3):  # bounded: a node whose read timed out is read again
        if {a for a, _ in snap} == readers:
            break
        snap = nm.snapshot()
    direct = {pair: row for pair, row in snap.items() if row["path"] == "direct"}
    assert len(direct) >= 2 * 14, f"expected 14 direct node pairs, got {sorted(direct)}"
    missing = {f"{a}->{b}": row["latency_ms"] for (a, b), row in direct.items() if not row["latency_ms"]}
    assert not missing, f"direct peers without a latency (latency_ms): {missing}"
    assert all(0 < row["latency_ms"] < 100 for row in direct.values())
