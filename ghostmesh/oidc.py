"""OIDC login for nodes (``server.auth_method = "oidc"``): the login listener, the provider, waiting nodes.

The flow (OpenID Connect Core 1.0, section 3.1 "Authentication using the Authorization Code Flow"):

1. A node calls ``Register`` with no auth key and a node key the server does not know. ghostmesh creates a
   pending login (:mod:`ghostmesh.oidc_core`: random id, ``state``, ``nonce`` and PKCE verifier, RFC 7636,
   and a per-login CSRF key; in memory only, bound to the proven node key, the requested hostname, the
   address the call came from and the time, expiring after ``oidc.login_timeout``) and answers
   ``auth_url = <oidc.public_url>/oidc/login/<id>``. Nothing is written to the store. Anyone can make a
   fresh node key, so the logins in progress are capped: ``oidc.max_pending`` in all and
   ``oidc.max_pending_per_source`` per source address; beyond, Register is RESOURCE_EXHAUSTED and no
   login is replaced or made.
2. The node prints the URL and calls ``WaitForLogin`` (proven with the same node key, see
   :meth:`OidcService.wait`).
3. The user's browser opens the URL: ``GET /oidc/login/<id>`` answers a confirmation page
   (:mod:`ghostmesh.oidc_pages`) naming the node (its hostname, node key, the address its Register came
   from and when), sets the login's cookie (``HttpOnly``, ``SameSite=Lax``, ``Secure`` and ``__Host-`` on
   https) and shows a button. The GET never redirects to the provider: a link sent by someone else shows
   whose device it is before anything happens.
4. The button posts the form (a CSRF token derived from the cookie, :func:`ghostmesh.oidc_core.csrf_token`);
   a good post confirms the login for this browser, once, and is answered 303 to the provider's
   authorization endpoint (``response_type=code``, ``scope``, ``state``, ``nonce``, ``code_challenge`` S256).
5. The provider redirects to ``/oidc/callback?code&state``. An unknown or expired ``state`` is answered 400
   and changes nothing; a callback in a browser other than the one that confirmed is refused (the login
   stays for its own browser). Otherwise the login is consumed (single use; its cookie is deleted), the
   code is exchanged at the token endpoint with the PKCE verifier (plain httpx: authlib 1.9's httpx
   integration raises a DeprecationWarning at import, which our warnings-as-errors runs reject), and the ID
   token is validated (section 3.1.3.7): signature against the provider's JWKS, ``iss``, ``aud`` = client
   id, ``exp``/``iat`` and ``nonce`` = the pending login's nonce (joserfc + authlib's ``CodeIDToken``).
   A token signed with a key the JWKS in hand lacks makes ghostmesh fetch the JWKS again, at most once per
   ``oidc.jwks_refresh_interval`` (section 10.1.1, :class:`ghostmesh.oidc_core.JwksCache`).
6. Who may join: the allow-lists (``oidc.allowed_domains``, ``allowed_groups``, ``allowed_users``,
   :func:`ghostmesh.oidc_core.refusal`). Then which user: the one bound to the account's (``iss``,
   ``sub``) if any, whatever name the claims carry now; else the ``oidc.username_claim`` (falling back to
   ``email``, then ``sub``), created and bound if missing. An existing user bound to nothing is not taken
   over by a login that happens to carry its name: it is refused, with the ``ghostctl users bind``
   command an admin would run (:meth:`ghostmesh.state.State.resolve_oidc_user`). Groups (``groups_claim``)
   are stored for policy group members ``"oidc:<group>"``. The node is registered to the user as an auth
   key registration does, the change is dispatched and audited (``node.register``, ``via: oidc``), and
   ``WaitForLogin`` returns the node.

Every refusal is a page with one line (HTML, escaped), the same line for the waiting node (UNAUTHENTICATED
for what did not verify, PERMISSION_DENIED for an account that may not join), nothing written, and one
failed authentication counted for the browser's source: the limits fold them into one ``auth.failed``
audit row per source and minute (:mod:`ghostmesh.limits`), by kind (``oidc:not_allowed`` …), and
``Refusals.oidc_refused`` counts them.

Discovery (``<issuer>/.well-known/openid-configuration``, OpenID Connect Discovery 1.0 section 4) runs once
at start; a failure stops the start with a one-line error. Never logged nor put in an error: the client
secret, codes, tokens, ``state``, nonces, login ids (the login URL is a capability until it is confirmed)
and cookies.

Why one module of about 460 lines: it is the login's whole I/O edge, the HTTP listener, the provider
client (discovery, token exchange, JWKS) and the nodes waiting on a login, which share the pending
logins; the pure rules live in :mod:`ghostmesh.oidc_core`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any

import httpx
from aiohttp import web
from authlib.oauth2.rfc6749.parameters import prepare_grant_uri
from authlib.oauth2.rfc7636 import create_s256_code_challenge
from authlib.oidc.core import CodeIDToken
from joserfc import jws, jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet
from joserfc.jws import JWSRegistry

from ghostcore.addr import grpc_peer_of
from ghostcore.config import parse_hostport
from ghostcore.errors import (
    AuthError,
    ConfigError,
    GhostError,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
)
from ghostmesh import audit, oidc_pages
from ghostmesh.config import OidcConfig
from ghostmesh.hub import Hub
from ghostmesh.limits import source_of
from ghostmesh.oidc_core import (
    KIND_BAD_STATE,
    KIND_BROWSER,
    KIND_INVALID,
    KIND_NOT_ALLOWED,
    KIND_USER,
    JwksCache,
    PendingLogin,
    PendingLogins,
    csrf_token,
    groups_from_claims,
    new_cookie,
    one_line,
    refusal,
    username_from_claims,
)
from ghostmesh.store.base import NodeRec

__all__ = [  # the pure parts, re-exported where callers have always found them
    "OidcService",
    "PendingLogin",
    "PendingLogins",
    "groups_from_claims",
    "username_from_claims",
]

log = logging.getLogger(__name__)

LOGIN_PATH = "/oidc/login/"
CALLBACK_PATH = "/oidc/callback"
HTTP_TIMEOUT = 10.0  # seconds, for each request to the provider
LEEWAY = 60  # seconds of clock skew accepted on exp / iat
MAX_FORM_BYTES = 4096  # the confirmation form is one token
MSG_BAD_STATE = "login failed: unknown or expired state; run ghostlink join again"
MSG_LOGGED_IN = "logged in; you can close this window"
MSG_UNKNOWN_LOGIN = "login failed: unknown or expired login; run ghostlink join again"
TITLE_FAILED = "Login failed"


class LoginRefused(PermissionDenied):
    """The account was verified but may not join (an allow-list), or not as that user."""


class OidcService:
    """Discovery, the pending logins, the login listener (aiohttp) and ``WaitForLogin``."""

    def __init__(self, cfg: OidcConfig, hub: Hub, clock: Callable[[], float]) -> None:
        self.cfg = cfg
        self.hub = hub
        self.clock = clock
        self.pending = PendingLogins(cfg.login_timeout, cfg.max_pending, cfg.max_pending_per_source)
        self.public_url = cfg.public_url.rstrip("/")
        self.redirect_uri = self.public_url + CALLBACK_PATH
        self.secure = self.public_url.startswith("https://")
        self.mesh_name = oidc_pages.origin(self.public_url).partition("://")[2]
        self.metadata: dict[str, Any] = {}
        self.jwks = JwksCache(cfg.jwks_refresh_interval)
        self._jwks_lock = asyncio.Lock()  # one JWKS fetch at a time; the others use its result
        self._secret = cfg.secret()
        self._waiters: dict[str, asyncio.Future[NodeRec]] = {}  # login id -> its WaitForLogin
        self._runner: web.AppRunner | None = None
        self._headers = oidc_pages.headers()
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
        for key in ("authorization_endpoint", "token_endpoint", "jwks_uri"):
            if not isinstance(meta.get(key), str):
                raise Unavailable(f"oidc.issuer: discovery at {url} lacks {key}")
        self.jwks.attempted(self.clock())
        try:
            self.jwks.install(jwks)
        except ValueError as exc:
            raise Unavailable(f"oidc.issuer: {exc} ({meta['jwks_uri']})") from None
        self.metadata = meta
        self._headers = oidc_pages.headers((oidc_pages.origin(meta["authorization_endpoint"]),))
        app = web.Application(client_max_size=MAX_FORM_BYTES)
        app.router.add_get(LOGIN_PATH + "{id}", self._login_page)
        app.router.add_post(LOGIN_PATH + "{id}", self._confirm)
        app.router.add_get(CALLBACK_PATH, self._callback)
        runner = web.AppRunner(app, access_log=None)  # an access log would hold login ids and codes
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

    def begin(self, node_key: str, hostname: str, source: str, remote: str = "") -> str:
        """Start a login for ``node_key`` from ``source`` (``remote``: the address shown on the
        confirmation page); the URL the user opens. ResourceExhausted (counted) beyond the caps."""
        now = self.clock()
        for gone in self.pending.expire(now):
            self._fail(gone.id, AuthError("login expired; run ghostlink join again"))
        old = self.pending.for_node(node_key, now)
        try:
            login = self.pending.create(node_key, hostname, source, now, remote)
        except ResourceExhausted:
            self.hub.limits.refusals.oidc_pending += 1
            raise
        if old is not None:
            self._fail(old.id, AuthError("a newer login for this node was started"))
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

    def _cookie_name(self, login_id: str) -> str:
        # __Host-: only this origin, over https, may set it (RFC 6265bis section 4.1.3.2). A cookie per
        # login, so two joins in one browser do not undo each other.
        return f"{'__Host-' if self.secure else ''}ghostmesh-login-{login_id}"

    def _page(self, status: int, title: str, message: str) -> web.Response:
        return web.Response(
            status=status,
            text=oidc_pages.message_page(title, message),
            content_type="text/html",
            headers=self._headers,
        )

    def _refused(self, request: web.Request, kind: str, status: int, message: str) -> web.Response:
        """A refused step: counted for the browser's source (one coalesced audit row per source and
        minute), logged without secrets, answered with a one-line page."""
        remote = request.remote or ""
        source = source_of(grpc_peer_of(remote, 0)) or remote  # the gRPC peer form limits expect
        self.hub.limits.auth_failed(source or "unknown", kind, self.hub.now())
        self.hub.limits.refusals.oidc_refused += 1
        log.warning("oidc login refused (%s) from %s: %s", kind, remote, message)
        return self._page(status, TITLE_FAILED, message)

    async def _login_page(self, request: web.Request) -> web.StreamResponse:
        now = self.clock()
        login = self.pending.get(request.match_info["id"], now)
        if login is None:
            return self._page(404, TITLE_FAILED, MSG_UNKNOWN_LOGIN)
        if login.confirmed:
            return self._page(
                409, TITLE_FAILED, "login failed: this login was confirmed already; run ghostlink join again"
            )
        name = self._cookie_name(login.id)
        cookie = request.cookies.get(name) or new_cookie()  # a reload keeps the browser's cookie
        html = oidc_pages.confirm_page(
            login, csrf_token(login, cookie), LOGIN_PATH + login.id, now, self.mesh_name
        )
        resp = web.Response(text=html, content_type="text/html", headers=self._headers)
        resp.set_cookie(
            name,
            cookie,
            max_age=max(1, int(login.expires - now)),
            path="/",
            secure=self.secure,
            httponly=True,
            samesite="Lax",  # sent on the provider's redirect back; not on another site's form post
        )
        return resp

    async def _confirm(self, request: web.Request) -> web.StreamResponse:
        login_id = request.match_info["id"]
        if self.pending.get(login_id, self.clock()) is None:
            return self._page(404, TITLE_FAILED, MSG_UNKNOWN_LOGIN)
        try:
            form = await request.post()
        except (ValueError, web.HTTPException):
            return self._page(400, TITLE_FAILED, "login failed: the form could not be read; reload the page")
        token = form.get("csrf")
        cookie = request.cookies.get(self._cookie_name(login_id), "")
        try:
            login = self.pending.confirm(
                login_id, cookie, token if isinstance(token, str) else "", self.clock()
            )
        except AuthError as exc:
            return self._refused(request, KIND_BROWSER, 403, str(exc))
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
        raise web.HTTPSeeOther(url, headers=self._headers)  # RFC 9110 section 15.4.4: GET after a POST

    async def _callback(self, request: web.Request) -> web.StreamResponse:
        state = request.query.get("state", "")
        found = self.pending.by_state(state, self.clock())
        cookie = request.cookies.get(self._cookie_name(found.id), "") if found is not None else ""
        try:
            login = self.pending.take(state, cookie, self.clock())
        except AuthError as exc:
            return self._refused(request, KIND_BROWSER, 400, str(exc))
        if login is None:
            return self._refused(request, KIND_BAD_STATE, 400, MSG_BAD_STATE)
        try:
            node = await self._complete(login, request)
        except GhostError as exc:
            self._fail(login.id, exc)
            kind = KIND_INVALID
            if isinstance(exc, LoginRefused):
                kind = KIND_NOT_ALLOWED
            elif isinstance(exc, PermissionDenied):
                kind = KIND_USER
            message = str(exc) if str(exc).startswith("login ") else f"login failed: {exc}"
            resp = self._refused(request, kind, 403 if isinstance(exc, PermissionDenied) else 400, message)
        else:
            fut = self._waiters.pop(login.id, None)
            if fut is not None and not fut.done():
                fut.set_result(node)
            resp = self._page(200, "Logged in", MSG_LOGGED_IN)
        resp.del_cookie(self._cookie_name(login.id), path="/", secure=self.secure, httponly=True)
        return resp

    async def _complete(self, login: PendingLogin, request: web.Request) -> NodeRec:
        if "error" in request.query:
            raise AuthError(f"the provider refused the login: {one_line(request.query['error'])}")
        code = request.query.get("code", "")
        if not code:
            raise AuthError("the provider sent no authorization code")
        token = await self._exchange(code, login.verifier)
        claims = await self._validate_id_token(token, login.nonce)
        user = username_from_claims(claims, self.cfg.username_claim)
        groups = groups_from_claims(claims, self.cfg.groups_claim)
        refused = refusal(claims, user, groups, self.cfg)
        if refused is not None:
            raise LoginRefused(refused.message)
        issuer = str(claims["iss"])
        with self.hub.transaction() as tx:
            node, changes = self.hub.state.register_oidc(
                login.node_key, login.hostname, user, str(claims["sub"]),
                issuer=issuer, groups=groups, now=self.hub.now(),
            )  # fmt: skip
            tx.dispatch(changes)
            detail = audit.register_detail(node, changes)
            detail.update({"via": "oidc", "groups": sorted(set(groups))})
            remote = request.remote or ""
            tx.record(audit.node_actor(node.name), audit.NODE_REGISTER, node.name, detail, remote)
        log.info("node registered via oidc", extra={"node": node.name, "user": node.user})
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
            raise AuthError(f"the provider refused the code exchange ({one_line(str(err))})")
        return token

    async def _signing_keys(self, id_token: str) -> KeySet:
        """The provider's keys, fetched again when the token names a ``kid`` they lack (at most once per
        ``oidc.jwks_refresh_interval``; the keys in hand stay until a new set arrives)."""
        try:
            header = jws.extract_compact(id_token.encode()).headers()
        except (JoseError, ValueError) as exc:
            raise AuthError(f"the ID token is not valid ({type(exc).__name__})") from None
        kid = header.get("kid")
        kid = kid if isinstance(kid, str) else None
        async with self._jwks_lock:
            if not self.jwks.knows(kid):
                await self._refetch_jwks(kid)
            if self.jwks.keys is None:  # pragma: no cover - start() installs a set or fails
                raise Unavailable("the provider's keys are not loaded; restart ghostmesh")
            return self.jwks.keys

    async def _refetch_jwks(self, kid: str | None) -> None:
        now = self.clock()
        shown = repr(one_line(kid, 64)) if kid is not None else "none"
        if not self.jwks.may_fetch(now):
            raise AuthError(
                f"the ID token is signed by a key the provider did not publish (kid {shown}); its keys are "
                f"fetched again at most every {self.cfg.jwks_refresh_interval:g} s, retry in "
                f"{max(1, round(self.jwks.retry_in(now)))} s"
            )
        self.jwks.attempted(now)
        url = self.metadata["jwks_uri"]
        try:
            async with httpx.AsyncClient(timeout=HTTP_TIMEOUT) as http:
                self.jwks.install((await http.get(url)).raise_for_status().json())
        except (httpx.HTTPError, ValueError) as exc:  # the keys in hand stay in force
            log.warning("oidc: fetching the provider's keys from %s failed (%s)", url, type(exc).__name__)
        else:
            log.info("oidc: fetched the provider's keys again (a token named kid %s)", shown)
        if not self.jwks.knows(kid):
            raise AuthError(f"the ID token is signed by a key the provider does not publish (kid {shown})")

    async def _validate_id_token(self, token: Mapping[str, Any], nonce: str) -> Mapping[str, Any]:
        """OpenID Connect Core 1.0 section 3.1.3.7: signature, iss, aud, exp/iat, nonce."""
        id_token = token.get("id_token")
        if not isinstance(id_token, str):
            raise AuthError("the provider returned no ID token")
        keys = await self._signing_keys(id_token)
        algs = self.metadata.get("id_token_signing_alg_values_supported") or ["RS256"]
        try:
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
            raise AuthError(f"the ID token is not valid ({one_line(f'{what}: {exc}', 200)})") from None
        if not isinstance(claims.get("sub"), str) or not claims["sub"]:
            raise AuthError("the ID token is not valid (sub: missing)")
        return dict(claims)
