"""Running a node: the ``join`` and ``run`` flows, and the wiring of one node's parts.

:func:`join` checks the server's TLS key against the pin the auth key carries (or ``--pin``), registers
with ghostmesh (writing the state directory only once the server accepted), then serves; :func:`run`
serves from the saved registration, checking the saved pin before anything is sent: a server presenting
another key stops it with the one-line error naming both keys, while a server that cannot be reached yet
is retried (the mesh runs on the saved state meanwhile). Serving first undoes what a previous run that
did not stop cleanly left on the host (:mod:`ghostlink.leftovers`, from the journal in the state
directory), then builds the parts, each given what it needs through its constructor: the node key holder,
the coordination client, the WireGuard backend, the packet filter, forwarding and exit routing (these four
journal what they change on the host before changing it: :mod:`ghostlink.hostjournal`), NAT traversal,
the key rotator, the node resolver (:mod:`ghostlink.magicdns`; the resolv.conf it may replace is journaled
too), the daemon over all of them, and the local API over the daemon. It runs until SIGTERM /
SIGINT and always cleans up, in reverse; a clean stop leaves no journal.

What the user must see (a login URL, the "joined as" line) goes through ``say``; app.py decides how.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from ghostcore import aio, lock
from ghostcore.errors import AuthError, ConfigError, PermissionDenied, Unavailable
from ghostcore.files import make_private_dir
from ghostcore.joinkey import format_pin, parse_join_key, parse_pin
from ghostcore.keys import PublicKey
from ghostcore.tlschannel import Trust
from ghostlink import dns_host
from ghostlink.client import CoordClient
from ghostlink.config import LinkConfig, check_server
from ghostlink.daemon import Daemon, PathLayer, PathLayerFactory
from ghostlink.engine import NodeInfo
from ghostlink.exitroute import ExitRouting
from ghostlink.forwarding import Forwarding
from ghostlink.hostjournal import HostJournal, Origin
from ghostlink.leftovers import undo_leftovers
from ghostlink.localapi import LocalNodeService, start_local_api, stop_local_api
from ghostlink.magicdns import RESOLVERS, MagicDns
from ghostlink.net import LinkNet
from ghostlink.nft import NftFirewall
from ghostlink.nodekey import NodeKey
from ghostlink.pinger import IcmpPinger
from ghostlink.rotate import KeyRotator, settle_pending
from ghostlink.state import SavedNode, StateDir
from ghostlink.traversal import birthday
from ghostlink.traversal.edge import Traversal
from ghostlink.trust import NodeTrust
from ghostlink.wg.select import choose, make_backend

if TYPE_CHECKING:
    from ghostcore.metrics_http import MetricsServer

log = logging.getLogger(__name__)

Say = Callable[[str], None]


def up_line(node: NodeInfo, backend: str, ifname: str) -> str:
    """What the user is told once the node is up."""
    v4 = next((a for a in node.addresses if ipaddress.ip_address(a).version == 4), "-")
    v6 = next((a for a in node.addresses if ipaddress.ip_address(a).version == 6), "-")
    return f"joined as {node.name} ({v4}, {v6}) via {backend} on {ifname}"


async def _server_addresses(target: str) -> list[str]:
    """ghostmesh's addresses (``host:port`` resolved), which keep the underlay path under an exit node."""
    host, port = check_server(target)
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


def _traversal(keys: NodeKey, port_mapping: bool, ifname: str, journal: HostJournal) -> PathLayerFactory:
    def make(wg_port: int, on_paths: Callable[[], None], on_status: Callable[[], None]) -> PathLayer:
        return Traversal(
            wg_port=wg_port,
            keys=keys,
            on_paths=on_paths,
            on_status=on_status,
            port_mapping=port_mapping,
            route_table=birthday.table_for(ifname),
            journal=journal,
        )

    return make


