"""ghostgate's configuration schema: ``ghostgate.toml`` as frozen dataclasses.

Loaded with :func:`ghostcore.config.load` (defaults < file < ``GHOSTGATE_*`` environment < flags).
``[relay]`` holds the spec's keys exactly (``listen``, ``use_quic``, ``fallback``); ``[turn]`` the TURN
server's (RFC 8656) settings. The TURN REST shared secret (``turn.secret`` or ``turn.secret_file``) is kept
out of every repr and message. What this build serves is told by :func:`served`: STUN always; with a secret,
TURN and the relay over a TLS stream (TCP ``relay.tcp_port``, default the listen port), and the QUIC relay
(UDP ``relay.quic_port``, default listen port + 1) when ``use_quic``; the relay shares the TURN secret with
ghostmesh. ``fallback`` is validated and reported; nodes follow the ``relay.fallback`` of ghostmesh, which
sends it in every relay map (a gate cannot tell nodes anything: it never sees the map).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ghostcore.config import FALLBACK_KINDS, check_fallback, duration, load, parse_hostport
from ghostcore.errors import ConfigError
from ghostcore.logsetup import LogConfig

ENV_PREFIX = "GHOSTGATE"
# RFC 8656 §6.2: the default allocation lifetime is 600 s and a server caps requests at 3600 s.
MAX_LIFETIME = 3600.0
# Loopback, "this network" and the unspecified addresses: relaying there would reach the relay host itself.
DEFAULT_DENIED = ["127.0.0.0/8", "0.0.0.0/8", "::1/128", "::/128", "::ffff:127.0.0.0/104"]


@dataclass(frozen=True)
class RelayConfig:
    listen: str = "0.0.0.0:3478"
    use_quic: bool = True
    fallback: list[str] = field(default_factory=lambda: list(FALLBACK_KINDS))
    quic_port: int = 0  # 0: listen port + 1 (QUIC short headers collide with TURN ChannelData on one port)
    tcp_port: int = 0  # 0: the listen port (TCP), for hosts where only TCP to the relay's port gets through
    cert_file: str = ""  # TLS certificate (PEM) for both relay transports; unset: self-signed at start
    key_file: str = ""

    def __post_init__(self) -> None:
        parse_hostport(self.listen, "relay.listen", ip_only=True)
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
        for net in self.denied_peers:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError:
                raise ConfigError(f"turn.denied_peers: expected a CIDR prefix, got {net!r}") from None


@dataclass(frozen=True)
class GateConfig:
    relay: RelayConfig = field(default_factory=RelayConfig)
    turn: TurnConfig = field(default_factory=TurnConfig)
    log: LogConfig = field(default_factory=LogConfig)


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
    # relay.fallback is the order nodes try paths in; nodes get it from ghostmesh's relay map, not from here.
    fallback = "/".join(cfg.relay.fallback) or "(empty)"
    missing.append(f"relay.fallback {fallback} (nodes follow ghostmesh's relay.fallback)")
    return serving, missing
