"""ghostmesh's configuration schema: ``ghostmesh.toml`` as frozen dataclasses.

Loaded with :func:`ghostcore.config.load` (defaults < file < ``GHOSTMESH_*`` environment < flags). Each
table's ``__post_init__`` validates values beyond their type and raises ``ConfigError`` naming the key
path. ``server.auth_method`` is ``"authkey"`` (pre-auth keys only) or ``"oidc"`` (nodes joining without an
auth key log in at the ``[oidc]`` provider, see :mod:`ghostmesh.oidc`; pre-auth keys keep working).
``server.acl_file`` names
the ACL policy (``acls.toml``, see :mod:`ghostcore.policy`); a relative path is resolved against the
directory of the config file.

``[relay]`` is the relay map every node gets (:mod:`ghostmesh.relaymap`): ``[[relay.regions]]`` (ghostgates
or any STUN/TURN server), the path ``fallback`` order, and the shared ``secret`` (``secret_file``,
``GHOSTMESH_RELAY_SECRET``; the ghostgates' ``turn.secret``) that per-node TURN REST credentials and relay
tokens are minted with, valid for ``credential_lifetime``. The secret is kept out of every repr and message.
No regions: no relay map is sent.

``[tls]`` names the certificate chain and key the TCP port serves (``cert_file``, ``key_file``: both or
neither; relative paths are resolved against the config file's directory). Without them ghostmesh makes
and keeps its own self-signed certificate (:mod:`ghostmesh.tls`); nodes and remote admins trust it by
its pin.

``[limits]`` bounds what one node, one source address or all callers together may cost the server
(:mod:`ghostmesh.limits`); ``[audit]`` sets the audit log's ``retention`` and where its signing key lives
(``key_file``, relative to the config file's directory; default ``<server.state_dir>/audit.key``).
``oidc.max_pending`` / ``max_pending_per_source`` cap the logins in progress; ``[oidc]`` also holds the
allow-lists of who may join and refuses plain-http URLs unless ``allow_insecure_http`` (tests).
``[console]`` is the web admin console (:mod:`ghostmesh.console`): off unless ``listen`` is set; plain
HTTP only on a loopback address, anywhere else ``tls = true`` (the TCP port's certificate). Its OIDC login
for admins (``oidc_admins``, ``public_url``) uses the ``[oidc]`` provider settings whatever
``server.auth_method`` is, so those are required with it.

Why one module of about 640 lines: it is the whole schema of one file, ``ghostmesh.toml``, read in one
place; each table is a small dataclass with its own checks, and what spans tables (OIDC required by
``server.auth_method``, file names resolved against the config file's directory, the relay secret read at
load) needs them all in view.
"""

from __future__ import annotations

import ipaddress
import os
import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ghostcore.addr import AddressError, normalize_ip
from ghostcore.config import (
    FALLBACK_KINDS,
    MetricsConfig,
    build,
    check_fallback,
    duration,
    load,
    parse_hostport,
)
from ghostcore.dnsname import DomainError, in_domain, normalize_domain, normalize_server
from ghostcore.errors import ConfigError, InvalidArgument
from ghostcore.ipalloc import DEFAULT_IPV4_PREFIX, DEFAULT_IPV6_PREFIX, parse_prefix
from ghostcore.joinkey import parse_pin
from ghostcore.logsetup import LogConfig

