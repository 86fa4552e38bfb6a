"""The ``ghostgate`` command: run the STUN/TURN server and the QUIC / TLS relay, or check a config file.

::

    ghostgate --config FILE [--listen HOST:PORT] [--log-level L]
    ghostgate config check --config FILE
    ghostgate config pin --config FILE

Flags override the file and ``GHOSTGATE_*`` environment variables. Any GhostError prints
``ghostgate: <message>`` to stderr and exits 1, without a traceback. When ready it prints
``ghostgate: listening on HOST:PORT (stun, turn, quic relay udp/P, tls relay tcp/P)``, naming what is served
with the bound ports; configured parts not served (TURN and the relay without a secret) are named on the next
line. ``config pin`` prints the pin of the relay certificate (``sha256:…``), which ghostmesh needs in the
region's ``tls_pin`` only for a gate with its own ``relay.cert_file`` (it computes the default one itself).
With ``[control]`` the gate also watches ghostmesh for the nodes allowed on it (:mod:`ghostgate.control`)
and closes the relay connections and TURN allocations of nodes that leave that set; ``config check``
validates the table (and that a secret is there to prove the gate with).
SIGTERM / SIGINT close every socket and relay connection and exit 0.
uvloop is used when installed.
"""

from __future__ import annotations

import argparse
import logging
import socket
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from ghostcore import aio, tlscert
from ghostcore.errors import GhostError
from ghostcore.fdlimit import ensure_open_files
from ghostcore.logsetup import configure
from ghostcore.metrics_http import MetricsServer
from ghostgate import metrics
from ghostgate.config import (
    GateConfig,
    check_control,
    control_name,
    load_config,
    relay_cert,
    relay_host,
    relay_ports,
    served,
    turn_secret,
)
from ghostgate.control import ControlWatch
from ghostgate.nodeset import NodeSet, Revoked
from ghostgate.relay import RelayServer, start_relay
from ghostgate.turn_edge import TurnEdge, start_turn

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
    pin = cfg_sub.add_parser("pin", help="print the relay certificate's pin (for ghostmesh's tls_pin)")
    pin.add_argument("--config", dest="check_config", type=Path, help="the gate's config file")
    return p


def _describe(cfg: GateConfig, secret: bytes | None, ports: tuple[int, int] | None = None) -> tuple[str, str]:
    serving, missing = served(cfg, secret, ports)
    return ", ".join(serving), "; ".join(missing)


# Descriptors besides the limited ones: the listening sockets, logs, the event loop's own, some slack.
FD_MARGIN = 256


def _open_files_needed(cfg: GateConfig, secret: bytes | None) -> int:
    """One UDP socket per TURN allocation and one per relay connection, at their limits, plus a margin."""
    if secret is None:  # STUN only: no allocations, no relay
        return FD_MARGIN
    return cfg.turn.max_allocations + cfg.relay.max_connections + FD_MARGIN


def revoker(turn: TurnEdge, relay: RelayServer | None) -> Callable[[Revoked], None]:
    """What the control watch calls when nodes leave the set: close their relay connections and delete
    their TURN allocations, at once."""

    def revoke(revoked: Revoked) -> None:
        conns = relay.hub.revoke(revoked) if relay is not None else 0
        allocations = turn.revoke(revoked)
        log.log(
            logging.INFO if conns or allocations else logging.DEBUG,
            "revoked: %d relay connections, %d TURN allocations (%d keys, %d nodes left the set)",
            conns, allocations, len(revoked.keys), len(revoked.users),
        )  # fmt: skip

    return revoke


async def _serve(cfg: GateConfig, secret: bytes | None) -> None:
    ensure_open_files(_open_files_needed(cfg, secret), "turn.max_allocations + relay.max_connections")
    roster = NodeSet() if cfg.control.server and secret is not None else None
    name = control_name(cfg, socket.gethostname()) if roster is not None else ""
    # before the ready line, so a prompt SIGTERM is clean too
    with aio.stop_on_signals() as stop:
        turn = await start_turn(cfg, secret, roster=roster)
        relay: RelayServer | None = None
        watch: ControlWatch | None = None
        served: MetricsServer | None = None
        try:
            if secret is not None:
                relay = await start_relay(cfg, secret, roster=roster)
            if roster is not None and secret is not None:
                watch = ControlWatch(cfg.control, secret, name, roster, revoker(turn, relay))
                watch.start()
            host, port = turn.address
            ports = None
            if relay is not None:
                ports = (relay.quic_address[1] if relay.quic_address else 0, relay.tcp_address[1])
            served = await metrics.serve(cfg, turn, relay)
            serving, missing = _describe(cfg, secret, ports)
            print(f"ghostgate: listening on {host}:{port} ({serving})", file=sys.stderr, flush=True)
            if missing:
                print(f"ghostgate: not served: {missing}", file=sys.stderr, flush=True)
            if served is not None:
                print(
                    f"ghostgate: metrics on http://{served.url_host}:{served.port}/metrics",
                    file=sys.stderr,
                    flush=True,
                )
            await stop.wait()
            relays = relay.hub.connections if relay is not None else 0
            log.info(
                "stopping",
                extra={"session": f"allocations={len(turn.core.allocations)} relay_connections={relays}"},
            )
        finally:
            if served is not None:
                await served.close()
            if watch is not None:
                await watch.close()
            if relay is not None:
                await relay.close()
            turn.close()


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.cmd == "config":
            path = args.check_config or args.config
            if path is None:
                print(f"ghostgate: config {args.config_cmd} needs --config FILE", file=sys.stderr)
                return 2
            checked = load_config(path)
            checked_secret = turn_secret(checked)
            if args.config_cmd == "pin":
                if checked_secret is None:
                    print(f"ghostgate: {path}: no turn.secret: the relay is not served", file=sys.stderr)
                    return 1
                print(tlscert.fingerprint(relay_cert(checked, checked_secret).certificate))
                return 0
            relay_host(checked, checked_secret)
            relay_ports(checked)
            check_control(checked, checked_secret)
            if checked.control.server:
                control_name(checked, socket.gethostname())
            if checked_secret is not None and checked.relay.cert_file:
                relay_cert(checked, checked_secret)
            serving, missing = _describe(checked, checked_secret)
            print(f"ok: {path}: serves {serving}" + (f"; not served: {missing}" if missing else ""))
            return 0
        cfg = load_config(args.config, flags={"relay.listen": args.listen, "log.level": args.log_level})
        secret = turn_secret(cfg)
        check_control(cfg, secret)
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
