"""The pure parts of the OIDC login; :mod:`ghostmesh.oidc` is their I/O edge. PURE: no sockets, no HTTP,
no asyncio; what depends on time takes ``now``.

What this module owns:

- :class:`PendingLogins`: the logins in progress (by id, by ``state``, by node key; capped in all and per
  source) and the browser binding that makes each one usable once, by one browser. A login moves
  *pending* → *confirmed* (the confirmation page's form was posted by a browser holding the login's
  cookie, with the CSRF token derived from that cookie) → *taken* (the provider's callback arrived in that
  same browser with the login's ``state``). Each step happens once.
- Claims → ghostmesh user name, groups, verified email (OpenID Connect Core 1.0 section 5.1).
- :func:`refusal`: the allow-lists (``oidc.allowed_domains``, ``allowed_groups``, ``allowed_users``).
- :func:`admin_match`: who may administer the web console after an OIDC login (``console.oidc_admins``).
- :func:`request_secrets` and :func:`cookie_hash`: what binds one authorization request to one browser,
  for both logins (nodes here, admins in :mod:`ghostmesh.console_core`).
- :class:`JwksCache`: the provider's signing keys, and when an unknown ``kid`` may fetch them again.

Why a cookie and a token, not the token alone: the login URL is no secret from whoever started the join
(an attacker can run ``ghostlink join`` and send the victim the URL), so a token printed in the page alone
would let the attacker fetch the page, read the token and make the victim's browser post it from another
site. The token is an HMAC of a cookie only the victim's browser holds (``SameSite=Lax``: another site's
form post carries no cookie), and the callback must come back in that browser (Lax cookies ride on the
provider's top-level redirect), so neither the confirmation nor the callback can be made for someone else.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from authlib.common.security import generate_token
from joserfc.errors import JoseError
from joserfc.jwk import KeySet

from ghostcore.addr import grpc_peer
from ghostcore.errors import AuthError, ResourceExhausted
from ghostmesh.config import OidcConfig

MAX_COOKIE = 128  # characters of a login cookie we look at; ours are 43
# Kinds of refused logins, as counted per source and written in the coalesced ``auth.failed`` row.
KIND_BAD_STATE = "oidc:bad_state"  # a callback with an unknown or expired state
KIND_BROWSER = "oidc:browser"  # a callback or confirmation from a browser that does not hold the login
KIND_INVALID = "oidc:invalid"  # the provider's answer or the ID token did not verify
KIND_NOT_ALLOWED = "oidc:not_allowed"  # an allow-list refused the account
KIND_USER = "oidc:user"  # the account may not act as that user (taken, bound to another account)

_NAME_BAD = re.compile(r"[^a-z0-9._-]+")


@dataclass(slots=True)
class PendingLogin:
    """One login in progress. ``state``, ``nonce``, ``verifier``, ``csrf_key`` and ``browser`` are secrets
    (or bind to one): not in the repr."""

    id: str
    node_key: str
    hostname: str
    source: str  # what it is limited as (ghostmesh.limits.source_of: an IPv4 address or an IPv6 /64)
    remote: str  # the address the Register came from, shown on the confirmation page
    created: float  # when the node asked
    expires: float
    state: str = field(repr=False)
    nonce: str = field(repr=False)
    verifier: str = field(repr=False)
    csrf_key: bytes = field(repr=False)
    browser: bytes = field(default=b"", repr=False)  # sha256 of the cookie of the browser that confirmed

    @property
    def confirmed(self) -> bool:
        return bool(self.browser)


def one_line(text: str, limit: int = 100) -> str:
    """``text`` from the provider or the browser made safe for a one-line message and a log line: at most
    ``limit`` characters, anything unprintable (a newline, an escape sequence) shown as ``?``."""
    return "".join(c if c.isprintable() else "?" for c in text[:limit])


def peer_address(peer: str) -> str:
    """The address of a gRPC peer (``ipv4:192.0.2.1:5000`` -> ``192.0.2.1``, ``ipv6:[2001:db8::1]:5000``
    -> ``2001:db8::1``), as the confirmation page shows it; other kinds as they are."""
    kind, host = grpc_peer(peer)
    if kind not in ("ipv4", "ipv6"):
        return peer
    return host or peer


def new_cookie() -> str:
    """A fresh login cookie value (256 random bits)."""
    return secrets.token_urlsafe(32)


def csrf_token(login: PendingLogin, cookie: str) -> str:
    """The confirmation form's token for the browser holding ``cookie``: HMAC-SHA256 under the login's
    own key, so it is good for this login and this browser only."""
    mac = hmac.new(login.csrf_key, b"confirm\x00" + cookie[:MAX_COOKIE].encode(), hashlib.sha256)
    return base64.urlsafe_b64encode(mac.digest()).rstrip(b"=").decode()


def cookie_hash(cookie: str) -> bytes:
    """What a login keeps of the browser cookie it is bound to (the cookie itself is not kept)."""
    return hashlib.sha256(cookie[:MAX_COOKIE].encode()).digest()


def request_secrets() -> tuple[str, str, str]:
    """A fresh ``state``, ``nonce`` and PKCE verifier (RFC 7636 section 4.1: 43..128 unreserved
    characters) for one authorization request."""
    return secrets.token_urlsafe(32), secrets.token_urlsafe(32), generate_token(64)


class PendingLogins:
    """The in-memory book of logins in progress, by id, by ``state`` and by node key. At most one login
    per node key: a new one (the user ran ``join`` again) replaces the old. At most ``max_pending``
    logins, ``max_per_source`` of them from one source address.
    """

    def __init__(self, timeout: float, max_pending: int, max_per_source: int) -> None:
        self.timeout = timeout
        self.max_pending = max_pending
        self.max_per_source = max_per_source
        self._by_id: dict[str, PendingLogin] = {}
        self._by_state: dict[str, str] = {}
        self._by_node: dict[str, str] = {}
        self._per_source: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._by_id)

    def create(self, node_key: str, hostname: str, source: str, now: float, remote: str = "") -> PendingLogin:
        """A new login, replacing the node key's earlier one; ``ResourceExhausted``, and nothing replaced,
        beyond the caps."""
        self.expire(now)
        old_id = self._by_node.get(node_key)
        old = None if old_id is None else self._by_id[old_id]
        total = len(self._by_id) - (old is not None)
        from_source = self._per_source.get(source, 0) - (old is not None and old.source == source)
        if total >= self.max_pending:
            raise ResourceExhausted(
                f"too many OIDC logins in progress ({total}, oidc.max_pending); retry in a few minutes"
            )
        if from_source >= self.max_per_source:
            raise ResourceExhausted(
                f"too many OIDC logins in progress from {source} ({from_source}, "
                "oidc.max_pending_per_source); finish or let one expire first"
            )
        if old is not None:
            self._drop(old)
        state, nonce, verifier = request_secrets()
        login = PendingLogin(
            id=secrets.token_urlsafe(16),
            node_key=node_key,
            hostname=hostname,
            source=source,
            remote=peer_address(remote) if remote else source,
            created=now,
            expires=now + self.timeout,
            state=state,
            nonce=nonce,
            verifier=verifier,
            csrf_key=secrets.token_bytes(32),
        )
        self._by_id[login.id] = login
        self._by_state[login.state] = login.id
        self._by_node[node_key] = login.id
        self._per_source[source] = self._per_source.get(source, 0) + 1
        return login

    def get(self, login_id: str, now: float) -> PendingLogin | None:
        login = self._by_id.get(login_id)
        return login if login is not None and login.expires > now else None

    def for_node(self, node_key: str, now: float) -> PendingLogin | None:
        login_id = self._by_node.get(node_key)
        return None if login_id is None else self.get(login_id, now)

    def confirm(self, login_id: str, cookie: str, token: str, now: float) -> PendingLogin:
        """The confirmation form was posted: the login, now bound to the browser holding ``cookie``.
        AuthError (nothing changes) for an unknown or expired login, a second confirmation, a missing
        cookie or a token not made for this cookie."""
        login = self.get(login_id, now)
        if login is None:
            raise AuthError("login failed: unknown or expired login; run ghostlink join again")
        if login.confirmed:
            raise AuthError("login failed: this login was confirmed already; run ghostlink join again")
        if not cookie or not hmac.compare_digest(csrf_token(login, cookie), token[:MAX_COOKIE]):
            raise AuthError(
                "login failed: this page is stale or was not opened in this browser; open the login URL "
                "again and confirm there"
            )
        login.browser = cookie_hash(cookie)
        return login

    def by_state(self, state: str, now: float) -> PendingLogin | None:
        """The unexpired login with this ``state`` (not removed)."""
        login_id = self._by_state.get(state)
        return None if login_id is None else self.get(login_id, now)

    def take(self, state: str, cookie: str, now: float) -> PendingLogin | None:
        """The unexpired login with this ``state``, removed (a state is good for one callback only).
        None for an unknown or expired state; AuthError, and the login kept for its own browser, when the
        callback did not come back in the browser that confirmed it."""
        login = self.by_state(state, now)
        if login is None:
            expired = self._by_id.get(self._by_state.get(state, ""))
            if expired is not None:
                self._drop(expired)
            return None
        if not login.confirmed or not hmac.compare_digest(login.browser, cookie_hash(cookie)):
            raise AuthError(
                "login failed: this browser did not confirm the login; open the login URL again in the "
                "browser you log in with"
            )
        self._drop(login)
        return login

    def expire(self, now: float) -> list[PendingLogin]:
        gone = [login for login in self._by_id.values() if login.expires <= now]
        for login in gone:
            self._drop(login)
        return gone

    def _drop(self, login: PendingLogin) -> None:
        if self._by_id.pop(login.id, None) is None:
            return
        self._by_state.pop(login.state, None)
        if self._by_node.get(login.node_key) == login.id:
            del self._by_node[login.node_key]
        left = self._per_source.get(login.source, 0) - 1
        if left > 0:
            self._per_source[login.source] = left
        else:
            self._per_source.pop(login.source, None)


# -- claims (OpenID Connect Core 1.0 section 5.1) -----------------------------------------------------------


def username_from_claims(claims: Mapping[str, Any], claim: str) -> str:
    """The ghostmesh user name for these ID token claims: ``claim``, else ``email``, else ``sub``,
    lower-cased, other characters replaced by ``-`` (``A@Example.com`` -> ``a-example.com``).
    """
    for key in (claim, "email", "sub"):
        value = claims.get(key)
        if isinstance(value, str) and value.strip():
            return _NAME_BAD.sub("-", value.strip().lower()).strip("-._")[:63]
    return ""


def groups_from_claims(claims: Mapping[str, Any], claim: str) -> list[str]:
    """The groups claim as a list of strings (a single string counts as one group; others are ignored)."""
    value = claims.get(claim)
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [g for g in value if isinstance(g, str) and g]
    return []


def verified_email(claims: Mapping[str, Any], *, must_say: bool = False) -> str:
    """The ``email`` claim lower-cased, or "" when there is none or the provider says it is not verified.

    Section 5.1: ``email_verified`` false means the provider did not check that the account holds the
    address, so anyone could have typed ``ceo@example.com``. A provider that sends no ``email_verified``
    at all is taken at its word (many only release verified addresses) unless ``must_say``: then only an
    email the provider says it verified counts (for admins); some send the string "true".
    """
    email = claims.get("email")
    if not isinstance(email, str) or email.count("@") != 1:
        return ""
    if ("email_verified" in claims or must_say) and claims.get("email_verified") not in (True, "true"):
        return ""
    local, _, domain = email.strip().lower().partition("@")
    return f"{local}@{domain}" if local and domain else ""


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why an allow-list refused a login: the list (``allowed_domains`` …) and the one-line message."""

    rule: str
    message: str


