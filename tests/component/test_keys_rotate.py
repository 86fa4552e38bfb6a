"""Key rotation and revocation against a real in-process ghostmesh (``Coordination.RotateKey``).

Rotation is two steps: RotateKey (current key in the metadata, over the whole body; the new key's consent
in the body) only stores a pending key; peers learn the new key when the node proves it on a later call.
Every refusal changes nothing: a body changed under a valid proof, a second rotation while one is
pending. Revoking an auth key or an API key is refused on the very next use.
"""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest

from ghostcore import nodeauth
from ghostcore.keys import PrivateKey
from ghostcore.pb.ghostmesh.v1 import admin_pb2 as apb
from ghostcore.pb.ghostmesh.v1 import coordination_pb2 as pb
from ghostmesh.server import RunningServer
from ghostmesh.state import PENDING_ROTATION_TTL
from ghostmesh.store.base import NodeRec
from tests.component._mesh_fixtures import (
    Metadata,
    NodeClient,
    admin_tcp,
    admin_unix,
    auth_key,
    mesh_config,
    next_update,
    running,
)


def record(srv: RunningServer, node_id: int) -> NodeRec:
    rec = srv.hub.state.node(node_id)
    assert rec is not None
    return rec


async def _pair(srv: RunningServer) -> tuple[NodeClient, pb.Node, NodeClient, pb.Node]:
    key = await auth_key(srv, reusable=True)
    a, b = NodeClient(srv), NodeClient(srv)
    return a, await a.register(key, "alpha"), b, await b.register(key, "beta")


async def test_rotate_key_peers_learn_new_key_only_once_proven(tmp_path: Path) -> None:
    async with running(mesh_config(tmp_path)) as srv:
        a, na, b, nb = await _pair(srv)
        a_stream = a.sync()
        await next_update(a_stream)
        b_stream = b.sync()
        full = await next_update(b_stream)  # a is online already
        assert [(p.node_key, p.online) for p in full.peers_upserted] == [(a.pub, True)]
        old_key, old_pub = a.key, a.pub
        new = PrivateKey.generate()

        answer = await a.rotate(a.rotate_request(new))
        assert answer.node_key == old_pub  # nothing switched yet
        rec = record(srv, na.id)
        assert (rec.node_key, rec.pending_key) == (old_pub, new.public_key().base64())

        a.key = new  # the node switched WireGuard; its next call is proven with the new key
        await a.report(endpoints=["192.0.2.7:41641"])
        delta = await next_update(b_stream)
        # The first update b sees after the rotation already carries the new key: never an unproven one.
        [peer] = delta.peers_upserted
        assert peer.node_key == new.public_key().base64()
        assert (peer.id, peer.name, list(peer.addresses)) == (na.id, na.name, list(na.addresses))
        rec = record(srv, na.id)
        assert (rec.node_key, rec.pending_key) == (new.public_key().base64(), None)

        # a's stream, opened with the old key, goes on: it still gets b's changes.
        await b.report(endpoints=["192.0.2.8:41641"])
        for _ in range(5):
            upd = await next_update(a_stream)
            if any(p.id == nb.id and list(p.endpoints) == ["192.0.2.8:41641"] for p in upd.peers_upserted):
                break
        else:
            pytest.fail("a's stream stopped getting b's changes after the rotation")
        # The old key is bound to nothing any more.
        old = NodeClient(srv, key=old_key)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await old.report()
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        a_stream.cancel()
        b_stream.cancel()
        for c in (a, b, old):
            await c.close()


async def test_pending_key_proven_by_register_is_promoted(tmp_path: Path) -> None:
    """Crash recovery: a node that restarts with its pending key is the same node, under the new key."""
    async with running(mesh_config(tmp_path)) as srv:
        a, na, b, _ = await _pair(srv)
        new = PrivateKey.generate()
        await a.rotate(a.rotate_request(new))
        again = await NodeClient(srv, key=new).register("", "alpha")  # no auth key needed
        assert (again.id, again.node_key, list(again.addresses)) == (
            na.id,
            new.public_key().base64(),
            list(na.addresses),
        )
        assert record(srv, na.id).pending_key is None
        # A pending key is not replaced by another rotation while it is young (the node may be switching
        # to it right now); the same key again is a retry; once older than the TTL it may be replaced.
        newer, newest = PrivateKey.generate(), PrivateKey.generate()
        a.key = new
        await a.rotate(a.rotate_request(newer))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await a.rotate(a.rotate_request(newest))
        assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
        assert "has a pending key" in (info.value.details() or "")
        assert record(srv, na.id).pending_key == newer.public_key().base64()
        await a.rotate(a.rotate_request(newer))  # a retry of the pending one is answered the same
        start = time.time()
        srv.hub.clock = lambda: start + PENDING_ROTATION_TTL + 1
        await a.rotate(a.rotate_request(newest))
        assert record(srv, na.id).pending_key == newest.public_key().base64()
        assert srv.hub.state.node_by_pending_key(newer.public_key().base64()) is None
        for c in (a, b):
            await c.close()


