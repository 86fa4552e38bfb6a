"""The signed, hash-chained audit log: canonical encoding, sealing and verification (pure, no I/O).

Shared by ghostmesh (which seals entries as it appends them) and ghostctl (which verifies a fetched log
client-side), so both agree on one definition. The wire shape is ``AuditEntry`` in
``proto/ghostmesh/v1/admin.proto``; fields 1..8 are covered by the hash.

Canonical encoding (version 1) of fields 1..8, an unambiguous byte string::

    b"ghostmesh-audit-v1\\0"                      domain tag: an entry hash is never any other hash
    u64be(seq) || i64be(ts_unix_ms)              fixed width
    lp(actor) || lp(action) || lp(target) || lp(detail) || lp(remote)   strings as UTF-8
    lp(prev_hash)                                bytes (32 for every valid entry)

where ``lp(b) = u32be(len(b)) || b``. Every variable field carries its length, so no two different field
tuples encode to the same bytes (no ``"ab","c"`` vs ``"a","bc"`` ambiguity), and integers are fixed width.

- ``hash = sha256(encoding)``;
- ``signature = Ed25519-sign(audit private key, hash)`` (RFC 8032 section 5.1, pure Ed25519 over the
  32-byte hash);
- ``prev_hash`` of entry 1 is 32 zero bytes (:data:`GENESIS`), of entry n the ``hash`` of entry n - 1.

``detail`` is canonical JSON (:func:`canonical_detail`: sorted keys, no spaces, UTF-8), never a secret.

What verification can and cannot prove: an edited entry (any field) fails its hash or its signature; a
removed or reordered entry breaks the ``seq`` run or the ``prev_hash`` link. Removing the *newest*
entries leaves a shorter chain that is still valid; only a :class:`Checkpoint` taken earlier (the last
``(seq, hash)`` someone saw, plus the key) detects that. Whoever holds the server's private key can rewrite
everything, which is why the checkpoint also pins the public key.

Pruning (a retention): the server first appends an entry with action :data:`PRUNE_ACTION` whose detail
(:func:`prune_detail`) names the last entry it removes, ``(through_seq, through_hash)``, and only then
removes the entries up to it. The kept log then starts at ``through_seq + 1`` with ``prev_hash =
through_hash``, and :func:`verify` accepts a log that does not start at seq 1 only when a prune entry in
it (signed, and covered by the chain after it) names exactly that start. So cutting the oldest entries
without such an entry is still detected; what the pruned entries said is gone for good. A checkpoint
whose entry was pruned since is checked as far as the kept log allows: its key, that the log goes past
it, and its hash when the cut was exactly there.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ghostcore.errors import InvalidArgument

DOMAIN = b"ghostmesh-audit-v1\x00"
PRUNE_ACTION = "audit.prune"
GENESIS = bytes(32)
HASH_LEN = 32
KEY_LEN = 32
_U64_MAX = 2**64 - 1
_I64 = (-(2**63), 2**63 - 1)


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One entry, field for field as ``AuditEntry`` (hash and signature empty until sealed)."""

    seq: int
    ts_ms: int
    actor: str
    action: str
    target: str
    detail: str
    remote: str
    prev_hash: bytes
    hash: bytes = b""
    signature: bytes = b""


