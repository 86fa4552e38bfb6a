"""Real ghostlink daemons (real client, state dir, trust, rotator) against a real in-process ghostmesh.

Only WireGuard (``FakeBackend``) and netlink (``NoopNet``) are fakes. ``join_member`` does what
``ghostlink join`` does (pinned TLS, GetServerInfo, settle a pending key, Register with the node's own
signature when the auth key is pre-signed, save the state) and starts the daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from pathlib import Path

from ghostcore import lock
from ghostcore.joinkey import parse_join_key, parse_pin
from ghostcore.tlschannel import Trust
from ghostlink.client import CoordClient
from ghostlink.daemon import Daemon
from ghostlink.nodekey import NodeKey
from ghostlink.rotate import KeyRotator, settle_pending
from ghostlink.state import SavedNode, StateDir
from ghostlink.trust import NodeTrust
from ghostlink.wg.fake import FakeBackend
from ghostmesh.server import RunningServer
from tests.component._link_fixtures import NoopNet, wait_for


@dataclass
class Member:
    daemon: Daemon
    backend: FakeBackend
    client: CoordClient
    state: StateDir
    keys: NodeKey
    task: asyncio.Task[None]

    @property
    def pub(self) -> str:
        return self.keys.public.base64()

    def installed(self) -> set[str]:
        """The peer keys this member's WireGuard holds."""
        return set(self.backend.device.peers)


async def join_member(
    srv: RunningServer, auth: str, name: str, state_dir: Path, **daemon_kw: object
) -> Member:
    state = StateDir(state_dir)
    previous = state.saved_node()
    keys = NodeKey(state.key_for_join())
    joined = parse_join_key(auth) if auth else None
    client = CoordClient(srv.target, keys, Trust(pin=parse_pin(srv.tls_pin)))
    await client.connect()
    server_key = await client.pin_server_key()
    await settle_pending(state, client, keys)
    rotation = state.existing_rotation_key() or lock.SigningKey.generate()
    signature = b""
    anchor = previous.lock_anchor if previous is not None else ""
    if joined is not None and joined.credential is not None:
        signature = lock.join_with_credential(joined.credential, keys.public.raw, rotation.public())
        anchor = joined.credential.genesis.hex()
    node = await client.register(joined.key if joined is not None else "", name, signature)
    saved = SavedNode(
        srv.target, server_key.base64(), node.id, node.name, server_pin=srv.tls_pin, lock_anchor=anchor
    )
    state.save(keys.private, saved, rotation)
    trust = NodeTrust(
        state.rotation_key(),
        state.lock_log(),
        anchor=bytes.fromhex(anchor) if anchor else None,
        save=state.save_lock_log,
    )
    backend = FakeBackend(ifname=f"fk{name}")
    daemon = Daemon(
        client,
        backend,
        NoopNet(),
        keys=keys,
        trust=trust,
        listen_port=0,
        rotator=KeyRotator(client, keys, state),
        **daemon_kw,  # type: ignore[arg-type]
    )
    await daemon.start()
    member = Member(daemon, backend, client, state, keys, asyncio.create_task(daemon.run()))
    await wait_for(lambda: daemon.status().connected, what=f"{name} connected")
    return member


async def close_members(*members: Member) -> None:
    for m in members:
        m.daemon.stop()
        m.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await m.task
        await m.daemon.close()
        await m.client.close()
