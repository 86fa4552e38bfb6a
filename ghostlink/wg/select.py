"""Choosing a WireGuard backend: kernel when the module works, else wireguard-go (``backend = "auto"``).

The probe creates a throwaway WireGuard link and deletes it (``kernel.kernel_available``); it is
injectable so the choice can be unit-tested on a machine with or without the module.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass

from ghostcore.errors import ConfigError
from ghostlink.hostjournal import HostJournal
from ghostlink.wg.base import WireGuardBackend
from ghostlink.wg.kernel import KernelBackend, kernel_available
from ghostlink.wg.wggo import WireGuardGoBackend

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Choice:
    backend: str  # "kernel" or "wireguard-go"
    reason: str


def choose(
    requested: str,
    wireguard_go: str = "wireguard-go",
    *,
    probe: Callable[[], bool] = kernel_available,
    which: Callable[[str], str | None] = shutil.which,
) -> Choice:
    """Decide which backend to use; ConfigError if the requested one cannot work here."""
    if requested == "kernel":
        if not probe():
            raise ConfigError(
                "wireguard.backend: kernel WireGuard is not available on this host (no wireguard module); "
                'use backend = "wireguard-go" or "auto"'
            )
        return Choice("kernel", "requested")
    has_go = which(wireguard_go) is not None
    if requested == "wireguard-go":
        if not has_go:
            raise ConfigError(f"wireguard.wireguard_go: {wireguard_go!r} not found; install wireguard-go")
        return Choice("wireguard-go", "requested")
    if requested != "auto":
        raise ConfigError(
            f'wireguard.backend: unknown backend {requested!r}; use "auto", "kernel" or "wireguard-go"'
        )
    if probe():
        return Choice("kernel", "auto: the kernel module works")
    if has_go:
        return Choice("wireguard-go", "auto: no kernel WireGuard module, using wireguard-go")
    raise ConfigError(
        "no WireGuard available: the kernel has no wireguard module and wireguard-go is not "
        "installed; install wireguard-go (apt install wireguard-go)"
    )


def make_backend(
    choice: Choice, ifname: str, wireguard_go: str = "wireguard-go", *, journal: HostJournal | None = None
) -> WireGuardBackend:
    log.info("WireGuard backend: %s (%s)", choice.backend, choice.reason)
    if choice.backend == "kernel":
        return KernelBackend(ifname, journal)
    return WireGuardGoBackend(ifname, wireguard_go, journal=journal)
