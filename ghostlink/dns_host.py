"""Pointing the host's resolver at the node resolver, and putting it back.

Two ways, chosen at start (:func:`choose_host`):

* **systemd-resolved** running (its varlink socket exists, ``resolvectl`` is installed, and ghostlink
  runs in the host's network namespace, where resolved lives): per-link settings on the WireGuard
  interface with ``resolvectl`` (:class:`ResolvedHost`): the resolver addresses as the link's DNS
  servers, the base domain, split domains and extra records' names as routing domains (``~domain``),
  the search domains as search domains, and ``~.`` (every name) only when the map names nameservers.
  resolved forgets a link's settings when the link goes, so a crash leaves nothing behind; a clean stop
  reverts them (``resolvectl revert``).
* **resolv.conf** otherwise (:class:`ResolvConfHost`): the original is copied to
  ``<state_dir>/resolv.conf.backup`` (0600) and journaled (:mod:`ghostlink.hostjournal`) before ghostlink
  writes its own (``nameserver 100.100.100.100`` and the search list, marked by its first line). A clean
  stop writes the original back and forgets the journal entry; after a crash the next start does it
  (:func:`restore_leftover`, from :mod:`ghostlink.leftovers`), even after a reboot, since the file
  survives one. The original goes back only over a file that is still ghostlink's: if someone replaced
  it meanwhile (a DHCP client, an admin), theirs is kept. The node resolver forwards names it does not
  own to the upstreams the original named (unless the map names nameservers).

The file is written in place, not replaced by a rename, because it may be a mount point: ``ip netns
exec`` bind-mounts ``/etc/netns/<ns>/resolv.conf`` over it, and a rename onto a mount point fails.
A symlink (e.g. to resolved's stub file when resolved is not running) is replaced by a file and put back
as the same symlink. The pure parts (:func:`render_resolv_conf`, :func:`parse_nameservers`,
:func:`resolvectl_commands`) are unit-tested.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ghostcore.addr import AddressError, HostPort, normalize_ip
from ghostcore.dnsname import DNS_PORT, RESOLVER_V4, RESOLVER_V6
from ghostcore.errors import ConfigError, Unavailable
from ghostcore.files import read_private, remove_file, replace_file
from ghostlink.dns_core import Zone
from ghostlink.hostjournal import RESOLV_BACKUP, HostJournal, ResolvConfRecord

log = logging.getLogger(__name__)

RESOLV_CONF = Path("/etc/resolv.conf")
MARKER = "# Written by ghostlink"
RESOLVED_SOCKET = Path("/run/systemd/resolve/io.systemd.Resolve")
MAX_UPSTREAMS = 8
_MAX_FILE = 64 * 1024


def render_resolv_conf(search: tuple[str, ...], backup: str) -> str:
    """ghostlink's resolv.conf (resolv.conf(5)): its resolver, then the search list."""
    lines = [
        f"{MARKER}: its resolver answers the mesh's names and forwards the rest.",
        f"# The original is kept in {backup} and is put back when ghostlink stops.",
        f"nameserver {RESOLVER_V4}",
    ]
    if search:
        lines.append("search " + " ".join(search))
    return "\n".join(lines) + "\n"


def is_ours(text: str) -> bool:
    return text.startswith(MARKER)


def parse_nameservers(text: str) -> tuple[HostPort, ...]:
    """The ``nameserver`` addresses of a resolv.conf, port 53, without the node resolver's own addresses
    (forwarding to itself would loop) and without zone IDs; at most ``MAX_UPSTREAMS``."""
    out: list[HostPort] = []
    for line in text.splitlines():
        words = line.split()
        if len(words) < 2 or words[0] != "nameserver":
            continue
        try:
            ip = normalize_ip(words[1], "nameserver")
        except AddressError:
            continue
        if ip in (RESOLVER_V4, RESOLVER_V6) or (ip, DNS_PORT) in out:
            continue
        out.append((ip, DNS_PORT))
    return tuple(out[:MAX_UPSTREAMS])


