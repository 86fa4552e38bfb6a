"""The wireguard-go backend: a supervised ``wireguard-go -f <ifname>`` child configured over UAPI.

Lifecycle (wireguard-go creates a TUN device and ``/var/run/wireguard/<ifname>.sock``):

* ``up``: start the child in the foreground (``-f`` and ``WG_PROCESS_FOREGROUND=1``) with its output
  piped into our logger, wait (bounded) until the UAPI socket answers ``get=1``, set ``private_key`` and
  ``listen_port`` over UAPI, then set the MTU and bring the link up (:mod:`ghostlink.iproute`).
* ``apply``: one incremental ``set=1`` with only the plan's peers (``uapi_codec``).
* supervision: if the child dies while we did not ask it to, it is restarted (bounded: at most
  ``MAX_RESTARTS`` in ``RESTART_WINDOW`` s), the device is re-programmed from what we applied, and the
  ``on_restart`` given to ``up`` tells the daemon that addresses and routes vanished with the old TUN.
* ``close``: SIGTERM by PID, wait, SIGKILL if needed; the TUN vanishes with the process; remove a
  leftover socket file.
* the host journal (:mod:`ghostlink.hostjournal`): the child is started in a session of its own (a Ctrl-C
  at ghostlink's terminal is ghostlink's to handle), so it outlives a ghostlink killed with SIGKILL. Its PID
  and start time are journaled as soon as it is spawned (again after each restart) and forgotten once it
  stopped; :func:`reap_leftover` stops the one a previous run left, through a pidfd so that a recycled
  PID is never signalled, and only if the process is still that one (start time and argv unchanged).
* ``up`` refuses an interface or a UAPI socket it did not make (one left by a previous run has been
  reaped by then): a WireGuard process serving the socket, or an interface that exists already.

``netns``: only for tests that keep the test process outside a namespace: the child is started with
``ip netns exec <ns>`` and the link calls use ``ip -n <ns>``. Production leaves it ``None``: the
whole ghostlink process runs in the namespace it should configure.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import select
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from ghostcore.errors import ConfigError, Unavailable
from ghostcore.keys import PrivateKey
from ghostlink import iproute
from ghostlink.engine import Plan
from ghostlink.hostjournal import HostJournal, WireGuardGoRecord
from ghostlink.wg import uapi_codec as codec
from ghostlink.wg.base import changes_for, foreign_interface
from ghostlink.wg.uapi import SOCKET_DIR, UapiClient, socket_path

log = logging.getLogger(__name__)

START_TIMEOUT = 5.0  # seconds for the UAPI socket to appear after spawning
STOP_TIMEOUT = 3.0  # seconds between SIGTERM and SIGKILL
MAX_RESTARTS = 5
RESTART_WINDOW = 60.0


def process_identity(pid: int) -> tuple[int, tuple[str, ...]] | None:
    """(start time, argv) of the running process ``pid``, from /proc; None when it is gone (or a zombie).

    The start time is ``/proc/<pid>/stat`` field 22 (clock ticks after boot, proc(5)): with the PID it
    names one process ever, where a PID alone may have been reused.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)", comm may hold spaces and parentheses
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19]), tuple(cmdline.decode(errors="replace").split("\0")[:-1])


async def _exited(pidfd: int, within: float) -> bool:
    """True once the process behind ``pidfd`` exited (a pidfd polls readable then) within ``within`` s."""
    readable, _, _ = await asyncio.to_thread(select.select, [pidfd], [], [], within)
    return bool(readable)


