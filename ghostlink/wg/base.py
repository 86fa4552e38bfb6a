"""The WireGuard backend seam: one Protocol, implemented by wireguard-go (``wggo``), kernel
WireGuard (``kernel``) and an in-memory fake (``fake``), plus the translation of an engine ``Plan``
into per-peer changes that every backend applies the same way.

A backend owns the WireGuard device only (keys, port, peers). Addresses and routes on the interface
belong to ``ghostlink.net``; the daemon calls both with the same plan.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

from ghostcore.errors import ConfigError
from ghostcore.keys import PrivateKey
from ghostlink.engine import Plan
from ghostlink.wg.uapi_codec import DeviceState, PeerChange

__all__ = ["DeviceState", "PeerChange", "WireGuardBackend", "changes_for", "foreign_interface"]


def foreign_interface(ifname: str) -> ConfigError:
    """An interface exists under our name and no journal says a run of ours made it: never ours to use."""
    return ConfigError(
        f"interface {ifname} exists and this ghostlink did not create it; "
        f"remove it (ip link del {ifname}) or choose another --interface"
    )


class WireGuardBackend(Protocol):
    """What the daemon needs from a WireGuard implementation."""

    name: str  # "kernel", "wireguard-go" or "fake"
    ifname: str

    async def up(
        self,
        private_key: PrivateKey,
        listen_port: int,
        mtu: int,
        on_restart: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Create the interface, set key and port, bring it up with ``mtu``. An interface that exists
        already is not ours (a previous run's was removed before): ``foreign_interface``.

        ``on_restart`` is awaited after the device had to be re-created under the caller (wireguard-go
        restarted: its new TUN has the peers back, but no addresses or routes). Kernel WireGuard's
        interface outlives no process, so it never calls it.
        """

    async def apply(self, plan: Plan) -> None:
        """Apply the peer part of ``plan``, touching only the peers it names."""

    async def read(self) -> DeviceState:
        """The device as WireGuard reports it now (listen port, peers with counters)."""

    async def set_private_key(self, private_key: PrivateKey) -> None:
        """Switch the device's private key (key rotation), touching nothing else: no peer, no port."""

    async def close(self) -> None:
        """Remove the interface and everything this backend started. Idempotent."""


def changes_for(plan: Plan) -> list[PeerChange]:
    """The per-peer changes for ``plan``: additions, then updates, then removals.

    Removals go LAST. WireGuard applies a request line by line while packets keep flowing, and allowed IPs
    are unique per device: inserting a prefix moves it to the new peer, and removing a peer removes only the
    entries still pointing at it. So when a peer is replaced (key rotation: old key out, new key in with the
    same allowed IPs) or a prefix moves between peers (route failover), adding first means there is never
    a moment in which the prefix has no peer. Removing first opened such a gap, and a packet routed in it was
    dropped (seen: 1 lost ping in a rotation under load).
    """
    out: list[PeerChange] = []
    for s in plan.peers_add:
        out.append(
            PeerChange(
                public_key=s.public_key,
                create=True,
                endpoint=s.endpoint,
                allowed_ips=s.allowed_ips,
                keepalive=s.keepalive,
            )
        )
    for u in plan.peers_update:
        out.append(
            PeerChange(
                public_key=u.spec.public_key,
                endpoint=u.spec.endpoint if "endpoint" in u.fields else None,
                allowed_ips=u.spec.allowed_ips if "allowed_ips" in u.fields else None,
                keepalive=u.spec.keepalive if "keepalive" in u.fields else None,
            )
        )
    out.extend(PeerChange(public_key=k, remove=True) for k in plan.peers_remove)
    return out
