"""Benchmark: join-to-first-ping latency and idle memory, each as a ratio to a reference measured in this run.

* join -> first answered ping: from starting `ghostlink join` on a new node until an existing mesh node gets a
  ping answered over the overlay; reference: from starting a hand-configured wireguard-go tunnel (`wg set`
  with keys and endpoints typed in) until its first ping is answered, on the same kind of hosts.
* join -> first answered ping through a relay: the same, for a node behind a firewall that blocks UDP (its
  only path is the TLS relay of a region), pinged by a public node; same reference (``--relay-rounds``).
* idle RSS of ghostmesh (with the nodes connected) and of ghostlink (not counting wireguard-go, a separate
  process reported beside it); reference: a bare `python -c "sleep"` interpreter.
* with ``--baseline REV``: the same join measured on that git revision's code (``bench.baseline``) in the
  same run, rounds interleaved, and this code's join time as a ratio of it (e.g. what a change costs).
Run as root: `.venv/bin/python -m bench.join_and_idle [--rounds N] [--baseline REV]`. Prints a table.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.baseline import checkout
from lab import Lab, netns_unavailable
from lab.mesh import Mesh, Node
from lab.natmesh import NatMesh

REPO = Path(__file__).resolve().parent.parent
JOINED = re.compile(r"joined as \S+ \((\d+\.\d+\.\d+\.\d+),")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def _join_once(lab: Lab, mesh: Mesh, anchor: Node, key: str, name: str) -> float:
    """Seconds from starting ``ghostlink join`` on a new node until ``anchor`` pings it over the overlay.

    The new node's address is read from the line ``ghostlink join`` prints for its user ("joined as NAME
    (V4, V6) …"), in its log: polling ``ghostctl status`` instead would start a Python process every few
    milliseconds, competing with the join for this machine's cores."""
    node = mesh.prepare_node(name, "lan_b")
    t0 = time.monotonic()
    proc = mesh.start_node(node, "join", "--auth", key)
    v4 = lab.wait_for(lambda: _joined_v4(proc.log_path), timeout=20, interval=0.005, what="joined")
    lab.wait_for(lambda v=v4: anchor.host.ping(v, timeout=1), timeout=20, interval=0.02, what="ping")
    return time.monotonic() - t0


def _joined_v4(log: Path) -> str | None:
    try:
        text = log.read_text()
    except FileNotFoundError:
        return None
    m = JOINED.search(text)
    return m[1] if m else None


def _ref_once(lab: Lab, mesh: Mesh, r: int) -> float:
    """Seconds from starting a hand-configured wireguard-go pair until its first ping is answered."""
    a, b = mesh.add_host(f"ra{r}", "lan_a"), mesh.add_host(f"rb{r}", "lan_b")
    t0 = time.monotonic()
    pair = lab.wg_pair(a, b, listen_port=51820)
    lab.wait_for(lambda p=pair: p.a.host.ping(p.b.addr, timeout=1), timeout=20, interval=0.02, what="ref")
    return time.monotonic() - t0


