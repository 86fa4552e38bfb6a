"""IP forwarding on a router node (subnet router, exit node) or device gateway: on while it routes, restored
after.

A node that ghostmesh made the primary router for some prefix (``Node.primary_routes``) or an approved
exit node (``Node.exit_node``) must forward packets between the WireGuard interface and its other
interfaces. This module flips ``net.ipv4.ip_forward`` and ``net.ipv6.conf.all.forwarding`` (Linux
ip-sysctl.rst) on when the node becomes a router and writes back the values it found when it stops
being one or shuts down, so ghostlink leaves the host as it was. The sysctls are per network namespace.
Masquerading of the forwarded traffic lives in :mod:`ghostlink.nft` (the same table as the filter).

The values found are journaled (:mod:`ghostlink.hostjournal`) before the first write and forgotten once
written back; after a crash, :func:`restore` writes the journaled ones back, so that the next run finds
(and will restore) what the host had, not the "1" the crashed run left.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from pathlib import Path

from ghostlink.hostjournal import HostJournal

log = logging.getLogger(__name__)

SYSCTLS = (Path("/proc/sys/net/ipv4/ip_forward"), Path("/proc/sys/net/ipv6/conf/all/forwarding"))


def is_router(
    primary_routes: tuple[str, ...], exit_node: bool, device_prefixes: tuple[str, ...] = ()
) -> bool:
    """A subnet router, an exit node, or the gateway of devices (it forwards between them and the mesh)."""
    return bool(primary_routes) or exit_node or bool(device_prefixes)


def restore(saved: Mapping[str, str]) -> None:
    """Write each sysctl back to its saved value (blocking); OSError naming those that failed."""
    failed = []
    for path, value in saved.items():
        try:
            Path(path).write_text(value + "\n")
        except OSError as exc:
            failed.append(f"{path} to {value} ({exc.strerror})")
    if failed:
        raise OSError(f"cannot restore {', '.join(failed)}")


class Forwarding:
    """Turns forwarding on and back to what it was; the paths are injectable for tests."""

    def __init__(self, paths: tuple[Path, ...] = SYSCTLS, journal: HostJournal | None = None) -> None:
        self.paths = paths
        self._saved: dict[str, str] | None = None  # set while forwarding is on because of us
        self._journal = journal  # None: nothing journaled (tests that run it alone)

    @property
    def on(self) -> bool:
        return self._saved is not None

    def _enable(self) -> None:
        saved = {str(p): p.read_text().strip() for p in self.paths}
        if self._journal is not None:
            self._journal.record_sysctls(saved)
        for p in self.paths:
            p.write_text("1\n")
        self._saved = saved

    def _restore(self) -> None:
        saved, self._saved = self._saved, None
        try:
            restore(saved or {})
        except OSError as exc:
            log.warning("%s", exc)
            return  # still journaled: the next start tries again
        if self._journal is not None:
            self._journal.record_sysctls({})

    async def apply(self, router: bool) -> None:
        """Forwarding on while ``router``; restored when it no longer is. Idempotent."""
        if router and self._saved is None:
            await asyncio.to_thread(self._enable)
            log.info("this node routes for the mesh: IP forwarding on")
        elif not router and self._saved is not None:
            await asyncio.to_thread(self._restore)
            log.info("this node no longer routes for the mesh: IP forwarding restored")

    async def close(self) -> None:
        await self.apply(False)
