"""The wireguard-go backend: a supervised ``wireguard-go -f <ifname>`` child configured over UAPI.

Lifecycle (wireguard-go creates a TUN device and ``/var/run/wireguard/<ifname>.sock``):

* ``up``: start the child in the foreground (``-f`` and ``WG_PROCESS_FOREGROUND=1``) with its output
  piped into our logger, wait (bounded) until the UAPI socket answers ``get=1``, set ``private_key`` and
  ``listen_port`` over UAPI, then set the MTU and bring the link up via netlink (pyroute2).
* ``apply``: one incremental ``set=1`` with only the plan's peers (``uapi_codec``).
* supervision: if the child dies while we did not ask it to, it is restarted (bounded: at most
  ``MAX_RESTARTS`` in ``RESTART_WINDOW`` s), the device is re-programmed from what we applied, and
  ``on_restart`` tells the daemon that addresses and routes vanished with the old TUN.
* ``close``: SIGTERM by PID, wait, SIGKILL if needed; the TUN vanishes with the process; remove a
  leftover socket file.

``netns``: only for tests that keep the test process outside a namespace: the child is started with
``ip netns exec <ns>`` and netlink calls use ``IPRoute(netns=ns)``. Production leaves it ``None``: the
whole ghostlink process runs in the namespace it should configure.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from ghostcore.errors import ConfigError, Unavailable
from ghostcore.keys import PrivateKey
from ghostlink.engine import Plan
from ghostlink.wg import uapi_codec as codec
from ghostlink.wg.base import changes_for
from ghostlink.wg.uapi import SOCKET_DIR, UapiClient, socket_path

log = logging.getLogger(__name__)

START_TIMEOUT = 5.0  # seconds for the UAPI socket to appear after spawning
STOP_TIMEOUT = 3.0  # seconds between SIGTERM and SIGKILL
MAX_RESTARTS = 5
RESTART_WINDOW = 60.0


def _iproute(netns: str | None) -> Any:
    from pyroute2 import IPRoute  # noqa: PLC0415 - imported lazily: unit tests never need netlink

    return IPRoute(netns=netns) if netns else IPRoute()


def _link_up(ifname: str, mtu: int, netns: str | None) -> None:
    with _iproute(netns) as ip:
        idx = ip.link_lookup(ifname=ifname)
        if not idx:
            raise Unavailable(f"wireguard-go did not create interface {ifname}; see its log above")
        ip.link("set", index=idx[0], mtu=mtu, state="up")


class WireGuardGoBackend:
    name = "wireguard-go"

    def __init__(
        self,
        ifname: str,
        binary: str = "wireguard-go",
        *,
        socket_dir: Path = SOCKET_DIR,
        netns: str | None = None,
        on_restart: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.ifname = ifname
        self.binary = binary
        self.netns = netns
        self.sock = socket_path(ifname, socket_dir)
        self.uapi = UapiClient(self.sock)
        self.on_restart = on_restart
        self.proc: asyncio.subprocess.Process | None = None
        self._closing = False
        self._supervisor: asyncio.Task[None] | None = None
        self._log_tasks: list[asyncio.Task[None]] = []
        self._key: PrivateKey | None = None
        self._port = 0
        self._mtu = 1280
        # What we programmed, so a restarted child can be given the same peers.
        self._device = codec.DeviceState()
        self._restarts: list[float] = []

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def _argv(self) -> Sequence[str]:
        argv = [self.binary, "-f", self.ifname]
        return ["ip", "netns", "exec", self.netns, *argv] if self.netns else argv

    async def _pump(self, stream: asyncio.StreamReader | None) -> None:
        if stream is None:
            return
        while line := await stream.readline():
            text = line.decode(errors="replace").rstrip()
            # "no known endpoint" repeats every keepalive for a peer whose address nobody reported yet:
            # expected while a peer has no endpoint, so not worth a warning.
            benign = "no known endpoint" in text
            level = logging.WARNING if text.startswith("ERROR") and not benign else logging.DEBUG
            log.log(level, "wireguard-go[%s]: %s", self.ifname, text)

    async def _spawn(self) -> None:
        await self._check_stale_socket()
        env = dict(os.environ, WG_PROCESS_FOREGROUND="1", LOG_LEVEL=os.environ.get("LOG_LEVEL", "error"))
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *self._argv(),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=env,
                start_new_session=True,  # our SIGINT at a terminal is ours to handle, not the child's
            )
        except FileNotFoundError:
            raise ConfigError(
                f"wireguard.wireguard_go: {self.binary!r} not found; install wireguard-go or set its path"
            ) from None
        self._log_tasks = [asyncio.create_task(self._pump(s)) for s in (self.proc.stdout, self.proc.stderr)]
        log.info("started wireguard-go pid=%d for %s", self.proc.pid, self.ifname)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc.returncode is not None:
                await asyncio.gather(*self._log_tasks, return_exceptions=True)
                raise Unavailable(
                    f"wireguard-go exited with status {self.proc.returncode} while creating {self.ifname}; "
                    "see its log above (is /dev/net/tun available? does the interface exist already?)"
                )
            if self.sock.exists():
                try:
                    await self.uapi.get()
                    return
                except Unavailable:
                    pass
            if time.monotonic() > deadline:
                await self._stop_proc()
                raise Unavailable(f"wireguard-go did not open {self.sock} within {START_TIMEOUT}s")
            await asyncio.sleep(0.05)

    async def _check_stale_socket(self) -> None:
        if not self.sock.exists():
            return
        try:
            await UapiClient(self.sock, timeout=1.0).get()
        except Unavailable:
            self.sock.unlink(missing_ok=True)  # a dead daemon's leftover
            return
        raise ConfigError(
            f"wireguard.interface: {self.ifname} is already run by another WireGuard process ({self.sock}); "
            "stop it or choose another interface"
        )

    async def _program(self) -> None:
        if self._key is None:
            raise Unavailable(f"internal: {self.ifname} programmed before up()")
        await self.uapi.set(codec.encode_set(private_key=self._key, listen_port=self._port))
        await asyncio.to_thread(_link_up, self.ifname, self._mtu, self.netns)

    async def up(self, private_key: PrivateKey, listen_port: int, mtu: int) -> None:
        self._key, self._port, self._mtu = private_key, listen_port, mtu
        self._closing = False
        await self._spawn()
        try:
            await self._program()
            # Keep the port WireGuard picked (listen_port 0), so a restarted child binds the same one
            # and the endpoints peers know stay valid.
            self._port = (await self.uapi.get()).listen_port or listen_port
        except BaseException:
            await self.close()
            raise
        self._supervisor = asyncio.create_task(self._supervise())

    async def _supervise(self) -> None:
        while not self._closing and self.proc is not None:
            rc = await self.proc.wait()
            if self._closing:
                return
            now = time.monotonic()
            self._restarts = [t for t in self._restarts if now - t < RESTART_WINDOW] + [now]
            if len(self._restarts) > MAX_RESTARTS:
                log.error(
                    "wireguard-go for %s died %d times in %.0fs; giving up",
                    self.ifname,
                    len(self._restarts),
                    RESTART_WINDOW,
                )
                return
            log.warning("wireguard-go for %s exited (status %s); restarting", self.ifname, rc)
            try:
                await self._spawn()
                await self._program()
                changes = [
                    codec.PeerChange(
                        p.public_key,
                        create=True,
                        endpoint=p.endpoint,
                        allowed_ips=p.allowed_ips,
                        keepalive=p.keepalive,
                    )
                    for p in self._device.peers.values()
                ]
                if changes:
                    await self.uapi.set(codec.encode_set(changes))
                if self.on_restart is not None:
                    await self.on_restart()
            except Exception:
                log.exception("restarting wireguard-go for %s failed", self.ifname)
                await asyncio.sleep(1.0)

    async def apply(self, plan: Plan) -> None:
        changes = changes_for(plan)
        if not changes:
            return
        await self.uapi.set(codec.encode_set(changes))
        self._device = codec.apply_changes(self._device, changes)

    async def read(self) -> codec.DeviceState:
        return await self.uapi.get()

    async def set_private_key(self, private_key: PrivateKey) -> None:
        # ``private_key=`` alone: wireguard-go keeps its peers and receive keypairs (see ghostlink.rotate).
        await self.uapi.set(codec.encode_set(private_key=private_key))
        self._key = private_key  # a restarted wireguard-go is programmed with the new key

    async def _stop_proc(self) -> None:
        proc = self.proc
        if proc is None:
            return
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), STOP_TIMEOUT)
            except TimeoutError:
                log.warning("wireguard-go pid=%d ignored SIGTERM; killing it", proc.pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                await proc.wait()
        for t in self._log_tasks:
            t.cancel()
        await asyncio.gather(*self._log_tasks, return_exceptions=True)
        self._log_tasks = []

    async def close(self) -> None:
        self._closing = True
        if self._supervisor is not None and self._supervisor is not asyncio.current_task():
            self._supervisor.cancel()
            await asyncio.gather(self._supervisor, return_exceptions=True)
            self._supervisor = None
        await self._stop_proc()
        self.sock.unlink(missing_ok=True)
        self.proc = None