@dataclass(frozen=True, slots=True)
class Problem:
    """Why verification stopped: the first bad ``seq`` (0 when the problem is not one entry's)."""

    seq: int
    reason: str

    def __str__(self) -> str:
        return f"entry {self.seq}: {self.reason}" if self.seq else self.reason


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """What a verifier remembers after a good run: the key and the last entry it saw."""

    public_key: bytes
    seq: int
    hash: bytes

    def to_json(self) -> str:
        return json.dumps(
            {
                "version": 1,
                "public_key": base64.b64encode(self.public_key).decode("ascii"),
                "seq": self.seq,
                "hash": self.hash.hex(),
            },
            indent=2,
        )

    @classmethod
    def from_json(cls, text: str, where: str) -> Checkpoint:
        """Parse a checkpoint document; ``InvalidArgument`` naming ``where`` if it is not one."""
        try:
            return cls._parse(json.loads(text))
        except (ValueError, KeyError, TypeError, InvalidArgument) as exc:
            raise InvalidArgument(
                f"checkpoint {where}: unreadable ({exc}); remove it to start a new one"
            ) from None

    @classmethod
    def _parse(cls, doc: object) -> Checkpoint:
        if not isinstance(doc, dict) or doc.get("version") != 1:
            raise ValueError("not a version 1 checkpoint")
        seq = doc["seq"]
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
            raise ValueError("seq must be a non-negative integer")
        digest = bytes.fromhex(str(doc["hash"]))
        if len(digest) != HASH_LEN:
            raise ValueError("hash must be 32 bytes of hex")
        return cls(public_key_from_base64(str(doc["public_key"])), seq, digest)


@dataclass(frozen=True, slots=True)
class Verdict:
    """The outcome of :func:`verify`: ``problem`` is None when the chain is good. ``first_seq`` is where
    the log starts (above 1 after a prune)."""

    count: int
    last_seq: int
    last_hash: bytes
    problem: Problem | None
    first_seq: int = 1

    @property
    def ok(self) -> bool:
        return self.problem is None


def public_key_from_base64(text: str) -> bytes:
    """A raw 32-byte Ed25519 public key from standard base64; ``InvalidArgument`` otherwise."""
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != KEY_LEN:
        raise InvalidArgument("audit key: expected the base64 of a 32-byte ed25519 public key")
    return raw


