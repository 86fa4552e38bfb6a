"""The one string an admin hands out: a key plus what the holder needs to trust the server (pure).

An auth key (``gmauth_…``) or API key (``gmapi_…``) as ``ghostctl`` prints it may carry dot-separated parts
after the key itself::

    gmauth_<id>_<secret>[.sha256:<pin>][.lock:<credential>]

* ``sha256:<pin>``: the SHA-256 of the DER SubjectPublicKeyInfo of ghostmesh's TLS certificate, unpadded
  base64url (43 characters). A client that has it trusts exactly that key on the control channel and no
  certificate authority, so a self-signed certificate is as safe as a CA's, and a CA's that was
  mis-issued to somebody else is refused. The pin is of the key, not the certificate: the server may
  renew its certificate with the same key.
* ``lock:<credential>``: a pre-signed auth key for a mesh with node-key signing on
  (:class:`ghostcore.lock.Credential`): the node signs its own WireGuard key at join.

Key secrets are ``secrets.token_urlsafe`` text, which never contains a dot, so the split is unambiguous.
The parts are secret as a whole (the key and the credential are), and nothing here logs or reprs them.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field

from ghostcore.errors import InvalidArgument
from ghostcore.lock import Credential

PIN_PREFIX = "sha256:"
PIN_LEN = 32
LOCK_PREFIX = "lock:"


def format_pin(digest: bytes) -> str:
    """``sha256:<base64url>`` for a 32-byte SPKI digest."""
    return PIN_PREFIX + base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def parse_pin(text: str, where: str = "pin") -> bytes:
    """The 32-byte digest of ``sha256:<base64url>``; InvalidArgument naming ``where`` otherwise."""
    body = text[len(PIN_PREFIX) :] if text.startswith(PIN_PREFIX) else ""
    try:
        raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)) if body else b""
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != PIN_LEN or format_pin(raw) != text:
        raise InvalidArgument(
            f"{where}: expected {PIN_PREFIX}<43 base64url characters>, as `ghostctl server pin` prints it"
        )
    return raw


@dataclass(frozen=True)
class JoinKey:
    key: str = field(repr=False)  # the auth or API key ghostmesh checks
    pin: bytes | None = None
    credential: Credential | None = field(default=None, repr=False)

    def text(self) -> str:
        parts = [self.key]
        if self.pin is not None:
            parts.append(format_pin(self.pin))
        if self.credential is not None:
            parts.append(LOCK_PREFIX + self.credential.text())
        return ".".join(parts)


def parse_join_key(text: str, where: str = "key") -> JoinKey:
    """Split a key as handed out; each part at most once, pin before credential. InvalidArgument if not."""
    key, *rest = text.strip().split(".")
    pin: bytes | None = None
    credential: Credential | None = None
    for part in rest:
        if part.startswith(PIN_PREFIX) and pin is None and credential is None:
            pin = parse_pin(part, f"{where} (its pin)")
        elif part.startswith(LOCK_PREFIX) and credential is None:
            credential = Credential.from_text(part[len(LOCK_PREFIX) :])
        else:
            raise InvalidArgument(
                f"{where}: unexpected part after the key; expected <key>[.sha256:<pin>][.lock:<credential>]"
            )
    if not key:
        raise InvalidArgument(f"{where}: empty key")
    return JoinKey(key, pin, credential)
