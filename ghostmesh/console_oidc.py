"""The web console's OIDC login for admins (``console.oidc_admins``): its two routes, an I/O edge.

The flow (OpenID Connect Core 1.0 section 3.1, authorization code with PKCE, RFC 7636):

1. The login page links to ``<console.public_url>/login/oidc`` (the public origin, so the cookies below
   belong to the origin the provider comes back to). ``GET /login/oidc`` sets the browser's pre-login
   cookie (256 random bits; ``HttpOnly``, ``SameSite=Lax`` so that it rides on the provider's top-level
   redirect back, ``Secure`` and ``__Host-`` over TLS; a browser that has one keeps it), makes a login in
   progress bound to that cookie (:class:`ghostmesh.console_core.OidcLogins`: ``state``, ``nonce``, PKCE
   verifier) and answers 303 to the provider's authorization endpoint
   (:meth:`ghostmesh.oidc_client.OidcProvider.authorization_url`). A GET, not a form: starting a login
   changes nothing but that table, which is capped in all and per source, and a link from another site
   can only send an admin to their own provider login.
2. The provider sends the browser to ``/login/oidc/callback?code&state``. An unknown, used or expired
   ``state`` is refused; so is a ``state`` arriving in a browser without the cookie that started it (an
   attacker cannot push their own login into an admin's browser). The login is then consumed (once), and
   the same provider client the nodes' login uses exchanges the code with the PKCE verifier and verifies
   the ID token (signature against the cached JWKS, ``iss``, ``aud``, ``exp``/``iat``, ``nonce``).
3. :func:`ghostmesh.oidc_core.admin_match` decides: a verified email, a ``group:`` or a ``sub:`` in
   ``console.oidc_admins``; an account it does not admit gets a refusal page and no session.
4. Admitted: a console session like an API-key login's (the console makes it, see
   :meth:`ghostmesh.console.Console.open_session`), whose actor names the account (``oidc:<email>`` or
   ``oidc:sub:<sub>``): every action it takes goes through the same Admin methods and is audited with that
   actor. There is no key to revoke: the session ends at logout or after ``console.session_lifetime``;
   the allow-list is read at start, so a change to it (a restart) ends every session anyway, and a
   change of groups at the provider counts from the next login.

Each refused step (unknown state, wrong browser, a provider refusal or a token that does not verify, an
account not admitted) is one failed authentication of the browser's source in the same
:class:`ghostmesh.limits.Limits` windows as API-key logins, named ``console.oidc:<kind>`` in the
``auth.failed`` audit rows; past ``limits.auth_failures_per_minute`` the refusal is 429 until the window
closes (a good login still goes through). Never logged nor shown: codes, tokens, ``state``, nonces and
cookies.
"""

from __future__ import annotations

import logging
import urllib.parse
from collections.abc import Callable
from typing import TYPE_CHECKING

from aiohttp import web

from ghostcore.errors import AuthError, GhostError, ResourceExhausted
from ghostmesh import console_pages as pages
from ghostmesh.config import ConsoleConfig, OidcConfig
from ghostmesh.console_core import OidcLogins
from ghostmesh.limits import Limits
from ghostmesh.oidc_core import (
    KIND_BAD_STATE,
    KIND_BROWSER,
    KIND_INVALID,
    KIND_NOT_ALLOWED,
    admin_match,
    groups_from_claims,
    new_cookie,
)

if TYPE_CHECKING:  # the provider client (httpx, authlib) is loaded by the server when OIDC is on
    from ghostmesh.oidc_client import OidcProvider

log = logging.getLogger(__name__)

START_PATH = "/login/oidc"
CALLBACK_PATH = "/login/oidc/callback"
PRELOGIN_COOKIE = "ghostmesh_console_oidc"
METHOD = "console."  # + the kind: how a refused step is named in the auth.failed audit rows
MSG_BAD_STATE = "login failed: unknown, used or expired state; start again from the login page"
MSG_NOT_ADMIN = "login refused: this account is not in console.oidc_admins; ask an admin"

OpenSession = Callable[[web.Request, str], web.Response]


