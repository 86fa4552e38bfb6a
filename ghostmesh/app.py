"""The ``ghostmesh`` command: run the coordination server, or check a config file.

::

    ghostmesh --config FILE [--bind HOST:PORT] [--state-dir DIR] [--admin-socket PATH] [--log-level L]
    ghostmesh config check --config FILE

``config check`` also loads the ``acl_file`` and a configured ``[tls]`` certificate and key, as a start
would. Flags override the file and ``GHOSTMESH_*`` environment variables. Any GhostError at startup prints
``ghostmesh: <message>`` to stderr and exits 1, without a traceback. SIGTERM / SIGINT stop gracefully
(streams closed, database closed). SIGHUP re-reads the config file and applies its ``[dns]`` to running
nodes as map deltas; other changed tables need a restart (:mod:`ghostmesh.reload`). A change the database
could not commit after the state took it in (:meth:`ghostmesh.hub.Hub.break_down`) stops the server the
same way, then prints why and exits 1.
uvloop is used when installed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from ghostcore import aio
from ghostcore.errors import GhostError, Unavailable
from ghostcore.logsetup import configure
from ghostmesh.config import MeshConfig, load_config
from ghostmesh.policy_source import read_policy_file
from ghostmesh.server import RunningServer, start_server
from ghostmesh.tls import load_identity

log = logging.getLogger("ghostmesh")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ghostmesh", description="ghost* coordination server")
    p.add_argument("--config", type=Path, help="ghostmesh.toml (default: built-in defaults)")
    p.add_argument("--bind", help="TCP listen address HOST:PORT (server.bind)")
    p.add_argument("--state-dir", help="directory for the database (server.state_dir)")
    p.add_argument("--admin-socket", help="root-only admin unix socket path (server.admin_socket)")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="log.level")
    sub = p.add_subparsers(dest="cmd")
    cfg = sub.add_parser("config", help="configuration commands")
    cfg_sub = cfg.add_subparsers(dest="config_cmd", required=True)
    check = cfg_sub.add_parser("check", help="validate a config file and exit")
    check.add_argument("--config", dest="check_config", type=Path, help="the file to check")
    return p


async def _serve(cfg: MeshConfig, reload: Callable[[], MeshConfig] | None) -> None:
    running = await start_server(cfg, reload=reload)
    print(
        f"ghostmesh: listening on {running.host}:{running.port} (TLS, key pin {running.tls_pin}) "
        f"admin socket {running.admin_socket}",
        file=sys.stderr,
        flush=True,
    )
    if running.metrics is not None:
        served = running.metrics
        print(
            f"ghostmesh: metrics on http://{served.url_host}:{served.port}/metrics",
            file=sys.stderr,
            flush=True,
        )
    if running.console is not None:
        print(f"ghostmesh: web console on {running.console.url}/", file=sys.stderr, flush=True)
    with aio.stop_on_signals() as stop, _reload_on_sighup(running):
        waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(running.hub.broken.wait())]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            log.info("stopping")
        finally:
            for w in waits:
                w.cancel()
            await running.stop()
    if running.hub.broken_reason:
        raise Unavailable(
            f"stopped: {running.hub.broken_reason}; start ghostmesh again (the database holds every change "
            "committed before)"
        )


@contextlib.contextmanager
def _reload_on_sighup(running: RunningServer) -> Iterator[None]:
    """SIGHUP re-reads the config file (:mod:`ghostmesh.reload`) for as long as the server runs."""
    reloader = running.reloader
    if reloader is None:
        yield
        return
    loop = asyncio.get_running_loop()

    def on_hup() -> None:
        try:
            reloader.reload()
        except Exception:  # a reload must never take the server down
            log.exception("config reload failed")

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    try:
        yield
    finally:
        loop.remove_signal_handler(
            signal.SIGHUP
        )  # which puts back SIGHUP's default action: to end the process
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # a reload asked for while the server stops is ignored


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.cmd == "config":
            path = args.check_config or args.config
            if path is None:
                print("ghostmesh: config check needs --config FILE", file=sys.stderr)
                return 2
            checked = load_config(path)
            if checked.server.acl_file:  # the policy file must be valid too, or the server would not start
                read_policy_file(Path(checked.server.acl_file))
            if checked.tls.cert_file:  # so must a configured certificate and key (a self-signed one is made)
                load_identity(checked.tls, checked.db_path.parent)
            print(f"ok: {path}")
            return 0
        flags = {
            "server.bind": args.bind,
            "server.state_dir": args.state_dir,
            "server.admin_socket": args.admin_socket,
            "log.level": args.log_level,
        }
        # A reload asked for before the handler exists (during the start) or after it is gone (during the
        # stop) must not end the process: SIGHUP's default action would, and systemd would not restart it.
        with contextlib.suppress(ValueError):  # not the main thread (tests calling main): no signals there
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
        cfg = load_config(args.config, flags=flags)
        configure(cfg.log.level, cfg.log.format)
        path = args.config
        aio.run(_serve(cfg, None if path is None else lambda: load_config(path, flags=flags)))
        return 0
    except GhostError as err:
        print(f"ghostmesh: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
