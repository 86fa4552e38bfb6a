"""What every ghostctl command gets: the targets, the gRPC stubs, the call wrapper and the output sink.

Two endpoints exist:

* the node: ghostlink's local unix socket (``--socket``, LocalNode service), root-only, no credentials;
* the server: ghostmesh's admin endpoint (``--server``), either ``unix:/path`` (root-only socket, no
  credentials) or ``host:port`` over TLS, where every call carries ``authorization: Bearer <api key>``.
  A bare ``host`` gets ghostmesh's default port 7777. The server's TLS key is trusted through a pin: the
  one the API key string carries (``gmapi_….sha256:<pin>``, as ``ghostctl apikeys create`` prints it),
  or ``--pin``; without a pin, through a certificate authority (``--ca-file``, else the system's).
  The API key never crosses a connection that is not authenticated that way (``ghostcore.tlschannel``).

``Context.call`` applies the deadline (``--timeout``) and credentials and turns every ``grpc.RpcError``
into a ``GhostError`` via ``ghostctl.errors.rpc_failure``, with a hint saying what to do when the target
cannot be reached. Channels are synchronous: one call (or a few) per command.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO, TypeVar

import grpc

from ghostcore import addr
from ghostcore import errors as e
from ghostcore.joinkey import JoinKey, parse_join_key, parse_pin
from ghostcore.pb.ghostmesh.v1 import admin_pb2_grpc, local_pb2_grpc
from ghostctl import output
from ghostctl.errors import rpc_failure

DEFAULT_SOCKET = "/var/run/ghostlink/ghostlink.sock"
DEFAULT_SERVER = "unix:/var/run/ghostmesh/admin.sock"
DEFAULT_PORT = 7777
DEFAULT_TIMEOUT = 5.0

NODE_HINT = "is ghostlink running on this node? pass --socket PATH or set GHOSTCTL_SOCKET"
SERVER_HINT = (
    "is ghostmesh running? pass --server unix:/path/admin.sock or --server host:port (GHOSTCTL_SERVER)"
)

_clock = time.time  # the wall clock for humanised times; tests replace it

Req = TypeVar("Req")
Resp = TypeVar("Resp")


@dataclass(frozen=True)
class ServerTarget:
    """Where ghostmesh's admin API is: ``grpc_target`` for the channel, ``socket_path`` when unix."""

    grpc_target: str
    socket_path: str | None

    @property
    def is_unix(self) -> bool:
        return self.socket_path is not None

    @property
    def display(self) -> str:
        return self.grpc_target


def parse_server(text: str) -> ServerTarget:
    """``unix:/path`` or ``host:port`` (``[v6]:port``; a bare host gets port 7777). InvalidArgument if bad."""
    s = text.strip()
    if s.startswith("unix:"):
        path = s[len("unix:") :]
        if path.startswith("//"):
            path = path[2:]
        if not path.startswith("/"):
            raise e.InvalidArgument(f"--server {text!r}: a unix socket needs an absolute path (unix:/path)")
        return ServerTarget(f"unix:{path}", path)
    if not s or "/" in s:
        raise e.InvalidArgument(f"--server {text!r}: expected unix:/path or host:port")
    if s.endswith("]") or ":" not in s:
        s = f"{s}:{DEFAULT_PORT}"  # a bare host or [ipv6]: the default port
    try:
        host, port = addr.split_hostport(s, "--server")  # the one strict parser: no zone IDs, no spaces
    except addr.AddressError as exc:
        raise e.InvalidArgument(f"{exc}; or unix:/path") from None
    if port == 0:
        raise e.InvalidArgument(f"--server {text!r}: expected host:port with a port in 1-65535")
    return ServerTarget(addr.format_endpoint(host, port), None)


def with_pin(secret: str, pin: str) -> str:
    """A new key as handed out: with the server's TLS pin appended (``ghostcore.joinkey``), if it sent one."""
    return JoinKey(secret, parse_pin(pin, "the server's pin")).text() if pin else secret


def _check_socket(path: str, what: str, hint: str) -> None:
    """Fail early and clearly for a missing socket or one we may not open (root-only)."""
    if not os.path.exists(path):
        raise e.Unavailable(f"cannot reach {what} at unix:{path} (no such socket); {hint}")
    if not os.access(path, os.R_OK | os.W_OK):
        raise e.PermissionDenied(
            f"permission denied on {path}; run ghostctl as root (the socket is root-only)"
        )


