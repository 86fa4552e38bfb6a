"""ghostctl end to end against in-test fake Admin and LocalNode gRPC servers.

The fakes hold a tiny in-memory state and record every request with its metadata, so the tests can assert
both what ghostctl prints (table and JSON, exit codes) and what it sends (API key only on TCP).
Servers listen on a unix socket in a private temp dir and on 127.0.0.1:0.
"""

from __future__ import annotations

import json
import shutil
import socket
import tempfile
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from ghostcore import tlscert
from ghostcore.pb.ghostmesh.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    coordination_pb2,
    local_pb2,
    local_pb2_grpc,
)
from ghostctl.cli import main

NOW = 1_800_000_000
GOOD_KEY = "gmapi-good-0123456789abcdef"
AUTH_SECRET = "gmauth-k1-SECRETSECRETSECRET"
API_SECRET = "gmapi-k9-SECRETSECRETSECRET"


class FakeAdmin(admin_pb2_grpc.AdminServicer):
    """In-memory Admin service; ``required_key`` makes it check ``authorization: Bearer``."""

    def __init__(self, required_key: str | None = None, echo_key: bool = False, pin: str = "") -> None:
        self.required_key = required_key
        self.pin = pin
        self.echo_key = echo_key
        self.calls: list[tuple[str, Any, dict[str, str]]] = []
        self.users = {"default": admin_pb2.User(id=1, name="default", created_unix=NOW - 3600)}
        self.nodes = [
            coordination_pb2.Node(
                id=1, name="alpha", user="default", addresses=["100.64.0.1", "fd7a:115c:a1e0::1"],
                online=True, last_seen_unix=NOW - 5, tags=["tag:web"],
            ),
            coordination_pb2.Node(
                id=2, name="beta", user="ops", addresses=["100.64.0.2"], expires_unix=NOW + 60
            ),
        ]  # fmt: skip
        self.authkeys: dict[str, admin_pb2.AuthKey] = {}
        self.apikeys: dict[str, admin_pb2.ApiKey] = {}

    def _enter(self, name: str, request: Any, context: grpc.ServicerContext) -> None:
        md = {k: v for k, v in context.invocation_metadata() if isinstance(v, str)}
        self.calls.append((name, request, md))
        if self.required_key is not None and md.get("authorization") != f"Bearer {self.required_key}":
            got = md.get("authorization", "")
            msg = f"invalid API key {got}" if self.echo_key else "missing or invalid API key"
            context.abort(grpc.StatusCode.UNAUTHENTICATED, msg)

    def _node(self, ref: str, context: grpc.ServicerContext) -> coordination_pb2.Node:
        for n in self.nodes:
            if n.name == ref or str(n.id) == ref:
                return n
        context.abort(grpc.StatusCode.NOT_FOUND, f"node {ref!r} not found; see 'ghostctl nodes list'")
        raise AssertionError("unreachable")

    def CreateUser(
        self, request: admin_pb2.CreateUserRequest, context: grpc.ServicerContext
    ) -> admin_pb2.User:
        self._enter("CreateUser", request, context)
        if request.name in self.users:
            context.abort(grpc.StatusCode.ALREADY_EXISTS, f"user {request.name!r} exists already")
        u = admin_pb2.User(id=len(self.users) + 1, name=request.name, created_unix=NOW)
        self.users[request.name] = u
        return u

    def ListUsers(self, request: Any, context: grpc.ServicerContext) -> admin_pb2.ListUsersResponse:
        self._enter("ListUsers", request, context)
        return admin_pb2.ListUsersResponse(users=list(self.users.values()))

    def DeleteUser(self, request: Any, context: grpc.ServicerContext) -> admin_pb2.DeleteUserResponse:
        self._enter("DeleteUser", request, context)
        if self.users.pop(request.name, None) is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"user {request.name!r} not found")
        return admin_pb2.DeleteUserResponse()

    def ListNodes(self, request: Any, context: grpc.ServicerContext) -> admin_pb2.ListNodesResponse:
        self._enter("ListNodes", request, context)
        return admin_pb2.ListNodesResponse(nodes=[n for n in self.nodes if request.user in ("", n.user)])

    def RenameNode(self, request: Any, context: grpc.ServicerContext) -> coordination_pb2.Node:
        self._enter("RenameNode", request, context)
        n = self._node(request.ref, context)
        n.name = request.new_name
        return n

    def ExpireNode(self, request: Any, context: grpc.ServicerContext) -> coordination_pb2.Node:
        self._enter("ExpireNode", request, context)
        n = self._node(request.ref, context)
        n.expires_unix = NOW
        return n

    def DeleteNode(self, request: Any, context: grpc.ServicerContext) -> admin_pb2.DeleteNodeResponse:
        self._enter("DeleteNode", request, context)
        self.nodes.remove(self._node(request.ref, context))
        return admin_pb2.DeleteNodeResponse()

    def CreateAuthKey(self, request: Any, context: grpc.ServicerContext) -> admin_pb2.CreateAuthKeyResponse:
        self._enter("CreateAuthKey", request, context)
        k = admin_pb2.AuthKey(
            id="k1", user=request.user or "default", reusable=request.reusable, ephemeral=request.ephemeral,
            tags=list(request.tags), created_unix=NOW,
            expires_unix=NOW + (request.expiration_seconds or 3600),
        )  # fmt: skip
        self.authkeys[k.id] = k
        return admin_pb2.CreateAuthKeyResponse(key=k, secret=AUTH_SECRET, pin=self.pin)

    def ListAuthKeys(self, request: Any, context: grpc.ServicerContext) -> admin_pb2.ListAuthKeysResponse:
        self._enter("ListAuthKeys", request, context)
        return admin_pb2.ListAuthKeysResponse(keys=list(self.authkeys.values()))

    def ExpireAuthKey(self, request: Any, context: grpc.ServicerContext) -> admin_pb2.AuthKey:
        self._enter("ExpireAuthKey", request, context)
        k = self.authkeys.get(request.id)
        if k is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"auth key {request.id!r} not found")
            raise AssertionError("unreachable")
        k.expired = True
        return k

    def CreateApiKey(self, request: Any, context: grpc.ServicerContext) -> admin_pb2.CreateApiKeyResponse:
        self._enter("CreateApiKey", request, context)
        k = admin_pb2.ApiKey(id="a9", created_unix=NOW, expires_unix=NOW + request.expiration_seconds)
        self.apikeys[k.id] = k
        return admin_pb2.CreateApiKeyResponse(key=k, secret=API_SECRET)

    def ListApiKeys(self, request: Any, context: grpc.ServicerContext) -> admin_pb2.ListApiKeysResponse:
        self._enter("ListApiKeys", request, context)
        return admin_pb2.ListApiKeysResponse(keys=list(self.apikeys.values()))

    def ExpireApiKey(self, request: Any, context: grpc.ServicerContext) -> admin_pb2.ApiKey:
        self._enter("ExpireApiKey", request, context)
        k = self.apikeys.get(request.id)
        if k is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"API key {request.id!r} not found")
            raise AssertionError("unreachable")
        k.expired = True
        return k


