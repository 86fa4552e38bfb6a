"""Undoing what a previous run left on the host: run at start, before anything is set up.

A run that stopped cleanly leaves no journal (:mod:`ghostlink.hostjournal`). One that did not (SIGKILL,
OOM, a power cut) leaves one naming what it had changed, and :func:`undo_leftovers` undoes it, the
process first (it still forwards packets and holds the interface's name and socket), then the rest in
the reverse order of setting up, each step by what its owner knows of it:

1. the wireguard-go it started, if that very process still runs (:func:`ghostlink.wg.wggo.reap_leftover`:
   PID, start time and argv checked; SIGTERM, then SIGKILL), and its stale UAPI socket; its TUN, with the
   addresses and routes on it, goes with the process;
2. the exit routing ``ip rule``s and the routes of its table (:func:`ghostlink.exitroute.remove_leftovers`);
3. the forwarding sysctls, written back to the values found before (:func:`ghostlink.forwarding.restore`);
4. the nft table (:func:`ghostlink.nft.delete_table`);
5. a kernel WireGuard interface, if it is still one (:func:`ghostlink.wg.kernel.remove_leftover`);
6. the resolv.conf it replaced (:func:`ghostlink.dns_host.restore_leftover`): a file, so even after a
   reboot, but only from the network namespace the journal names (``ip netns exec`` shows each namespace
   its own ``/etc/netns/<ns>/resolv.conf`` as ``/etc/resolv.conf``).

Then the journal goes, and the run starts clean. What lives in the network namespace (steps 2-5) is
undone only from the namespace the journal names, and nothing is after a reboot (the boot id differs:
none of it survived). A step that fails stops the start with its one-line error and keeps the journal, so
the next start tries again.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from ghostcore.errors import Unavailable
from ghostcore.files import remove_file
from ghostlink import dns_host, exitroute, forwarding, nft
from ghostlink.hostjournal import Journal, Origin, read_journal
from ghostlink.wg import kernel, wggo

log = logging.getLogger(__name__)


async def undo_leftovers(path: Path, here: Origin) -> None:
    """Undo what the journal at ``path`` names, then remove it; nothing to do without one."""
    prev = await asyncio.to_thread(read_journal, path)
    if prev is None:
        return
    log.warning(
        "the previous ghostlink on %s did not stop cleanly; undoing what it left: %s",
        prev.interface,
        prev.summary(),
    )
    if prev.resolv_conf is not None and prev.origin.netns == here.netns:
        await asyncio.to_thread(dns_host.restore_leftover, prev.resolv_conf)
    if prev.origin.boot_id != here.boot_id:
        log.info("the host rebooted since the previous run: nothing else of it is left")
    else:
        if prev.wireguard_go is not None:
            await wggo.reap_leftover(prev.wireguard_go)
        if prev.origin.netns != here.netns:
            log.warning(
                "the previous run was in network namespace %s, this one is %s: what it changed there "
                "(nft table, ip rules, sysctls, resolv.conf) is not undone from here",
                prev.origin.netns,
                here.netns,
            )
        else:
            await _undo_in_netns(prev)
    await asyncio.to_thread(remove_file, path)


async def _undo_in_netns(prev: Journal) -> None:
    try:
        if prev.exit_routing is not None:
            await exitroute.remove_leftovers(prev.exit_routing)
        if prev.sysctls:
            await asyncio.to_thread(forwarding.restore, prev.sysctls)
        if prev.nft_table:
            await nft.delete_table(prev.nft_table)
        if prev.route_table:
            await nft.delete_table(prev.route_table)
        if prev.kernel_interface:
            await asyncio.to_thread(kernel.remove_leftover, prev.kernel_interface)
    except OSError as exc:  # netlink's errors are OSErrors too
        raise Unavailable(
            f"undoing what the previous ghostlink left failed: {exc}; fix that and start again"
        ) from None
