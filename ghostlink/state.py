"""ghostlink's state directory: the node key, the saved registration, and what the node trusts.

::

    <state_dir>/            mode 0700 when ghostlink creates it; one that exists is left as it is,
                            and refused if another user can write to it (``ghostcore.files``)
        node.key            mode 0600, the WireGuard private key in base64 (as ``wg genkey`` prints)
        node.key.pending    mode 0600, only during a key rotation: the new key (``ghostlink.rotate``)
        node.json           mode 0600, {"server", "server_key", "server_pin", "node_id", "name",
                            "key_created", "lock_anchor"}
        rotation.key        mode 0600, the node's Ed25519 rotation key (node-key signing: it vouches for
                            the node's next WireGuard keys, ``ghostcore.lock``), base64
        lock.json           mode 0600, the lock log this node verified: {"updates": [base64, ...]}
        host.json           mode 0600, only while ghostlink runs (or after it crashed): what it changed
                            on the host, to undo at the next start (``ghostlink.hostjournal``)

``server_pin`` is the ghostmesh TLS key the node trusts (``sha256:…``; empty: a CA-issued certificate),
``server_key`` the X25519 key its proofs are made with, both learned at join. ``lock_anchor`` (hex) is the
genesis of the lock a pre-signed auth key was made for: the first lock log this node accepts must have
it. The key is generated in memory for a join and written together with ``node.json`` only after the
server accepted the registration, so a failed join leaves nothing behind. ``node.key`` is rewritten only
by a key rotation, which first writes ``node.key.pending`` and replaces ``node.key`` last (atomically),
so a crash at any step leaves a key the server accepts. Files are written to a temp name, fsynced and
renamed, and the directory fsynced after every rename or removal, so a crash never leaves a half-written
file nor undoes a step that returned. No key ever reaches a log.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from ghostcore.errors import ConfigError, InvalidArgument
from ghostcore.files import make_private_dir, remove_file, replace_file
from ghostcore.joinkey import parse_pin
from ghostcore.keys import PrivateKey, PublicKey
from ghostcore.lock import LockError, SigningKey

KEY_FILE = "node.key"
PENDING_KEY_FILE = "node.key.pending"
NODE_FILE = "node.json"
ROTATION_KEY_FILE = "rotation.key"
LOCK_FILE = "lock.json"
JOURNAL_FILE = "host.json"


@dataclass(frozen=True)
class SavedNode:
    server: str
    server_key: str  # base64 X25519 key, learned at join over the authenticated channel
    node_id: int
    name: str
    key_created: float = 0.0  # unix time node.key was made (0: unknown, node.key's mtime counts)
    server_pin: str = ""  # "sha256:…" the TLS key trusted at join; "": the certificate chains to a CA
    lock_anchor: str = ""  # hex genesis of the lock a pre-signed auth key named; "": none


class StateDir:
    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    @property
    def key_path(self) -> Path:
        return self.path / KEY_FILE

    @property
    def node_path(self) -> Path:
        return self.path / NODE_FILE

    @property
    def pending_path(self) -> Path:
        return self.path / PENDING_KEY_FILE

    def existing_key(self) -> PrivateKey | None:
        return self._read_key(self.key_path)

    def pending_key(self) -> PrivateKey | None:
        """The new key of a rotation that has not finished (None: no rotation under way)."""
        return self._read_key(self.pending_path)

    def save_pending(self, key: PrivateKey) -> None:
        """Rotation: persist the new key before WireGuard switches to it (0600, atomic)."""
        try:
            replace_file(self.pending_path, (key.base64() + "\n").encode())
        except OSError as exc:
            raise ConfigError(f"{self.pending_path}: cannot write ({exc.strerror})") from None

    def discard_pending(self) -> None:
        remove_file(self.pending_path)

    def commit_key(self, key: PrivateKey, now: float) -> None:
        """Rotation done: ``key`` replaces node.key atomically, node.json records when, pending goes."""
        try:
            replace_file(self.key_path, (key.base64() + "\n").encode())
            saved = self.saved_node()
            if saved is not None:
                self._write_node(replace(saved, key_created=now))
        except OSError as exc:
            raise ConfigError(f"{self.key_path}: cannot write the rotated key ({exc.strerror})") from None
        self.discard_pending()

    def key_created(self) -> float:
        """When node.key was made: node.json's ``key_created``, else the file's mtime (0: no key)."""
        saved = self.saved_node()
        if saved is not None and saved.key_created > 0:
            return saved.key_created
        try:
            return self.key_path.stat().st_mtime
        except OSError:
            return 0.0

    def _read_key(self, path: Path) -> PrivateKey | None:
        try:
            text = path.read_text()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ConfigError(
                f"{path}: cannot read the node key ({exc.strerror}); check permissions"
            ) from None
        try:
            return PrivateKey.from_base64(text)
        except InvalidArgument:
            raise ConfigError(
                f"{path}: not a valid WireGuard private key; "
                "restore it, or remove the state directory and join again"
            ) from None

    def key_for_join(self) -> PrivateKey:
        """The saved key if there is one (re-join keeps the identity), else a new one, not yet written."""
        return self.existing_key() or PrivateKey.generate()

    def load(self) -> tuple[PrivateKey, SavedNode]:
        key = self.existing_key()
        if key is None or not self.node_path.exists():
            raise ConfigError(
                f"{self.path}: no saved registration; "
                "run `ghostlink join --server HOST:PORT --auth KEY` first"
            )
        try:
            data = json.loads(self.node_path.read_text())
            node = SavedNode(
                server=str(data["server"]),
                server_key=PublicKey.from_base64(str(data["server_key"])).base64(),
                node_id=int(data["node_id"]),
                name=str(data["name"]),
                key_created=float(data.get("key_created", 0.0)),
                server_pin=str(data.get("server_pin", "")),
                lock_anchor=str(data.get("lock_anchor", "")),
            )
            if node.server_pin:
                parse_pin(node.server_pin)
            if node.lock_anchor:
                bytes.fromhex(node.lock_anchor)
        except (OSError, ValueError, KeyError, TypeError, InvalidArgument):
            raise ConfigError(
                f"{self.node_path}: unreadable or malformed; join again to rewrite it"
            ) from None
        return key, node

    def saved_node(self) -> SavedNode | None:
        try:
            return self.load()[1]
        except ConfigError:
            return None

    def save(self, key: PrivateKey, node: SavedNode, rotation: SigningKey | None = None) -> None:
        """Persist a successful registration: the directory (:func:`make_private_dir`), the key (only if
        new), node.json, and the rotation key if given and none is saved yet, all 0600."""
        make_private_dir(self.path, "state directory", "--state-dir")
        try:
            existing = self.existing_key()
            if existing is None:
                replace_file(self.key_path, (key.base64() + "\n").encode())
            elif existing.public_key() != key.public_key():
                raise ConfigError(f"{self.key_path}: holds a different key than the one just registered")
            self._write_node(node)
            if rotation is not None and self.existing_rotation_key() is None:
                self._save_rotation_key(rotation)
        except OSError as exc:
            raise ConfigError(
                f"{self.path}: cannot write state ({exc.strerror}); check node.state_dir"
            ) from None

    def _write_node(self, node: SavedNode) -> None:
        doc = asdict(node)
        if not node.key_created:
            del doc["key_created"]  # unknown: node.key's mtime stands in (see key_created())
        replace_file(self.node_path, (json.dumps(doc, indent=2) + "\n").encode())

    @property
    def journal_path(self) -> Path:
        return self.path / JOURNAL_FILE

    @property
    def rotation_path(self) -> Path:
        return self.path / ROTATION_KEY_FILE

    def existing_rotation_key(self) -> SigningKey | None:
        try:
            return SigningKey.from_text(self.rotation_path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, LockError):
            raise ConfigError(
                f"{self.rotation_path}: unreadable or not a rotation key; remove it (the node's key then "
                "needs a new signature from an admin: `ghostctl lock sign`)"
            ) from None

    def rotation_key(self) -> SigningKey:
        """The node's rotation key; a node registered before it had one gets one now (saved 0600)."""
        key = self.existing_rotation_key()
        if key is None:
            key = SigningKey.generate()
            self._save_rotation_key(key)
        return key

    def _save_rotation_key(self, key: SigningKey) -> None:
        try:
            replace_file(self.rotation_path, (key.text() + "\n").encode())
        except OSError as exc:
            raise ConfigError(f"{self.rotation_path}: cannot write ({exc.strerror})") from None

    def lock_log(self) -> tuple[bytes, ...]:
        """The lock log this node verified last (empty: none yet)."""
        path = self.path / LOCK_FILE
        try:
            doc = json.loads(path.read_text())
            return tuple(base64.b64decode(u, validate=True) for u in doc["updates"])
        except FileNotFoundError:
            return ()
        except (OSError, ValueError, KeyError, TypeError, binascii.Error):
            raise ConfigError(f"{path}: unreadable or malformed; remove it and join again") from None

    def save_lock_log(self, updates: tuple[bytes, ...]) -> None:
        doc = {"updates": [base64.b64encode(u).decode("ascii") for u in updates]}
        try:
            replace_file(self.path / LOCK_FILE, (json.dumps(doc) + "\n").encode())
        except OSError as exc:
            raise ConfigError(f"{self.path / LOCK_FILE}: cannot write ({exc.strerror})") from None
