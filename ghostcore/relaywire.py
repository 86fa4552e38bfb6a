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
0x03   AUTH         c -> s  node key (32) | expiry (u64) | proof (32)
0x04   AUTH_OK      s -> c  empty
0x05   ERROR        s -> c  UTF-8 reason; the server then closes the connection
0x10   SEND         c -> s  destination node key (32) | packet
0x11   RECV         s -> c  source node key (32) | packet
0x12   PEER_GONE    s -> c  node key (32): that destination is not connected to this relay
0x20   PING         both    8 bytes, echoed in PONG
0x21   PONG         both    the PING's 8 bytes
=====  ===========  ======  =================================================================

Authentication: ghostmesh hands each node ``token_mac(secret, node_key, expiry)`` (the relay shares
``secret`` with ghostmesh, as TURN REST does). The token itself never goes to a relay: the node proves it
holds it with ``proof = HMAC-SHA256(token, "ghostrelay-auth-v1" | challenge)`` over the relay's fresh
challenge, so a recorded AUTH is useless on any other connection (replay) and ``expiry`` bounds its life.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import struct
from dataclasses import dataclass

from ghostcore.errors import ProtocolError

MAGIC = b"ghostrelay-v1"
HELLO, CHALLENGE, AUTH, AUTH_OK, ERROR = 0x01, 0x02, 0x03, 0x04, 0x05
SEND, RECV, PEER_GONE = 0x10, 0x11, 0x12
PING, PONG = 0x20, 0x21
KNOWN = frozenset({HELLO, CHALLENGE, AUTH, AUTH_OK, ERROR, SEND, RECV, PEER_GONE, PING, PONG})

KEY_LEN = 32
CHALLENGE_LEN = 32
PROOF_LEN = 32
MAX_PAYLOAD = 65535
_HEADER = struct.Struct("!BI")
_AUTH = struct.Struct("!32sQ32s")


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


def encode_auth(node_key: bytes, expiry: int, token: bytes, challenge: bytes) -> bytes:
    """The AUTH payload a node sends in answer to ``challenge``."""
    return _AUTH.pack(node_key, expiry, auth_proof(token, challenge))


def decode_auth(payload: bytes) -> tuple[bytes, int, bytes]:
    """(node key, expiry, proof) of an AUTH payload."""
    if len(payload) != _AUTH.size:
        raise RelayProtocolError(f"relay AUTH: {len(payload)} bytes, expected {_AUTH.size}")
    key, expiry, proof = _AUTH.unpack(payload)
    return key, expiry, proof


def verify_auth(secret: bytes, payload: bytes, challenge: bytes, now: float) -> bytes:
    """The authenticated node key (raw 32 bytes) of an AUTH payload, or RelayProtocolError saying why not."""
    key, expiry, proof = decode_auth(payload)
    if expiry < now:
        raise RelayProtocolError("relay AUTH: credentials expired")
    want = auth_proof(token_mac(secret, base64.b64encode(key).decode(), expiry), challenge)
    if not hmac.compare_digest(want, proof):
        raise RelayProtocolError("relay AUTH: bad proof")
    return key
