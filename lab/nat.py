"""NAT routers and the probes that measure them: mapping, filtering and naive hole punching.

``Lab.nat_router(name, kind, wan_segment, wan_ip, *, lan_cidr, lan_router_ip, tcp_port=None)
-> tuple[Host, Segment]``
    A router namespace whose WAN leg is attached to the existing ("public") ``wan_segment`` at ``wan_ip``
    (default route via that segment's router) and whose LAN is a new bridge ``lan_router_ip``/``lan_cidr``
    behind it; attach hosts to the returned Segment with ``lab.attach``. One nftables table
    (``ip ghostnat``) inside the router's namespace, so deleting the namespace removes it. ``kind``:

    * ``"none"`` is not a router: a host attached straight to the public segment is the "none" kind
      (``nat_router`` refuses it with that hint).
    * ``"easy"``: ``masquerade`` (keeps the source port: endpoint-independent mapping) and a filter that
      forwards WAN->LAN only ``ct state established,related`` and drops everything else arriving on the
      WAN leg (address-and-port-dependent filtering, unsolicited input dropped: a home router).
    * ``"hard"``: the same filter with ``masquerade random`` (a new public port per destination: symmetric;
      ``fully-random`` measured the same here).
    * ``"udp_blocked"``: masquerade, but LAN->WAN forwards only TCP to ``tcp_port`` (required); all UDP
      and every other port are dropped both ways.

``NAT_KINDS`` lists the kinds. Probes (all bounded, all check addresses):
``udp_reflector(host, port=3478, max_seconds=300.0) -> Proc`` (a STUN-like echo: answers each datagram
with the ``ip:port`` it came from), ``tcp_reflector(host, port, max_seconds=300.0) -> Proc`` (same over
TCP, one line per connection), ``udp_observe(host, src_port, targets, timeout=2.0) -> list[tuple[str,
int] | None]`` (what each reflector saw from ``host``'s ``src_port``), ``tcp_observe(host, dst, port,
timeout=2.0) -> tuple[str, int] | None`` and
``punch(a, a_port, b, b_port, *, reflector, seconds=3.0, learn=False) -> bool`` (naive hole
punching: learn each side's public endpoint from the reflector, then both send to each other's
endpoint at once; True when each side received the other's datagrams).
"""

from __future__ import annotations

import json
import shutil
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from lab.addrs import check_address, check_network
from lab.errors import LabError

if TYPE_CHECKING:
    from lab.netns import Host, Lab, Segment
    from lab.procs import Proc

NAT_KINDS = ("none", "easy", "hard", "udp_blocked")
REMAP_PORTS = (20000, 29999)  # public ports of an "easy" router built with remap=True


def _nat_ruleset(kind: str, wan: str, lan: str, tcp_port: int | None, remap: bool = False) -> str:
    """The nftables table of one NAT router (lives in its namespace, so it dies with it)."""
    # "random" hashes the destination into the port choice: a new public port per destination (symmetric).
    masq = "masquerade random" if kind == "hard" else "masquerade"
    if remap:
        # A port range the inner ports are never in: each inner port gets another public port, kept for
        # every destination while its first mapping lives (the kernel reuses a source's current mapping:
        # endpoint-independent), as carrier-grade NATs and many home routers do.
        ports = f"{REMAP_PORTS[0]}-{REMAP_PORTS[1]}"
        masq = f'meta l4proto {{ tcp, udp }} masquerade to :{ports}\n        oifname "{wan}" masquerade'
    if kind == "udp_blocked":
        out_rule = f'iifname "{lan}" oifname "{wan}" tcp dport {tcp_port} accept'
    else:
        out_rule = f'iifname "{lan}" oifname "{wan}" accept'
    return f"""
table ip ghostnat {{
    counter pm_requests {{
    }}
    chain nat_out {{
        type nat hook postrouting priority srcnat; policy accept;
        oifname "{wan}" {masq}
    }}
    chain filter_fwd {{
        type filter hook forward priority filter; policy drop;
        # LAN to LAN is a home router's switch, never filtered. Where br_netfilter is loaded (Docker loads
        # it, and bridge-nf-call-iptables defaults to 1 in every namespace), bridged frames between two
        # LAN hosts pass this hook with the bridge as both devices, and the drop policy would eat them.
        iifname "{lan}" oifname "{lan}" accept
        {out_rule}
        iifname "{wan}" oifname "{lan}" ct state established,related accept
        # what a port mapping (miniupnpd's DNAT rules, when it runs here) lets in
        iifname "{wan}" oifname "{lan}" ct status dnat accept
    }}
    chain filter_in {{
        type filter hook input priority filter; policy accept;
        iifname "{lan}" udp dport {{ 1900, 5351 }} counter name pm_requests
        # Unsolicited input on the WAN leg is dropped before conntrack confirms it, so no [UNREPLIED]
        # inbound entry can steal the port a later outgoing punch wants.
        iifname "{wan}" ct state established,related accept
        iifname "{wan}" drop
    }}
}}
"""


