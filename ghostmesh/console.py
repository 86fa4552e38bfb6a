"""The web admin console (``[console] listen``): an aiohttp listener on the server's loop (the I/O edge).

What an admin can do here is what the Admin gRPC service does, through the same methods of
:class:`ghostmesh.api.admin.AdminServicer` (rename, expire and delete nodes, create and revoke auth keys,
approve routes, check and apply the policy), so each change is made and audited exactly as over gRPC: in
one hub transaction with its audit row, the actor being the API key the admin logged in with
(``apikey:<id>``) or the OIDC account (``oidc:<email>``) and the remote ``console:<peer>``
(``ipv4:127.0.0.1:54321``, gRPC's form).

Login: the admin pastes an API key; it is checked as a gRPC call's ``authorization`` metadata is
(:meth:`ghostmesh.api.admin_base.AdminBase.api_key_actor`). A failed login is one failed authentication of
its source (an IPv4 address or IPv6 /64), counted in the same :class:`ghostmesh.limits.Limits` windows as
gRPC's (summarised in the audit log as ``auth.failed``); a source over ``limits.auth_failures_per_minute``
gets 429 until its window closes. With ``console.oidc_admins`` the admin may instead log in at the
``[oidc]`` provider (:mod:`ghostmesh.console_oidc`); that session's actor is ``oidc:<email>`` (or
``oidc:sub:<sub>``) and everything else about it is the same. The session (:mod:`ghostmesh.console_core`)
is a cookie holding a random id: ``HttpOnly``, ``SameSite=Strict``, ``Path=/``, and over TLS ``Secure``
with the ``__Host-`` prefix. Over plain HTTP (loopback only, see :class:`ghostmesh.config.ConsoleConfig`)
the cookie has no ``Secure`` flag, since a browser would not send it back over http; it never leaves the
machine. A session ends at logout, after ``console.session_lifetime``, or (an API-key login) as soon as
its API key is revoked or expires.

Every POST carries the session's CSRF token (form field ``csrf``); a POST without the right one is 403
and changes nothing. Pages: :mod:`ghostmesh.console_pages` (escaping, CSP and the other headers).

The mesh picture updates without reload over server-sent events (``/events``, HTML Living Standard
section 9.2): the console subscribes once to :meth:`ghostmesh.hub.Hub.add_listener`; each committed batch
sets every open stream's event, and each stream sends a fresh picture, at most one per
:data:`EVENT_COALESCE` seconds, plus a comment every :data:`KEEPALIVE` seconds. At most
:data:`MAX_EVENT_STREAMS` streams are open at once (others get 503).

Why one module of about 550 lines: it is the console's whole I/O edge but for the OIDC login (routes,
session checks, the SSE streams), one handler per page or action; the session logic
(:mod:`ghostmesh.console_core`), the HTML (:mod:`ghostmesh.console_pages`) and the OIDC login's two routes
(:mod:`ghostmesh.console_oidc`) already live apart.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web

from ghostcore import auditchain
from ghostcore.addr import format_endpoint, grpc_peer_of
from ghostcore.config import parse_hostport
from ghostcore.errors import AuthError, GhostError, InvalidArgument, NotFound, PermissionDenied, Unavailable
from ghostcore.pb.ghostmesh.v1 import admin_pb2 as apb
from ghostmesh import console_pages as pages
from ghostmesh.api.admin import AdminServicer
from ghostmesh.api.admin_base import Caller
from ghostmesh.changes import Change
from ghostmesh.config import ConsoleConfig, OidcConfig
from ghostmesh.console_core import Session, Sessions, mesh_picture
from ghostmesh.console_oidc import ConsoleOidc
from ghostmesh.limits import source_of

if TYPE_CHECKING:  # the provider client (httpx, authlib) is loaded by the server when OIDC is on
    from ghostmesh.oidc_client import OidcProvider

log = logging.getLogger(__name__)

COOKIE = "ghostmesh_console"
LOGIN_METHOD = "console.login"  # how a failed console login is named in the auth.failed audit rows
MAX_EVENT_STREAMS = 32
EVENT_COALESCE = 0.2  # seconds: a burst of changes makes one picture
KEEPALIVE = 15.0  # seconds between comments on an idle event stream
AUDIT_PAGE = 200  # entries the audit page lists (the newest)
AUDIT_FETCH = 1000  # entries read per store call while verifying
MAX_FORM_BYTES = 256 * 1024  # a policy text fits; anything larger is refused before it is read

Resp = web.StreamResponse
Handler = Callable[[web.Request], Awaitable[Resp]]
Action = Callable[[web.Request, Session, Caller], Awaitable[Resp]]


def peer_of(request: web.Request) -> str:
    """The client as gRPC names a peer: ``ipv4:1.2.3.4:5`` or ``ipv6:[::1]:5``."""
    peer = request.transport.get_extra_info("peername") if request.transport is not None else None
    if not peer:
        return "unknown"
    host, port = str(peer[0]), int(peer[1])
    return grpc_peer_of(host, port)


def status_of(err: GhostError) -> int:
    if isinstance(err, PermissionDenied):
        return 403
    if isinstance(err, AuthError):
        return 401
    if isinstance(err, NotFound):
        return 404
    if isinstance(err, Unavailable):
        return 503
    return 400


class Console:
    """The console's handlers and state: its sessions and its open event streams."""

    def __init__(
        self,
        cfg: ConsoleConfig,
        admin: AdminServicer,
        *,
        secure: bool,
        oidc: tuple[OidcConfig, OidcProvider] | None = None,
    ) -> None:
        self.cfg = cfg
        self.admin = admin
        self.hub = admin.hub
        self.state = admin.state
        self.secure = secure
        self.cookie = f"__Host-{COOKIE}" if secure else COOKIE
        self.sessions = Sessions(cfg.session_lifetime, cfg.max_sessions)
        self.oidc: ConsoleOidc | None = None
        if oidc is not None:  # console.oidc_admins: admins may also log in at the provider
            self.oidc = ConsoleOidc(
                cfg, *oidc, self.hub.limits, self.hub.now,
                secure=secure, open_session=self.open_session, source=self._source,
            )  # fmt: skip
        self._streams: set[asyncio.Event] = set()
        self.closing = False
        self.hub.add_listener(self._changed)

    # -- plumbing --------------------------------------------------------------------------------------

    def _changed(self, _batch: Sequence[Change], _now: float) -> None:
        for ev in self._streams:
            ev.set()

    def close(self) -> None:
        """End every event stream (the listener is shutting down)."""
        self.closing = True
        for ev in self._streams:
            ev.set()

    def _session(self, request: web.Request) -> Session | None:
        sid = request.cookies.get(self.cookie, "")
        session = self.sessions.get(sid, self.hub.now()) if sid else None
        if session is not None and session.key_id and not self.admin.api_key_in_force(session.key_id):
            self.sessions.end(session.id)  # the key was revoked or expired: so is the session
            return None
        return session

    @staticmethod
    def _html(text: str, status: int = 200) -> web.Response:
        return web.Response(text=text, status=status, content_type="text/html", headers=pages.headers())

    @staticmethod
    def _redirect(where: str) -> web.Response:
        return web.Response(status=303, headers={**pages.headers(), "Location": where})

    def page(self, render: Callable[[web.Request, Session], web.Response]) -> Handler:
        """A GET handler that needs a session (else: to the login page)."""

        async def handler(request: web.Request) -> Resp:
            session = self._session(request)
            if session is None:
                return self._redirect("/login")
            return render(request, session)

        return handler

    def action(self, run: Action) -> Handler:
        """A POST handler that needs a session and its CSRF token (else 401 / 403, nothing changed)."""

        async def handler(request: web.Request) -> Resp:
            session = self._session(request)
            if session is None:
                return self._login_html("Log in first.", 401)
            form = await request.post()
            token = form.get("csrf")
            if not isinstance(token, str) or not session.csrf_ok(token):
                return self._html(pages.refused_page("missing or wrong CSRF token"), 403)
            caller = Caller(session.actor, f"console:{peer_of(request)}")
            try:
                return await run(request, session, caller)
            except GhostError as err:  # what an action does not turn into a message on its own page
                return self._html(pages.refused_page(str(err), session.csrf), status_of(err))

        return handler

    @staticmethod
    def _field(form: Mapping[str, object], name: str) -> str:
        """A posted text field ("" when absent); InvalidArgument for a file upload."""
        value = form.get(name, "")
        if not isinstance(value, str):
            raise InvalidArgument(f"{name}: expected text")
        return value

    # -- login -----------------------------------------------------------------------------------------

    def _login_html(self, error: str = "", status: int = 200) -> web.Response:
        if self.oidc is None:
            return self._html(pages.login_page(error), status)
        return self._html(
            pages.login_page(error, oidc_url=self.oidc.start_url, oidc_name=self.oidc.provider_name), status
        )

    @staticmethod
    def _source(request: web.Request) -> str:
        """What the limits count a request's failures against (an IPv4 address or an IPv6 /64)."""
        return source_of(peer_of(request)) or "unknown"

    def open_session(self, request: web.Request, actor: str, key_id: str = "") -> web.Response:
        """A new session for ``actor`` (``key_id``: the API key it ends with; "" for an OIDC login), its
        cookie set on the answer: 303 to the nodes page after an API-key login; after an OIDC login a page
        that goes there (:func:`ghostmesh.console_pages.logged_in_page`)."""
        session = self.sessions.create(actor, key_id, self.hub.now())
        resp = self._redirect("/nodes") if key_id else self._html(pages.logged_in_page(actor))
        resp.set_cookie(
            self.cookie,
            session.id,
            max_age=int(self.cfg.session_lifetime),
            path="/",
            secure=self.secure,
            httponly=True,
            samesite="Strict",
        )
        log.info("console login", extra={"actor": actor, "remote": peer_of(request)})
        return resp

    async def login_form(self, request: web.Request) -> Resp:
        if self._session(request) is not None:
            return self._redirect("/nodes")
        return self._login_html()

    async def login(self, request: web.Request) -> Resp:
        now = self.hub.now()
        source = self._source(request)
        limits = self.hub.limits
        reopens = limits.auth_over(source, now)
        form = await request.post()
        token = form.get("api_key")
        try:
            actor = self.admin.api_key_actor(token if isinstance(token, str) else "")
        except AuthError as err:
            limits.auth_failed(source, LOGIN_METHOD, now, refused=reopens is not None)
            if reopens is not None:
                wait = max(1, round(reopens - now))
                text = f"Too many failed logins from {source}; retry in {wait} s."
                return self._login_html(text, 429)
            return self._login_html(f"Login failed: {err}", 401)
        return self.open_session(request, actor, actor.removeprefix("apikey:"))

    async def logout(self, request: web.Request, session: Session, _caller: Caller) -> Resp:
        self.sessions.end(session.id)
        resp = self._redirect("/login")
        resp.del_cookie(self.cookie, path="/")
        return resp

    # -- pages -----------------------------------------------------------------------------------------

    def _online(self) -> set[int]:
        return {n.id for n in self.state.list_nodes() if self.state.is_online(n.id)}

    def nodes(self, _request: web.Request, session: Session) -> web.Response:
        nodes = self.state.list_nodes()
        text = pages.nodes_page(nodes, self._online(), self.hub.now(), session.csrf, session.take_flash())
        return self._html(text)

    def users(self, _request: web.Request, session: Session) -> web.Response:
        return self._html(pages.users_page(self.state.list_users(), session.csrf, session.take_flash()))

    def keys(self, _request: web.Request, session: Session) -> web.Response:
        keys = self.state.list_auth_keys()
        return self._html(pages.keys_page(keys, self.hub.now(), session.csrf, session.take_flash()))

    def routes(self, _request: web.Request, session: Session) -> web.Response:
        return self._html(pages.routes_page(self.state.list_routes(), session.csrf, session.take_flash()))

    def policy(self, _request: web.Request, session: Session) -> web.Response:
        info = self.admin.policy.info
        flash = session.take_flash()
        return self._html(pages.policy_page(info.text, info.source, info.sha256, session.csrf, flash=flash))

    def _audit_text(self, session: Session, verdict: str = "") -> str:
        auditor = self.admin.auditor()
        last = auditor.store.last_audit()
        after = max(0, (last.seq if last is not None else 0) - AUDIT_PAGE)
        entries = list(reversed(auditor.store.list_audit(after, AUDIT_PAGE)))
        return pages.audit_page(entries, session.csrf, verdict=verdict, flash=session.take_flash())

    def audit(self, _request: web.Request, session: Session) -> web.Response:
        return self._html(self._audit_text(session))

    def mesh(self, _request: web.Request, session: Session) -> web.Response:
        return self._html(pages.mesh_page(session.csrf))

    # -- actions ---------------------------------------------------------------------------------------

    def _done(self, session: Session, where: str, message: str) -> web.Response:
        session.flash = message
        return self._redirect(where)

    async def _act(
        self, request: web.Request, session: Session, where: str, do: Callable[[dict[str, str]], str]
    ) -> Resp:
        """Run ``do`` on the posted fields; back to ``where`` with its message, or with the error."""
        form = await request.post()
        fields = {k: v for k, v in form.items() if isinstance(v, str)}
        try:
            return self._done(session, where, do(fields))
        except GhostError as err:
            session.flash = f"Refused: {err}"
            return self._redirect(where)

    async def rename(self, request: web.Request, session: Session, caller: Caller) -> Resp:
        def do(f: dict[str, str]) -> str:
            req = apb.RenameNodeRequest(ref=f.get("ref", ""), new_name=f.get("new_name", ""))
            return f"Renamed to {self.admin.rename_node(caller, req).name}."

        return await self._act(request, session, "/nodes", do)

    async def expire(self, request: web.Request, session: Session, caller: Caller) -> Resp:
        def do(f: dict[str, str]) -> str:
            node = self.admin.expire_node(caller, apb.ExpireNodeRequest(ref=f.get("ref", "")))
            return f"Expired {node.name}."

        return await self._act(request, session, "/nodes", do)

    async def delete(self, request: web.Request, session: Session, caller: Caller) -> Resp:
        def do(f: dict[str, str]) -> str:
            self.admin.delete_node(caller, apb.DeleteNodeRequest(ref=f.get("ref", "")))
            return "Deleted."

        return await self._act(request, session, "/nodes", do)

    async def create_key(self, request: web.Request, session: Session, caller: Caller) -> Resp:
        form = await request.post()
        try:
            expiration = self._field(form, "expiration").strip() or "0"
            if not expiration.isdigit():
                raise InvalidArgument("expiration: a whole number of seconds")
            tags = [t.strip() for t in self._field(form, "tags").split(",") if t.strip()]
            req = apb.CreateAuthKeyRequest(
                user=self._field(form, "user").strip(),
                reusable=form.get("reusable") == "1",
                ephemeral=form.get("ephemeral") == "1",
                tags=tags,
                expiration_seconds=int(expiration),
            )
            created = self.admin.create_auth_key(caller, req)
        except GhostError as err:
            session.flash = f"Refused: {err}"
            return self._redirect("/keys")
        keys = self.state.list_auth_keys()
        flash = f"Created {created.key.id}."
        return self._html(pages.keys_page(keys, self.hub.now(), session.csrf, flash, created.secret))

    async def revoke_key(self, request: web.Request, session: Session, caller: Caller) -> Resp:
        def do(f: dict[str, str]) -> str:
            rec = self.admin.expire_auth_key(caller, apb.ExpireAuthKeyRequest(id=f.get("id", "")))
            return f"Revoked {rec.id}."

        return await self._act(request, session, "/keys", do)

    async def approve(self, request: web.Request, session: Session, caller: Caller) -> Resp:
        def do(f: dict[str, str]) -> str:
            req = apb.RouteRequest(node=f.get("node", ""), prefix=f.get("prefix", ""))
            route = self.admin.approve_route(caller, req)
            return f"Approved {route.prefix} via {route.node}."

        return await self._act(request, session, "/routes", do)

    async def check_policy(self, request: web.Request, session: Session, _caller: Caller) -> Resp:
        form = await request.post()
        text = self._field(form, "text")
        res = self.admin.check_policy(apb.CheckPolicyRequest(text=text))
        if "application/json" in request.headers.get("Accept", ""):
            doc = {"ok": res.ok, "errors": list(res.errors), "tests_passed": res.tests_passed}
            return web.json_response(doc, headers=pages.headers())
        info = self.admin.policy.info
        result = pages.check_result(res.ok, res.errors, res.tests_passed)
        return self._html(pages.policy_page(text, info.source, info.sha256, session.csrf, result=result))

    async def apply_policy(self, request: web.Request, session: Session, caller: Caller) -> Resp:
        form = await request.post()
        text = self._field(form, "text")
        try:
            applied = self.admin.set_policy(caller, apb.SetPolicyRequest(text=text))
        except GhostError as err:
            res = self.admin.check_policy(apb.CheckPolicyRequest(text=text))
            errors = list(res.errors) or [str(err)]  # failed [[tests]] parse fine: the refusal says which
            info = self.admin.policy.info
            result = pages.check_result(False, errors, 0)
            page = pages.policy_page(text, info.source, info.sha256, session.csrf, result=result)
            return self._html(page, status_of(err))
        return self._done(session, "/policy", f"Policy {applied.sha256[:16]} is in force.")

    async def verify_audit(self, request: web.Request, session: Session, _caller: Caller) -> Resp:
        auditor = self.admin.auditor()
        entries: list[auditchain.AuditRecord] = []
        last = auditor.store.last_audit()
        end = last.seq if last is not None else 0
        after = 0
        while after < end:  # bounded: every round moves past at least one entry, or stops
            page = auditor.store.list_audit(after, AUDIT_FETCH)
            if not page:
                break
            entries.extend(page)
            after = page[-1].seq
        verdict = auditchain.verify(entries, auditor.public_key)
        if verdict.problem is None:
            text = f"ok: {verdict.count} entries verified (last seq {verdict.last_seq}) with the audit key."
        else:
            text = f"does NOT verify: {verdict.problem}"
        return self._html(self._audit_text(session, text))

    # -- events ----------------------------------------------------------------------------------------

    def picture(self) -> str:
        nodes = self.state.list_nodes()
        online = {n.id for n in nodes if self.state.is_online(n.id)}
        return json.dumps(mesh_picture(nodes, online), separators=(",", ":"))

    async def events(self, request: web.Request) -> Resp:
        session = self._session(request)
        if session is None:
            return web.Response(status=401, headers=pages.headers())
        if len(self._streams) >= MAX_EVENT_STREAMS:
            return web.Response(status=503, text="too many event streams\n", headers=pages.headers())
        resp = web.StreamResponse(headers={**pages.headers(), "Content-Type": "text/event-stream"})
        await resp.prepare(request)
        wake = asyncio.Event()
        self._streams.add(wake)
        try:
            await resp.write(f"data: {self.picture()}\n\n".encode())
            while not self.closing and self._session(request) is not None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), timeout=KEEPALIVE)
                if not wake.is_set():
                    await resp.write(b": keepalive\n\n")
                    continue
                await asyncio.sleep(EVENT_COALESCE)
                wake.clear()
                await resp.write(f"data: {self.picture()}\n\n".encode())
        except ConnectionResetError:
            pass  # the browser went away
        finally:
            self._streams.discard(wake)
        return resp

    # -- static ----------------------------------------------------------------------------------------

    @staticmethod
    async def script(_request: web.Request) -> Resp:
        return web.Response(text=pages.SCRIPT, content_type="text/javascript", headers=pages.headers())

    @staticmethod
    async def style(_request: web.Request) -> Resp:
        return web.Response(text=pages.STYLE, content_type="text/css", headers=pages.headers())

    async def root(self, _request: web.Request) -> Resp:
        return self._redirect("/nodes")

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_FORM_BYTES)
        r = app.router
        r.add_get("/", self.root)
        r.add_get("/login", self.login_form)
        r.add_post("/login", self.login)
        if self.oidc is not None:
            self.oidc.add_routes(r)
        r.add_post("/logout", self.action(self.logout))
        r.add_get("/static/console.js", self.script)
        r.add_get("/static/console.css", self.style)
        for path, render in (
            ("/nodes", self.nodes),
            ("/users", self.users),
            ("/keys", self.keys),
            ("/routes", self.routes),
            ("/policy", self.policy),
            ("/audit", self.audit),
            ("/mesh", self.mesh),
        ):
            r.add_get(path, self.page(render))
        for path, run in (
            ("/nodes/rename", self.rename),
            ("/nodes/expire", self.expire),
            ("/nodes/delete", self.delete),
            ("/keys/create", self.create_key),
            ("/keys/revoke", self.revoke_key),
            ("/routes/approve", self.approve),
            ("/policy/check", self.check_policy),
            ("/policy/apply", self.apply_policy),
            ("/audit/verify", self.verify_audit),
        ):
            r.add_post(path, self.action(run))
        r.add_get("/events", self.events)
        return app


