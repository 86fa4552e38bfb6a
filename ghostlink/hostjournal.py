"""The host journal: what ghostlink changed on the host, written down before it changes it, so that the
next start can undo what a run that died without cleaning up (SIGKILL, OOM, power loss) left behind.

One JSON document, ``<state_dir>/host.json``, 0600, replaced atomically (:mod:`ghostcore.files`)::

    {
      "version": 1,
      "boot_id": "528e2b7d-2277-4688-af92-97eed15ba245",   /proc/sys/kernel/random/boot_id
      "netns": "net:[4026531833]",                         the network namespace ghostlink ran in
      "interface": "ghost0",
      "wireguard_go": {"pid": 4242, "start_time": 1234567, "argv": ["wireguard-go", "-f", "ghost0"],
                       "socket": "/var/run/wireguard/ghost0.sock"},
      "kernel_interface": "ghost0",
      "nft_table": "ghostlink_ghost0",
      "sysctls": {"/proc/sys/net/ipv4/ip_forward": "0", "/proc/sys/net/ipv6/conf/all/forwarding": "0"},
      "exit_routing": {"table": 7277, "bypass": 5210, "suppress": 5230, "lookup": 5270},
      "resolv_conf": {"file": "/etc/resolv.conf", "backup": "/var/lib/ghostlink/resolv.conf.backup"}
    }

An entry is there exactly while its change may be: each part records it before making the change and
forgets it once the change is undone (wireguard-go's PID and start time, which exist only once it is
spawned, are recorded right after the spawn); with no entry left, the file goes. So a clean stop leaves no
file, and a file at start is what a previous run left (:mod:`ghostlink.leftovers` undoes it). The boot id
and the network namespace say where the changes live: after a reboot none is left, except a replaced
resolv.conf (a file: :mod:`ghostlink.dns_host` puts the original back from its backup). Addresses and routes
on the WireGuard interface are not journaled: they vanish with the interface.

Recording blocks (a write and two fsyncs); async callers call it in a thread. Reading validates every
field strictly, since what it names gets deleted, killed or written.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ghostcore.errors import ConfigError
from ghostcore.files import remove_file, replace_file

VERSION = 1
_IFNAME = re.compile(r"[A-Za-z0-9_.:-]{1,15}")
_TABLE = re.compile(r"ghostlink_[A-Za-z0-9_]{1,15}")
_ROUTE_TABLE = re.compile(r"ghostlink_bd(_[A-Za-z0-9_]{1,15})?")
_SYSCTL = re.compile(r"/proc/sys/net/[a-z0-9_/.]+")
_SYSCTL_VALUE = re.compile(r"-?[0-9]{1,10}")
_ABS_PATH = re.compile(r"/[A-Za-z0-9_./-]{1,4000}")
RESOLV_BACKUP = "resolv.conf.backup"  # the name of the original resolv.conf's copy in the state directory


@dataclass(frozen=True)
class Origin:
    """Where a run's host changes live: this boot, this network namespace."""

    boot_id: str
    netns: str

    @classmethod
    def here(cls) -> Origin:
        try:
            boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
            netns = os.readlink("/proc/self/ns/net")
        except OSError as exc:
            raise ConfigError(f"cannot read this boot's id or network namespace from /proc: {exc}") from None
        return cls(boot, netns)


@dataclass(frozen=True)
class WireGuardGoRecord:
    """The wireguard-go a run started: its PID, its start time (``/proc/<pid>/stat`` field 22, clock
    ticks after boot: with the PID, one process ever), its argv and its UAPI socket."""

    pid: int
    start_time: int
    argv: tuple[str, ...]
    socket: str


@dataclass(frozen=True)
class ExitRoutingRecord:
    """The routing table and ``ip rule`` priorities exit routing uses (:mod:`ghostlink.exitroute`)."""

    table: int
    bypass: int
    suppress: int
    lookup: int


@dataclass(frozen=True)
class ResolvConfRecord:
    """The resolv.conf ghostlink replaced and where the original is kept (:mod:`ghostlink.dns_host`)."""

    file: str
    backup: str