def nat_router(
    lab: Lab,
    name: str,
    kind: str,
    wan_segment: Segment,
    wan_ip: str,
    *,
    lan_cidr: str,
    lan_router_ip: str,
    tcp_port: int | None = None,
    wan_ip6: str | None = None,
    lan_cidr6: str | None = None,
    lan_router_ip6: str | None = None,
    remap: bool = False,
) -> tuple[Host, Segment]:
    """The router of ``Lab.nat_router``: a new namespace, its WAN leg, its LAN and its nftables table.

    With ``wan_ip6`` (on ``wan_segment``'s IPv6 prefix) and ``lan_cidr6``/``lan_router_ip6`` the router also
    routes IPv6 between WAN and LAN, without NAT and without a filter: the LAN's IPv6 addresses are
    public (the upstream router needs a route to ``lan_cidr6`` via ``wan_ip6``: the caller adds it).
    ``remap`` (kind "easy" only): still endpoint-independent, but every public port differs from the
    inner one (``REMAP_PORTS``), as a carrier-grade NAT does.
    """
    if remap and kind != "easy":
        raise LabError(f"nat_router {name}: remap is for kind 'easy' only")
    if kind == "none":
        raise LabError("nat_router: kind 'none' is a public host: lab.attach it to the public segment")
    if kind not in NAT_KINDS:
        raise LabError(f"nat_router {name}: unknown kind {kind!r}; use one of {', '.join(NAT_KINDS)}")
    if (kind == "udp_blocked") != (tcp_port is not None):
        raise LabError(f"nat_router {name}: tcp_port is required for udp_blocked and only for it")
    check_network(lan_cidr, f"nat_router {name}")
    check_address(wan_ip, f"nat_router {name}")
    router = lab.router(name)
    wan = lab.attach(router, wan_segment, wan_ip, wan_ip6)
    lan = lab.segment(
        f"{name}-lan", lan_cidr, router, lan_router_ip, cidr6=lan_cidr6, router_ip6=lan_router_ip6
    )
    router.exec(["nft", "-f", "-"], input=_nat_ruleset(kind, wan, lan.bridge, tcp_port, remap))
    return router, lan


def wan_ifname(router: Host) -> str:
    """The router's WAN interface: the one its IPv4 default route leaves by."""
    out = router.exec(["ip", "-4", "route", "show", "default"]).stdout.split()
    if "dev" not in out:
        raise LabError(f"{router.name} has no IPv4 default route")
    return out[out.index("dev") + 1]


# The tables and chains Debian's miniupnpd (nftables backend) adds its rules to: its defaults
# (table "filter" for both, chains miniupnpd / prerouting_miniupnpd / postrouting_miniupnpd), created here
# because miniupnpd only fills them. Forwarded packets that a mapping let in are accepted by ghostnat's
# forward chain (``ct status dnat``), so the miniupnpd chain's own accepts are not needed to pass them.
_MINIUPNPD_TABLES = """
table ip filter {
    chain miniupnpd {
    }
    chain forward {
        type filter hook forward priority 10; policy accept;
        jump miniupnpd
    }
    chain prerouting_miniupnpd {
    }
    chain postrouting_miniupnpd {
    }
    chain prerouting {
        type nat hook prerouting priority dstnat; policy accept;
        jump prerouting_miniupnpd
    }
    chain postrouting {
        type nat hook postrouting priority 90; policy accept;
        jump postrouting_miniupnpd
    }
}
"""


