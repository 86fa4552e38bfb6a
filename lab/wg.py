"""Hand-made WireGuard tunnels: wireguard-go between two lab hosts, configured with ``wg`` and ``ip``.

The reference the benchmarks compare the mesh against. ``Lab.wg_pair(a, b, listen_port=51820) -> WgPair``
builds one between two attached hosts (keys from ``wg genkey``, overlay addresses from 100.64.0.0/10 and
fd7a:115c:a1e0::/48, /32 and /128 plus a route to the other end). ``pair.a`` / ``pair.b`` are
``WgEnd(host, ifname, addr, addr6, public_key, listen_port, proc)``.

``/var/run/wireguard`` (``WG_RUN_DIR``) is shared by all namespaces, so interface names come from
``Lab.wg_ifname``: unique across the whole machine, and each one's socket is removed when the lab closes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lab.addrs import OVERLAY4, OVERLAY6, check_address
from lab.errors import LabError
from lab.procs import Proc, run

if TYPE_CHECKING:
    from lab.netns import Host, Lab

WG_RUN_DIR = Path("/var/run/wireguard")


@dataclass(frozen=True)
class WgEnd:
    host: Host
    ifname: str
    addr: str
    addr6: str
    public_key: str
    listen_port: int
    proc: Proc


@dataclass(frozen=True)
class WgPair:
    a: WgEnd
    b: WgEnd


def wg_keypair() -> tuple[str, str]:
    """A fresh (private, public) key pair from ``wg genkey`` / ``wg pubkey``."""
    priv = run(["wg", "genkey"]).stdout.strip()
    pub = run(["wg", "pubkey"], input=priv + "\n").stdout.strip()
    return priv, pub


def start_wireguard_go(host: Host, ifname: str) -> Proc:
    """wireguard-go for ``ifname`` in ``host``'s namespace, returned once its UAPI socket exists."""
    env = dict(os.environ)
    # Foreground (-f) so the PID we hold is wireguard-go itself; no kernel module here anyway.
    env["WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD"] = "1"
    proc = host.spawn(["wireguard-go", "-f", ifname], f"wireguard-go-{ifname}", env=env)
    sock = WG_RUN_DIR / f"{ifname}.sock"
    host.lab.wait_for(
        lambda: sock.exists() or not proc.alive(), timeout=10, interval=0.05, what=f"{sock} to appear"
    )
    if not proc.alive():
        raise LabError(f"wireguard-go for {ifname} exited; see {proc.log_path}")
    return proc


def wg_pair(lab: Lab, a: Host, b: Host, listen_port: int, *, seq: int) -> WgPair:
    """The tunnel of ``Lab.wg_pair``; ``seq`` (the lab's pair number) picks its overlay addresses."""
    addrs = [
        (str(OVERLAY4.network_address + 2 * seq - 1), str(OVERLAY6.network_address + 2 * seq - 1)),
        (str(OVERLAY4.network_address + 2 * seq), str(OVERLAY6.network_address + 2 * seq)),
    ]
    hosts = (a, b)
    ifnames = [lab.wg_ifname(f"p{seq}a"), lab.wg_ifname(f"p{seq}b")]
    keys = [wg_keypair(), wg_keypair()]
    procs = [start_wireguard_go(h, i) for h, i in zip(hosts, ifnames, strict=True)]
    for me in (0, 1):
        other = 1 - me
        h, ifn = hosts[me], ifnames[me]
        endpoint = check_address(hosts[other].addr, "wg_pair endpoint")
        h.exec(
            [
                "wg", "set", ifn, "private-key", "/dev/stdin", "listen-port", str(listen_port),
                "peer", keys[other][1],
                "allowed-ips", f"{addrs[other][0]}/32,{addrs[other][1]}/128",
                "endpoint", f"{endpoint}:{listen_port}",
            ],
            input=keys[me][0] + "\n",
        )  # fmt: skip
        h.exec(["ip", "addr", "add", f"{addrs[me][0]}/32", "dev", ifn])
        h.exec(["ip", "-6", "addr", "add", f"{addrs[me][1]}/128", "dev", ifn, "nodad"])
        h.exec(["ip", "link", "set", ifn, "up"])
        h.exec(["ip", "route", "add", f"{addrs[other][0]}/32", "dev", ifn])
        h.exec(["ip", "-6", "route", "add", f"{addrs[other][1]}/128", "dev", ifn])
    ends = [
        WgEnd(hosts[i], ifnames[i], addrs[i][0], addrs[i][1], keys[i][1], listen_port, procs[i])
        for i in (0, 1)
    ]
    return WgPair(ends[0], ends[1])