ENV_PREFIX = "GHOSTMESH"
MIN_CREDENTIAL_LIFETIME = 60.0
MAX_REGION_ID = 2**32 - 1  # RelayRegion.id is a uint32
MIN_AUDIT_RETENTION = 3600.0  # pruning runs hourly; a shorter retention would promise what it cannot keep


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
    """``[database]``: ``type = "sqlite"`` (the default: one file, ``path``) or ``"postgres"`` (a server
    named by ``dsn``, a libpq connection string or ``postgresql://`` URI). The DSN may hold a password: it
    is kept out of every repr and message (:func:`ghostmesh.store.postgres.describe_dsn` names the server
    without it). The server's keys and TLS certificate stay in ``server.state_dir`` with either."""

    type: str = "sqlite"
    path: str = ""  # sqlite only; empty: <server.state_dir>/ghostmesh.db
    dsn: str = field(default="", repr=False)  # postgres only

    def __post_init__(self) -> None:
        if self.type == "sqlite":
            if self.dsn:
                raise ConfigError('database.dsn: only with type = "postgres" (sqlite uses database.path)')
        elif self.type == "postgres":
            if self.path:
                raise ConfigError('database.path: only with type = "sqlite" (postgres uses database.dsn)')
            if not self.dsn:
                raise ConfigError(
                    'database.dsn: required with type = "postgres", e.g. "host=/run/postgresql '
                    'dbname=ghostmesh" or "postgresql://ghostmesh@db.example/ghostmesh"'
                )
            # Imported here: psycopg is loaded only by servers that use PostgreSQL.
            from ghostmesh.store.postgres import parse_dsn  # noqa: PLC0415

            parse_dsn(self.dsn)  # a malformed DSN: ConfigError naming database.dsn, not quoting it
        else:
            raise ConfigError(f'database.type: expected "sqlite" or "postgres", got {self.type!r}')


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
    # A node whose map stream ended stays online to its peers this long, so that one that reconnects
    # in time (a restart, a dropped connection, a fleet reconnecting at once) is no change to anyone.
    presence_grace: float = duration(15.0)
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
class LimitsConfig:
    """``[limits]``: what one node, one source address or all callers together may cost the server
    (:mod:`ghostmesh.limits`, :mod:`ghostmesh.api.guard`). Every refusal is RESOURCE_EXHAUSTED and changes
    nothing."""

    status_reports_per_second: float = 2.0  # per node, sustained
    status_report_burst: int = 10  # per node: a start reports several times within a second
    audit_rows_per_node_per_minute: int = 20  # route audit rows; the rest become one summary row
    auth_failures_per_minute: int = 20  # per source address; beyond: its calls are refused
    calls_per_source: int = 1024  # calls in flight per source address (a NAT may hide many nodes)
    calls_total: int = 16384  # calls in flight in all (each node holds one map stream)
    connections_total: int = 16384  # TCP connections accepted (and the open files they need)
    streams_per_connection: int = 32  # HTTP/2 streams (calls) at once on one connection
    pending_requests: int = 16384  # calls received that the server has not taken up yet
    # full maps being built and written at once: a reconnect storm of N nodes would otherwise hold N
    # full maps of O(N) bytes each in memory together; the rest wait their turn (queued, not refused)
    full_maps_in_flight: int = 64

    def __post_init__(self) -> None:
        if not 0 < self.status_reports_per_second <= 1000:
            raise ConfigError(
                "limits.status_reports_per_second: expected more than 0 and at most 1000, got "
                f"{self.status_reports_per_second}"
            )
        for key in (
            "status_report_burst", "audit_rows_per_node_per_minute", "auth_failures_per_minute",
            "calls_per_source", "calls_total", "connections_total", "streams_per_connection",
            "pending_requests", "full_maps_in_flight",
        ):  # fmt: skip
            value = getattr(self, key)
            if not 1 <= value <= 1_000_000:
                raise ConfigError(f"limits.{key}: expected 1..1000000, got {value}")
        if self.calls_per_source > self.calls_total:
            raise ConfigError(
                f"limits.calls_per_source: {self.calls_per_source} is more than limits.calls_total "
                f"({self.calls_total}); lower it or raise calls_total"
            )


@dataclass(frozen=True)
class AuditConfig:
    """``[audit]``: the signed audit log (:mod:`ghostmesh.audit`)."""

    retention: float = duration(0.0)  # 0: keep every entry; else prune entries older than this
    key_file: str = ""  # the Ed25519 signing key; empty: <server.state_dir>/audit.key (made on first start)

    def __post_init__(self) -> None:
        if self.retention and self.retention < MIN_AUDIT_RETENTION:
            raise ConfigError(f"audit.retention: 0 (keep everything) or at least 1h, got {self.retention:g}s")


# An email as an admin entry: one "@", no spaces, quotes, brackets or ":" (which marks group: / sub:), and a
# dotted domain. Loose on purpose (addresses are compared, not delivered), strict enough to catch a pasted
# TOML or JSON fragment.
_ADMIN_EMAIL = re.compile(r"[^@\s:\"'<>()\[\],;]+@[a-zA-Z0-9-]+(\.[a-zA-Z0-9-]+)+")
MIN_CONSOLE_SESSION = 60.0
MAX_CONSOLE_SESSIONS = 10_000


