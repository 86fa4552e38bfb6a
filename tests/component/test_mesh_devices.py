"""Devices on ghostmesh in-process: AddDevice through the Admin service, the gateway's map and everyone
else's, what a device's key may not do, what a gateway may not do while it has devices, a restart."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path

import grpc
import pytest
import wgconfig  # type: ignore[import-untyped]

from ghostcore.keys import PrivateKey
from ghostcore.pb.ghostmesh.v1 import admin_pb2 as apb
from ghostcore.pb.ghostmesh.v1 import coordination_pb2 as pb
from ghostctl.cli import main
from ghostmesh.server import RunningServer
from tests.component._mesh_fixtures import NodeClient, admin_unix, auth_key, mesh_config, next_update, running


async def _code(awaitable: object) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await awaitable  # type: ignore[misc]
    return info.value.code()


async def test_a_device_rides_in_its_gateways_allowed_ips_and_is_a_peer_of_its_gateway_only(
    tmp_path: Path,
) -> None:
    async with running(mesh_config(tmp_path, batch_delay=0.02)) as srv:
        key = await auth_key(srv, reusable=True)
        gw, other = NodeClient(srv), NodeClient(srv)
        g = await gw.register(key, "gw")
        await other.register(key, "laptop")
        call_gw, call_other = gw.sync(), other.sync()
        await next_update(call_gw)
        await next_update(call_other)
        phone = PrivateKey.generate()
        phone_key = phone.public_key().base64()
        async with admin_unix(srv) as admin:
            # behind another user's node its owner could act as the device: refused, nothing created
            alices = apb.AddDeviceRequest(name="phone", node_key=phone_key, via="gw", user="alice")
            assert await _code(admin.AddDevice(alices, timeout=5)) == grpc.StatusCode.PERMISSION_DENIED
            device = await admin.AddDevice(
                apb.AddDeviceRequest(name="phone", node_key=phone_key, via="gw"), timeout=5
            )
            assert (device.via, device.user, device.expires_unix) == (g.id, "default", 0)
            assert list(device.addresses) == ["100.64.0.3", "fd7a:115c:a1e0::3"]
            hosts = ["100.64.0.3/32", "fd7a:115c:a1e0::3/128"]
            # the gateway: its own record lists the device, and the device is one of its peers
            upd = await next_update(call_gw, wait=2.0)
            while not upd.HasField("self") or not upd.self.device_prefixes:
                upd = await next_update(call_gw, wait=2.0)
            assert list(upd.self.device_prefixes) == hosts
            # everyone else: the gateway carries the device's addresses, the device itself is a record
            seen: dict[int, pb.Node] = {}
            while len(seen) < 2 or not seen.get(g.id, pb.Node()).device_prefixes:
                for p in (await next_update(call_other, wait=2.0)).peers_upserted:
                    seen[p.id] = p
            assert set(hosts) <= set(seen[g.id].allowed_ips)
            assert seen[device.id].via == g.id
            assert seen[device.id].name == "phone"
            listed = {n.name: n for n in (await admin.ListNodes(apb.ListNodesRequest(), timeout=5)).nodes}
            assert listed["phone"].via == g.id
            # a gateway with devices can be neither deleted nor rotated away
            code = await _code(admin.DeleteNode(apb.DeleteNodeRequest(ref="gw"), timeout=5))
            assert code == grpc.StatusCode.PERMISSION_DENIED
            new = PrivateKey.generate()
            code = await _code(gw.rotate(gw.rotate_request(new)))
            assert code == grpc.StatusCode.PERMISSION_DENIED
            # the device's key registers, syncs and reports nothing, even with a valid auth key
            impostor = NodeClient(srv, key=phone)
            assert await _code(impostor.register(key, "phone2")) == grpc.StatusCode.PERMISSION_DENIED
            assert (
                await _code(impostor.report(endpoints=["192.0.2.9:1"])) == grpc.StatusCode.PERMISSION_DENIED
            )
            assert await _code(next_update(impostor.sync())) == grpc.StatusCode.PERMISSION_DENIED
            await impostor.close()
            # removing the device: the gateway's record no longer carries it
            await admin.DeleteNode(apb.DeleteNodeRequest(ref="phone"), timeout=5)
            upd = await next_update(call_gw, wait=2.0)
            while not upd.HasField("self"):
                upd = await next_update(call_gw, wait=2.0)
            assert list(upd.self.device_prefixes) == []
            await admin.DeleteNode(apb.DeleteNodeRequest(ref="gw"), timeout=5)  # now it can go
        call_gw.cancel()
        call_other.cancel()
        await gw.close()
        await other.close()


async def test_bad_device_requests_change_nothing_and_a_device_survives_a_restart(tmp_path: Path) -> None:
    cfg = mesh_config(tmp_path)

    def key_of() -> str:
        return PrivateKey.generate().public_key().base64()

    async with running(cfg) as srv:
        key = await auth_key(srv, reusable=True)
        gw = NodeClient(srv)
        g = await gw.register(key, "gw")
        async with admin_unix(srv) as admin:

            def add(name: str, via: str = "gw", node_key: str = "", **kw: object) -> object:
                req = apb.AddDeviceRequest(name=name, node_key=node_key or key_of(), via=via, **kw)  # type: ignore[arg-type]
                return admin.AddDevice(req, timeout=5)

            assert await _code(add("phone", via="nope")) == grpc.StatusCode.NOT_FOUND
            assert await _code(add("gw")) == grpc.StatusCode.ALREADY_EXISTS  # the name is the gateway's
            assert await _code(add("Not Valid")) == grpc.StatusCode.INVALID_ARGUMENT
            assert await _code(add("phone", node_key="not-a-key")) == grpc.StatusCode.INVALID_ARGUMENT
            assert await _code(add("phone", node_key=gw.pub)) == grpc.StatusCode.ALREADY_EXISTS
            assert await _code(add("phone", tags=["bad tag"])) == grpc.StatusCode.INVALID_ARGUMENT
            listed = (await admin.ListNodes(apb.ListNodesRequest(), timeout=5)).nodes
            assert [n.name for n in listed] == ["gw"]
            phone = await add("phone", tags=["tag:phone"])
            assert await _code(add("tablet", via="phone")) == grpc.StatusCode.INVALID_ARGUMENT  # not a node
            audit = (await admin.ListAudit(apb.ListAuditRequest(), timeout=5)).entries
            rows = [a for a in audit if a.action == "device.add"]
            assert [r.target for r in rows] == ["phone"]
            assert '"via":"gw"' in rows[0].detail.replace(" ", "")
        await gw.close()
    async with running(cfg) as srv:
        gw = NodeClient(srv, key=gw.key)
        call = gw.sync()
        full = await next_update(call)
        assert list(full.self.device_prefixes) == [f"{phone.addresses[0]}/32", f"{phone.addresses[1]}/128"]  # type: ignore[attr-defined]
        (peer,) = [p for p in full.peers_upserted if p.via == g.id]
        assert peer.name == "phone"
        assert list(peer.tags) == ["tag:phone"]
        call.cancel()
        await gw.close()


async def _ctl(srv: RunningServer, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = await asyncio.to_thread(main, ["--server", f"unix:{srv.admin_socket}", "-o", "json", *args])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


async def test_ghostctl_devices_add_prints_a_wg_quick_config_once_and_signs_under_the_lock(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in ("GHOSTCTL_OUTPUT", "GHOSTCTL_SERVER", "GHOSTCTL_API_KEY", "GHOSTCTL_PIN"):
        monkeypatch.delenv(var, raising=False)
    async with running(mesh_config(tmp_path)) as srv:
        gw = NodeClient(srv)
        g = await gw.register(await auth_key(srv), "gw")
        # the gateway has reported no endpoint: refused before anything is created
        code, _, err = await _ctl(srv, capsys, "devices", "add", "phone", "--via", "gw")
        assert code != 0
        assert "pass --endpoint" in err
        await gw.report(endpoints=["10.0.0.5:41641", "192.0.2.7:41641", "8.8.8.8:41641"])
        code, _, err = await _ctl(srv, capsys, "devices", "add", "phone", "--via", "gw", "--user", "alice")
        assert code == 3
        assert "a device of alice's goes behind a node of alice's or a tagged node" in err
        code, out, _ = await _ctl(srv, capsys, "devices", "add", "phone", "--via", "gw")
        assert code == 0
        doc = json.loads(out)
        cfg = wgconfig.WGConfig()
        cfg.read_from_fileobj(io.StringIO(doc["config"]))
        cfg.parse_lines()
        private = PrivateKey.from_base64(cfg.get_interface()["PrivateKey"])
        assert private.public_key().base64() == doc["node_key"]
        assert cfg.get_interface()["Address"] == [f"{doc['addresses'][0]}/32", f"{doc['addresses'][1]}/128"]
        peer = cfg.get_peers(keys_only=False)[g.node_key]
        assert peer["Endpoint"] == "8.8.8.8:41641"  # the one global endpoint the gateway reported
        assert peer["AllowedIPs"] == ["100.64.0.0/10", "fd7a:115c:a1e0::/48"]
        assert peer["PersistentKeepalive"] == 25
        # the private key is nowhere on the server's side
        assert private.base64() not in (tmp_path / "state" / "ghostmesh.db").read_bytes().decode("latin-1")
        code, out, _ = await _ctl(srv, capsys, "devices", "list")
        assert [(d["name"], d["via"], d["user"]) for d in json.loads(out)] == [("phone", "gw", "default")]
        # --config and --qr: 0600 files, and a name already taken is refused before anything is created
        conf, png = tmp_path / "tablet.conf", tmp_path / "tablet.png"
        code, out, _ = await _ctl(
            srv, capsys, "devices", "add", "tablet", "--via", "gw", "--endpoint", "gw.example.net:41641",
            "--allowed-ips", "100.64.0.0/10", "--config", str(conf), "--qr", str(png),
        )  # fmt: skip
        assert code == 0
        assert json.loads(out)["config"] == str(conf)
        assert conf.stat().st_mode & 0o777 == 0o600
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert png.stat().st_mode & 0o777 == 0o600
        assert "Endpoint = gw.example.net:41641" in conf.read_text()
        code, _, err = await _ctl(srv, capsys, "devices", "add", "tv", "--via", "gw", "--config", str(conf))
        assert code != 0
        assert "exists already" in err
        code, _, err = await _ctl(srv, capsys, "devices", "remove", "gw")
        assert code != 0
        assert "is a node, not a device" in err
        code, _, _ = await _ctl(srv, capsys, "devices", "remove", "tablet")
        assert code == 0
        # the lock on: refused without a signing key, signed with one
        key_file = tmp_path / "lock.key"
        code, _, _ = await _ctl(srv, capsys, "lock", "init", "--key-file", str(key_file))
        assert code == 0
        code, _, err = await _ctl(srv, capsys, "devices", "add", "tv", "--via", "gw")
        assert code != 0
        assert "--lock-key-file" in err
        code, out, _ = await _ctl(
            srv, capsys, "devices", "add", "tv", "--via", "gw", "--lock-key-file", str(key_file)
        )
        assert code == 0
        code, out, _ = await _ctl(srv, capsys, "lock", "status")
        assert "tv" not in json.loads(out)["unsigned_nodes"]
        assert "phone" in json.loads(out)["unsigned_nodes"]
        names = [d["name"] for d in json.loads((await _ctl(srv, capsys, "devices", "list"))[1])]
        assert names == ["phone", "tv"]
        await gw.close()