def _relayed_times(lab: Lab, workdir: Path, rounds: int) -> list[float]:
    """Seconds from starting ``ghostlink join`` on a node behind a firewall that blocks UDP (so its only
    path is a relay: TLS over TCP to the relay region) until a public node pings it, per round."""
    nm = NatMesh.build(lab, workdir, per_kind={"none": 1})
    nm.start()
    nm.join_all()
    (anchor,) = nm.of_kind("none")
    out = []
    for _ in range(rounds):
        n = nm.add_host("udp_blocked")
        t0 = time.monotonic()
        nm.join(n, wait=False)
        proc = n.node.proc
        assert proc is not None
        v4 = lab.wait_for(lambda p=proc: _joined_v4(p.log_path), timeout=20, interval=0.005, what="joined")
        lab.wait_for(lambda v=v4: anchor.host.ping(v, timeout=1), timeout=20, interval=0.02, what="ping")
        out.append(time.monotonic() - t0)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--relay-rounds", type=int, default=3, help="joins of a node whose only path is a relay")
    ap.add_argument(
        "--baseline",
        metavar="REV",
        help="also measure this git revision's code in the same run, interleaved (e.g. the commit before "
        "a change), and print this code's join time as a ratio of it",
    )
    args = ap.parse_args()
    if why := netns_unavailable():
        print(f"bench: {why}", file=sys.stderr)
        return 1
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        lab = stack.enter_context(Lab("bench", REPO / "test-artifacts" / "bench"))
        mesh = Mesh.build(lab, tmp / "now")
        meshes = {"this code": mesh}
        if args.baseline:
            env = stack.enter_context(checkout(args.baseline))
            old_lab = stack.enter_context(Lab("benchb", REPO / "test-artifacts" / "bench-baseline"))
            meshes[f"baseline {env['GHOST_BASELINE']}"] = Mesh.build(old_lab, tmp / "base")
            meshes[f"baseline {env['GHOST_BASELINE']}"].env = env
        keys, anchors, times = {}, {}, {label: [] for label in meshes}
        for label, m in meshes.items():
            m.start_server()
            keys[label] = m.authkey("--reusable", "--expiration", "1h")
            anchors[label] = m.join("anchor", "lan_a", keys[label])
        ref_times: list[float] = []
        for r in range(args.rounds):
            ref_times.append(_ref_once(lab, mesh, r))
            for label, m in meshes.items():  # interleaved, so drift in the machine's load hits both alike
                times[label].append(_join_once(m.lab, m, anchors[label], keys[label], f"j{r}"))
        relay_lab = stack.enter_context(Lab("benchr", REPO / "test-artifacts" / "bench-relay"))
        relayed = _relayed_times(relay_lab, tmp / "relay", args.relay_rounds) if args.relay_rounds else []
        time.sleep(3)  # settle: idle means no map traffic
        anchor = anchors["this code"]
        assert mesh.server is not None
        assert anchor.proc is not None
        ref = lab.host("pyref").spawn([sys.executable, "-c", "import time; time.sleep(60)"], "python")
        time.sleep(1)
        py_rss = rss_kib(ref.pid)
        mesh_rss, link_rss = rss_kib(mesh.server.pid), rss_kib(anchor.proc.pid)
        wg_rss = sum(rss_kib(c) for c in _children(anchor.proc.pid))
        join_med, ref_med = statistics.median(times["this code"]), statistics.median(ref_times)
        rows = [
            ("join -> first ping (median s)", f"{join_med:.3f}", f"{ref_med:.3f} (hand-made wg)",
             join_med / ref_med),
            *(
                [("join -> first ping, relayed (median s)", f"{statistics.median(relayed):.3f}",
                  f"{ref_med:.3f} (hand-made wg)", statistics.median(relayed) / ref_med)]
                if relayed else []
            ),
            ("ghostmesh idle RSS (MiB)", f"{mesh_rss / 1024:.1f}", f"{py_rss / 1024:.1f} (bare python)",
             mesh_rss / py_rss),
            ("ghostlink idle RSS (MiB)", f"{link_rss / 1024:.1f}", f"{py_rss / 1024:.1f} (bare python)",
             link_rss / py_rss),
        ]  # fmt: skip
        for label in meshes:
            if label != "this code":
                base_med = statistics.median(times[label])
                rows.append(
                    (
                        f"join -> first ping vs {label}",
                        f"{join_med:.3f}",
                        f"{base_med:.3f}",
                        join_med / base_med,
                    )
                )
        print(f"\n{'metric':34} {'ghost*':>10} {'reference':>28} {'ratio':>7}")
        for name, val, refv, ratio in rows:
            print(f"{name:34} {val:>10} {refv:>28} {ratio:>7.2f}")
        print(f"(wireguard-go, ghostlink's child, beside it: {wg_rss / 1024:.1f} MiB)")
        for label, ts in times.items():
            print(f"\njoin times, {label} (s): {[round(t, 3) for t in ts]}")
        print(f"reference (s):  {[round(t, 3) for t in ref_times]}")
        if relayed:
            print(f"relayed joins, this code (s): {[round(t, 3) for t in relayed]}")
        ref.stop()
    return 0


def _children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(c) for c in text.split()]


if __name__ == "__main__":
    sys.exit(main())