@dataclass(frozen=True)
class ConsoleConfig:
    """``[console]``: the web admin console (:mod:`ghostmesh.console`). Empty ``listen``: not served.

    ``tls``: serve HTTPS with the certificate of the gRPC port (``[tls]`` or the self-signed one). Plain
    HTTP is allowed on a loopback address only: the login form carries an API key and the session cookie
    is then sent without ``Secure``. ``session_lifetime`` bounds a session from its login (it also ends
    with the API key it was made with); ``max_sessions`` bounds the session table (the oldest goes).
    ``oidc_admins`` turns on the OIDC login for admins (:mod:`ghostmesh.console_oidc`): each entry admits
    a verified email, a ``group:`` of the ``oidc.groups_claim`` or a ``sub:`` (the provider's stable
    account id); ``public_url`` is then required (the redirect URI's origin).
    """

    listen: str = ""  # e.g. "127.0.0.1:8080"
    tls: bool = False
    session_lifetime: float = duration(8 * 3600.0)
    max_sessions: int = 64
    # OIDC login for admins (ghostmesh.console_oidc), off while empty: who may administer after logging in
    # at the [oidc] provider, each entry a verified email, "group:<groups_claim value>" or "sub:<subject>".
    # An empty list admits no one (it never means "everyone").
    oidc_admins: list[str] = field(default_factory=list)
    # How a browser reaches the console (the provider's redirect URI is <public_url>/login/oidc/callback);
    # required with oidc_admins.
    public_url: str = ""

    def __post_init__(self) -> None:
        self._check_oidc()
        if self.listen:
            host, _ = parse_hostport(self.listen, "console.listen", ip_only=True)
            if not self.tls and not ipaddress.ip_address(host).is_loopback:
                raise ConfigError(
                    f"console.listen: {self.listen} is not a loopback address; set console.tls = true to "
                    "serve the console beyond this machine (the login sends an API key)"
                )
        if self.session_lifetime < MIN_CONSOLE_SESSION:
            raise ConfigError(f"console.session_lifetime: at least 1m, got {self.session_lifetime:g}s")
        if not 1 <= self.max_sessions <= MAX_CONSOLE_SESSIONS:
            raise ConfigError(f"console.max_sessions: 1..{MAX_CONSOLE_SESSIONS}, got {self.max_sessions}")

    def _check_oidc(self) -> None:
        for i, entry in enumerate(self.oidc_admins):
            kind, sep, value = entry.partition(":")
            named = bool(sep) and kind in ("group", "sub") and bool(value) and value == value.strip()
            if not (named or _ADMIN_EMAIL.fullmatch(entry)):
                raise ConfigError(
                    f"console.oidc_admins[{i}]: expected a verified email (alice@example.com), "
                    f"group:NAME or sub:SUBJECT, got {entry!r}"
                )
        if self.public_url:
            parts = urllib.parse.urlsplit(self.public_url)
            if parts.scheme not in ("http", "https") or not parts.netloc or parts.path not in ("", "/") \
                    or parts.query or parts.fragment:  # fmt: skip
                raise ConfigError(
                    "console.public_url: expected the console's origin, such as "
                    f"https://console.mesh.example.com (no path), got {self.public_url!r}"
                )
        if self.oidc_admins and not self.public_url:
            raise ConfigError(
                "console.public_url: required when console.oidc_admins is set (the provider sends the "
                "browser back to <public_url>/login/oidc/callback)"
            )
        if self.oidc_admins and not self.listen:
            raise ConfigError("console.oidc_admins: set, but console.listen is empty (the console is off)")