def resolvectl_commands(ifname: str, zone: Zone, servers: tuple[str, ...]) -> list[list[str]]:
    """The ``resolvectl`` calls that route the zone's domains on ``ifname`` to ``servers``."""
    # a plain domain is a search domain and a routing domain at once; "~" makes it routing only
    domains = [
        *zone.search_domains,
        *(f"~{d}" for d in zone.routing_domains() if d not in zone.search_domains),
    ]
    if zone.nameservers:
        domains.append("~.")
    return [
        ["resolvectl", "dns", ifname, *servers],
        ["resolvectl", "domain", ifname, *dict.fromkeys(domains)],
        ["resolvectl", "default-route", ifname, "yes" if zone.nameservers else "no"],
    ]


class HostDns(Protocol):
    """How the host is pointed at the node resolver (:class:`ResolvConfHost`, :class:`ResolvedHost`)."""

    mode: str

    def detail(self) -> str: ...

    def previous_upstreams(self) -> tuple[HostPort, ...]:
        """Where the host sent queries before (the node resolver's fallback)."""

    async def apply(self, zone: Zone) -> None: ...

    async def restore(self) -> None: ...


@dataclass(frozen=True)
class _Backup:
    link: str = ""  # the original was a symlink to this
    text: str = ""  # ... or a file with this text
    mode: int = 0o644

    def to_bytes(self) -> bytes:
        doc = {"version": 1, "link": self.link} if self.link else {"version": 1, "text": self.text}
        if not self.link:
            doc["mode"] = self.mode
        return (json.dumps(doc) + "\n").encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> _Backup:
        doc = json.loads(data)
        if not isinstance(doc, dict) or doc.get("version") != 1:
            raise ValueError("not a version 1 backup")
        link, text, mode = doc.get("link", ""), doc.get("text", ""), doc.get("mode", 0o644)
        if not isinstance(link, str) or not isinstance(text, str) or not isinstance(mode, int):
            raise TypeError("bad field")
        if bool(link) == ("text" in doc) or not 0 <= mode <= 0o777:
            raise ValueError("a backup is a link or a text")
        return cls(link, text, mode)


def _write_in_place(path: Path, text: str) -> None:
    """Overwrite ``path``'s contents (it may be a bind mount: no rename), flushed to disk."""
    with path.open("r+", encoding="utf-8") as f:
        f.seek(0)
        f.write(text)
        f.truncate()
        f.flush()
        os.fsync(f.fileno())


def _put_back(file: Path, backup: _Backup) -> None:
    if backup.link:
        tmp = file.with_name(f".{file.name}.ghostlink")
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(backup.link)
        tmp.replace(file)
    else:
        _write_in_place(file, backup.text)


def _restore(file: Path, backup_path: Path) -> str:
    """Put the original back over ghostlink's file (not over someone else's); drop the backup. Blocking.
    Returns what was done, for the log."""
    try:
        current = file.read_text(encoding="utf-8", errors="replace")[:_MAX_FILE]
    except FileNotFoundError:
        current = ""
    if not backup_path.exists():
        return "no backup to restore from" if is_ours(current) else "nothing to restore"
    if not is_ours(current):
        remove_file(backup_path)
        return f"{file} was replaced by someone else since; kept theirs"
    try:
        backup = _Backup.from_bytes(read_private(backup_path, "resolv.conf backup"))
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{backup_path}: not a resolv.conf backup ghostlink can read ({exc})") from None
    _put_back(file, backup)
    remove_file(backup_path)
    return f"{file} restored"


def restore_leftover(rec: ResolvConfRecord) -> None:
    """After a crash: put the original resolv.conf back from the backup a previous run journaled."""
    try:
        what = _restore(Path(rec.file), Path(rec.backup))
    except OSError as exc:
        raise Unavailable(f"restoring {rec.file} from {rec.backup} failed: {exc}") from None
    log.warning("the previous run's resolver settings: %s", what)


