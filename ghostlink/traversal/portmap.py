"""Port mapping, the asyncio edge: :class:`PortMapper` drives :class:`portmap_core.PortMapCore` against the
node's default gateway.

It owns the UDP socket to the gateway's port 5351 (PCP and NAT-PMP), the UPnP IGD client, the timer loop
and the deletion of the mapping on exit (bounded: ``CLOSE_TIMEOUT``). The gateway is the IPv4 default
route's next hop (``/proc/net/route``, which is per network namespace); our address toward it is what
the kernel picks as source (a ``connect()`` of the UDP socket), which PCP requires in its request.

UPnP IGD: an SSDP search for an InternetGatewayDevice (our own, :func:`portmap_wire.ssdp_search`: the
library below imports aiohttp with any of its modules, ~13 MiB and ~0.13 s that a node behind a router
without UPnP, most of them, would carry for nothing), then ``async-upnp-client`` (the asyncio UPnP library
Home Assistant maintains) for the device's description and the WANIPConnection (or WANPPPConnection)
service's ``AddPortMapping`` / ``DeletePortMapping`` / ``GetExternalIPAddress`` SOAP actions, called
directly (its IGD profile's helper sends ``NewRemoteHost`` as ``0.0.0.0``, which routers without
remote-host support, miniupnpd among them, refuse; the wildcard is the empty string, UPnP IGD:1
WANIPConnection §2.2.19).
Only a device whose description URL is on the gateway's address is used: another LAN host answering
SSDP could otherwise make us report its address. A lease the router refuses (725
OnlyPermanentLeasesSupported, IGD:1 routers) is retried once as permanent (lease 0); a taken port (718
ConflictInMappingEntry) once with the router choosing (the suggestion + 1..). The library (and the aiohttp
client it brings) is imported once an IGD answered the search: a gateway that speaks PCP or NAT-PMP, or
no UPnP at all, and a node without a default gateway never load it.

Nothing here raises into the daemon: failures are logged once per state change (the core's ``status``)
and the core backs off. Without a default route (or with ``enabled`` off) it does nothing at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import struct
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from ghostcore.addr import HostPort
from ghostlink.traversal import portmap_wire as wire
from ghostlink.traversal.portmap_core import PortMapCore, Send, UpnpMap, UpnpUnmap

if TYPE_CHECKING:
    from async_upnp_client.client import UpnpService

log = logging.getLogger(__name__)

CLOSE_TIMEOUT = 1.0
LOOP_MAX_SLEEP = 5.0
SSDP_SECONDS = 2  # MX of the search: how long routers may take to answer
IGD_SEARCH_TARGET = "urn:schemas-upnp-org:device:InternetGatewayDevice:1"
WAN_SERVICES = ("WANIPConnection", "WANPPPConnection")
DESCRIPTION = "ghostlink"
ROUTE_TABLE = Path("/proc/net/route")


class _SsdpAnswers(asyncio.DatagramProtocol):
    """Collects the first SSDP search response naming an IGD description on the gateway's address:
    another LAN host answering could otherwise make us map a port on it and report its address."""

    def __init__(self, gateway: str, found: asyncio.Future[str]) -> None:
        self._gateway = gateway
        self._found = found

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        location = wire.parse_ssdp_location(data, IGD_SEARCH_TARGET)
        if location is not None and urlsplit(location).hostname == self._gateway and not self._found.done():
            self._found.set_result(location)


async def igd_location(source: str, gateway: str, wait: float = SSDP_SECONDS + 0.5) -> str | None:
    """The description URL of ``gateway``'s Internet Gateway Device: an SSDP search (UDA 1.1 §1.3) sent
    from ``source`` (our address toward the gateway); None when none answered within ``wait`` seconds."""
    loop = asyncio.get_running_loop()
    found: asyncio.Future[str] = loop.create_future()
    transport, _ = await loop.create_datagram_endpoint(
        lambda: _SsdpAnswers(gateway, found), local_addr=(source, 0)
    )
    try:
        sock = transport.get_extra_info("socket")
        # UDA 1.1 §1.3.2: TTL 2; out of the interface toward the gateway, whatever 239/4's route says
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 2)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(source))
        transport.sendto(wire.ssdp_search(IGD_SEARCH_TARGET, SSDP_SECONDS), wire.SSDP_GROUP)
        try:
            return await asyncio.wait_for(found, wait)
        except TimeoutError:
            return None
    finally:
        transport.close()


def default_gateway(table: str) -> str | None:
    """The IPv4 default route's gateway from ``/proc/net/route`` text (little-endian hex), or None."""
    for line in table.splitlines()[1:]:
        parts = line.split()
        if len(parts) < 4 or parts[1] != "00000000" or parts[7:8] != ["00000000"]:
            continue
        if not int(parts[3], 16) & 0x2:  # RTF_GATEWAY
            continue
        try:
            return str(ipaddress.IPv4Address(struct.pack("<I", int(parts[2], 16))))
        except (ValueError, struct.error):
            continue
    return None


