"""ghostmesh's configuration schema: ``ghostmesh.toml`` as frozen dataclasses.

Loaded with :func:`ghostcore.config.load` (defaults < file < ``GHOSTMESH_*`` environment < flags). Each
table's ``__post_init__`` validates values beyond their type and raises ``ConfigError`` naming the key
path. ``server.auth_method`` is ``"authkey"`` (pre-auth keys only) or ``"oidc"`` (nodes joining without an
auth key log in at the ``[oidc]`` provider, see :mod:`ghostmesh.oidc`; pre-auth keys keep working).
``server.acl_file`` names
the ACL policy (``acls.toml``, see :mod:`ghostmesh.policy`); a relative path is resolved against the
directory of the config file.

``[relay]`` is the relay map every node gets (:mod:`ghostmesh.relaymap`): ``[[relay.regions]]`` (ghostgates
or any STUN/TURN server), the path ``fallback`` order, and the shared ``secret`` (``secret_file``,
``GHOSTMESH_RELAY_SECRET``; the ghostgates' ``turn.secret``) that per-node TURN REST credentials and relay
tokens are minted with, valid for ``credential_lifetime``. The secret is kept out of every repr and message.
No regions: no relay map is sent.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ghostcore.config import FALLBACK_KINDS, build, check_fallback, duration, load, parse_hostport
from ghostcore.errors import ConfigError
from ghostcore.ipalloc import DEFAULT_IPV4_PREFIX, DEFAULT_IPV6_PREFIX, parse_prefix
from ghostcore.logsetup import LogConfig

ENV_PREFIX = "GHOSTMESH"
MIN_CREDENTIAL_LIFETIME = 60.0
MAX_REGION_ID = 2**32 - 1  # RelayRegion.id is a uint32


@dataclass(frozen=True)
class ServerConfig:
    bind: str = "0.0.0.0:7777"
    auth_method: str = "authkey"
    acl_file: str = ""
    admin_socket: str = "/var/run/ghostmesh/admin.sock"
    state_dir: str = "/var/lib/ghostmesh"
    max_message_bytes: int = 262144

    def __post_init__(self) -> None:
        parse_hostport(self.bind, "server.bind")
        if self.auth_method not in ("authkey", "oidc"):
            raise ConfigError(f'server.auth_method: expected "authkey" or "oidc", got {self.auth_method!r}')
        if not self.admin_socket:
            raise ConfigError("server.admin_socket: must be a file path for the root-only admin socket")
        if not self.state_dir:
            raise ConfigError("server.state_dir: must be a directory path")
        if not 1024 <= self.max_message_bytes <= 64 * 1024 * 1024:
            raise ConfigError(
                f"server.max_message_bytes: expected 1024..67108864, got {self.max_message_bytes}"
            )


@dataclass(frozen=True)
class DatabaseConfig:
    type: str = "sqlite"
    path: str = ""  # empty: <server.state_dir>/ghostmesh.db

    def __post_init__(self) -> None:
        if self.type != "sqlite":
            raise ConfigError(f'database.type: only "sqlite" is supported for now, got {self.type!r}')


@dataclass(frozen=True)
class NetworkConfig:
    ipv4_prefix: str = DEFAULT_IPV4_PREFIX
    ipv6_prefix: str = DEFAULT_IPV6_PREFIX

    def __post_init__(self) -> None:
        v4 = parse_prefix(self.ipv4_prefix, "network.ipv4_prefix")
        if not isinstance(v4, ipaddress.IPv4Network):
            raise ConfigError(f"network.ipv4_prefix: expected an IPv4 prefix, got {self.ipv4_prefix!r}")
        v6 = parse_prefix(self.ipv6_prefix, "network.ipv6_prefix")
        if not isinstance(v6, ipaddress.IPv6Network):
            raise ConfigError(f"network.ipv6_prefix: expected an IPv6 prefix, got {self.ipv6_prefix!r}")
        for where, net in (("network.ipv4_prefix", v4), ("network.ipv6_prefix", v6)):
            if net.num_addresses < 4:
                raise ConfigError(f"{where}: prefix {net} is too small to hand out node addresses")


@dataclass(frozen=True)
class NodesConfig:
    key_expiry: float = duration(180 * 86400.0)  # 0: never
    ephemeral_grace: float = duration(30.0)
    keepalive: int = 25  # seconds of WireGuard persistent keepalive nodes use with peers

    def __post_init__(self) -> None:
        if not 0 <= self.keepalive <= 65535:
            raise ConfigError(f"nodes.keepalive: expected 0..65535 seconds, got {self.keepalive}")


@dataclass(frozen=True)
class AuthKeysConfig:
    default_expiration: float = duration(3600.0)


@dataclass(frozen=True)
class MapperConfig:
    batch_delay: float = duration(0.05)

    def __post_init__(self) -> None:
        if self.batch_delay > 10:
            raise ConfigError(
                f"mapper.batch_delay: at most 10s (nodes wait this long for changes), got {self.batch_delay}"
            )


@dataclass(frozen=True)
class OidcConfig:
    """``[oidc]``: the OpenID provider nodes' users log in at (used when ``server.auth_method = "oidc"``)."""

    issuer: str = ""  # e.g. "https://login.example.com"; discovery: <issuer>/.well-known/openid-configuration
    client_id: str = ""
    client_secret: str = field(default="", repr=False)  # never logged; or client_secret_file
    client_secret_file: str = ""
    scopes: list[str] = field(default_factory=lambda: ["openid", "profile", "email", "groups"])
    groups_claim: str = "groups"
    username_claim: str = "preferred_username"  # falls back to email, then sub
    http_bind: str = "0.0.0.0:7780"  # the callback listener
    public_url: str = ""  # how a browser reaches http_bind, e.g. "http://192.0.2.1:7780"
    login_timeout: float = duration(600.0)

    def __post_init__(self) -> None:
        parse_hostport(self.http_bind, "oidc.http_bind")
        for key in ("issuer", "public_url"):
            value = getattr(self, key)
            if value and not value.startswith(("http://", "https://")):
                raise ConfigError(f"oidc.{key}: expected an http(s):// URL, got {value!r}")
        if self.client_secret and self.client_secret_file:
            raise ConfigError(
                "oidc.client_secret_file: set either client_secret or client_secret_file, not both"
            )
        if "openid" not in self.scopes:
            raise ConfigError('oidc.scopes: must include "openid"')
        if not self.groups_claim or not self.username_claim:
            raise ConfigError("oidc.groups_claim / oidc.username_claim: must name a claim")
        if not 10 <= self.login_timeout <= 86400:
            raise ConfigError(f"oidc.login_timeout: expected 10s..24h, got {self.login_timeout}s")

    def secret(self) -> str:
        """The client secret, from ``client_secret_file`` when that is set (ConfigError if unreadable)."""
        if not self.client_secret_file:
            return self.client_secret
        try:
            return Path(self.client_secret_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(
                f"oidc.client_secret_file: cannot read {self.client_secret_file}: {exc.strerror}"
            ) from None


@dataclass(frozen=True)
class RegionConfig:
    """One ``[[relay.regions]]`` table, validated and with its port defaults resolved (:meth:`RelayConfig.
    region_list`): a ghostgate, or any STUN/TURN server such as coturn (``quic_port = 0, tcp_port = 0``).
    """

    id: int = 0  # > 0, unique
    name: str = ""  # unique, non-empty
    host: str = ""  # an IP address: nodes connect to it before any DNS could be trusted
    stun_port: int = 3478  # STUN + TURN over UDP (ghostgate's relay.listen port)
    quic_port: int = -1  # QUIC relay; unset (-1): stun_port + 1; 0: none
    tcp_port: int = -1  # relay over a TLS stream; unset (-1): stun_port; 0: none
    turn: bool = True  # the server does TURN with the map's REST credentials


def _region(table: Mapping[str, Any], where: str) -> RegionConfig:
    r = build(RegionConfig, table, where)
    if not 1 <= r.id <= MAX_REGION_ID:
        raise ConfigError(f"{where}.id: expected 1..{MAX_REGION_ID}, got {r.id}")
    if not r.name.strip():
        raise ConfigError(f"{where}.name: must not be empty")
    try:
        host = str(ipaddress.ip_address(r.host))
    except ValueError:
        raise ConfigError(f"{where}.host: expected an IP address, got {r.host!r}") from None
    if not 1 <= r.stun_port <= 65535:
        raise ConfigError(f"{where}.stun_port: expected 1..65535, got {r.stun_port}")
    quic = r.stun_port + 1 if r.quic_port == -1 else r.quic_port
    tcp = r.stun_port if r.tcp_port == -1 else r.tcp_port
    for key, value in (("quic_port", quic), ("tcp_port", tcp)):
        if not 0 <= value <= 65535:
            unset = " (its default, stun_port + 1; set it)" if getattr(r, key) == -1 else ""
            raise ConfigError(f"{where}.{key}: expected 0..65535 (0: none), got {value}{unset}")
    return replace(r, host=host, quic_port=quic, tcp_port=tcp)


@dataclass(frozen=True)
class RelayConfig:
    """``[relay]``: the relay map sent to nodes and the secret their credentials are minted with."""

    secret: str = field(default="", repr=False)  # never logged; or secret_file / GHOSTMESH_RELAY_SECRET
    secret_file: str = ""  # relative: to the config file's directory
    credential_lifetime: float = duration(86400.0)
    fallback: list[str] = field(default_factory=lambda: list(FALLBACK_KINDS))
    # Raw TOML tables: ghostcore.config has no list-of-tables type, so each is built and validated by
    # region_list() (bare ``dict`` because the loader checks list items with isinstance).
    regions: list[dict] = field(default_factory=list)  # type: ignore[type-arg]

    def __post_init__(self) -> None:
        if self.secret and self.secret_file:
            raise ConfigError("relay.secret_file: set either relay.secret or relay.secret_file, not both")
        if self.credential_lifetime < MIN_CREDENTIAL_LIFETIME:
            raise ConfigError(
                f"relay.credential_lifetime: at least 1m (nodes re-fetch credentials at 40% of it), "
                f"got {self.credential_lifetime}s"
            )
        check_fallback(self.fallback, "relay.fallback")
        self.region_list()  # validate the regions now, so a bad one names itself at load time

    def region_list(self) -> tuple[RegionConfig, ...]:
        """The ``[[relay.regions]]`` tables validated (ConfigError naming ``relay.regions[i].key``)."""
        out: list[RegionConfig] = []
        ids: set[int] = set()
        names: set[str] = set()
        for i, table in enumerate(self.regions):
            where = f"relay.regions[{i}]"
            region = _region(table, where)
            if region.id in ids:
                raise ConfigError(f"{where}.id: {region.id} is used by another region; ids must be unique")
            if region.name in names:
                raise ConfigError(f"{where}.name: {region.name!r} is used by another region; must be unique")
            ids.add(region.id)
            names.add(region.name)
            out.append(region)
        return tuple(out)

    def secret_bytes(self) -> bytes | None:
        """The shared relay secret; None when no regions are configured (no relay map is sent).

        ConfigError when regions are configured without a secret, or ``secret_file`` is unreadable / empty.
        """
        if not self.regions:
            return None
        if self.secret:
            return self.secret.encode()
        if not self.secret_file:
            raise ConfigError(
                "relay.secret: required with [[relay.regions]]; set relay.secret, relay.secret_file or "
                "GHOSTMESH_RELAY_SECRET to the ghostgates' turn.secret"
            )
        try:
            text = Path(self.secret_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"relay.secret_file: cannot read {self.secret_file}: {exc.strerror}") from None
        if not text:
            raise ConfigError(f"relay.secret_file: {self.secret_file} is empty")
        return text.encode()


@dataclass(frozen=True)
class MeshConfig:
    server: ServerConfig = field(default_factory=ServerConfig)
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    nodes: NodesConfig = field(default_factory=NodesConfig)
    authkeys: AuthKeysConfig = field(default_factory=AuthKeysConfig)
    mapper: MapperConfig = field(default_factory=MapperConfig)
    oidc: OidcConfig = field(default_factory=OidcConfig)
    relay: RelayConfig = field(default_factory=RelayConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def __post_init__(self) -> None:
        if self.server.auth_method == "oidc":
            for key in ("issuer", "client_id", "public_url"):
                if not getattr(self.oidc, key):
                    raise ConfigError(f'oidc.{key}: required when server.auth_method = "oidc"')

    @property
    def db_path(self) -> Path:
        if self.database.path:
            return Path(self.database.path)
        return Path(self.server.state_dir) / "ghostmesh.db"


def load_config(
    path: Path | None,
    *,
    environ: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> MeshConfig:
    """Load ``path`` (None: defaults only) with ``GHOSTMESH_*`` from ``environ`` (default os.environ)."""
    env = os.environ if environ is None else environ
    cfg = load(MeshConfig, path, env_prefix=ENV_PREFIX, environ=env, flags=flags)
    acl = cfg.server.acl_file
    if acl and path is not None and not Path(acl).is_absolute():  # relative to the config file
        cfg = replace(cfg, server=replace(cfg.server, acl_file=str(path.parent / acl)))
    secret_file = cfg.relay.secret_file
    if secret_file and path is not None and not Path(secret_file).is_absolute():
        cfg = replace(cfg, relay=replace(cfg.relay, secret_file=str(path.parent / secret_file)))
    cfg.relay.secret_bytes()  # regions without a secret, or an unreadable secret_file: refused at load
    return cfg