class ResolvConfHost:
    """ghostlink's own ``/etc/resolv.conf`` while it runs; see the module docstring."""

    mode = "resolv.conf"

    def __init__(self, journal: HostJournal, state_dir: Path, file: Path = RESOLV_CONF) -> None:
        self._journal = journal
        self._file = file
        self._backup = state_dir / RESOLV_BACKUP
        self._written = ""  # what ghostlink wrote last ("": the original is in place)
        self._upstreams: tuple[HostPort, ...] | None = None

    def detail(self) -> str:
        if not self._written:
            return f"{self._file} untouched"
        return f"{self._file} written; the original is in {self._backup}"

    def previous_upstreams(self) -> tuple[HostPort, ...]:
        if self._upstreams is None:
            try:
                self._upstreams = parse_nameservers(self._file.read_text(encoding="utf-8")[:_MAX_FILE])
            except (OSError, UnicodeError):
                self._upstreams = ()
        return self._upstreams

    async def apply(self, zone: Zone) -> None:
        text = render_resolv_conf(zone.search_domains, str(self._backup))
        if text != self._written:
            await asyncio.to_thread(self._apply, text)

    def _apply(self, text: str) -> None:
        if not self._written:
            self.previous_upstreams()  # read the original before it is replaced
            if self._file.is_symlink():
                backup = _Backup(link=os.readlink(self._file))
            else:
                backup = _Backup(
                    text=self._file.read_text(encoding="utf-8")[:_MAX_FILE],
                    mode=self._file.stat().st_mode & 0o777,
                )
            replace_file(self._backup, backup.to_bytes())
            self._journal.record_resolv_conf(ResolvConfRecord(str(self._file), str(self._backup)))
            if backup.link:
                replace_file(self._file, text.encode(), mode=0o644)  # replaces the link, not its target
            else:
                _write_in_place(self._file, text)
            log.info("%s now points at the node resolver (the original is in %s)", self._file, self._backup)
        else:
            _write_in_place(self._file, text)
        self._written = text

    async def restore(self) -> None:
        if not self._written:
            return
        what = await asyncio.to_thread(_restore, self._file, self._backup)
        self._journal.record_resolv_conf(None)
        self._written = ""
        log.info("resolver settings: %s", what)


class ResolvedHost:
    """Per-link DNS settings on the WireGuard interface in systemd-resolved; see the module docstring."""

    mode = "systemd-resolved"

    def __init__(self, ifname: str, servers: tuple[str, ...]) -> None:
        self._ifname = ifname
        self._servers = servers
        self._applied: list[list[str]] = []

    def detail(self) -> str:
        return f"link {self._ifname}" if self._applied else "not configured"

    def previous_upstreams(self) -> tuple[HostPort, ...]:
        return ()  # resolved keeps answering every name the link's routing domains do not take

    async def apply(self, zone: Zone) -> None:
        commands = resolvectl_commands(self._ifname, zone, self._servers)
        if commands == self._applied:
            return
        for argv in commands:
            await _run(argv)
        self._applied = commands

    async def restore(self) -> None:
        if self._applied:
            await _run(["resolvectl", "revert", self._ifname])
            self._applied = []


async def _run(argv: list[str]) -> None:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    _, err = await proc.communicate()
    if proc.returncode != 0:
        raise Unavailable(f"{' '.join(argv)} failed: {err.decode(errors='replace').strip()[:200]}")


def _in_host_netns() -> bool:
    try:
        return os.readlink("/proc/self/ns/net") == os.readlink("/proc/1/ns/net")
    except OSError:
        return False


def _same_file(a: Path, b: Path) -> bool:
    try:
        sa, sb = a.stat(), b.stat()
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def choose_host(
    ifname: str, journal: HostJournal, state_dir: Path, servers: tuple[str, ...]
) -> HostDns | None:
    """systemd-resolved when it runs and serves this network namespace, else resolv.conf; None (the host
    is left alone, with a warning) when ghostlink runs in another network namespace but sees the host's
    own resolv.conf: that file belongs to the host's namespace, whose resolver is not ours to change
    (``ip netns exec`` shows a namespace its own file only if ``/etc/netns/<ns>/resolv.conf`` exists)."""
    in_host = _in_host_netns()
    if RESOLVED_SOCKET.exists() and shutil.which("resolvectl") and in_host:
        return ResolvedHost(ifname, servers)
    if not in_host and _same_file(RESOLV_CONF, Path("/proc/1/root") / RESOLV_CONF.relative_to("/")):
        log.warning(
            "%s is the host's own file but ghostlink runs in another network namespace: leaving it alone "
            "(create /etc/netns/<namespace>/resolv.conf before starting ghostlink with ip netns exec)",
            RESOLV_CONF,
        )
        return None
    return ResolvConfHost(journal, state_dir)
