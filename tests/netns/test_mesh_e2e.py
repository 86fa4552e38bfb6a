"""End to end on real WireGuard: ghostmesh + ghostlink (wireguard-go) + ghostctl in network namespaces.

One mesh per module (building it costs seconds); the tests run in file order and each leaves the mesh
consistent for the next. Nodes are found by name; reads are retried (bounded), actions never are. Every
daemon log is kept under test-artifacts/, and any traceback in any log fails the module.
"""

from __future__ import annotations

import itertools
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab.mesh import GHOSTLINK, SERVER_IP, SERVER_PORT, Mesh, Node, module_mesh

pytestmark = pytest.mark.netns


@pytest.fixture(scope="module")
def mesh(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    with module_mesh(request, tmp_path_factory, "e2e") as m:
        yield m


@pytest.fixture(scope="module")
def three(mesh: Mesh) -> list[Node]:
    key = mesh.authkey("--reusable", "--expiration", "1h")
    return [mesh.join("n1", "lan_a", key), mesh.join("n2", "lan_a", key), mesh.join("n3", "lan_b", key)]


def _addrs(mesh: Mesh, nodes: list[Node]) -> dict[str, tuple[str, str]]:
    return {n.name: n.addresses(mesh) for n in nodes}


def _all_pairs_ping(mesh: Mesh, nodes: list[Node], timeout: float = 10) -> None:
    addrs = _addrs(mesh, nodes)
    for a, b in itertools.permutations(nodes, 2):
        for dst in addrs[b.name]:
            mesh.lab.wait_for(
                lambda a=a, dst=dst: a.host.ping(dst, timeout=1), timeout=timeout, interval=0.2,
                what=f"{a.name} pings {b.name} at {dst}",
            )  # fmt: skip


def test_three_nodes_on_two_lans_reach_each_other_over_v4_and_v6(mesh: Mesh, three: list[Node]) -> None:
    addrs = _addrs(mesh, three)
    v4 = [a[0] for a in addrs.values()]
    v6 = [a[1] for a in addrs.values()]
    assert len(set(v4)) == 3
    assert all(a.startswith("100.") for a in v4)
    assert len(set(v6)) == 3
    assert all(a.startswith("fd7a:115c:a1e0:") for a in v6)
    _all_pairs_ping(mesh, three)
    # The data plane is WireGuard: every node has the two others as WireGuard peers, and they handshook.
    keys = {n.name: n.status(mesh)["node_key"] for n in three}
    for n in three:
        assert mesh.wg_peer_keys(n) == {keys[o.name] for o in three if o is not n}
        assert all(ts > 0 for ts in n.host.wg_latest_handshakes(n.ifname).values())


def test_a_fourth_node_is_reachable_within_2s_and_existing_sessions_are_untouched(
    mesh: Mesh, three: list[Node]
) -> None:
    _all_pairs_ping(mesh, three)
    before = {n.name: n.host.wg_latest_handshakes(n.ifname) for n in three}
    key = mesh.authkey("--expiration", "10m")
    n4 = mesh.prepare_node("n4", "lan_b")
    started = time.monotonic()
    mesh.start_node(n4, "join", "--auth", key)
    # From `ghostlink join` to every other node having n4 as a WireGuard peer and getting its ping answered.
    n4_key = mesh.lab.wait_for(lambda: _node_key(mesh, n4), timeout=10, interval=0.05, what="n4 is up")
    mesh.lab.wait_for(
        lambda: all(n4_key in mesh.wg_peer_keys(n) for n in three), timeout=5, interval=0.05,
        what="every node has n4 as a WireGuard peer",
    )  # fmt: skip
    v4, v6 = n4.addresses(mesh)
    assert all(n.host.ping(v4, timeout=1) for n in three)
    elapsed = time.monotonic() - started
    assert elapsed <= 2.0, f"n4 reachable from every node {elapsed:.2f}s after join started"
    assert all(n.host.ping(v6, timeout=1) for n in three)
    after = {n.name: n.host.wg_latest_handshakes(n.ifname) for n in three}
    for n in three:
        for peer_key, ts in before[n.name].items():
            assert after[n.name][peer_key] == ts, (
                f"{n.name}: session with {peer_key[:8]} was reset by n4's join"
            )


def _node_key(mesh: Mesh, node: Node) -> str | None:
    try:
        st = node.status(mesh)
    except AssertionError:  # its local socket is not up yet
        return None
    return str(st["node_key"]) if st.get("connected") else None


def test_deleting_a_node_removes_it_from_every_peer_within_2s(mesh: Mesh, three: list[Node]) -> None:
    n4 = mesh.nodes["n4"]
    n4_key = n4.status(mesh)["node_key"]
    assert all(n4_key in mesh.wg_peer_keys(n) for n in three)
    mesh.ctl("nodes", "delete", "n4")
    start = time.monotonic()
    mesh.lab.wait_for(
        lambda: all(n4_key not in mesh.wg_peer_keys(n) for n in three), timeout=2, interval=0.05,
        what="n4 removed from every peer's WireGuard config",
    )  # fmt: skip
    assert time.monotonic() - start <= 2.0
    assert "n4" not in mesh.server_nodes()
    assert n4.proc is not None
    n4.proc.stop()


def test_mesh_survives_ghostmesh_sigkill_and_resyncs_after_restart(mesh: Mesh, three: list[Node]) -> None:
    n1, n2, n3 = three
    before = {name: (n["addresses"], n["node_key"]) for name, n in mesh.server_nodes().items()}
    v4_n3, v6_n3 = n3.addresses(mesh)
    v4_n1, _ = n1.addresses(mesh)
    streams = [n1.host.ping_stream(v4_n3, interval=0.05), n2.host.ping_stream(v6_n3, interval=0.05),
               n3.host.ping_stream(v4_n1, interval=0.05)]  # fmt: skip
    time.sleep(0.5)  # pings in flight before the server dies
    assert mesh.server is not None
    mesh.server.kill()  # SIGKILL: no goodbye to anyone
    mesh.lab.wait_for(lambda: not n1.status(mesh)["connected"], timeout=10, interval=0.2, what="n1 notices")
    time.sleep(2.0)  # the mesh runs with no control plane at all
    mesh.start_server()
    for n in three:
        mesh.wait_connected(n, timeout=15)
    time.sleep(0.5)
    stats = [s.stop() for s in streams]
    for s in stats:
        assert s.transmitted > 40
        assert s.lost == 0, f"lost pings {s.missing_seqs} while ghostmesh was down"
    after = {name: (n["addresses"], n["node_key"]) for name, n in mesh.server_nodes().items()}
    assert after == before  # nothing registered was lost
    # Resynced: a change made after the restart reaches every node.
    key = mesh.authkey()
    n5 = mesh.join("n5", "lan_a", key)
    v4_n5, _ = n5.addresses(mesh)
    for n in three:
        mesh.lab.wait_for(
            lambda n=n: n.host.ping(v4_n5, timeout=1), timeout=5, interval=0.1, what=f"{n.name}->n5"
        )


def test_a_spent_single_use_key_is_refused_and_nothing_is_written(mesh: Mesh, three: list[Node]) -> None:
    key = mesh.authkey("--expiration", "10m")  # single-use
    mesh.join("n6", "lan_b", key)
    n7 = mesh.prepare_node("n7", "lan_b")
    proc = mesh.start_node(n7, "join", "--auth", key)
    mesh.lab.wait_for(lambda: not proc.alive(), timeout=15, interval=0.1, what="ghostlink join n7 exits")
    assert proc.stop() == 1
    log = proc.log_text()
    assert "single-use and is spent" in log, log
    assert key not in log
    assert len(log.strip().splitlines()) == 1, log
    assert not n7.state_dir.exists() or not any(n7.state_dir.iterdir())
    assert "n7" not in mesh.server_nodes()


def test_an_expired_node_is_dropped_by_peers_and_refused(mesh: Mesh, three: list[Node]) -> None:
    n6 = mesh.nodes["n6"]
    n6_key = n6.status(mesh)["node_key"]
    mesh.ctl("nodes", "expire", "n6")
    mesh.lab.wait_for(
        lambda: all(n6_key not in mesh.wg_peer_keys(n) for n in three), timeout=2, interval=0.05,
        what="expired n6 removed from every peer",
    )  # fmt: skip
    mesh.lab.wait_for(lambda: not n6.status(mesh)["connected"], timeout=5, interval=0.1, what="n6 refused")
    assert "expire" in n6.status(mesh)["last_error"]
    assert n6.proc is not None
    n6.proc.stop()
    # Restarting it from its saved state does not get it back in.
    proc = mesh.start_node(n6, "run")
    mesh.lab.wait_for(
        lambda: "expire" in (_status_or_empty(mesh, n6).get("last_error") or ""), timeout=10, interval=0.2,
        what="restarted n6 is refused as expired",
    )  # fmt: skip
    assert all(n6_key not in mesh.wg_peer_keys(n) for n in three)
    proc.stop()


def _status_or_empty(mesh: Mesh, node: Node) -> dict[str, object]:
    try:
        return node.status(mesh)
    except AssertionError:
        return {}


def test_join_as_an_unprivileged_user_is_refused_and_writes_nothing(mesh: Mesh, tmp_path: Path) -> None:
    """A real process dropped to `nobody` (not a monkeypatched euid): one line, exit 1, no state dir."""
    key = mesh.authkey("--expiration", "10m")
    state = tmp_path / "state"
    tmp_path.chmod(0o777)  # so the refusal comes from ghostlink's own check, not from the filesystem
    argv = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", GHOSTLINK, "join",
            "--server", f"{SERVER_IP}:{SERVER_PORT}", "--auth", key, "--state-dir", str(state)]  # fmt: skip
    res = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    assert res.returncode == 1
    assert res.stderr == "ghostlink: must run as root to create the WireGuard interface; try sudo\n"
    assert not state.exists()
    # The key was not spent by the refused attempt: it still registers a node.
    mesh.join("n8", "lan_a", key)