def _trust(state: StateDir, anchor: str) -> NodeTrust:
    """The node's trust, from the lock log it verified before (refused at start if it no longer verifies)."""
    try:
        return NodeTrust(
            state.rotation_key(),
            state.lock_log(),
            anchor=bytes.fromhex(anchor) if anchor else None,
            save=state.save_lock_log,
        )
    except lock.LockError as exc:
        raise ConfigError(f"{state.path}: the saved lock log does not verify ({exc}); join again") from None


async def _serve(
    cfg: LinkConfig, client: CoordClient, keys: NodeKey, trust: NodeTrust, state: StateDir, *, say: Say
) -> None:
    """Bring WireGuard up, serve the local API, run the daemon until SIGTERM/SIGINT; clean up always."""
    ifname = cfg.wireguard.interface
    # the journal is trusted to name what to kill and delete: only root may write where it is
    await asyncio.to_thread(make_private_dir, state.path, "state directory", "--state-dir")
    origin = await asyncio.to_thread(Origin.here)
    await undo_leftovers(state.journal_path, origin)
    journal = HostJournal(state.journal_path, ifname, origin)
    # The kernel probe runs `ip` and waits for it: not on the event loop's thread.
    choice = await asyncio.to_thread(choose, cfg.wireguard.backend, cfg.wireguard.wireguard_go)
    backend = make_backend(choice, ifname, cfg.wireguard.wireguard_go, journal=journal)
    firewall = NftFirewall(ifname, journal=journal)
    forwarding = Forwarding(journal=journal)
    exit_routing = None
    if cfg.node.exit_node:
        exit_routing = ExitRouting(ifname, await _server_addresses(client.target), journal=journal)
    host = (
        await asyncio.to_thread(dns_host.choose_host, ifname, journal, state.path, RESOLVERS)
        if cfg.dns.accept
        else None
    )
    daemon = Daemon(
        client,
        backend,
        LinkNet(ifname),
        keys=keys,
        trust=trust,
        listen_port=cfg.wireguard.listen_port,
        mtu=cfg.wireguard.mtu,
        reconnect_max=cfg.control.reconnect_max,
        on_up=lambda node: say(up_line(node, backend.name, ifname)),
        firewall=firewall,
        forwarding=forwarding,
        exit_routing=exit_routing,
        exit_node=cfg.node.exit_node,
        accept_routes=cfg.node.accept_routes,
        advertise_routes=cfg.node.advertise_routes,
        advertise_exit_node=cfg.node.advertise_exit_node,
        paths=_traversal(keys, cfg.traversal.port_mapping, ifname, journal),
        rotator=KeyRotator(client, keys, state),
        key_rotation=cfg.node.key_rotation,
        pinger=IcmpPinger(ifname),
        dns=MagicDns(ifname, host, accept=cfg.dns.accept),
    )
    sock = Path(cfg.control.socket)
    with aio.stop_on_signals() as stop:
        local = None
        served: MetricsServer | None = None
        run_task: asyncio.Task[None] | None = None
        try:
            await daemon.start()
            local = await start_local_api(sock, LocalNodeService(daemon))
            if cfg.metrics.listen:
                # imported here: the listener's stack (aiohttp's server, prometheus_client) is loaded only
                # by a node that serves metrics
                from ghostlink import metrics  # noqa: PLC0415

                served = await metrics.serve(cfg.metrics.listen, daemon)
            if served is not None:
                log.info("metrics on http://%s:%d/metrics", served.url_host, served.port)
            run_task = asyncio.create_task(daemon.run())
            stop_task = asyncio.create_task(stop.wait())
            await asyncio.wait({run_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
            stop_task.cancel()
            log.info("stopping")
        finally:
            if run_task is not None:
                run_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await run_task
            if served is not None:
                await served.close()
            if local is not None:
                await stop_local_api(local, sock)
            await daemon.close()
            if exit_routing is not None:
                await exit_routing.close()
            await backend.close()
            await firewall.close()
            await forwarding.close()


def _join_pin(cfg: LinkConfig, key_pin: bytes | None) -> bytes | None:
    """The pin a join trusts: the auth key's, or ``node.pin`` (--pin); both given, they must agree."""
    flag = parse_pin(cfg.node.pin, "--pin") if cfg.node.pin else None
    if flag is not None and key_pin is not None and flag != key_pin:
        raise ConfigError(
            f"--pin {format_pin(flag)} and the pin the auth key carries ({format_pin(key_pin)}) differ; "
            "pass only the key as it was handed out"
        )
    return key_pin or flag


async def join(cfg: LinkConfig, auth_key: str, say: Say) -> None:
    """Register with ghostmesh (an auth key, or an OIDC login when ``auth_key`` is empty and the server
    asks for one), save the registration, then serve."""
    server = cfg.node.server
    if not server:
        raise ConfigError("no server given; pass --server HOST:PORT")
    joined = parse_join_key(auth_key, "--auth") if auth_key else None
    pin = _join_pin(cfg, joined.pin if joined is not None else None)
    # Fail on a missing WireGuard before anything is registered or written.
    await asyncio.to_thread(choose, cfg.wireguard.backend, cfg.wireguard.wireguard_go)
    state = StateDir(cfg.node.state_dir)
    keys = NodeKey(state.key_for_join())
    saved = state.saved_node()
    trust = Trust(pin=pin, ca_file=cfg.control.ca_file or None)
    client = CoordClient(server, keys, trust, timeout=cfg.control.connect_timeout)
    try:
        await client.connect()  # the server's TLS key is checked here, before anything is sent
        pinned = saved.server_key if saved is not None and saved.server == server else None
        server_key = await client.pin_server_key(expected=pinned)
        if saved is not None:
            await settle_pending(state, client, keys)  # before registering: maybe the key rotated
        credential = joined.credential if joined is not None else None
        rotation = state.existing_rotation_key() or lock.SigningKey.generate()  # written with the rest
        signature = b""
        if credential is not None:  # a pre-signed auth key: the node vouches for its own key
            signature = lock.join_with_credential(credential, keys.public.raw, rotation.public())
        try:
            node, auth_url = await client.register_or_login(
                joined.key if joined is not None else "", cfg.node.hostname, signature
            )
            if auth_url:  # OIDC: nothing is written until the user logged in
                say(f"to join, open this URL and log in: {auth_url}")
                # the page names the node that asked: a URL someone else sent names another key
                say(f"confirm only if the page names this node's key: {keys.public.base64()}")
                node = await client.wait_for_login()
        except PermissionDenied as exc:
            raise PermissionDenied(f"registration refused: {exc}") from None
        except AuthError as exc:
            raise AuthError(f"{'auth key' if auth_key else 'registration'} refused: {exc}") from None
        anchor = credential.genesis.hex() if credential is not None else (saved.lock_anchor if saved else "")
        state.save(
            keys.private,
            SavedNode(
                server=server,
                server_key=server_key.base64(),
                node_id=node.id,
                name=node.name,
                server_pin=format_pin(pin) if pin is not None else "",
                lock_anchor=anchor,
            ),
            rotation,
        )
        log.info("registered as %s (node %d) with %s", node.name, node.id, server)
        await _serve(cfg, client, keys, _trust(state, anchor), state, say=say)
    finally:
        await client.close()


async def run(cfg: LinkConfig, say: Say) -> None:
    """Serve from the saved registration (after a reboot: no auth key needed)."""
    state = StateDir(cfg.node.state_dir)
    key, saved = state.load()
    keys = NodeKey(key)
    server = cfg.node.server or saved.server
    pin = cfg.node.pin or saved.server_pin
    trust = Trust(pin=parse_pin(pin, "node.pin") if pin else None, ca_file=cfg.control.ca_file or None)
    client = CoordClient(
        server, keys, trust, PublicKey.from_base64(saved.server_key), timeout=cfg.control.connect_timeout
    )
    try:
        try:
            await client.connect()  # a server with another TLS key stops the start here (PinMismatch)
        except Unavailable as exc:
            log.warning("%s; starting from the saved state and retrying", exc)
        else:
            await settle_pending(state, client, keys)
        await _serve(cfg, client, keys, _trust(state, saved.lock_anchor), state, say=say)
    finally:
        await client.close()
