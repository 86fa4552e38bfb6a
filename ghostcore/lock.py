"""Node-key signing (a "tailnet lock"): the signed log of trusted signing keys, and the signatures that let
a WireGuard key into the mesh. Pure: bytes in, verdicts out (Ed25519 from ``cryptography``, RFC 8032).

ghostmesh decides who is in the mesh, so whoever controls ghostmesh (its process or its database) could
add a peer to every node or swap a node's key. With the lock on, a node installs a peer only if the peer's
WireGuard key carries a signature chain ending in a key of the lock's trusted set, and that set changes
only through updates signed by a key already in it. ghostmesh stores and forwards both and never holds a
signing key, so it can forge neither. (Tailscale's "tailnet lock" has the same aim; this format is ours.)

Every structure is a fixed binary layout, so each has exactly one encoding: what is signed and what is
hashed can never be re-serialised differently by two programs.

**The lock log**: a hash chain of updates. One update::

    size  field
    4     magic b"GLU1"
    1     kind: INIT, ADD_KEY, REMOVE_KEY, DISABLE
    32    SHA-256 of the previous update's encoding (zeros for INIT)
    1     n, the number of keys that follow (INIT 1..MAX_KEYS, ADD_KEY/REMOVE_KEY 1, DISABLE 0)
    32·n  Ed25519 public keys
    32    signer: an Ed25519 public key
    64    Ed25519 signature over UPDATE_DOMAIN + every byte above

INIT starts the log, or starts it again after a DISABLE; it is signed by one of its own keys (somebody
holds one). Every other update is signed by a key trusted after the update before it. ADD_KEY adds an
untrusted key (at most ``MAX_KEYS`` in all), REMOVE_KEY removes a trusted key but never the last, DISABLE
turns the lock off. A log has at most ``MAX_UPDATES`` updates. A node keeps the log it has verified and
accepts a new one only if it extends it (:func:`extends`): a coordinator cannot fork or roll back the
trusted set.

**Node-key signatures**: a chain of 1..``MAX_CHAIN`` links, encoded as one count byte then the links::

    size  field
    4     magic b"GLS1"
    32    node key: the WireGuard public key this link vouches for (zeros: none, a credential)
    32    rotation key: the Ed25519 key this link lets sign the next link (zeros: none)
    4     seq, big-endian: how many times the rotation key that signed this link rotated its node
    32    signer
    64    Ed25519 signature over NODEKEY_DOMAIN + every byte above

The first link's signer is trusted; each later link's signer is the previous link's rotation key; the
last link names the peer's WireGuard key. Three shapes occur:

* direct: ``[trusted: (N, R)]``: an admin signed node key N and the node's rotation key R
  (``ghostctl lock sign``);
* credential: ``[trusted: (-, C)] + [C: (N, R, 0)]``: a pre-signed auth key carries C's private key and the
  node signs its own key at join;
* rotation: ``... + [R: (N', R, seq + 1)]``: the node's own rotation key vouches for its new WireGuard key;
  the next rotation replaces that last link (:func:`rotate`), so a chain never grows past three links.

Why one module of about 480 lines: the log and the signature chains are one format family (same keys,
same encodings, same verification rules), read together by ghostmesh, ghostlink and ghostctl.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from ghostcore.errors import InvalidArgument

KEY_LEN = 32
SIG_LEN = 64
HASH_LEN = 32
ZERO = bytes(KEY_LEN)

UPDATE_MAGIC = b"GLU1"
UPDATE_DOMAIN = b"ghost lock update v1\0"
INIT, ADD_KEY, REMOVE_KEY, DISABLE = 1, 2, 3, 4
KIND_NAMES = {INIT: "init", ADD_KEY: "add-key", REMOVE_KEY: "remove-key", DISABLE: "disable"}
MAX_KEYS = 16
MAX_UPDATES = 256

LINK_MAGIC = b"GLS1"
NODEKEY_DOMAIN = b"ghost lock nodekey v1\0"
_LINK_BODY = struct.Struct("!4s32s32sI32s")
LINK_LEN = _LINK_BODY.size + SIG_LEN  # 168
MAX_CHAIN = 3

KEY_TEXT_PREFIX = "lockkey:"
REQUEST_PREFIX = "nodekey:"


class LockError(InvalidArgument):
    """A lock update, log or signature is malformed or does not verify (one line, names what failed)."""


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _unb64url(text: str, size: int, what: str) -> bytes:
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != size or _b64url(raw) != text:
        raise LockError(f"invalid {what}: expected {size} bytes in unpadded base64url")
    return raw


def format_key(pub: bytes) -> str:
    """A signing key as users see and type it: ``lockkey:<base64url>``."""
    return KEY_TEXT_PREFIX + _b64url(pub)


def parse_key(text: str) -> bytes:
    if not text.startswith(KEY_TEXT_PREFIX):
        raise LockError(f"invalid signing key {text[:20]!r}…: expected {KEY_TEXT_PREFIX}<base64url>")
    return _unb64url(text[len(KEY_TEXT_PREFIX) :], KEY_LEN, "signing key")


class SigningKey:
    """An Ed25519 private key (a lock's signing key, or a node's rotation key). The repr hides the secret."""

    __slots__ = ("_key",)

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_raw(cls, raw: bytes) -> SigningKey:
        if len(raw) != KEY_LEN:
            raise LockError("invalid private signing key: expected 32 bytes")
        return cls(Ed25519PrivateKey.from_private_bytes(raw))

    @classmethod
    def from_text(cls, text: str) -> SigningKey:
        """The file form: the 32-byte seed in standard base64 (as WireGuard keys are kept)."""
        try:
            raw = base64.b64decode(text.strip(), validate=True)
        except (binascii.Error, ValueError):
            raw = b""
        return cls.from_raw(raw)

    def raw(self) -> bytes:
        return self._key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())

    def text(self) -> str:
        return base64.b64encode(self.raw()).decode("ascii")

    def public(self) -> bytes:
        return self._key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(message)

    def __repr__(self) -> str:
        return f"SigningKey(public={format_key(self.public())[:20]}…, secret=<redacted>)"

    __str__ = __repr__


def _verify(pub: bytes, sig: bytes, message: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(pub).verify(sig, message)
    except (InvalidSignature, ValueError):
        return False
    return True


# --- the lock log -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Update:
    kind: int
    prev: bytes
    keys: tuple[bytes, ...]
    signer: bytes
    signature: bytes

    def body(self) -> bytes:
        return (
            UPDATE_MAGIC
            + bytes([self.kind])
            + self.prev
            + bytes([len(self.keys)])
            + b"".join(self.keys)
            + self.signer
        )

    def encode(self) -> bytes:
        return self.body() + self.signature

    def hash(self) -> bytes:
        return hashlib.sha256(self.encode()).digest()


def make_update(kind: int, prev: bytes, keys: Sequence[bytes], signer: SigningKey) -> bytes:
    """A signed update (its encoding); validity against a log is :func:`verify_log`'s to decide."""
    unsigned = Update(kind, prev, tuple(keys), signer.public(), b"")
    return unsigned.body() + signer.sign(UPDATE_DOMAIN + unsigned.body())


