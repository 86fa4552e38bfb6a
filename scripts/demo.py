"""The README's first command: a local demo mesh, built, shown and torn down.

ghostmesh (embedded SQLite) in a "server" namespace and three ghostlink nodes (real wireguard-go) on two
routed LANs, all in throw-away network namespaces (tests/netlab.py). Prints `ghostctl nodes list`,
`ghostctl status` and `ghostctl peers` as a user would see them, pings every pair over the overlay, and
cleans everything up, also on Ctrl-C. Needs root (namespaces, TUN devices).
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

from tests.meshlab import GHOSTCTL, Mesh  # noqa: E402
from tests.netlab import Lab, netns_unavailable  # noqa: E402


def _show(title: str, argv: list[str]) -> None:
    print(f"\n$ {title}")
    res = subprocess.run(argv, capture_output=True, text=True, timeout=15, check=False)
    print((res.stdout or res.stderr).rstrip())


def main() -> int:
    why = netns_unavailable()
    if why:
        print(f"demo: {why}; run it as root: sudo scripts/demo.sh", file=sys.stderr)
        return 1
    artifacts = REPO / "test-artifacts" / "demo"
    shutil.rmtree(artifacts, ignore_errors=True)  # keep this run's daemon logs only
    with (
        tempfile.TemporaryDirectory(prefix="ghost-demo-") as tmp,
        Lab("demo", artifacts) as lab,
    ):
        mesh = Mesh.build(lab, Path(tmp))
        print("demo: starting ghostmesh on 192.0.2.1:7777 (embedded SQLite)")
        mesh.start_server()
        key = mesh.authkey("--reusable", "--expiration", "10m")
        nodes = []
        for name, lan in (("alpha", "lan_a"), ("bravo", "lan_a"), ("charlie", "lan_b")):
            print(f"demo: ghostlink join {name} on {lan}")
            nodes.append(mesh.join(name, lan, key))
        admin = [GHOSTCTL, "--server", f"unix:{mesh.admin_socket}"]
        _show("ghostctl nodes list", [*admin, "nodes", "list"])
        _show("ghostctl status   (on alpha)", [GHOSTCTL, "--socket", str(nodes[0].socket), "status"])
        addrs = {n.name: n.addresses(mesh) for n in nodes}
        ok = True
        print("\n$ ping across the mesh (IPv4 and IPv6 overlay addresses)")
        for a, b in itertools.permutations(nodes, 2):
            for dst in addrs[b.name]:
                good = lab.wait_for(lambda a=a, dst=dst: a.host.ping(dst, timeout=1), timeout=10, what="ping")
                ok &= bool(good)
                print(f"  {a.name:8} -> {b.name:8} {dst:28} {'ok' if good else 'FAILED'}")
        _show("ghostctl peers   (on alpha)", [GHOSTCTL, "--socket", str(nodes[0].socket), "peers"])
        print(f"\ndemo: cleaning up (processes, namespaces, sockets); daemon logs stay in {artifacts}")
    print("demo: done" if ok else "demo: some pings failed")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