@dataclass
class Context:
    """Settings from the global flags plus helpers the command modules call."""

    output_mode: str = "table"
    socket_path: str = DEFAULT_SOCKET
    server: str = DEFAULT_SERVER
    api_key: str | None = field(default=None, repr=False)  # a secret: never in a repr
    pin: str | None = None  # "sha256:…": the server's TLS key, when the API key does not carry it
    ca_file: str | None = None  # CAs that vouch for the server's certificate when there is no pin
    timeout: float = DEFAULT_TIMEOUT
    stdout: TextIO = field(default_factory=lambda: sys.stdout)
    now: float = field(default_factory=lambda: _clock())  # noqa: PLW0108 - late-bound for tests
    _channels: list[grpc.Channel] = field(default_factory=list)
    _admin_tcp: bool = False

    @property
    def json(self) -> bool:
        return self.output_mode == "json"

    def emit(self, doc: Any, render: Callable[[], str]) -> None:
        """Print ``doc`` as JSON, or the human rendering (computed only in table mode)."""
        text = output.to_json(doc) if self.json else render()
        self.stdout.write(text + "\n")

    def close(self) -> None:
        for ch in self._channels:
            ch.close()
        self._channels.clear()

    # -- stubs ---------------------------------------------------------------------------------------

    def local(self) -> tuple[local_pb2_grpc.LocalNodeStub, str]:
        _check_socket(self.socket_path, "ghostlink", NODE_HINT)
        ch = grpc.insecure_channel(f"unix:{self.socket_path}")
        self._channels.append(ch)
        return local_pb2_grpc.LocalNodeStub(ch), f"ghostlink at unix:{self.socket_path}"

    def admin(self) -> tuple[admin_pb2_grpc.AdminStub, str]:
        target = parse_server(self.server)
        if target.socket_path is not None:
            _check_socket(target.socket_path, "ghostmesh", SERVER_HINT)
            ch = grpc.insecure_channel(target.grpc_target)
        elif not self.api_key:
            raise e.AuthError(
                f"--server {target.display} is a TCP endpoint and needs an API key: pass --api-key or set "
                "GHOSTCTL_API_KEY (create one with 'ghostctl apikeys create' on the server)"
            )
        else:
            ch = self._tls_channel(target.grpc_target)
        self._channels.append(ch)
        self._admin_tcp = not target.is_unix
        return admin_pb2_grpc.AdminStub(ch), f"ghostmesh at {target.display}"

    def _tls_channel(self, target: str) -> grpc.Channel:
        # Loaded here: X.509 and ssl cost ~40 ms at startup, and most commands (every node command, admin
        # over the unix socket) never open a TLS channel.
        from ghostcore import tlschannel  # noqa: PLC0415

        joined = parse_join_key(self.api_key or "", "--api-key")
        pin = parse_pin(self.pin, "--pin") if self.pin else None
        if pin is not None and joined.pin is not None and pin != joined.pin:
            raise e.InvalidArgument("--pin and the pin the API key carries differ; pass only one")
        trust = tlschannel.Trust(pin=pin or joined.pin, ca_file=self.ca_file)
        setup = tlschannel.prepare(target, trust, self.timeout)
        return grpc.secure_channel(target, setup.credentials, options=setup.options)

    # -- calls ---------------------------------------------------------------------------------------

    def call(
        self,
        method: grpc.UnaryUnaryMultiCallable[Req, Resp],
        request: Req,
        where: str,
        *,
        node: bool = False,
        timeout: float | None = None,
    ) -> Resp:
        """One unary call with the deadline (``--timeout``, or ``timeout`` for a call that waits on purpose)
        and (admin over TCP) the API key; errors become GhostErrors."""
        metadata: tuple[tuple[str, str], ...] = ()
        if not node and self._admin_tcp and self.api_key:
            metadata = (("authorization", f"Bearer {parse_join_key(self.api_key, '--api-key').key}"),)
        try:
            return method(request, timeout=timeout or self.timeout, metadata=metadata)
        except grpc.RpcError as exc:
            raise rpc_failure(exc, where, NODE_HINT if node else SERVER_HINT) from None
