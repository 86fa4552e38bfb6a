"""ghostctl's entry point: global flags, the command tree, and the single error exit.

Usage::

    ghostctl [--output table|json] [--socket PATH] [--server TARGET] [--api-key KEY] [--timeout S] COMMAND

Global flags (each also an environment variable; flags win) may stand before or after the command:

=================  ======================  =====================================================
flag               environment             meaning
=================  ======================  =====================================================
``--output``       ``GHOSTCTL_OUTPUT``     ``table`` (default, for people) or ``json`` (scripts)
``--socket``       ``GHOSTCTL_SOCKET``     ghostlink's local socket for node commands
                                           (default /var/run/ghostlink/ghostlink.sock)
``--server``       ``GHOSTCTL_SERVER``     ghostmesh admin endpoint: ``unix:/path`` (default
                                           unix:/var/run/ghostmesh/admin.sock) or ``host:port``
``--api-key``      ``GHOSTCTL_API_KEY``    API key for ``--server host:port`` (sent as
                                           ``authorization: Bearer`` over TLS; never printed); as
                                           ``apikeys create`` prints it, it carries the server's pin
``--pin``          ``GHOSTCTL_PIN``        the server's TLS key (``sha256:…``, ``server pin``) when
                                           the API key does not carry it
``--ca-file``      ``GHOSTCTL_CA_FILE``    without a pin: CAs for the server's certificate
                                           (default: the system's)
``--timeout``      ``GHOSTCTL_TIMEOUT``    seconds per call (default 5)
=================  ======================  =====================================================

Commands: ``status``, ``peers``, ``netcheck`` (node, ``ghostctl.local_node``), ``ping`` (node,
``ghostctl.ping``), ``dns status`` / ``dns query`` (node, ``ghostctl.dns_cmds``), ``keys rotate`` (node,
``ghostctl.keys``); ``users``, ``nodes``, ``devices``, ``authkeys``, ``apikeys``, ``audit``, ``acl``,
``route``, ``lock``, ``server`` (server, one module each). Exit codes are listed in ``ghostctl.errors``. Set
``GHOSTCTL_DEBUG=1`` to get a traceback for an unexpected internal error.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Sequence

from ghostcore import errors as e
from ghostctl import (
    acl,
    apikeys,
    audit,
    authkeys,
    devices,
    dns_cmds,
    keys,
    local_node,
    lock,
    nodes,
    ping,
    routes,
    server,
    users,
)
from ghostctl.context import DEFAULT_SERVER, DEFAULT_SOCKET, DEFAULT_TIMEOUT, Context
from ghostctl.errors import EXIT_GENERIC, EXIT_INTERRUPTED, EXIT_USAGE, exit_code_for, redact
from ghostctl.output import OUTPUT_MODES

PROG = "ghostctl"


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"expected seconds between 0 and 3600, got {text!r}")
    return value


def _add_globals(p: argparse.ArgumentParser, *, suppress: bool) -> None:
    """The global flags; on sub-commands with SUPPRESS defaults so only a given flag overrides."""

    def d(value: object) -> object:
        return argparse.SUPPRESS if suppress else value

    env = os.environ
    p.add_argument(
        "--output",
        "-o",
        choices=OUTPUT_MODES,
        default=d(env.get("GHOSTCTL_OUTPUT", "table")),
        help="table for people (default), json for scripts [GHOSTCTL_OUTPUT]",
    )
    p.add_argument(
        "--socket",
        metavar="PATH",
        default=d(env.get("GHOSTCTL_SOCKET", DEFAULT_SOCKET)),
        help=f"ghostlink's local socket, for status/peers (default {DEFAULT_SOCKET}) [GHOSTCTL_SOCKET]",
    )
    p.add_argument(
        "--server",
        metavar="TARGET",
        default=d(env.get("GHOSTCTL_SERVER", DEFAULT_SERVER)),
        help=f"ghostmesh admin: unix:/path or host:port (default {DEFAULT_SERVER}) [GHOSTCTL_SERVER]",
    )
    p.add_argument(
        "--api-key",
        metavar="KEY",
        default=d(env.get("GHOSTCTL_API_KEY") or None),
        help="API key for --server host:port; prefer the environment variable [GHOSTCTL_API_KEY]",
    )
    p.add_argument(
        "--pin",
        metavar="PIN",
        default=d(env.get("GHOSTCTL_PIN") or None),
        help="the server's TLS key pin sha256:… for --server host:port [GHOSTCTL_PIN]",
    )
    p.add_argument(
        "--ca-file",
        metavar="PATH",
        default=d(env.get("GHOSTCTL_CA_FILE") or None),
        help="CA certificates for --server host:port without a pin [GHOSTCTL_CA_FILE]",
    )
    p.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=_positive_float,
        default=d(env.get("GHOSTCTL_TIMEOUT", DEFAULT_TIMEOUT)),
        help=f"deadline per call (default {DEFAULT_TIMEOUT:g}) [GHOSTCTL_TIMEOUT]",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="ghost* control: node status and peers; users, nodes, auth and API keys on ghostmesh.",
        epilog="exit codes: 0 ok, 1 error, 2 usage, 3 auth, 4 not found, 5 unavailable, 6 conflict, "
        "7 verification failed",
    )
    _add_globals(parser, suppress=False)
    common = argparse.ArgumentParser(add_help=False)
    _add_globals(common, suppress=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    local_node.register(sub, common)
    ping.register(sub, common)
    dns_cmds.register(sub, common)
    keys.register(sub, common)
    users.register(sub, common)
    nodes.register(sub, common)
    devices.register(sub, common)
    authkeys.register(sub, common)
    apikeys.register(sub, common)
    audit.register(sub, common)
    acl.register(sub, common)
    routes.register(sub, common)
    lock.register(sub, common)
    server.register(sub, common)
    return parser


def _parse(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    args = parser.parse_args(argv)
    if args.output not in OUTPUT_MODES:  # an environment default is not checked by argparse
        parser.error(f"GHOSTCTL_OUTPUT: expected one of {', '.join(OUTPUT_MODES)}, got {args.output!r}")
    if isinstance(args.timeout, str):
        try:
            args.timeout = _positive_float(args.timeout)
        except argparse.ArgumentTypeError as exc:
            parser.error(f"GHOSTCTL_TIMEOUT: {exc}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ghostctl command; returns the exit code (see ``ghostctl.errors``)."""
    parser = build_parser()
    try:
        args = _parse(parser, list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2), message already printed
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    argv_list = list(sys.argv[1:] if argv is None else argv)
    # "acl check" runs offline unless a server was asked for by name (flag or environment)
    args.server_given = "GHOSTCTL_SERVER" in os.environ or any(
        a == "--server" or a.startswith("--server=") for a in argv_list
    )
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    ctx = Context(
        output_mode=args.output,
        socket_path=args.socket,
        server=args.server,
        api_key=args.api_key,
        pin=args.pin,
        ca_file=args.ca_file,
        timeout=float(args.timeout),
    )
    try:
        code: int = args.func(ctx, args)
        return code
    except e.GhostError as exc:
        print(f"{PROG}: {redact(str(exc), ctx.api_key)}", file=sys.stderr)
        return exit_code_for(exc)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # a bug: one line, not a traceback, unless asked for
        if os.environ.get("GHOSTCTL_DEBUG") == "1":
            traceback.print_exc()
        msg = redact(f"{type(exc).__name__}: {exc}", ctx.api_key)
        print(f"{PROG}: internal error: {msg} (set GHOSTCTL_DEBUG=1 for details)", file=sys.stderr)
        return EXIT_GENERIC
    finally:
        ctx.close()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
