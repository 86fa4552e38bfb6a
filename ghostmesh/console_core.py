"""The web console's sessions, its OIDC logins in progress and what its mesh picture shows. PURE: time
comes in, nothing does I/O.

Sessions (:class:`Sessions`): a login with an API key or, for the accounts ``console.oidc_admins``
admits, at the OIDC provider makes one; its id is 32 random bytes (``secrets``,
256 bits: never guessed) and is the only thing the browser holds (the cookie). The table lives in memory
only, is bounded (``console.max_sessions``: a new login beyond it ends the oldest session) and every entry
ends ``console.session_lifetime`` after its login. Each session has its own CSRF token (another 32 random
bytes) that every POST must carry; :meth:`Session.csrf_ok` compares in constant time
(:func:`hmac.compare_digest`), so the comparison leaks nothing about the token. A restart ends every
session (admins log in again).

OIDC logins in progress (:class:`OidcLogins`): each is an authorization request (``state``, ``nonce``,
PKCE verifier: :func:`ghostmesh.oidc_core.request_secrets`) bound to the browser that started it by the
hash of that browser's pre-login cookie. The provider's redirect back is accepted once (the ``state`` is
taken), before the login expires (``oidc.login_timeout``), and only in that browser: a ``state`` replayed,
forged, or arriving without the cookie (another browser: an attacker's login pushed into an admin's
browser, "login CSRF") makes no session. Anyone can start a login, so they are capped in all and per
source, as the nodes' are (``oidc.max_pending``, ``oidc.max_pending_per_source``; counted apart).

The mesh picture (:func:`mesh_picture`): the server does not learn which path two nodes use to reach
each other (ghostlink chooses per peer and reports no per-peer path); it knows what each node reports
about itself (ReportStatus): its direct endpoints, its relay home region and its TURN relayed address.
An edge between two online nodes is drawn with the path those reports make likely: ``direct`` when both
report endpoints, else ``turn`` when one has a TURN relayed address, else ``relay`` when both have a home
region, else ``unknown``.
"""

from __future__ import annotations

import hmac
import secrets
from collections import OrderedDict
from collections.abc import MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from ghostcore.errors import AuthError, ResourceExhausted
from ghostmesh.oidc_core import cookie_hash, request_secrets
from ghostmesh.store.base import NodeRec

TOKEN_BYTES = 32
MAX_PICTURE_NODES = 200  # points in the mesh picture at most (the first by id); the nodes page lists all
MAX_PICTURE_EDGES = 2000  # edges at most (they grow with the square of the online nodes)


class _Expiring(Protocol):
    @property
    def expires(self) -> float: ...


E = TypeVar("E", bound=_Expiring)


def _live(table: MutableMapping[str, E], key: str, now: float) -> E | None:
    """``table[key]`` unless missing or ended by ``now`` (an ended entry is removed)."""
    entry = table.get(key)
    if entry is not None and entry.expires <= now:
        del table[key]
        return None
    return entry


@dataclass
class Session:
    """One logged-in admin: the audit actor (``apikey:<id>``, or ``oidc:…`` after an OIDC login), the
    API key's id (the session ends with the key; "" for an OIDC login), when it ends, its CSRF token, and a
    message for the next page shown (then cleared)."""

    id: str = field(repr=False)
    actor: str
    key_id: str
    expires: float
    csrf: str = field(repr=False)
    flash: str = ""

    def csrf_ok(self, token: str) -> bool:
        """``token`` is this session's CSRF token (constant-time comparison)."""
        return hmac.compare_digest(self.csrf.encode(), token.encode())

    def take_flash(self) -> str:
        text, self.flash = self.flash, ""
        return text


class Sessions:
    """The session table: at most ``max_sessions`` entries, each living ``lifetime`` seconds."""

    def __init__(self, lifetime: float, max_sessions: int) -> None:
        self.lifetime = lifetime
        self.max_sessions = max_sessions
        self._by_id: OrderedDict[str, Session] = OrderedDict()  # oldest login first

    def __len__(self) -> int:
        return len(self._by_id)

    def create(self, actor: str, key_id: str, now: float) -> Session:
        """A new session for ``actor``; the oldest one goes when the table is full."""
        self.sweep(now)
        while len(self._by_id) >= self.max_sessions:
            self._by_id.popitem(last=False)
        sid = secrets.token_urlsafe(TOKEN_BYTES)
        session = Session(sid, actor, key_id, now + self.lifetime, secrets.token_urlsafe(TOKEN_BYTES))
        self._by_id[sid] = session
        return session

    def get(self, sid: str, now: float) -> Session | None:
        """The live session with id ``sid`` (None: unknown or ended; an ended one is removed)."""
        return _live(self._by_id, sid, now)

    def end(self, sid: str) -> None:
        self._by_id.pop(sid, None)

    def sweep(self, now: float) -> None:
        """Remove every ended session."""
        for sid in [s.id for s in self._by_id.values() if s.expires <= now]:
            del self._by_id[sid]