def decode_update(data: bytes) -> Update:
    """Parse one update and check its own signature (not yet whether its signer is trusted)."""
    fixed = 4 + 1 + HASH_LEN + 1
    if len(data) < fixed + KEY_LEN + SIG_LEN or data[:4] != UPDATE_MAGIC:
        raise LockError("malformed lock update: bad magic or too short")
    kind, n = data[4], data[4 + 1 + HASH_LEN]
    if kind not in KIND_NAMES:
        raise LockError(f"malformed lock update: unknown kind {kind}")
    if len(data) != fixed + KEY_LEN * n + KEY_LEN + SIG_LEN:
        raise LockError("malformed lock update: its length does not match its key count")
    keys = tuple(data[fixed + KEY_LEN * i : fixed + KEY_LEN * (i + 1)] for i in range(n))
    signer = data[fixed + KEY_LEN * n : fixed + KEY_LEN * (n + 1)]
    upd = Update(kind, data[5 : 5 + HASH_LEN], keys, signer, data[-SIG_LEN:])
    if not _verify(signer, upd.signature, UPDATE_DOMAIN + upd.body()):
        raise LockError(f"lock update ({KIND_NAMES[kind]}): the signature does not verify")
    return upd


@dataclass(frozen=True, slots=True)
class LockState:
    """What a verified log says: the trusted keys, whether the lock is on, and where the log stands."""

    enabled: bool
    trusted: frozenset[bytes]
    head: bytes  # hash of the last update (zeros: an empty log)
    genesis: bytes  # hash of the latest INIT update (zeros: an empty log)
    length: int


