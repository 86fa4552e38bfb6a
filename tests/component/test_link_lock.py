"""Node-key signing end to end in process: real ghostmesh, real daemons (trust, admission, rotation).

Admin actions are made as ghostctl makes them (ghostcore.lock with a key ghostmesh never sees), sent over
the admin socket. The coordinator's compromise is simulated from inside the server process: records are
changed and dispatched past every check ghostmesh makes, as an attacker holding the process or the
database could; the nodes must still refuse.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ghostcore import lock
from ghostcore.joinkey import JoinKey, parse_join_key
from ghostcore.keys import PrivateKey, PublicKey
from ghostcore.pb.ghostmesh.v1 import admin_pb2 as apb
from ghostmesh.changes import NodeAdded, NodeChanged
from ghostmesh.server import RunningServer
from tests.component._link_fixtures import wait_for
from tests.component._members import close_members, join_member
from tests.component._mesh_fixtures import admin_unix, auth_key, mesh_config, running


async def _lock_on(srv: RunningServer) -> lock.SigningKey:
    admin = lock.SigningKey.generate()
    update = lock.make_update(lock.INIT, bytes(32), [admin.public()], admin)
    async with admin_unix(srv) as stub:
        await stub.AppendLock(apb.AppendLockRequest(update=update), timeout=5)
    return admin


async def _presigned(srv: RunningServer, admin: lock.SigningKey) -> str:
    """A reusable auth key pre-signed the way `ghostctl lock sign gmauth_…` does it."""
    key = parse_join_key(await auth_key(srv, reusable=True))
    async with admin_unix(srv) as stub:
        log = list((await stub.GetLock(apb.GetLockRequest(), timeout=5)).log.updates)
    cred_key = lock.SigningKey.generate()
    cred = lock.Credential(
        cred_key, lock.verify_log(log).genesis, lock.sign_credential(admin, cred_key.public())
    )
    return JoinKey(key.key, key.pin, cred).text()


async def test_unsigned_nodes_stay_out_until_an_admin_signs_them(tmp_path: Path) -> None:
    async with running(mesh_config(tmp_path)) as srv:
        admin = await _lock_on(srv)
        signed_key = await _presigned(srv, admin)
        a = await join_member(srv, signed_key, "alpha", tmp_path / "a")
        b = await join_member(srv, signed_key, "beta", tmp_path / "b")
        await wait_for(lambda: b.pub in a.installed() and a.pub in b.installed(), what="signed joins")
        assert a.daemon.status().lock.key_signed
        c = await join_member(srv, await auth_key(srv), "gamma", tmp_path / "c")  # not pre-signed
        await wait_for(
            lambda: any(line.startswith("gamma: peer:") for line in a.daemon.status().lock.refused),
            what="alpha refuses gamma",
        )
        assert c.pub not in a.installed()
        status = c.daemon.status().lock
        assert status.enabled
        assert not status.key_signed
        # The admin signs what gamma shows (`ghostctl status` on gamma: "signing request").
        node_key, rotation = lock.parse_request(status.request)
        async with admin_unix(srv) as stub:
            req = apb.SignNodeRequest(
                node_key=PublicKey(node_key).base64(), signature=lock.sign_direct(admin, node_key, rotation)
            )
            await stub.SignNode(req, timeout=5)
        await wait_for(lambda: c.pub in a.installed() and c.pub in b.installed(), what="gamma admitted")
        assert c.daemon.status().lock.key_signed
        await close_members(a, b, c)


async def test_signed_rotations_need_no_admin(tmp_path: Path) -> None:
    async with running(mesh_config(tmp_path)) as srv:
        admin = await _lock_on(srv)
        signed_key = await _presigned(srv, admin)
        a = await join_member(srv, signed_key, "alpha", tmp_path / "a")
        b = await join_member(srv, signed_key, "beta", tmp_path / "b")
        await wait_for(lambda: a.pub in b.installed(), what="beta has alpha")
        for _ in range(2):  # the second rotation replaces the first one's link
            old, new = (k.base64() for k in await a.daemon.rotate_key())
            await wait_for(
                lambda n=new, o=old: n in b.installed() and o not in b.installed(),
                what="beta has alpha's rotated key",
            )
        assert b.daemon.status().lock.refused == ()
        await close_members(a, b)


async def test_a_compromised_coordinator_cannot_add_a_peer_or_swap_a_key(tmp_path: Path) -> None:
    async with running(mesh_config(tmp_path)) as srv:
        admin = await _lock_on(srv)
        signed_key = await _presigned(srv, admin)
        a = await join_member(srv, signed_key, "alpha", tmp_path / "a")
        b = await join_member(srv, signed_key, "beta", tmp_path / "b")
        await wait_for(lambda: a.pub in b.installed(), what="beta has alpha")
        before = dict(b.backend.device.peers)
        refused = b.daemon.status().lock.refused_total
        # The attacker swaps alpha's key for its own, keeping alpha's (now foreign) signature...
        rec = srv.state.node_by_key(a.pub)
        assert rec is not None
        evil = PrivateKey.generate().public_key().base64()
        forged = replace(rec, node_key=evil)
        srv.store.update_node(forged)
        srv.hub.dispatch([NodeChanged(forged, True, frozenset())])
        # ...and adds a peer of its own, signed with a signing key of its own.
        mallory = lock.SigningKey.generate()
        intruder_key = PrivateKey.generate().public_key()
        intruder = replace(
            rec,
            id=rec.id + 100,
            name="intruder",
            node_key=intruder_key.base64(),
            ipv4="100.64.0.200",
            ipv6="fd7a:115c:a1e0::c8",
            key_signature=lock.sign_direct(mallory, intruder_key.raw, mallory.public()),
        )
        srv.hub.dispatch([NodeAdded(intruder, True)])
        await wait_for(lambda: b.daemon.status().lock.refused_total >= refused + 2, what="beta refuses both")
        assert evil not in b.installed()
        assert intruder.node_key not in b.installed()
        assert b.backend.device.peers == before, "WireGuard unchanged: alpha kept, nothing new installed"
        lines = b.daemon.status().lock.refused
        assert any(line.startswith("alpha: peer:") for line in lines)
        assert any(line.startswith("intruder: peer:") for line in lines)
        await close_members(a, b)
