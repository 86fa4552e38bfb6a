"""The lab itself: network namespaces (hosts and routers), bridged segments, veth links, and cleanup.

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
``lab.nat_router(...)`` (see ``lab.nat``), ``lab.wg_ifname(tag) -> str`` and ``lab.wg_pair(a, b,
listen_port=51820) -> WgPair`` (see ``lab.wg``).
``lab.wait_for(predicate, timeout, interval=0.1, what="...") -> T``
    Bounded retry for READS only; returns the first truthy value, raises ``WaitTimeout`` naming ``what``.
``lab.assert_no_tracebacks()``
    Fails (``AssertionError``) naming each log that contains ``Traceback (most recent call last)``.
``lab.leftovers() -> list[str]``
    What this lab created that still exists (namespaces, live PIDs, wireguard sockets, resolv.conf files
    under /etc/netns); empty after exit.
``lab.namespaces``, ``lab.procs``, ``lab.wg_ifnames``
    What the lab created (for assertions).

``Host``: ``host.name``, ``host.netns``, ``host.addr`` / ``host.addr6`` (first LAN address),
``host.exec(argv, check=True, timeout=30.0, input=None, env=None) -> CompletedProcess[str]``,
``host.spawn(argv, log_name, env=None) -> Proc``, ``host.ping(dst, count=1, timeout=2.0) -> bool``,
``host.ping_stream(dst, interval=0.05, max_seconds=120.0, log_name=None) -> PingStream``,
``host.wg_latest_handshakes(ifname) -> dict[pubkey, unix]``, ``host.wg_peers(ifname) -> set[pubkey]``,
``host.resolv_conf(text=...) -> Path``: ``/etc/netns/<ns>/resolv.conf``, which ``ip netns exec`` mounts
over ``/etc/resolv.conf`` for every program started in the namespace after it exists (so a ghostlink
there replaces that file, never the host's); removed with the namespace.
``env`` given to ``exec``/``spawn`` is merged over ``os.environ``. ``ip netns exec`` uses this process's
PATH, so pass absolute paths for programs in the virtualenv (e.g. ``sys.executable``).

Names (``run_id`` in each) and cleanup on exit, failure or not, follow the rules in the ``lab`` package.

pytest helpers: ``netns_unavailable() -> str | None`` (why netns tests cannot run here, or None) and
``lab_for(request, tmp_path=None, name=None) -> Lab`` which names the artifacts dir
``test-artifacts/<sanitized test node id>`` under the repo root and skips the test when not root or a
tool is missing, unless ``GHOST_REQUIRE_NETNS=1`` (CI), in which case it fails with the reason.

Why one module of about 480 lines: :class:`Lab` records every namespace, link, process and file it
makes, and its teardown and :meth:`Lab.leftovers` must see all of them, so what creates them lives with
what removes them; the API listed above takes a tenth of the module. NAT routers (:mod:`lab.nat`),
WireGuard pairs (:mod:`lab.wg`), process handles (:mod:`lab.procs`), pings and waits live apart.
"""

from __future__ import annotations

import contextlib
import ipaddress
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

from lab import nat, wg
from lab.addrs import check_address, check_network
from lab.errors import LabError
from lab.ping import PingStream
from lab.procs import TRACEBACK_MARK, Proc, new_log_path, pid_alive, run, spawn_in_netns
from lab.wait import wait_for
from lab.wg import WG_RUN_DIR, WgPair

if TYPE_CHECKING:
    import pytest

T = TypeVar("T")

REPO_ROOT = Path(__file__).resolve().parent.parent
REQUIRED_TOOLS = ("ip", "wireguard-go", "wg", "ping")
NETNS_ETC = Path("/etc/netns")  # ip-netns(8): per-namespace files bind-mounted over /etc by `ip netns exec`
DEFAULT_RESOLV_CONF = "nameserver 192.0.2.53\nsearch lab.example\n"  # a documentation address: no server

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,30}$")