OFF = LockState(False, frozenset(), bytes(HASH_LEN), bytes(HASH_LEN), 0)


def apply_update(state: LockState, data: bytes) -> LockState:
    """The state after one more update, or LockError saying why it cannot follow ``state``."""
    upd = decode_update(data)
    name = KIND_NAMES[upd.kind]
    if state.length >= MAX_UPDATES:
        raise LockError(f"lock log is full ({MAX_UPDATES} updates)")
    if upd.prev != state.head:
        raise LockError(f"lock update ({name}) does not follow the current head")
    if upd.kind == INIT:
        if state.enabled:
            raise LockError("lock update (init): the lock is on already")
        keys = set(upd.keys)
        if not 1 <= len(upd.keys) <= MAX_KEYS or len(keys) != len(upd.keys):
            raise LockError(f"lock update (init): 1..{MAX_KEYS} distinct keys")
        if upd.signer not in keys:
            raise LockError("lock update (init) must be signed by one of its own keys")
        h = upd.hash()
        return LockState(True, frozenset(keys), h, h, state.length + 1)
    if not state.enabled:
        raise LockError(f"lock update ({name}): the lock is off; only init may follow")
    if upd.signer not in state.trusted:
        raise LockError(
            f"lock update ({name}) is signed by {format_key(upd.signer)[:20]}…, not a trusted key"
        )
    trusted = set(state.trusted)
    if upd.kind == DISABLE:
        if upd.keys:
            raise LockError("lock update (disable) names no keys")
        return LockState(False, frozenset(), upd.hash(), state.genesis, state.length + 1)
    if len(upd.keys) != 1:
        raise LockError(f"lock update ({name}) names exactly one key")
    key = upd.keys[0]
    if upd.kind == ADD_KEY:
        if key in trusted:
            raise LockError(f"lock update (add-key): {format_key(key)[:20]}… is trusted already")
        if len(trusted) >= MAX_KEYS:
            raise LockError(f"lock update (add-key): at most {MAX_KEYS} trusted keys")
        trusted.add(key)
    else:
        if key not in trusted:
            raise LockError(f"lock update (remove-key): {format_key(key)[:20]}… is not trusted")
        if len(trusted) == 1:
            raise LockError("lock update (remove-key) cannot remove the last trusted key; disable the lock")
        trusted.discard(key)
    return LockState(True, frozenset(trusted), upd.hash(), state.genesis, state.length + 1)


def verify_log(updates: Iterable[bytes]) -> LockState:
    """Verify a whole log from its INIT; the empty log is :data:`OFF`."""
    state = OFF
    for data in updates:
        state = apply_update(state, data)
    return state


def extends(old: Sequence[bytes], new: Sequence[bytes]) -> bool:
    """Whether ``new`` keeps every update of ``old``, in order (it may add more at the end)."""
    return len(new) >= len(old) and all(a == b for a, b in zip(old, new, strict=False))


def describe(updates: Iterable[bytes]) -> list[tuple[str, list[str], str, str]]:
    """(kind, keys, signer, hash) per update, for ``lock log``: keys as :func:`format_key`, hash as hex."""
    out = []
    for data in updates:
        upd = decode_update(data)
        keys = [format_key(k) for k in upd.keys]
        out.append((KIND_NAMES[upd.kind], keys, format_key(upd.signer), upd.hash().hex()))
    return out


