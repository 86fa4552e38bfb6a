"""ghostcore.auditchain: the canonical encoding is unambiguous and every tampering is detected, by name."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import struct

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from ghostcore import auditchain as ac
from ghostcore.auditchain import GENESIS, AuditRecord, Checkpoint
from ghostcore.errors import InvalidArgument

KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
PUB = ac.raw_public_key(KEY)
OTHER = Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))


def chain(n: int, key: Ed25519PrivateKey = KEY) -> list[AuditRecord]:
    out: list[AuditRecord] = []
    prev = GENESIS
    for seq in range(1, n + 1):
        rec = ac.seal(
            AuditRecord(
                seq=seq,
                ts_ms=1_700_000_000_000 + seq,
                actor="admin@unix",
                action="node.delete",
                target=f"node{seq}",
                detail=ac.canonical_detail({"id": seq}),
                remote="unix:",
                prev_hash=prev,
            ),
            key,
        )
        out.append(rec)
        prev = rec.hash
    return out


def problem(entries: list[AuditRecord], cp: Checkpoint | None = None, key: bytes = PUB) -> str:
    verdict = ac.verify(entries, key, cp)
    assert verdict.problem is not None
    return str(verdict.problem)


# -- encoding ------------------------------------------------------------------------------------------


def test_encoding_layout_is_as_documented() -> None:
    rec = AuditRecord(7, -5, "a", "bc", "", "{}", "r", GENESIS)
    expected = (
        b"ghostmesh-audit-v1\x00"
        + struct.pack(">Qq", 7, -5)
        + b"\x00\x00\x00\x01a\x00\x00\x00\x02bc\x00\x00\x00\x00\x00\x00\x00\x02{}\x00\x00\x00\x01r"
        + b"\x00\x00\x00\x20"
        + GENESIS
    )
    assert ac.encode(rec) == expected
    assert ac.entry_hash(rec) == hashlib.sha256(expected).digest()


def test_shifting_bytes_between_fields_changes_the_encoding() -> None:
    a = AuditRecord(1, 0, "ab", "c", "t", "{}", "", GENESIS)
    b = AuditRecord(1, 0, "a", "bc", "t", "{}", "", GENESIS)
    assert ac.encode(a) != ac.encode(b)


text = st.text(max_size=6)


@settings(max_examples=300, deadline=None)
@given(
    st.tuples(st.integers(0, 2**64 - 1), st.integers(-(2**63), 2**63 - 1), text, text, text, text, text),
    st.tuples(st.integers(0, 2**64 - 1), st.integers(-(2**63), 2**63 - 1), text, text, text, text, text),
    st.binary(max_size=33),
    st.binary(max_size=33),
)
def test_encoding_is_injective(
    f1: tuple[int, int, str, str, str, str, str],
    f2: tuple[int, int, str, str, str, str, str],
    p1: bytes,
    p2: bytes,
) -> None:
    a, b = AuditRecord(*f1, p1), AuditRecord(*f2, p2)
    assert (ac.encode(a) == ac.encode(b)) == ((f1, p1) == (f2, p2))


def test_out_of_range_seq_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="out of range"):
        ac.encode(AuditRecord(-1, 0, "", "", "", "", "", GENESIS))


def test_canonical_detail_is_sorted_and_compact() -> None:
    assert ac.canonical_detail({"b": 1, "a": ["x", "é"]}) == '{"a":["x","é"],"b":1}'
    assert ac.canonical_detail(None) == "{}"


# -- verification --------------------------------------------------------------------------------------


def test_good_chain_verifies() -> None:
    entries = chain(5)
    verdict = ac.verify(entries, PUB)
    assert verdict.ok
    assert (verdict.count, verdict.last_seq, verdict.last_hash) == (5, 5, entries[-1].hash)
    assert ac.verify([], PUB).ok


def test_edited_field_is_named() -> None:
    entries = chain(5)
    entries[2] = dataclasses.replace(entries[2], actor="apikey:000000000000")
    assert problem(entries) == "entry 3: hash does not match the entry's contents (entry edited)"


def test_edited_detail_is_named() -> None:
    entries = chain(5)
    entries[3] = dataclasses.replace(entries[3], detail='{"id":99}')
    assert problem(entries) == "entry 4: hash does not match the entry's contents (entry edited)"


def test_edit_with_recomputed_hash_fails_the_signature() -> None:
    entries = chain(3)
    forged = dataclasses.replace(entries[0], target="someone-else")
    entries[0] = dataclasses.replace(forged, hash=ac.entry_hash(forged))
    assert problem(entries).startswith("entry 1: signature is not valid")


def test_edit_resealed_with_another_key_breaks_the_next_link() -> None:
    entries = chain(3)
    entries[1] = ac.seal(dataclasses.replace(entries[1], target="x"), OTHER)
    assert problem(entries).startswith("entry 2: signature is not valid")
    # even a forger who re-signs everything with its own key is caught by the key the verifier expects
    assert problem(chain(3, OTHER)).startswith("entry 1: signature is not valid")


def test_removed_middle_entry_is_named() -> None:
    entries = chain(5)
    del entries[2]
    assert problem(entries) == "entry 3: missing: the log jumps to seq 4 (entries removed or reordered)"


def test_removed_and_renumbered_entry_breaks_the_link() -> None:
    entries = chain(5)
    del entries[2]
    entries[2] = dataclasses.replace(entries[2], seq=3)
    assert problem(entries).startswith("entry 3: prev_hash does not match")


def test_reordered_entries_are_named() -> None:
    entries = chain(5)
    entries[1], entries[2] = entries[2], entries[1]
    assert problem(entries) == "entry 2: missing: the log jumps to seq 3 (entries removed or reordered)"
    entries = chain(3)
    entries.append(entries[0])
    assert problem(entries) == "entry 4: out of order: found seq 1 where seq 4 belongs (reordered)"


def test_wrong_key_is_named() -> None:
    assert problem(chain(2), key=ac.raw_public_key(OTHER)).startswith("entry 1: signature is not valid")
    assert problem(chain(2), key=b"short") == "audit key is not a 32-byte ed25519 public key"


def test_truncated_tail_passes_alone_but_not_against_a_checkpoint() -> None:
    entries = chain(5)
    cp = Checkpoint(PUB, 5, entries[-1].hash)
    assert ac.verify(entries[:3], PUB).ok  # the limit the help text states
    assert problem(entries[:3], cp) == (
        "entry 5: missing: the checkpoint saw the log up to seq 5 but it now ends at seq 3 "
        "(newest entries removed)"
    )
    grown = chain(7)
    assert ac.verify(grown, PUB, Checkpoint(PUB, 5, grown[4].hash)).ok


def test_rewritten_log_and_replaced_key_against_a_checkpoint() -> None:
    entries = chain(4)
    cp = Checkpoint(PUB, 4, bytes(32))
    assert problem(entries, cp) == "entry 4: hash differs from the checkpoint's (log rewritten)"
    other_pub = ac.raw_public_key(OTHER)
    assert problem(chain(4, OTHER), Checkpoint(PUB, 4, entries[-1].hash), key=other_pub) == (
        "the server's audit key differs from the one in the checkpoint (key replaced)"
    )


def pruned(n: int, through: int, key: Ed25519PrivateKey = KEY) -> list[AuditRecord]:
    """A log of ``n`` entries and then a prune entry recording the cut after seq ``through``, cut there."""
    entries = chain(n, key)
    cut = entries[through - 1]
    prune = ac.seal(
        AuditRecord(
            seq=n + 1,
            ts_ms=1_700_000_000_000 + n + 1,
            actor="system",
            action=ac.PRUNE_ACTION,
            target="audit",
            detail=ac.canonical_detail(ac.prune_detail(cut.seq, cut.hash)),
            remote="",
            prev_hash=entries[-1].hash,
        ),
        key,
    )
    return [*entries[through:], prune]


def test_pruned_log_verifies_from_the_cut_its_prune_entry_records() -> None:
    kept = pruned(6, 4)
    verdict = ac.verify(kept, PUB)
    assert verdict.ok, verdict.problem
    assert (verdict.first_seq, verdict.last_seq, verdict.count) == (5, 7, 3)
    assert ac.pruned_through(kept[-1]) == (4, chain(6)[3].hash)
    assert ac.pruned_through(kept[0]) is None


def test_oldest_entries_cut_without_a_prune_entry_are_named() -> None:
    assert problem(chain(6)[2:]) == (
        "entry 2: missing: the log starts at seq 3 but no signed audit.prune entry records removing "
        "seq 1..2 (oldest entries removed)"
    )
    assert problem(pruned(6, 4)[1:]).startswith("entry 5: missing: the log starts at seq 6")  # cut deeper


def test_a_forged_prune_entry_does_not_vouch() -> None:
    kept = pruned(6, 4)
    forged = dataclasses.replace(kept[-1], detail=ac.canonical_detail(ac.prune_detail(5, kept[1].prev_hash)))
    assert problem([*kept[1:-1], forged]).startswith("entry 7: hash does not match")
    resealed = pruned(6, 4, OTHER)  # signed by another key
    assert problem(resealed).startswith("entry 5: signature is not valid")


def test_checkpoint_pruned_since_is_checked_as_far_as_the_kept_log_allows() -> None:
    full = chain(6)
    kept = pruned(6, 4)
    assert ac.verify(kept, PUB, Checkpoint(PUB, 2, full[1].hash)).ok  # pruned: its key still checked
    assert ac.verify(kept, PUB, Checkpoint(PUB, 4, full[3].hash)).ok  # the cut itself: hash compared
    assert problem(kept, Checkpoint(PUB, 4, bytes(32))) == (
        "entry 4: hash differs from the checkpoint's (log rewritten)"
    )
    assert ac.verify(kept, PUB, Checkpoint(PUB, 6, full[5].hash)).ok
    assert problem(kept, Checkpoint(ac.raw_public_key(OTHER), 2, full[1].hash)).endswith("(key replaced)")


def test_checkpoint_round_trip_and_bad_documents() -> None:
    cp = Checkpoint(PUB, 9, bytes(range(32)))
    assert Checkpoint.from_json(cp.to_json(), "f") == cp
    for bad in ("", "[]", '{"version": 2}', '{"version": 1, "seq": -1, "hash": "", "public_key": ""}'):
        with pytest.raises(InvalidArgument, match="checkpoint f: unreadable"):
            Checkpoint.from_json(bad, "f")


def test_public_key_from_base64() -> None:
    assert ac.public_key_from_base64(base64.b64encode(PUB).decode()) == PUB
    with pytest.raises(InvalidArgument, match="32-byte ed25519"):
        ac.public_key_from_base64("bm9wZQ==")


# -- property: one random mutation of a random chain is always detected ---------------------------------

MUTATIONS = ("edit", "detail", "delete", "swap", "truncate", "resign", "duplicate", "seq")


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 12), st.sampled_from(MUTATIONS), st.data())
def test_any_single_mutation_is_detected(n: int, kind: str, data: st.DataObject) -> None:
    entries = chain(n)
    cp = Checkpoint(PUB, n, entries[-1].hash)
    i = data.draw(st.integers(0, n - 1))
    if kind == "edit":
        field = data.draw(st.sampled_from(("actor", "action", "target", "remote")))
        entries[i] = dataclasses.replace(entries[i], **{field: getattr(entries[i], field) + "x"})
    elif kind == "detail":
        entries[i] = dataclasses.replace(entries[i], detail='{"id":-1}')
    elif kind == "delete":
        del entries[i]
    elif kind == "swap":
        if n < 2:
            entries[i] = dataclasses.replace(entries[i], ts_ms=entries[i].ts_ms + 1)
        else:
            j = data.draw(st.integers(0, n - 1).filter(lambda j: j != i))
            entries[i], entries[j] = entries[j], entries[i]
    elif kind == "truncate":
        entries = entries[:i]
    elif kind == "resign":
        entries[i] = ac.seal(dataclasses.replace(entries[i], target="forged"), OTHER)
    elif kind == "duplicate":
        entries.insert(i, entries[i])
    else:
        entries[i] = dataclasses.replace(entries[i], seq=entries[i].seq + 1)
    assert not ac.verify(entries, PUB, cp).ok
