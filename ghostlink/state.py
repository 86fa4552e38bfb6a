"""ghostlink's state directory: the node key and the saved registration.

::

    <state_dir>/            mode 0700
        node.key            mode 0600, the WireGuard private key in base64 (as ``wg genkey`` prints)
        node.key.pending    mode 0600, only during a key rotation: the new key (``ghostlink.rotate``)
        node.json           mode 0600, {"server", "server_key", "node_id", "name", "key_created"}

The key is generated in memory for a join and written together with ``node.json`` only after the
server accepted the registration, so a failed join leaves nothing behind. ``node.key`` is rewritten only
by a key rotation, which first writes ``node.key.pending`` and replaces ``node.key`` last (atomically),
so a crash at any step leaves a key the server accepts. Files are written to a temp name and renamed, so a
crash never leaves a half-written key. Neither the key nor its path's content ever reaches a log.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from ghostcore.errors import ConfigError, InvalidArgument
from ghostcore.keys import PrivateKey, PublicKey

KEY_FILE = "node.key"
PENDING_KEY_FILE = "node.key.pending"
NODE_FILE = "node.json"


@dataclass(frozen=True)
class SavedNode:
    server: str
    server_key: str  # base64, pinned at join
    node_id: int
    name: str
    key_created: float = 0.0  # unix time node.key was made (0: unknown, node.key's mtime counts)


def _write_private(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


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
            _write_private(self.pending_path, (key.base64() + "\n").encode())
        except OSError as exc:
            raise ConfigError(f"{self.pending_path}: cannot write ({exc.strerror})") from None

    def discard_pending(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.pending_path.unlink()

    def commit_key(self, key: PrivateKey, now: float) -> None:
        """Rotation done: ``key`` replaces node.key atomically, node.json records when, pending goes."""
        try:
            _write_private(self.key_path, (key.base64() + "\n").encode())
            saved = self.saved_node()
            if saved is not None:
                saved = SavedNode(saved.server, saved.server_key, saved.node_id, saved.name, now)
                _write_private(self.node_path, (json.dumps(asdict(saved), indent=2) + "\n").encode())
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
            )
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

    def save(self, key: PrivateKey, node: SavedNode) -> None:
        """Persist a successful registration: directory 0700, key 0600 (only if new), node.json 0600."""
        try:
            self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(self.path, 0o700)
            existing = self.existing_key()
            if existing is None:
                _write_private(self.key_path, (key.base64() + "\n").encode())
            elif existing.public_key() != key.public_key():
                raise ConfigError(f"{self.key_path}: holds a different key than the one just registered")
            doc = asdict(node)
            if not node.key_created:
                del doc["key_created"]  # unknown: node.key's mtime stands in (see key_created())
            _write_private(self.node_path, (json.dumps(doc, indent=2) + "\n").encode())
        except OSError as exc:
            raise ConfigError(
                f"{self.path}: cannot write state ({exc.strerror}); check node.state_dir"
            ) from None