@dataclass
class Host:
    """A network namespace (a host or a router) of one lab."""

    lab: Lab
    name: str
    netns: str
    is_router: bool = False
    addrs: list[str] = field(default_factory=list)
    addrs6: list[str] = field(default_factory=list)

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
        return run(
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

    def resolv_conf(self, text: str = DEFAULT_RESOLV_CONF) -> Path:
        """This namespace's own resolv.conf (``/etc/netns/<ns>/resolv.conf``), written with ``text``;
        programs started in the namespace from now on see it as ``/etc/resolv.conf``."""
        return self.lab._resolv_conf(self, text)


@dataclass(frozen=True)
class Segment:
    name: str
    router: Host
    bridge: str
    network: ipaddress.IPv4Network
    router_ip: str
    network6: ipaddress.IPv6Network | None = None
    router_ip6: str | None = None


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
        self.etc_dirs: list[Path] = []  # /etc/netns/<ns> directories this lab made
        self._link_seq = 0
        self._wg_seq = 0
        self._pair_seq = 0
        self._punch_seq = 0  # numbers lab.nat.punch's start files
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
            print(f"\nlab[{self.name} {self.run_id}]: logs kept in {self.artifacts_dir}", file=sys.stderr)
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
            cp = run(["ip", "netns", "del", ns], check=False, timeout=15)
            if cp.returncode != 0 and Path("/var/run/netns", ns).exists():
                problems.append(f"ip netns del {ns}: {cp.stderr.strip()}")
        problems += [f"pid {p.pid} not reaped" for p in self.procs if not p.reap(timeout=10.0)]
        for ifname in self.wg_ifnames:
            sock = WG_RUN_DIR / f"{ifname}.sock"
            try:
                sock.unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                problems.append(f"remove {sock}: {exc}")
        for etc in self.etc_dirs:
            try:
                (etc / "resolv.conf").unlink(missing_ok=True)
                etc.rmdir()
            except FileNotFoundError:
                pass
            except OSError as exc:
                problems.append(f"remove {etc}: {exc}")
        return problems

    def _kill_ns_pids(self, ns: str) -> list[str]:
        """SIGKILL, by PID, whatever still runs inside our namespace (e.g. a wireguard-go child)."""
        cp = run(["ip", "netns", "pids", ns], check=False, timeout=10)
        pids = [int(p) for p in cp.stdout.split() if p.isdigit() and int(p) != os.getpid()]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5.0
        for _ in range(500):
            if not any(pid_alive(p) for p in pids) or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        return [f"pid {p} in {ns} survived SIGKILL" for p in pids if pid_alive(p)]

    def leftovers(self) -> list[str]:
        """Anything this lab made that still exists: namespaces, live processes, wireguard sockets."""
        out: list[str] = []
        existing = set(run(["ip", "netns", "list"], check=False).stdout.split())
        out += [f"netns {ns}" for ns in self.namespaces if ns in existing]
        out += [f"pid {p.pid}" for p in self.procs if pid_alive(p.pid)]
        out += [
            f"socket {WG_RUN_DIR / (i + '.sock')}"
            for i in self.wg_ifnames
            if (WG_RUN_DIR / f"{i}.sock").exists()
        ]
        out += [f"dir {d}" for d in self.etc_dirs if d.exists()]
        return out

    def _resolv_conf(self, host: Host, text: str) -> Path:
        etc = NETNS_ETC / host.netns
        if etc not in self.etc_dirs:
            etc.mkdir(parents=True, exist_ok=False)  # the namespace is ours: so must its directory be
            self.etc_dirs.append(etc)
        path = etc / "resolv.conf"
        path.write_text(text)
        return path

    # -- topology ----------------------------------------------------------------------------------

    def _new_ns(self, name: str, *, router: bool) -> Host:
        if not self._entered:
            raise LabError("use the Lab as a context manager (with Lab(...) as lab:) so it always cleans up")
        if not _NAME_RE.match(name) or name in self.hosts:
            raise LabError(f"host name must be unique and match {_NAME_RE.pattern}, got {name!r}")
        ns = f"ghost-{self.run_id}-{name}"
        run(["ip", "netns", "add", ns])
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
        net = check_network(cidr, f"segment {name}")
        if not isinstance(net, ipaddress.IPv4Network) or ipaddress.ip_address(router_ip) not in net:
            raise LabError(f"segment {name}: router_ip {router_ip} must be an IPv4 address in {cidr}")
        check_address(router_ip, f"segment {name}")
        net6: ipaddress.IPv6Network | None = None
        if cidr6 is not None:
            n6 = check_network(cidr6, f"segment {name}")
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
        run(
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
        return inner

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
        """A NATing router of ``kind`` (see ``lab.nat.NAT_KINDS``) between ``wan_segment`` and a new LAN."""
        return nat.nat_router(
            self,
            name,
            kind,
            wan_segment,
            wan_ip,
            lan_cidr=lan_cidr,
            lan_router_ip=lan_router_ip,
            tcp_port=tcp_port,
        )

    # -- processes ---------------------------------------------------------------------------------

    def _spawn(self, host: Host, argv: Sequence[str], log_name: str, env: Mapping[str, str] | None) -> Proc:
        proc = spawn_in_netns(host.netns, argv, new_log_path(self.artifacts_dir, host.name, log_name), env)
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
        """Retry a READ until it returns something truthy; bounded in time and in attempts (``lab.wait``)."""
        return wait_for(predicate, timeout, interval, what)

    # -- WireGuard ---------------------------------------------------------------------------------

    def wg_ifname(self, tag: str = "wg") -> str:
        """A WireGuard interface name unique on this machine (<= 15 chars), registered for cleanup."""
        self._wg_seq += 1
        base = f"wg{self.run_id}{self._wg_seq:x}"
        clean = re.sub(r"[^a-z0-9]", "", tag.lower())
        name = (base + clean)[:15]
        self.wg_ifnames.append(name)
        return name

    def wg_pair(self, a: Host, b: Host, listen_port: int = 51820) -> WgPair:
        """Hand-configure a wireguard-go tunnel between ``a`` and ``b`` (the benchmark reference)."""
        self._pair_seq += 1
        return wg.wg_pair(self, a, b, listen_port, seq=self._pair_seq)


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