def refusal(claims: Mapping[str, Any], user: str, groups: Sequence[str], cfg: OidcConfig) -> Refusal | None:
    """None when every allow-list that is configured admits this account; else the first that does not.

    ``user`` is the ghostmesh user name the claims give (:func:`username_from_claims`). A domain is
    matched exactly (``example.com`` does not admit ``mail.example.com``): a subdomain may be run by
    someone else.
    """
    email = verified_email(claims)
    if cfg.allowed_domains:
        allowed = {d.lower() for d in cfg.allowed_domains}
        if not email:
            return Refusal(
                "allowed_domains",
                "login refused: this mesh admits accounts by the domain of their verified email "
                "(oidc.allowed_domains) and the provider sent no verified email",
            )
        domain = email.rpartition("@")[2]
        if domain not in allowed:
            return Refusal(
                "allowed_domains",
                f"login refused: email domain {one_line(domain)} is not in oidc.allowed_domains; "
                "ask an admin",
            )
    if cfg.allowed_groups and not set(groups) & set(cfg.allowed_groups):
        return Refusal(
            "allowed_groups", "login refused: none of this account's groups is in oidc.allowed_groups"
        )
    if cfg.allowed_users:
        allowed = {u.lower() for u in cfg.allowed_users}
        if user not in allowed and (not email or email not in allowed):
            return Refusal(
                "allowed_users",
                f"login refused: user {one_line(user, 70)} is not in oidc.allowed_users; ask an admin",
            )
    return None


