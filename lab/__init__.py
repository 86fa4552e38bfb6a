"""The network-namespace lab: throw-away networks for the netns tests, the benchmarks and the demo.

Networks are built out of Linux network namespaces, bridges and veth pairs, with NAT routers (nftables),
hand-made wireguard-go tunnels and the ghost* programs themselves running inside them as real processes;
all of it is torn down again when the ``with Lab(...)`` block ends, even when it fails.

Modules, lowest layer first:

* ``lab.errors``: ``LabError`` (misuse, a failed setup command) and ``WaitTimeout``.
* ``lab.addrs``: the only address ranges the lab may use, and their checks.
* ``lab.wait``: bounded waits (``wait_for``).
* ``lab.procs``: bounded command runs, processes spawned inside a namespace, their logs.
* ``lab.ping``: ping streams, their loss and their outages.
* ``lab.wg``: hand-made wireguard-go tunnels (``Lab.wg_pair``), the benchmarks' reference.
* ``lab.nat``: NAT routers (``Lab.nat_router``) and the probes that measure them.
* ``lab.netns``: ``Lab``, ``Host``, ``Segment``: namespaces, segments, links, cleanup; pytest helpers.
* ``lab.regions``: relay regions (ghostgate or coturn) for a lab mesh.
* ``lab.mesh``: a ghost* mesh: ghostmesh and ghostlink processes on a routed lab.
* ``lab.natmesh``: a mesh with relay regions and every node behind its own NAT router.

This package re-exports the names needed to build and check a lab (``from lab import Lab, lab_for``); the
NAT probes, the relay regions and the meshes are imported from their own modules.

Rules the lab enforces
----------------------
* Only documentation ranges for "public"/LAN segments and the overlay ranges (``lab.addrs``): a typo can
  never send packets to a real network.
* Every loop is bounded in count and time (``wait_for``, process stops, ping streams).
* Names are unique per run: a random 6-hex-digit ``run_id`` is in every namespace and interface name.
  Interface names stay <= 15 characters (IFNAMSIZ). ``/var/run/wireguard`` is shared by all namespaces,
  so WireGuard interface names from ``wg_ifname`` are unique across the whole machine.
* Cleanup on exit, failure or not: every spawned process is stopped by PID (SIGTERM, then SIGKILL after a
  bound), any process still inside one of our namespaces (``ip netns pids``) is killed by PID, the
  namespaces are deleted (which deletes their veths and bridges), and ``/var/run/wireguard/<ifname>.sock``
  is removed for every interface name this lab handed out. Nothing is ever killed by name.
* Logs of spawned processes go to ``artifacts_dir`` and are kept; if the block raised, the lab prints
  where they are.
"""

from lab.errors import LabError, WaitTimeout
from lab.nat import NAT_KINDS
from lab.netns import Host, Lab, Segment, lab_for, netns_unavailable
from lab.ping import PingStats, PingStream, gaps, longest_gap
from lab.procs import Proc
from lab.wg import WG_RUN_DIR, WgEnd, WgPair

__all__ = [
    "NAT_KINDS",
    "WG_RUN_DIR",
    "Host",
    "Lab",
    "LabError",
    "PingStats",
    "PingStream",
    "Proc",
    "Segment",
    "WaitTimeout",
    "WgEnd",
    "WgPair",
    "gaps",
    "lab_for",
    "longest_gap",
    "netns_unavailable",
]
