"""A real ghostmesh and its files: secrets private whatever the directory and umask, keys out of the
database (moved out of an earlier version's), a key others may read refused at start, directories it
did not make left as they are, the policy file written durably."""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ghostcore import auditchain
from ghostcore.keys import PrivateKey
from ghostcore.pb.ghostmesh.v1 import admin_pb2 as apb
from ghostmesh import audit
from ghostmesh.app import main
from ghostmesh.keyfiles import AUDIT_KEY_KV, SERVER_KEY_KV
from ghostmesh.store.sqlite import SqliteStore
from tests.component._mesh_fixtures import admin_unix, mesh_config, running

SECRETS = ("ghostmesh.db", "ghostmesh.db-wal", "ghostmesh.db-shm", "server.key", "audit.key", "tls.key")


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


@pytest.fixture
def open_umask() -> Iterator[None]:
    old = os.umask(0o022)
    yield
    os.umask(old)


@pytest.mark.usefixtures("open_umask")
async def test_in_a_world_readable_state_dir_every_secret_is_0600(tmp_path: Path) -> None:
    cfg = mesh_config(tmp_path)
    state = Path(cfg.server.state_dir)
    await asyncio.to_thread(state.mkdir, mode=0o755)
    async with running(cfg) as srv, admin_unix(srv) as admin:
        await admin.CreateUser(apb.CreateUserRequest(name="alice"), timeout=5)  # the WAL is written
        assert {n: _mode(state / n) for n in SECRETS} == dict.fromkeys(SECRETS, 0o600)
        assert _mode(state / "tls.crt") == 0o644  # public
        assert _mode(state) == 0o755  # a directory ghostmesh did not make keeps its mode
        kv = {r[0] for r in srv.store._db.execute("SELECT key FROM kv")}
        assert not kv & {SERVER_KEY_KV, AUDIT_KEY_KV}  # no key in the database


async def test_an_earlier_versions_database_keeps_its_keys_moved_to_files(tmp_path: Path) -> None:
    cfg = mesh_config(tmp_path)
    state = Path(cfg.server.state_dir)
    await asyncio.to_thread(state.mkdir, mode=0o700)
    server_key = PrivateKey.generate()
    audit_key = Ed25519PrivateKey.generate()
    old = SqliteStore(state / "ghostmesh.db")  # what an earlier version left: keys in kv, a signed log
    old.set_kv(SERVER_KEY_KV, server_key.base64().encode("ascii"))
    old.set_kv(AUDIT_KEY_KV, audit_key.private_bytes_raw())
    audit.Auditor(old, audit_key).record("admin@unix", audit.USER_CREATE, "alice")
    old.close()
    for _ in range(2):  # and again: the move is done once
        async with running(cfg) as srv, admin_unix(srv) as admin:
            assert srv.server_key == server_key.public_key()
            assert srv.hub.audit is not None
            assert srv.hub.audit.public_key == auditchain.raw_public_key(audit_key)
            await admin.CreateUser(apb.CreateUserRequest(name=f"u{len(srv.store.list_users())}"), timeout=5)
            assert auditchain.verify(srv.store.list_audit(), srv.hub.audit.public_key).ok
            assert srv.store.get_kv(SERVER_KEY_KV) is None
            assert srv.store.get_kv(AUDIT_KEY_KV) is None
    raw = await asyncio.to_thread(lambda: b"".join(p.read_bytes() for p in state.glob("ghostmesh.db*")))
    assert audit_key.private_bytes_raw() not in raw
    assert server_key.base64().encode() not in raw
    assert _mode(state / "server.key") == _mode(state / "audit.key") == 0o600


async def test_a_key_file_others_may_read_stops_the_start_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = mesh_config(tmp_path)
    async with running(cfg):
        pass
    key = Path(cfg.server.state_dir) / "audit.key"
    key.chmod(0o640)
    argv = ["--bind", "127.0.0.1:0", "--state-dir", cfg.server.state_dir, "--admin-socket"]
    assert await asyncio.to_thread(main, [*argv, cfg.server.admin_socket]) == 1
    err = capsys.readouterr().err
    assert err == f"ghostmesh: ghostmesh's audit key {key}: others may read it (mode 640); chmod 600 it\n"


async def test_an_admin_socket_in_a_shared_sticky_directory(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    base = mesh_config(tmp_path)
    cfg = replace(base, server=replace(base.server, admin_socket=str(shared / "ghostmesh.sock")))
    async with running(cfg) as srv, admin_unix(srv) as admin:
        assert _mode(shared) == 0o1777
        assert stat.S_ISSOCK(srv.admin_socket.lstat().st_mode)
        assert _mode(srv.admin_socket) == 0o600
        await admin.ListUsers(apb.ListUsersRequest(), timeout=5)
    assert not srv.admin_socket.exists()
    assert _mode(shared) == 0o1777


async def test_a_policy_written_to_the_acl_file_is_durable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    acl = tmp_path / "acls.toml"
    acl.write_text("")
    base = mesh_config(tmp_path)
    cfg = replace(base, server=replace(base.server, acl_file=str(acl)))
    async with running(cfg) as srv, admin_unix(srv) as admin:
        events: list[tuple[str, str]] = []
        real_fsync: Callable[[int], None] = os.fsync
        real_replace = os.replace

        def fsync(fd: int) -> None:
            events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
            real_fsync(fd)

        def replace_(src: str | Path, dst: str | Path) -> None:
            events.append(("replace", str(dst)))
            real_replace(src, dst)

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "replace", replace_)
        text = '[[acls]]\naction = "accept"\nsrc = ["*"]\ndst = ["*:*"]\n'
        await admin.SetPolicy(apb.SetPolicyRequest(text=text), timeout=5)
        assert acl.read_text() == text
        after = events[events.index(("replace", str(acl))) + 1 :]
        assert ("fsync", str(tmp_path)) in after  # the rename itself made durable
        assert srv.policy.info.source == f"file:{acl}"
