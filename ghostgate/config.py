"""ghostgate's configuration schema: ``ghostgate.toml`` as frozen dataclasses.

Loaded with :func:`ghostcore.config.load` (defaults < file < ``GHOSTGATE_*`` environment < flags). ``[relay]``
holds the UDP listen address, the relay transports' ports and certificate, ``use_quic`` and ``fallback``;
``[turn]`` the TURN server's (RFC 8656) settings. The TURN REST shared secret (``turn.secret`` or
``turn.secret_file``) is kept out of every repr and message. What this build serves is told by :func:`served`:
STUN always; with a secret, TURN and the relay over a TLS stream (TCP ``relay.tcp_port``, default the listen
port), and the QUIC relay (UDP ``relay.quic_port``, default listen port + 1) when ``use_quic``; the relay
shares the TURN secret with ghostmesh. ``fallback`` is validated and reported; nodes follow the
``relay.fallback`` of ghostmesh, which sends it in every relay map (a gate cannot tell nodes anything: it
never sees the map). ``[control]`` (optional) names the ghostmesh this gate learns revocations from
(:mod:`ghostgate.control`): its address, how to trust its TLS certificate (a pin, or CAs) and this gate's
name; without it the gate works as before and a deleted node's relay access ends only when its credentials
expire.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ghostcore import relaycontrol, relaywire, tlscert
from ghostcore.addr import AddressError, normalize_prefix
from ghostcore.config import FALLBACK_KINDS, MetricsConfig, check_fallback, duration, load, parse_hostport
from ghostcore.errors import ConfigError, InvalidArgument
from ghostcore.joinkey import parse_pin
from ghostcore.logsetup import LogConfig

ENV_PREFIX = "GHOSTGATE"
# RFC 8656 §6.2: the default allocation lifetime is 600 s and a server caps requests at 3600 s.
MAX_LIFETIME = 3600.0
# Peers a TURN client may not reach through the relay unless an operator opens them (turn.allowed_peers):
# the relay host itself (loopback, "this network", unspecified), the private networks behind it (RFC 1918,
# RFC 4193 unique local, link-local, which holds the cloud metadata service 169.254.169.254 (and
# fd00:ec2::254 is unique local), the carrier-grade NAT range 100.64.0.0/10 that is also the mesh's own
# overlay), and multicast and broadcast. IPv4-mapped IPv6 peers are checked as IPv4 (turn_core.is_denied).
DEFAULT_DENIED = [
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
    "192.168.0.0/16", "224.0.0.0/4", "240.0.0.0/4", "255.255.255.255/32",
    "::/128", "::1/128", "fc00::/7", "fe80::/10", "ff00::/8",
]  # fmt: skip
SELF_SIGNED_NAME = "ghostgate"  # the relay's self-signed certificate names no host: nodes check its pin


@dataclass(frozen=True)
class RelayConfig:
    listen: str = "0.0.0.0:3478"
    use_quic: bool = True
    fallback: list[str] = field(default_factory=lambda: list(FALLBACK_KINDS))
    quic_port: int = 0  # 0: listen port + 1 (QUIC short headers collide with TURN ChannelData on one port)
    tcp_port: int = 0  # 0: the listen port (TCP), for hosts where only TCP to the relay's port gets through
    cert_file: str = ""  # TLS certificate (PEM) for both relay transports; unset: self-signed at start
    key_file: str = ""
    # Open relay connections (QUIC and TLS together) in all and from one source address; beyond either a
    # new connection is closed at once, before any handshake (ghostgate.relay_hub.Admission).
    max_connections: int = 10_000
    max_connections_per_source: int = 16
    quic_retry: bool = True  # validate QUIC clients' addresses with a Retry token (RFC 9000 section 8.1.2)

    def __post_init__(self) -> None:
        parse_hostport(self.listen, "relay.listen", ip_only=True)
        for name in ("max_connections", "max_connections_per_source"):
            if getattr(self, name) < 1:
                raise ConfigError(f"relay.{name}: must be at least 1, got {getattr(self, name)}")
        for name in ("quic_port", "tcp_port"):
            if not 0 <= getattr(self, name) <= 65535:
                raise ConfigError(f"relay.{name}: expected 0..65535, got {getattr(self, name)}")
        if bool(self.cert_file) != bool(self.key_file):
            raise ConfigError("relay: set cert_file and key_file together (neither: a self-signed cert)")
        check_fallback(self.fallback, "relay.fallback")


@dataclass(frozen=True)
class TurnConfig:
    secret: str = field(default="", repr=False)
    secret_file: str = ""
    realm: str = "ghostmesh"
    max_allocations: int = 1000
    max_allocations_per_user: int = 10
    default_lifetime: float = duration(600.0)
    relay_address: str = ""
    denied_peers: list[str] = field(default_factory=lambda: list(DEFAULT_DENIED))
    allowed_peers: list[str] = field(default_factory=list)  # opened on purpose inside denied_peers

    def __post_init__(self) -> None:
        if self.secret and self.secret_file:
            raise ConfigError("turn: set secret or secret_file, not both")
        if not self.realm:
            raise ConfigError("turn.realm: must not be empty")
        if self.max_allocations < 1:
            raise ConfigError(f"turn.max_allocations: must be at least 1, got {self.max_allocations}")
        if self.max_allocations_per_user < 1:
            raise ConfigError(
                f"turn.max_allocations_per_user: must be at least 1, got {self.max_allocations_per_user}"
            )
        if not 1 <= self.default_lifetime <= MAX_LIFETIME:
            raise ConfigError(
                f"turn.default_lifetime: must be 1s..1h (RFC 8656 §6.2), got {self.default_lifetime}s"
            )
        if self.relay_address:
            try:
                ipaddress.ip_address(self.relay_address)
            except ValueError:
                raise ConfigError(
                    f"turn.relay_address: expected an IP address, got {self.relay_address!r}"
                ) from None
        for key in ("denied_peers", "allowed_peers"):
            for net in getattr(self, key):
                try:
                    normalize_prefix(net, "prefix", host_bits=True)
                except AddressError as exc:
                    raise ConfigError(exc.for_key(f"turn.{key}")) from None


MAX_RECONNECT = 300.0


@dataclass(frozen=True)
class ControlConfig:
    """``[control]``: the ghostmesh this gate watches for the nodes allowed on it (unset ``server``: none)."""

    server: str = ""  # ghostmesh's server.bind as this gate reaches it, host:port
    pin: str = ""  # sha256:… of ghostmesh's TLS key (`ghostctl server pin`); else CAs check its certificate
    ca_file: str = ""  # CAs for a [tls] cert_file certificate of ghostmesh; unset: the system's
    name: str = ""  # this gate's name at ghostmesh (one watch per name); unset: the host name
    reconnect_max: float = duration(10.0)  # the ceiling of the jittered backoff between watch attempts

    def __post_init__(self) -> None:
        if not self.server:
            for key in ("pin", "ca_file", "name"):
                if getattr(self, key):
                    raise ConfigError(f"control.{key}: set control.server too (or remove [control])")
            return
        if parse_hostport(self.server, "control.server")[1] == 0:
            raise ConfigError(f"control.server: expected ghostmesh's host:port, not port 0: {self.server!r}")
        if self.pin and self.ca_file:
            raise ConfigError("control: set pin or ca_file, not both (a pin trusts exactly one key)")
        try:
            if self.pin:
                parse_pin(self.pin, "control.pin")
            if self.name:
                relaycontrol.check_name(self.name, "control.name")
        except InvalidArgument as exc:
            raise ConfigError(str(exc)) from None
        if not 1.0 <= self.reconnect_max <= MAX_RECONNECT:
            raise ConfigError(f"control.reconnect_max: must be 1s..5m, got {self.reconnect_max}s")


@dataclass(frozen=True)
class GateConfig:
    relay: RelayConfig = field(default_factory=RelayConfig)
    turn: TurnConfig = field(default_factory=TurnConfig)
    control: ControlConfig = field(default_factory=ControlConfig)
    log: LogConfig = field(default_factory=LogConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)


def load_config(
    path: Path | None, *, environ: Mapping[str, str] | None = None, flags: Mapping[str, Any] | None = None
) -> GateConfig:
    cfg = load(GateConfig, path, env_prefix=ENV_PREFIX, environ=environ, flags=flags)
    if path is None:
        return cfg

    def near(p: str) -> str:
        # A relative file is next to the config file, not wherever the daemon was started.
        return str(path.resolve().parent / p) if p and not Path(p).is_absolute() else p

    return replace(
        cfg,
        turn=replace(cfg.turn, secret_file=near(cfg.turn.secret_file)),
        relay=replace(cfg.relay, cert_file=near(cfg.relay.cert_file), key_file=near(cfg.relay.key_file)),
        control=replace(cfg.control, ca_file=near(cfg.control.ca_file)),
    )


def turn_secret(cfg: GateConfig) -> bytes | None:
    """The TURN REST shared secret, or None when TURN is not configured. Never logged."""
    if cfg.turn.secret:
        return cfg.turn.secret.encode()
    if not cfg.turn.secret_file:
        return None
    try:
        text = Path(cfg.turn.secret_file).read_text().strip()
    except OSError as exc:
        raise ConfigError(f"turn.secret_file: cannot read {cfg.turn.secret_file}: {exc.strerror}") from None
    if not text:
        raise ConfigError(f"turn.secret_file: {cfg.turn.secret_file} is empty")
    return text.encode()


def control_name(cfg: GateConfig, hostname: str) -> str:
    """This gate's name at ghostmesh: ``control.name``, else ``hostname``; ConfigError if not a valid name."""
    name = cfg.control.name or hostname
    try:
        return relaycontrol.check_name(name, "control.name (default: the host name)")
    except InvalidArgument as exc:
        raise ConfigError(str(exc)) from None


