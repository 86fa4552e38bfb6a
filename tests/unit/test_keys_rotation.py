"""Key rotation, pure parts and the node's flow with fakes (no sockets, no sleeps).

- the plan for a peer whose key changed under the same node id: replaced, same allowed IPs, and with a
  persistent keepalive (adding it makes WireGuard handshake with the new key at once: ghostlink.rotate);
- ``Daemon.rotate_key`` (``KeyRotator.rotate``): the order of the steps (pending key on disk before
  WireGuard switches; proofs switch before the promoting ReportStatus; node.key replaced last), and nothing
  changes when RotateKey is refused;
- crash recovery: a leftover pending key is used if ghostmesh accepts it, dropped if it refuses it, kept
  if ghostmesh cannot be reached;
- ghostmesh's State: pending key stored, promoted by proof, refused when taken; nothing written on error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest

from ghostcore.errors import AuthError, ConfigError, Conflict, InvalidArgument, NotFound, Unavailable
from ghostcore.keys import PrivateKey
from ghostcore.lock import SigningKey
from ghostcore.pb.ghostmesh.v1 import coordination_pb2
from ghostlink import engine
from ghostlink.client import CoordClient, StatusReport
from ghostlink.config import load_config
from ghostlink.daemon import Daemon
from ghostlink.nodekey import NodeKey
from ghostlink.rotate import KeyRotator, settle_pending
from ghostlink.state import SavedNode, StateDir
from ghostlink.trust import NodeTrust
from ghostlink.wg.fake import FakeBackend
from ghostmesh.changes import NodeChanged
from ghostmesh.state import State, StateConfig
from ghostmesh.store.sqlite import SqliteStore

T0 = 1_700_000_000.0


def _same(a: PrivateKey | None, b: PrivateKey | None) -> bool:
    return a is not None and b is not None and a.public_key() == b.public_key()


def _info(node_id: int, key: str) -> engine.NodeInfo:
    return engine.NodeInfo(node_id, f"n{node_id}", "u", key, (f"100.64.0.{node_id}",), (), (), True, 0, 0)


def test_a_rekeyed_peer_is_replaced_with_the_same_allowed_ips_and_a_keepalive() -> None:
    k = [PrivateKey.generate().public_key().base64() for _ in range(4)]
    before = {1: _info(1, k[0])}
    after = {1: _info(1, k[3])}
    nm_before = engine.NetMap(self_node=_info(9, PrivateKey.generate().public_key().base64()))
    nm_before.peers = {1: _with_ips(before[1])}
    nm_after = engine.NetMap(self_node=nm_before.self_node, peers={1: _with_ips(after[1])})
    p = engine.plan(engine.desired_state(nm_before), engine.desired_state(nm_after))
    assert p.peers_remove == (k[0],)
    assert [(s.public_key, s.allowed_ips) for s in p.peers_add] == [(k[3], ("100.64.0.1/32",))]
    assert p.peers_add[0].keepalive > 0  # the immediate keepalive is what starts the new handshake


def _with_ips(n: engine.NodeInfo) -> engine.NodeInfo:
    eps = ("192.0.2.1:41641",)  # a running node's: the keepalive comes with an endpoint
    return engine.NodeInfo(n.id, n.name, n.user, n.node_key, n.addresses, ("100.64.0.1/32",), eps, True, 0, 0)


class Recorder(StateDir):
    def __init__(self, path: Path, events: list[tuple[str, str]]) -> None:
        super().__init__(path)
        self.events = events

    def save_pending(self, key: PrivateKey) -> None:
        super().save_pending(key)
        self.events.append(("save_pending", key.public_key().base64()))

    def commit_key(self, key: PrivateKey, now: float) -> None:
        super().commit_key(key, now)
        self.events.append(("commit", key.public_key().base64()))


class FakeClient:
    """What KeyRotator / settle_pending / the daemon's reports use of CoordClient, recording calls."""

    def __init__(self, keys: NodeKey, events: list[tuple[str, str]]) -> None:
        self.keys = keys
        self.target = "ghostmesh.test:7777"
        self.events = events
        self.rotate_error: Exception | None = None
        self.report_error: Exception | None = None
        self.reports: list[StatusReport] = []

    async def rotate_key(self, new: PrivateKey, signature: bytes = b"") -> coordination_pb2.Node:
        if self.rotate_error is not None:
            raise self.rotate_error
        self.events.append(("rotate_key", new.public_key().base64()))
        return coordination_pb2.Node(id=1)

    async def report_status(self, report: StatusReport, key: PrivateKey | None = None) -> None:
        if self.report_error is not None:
            raise self.report_error
        self.reports.append(report)
        self.events.append(("report", (key or self.keys.private).public_key().base64()))


class FakeNet:
    async def local_endpoints(self, port: int) -> list[str]:
        return ["192.0.2.5:41641"]


