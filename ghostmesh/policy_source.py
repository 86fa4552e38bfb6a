"""The ACL policy in force and its one owner, :class:`PolicySource` (the I/O edge of the policy).

The policy in force is held here and read nowhere else: the policy RPCs (GetPolicy, TestPolicy), tag
ownership of auth keys (:meth:`PolicySource.authorize_tags`) and route auto-approval
(:meth:`PolicySource.auto_approves`, for node reports and after a new policy) all ask this object. The
mapper is given each new policy (:meth:`ghostmesh.hub.Hub.set_policy`) and compiles it; it is never
asked for it back.

Two sources, never both:

- ``server.acl_file`` set: the file is the source of truth. It is read at start (missing or invalid:
  ghostmesh refuses to start with the one-line error), then polled every ``POLL_INTERVAL`` seconds:
  a changed (mtime, size) triggers a read, a changed sha256 a validation; a valid policy applies at
  once, an invalid one is logged and the old one stays in force. ``SetPolicy`` writes the file atomically
  and durably (:func:`ghostcore.files.replace_file`: a temporary file, fsync, rename, fsync of the
  directory) and applies it.
- no ``acl_file``: the policy set through the API is kept in the store's kv table; with none stored
  every node reaches every node (source ``"default"``).

"Valid" always means: it parses, and its own ``[[tests]]`` pass (:func:`ghostcore.policy.validate`).
Putting a valid policy in force: the mapper recompiles and wakes only the streams whose peers or filter
changed, then the policy's ``[auto_approvers]`` approve what nodes advertise and nobody approved yet
(each recorded as ``route.approve`` by ``system``). An ``acl_file`` edit is recorded as ``policy.set`` by
``system``; ``SetPolicy`` is recorded by the Admin API, which knows its caller.

At start :func:`load_policy` reads the policy before the mapper exists; the mapper is built with it and
the :class:`PolicySource` from the same :class:`LoadedPolicy`, so both start from the same policy.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ghostcore.errors import ConfigError, InvalidArgument, PermissionDenied
from ghostcore.files import replace_file
from ghostcore.policy import Answer, Policy, PolicyError, check, parse_policy, validate
from ghostcore.policy.model import PROTOS
from ghostmesh.audit import ACTOR_SYSTEM, POLICY_SET, ROUTE_APPROVE
from ghostmesh.hub import Hub
from ghostmesh.mapper import ident_of
from ghostmesh.store.base import NodeRec, Store

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


def _read_file(path: Path) -> tuple[str, tuple[int, int]]:
    """An acl_file's text and (mtime_ns, size); ConfigError naming the file."""
    try:
        st = path.stat()
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"server.acl_file: cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"server.acl_file: {path} is not UTF-8 text") from None
    return text, (st.st_mtime_ns, st.st_size)


def read_policy_file(path: Path) -> tuple[str, Policy, tuple[int, int]]:
    """Read and validate an acl_file: (text, policy, (mtime_ns, size)); ConfigError naming the file."""
    text, stat = _read_file(path)
    try:
        policy, _ = validate(text)
    except PolicyError as exc:
        raise ConfigError(f"server.acl_file: {path}: {exc}") from None
    return text, policy, stat


@dataclass(frozen=True)
class LoadedPolicy:
    """The policy in force at start, as :func:`load_policy` read it."""

    policy: Policy | None  # None: no policy, every node reaches every node
    info: PolicyInfo
    path: Path | None  # server.acl_file; None: the policy is set through the API
    stat: tuple[int, int] | None = None  # the acl_file's (mtime_ns, size) when it was read


def load_policy(store: Store, path: Path | None) -> LoadedPolicy:
    """The policy in force at start: ``path``'s (ConfigError if it is missing or invalid: the server
    must not start), else the one stored through the API, else none."""
    if path is not None:
        text, policy, stat = read_policy_file(path)
        return LoadedPolicy(policy, PolicyInfo(text, _sha(text), stat[0] / 1e9, f"file:{path}"), path, stat)
    raw = store.get_kv(POLICY_KV)
    if raw is None:
        return LoadedPolicy(None, PolicyInfo("", "", 0.0, "default"), None)
    doc = json.loads(raw)
    text = doc["text"]
    info = PolicyInfo(text, _sha(text), float(doc["updated"]), "api")
    return LoadedPolicy(parse_policy(text), info, None)  # it passed validation when it was set


def _allow_all(src: str, dst: str, proto: str) -> Answer:
    if proto not in PROTOS:
        raise ValueError(f'protocol must be one of {", ".join(PROTOS)}, got "{proto}"')
    return Answer(src, dst, proto, True, "no policy in force: all allowed")


