"""WireGuard keys: generation, parsing and the encodings each interface wants.

WireGuard keys are X25519 (RFC 7748) keys, 32 bytes. Users and the gRPC contract see base64 (44 chars,
as ``wg genkey`` prints); the UAPI protocol wants lowercase hex (wireguard.com/xplatform). Key maths is
done by ``cryptography`` (constant-time, OpenSSL), never by hand.

``PrivateKey`` never shows its secret in ``repr``/``str``: only ``.base64()``/``.hex()`` reveal it, and
only code that writes it to a 0600 file or to WireGuard calls them.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from ghostcore.errors import InvalidArgument

KEY_LEN = 32


def _decode_b64_key(text: str, what: str) -> bytes:
    stripped = text.strip()
    try:
        raw = base64.b64decode(stripped, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != KEY_LEN or len(stripped) != 44:
        raise InvalidArgument(
            f"invalid {what}: expected 32 bytes in base64 (44 characters, as `wg genkey` prints)"
        )
    return raw


@dataclass(frozen=True, slots=True)
class PublicKey:
    """A WireGuard / X25519 public key. Safe to log."""

    raw: bytes

    def __post_init__(self) -> None:
        if len(self.raw) != KEY_LEN:
            raise InvalidArgument("invalid public key: expected 32 bytes")

    @classmethod
    def from_base64(cls, text: str) -> PublicKey:
        return cls(_decode_b64_key(text, "public key"))

    @classmethod
    def from_hex(cls, text: str) -> PublicKey:
        try:
            return cls(bytes.fromhex(text))
        except ValueError:
            raise InvalidArgument("invalid public key: expected 64 hex digits") from None

    def base64(self) -> str:
        return base64.b64encode(self.raw).decode("ascii")

    def hex(self) -> str:
        return self.raw.hex()

    def short(self) -> str:
        """First 8 base64 characters, for logs and tables (as Tailscale shows ``[abcd1234]``)."""
        return self.base64()[:8]

    def __str__(self) -> str:
        return self.base64()

    def __repr__(self) -> str:
        return f"PublicKey({self.base64()!r})"


class PrivateKey:
    """A WireGuard / X25519 private key. Its repr never contains the secret."""

    __slots__ = ("_key",)

    def __init__(self, key: X25519PrivateKey) -> None:
        self._key = key

    @classmethod
    def generate(cls) -> PrivateKey:
        return cls(X25519PrivateKey.generate())

    @classmethod
    def from_base64(cls, text: str) -> PrivateKey:
        return cls(X25519PrivateKey.from_private_bytes(_decode_b64_key(text, "private key")))

    @classmethod
    def from_raw(cls, raw: bytes) -> PrivateKey:
        """32 bytes (RFC 7748 clamps them), e.g. derived from a shared secret with HKDF."""
        if len(raw) != KEY_LEN:
            raise InvalidArgument("invalid private key: expected 32 bytes")
        return cls(X25519PrivateKey.from_private_bytes(raw))

    def _raw(self) -> bytes:
        return self._key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())

    def base64(self) -> str:
        return base64.b64encode(self._raw()).decode("ascii")

    def hex(self) -> str:
        return self._raw().hex()

    def public_key(self) -> PublicKey:
        return PublicKey(self._key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))

    def exchange(self, peer: PublicKey) -> bytes:
        """X25519 shared secret with ``peer`` (RFC 7748 section 6.1).

        A low-order ``peer`` point gives the all-zero secret, which RFC 7748 section 6.1 says to refuse
        (``cryptography`` raises ValueError): InvalidArgument, so a key anyone can send is never a crash.
        """
        try:
            return self._key.exchange(X25519PublicKey.from_public_bytes(peer.raw))
        except ValueError:
            raise InvalidArgument(
                f"invalid public key {peer.short()}…: a low-order point, no shared secret with it"
            ) from None

    def __repr__(self) -> str:
        return f"PrivateKey(public={self.public_key().short()}…, secret=<redacted>)"

    __str__ = __repr__
