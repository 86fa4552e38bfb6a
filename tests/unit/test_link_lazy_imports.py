"""ghostlink loads a heavy library only when the node uses what needs it.

Importing the daemon (``ghostlink.app``, all of the wiring in ``ghostlink.node``) and building the parts a
node without relay regions, MagicDNS settings, metrics, a UPnP gateway or kernel WireGuard uses must leave
these out of ``sys.modules``: each costs megabytes of resident memory and start-up time on every node.
Checked in a fresh interpreter, since this test process has imported them all already.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# What only some nodes need, and what needs it (the modules that import it when first used).
LAZY = {
    "aioquic": "the QUIC relay client (ghostlink.traversal.relaylink): a map with relay regions",
    "aioice": "STUN and TURN (ghostlink.traversal.stun_core, turnclient): the first check or allocation",
    "dns": "dnspython (ghostlink.dns_core, dns_server): the first DNS query",
    "prometheus_client": "metrics (ghostlink.metrics): metrics.listen set",
    "aiohttp": "the metrics listener, and UPnP's HTTP client",
    "async_upnp_client": "UPnP IGD (ghostlink.traversal.portmap): an IGD answered the SSDP search",
    "pyroute2": "kernel WireGuard's generic netlink (ghostlink.wg.kernel): the kernel backend",
    "ghostlink.traversal.relayclient": "a map with a relay region",
    "ghostlink.traversal.turnclient": "a TURN allocation",
    "ghostlink.metrics": "metrics.listen set",
    "ghostcore.metrics_http": "metrics.listen set",
}

_PROBE = """
import asyncio, json, sys
import ghostlink.app
from ghostlink.dns_core import build_zone
from ghostlink.dns_server import DnsServer
from ghostlink.engine import NetMap
from ghostlink.magicdns import MagicDns
from ghostlink.nodekey import NodeKey
from ghostlink.traversal.proxy import RelayProxy
from ghostlink.traversal.stun_core import is_stun, well_formed
from ghostlink.traversal import portmap_wire
from ghostcore.keys import PrivateKey

async def parts():
    # what every node builds, with a map that names no relay region and no DNS settings
    MagicDns("gl0", None, accept=False, server=DnsServer()).status()
    build_zone(NetMap())
    proxy = RelayProxy(wg_port=41641, keys=NodeKey(PrivateKey.generate()))
    await proxy.close()
    is_stun(bytes(20)) and well_formed(bytes(20))
    # the SSDP search that decides whether UPnP's library is needed at all
    portmap_wire.parse_ssdp_location(portmap_wire.ssdp_search("ssdp:all", 2), "ssdp:all")

asyncio.run(parts())
wanted = json.loads(sys.argv[1])
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in wanted or m in wanted)))
"""


def _loaded(names: list[str]) -> list[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(names)],
        capture_output=True,
        text=True,
        check=False,
        cwd=REPO,
        env=env,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    loaded: list[str] = json.loads(out.stdout)
    return loaded


def test_daemon_import_and_plain_parts_load_no_optional_library() -> None:
    loaded = _loaded(sorted(LAZY))
    eager = sorted({m if m in LAZY else m.split(".")[0] for m in loaded})
    assert eager == [], "imported eagerly: " + "; ".join(f"{m} (needed only for {LAZY[m]})" for m in eager)


def test_the_probe_sees_an_eager_import() -> None:
    """The probe is not blind: what the daemon does import is reported."""
    loaded = _loaded(["grpc", "ghostlink.node", "ghostlink.dns_core"])
    assert {"grpc", "ghostlink.node", "ghostlink.dns_core"} <= set(loaded)
