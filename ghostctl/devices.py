"""``ghostctl devices add NAME --via NODE | list | remove NAME``: stock WireGuard peers behind a gateway node.

A device (a phone with the WireGuard app, a router, an appliance) runs no ghostlink. ``add`` makes its
key pair here, on the admin's machine, registers only the public key with ghostmesh (``AddDevice``), and
prints a wg-quick configuration (written with the ``wgconfig`` package) holding the private key, and, with
``--qr``, the same text as a QR code (``segno``) for the phone app's "scan from QR code". The private key is
shown this once and stored nowhere else: ghostmesh never sees it. The device's peer is its gateway: the
gateway's WireGuard key, an endpoint of the gateway (``--endpoint``, else one it reported), and the
overlay ranges as allowed IPs (``--allowed-ips`` to change them), with a keepalive so that the gateway can
reach a device behind NAT. With node-key signing on, ``--lock-key-file`` signs the device's key (its
gateway refuses an unsigned one, as every node does); without it, ``add`` refuses before creating anything.

The policy applies to a device as to any node (its user or tags, its address, its name); its gateway
enforces the device's rules on the forward path. ``remove`` deletes it: the gateway drops its peer at
once. ``list`` shows the devices and their gateways.
"""

from __future__ import annotations

import argparse
import io
import ipaddress
import sys
from pathlib import Path
from typing import Any

from ghostcore import addr, lock
from ghostcore import errors as e
from ghostcore.dnsname import node_label
from ghostcore.files import create_private
from ghostcore.keys import PrivateKey, PublicKey
from ghostcore.pb.ghostmesh.v1 import admin_pb2, coordination_pb2
from ghostctl import lock as lock_cmds
from ghostctl import output
from ghostctl.argtypes import tags_arg
from ghostctl.context import Context

DEVICE_HEADERS = ("ID", "NAME", "USER", "ADDRESSES", "VIA", "TAGS")
OVERLAY = ("100.64.0.0/10", "fd7a:115c:a1e0::/48")  # ghostmesh's default network.ipv4/ipv6_prefix
KEEPALIVE = 25  # seconds: keeps the device's NAT mapping open so that the gateway can reach it
SHOWN_ONCE = "This configuration holds the device's private key; it is shown only once and stored nowhere."


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    group = sub.add_parser("devices", help="stock WireGuard devices behind a gateway node")
    cmds = group.add_subparsers(dest="devices_cmd", metavar="{add,list,remove}", required=True)
    p = cmds.add_parser("add", parents=[common], help="add a device; prints its wg-quick config once")
    p.add_argument("name", help="the device's name (a DNS label)")
    p.add_argument("--via", required=True, metavar="NODE", help="the gateway node (name or id)")
    p.add_argument("--user", default="", help='owner (default: the user "default")')
    p.add_argument("--tags", type=tags_arg, default=[], metavar="tag:a,tag:b", help="tags of the device")
    p.add_argument(
        "--endpoint",
        default="",
        metavar="HOST:PORT",
        help="where the device reaches the gateway (default: an endpoint the gateway reported)",
    )
    p.add_argument(
        "--allowed-ips",
        default=",".join(OVERLAY),
        metavar="CIDR,...",
        help=f"what the device sends into the mesh (default: {','.join(OVERLAY)})",
    )
    p.add_argument(
        "--config", type=Path, metavar="FILE", help="write the config to FILE (0600, must not exist)"
    )
    p.add_argument(
        "--qr", metavar="FILE.png|-", help="also the config as a QR code: a PNG file, or - for text"
    )
    p.add_argument(
        "--lock-key-file",
        type=Path,
        metavar="F",
        help="node-key signing on: sign the device's key with this trusted key (else its gateway refuses it)",
    )
    p.set_defaults(func=run_add)
    p = cmds.add_parser("list", parents=[common], help="list devices")
    p.set_defaults(func=run_list)
    p = cmds.add_parser("remove", parents=[common], help="remove a device (its gateway drops it at once)")
    p.add_argument("name", help="device name or id")
    p.set_defaults(func=run_remove)


def device_doc(n: coordination_pb2.Node, gateway: str) -> dict[str, Any]:
    return {
        "id": n.id,
        "name": n.name,
        "user": n.user,
        "node_key": n.node_key,
        "addresses": list(n.addresses),
        "via": gateway,
        "via_id": n.via,
        "tags": list(n.tags),
    }