# --- node-key signatures ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Link:
    node_key: bytes  # ZERO: a credential
    rotation_key: bytes  # ZERO: cannot sign a further link
    seq: int
    signer: bytes
    signature: bytes

    def body(self) -> bytes:
        return _LINK_BODY.pack(LINK_MAGIC, self.node_key, self.rotation_key, self.seq, self.signer)


def make_link(signer: SigningKey, node_key: bytes, rotation_key: bytes, seq: int = 0) -> Link:
    if len(node_key) != KEY_LEN or len(rotation_key) != KEY_LEN or not 0 <= seq < 1 << 32:
        raise LockError("a signature link names 32-byte keys and a 32-bit seq")
    unsigned = Link(node_key, rotation_key, seq, signer.public(), b"")
    return Link(node_key, rotation_key, seq, signer.public(), signer.sign(NODEKEY_DOMAIN + unsigned.body()))


def encode_chain(links: Sequence[Link]) -> bytes:
    if not 1 <= len(links) <= MAX_CHAIN:
        raise LockError(f"a node-key signature has 1..{MAX_CHAIN} links")
    return bytes([len(links)]) + b"".join(link.body() + link.signature for link in links)


def decode_chain(data: bytes) -> tuple[Link, ...]:
    """Parse a signature chain (each link's own signature is checked by :func:`verify_signature`)."""
    if not data or not 1 <= data[0] <= MAX_CHAIN or len(data) != 1 + data[0] * LINK_LEN:
        raise LockError("malformed node-key signature: bad link count or length")
    links = []
    for i in range(data[0]):
        raw = data[1 + i * LINK_LEN : 1 + (i + 1) * LINK_LEN]
        magic, node_key, rotation_key, seq, signer = _LINK_BODY.unpack_from(raw)
        if magic != LINK_MAGIC:
            raise LockError("malformed node-key signature: bad magic")
        links.append(Link(node_key, rotation_key, seq, signer, raw[_LINK_BODY.size :]))
    return tuple(links)


@dataclass(frozen=True, slots=True)
class Verified:
    """A signature that verified: who vouched at the root, which key rotates the node, and its seq."""

    root: bytes
    rotation_key: bytes
    signer: bytes  # the last link's signer
    seq: int


def verify_signature(data: bytes, node_key: bytes, trusted: frozenset[bytes]) -> Verified:
    """Check that ``data`` vouches for ``node_key`` under ``trusted``; LockError naming the failing link."""
    links = decode_chain(data)
    if links[0].signer not in trusted:
        raise LockError("node-key signature: its root is not a trusted signing key")
    for i, link in enumerate(links):
        if i and link.signer != links[i - 1].rotation_key:
            raise LockError(f"node-key signature: link {i + 1} is not signed by the key link {i} authorises")
        if i < len(links) - 1 and link.rotation_key == ZERO:
            raise LockError(f"node-key signature: link {i + 1} authorises no further link")
        if not _verify(link.signer, link.signature, NODEKEY_DOMAIN + link.body()):
            raise LockError(f"node-key signature: link {i + 1} does not verify")
    last = links[-1]
    if last.node_key == ZERO:
        raise LockError("node-key signature: it is a credential and vouches for no WireGuard key")
    if last.node_key != node_key:
        raise LockError("node-key signature: it vouches for another WireGuard key")
    return Verified(links[0].signer, last.rotation_key, last.signer, last.seq)


def sign_direct(lock_key: SigningKey, node_key: bytes, rotation_key: bytes) -> bytes:
    """An admin's signature of a node (its WireGuard key and its rotation key)."""
    return encode_chain([make_link(lock_key, node_key, rotation_key)])


def sign_credential(lock_key: SigningKey, credential_key: bytes) -> bytes:
    """An admin's signature of a credential key (a pre-signed auth key carries its private half)."""
    return encode_chain([make_link(lock_key, ZERO, credential_key)])


