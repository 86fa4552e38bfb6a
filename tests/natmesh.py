"""natmesh: the NAT lab of issue 3 with a running ghost* mesh on it — ghostmesh, relay regions, NATed nodes.

Built on netlab (namespaces, NAT routers) and meshlab (ghostmesh + ghostlink as real processes), for the
path tests (tests/netns/test_paths_*.py) and the path benchmark (bench/paths.py). Topology
(``NatMesh.build``)::

    public 192.0.2.0/24 ("inet" router .254, no NAT)
      ├── srv   .1   ghostmesh, coordination on TCP 3478 (the one port a UDP-blocking firewall lets out)
      ├── gate1 .2   region 1: ghostgate (STUN+TURN udp 3478, QUIC relay udp 3479, TLS relay tcp 3478)
      ├── gate2 .3   region 2: the same (or coturn: TURN only, ``RegionSpec(software="coturn")``)
      ├── none1 .30, none2 .31 ...                     kind "none": public hosts
      └── nat-<node> .20+i ── LAN /27 from 198.51.100.0/24 then 203.0.113.0/24 ── <node> (.10 of its LAN)
                                                       kinds "easy", "hard", "udp_blocked" (netlab.nat_router)

Every NATed node has its own router, so any two nodes of one kind are behind two different NATs. The
regions share one relay/TURN secret with ghostmesh's ``[relay]`` section (``[[relay.regions]]``).

API
---
``NatMesh.build(lab, workdir, *, per_kind=2, regions=DEFAULT_REGIONS) -> NatMesh``
    ``per_kind``: nodes per kind (an int for every kind in ``netlab.NAT_KINDS``, or ``{kind: count}``).
``nm.start()``: regions, then ghostmesh; ``nm.join_all()``: every node joins (all at once), connected.
``nm.add_host(kind) -> NatNode`` (one more host of that kind, not joined), ``nm.join(n, wait=True)``.
``nm.of_kind(kind) -> list[NatNode]`` (nodes are found by property, never by position in a list),
``nm.key_of(n, fresh=False)``, ``nm.v4(n)``.
``nm.path_of(node, peer) -> (path, relay)`` from ``ghostctl peers --output json`` on ``node``'s ghostlink
socket: path is "direct", "relay", "turn" or "" (no path yet); "missing" when ``peer`` is not listed.
``nm.peer_entry(node, peer) -> dict | None`` (the whole peers row), ``nm.wait_path(a, b, classes, timeout)``
(bounded, READ-only), ``nm.ping_both(a, b, timeout)``, ``nm.handshake(a, b) -> unix seconds``.
``nm.netcheck(n) -> dict`` (``ghostctl netcheck --output json``).
``nm.cut_direct(a, b)`` / ``nm.restore_direct(a, b)``: an nftables table in ``a``'s router (or ``a``'s own
namespace for a public host) dropping UDP between ``a`` and ``b``'s public address; the relays are on other
addresses, so only the direct path dies.
``nm.regions[name].kill()`` / ``.start()``: a region's server, by PID.
``longest_gap(stats, interval)`` / ``gaps(...)``: outages in a ping stream, in seconds.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import shutil
import sys
import time
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.meshlab import Mesh, Node
from tests.netlab import NAT_KINDS, Host, Lab, PingStats, Proc, Segment, WaitTimeout

PUBLIC_CIDR = "192.0.2.0/24"
INET_IP = "192.0.2.254"
SERVER_IP = "192.0.2.1"
# ghostmesh listens on the relays' TCP port: behind "udp_blocked" only TCP to that port gets out.
RELAY_TCP_PORT = 3478
CONTROL_PORT = RELAY_TCP_PORT
STUN_PORT = 3478
QUIC_PORT = 3479  # ghostgate's default: listen port + 1 (QUIC cannot share the STUN/TURN port)
SECRET = "natmesh-relay-secret"
REALM = "ghostmesh"
LAN_POOL = ("198.51.100.0/24", "203.0.113.0/24")
PATH_CLASSES = ("direct", "relay", "turn")
# WireGuard's REKEY_AFTER_TIME (whitepaper §6.1): a session may be renewed on schedule, never reset early.
REKEY_AFTER_TIME = 120

_STUN_PROBE = """
import os, socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(0.3)
tid = os.urandom(12)
req = bytes.fromhex("000100002112a442") + tid  # RFC 8489 Binding request, no attributes
end = time.monotonic() + float(sys.argv[3])
while time.monotonic() < end:
    s.sendto(req, (sys.argv[1], int(sys.argv[2])))
    try:
        data, _ = s.recvfrom(2048)
    except (TimeoutError, ConnectionRefusedError):
        time.sleep(0.1)
        continue
    if data[:2] == bytes.fromhex("0101") and data[8:20] == tid:
        print("ok")
        sys.exit(0)