def _find(nodes: list[coordination_pb2.Node], ref: str) -> coordination_pb2.Node | None:
    for n in nodes:
        if n.name == ref or (ref.isdigit() and n.id == int(ref)):
            return n
    return None


def _pick_endpoint(gateway: coordination_pb2.Node, given: str) -> str:
    """``given`` (checked), else a public endpoint the gateway reported, else its first one."""
    if given:
        addr.split_hostport(given, "--endpoint")
        return given
    reported = list(gateway.endpoints)
    for ep in reported:
        host, _ = addr.parse_endpoint(ep)
        if ipaddress.ip_address(host).is_global:
            return ep
    if not reported:
        raise e.InvalidArgument(
            f"gateway {gateway.name} has reported no endpoint yet; pass --endpoint HOST:PORT (an address of "
            "the gateway the device can reach, with WireGuard's port)"
        )
    return reported[0]


def _allowed_ips(text: str) -> list[str]:
    out = [addr.normalize_prefix(p.strip(), "--allowed-ips") for p in text.split(",") if p.strip()]
    if not out:
        raise e.InvalidArgument("--allowed-ips: give at least one prefix, e.g. 100.64.0.0/10")
    return out


def wg_quick_config(
    private_key: str,
    device: coordination_pb2.Node,
    gateway: coordination_pb2.Node,
    endpoint: str,
    allowed: list[str],
) -> str:
    """The device's wg-quick file: its key and addresses; the gateway as its one peer.

    Every value ghostmesh sent is checked first (ProtocolError otherwise): wg-quick runs what a
    ``PostUp =`` line says as root, so a name or key carrying a newline must never reach the file.
    """
    import wgconfig  # noqa: PLC0415 - only this command needs it

    name, gw_name = _label(device.name), _label(gateway.name)
    gw_key = _wg_key(gateway.node_key)
    try:
        hosts = [ipaddress.ip_address(a) for a in device.addresses]
    except ValueError:
        raise e.ProtocolError("ghostmesh answered a device address that is not an IP address") from None
    wc = wgconfig.WGConfig()
    wc.add_attr(None, "PrivateKey", private_key, f"# ghost* device {name} (id {int(device.id)})")
    wc.add_attr(None, "Address", ", ".join(f"{ip}/{ip.max_prefixlen}" for ip in hosts))
    wc.add_peer(gw_key, f"# gateway {gw_name}")
    wc.add_attr(gw_key, "AllowedIPs", ", ".join(allowed))
    wc.add_attr(gw_key, "Endpoint", endpoint)
    wc.add_attr(gw_key, "PersistentKeepalive", KEEPALIVE)
    out = io.StringIO()
    wc.write_to_fileobj(out)
    return out.getvalue()


def _label(name: str) -> str:
    if node_label(name) != name:
        raise e.ProtocolError(f"ghostmesh answered a node name that is not a DNS label: {name[:40]!r}")
    return name


def _wg_key(text: str) -> str:
    try:
        key = PublicKey.from_base64(text).base64()
    except e.InvalidArgument:
        key = ""
    if key != text:
        raise e.ProtocolError("ghostmesh answered a node key that is not a canonical WireGuard key")
    return key


def _write_qr(text: str, where: str, stdout: Any) -> None:
    import segno  # noqa: PLC0415 - only this command needs it

    qr = segno.make(text, error="m")
    if where == "-":
        qr.terminal(out=stdout, compact=True)
        return
    buf = io.BytesIO()
    qr.save(buf, kind="png", scale=6)
    create_private(Path(where), buf.getvalue())  # the QR code holds the private key too


