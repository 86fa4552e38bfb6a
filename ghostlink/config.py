"""ghostlink's configuration schema: frozen dataclasses loaded by ``ghostcore.config.load``.

Precedence is defaults < TOML file < environment (``GHOSTLINK_<TABLE>_<KEY>``) < command-line flags.
Validation beyond types (interface name length, port range, backend names, host:port) lives in the
``__post_init__`` of each table and raises ``ConfigError`` naming the key path.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ghostcore.addr import AddressError, HostPort, parse_prefix, split_hostport
from ghostcore.config import MetricsConfig, duration, load
from ghostcore.errors import ConfigError, InvalidArgument
from ghostcore.joinkey import parse_pin
from ghostcore.logsetup import LogConfig

ENV_PREFIX = "GHOSTLINK"
BACKENDS = ("auto", "kernel", "wireguard-go")
# Linux IFNAMSIZ is 16 including the terminating NUL (include/uapi/linux/if.h).
IFNAME_MAX = 15


def check_server(text: str) -> HostPort:
    """``node.server``: ``host:port`` or ``[v6]:port`` with a port to connect to (1..65535), parsed by
    :func:`ghostcore.addr.split_hostport`; ConfigError otherwise."""
    try:
        host, port = split_hostport(text, "node.server")
    except AddressError:
        host, port = "", 0
    if port == 0:
        raise ConfigError(
            f"node.server: {text!r} is not host:port; use e.g. 203.0.113.1:7777 or [2001:db8::1]:7777"
        )
    return host, port


def validate_ifname(name: str, where: str = "wireguard.interface") -> str:
    # the kernel's rule (dev_valid_name: no '/', ':' or whitespace); also what keeps a name one word in
    # the line-based scripts ghostlink hands to `ip -batch` and `nft -f`
    bad = any(c in "/:" or c.isspace() for c in name)
    if not name or len(name) > IFNAME_MAX or bad or name in (".", ".."):
        raise ConfigError(
            f"{where}: {name!r} is not a valid interface name; use 1-{IFNAME_MAX} characters "
            "without '/', ':' or spaces"
        )
    return name


@dataclass(frozen=True)
class NodeConfig:
    server: str = ""  # host:port of ghostmesh; empty until join (or taken from the saved state)
    hostname: str = field(default_factory=socket.gethostname)
    state_dir: str = "/var/lib/ghostlink"
    key_rotation: float = duration(0.0)  # rotate the WireGuard key once it is this old (0: never)
    # Subnet routes this node offers as a router (ghostmesh approves them) and whether it offers itself
    # as an exit node; reported whole with every status report.
    advertise_routes: list[str] = field(default_factory=list)
    advertise_exit_node: bool = False
    exit_node: str = ""  # name of the peer to send all internet traffic through ("": none)
    # Install the subnet routes peers offer (as `tailscale up --accept-routes`); off: peers' own addresses
    # (and the chosen exit node's default routes) only.
    accept_routes: bool = False
    # The server's TLS key, "sha256:…" (ghostcore.joinkey), when the auth key does not carry it (an OIDC
    # join) or to trust a server whose key changed; saved at join and checked on every connection.
    pin: str = ""

    def __post_init__(self) -> None:
        for i, prefix in enumerate(self.advertise_routes):
            try:
                net = parse_prefix(prefix, "route")
            except AddressError as exc:
                raise ConfigError(exc.for_key(f"node.advertise_routes[{i}]")) from None
            if net.prefixlen == 0:
                raise ConfigError(f"node.advertise_routes[{i}]: use node.advertise_exit_node for {prefix}")
        if self.key_rotation < 0:
            raise ConfigError('node.key_rotation: must be 0 (off) or a positive duration such as "30d"')
        if self.server:
            check_server(self.server)
        if not self.state_dir:
            raise ConfigError("node.state_dir: must not be empty")
        if len(self.hostname) > 63:
            raise ConfigError("node.hostname: at most 63 characters")
        if self.pin:
            try:
                parse_pin(self.pin, "node.pin")
            except InvalidArgument as exc:
                raise ConfigError(str(exc)) from None


@dataclass(frozen=True)
class WireGuardConfig:
    interface: str = "ghost0"
    listen_port: int = 41641  # 0: let WireGuard pick a random port
    backend: str = "auto"
    wireguard_go: str = "wireguard-go"  # binary path or name on PATH
    mtu: int = 1280

    def __post_init__(self) -> None:
        validate_ifname(self.interface)
        if not 0 <= self.listen_port <= 65535:
            raise ConfigError(f"wireguard.listen_port: must be 0-65535, got {self.listen_port}")
        if self.backend not in BACKENDS:
            raise ConfigError(
                f"wireguard.backend: must be one of {', '.join(BACKENDS)}, got {self.backend!r}"
            )
        if not self.wireguard_go:
            raise ConfigError("wireguard.wireguard_go: must name the wireguard-go binary")
        # 1280 is the IPv6 minimum link MTU (RFC 8200 section 5); 65535 the largest a TUN takes.
        if not 1280 <= self.mtu <= 65535:
            raise ConfigError(f"wireguard.mtu: must be 1280-65535, got {self.mtu}")


@dataclass(frozen=True)
class ControlConfig:
    socket: str = "/var/run/ghostlink/ghostlink.sock"
    reconnect_max: float = duration(30.0)
    connect_timeout: float = duration(5.0)
    # Without a pin, ghostmesh's certificate must chain to a CA: these (a PEM file), else the system's.
    ca_file: str = ""

    def __post_init__(self) -> None:
        if not self.socket:
            raise ConfigError("control.socket: must not be empty")
        if self.reconnect_max <= 0:
            raise ConfigError("control.reconnect_max: must be positive")
        if self.connect_timeout <= 0:
            raise ConfigError("control.connect_timeout: must be positive")


@dataclass(frozen=True)
class TraversalConfig:
    # Ask the gateway to map WireGuard's port (PCP, NAT-PMP, UPnP IGD) and offer the mapped endpoint.
    port_mapping: bool = True


@dataclass(frozen=True)
class DnsConfig:
    # Point the host's resolver (systemd-resolved, or /etc/resolv.conf) at the node resolver while the
    # map carries DNS settings, as `tailscale up --accept-dns`; off: the resolver at 100.100.100.100
    # still answers, but the host is left alone.
    accept: bool = True


@dataclass(frozen=True)
class LinkConfig:
    node: NodeConfig = field(default_factory=NodeConfig)
    wireguard: WireGuardConfig = field(default_factory=WireGuardConfig)
    control: ControlConfig = field(default_factory=ControlConfig)
    log: LogConfig = field(default_factory=LogConfig)
    traversal: TraversalConfig = field(default_factory=TraversalConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    dns: DnsConfig = field(default_factory=DnsConfig)


def load_config(
    path: Path | None,
    *,
    environ: dict[str, str] | None = None,
    flags: dict[str, Any] | None = None,
) -> LinkConfig:
    """Load ghostlink's config; ``flags`` maps dotted keys (``"node.server"``) to values (None = unset)."""
    return load(LinkConfig, path, env_prefix=ENV_PREFIX, environ=environ, flags=flags)
