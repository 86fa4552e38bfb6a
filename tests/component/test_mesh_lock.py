"""Node-key signing ("tailnet lock") against a real in-process ghostmesh: the Admin RPCs (GetLock,
AppendLock, SignNode), what nodes get in their maps, Register and RotateKey with signatures, the audit
entries, a restart, and ``ghostctl lock`` driving it all over the admin socket.

ghostmesh holds no signing key: the tests sign here, as ghostctl does on the admin's machine.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import grpc
import pytest

from ghostcore import lock
from ghostcore.keys import PrivateKey
from ghostcore.pb.ghostmesh.v1 import admin_pb2 as apb
from ghostcore.pb.ghostmesh.v1 import coordination_pb2 as pb
from ghostctl.cli import main
from ghostmesh.server import RunningServer
from ghostmesh.state import ROTATION_SIGNATURE_NEEDED
from tests.component._mesh_fixtures import (
    NodeClient,
    admin_unix,
    auth_key,
    mesh_config,
    next_update,
    running,
)

ADMIN = lock.SigningKey.generate()


async def _append(admin: Any, update: bytes) -> apb.LockStatus:
    status: apb.LockStatus = await admin.AppendLock(apb.AppendLockRequest(update=update), timeout=5)
    return status


async def _status(admin: Any) -> apb.LockStatus:
    status: apb.LockStatus = await admin.GetLock(apb.GetLockRequest(), timeout=5)
    return status


async def _audit(srv: RunningServer, action: str) -> list[tuple[str, dict[str, Any]]]:
    return [(e.target, json.loads(e.detail)) for e in srv.store.list_audit() if e.action == action]


async def _until(call: Any, pred: Any, wait: float = 5.0) -> pb.MapUpdate:
    """Read map updates until one satisfies ``pred``."""
    deadline = asyncio.get_running_loop().time() + wait
    while True:
        update = await next_update(call, max(0.05, deadline - asyncio.get_running_loop().time()))
        if pred(update):
            return update


def _raw(client: NodeClient) -> bytes:
    return client.key.public_key().raw


async def _init(admin: Any) -> bytes:
    head = lock.verify_log((await _status(admin)).log.updates).head
    init = lock.make_update(lock.INIT, head, [ADMIN.public()], ADMIN)
    await _append(admin, init)
    return init


async def test_append_lock_flows_reach_every_stream_and_the_audit_log(tmp_path: Path) -> None:
    async with running(mesh_config(tmp_path)) as srv, admin_unix(srv) as admin:
        key = await auth_key(srv, reusable=True)
        a = NodeClient(srv)
        await a.register(key, "a")
        stream = a.sync()
        assert not (await next_update(stream)).HasField("lock")  # no lock yet: nothing in the map

        init = await _init(admin)
        update = await _until(stream, lambda u: u.HasField("lock"))
        assert list(update.lock.updates) == [init]
        other = lock.SigningKey.generate()
        add = lock.make_update(lock.ADD_KEY, lock.verify_log([init]).head, [other.public()], ADMIN)
        status = await _append(admin, add)
        assert list(status.log.updates) == [init, add]
        assert list(status.unsigned_nodes) == ["a"]
        update = await _until(stream, lambda u: u.HasField("lock"))
        assert list(update.lock.updates) == [init, add]  # the whole log, every time
        remove = lock.make_update(lock.REMOVE_KEY, lock.verify_log([init, add]).head, [ADMIN.public()], other)
        await _append(admin, remove)
        assert lock.verify_log((await _status(admin)).log.updates).trusted == {other.public()}
        # a stream opened now gets the log in its full map
        b = NodeClient(srv)
        await b.register(key, "b")
        b_stream = b.sync()
        assert list((await next_update(b_stream)).lock.updates) == [init, add, remove]

        entries = await _audit(srv, "lock.update")
        assert [(t, d["kind"], d["keys"], d["signer"]) for t, d in entries] == [
            ("lock", "init", [lock.format_key(ADMIN.public())], lock.format_key(ADMIN.public())),
            ("lock", "add-key", [lock.format_key(other.public())], lock.format_key(ADMIN.public())),
            ("lock", "remove-key", [lock.format_key(ADMIN.public())], lock.format_key(other.public())),
        ]
        for s in (stream, b_stream):
            s.cancel()
        for c in (a, b):
            await c.close()


async def test_forged_updates_are_refused_and_nothing_is_stored(tmp_path: Path) -> None:
    async with running(mesh_config(tmp_path)) as srv, admin_unix(srv) as admin:
        init = await _init(admin)
        mallory = lock.SigningKey.generate()
        head = lock.verify_log([init]).head
        audit_before = len(srv.store.list_audit())
        for forged, says in (
            (lock.make_update(lock.ADD_KEY, head, [mallory.public()], mallory), "not a trusted key"),
            (lock.make_update(lock.ADD_KEY, bytes(32), [mallory.public()], ADMIN), "does not follow"),
            (lock.make_update(lock.INIT, head, [mallory.public()], mallory), "the lock is on already"),
            (b"GLU1 not an update", "malformed lock update"),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await _append(admin, forged)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert says in (info.value.details() or "")
            assert list((await _status(admin)).log.updates) == [init]
            assert srv.store.list_lock() == [init]
        assert len(srv.store.list_audit()) == audit_before


async def test_sign_node_stores_the_signature_and_peers_get_it(tmp_path: Path) -> None:
    async with running(mesh_config(tmp_path)) as srv, admin_unix(srv) as admin:
        key = await auth_key(srv, reusable=True)
        a, b = NodeClient(srv), NodeClient(srv)
        na = await a.register(key, "a")
        await b.register(key, "b")
        b_stream = b.sync()
        await next_update(b_stream)
        signature = lock.sign_direct(ADMIN, _raw(a), lock.SigningKey.generate().public())
        with pytest.raises(grpc.aio.AioRpcError) as info:  # no lock yet
            await admin.SignNode(apb.SignNodeRequest(node_key=a.pub, signature=signature), timeout=5)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        await _init(admin)
        assert list((await _status(admin)).unsigned_nodes) == ["a", "b"]
        forged = lock.sign_direct(lock.SigningKey.generate(), _raw(a), bytes(32))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await admin.SignNode(apb.SignNodeRequest(node_key=a.pub, signature=forged), timeout=5)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not a trusted signing key" in (info.value.details() or "")
        assert srv.state.node(na.id).key_signature == b""  # type: ignore[union-attr]
        signed = await admin.SignNode(apb.SignNodeRequest(node_key=a.pub, signature=signature), timeout=5)
        assert (signed.name, signed.key_signature) == ("a", signature)
        update = await _until(
            b_stream, lambda u: any(p.id == na.id and p.key_signature for p in u.peers_upserted)
        )
        (peer,) = [p for p in update.peers_upserted if p.id == na.id]
        assert (
            lock.verify_signature(peer.key_signature, _raw(a), frozenset({ADMIN.public()})).root
            == ADMIN.public()
        )
        assert list((await _status(admin)).unsigned_nodes) == ["b"]
        ((target, detail),) = await _audit(srv, "node.sign")
        assert (target, detail["node_key"], detail["root"], detail["pending"]) == (
            "a",
            a.pub,
            lock.format_key(ADMIN.public()),
            False,
        )
        b_stream.cancel()
        for c in (a, b):
            await c.close()


async def test_register_with_a_credential_signed_key(tmp_path: Path) -> None:
    async with running(mesh_config(tmp_path)) as srv, admin_unix(srv) as admin:
        init = await _init(admin)
        cred_key = lock.SigningKey.generate()
        cred = lock.Credential(
            cred_key, lock.verify_log([init]).genesis, lock.sign_credential(ADMIN, cred_key.public())
        )
        key = await auth_key(srv, reusable=True)
        watcher = NodeClient(srv)
        await watcher.register(key, "watcher", lock.join_with_credential(cred, _raw(watcher), bytes(32)))
        w_stream = watcher.sync()
        await next_update(w_stream)
        node = NodeClient(srv)
        rotation = lock.SigningKey.generate()
        signature = lock.join_with_credential(cred, _raw(node), rotation.public())
        joined = await node.register(key, "joined", signature)
        assert joined.key_signature == signature
        update = await _until(w_stream, lambda u: any(p.name == "joined" for p in u.peers_upserted))
        assert [p.key_signature for p in update.peers_upserted if p.name == "joined"] == [signature]
        assert list((await _status(admin)).unsigned_nodes) == []
        # a signature for another key is refused and nothing is written
        intruder = NodeClient(srv)
        before = list(srv.store.list_nodes())
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await intruder.register(key, "intruder", signature)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "vouches for another WireGuard key" in (info.value.details() or "")
        assert list(srv.store.list_nodes()) == before
        w_stream.cancel()
        for c in (watcher, node, intruder):
            await c.close()


async def test_rotation_needs_the_nodes_signature_while_locked(tmp_path: Path) -> None:
    async with running(mesh_config(tmp_path)) as srv, admin_unix(srv) as admin:
        await _init(admin)
        key = await auth_key(srv, reusable=True)
        rotation = lock.SigningKey.generate()
        a, b = NodeClient(srv), NodeClient(srv)
        chain = lock.sign_direct(ADMIN, _raw(a), rotation.public())
        na = await a.register(key, "a", chain)
        await b.register(key, "b", lock.sign_direct(ADMIN, _raw(b), bytes(32)))
        b_stream = b.sync()
        await next_update(b_stream)
        new = PrivateKey.generate()
        before = srv.state.node(na.id)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await a.rotate(a.rotate_request(new))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details() == ROTATION_SIGNATURE_NEEDED
        assert srv.state.node(na.id) == before
        rotated = lock.rotate(chain, rotation, new.public_key().raw)
        await a.rotate(a.rotate_request(new, signature=rotated))
        a.key = new
        await a.report(endpoints=["192.0.2.1:41641"])  # proves the new key: it becomes current
        update = await _until(b_stream, lambda u: any(p.node_key == a.pub for p in u.peers_upserted))
        (peer,) = [p for p in update.peers_upserted if p.id == na.id]
        assert peer.key_signature == rotated
        verified = lock.verify_signature(
            peer.key_signature, new.public_key().raw, frozenset({ADMIN.public()})
        )
        assert (verified.rotation_key, verified.seq) == (rotation.public(), 1)
        assert list((await _status(admin)).unsigned_nodes) == []
        b_stream.cancel()
        for c in (a, b):
            await c.close()


async def test_lock_log_and_signatures_survive_a_restart(tmp_path: Path) -> None:
    cfg = mesh_config(tmp_path)
    async with running(cfg) as srv, admin_unix(srv) as admin:
        init = await _init(admin)
        a = NodeClient(srv)
        await a.register(await auth_key(srv), "a", lock.sign_direct(ADMIN, _raw(a), bytes(32)))
        await a.close()
        a_key = a.key
    async with running(cfg) as srv, admin_unix(srv) as admin:
        status = await _status(admin)
        assert (list(status.log.updates), list(status.unsigned_nodes)) == ([init], [])
        a = NodeClient(srv, a_key)
        stream = a.sync()
        full = await next_update(stream)
        assert list(full.lock.updates) == [init]
        assert full.self.key_signature
        stream.cancel()
        await a.close()


async def _ctl(srv: RunningServer, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = await asyncio.to_thread(main, ["--server", f"unix:{srv.admin_socket}", "-o", "json", *args])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out


async def test_ghostctl_lock_and_server_commands(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in ("GHOSTCTL_OUTPUT", "GHOSTCTL_SERVER", "GHOSTCTL_API_KEY", "GHOSTCTL_PIN"):
        monkeypatch.delenv(var, raising=False)
    async with running(mesh_config(tmp_path)) as srv:
        code, out = await _ctl(srv, capsys, "server", "pin")
        assert (code, json.loads(out)) == (0, {"tls_pin": srv.tls_pin})
        key_file = tmp_path / "lock.key"
        code, out = await _ctl(srv, capsys, "lock", "init", "--key-file", str(key_file))
        assert code == 0
        assert json.loads(out)["enabled"]
        node = NodeClient(srv)
        await node.register(await auth_key(srv), "a")
        code, out = await _ctl(srv, capsys, "lock", "status")
        assert json.loads(out)["unsigned_nodes"] == ["a"]
        request = lock.format_request(_raw(node), lock.SigningKey.generate().public())
        code, out = await _ctl(srv, capsys, "lock", "sign", request, "--key-file", str(key_file))
        assert (code, json.loads(out)["node"]) == (0, "a")
        code, out = await _ctl(srv, capsys, "lock", "status")
        assert json.loads(out)["unsigned_nodes"] == []
        await node.close()