@dataclass(slots=True)
class OidcLogin:
    """One OIDC admin login in progress. ``state``, ``nonce``, ``verifier`` and ``browser`` (sha256 of the
    starting browser's pre-login cookie) are secrets or bind to one: not in the repr."""

    source: str  # what it is limited as (ghostmesh.limits.source_of)
    expires: float
    state: str = field(repr=False)
    nonce: str = field(repr=False)
    verifier: str = field(repr=False)
    browser: bytes = field(repr=False)


class OidcLogins:
    """The console's OIDC logins in progress, by ``state``: at most ``max_pending``, ``max_per_source``
    of them from one source, each ``timeout`` seconds at most.

    A browser has one login in progress: starting another replaces it. A source over its cap loses its
    oldest login rather than being refused, so a page elsewhere that makes an admin's browser start logins
    (or the other users behind a shared proxy) cannot lock the admin out for the login timeout; only the
    cap over all sources refuses."""

    def __init__(self, timeout: float, max_pending: int, max_per_source: int) -> None:
        self.timeout = timeout
        self.max_pending = max_pending
        self.max_per_source = max_per_source
        self._by_state: dict[str, OidcLogin] = {}

    def __len__(self) -> int:
        return len(self._by_state)

    def start(self, cookie: str, source: str, now: float) -> OidcLogin:
        """A new login for the browser holding ``cookie``; ResourceExhausted (nothing made) beyond the
        caps."""
        if not cookie:
            raise AuthError("login failed: no pre-login cookie")  # the edge always sets one
        self.expire(now)
        browser = cookie_hash(cookie)
        for state in [
            s for s, login in self._by_state.items() if hmac.compare_digest(login.browser, browser)
        ]:
            del self._by_state[state]  # this browser's earlier login: replaced
        from_source = sorted(
            (login.expires, state) for state, login in self._by_state.items() if login.source == source
        )
        for _, state in from_source[: max(0, len(from_source) - self.max_per_source + 1)]:
            del self._by_state[state]  # the source's oldest: evicted, never the newcomer refused
        if len(self._by_state) >= self.max_pending:
            raise ResourceExhausted(
                "too many OIDC logins in progress (oidc.max_pending); retry in a few minutes"
            )
        state, nonce, verifier = request_secrets()
        login = OidcLogin(source, now + self.timeout, state, nonce, verifier, browser)
        self._by_state[state] = login
        return login

    def take(self, state: str, cookie: str, now: float) -> OidcLogin | None:
        """The login with this ``state``, removed (a state is good for one redirect back). None for an
        unknown, used or expired state; AuthError, and the login kept for its own browser, when the
        redirect came to a browser without the cookie that started it."""
        login = _live(self._by_state, state, now)
        if login is None:
            return None
        if not cookie or not hmac.compare_digest(login.browser, cookie_hash(cookie)):
            raise AuthError(
                "login failed: this browser did not start this login; start it again from the console's "
                "login page, in the browser you log in with"
            )
        del self._by_state[state]
        return login

    def expire(self, now: float) -> None:
        for state in [s for s, login in self._by_state.items() if login.expires <= now]:
            del self._by_state[state]


def edge_kind(a: NodeRec, b: NodeRec) -> str:
    """The path two nodes' own reports make likely (see the module docstring)."""
    if a.endpoints and b.endpoints:
        return "direct"
    if a.turn_relay or b.turn_relay:
        return "turn"
    if a.home_region and b.home_region:
        return "relay"
    return "unknown"


def mesh_picture(nodes: Sequence[NodeRec], online: set[int]) -> dict[str, object]:
    """What the picture draws, as JSON-ready data: points (the first :data:`MAX_PICTURE_NODES` nodes by
    id) and the edges between online ones, each with :func:`edge_kind`; ``more``: nodes left out."""
    shown = sorted(nodes, key=lambda n: n.id)[:MAX_PICTURE_NODES]
    points = [
        {"id": n.id, "name": n.name, "ip": n.ipv4, "online": n.id in online, "region": n.home_region}
        for n in shown
    ]
    live = [n for n in shown if n.id in online]
    edges: list[list[object]] = []
    for i, a in enumerate(live):
        for b in live[i + 1 :]:
            if len(edges) >= MAX_PICTURE_EDGES:
                break
            edges.append([a.id, b.id, edge_kind(a, b)])
    return {"nodes": points, "edges": edges, "more": max(0, len(nodes) - len(shown))}
