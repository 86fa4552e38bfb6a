"""netlab: a small library for network-namespace tests, the demo and the benchmarks.

It owns building throw-away networks out of Linux network namespaces, bridges and veth pairs, running
processes inside them, and tearing all of it down again, even when the test fails. Import it as
``from tests.netlab import Lab``.

Rules it enforces (the project's network test rules)
---------------------------------------------------
* Only documentation ranges for "public"/LAN segments (RFC 5737: 192.0.2.0/24, 198.51.100.0/24,
  203.0.113.0/24; RFC 3849: 2001:db8::/32 for IPv6 LANs) and the overlay ranges 100.64.0.0/10 and
  fd7a:115c:a1e0::/48. Any other address given to ``segment``/``attach``/``ping``/``wg_pair`` raises
  ``LabError``, so a typo can never send packets to a real network.
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

API
---
``Lab(name: str, artifacts_dir: Path)``
    Context manager. ``lab.run_id`` (6 hex chars), ``lab.artifacts_dir``.
``lab.router(name) -> Host`` / ``lab.host(name) -> Host``
    A new namespace with ``lo`` up and IPv6 DAD off; a router also forwards IPv4 and IPv6.
``lab.segment(name, cidr, router, router_ip, *, cidr6=None, router_ip6=None) -> Segment``
    A LAN: a bridge inside ``router``'s namespace holding ``router_ip`` (and ``router_ip6``).
``lab.attach(host, segment, ip, ip6=None, *, default_route=True) -> str``
    A veth from ``host`` into the segment's bridge; sets the address(es) and default route(s) via the
    router. Returns the interface name inside ``host``. Hosts on different segments of the same router
    reach each other (routed, no NAT).
``lab.wg_ifname(tag) -> str``
    A unique WireGuard interface name, registered for socket cleanup.
``lab.wg_pair(a, b, listen_port=51820) -> WgPair``
    A hand-configured wireguard-go tunnel between two attached hosts (keys from ``wg genkey``, overlay
    addresses from 100.64.0.0/10 and fd7a:115c:a1e0::/48, /32 and /128 plus a route to the other end).
    ``pair.a`` / ``pair.b`` are ``WgEnd(host, ifname, addr, addr6, public_key, listen_port, proc)``.
    The reference benchmarks compare the mesh against.
``lab.wait_for(predicate, timeout, interval=0.1, what="...") -> T``
    Bounded retry for READS only; returns the first truthy value, raises ``WaitTimeout`` naming ``what``.
``lab.assert_no_tracebacks()``
    Fails (``AssertionError``) naming each log that contains ``Traceback (most recent call last)``.
``lab.leftovers() -> list[str]``
    What this lab created that still exists (namespaces, live PIDs, wireguard sockets); empty after exit.
``lab.namespaces``, ``lab.procs``, ``lab.wg_ifnames``
    What the lab created (for assertions).

``Host``: ``host.name``, ``host.netns``, ``host.addr`` / ``host.addr6`` (first LAN address),
``host.exec(argv, check=True, timeout=30.0, input=None, env=None) -> CompletedProcess[str]``,
``host.spawn(argv, log_name, env=None) -> Proc``, ``host.ping(dst, count=1, timeout=2.0) -> bool``,
``host.ping_stream(dst, interval=0.05, max_seconds=120.0, log_name=None) -> PingStream``,
``host.wg_latest_handshakes(ifname) -> dict[pubkey, unix]``, ``host.wg_peers(ifname) -> set[pubkey]``.
``env`` given to ``exec``/``spawn`` is merged over ``os.environ``. ``ip netns exec`` uses this process's
PATH, so pass absolute paths for programs in the virtualenv (e.g. ``sys.executable``).

``Proc``: ``proc.pid``, ``proc.log_path``, ``proc.stop(grace=5.0) -> int | None``, ``proc.kill()``,
``proc.alive()``, ``proc.log_text()``.

``PingStream``: ``stream.stop() -> PingStats(transmitted, received, missing_seqs)`` with
``stats.lost`` and ``stats.loss``: ping runs with SIGINT to stop it so it prints its summary.

NAT lab (issue 3)
-----------------
``lab.nat_router(name, kind, wan_segment, wan_ip, *, lan_cidr, lan_router_ip, tcp_port=None)
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

    ``NAT_KINDS`` lists the kinds. Module helpers (all bounded, all check addresses):
    ``udp_reflector(host, port=3478, max_seconds=300.0) -> Proc`` (a STUN-like echo: answers each datagram
    with the ``ip:port`` it came from), ``tcp_reflector(host, port, max_seconds=300.0) -> Proc`` (same over
    TCP, one line per connection), ``udp_observe(host, src_port, targets, timeout=2.0) -> list[tuple[str,
    int] | None]`` (what each reflector saw from ``host``'s ``src_port``), ``tcp_observe(host, dst, port,
    timeout=2.0) -> tuple[str, int] | None`` and
    ``punch(a, a_port, b, b_port, *, reflector, seconds=3.0, learn=False) -> bool`` (naive hole
    punching: learn each side's public endpoint from the reflector, then both send to each other's
    endpoint at once; True when each side received the other's datagrams).

pytest helpers: ``netns_unavailable() -> str | None`` (why netns tests cannot run here, or None) and
``lab_for(request, tmp_path=None, name=None) -> Lab`` which names the artifacts dir
``test-artifacts/<sanitized test node id>`` under the repo root and skips the test when not root or a
tool is missing, unless ``GHOST_REQUIRE_NETNS=1`` (CI), in which case it fails with the reason.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    import pytest

T = TypeVar("T")

REPO_ROOT = Path(__file__).resolve().parent.parent
WG_RUN_DIR = Path("/var/run/wireguard")
TRACEBACK_MARK = "Traceback (most recent call last)"
REQUIRED_TOOLS = ("ip", "wireguard-go", "wg", "ping")

# RFC 5737 / RFC 3849 documentation ranges for LANs; RFC 6598 CGNAT and the project's ULA for overlays.
ALLOWED_NETWORKS = tuple(
    ipaddress.ip_network(n)
    for n in (
        "192.0.2.0/24",
        "198.51.100.0/24",
        "203.0.113.0/24",
        "2001:db8::/32",
        "100.64.0.0/10",
        "fd7a:115c:a1e0::/48",
    )
)
OVERLAY4 = ipaddress.ip_network("100.64.0.0/10")
OVERLAY6 = ipaddress.ip_network("fd7a:115c:a1e0::/48")

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,30}$")
_STOP_POLL = 0.02


class LabError(RuntimeError):
    """The lab was misused (bad name, forbidden address) or a setup command failed."""


class WaitTimeout(AssertionError):
    """``Lab.wait_for`` ran out of time; an AssertionError so pytest reports it as a test failure."""


def check_address(addr: str, where: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """The parsed address if it lies in an allowed range, else ``LabError`` (never talk to real networks)."""
    try:
        ip = ipaddress.ip_address(addr.split("%", 1)[0])
    except ValueError as exc:
        raise LabError(f"{where}: not an IP address: {addr!r}") from exc
    if not any(ip.version == n.version and ip in n for n in ALLOWED_NETWORKS):
        raise LabError(
            f"{where}: {addr} is outside the documentation/overlay ranges the lab may use "
            f"({', '.join(str(n) for n in ALLOWED_NETWORKS)})"
        )
    return ip


def _check_network(cidr: str, where: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        net = ipaddress.ip_network(cidr, strict=True)
    except ValueError as exc:
        raise LabError(f"{where}: not a network prefix: {cidr!r}") from exc
    if not any(net.version == n.version and net.subnet_of(n) for n in ALLOWED_NETWORKS):  # type: ignore[arg-type]
        raise LabError(f"{where}: {cidr} is outside the documentation/overlay ranges the lab may use")
    return net


def _run(
    argv: Sequence[str],
    *,
    check: bool = True,
    timeout: float = 30.0,
    input: str | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    try:
        cp = subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
            env={**os.environ, **env} if env is not None else None,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"command timed out after {timeout}s: {' '.join(argv)}") from exc
    if check and cp.returncode != 0:
        raise LabError(
            f"command failed (exit {cp.returncode}): {' '.join(argv)}: {(cp.stderr or cp.stdout).strip()}"
        )
    return cp


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers kill(0); treat it as gone (its parent will reap it).
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


class Proc:
    """A process started inside a namespace, logging stdout+stderr to ``log_path``."""

    def __init__(self, popen: subprocess.Popen[bytes], log_path: Path, argv: Sequence[str]) -> None:
        self.popen = popen
        self.pid = popen.pid
        self.log_path = log_path
        self.argv = list(argv)

    def __repr__(self) -> str:
        return f"Proc(pid={self.pid}, argv={self.argv[:3]!r}, log={self.log_path.name})"

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: int) -> None:
        """Send ``sig`` to this PID (never by name); a no-op when it has exited."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def stop(self, grace: float = 5.0) -> int | None:
        """SIGTERM, wait up to ``grace`` seconds, then SIGKILL. Returns the exit code."""
        self.signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self.kill()
        return self.popen.returncode

    def kill(self, wait: float = 5.0) -> None:
        """SIGKILL this PID and reap it (bounded)."""
        self.signal(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):  # SIGKILL cannot be ignored; bound anyway
            self.popen.wait(timeout=wait)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


