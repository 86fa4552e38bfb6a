"""A ghost* mesh on a lab: ghostmesh in a "server" namespace, ghostlink nodes on LANs, ghostctl to drive them.

Shared by the netns end-to-end tests, the README demo (``scripts/demo.py``) and the benchmarks, so all three
exercise the product exactly as a user would: the real console scripts, real wireguard-go, real sockets.

Topology (``Mesh.build``)::

                          router (forwards v4 + v6, no NAT)
            ┌──────────────────┼─────────────────────┐
      pub 192.0.2.0/24   lan_a 198.51.100.0/24   lan_b 203.0.113.0/24
            │                  │                     │
     srv 192.0.2.1        nodes on LAN A         nodes on LAN B
     (ghostmesh :7777)

ghostctl runs in the test's own namespace and reaches ghostmesh over its admin unix socket and each node's
ghostlink over that node's local socket (unix sockets on a path are reachable from every namespace).
Nodes are found by property (name, overlay address), never by position.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lab.errors import LabError
from lab.netns import NETNS_ETC, Host, Lab, Segment, lab_for
from lab.procs import Proc

if TYPE_CHECKING:
    import pytest

BIN = Path(sys.executable).parent
GHOSTMESH, GHOSTLINK, GHOSTCTL = (str(BIN / n) for n in ("ghostmesh", "ghostlink", "ghostctl"))
SERVER_IP = "192.0.2.1"
SERVER_PORT = 7777


@dataclass
class Node:
    """One ghostlink node: its namespace, process, sockets and the name ghostmesh gave it."""

    name: str
    host: Host
    ifname: str
    socket: Path
    state_dir: Path
    proc: Proc | None = None
    listen_port: int = 41641

    def status(self, mesh: Mesh) -> dict[str, Any]:
        out: dict[str, Any] = mesh.ctl("--socket", str(self.socket), "status")
        return out

    def peers(self, mesh: Mesh) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = mesh.ctl("--socket", str(self.socket), "peers")
        return out

    def addresses(self, mesh: Mesh) -> tuple[str, str]:
        addrs = self.status(mesh)["addresses"]
        v4 = next(a for a in addrs if ":" not in a)
        v6 = next(a for a in addrs if ":" in a)
        return v4, v6


@dataclass
class Mesh:
    lab: Lab
    workdir: Path
    router: Host
    srv: Host
    segments: dict[str, Segment]
    nodes: dict[str, Node] = field(default_factory=dict)
    server: Proc | None = None
    _lan_next: dict[str, int] = field(default_factory=dict)
    # Where ghostmesh listens (lab.natmesh moves it to the one TCP port a UDP-blocking firewall lets out).
    server_ip: str = SERVER_IP
    server_port: int = SERVER_PORT
    # Extra environment for every ghost* process of this mesh; a benchmark sets PYTHONPATH to another
    # checkout of the code (an earlier commit) to measure it beside this one.
    env: dict[str, str] = field(default_factory=dict)

    @classmethod
    def build(cls, lab: Lab, workdir: Path) -> Mesh:
        router = lab.router("rtr")
        segments = {
            "pub": lab.segment("pub", "192.0.2.0/24", router, "192.0.2.254"),
            "lan_a": lab.segment("lana", "198.51.100.0/24", router, "198.51.100.254"),
            "lan_b": lab.segment("lanb", "203.0.113.0/24", router, "203.0.113.254"),
        }
        srv = lab.host("srv")
        lab.attach(srv, segments["pub"], SERVER_IP)
        workdir.mkdir(parents=True, exist_ok=True)
        return cls(lab, workdir, router, srv, segments)

    # --- ghostmesh -------------------------------------------------------------------------------------
    @property
    def admin_socket(self) -> Path:
        return self.workdir / "mesh" / "admin.sock"

    def write_server_config(self, extra: str = "", server_keys: str = "") -> Path:
        """ghostmesh.toml for the lab; ``server_keys`` go into [server], ``extra`` tables are appended."""
        path = self.workdir / "ghostmesh.toml"
        path.write_text(
            f'[server]\nbind = "{self.server_ip}:{self.server_port}"\nadmin_socket = "{self.admin_socket}"\n'
            f'state_dir = "{self.workdir / "mesh"}"\n{server_keys}\n[mapper]\nbatch_delay = "50ms"\n\n'
            f'[log]\nlevel = "debug"\n{extra}'
        )
        return path

    def start_server(self, extra_config: str = "", server_keys: str = "") -> Proc:
        config = self.write_server_config(extra_config, server_keys)
        self.server = self.srv.spawn([GHOSTMESH, "--config", str(config)], "ghostmesh", env=self.env or None)
        self.lab.wait_for(
            self._server_answers, timeout=15, interval=0.2, what="ghostmesh answers on its admin socket"
        )
        return self.server

    def _server_answers(self) -> bool:
        if self.server is not None and not self.server.alive():
            raise AssertionError(f"ghostmesh exited early; see {self.server.log_path}")
        return self.ctl_rc("users", "list") == 0

    def _ctl_env(self) -> dict[str, str]:
        # ghostctl's own 5 s per call is for people; the lab's reads run on a loaded 2-core machine where a
        # daemon may be descheduled for seconds, and are bounded by the 15 s subprocess timeout anyway.
        return {**os.environ, "GHOSTCTL_TIMEOUT": "12", **self.env}

    def ctl_rc(self, *args: str) -> int:
        cmd = [GHOSTCTL, "--server", f"unix:{self.admin_socket}", *args]
        return subprocess.run(
            cmd, capture_output=True, timeout=15, check=False, env=self._ctl_env()
        ).returncode

    def ctl_text(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run ghostctl as a person would (table output); its exit code, stdout and stderr, unchecked."""
        cmd = [GHOSTCTL, "--server", f"unix:{self.admin_socket}", *args]
        return subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, check=False, env=self._ctl_env()
        )

    def ctl(self, *args: str, expect_rc: int = 0) -> Any:
        """Run ghostctl (JSON output) in the test's namespace; returns the parsed document."""
        cmd = [GHOSTCTL, "--server", f"unix:{self.admin_socket}", "--output", "json", *args]
        res = subprocess.run(
            cmd, capture_output=True, text=True, timeout=15, check=False, env=self._ctl_env()
        )
        if res.returncode != expect_rc:
            raise AssertionError(f"{' '.join(args)}: exit {res.returncode}, stderr: {res.stderr.strip()}")
        return json.loads(res.stdout) if expect_rc == 0 and res.stdout.strip() else res.stderr.strip()

    def authkey(self, *flags: str) -> str:
        secret: str = self.ctl("authkeys", "create", *flags)["secret"]
        return secret

    def pin(self) -> str:
        """ghostmesh's TLS key pin (``sha256:…``), as ``ghostctl server pin`` prints it."""
        pin: str = self.ctl("server", "pin")["tls_pin"]
        return pin

    def server_nodes(self) -> dict[str, dict[str, Any]]:
        return {n["name"]: n for n in self.ctl("nodes", "list")}

    # --- ghostlink -------------------------------------------------------------------------------------
    def add_host(self, name: str, lan: str) -> Host:
        host = self.lab.host(name)
        seg = self.segments[lan]
        nxt = self._lan_next.get(lan, 10)
        self._lan_next[lan] = nxt + 1
        base = str(seg.network.network_address).rsplit(".", 1)[0]
        self.lab.attach(host, seg, f"{base}.{nxt}")
        return host

    def join(
        self, name: str, lan: str, auth: str, *extra: str, host: Host | None = None, server: str | None = None
    ) -> Node:
        """Start ``ghostlink join`` for a new node; returns once ghostctl status shows it connected."""
        node = self.prepare_node(name, lan, host=host)
        self.start_node(node, "join", "--auth", auth, *extra, server=server)
        self.wait_connected(node)
        return node

    def prepare_node(self, name: str, lan: str, host: Host | None = None) -> Node:
        host = host or self.add_host(name, lan)
        if not (NETNS_ETC / host.netns / "resolv.conf").exists():
            # before ghostlink starts: it may replace /etc/resolv.conf, which must be this namespace's own
            host.resolv_conf()
        node = Node(
            name=name,
            host=host,
            ifname=self.lab.wg_ifname(name[:4]),
            socket=self.workdir / name / "ghostlink.sock",
            state_dir=self.workdir / name / "state",
        )
        self.nodes[name] = node
        return node

    def start_node(self, node: Node, verb: str, *extra: str, server: str | None = None) -> Proc:
        """``ghostlink <verb>`` for ``node``, talking to ``server`` (default: ghostmesh itself)."""
        server = server or f"{self.server_ip}:{self.server_port}"
        argv = [
            GHOSTLINK, verb, "--server", server, "--hostname", node.name,
            "--state-dir", str(node.state_dir), "--interface", node.ifname,
            "--listen-port", str(node.listen_port), "--socket", str(node.socket),
            "--backend", "wireguard-go", "--log-level", "debug", *extra,
        ]  # fmt: skip
        env = {"GHOSTLINK_CONTROL_RECONNECT_MAX": "1s", **self.env}
        node.proc = node.host.spawn(argv, "ghostlink", env=env)
        return node.proc

    def wait_connected(self, node: Node, timeout: float = 20) -> dict[str, Any]:
        def connected() -> dict[str, Any] | None:
            if node.proc is not None and not node.proc.alive():
                raise AssertionError(f"ghostlink {node.name} exited; see {node.proc.log_path}")
            try:
                st = node.status(self)
            except AssertionError:
                return None
            return st if st.get("connected") else None

        st: dict[str, Any] = self.lab.wait_for(
            connected, timeout=timeout, interval=0.2, what=f"{node.name} connects"
        )
        return st

    def wg_peer_keys(self, node: Node) -> set[str]:
        return node.host.wg_peers(node.ifname)

    def wireguard_go_pid(self, node: Node) -> int:
        """The PID of ``node``'s wireguard-go: the child of its ghostlink running ``wireguard-go -f <if>``.

        Read from ``/proc/<ghostlink pid>/task/*/children`` (by PID, never by name); LabError when there
        is none.
        """
        if node.proc is None or not node.proc.alive():
            raise LabError(f"{node.name}: ghostlink is not running")
        children: list[int] = []
        for task in Path(f"/proc/{node.proc.pid}/task").iterdir():
            with contextlib.suppress(OSError):  # a thread that just ended
                children += [int(p) for p in (task / "children").read_text().split()]
        for pid in children:
            with contextlib.suppress(OSError):
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
                if Path(argv[0]).name == "wireguard-go" and argv[1:3] == ["-f", node.ifname]:
                    return pid
        raise LabError(f"{node.name}: no wireguard-go among the children {children} of ghostlink")

    def crash_node(self, node: Node) -> int:
        """SIGKILL ``node``'s ghostlink by PID, and only it, as a crash would; returns the PID of the
        wireguard-go it had started (in a session of its own, that one is left running)."""
        wg_pid = self.wireguard_go_pid(node)
        assert node.proc is not None
        node.proc.kill()
        return wg_pid


@contextlib.contextmanager
def module_mesh(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, name: str, *, start: bool = True
) -> Iterator[Mesh]:
    """The standard topology for one netns test module, ghostmesh started unless ``start=False``.

    On the way out: no traceback in any daemon's log, then nothing the lab made is left behind.
    """
    lab = lab_for(request, name=name)
    with lab:
        mesh = Mesh.build(lab, Path(tmp_path_factory.mktemp(name)))
        if start:
            mesh.start_server()
        yield mesh
        lab.assert_no_tracebacks()
    assert lab.leftovers() == []
