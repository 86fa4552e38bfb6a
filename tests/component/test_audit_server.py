"""The audit log end to end in-process: a real ghostmesh records admin, node and timer changes, and
``ghostctl audit list | verify`` (ghostctl.cli.main over the unix admin socket) reads and checks it,
catching edits made to the SQLite file behind the server's back."""

from __future__ import annotations

import asyncio
import base64
import json
import sqlite3
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest

from ghostcore import auditchain
from ghostcore.keys import PrivateKey
from ghostcore.pb.ghostmesh.v1 import admin_pb2 as apb
from ghostctl.cli import main
from ghostctl.errors import EXIT_VERIFY
from ghostmesh.config import AuditConfig
from ghostmesh.server import RunningServer
from tests.component._mesh_fixtures import Clock, NodeClient, admin_tcp, admin_unix, mesh_config, running


async def ctl(capsys: pytest.CaptureFixture[str], srv: RunningServer, *argv: str) -> tuple[int, str, str]:
    """ghostctl in a thread: its calls are synchronous and the server runs on this event loop."""
    code = await asyncio.to_thread(main, ["--server", f"unix:{srv.admin_socket}", *argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


async def entries(srv: RunningServer) -> list[apb.AuditEntry]:
    async with admin_unix(srv) as admin:
        resp = await admin.ListAudit(apb.ListAuditRequest(), timeout=5)
        return list(resp.entries)


def tamper(srv: RunningServer, sql: str, *params: Any) -> None:
    db = sqlite3.connect(str(srv.store.path))
    try:
        with db:
            db.execute(sql, params)
    finally:
        db.close()


def raw_db(srv: RunningServer) -> bytes:
    path = srv.store.path
    return b"".join(p.read_bytes() for p in path.parent.glob(path.name + "*"))


async def test_admin_and_node_changes_are_recorded_and_verify(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("GHOSTCTL_OUTPUT", raising=False)
    async with running(mesh_config(tmp_path)) as srv:
        async with admin_unix(srv) as admin:
            await admin.CreateUser(apb.CreateUserRequest(name="alice"), timeout=5)
            ak = await admin.CreateAuthKey(apb.CreateAuthKeyRequest(user="alice", reusable=True), timeout=5)
            api = await admin.CreateApiKey(apb.CreateApiKeyRequest(), timeout=5)
        node = NodeClient(srv)
        try:
            await node.register(ak.secret, hostname="web1")
        finally:
            await node.close()
        bearer = (("authorization", f"Bearer {api.secret}"),)
        async with admin_tcp(srv) as tcp:
            await tcp.RenameNode(
                apb.RenameNodeRequest(ref="web1", new_name="web2"), metadata=bearer, timeout=5
            )
            await tcp.ExpireNode(apb.ExpireNodeRequest(ref="web2"), metadata=bearer, timeout=5)
            # a read is not a change: nothing recorded
            await tcp.ListNodes(apb.ListNodesRequest(), metadata=bearer, timeout=5)
        async with admin_unix(srv) as admin:
            await admin.DeleteNode(apb.DeleteNodeRequest(ref="web2"), timeout=5)
            await admin.ExpireAuthKey(apb.ExpireAuthKeyRequest(id=ak.key.id), timeout=5)
            await admin.ExpireApiKey(apb.ExpireApiKeyRequest(id=api.key.id), timeout=5)
            await admin.DeleteUser(apb.DeleteUserRequest(name="alice"), timeout=5)
            key = (await admin.GetAuditKey(apb.GetAuditKeyRequest(), timeout=5)).public_key

        got = await entries(srv)
        rows = [(e.seq, e.actor, e.action, e.target) for e in got]
        api_actor = f"apikey:{api.key.id}"
        assert rows == [
            (1, "admin@unix", "user.create", "alice"),
            (2, "admin@unix", "authkey.create", ak.key.id),
            (3, "admin@unix", "apikey.create", api.key.id),
            (4, "node:web1", "node.register", "web1"),
            (5, api_actor, "node.rename", "web2"),
            (6, api_actor, "node.expire", "web2"),
            (7, "admin@unix", "node.delete", "web2"),
            (8, "admin@unix", "authkey.expire", ak.key.id),
            (9, "admin@unix", "apikey.expire", api.key.id),
            (10, "admin@unix", "user.delete", "alice"),
        ]
        assert all(e.remote.startswith("unix:") for e in got if e.actor == "admin@unix")
        assert all(e.remote.startswith("ipv4:127.0.0.1:") for e in got if not e.actor.startswith("admin"))
        assert json.loads(got[4].detail)["old_name"] == "web1"
        assert json.loads(got[3].detail)["auth_key_id"] == ak.key.id
        now_ms = time.time() * 1000
        assert all(now_ms - 60_000 < e.ts_unix_ms <= now_ms for e in got)
        assert len(key) == 32

        # no secret anywhere in the database files (the audit table included): ids only
        raw = raw_db(srv)
        for secret in (ak.secret, api.secret, ak.secret.split("_", 2)[2], api.secret.split("_", 2)[2]):
            assert secret.encode() not in raw

        # list: table and JSON
        code, out, _ = await ctl(capsys, srv, "audit", "list", "--after", "3", "--limit", "2")
        assert code == 0
        lines = out.splitlines()
        assert lines[0].split() == ["SEQ", "TIME", "ACTOR", "ACTION", "TARGET", "REMOTE"]
        assert [ln.split()[:4] for ln in lines[1:]] == [
            ["4", lines[1].split()[1], "node:web1", "node.register"],
            ["5", lines[2].split()[1], api_actor, "node.rename"],
        ]
        code, out, _ = await ctl(capsys, srv, "-o", "json", "audit", "list")
        docs = json.loads(out)
        assert [d["seq"] for d in docs] == list(range(1, 11))
        assert docs[4]["detail"] == {"id": docs[3]["detail"]["id"], "old_name": "web1"}
        assert docs[0]["hash"] == got[0].hash.hex()

        # verify: good, with a checkpoint and the pinned key
        cp = tmp_path / "audit.cp"
        key_b64 = base64.b64encode(key).decode()
        code, out, err = await ctl(capsys, srv, "audit", "verify", "--checkpoint", str(cp), "--key", key_b64)
        assert (code, err) == (0, "")
        assert out.startswith(f"ok: 10 entries verified (last seq 10), audit key {key_b64}")
        saved = auditchain.Checkpoint.from_json(cp.read_text(), "cp")
        assert (saved.seq, saved.hash, saved.public_key) == (10, got[-1].hash, key)

        # a wrong pinned key
        other = base64.b64encode(bytes(32)).decode()
        code, _, err = await ctl(capsys, srv, "audit", "verify", "--key", other)
        assert code == EXIT_VERIFY
        assert "audit key mismatch" in err

        # an edited field, straight in the SQLite file
        tamper(srv, "UPDATE audit SET actor = 'admin@unix' WHERE seq = 5")
        code, out, err = await ctl(capsys, srv, "audit", "verify")
        assert (code, out) == (EXIT_VERIFY, "")
        assert err.strip() == (
            "ghostctl: audit log does NOT verify: entry 5: hash does not match the entry's contents "
            "(entry edited) (4 entries before it are good)"
        )
        tamper(srv, "UPDATE audit SET actor = ? WHERE seq = 5", api_actor)
        assert (await ctl(capsys, srv, "audit", "verify"))[0] == 0

        # an edited detail
        tamper(srv, "UPDATE audit SET detail = '{}' WHERE seq = 2")
        code, _, err = await ctl(capsys, srv, "audit", "verify")
        assert code == EXIT_VERIFY
        assert "entry 2: hash does not match" in err
        tamper(srv, "UPDATE audit SET detail = ? WHERE seq = 2", got[1].detail)

        # a removed middle entry
        tamper(srv, "DELETE FROM audit WHERE seq = 7")
        code, _, err = await ctl(capsys, srv, "audit", "verify")
        assert code == EXIT_VERIFY
        assert "entry 7: missing: the log jumps to seq 8" in err

        # removal of the newest entries: invisible without the checkpoint, caught with it
        tamper(srv, "DELETE FROM audit WHERE seq >= 7")
        assert (await ctl(capsys, srv, "audit", "verify"))[0] == 0
        code, _, err = await ctl(capsys, srv, "audit", "verify", "--checkpoint", str(cp))
        assert code == EXIT_VERIFY
        assert "entry 10: missing: the checkpoint saw the log up to seq 10 but it now ends at seq 6" in err
        assert auditchain.Checkpoint.from_json(cp.read_text(), "cp").seq == 10  # a failed run keeps it

        # a checkpoint taken under another key: the server's key was replaced
        cp.write_text(auditchain.Checkpoint(bytes(32), 1, got[0].hash).to_json())
        code, _, err = await ctl(capsys, srv, "audit", "verify", "--checkpoint", str(cp))
        assert code == EXIT_VERIFY
        assert err.strip() == (
            "ghostctl: audit log does NOT verify: "
            "the server's audit key differs from the one in the checkpoint (key replaced)"
        )


async def test_timer_expiry_and_ephemeral_gc_are_recorded_as_system(tmp_path: Path) -> None:
    cfg = mesh_config(tmp_path, key_expiry=0.6, ephemeral_grace=0.3)
    async with running(cfg) as srv:
        async with admin_unix(srv) as admin:
            eph = await admin.CreateAuthKey(apb.CreateAuthKeyRequest(ephemeral=True), timeout=5)
            keep = await admin.CreateAuthKey(apb.CreateAuthKeyRequest(), timeout=5)
        nodes = [NodeClient(srv), NodeClient(srv)]
        try:
            await nodes[0].register(eph.secret, hostname="gone")
            await nodes[1].register(keep.secret, hostname="stays")
        finally:
            for n in nodes:
                await n.close()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            system = [(e.action, e.target) for e in await entries(srv) if e.actor == "system"]
            if len(system) >= 2:
                break
            await asyncio.sleep(0.1)
        assert sorted(system) == [("node.delete", "gone"), ("node.expire", "stays")]
        assert auditchain.verify(
            [
                auditchain.AuditRecord(
                    e.seq, e.ts_unix_ms, e.actor, e.action, e.target, e.detail, e.remote,
                    e.prev_hash, e.hash, e.signature,
                )
                for e in await entries(srv)
            ],
            srv.hub.audit.public_key if srv.hub.audit else b"",
        ).ok  # fmt: skip


async def test_audit_key_survives_restart_and_chain_continues(tmp_path: Path) -> None:
    cfg = mesh_config(tmp_path)
    async with running(cfg) as srv, admin_unix(srv) as admin:
        await admin.CreateUser(apb.CreateUserRequest(name="bob"), timeout=5)
        key1 = (await admin.GetAuditKey(apb.GetAuditKeyRequest(), timeout=5)).public_key
    async with running(cfg) as srv:
        async with admin_unix(srv) as admin:
            await admin.CreateUser(apb.CreateUserRequest(name="carol"), timeout=5)
            key2 = (await admin.GetAuditKey(apb.GetAuditKeyRequest(), timeout=5)).public_key
        got = await entries(srv)
    assert key1 == key2
    assert [(e.seq, e.target) for e in got] == [(1, "bob"), (2, "carol")]
    assert got[1].prev_hash == got[0].hash


async def test_failed_change_records_nothing(tmp_path: Path) -> None:
    async with running(mesh_config(tmp_path)) as srv:
        async with admin_unix(srv) as admin:
            with pytest.raises(grpc.aio.AioRpcError):
                await admin.DeleteNode(apb.DeleteNodeRequest(ref="nope"), timeout=5)
            with pytest.raises(grpc.aio.AioRpcError):
                await admin.CreateUser(apb.CreateUserRequest(name="Not Valid"), timeout=5)
        assert await entries(srv) == []


async def test_key_rotation_is_recorded(tmp_path: Path) -> None:
    async with running(mesh_config(tmp_path)) as srv:
        async with admin_unix(srv) as admin:
            ak = await admin.CreateAuthKey(apb.CreateAuthKeyRequest(), timeout=5)
        old, new = NodeClient(srv), PrivateKey.generate()
        try:
            await old.register(ak.secret, hostname="rot")
            await old.rotate(old.rotate_request(new))
            await old.rotate(old.rotate_request(new))  # a retry: answered again, recorded once
        finally:
            await old.close()
        switched = NodeClient(srv, new)
        try:
            await switched.report()
        finally:
            await switched.close()
        got = [(e.actor, e.action, e.target) for e in await entries(srv)][-3:]
        assert got == [
            ("node:rot", "node.register", "rot"),
            ("node:rot", "node.key_rotate", "rot"),
            ("node:rot", "node.key_switch", "rot"),
        ]
        last = (await entries(srv))[-2:]
        assert json.loads(last[0].detail)["new_node_key"] == new.public_key().base64()
        assert last[0].remote.startswith("ipv4:127.0.0.1:")


async def test_retention_prunes_old_entries_after_recording_the_cut_and_verify_still_proves_the_rest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    clock = Clock()
    cfg = replace(mesh_config(tmp_path), audit=AuditConfig(retention=7 * 86400.0))
    async with running(cfg, clock) as srv:
        async with admin_unix(srv) as admin:
            for name in ("a", "b", "c"):
                await admin.CreateUser(apb.CreateUserRequest(name=name), timeout=5)
        srv.hub.run_due()  # the prune at start: nothing is that old
        assert [e.seq for e in await entries(srv)] == [1, 2, 3]
        cp = tmp_path / "audit.cp"
        assert (await ctl(capsys, srv, "audit", "verify", "--checkpoint", str(cp)))[0] == 0

        clock.now += 6 * 86400.0
        async with admin_unix(srv) as admin:
            await admin.CreateUser(apb.CreateUserRequest(name="d"), timeout=5)
        srv.hub.run_due()  # a, b, c are 6 days old: kept
        assert len(await entries(srv)) == 4
        clock.now += 2 * 86400.0  # a, b, c are 8 days old, d 2 days
        srv.hub.run_due()
        kept = await entries(srv)
        assert [(e.seq, e.action, e.target) for e in kept] == [
            (4, "user.create", "d"),
            (5, "audit.prune", "audit"),
        ]
        assert json.loads(kept[1].detail)["through_seq"] == 3

        code, out, err = await ctl(capsys, srv, "audit", "verify", "--checkpoint", str(cp))
        assert (code, err) == (0, "")
        first, pruned = out.splitlines()[:2]
        assert first.startswith("ok: 2 entries verified (last seq 5), audit key ")
        assert pruned == "seq 1..3 were pruned, as a signed audit.prune entry records"
        assert auditchain.Checkpoint.from_json(cp.read_text(), "cp").seq == 5

        # cutting more than the prune entry records is caught, with or without the checkpoint
        tamper(srv, "DELETE FROM audit WHERE seq = 4")
        code, _, err = await ctl(capsys, srv, "audit", "verify")
        assert code == EXIT_VERIFY
        assert err.strip() == (
            "ghostctl: audit log does NOT verify: entry 4: missing: the log starts at seq 5 but no signed "
            "audit.prune entry records removing seq 1..4 (oldest entries removed) (0 entries before it are "
            "good)"
        )