def check_control(cfg: GateConfig, secret: bytes | None) -> None:
    """``[control]`` needs the shared secret (its proof is made with it) and a readable ``ca_file``."""
    if not cfg.control.server:
        return
    if secret is None:
        raise ConfigError(
            "control.server: needs turn.secret or turn.secret_file (the proof ghostmesh checks is made with "
            "the relay secret); set one or remove [control]"
        )
    if cfg.control.ca_file and not Path(cfg.control.ca_file).is_file():
        raise ConfigError(f"control.ca_file: {cfg.control.ca_file} is not a readable file")


def relay_cert(cfg: GateConfig, secret: bytes) -> tlscert.CertPair:
    """The relay transports' certificate: ``relay.cert_file`` / ``relay.key_file`` when set (errors name
    those keys), else a self-signed one made now for the key derived from the shared secret
    (``relaywire.relay_tls_seed``): the same on every start and every gate of the mesh, so ghostmesh,
    which holds the secret too, puts its pin in the relay map and nodes refuse any other."""
    if cfg.relay.cert_file:
        return tlscert.load(cfg.relay.cert_file, cfg.relay.key_file, where="relay")
    key = tlscert.derived_key(relaywire.relay_tls_seed(secret))
    return tlscert.self_signed(SELF_SIGNED_NAME, key=key)


