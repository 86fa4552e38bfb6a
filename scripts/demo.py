"""The README's first command: a local demo mesh across NATs, built, shown and torn down.

In throw-away network namespaces (lab/netns.py, lab/natmesh.py): a public segment with ghostmesh
(embedded SQLite) and two ghostgate relay regions, and four ghostlink nodes (real wireguard-go): one public
host, two behind "easy" home-router NATs and one behind a "hard" (symmetric) NAT. Prints `ghostctl nodes
list`, `ghostctl netcheck` and `ghostctl peers` as a user would see them (direct paths between the public and
easy nodes and public<->hard; easy<->hard relayed first, then direct once birthday probing hit), pings every
pair over the overlay, and cleans everything up, also on Ctrl-C. Needs root (namespaces, TUN devices, raw
sockets).
"""

from __future__ import annotations

import itertools
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from lab import Lab, WaitTimeout, netns_unavailable  # noqa: E402
from lab.mesh import GHOSTCTL  # noqa: E402
from lab.natmesh import NatMesh  # noqa: E402


def _show(title: str, argv: list[str]) -> None:
    print(f"\n$ {title}")
    res = subprocess.run(argv, capture_output=True, text=True, timeout=15, check=False)
    print((res.stdout or res.stderr).rstrip())


def main() -> int:
    why = netns_unavailable()
    if why:
        print(f"demo: {why}; run scripts/demo.sh as root", file=sys.stderr)
        return 1
    artifacts = REPO / "test-artifacts" / "demo"
    shutil.rmtree(artifacts, ignore_errors=True)  # keep this run's daemon logs only
    with (
        tempfile.TemporaryDirectory(prefix="ghost-demo-") as tmp,
        Lab("demo", artifacts) as lab,
    ):
        nm = NatMesh.build(lab, Path(tmp), per_kind={"none": 1, "easy": 2, "hard": 1})
        print("demo: starting two ghostgate regions (192.0.2.2, 192.0.2.3) and ghostmesh (192.0.2.1)")
        nm.start()
        for n in sorted(nm.nodes.values(), key=lambda n: n.name):
            where = "public" if n.router is None else f"behind a NAT ({n.kind}, leaving as {n.public_ip})"
            print(f"demo: ghostlink join {n.name}, {where}")
        nm.join_all()
        nodes = sorted(nm.nodes.values(), key=lambda n: n.name)
        ok = True
        print("\n$ ping across the mesh (IPv4 overlay)")
        for a, b in itertools.permutations(nodes, 2):
            try:
                nm.ping_both(a, b, timeout=10)
                good = True
            except WaitTimeout:
                good = False
            ok &= good
            print(f"  {a.name:6} -> {b.name:6} {nm.v4(b):14} {'ok' if good else 'FAILED'}")
        easy = nm.of_kind("easy")
        # easy <-> hard: birthday probing, bounded by its rounds (3 of 15 s)
        hard_pair = (easy[0], nm.of_kind("hard")[0])
        for a, b in ((easy[0], easy[1]), (nm.of_kind("none")[0], nm.of_kind("hard")[0]), hard_pair):
            try:
                nm.wait_path(a, b, {"direct"}, timeout=55 if (a, b) == hard_pair else 15)
            except WaitTimeout as exc:
                ok = False
                print(f"demo: {exc}")
        admin = [GHOSTCTL, "--server", f"unix:{nm.mesh.admin_socket}"]
        _show("ghostctl nodes list", [*admin, "nodes", "list"])
        hard = nm.of_kind("hard")[0]
        hard_ctl = [GHOSTCTL, "--socket", str(hard.node.socket)]
        _show(f"ghostctl netcheck   (on {hard.name})", [*hard_ctl, "netcheck"])
        for n in (easy[0], hard):
            _show(f"ghostctl peers   (on {n.name})", [GHOSTCTL, "--socket", str(n.node.socket), "peers"])
        print(f"\ndemo: cleaning up (processes, namespaces, sockets); daemon logs stay in {artifacts}")
    print("demo: done" if ok else "demo: some pings or paths failed")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
