"""``ghostctl lock init | status | log | sign | add-key | remove-key | disable``: node-key signing.

The signing keys live in files on the admin's machine (``--key-file``, 0600, created by ``init`` or
``keygen``) and never reach ghostmesh: every update and signature is made here and only the signed bytes
are sent (``admin.proto`` GetLock / AppendLock / SignNode; formats in ``ghostcore.lock``). ghostctl
verifies the log it fetches before signing anything after it, so a server that serves a forged log gets
no update built on top of it.

``sign`` takes either what a node shows (``nodekey:…`` in ``ghostctl status`` on that node) and stores
the signature at ghostmesh, or an auth key (``gmauth_…``), which it prints back pre-signed: a node that
joins with it signs its own key (and any later rotated key) without the admin.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ghostcore import lock
from ghostcore.errors import ConfigError, InvalidArgument
from ghostcore.files import create_private, read_private
from ghostcore.joinkey import JoinKey, parse_join_key
from ghostcore.keys import PublicKey
from ghostcore.pb.ghostmesh.v1 import admin_pb2
from ghostctl import output
from ghostctl.context import Context

KEY_FILE_HELP = "file holding this admin's signing key (0600; see `lock keygen`)"


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    group = sub.add_parser("lock", help="node-key signing: only keys signed by trusted keys join the mesh")
    cmds = group.add_subparsers(
        dest="lock_cmd", metavar="{keygen,init,status,log,sign,add-key,remove-key,disable}", required=True
    )
    p = cmds.add_parser("keygen", parents=[common], help="create a signing key in a new 0600 file")
    p.add_argument("--key-file", required=True, help="where to write it (must not exist)")
    p.set_defaults(func=run_keygen)
    p = cmds.add_parser("init", parents=[common], help="turn the lock on, trusting this key (and --trust)")
    p.add_argument("--key-file", required=True, help=KEY_FILE_HELP + "; created if missing")
    p.add_argument("--trust", action="append", default=[], metavar="LOCKKEY", help="another trusted key")
    p.set_defaults(func=run_init)
    p = cmds.add_parser("status", parents=[common], help="is the lock on, which keys are trusted")
    p.set_defaults(func=run_status)
    p = cmds.add_parser("log", parents=[common], help="every signed update of the lock")
    p.set_defaults(func=run_log)
    p = cmds.add_parser("sign", parents=[common], help="sign a node (nodekey:…) or pre-sign an auth key")
    p.add_argument("what", help="nodekey:… as `ghostctl status` shows it on the node, or an auth key")
    p.add_argument("--key-file", required=True, help=KEY_FILE_HELP)
    p.set_defaults(func=run_sign)
    for name, func, text in (
        ("add-key", run_add_key, "trust another signing key"),
        ("remove-key", run_remove_key, "stop trusting a signing key"),
    ):
        p = cmds.add_parser(name, parents=[common], help=text)
        p.add_argument("key", metavar="LOCKKEY", help="lockkey:… (as `lock status` shows it)")
        p.add_argument("--key-file", required=True, help=KEY_FILE_HELP)
        p.set_defaults(func=func)
    p = cmds.add_parser("disable", parents=[common], help="turn the lock off (signed like any update)")
    p.add_argument("--key-file", required=True, help=KEY_FILE_HELP)
    p.set_defaults(func=run_disable)


def _write_new_key(path: Path) -> lock.SigningKey:
    key = lock.SigningKey.generate()
    try:
        create_private(path, (key.text() + "\n").encode())
    except FileExistsError:
        raise ConfigError(f"--key-file {path}: exists already; refusing to overwrite a signing key") from None
    except OSError as exc:
        raise ConfigError(f"--key-file {path}: cannot create it: {exc.strerror}") from None
    return key


def read_key(path: Path) -> lock.SigningKey:
    """A signing key file; refused when others may read it (as ssh refuses a readable private key)."""
    text = read_private(path, "--key-file").decode(errors="replace")
    try:
        return lock.SigningKey.from_text(text)
    except lock.LockError:
        raise ConfigError(f"--key-file {path}: not a signing key (expected base64 of 32 bytes)") from None


def _fetch(ctx: Context) -> tuple[list[bytes], lock.LockState, admin_pb2.LockStatus]:
    """The server's log, verified here (a log that does not verify is refused, not trusted)."""
    stub, where = ctx.admin()
    resp = ctx.call(stub.GetLock, admin_pb2.GetLockRequest(), where)
    updates = list(resp.log.updates)
    try:
        return updates, lock.verify_log(updates), resp
    except lock.LockError as exc:
        raise lock.LockError(f"{where} serves a lock log that does not verify: {exc}") from None


def _append(ctx: Context, update: bytes) -> lock.LockState:
    stub, where = ctx.admin()
    resp = ctx.call(stub.AppendLock, admin_pb2.AppendLockRequest(update=update), where)
    return lock.verify_log(resp.log.updates)


def status_doc(state: lock.LockState, unsigned: list[str] | None = None) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "enabled": state.enabled,
        "trusted_keys": sorted(lock.format_key(k) for k in state.trusted),
        "updates": state.length,
        "head": state.head.hex() if state.length else "",
    }
    if unsigned is not None:
        doc["unsigned_nodes"] = unsigned
    return doc


