"""The ghost relay wire protocol (QUIC relay and TLS-stream relay): framing and authentication, pure.

ghostgate forwards WireGuard packets between authenticated nodes addressed by node key, as Tailscale's
DERP does. The same frames run over two transports:

* **QUIC** (RFC 9000, via aioquic): control frames on the client's first bidirectional stream (id 0);
  SEND / RECV also as QUIC DATAGRAM frames (RFC 9221) with no length field, ``type | key | packet``;
* **TLS over TCP** (for hosts where UDP is blocked): every frame on the one byte stream.

Stream frame: ``type (u8) | length (u32, big-endian) | payload``; a payload is at most ``MAX_PAYLOAD``.

=====  ===========  ======  =================================================================
type   name         dir     payload
=====  ===========  ======  =================================================================
0x01   HELLO        c -> s  ``MAGIC``
0x02   CHALLENGE    s -> c  32 random bytes, fresh per connection
0x03   AUTH         c -> s  node key (32) | expiry (u64) | token proof (32) | key proof (32)
0x04   AUTH_OK      s -> c  empty
0x05   ERROR        s -> c  UTF-8 reason; the server then closes the connection
0x10   SEND         c -> s  destination node key (32) | packet
0x11   RECV         s -> c  source node key (32) | packet
0x12   PEER_GONE    s -> c  node key (32): that destination is not connected to this relay
0x20   PING         both    8 bytes, echoed in PONG
0x21   PONG         both    the PING's 8 bytes
=====  ===========  ======  =================================================================

Authentication proves two things over the relay's fresh per-connection challenge, so a recorded AUTH is
useless on any other connection (replay):

* **ghostmesh let this key use the relays until expiry.** ghostmesh hands each node
  ``token_mac(secret, node_key, expiry)`` (the relay shares ``secret`` with ghostmesh, as TURN REST does).
  The token itself never goes to a relay: ``token proof = HMAC-SHA256(token, "ghostrelay-auth-v1" |
  challenge)``.
* **the sender holds the node key's private half**, so a token that leaked (a map read on a node, a log)
  cannot be used by anyone else, nor evict the real node's connection: ``key proof = HMAC-SHA256(K,
  "ghostrelay-key-v1" | challenge | node key | expiry)`` with ``K = HKDF-SHA256(X25519(node private,
  relay static public))`` (RFC 7748 section 6.1: both ends compute it, the relay from its static private
  key and the claimed node key). The relay's static X25519 key is derived from the shared secret
  (:func:`relay_static_key`), so ghostmesh can publish its public half in the relay map with no new
  setting.

The relays' TLS key (both transports) is derived from the same secret (:func:`relay_tls_seed`) unless an
operator configures a certificate, so ghostmesh can put its pin in the relay map and nodes verify it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import struct
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ghostcore.errors import InvalidArgument, ProtocolError
from ghostcore.keys import PrivateKey, PublicKey

MAGIC = b"ghostrelay-v2"  # v2: AUTH carries the key proof
HELLO, CHALLENGE, AUTH, AUTH_OK, ERROR = 0x01, 0x02, 0x03, 0x04, 0x05
SEND, RECV, PEER_GONE = 0x10, 0x11, 0x12
PING, PONG = 0x20, 0x21
KNOWN = frozenset({HELLO, CHALLENGE, AUTH, AUTH_OK, ERROR, SEND, RECV, PEER_GONE, PING, PONG})

KEY_LEN = 32
CHALLENGE_LEN = 32
PROOF_LEN = 32
MAX_PAYLOAD = 65535
_HEADER = struct.Struct("!BI")
_AUTH = struct.Struct("!32sQ32s32s")


class RelayProtocolError(ProtocolError):
    """A peer sent bytes that are not a valid relay frame."""


@dataclass(frozen=True)
class Frame:
    type: int
    payload: bytes


def encode(ftype: int, payload: bytes = b"") -> bytes:
    """One stream frame."""
    if len(payload) > MAX_PAYLOAD:
        raise RelayProtocolError(f"relay frame payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    return _HEADER.pack(ftype, len(payload)) + payload


def encode_datagram(ftype: int, key: bytes, packet: bytes) -> bytes:
    """A SEND / RECV as one QUIC DATAGRAM frame payload."""
    return bytes((ftype,)) + key + packet


def decode_datagram(data: bytes) -> tuple[int, bytes, bytes]:
    """(type, key, packet) of a DATAGRAM; RelayProtocolError unless it is a SEND or RECV."""
    if len(data) < 1 + KEY_LEN or data[0] not in (SEND, RECV):
        raise RelayProtocolError("relay datagram: not a SEND or RECV")
    return data[0], data[1 : 1 + KEY_LEN], data[1 + KEY_LEN :]


def split_keyed(payload: bytes) -> tuple[bytes, bytes]:
    """(key, packet) of a SEND / RECV / PEER_GONE payload."""
    if len(payload) < KEY_LEN:
        raise RelayProtocolError("relay frame: payload shorter than a node key")
    return payload[:KEY_LEN], payload[KEY_LEN:]


class FrameReader:
    """Incremental stream decoder: ``feed(bytes)`` returns the complete frames so far."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Frame]:
        self._buf += data
        frames: list[Frame] = []
        while len(self._buf) >= _HEADER.size:
            ftype, length = _HEADER.unpack_from(self._buf)
            if ftype not in KNOWN:
                raise RelayProtocolError(f"relay frame: unknown type 0x{ftype:02x}")
            if length > MAX_PAYLOAD:
                raise RelayProtocolError(f"relay frame: length {length} exceeds {MAX_PAYLOAD}")
            end = _HEADER.size + length
            if len(self._buf) < end:
                break
            frames.append(Frame(ftype, bytes(self._buf[_HEADER.size : end])))
            del self._buf[:end]
        return frames