@dataclass(frozen=True)
class OidcConfig:
    """``[oidc]``: the OpenID provider nodes' users log in at (used when ``server.auth_method = "oidc"``).

    Who may join (:func:`ghostmesh.oidc_core.refusal`): each allow-list that is set must match; an empty
    one is not checked. ``allowed_domains``: the domain of the account's email (verified, when the provider
    says whether it is); ``allowed_groups``: one of the ``groups_claim`` values; ``allowed_users``: the user
    name (as ``username_claim`` gives it, lower-cased) or the verified email. Domains, users and emails are
    compared lower-cased; groups as the provider spells them.
    """

    issuer: str = ""  # e.g. "https://login.example.com"; discovery: <issuer>/.well-known/openid-configuration
    client_id: str = ""
    client_secret: str = field(default="", repr=False)  # never logged; or client_secret_file
    client_secret_file: str = ""
    scopes: list[str] = field(default_factory=lambda: ["openid", "profile", "email", "groups"])
    groups_claim: str = "groups"
    username_claim: str = "preferred_username"  # falls back to email, then sub
    http_bind: str = "0.0.0.0:7780"  # the login listener (confirmation page, callback)
    public_url: str = ""  # how a browser reaches http_bind, e.g. "https://login.mesh.example.com"
    # Plain http:// for public_url and issuer: only for tests and labs. On http a network attacker reads
    # the authorization code, the login cookie and (issuer) the provider's signing keys.
    allow_insecure_http: bool = False
    login_timeout: float = duration(600.0)
    max_pending: int = 1000  # logins in progress at once (each is held until login_timeout)
    max_pending_per_source: int = 10  # logins in progress from one source address
    allowed_domains: list[str] = field(default_factory=list)
    allowed_groups: list[str] = field(default_factory=list)
    allowed_users: list[str] = field(default_factory=list)
    # An ID token signed by a key the provider's JWKS did not have: the JWKS is fetched again, at most
    # once per this interval (a forged kid must not make ghostmesh hammer the provider).
    jwks_refresh_interval: float = duration(60.0)

    def __post_init__(self) -> None:
        parse_hostport(self.http_bind, "oidc.http_bind")
        if not 1 <= self.max_pending <= 1_000_000:
            raise ConfigError(f"oidc.max_pending: expected 1..1000000, got {self.max_pending}")
        if not 1 <= self.max_pending_per_source <= self.max_pending:
            raise ConfigError(
                f"oidc.max_pending_per_source: expected 1..oidc.max_pending ({self.max_pending}), got "
                f"{self.max_pending_per_source}"
            )
        for key in ("issuer", "public_url"):
            value = getattr(self, key)
            if value and not value.startswith(("http://", "https://")):
                raise ConfigError(f"oidc.{key}: expected an http(s):// URL, got {value!r}")
            if value.startswith("http://") and not self.allow_insecure_http:
                raise ConfigError(
                    f"oidc.{key}: must be https:// (on http the login can be read and changed on the way), "
                    f"got {value!r}; set oidc.allow_insecure_http = true only for tests"
                )
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
        if not 1 <= self.jwks_refresh_interval <= 86400:
            raise ConfigError(
                f"oidc.jwks_refresh_interval: expected 1s..24h, got {self.jwks_refresh_interval:g}s"
            )
        for key in ("allowed_domains", "allowed_groups", "allowed_users"):
            for i, value in enumerate(getattr(self, key)):
                if not value.strip() or value != value.strip():
                    raise ConfigError(
                        f"oidc.{key}[{i}]: expected a non-empty value without spaces, got {value!r}"
                    )
        for i, domain in enumerate(self.allowed_domains):
            if "@" in domain or domain.startswith("."):
                raise ConfigError(
                    f"oidc.allowed_domains[{i}]: expected a domain such as example.com, got {domain!r}"
                )

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
    # The pin of the relay's certificate (``ghostgate config pin`` prints it) when that gate has its own
    # relay.cert_file; unset: the pin of the certificate every gate makes from the shared secret.
    tls_pin: str = ""


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
    if r.tls_pin:
        try:
            parse_pin(r.tls_pin, f"{where}.tls_pin")
        except InvalidArgument as exc:
            raise ConfigError(str(exc)) from None
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
class TlsConfig:
    """``[tls]``: a certificate chain (PEM, leaf first) and its unencrypted private key, e.g. from a CA.

    Both empty: ghostmesh's own self-signed certificate, kept next to the database.
    """

    cert_file: str = ""
    key_file: str = ""

    def __post_init__(self) -> None:
        if bool(self.cert_file) != bool(self.key_file):
            missing = "tls.key_file" if self.cert_file else "tls.cert_file"
            raise ConfigError(
                f"{missing}: set tls.cert_file and tls.key_file together, or neither (a self-signed "
                "certificate is then made)"
            )