def relay_host(cfg: GateConfig, secret: bytes | None) -> str:
    """The IP relayed sockets bind to and that Allocate responses advertise (XOR-RELAYED-ADDRESS)."""
    host = cfg.turn.relay_address or parse_hostport(cfg.relay.listen, "relay.listen", ip_only=True)[0]
    if secret is not None and ipaddress.ip_address(host).is_unspecified:
        raise ConfigError(
            f"turn.relay_address: required when relay.listen is {cfg.relay.listen} and TURN is on "
            "(clients are told this address); set the relay's public IP"
        )
    return host


def relay_ports(cfg: GateConfig) -> tuple[int, int]:
    """(QUIC relay UDP port, TLS relay TCP port); 0 means an ephemeral port (when the listen port is 0)."""
    port = parse_hostport(cfg.relay.listen, "relay.listen", ip_only=True)[1]
    quic = cfg.relay.quic_port or (port + 1 if port else 0)
    if quic > 65535:
        raise ConfigError(f"relay.quic_port: listen port {port} + 1 is not a port; set relay.quic_port")
    return quic, cfg.relay.tcp_port or port


def served(
    cfg: GateConfig, secret: bytes | None, ports: tuple[int, int] | None = None
) -> tuple[list[str], list[str]]:
    """(what this build serves, what the config asks for that it does not), for the startup line.

    ``ports`` (QUIC, TCP) are the bound ports when running; default: the configured ones.
    """
    quic_port, tcp_port = ports or relay_ports(cfg)
    serving = ["stun"]
    missing = []
    if secret is None:
        missing.append("turn (no turn.secret or turn.secret_file)")
        missing.append("relay (no turn.secret or turn.secret_file: the relay shares the TURN secret)")
    else:
        serving.append("turn")
        if cfg.relay.use_quic:
            serving.append(f"quic relay udp/{quic_port}")
        serving.append(f"tls relay tcp/{tcp_port}")
    if cfg.control.server and secret is not None:
        serving.append(f"revocations from {cfg.control.server}")
    # relay.fallback is the order nodes try paths in; nodes get it from ghostmesh's relay map, not from here.
    fallback = "/".join(cfg.relay.fallback) or "(empty)"
    missing.append(f"relay.fallback {fallback} (nodes follow ghostmesh's relay.fallback)")
    return serving, missing