def token_mac(secret: bytes, node_key_b64: str, expiry: int) -> bytes:
    """The relay token ghostmesh mints for a node (``RelayMap.relay_token``)."""
    msg = b"ghostrelay-v1\n" + node_key_b64.encode() + b"\n" + str(expiry).encode()
    return hmac.new(secret, msg, hashlib.sha256).digest()


def auth_proof(token: bytes, challenge: bytes) -> bytes:
    return hmac.new(token, b"ghostrelay-auth-v1" + challenge, hashlib.sha256).digest()


def _hkdf(ikm: bytes, info: bytes, length: int = 32) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(ikm)


def relay_static_key(secret: bytes) -> PrivateKey:
    """The relays' static X25519 key, derived from the shared secret (ghostmesh publishes its public half)."""
    return PrivateKey.from_raw(_hkdf(secret, b"ghostrelay-static-v1"))


def relay_tls_seed(secret: bytes) -> bytes:
    """Bytes a relay's TLS private key is derived from when no certificate is configured
    (:func:`ghostcore.tlscert.derived_key`), so ghostmesh can compute the pin nodes check."""
    return _hkdf(secret, b"ghostrelay-tls-v1", 48)


def _key_proof(shared: bytes, challenge: bytes, node_key: bytes, expiry: int) -> bytes:
    k = _hkdf(shared, b"ghostrelay-key-proof-v1")
    return hmac.new(
        k, b"ghostrelay-key-v1" + challenge + node_key + struct.pack("!Q", expiry), hashlib.sha256
    ).digest()


def encode_auth(
    node: PrivateKey, relay_static: PublicKey, expiry: int, token: bytes, challenge: bytes
) -> bytes:
    """The AUTH payload a node sends in answer to ``challenge``."""
    key = node.public_key().raw
    proof = _key_proof(node.exchange(relay_static), challenge, key, expiry)
    return _AUTH.pack(key, expiry, auth_proof(token, challenge), proof)


def decode_auth(payload: bytes) -> tuple[bytes, int, bytes, bytes]:
    """(node key, expiry, token proof, key proof) of an AUTH payload."""
    if len(payload) != _AUTH.size:
        raise RelayProtocolError(f"relay AUTH: {len(payload)} bytes, expected {_AUTH.size}")
    key, expiry, token_proof, key_proof = _AUTH.unpack(payload)
    return key, expiry, token_proof, key_proof


def verify_auth(secret: bytes, static: PrivateKey, payload: bytes, challenge: bytes, now: float) -> bytes:
    """The authenticated node key (raw 32 bytes) of an AUTH payload, or RelayProtocolError saying why not."""
    key, expiry, token_proof, key_proof = decode_auth(payload)
    if expiry < now:
        raise RelayProtocolError("relay AUTH: credentials expired")
    want = auth_proof(token_mac(secret, base64.b64encode(key).decode(), expiry), challenge)
    if not hmac.compare_digest(want, token_proof):
        raise RelayProtocolError("relay AUTH: bad token proof")
    try:
        shared = static.exchange(PublicKey(key))
    except InvalidArgument:
        raise RelayProtocolError("relay AUTH: the node key is not a usable X25519 key") from None
    if not hmac.compare_digest(_key_proof(shared, challenge, key, expiry), key_proof):
        raise RelayProtocolError("relay AUTH: bad key proof (the sender does not hold the node's key)")
    return key