def run_add(ctx: Context, args: argparse.Namespace) -> int:
    # Everything that can be refused is checked before the device exists: after AddDevice the private
    # key lives only in what this command prints.
    allowed = _allowed_ips(args.allowed_ips)
    for path in (args.config, Path(args.qr) if args.qr and args.qr != "-" else None):
        if path is not None and (path.exists() or not path.parent.is_dir()):
            raise e.InvalidArgument(f"{path}: exists already or its directory is missing; pick a new file")
    stub, where = ctx.admin()
    nodes = list(ctx.call(stub.ListNodes, admin_pb2.ListNodesRequest(), where).nodes)
    gateway = _find(nodes, args.via)
    if gateway is None:
        raise e.NotFound(f"node {args.via!r} not found; see `ghostctl nodes list`")
    if gateway.via:
        raise e.InvalidArgument(f"{gateway.name} is a device: a gateway must be a node running ghostlink")
    endpoint = _pick_endpoint(gateway, args.endpoint)
    _label(gateway.name)
    _wg_key(gateway.node_key)
    signer = lock_cmds.signing_key(ctx, args.lock_key_file)[0] if args.lock_key_file is not None else None
    if signer is None and lock_cmds.lock_enabled(ctx):
        raise e.InvalidArgument(
            "node-key signing is on and its gateway would refuse an unsigned device: pass --lock-key-file F "
            "(a trusted signing key)"
        )
    key = PrivateKey.generate()
    req = admin_pb2.AddDeviceRequest(
        name=args.name,
        node_key=key.public_key().base64(),
        via=str(gateway.id),
        user=args.user,
        tags=args.tags,
    )
    device = ctx.call(stub.AddDevice, req, where)
    config = wg_quick_config(key.base64(), device, gateway, endpoint, allowed)
    delivered = False
    try:
        _deliver(ctx, args, device=device, gateway=gateway, config=config, signer=signer, key=key)
        delivered = True
    finally:
        if not delivered:  # the device exists now: whatever failed, its private key must not be lost
            sys.stderr.write(
                f"ghostctl: device {device.name} was added, but the command did not finish; its wg-quick "
                f"config, shown this once:\n{config}"
            )
    return 0


def _deliver(
    ctx: Context,
    args: argparse.Namespace,
    *,
    device: coordination_pb2.Node,
    gateway: coordination_pb2.Node,
    config: str,
    signer: lock.SigningKey | None,
    key: PrivateKey,
) -> None:
    """Sign the new device's key if asked, then write or print its config (and QR code)."""
    if signer is not None:
        # A device never rotates its key: the rotation key it would sign a successor with is thrown away.
        discarded = lock.SigningKey.generate().public()
        lock_cmds.sign_node(ctx, signer, key.public_key().raw, discarded)
    if args.config is not None:
        try:
            create_private(args.config, config.encode())
        except OSError as exc:  # the device exists: the key must not be lost, so print it after all
            sys.stderr.write(f"ghostctl: cannot write {args.config} ({exc.strerror}); printing it instead\n")
            args.config = None
    if args.qr:
        _write_qr(config, args.qr, ctx.stdout)
    doc = {**device_doc(device, gateway.name), "config": config if args.config is None else str(args.config)}

    def human() -> str:
        addresses = output.joined(device.addresses)
        head = f"added device {device.name} (id {device.id}, {addresses}) via {gateway.name}"
        if args.config is not None:
            return f"{head}\nwg-quick config written to {args.config} (0600). {SHOWN_ONCE}"
        return f"{head}\n\n{config}\n{SHOWN_ONCE}"

    ctx.emit(doc, human)


def run_list(ctx: Context, args: argparse.Namespace) -> int:
    stub, where = ctx.admin()
    nodes = list(ctx.call(stub.ListNodes, admin_pb2.ListNodesRequest(), where).nodes)
    names = {n.id: n.name for n in nodes}
    devices = [n for n in nodes if n.via]
    ctx.emit(
        [device_doc(d, names.get(d.via, str(d.via))) for d in devices],
        lambda: output.table(
            DEVICE_HEADERS,
            [
                (
                    str(d.id),
                    d.name,
                    d.user,
                    output.joined(d.addresses),
                    names.get(d.via, str(d.via)),
                    output.joined(d.tags),
                )
                for d in devices
            ],
        ),
    )
    return 0


def run_remove(ctx: Context, args: argparse.Namespace) -> int:
    stub, where = ctx.admin()
    nodes = list(ctx.call(stub.ListNodes, admin_pb2.ListNodesRequest(), where).nodes)
    device = _find(nodes, args.name)
    if device is None:
        raise e.NotFound(f"device {args.name!r} not found; see `ghostctl devices list`")
    if not device.via:
        raise e.InvalidArgument(f"{device.name} is a node, not a device; use `ghostctl nodes delete`")
    ctx.call(stub.DeleteNode, admin_pb2.DeleteNodeRequest(ref=str(device.id)), where)
    ctx.emit({"removed": device.name}, lambda: f"removed device {device.name} (id {device.id})")
    return 0