@pytest.mark.parametrize(
    "case", ["forged-metadata", "new-proof-other-key", "new-key-taken", "same-key", "garbage"]
)
async def test_bad_rotation_requests_change_nothing(tmp_path: Path, case: str) -> None:
    async with running(mesh_config(tmp_path)) as srv:
        a, na, b, nb = await _pair(srv)
        new = PrivateKey.generate()
        md: Metadata | None = None
        if case == "forged-metadata":
            # Claims a's key, but the proof is made with another private key.
            req = a.rotate_request(new)
            forged = dict(a.signed("RotateKey", req.SerializeToString(), key=PrivateKey.generate()))
            forged[nodeauth.MD_NODE_KEY] = a.pub
            md = tuple(forged.items())
        elif case == "new-proof-other-key":
            req = a.rotate_request(new, consent_by=PrivateKey.generate())
        elif case == "new-key-taken":
            req = a.rotate_request(b.key)
        elif case == "same-key":
            req = a.rotate_request(a.key)
        else:
            req = pb.RotateKeyRequest(new_node_key="not-a-key", new_ts_ms=1, new_key_proof=b"x")
        before = (record(srv, na.id), record(srv, nb.id))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await a.rotate(req, md)
        code, expected = {
            "forged-metadata": (grpc.StatusCode.UNAUTHENTICATED, "key rotation refused: node key"),
            "new-proof-other-key": (grpc.StatusCode.UNAUTHENTICATED, "new key's proof does not verify"),
            "new-key-taken": (grpc.StatusCode.ALREADY_EXISTS, "already bound to another node"),
            "same-key": (grpc.StatusCode.INVALID_ARGUMENT, "equals the current one"),
            "garbage": (grpc.StatusCode.INVALID_ARGUMENT, "key"),
        }[case]
        assert info.value.code() == code, info.value.details()
        assert expected in (info.value.details() or "")
        assert (record(srv, na.id), record(srv, nb.id)) == before
        assert srv.hub.state.node_by_pending_key(new.public_key().base64()) is None
        # Persisted too: a restarted server sees the same.
        assert [n for n in srv.hub.state.store.list_nodes() if n.pending_key] == []
        for c in (a, b):
            await c.close()


async def test_revoked_auth_key_refused_at_once(tmp_path: Path) -> None:
    async with running(mesh_config(tmp_path)) as srv:
        key = await auth_key(srv, reusable=True)
        first = NodeClient(srv)
        await first.register(key, "first")  # the key works...
        async with admin_unix(srv) as admin:
            await admin.ExpireAuthKey(apb.ExpireAuthKeyRequest(id=key.split("_")[1]), timeout=5)
        second = NodeClient(srv)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await second.register(key, "second")  # ...and the very next registration is refused
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "revoked" in (info.value.details() or "")
        assert [n.name for n in srv.hub.state.list_nodes()] == ["first"]
        for c in (first, second):
            await c.close()


async def test_revoked_api_key_refused_at_once_over_tcp(tmp_path: Path) -> None:
    async with running(mesh_config(tmp_path)) as srv, admin_unix(srv) as local:
        created = await local.CreateApiKey(apb.CreateApiKeyRequest(expiration_seconds=3600), timeout=5)
        async with admin_tcp(srv) as remote:
            ok = (("authorization", f"Bearer {created.secret}"),)
            await remote.ListNodes(apb.ListNodesRequest(), metadata=ok, timeout=5)  # works
            await local.ExpireApiKey(apb.ExpireApiKeyRequest(id=created.key.id), timeout=5)
            with pytest.raises(grpc.aio.AioRpcError) as info:  # same channel, the next call
                await remote.ListNodes(apb.ListNodesRequest(), metadata=ok, timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "revoked" in (info.value.details() or "")


async def test_rotation_with_the_new_key_swapped_under_a_valid_proof_changes_nothing(tmp_path: Path) -> None:
    """A proxy that rewrites RotateKey's new_node_key to its own key cannot take the node over."""
    async with running(mesh_config(tmp_path)) as srv:
        a, na, b, nb = await _pair(srv)
        new, attacker = PrivateKey.generate(), PrivateKey.generate()
        honest = a.rotate_request(new)
        md = a.signed("RotateKey", honest.SerializeToString())  # the node's valid proof of its request
        swapped = pb.RotateKeyRequest()
        swapped.CopyFrom(honest)
        swapped.new_node_key = attacker.public_key().base64()
        # even with the attacker's own consent for its key, the body no longer matches the node's proof
        swapped.new_key_proof = nodeauth.rotation_proof(
            attacker, srv.server_key, a.key.public_key(), honest.new_ts_ms
        )
        before = (record(srv, na.id), record(srv, nb.id), len(srv.store.list_audit()))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await a.send("RotateKey", swapped.SerializeToString(), md)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "failed its proof of possession" in (info.value.details() or "")
        after = record(srv, na.id)
        assert (after.node_key, after.name, after.pending_key) == (a.pub, "alpha", None)
        assert (record(srv, na.id), record(srv, nb.id), len(srv.store.list_audit())) == before
        async with admin_unix(srv) as admin:
            log = (await admin.ListAudit(apb.ListAuditRequest(), timeout=5)).entries
        assert not [e for e in log if e.action in ("node.key_rotate", "node.key_switch")]
        assert all(attacker.public_key().base64() not in e.detail for e in log)
        # the attacker's key proves nothing: it is bound to no node
        intruder = NodeClient(srv, attacker)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await intruder.report()
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        # the node's own request with its proof still works: a forgery does not spend the proof's nonce
        await a.rotate(honest, md)
        assert record(srv, na.id).pending_key == new.public_key().base64()
        for c in (a, b, intruder):
            await c.close()