def port_mapping_server(router: Host, lan: Segment, *, allow: bool, workdir: Path, public_ip: str) -> Proc:
    """Debian's ``miniupnpd`` on ``router``: UPnP IGD (SSDP + SOAP), NAT-PMP and PCP for ``lan``.

    ``allow``: LAN hosts may map external ports 1024-65535 to their own address (secure mode); without
    it every request is refused (a router whose owner turned mapping off: it still answers, with an
    error). Its mappings are DNAT rules in ``table ip filter`` (see ``_MINIUPNPD_TABLES``); the router's
    forward chain accepts what they let in. Stopped by PID with the lab; its chains die with the
    namespace.

    Limit found here: Debian's miniupnpd 2.3.1 takes every documentation range (RFC 5737), the only
    public addresses the lab may use, for reserved ones: it starts ("Reserved / private IP address ...
    Port forwarding is impossible"), answers, and fails every mapping it would grant (PCP NO_RESOURCES,
    NAT-PMP "network failure", UPnP error 501); ``ext_ip=`` with such an address makes it exit, and it has
    no option to allow one. So with ``allow`` the requests reach a real server and are refused for that
    reason; ``public_ip`` is kept for a miniupnpd that allows it. Needs ``miniupnpd``
    (``port_mapping_available()``).
    """
    binary = shutil.which("miniupnpd") or "/usr/sbin/miniupnpd"
    if not Path(binary).exists():
        raise LabError("miniupnpd is not installed (apt-get install miniupnpd)")
    router.exec(["nft", "-f", "-"], input=_MINIUPNPD_TABLES)
    wan = wan_ifname(router)
    rules = [f"allow 1024-65535 {lan.network} 1024-65535"] if allow else []
    rules.append("deny 0-65535 0.0.0.0/0 0-65535")
    workdir.mkdir(parents=True, exist_ok=True)
    conf = workdir / f"miniupnpd-{router.name}.conf"
    conf.write_text(
        "\n".join(
            [
                f"ext_ifname={wan}",
                f"listening_ip={lan.bridge}",
                "enable_natpmp=yes",  # NAT-PMP and PCP share UDP 5351
                "enable_upnp=yes",
                "secure_mode=yes",
                "http_port=0",
                "min_lifetime=60",  # short leases are the point of a test: renewals happen
                f"uuid={uuid.uuid4()}",
                f"lease_file={workdir / f'leases-{router.name}'}",
                *rules,
                "",
            ]
        )
    )
    pidfile = workdir / f"miniupnpd-{router.name}.pid"
    proc = router.spawn([binary, "-f", str(conf), "-d", "-4", "-P", str(pidfile)], "miniupnpd")
    router.lab.wait_for(
        lambda: "Listening for NAT-PMP/PCP traffic" in proc.log_text() or not proc.alive(),
        timeout=10,
        interval=0.05,
        what=f"miniupnpd on {router.name}",
    )
    if not proc.alive():
        raise LabError(f"miniupnpd on {router.name} exited; see {proc.log_path}")
    return proc


def port_mapping_available() -> bool:
    return shutil.which("miniupnpd") is not None or Path("/usr/sbin/miniupnpd").exists()


def port_mapping_requests(router: Host) -> int:
    """Port-mapping requests (NAT-PMP/PCP UDP 5351, SSDP UDP 1900) the router received from its LAN."""
    out = router.exec(["nft", "list", "counter", "ip", "ghostnat", "pm_requests"]).stdout
    words = out.split()
    return int(words[words.index("packets") + 1])


_UDP_REFLECTOR = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.settimeout(0.5)
end = time.monotonic() + float(sys.argv[2])
print("ready", flush=True)
while time.monotonic() < end:
    try:
        data, src = s.recvfrom(2048)
    except TimeoutError:
        continue
    s.sendto(f"{src[0]}:{src[1]}".encode(), src)
"""

_TCP_REFLECTOR = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(16)
s.settimeout(0.5)
end = time.monotonic() + float(sys.argv[2])
print("ready", flush=True)
while time.monotonic() < end:
    try:
        c, src = s.accept()
    except TimeoutError:
        continue
    with c:
        c.settimeout(1.0)
        c.sendall(f"{src[0]}:{src[1]}\\n".encode())
"""

_UDP_OBSERVE = """
import json, socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
timeout = float(sys.argv[2])
out = []
for target in sys.argv[3:]:
    ip, port = target.rsplit(":", 1)
    seen = None
    end = time.monotonic() + timeout
    while seen is None and time.monotonic() < end:
        s.sendto(b"probe", (ip, int(port)))
        s.settimeout(0.2)
        try:
            data, src = s.recvfrom(2048)
        except TimeoutError:
            continue
        if src == (ip, int(port)):
            seen = data.decode()
    out.append(seen)
print(json.dumps(out))
"""

_TCP_OBSERVE = """
import socket, sys
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])) as c:
        c.settimeout(float(sys.argv[3]))
        print(c.recv(256).decode().strip())
except OSError as exc:
    print("error", type(exc).__name__)
"""

# Both ends run this at once: send our tag to the peer's public endpoint every 50 ms, log what arrives.
_PUNCH = """
import os, socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
peer = (sys.argv[2], int(sys.argv[3]))
tag = sys.argv[4].encode()
print("bound", flush=True)
go = time.monotonic() + 20.0
while time.monotonic() < go and not os.path.exists(sys.argv[7]):
    time.sleep(0.01)
end = time.monotonic() + float(sys.argv[5])
got_at = None
s.settimeout(0.05)
while time.monotonic() < end and (got_at is None or time.monotonic() < got_at + 0.5):
    s.sendto(tag, peer)
    try:
        data, src = s.recvfrom(2048)
    except TimeoutError:
        continue
    print(f"got {src[0]}:{src[1]} {data.decode(errors='replace')}", flush=True)
    if data == tag:
        continue
    if got_at is None:
        got_at = time.monotonic()
    if sys.argv[6] == "1":
        peer = src  # ICE's peer-reflexive candidate: answer where the peer's packets really come from
print("done", "ok" if got_at is not None else "none", flush=True)
"""