# -- who may administer (console.oidc_admins) ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AdminMatch:
    """An account ``console.oidc_admins`` admits: the audit actor its session acts as, and the entry that
    admitted it (for the log)."""

    actor: str
    entry: str


def admin_actor(claims: Mapping[str, Any]) -> str:
    """The audit actor of an OIDC admin: ``oidc:<email>`` when the provider says it verified the email,
    else ``oidc:sub:<sub>`` (the account's stable id at the one configured issuer)."""
    email = verified_email(claims, must_say=True)
    return f"oidc:{one_line(email)}" if email else f"oidc:sub:{one_line(str(claims.get('sub', '')))}"


def admin_match(claims: Mapping[str, Any], groups: Sequence[str], admins: Sequence[str]) -> AdminMatch | None:
    """The first entry of ``admins`` that admits this account, or None; an empty list admits no one.

    ``group:NAME`` admits a member of NAME (the ``groups_claim`` values, as the provider spells them);
    ``sub:SUBJECT`` the account with that ``sub``; anything else is an email, compared lower-cased with
    the account's email only when the provider says it verified it (``email_verified``): admin rights are
    not given to an address anyone could have typed into their profile. The user name claims
    (``preferred_username``) never count: section 5.7 says a relying party must not rely on them being
    unique or stable.
    """
    email = verified_email(claims, must_say=True)
    sub = claims.get("sub")
    for entry in admins:
        kind, sep, value = entry.partition(":")
        if sep and kind == "group":
            admitted = value in groups
        elif sep and kind == "sub":
            admitted = value == sub
        else:
            admitted = bool(email) and entry.lower() == email
        if admitted:
            return AdminMatch(admin_actor(claims), entry)
    return None


