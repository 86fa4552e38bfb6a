"""ghostmesh's two private keys, each in its own 0600 file, never in the database (the I/O edge).

- ``server.key`` in ``server.state_dir``: the X25519 key node proofs are made for
  (:mod:`ghostcore.nodeauth`); its public half is what ``GetServerInfo`` answers.
- ``audit.key`` in ``server.state_dir``, or ``audit.key_file``: the Ed25519 key audit entries are signed
  with (:mod:`ghostcore.auditchain`). A configured ``key_file`` (e.g. on a read-only mount, so that
  whoever can write the database still cannot sign) must exist already; ghostmesh never makes it.

Each file holds the 32 raw key bytes in standard base64 and a newline. A missing ``server.key`` /
``audit.key`` in the state directory is made on first start (born 0600, ``O_EXCL``, fsynced with its
directory). A key file its group or others have any permission on is refused: ghostmesh does not start.

Migration: a database written before these files existed holds the keys in its kv table
(``server_private_key``: the base64 text; ``audit_private_key``: the 32 raw bytes). At start each key
found there is written to its file (unless the file holds it already) and then deleted from the table
with SQLite's ``secure_delete`` and the WAL truncated (:meth:`ghostmesh.store.sqlite.SqliteStore.
delete_secret`), so its bytes leave the database files. Both steps are idempotent: a crash between them
leaves the same key in both places and the next start finishes the move. With ``[database] type =
"postgres"`` the files live in ``server.state_dir`` too (the database is on another machine, perhaps
shared by several servers; a key there would be readable by whoever can read the tables); such a
database never held them, and :meth:`ghostmesh.store.postgres.PostgresStore.delete_secret` could only
promise the row's removal, not the bytes' (WAL, backups). A kv key that differs from its
file is refused (one of them is not the key nodes or the audit log know).

No key appears in a log, repr or message.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ghostcore.errors import ConfigError
from ghostcore.files import create_private, read_private
from ghostcore.keys import PrivateKey
from ghostmesh.store.base import Store

SERVER_KEY_FILE = "server.key"
AUDIT_KEY_FILE = "audit.key"
SERVER_KEY_KV = "server_private_key"  # where databases of earlier versions kept them
AUDIT_KEY_KV = "audit_private_key"
KEY_LEN = 32


def _decode(text: bytes) -> bytes | None:
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw if len(raw) == KEY_LEN else None


def _legacy(store: Store, kv: str, decode: Callable[[bytes], bytes | None]) -> bytes | None:
    """The key an earlier version kept in the kv table, raw; None when there is none."""
    stored = store.get_kv(kv)
    if stored is None:
        return None
    raw = decode(stored)
    if raw is None:
        raise ConfigError(
            f"database: kv {kv} does not hold a 32-byte key; restore the database from a backup"
        )
    return raw


def _load(
    store: Store,
    path: Path,
    what: str,
    *,
    kv: str,
    decode_kv: Callable[[bytes], bytes | None],
    fresh: Callable[[], bytes],
    configured: str = "",
) -> bytes:
    """The raw key kept in ``path``: read, moved there from the kv table, or (unless ``configured`` names
    the config key that set ``path``) made."""
    legacy = _legacy(store, kv, decode_kv)
    if path.exists():
        raw = _decode(read_private(path, what))
        if raw is None:
            raise ConfigError(
                f"{what} {path} does not hold a 32-byte key in base64; restore it from a backup"
            )
        if legacy is not None:
            if not hmac.compare_digest(legacy, raw):
                raise ConfigError(
                    f"{what} {path} differs from the key the database holds (kv {kv}); keep the one "
                    "nodes and the audit log know: remove the file to move the database's key there"
                )
            store.delete_secret(kv)  # a crash after the file was written: finish the move
        return raw
    if configured:
        raise ConfigError(
            f"{configured}: {path} does not exist; create it (32 key bytes in base64, mode 0600) or unset "
            f"{configured} to keep the key in server.state_dir"
        )
    raw = legacy if legacy is not None else fresh()
    try:
        create_private(path, base64.b64encode(raw) + b"\n")
    except OSError as exc:
        raise ConfigError(f"cannot create {what} {path}: {exc.strerror}") from None
    if legacy is not None:
        store.delete_secret(kv)
    return raw


def load_server_key(store: Store, state_dir: Path) -> PrivateKey:
    """The server's X25519 key from ``<state_dir>/server.key`` (made, or moved from the database, once)."""
    raw = _load(
        store,
        state_dir / SERVER_KEY_FILE,
        "ghostmesh's server key",
        kv=SERVER_KEY_KV,
        decode_kv=_decode,  # the kv value was the key's base64 text
        fresh=lambda: base64.b64decode(PrivateKey.generate().base64()),
    )
    return PrivateKey.from_base64(base64.b64encode(raw).decode("ascii"))


def load_audit_key(store: Store, state_dir: Path, key_file: str = "") -> Ed25519PrivateKey:
    """The audit signing key from ``key_file`` (which must exist), else ``<state_dir>/audit.key``."""
    raw = _load(
        store,
        Path(key_file) if key_file else state_dir / AUDIT_KEY_FILE,
        "ghostmesh's audit key",
        kv=AUDIT_KEY_KV,
        decode_kv=lambda stored: stored if len(stored) == KEY_LEN else None,  # the kv value was raw
        fresh=lambda: Ed25519PrivateKey.generate().private_bytes_raw(),
        configured="audit.key_file" if key_file else "",
    )
    return Ed25519PrivateKey.from_private_bytes(raw)