class ConsoleServer:
    """A started console; ``port`` is the bound port (useful with port 0), ``url`` its base URL."""

    def __init__(self, console: Console, runner: web.AppRunner, host: str, port: int) -> None:
        self.console = console
        self._runner = runner
        self.host = host
        self.port = port

    @property
    def url(self) -> str:
        return f"{'https' if self.console.secure else 'http'}://{format_endpoint(self.host, self.port)}"

    async def close(self) -> None:
        self.console.close()
        await self._runner.cleanup()


def tls_context(cert_file: Path, key_file: Path) -> ssl.SSLContext:
    """TLS 1.2+ (RFC 8446 for 1.3) with the gRPC port's certificate chain and key."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert_file, key_file)
    return ctx


async def start_console(
    cfg: ConsoleConfig,
    admin: AdminServicer,
    tls: tuple[Path, Path] | None,
    oidc: tuple[OidcConfig, OidcProvider] | None = None,
) -> ConsoleServer:
    """Serve the console on ``cfg.listen`` (HTTPS with ``tls`` = (chain, key) files when ``cfg.tls``;
    with ``oidc``, the ``[oidc]`` settings and the discovered provider, the OIDC login for admins too);
    Unavailable if it cannot bind."""
    host, port = parse_hostport(cfg.listen, "console.listen", ip_only=True)
    console = Console(cfg, admin, secure=cfg.tls, oidc=oidc)
    runner = web.AppRunner(console.app(), access_log=None, handle_signals=False)
    await runner.setup()
    ctx = tls_context(*tls) if cfg.tls and tls is not None else None
    site = web.TCPSite(runner, host, port, ssl_context=ctx)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise Unavailable(f"console.listen: cannot listen on {cfg.listen}: {exc.strerror or exc}") from None
    bound = runner.addresses[0][1] if runner.addresses else port
    served = ConsoleServer(console, runner, host, bound)
    log.debug("web console on %s", served.url)  # the daemon prints it
    return served