class _GatewayProtocol(asyncio.DatagramProtocol):
    def __init__(self, on_data: Callable[[bytes], None]) -> None:
        self.on_data = on_data

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.on_data(data)

    def error_received(self, exc: Exception) -> None:  # ICMP port unreachable: no server; the core times out
        log.debug("port mapping: %s", exc)


class PortMapper:
    """A mapping of WireGuard's ``internal_port`` on the default gateway; ``on_change`` when it changes."""

    def __init__(
        self, internal_port: int, on_change: Callable[[], None], *, lifetime: int | None = None
    ) -> None:
        self._port = internal_port
        self._on_change = on_change
        self._lifetime = lifetime
        self._loop = asyncio.get_running_loop()
        self._core: PortMapCore | None = None
        self._transport: asyncio.DatagramTransport | None = None
        self._gateway = ""
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._upnp: asyncio.Task[None] | None = None
        self._igd: str | None = None  # the description URL of the IGD that answered the search
        self._status = ""

    @property
    def mapping(self) -> HostPort | None:
        return self._core.mapping if self._core is not None else None

    async def start(self) -> None:
        try:
            gateway = default_gateway(await asyncio.to_thread(ROUTE_TABLE.read_text))
        except OSError as exc:
            log.info("port mapping off: cannot read the routing table (%s)", exc)
            return
        if gateway is None:
            log.info("port mapping off: no IPv4 default gateway")
            return
        try:
            transport, _ = await self._loop.create_datagram_endpoint(
                lambda: _GatewayProtocol(self._on_datagram),
                remote_addr=(gateway, wire.SERVER_PORT),
                family=socket.AF_INET,
            )
        except OSError as exc:
            log.info("port mapping off: no socket to %s:%d (%s)", gateway, wire.SERVER_PORT, exc)
            return
        self._transport = transport
        self._gateway = gateway
        client_ip = str(transport.get_extra_info("sockname")[0])
        core = PortMapCore(self._port, client_ip)
        if self._lifetime is not None:
            core.lifetime = self._lifetime
        self._core = core
        self._task = asyncio.create_task(self._run())

    def _on_datagram(self, data: bytes) -> None:
        if self._core is not None and self._core.receive(data, self._loop.time()):
            self._changed()
        self._wake.set()

    def _changed(self) -> None:
        core = self._core
        if core is None:
            return
        if core.mapping is not None:
            log.info("port mapping: %s", core.status)
        self._on_change()

    def _act(self, actions: list[Send | UpnpMap | UpnpUnmap]) -> None:
        for a in actions:
            if isinstance(a, Send):
                if self._transport is not None:
                    self._transport.sendto(a.data)
            elif isinstance(a, UpnpMap):
                self._upnp = asyncio.create_task(self._upnp_map(a))

    async def _run(self) -> None:
        core = self._core
        while core is not None:
            now = self._loop.time()
            was = core.mapping
            self._act(core.poll(now))
            if core.mapping != was:
                self._changed()
            if core.status != self._status:
                self._status = core.status
                if core.mapping is None and core.status.startswith("no mapping"):
                    log.info("port mapping on %s: %s", self._gateway, core.status)
            nxt = core.next_timer()
            delay = LOOP_MAX_SLEEP if nxt is None else min(LOOP_MAX_SLEEP, max(0.01, nxt - now))
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)

    # --- UPnP IGD ------------------------------------------------------------------------------------

    async def _igd_location(self) -> str | None:
        if self._transport is None or not self._gateway:
            return None
        return await igd_location(str(self._transport.get_extra_info("sockname")[0]), self._gateway)

    async def _upnp_service(self, location: str) -> UpnpService | None:
        """The WANIPConnection/WANPPPConnection service of the IGD described at ``location``, or None."""
        # lazy, as every import of async_upnp_client here (the module docstring)
        from async_upnp_client.aiohttp import AiohttpRequester  # noqa: PLC0415
        from async_upnp_client.client_factory import UpnpFactory  # noqa: PLC0415

        factory = UpnpFactory(AiohttpRequester(timeout=5))
        device = await factory.async_create_device(location)
        for svc in device.all_services:
            if any(f":service:{name}:" in svc.service_type for name in WAN_SERVICES):
                return svc
        return None

    async def _upnp_map(self, req: UpnpMap) -> None:
        core = self._core
        if core is None:
            return
        external: HostPort | None = None
        lifetime, why = req.lifetime, ""
        try:
            location = await self._igd_location()
        except OSError as exc:
            location, why = None, f"SSDP search: {exc}"
        if location is None:
            if core.upnp_result(
                None, lifetime, self._loop.time(), why or "no Internet Gateway Device answered"
            ):
                self._changed()
            self._wake.set()
            return
        self._igd = location
        # an IGD answered: the library is loaded now (the module docstring)
        from async_upnp_client.exceptions import UpnpError  # noqa: PLC0415

        try:
            svc = await asyncio.wait_for(self._upnp_service(location), 8.0)
            if svc is None:
                why = "the gateway's UPnP device has no WANIPConnection or WANPPPConnection service"
            else:
                external, lifetime, why = await asyncio.wait_for(self._upnp_add(svc, req), 8.0)
        except (OSError, TimeoutError, UpnpError, ValueError) as exc:  # aiohttp errors are OSErrors
            why = f"{type(exc).__name__}: {exc}"
        except Exception as exc:  # a library bug must not end traversal; it is logged with its trace
            log.debug("UPnP port mapping failed", exc_info=True)
            why = f"{type(exc).__name__}: {exc}"
        if core.upnp_result(external, lifetime, self._loop.time(), why):
            self._changed()
        self._wake.set()

    async def _upnp_add(self, svc: UpnpService, req: UpnpMap) -> tuple[HostPort | None, int, str]:
        from async_upnp_client.exceptions import UpnpActionResponseError  # noqa: PLC0415

        client_ip = str(self._transport.get_extra_info("sockname")[0]) if self._transport is not None else ""
        got = await svc.action("GetExternalIPAddress").async_call()
        ext_ip = str(got.get("NewExternalIPAddress") or "")
        if not ext_ip:
            return None, 0, "the gateway has no external address"
        port, lease = req.external_port, req.lifetime
        for _ in range(3):
            try:
                await svc.action("AddPortMapping").async_call(
                    NewRemoteHost="",
                    NewExternalPort=port,
                    NewProtocol="UDP",
                    NewInternalPort=self._port,
                    NewInternalClient=client_ip,
                    NewEnabled=True,
                    NewPortMappingDescription=DESCRIPTION,
                    NewLeaseDuration=lease,
                )
            except UpnpActionResponseError as exc:
                if exc.error_code == 725 and lease:  # OnlyPermanentLeasesSupported
                    lease = 0
                    continue
                if exc.error_code == 718:  # ConflictInMappingEntry: another host holds that port
                    port = 1024 + (port + 1 - 1024) % (65536 - 1024)
                    continue
                return None, 0, f"AddPortMapping refused: {exc.error_code} {exc.error_desc}"
            return (ext_ip, port), lease, ""
        return None, 0, "AddPortMapping refused"

    async def _upnp_delete(self, external_port: int) -> None:
        location = self._igd or await self._igd_location()  # the one that took the mapping, if known
        svc = await self._upnp_service(location) if location is not None else None
        if svc is None:
            return
        await svc.action("DeletePortMapping").async_call(
            NewRemoteHost="", NewExternalPort=external_port, NewProtocol="UDP"
        )

    # --- shutdown --------------------------------------------------------------------------------------

    async def close(self) -> None:
        """Delete the mapping (bounded by ``CLOSE_TIMEOUT``) and stop; idempotent."""
        tasks = [t for t in (self._task, self._upnp) if t is not None]
        self._task = self._upnp = None
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        core, self._core = self._core, None
        if core is not None:
            for a in core.close():
                if isinstance(a, Send) and self._transport is not None:
                    self._transport.sendto(a.data)
                    await asyncio.sleep(0.05)  # one retransmission: deletion is best effort (RFC 6886 §3.4)
                    self._transport.sendto(a.data)
                elif isinstance(a, UpnpUnmap):
                    try:
                        await asyncio.wait_for(self._upnp_delete(a.external_port), CLOSE_TIMEOUT)
                    except Exception as exc:  # best effort: the lease expires on its own
                        log.debug("UPnP DeletePortMapping failed: %s", exc)
        if self._transport is not None:
            self._transport.close()
            self._transport = None