def canonical_detail(detail: Mapping[str, object] | None) -> str:
    """Canonical JSON for an entry's detail: sorted keys, compact separators, UTF-8 kept as is."""
    return json.dumps(dict(detail or {}), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def prune_detail(through_seq: int, through_hash: bytes) -> dict[str, object]:
    """The detail of a :data:`PRUNE_ACTION` entry: the last entry removed (its seq and hash, hex)."""
    return {"through_seq": through_seq, "through_hash": through_hash.hex()}


def pruned_through(rec: AuditRecord) -> tuple[int, bytes] | None:
    """``(through_seq, through_hash)`` of a prune entry; None for any other entry or a malformed one."""
    if rec.action != PRUNE_ACTION:
        return None
    try:
        doc = json.loads(rec.detail)
        seq, digest = doc["through_seq"], bytes.fromhex(doc["through_hash"])
    except (ValueError, KeyError, TypeError):
        return None
    if not isinstance(seq, int) or isinstance(seq, bool) or len(digest) != HASH_LEN:
        return None
    return seq, digest


def _lp(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def encode(rec: AuditRecord) -> bytes:
    """The canonical encoding of fields 1..8 (see the module docstring)."""
    if not 0 <= rec.seq <= _U64_MAX or not _I64[0] <= rec.ts_ms <= _I64[1]:
        raise InvalidArgument(f"audit entry {rec.seq}: seq or timestamp out of range")
    return b"".join(
        (
            DOMAIN,
            struct.pack(">Qq", rec.seq, rec.ts_ms),
            *(_lp(s.encode("utf-8")) for s in (rec.actor, rec.action, rec.target, rec.detail, rec.remote)),
            _lp(rec.prev_hash),
        )
    )


def entry_hash(rec: AuditRecord) -> bytes:
    return hashlib.sha256(encode(rec)).digest()


def seal(rec: AuditRecord, key: Ed25519PrivateKey) -> AuditRecord:
    """``rec`` with its hash and the signature over that hash filled in."""
    digest = entry_hash(rec)
    return replace(rec, hash=digest, signature=key.sign(digest))


def raw_public_key(key: Ed25519PrivateKey) -> bytes:
    pub = key.public_key()
    return pub.public_bytes_raw()


def _check_entry(rec: AuditRecord, expected_seq: int, prev: bytes, pub: Ed25519PublicKey) -> Problem | None:
    if rec.seq != expected_seq:
        if rec.seq > expected_seq:
            return Problem(
                expected_seq, f"missing: the log jumps to seq {rec.seq} (entries removed or reordered)"
            )
        return Problem(
            expected_seq, f"out of order: found seq {rec.seq} where seq {expected_seq} belongs (reordered)"
        )
    if rec.prev_hash != prev:
        return Problem(
            rec.seq, "prev_hash does not match the previous entry's hash (an earlier entry was changed)"
        )
    if entry_hash(rec) != rec.hash:
        return Problem(rec.seq, "hash does not match the entry's contents (entry edited)")
    try:
        pub.verify(rec.signature, rec.hash)
    except InvalidSignature:
        return Problem(rec.seq, "signature is not valid under the audit key (entry forged or wrong key)")
    return None


def verify(
    entries: Sequence[AuditRecord], public_key: bytes, checkpoint: Checkpoint | None = None
) -> Verdict:
    """Check a whole log, oldest first, against ``public_key`` (raw 32 bytes) and an optional checkpoint.

    Checked in order: the checkpoint's key equals ``public_key``; then for each entry: ``seq`` runs on
    without gaps from the first (1, or after a prune the entry a prune entry names), ``prev_hash`` links to
    the previous entry, the hash matches the recomputed one, and the signature over it verifies; then that
    a log starting after seq 1 starts where a prune entry in it says; finally that the checkpoint's
    ``(seq, hash)`` is still in the log, or was pruned. Stops at the first problem.
    """
    if len(public_key) != KEY_LEN:
        return Verdict(0, 0, GENESIS, Problem(0, "audit key is not a 32-byte ed25519 public key"))
    if checkpoint is not None and checkpoint.public_key != public_key:
        return Verdict(
            0,
            0,
            GENESIS,
            Problem(0, "the server's audit key differs from the one in the checkpoint (key replaced)"),
        )
    pub = Ed25519PublicKey.from_public_bytes(public_key)
    first = entries[0].seq if entries else 1
    start = max(first, 1)
    prev = entries[0].prev_hash if first > 1 else GENESIS
    cuts: set[tuple[int, bytes]] = set()  # (through_seq, through_hash) of every prune entry
    seen_at_checkpoint: bytes | None = None
    for index, rec in enumerate(entries):
        problem = _check_entry(rec, start + index, prev, pub)
        if problem is not None:
            return Verdict(index, start + index - 1, prev, problem, start)
        prev = rec.hash
        cut = pruned_through(rec)
        if cut is not None:
            cuts.add(cut)
        if checkpoint is not None and rec.seq == checkpoint.seq:
            seen_at_checkpoint = rec.hash
    count = len(entries)
    last = start + count - 1
    if start > 1 and (start - 1, entries[0].prev_hash) not in cuts:
        return Verdict(
            0,
            0,
            GENESIS,
            Problem(
                start - 1,
                f"missing: the log starts at seq {start} but no signed {PRUNE_ACTION} entry records "
                f"removing seq 1..{start - 1} (oldest entries removed)",
            ),
            start,
        )
    if checkpoint is not None and checkpoint.seq > 0:
        problem = _against_checkpoint(checkpoint, seen_at_checkpoint, start, last, entries)
        if problem is not None:
            return Verdict(count, last, prev, problem, start)
    return Verdict(count, last, prev, None, start)


def _against_checkpoint(
    checkpoint: Checkpoint, seen: bytes | None, start: int, last: int, entries: Sequence[AuditRecord]
) -> Problem | None:
    if checkpoint.seq < start:  # pruned since the checkpoint: only the cut itself can be compared
        if checkpoint.seq == start - 1 and entries[0].prev_hash != checkpoint.hash:
            return Problem(checkpoint.seq, "hash differs from the checkpoint's (log rewritten)")
        return None
    if seen is None:
        return Problem(
            checkpoint.seq,
            f"missing: the checkpoint saw the log up to seq {checkpoint.seq} but it now ends at "
            f"seq {last} (newest entries removed)",
        )
    if seen != checkpoint.hash:
        return Problem(checkpoint.seq, "hash differs from the checkpoint's (log rewritten)")
    return None
