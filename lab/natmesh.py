"""A lab with a running ghost* mesh across NATs: ghostmesh, relay regions, and NATed nodes.

Built on ``lab.netns`` and ``lab.nat`` (namespaces, NAT routers), ``lab.mesh`` (ghostmesh + ghostlink as
real processes) and ``lab.regions`` (relay servers), for the path tests (tests/netns/test_paths_*.py), the
path benchmark (bench/paths.py) and the demo. Topology (``NatMesh.build``)::

    public 192.0.2.0/24 ("inet" router .254, no NAT)
      ├── srv   .1   ghostmesh, coordination on TCP 3478 (the one port a UDP-blocking firewall lets out)
      ├── gate1 .2   region 1: ghostgate (STUN+TURN udp 3478, QUIC relay udp 3479, TLS relay tcp 3478)
      ├── gate2 .3   region 2: the same (or coturn: TURN only, ``RegionSpec(software="coturn")``)
      ├── none1 .30, none2 .31 ...                     kind "none": public hosts
      └── nat-<node> .20+i ── LAN /27 from 198.51.100.0/24 then 203.0.113.0/24 ── <node> (.10 of its LAN)
                                                       kinds "easy", "hard", "udp_blocked" (Lab.nat_router)

Every NATed node has its own router, so any two nodes of one kind are behind two different NATs. The
regions share one relay/TURN secret with ghostmesh's ``[relay]`` section (``[[relay.regions]]``).

API
---
``NatMesh.build(lab, workdir, *, per_kind=2, regions=DEFAULT_REGIONS) -> NatMesh``
    ``per_kind``: nodes per kind (an int for every kind in ``lab.nat.NAT_KINDS``, or ``{kind: count}``).
``nm.start()``: ghostmesh, then the regions (ghostgates watching it: ``[control]``);
``nm.join_all()``: every node joins (all at once), connected.
``nm.add_host(kind) -> NatNode`` (one more host of that kind, not joined), ``nm.join(n, wait=True)``.
``nm.of_kind(kind) -> list[NatNode]`` (nodes are found by property, never by position in a list),
``nm.key_of(n, fresh=False)``, ``nm.v4(n)``.
``nm.path_of(node, peer) -> (path, relay)`` from ``ghostctl peers --output json`` on ``node``'s ghostlink
socket: path is "direct", "relay", "turn" or "" (no path yet); "missing" when ``peer`` is not listed.
``nm.snapshot() -> {(node name, peer name): peers row}`` for every ordered pair (one ghostctl per node; a
node whose reading timed out is left out of that snapshot and reported on stderr, for the loops that read
again), ``nm.peer_entry(node, peer) -> dict | None`` (the whole peers row),
``nm.wait_path(a, b, classes, timeout)`` (bounded, READ-only), ``nm.ping_both(a, b, timeout)``,
``nm.handshake(a, b) -> unix seconds``.
``nm.netcheck(n) -> dict`` (``ghostctl netcheck --output json``).
``nm.cut_direct(a, b)`` / ``nm.restore_direct(a, b)``: an nftables table in ``a``'s router (or ``a``'s own
namespace for a public host) dropping UDP between ``a`` and ``b``'s public address; the relays are on other
addresses, so only the direct path dies.
``nm.regions[name].kill()`` / ``.start()``: a region's server, by PID (``lab.regions``).
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import os
import subprocess
import sys
import time
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lab import nat as lab_nat
from lab.errors import WaitTimeout
from lab.mesh import Mesh, Node
from lab.nat import NAT_KINDS
from lab.netns import Host, Lab, Segment
from lab.procs import Proc
from lab.regions import DEFAULT_REGIONS, RELAY_TCP_PORT, SECRET, Region, RegionSpec

PUBLIC_CIDR = "192.0.2.0/24"
INET_IP = "192.0.2.254"
# The public segment's IPv6 prefix (RFC 3849); kind "v6" LANs get a /64 each from 2001:db8:0:N::/64.
PUBLIC6_CIDR = "2001:db8::/64"
INET_IP6 = "2001:db8::fe"
SERVER_IP = "192.0.2.1"
# ghostmesh listens on the relays' TCP port: behind "udp_blocked" only TCP to that port gets out.
CONTROL_PORT = RELAY_TCP_PORT
LAN_POOL = ("198.51.100.0/24", "203.0.113.0/24")
# Node kinds: the router kinds of lab.nat, and setups built from them:
# "stacked": an easy home router behind a carrier NAT that is endpoint-independent but gives every inner
#            port another public port (two endpoint-independent NATs in a row; the public port is not 41641);
# "upnp": a hard (symmetric) NAT whose router runs miniupnpd (UPnP IGD, NAT-PMP, PCP) granting mappings;
# "upnp_off": an easy NAT whose miniupnpd refuses every mapping (an owner who turned it off);
# "v6": a hard IPv4 NAT, and a public IPv6 address (routed, no NAT, no filter) on its LAN.
NODE_KINDS = (*NAT_KINDS, "stacked", "upnp", "upnp_off", "v6")
_PREFIX = {"udp_blocked": "udpb", "upnp_off": "upnpoff", "stacked": "stk"}
# WireGuard's REKEY_AFTER_TIME (whitepaper §6.1): a session may be renewed on schedule, never reset early.
REKEY_AFTER_TIME = 120


@dataclass
class NatNode:
    """One ghostlink node of the lab and the network it sits behind."""

    node: Node
    kind: str
    router: Host | None  # None for kind "none"
    public_ip: str  # the address its traffic leaves with (its router's WAN address, or its own)
    lan: Segment | None = None  # the LAN it sits on behind its router (None for kind "none")

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
    _next_lan6: int = 0
    # node name -> its router's miniupnpd (kinds "upnp", "upnp_off")
    mapping_servers: dict[str, Proc] = field(default_factory=dict)
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
        unknown = set(counts) - set(NODE_KINDS)
        if unknown:
            raise ValueError(f"natmesh: unknown kinds {sorted(unknown)}; use {', '.join(NODE_KINDS)}")
        inet = lab.router("inet")
        pub = lab.segment("pub", PUBLIC_CIDR, inet, INET_IP, cidr6=PUBLIC6_CIDR, router_ip6=INET_IP6)
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
        for kind in NODE_KINDS:
            for _ in range(counts.get(kind, 0)):
                nm.add_host(kind)
        return nm

    def add_host(self, kind: str, *, behind: NatNode | None = None) -> NatNode:
        """One more node host of ``kind`` (its own NAT router unless "none"); named <kind><n>, not joined.

        ``kind`` is one of ``NODE_KINDS``. ``behind``: put it on that node's LAN instead, behind the same
        NAT router (the same kind): two nodes behind one NAT, whose router has to give the second one's
        WireGuard port another public port (both use 41641).
        """
        if kind not in NODE_KINDS:
            raise ValueError(f"natmesh: unknown kind {kind!r}; use one of {', '.join(NODE_KINDS)}")
        n = 1 + sum(1 for x in self.nodes.values() if x.kind == kind)
        name = f"{_PREFIX.get(kind, kind)}{n}"
        host = self.lab.host(name)
        router: Host | None = None
        seg: Segment | None = None
        if behind is not None:
            if behind.lan is None or behind.kind != kind:
                raise ValueError(f"natmesh: {behind.name} is not behind a NAT of kind {kind!r}")
            router, seg, public_ip = behind.router, behind.lan, behind.public_ip
            used = sum(1 for x in self.nodes.values() if x.lan is seg)
            self.lab.attach(host, seg, str(seg.network.network_address + 10 + used))
        elif kind == "none":
            public_ip = str(self.pub.network.network_address + self._next_public)
            self._next_public += 1
            self.lab.attach(host, self.pub, public_ip)
        else:
            router, seg, public_ip = self._nat_for(kind, name)
            ip6 = None
            if kind == "v6":
                assert seg.network6 is not None
                ip6 = str(seg.network6.network_address + 10)
            self.lab.attach(host, seg, str(seg.network.network_address + 10), ip6)
        node = self.mesh.prepare_node(name, "pub", host=host)
        nn = NatNode(node, kind, router, public_ip, seg)
        self.nodes[name] = nn
        return nn

    def _lan(self) -> ipaddress.IPv4Network:
        if not self._lans:
            raise ValueError("natmesh: out of LAN prefixes")
        return self._lans.pop(0)

    def _wan_ip(self) -> str:
        ip = str(self.pub.network.network_address + self._next_wan)
        self._next_wan += 1
        return ip

    def _nat_for(self, kind: str, name: str) -> tuple[Host, Segment, str]:
        """The NAT router(s) in front of a new node of ``kind``: (its router, its LAN, its public IP)."""
        router_kind = {"stacked": "easy", "upnp": "hard", "upnp_off": "easy", "v6": "hard"}.get(kind, kind)
        wan_seg, public_ip = self.pub, self._wan_ip()
        wan_ip = public_ip
        if kind == "stacked":
            # A carrier's NAT (endpoint-independent, remapping ports as CGNATs do) on the public segment;
            # the home router is a host on the carrier's LAN, and the node is on the home router's LAN.
            carrier_lan = self._lan()
            _, wan_seg = lab_nat.nat_router(
                self.lab,
                f"cgn-{name}",
                "easy",
                self.pub,
                public_ip,
                lan_cidr=str(carrier_lan),
                lan_router_ip=str(carrier_lan.network_address + 1),
                remap=True,
            )
            wan_ip = str(carrier_lan.network_address + 2)
        lan = self._lan()
        v6: dict[str, str] = {}
        if kind == "v6":
            self._next_lan6 += 1
            lan6 = ipaddress.IPv6Network(PUBLIC6_CIDR).supernet(new_prefix=48).network_address
            lan6_net = ipaddress.IPv6Network((int(lan6) + (self._next_lan6 << 64), 64))
            wan6 = str(ipaddress.IPv6Network(PUBLIC6_CIDR).network_address + self._next_wan)
            v6 = {
                "wan_ip6": wan6,
                "lan_cidr6": str(lan6_net),
                "lan_router_ip6": str(lan6_net.network_address + 1),
            }
        router, seg = lab_nat.nat_router(
            self.lab,
            f"nat-{name}",
            router_kind,
            wan_seg,
            wan_ip,
            lan_cidr=str(lan),
            lan_router_ip=str(lan.network_address + 1),
            tcp_port=RELAY_TCP_PORT if kind == "udp_blocked" else None,
            **v6,
        )
        if v6:
            self.mesh.router.exec(["ip", "-6", "route", "add", v6["lan_cidr6"], "via", v6["wan_ip6"]])
        if kind in ("upnp", "upnp_off"):
            self.mapping_servers[name] = lab_nat.port_mapping_server(
                router,
                seg,
                allow=kind == "upnp",
                workdir=self.mesh.workdir / f"miniupnpd-{name}",
                public_ip=public_ip,
            )
        return router, seg, public_ip

    def relay_config(self) -> str:
        """ghostmesh's ``[relay]`` section: the shared secret and every region."""
        regions = "".join(r.spec.toml() for r in self.regions.values())
        return f'\n[relay]\nsecret = "{SECRET}"\ncredential_lifetime = "1h"\n{regions}'

    def start(self) -> None:
        """ghostmesh with the regions, then every region's server (a ghostgate watching ghostmesh for the
        nodes allowed on it: ``[control]`` with ghostmesh's pin); a reusable auth key for the nodes."""
        self.mesh.start_server(extra_config=self.relay_config())
        control = (f"{SERVER_IP}:{CONTROL_PORT}", self.mesh.pin())
        for region in self.regions.values():
            if region.spec.software == "ghostgate":
                region.control = control
            region.start()
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

    def snapshot(self) -> dict[tuple[str, str], dict[str, Any]]:
        by_key = {self.key_of(n): n.name for n in self.nodes.values()}
        out: dict[tuple[str, str], dict[str, Any]] = {}
        for n in self.nodes.values():
            started = time.monotonic()
            try:
                rows = n.node.peers(self.mesh)
            except subprocess.TimeoutExpired:
                # A read: the callers read again (bounded). Said, with the machine's load, so that a
                # failure that follows shows whether the node or the whole machine stalled.
                load = os.getloadavg()
                print(
                    f"snapshot: {n.name}'s peers unread after {time.monotonic() - started:.1f} s "
                    f"(load {load[0]:.1f} {load[1]:.1f})",
                    file=sys.stderr,
                )
                continue
            for row in rows:
                out[(n.name, by_key.get(row["node_key"], "?"))] = row
        return out

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