class FakeLocal(local_pb2_grpc.LocalNodeServicer):
    def __init__(self) -> None:
        self.release = threading.Event()
        self.stall = False

    def Status(self, request: Any, context: grpc.ServicerContext) -> local_pb2.LocalStatus:
        if self.stall:
            self.release.wait(timeout=5)
        return local_pb2.LocalStatus(
            name="alpha", node_id=1, user="default", node_key="bm9kZWtleQ==",
            addresses=["100.64.0.1", "fd7a:115c:a1e0::1"], server="203.0.113.1:7777", connected=True,
            map_serial=7, interface="ghost0", backend="wireguard-go", listen_port=41641,
            last_map_unix=NOW - 3, last_error="",
        )  # fmt: skip

    def Peers(self, request: Any, context: grpc.ServicerContext) -> local_pb2.LocalPeersResponse:
        return local_pb2.LocalPeersResponse(
            peers=[
                local_pb2.LocalPeer(node_id=3, name="gamma", addresses=["100.64.0.3"]),
                local_pb2.LocalPeer(
                    node_id=2, name="beta", addresses=["100.64.0.2", "fd7a:115c:a1e0::2"],
                    endpoint="198.51.100.2:41641", latest_handshake_unix=NOW - 12,
                    rx_bytes=1536, tx_bytes=3 * 1024 * 1024, online=True,
                ),
            ]
        )  # fmt: skip