async def _terminate(pidfd: int, pid: int, ifname: str) -> None:
    """SIGTERM, then SIGKILL after ``STOP_TIMEOUT``, through the pidfd: never another process."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            signal.pidfd_send_signal(pidfd, sig)
        except ProcessLookupError:
            return
        if await _exited(pidfd, STOP_TIMEOUT):
            return
        log.warning(
            "wireguard-go pid=%d for %s still runs %.0fs after signal %d", pid, ifname, STOP_TIMEOUT, sig
        )
    raise Unavailable(
        f"the wireguard-go (pid {pid}) a previous ghostlink left for {ifname} survived SIGKILL; "
        f"check what holds it (ps -o stat,wchan -p {pid}), then start ghostlink again"
    )


async def _socket_free(sock: Path) -> bool:
    """True when no WireGuard process serves ``sock`` (a stale file is removed); False when one does."""
    try:
        await UapiClient(sock, timeout=1.0).get()
    except Unavailable:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(sock)  # a dead daemon's leftover (one syscall on a local file: no thread needed)
        return True
    return False


async def reap_leftover(rec: WireGuardGoRecord) -> None:
    """Stop the wireguard-go a previous run journaled, if it still runs, and remove its stale socket.

    The PID is opened as a pidfd first and checked after: if the process behind it still has the journaled
    start time and argv, it is the one that run started (a reused PID has another start time), and the
    signals go through the pidfd, so they reach that process or none.
    """
    ifname = rec.argv[-1]
    try:
        pidfd = os.pidfd_open(rec.pid)
    except ProcessLookupError:
        pidfd = -1
    except OSError as exc:
        raise Unavailable(
            f"cannot check whether pid {rec.pid} is the wireguard-go a previous ghostlink left for {ifname} "
            f"({exc.strerror}); stop it by hand if it is, then start ghostlink again"
        ) from None
    if pidfd >= 0:
        try:
            if process_identity(rec.pid) == (rec.start_time, rec.argv):
                log.warning("stopping wireguard-go pid=%d, left for %s by a previous run", rec.pid, ifname)
                await _terminate(pidfd, rec.pid, ifname)
            else:
                log.info("pid %d is no longer the wireguard-go a previous run started: left alone", rec.pid)
        finally:
            os.close(pidfd)
    if not await _socket_free(Path(rec.socket)):
        log.warning(
            "%s is served by a WireGuard process this ghostlink did not start: left alone", rec.socket
        )


def _link_up(ifname: str, mtu: int, netns: str | None) -> None:
    if not iproute.link_exists(ifname, netns):
        raise Unavailable(f"wireguard-go did not create interface {ifname}; see its log above")
    iproute.set_up(ifname, mtu, netns)


class WireGuardGoBackend:
    name = "wireguard-go"

    def __init__(
        self,
        ifname: str,
        binary: str = "wireguard-go",
        *,
        socket_dir: Path = SOCKET_DIR,
        netns: str | None = None,
        journal: HostJournal | None = None,
    ) -> None:
        self.ifname = ifname
        self.binary = binary
        self.netns = netns
        self._journal = journal  # None: nothing journaled (tests that run the backend alone)
        self.sock = socket_path(ifname, socket_dir)
        self.uapi = UapiClient(self.sock)
        self._on_restart: Callable[[], Awaitable[None]] | None = None
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

    def _wg_argv(self) -> list[str]:
        """wireguard-go's argv (what /proc/<pid>/cmdline shows once it runs)."""
        return [self.binary, "-f", self.ifname]

    def _argv(self) -> Sequence[str]:
        argv = self._wg_argv()
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
        await self._journal_child(self.proc.pid)
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

    async def _journal_child(self, pid: int) -> None:
        """Journal the child just spawned (``ip netns exec`` keeps the PID and start time when it execs)."""
        identity = process_identity(pid)
        if self._journal is None or identity is None:  # none, or it exited already: _spawn reports that
            return
        rec = WireGuardGoRecord(pid, identity[0], tuple(self._wg_argv()), str(self.sock))
        await asyncio.to_thread(self._journal.record_wireguard_go, rec)

    async def _check_stale_socket(self) -> None:
        if not await _socket_free(self.sock):
            raise ConfigError(
                f"wireguard.interface: {self.ifname} is run by a WireGuard process this ghostlink did not "
                f"start ({self.sock}); stop it or choose another --interface"
            )

    async def _program(self) -> None:
        if self._key is None:
            raise Unavailable(f"internal: {self.ifname} programmed before up()")
        await self.uapi.set(codec.encode_set(private_key=self._key, listen_port=self._port))
        await asyncio.to_thread(_link_up, self.ifname, self._mtu, self.netns)

    async def up(
        self,
        private_key: PrivateKey,
        listen_port: int,
        mtu: int,
        on_restart: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._key, self._port, self._mtu = private_key, listen_port, mtu
        self._on_restart = on_restart
        self._closing = False
        await self._check_stale_socket()
        if await asyncio.to_thread(iproute.link_exists, self.ifname, self.netns):
            raise foreign_interface(self.ifname)
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
                await self._check_stale_socket()
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
                if self._on_restart is not None:
                    await self._on_restart()
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
        if self.proc is None:
            return  # nothing started (up refused, or closed already): the socket is not ours to remove
        await self._stop_proc()
        self.sock.unlink(missing_ok=True)
        self.proc = None
        if self._journal is not None:
            await asyncio.to_thread(self._journal.record_wireguard_go, None)