print("no answer")
sys.exit(1)
"""

_TCP_PROBE = """
import socket, sys, time
end = time.monotonic() + float(sys.argv[3])
while time.monotonic() < end:
    try:
        socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=0.5).close()
    except OSError:
        time.sleep(0.1)
        continue
    print("ok")
    sys.exit(0)
print("no answer")
sys.exit(1)
"""


@dataclass(frozen=True)
class RegionSpec:
    """One relay region as ghostmesh's ``[[relay.regions]]`` lists it, plus which server runs it."""

    id: int
    name: str
    ip: str
    software: str = "ghostgate"  # or "coturn" (TURN only: give quic_port=0, tcp_port=0)
    stun_port: int = STUN_PORT
    quic_port: int = QUIC_PORT
    tcp_port: int = RELAY_TCP_PORT
    turn: bool = True

    def toml(self) -> str:
        return (
            f'\n[[relay.regions]]\nid = {self.id}\nname = "{self.name}"\nhost = "{self.ip}"\n'
            f"stun_port = {self.stun_port}\nquic_port = {self.quic_port}\ntcp_port = {self.tcp_port}\n"
            f"turn = {'true' if self.turn else 'false'}\n"
        )


DEFAULT_REGIONS = (RegionSpec(1, "r1", "192.0.2.2"), RegionSpec(2, "r2", "192.0.2.3"))


def coturn_region(rid: int = 1, name: str = "coturn", ip: str = "192.0.2.2") -> RegionSpec:
    """A region served by Debian's coturn: STUN + TURN only (no QUIC or TLS relay of ours)."""
    return RegionSpec(rid, name, ip, software="coturn", quic_port=0, tcp_port=0)


@dataclass
class Region:
    """A running relay server (one process, handled by PID only)."""

    spec: RegionSpec
    host: Host
    workdir: Path
    proc: Proc | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    def argv(self) -> list[str]:
        s = self.spec
        if s.software == "coturn":
            return [
                "turnserver", "-n", "-v", "--listening-ip", s.ip, "--listening-port", str(s.stun_port),
                "--relay-ip", s.ip, "--use-auth-secret", "--static-auth-secret", SECRET, "--realm", REALM,
                "--no-tls", "--no-dtls", "--no-cli", "--no-tcp-relay", "--simple-log", "--log-file", "stdout",
                "--pidfile", str(self.workdir / "turnserver.pid"), "--db", str(self.workdir / "turndb"),
            ]  # fmt: skip
        conf = self.workdir / "ghostgate.toml"
        conf.write_text(
            f'[relay]\nlisten = "{s.ip}:{s.stun_port}"\n'
            f'[turn]\nsecret = "{SECRET}"\nrealm = "{REALM}"\nrelay_address = "{s.ip}"\n'
        )
        return [sys.executable, "-m", "ghostgate.app", "--config", str(conf)]

    def start(self, timeout: float = 15.0) -> Proc:
        """Start the server and wait until it answers STUN (and accepts TCP on its relay port, if any)."""
        if self.proc is not None and self.proc.alive():
            raise AssertionError(f"region {self.name} is running already (pid {self.proc.pid})")
        self.workdir.mkdir(parents=True, exist_ok=True)
        s = self.spec
        self.proc = self.host.spawn(self.argv(), s.software)
        probe = self.host.exec(
            [sys.executable, "-c", _STUN_PROBE, s.ip, str(s.stun_port), str(timeout)],
            check=False,
            timeout=timeout + 10,
        )
        if probe.returncode != 0:
            raise AssertionError(f"region {self.name} never answered STUN; see {self.proc.log_path}")
        if s.tcp_port:
            probe = self.host.exec(
                [sys.executable, "-c", _TCP_PROBE, s.ip, str(s.tcp_port), str(timeout)],
                check=False,
                timeout=timeout + 10,
            )
            if probe.returncode != 0:
                raise AssertionError(f"region {self.name} refuses TCP {s.tcp_port}; see {self.proc.log_path}")
        return self.proc

    def kill(self) -> None:
        """SIGKILL the server by its PID (no goodbye to any client)."""
        if self.proc is None:
            raise AssertionError(f"region {self.name} was never started")
        self.proc.kill()


