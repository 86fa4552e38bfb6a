"""The WireGuard cross-platform userspace API (UAPI) text protocol, sans-IO.

Spec: https://www.wireguard.com/xplatform/ ("Cross-platform Userspace Implementation", section
"Configuration Protocol"). A client writes one request to ``/var/run/wireguard/<ifname>.sock``:

* ``get=1\\n\\n`` -> the device's ``key=value`` lines, then ``errno=<n>\\n\\n``. Device keys come first
  (``private_key``, ``listen_port``, ``fwmark``); each ``public_key=`` line starts a peer, followed by its
  ``endpoint``, ``last_handshake_time_sec``/``_nsec``, ``rx_bytes``, ``tx_bytes``,
  ``persistent_keepalive_interval``, ``allowed_ip`` (repeated) and ``protocol_version`` lines.
* ``set=1\\n`` + ``key=value`` lines + an empty line -> ``errno=<n>\\n\\n``. Per peer, ``public_key=``
  opens the peer; ``remove=true`` deletes it; ``update_only=true`` changes it only if it exists;
  ``replace_allowed_ips=true`` then ``allowed_ip=`` lines set its allowed IPs; ``endpoint=`` and
  ``persistent_keepalive_interval=`` set those fields.

Keys are lowercase hex on this wire (the spec: "all keys are encoded in hex"); the rest of ghost* uses
base64, so this module converts at its edge.

Why this module exists rather than PyPI ``wireguard-tools``: that library sends ``replace_peers=true`` on
every update, which drops every peer and with it every session. We never send ``replace_peers``: each
request names only the peers that change, so an untouched peer keeps its handshake (a map change must
never reset the session of a peer it does not concern).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from ghostcore import addr
from ghostcore.errors import InvalidArgument, ProtocolError
from ghostcore.keys import PrivateKey, PublicKey

# A get response for a few thousand peers is a few hundred KiB; 16 MiB bounds a hostile/broken daemon.
MAX_RESPONSE = 16 * 1024 * 1024


class UapiError(ProtocolError):
    """WireGuard answered a request with a non-zero ``errno``."""

    def __init__(self, errno: int, what: str) -> None:
        super().__init__(f"WireGuard refused {what}: errno={errno}; check the interface's log")
        self.errno = errno


@dataclass(frozen=True)
class PeerChange:
    """One peer's part of a ``set=1`` request. ``None`` fields are left as WireGuard has them.

    ``create`` distinguishes a new peer (no ``update_only``) from a change to an existing one
    (``update_only=true``, so a change racing with a removal never resurrects the peer).
    """

    public_key: str  # base64
    remove: bool = False
    create: bool = False
    endpoint: str | None = None
    allowed_ips: tuple[str, ...] | None = None  # set: replace the peer's allowed IPs with exactly these
    keepalive: int | None = None


@dataclass(frozen=True)
class PeerState:
    """A peer as a ``get=1`` response describes it."""

    public_key: str  # base64
    endpoint: str | None = None
    last_handshake_sec: int = 0  # 0: never
    last_handshake_nsec: int = 0
    rx_bytes: int = 0
    tx_bytes: int = 0
    keepalive: int = 0
    allowed_ips: tuple[str, ...] = ()


@dataclass(frozen=True)
class DeviceState:
    """A device as a ``get=1`` response describes it (the private key is deliberately not kept)."""

    listen_port: int = 0
    fwmark: int = 0
    has_private_key: bool = False
    peers: dict[str, PeerState] = field(default_factory=dict)


def _key_hex(b64: str) -> str:
    return PublicKey.from_base64(b64).hex()


def _check_endpoint(ep: str) -> str:
    """The spec's ``endpoint=`` value: ``ghostcore.addr``'s strict canonical ``ip:port`` / ``[ip6]:port``.

    Strict because a value is a line of this protocol: a zone ID may hold a newline (and a new key), which
    would turn one field into another request. InvalidArgument otherwise.
    """
    addr.parse_endpoint(ep)
    return ep


def _check_prefix(p: str) -> str:
    """An ``allowed_ip=`` value: a canonical prefix (``ghostcore.addr``), else InvalidArgument."""
    addr.parse_prefix(p, "allowed IP")
    return p


def encode_set(
    peers: Iterable[PeerChange] = (),
    *,
    private_key: PrivateKey | None = None,
    listen_port: int | None = None,
) -> bytes:
    """A ``set=1`` request changing exactly what is given. Never emits ``replace_peers``."""
    lines = ["set=1"]
    if private_key is not None:
        lines.append(f"private_key={private_key.hex()}")
    if listen_port is not None:
        if not 0 <= listen_port <= 65535:
            raise InvalidArgument(f"invalid listen port {listen_port}: expected 0-65535")
        lines.append(f"listen_port={listen_port}")
    for p in peers:
        lines.append(f"public_key={_key_hex(p.public_key)}")
        if p.remove:
            lines.append("remove=true")
            continue
        if not p.create:
            lines.append("update_only=true")
        if p.endpoint is not None:
            lines.append(f"endpoint={_check_endpoint(p.endpoint)}")
        if p.keepalive is not None:
            if not 0 <= p.keepalive <= 65535:
                raise InvalidArgument(f"invalid keepalive {p.keepalive}: expected 0-65535 seconds")
            lines.append(f"persistent_keepalive_interval={p.keepalive}")
        if p.allowed_ips is not None:
            lines.append("replace_allowed_ips=true")
            lines.extend(f"allowed_ip={_check_prefix(a)}" for a in p.allowed_ips)
    return ("\n".join(lines) + "\n\n").encode("ascii")


GET_REQUEST = b"get=1\n\n"


def _pairs(text: str) -> list[tuple[str, str]]:
    out = []
    for line in text.split("\n"):
        if not line:
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise ProtocolError(f"malformed UAPI line {line[:40]!r}: expected key=value")
        out.append((key, value))
    return out


def _int(key: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ProtocolError(f"malformed UAPI value for {key}: expected an integer") from None


def _b64(hex_key: str) -> str:
    try:
        return PublicKey.from_hex(hex_key).base64()
    except InvalidArgument:
        raise ProtocolError("malformed UAPI public_key: expected 64 hex digits") from None


def check_errno(text: str, what: str) -> None:
    """Raise UapiError unless ``text`` ends in ``errno=0`` (the spec's last line of every response)."""
    pairs = _pairs(text)
    if not pairs or pairs[-1][0] != "errno":
        raise ProtocolError(f"WireGuard's answer to {what} has no errno line; is this a UAPI socket?")
    errno = _int("errno", pairs[-1][1])
    if errno != 0:
        raise UapiError(errno, what)


def parse_get(text: str) -> DeviceState:
    """Parse a ``get=1`` response (including its ``errno=`` line) into a DeviceState."""
    check_errno(text, "get")
    listen_port = fwmark = 0
    has_private = False
    peers: dict[str, PeerState] = {}
    cur: dict[str, object] | None = None
    allowed: list[str] = []

    def flush() -> None:
        if cur is not None:
            cur["allowed_ips"] = tuple(allowed)
            ps = PeerState(**cur)  # type: ignore[arg-type]
            peers[ps.public_key] = ps

    for key, value in _pairs(text)[:-1]:
        if key == "public_key":
            flush()
            cur, allowed = {"public_key": _b64(value)}, []
        elif cur is None:
            if key == "listen_port":
                listen_port = _int(key, value)
            elif key == "fwmark":
                fwmark = _int(key, value)
            elif key == "private_key":
                has_private = bool(value.strip("0"))
            # Unknown device keys are skipped: the spec lets implementations add keys.
        elif key == "endpoint":
            cur["endpoint"] = value or None
        elif key == "last_handshake_time_sec":
            cur["last_handshake_sec"] = _int(key, value)
        elif key == "last_handshake_time_nsec":
            cur["last_handshake_nsec"] = _int(key, value)
        elif key == "rx_bytes":
            cur["rx_bytes"] = _int(key, value)
        elif key == "tx_bytes":
            cur["tx_bytes"] = _int(key, value)
        elif key == "persistent_keepalive_interval":
            cur["keepalive"] = _int(key, value)
        elif key == "allowed_ip":
            allowed.append(value)
        # preshared_key, protocol_version and future keys: not needed by ghost*.
    flush()
    return DeviceState(listen_port=listen_port, fwmark=fwmark, has_private_key=has_private, peers=peers)


def encode_get_response(dev: DeviceState) -> bytes:
    """A ``get=1`` response for ``dev`` (what wireguard-go would answer): used by fakes and tests."""
    lines = [f"listen_port={dev.listen_port}"]
    if dev.fwmark:
        lines.append(f"fwmark={dev.fwmark}")
    for p in dev.peers.values():
        lines.append(f"public_key={_key_hex(p.public_key)}")
        if p.endpoint:
            lines.append(f"endpoint={p.endpoint}")
        lines += [
            f"last_handshake_time_sec={p.last_handshake_sec}",
            f"last_handshake_time_nsec={p.last_handshake_nsec}",
            f"tx_bytes={p.tx_bytes}",
            f"rx_bytes={p.rx_bytes}",
            f"persistent_keepalive_interval={p.keepalive}",
        ]
        lines.extend(f"allowed_ip={a}" for a in p.allowed_ips)
        lines.append("protocol_version=1")
    lines.append("errno=0")
    return ("\n".join(lines) + "\n\n").encode("ascii")


def parse_set(text: str) -> tuple[int | None, list[PeerChange]]:
    """Decode a ``set=1`` request into (listen_port, peer changes): the inverse of ``encode_set``.

    Used by tests and by the in-memory fake to check what would reach WireGuard. ``replace_peers``
    is rejected on purpose: nothing in ghost* may send it.
    """
    pairs = _pairs(text)
    if not pairs or pairs[0] != ("set", "1"):
        raise ProtocolError("a UAPI set request must start with set=1")
    listen_port: int | None = None
    changes: list[PeerChange] = []
    cur: dict[str, object] | None = None
    allowed: list[str] | None = None

    def flush() -> None:
        if cur is not None:
            if allowed is not None:
                cur["allowed_ips"] = tuple(allowed)
            changes.append(PeerChange(**cur))  # type: ignore[arg-type]

    for key, value in pairs[1:]:
        if key == "replace_peers":
            raise ProtocolError("replace_peers resets every session; ghost* never sends it")
        if key == "public_key":
            flush()
            cur, allowed = {"public_key": _b64(value), "create": True}, None
        elif cur is None:
            if key == "listen_port":
                listen_port = _int(key, value)
        elif key == "remove":
            cur["remove"] = value == "true"
            cur["create"] = False
        elif key == "update_only":
            cur["create"] = value != "true"
        elif key == "endpoint":
            cur["endpoint"] = value
        elif key == "persistent_keepalive_interval":
            cur["keepalive"] = _int(key, value)
        elif key == "replace_allowed_ips":
            allowed = []
        elif key == "allowed_ip":
            if allowed is None:
                allowed = []
            allowed.append(value)
    flush()
    return listen_port, changes


def apply_changes(dev: DeviceState, changes: Sequence[PeerChange]) -> DeviceState:
    """What a device looks like after ``changes`` (the spec's semantics), for fakes and tests."""
    peers = dict(dev.peers)
    for c in changes:
        old = peers.get(c.public_key)
        if c.remove:
            peers.pop(c.public_key, None)
            continue
        if old is None:
            if not c.create:
                continue  # update_only=true on an unknown peer is a no-op (spec)
            old = PeerState(public_key=c.public_key)
        peers[c.public_key] = PeerState(
            public_key=c.public_key,
            endpoint=c.endpoint if c.endpoint is not None else old.endpoint,
            last_handshake_sec=old.last_handshake_sec,
            last_handshake_nsec=old.last_handshake_nsec,
            rx_bytes=old.rx_bytes,
            tx_bytes=old.tx_bytes,
            keepalive=c.keepalive if c.keepalive is not None else old.keepalive,
            allowed_ips=c.allowed_ips if c.allowed_ips is not None else old.allowed_ips,
        )
    return DeviceState(
        listen_port=dev.listen_port, fwmark=dev.fwmark, has_private_key=dev.has_private_key, peers=peers
    )
