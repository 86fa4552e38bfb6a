"""ghostlink's command line: ``join``, ``run`` and ``config check``; wires config, state, backend, daemon
and the local API together. The only ghostlink module that configures logging or prints to the user.

Every failure is one line on stderr, ``ghostlink: <what>; <what to do>``, and exit status 1. A failed
join writes nothing (the state directory is written only after the server accepted the registration).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import logging
import os
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from ghostcore import aio, logsetup
from ghostcore.errors import AuthError, ConfigError, GhostError, PermissionDenied
from ghostcore.keys import PrivateKey, PublicKey
from ghostlink.config import LinkConfig, load_config, split_host_port
from ghostlink.control import CoordClient, Daemon
from ghostlink.engine import NodeInfo
from ghostlink.exitroute import ExitRouting
from ghostlink.forwarding import Forwarding
from ghostlink.localapi import LocalNodeService, start_local_api, stop_local_api
from ghostlink.net import LinkNet
from ghostlink.nft import NftFirewall
from ghostlink.rotate import KeyRotator, settle_pending
from ghostlink.state import SavedNode, StateDir
from ghostlink.wg.select import choose, make_backend
from ghostlink.wg.wggo import WireGuardGoBackend

log = logging.getLogger("ghostlink")
AUTH_ENV = "GHOSTLINK_AUTH_KEY"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(1, f"ghostlink: {message}; see `ghostlink --help`\n")


def _common(p: argparse.ArgumentParser, *, server: bool) -> None:
    p.add_argument("--config", type=Path, help="TOML config file (see configs/ghostlink.toml)")
    if server:
        p.add_argument("--server", help="ghostmesh coordination address HOST:PORT")
    p.add_argument("--hostname", help="name to register (default: this machine's hostname)")
    p.add_argument("--state-dir", help="where the node key and registration are kept")
    p.add_argument("--interface", help="WireGuard interface name (at most 15 characters)")
    p.add_argument("--listen-port", type=int, help="WireGuard UDP port (0: random)")
    p.add_argument("--socket", help="local API unix socket for ghostctl")
    p.add_argument("--backend", choices=("auto", "kernel", "wireguard-go"), help="WireGuard implementation")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    p.add_argument(
        "--advertise-routes",
        metavar="PREFIXES",
        help="subnet routes to offer, comma separated (10.1.1.0/24,...)",
    )
    p.add_argument(
        "--advertise-exit-node", action="store_true", default=None, help="offer this node as an exit node"
    )
    p.add_argument(
        "--exit-node", metavar="NAME", help="send internet traffic through this peer (an exit node)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ghostlink", description="ghost* node agent: joins a ghostmesh and runs WireGuard")
    sub = parser.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    join = sub.add_parser("join", help="register with ghostmesh, then run the daemon in the foreground")
    _common(join, server=True)
    join.add_argument("--auth", help=f"pre-auth key (or set {AUTH_ENV}, which keeps it out of `ps`)")
    run = sub.add_parser("run", help="run the daemon from the saved registration (reconnects forever)")
    _common(run, server=True)
    cfg = sub.add_parser("config", help="configuration tools")
    cfg_sub = cfg.add_subparsers(dest="config_cmd", required=True, parser_class=_Parser)
    check = cfg_sub.add_parser("check", help="validate a config file and exit")
    check.add_argument("--config", type=Path, required=True)
    return parser


def _flags(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "node.server": getattr(args, "server", None),
        "node.hostname": args.hostname,
        "node.state_dir": args.state_dir,
        "wireguard.interface": args.interface,
        "wireguard.listen_port": args.listen_port,
        "wireguard.backend": args.backend,
        "control.socket": args.socket,
        "log.level": args.log_level,
        "node.advertise_routes": args.advertise_routes,
        "node.advertise_exit_node": args.advertise_exit_node,
        "node.exit_node": args.exit_node,
    }


def _up_line(node: NodeInfo, backend: str, ifname: str) -> str:
    v4 = next((a for a in node.addresses if ipaddress.ip_address(a).version == 4), "-")
    v6 = next((a for a in node.addresses if ipaddress.ip_address(a).version == 6), "-")
    return f"ghostlink: joined as {node.name} ({v4}, {v6}) via {backend} on {ifname}"


async def _server_addresses(target: str) -> list[str]:
    """ghostmesh's addresses (``host:port`` resolved), which keep the underlay path under an exit node."""
    host, port = split_host_port(target, "node.server")
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


async def _routing(cfg: LinkConfig, client: CoordClient) -> tuple[Forwarding, ExitRouting | None]:
    """Subnet routes and exit nodes: what this node advertises, its forwarding, its exit node use."""
    client.advertise_routes = list(cfg.node.advertise_routes)
    client.advertise_exit_node = cfg.node.advertise_exit_node
    exit_routing = None
    if cfg.node.exit_node:
        exit_routing = ExitRouting(cfg.wireguard.interface, await _server_addresses(client.target))
    return Forwarding(), exit_routing