@dataclass
class NatNode:
    """One ghostlink node of the lab and the network it sits behind."""

    node: Node
    kind: str
    router: Host | None  # None for kind "none"
    public_ip: str  # the address its traffic leaves with (its router's WAN address, or its own)

    @property
    def name(self) -> str:
        return self.node.name

    @property
    def host(self) -> Host:
        return self.node.host


@dataclass
class NatMesh:
    lab: Lab
    mesh: Mesh
    pub: Segment
    regions: dict[str, Region]
    nodes: dict[str, NatNode] = field(default_factory=dict)
    authkey: str = ""
    joined_at: float = 0.0  # time.monotonic() when join_all saw the last node connected
    _lans: list[ipaddress.IPv4Network] = field(default_factory=list)
    _next_wan: int = 20
    _next_public: int = 30
    _keys: dict[str, str] = field(default_factory=dict)
    _v4: dict[str, str] = field(default_factory=dict)
    _cuts: set[tuple[str, str]] = field(default_factory=set)

    # --- building ---------------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        lab: Lab,
        workdir: Path,
        *,
        per_kind: int | Mapping[str, int] = 2,
        regions: Sequence[RegionSpec] = DEFAULT_REGIONS,
    ) -> NatMesh:
        counts = dict.fromkeys(NAT_KINDS, per_kind) if isinstance(per_kind, int) else dict(per_kind)
        unknown = set(counts) - set(NAT_KINDS)
        if unknown:
            raise ValueError(f"natmesh: unknown kinds {sorted(unknown)}; use {', '.join(NAT_KINDS)}")
        inet = lab.router("inet")
        pub = lab.segment("pub", PUBLIC_CIDR, inet, INET_IP)
        srv = lab.host("srv")
        lab.attach(srv, pub, SERVER_IP)
        workdir.mkdir(parents=True, exist_ok=True)
        mesh = Mesh(lab, workdir, inet, srv, {"pub": pub}, server_ip=SERVER_IP, server_port=CONTROL_PORT)
        regs: dict[str, Region] = {}
        for spec in regions:
            host = lab.host(f"gate{spec.id}")
            lab.attach(host, pub, spec.ip)
            regs[spec.name] = Region(spec, host, workdir / f"region-{spec.name}")
        lans = [s for pool in LAN_POOL for s in ipaddress.IPv4Network(pool).subnets(new_prefix=27)]
        nm = cls(lab, mesh, pub, regs, _lans=lans)
        for kind in NAT_KINDS:
            for _ in range(counts.get(kind, 0)):
                nm.add_host(kind)
        return nm

    def add_host(self, kind: str) -> NatNode:
        """One more node host of ``kind`` (its own NAT router unless "none"); named <kind><n>, not joined."""
        if kind not in NAT_KINDS:
            raise ValueError(f"natmesh: unknown kind {kind!r}")
        n = 1 + sum(1 for x in self.nodes.values() if x.kind == kind)
        name = f"{'udpb' if kind == 'udp_blocked' else kind}{n}"
        router: Host | None = None
        if kind == "none":
            host = self.lab.host(name)
            public_ip = str(self.pub.network.network_address + self._next_public)
            self._next_public += 1
            self.lab.attach(host, self.pub, public_ip)
        else:
            if not self._lans:
                raise ValueError("natmesh: out of LAN prefixes")
            lan = self._lans.pop(0)
            public_ip = str(self.pub.network.network_address + self._next_wan)
            self._next_wan += 1
            router, seg = self.lab.nat_router(
                f"nat-{name}",
                kind,
                self.pub,
                public_ip,
                lan_cidr=str(lan),
                lan_router_ip=str(lan.network_address + 1),
                tcp_port=RELAY_TCP_PORT if kind == "udp_blocked" else None,
            )
            host = self.lab.host(name)
            self.lab.attach(host, seg, str(lan.network_address + 10))
        node = self.mesh.prepare_node(name, "pub", host=host)
        nn = NatNode(node, kind, router, public_ip)
        self.nodes[name] = nn
        return nn

    def relay_config(self) -> str:
        """ghostmesh's ``[relay]`` section: the shared secret and every region."""
        regions = "".join(r.spec.toml() for r in self.regions.values())
        return f'\n[relay]\nsecret = "{SECRET}"\ncredential_lifetime = "1h"\n{regions}'

    def start(self) -> None:
        """Every region's server, then ghostmesh with the regions; a reusable auth key for the nodes."""
        for region in self.regions.values():
            region.start()
        self.mesh.start_server(extra_config=self.relay_config())
        self.authkey = self.mesh.authkey("--reusable", "--expiration", "1h")

    def join(self, n: NatNode, *extra: str, wait: bool = True) -> None:
        if not self.authkey:
            raise AssertionError("natmesh: start() first")
        self.mesh.start_node(n.node, "join", "--auth", self.authkey, *extra)
        if wait:
            self.mesh.wait_connected(n.node, timeout=30)

    def join_all(self, *extra: str) -> None:
        """Every node not yet started joins; they start together, then each must connect."""
        todo = [n for n in self.nodes.values() if n.node.proc is None]
        for n in todo:
            self.join(n, *extra, wait=False)
        for n in todo:
            self.mesh.wait_connected(n.node, timeout=30)
        self.joined_at = time.monotonic()

    # --- reading ----------------------------------------------------------------------------------
    def of_kind(self, kind: str) -> list[NatNode]:
        return sorted((n for n in self.nodes.values() if n.kind == kind), key=lambda n: n.name)

    def key_of(self, n: NatNode, *, fresh: bool = False) -> str:
        """``n``'s node key (cached; ``fresh``: read it again, e.g. after a key rotation)."""
        if fresh or n.name not in self._keys:
            self._keys[n.name] = str(n.node.status(self.mesh)["node_key"])
        return self._keys[n.name]

    def v4(self, n: NatNode) -> str:
        if n.name not in self._v4:
            self._v4[n.name] = n.node.addresses(self.mesh)[0]
        return self._v4[n.name]

    def peer_entry(self, node: NatNode, peer: NatNode) -> dict[str, Any] | None:
        key = self.key_of(peer)
        return next((p for p in node.node.peers(self.mesh) if p.get("node_key") == key), None)

    def path_of(self, node: NatNode, peer: NatNode) -> tuple[str, str]:
        """(path, relay) of ``peer`` as ``node``'s ghostlink reports it ("missing": not a peer at all)."""
        entry = self.peer_entry(node, peer)
        if entry is None:
            return ("missing", "")
        return (str(entry.get("path", "")), str(entry.get("relay", "")))

    def wait_path(
        self, a: NatNode, b: NatNode, classes: Collection[str], timeout: float = 15.0
    ) -> tuple[str, str]:
        """Wait (bounded, reads only) until ``a`` reports a path to ``b`` in ``classes``; returns it."""
        last: list[tuple[str, str]] = [("", "")]

        def check() -> tuple[str, str] | None:
            last[0] = self.path_of(a, b)
            return last[0] if last[0][0] in classes else None

        try:
            got = self.lab.wait_for(check, timeout=timeout, interval=0.1, what=f"{a.name} -> {b.name} path")
        except WaitTimeout:
            raise WaitTimeout(
                f"{a.name} ({a.kind}) -> {b.name} ({b.kind}): path still {last[0]!r} after {timeout}s, "
                f"expected one of {sorted(classes)}; logs in {self.lab.artifacts_dir}"
            ) from None
        assert got is not None  # wait_for returns only a truthy value
        return got

    def ping_both(self, a: NatNode, b: NatNode, timeout: float = 10.0) -> None:
        """Each of ``a`` and ``b`` gets a ping answered by the other over the mesh (bounded retries)."""
        for x, y in ((a, b), (b, a)):
            dst = self.v4(y)
            self.lab.wait_for(
                functools.partial(x.host.ping, dst, timeout=1),
                timeout=timeout,
                interval=0.1,
                what=f"{x.name} ({x.kind}) pings {y.name} ({y.kind}) at {dst} over the mesh",
            )

    def netcheck(self, n: NatNode) -> dict[str, Any]:
        """``ghostctl netcheck --output json`` on ``n``'s ghostlink (measured now: takes a moment)."""
        out: dict[str, Any] = self.mesh.ctl("--socket", str(n.node.socket), "netcheck")
        return out

    def handshake(self, a: NatNode, b: NatNode) -> int:
        """``a``'s latest WireGuard handshake with ``b`` (unix seconds, 0 = never)."""
        return a.host.wg_latest_handshakes(a.node.ifname).get(self.key_of(b), 0)

    # --- breaking things --------------------------------------------------------------------------
    def _cut_table(self, b: NatNode) -> str:
        return "ghostcut_" + b.public_ip.replace(".", "_")

    def cut_direct(self, a: NatNode, b: NatNode) -> None:
        """Drop UDP between ``a`` and ``b``'s public address (in ``a``'s router, or ``a`` itself if public).

        Both directions die, the relays (other addresses) stay reachable: only the direct path is cut.
        """
        table, peer = self._cut_table(b), b.public_ip
        if a.router is not None:
            where = a.router
            chains = f"""
    chain cut_forward {{
        type filter hook forward priority -10; policy accept;
        ip daddr {peer} meta l4proto udp drop
        ip saddr {peer} meta l4proto udp drop
    }}"""
        else:
            where = a.host
            chains = f"""
    chain cut_output {{
        type filter hook output priority -10; policy accept;
        ip daddr {peer} meta l4proto udp drop
    }}
    chain cut_input {{
        type filter hook input priority -10; policy accept;
        ip saddr {peer} meta l4proto udp drop
    }}"""
        where.exec(["nft", "-f", "-"], input=f"table ip {table} {{{chains}\n}}\n")
        self._cuts.add((a.name, b.name))

    def restore_direct(self, a: NatNode, b: NatNode) -> None:
        where = a.router if a.router is not None else a.host
        where.exec(["nft", "delete", "table", "ip", self._cut_table(b)])
        self._cuts.discard((a.name, b.name))

    @contextlib.contextmanager
    def direct_cut(self, a: NatNode, b: NatNode) -> Iterator[None]:
        self.cut_direct(a, b)
        try:
            yield
        finally:
            if (a.name, b.name) in self._cuts:
                self.restore_direct(a, b)


def gaps(stats: PingStats, interval: float) -> list[float]:
    """Every outage of a ping stream, in seconds: runs of consecutive lost sequence numbers times interval.

    The last sequence number may still have been in flight when the stream was stopped: not an outage.
    """
    missing = [s for s in stats.missing_seqs if s != stats.transmitted]
    runs: list[int] = []
    prev = -2
    for s in missing:
        if s == prev + 1:
            runs[-1] += 1
        else:
            runs.append(1)
        prev = s
    return [r * interval for r in runs]


def longest_gap(stats: PingStats, interval: float) -> float:
    return max(gaps(stats, interval), default=0.0)


def coturn_available() -> bool:
    return shutil.which("turnserver") is not None
