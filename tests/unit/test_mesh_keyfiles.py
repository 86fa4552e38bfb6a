"""ghostmesh.keyfiles: the server and audit keys in their own 0600 files, moved out of the database of an
earlier version once (idempotently), refused when others may read them or when they disagree."""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ghostcore import auditchain
from ghostcore.errors import ConfigError
from ghostcore.keys import PrivateKey
from ghostmesh.keyfiles import AUDIT_KEY_KV, SERVER_KEY_KV, load_audit_key, load_server_key
from ghostmesh.store.sqlite import SqliteStore


def _open(tmp_path: Path) -> SqliteStore:
    return SqliteStore(tmp_path / "ghostmesh.db")


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _db_bytes(tmp_path: Path) -> bytes:
    return b"".join(p.read_bytes() for p in tmp_path.glob("ghostmesh.db*"))


def test_keys_are_made_once_in_private_files(tmp_path: Path) -> None:
    store = _open(tmp_path)
    old = os.umask(0o022)
    try:
        server = load_server_key(store, tmp_path)
        audit_key = load_audit_key(store, tmp_path)
    finally:
        os.umask(old)
    assert _mode(tmp_path / "server.key") == _mode(tmp_path / "audit.key") == 0o600
    assert (tmp_path / "server.key").read_text() == server.base64() + "\n"
    assert base64.b64decode((tmp_path / "audit.key").read_text()) == audit_key.private_bytes_raw()
    assert store.get_kv(SERVER_KEY_KV) is None
    assert store.get_kv(AUDIT_KEY_KV) is None
    assert load_server_key(store, tmp_path).public_key() == server.public_key()
    assert auditchain.raw_public_key(load_audit_key(store, tmp_path)) == auditchain.raw_public_key(audit_key)
    store.close()


def test_keys_in_an_earlier_database_move_to_their_files_and_leave_it(tmp_path: Path) -> None:
    store = _open(tmp_path)
    server = PrivateKey.generate()
    audit_raw = Ed25519PrivateKey.generate().private_bytes_raw()
    store.set_kv(SERVER_KEY_KV, server.base64().encode("ascii"))  # as earlier versions kept them
    store.set_kv(AUDIT_KEY_KV, audit_raw)
    store.set_kv("acl_policy", b"{}")
    assert audit_raw in _db_bytes(tmp_path)
    assert load_server_key(store, tmp_path).public_key() == server.public_key()  # the same pin-free key
    assert load_audit_key(store, tmp_path).private_bytes_raw() == audit_raw
    assert (tmp_path / "server.key").read_text() == server.base64() + "\n"
    assert store.get_kv(SERVER_KEY_KV) is None
    assert store.get_kv(AUDIT_KEY_KV) is None
    assert store.get_kv("acl_policy") == b"{}"
    raw = _db_bytes(tmp_path)
    assert audit_raw not in raw
    assert server.base64().encode() not in raw
    store.close()


def test_a_move_cut_short_by_a_crash_is_finished(tmp_path: Path) -> None:
    store = _open(tmp_path)
    server = PrivateKey.generate()
    (tmp_path / "server.key").write_text(server.base64() + "\n")  # the file was written...
    (tmp_path / "server.key").chmod(0o600)
    store.set_kv(SERVER_KEY_KV, server.base64().encode("ascii"))  # ...the row not yet removed
    assert load_server_key(store, tmp_path).public_key() == server.public_key()
    assert store.get_kv(SERVER_KEY_KV) is None
    store.close()


def test_a_database_key_other_than_the_files_is_refused(tmp_path: Path) -> None:
    store = _open(tmp_path)
    load_audit_key(store, tmp_path)
    store.set_kv(AUDIT_KEY_KV, Ed25519PrivateKey.generate().private_bytes_raw())
    with pytest.raises(ConfigError, match=r"audit key .*audit\.key differs from the key the database holds"):
        load_audit_key(store, tmp_path)
    assert store.get_kv(AUDIT_KEY_KV) is not None  # nothing removed
    store.close()


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620])
def test_a_key_file_others_may_use_is_refused(tmp_path: Path, mode: int) -> None:
    store = _open(tmp_path)
    load_server_key(store, tmp_path)
    (tmp_path / "server.key").chmod(mode)
    with pytest.raises(ConfigError) as info:
        load_server_key(store, tmp_path)
    assert str(info.value) == (
        f"ghostmesh's server key {tmp_path / 'server.key'}: others may read it (mode {mode:o}); chmod 600 it"
    )
    store.close()


def test_a_configured_audit_key_file_must_exist_and_is_never_made(tmp_path: Path) -> None:
    store = _open(tmp_path)
    elsewhere = tmp_path / "ro" / "audit.key"
    with pytest.raises(ConfigError) as info:
        load_audit_key(store, tmp_path, str(elsewhere))
    assert str(info.value).startswith(f"audit.key_file: {elsewhere} does not exist; create it")
    assert not elsewhere.exists()
    elsewhere.parent.mkdir()
    key = Ed25519PrivateKey.generate()
    elsewhere.write_text(base64.b64encode(key.private_bytes_raw()).decode() + "\n")
    elsewhere.chmod(0o400)  # read-only is fine
    assert load_audit_key(store, tmp_path, str(elsewhere)).private_bytes_raw() == key.private_bytes_raw()
    assert not (tmp_path / "audit.key").exists()
    elsewhere.chmod(0o444)
    with pytest.raises(ConfigError, match="others may read it"):
        load_audit_key(store, tmp_path, str(elsewhere))
    store.close()


def test_a_damaged_key_file_is_refused_not_replaced(tmp_path: Path) -> None:
    store = _open(tmp_path)
    (tmp_path / "server.key").write_text("not a key\n")
    (tmp_path / "server.key").chmod(0o600)
    with pytest.raises(ConfigError, match="does not hold a 32-byte key in base64"):
        load_server_key(store, tmp_path)
    assert (tmp_path / "server.key").read_text() == "not a key\n"
    store.close()