async def _serve(cfg: LinkConfig, client: CoordClient, key: PrivateKey, state: StateDir) -> None:
    """Bring WireGuard up, serve the local API, run the daemon until SIGTERM/SIGINT; clean up always."""
    ifname = cfg.wireguard.interface
    # The kernel probe uses pyroute2's blocking API, which must not run on the event loop's thread.
    choice = await asyncio.to_thread(choose, cfg.wireguard.backend, cfg.wireguard.wireguard_go)
    backend = make_backend(choice, ifname, cfg.wireguard.wireguard_go)

    def announce(node: NodeInfo) -> None:
        print(_up_line(node, backend.name, ifname), file=sys.stderr, flush=True)

    firewall = NftFirewall(ifname)
    forwarding, exit_routing = await _routing(cfg, client)
    daemon = Daemon(
        client,
        backend,
        LinkNet(ifname),
        firewall=firewall,
        forwarding=forwarding,
        exit_routing=exit_routing,
        exit_node=cfg.node.exit_node,
        key=key,
        listen_port=cfg.wireguard.listen_port,
        mtu=cfg.wireguard.mtu,
        reconnect_max=cfg.control.reconnect_max,
        on_up=announce,
        traversal=True,
    )
    if isinstance(backend, WireGuardGoBackend):
        backend.on_restart = daemon.on_backend_restart
    rotator = KeyRotator(daemon, state)
    daemon.before_session = rotator.resume
    auto: asyncio.Task[None] | None = None
    sock = Path(cfg.control.socket)
    with aio.stop_on_signals() as stop:
        local = None
        run_task: asyncio.Task[None] | None = None
        try:
            await daemon.start()
            local = await start_local_api(
                sock,
                LocalNodeService(
                    daemon, server=client.target, backend_name=backend.name, ifname=ifname, rotator=rotator
                ),
            )
            run_task = asyncio.create_task(daemon.run())
            if cfg.node.key_rotation > 0:
                auto = asyncio.create_task(rotator.run_auto(cfg.node.key_rotation))
            stop_task = asyncio.create_task(stop.wait())
            await asyncio.wait({run_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
            stop_task.cancel()
            log.info("stopping")
        finally:
            if auto is not None:
                auto.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await auto
            if run_task is not None:
                run_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await run_task
            if local is not None:
                await stop_local_api(local, sock)
            await daemon.close()
            if exit_routing is not None:
                await exit_routing.close()
            await backend.close()
            await firewall.close()
            await forwarding.close()


async def join(cfg: LinkConfig, auth_key: str) -> None:
    server = cfg.node.server
    if not server:
        raise ConfigError("no server given; pass --server HOST:PORT")
    # Fail on a missing WireGuard before anything is registered or written.
    await asyncio.to_thread(choose, cfg.wireguard.backend, cfg.wireguard.wireguard_go)
    state = StateDir(cfg.node.state_dir)
    key = state.key_for_join()
    saved = state.saved_node()
    client = CoordClient(server, key, timeout=cfg.control.connect_timeout)
    try:
        pinned = saved.server_key if saved is not None and saved.server == server else None
        server_key = await client.pin_server_key(expected=pinned)
        if saved is not None:
            key = await settle_pending(state, client, key)  # before registering: maybe the key rotated
        try:
            node, auth_url = await client.register_or_login(auth_key, cfg.node.hostname)
            if auth_url:  # OIDC: nothing is written until the user logged in
                print(
                    f"ghostlink: to join, open this URL and log in: {auth_url}", file=sys.stderr, flush=True
                )
                node = await client.wait_for_login()
        except PermissionDenied as exc:
            raise PermissionDenied(f"registration refused: {exc}") from None
        except AuthError as exc:
            raise AuthError(f"{'auth key' if auth_key else 'registration'} refused: {exc}") from None
        state.save(
            key, SavedNode(server=server, server_key=server_key.base64(), node_id=node.id, name=node.name)
        )
        log.info("registered as %s (node %d) with %s", node.name, node.id, server)
        await _serve(cfg, client, key, state)
    finally:
        await client.close()


async def run(cfg: LinkConfig) -> None:
    state = StateDir(cfg.node.state_dir)
    key, saved = state.load()
    server = cfg.node.server or saved.server
    client = CoordClient(
        server, key, PublicKey.from_base64(saved.server_key), timeout=cfg.control.connect_timeout
    )
    try:
        key = await settle_pending(state, client, key)
        await _serve(cfg, client, key, state)
    finally:
        await client.close()


def _fail(message: str) -> int:
    print(f"ghostlink: {message}", file=sys.stderr, flush=True)
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.cmd == "config":
        try:
            load_config(args.config, environ=dict(os.environ))
        except GhostError as exc:
            return _fail(str(exc))
        print(f"ghostlink: {args.config}: ok")
        return 0
    if os.geteuid() != 0:
        return _fail("must run as root to create the WireGuard interface; try sudo")
    try:
        cfg = load_config(args.config, environ=dict(os.environ), flags=_flags(args))
        logsetup.configure(cfg.log.level, cfg.log.format)
        # pyroute2 logs every netlink message at debug: far too much even for our debug level.
        logging.getLogger("pyroute2").setLevel(logging.WARNING)
        if args.cmd == "join":
            # no auth key: the server decides (an OIDC server answers with a login URL)
            aio.run(join(cfg, args.auth or os.environ.get(AUTH_ENV, "")))
        else:
            aio.run(run(cfg))
    except GhostError as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