@dataclass
class Servers:
    admin: FakeAdmin
    admin_tcp: FakeAdmin
    local: FakeLocal
    admin_sock: str
    local_sock: str
    tcp: str
    dir: Path
    pin: str  # the TLS server's key pin, "sha256:…"
    cert: Path  # its certificate (a CA file for the no-pin path)
    _servers: list[grpc.Server] = field(default_factory=list)


@pytest.fixture
def servers(monkeypatch: pytest.MonkeyPatch) -> Iterator[Servers]:
    # A short private dir: unix socket paths must stay under ~107 bytes, which tmp_path may exceed.
    d = Path(tempfile.mkdtemp(prefix="ghostctl-"))
    tls = tlscert.self_signed("ghostmesh", ["127.0.0.1"])
    pin = tlscert.fingerprint(tls.certificate)
    (d / "ca.pem").write_bytes(tls.cert_pem)
    admin, admin_tcp, local = FakeAdmin(), FakeAdmin(required_key=GOOD_KEY, pin=pin), FakeLocal()
    s1 = grpc.server(ThreadPoolExecutor(max_workers=4))
    admin_pb2_grpc.add_AdminServicer_to_server(admin, s1)
    s1.add_insecure_port(f"unix:{d}/admin.sock")
    s2 = grpc.server(ThreadPoolExecutor(max_workers=4))
    admin_pb2_grpc.add_AdminServicer_to_server(admin_tcp, s2)
    creds = grpc.ssl_server_credentials([(tls.key_pem, tls.cert_pem)])
    port = s2.add_secure_port("127.0.0.1:0", creds)
    s3 = grpc.server(ThreadPoolExecutor(max_workers=4))
    local_pb2_grpc.add_LocalNodeServicer_to_server(local, s3)
    s3.add_insecure_port(f"unix:{d}/node.sock")
    for s in (s1, s2, s3):
        s.start()
    # Make the tests independent of the caller's environment (and of the real defaults' paths).
    for var in (
        "GHOSTCTL_OUTPUT",
        "GHOSTCTL_SOCKET",
        "GHOSTCTL_SERVER",
        "GHOSTCTL_API_KEY",
        "GHOSTCTL_TIMEOUT",
        "GHOSTCTL_PIN",
        "GHOSTCTL_CA_FILE",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr("ghostctl.context._clock", lambda: float(NOW))
    srv = Servers(
        admin,
        admin_tcp,
        local,
        f"{d}/admin.sock",
        f"{d}/node.sock",
        f"127.0.0.1:{port}",
        d,
        pin,
        d / "ca.pem",
    )
    srv._servers = [s1, s2, s3]
    yield srv
    local.release.set()
    for s in (s1, s2, s3):
        s.stop(grace=None).wait(5)
    shutil.rmtree(d, ignore_errors=True)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


# -- node commands -------------------------------------------------------------------------------------


def test_status_table(servers: Servers, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "--socket", servers.local_sock, "status")
    assert (code, err) == (0, "")
    lines = dict(line.split(":", 1) for line in out.splitlines())
    assert lines["name"].strip() == "alpha"
    assert lines["addresses"].strip() == "100.64.0.1, fd7a:115c:a1e0::1"
    assert lines["connected"].strip() == "yes"
    assert lines["backend"].strip() == "wireguard-go"
    assert lines["interface"].strip() == "ghost0 (udp port 41641)"
    assert lines["map serial"].strip() == "7 (last map 3s ago)"
    assert lines["last error"].strip() == "-"


def test_status_json(
    servers: Servers, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GHOSTCTL_SOCKET", servers.local_sock)
    monkeypatch.setenv("GHOSTCTL_OUTPUT", "json")
    code, out, _ = run(capsys, "status")
    assert code == 0
    doc = json.loads(out)
    assert doc["name"] == "alpha"
    assert doc["connected"] is True
    assert doc["map_serial"] == 7
    assert doc["last_map_unix"] == NOW - 3
    assert doc["last_map"] == "2027-01-15T07:59:57Z"


def test_peers_table_sorted_and_humanised(servers: Servers, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "peers", "--socket", servers.local_sock)  # global flag after the command
    assert code == 0
    header, beta, gamma = out.splitlines()
    assert header.split() == [
        "NAME", "ADDRESSES", "PATH", "ENDPOINT", "LATENCY", "HANDSHAKE", "RX", "TX", "ONLINE"
    ]  # fmt: skip
    assert beta.startswith("beta ")
    assert "12s ago" in beta
    assert "1.5 KiB" in beta
    assert "3.0 MiB" in beta
    assert beta.split()[-1] == "yes"
    assert gamma.split() == ["gamma", "100.64.0.3", "-", "-", "-", "never", "0", "B", "0", "B", "no"]
    # columns aligned: every row's HANDSHAKE starts at the header's offset
    col = header.index("HANDSHAKE")
    assert beta[col:].startswith("12s ago")
    assert gamma[col:].startswith("never")


def test_peers_json_is_one_array(servers: Servers, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "-o", "json", "--socket", servers.local_sock, "peers")
    assert code == 0
    doc = json.loads(out)
    assert [p["name"] for p in doc] == ["beta", "gamma"]
    assert doc[0]["rx_bytes"] == 1536
    assert doc[1]["latest_handshake_unix"] == 0
    assert doc[1]["latest_handshake"] is None


def test_missing_node_socket_says_what_to_do(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sock = tmp_path / "nope.sock"
    code, out, err = run(capsys, "--socket", str(sock), "status")
    assert code == 5
    assert out == ""
    assert err.startswith("ghostctl: cannot reach ghostlink at unix:")
    assert str(sock) in err
    assert "is ghostlink running" in err
    assert "--socket" in err
    assert len(err.strip().splitlines()) == 1


def test_dead_node_socket_is_unavailable(servers: Servers, capsys: pytest.CaptureFixture[str]) -> None:
    stale = servers.dir / "stale.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(stale))
    s.close()  # the file stays, nobody listens: connection refused
    code, _, err = run(capsys, "--socket", str(stale), "--timeout", "2", "peers")
    assert code == 5
    assert f"cannot reach ghostlink at unix:{stale}" in err
    assert "is ghostlink running" in err


def test_timeout_is_unavailable(servers: Servers, capsys: pytest.CaptureFixture[str]) -> None:
    servers.local.stall = True
    code, _, err = run(capsys, "--socket", servers.local_sock, "--timeout", "0.3", "status")
    assert code == 5
    assert "timed out" in err


# -- server commands over the unix socket --------------------------------------------------------------


def test_users_create_list_delete(servers: Servers, capsys: pytest.CaptureFixture[str]) -> None:
    srv = f"unix:{servers.admin_sock}"
    code, out, _ = run(capsys, "--server", srv, "users", "create", "ops")
    assert code == 0
    assert out.strip() == "created user ops (id 2)"
    code, out, _ = run(capsys, "--server", srv, "users", "list")
    assert code == 0
    assert out.splitlines()[0].split() == ["ID", "NAME", "CREATED", "OIDC"]
    assert out.splitlines()[1].split() == ["1", "default", "1h", "ago", "-"]
    code, out, _ = run(capsys, "--server", srv, "-o", "json", "users", "list")
    assert [u["name"] for u in json.loads(out)] == ["default", "ops"]
    code, out, err = run(capsys, "--server", srv, "users", "create", "ops")
    assert code == 6
    assert err.strip() == "ghostctl: user 'ops' exists already"
    assert run(capsys, "--server", srv, "users", "delete", "ops")[0] == 0
    code, _, err = run(capsys, "--server", srv, "users", "delete", "ops")
    assert code == 4
    assert "not found" in err
    # the unix socket needs no credentials and gets none
    assert all("authorization" not in md for _, _, md in servers.admin.calls)


def test_nodes_list_rename_expire_delete(servers: Servers, capsys: pytest.CaptureFixture[str]) -> None:
    srv = f"unix:{servers.admin_sock}"
    code, out, _ = run(capsys, "--server", srv, "nodes", "list")
    assert code == 0
    header, alpha, beta = out.splitlines()
    assert header.split()[:4] == ["ID", "NAME", "USER", "ADDRESSES"]
    assert "LAST SEEN" in header
    assert alpha.split()[:5] == ["1", "alpha", "default", "100.64.0.1,fd7a:115c:a1e0::1", "yes"]
    assert "5s ago" in alpha
    assert "in 1m" in beta
    code, out, _ = run(capsys, "--server", srv, "-o", "json", "nodes", "list", "--user", "ops")
    assert [n["name"] for n in json.loads(out)] == ["beta"]
    assert servers.admin.calls[-1][1].user == "ops"
    code, out, _ = run(capsys, "--server", srv, "nodes", "rename", "2", "gamma")
    assert (code, out.strip()) == (0, "renamed node 2 to gamma (id 2)")
    code, out, _ = run(capsys, "--server", srv, "-o", "json", "nodes", "expire", "gamma")
    assert code == 0
    assert json.loads(out)["expires_unix"] == NOW
    code, out, _ = run(capsys, "--server", srv, "nodes", "delete", "alpha")
    assert (code, out.strip()) == (0, "deleted node alpha")
    code, _, err = run(capsys, "--server", srv, "nodes", "delete", "alpha")
    assert code == 4
    assert err.startswith("ghostctl: node 'alpha' not found")


def test_authkeys_create_shows_secret_once(servers: Servers, capsys: pytest.CaptureFixture[str]) -> None:
    srv = f"unix:{servers.admin_sock}"
    code, out, _ = run(
        capsys, "--server", srv, "authkeys", "create", "--reusable", "--ephemeral",
        "--expiration", "1h", "--tags", "tag:a,tag:b",
    )  # fmt: skip
    assert code == 0
    req = servers.admin.calls[-1][1]
    assert (req.reusable, req.ephemeral, req.expiration_seconds, list(req.tags)) == (
        True,
        True,
        3600,
        ["tag:a", "tag:b"],
    )
    lines = out.splitlines()
    assert lines[0].startswith("created auth key k1 for user default (reusable, ephemeral, expires in 1h")
    assert lines[1] == AUTH_SECRET
    assert "shown only once" in lines[2]
    code, out, _ = run(capsys, "--server", srv, "-o", "json", "authkeys", "create")
    doc = json.loads(out)
    assert doc["secret"] == AUTH_SECRET
    assert doc["reusable"] is False
    assert servers.admin.calls[-1][1].expiration_seconds == 0  # the server's default
    code, out, _ = run(capsys, "--server", srv, "authkeys", "list")
    assert code == 0
    assert AUTH_SECRET not in out  # listing never shows secrets
    assert out.splitlines()[1].split()[:4] == ["k1", "default", "no", "no"]
    code, out, _ = run(capsys, "--server", srv, "-o", "json", "authkeys", "expire", "k1")
    assert json.loads(out)["expired"] is True
    assert run(capsys, "--server", srv, "authkeys", "expire", "zz")[0] == 4


def test_apikeys_create_list_expire(servers: Servers, capsys: pytest.CaptureFixture[str]) -> None:
    srv = f"unix:{servers.admin_sock}"
    code, out, _ = run(capsys, "--server", srv, "apikeys", "create", "--expiration", "90d")
    assert code == 0
    assert servers.admin.calls[-1][1].expiration_seconds == 90 * 86400
    assert out.splitlines()[1] == API_SECRET
    assert "shown only once" in out
    code, out, _ = run(capsys, "--server", srv, "apikeys", "list")
    assert out.splitlines()[0].split() == ["ID", "CREATED", "EXPIRES", "LAST", "USED", "STATE"]
    assert out.splitlines()[1].split() == ["a9", "0s", "ago", "in", "90d", "never", "valid"]
    code, out, _ = run(capsys, "--server", srv, "-o", "json", "apikeys", "expire", "a9")
    assert json.loads(out)["expired"] is True


def test_missing_admin_socket(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "--server", f"unix:{tmp_path}/admin.sock", "nodes", "list")
    assert code == 5
    assert "is ghostmesh running" in err
    assert "--server" in err


# -- server commands over TCP with an API key ----------------------------------------------------------


def test_tcp_sends_api_key_and_never_prints_it(servers: Servers, capsys: pytest.CaptureFixture[str]) -> None:
    key = f"{GOOD_KEY}.{servers.pin}"  # as `apikeys create` prints it: the key carries the server's pin
    code, out, err = run(capsys, "--server", servers.tcp, "--api-key", key, "-o", "json", "nodes", "list")
    assert code == 0
    assert len(json.loads(out)) == 2
    assert servers.admin_tcp.calls[-1][2]["authorization"] == f"Bearer {GOOD_KEY}"
    assert GOOD_KEY not in out + err


def test_tcp_api_key_from_environment(
    servers: Servers, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GHOSTCTL_SERVER", servers.tcp)
    monkeypatch.setenv("GHOSTCTL_API_KEY", GOOD_KEY)
    monkeypatch.setenv("GHOSTCTL_PIN", servers.pin)
    code, out, err = run(capsys, "authkeys", "create", "--user", "ops")
    assert code == 0
    assert f"{AUTH_SECRET}.{servers.pin}" in out  # the new key carries the pin nodes will trust
    assert servers.admin_tcp.calls[-1][2]["authorization"] == f"Bearer {GOOD_KEY}"
    assert GOOD_KEY not in out + err


def test_tcp_wrong_key_is_auth_error(servers: Servers, capsys: pytest.CaptureFixture[str]) -> None:
    bad = "gmapi-wrong-fedcba9876543210"
    code, out, err = run(
        capsys, "--server", servers.tcp, "--api-key", bad, "--pin", servers.pin, "users", "list"
    )
    assert code == 3
    assert out == ""
    assert err.strip() == "ghostctl: missing or invalid API key"
    assert bad not in err


def test_tcp_key_echoed_by_server_is_redacted(servers: Servers, capsys: pytest.CaptureFixture[str]) -> None:
    servers.admin_tcp.echo_key = True
    bad = "gmapi-wrong-fedcba9876543210"
    code, out, err = run(
        capsys, "--server", servers.tcp, "--api-key", f"{bad}.{servers.pin}", "users", "list"
    )
    assert code == 3
    assert bad not in out + err
    assert "<redacted>" in err


def test_tcp_without_key_is_refused_locally(servers: Servers, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "--server", servers.tcp, "users", "list")
    assert code == 3
    assert "--api-key" in err
    assert servers.admin_tcp.calls == []  # nothing was sent


def test_tcp_unreachable_names_target(capsys: pytest.CaptureFixture[str]) -> None:
    # Find a free loopback port, then close it so nothing listens there.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    target = f"127.0.0.1:{port}"
    code, _, err = run(capsys, "--server", target, "--api-key", GOOD_KEY, "--timeout", "2", "users", "list")
    assert code == 5
    assert f"cannot reach ghostmesh at {target}" in err
    assert GOOD_KEY not in err


def test_tcp_pin_mismatch_refuses_before_sending(
    servers: Servers, capsys: pytest.CaptureFixture[str]
) -> None:
    other = tlscert.fingerprint(tlscert.self_signed("elsewhere").certificate)
    code, out, err = run(capsys, "--server", servers.tcp, "--api-key", f"{GOOD_KEY}.{other}", "users", "list")
    assert code == 3
    assert out == ""
    assert servers.pin in err  # names what the server presents
    assert other in err  # and what was pinned
    assert len(err.strip().splitlines()) == 1
    assert servers.admin_tcp.calls == []  # the API key never left


def test_tcp_ca_file_without_pin(servers: Servers, capsys: pytest.CaptureFixture[str]) -> None:
    args = ("--server", servers.tcp, "--api-key", GOOD_KEY, "--ca-file", str(servers.cert), "users", "list")
    code, _, err = run(capsys, *args)
    assert code == 0, err
    assert servers.admin_tcp.calls[-1][2]["authorization"] == f"Bearer {GOOD_KEY}"


def test_tcp_untrusted_certificate_without_pin_sends_nothing(
    servers: Servers, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(
        capsys, "--server", servers.tcp, "--api-key", GOOD_KEY, "--timeout", "2", "users", "list"
    )
    assert code == 5
    assert GOOD_KEY not in err
    assert servers.admin_tcp.calls == []
