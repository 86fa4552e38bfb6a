"""ghostmesh's TCP port on a hostile network, in-process: TLS only, clients trust it by pin or by a CA, and
node proofs (v2) bind each request's bytes and are accepted once.

A plain-text client gets nothing; a client pinned to another key stops before sending anything; a CA's
chain configured in ``[tls]`` is served whole; a request replayed, or its body rewritten under a valid
proof, is refused and changes nothing; a full replay guard refuses new requests instead of forgetting.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ghostcore import nodeauth, tlscert, tlschannel
from ghostcore.joinkey import parse_join_key, parse_pin
from ghostcore.pb.ghostmesh.v1 import admin_pb2 as apb
from ghostcore.pb.ghostmesh.v1 import admin_pb2_grpc as apb_grpc
from ghostcore.pb.ghostmesh.v1 import coordination_pb2 as pb
from ghostcore.pb.ghostmesh.v1 import coordination_pb2_grpc as pb_grpc
from ghostmesh.api.coordination import VERSION
from ghostmesh.config import TlsConfig
from ghostmesh.server import RunningServer
from tests.component._mesh_fixtures import NodeClient, admin_unix, auth_key, mesh_config, running


async def _nothing_changed(srv: RunningServer) -> tuple[object, ...]:
    return (tuple(srv.store.list_nodes()), len(srv.store.list_audit()))


async def test_plain_tcp_client_gets_no_answer(tmp_path: Path) -> None:
    async with running(mesh_config(tmp_path)) as srv:
        async with admin_unix(srv) as admin:
            api = await admin.CreateApiKey(apb.CreateApiKeyRequest(), timeout=5)
        before = await _nothing_changed(srv)
        async with grpc.aio.insecure_channel(srv.target) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await pb_grpc.CoordinationStub(channel).GetServerInfo(pb.GetServerInfoRequest(), timeout=3)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            bearer = (("authorization", f"Bearer {api.secret}"),)  # the key never reaches the server
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await apb_grpc.AdminStub(channel).ListUsers(
                    apb.ListUsersRequest(), metadata=bearer, timeout=3
                )
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert await _nothing_changed(srv) == before


async def test_client_pinned_to_another_key_sends_nothing(tmp_path: Path) -> None:
    async with running(mesh_config(tmp_path)) as srv:
        other = tlscert.fingerprint(tlscert.self_signed("ghostmesh").certificate)
        before = await _nothing_changed(srv)
        with pytest.raises(tlschannel.PinMismatch) as info:
            await asyncio.to_thread(
                tlschannel.prepare, srv.target, tlschannel.Trust(pin=parse_pin(other)), 5.0
            )
        message = str(info.value)
        assert f"presents TLS key {srv.tls_pin}, not the pinned {other}" in message
        assert await _nothing_changed(srv) == before


async def test_self_signed_identity_is_served_advertised_and_kept(tmp_path: Path) -> None:
    cfg = mesh_config(tmp_path)
    async with running(cfg) as srv, admin_unix(srv) as admin:
        ident = await admin.GetServerIdentity(apb.GetServerIdentityRequest(), timeout=5)
        assert (ident.version, ident.tls_pin, ident.tls_self_signed, ident.server_key) == (
            VERSION,
            srv.tls_pin,
            True,
            srv.server_key.base64(),
        )
        served = await asyncio.to_thread(tlschannel.fetch_certificate, srv.target, 5.0)
        assert tlscert.fingerprint(served) == srv.tls_pin
        assert served.public_bytes(serialization.Encoding.PEM) == srv.tls_cert_pem
        on_disk = x509.load_pem_x509_certificate((tmp_path / "state" / "tls.crt").read_bytes())
        assert tlscert.fingerprint(on_disk) == srv.tls_pin
        # every key created carries the pin the holder is to trust
        ak = await admin.CreateAuthKey(apb.CreateAuthKeyRequest(), timeout=5)
        api = await admin.CreateApiKey(apb.CreateApiKeyRequest(), timeout=5)
        assert ak.pin == api.pin == srv.tls_pin
        assert parse_join_key(f"{api.secret}.{api.pin}").pin == parse_pin(srv.tls_pin)
        pin = srv.tls_pin
    async with running(cfg) as again:
        assert again.tls_pin == pin  # a restart serves the same key: every pin handed out holds


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _issue(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: str,
    signer: ec.EllipticCurvePrivateKey,
    *,
    ca: bool,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        sans = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(signer, hashes.SHA256())


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


async def test_ca_issued_chain_from_tls_config_is_served_whole(tmp_path: Path) -> None:
    """A root CA, an intermediate and a leaf: the client holds only the root, so the handshake succeeds
    only if the server sends the intermediate with its certificate."""
    root_key, mid_key, leaf_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    root = _issue("test root", root_key, "test root", root_key, ca=True)
    mid = _issue("test intermediate", mid_key, "test root", root_key, ca=True)
    leaf = _issue("ghostmesh.test", leaf_key, "test intermediate", mid_key, ca=False)
    (tmp_path / "root.pem").write_bytes(_pem(root))
    (tmp_path / "chain.pem").write_bytes(_pem(leaf) + _pem(mid))
    (tmp_path / "leaf.key").write_bytes(
        leaf_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    (tmp_path / "other-root.pem").write_bytes(tlscert.self_signed("other root").cert_pem)
    tls = TlsConfig(cert_file=str(tmp_path / "chain.pem"), key_file=str(tmp_path / "leaf.key"))
    async with running(replace(mesh_config(tmp_path), tls=tls)) as srv:
        assert srv.tls_pin == tlscert.fingerprint(leaf)
        assert srv.tls_cert_pem == _pem(leaf) + _pem(mid)
        assert not (tmp_path / "state" / "tls.key").exists()  # no self-signed key made
        setup = await asyncio.to_thread(
            tlschannel.prepare, srv.target, tlschannel.Trust(ca_file=str(tmp_path / "root.pem")), 5.0
        )
        async with grpc.aio.secure_channel(srv.target, setup.credentials, options=setup.options) as ch:
            info = await pb_grpc.CoordinationStub(ch).GetServerInfo(pb.GetServerInfoRequest(), timeout=5)
            assert info.server_key == srv.server_key.base64()
        # a client that trusts another CA gets no answer; a pinned one (the leaf's key) does
        setup = await asyncio.to_thread(
            tlschannel.prepare, srv.target, tlschannel.Trust(ca_file=str(tmp_path / "other-root.pem")), 5.0
        )
        async with grpc.aio.secure_channel(srv.target, setup.credentials, options=setup.options) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as info_err:
                await pb_grpc.CoordinationStub(ch).GetServerInfo(pb.GetServerInfoRequest(), timeout=3)
            assert info_err.value.code() == grpc.StatusCode.UNAVAILABLE
        node = NodeClient(srv)
        assert (await node.register(await auth_key(srv), "via-pin")).name == "via-pin"
        await node.close()
        async with admin_unix(srv) as admin:
            ident = await admin.GetServerIdentity(apb.GetServerIdentityRequest(), timeout=5)
        assert (ident.tls_pin, ident.tls_self_signed) == (tlscert.fingerprint(leaf), False)


async def test_replayed_request_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    async with running(mesh_config(tmp_path)) as srv:
        node = NodeClient(srv)
        registered = await node.register(await auth_key(srv), "a")
        body = pb.StatusReport(endpoints=["192.0.2.1:41641"]).SerializeToString()
        md = node.signed("ReportStatus", body)
        await node.send("ReportStatus", body, md)
        await node.report(endpoints=["192.0.2.2:41641"])  # the node moved on
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await node.send("ReportStatus", body, md)  # a recording of the first report, played again
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "already used once (a replay)" in (info.value.details() or "")
        assert srv.state.node(registered.id).endpoints == ("192.0.2.2:41641",)  # type: ignore[union-attr]
        # a replayed Register (same metadata, same body) is refused the same way
        reg = pb.RegisterRequest(hostname="a").SerializeToString()
        reg_md = node.signed("Register", reg)
        await node.send("Register", reg, reg_md)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await node.send("Register", reg, reg_md)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        await node.close()


async def test_report_body_rewritten_under_a_valid_proof_is_refused(tmp_path: Path) -> None:
    async with running(mesh_config(tmp_path)) as srv:
        node = NodeClient(srv)
        registered = await node.register(await auth_key(srv), "a")
        honest = pb.StatusReport(endpoints=["192.0.2.1:41641"]).SerializeToString()
        md = node.signed("ReportStatus", honest)
        forged = pb.StatusReport(endpoints=["203.0.113.66:41641"]).SerializeToString()  # an attacker's relay
        before = await _nothing_changed(srv)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await node.send("ReportStatus", forged, md)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "failed its proof of possession" in (info.value.details() or "")
        assert srv.state.node(registered.id).endpoints == ()  # type: ignore[union-attr]
        assert await _nothing_changed(srv) == before
        await node.send("ReportStatus", honest, md)  # the forgery did not spend the proof's nonce
        assert srv.state.node(registered.id).endpoints == ("192.0.2.1:41641",)  # type: ignore[union-attr]
        await node.close()


async def test_a_full_replay_guard_refuses_instead_of_forgetting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    guard = nodeauth.ReplayGuard

    def small() -> nodeauth.ReplayGuard:
        return guard(capacity=3)

    monkeypatch.setattr(nodeauth, "ReplayGuard", small)
    async with running(mesh_config(tmp_path)) as srv:
        node, stranger = NodeClient(srv), NodeClient(srv)
        await node.register(await auth_key(srv), "a")  # 1 remembered
        body = pb.StatusReport().SerializeToString()
        for _ in range(5):  # proofs that do not verify are never remembered
            forged = dict(stranger.signed("ReportStatus", body))
            forged[nodeauth.MD_NODE_KEY] = node.pub
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await node.send("ReportStatus", body, tuple(forged.items()))
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        await node.report()  # 2
        await node.report()  # 3: full
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await node.report()
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "retry shortly" in (info.value.details() or "")
        for c in (node, stranger):
            await c.close()