RECORD_TYPES = ("A", "AAAA", "CNAME")
MAX_DNS_ITEMS = 1000  # per list: nameservers, split domains, search domains, extra records


@dataclass(frozen=True)
class ExtraRecord:
    """One ``[[dns.extra_records]]`` table, canonical (:meth:`DnsConfig.records`)."""

    name: str = ""  # fully qualified, e.g. "db.mesh.example"
    type: str = ""  # "A", "AAAA" or "CNAME"
    value: str = ""  # an address of that family, or the CNAME's target name


def _record(table: Mapping[str, Any], where: str) -> ExtraRecord:
    r = build(ExtraRecord, table, where)
    name = _domain(r.name, f"{where}.name")
    kind = r.type.upper()
    if kind not in RECORD_TYPES:
        raise ConfigError(f"{where}.type: expected one of {', '.join(RECORD_TYPES)}, got {r.type!r}")
    if kind == "CNAME":
        value = _domain(r.value, f"{where}.value")
    else:
        try:
            ip = ipaddress.ip_address(normalize_ip(r.value, f"{where}.value"))
        except AddressError as exc:
            raise ConfigError(exc.for_key(f"{where}.value")) from None
        if ip.version != (4 if kind == "A" else 6):
            raise ConfigError(
                f"{where}.value: an {kind} record needs an IPv{4 if kind == 'A' else 6} address"
            )
        value = str(ip)
    return ExtraRecord(name, kind, value)


def _domain(text: str, where: str) -> str:
    try:
        return normalize_domain(text, where)
    except DomainError as exc:
        raise ConfigError(str(exc)) from None


def _servers(items: list[str], where: str) -> tuple[str, ...]:
    if len(items) > MAX_DNS_ITEMS:
        raise ConfigError(f"{where}: at most {MAX_DNS_ITEMS} entries")
    out = []
    for i, text in enumerate(items):
        try:
            out.append(normalize_server(text, "resolver"))
        except AddressError as exc:
            raise ConfigError(exc.for_key(f"{where}[{i}]")) from None
    return tuple(out)