# -- the provider's signing keys (RFC 7517; OpenID Connect Core 1.0 section 10.1.1) ---------------------


class JwksCache:
    """The provider's JWKS and when it may be fetched again.

    Section 10.1.1: a provider rotates keys by publishing the new one in its JWKS and signing with it;
    relying parties fetch the JWKS again when a token names a ``kid`` they do not have. Anyone can make
    a token naming any ``kid``, so a re-fetch is attempted at most once per ``interval`` (successful or
    not). The keys in hand stay in force until a new set has arrived and parsed; then the new set replaces
    them whole (a key the provider withdrew is no longer trusted).
    """

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.keys: KeySet | None = None
        self.fetches = 0  # attempts, for tests and metrics
        self.last_attempt: float | None = None

    def knows(self, kid: str | None) -> bool:
        """Whether a token with this ``kid`` header can be checked with the keys in hand (no ``kid``:
        whenever keys are in hand; the signature check then decides)."""
        if self.keys is None:
            return False
        return kid is None or any(key.kid == kid for key in self.keys.keys)

    def may_fetch(self, now: float) -> bool:
        return self.last_attempt is None or now - self.last_attempt >= self.interval

    def retry_in(self, now: float) -> float:
        """Seconds until :meth:`may_fetch` is true."""
        return 0.0 if self.last_attempt is None else max(0.0, self.last_attempt + self.interval - now)

    def attempted(self, now: float) -> None:
        self.last_attempt = now
        self.fetches += 1

    def install(self, jwks: object) -> None:
        """Take a fetched JWKS document; ValueError (the keys in hand kept) if it is not one with keys."""
        if not isinstance(jwks, dict) or not isinstance(jwks.get("keys"), list) or not jwks["keys"]:
            raise ValueError("the provider's JWKS has no keys")
        try:
            keys = KeySet.import_key_set(jwks)  # type: ignore[arg-type]
        except (JoseError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"the provider's JWKS does not parse ({type(exc).__name__})") from None
        self.keys = keys
