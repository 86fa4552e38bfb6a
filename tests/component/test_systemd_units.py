"""contrib/systemd: each unit passes ``systemd-analyze verify`` and keeps its hardening.

``verify`` checks that ExecStart's binary exists, so each unit is verified as a temporary copy whose
``/usr/local/bin/<program>`` points at this environment's console script (the same entry point an install
puts there). Anything verify prints is a failure, not only a non-zero exit: it reports unknown
directives and bad values as warnings. Then the directives that make each unit what it is are checked
one by one (a unit that verifies but lost, say, its capability bounding set must still fail here).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UNITS = ROOT / "contrib" / "systemd"
ANALYZE = shutil.which("systemd-analyze") or "/usr/bin/systemd-analyze"
PROGRAMS = ("ghostmesh", "ghostgate", "ghostlink")


def directives(text: str) -> dict[str, list[str]]:
    """``Key`` -> every value it is given (systemd units repeat keys), over all sections."""
    out: dict[str, list[str]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        out.setdefault(key.strip(), []).append(value.strip())
    return out


def _console_script(program: str) -> Path:
    script = Path(sys.executable).parent / program
    if not script.exists():
        pytest.skip(f"{script}: no console script for {program}; install the project (pip install -e .)")
    return script


@pytest.mark.parametrize("program", PROGRAMS)
def test_unit_verifies(program: str, tmp_path: Path) -> None:
    if not Path(ANALYZE).exists():
        pytest.skip("systemd-analyze is not installed (Debian: apt-get install systemd); cannot verify units")
    unit = UNITS / f"{program}.service"
    text = unit.read_text()
    assert f"/usr/local/bin/{program}" in text
    copy = tmp_path / unit.name
    copy.write_text(text.replace(f"/usr/local/bin/{program}", str(_console_script(program))))
    res = subprocess.run(
        [ANALYZE, "verify", "--man=no", str(copy)], capture_output=True, text=True, timeout=60, check=False
    )
    assert res.returncode == 0, res.stderr
    assert res.stderr.strip() == "", f"systemd-analyze verify reported: {res.stderr}"


COMMON = {
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "NoNewPrivileges": "yes",
    "Restart": "on-failure",
    "SystemCallArchitectures": "native",
}


@pytest.mark.parametrize("program", PROGRAMS)
def test_common_hardening(program: str) -> None:
    d = directives((UNITS / f"{program}.service").read_text())
    for key, value in COMMON.items():
        assert d.get(key) == [value], f"{program}: {key}={value} expected, got {d.get(key)}"
    assert d["StateDirectory"] == [program]
    assert d["StateDirectoryMode"] == ["0700"]
    assert program in d["RuntimeDirectory"][0].split()
    assert "@system-service" in d["SystemCallFilter"]
    assert int(d["LimitNOFILE"][0]) >= 16384 + 256, "room for the default connection limits"
    assert d["ExecStart"][0].startswith(f"/usr/local/bin/{program} ")


def test_ghostmesh_has_no_capability_and_its_own_user() -> None:
    d = directives((UNITS / "ghostmesh.service").read_text())
    assert d["CapabilityBoundingSet"] == [""]
    assert d["AmbientCapabilities"] == [""]
    assert d["User"] == ["ghostmesh"]
    assert d["RestrictAddressFamilies"] == ["AF_UNIX AF_INET AF_INET6"]
    assert d["ExecStart"] == ["/usr/local/bin/ghostmesh --config /etc/ghostmesh/ghostmesh.toml"]
    assert d["ExecReload"] == ["/bin/kill -HUP $MAINPID"]  # SIGHUP re-reads [dns]
    assert "~@privileged" in d["SystemCallFilter"]
    # the open-file limit is raised with setrlimit: the filter must not forbid it
    assert not any("@resources" in f for f in d["SystemCallFilter"] if f.startswith("~"))


def test_ghostgate_has_no_capability_and_its_own_user() -> None:
    d = directives((UNITS / "ghostgate.service").read_text())
    assert d["CapabilityBoundingSet"] == [""]
    assert d["AmbientCapabilities"] == [""]
    assert d["User"] == ["ghostgate"]
    assert d["RestrictAddressFamilies"] == ["AF_UNIX AF_INET AF_INET6"]
    assert not any("@resources" in f for f in d["SystemCallFilter"] if f.startswith("~"))


def test_ghostlink_has_networking_capabilities_only_and_the_tun_device() -> None:
    d = directives((UNITS / "ghostlink.service").read_text())
    assert set(d["CapabilityBoundingSet"][0].split()) == {"CAP_NET_ADMIN", "CAP_NET_RAW"}
    assert set(d["AmbientCapabilities"][0].split()) == {"CAP_NET_ADMIN", "CAP_NET_RAW"}
    assert set(d["RestrictAddressFamilies"][0].split()) == {"AF_NETLINK", "AF_UNIX", "AF_INET", "AF_INET6"}
    assert d["DevicePolicy"] == ["closed"]
    assert d["DeviceAllow"] == ["/dev/net/tun rw"]
    assert set(d["RuntimeDirectory"][0].split()) == {"ghostlink", "wireguard"}
    assert d["ExecStart"] == ["/usr/local/bin/ghostlink run"]
    assert d["ConditionPathExists"] == ["/var/lib/ghostlink/node.json"]
    assert "ProtectKernelTunables" not in d, "forwarding sysctls are written by routers and exit nodes"
    assert "PrivateDevices" not in d, "it would hide /dev/net/tun"


def test_the_units_name_the_daemons_default_paths() -> None:
    """The unit's directories are where the programs look by default (no flag needed)."""
    from ghostlink.config import ControlConfig, NodeConfig  # noqa: PLC0415
    from ghostmesh.config import ServerConfig  # noqa: PLC0415

    assert ServerConfig().state_dir == "/var/lib/ghostmesh"
    assert ServerConfig().admin_socket.replace("/var/run/", "/run/").startswith("/run/ghostmesh/")
    assert NodeConfig().state_dir == "/var/lib/ghostlink"
    assert ControlConfig().socket.replace("/var/run/", "/run/").startswith("/run/ghostlink/")
