"""``ghostctl audit list [--after N] [--limit N] | verify [--checkpoint FILE] [--key BASE64]``.

``list`` shows ghostmesh's audit log (who changed what, when, from where): one reply, at most the
server's page (1000 entries; ``--limit 0`` asks for that many). ``verify`` fetches the whole log, page by
page, and the server's audit public key and checks it here, client-side, with
:mod:`ghostcore.auditchain` (the same code the server seals with): seq contiguous from the first entry,
every ``prev_hash`` linking to the previous entry, every hash recomputed, every signature valid. A log
the server pruned (``audit.retention``) starts after seq 1; it verifies only when a signed
``audit.prune`` entry in it records exactly that cut.

What a verifier can know: an edited, removed or reordered entry anywhere before the newest one is
detected from the log alone. Removing the *newest* entries leaves a shorter log that is still a valid
chain, so it can only be detected by someone who saw those entries: ``--checkpoint FILE`` remembers the
key and the last (seq, hash) after each good run and requires them on the next (a checkpoint's entry
pruned since can only be checked for its key and, when the cut is exactly there, its hash). ``--key``
pins the public key expected (otherwise the key the server reports is trusted, or the checkpoint's).

A failed verification prints the first bad seq and why, and exits 7 (``ghostctl.errors``).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
from pathlib import Path
from typing import Any

from ghostcore import auditchain
from ghostcore import errors as e
from ghostcore.auditchain import AuditRecord, Checkpoint
from ghostcore.pb.ghostmesh.v1 import admin_pb2, admin_pb2_grpc
from ghostctl import output
from ghostctl.context import Context
from ghostctl.errors import VerifyFailed

AUDIT_HEADERS = ("SEQ", "TIME", "ACTOR", "ACTION", "TARGET", "REMOTE")
PAGE = 1000  # entries per ListAudit call while verifying (the server's maximum), so no reply grows unbounded
VERIFY_HELP = (
    "fetch the whole log and verify it here: seq contiguous from 1 (or from where a signed audit.prune "
    "entry says the server's retention cut it), hash links, hashes, signatures. "
    "Without a checkpoint, removal of the newest entries cannot be detected by anyone who never saw "
    "them: use --checkpoint FILE on every run (it stores the key and the last seq and hash after a good "
    "run, and later runs require the log to still contain them under the same key)."
)


def _non_negative(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return int(text)


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    group = sub.add_parser("audit", help="the signed audit log of control-plane changes")
    cmds = group.add_subparsers(dest="audit_cmd", metavar="{list,verify}", required=True)
    p = cmds.add_parser("list", parents=[common], help="list audit entries, oldest first")
    p.add_argument("--after", type=_non_negative, default=0, metavar="SEQ", help="only entries after SEQ")
    p.add_argument(
        "--limit",
        type=_non_negative,
        default=0,
        metavar="N",
        help=f"at most N entries (0: the server's maximum per call, {PAGE}; page on with --after)",
    )
    p.set_defaults(func=run_list)
    p = cmds.add_parser("verify", parents=[common], help="verify the log's hash chain and signatures")
    p.description = VERIFY_HELP
    p.add_argument("--checkpoint", type=Path, metavar="FILE", help="remember and require the last entry")
    p.add_argument("--key", metavar="BASE64", help="the audit public key expected (ghostmesh GetAuditKey)")
    p.set_defaults(func=run_verify)


def record_of(m: admin_pb2.AuditEntry) -> AuditRecord:
    return AuditRecord(
        seq=m.seq,
        ts_ms=m.ts_unix_ms,
        actor=m.actor,
        action=m.action,
        target=m.target,
        detail=m.detail,
        remote=m.remote,
        prev_hash=m.prev_hash,
        hash=m.hash,
        signature=m.signature,
    )


def entry_doc(m: admin_pb2.AuditEntry) -> dict[str, Any]:
    try:
        detail: Any = json.loads(m.detail) if m.detail else {}
    except ValueError:
        detail = m.detail  # shown as stored; verify decides whether it was tampered with
    return {
        "seq": m.seq,
        "ts_unix_ms": m.ts_unix_ms,
        "time": output.iso(m.ts_unix_ms // 1000),
        "actor": m.actor,
        "action": m.action,
        "target": m.target,
        "detail": detail,
        "remote": m.remote,
        "prev_hash": m.prev_hash.hex(),
        "hash": m.hash.hex(),
        "signature": m.signature.hex(),
    }


def entry_row(m: admin_pb2.AuditEntry) -> tuple[str, ...]:
    return (
        str(m.seq),
        output.iso(m.ts_unix_ms // 1000) or "",
        m.actor,
        m.action,
        m.target,
        m.remote,
    )


def run_list(ctx: Context, args: argparse.Namespace) -> int:
    stub, where = ctx.admin()
    req = admin_pb2.ListAuditRequest(after_seq=args.after, limit=args.limit)
    entries = list(ctx.call(stub.ListAudit, req, where).entries)
    ctx.emit(
        [entry_doc(m) for m in entries],
        lambda: output.table(AUDIT_HEADERS, [entry_row(m) for m in entries]),
    )
    return 0


def _fetch_all(ctx: Context, stub: admin_pb2_grpc.AdminStub, where: str) -> list[AuditRecord]:
    records: list[AuditRecord] = []
    after = 0
    while True:
        req = admin_pb2.ListAuditRequest(after_seq=after, limit=PAGE)
        page = list(ctx.call(stub.ListAudit, req, where).entries)
        if not page:  # only an empty page ends the log: a server may answer fewer than PAGE per call
            return records
        records.extend(record_of(m) for m in page)
        if page[-1].seq <= after:  # a server going backwards would loop forever
            raise e.ProtocolError(f"{where}: ListAudit after {after} returned seq {page[-1].seq}")
        after = page[-1].seq


def _load_checkpoint(path: Path | None) -> Checkpoint | None:
    if path is None or not path.exists():
        return None
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise e.ConfigError(f"--checkpoint {path}: cannot read ({exc.strerror})") from None
    return Checkpoint.from_json(text, str(path))


def _save_checkpoint(path: Path, cp: Checkpoint) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(cp.to_json() + "\n", encoding="utf-8")
        os.replace(tmp, path)  # atomic: a crash leaves the old checkpoint, never half a new one
    except OSError as exc:
        raise e.ConfigError(f"--checkpoint {path}: cannot write ({exc.strerror})") from None


def run_verify(ctx: Context, args: argparse.Namespace) -> int:
    pinned = auditchain.public_key_from_base64(args.key) if args.key else None
    checkpoint = _load_checkpoint(args.checkpoint)
    stub, where = ctx.admin()
    key = bytes(ctx.call(stub.GetAuditKey, admin_pb2.GetAuditKeyRequest(), where).public_key)
    key_text = base64.b64encode(key).decode("ascii")
    if pinned is not None and key != pinned:
        raise VerifyFailed(
            f"audit key mismatch: {where} signs with {key_text}, but --key expects "
            f"{base64.b64encode(pinned).decode('ascii')}"
        )
    verdict = auditchain.verify(_fetch_all(ctx, stub, where), key, checkpoint)
    if verdict.problem is not None:
        good = f" ({verdict.count} entries before it are good)" if verdict.problem.seq else ""
        raise VerifyFailed(f"audit log does NOT verify: {verdict.problem}{good}")
    if args.checkpoint is not None:
        _save_checkpoint(args.checkpoint, Checkpoint(key, verdict.last_seq, verdict.last_hash))
    doc = {
        "ok": True,
        "entries": verdict.count,
        "first_seq": verdict.first_seq,
        "last_seq": verdict.last_seq,
        "last_hash": verdict.last_hash.hex(),
        "public_key": key_text,
        "checkpoint": str(args.checkpoint) if args.checkpoint else None,
    }

    def render() -> str:
        text = f"ok: {verdict.count} entries verified (last seq {verdict.last_seq}), audit key {key_text}"
        if verdict.first_seq > 1:
            text += f"\nseq 1..{verdict.first_seq - 1} were pruned, as a signed audit.prune entry records"
        if args.checkpoint is not None:
            text += f"\ncheckpoint saved to {args.checkpoint}"
        else:
            text += "\nnote: without --checkpoint, removal of the newest entries cannot be detected"
        return text

    ctx.emit(doc, render)
    return 0
