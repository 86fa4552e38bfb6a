"""Relay regions for a lab mesh: one relay server per region (ghostgate, or Debian's coturn), by PID only.

``RegionSpec`` is one region as ghostmesh's ``[[relay.regions]]`` lists it, plus which server runs it
(``software``: "ghostgate", or "coturn" for STUN + TURN only: ``coturn_region()``). A ``Region`` is that
server running in a lab host: ``region.start()`` returns once it answers STUN (and accepts TCP on its relay
port, if any); ``region.kill()`` SIGKILLs it by PID. Every region shares ``SECRET`` (the TURN REST and relay
secret) with ghostmesh's ``[relay]`` section. A ghostgate region given ``control`` (ghostmesh's address and
TLS pin; ``lab.natmesh`` sets it once ghostmesh runs) watches ghostmesh for the nodes allowed on it
(``[control]``, named after the region: every lab gate shares the machine's host name), so a deleted node
loses its relay access within seconds; the log is at debug level, so refused AUTHs and closed connections
show in it.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from lab.netns import Host
from lab.procs import Proc

# ghostmesh listens on the relays' TCP port too: behind "udp_blocked" only TCP to that port gets out.
RELAY_TCP_PORT = 3478
STUN_PORT = 3478
QUIC_PORT = 3479  # ghostgate's default: listen port + 1 (QUIC cannot share the STUN/TURN port)
SECRET = "natmesh-relay-secret"
REALM = "ghostmesh"

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
    control: tuple[str, str] | None = None  # (ghostmesh host:port, its TLS pin): the gate's [control]

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
        control = ""
        if self.control is not None:
            server, pin = self.control
            control = f'[control]\nserver = "{server}"\npin = "{pin}"\nname = "{s.name}"\n'
        conf.write_text(
            f'[relay]\nlisten = "{s.ip}:{s.stun_port}"\n'
            f'[turn]\nsecret = "{SECRET}"\nrealm = "{REALM}"\nrelay_address = "{s.ip}"\n'
            f'{control}[log]\nlevel = "debug"\n'
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


def coturn_available() -> bool:
    return shutil.which("turnserver") is not None