@dataclass(frozen=True)
class Journal:
    """One run's entries (each empty while that change is not on the host)."""

    origin: Origin
    interface: str
    wireguard_go: WireGuardGoRecord | None = None
    kernel_interface: str = ""
    nft_table: str = ""
    sysctls: dict[str, str] = field(default_factory=dict)  # path -> the value found before
    exit_routing: ExitRoutingRecord | None = None
    route_table: str = ""  # birthday probing's routes (ghostlink.traversal.birthday)
    resolv_conf: ResolvConfRecord | None = None

    @property
    def empty(self) -> bool:
        return not (
            self.wireguard_go
            or self.kernel_interface
            or self.nft_table
            or self.sysctls
            or self.exit_routing
            or self.route_table
            or self.resolv_conf
        )

    def summary(self) -> str:
        parts = []
        if self.wireguard_go is not None:
            parts.append(f"wireguard-go pid {self.wireguard_go.pid}")
        if self.kernel_interface:
            parts.append(f"interface {self.kernel_interface}")
        if self.nft_table:
            parts.append(f"nft table inet {self.nft_table}")
        if self.route_table:
            parts.append(f"nft table inet {self.route_table}")
        if self.exit_routing is not None:
            parts.append(f"ip rules and routing table {self.exit_routing.table}")
        if self.sysctls:
            parts.append("forwarding sysctls")
        if self.resolv_conf is not None:
            parts.append(self.resolv_conf.file)
        return ", ".join(parts) or "nothing"

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "version": VERSION,
            "boot_id": self.origin.boot_id,
            "netns": self.origin.netns,
            "interface": self.interface,
        }
        if self.wireguard_go is not None:
            w = self.wireguard_go
            doc["wireguard_go"] = {
                "pid": w.pid,
                "start_time": w.start_time,
                "argv": list(w.argv),
                "socket": w.socket,
            }
        if self.kernel_interface:
            doc["kernel_interface"] = self.kernel_interface
        if self.nft_table:
            doc["nft_table"] = self.nft_table
        if self.route_table:
            doc["route_table"] = self.route_table
        if self.sysctls:
            doc["sysctls"] = dict(self.sysctls)
        if self.exit_routing is not None:
            e = self.exit_routing
            doc["exit_routing"] = {
                "table": e.table,
                "bypass": e.bypass,
                "suppress": e.suppress,
                "lookup": e.lookup,
            }
        if self.resolv_conf is not None:
            doc["resolv_conf"] = {"file": self.resolv_conf.file, "backup": self.resolv_conf.backup}
        return doc


def _str(doc: dict[str, Any], key: str, pattern: re.Pattern[str] | None = None) -> str:
    value = doc[key]
    if not isinstance(value, str) or (pattern is not None and not pattern.fullmatch(value)):
        raise ValueError(f"bad {key}")
    return value


def _int(doc: dict[str, Any], key: str, low: int, high: int) -> int:
    value = doc[key]
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ValueError(f"bad {key}")
    return value


