"""Where the ACL policy in force comes from, and how a new one is taken in (the I/O edge of the policy).

Two sources, never both:

- ``server.acl_file`` set: the file is the source of truth. It is read at start (missing or invalid:
  ghostmesh refuses to start with the one-line error), then polled every ``POLL_INTERVAL`` seconds:
  a changed (mtime, size) triggers a read, a changed sha256 a validation; a valid policy applies at
  once, an invalid one is logged and the old one stays in force. ``SetPolicy`` writes the file atomically
  (a temporary file in the same directory, fsync, ``os.replace``) and applies it.
- no ``acl_file``: the policy set through the API is kept in the store's kv table; with none stored
  every node reaches every node (source ``"default"``).

"Valid" always means: it parses, and its own ``[[tests]]`` pass (:func:`ghostmesh.policy.validate`).
Applying hands the policy to ``on_apply`` (the server folds it into the mapper and wakes the streams
whose peers or filter changed).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ghostcore.errors import ConfigError, InvalidArgument, PermissionDenied
from ghostmesh.policy import Answer, NodeIdent, Policy, PolicyError, check, parse_policy, validate
from ghostmesh.policy.model import PROTOS
from ghostmesh.store.base import Store

log = logging.getLogger(__name__)

POLICY_KV = "acl_policy"  # JSON {"text": ..., "updated": unix seconds}
POLL_INTERVAL = 0.5  # seconds; a file change applies within about this long


@dataclass(frozen=True)
class PolicyInfo:
    text: str
    sha256: str
    updated: float
    source: str  # "file:<path>", "api" or "default"


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        with contextlib.suppress(FileNotFoundError):
            os.chmod(tmp, path.stat().st_mode & 0o7777)  # keep the file's mode
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def read_policy_file(path: Path) -> tuple[str, Policy, tuple[int, int]]:
    """Read and validate an acl_file: (text, policy, (mtime_ns, size)); ConfigError naming the file."""
    try:
        st = path.stat()
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"server.acl_file: cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"server.acl_file: {path} is not UTF-8 text") from None
    try:
        policy, _ = validate(text)
    except PolicyError as exc:
        raise ConfigError(f"server.acl_file: {path}: {exc}") from None
    return text, policy, (st.st_mtime_ns, st.st_size)


def _allow_all(src: str, dst: str, proto: str) -> Answer:
    if proto not in PROTOS:
        raise ValueError(f'protocol must be one of {", ".join(PROTOS)}, got "{proto}"')
    return Answer(src, dst, proto, True, "no policy in force: all allowed")


class PolicyManager:
    def __init__(
        self,
        store: Store,
        path: Path | None,
        on_apply: Callable[[Policy | None], None],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.path = path
        self.on_apply = on_apply
        self.clock = clock
        self.policy: Policy | None = None
        self.info = PolicyInfo("", "", 0.0, "default")
        self.on_file_applied: Callable[[PolicyInfo], None] | None = None  # e.g. the audit log
        self._stat: tuple[int, int] | None = None
        self._task: asyncio.Task[None] | None = None

    # -- loading ---------------------------------------------------------------------------------------

    def load(self) -> Policy | None:
        """Read the policy at start (does not call ``on_apply``); raises ConfigError if it is invalid."""
        if self.path is not None:
            text, self.policy, self._stat = read_policy_file(self.path)
            self.info = PolicyInfo(text, _sha(text), self._stat_mtime(), f"file:{self.path}")
            return self.policy
        raw = self.store.get_kv(POLICY_KV)
        if raw is not None:
            doc = json.loads(raw)
            self.policy = parse_policy(doc["text"])  # it passed validation when it was set
            self.info = PolicyInfo(doc["text"], _sha(doc["text"]), float(doc["updated"]), "api")
        return self.policy

    def _read(self) -> str:
        if self.path is None:
            raise ConfigError("server.acl_file: not set")
        try:
            st = self.path.stat()
            text = self.path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"server.acl_file: cannot read {self.path}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"server.acl_file: {self.path} is not UTF-8 text") from None
        self._stat = (st.st_mtime_ns, st.st_size)
        return text

    def _stat_mtime(self) -> float:
        return 0.0 if self._stat is None else self._stat[0] / 1e9

    def poll(self) -> bool:
        """Check the file for a change; apply a new valid policy. Returns whether one was applied."""
        if self.path is None:
            return False
        try:
            st = self.path.stat()
        except OSError as exc:
            if self._stat is not None:
                log.warning("acl_file unreadable; the policy in force stays", extra={"error": exc.strerror})
                self._stat = None
            return False
        if (st.st_mtime_ns, st.st_size) == self._stat:
            return False
        try:
            text = self._read()
        except ConfigError as exc:
            log.warning("%s; the policy in force stays", exc)
            return False
        if _sha(text) == self.info.sha256:
            return False
        try:
            policy, _ = validate(text)
        except PolicyError as exc:
            log.warning(
                "acl_file %s refused; the policy in force stays: %s", self.path, "; ".join(exc.errors)
            )
            return False
        self._apply(policy, text, f"file:{self.path}")
        log.info("acl_file %s applied", self.path)
        if self.on_file_applied is not None:
            self.on_file_applied(self.info)
        return True

    def _apply(self, policy: Policy | None, text: str, source: str) -> None:
        self.policy = policy
        self.info = PolicyInfo(text, _sha(text), self.clock(), source)
        self.on_apply(policy)

    # -- API -------------------------------------------------------------------------------------------

    def set(self, text: str) -> PolicyInfo:
        """Validate ``text`` (PolicyError / PolicyTestError), store it, apply it."""
        policy, _ = validate(text)
        if self.path is not None:
            try:
                _write_atomic(self.path, text)
            except OSError as exc:
                raise ConfigError(f"server.acl_file: cannot write {self.path}: {exc.strerror}") from None
            self._read()  # remember the new (mtime, size): the poller must not apply it a second time
            self._apply(policy, text, f"file:{self.path}")
        else:
            now = self.clock()
            self.store.set_kv(POLICY_KV, json.dumps({"text": text, "updated": now}).encode("utf-8"))
            self._apply(policy, text, "api")
        return self.info

    @staticmethod
    def check(text: str) -> tuple[list[str], int]:
        """(errors, tests passed) for ``text``; changes nothing."""
        try:
            _, passed = validate(text)
        except PolicyError as exc:
            return exc.errors, 0
        return [], passed

    def test(
        self, text: str, queries: Sequence[tuple[str, str, str]], nodes: Iterable[NodeIdent]
    ) -> list[Answer]:
        """Answer ``(src, dst, proto)`` questions against ``text`` (empty: the policy in force)."""
        policy = parse_policy(text) if text else self.policy
        node_list = list(nodes)
        out: list[Answer] = []
        for i, (src, dst, proto) in enumerate(queries):
            try:
                if policy is None:
                    out.append(_allow_all(src, dst, proto or "tcp"))
                    continue
                out.append(check(policy, src, dst, proto or "tcp", node_list))
            except ValueError as exc:
                raise InvalidArgument(f"queries[{i}]: {exc}") from None
        return out

    def authorize_tags(self, user: str, tags: Sequence[str], as_admin: bool) -> None:
        """May an auth key for ``user`` carry ``tags``? The server admin may use any declared tag; anyone
        else only the tags ``user`` owns under [tag_owners]. Without a policy every tag is allowed."""
        policy = self.policy
        if policy is None:
            return
        for i, tag in enumerate(tags):
            if tag not in policy.tag_owners:
                raise InvalidArgument(
                    f'tags[{i}]: unknown tag "{tag}"; declare it in [tag_owners] of the policy'
                )
            if not as_admin and not policy.owns_tag(user, tag):
                owners = ", ".join(policy.tag_owners[tag]) or "nobody"
                raise PermissionDenied(
                    f'tags[{i}]: user "{user}" does not own "{tag}" (owners: {owners}); '
                    "ask an admin or change [tag_owners]"
                )

    # -- polling task ----------------------------------------------------------------------------------

    def start(self, interval: float = POLL_INTERVAL) -> None:
        if self.path is not None:
            self._task = asyncio.get_running_loop().create_task(self._watch(interval), name="acl-file-watch")

    async def _watch(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                self.poll()
            except Exception:  # a surprise must not stop the watcher; the old policy stays
                log.exception("acl_file poll failed")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
