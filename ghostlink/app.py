"""ghostlink's command line: ``join``, ``run`` and ``config check``; a thin main like ``ghostmesh.app``.

It parses the arguments, loads the config (defaults < file < environment < flags), configures logging and
turns the outcome into an exit status; :mod:`ghostlink.node` does the joining and running. The only
ghostlink module that configures logging or writes to the user (``say``: one ``ghostlink: ...`` line on
stderr).

Every failure is one line on stderr, ``ghostlink: <what>; <what to do>``, and exit status 1 (130 on
Ctrl-C). A failed join writes nothing (the state directory is written only after the server accepted the
registration).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from ghostcore import aio, logsetup
from ghostcore.errors import GhostError
from ghostlink import node
from ghostlink.config import load_config

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
    p.add_argument(
        "--accept-routes", action="store_true", default=None, help="install the subnet routes peers offer"
    )
    p.add_argument(
        "--pin",
        metavar="sha256:…",
        help="ghostmesh's TLS key, when the auth key does not carry it (`ghostctl server pin`)",
    )
    p.add_argument("--ca-file", metavar="PATH", help="without a pin: CAs for ghostmesh's certificate")
    p.add_argument(
        "--metrics-listen",
        metavar="IP:PORT",
        help="serve Prometheus /metrics, /healthz and /readyz here (e.g. 127.0.0.1:9090; default: off)",
    )
    p.add_argument(
        "--accept-dns",
        type=_bool_flag,
        nargs="?",
        const=True,
        default=None,
        metavar="true|false",
        help="point this host's resolver at the node resolver when the map carries DNS settings "
        "(default: true; --accept-dns=false leaves the host's resolver alone)",
    )
    p.add_argument(
        "--no-port-mapping",
        dest="port_mapping",
        action="store_false",
        default=None,
        help="do not ask the gateway to map WireGuard's port (PCP, NAT-PMP, UPnP IGD)",
    )


def _bool_flag(text: str) -> bool:
    low = text.lower()
    if low in ("true", "yes", "1", "on"):
        return True
    if low in ("false", "no", "0", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


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
        "node.accept_routes": args.accept_routes,
        "node.pin": args.pin,
        "control.ca_file": args.ca_file,
        "traversal.port_mapping": args.port_mapping,
        "metrics.listen": args.metrics_listen,
        "dns.accept": args.accept_dns,
    }


def _say(message: str) -> None:
    print(f"ghostlink: {message}", file=sys.stderr, flush=True)


def _fail(message: str) -> int:
    _say(message)
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
        if args.cmd == "join":
            # no auth key: the server decides (an OIDC server answers with a login URL)
            aio.run(node.join(cfg, args.auth or os.environ.get(AUTH_ENV, ""), _say))
        else:
            aio.run(node.run(cfg, _say))
    except GhostError as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
