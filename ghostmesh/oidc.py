"""OIDC login for nodes (``server.auth_method = "oidc"``): the login listener and the waiting nodes.

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
   stays for its own browser). Otherwise the login is consumed (single use; its cookie is deleted), and
   the provider client (:class:`ghostmesh.oidc_client.OidcProvider`, shared with the console's admin
   login) exchanges the code with the PKCE verifier and validates the ID token (section 3.1.3.7:
   signature against the provider's cached JWKS, ``iss``, ``aud``, ``exp``/``iat``, ``nonce`` = the
   pending login's nonce).
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

Discovery runs once at start (:meth:`ghostmesh.oidc_client.OidcProvider.discover`, before this
listener starts); a failure stops the start with a one-line error. Never logged nor put in an error: the
client secret, codes, tokens, ``state``, nonces, login ids (the login URL is a capability until it is
confirmed) and cookies.

Why one module of about 330 lines: it is the node login's whole I/O edge, the HTTP listener and the nodes
waiting on a login, which share the pending logins; the pure rules live in :mod:`ghostmesh.oidc_core`,
the requests to the provider in :mod:`ghostmesh.oidc_client`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from aiohttp import web

from ghostcore.addr import grpc_peer_of
from ghostcore.config import parse_hostport
from ghostcore.errors import (
    AuthError,
    GhostError,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
)
from ghostmesh import audit, oidc_pages
from ghostmesh.config import OidcConfig
from ghostmesh.hub import Hub
from ghostmesh.limits import source_of
from ghostmesh.oidc_client import OidcProvider
from ghostmesh.oidc_core import (
    KIND_BAD_STATE,
    KIND_BROWSER,
    KIND_INVALID,
    KIND_NOT_ALLOWED,
    KIND_USER,
    PendingLogin,
    PendingLogins,
    csrf_token,
    groups_from_claims,
    new_cookie,
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
MAX_FORM_BYTES = 4096  # the confirmation form is one token
MSG_BAD_STATE = "login failed: unknown or expired state; run ghostlink join again"
MSG_LOGGED_IN = "logged in; you can close this window"
MSG_UNKNOWN_LOGIN = "login failed: unknown or expired login; run ghostlink join again"
TITLE_FAILED = "Login failed"


class LoginRefused(PermissionDenied):
    """The account was verified but may not join (an allow-list), or not as that user."""


class OidcService:
    """Discovery, the pending logins, the login listener (aiohttp) and ``WaitForLogin``."""

    def __init__(self, cfg: OidcConfig, hub: Hub, provider: OidcProvider, clock: Callable[[], float]) -> None:
        self.cfg = cfg
        self.provider = provider
        self.hub = hub
        self.clock = clock
        self.pending = PendingLogins(cfg.login_timeout, cfg.max_pending, cfg.max_pending_per_source)
        self.public_url = cfg.public_url.rstrip("/")
        self.redirect_uri = self.public_url + CALLBACK_PATH
        self.secure = self.public_url.startswith("https://")
        self.mesh_name = oidc_pages.origin(self.public_url).partition("://")[2]
        self._waiters: dict[str, asyncio.Future[NodeRec]] = {}  # login id -> its WaitForLogin
        self._runner: web.AppRunner | None = None
        self._headers = oidc_pages.headers()
        self.port = 0

    async def start(self) -> None:
        """Listen on ``oidc.http_bind`` (the provider was discovered already); Unavailable (one line)
        when the port cannot be bound."""
        self._headers = oidc_pages.headers((oidc_pages.origin(self.provider.authorization_endpoint),))
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
        log.info("oidc login listening", extra={"bind": self.cfg.http_bind, "issuer": self.cfg.issuer})

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
        url = self.provider.authorization_url(self.redirect_uri, login.state, login.nonce, login.verifier)
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
        claims = await self.provider.callback_claims(
            request.query, login.verifier, login.nonce, self.redirect_uri
        )
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
