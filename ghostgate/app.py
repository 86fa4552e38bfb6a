"""The ``ghostgate`` command: run the STUN/TURN server and the QUIC / TLS relay, or check a config file.

::

    ghostgate --config FILE [--listen HOST:PORT] [--log-level L]
    ghostgate config check --config FILE

Flags override the file and ``GHOSTGATE_*`` environment variables. Any GhostError prints
``ghostgate: <message>`` to stderr and exits 1, without a traceback. When ready it prints
``ghostgate: listening on HOST:PORT (stun, turn, quic relay udp/P, tls relay tcp/P)``, naming what is served
with the bound ports; configured parts not served (TURN and the relay without a secret) are named on the next
line. SIGTERM / SIGINT close every socket and relay connection and exit 0.
uvloop is used when installed.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from ghostcore import aio
from ghostcore.errors import GhostError
from ghostcore.logsetup import configure
from ghostgate import tlscert
from ghostgate.config import GateConfig, load_config, relay_host, relay_ports, served, turn_secret
from ghostgate.relay import RelayServer, start_relay
from ghostgate.server import start_server

log = logging.getLogger("ghostgate")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ghostgate", description="ghost* relay: STUN, TURN, QUIC and TLS relay")
    p.add_argument("--config", type=Path, help="ghostgate.toml (default: built-in defaults)")
    p.add_argument("--listen", help="UDP listen address HOST:PORT (relay.listen)")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="log.level")
    sub = p.add_subparsers(dest="cmd")
    cfg = sub.add_parser("config", help="configuration commands")
    cfg_sub = cfg.add_subparsers(dest="config_cmd", required=True)
    check = cfg_sub.add_parser("check", help="validate a config file and exit")
    check.add_argument("--config", dest="check_config", type=Path, help="the file to check")
    return p


def _describe(cfg: GateConfig, secret: bytes | None, ports: tuple[int, int] | None = None) -> tuple[str, str]:
    serving, missing = served(cfg, secret, ports)
    return ", ".join(serving), "; ".join(missing)


async def _serve(cfg: GateConfig, secret: bytes | None) -> None:
    # before the ready line, so a prompt SIGTERM is clean too
    with aio.stop_on_signals() as stop:
        server = await start_server(cfg, secret)
        relay: RelayServer | None = None
        try:
            if secret is not None:
                relay = await start_relay(cfg, secret)
            host, port = server.address
            ports = None
            if relay is not None:
                ports = (relay.quic_address[1] if relay.quic_address else 0, relay.tcp_address[1])
            serving, missing = _describe(cfg, secret, ports)
            print(f"ghostgate: listening on {host}:{port} ({serving})", file=sys.stderr, flush=True)
            if missing:
                print(f"ghostgate: not served: {missing}", file=sys.stderr, flush=True)
            await stop.wait()
            relays = relay.hub.connections if relay is not None else 0
            log.info(
                "stopping",
                extra={"session": f"allocations={len(server.core.allocations)} relay_connections={relays}"},
            )
        finally:
            if relay is not None:
                await relay.close()
            server.close()


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.cmd == "config":
            path = args.check_config or args.config
            if path is None:
                print("ghostgate: config check needs --config FILE", file=sys.stderr)
                return 2
            checked = load_config(path)
            checked_secret = turn_secret(checked)
            relay_host(checked, checked_secret)
            relay_ports(checked)
            if checked_secret is not None and checked.relay.cert_file:
                tlscert.load(checked.relay.cert_file, checked.relay.key_file)
            serving, missing = _describe(checked, checked_secret)
            print(f"ok: {path}: serves {serving}" + (f"; not served: {missing}" if missing else ""))
            return 0
        cfg = load_config(args.config, flags={"relay.listen": args.listen, "log.level": args.log_level})
        secret = turn_secret(cfg)
        configure(cfg.log.level, cfg.log.format)
        aio.run(_serve(cfg, secret))
        return 0
    except GhostError as err:
        print(f"ghostgate: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
