"""How a relay (ghostgate) proves itself to ghostmesh when it watches the nodes allowed on the relays. PURE.

The watch (``proto/ghostmesh/v1/relaycontrol.proto``, ``RelayControl.WatchNodes``) runs over ghostmesh's TLS
port: the gate trusts ghostmesh by its pinned TLS key (:mod:`ghostcore.tlschannel`, the pin format of
:mod:`ghostcore.joinkey`) or by a CA, and ghostmesh trusts the gate by the secret they share already, the
relay secret (ghostgate's ``turn.secret``, ghostmesh's ``relay.secret``; the one TURN REST and relay
tokens are minted with). The request carries::

    gate       the gate's name (NAME_RE): ghostmesh keeps one watch per name, a newer one replaces the older
    unix_time  the gate's clock in seconds: refused beyond MAX_SKEW either side of ghostmesh's
    nonce      NONCE_LEN random bytes, never used twice
    proof      HMAC-SHA256(secret, "ghostrelay-control-v1\\n" gate "\\n" unix_time "\\n" hex(nonce))

Why a nonce on top of the timestamp: a request recorded by someone who can read it (a TLS proxy an operator
put in front of ghostmesh, a mis-issued CA certificate when the gate trusts a CA) could otherwise be played
again within the minute, and each replay would end the real gate's watch (one per name). ghostmesh
remembers the nonces of proofs that verified while their timestamp is in the window (:class:`NonceGuard`,
bounded: at capacity it refuses instead of forgetting early). The proof is symmetric (ghostmesh could make
it too); that is fine because ghostmesh is the only party that checks it, and a gate learns nothing
secret from the answer (node keys and ids).

The domain tag differs from every other use of the secret (``ghostrelay-v1`` tokens, TURN REST passwords,
the derived relay keys), so no proof here is a valid credential anywhere else.
"""

from __future__ import annotations

import heapq
import hmac
import re
from hashlib import sha256

from ghostcore.errors import AuthError, InvalidArgument, Unavailable

TAG = b"ghostrelay-control-v1"
MAX_SKEW = 60  # seconds either side of ghostmesh's clock
NONCE_LEN = 16
PROOF_LEN = 32
NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")


class StaleRequest(AuthError):
    """The request's timestamp is outside the window (the gate's clock, or an old recording)."""


class BadProof(AuthError):
    """The proof does not verify: another secret, or a changed request."""


class Replayed(AuthError):
    """The nonce was used before within the window."""


def check_name(name: str, where: str = "gate name") -> str:
    """``name`` if it is a valid gate name; InvalidArgument naming ``where`` otherwise."""
    if not NAME_RE.fullmatch(name):
        raise InvalidArgument(
            f"{where}: expected 1 to 64 of A-Z a-z 0-9 . _ -, got {name[:70]!r}; pick another name"
        )
    return name


def proof(secret: bytes, gate: str, unix_time: int, nonce: bytes) -> bytes:
    """The proof a gate sends with ``WatchNodes`` (see the module docstring)."""
    msg = b"\n".join((TAG, gate.encode(), str(unix_time).encode(), nonce.hex().encode()))
    return hmac.new(secret, msg, sha256).digest()


def verify(secret: bytes, gate: str, unix_time: int, nonce: bytes, mac: bytes, *, now: float) -> None:
    """Check a request's proof against ``now`` (unix seconds); StaleRequest or BadProof (AuthErrors: one
    line, secret-free) if it fails.

    The clock is checked first so a stale request costs no HMAC; a wrong-sized nonce or proof is a bad proof.
    """
    skew = unix_time - now
    if abs(skew) > MAX_SKEW:
        raise StaleRequest(
            f"relay control: gate {gate}'s clock is {skew:+.0f} s off ghostmesh's (at most {MAX_SKEW} s "
            "either way); synchronise the clocks (NTP)"
        )
    want = proof(secret, gate, unix_time, nonce)
    if len(nonce) != NONCE_LEN or not hmac.compare_digest(want, mac):
        raise BadProof(
            f"relay control: bad proof from gate {gate}; its turn.secret must be ghostmesh's relay.secret"
        )


class NonceGuard:
    """Nonces of verified proofs, kept while their timestamp is within :data:`MAX_SKEW` of now, so each
    request is accepted once. Memory is bounded: with ``capacity`` live nonces a new request is refused
    (Unavailable, retry) rather than a nonce forgotten early, which would re-open a replay."""

    def __init__(self, capacity: int = 4096) -> None:
        self.capacity = capacity
        self._seen: set[bytes] = set()
        self._expiry: list[tuple[int, bytes]] = []

    def __len__(self) -> int:
        return len(self._seen)

    def admit(self, nonce: bytes, unix_time: int, now: float) -> None:
        """Remember ``nonce`` (call after :func:`verify`); Replayed if it was seen, Unavailable if full."""
        while self._expiry and self._expiry[0][0] < now - MAX_SKEW:
            self._seen.discard(heapq.heappop(self._expiry)[1])
        if nonce in self._seen:
            raise Replayed("relay control: this request was already used once (a replay); send a new nonce")
        if len(self._seen) >= self.capacity:
            raise Unavailable("relay control: too many gate requests in the last two minutes; retry shortly")
        self._seen.add(nonce)
        heapq.heappush(self._expiry, (unix_time, nonce))