@dataclass(frozen=True)
class DnsConfig:
    """``[dns]``: MagicDNS and split DNS, sent to every node in its map (:func:`ghostmesh.dnsmap.dns_map`).

    ``magic_dns``: nodes answer ``<node>.<base_domain>`` from their map. ``nameservers``: where nodes send
    every other name (empty: each node's own previous resolvers). ``split``: a table of domain -> servers
    (``"corp.example" = ["10.1.0.53"]``). ``search_domains``: added to the nodes' search list.
    ``extra_records``: ``[[dns.extra_records]]`` tables of ``name``, ``type`` (A, AAAA, CNAME), ``value``.
    Nothing set (the default): no DNS settings in the map, and nodes leave their resolver alone.
    Names are canonical after loading (:mod:`ghostcore.dnsname`), servers ``ip:port``.
    """

    magic_dns: bool = False
    base_domain: str = ""
    nameservers: list[str] = field(default_factory=list)
    split: dict[str, list[str]] = field(default_factory=dict)
    search_domains: list[str] = field(default_factory=list)
    # Raw TOML tables, built and validated by records() (ghostcore.config has no list-of-tables type).
    extra_records: list[dict] = field(default_factory=list)  # type: ignore[type-arg]

    def __post_init__(self) -> None:
        if self.base_domain:
            object.__setattr__(self, "base_domain", _domain(self.base_domain, "dns.base_domain"))
        elif self.magic_dns:
            raise ConfigError('dns.base_domain: required with dns.magic_dns = true, e.g. "mesh.example"')
        object.__setattr__(self, "nameservers", list(_servers(self.nameservers, "dns.nameservers")))
        if len(self.split) > MAX_DNS_ITEMS:
            raise ConfigError(f"dns.split: at most {MAX_DNS_ITEMS} domains")
        split: dict[str, list[str]] = {}
        for domain, servers in self.split.items():
            where = f"dns.split.{domain}"
            name = _domain(domain, where)
            if name in split:
                raise ConfigError(f"{where}: {name} is listed twice (names are compared lower-cased)")
            if self.base_domain and in_domain(name, self.base_domain):
                raise ConfigError(f"{where}: {name} is inside dns.base_domain, which nodes answer themselves")
            if not servers:
                raise ConfigError(f"{where}: needs at least one server")
            split[name] = list(_servers(servers, where))
        object.__setattr__(self, "split", split)
        if len(self.search_domains) > MAX_DNS_ITEMS:
            raise ConfigError(f"dns.search_domains: at most {MAX_DNS_ITEMS} entries")
        search = [_domain(d, f"dns.search_domains[{i}]") for i, d in enumerate(self.search_domains)]
        object.__setattr__(self, "search_domains", search)
        if len(self.extra_records) > MAX_DNS_ITEMS:
            raise ConfigError(f"dns.extra_records: at most {MAX_DNS_ITEMS} records")
        self.records()  # validate now, so a bad record names itself at load time

    @property
    def enabled(self) -> bool:
        """Anything to send: without it the map carries no DNS settings."""
        return bool(self.magic_dns or self.nameservers or self.split or self.extra_records)

    def records(self) -> tuple[ExtraRecord, ...]:
        """The ``[[dns.extra_records]]`` validated and canonical (ConfigError naming the key)."""
        out = tuple(_record(t, f"dns.extra_records[{i}]") for i, t in enumerate(self.extra_records))
        first: dict[str, ExtraRecord] = {}
        for i, r in enumerate(out):
            seen = first.setdefault(r.name, r)
            # RFC 1034 section 3.6.2: a name with a CNAME has no other data
            if seen is not r and "CNAME" in (seen.type, r.type):
                raise ConfigError(
                    f"dns.extra_records[{i}].name: {r.name} has a CNAME and other records; a CNAME must "
                    "be the name's only record"
                )
        return out


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
    tls: TlsConfig = field(default_factory=TlsConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    log: LogConfig = field(default_factory=LogConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    console: ConsoleConfig = field(default_factory=ConsoleConfig)
    dns: DnsConfig = field(default_factory=DnsConfig)

    def __post_init__(self) -> None:
        if self.server.auth_method == "oidc":
            for key in ("issuer", "client_id", "public_url"):
                if not getattr(self.oidc, key):
                    raise ConfigError(f'oidc.{key}: required when server.auth_method = "oidc"')
        if self.console.oidc_admins:  # the admins log in at the [oidc] provider, whatever auth_method
            for key in ("issuer", "client_id"):
                if not getattr(self.oidc, key):
                    raise ConfigError(f"oidc.{key}: required when console.oidc_admins is set")
            if self.console.public_url.startswith("http://") and not self.oidc.allow_insecure_http:
                raise ConfigError(
                    "console.public_url: must be https:// (on http the login can be read and changed on "
                    f"the way), got {self.console.public_url!r}; set oidc.allow_insecure_http = true only "
                    "for tests"
                )

    @property
    def db_path(self) -> Path:
        if self.database.path:
            return Path(self.database.path)
        return Path(self.server.state_dir) / "ghostmesh.db"


def _beside(config: Path, name: str) -> str:
    """``name`` resolved against the config file's directory (empty and absolute names as they are)."""
    return str(config.parent / name) if name and not Path(name).is_absolute() else name


def load_config(
    path: Path | None,
    *,
    environ: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> MeshConfig:
    """Load ``path`` (None: defaults only) with ``GHOSTMESH_*`` from ``environ`` (default os.environ)."""
    env = os.environ if environ is None else environ
    cfg = load(MeshConfig, path, env_prefix=ENV_PREFIX, environ=env, flags=flags)
    if path is not None:  # relative file names are relative to the config file
        cfg = replace(
            cfg,
            server=replace(cfg.server, acl_file=_beside(path, cfg.server.acl_file)),
            relay=replace(cfg.relay, secret_file=_beside(path, cfg.relay.secret_file)),
            tls=replace(
                cfg.tls, cert_file=_beside(path, cfg.tls.cert_file), key_file=_beside(path, cfg.tls.key_file)
            ),
            audit=replace(cfg.audit, key_file=_beside(path, cfg.audit.key_file)),
        )
    cfg.relay.secret_bytes()  # regions without a secret, or an unreadable secret_file: refused at load
    return cfg
