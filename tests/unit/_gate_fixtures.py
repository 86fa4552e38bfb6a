"""Helpers for ghostgate's unit tests: a core with fake relay binding, and a hand-driven TURN client."""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
from typing import Any

from aioice import stun

from ghostcore.addr import HostPort
from ghostgate.turn_core import CoreConfig, Transmit, TurnCore

SECRET = b"s3cret"
T0 = 1_800_000_000.0
CLIENT: HostPort = ("198.51.100.7", 40000)
PEER: HostPort = ("203.0.113.9", 5000)


def make_core(**kw: Any) -> tuple[TurnCore, list[HostPort]]:
    """A core whose relay sockets are numbered 192.0.2.1:49152, :49153, ...; returns it and that list."""
    bound: list[HostPort] = []

    def bind() -> HostPort:
        bound.append(("192.0.2.1", 49152 + len(bound)))
        return bound[-1]

    defaults: dict[str, Any] = {
        "secret": SECRET,
        "denied_peers": tuple(ipaddress.ip_network(n) for n in ("127.0.0.0/8", "::1/128", "0.0.0.0/8")),
    }
    defaults.update(kw)
    return TurnCore(CoreConfig(**defaults), bind, nonce_key=b"k" * 32), bound


def rest_creds(expiry: float, user: str = "node1") -> tuple[str, str]:
    """Computed here independently of ghostgate.creds: the TURN REST convention written out."""
    username = f"{int(expiry)}:{user}"
    mac = hmac.new(SECRET, username.encode(), hashlib.sha1).digest()
    return username, base64.b64encode(mac).decode()


class Client:
    """A TURN client written against the RFC, driving a core by hand with a stepped clock."""

    def __init__(
        self, core: TurnCore, addr: HostPort = CLIENT, user: str = "node1", expiry: float = T0 + 86400
    ):
        self.core, self.addr = core, addr
        self.username, password = rest_creds(expiry, user)
        self.key = hashlib.md5(f"{self.username}:ghostmesh:{password}".encode()).digest()  # noqa: S324
        self.nonce: bytes | None = None

    def request(
        self, method: stun.Method, now: float, attrs: dict[str, Any] | None = None, *, sign: bool = True
    ) -> stun.Message:
        msg = stun.Message(method, stun.Class.REQUEST, attributes=dict(attrs or {}))
        if sign and self.nonce is not None:
            msg.attributes.update({"USERNAME": self.username, "REALM": "ghostmesh", "NONCE": self.nonce})
            msg.add_message_integrity(self.key)
        out = self.core.handle_client(bytes(msg), self.addr, now)
        assert len(out) >= 1
        assert isinstance(out[0], Transmit)
        assert out[0].dest == self.addr
        resp = stun.parse_message(out[0].data)
        assert resp.transaction_id == msg.transaction_id
        return resp

    def login(self, now: float) -> None:
        resp = self.request(stun.Method.ALLOCATE, now, {"REQUESTED-TRANSPORT": 17 << 24}, sign=False)
        assert resp.error_code == 401
        self.nonce = resp.attributes["NONCE"]

    def allocate(self, now: float, **attrs: Any) -> stun.Message:
        if self.nonce is None:
            self.login(now)
        return self.request(stun.Method.ALLOCATE, now, {"REQUESTED-TRANSPORT": 17 << 24, **attrs})