def _parse(doc: Any) -> Journal:
    if not isinstance(doc, dict) or doc.get("version") != VERSION:
        raise ValueError(f"not version {VERSION}")
    interface = _str(doc, "interface", _IFNAME)
    j = Journal(Origin(_str(doc, "boot_id"), _str(doc, "netns")), interface)
    if "wireguard_go" in doc:
        w = doc["wireguard_go"]
        if not isinstance(w, dict):
            raise ValueError("bad wireguard_go")
        argv = w["argv"]
        socket = _str(w, "socket")
        # only ever a wireguard-go in the foreground for this interface, and its socket
        if (
            not isinstance(argv, list)
            or not all(isinstance(a, str) for a in argv)
            or argv[1:] != ["-f", interface]
            or not socket.endswith(f"/{interface}.sock")
        ):
            raise ValueError("bad wireguard_go")
        rec = WireGuardGoRecord(
            _int(w, "pid", 2, 2**22), _int(w, "start_time", 0, 2**63), tuple(argv), socket
        )
        j = replace(j, wireguard_go=rec)
    if "kernel_interface" in doc:
        j = replace(j, kernel_interface=_str(doc, "kernel_interface", _IFNAME))
    if "nft_table" in doc:
        j = replace(j, nft_table=_str(doc, "nft_table", _TABLE))
    if "route_table" in doc:
        j = replace(j, route_table=_str(doc, "route_table", _ROUTE_TABLE))
    if "sysctls" in doc:
        s = doc["sysctls"]
        if not isinstance(s, dict):
            raise ValueError("bad sysctls")
        for key in s:  # only forwarding-style sysctls under /proc/sys/net, only numbers
            if not isinstance(key, str) or not _SYSCTL.fullmatch(key) or ".." in key:
                raise ValueError("bad sysctls")
            _str(s, key, _SYSCTL_VALUE)
        j = replace(j, sysctls=dict(s))
    if "exit_routing" in doc:
        e = doc["exit_routing"]
        if not isinstance(e, dict):
            raise ValueError("bad exit_routing")
        j = replace(
            j,
            exit_routing=ExitRoutingRecord(
                _int(e, "table", 1, 2**32 - 1),
                _int(e, "bypass", 1, 2**32 - 1),
                _int(e, "suppress", 1, 2**32 - 1),
                _int(e, "lookup", 1, 2**32 - 1),
            ),
        )
    if "resolv_conf" in doc:
        r = doc["resolv_conf"]
        if not isinstance(r, dict):
            raise ValueError("bad resolv_conf")
        # only ever a resolv.conf, restored from ghostlink's own backup file
        file, backup = _str(r, "file", _ABS_PATH), _str(r, "backup", _ABS_PATH)
        if Path(file).name != "resolv.conf" or Path(backup).name != RESOLV_BACKUP or ".." in file + backup:
            raise ValueError("bad resolv_conf")
        j = replace(j, resolv_conf=ResolvConfRecord(file, backup))
    return j


def read_journal(path: Path) -> Journal | None:
    """What a previous run left journaled at ``path`` (None: no journal, it stopped cleanly)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the journal of host changes ({exc.strerror})") from None
    try:
        return _parse(json.loads(text))
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(
            f"{path}: not a journal of host changes this ghostlink can read ({exc}); undo by hand what "
            "a previous run may have left (its nft table, ip rules 5210-5270, forwarding sysctls), then "
            "remove the file"
        ) from None


class HostJournal:
    """This run's journal at ``path``: each ``record_*`` replaces that entry (empty: forgets it) and
    returns once the file says so on disk. Thread-safe; every call blocks on file I/O."""

    def __init__(self, path: Path, interface: str, origin: Origin) -> None:
        self.path = path
        self._doc = Journal(origin, interface)
        self._lock = threading.Lock()

    def record_wireguard_go(self, rec: WireGuardGoRecord | None) -> None:
        self._update(lambda j: replace(j, wireguard_go=rec))

    def record_kernel_interface(self, name: str) -> None:
        self._update(lambda j: replace(j, kernel_interface=name))

    def record_nft_table(self, name: str) -> None:
        self._update(lambda j: replace(j, nft_table=name))

    def record_route_table(self, name: str) -> None:
        self._update(lambda j: replace(j, route_table=name))

    def record_sysctls(self, originals: dict[str, str]) -> None:
        self._update(lambda j: replace(j, sysctls=dict(originals)))

    def record_exit_routing(self, rec: ExitRoutingRecord | None) -> None:
        self._update(lambda j: replace(j, exit_routing=rec))

    def record_resolv_conf(self, rec: ResolvConfRecord | None) -> None:
        self._update(lambda j: replace(j, resolv_conf=rec))

    def _update(self, change: Callable[[Journal], Journal]) -> None:
        with self._lock:
            doc = change(self._doc)
            if doc == self._doc:
                return
            try:
                if doc.empty:
                    remove_file(self.path)
                else:
                    replace_file(self.path, (json.dumps(doc.to_json(), indent=2) + "\n").encode())
            except OSError as exc:
                raise ConfigError(
                    f"{self.path}: cannot write the journal of host changes ({exc.strerror}); "
                    "check the state directory"
                ) from None
            self._doc = doc
