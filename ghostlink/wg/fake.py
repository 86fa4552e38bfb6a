"""An in-memory WireGuard backend for component tests of the daemon.

It keeps the device the way WireGuard would (``uapi_codec.apply_changes``), encodes every apply through
the real UAPI codec (so a test sees exactly the request wireguard-go would get, and ``replace_peers``
could never slip through), and models sessions: a peer's session id is set when the peer is created and
bumped whenever a change names that peer. "An unchanged peer was never touched" is then
``fake.touches[key] == 1`` and an unchanged ``fake.sessions[key]``.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from ghostcore.keys import PrivateKey
from ghostlink.engine import Plan
from ghostlink.wg import uapi_codec as codec
from ghostlink.wg.base import changes_for


@dataclass
class FakeBackend:
    ifname: str = "ghost0"
    name: str = "fake"
    device: codec.DeviceState = field(default_factory=codec.DeviceState)
    ops: list[tuple[str, object]] = field(default_factory=list)
    requests: list[bytes] = field(default_factory=list)  # every set=1 request, as UAPI bytes
    touches: Counter[str] = field(default_factory=Counter)
    sessions: dict[str, int] = field(default_factory=dict)
    is_up: bool = False
    closed: bool = False
    fail_next_apply: Exception | None = None
    _session_ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    async def up(
        self,
        private_key: PrivateKey,
        listen_port: int,
        mtu: int,
        on_restart: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.ops.append(("up", (listen_port, mtu)))
        self.device = codec.DeviceState(
            listen_port=listen_port or 51820, has_private_key=True, peers=dict(self.device.peers)
        )
        self.is_up = True

    async def apply(self, plan: Plan) -> None:
        if self.fail_next_apply is not None:
            exc, self.fail_next_apply = self.fail_next_apply, None
            raise exc
        changes = changes_for(plan)
        if not changes:
            return
        req = codec.encode_set(changes)
        _, decoded = codec.parse_set(req.decode())  # round-trip through the wire format
        self.requests.append(req)
        for c in decoded:
            self.ops.append(("remove" if c.remove else "add" if c.create else "update", c))
            self.touches[c.public_key] += 1
            if c.remove:
                self.sessions.pop(c.public_key, None)
            else:
                self.sessions[c.public_key] = next(self._session_ids)
        self.device = codec.apply_changes(self.device, decoded)

    async def read(self) -> codec.DeviceState:
        return self.device

    async def set_private_key(self, private_key: PrivateKey) -> None:
        req = codec.encode_set(private_key=private_key)
        self.requests.append(req)
        self.ops.append(("private_key", private_key.public_key().base64()))

    async def close(self) -> None:
        self.ops.append(("close", None))
        self.closed = True
        self.is_up = False
