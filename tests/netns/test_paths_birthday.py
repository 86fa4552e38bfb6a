"""Birthday probing on real WireGuard in the NAT lab: an easy-NAT node and a hard-NAT node go direct.

One NAT mesh (lab/natmesh.py): ghostmesh, two ghostgate regions, one easy node (``masquerade``, address
and port-dependent filtering) and one hard node (``masquerade random``: a new public port per
destination), each behind its own router. The ordinary checks cannot open this pair (see
ghostlink/traversal/birthday_core.py); the hard node's probe sockets and the easy node's spray must:

* both sides show "direct" (a round can miss with ~2 % odds: up to ``max_rounds`` rounds of 15 s each
  are allowed, so the wait is bounded by those rounds), and WireGuard's endpoint is the other's public
  address: on the hard node the easy router's address, on the easy node the hard router's address at
  the port the probe hit (not the one STUN saw: that mapping is the STUN server's);
* the hard node's route table (``inet ghostlink_bd_<ifname>``) holds the route, and pings flow both ways;
* after a SIGKILL of the hard node's ghostlink the table is still there (and journaled); the next start
  removes it (ghostlink/leftovers.py), and the pair goes direct again with new rounds;
* a clean stop removes the table and leaves no journal.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from ghostlink.traversal.birthday import table_for
from lab import lab_for
from lab.natmesh import NatMesh

pytestmark = pytest.mark.netns

# start_after (3 s) + 3 rounds of 15 s + the confirming check: the bound of the whole probing.
DIRECT_WITHIN = 55.0


@pytest.fixture(scope="module")
def nm(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatMesh]:
    lab = lab_for(request, name="birthday")
    with lab:
        nm = NatMesh.build(lab, Path(tmp_path_factory.mktemp("birthday")), per_kind={"easy": 1, "hard": 1})
        nm.start()
        nm.join_all()
        yield nm
        lab.assert_no_tracebacks()
    assert lab.leftovers() == []


def test_easy_and_hard_nodes_go_direct_through_birthday_probing(nm: NatMesh) -> None:
    (e,) = nm.of_kind("easy")
    (h,) = nm.of_kind("hard")
    nm.ping_both(e, h, timeout=15)  # relayed meanwhile
    for x, y in ((h, e), (e, h)):
        path, _ = nm.wait_path(x, y, {"direct"}, timeout=DIRECT_WITHIN)
        assert path == "direct"
        entry = nm.peer_entry(x, y)
        assert entry is not None
        assert str(entry["endpoint"]).rsplit(":", 1)[0] == y.public_ip, (x.name, entry)
    # The easy side sends to the port the probe hit on the hard side's router: the table on the hard
    # node routes WireGuard's packets to the easy node through that mapping.
    table = h.host.exec(["nft", "list", "table", "inet", table_for(h.node.ifname)]).stdout
    easy_endpoint = str(nm.peer_entry(h, e)["endpoint"])  # type: ignore[index]
    ip, port = easy_endpoint.rsplit(":", 1)
    assert f"ip daddr {ip} udp sport {h.node.listen_port} udp dport {port}" in table, table
    assert "masquerade to :" in table, table
    nm.ping_both(e, h, timeout=5)


def test_a_crashed_runs_route_table_goes_at_the_next_start_and_the_pair_is_direct_again(nm: NatMesh) -> None:
    (e,) = nm.of_kind("easy")
    (h,) = nm.of_kind("hard")
    table = table_for(h.node.ifname)
    nm.wait_path(h, e, {"direct"}, timeout=DIRECT_WITHIN)
    assert json.loads((h.node.state_dir / "host.json").read_text())["route_table"] == table
    nm.mesh.crash_node(h.node)
    assert table in h.host.exec(["nft", "list", "tables"]).stdout, "the crash left the table"
    nm.mesh.start_node(h.node, "run")
    nm.mesh.wait_connected(h.node)
    proc = h.node.proc
    assert proc is not None
    assert f"nft table inet {table}" in proc.log_text(), "the next start undid the crashed run's table"
    # Both sides lost the direct path with the crash: new rounds, new hit, direct again.
    for x, y in ((h, e), (e, h)):
        nm.wait_path(x, y, {"direct"}, timeout=DIRECT_WITHIN)
    nm.ping_both(e, h, timeout=10)


def test_a_clean_stop_removes_the_route_table_and_its_journal_entry(nm: NatMesh) -> None:
    (h,) = nm.of_kind("hard")
    proc = h.node.proc
    assert proc is not None
    assert table_for(h.node.ifname) in h.host.exec(["nft", "list", "tables"]).stdout
    assert proc.stop() == 0
    assert table_for(h.node.ifname) not in h.host.exec(["nft", "list", "tables"]).stdout
    assert not (h.node.state_dir / "host.json").exists(), "a clean stop leaves no journal"