def render_status(doc: dict[str, Any]) -> str:
    if not doc["enabled"]:
        return "lock: off" + (f" (disabled after {doc['updates']} updates)" if doc["updates"] else "")
    lines = [f"lock: on ({doc['updates']} updates, head {doc['head'][:16]}…)", "trusted keys:"]
    lines += [f"  {k}" for k in doc["trusted_keys"]]
    if doc.get("unsigned_nodes"):
        lines.append(f"unsigned nodes (peers refuse them): {', '.join(doc['unsigned_nodes'])}")
    return "\n".join(lines)


def run_keygen(ctx: Context, args: argparse.Namespace) -> int:
    key = _write_new_key(Path(args.key_file))
    pub = lock.format_key(key.public())
    ctx.emit({"key_file": args.key_file, "public_key": pub}, lambda: f"wrote signing key {pub}")
    return 0


def run_init(ctx: Context, args: argparse.Namespace) -> int:
    path = Path(args.key_file)
    key = read_key(path) if path.exists() else _write_new_key(path)
    keys = list(dict.fromkeys([key.public(), *(lock.parse_key(t) for t in args.trust)]))
    _, state, _ = _fetch(ctx)
    if state.enabled:
        raise InvalidArgument("the lock is on already; use `lock add-key` to trust more keys")
    state = _append(ctx, lock.make_update(lock.INIT, state.head, keys, key))
    doc = status_doc(state)
    ctx.emit(doc, lambda: render_status(doc))
    return 0


def run_status(ctx: Context, args: argparse.Namespace) -> int:
    _, state, resp = _fetch(ctx)
    doc = status_doc(state, list(resp.unsigned_nodes))
    ctx.emit(doc, lambda: render_status(doc))
    return 0


def run_log(ctx: Context, args: argparse.Namespace) -> int:
    updates, _, _ = _fetch(ctx)
    rows = lock.describe(updates)
    docs = [{"kind": k, "keys": keys, "signer": s, "hash": h} for k, keys, s, h in rows]
    ctx.emit(
        docs,
        lambda: output.table(
            ("#", "KIND", "KEYS", "SIGNED BY", "HASH"),
            [(str(i + 1), k, ", ".join(keys) or "-", s, h[:16]) for i, (k, keys, s, h) in enumerate(rows)],
        ),
    )
    return 0


def _change(ctx: Context, args: argparse.Namespace, kind: int) -> int:
    key = read_key(Path(args.key_file))
    target = [lock.parse_key(args.key)] if kind != lock.DISABLE else []
    _, state, _ = _fetch(ctx)
    if not state.enabled:
        raise InvalidArgument("the lock is off; turn it on with `lock init`")
    state = _append(ctx, lock.make_update(kind, state.head, target, key))
    doc = status_doc(state)
    ctx.emit(doc, lambda: render_status(doc))
    return 0


def run_add_key(ctx: Context, args: argparse.Namespace) -> int:
    return _change(ctx, args, lock.ADD_KEY)


def run_remove_key(ctx: Context, args: argparse.Namespace) -> int:
    return _change(ctx, args, lock.REMOVE_KEY)


def run_disable(ctx: Context, args: argparse.Namespace) -> int:
    return _change(ctx, args, lock.DISABLE)


def lock_enabled(ctx: Context) -> bool:
    """Whether node-key signing is on at the server (its log verified here)."""
    return _fetch(ctx)[1].enabled


def signing_key(ctx: Context, key_file: Path) -> tuple[lock.SigningKey, lock.LockState]:
    """The key in ``key_file``, once checked to be a trusted key of the server's lock (its verified
    state returned with it)."""
    key = read_key(key_file)
    _, state, _ = _fetch(ctx)
    if not state.enabled:
        raise InvalidArgument("the lock is off; turn it on with `lock init` first")
    if key.public() not in state.trusted:
        raise InvalidArgument(f"{lock.format_key(key.public())} is not a trusted key of this lock")
    return key, state


def sign_node(ctx: Context, key: lock.SigningKey, node_key: bytes, rotation_key: bytes) -> str:
    """Sign ``node_key`` (with the rotation key it may sign its next key with) and store the signature at
    ghostmesh; the node's name."""
    signature = lock.sign_direct(key, node_key, rotation_key)
    stub, where = ctx.admin()
    wg_key = PublicKey(node_key).base64()
    node = ctx.call(stub.SignNode, admin_pb2.SignNodeRequest(node_key=wg_key, signature=signature), where)
    return node.name


def run_sign(ctx: Context, args: argparse.Namespace) -> int:
    key, state = signing_key(ctx, Path(args.key_file))
    if args.what.startswith(lock.REQUEST_PREFIX):
        node_key, rotation_key = lock.parse_request(args.what)
        name = sign_node(ctx, key, node_key, rotation_key)
        wg_key = PublicKey(node_key).base64()
        doc = {"node": name, "node_key": wg_key, "signed_by": lock.format_key(key.public())}
        ctx.emit(doc, lambda: f"signed node {name} ({wg_key[:8]}…): its peers accept it now")
        return 0
    joined = parse_join_key(args.what, "auth key")
    if joined.credential is not None:
        raise InvalidArgument("this auth key is pre-signed already")
    cred_key = lock.SigningKey.generate()
    cred = lock.Credential(cred_key, state.genesis, lock.sign_credential(key, cred_key.public()))
    signed = JoinKey(joined.key, joined.pin, cred).text()
    ctx.emit(
        {"auth_key": signed},
        lambda: f"pre-signed auth key (a node joining with it signs its own key):\n{signed}",
    )
    return 0