class PolicySource:
    """The one owner of the policy in force: takes new ones in, puts them in force, answers about it."""

    def __init__(self, store: Store, hub: Hub, loaded: LoadedPolicy) -> None:
        """``loaded``: what the mapper in ``hub`` was built with (:func:`load_policy`)."""
        self._store = store
        self._hub = hub
        self._path = loaded.path
        self._policy = loaded.policy
        self._info = loaded.info
        self._stat = loaded.stat
        self._task: asyncio.Task[None] | None = None

    @property
    def info(self) -> PolicyInfo:
        """What the API shows of the policy in force."""
        return self._info

    # -- taking a new policy in ------------------------------------------------------------------------

    def poll(self) -> bool:
        """Check the file for a change; apply a new valid policy. Returns whether one was applied."""
        if self._path is None:
            return False
        try:
            st = self._path.stat()
        except OSError as exc:
            if self._stat is not None:
                log.warning("acl_file unreadable; the policy in force stays", extra={"error": exc.strerror})
                self._stat = None
            return False
        if (st.st_mtime_ns, st.st_size) == self._stat:
            return False
        try:
            text, self._stat = _read_file(self._path)
        except ConfigError as exc:
            log.warning("%s; the policy in force stays", exc)
            return False
        if _sha(text) == self._info.sha256:
            return False
        try:
            policy, _ = validate(text)
        except PolicyError as exc:
            log.warning(
                "acl_file %s refused; the policy in force stays: %s", self._path, "; ".join(exc.errors)
            )
            return False
        with self._hub.transaction() as tx:
            self._put_in_force(policy, text, f"file:{self._path}")
            tx.record(ACTOR_SYSTEM, POLICY_SET, self._info.source, {"sha256": self._info.sha256})
        log.info("acl_file %s applied", self._path)
        return True

    def set(self, text: str) -> PolicyInfo:
        """Validate ``text`` (PolicyError / PolicyTestError), store it, apply it."""
        policy, _ = validate(text)
        if self._path is not None:
            try:
                replace_file(self._path, text.encode("utf-8"), mode=None)  # keeps the file's mode
            except OSError as exc:
                raise ConfigError(f"server.acl_file: cannot write {self._path}: {exc.strerror}") from None
            _, self._stat = _read_file(self._path)  # the poller must not apply our own write again
            self._put_in_force(policy, text, f"file:{self._path}")
        else:
            now = self._hub.now()
            self._store.set_kv(POLICY_KV, json.dumps({"text": text, "updated": now}).encode("utf-8"))
            self._put_in_force(policy, text, "api")
        return self._info

    def _put_in_force(self, policy: Policy, text: str, source: str) -> None:
        """Make ``policy`` the one in force: the mapper recompiles (waking the streams it changed), then
        its auto-approvers approve what nodes advertise and nobody approved yet (recorded as ``system``)."""
        self._policy = policy
        self._info = PolicyInfo(text, _sha(text), self._hub.now(), source)
        self._hub.set_policy(policy)
        state = self._hub.state
        with self._hub.transaction() as tx:  # the caller's, when it recorded the policy change itself
            approved, changes = state.approve_pending(self.auto_approves)
            tx.dispatch(changes)
            for rec in approved:
                node = state.node(rec.node_id)
                detail = {"prefix": rec.prefix, "by": "auto_approvers"}
                tx.record(ACTOR_SYSTEM, ROUTE_APPROVE, node.name if node else str(rec.node_id), detail)

    # -- questions about the policy --------------------------------------------------------------------

    def auto_approves(self, node: NodeRec, prefix: str) -> bool:
        """Whether the policy in force approves ``node`` serving ``prefix`` without an admin
        (``[auto_approvers]``; no policy: nothing is auto-approved)."""
        policy = self._policy
        return policy is not None and policy.auto_approves(ident_of(node).principal, prefix)

    @staticmethod
    def check(text: str) -> tuple[list[str], int]:
        """(errors, tests passed) for ``text``; changes nothing."""
        try:
            _, passed = validate(text)
        except PolicyError as exc:
            return exc.errors, 0
        return [], passed

    def test(self, text: str, queries: Sequence[tuple[str, str, str]]) -> list[Answer]:
        """Answer ``(src, dst, proto)`` questions about the current nodes against ``text`` (empty: the
        policy in force)."""
        policy = parse_policy(text) if text else self._policy
        nodes = [ident_of(a.node, a.groups) for a in self._hub.state.snapshot()]
        out: list[Answer] = []
        for i, (src, dst, proto) in enumerate(queries):
            try:
                if policy is None:
                    out.append(_allow_all(src, dst, proto or "tcp"))
                    continue
                out.append(check(policy, src, dst, proto or "tcp", nodes))
            except ValueError as exc:
                raise InvalidArgument(f"queries[{i}]: {exc}") from None
        return out

    def authorize_tags(self, user: str, tags: Sequence[str], as_admin: bool) -> None:
        """May an auth key for ``user`` carry ``tags``? The server admin may use any declared tag; anyone
        else only the tags ``user`` owns under [tag_owners]. Without a policy every tag is allowed."""
        policy = self._policy
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
        if self._path is not None:
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