class ConsoleOidc:
    """The console's OIDC routes. ``open_session(request, actor)`` is the console's own: it makes the
    session and answers with its cookie; ``source(request)`` is the limits' source of a request."""

    def __init__(
        self,
        cfg: ConsoleConfig,
        oidc: OidcConfig,
        provider: OidcProvider,
        limits: Limits,
        now: Callable[[], float],
        *,
        secure: bool,
        open_session: OpenSession,
        source: Callable[[web.Request], str],
    ) -> None:
        self.admins = tuple(cfg.oidc_admins)
        self.groups_claim = oidc.groups_claim
        self.provider = provider
        self.limits = limits
        self.now = now
        self.secure = secure
        self.open_session = open_session
        self.source = source
        self.logins = OidcLogins(oidc.login_timeout, oidc.max_pending, oidc.max_pending_per_source)
        self.public_url = cfg.public_url.rstrip("/")
        self.redirect_uri = self.public_url + CALLBACK_PATH
        self.start_url = self.public_url + START_PATH
        self.provider_name = urllib.parse.urlsplit(oidc.issuer).netloc
        self.cookie = f"__Host-{PRELOGIN_COOKIE}" if secure else PRELOGIN_COOKIE

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_get(START_PATH, self.start)
        router.add_get(CALLBACK_PATH, self.callback)

    def _page(self, text: str, status: int) -> web.Response:
        return web.Response(text=text, status=status, content_type="text/html", headers=pages.headers())

    def _login_page(self, error: str, status: int) -> web.Response:
        text = pages.login_page(error, oidc_url=self.start_url, oidc_name=self.provider_name)
        return self._page(text, status)

    async def start(self, request: web.Request) -> web.StreamResponse:
        cookie = request.cookies.get(self.cookie) or new_cookie()
        try:
            login = self.logins.start(cookie, self.source(request), self.now())
        except ResourceExhausted as err:
            return self._login_page(f"Login failed: {err}", 429)
        url = self.provider.authorization_url(self.redirect_uri, login.state, login.nonce, login.verifier)
        resp = web.Response(status=303, headers={**pages.headers(), "Location": url})
        resp.set_cookie(
            self.cookie,
            cookie,
            max_age=int(self.logins.timeout),
            path="/",
            secure=self.secure,
            httponly=True,
            samesite="Lax",  # sent on the provider's top-level redirect back; not on other sites' requests
        )
        return resp

    async def callback(self, request: web.Request) -> web.StreamResponse:
        cookie = request.cookies.get(self.cookie, "")
        try:
            login = self.logins.take(request.query.get("state", ""), cookie, self.now())
        except AuthError as err:
            return self._refused(request, KIND_BROWSER, 400, str(err))
        if login is None:
            return self._refused(request, KIND_BAD_STATE, 400, MSG_BAD_STATE)
        try:
            claims = await self.provider.callback_claims(
                request.query, login.verifier, login.nonce, self.redirect_uri
            )
        except GhostError as err:
            resp = self._refused(request, KIND_INVALID, 400, f"login failed: {err}")
        else:
            match = admin_match(claims, groups_from_claims(claims, self.groups_claim), self.admins)
            if match is None:
                resp = self._refused(request, KIND_NOT_ALLOWED, 403, MSG_NOT_ADMIN)
            else:
                log.info("console oidc login", extra={"actor": match.actor, "admitted_by": match.entry})
                resp = self.open_session(request, match.actor)
        resp.del_cookie(self.cookie, path="/", secure=self.secure, httponly=True)  # used: not needed again
        return resp

    def _refused(self, request: web.Request, kind: str, status: int, message: str) -> web.Response:
        """A refused step: one failed authentication of the source (429 once over the limit), logged
        without secrets, answered with the login page and the one-line reason."""
        now = self.now()
        source = self.source(request)
        reopens = self.limits.auth_over(source, now)
        self.limits.auth_failed(source, METHOD + kind, now, refused=reopens is not None)
        log.warning("console oidc login refused (%s) from %s: %s", kind, source, message)
        if reopens is not None:
            wait = max(1, round(reopens - now))
            return self._login_page(f"Too many failed logins from {source}; retry in {wait} s.", 429)
        return self._login_page(message, status)