class RecordingBackend(FakeBackend):
    def __init__(self, events: list[tuple[str, str]], state: StateDir) -> None:
        super().__init__()
        self.events = events
        self.state = state
        self.key_seen_pending: list[bool] = []

    async def set_private_key(self, private_key: PrivateKey) -> None:
        # Crash safety: the new key must already be on disk when WireGuard starts using it.
        self.key_seen_pending.append(_same(self.state.pending_key(), private_key))
        await super().set_private_key(private_key)
        self.events.append(("wg_key", private_key.public_key().base64()))


@dataclass
class Rig:
    daemon: Daemon
    rotator: KeyRotator
    keys: NodeKey
    client: FakeClient
    state: Recorder
    backend: RecordingBackend
    events: list[tuple[str, str]]


def _setup(tmp_path: Path) -> Rig:
    events: list[tuple[str, str]] = []
    keys = NodeKey(PrivateKey.generate())
    state = Recorder(tmp_path / "state", events)
    server_key = PrivateKey.generate().public_key().base64()
    state.save(keys.private, SavedNode("ghostmesh.test:7777", server_key, 1, "n1"))
    client = FakeClient(keys, events)
    coord = cast(CoordClient, client)
    backend = RecordingBackend(events, state)
    rotator = KeyRotator(coord, keys, state, clock=lambda: T0)
    daemon = Daemon(
        coord,
        backend,
        cast(Any, FakeNet()),
        keys=keys,
        trust=NodeTrust(SigningKey.generate()),
        listen_port=41641,
        advertise_routes=["10.1.1.0/24"],
        rotator=rotator,
    )
    return Rig(daemon, rotator, keys, client, state, backend, events)


async def test_rotate_runs_the_steps_in_order(tmp_path: Path) -> None:
    r = _setup(tmp_path)
    old_pub = r.keys.public
    old, new = await r.daemon.rotate_key()
    assert old == old_pub
    n = new.base64()
    assert r.events == [("rotate_key", n), ("save_pending", n), ("wg_key", n), ("report", n), ("commit", n)]
    assert r.backend.key_seen_pending == [True]
    # Only ``private_key=`` went to WireGuard: no peer, no port, never replace_peers.
    assert r.backend.requests[-1].decode().splitlines()[:2] == ["set=1", f"private_key={_hex_of(r.backend)}"]
    assert len(r.backend.requests[-1].decode().strip().splitlines()) == 2
    assert r.keys.public == new  # what the client proves with and the daemon reports
    assert r.daemon.status().node_key == n
    assert r.state.existing_key() is not None
    assert r.state.existing_key().public_key() == new  # type: ignore[union-attr]
    assert r.state.pending_key() is None
    assert json.loads(r.state.node_path.read_text())["key_created"] == T0
    assert r.state.key_path.stat().st_mode & 0o777 == 0o600
    # The promoting report is the node's whole status, built when it was sent.
    assert r.client.reports == [StatusReport(("192.0.2.5:41641",), ("10.1.1.0/24",))]


def _hex_of(backend: FakeBackend) -> str:
    return backend.requests[-1].decode().splitlines()[1].split("=", 1)[1]


async def test_refused_rotation_changes_nothing(tmp_path: Path) -> None:
    r = _setup(tmp_path)
    before = r.keys.private
    r.client.rotate_error = AuthError("key rotation refused: node key x… failed its proof of possession")
    with pytest.raises(AuthError, match="key rotation refused"):
        await r.daemon.rotate_key()
    assert r.events == []
    assert r.backend.requests == []
    assert r.keys.private is before
    assert r.state.pending_key() is None
    assert _same(r.state.existing_key(), before)


async def test_failed_promotion_leaves_pending_key_that_resume_finishes(tmp_path: Path) -> None:
    r = _setup(tmp_path)
    old_key = r.keys.private
    r.client.report_error = Unavailable("ghostmesh unreachable")
    with pytest.raises(Unavailable):
        await r.daemon.rotate_key()
    pending = r.state.pending_key()
    assert pending is not None
    assert _same(r.state.existing_key(), old_key)  # node.key still the old one: it is replaced last
    r.client.report_error = None
    await r.rotator.resume(r.daemon)
    assert r.state.pending_key() is None
    assert _same(r.state.existing_key(), pending)
    assert _same(r.keys.private, pending)
    # Proven with the pending key: the last report the daemon sent (none yet: the routes, no endpoints).
    assert r.client.reports[-1] == StatusReport((), ("10.1.1.0/24",))


async def test_resume_refused_switches_back_to_old_key(tmp_path: Path) -> None:
    r = _setup(tmp_path)
    old_key = r.keys.private
    r.client.report_error = Unavailable("ghostmesh unreachable")
    with pytest.raises(Unavailable):
        await r.daemon.rotate_key()
    assert not _same(r.keys.private, old_key)
    r.client.report_error = NotFound("node key abc… is not registered; join with an auth key first")
    await r.rotator.resume(r.daemon)
    assert r.state.pending_key() is None
    assert _same(r.keys.private, old_key)
    assert r.backend.events[-1] == ("wg_key", old_key.public_key().base64())
    r.client.report_error = Unavailable("down")
    await r.rotator.resume(r.daemon)  # nothing pending: no call at all