@dataclass(frozen=True)
class Credential:
    """What a pre-signed auth key carries: the credential's private key, the lock's genesis (so a node
    joining a locked mesh accepts only that lock's log) and the admin's signature of the credential."""

    key: SigningKey = field(repr=False)
    genesis: bytes
    chain: bytes = field(repr=False)

    def text(self) -> str:
        return _b64url(self.key.raw() + self.genesis + self.chain)

    @classmethod
    def from_text(cls, text: str) -> Credential:
        size = KEY_LEN + HASH_LEN + 1 + LINK_LEN
        raw = _unb64url(text, size, "lock credential")
        cred = cls(
            SigningKey.from_raw(raw[:KEY_LEN]), raw[KEY_LEN : KEY_LEN + HASH_LEN], raw[KEY_LEN + HASH_LEN :]
        )
        links = decode_chain(cred.chain)
        if links[0].rotation_key != cred.key.public() or links[0].node_key != ZERO:
            raise LockError("invalid lock credential: its signature is for another key")
        return cred


def join_with_credential(cred: Credential, node_key: bytes, rotation_key: bytes) -> bytes:
    """A node's signature at join: the credential's chain plus a link, by the credential key, for its keys."""
    return encode_chain([*decode_chain(cred.chain), make_link(cred.key, node_key, rotation_key)])


def rotate(chain: bytes, rotation_key: SigningKey, new_node_key: bytes) -> bytes:
    """The signature for a rotated WireGuard key, made by the node's own rotation key.

    A chain whose last link the rotation key signed itself (an earlier rotation) has that link replaced,
    with seq + 1; otherwise one link is appended with seq 1. LockError if ``rotation_key`` is not the key
    the chain authorises.
    """
    links = decode_chain(chain)
    pub = rotation_key.public()
    if links[-1].rotation_key != pub:
        raise LockError("this node's rotation key is not the one its signature authorises")
    if links[-1].signer == pub and len(links) > 1:
        base, seq = links[:-1], links[-1].seq + 1
    else:
        base, seq = links, 1
    return encode_chain([*base, make_link(rotation_key, new_node_key, pub, seq)])


def format_request(node_key: bytes, rotation_key: bytes) -> str:
    """What a node shows for an admin to sign: ``nodekey:<base64url(node key ‖ rotation key)>``."""
    return REQUEST_PREFIX + _b64url(node_key + rotation_key)


def parse_request(text: str) -> tuple[bytes, bytes]:
    if not text.startswith(REQUEST_PREFIX):
        raise LockError(
            f"invalid signing request {text[:20]!r}…: expected {REQUEST_PREFIX}… as `ghostctl lock status` "
            "prints it on the node"
        )
    raw = _unb64url(text[len(REQUEST_PREFIX) :], 2 * KEY_LEN, "signing request")
    return raw[:KEY_LEN], raw[KEY_LEN:]


class Verifier:
    """Verifies peers' signatures under one trusted set, remembering verdicts (Ed25519 costs ~0.1 ms and a
    full map re-sends every peer). Bounded: the memo is dropped whole when it reaches ``MAX_MEMO``."""

    MAX_MEMO = 65536

    def __init__(self, trusted: frozenset[bytes]) -> None:
        self.trusted = trusted
        self._memo: dict[tuple[bytes, bytes], Verified | str] = {}

    def check(self, data: bytes, node_key: bytes) -> Verified | str:
        """The verified signature, or the reason it was refused."""
        memo_key = (data, node_key)
        hit = self._memo.get(memo_key)
        if hit is not None:
            return hit
        if len(self._memo) >= self.MAX_MEMO:
            self._memo.clear()
        verdict: Verified | str
        if not data:
            verdict = "unsigned"
        else:
            try:
                verdict = verify_signature(data, node_key, self.trusted)
            except LockError as exc:
                verdict = str(exc)
        self._memo[memo_key] = verdict
        return verdict
