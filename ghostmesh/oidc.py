"""OIDC login for nodes (``server.auth_method = "oidc"``): pending logins and the callback listener.

The flow (OpenID Connect Core 1.0, section 3.1 "Authentication using the Authorization Code Flow"):

1. A node calls ``Register`` with no auth key and a node key the server does not know. ghostmesh creates a
   :class:`PendingLogin` (random id, ``state``, ``nonce`` and PKCE verifier, RFC 7636; in memory only, bound
   to the proven node key and the requested hostname, expiring after ``oidc.login_timeout``) and answers
   ``auth_url = <oidc.public_url>/oidc/login/<id>``. Nothing is written to the store.
2. The node prints the URL and calls ``WaitForLogin`` (proven with the same node key, see
   :meth:`OidcService.wait`).
3. The user's browser opens the URL; ``/oidc/login/<id>`` redirects to the provider's authorization
   endpoint (``response_type=code``, ``scope``, ``state``, ``nonce``, ``code_challenge`` S256).
4. The provider redirects to ``/oidc/callback?code&state``. An unknown or expired ``state`` is answered 400
   and changes nothing. Otherwise the pending login is consumed (single use), the code is exchanged at the
   token endpoint with the PKCE verifier (plain httpx: authlib 1.9's httpx integration raises a
   DeprecationWarning at import, which our warnings-as-errors runs reject), and the ID token is validated
   (section 3.1.3.7): signature against the provider's JWKS, ``iss``, ``aud`` = client id, ``exp``/``iat`` and
   ``nonce`` = the pending login's nonce (joserfc + authlib's ``CodeIDToken``). Any failure: a 400 page,
   the waiting node gets UNAUTHENTICATED, and nothing is written.
5. The user is the ``oidc.username_claim`` (falling back to ``email``, then ``sub``), normalised to a
   ghostmesh user name; it is created if missing and bound to the provider's ``sub``
   (:meth:`ghostmesh.state.State.register_oidc` refuses a different ``sub``). Its groups (``groups_claim``)
   are stored for policy group members ``"oidc:<group>"``. The node is registered to the user as an auth
   key registration does, the change is dispatched and audited (``node.register``, ``via: oidc``), and
   ``WaitForLogin`` returns the node.

Discovery (``<issuer>/.well-known/openid-configuration``, OpenID Connect Discovery 1.0 section 4) runs once
at start; a failure stops the start with a one-line error. The client secret never reaches a log or repr.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx
from aiohttp import web
from authlib.common.security import generate_token
from authlib.oauth2.rfc6749.parameters import prepare_grant_uri
from authlib.oauth2.rfc7636 import create_s256_code_challenge
from authlib.oidc.core import CodeIDToken
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet
from joserfc.jws import JWSRegistry

from ghostcore.config import parse_hostport
from ghostcore.errors import AuthError, ConfigError, GhostError, Unavailable
from ghostmesh import audit
from ghostmesh.config import OidcConfig
from ghostmesh.hub import Hub
from ghostmesh.store.base import NodeRec

log = logging.getLogger(__name__)

LOGIN_PATH = "/oidc/login/"
CALLBACK_PATH = "/oidc/callback"
HTTP_TIMEOUT = 10.0  # seconds, for each request to the provider
LEEWAY = 60  # seconds of clock skew accepted on exp / iat
MSG_BAD_STATE = "login failed: unknown or expired state; run ghostlink join again"
MSG_LOGGED_IN = "logged in; you can close this window"

_NAME_BAD = re.compile(r"[^a-z0-9._-]+")


@dataclass(slots=True)
class PendingLogin:
    """One login in progress. ``state``, ``nonce`` and ``verifier`` are secrets: not in the repr."""

    id: str
    node_key: str
    hostname: str
    expires: float
    state: str = field(repr=False)
    nonce: str = field(repr=False)
    verifier: str = field(repr=False)


class PendingLogins:
    """The in-memory book of logins in progress, by id, by ``state`` and by node key. Sans-IO: takes
    ``now``. At most one login per node key: a new one (the user ran ``join`` again) replaces the old.
    """

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._by_id: dict[str, PendingLogin] = {}
        self._by_state: dict[str, str] = {}
        self._by_node: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self._by_id)

    def create(self, node_key: str, hostname: str, now: float) -> PendingLogin:
        self.expire(now)
        old = self._by_node.get(node_key)
        if old is not None:
            self._drop(self._by_id[old])
        login = PendingLogin(
            id=secrets.token_urlsafe(16),
            node_key=node_key,
            hostname=hostname,
            expires=now + self.timeout,
            state=secrets.token_urlsafe(32),
            nonce=secrets.token_urlsafe(32),
            verifier=generate_token(64),  # RFC 7636 section 4.1: 43..128 unreserved characters
        )
        self._by_id[login.id] = login
        self._by_state[login.state] = login.id
        self._by_node[node_key] = login.id
        return login

    def get(self, login_id: str, now: float) -> PendingLogin | None:
        login = self._by_id.get(login_id)
        return login if login is not None and login.expires > now else None

    def for_node(self, node_key: str, now: float) -> PendingLogin | None:
        login_id = self._by_node.get(node_key)
        return None if login_id is None else self.get(login_id, now)

    def take(self, state: str, now: float) -> PendingLogin | None:
        """The unexpired login with this ``state``, removed (a state is good for one callback only)."""
        login_id = self._by_state.get(state)
        login = None if login_id is None else self._by_id[login_id]
        if login is None:
            return None
        self._drop(login)
        return login if login.expires > now else None

    def expire(self, now: float) -> list[PendingLogin]:
        gone = [login for login in self._by_id.values() if login.expires <= now]
        for login in gone:
            self._drop(login)
        return gone

    def _drop(self, login: PendingLogin) -> None:
        self._by_id.pop(login.id, None)
        self._by_state.pop(login.state, None)
        if self._by_node.get(login.node_key) == login.id:
            del self._by_node[login.node_key]


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


def _page(status: int, text: str) -> web.Response:
    return web.Response(status=status, text=text + "\n", content_type="text/plain")


class OidcService:
    """Discovery, the pending logins, the callback listener (aiohttp) and ``WaitForLogin``."""

    def __init__(self, cfg: OidcConfig, hub: Hub, clock: Callable[[], float]) -> None:
        self.cfg = cfg
        self.hub = hub
        self.clock = clock
        self.pending = PendingLogins(cfg.login_timeout)
        self.public_url = cfg.public_url.rstrip("/")
        self.redirect_uri = self.public_url + CALLBACK_PATH
        self.metadata: dict[str, Any] = {}
        self._secret = cfg.secret()
        self._waiters: dict[str, asyncio.Future[NodeRec]] = {}  # login id -> its WaitForLogin
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> None:
        """Discover the provider and listen on ``oidc.http_bind``; Unavailable (one line) otherwise."""
        issuer = self.cfg.issuer.rstrip("/")
        url = issuer + "/.well-known/openid-configuration"
        try:
            async with httpx.AsyncClient(timeout=HTTP_TIMEOUT) as http:
                resp = await http.get(url)
                resp.raise_for_status()
                meta = resp.json()
                jwks = (await http.get(meta["jwks_uri"])).raise_for_status().json()
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
            raise Unavailable(
                f"oidc.issuer: discovery at {url} failed ({type(exc).__name__}: {exc})"
            ) from None
        named = meta.get("issuer") if isinstance(meta, dict) else None
        if not isinstance(named, str) or named.rstrip("/") != issuer:
            raise ConfigError(f"oidc.issuer: {url} names issuer {named!r}, not {issuer!r}")
        for key in ("authorization_endpoint", "token_endpoint"):
            if not isinstance(meta.get(key), str):
                raise Unavailable(f"oidc.issuer: discovery at {url} lacks {key}")
        meta["jwks"] = jwks
        self.metadata = meta
        app = web.Application()
        app.router.add_get(LOGIN_PATH + "{id}", self._login)
        app.router.add_get(CALLBACK_PATH, self._callback)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        host, port = parse_hostport(self.cfg.http_bind, "oidc.http_bind")
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise Unavailable(
                f"oidc.http_bind: cannot listen on {self.cfg.http_bind}: {exc.strerror}"
            ) from None
        self._runner = runner
        self.port = int(runner.addresses[0][1]) if runner.addresses else port  # http_bind port 0
        log.info("oidc login listening", extra={"bind": self.cfg.http_bind, "issuer": issuer})

    async def stop(self) -> None:
        for fut in self._waiters.values():
            if not fut.done():
                fut.set_exception(Unavailable("server is shutting down; run ghostlink join again"))
        self._waiters.clear()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- the node side (Coordination.Register / WaitForLogin) ------------------------------------------

    def begin(self, node_key: str, hostname: str) -> str:
        """Start a login for ``node_key``; the URL the user opens."""
        now = self.clock()
        for gone in self.pending.expire(now):
            self._fail(gone.id, AuthError("login expired; run ghostlink join again"))
        old = self.pending.for_node(node_key, now)
        if old is not None:
            self._fail(old.id, AuthError("a newer login for this node was started"))
        login = self.pending.create(node_key, hostname, now)
        return f"{self.public_url}{LOGIN_PATH}{login.id}"

    async def wait(self, node_key: str) -> NodeRec:
        """Wait for the pending login of ``node_key``; AuthError when it fails or expires."""
        now = self.clock()
        login = self.pending.for_node(node_key, now)
        if login is None:
            done = self.hub.state.node_by_key(node_key)
            if done is not None and not done.expired(self.hub.now()):
                return done  # the user was quicker than this call: the login completed already
            raise AuthError("no login in progress for this node (expired?); run ghostlink join again")
        fut = self._waiters.get(login.id)
        if fut is None or fut.done():
            fut = asyncio.get_running_loop().create_future()
            self._waiters[login.id] = fut
        try:  # a cancelled call (the node went away) cancels the future: the callback then skips it
            return await asyncio.wait_for(fut, timeout=max(0.0, login.expires - now))
        except TimeoutError:
            raise AuthError("login expired before it was completed; run ghostlink join again") from None
        finally:
            if self._waiters.get(login.id) is fut:
                del self._waiters[login.id]

    def _fail(self, login_id: str, err: GhostError) -> None:
        fut = self._waiters.pop(login_id, None)
        if fut is not None and not fut.done():
            fut.set_exception(err)

    # -- the browser side --------------------------------------------------------------------------------

    async def _login(self, request: web.Request) -> web.StreamResponse:
        login = self.pending.get(request.match_info["id"], self.clock())
        if login is None:
            return _page(404, "login failed: unknown or expired login; run ghostlink join again")
        url = prepare_grant_uri(  # OpenID Connect Core 1.0 section 3.1.2.1; RFC 7636 section 4.3
            self.metadata["authorization_endpoint"],
            self.cfg.client_id,
            "code",
            redirect_uri=self.redirect_uri,
            scope=" ".join(self.cfg.scopes),
            state=login.state,
            nonce=login.nonce,
            code_challenge=create_s256_code_challenge(login.verifier),
            code_challenge_method="S256",
        )
        raise web.HTTPFound(url)

    async def _callback(self, request: web.Request) -> web.StreamResponse:
        login = self.pending.take(request.query.get("state", ""), self.clock())
        if login is None:
            log.warning("oidc callback with an unknown or expired state")
            return _page(400, MSG_BAD_STATE)
        try:
            node = await self._complete(login, request)
        except GhostError as exc:
            log.warning("oidc login failed: %s", exc)
            self._fail(login.id, exc)
            return _page(400, f"login failed: {exc}")
        fut = self._waiters.pop(login.id, None)
        if fut is not None and not fut.done():
            fut.set_result(node)
        return _page(200, MSG_LOGGED_IN)

    async def _complete(self, login: PendingLogin, request: web.Request) -> NodeRec:
        if "error" in request.query:
            raise AuthError(f"the provider refused the login: {request.query['error'][:100]}")
        code = request.query.get("code", "")
        if not code:
            raise AuthError("the provider sent no authorization code")
        token = await self._exchange(code, login.verifier)
        claims = self._validate_id_token(token, login.nonce)
        user = username_from_claims(claims, self.cfg.username_claim)
        groups = groups_from_claims(claims, self.cfg.groups_claim)
        state = self.hub.state
        node, changes = state.register_oidc(
            login.node_key, login.hostname, user, str(claims["sub"]), groups=groups, now=self.hub.now()
        )
        self.hub.dispatch(changes)
        log.info("node registered via oidc", extra={"node": node.name, "user": user})
        detail = audit.register_detail(node, changes)
        detail.update({"via": "oidc", "groups": sorted(set(groups))})
        remote = request.remote or ""
        self.hub.record(audit.node_actor(node.name), audit.NODE_REGISTER, node.name, detail, remote)
        return node

    async def _exchange(self, code: str, verifier: str) -> Mapping[str, Any]:
        """The token request (RFC 6749 section 4.1.3, client_secret_basic; RFC 7636 section 4.5)."""
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": self.redirect_uri,
            "code_verifier": verifier,
        }
        try:
            async with httpx.AsyncClient(timeout=HTTP_TIMEOUT) as http:
                resp = await http.post(
                    self.metadata["token_endpoint"], data=form, auth=(self.cfg.client_id, self._secret)
                )
            token = resp.json()
        except (httpx.HTTPError, ValueError) as exc:
            raise AuthError(f"code exchange at the provider failed ({type(exc).__name__})") from None
        if resp.status_code != 200 or not isinstance(token, dict):
            err = token.get("error", resp.status_code) if isinstance(token, dict) else resp.status_code
            raise AuthError(f"the provider refused the code exchange ({str(err)[:100]})")
        return token

    def _validate_id_token(self, token: Mapping[str, Any], nonce: str) -> Mapping[str, Any]:
        """OpenID Connect Core 1.0 section 3.1.3.7: signature, iss, aud, exp/iat, nonce."""
        id_token = token.get("id_token")
        if not isinstance(id_token, str):
            raise AuthError("the provider returned no ID token")
        algs = self.metadata.get("id_token_signing_alg_values_supported") or ["RS256"]
        try:
            keys = KeySet.import_key_set(self.metadata["jwks"])
            decoded = jwt.decode(id_token, keys, registry=JWSRegistry(algorithms=algs))
            claims = CodeIDToken(
                decoded.claims,
                decoded.header,
                {"iss": {"essential": True, "value": self.metadata["issuer"]}},
                {"nonce": nonce, "client_id": self.cfg.client_id, "access_token": token.get("access_token")},
            )
            claims.validate(leeway=LEEWAY)
        except (JoseError, ValueError, KeyError) as exc:
            what = getattr(exc, "claim", "") or type(exc).__name__
            raise AuthError(f"the ID token is not valid ({what}: {exc})") from None
        return dict(claims)