@dataclass(frozen=True)
class PingStats:
    transmitted: int
    received: int
    missing_seqs: tuple[int, ...]

    @property
    def lost(self) -> int:
        return self.transmitted - self.received

    @property
    def loss(self) -> float:
        return self.lost / self.transmitted if self.transmitted else 1.0


_SUMMARY_RE = re.compile(r"(\d+) packets transmitted, (\d+) (?:packets )?received")
_SEQ_RE = re.compile(r"icmp_seq=(\d+)")


class PingStream:
    """A background ``ping -i interval`` whose loss is read when it is stopped (SIGINT -> summary)."""

    def __init__(self, proc: Proc) -> None:
        self.proc = proc

    def stop(self, grace: float = 5.0) -> PingStats:
        self.proc.signal(signal.SIGINT)
        try:
            self.proc.popen.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        text = self.proc.log_text()
        m = _SUMMARY_RE.search(text)
        if m is None:
            raise LabError(f"ping printed no summary; see {self.proc.log_path}")
        sent, got = int(m.group(1)), int(m.group(2))
        seen = {int(s) for s in _SEQ_RE.findall(text)}
        missing = tuple(s for s in range(1, sent + 1) if s not in seen)
        return PingStats(sent, got, missing)


@dataclass
class Host:
    """A network namespace (a host or a router) of one lab."""

    lab: Lab
    name: str
    netns: str
    is_router: bool = False
    addrs: list[str] = field(default_factory=list)
    addrs6: list[str] = field(default_factory=list)
    _ifcount: int = 0

    @property
    def addr(self) -> str:
        """The first IPv4 LAN address given by ``attach`` (or router_ip for a router)."""
        if not self.addrs:
            raise LabError(f"{self.name} has no IPv4 address yet")
        return self.addrs[0]

    @property
    def addr6(self) -> str:
        if not self.addrs6:
            raise LabError(f"{self.name} has no IPv6 address yet")
        return self.addrs6[0]

    def exec(
        self,
        argv: Sequence[str],
        check: bool = True,
        timeout: float = 30.0,
        input: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside this namespace (``ip netns exec``), bounded by ``timeout``."""
        return _run(
            ["ip", "netns", "exec", self.netns, *argv], check=check, timeout=timeout, input=input, env=env
        )

    def spawn(self, argv: Sequence[str], log_name: str, env: Mapping[str, str] | None = None) -> Proc:
        """Start ``argv`` in this namespace; stdout+stderr go to ``<artifacts>/<host>-<log_name>.log``.

        ``ip netns exec`` execs the command after setns, so ``proc.pid`` is the program itself.
        """
        return self.lab._spawn(self, argv, log_name, env)

    def ping(self, dst: str, count: int = 1, timeout: float = 2.0) -> bool:
        """True when ``dst`` answered; one bounded ``ping`` run (-c count -W timeout)."""
        ip = check_address(dst, f"{self.name}.ping")
        fam = "-6" if ip.version == 6 else "-4"
        wait = max(1, int(timeout + 0.999))
        cp = self.exec(
            ["ping", fam, "-n", "-q", "-c", str(count), "-W", str(wait), "-i", "0.2", dst],
            check=False,
            timeout=count * 0.2 + wait + 5,
        )
        return cp.returncode == 0

    def ping_stream(
        self, dst: str, interval: float = 0.05, max_seconds: float = 120.0, log_name: str | None = None
    ) -> PingStream:
        """Ping ``dst`` every ``interval`` s until ``stop()`` (or ``max_seconds``, a hard bound)."""
        ip = check_address(dst, f"{self.name}.ping_stream")
        fam = "-6" if ip.version == 6 else "-4"
        argv = ["ping", fam, "-n", "-i", f"{interval:g}", "-W", "1", "-w", f"{int(max_seconds)}", dst]
        return PingStream(self.spawn(argv, log_name or f"ping-{dst.replace(':', '_')}"))

    def wg_latest_handshakes(self, ifname: str) -> dict[str, int]:
        """Peer public key -> latest handshake (unix seconds, 0 = never) from ``wg show``."""
        out = self.exec(["wg", "show", ifname, "latest-handshakes"], timeout=10).stdout
        return {k: int(v) for k, v in (line.split() for line in out.splitlines() if line.strip())}

    def wg_peers(self, ifname: str) -> set[str]:
        """Public keys of the peers configured on ``ifname``."""
        out = self.exec(["wg", "show", ifname, "peers"], timeout=10).stdout
        return {line.strip() for line in out.splitlines() if line.strip()}


@dataclass(frozen=True)
class Segment:
    name: str
    router: Host
    bridge: str
    network: ipaddress.IPv4Network
    router_ip: str
    network6: ipaddress.IPv6Network | None = None
    router_ip6: str | None = None


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


class Lab:
    """A set of namespaces, links and processes that lives exactly as long as its ``with`` block."""

    def __init__(self, name: str, artifacts_dir: Path) -> None:
        if not _NAME_RE.match(name):
            raise LabError(f"lab name must match {_NAME_RE.pattern}, got {name!r}")
        self.name = name
        self.artifacts_dir = Path(artifacts_dir)
        self.run_id = secrets.token_hex(3)
        self.namespaces: list[str] = []
        self.hosts: dict[str, Host] = {}
        self.segments: dict[str, Segment] = {}
        self.procs: list[Proc] = []
        self.wg_ifnames: list[str] = []
        self._link_seq = 0
        self._wg_seq = 0
        self._pair_seq = 0
        self._punch_seq = 0
        self._entered = False

    # -- lifecycle ---------------------------------------------------------------------------------

    def __enter__(self) -> Lab:
        self.artifacts_dir.mkdir(parents=True, exist_ok=True)
        self._entered = True
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        problems = self.close()
        if exc_type is not None:
            print(f"\nnetlab[{self.name} {self.run_id}]: logs kept in {self.artifacts_dir}", file=sys.stderr)
        if problems and exc_type is None:
            raise LabError(f"lab {self.run_id} cleanup incomplete: {'; '.join(problems)}")

    def close(self) -> list[str]:
        """Tear everything down (idempotent). Returns what could not be cleaned, for the caller to report."""
        problems: list[str] = []
        for proc in reversed(self.procs):
            try:
                proc.stop(grace=5.0)
            except Exception as exc:
                problems.append(f"stop pid {proc.pid}: {exc}")
        for ns in reversed(self.namespaces):
            problems.extend(self._kill_ns_pids(ns))
            cp = _run(["ip", "netns", "del", ns], check=False, timeout=15)
            if cp.returncode != 0 and Path("/var/run/netns", ns).exists():
                problems.append(f"ip netns del {ns}: {cp.stderr.strip()}")
        for ifname in self.wg_ifnames:
            sock = WG_RUN_DIR / f"{ifname}.sock"
            try:
                sock.unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                problems.append(f"remove {sock}: {exc}")
        return problems

    def _kill_ns_pids(self, ns: str) -> list[str]:
        """SIGKILL, by PID, whatever still runs inside our namespace (e.g. a wireguard-go child)."""
        cp = _run(["ip", "netns", "pids", ns], check=False, timeout=10)
        pids = [int(p) for p in cp.stdout.split() if p.isdigit() and int(p) != os.getpid()]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5.0
        for _ in range(500):
            if not any(_pid_alive(p) for p in pids) or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        return [f"pid {p} in {ns} survived SIGKILL" for p in pids if _pid_alive(p)]

    def leftovers(self) -> list[str]:
        """Anything this lab made that still exists: namespaces, live processes, wireguard sockets."""
        out: list[str] = []
        existing = set(_run(["ip", "netns", "list"], check=False).stdout.split())
        out += [f"netns {ns}" for ns in self.namespaces if ns in existing]
        out += [f"pid {p.pid}" for p in self.procs if _pid_alive(p.pid)]
        out += [
            f"socket {WG_RUN_DIR / (i + '.sock')}"
            for i in self.wg_ifnames
            if (WG_RUN_DIR / f"{i}.sock").exists()
        ]
        return out

    # -- topology ----------------------------------------------------------------------------------

    def _new_ns(self, name: str, *, router: bool) -> Host:
        if not self._entered:
            raise LabError("use the Lab as a context manager (with Lab(...) as lab:) so it always cleans up")
        if not _NAME_RE.match(name) or name in self.hosts:
            raise LabError(f"host name must be unique and match {_NAME_RE.pattern}, got {name!r}")
        ns = f"ghost-{self.run_id}-{name}"
        _run(["ip", "netns", "add", ns])
        self.namespaces.append(ns)
        host = Host(self, name, ns, is_router=router)
        self.hosts[name] = host
        sysctls = ["net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0"]
        if router:
            sysctls += ["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"]
        host.exec(["sysctl", "-q", "-w", *sysctls])
        host.exec(["ip", "link", "set", "lo", "up"])
        return host

    def host(self, name: str) -> Host:
        return self._new_ns(name, router=False)

    def router(self, name: str) -> Host:
        return self._new_ns(name, router=True)

    def segment(
        self,
        name: str,
        cidr: str,
        router: Host,
        router_ip: str,
        *,
        cidr6: str | None = None,
        router_ip6: str | None = None,
    ) -> Segment:
        if name in self.segments:
            raise LabError(f"segment {name!r} exists already")
        net = _check_network(cidr, f"segment {name}")
        if not isinstance(net, ipaddress.IPv4Network) or ipaddress.ip_address(router_ip) not in net:
            raise LabError(f"segment {name}: router_ip {router_ip} must be an IPv4 address in {cidr}")
        check_address(router_ip, f"segment {name}")
        net6: ipaddress.IPv6Network | None = None
        if cidr6 is not None:
            n6 = _check_network(cidr6, f"segment {name}")
            if not isinstance(n6, ipaddress.IPv6Network) or router_ip6 is None:
                raise LabError(f"segment {name}: cidr6 must be IPv6 and needs router_ip6")
            if ipaddress.ip_address(router_ip6) not in n6:
                raise LabError(f"segment {name}: router_ip6 {router_ip6} is not in {cidr6}")
            net6 = n6
        bridge = f"b{self.run_id}{len(self.segments)}"
        router.exec(["ip", "link", "add", bridge, "type", "bridge"])
        router.exec(["ip", "addr", "add", f"{router_ip}/{net.prefixlen}", "dev", bridge])
        router.addrs.append(router_ip)
        if net6 is not None and router_ip6 is not None:
            router.exec(["ip", "-6", "addr", "add", f"{router_ip6}/{net6.prefixlen}", "dev", bridge, "nodad"])
            router.addrs6.append(router_ip6)
        router.exec(["ip", "link", "set", bridge, "up"])
        seg = Segment(name, router, bridge, net, router_ip, net6, router_ip6)
        self.segments[name] = seg
        return seg

    def attach(
        self, host: Host, segment: Segment, ip: str, ip6: str | None = None, *, default_route: bool = True
    ) -> str:
        """Wire ``host`` into ``segment``; returns the interface name inside ``host``."""
        check_address(ip, f"attach {host.name}")
        if ipaddress.ip_address(ip) not in segment.network:
            raise LabError(f"attach {host.name}: {ip} is not in segment {segment.name} ({segment.network})")
        if ip6 is not None:
            check_address(ip6, f"attach {host.name}")
            if segment.network6 is None or ipaddress.ip_address(ip6) not in segment.network6:
                raise LabError(f"attach {host.name}: {ip6} is not in segment {segment.name}'s IPv6 prefix")
        self._link_seq += 1
        inner = f"v{self.run_id}{self._link_seq}h"
        outer = f"v{self.run_id}{self._link_seq}r"
        # Created directly inside both namespaces: nothing ever appears in the root namespace.
        _run(
            [
                "ip", "link", "add", inner, "netns", host.netns,
                "type", "veth", "peer", "name", outer, "netns", segment.router.netns,
            ]
        )  # fmt: skip
        r = segment.router
        r.exec(["ip", "link", "set", outer, "master", segment.bridge])
        r.exec(["ip", "link", "set", outer, "up"])
        host.exec(["ip", "addr", "add", f"{ip}/{segment.network.prefixlen}", "dev", inner])
        host.addrs.append(ip)
        if ip6 is not None and segment.network6 is not None:
            host.exec(
                ["ip", "-6", "addr", "add", f"{ip6}/{segment.network6.prefixlen}", "dev", inner, "nodad"]
            )
            host.addrs6.append(ip6)
        host.exec(["ip", "link", "set", inner, "up"])
        if default_route:
            host.exec(["ip", "route", "replace", "default", "via", segment.router_ip, "dev", inner])
            if ip6 is not None and segment.router_ip6 is not None:
                host.exec(
                    ["ip", "-6", "route", "replace", "default", "via", segment.router_ip6, "dev", inner]
                )
        host._ifcount += 1
        return inner

    # -- NAT routers (issue 3) ---------------------------------------------------------------------

    def nat_router(
        self,
        name: str,
        kind: str,
        wan_segment: Segment,
        wan_ip: str,
        *,
        lan_cidr: str,
        lan_router_ip: str,
        tcp_port: int | None = None,
    ) -> tuple[Host, Segment]:
        """A NATing router of ``kind`` (see NAT_KINDS) between ``wan_segment`` and a new LAN behind it."""
        if kind == "none":
            raise LabError("nat_router: kind 'none' is a public host: lab.attach it to the public segment")
        if kind not in NAT_KINDS:
            raise LabError(f"nat_router {name}: unknown kind {kind!r}; use one of {', '.join(NAT_KINDS)}")
        if (kind == "udp_blocked") != (tcp_port is not None):
            raise LabError(f"nat_router {name}: tcp_port is required for udp_blocked and only for it")
        _check_network(lan_cidr, f"nat_router {name}")
        check_address(wan_ip, f"nat_router {name}")
        router = self.router(name)
        wan = self.attach(router, wan_segment, wan_ip)
        lan = self.segment(f"{name}-lan", lan_cidr, router, lan_router_ip)
        router.exec(["nft", "-f", "-"], input=_nat_ruleset(kind, wan, lan.bridge, tcp_port))
        return router, lan

    # -- processes ---------------------------------------------------------------------------------

    def _spawn(self, host: Host, argv: Sequence[str], log_name: str, env: Mapping[str, str] | None) -> Proc:
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", log_name)
        path = self.artifacts_dir / f"{host.name}-{safe}.log"
        n = 1
        while path.exists() and n < 1000:
            n += 1
            path = self.artifacts_dir / f"{host.name}-{safe}.{n}.log"
        full = ["ip", "netns", "exec", host.netns, *argv]
        with path.open("wb") as log:
            popen = subprocess.Popen(
                full,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **env} if env is not None else None,
                start_new_session=True,  # a Ctrl-C of the test run does not hit them before cleanup
            )
        proc = Proc(popen, path, argv)
        self.procs.append(proc)
        return proc

    def assert_no_tracebacks(self) -> None:
        bad = [str(p.log_path) for p in self.procs if TRACEBACK_MARK in p.log_text()]
        if bad:
            raise AssertionError(f"Python traceback in process log(s): {', '.join(sorted(set(bad)))}")

    def wait_for(
        self,
        predicate: Callable[[], T],
        timeout: float,
        interval: float = 0.1,
        what: str = "condition",
    ) -> T:
        """Retry a READ until it returns something truthy; bounded in time and in attempts."""
        deadline = time.monotonic() + timeout
        attempts = int(timeout / max(interval, 0.001)) + 2
        last: T | None = None
        for _ in range(attempts):
            last = predicate()
            if last:
                return last
            if time.monotonic() >= deadline:
                break
            time.sleep(max(0.0, min(interval, deadline - time.monotonic())))
        raise WaitTimeout(f"timed out after {timeout}s waiting for {what} (last value: {last!r})")

    # -- WireGuard ---------------------------------------------------------------------------------

    def wg_ifname(self, tag: str = "wg") -> str:
        """A WireGuard interface name unique on this machine (<= 15 chars), registered for cleanup."""
        self._wg_seq += 1
        base = f"wg{self.run_id}{self._wg_seq:x}"
        clean = re.sub(r"[^a-z0-9]", "", tag.lower())
        name = (base + clean)[:15]
        self.wg_ifnames.append(name)
        return name

    def _wg_keypair(self) -> tuple[str, str]:
        priv = _run(["wg", "genkey"]).stdout.strip()
        pub = _run(["wg", "pubkey"], input=priv + "\n").stdout.strip()
        return priv, pub

    def _start_wireguard_go(self, host: Host, ifname: str) -> Proc:
        env = dict(os.environ)
        # Foreground (-f) so the PID we hold is wireguard-go itself; no kernel module here anyway.
        env["WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD"] = "1"
        proc = host.spawn(["wireguard-go", "-f", ifname], f"wireguard-go-{ifname}", env=env)
        sock = WG_RUN_DIR / f"{ifname}.sock"
        self.wait_for(
            lambda: sock.exists() or not proc.alive(), timeout=10, interval=0.05, what=f"{sock} to appear"
        )
        if not proc.alive():
            raise LabError(f"wireguard-go for {ifname} exited; see {proc.log_path}")
        return proc

    def wg_pair(self, a: Host, b: Host, listen_port: int = 51820) -> WgPair:
        """Hand-configure a wireguard-go tunnel between ``a`` and ``b`` (the benchmark reference)."""
        self._pair_seq += 1
        k = self._pair_seq
        addrs = [
            (str(OVERLAY4.network_address + 2 * k - 1), str(OVERLAY6.network_address + 2 * k - 1)),
            (str(OVERLAY4.network_address + 2 * k), str(OVERLAY6.network_address + 2 * k)),
        ]
        hosts = (a, b)
        ifnames = [self.wg_ifname(f"p{k}a"), self.wg_ifname(f"p{k}b")]
        keys = [self._wg_keypair(), self._wg_keypair()]
        procs = [self._start_wireguard_go(h, i) for h, i in zip(hosts, ifnames, strict=True)]
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


# -- NAT lab (issue 3) -----------------------------------------------------------------------------

NAT_KINDS = ("none", "easy", "hard", "udp_blocked")


def _nat_ruleset(kind: str, wan: str, lan: str, tcp_port: int | None) -> str:
    """The nftables table of one NAT router (lives in its namespace, so it dies with it)."""
    # "random" hashes the destination into the port choice: a new public port per destination (symmetric).
    masq = "masquerade random" if kind == "hard" else "masquerade"
    if kind == "udp_blocked":
        out_rule = f'iifname "{lan}" oifname "{wan}" tcp dport {tcp_port} accept'
    else:
        out_rule = f'iifname "{lan}" oifname "{wan}" accept'
    return f"""
table ip ghostnat {{
    chain nat_out {{
        type nat hook postrouting priority srcnat; policy accept;
        oifname "{wan}" {masq}
    }}
    chain filter_fwd {{
        type filter hook forward priority filter; policy drop;
        {out_rule}
        iifname "{wan}" oifname "{lan}" ct state established,related accept
    }}
    chain filter_in {{
        type filter hook input priority filter; policy accept;
        # Unsolicited input on the WAN leg is dropped before conntrack confirms it, so no [UNREPLIED]
        # inbound entry can steal the port a later outgoing punch wants (see platform-notes.md).
        iifname "{wan}" ct state established,related accept
        iifname "{wan}" drop
    }}
}}
"""


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


# -- pytest helpers --------------------------------------------------------------------------------


def netns_unavailable() -> str | None:
    """Why netns tests cannot run on this machine, or None when they can."""
    if os.geteuid() != 0:
        return "netns tests need root"
    missing = [t for t in REQUIRED_TOOLS if shutil.which(t) is None]
    if missing:
        return f"netns tests need these tools on PATH: {', '.join(missing)}"
    if not Path("/dev/net/tun").exists():
        return "netns tests need /dev/net/tun (wireguard-go)"
    return None


def lab_for(request: pytest.FixtureRequest, tmp_path: Path | None = None, name: str | None = None) -> Lab:
    """A Lab for the current test (use it as ``with lab_for(request) as lab:``).

    Artifacts go to ``<repo>/test-artifacts/<sanitized node id>`` (emptied first). When netns tests cannot
    run here, the test is skipped, unless ``GHOST_REQUIRE_NETNS=1`` (CI), which makes it fail instead.
    ``tmp_path`` is the fallback for artifacts if the repo root is not writable.
    """
    import pytest  # noqa: PLC0415 - only test modules need pytest

    why = netns_unavailable()
    if why is not None:
        if os.environ.get("GHOST_REQUIRE_NETNS") == "1":
            pytest.fail(f"GHOST_REQUIRE_NETNS=1 but {why}", pytrace=False)
        pytest.skip(why)
    node_id = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.nodeid).strip("_")[:150]
    base = REPO_ROOT / "test-artifacts"
    if tmp_path is not None and not os.access(REPO_ROOT, os.W_OK):
        base = tmp_path / "test-artifacts"
    artifacts = base / node_id
    if artifacts.exists():
        shutil.rmtree(artifacts)
    lab_name = name or re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower()).strip("-")[:30] or "lab"
    if not lab_name[0].isalnum():
        lab_name = "lab" + lab_name[:27]
    return Lab(lab_name, artifacts)
