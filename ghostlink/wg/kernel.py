"""Kernel WireGuard: ``ip link add <if> type wireguard`` (:mod:`ghostlink.iproute`) + the WireGuard generic
netlink family (``WG_CMD_SET_DEVICE`` / ``WG_CMD_GET_DEVICE``, include/uapi/linux/wireguard.h) through
pyroute2, loaded only by a node that uses this backend.

Same incremental semantics as the UAPI path: one netlink message per changed peer with
``WGPEER_F_UPDATE_ONLY`` for changes, ``WGPEER_F_REMOVE_ME`` for removals and
``WGPEER_F_REPLACE_ALLOWEDIPS`` only when allowed IPs change; never ``WGDEVICE_F_REPLACE_PEERS``.
It cannot run on machines without the module (this CI's); ``select`` falls back to wireguard-go there.

The interface outlives the process: it is journaled (:mod:`ghostlink.hostjournal`) before it is created
and forgotten once deleted, so the next start deletes one a crashed run left (:func:`remove_leftover`,
only if it is still a WireGuard link). An interface of that name that no journal names is not ours:
``up`` refuses it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable, Callable
from typing import Any

from ghostcore import addr
from ghostcore.errors import Unavailable
from ghostcore.keys import PrivateKey, PublicKey
from ghostlink import iproute
from ghostlink.engine import Plan
from ghostlink.hostjournal import HostJournal
from ghostlink.wg import uapi_codec as codec
from ghostlink.wg.base import changes_for, foreign_interface


def _wireguard() -> Any:
    from pyroute2 import WireGuard  # noqa: PLC0415

    return WireGuard()


def kernel_available() -> bool:
    """True if this kernel can create a WireGuard link (probe with a throwaway interface, then delete it).

    Through ``ip`` (:mod:`ghostlink.iproute`), so that a host without the module never loads pyroute2."""
    probe = f"glprobe{os.getpid() % 100000}"
    try:
        iproute.add_link(probe, "wireguard")
    except OSError:  # "Unknown device type" (EOPNOTSUPP) without the module, or no ip at all
        return False
    with contextlib.suppress(OSError):
        iproute.delete_link(probe)
    return True


def remove_leftover(ifname: str) -> None:
    """Delete the WireGuard interface a previous run journaled (blocking), if it is still one."""
    kind = iproute.link_kind(ifname)
    if kind is None:
        return
    if kind != "wireguard":
        raise foreign_interface(ifname)  # the name was taken by something else since
    iproute.delete_link(ifname)


def peer_dict(c: codec.PeerChange) -> dict[str, Any]:
    """pyroute2 ``WireGuard.set(peer=...)`` form of one change (keys in base64, as pyroute2 wants)."""
    d: dict[str, Any] = {"public_key": c.public_key}
    if c.remove:
        d["remove"] = True
        return d
    d["update_only"] = not c.create
    if c.endpoint is not None:
        d["endpoint_addr"], d["endpoint_port"] = addr.parse_endpoint(c.endpoint)  # strict, as for UAPI
    if c.keepalive is not None:
        d["persistent_keepalive"] = c.keepalive
    if c.allowed_ips is not None:
        d["replace_allowed_ips"] = True
        d["allowed_ips"] = [str(addr.parse_prefix(p, "allowed IP")) for p in c.allowed_ips]
    return d


def _b64(raw: Any) -> str:
    if isinstance(raw, bytes | bytearray):
        raw = raw.decode("ascii")
    return PublicKey.from_base64(str(raw)).base64()


def _device_from_info(msgs: list[Any]) -> codec.DeviceState:
    listen_port = 0
    peers: dict[str, codec.PeerState] = {}
    for m in msgs:
        listen_port = m.get("WGDEVICE_A_LISTEN_PORT") or listen_port
        raw_peers = m.get("WGDEVICE_A_PEERS") or []
        # A large device is dumped over several messages, each with a slice of the peers (wireguard.h).
        for p in raw_peers if isinstance(raw_peers, list) else [raw_peers]:
            ep = p.get("WGPEER_A_ENDPOINT")
            hs = p.get("WGPEER_A_LAST_HANDSHAKE_TIME") or {}
            allowed = tuple(
                f"{a.get('addr')}" for a in (p.get("WGPEER_A_ALLOWEDIPS") or []) if a.get("addr") is not None
            )
            key = _b64(p.get("WGPEER_A_PUBLIC_KEY"))
            ep_ip = ep.get("addr") if ep else None
            endpoint = addr.format_endpoint(ep_ip, ep["port"]) if ep_ip else None
            peers[key] = codec.PeerState(
                public_key=key,
                endpoint=endpoint,
                last_handshake_sec=int(hs.get("tv_sec", 0)),
                last_handshake_nsec=int(hs.get("tv_nsec", 0)),
                rx_bytes=int(p.get("WGPEER_A_RX_BYTES") or 0),
                tx_bytes=int(p.get("WGPEER_A_TX_BYTES") or 0),
                keepalive=int(p.get("WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL") or 0),
                allowed_ips=allowed,
            )
    return codec.DeviceState(listen_port=listen_port, has_private_key=True, peers=peers)


class KernelBackend:
    name = "kernel"

    def __init__(self, ifname: str, journal: HostJournal | None = None) -> None:
        self.ifname = ifname
        self._journal = journal  # None: nothing journaled (tests that run the backend alone)
        self._created = False  # close() deletes only an interface this backend created

    def _up(self, private_key: PrivateKey, listen_port: int, mtu: int) -> None:
        if iproute.link_exists(self.ifname):
            raise foreign_interface(self.ifname)
        if self._journal is not None:
            self._journal.record_kernel_interface(self.ifname)
        iproute.add_link(self.ifname, "wireguard")
        self._created = True
        with _wireguard() as wg:
            wg.set(self.ifname, private_key=private_key.base64(), listen_port=listen_port)
        iproute.set_up(self.ifname, mtu)

    async def up(
        self,
        private_key: PrivateKey,
        listen_port: int,
        mtu: int,
        on_restart: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        # ``on_restart`` is never called: the kernel's interface does not die with a process.
        try:
            await asyncio.to_thread(self._up, private_key, listen_port, mtu)
        except OSError as exc:  # IpError and pyroute2's NetlinkError are OSErrors
            raise Unavailable(
                f"cannot create kernel WireGuard interface {self.ifname}: {exc}; try --backend wireguard-go"
            ) from None

    def _apply(self, changes: list[codec.PeerChange]) -> None:
        with _wireguard() as wg:
            for c in changes:
                wg.set(self.ifname, peer=peer_dict(c))

    async def apply(self, plan: Plan) -> None:
        changes = changes_for(plan)
        if changes:
            await asyncio.to_thread(self._apply, changes)

    def _read(self) -> codec.DeviceState:
        with _wireguard() as wg:
            return _device_from_info(list(wg.info(self.ifname)))

    async def read(self) -> codec.DeviceState:
        return await asyncio.to_thread(self._read)

    def _set_private_key(self, private_key: PrivateKey) -> None:
        with _wireguard() as wg:
            wg.set(self.ifname, private_key=private_key.base64())

    async def set_private_key(self, private_key: PrivateKey) -> None:
        await asyncio.to_thread(self._set_private_key, private_key)

    def _close(self) -> None:
        if self._created:
            with contextlib.suppress(OSError):
                iproute.delete_link(self.ifname)
            if iproute.link_exists(self.ifname):
                return  # still there: it stays journaled, for the next start
            self._created = False
        if self._journal is not None:  # also when the add itself failed after the entry was written
            self._journal.record_kernel_interface("")

    async def close(self) -> None:
        await asyncio.to_thread(self._close)