def _endpoint(text: str | None) -> tuple[str, int] | None:
    if not text or ":" not in text:
        return None
    ip, port = text.rsplit(":", 1)
    return (ip, int(port)) if port.isdigit() else None


def udp_reflector(host: Host, port: int = 3478, max_seconds: float = 300.0) -> Proc:
    """A STUN-like UDP echo on ``host``: answers each datagram with the ``ip:port`` it came from."""
    proc = host.spawn([sys.executable, "-c", _UDP_REFLECTOR, str(port), str(max_seconds)], f"udprefl-{port}")
    host.lab.wait_for(lambda: "ready" in proc.log_text(), timeout=10, interval=0.05, what="udp reflector")
    return proc


def tcp_reflector(host: Host, port: int, max_seconds: float = 300.0) -> Proc:
    """The same over TCP: each accepted connection gets one ``ip:port`` line, then is closed."""
    proc = host.spawn([sys.executable, "-c", _TCP_REFLECTOR, str(port), str(max_seconds)], f"tcprefl-{port}")
    host.lab.wait_for(lambda: "ready" in proc.log_text(), timeout=10, interval=0.05, what="tcp reflector")
    return proc


def udp_observe(
    host: Host, src_port: int, targets: Sequence[tuple[str, int]], timeout: float = 2.0
) -> list[tuple[str, int] | None]:
    """From one socket on ``src_port``: the source each reflector in ``targets`` saw (None: no answer)."""
    for ip, _ in targets:
        check_address(ip, f"{host.name}.udp_observe")
    argv = [sys.executable, "-c", _UDP_OBSERVE, str(src_port), str(timeout)]
    argv += [f"{ip}:{port}" for ip, port in targets]
    out = host.exec(argv, timeout=timeout * len(targets) + 10).stdout
    return [_endpoint(t) for t in json.loads(out.strip().splitlines()[-1])]


def tcp_observe(host: Host, dst: str, port: int, timeout: float = 2.0) -> tuple[str, int] | None:
    """Connect to a ``tcp_reflector``; the source it saw, or None when the connection failed."""
    check_address(dst, f"{host.name}.tcp_observe")
    out = host.exec([sys.executable, "-c", _TCP_OBSERVE, dst, str(port), str(timeout)], timeout=timeout + 10)
    return _endpoint(out.stdout.strip())


def punch(
    a: Host,
    a_port: int,
    b: Host,
    b_port: int,
    *,
    reflector: tuple[str, int],
    seconds: float = 3.0,
    learn: bool = False,
) -> bool:
    """Naive UDP hole punching between ``a`` and ``b`` (each behind its own router, or public).

    Each side learns its public endpoint from ``reflector`` (a ``udp_reflector``) using the port it will
    punch from; then both send to the other's endpoint at the same time for up to ``seconds``. True when
    each side received the other's datagrams (a direct flow both ways). No port guessing: behind a
    symmetric NAT the endpoint the reflector saw is not the one the peer gets, so this fails there.
    ``learn=True`` adds ICE's peer-reflexive step: once a datagram arrives, answer its real source.
    """
    (ea,) = udp_observe(a, a_port, [reflector])
    (eb,) = udp_observe(b, b_port, [reflector])
    if ea is None or eb is None:
        return False
    lab = a.lab
    lab._punch_seq += 1
    go = lab.artifacts_dir / f"punch-{lab._punch_seq}.go"
    procs = [
        me.spawn(
            [
                sys.executable,
                "-c",
                _PUNCH,
                str(port),
                *(peer[0], str(peer[1])),
                tag,
                str(seconds),
                str(int(learn)),
                str(go),
            ],
            f"punch-{tag}",
        )
        for me, port, peer, tag in ((a, a_port, eb, f"from-{a.name}"), (b, b_port, ea, f"from-{b.name}"))
    ]
    # Both sockets are bound before either sends: a slow interpreter start cannot eat the punch window.
    lab.wait_for(
        lambda: all("bound" in p.log_text() or not p.alive() for p in procs),
        timeout=15,
        what="punchers bound",
    )
    go.touch()
    lab.wait_for(lambda: not any(p.alive() for p in procs), timeout=seconds + 10, what="punch to finish")
    return all("done ok" in p.log_text() for p in procs)
