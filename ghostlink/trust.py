"""What this node trusts: the lock log it verified, its rotation key, what it refused of the map (pure).

:class:`NodeTrust` is the one owner of the node's side of node-key signing (``ghostcore.lock``):

* **The lock log.** Each map may carry the lock's log (``MapUpdate.lock``). It is accepted only if it
  verifies from its first update, and, once this node has verified one, only if it keeps every update of
  that one in order (``lock.extends``): ghostmesh can neither fork the trusted set, nor roll it back, nor
  drop the lock by sending no log. The very first log is taken on trust from the (TLS-pinned) server,
  unless the node joined with a pre-signed auth key: then the log must contain the INIT the key was
  made under (its *anchor*). A refused log leaves the old one in force and is recorded.
* **Admission** of every map (:func:`ghostlink.admission.admit`) under the verified log's trusted keys,
  with one :class:`ghostlink.admission.SeqMemory` for the run.
* **Signing this node's rotated keys** with its rotation key (``lock.rotate``), so rotations need no
  admin (a join with a pre-signed auth key signs the first key the same way: ``lock.join_with_credential``).
* **Refusals**: what the current map had refused (for ``ghostctl status``), and how many refusals were
  new since start (each logged once when it first appears, not on every map).

Persistence is the caller's: the accepted log goes out through ``save`` (ghostlink.state writes it), and
comes back in at start.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence

from ghostcore import lock
from ghostcore.errors import PermissionDenied
from ghostcore.keys import PublicKey
from ghostlink.admission import Policy, Refusal, SeqMemory, admit
from ghostlink.engine import NetMap, NodeInfo

log = logging.getLogger(__name__)


class NodeTrust:
    def __init__(
        self,
        rotation_key: lock.SigningKey,
        log_updates: Sequence[bytes] = (),
        *,
        anchor: bytes | None = None,
        save: Callable[[tuple[bytes, ...]], None] = lambda _: None,
    ) -> None:
        self._rotation = rotation_key
        self._anchor = anchor
        self._save = save
        self._log: tuple[bytes, ...] = ()
        self._state = lock.OFF
        self._verifier: lock.Verifier | None = None
        self._seqs = SeqMemory()
        self._refused: list[Refusal] = []
        self._admitted: dict[int, NodeInfo] = {}  # the peers admitted from the last map
        self._log_refusal: Refusal | None = None
        self.refused_total = 0
        if log_updates:  # what this node verified before: verified again (LockError if it no longer does)
            self._log = tuple(log_updates)
            self._state = lock.verify_log(self._log)
            self._verifier = lock.Verifier(self._state.trusted) if self._state.enabled else None

    # ----- the lock log

    def _log_problem(self, updates: tuple[bytes, ...]) -> str | None:
        """Why ``updates`` cannot become this node's lock log, or None (then it is taken)."""
        if not lock.extends(self._log, updates):
            return "it does not keep the log this node verified (a fork or a rollback)"
        try:
            state = lock.verify_log(updates)
            anchored = self._anchor is None or self._anchor in {lock.decode_update(u).hash() for u in updates}
        except lock.LockError as exc:
            return str(exc)
        if not self._log and not anchored:
            return "it is not the lock this node's auth key was signed under"
        self._log, self._state = updates, state
        self._verifier = lock.Verifier(state.trusted) if state.enabled else None
        return None

    def observe_log(self, updates: tuple[bytes, ...]) -> bool:
        """A map's lock log: True if it became this node's (verified, extends, anchored), else recorded."""
        if updates == self._log:
            return False
        why = self._log_problem(updates)
        if why is not None:
            head = hashlib.sha256(updates[-1]).hexdigest()[:12] if updates else "none"
            self._note_log_refusal(
                Refusal("lock log", f"{len(updates)} updates, head {head}", f"refused: {why}")
            )
            return False
        self._note_log_refusal(None)
        self._save(updates)
        log.info(
            "lock log accepted: %s, %d trusted keys, %d updates",
            "on" if self._state.enabled else "off",
            len(self._state.trusted),
            self._state.length,
        )
        return True

    def _note_log_refusal(self, refusal: Refusal | None) -> None:
        if refusal is not None and refusal != self._log_refusal:
            self.refused_total += 1
            log.warning("refused from the map: %s", refusal.line())
        self._log_refusal = refusal

    @property
    def enabled(self) -> bool:
        return self._state.enabled

    def trusted_keys(self) -> list[str]:
        return sorted(lock.format_key(k) for k in self._state.trusted)

    # ----- admission

    def admit(self, nm: NetMap, policy: Policy) -> NetMap:
        """The part of ``nm`` this node installs; new refusals are logged and counted. A peer whose new
        record is refused keeps the record admitted last time (:mod:`ghostlink.admission`)."""
        admitted, refused = admit(nm, policy, self._verifier, self._seqs, self._admitted)
        self._admitted = admitted.peers
        old = set(self._refused)
        for r in refused:
            if r not in old:
                self.refused_total += 1
                log.warning("refused from the map: %s", r.line())
        self._refused = refused
        return admitted

    def refused(self) -> list[str]:
        """What the current map had refused, one line each (the lock log's refusal first)."""
        lines = [self._log_refusal.line()] if self._log_refusal is not None else []
        return lines + [r.line() for r in self._refused]

    # ----- this node's own key

    def request(self, node_key: PublicKey) -> str:
        """What an admin signs for this node (``ghostctl lock sign``): its WireGuard and rotation keys."""
        return lock.format_request(node_key.raw, self._rotation.public())

    def signed(self, me: NodeInfo | None) -> bool:
        """Whether this node's own record carries a signature valid under the current lock."""
        if me is None or self._verifier is None:
            return False
        verdict = self._verifier.check(me.key_signature, PublicKey.from_base64(me.node_key).raw)
        return not isinstance(verdict, str)

    def rotation_signature(self, me: NodeInfo | None, new_key: PublicKey) -> bytes:
        """Signature of ``new_key`` by this node's rotation key; empty while the lock is off.

        PermissionDenied if the lock is on and this node's current key is unsigned, or signed for another
        rotation key: peers would refuse the new key, so the rotation must not start.
        """
        if not self._state.enabled:
            return b""
        if me is None or not self.signed(me):
            raise PermissionDenied(
                "node-key signing is on and this node's key is not signed, so peers would refuse a new key; "
                f"ask an admin to run `ghostctl lock sign {self.request(PublicKey.from_base64(me.node_key))}`"
                if me is not None
                else "node-key signing is on and this node has no map yet; retry once connected"
            )
        try:
            return lock.rotate(me.key_signature, self._rotation, new_key.raw)
        except lock.LockError as exc:
            raise PermissionDenied(f"cannot sign the new key: {exc}") from None
