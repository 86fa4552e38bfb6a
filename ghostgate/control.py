"""The gate's watch of ghostmesh's relay roster (``[control]``): who may use this relay now (the I/O edge).

:class:`ControlWatch` keeps one ``RelayControl.WatchNodes`` call (``proto/ghostmesh/v1/relaycontrol.proto``)
open to ``control.server`` for as long as the gate runs, and feeds each update to the gate's
:class:`ghostgate.nodeset.NodeSet` (pure: what "allowed" means, before the first set and while disconnected,
is written there). What an update takes away goes to ``on_revoked``, which the app wires to the relay hub and
the TURN edge: they close those node keys' connections and delete those node ids' allocations at once.

Trust, both ways: the channel is TLS to ghostmesh's own port, and the gate trusts ghostmesh exactly as
ghostlink and ghostctl do (:mod:`ghostcore.tlschannel`): by ``control.pin`` (``sha256:…``, `ghostctl server
pin`), checked before anything is sent (a mismatch is one line naming both keys, and nothing is sent), or by
CAs (``control.ca_file``, else the system's). ghostmesh trusts the gate by a proof made with the relay secret
they share (:mod:`ghostcore.relaycontrol`), fresh for every attempt (its own time and nonce).

Failures (ghostmesh down or restarting, a refused proof, a wrong pin, an update that does not follow) end
the attempt: the reason is logged as one line (a warning when it changes, debug while it repeats), counted
in :attr:`ControlWatch.counters`, and the watch is opened again after a jittered exponential backoff
(:class:`ghostcore.aio.Backoff`, ``control.reconnect_max`` at most; reset once a full set arrived). The set
in force meanwhile stays as it was. HTTP/2 keepalive pings notice a dead ghostmesh host within ~40 s even
when no FIN arrives. A full set is at most a few messages of ``relayroster.CHUNK`` nodes each.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import Counter
from collections.abc import Callable

import grpc

from ghostcore import relaycontrol, tlschannel
from ghostcore.aio import Backoff
from ghostcore.errors import GhostError
from ghostcore.grpcerr import from_rpc_error
from ghostcore.joinkey import parse_pin
from ghostcore.pb.ghostmesh.v1 import relaycontrol_pb2 as pb
from ghostcore.pb.ghostmesh.v1 import relaycontrol_pb2_grpc as pb_grpc
from ghostgate.config import ControlConfig
from ghostgate.nodeset import NodeSet, Revoked

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 5.0
_OPTIONS = (
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
    ("grpc.use_local_subchannel_pool", 1),  # never share a connection with another channel in this process
)
_HINT = "is ghostmesh running there? (control.server)"


class ControlWatch:
    """One gate's watch of ghostmesh's roster, kept up until :meth:`close`; see the module docstring."""

    def __init__(
        self,
        cfg: ControlConfig,
        secret: bytes,
        name: str,
        roster: NodeSet,
        on_revoked: Callable[[Revoked], None],
        *,
        clock: Callable[[], float] = time.time,
        connect_timeout: float = CONNECT_TIMEOUT,
    ) -> None:
        self.target = cfg.server
        self.name = name
        self.roster = roster
        self._secret = secret
        self._on_revoked = on_revoked
        self._clock = clock
        self._timeout = connect_timeout
        self._trust = tlschannel.Trust(
            pin=parse_pin(cfg.pin, "control.pin") if cfg.pin else None, ca_file=cfg.ca_file or None
        )
        self._backoff = Backoff(initial=0.5, maximum=cfg.reconnect_max)
        self.counters: Counter[str] = Counter()
        self.connected = False  # a watch is open and its full set was received
        self.last_error = ""
        self.synced = asyncio.Event()  # set at every full set (tests wait on it; cleared when a watch ends)
        self._task: asyncio.Task[None] | None = None

    def __repr__(self) -> str:  # the secret stays out
        return f"ControlWatch({self.name!r} -> {self.target}, connected={self.connected}, {self.roster!r})"

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="ghostgate-control")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def _request(self) -> pb.WatchNodesRequest:
        now = int(self._clock())
        nonce = os.urandom(relaycontrol.NONCE_LEN)
        proof = relaycontrol.proof(self._secret, self.name, now, nonce)
        return pb.WatchNodesRequest(gate=self.name, unix_time=now, nonce=nonce, proof=proof)

    async def _run(self) -> None:
        while True:
            self.counters["attempts"] += 1
            try:
                await self._watch()
                reason = "ghostmesh ended the watch"
            except grpc.aio.AioRpcError as exc:
                reason = _describe(exc, self.target)
            except GhostError as err:  # PinMismatch, Unavailable (TLS), ConfigError (CA file), NodeSetError
                reason = str(err)
            self.connected = False
            self.synced.clear()
            delay = self._backoff.next()
            self.counters["failures"] += 1
            level = logging.DEBUG if reason == self.last_error else logging.WARNING
            kept = (
                f"the last set of {len(self.roster)} nodes stays in force"
                if self.roster.synced
                else "until a first set arrives every node with valid credentials is served"
            )
            log.log(level, "control: %s; retrying in %.1f s (%s)", reason, delay, kept)
            self.last_error = reason
            await asyncio.sleep(delay)

    async def _watch(self) -> None:
        # The pin check opens a TLS connection of its own (blocking); a thread keeps the relay loop running.
        setup = await asyncio.to_thread(tlschannel.prepare, self.target, self._trust, self._timeout)
        options = [*setup.options, *_OPTIONS]
        async with grpc.aio.secure_channel(self.target, setup.credentials, options=options) as channel:
            call = pb_grpc.RelayControlStub(channel).WatchNodes(self._request())
            self.roster.begin()
            async for update in call:
                full_sets = self.roster.counters["full_sets"]
                revoked = self.roster.apply(update)
                if self.roster.counters["full_sets"] != full_sets:
                    self._synced()
                if revoked:
                    self.counters["revocations"] += 1
                    self._on_revoked(revoked)

    def _synced(self) -> None:
        if not self.connected or self.last_error:
            log.info("control: watching ghostmesh at %s as %s: %d nodes allowed", self.target, self.name,
                     len(self.roster))  # fmt: skip
        self.connected = True
        self.last_error = ""
        self.counters["full_sets"] += 1
        self._backoff.reset()
        self.synced.set()


def _describe(exc: grpc.aio.AioRpcError, target: str) -> str:
    """One line for a failed watch call."""
    code = exc.code()
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return (
            f"ghostmesh at {target} does not serve RelayControl (it needs [[relay.regions]] and relay.secret)"
        )
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return str(from_rpc_error(exc, target, _HINT))
    if code == grpc.StatusCode.ALREADY_EXISTS:  # two gates of one name end each other's watch in turn
        return (
            f"ghostmesh at {target} ended the watch: a newer one of the same gate name took over (does "
            "another gate use this control.name? give each gate its own)"
        )
    return f"ghostmesh at {target} refused the watch: {from_rpc_error(exc, target)}"