@pytest.mark.parametrize(
    ("answer", "uses_pending", "pending_left"),
    [(None, True, False), (NotFound("not registered"), False, False), (Unavailable("down"), False, True)],
)
async def test_settle_pending_at_start(
    tmp_path: Path, answer: Exception | None, uses_pending: bool, pending_left: bool
) -> None:
    events: list[tuple[str, str]] = []
    old, pending = PrivateKey.generate(), PrivateKey.generate()
    state = StateDir(tmp_path / "state")
    state.save(old, SavedNode("s:1", PrivateKey.generate().public_key().base64(), 1, "n1"))
    state.save_pending(pending)
    keys = NodeKey(old)
    client = FakeClient(keys, events)
    client.report_error = answer
    await settle_pending(state, cast(CoordClient, client), keys)
    assert _same(keys.private, pending if uses_pending else old)
    assert (state.pending_key() is not None) == pending_left
    assert _same(state.existing_key(), keys.private)
    if answer is None:
        assert events == [("report", pending.public_key().base64())]


async def test_settle_without_pending_key_makes_no_call(tmp_path: Path) -> None:
    events: list[tuple[str, str]] = []
    key = PrivateKey.generate()
    keys = NodeKey(key)
    state = StateDir(tmp_path / "state")
    client = FakeClient(keys, events)
    await settle_pending(state, cast(CoordClient, client), keys)
    assert keys.private is key
    assert events == []


def test_auto_rotation_due_and_check_interval(tmp_path: Path) -> None:
    now = [T0]
    state = StateDir(tmp_path / "state")
    key = PrivateKey.generate()
    state.save(key, SavedNode("s:1", PrivateKey.generate().public_key().base64(), 1, "n1", key_created=T0))
    rot = KeyRotator(cast(CoordClient, object()), NodeKey(key), state, clock=lambda: now[0])
    assert not rot.due(3600)
    now[0] = T0 + 3600
    assert rot.due(3600)
    assert rot.check_interval(3.0) == 0.5
    assert rot.check_interval(30.0) == 3.0
    assert rot.check_interval(30 * 86400.0) == 60.0


# -- ghostmesh State ---------------------------------------------------------------------------------------


def _pub() -> str:
    return PrivateKey.generate().public_key().base64()


def test_state_rotation_pending_then_promoted(tmp_path: Path) -> None:
    st = State(SqliteStore(tmp_path / "db.sqlite"), StateConfig(), T0)
    _, secret = st.create_auth_key(reusable=True, now=T0)
    a, _ = st.register(_pub(), secret, "a", T0)
    b, _ = st.register(_pub(), secret, "b", T0)
    new = _pub()
    pending = st.begin_rotation(a.id, new, T0 + 1)
    assert (pending.node_key, pending.pending_key) == (a.node_key, new)
    assert st.node_by_key(new) is None  # not bound until proven
    for bad, exc in ((a.node_key, InvalidArgument), (b.node_key, Conflict), ("junk", InvalidArgument)):
        with pytest.raises(exc):
            st.begin_rotation(a.id, bad, T0 + 1)
    other = _pub()
    with pytest.raises(Conflict):  # another node's pending key is taken too
        st.begin_rotation(b.id, new, T0 + 1)
    assert st.promote_pending(other, T0 + 2) is None
    result = st.promote_pending(new, T0 + 2)
    assert result is not None
    promoted, changes = result
    assert (promoted.id, promoted.node_key, promoted.pending_key) == (a.id, new, None)
    assert (promoted.ipv4, promoted.ipv6, promoted.name) == (a.ipv4, a.ipv6, a.name)
    assert [type(c) for c in changes] == [NodeChanged]
    assert st.node_by_key(a.node_key) is None
    assert st.node_by_key(new) == promoted
    # Persisted: a restarted State loads the new key; a pending key survives a restart as well.
    again = State(SqliteStore(tmp_path / "db.sqlite"), StateConfig(), T0 + 3)
    assert again.node_by_key(new) is not None
    newer = _pub()
    again.begin_rotation(a.id, newer, T0 + 3)
    third = State(SqliteStore(tmp_path / "db.sqlite"), StateConfig(), T0 + 4)
    node = third.node_by_pending_key(newer)
    assert node is not None
    assert node.id == a.id


def test_key_rotation_config_key(tmp_path: Path) -> None:
    assert load_config(None, environ={}).node.key_rotation == 0.0  # off by default
    cfg = tmp_path / "ghostlink.toml"
    cfg.write_text('[node]\nkey_rotation = "30d"\n')
    assert load_config(cfg, environ={}).node.key_rotation == 30 * 86400.0
    assert load_config(cfg, environ={"GHOSTLINK_NODE_KEY_ROTATION": "12h"}).node.key_rotation == 43200.0
    cfg.write_text('[node]\nkey_rotation = "soon"\n')
    with pytest.raises(ConfigError, match=r"node\.key_rotation"):
        load_config(cfg, environ={})
