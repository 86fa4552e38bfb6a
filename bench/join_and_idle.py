"""Benchmark: join-to-first-ping latency and idle memory, each as a ratio to a reference measured in this run.

* join -> first answered ping: from starting `ghostlink join` on a new node until an existing mesh node gets a
  ping answered over the overlay; reference: from starting a hand-configured wireguard-go tunnel (`wg set`
  with keys and endpoints typed in) until its first ping is answered, on the same kind of hosts.
* idle RSS of ghostmesh (with the nodes connected) and of ghostlink (not counting wireguard-go, a separate
  process reported beside it); reference: a bare `python -c "sleep"` interpreter.
Run as root: `.venv/bin/python -m bench.join_and_idle [--rounds N]`. Prints a table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from tests.meshlab import Mesh, Node
from tests.netlab import Lab, netns_unavailable

REPO = Path(__file__).resolve().parent.parent


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if why := netns_unavailable():
        print(f"bench: {why}", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as tmp, Lab("bench", REPO / "test-artifacts" / "bench") as lab:
        mesh = Mesh.build(lab, Path(tmp))
        mesh.start_server()
        key = mesh.authkey("--reusable", "--expiration", "1h")
        anchor = mesh.join("anchor", "lan_a", key)
        mesh_times, ref_times = [], []
        for r in range(args.rounds):
            # Reference: hand-configured WireGuard between two fresh hosts.
            a, b = mesh.add_host(f"ra{r}", "lan_a"), mesh.add_host(f"rb{r}", "lan_b")
            t0 = time.monotonic()
            pair = lab.wg_pair(a, b, listen_port=51820)
            lab.wait_for(
                lambda p=pair: p.a.host.ping(p.b.addr, timeout=1), timeout=20, interval=0.02, what="ref"
            )
            ref_times.append(time.monotonic() - t0)
            # The mesh: a new node joins; the anchor pings it.
            node = mesh.prepare_node(f"j{r}", "lan_b")
            t0 = time.monotonic()
            mesh.start_node(node, "join", "--auth", key)
            v4 = lab.wait_for(lambda n=node: _v4(mesh, n), timeout=20, interval=0.02, what="joined")
            lab.wait_for(lambda v=v4: anchor.host.ping(v, timeout=1), timeout=20, interval=0.02, what="ping")
            mesh_times.append(time.monotonic() - t0)
        time.sleep(3)  # settle: idle means no map traffic
        assert mesh.server is not None
        assert anchor.proc is not None
        ref = lab.host("pyref").spawn([sys.executable, "-c", "import time; time.sleep(60)"], "python")
        time.sleep(1)
        py_rss = rss_kib(ref.pid)
        mesh_rss, link_rss = rss_kib(mesh.server.pid), rss_kib(anchor.proc.pid)
        wg_rss = sum(rss_kib(c) for c in _children(anchor.proc.pid))
        join_med, ref_med = statistics.median(mesh_times), statistics.median(ref_times)
        rows = [
            (
                "join -> first ping (median s)",
                f"{join_med:.3f}",
                f"{ref_med:.3f} (hand-made wg)",
                join_med / ref_med,
            ),
            (
                "ghostmesh idle RSS (MiB)",
                f"{mesh_rss / 1024:.1f}",
                f"{py_rss / 1024:.1f} (bare python)",
                mesh_rss / py_rss,
            ),
            (
                "ghostlink idle RSS (MiB)",
                f"{link_rss / 1024:.1f}",
                f"{py_rss / 1024:.1f} (bare python)",
                link_rss / py_rss,
            ),
        ]
        print(f"\n{'metric':34} {'ghost*':>10} {'reference':>28} {'ratio':>7}")
        for name, val, refv, ratio in rows:
            print(f"{name:34} {val:>10} {refv:>28} {ratio:>7.2f}")
        print(f"(wireguard-go, ghostlink's child, beside it: {wg_rss / 1024:.1f} MiB)")
        print(f"\njoin times (s): {[round(t, 3) for t in mesh_times]}")
        print(f"reference (s):  {[round(t, 3) for t in ref_times]}")
        ref.stop()
    return 0


def _children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(c) for c in text.split()]


def _v4(mesh: Mesh, node: Node) -> str | None:
    try:
        st = node.status(mesh)
    except AssertionError:
        return None
    if not st.get("connected"):
        return None
    return next((a for a in st["addresses"] if ":" not in a), None)


if __name__ == "__main__":
    sys.exit(main())
