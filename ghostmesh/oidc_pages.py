"""The HTML the OIDC login listener answers with, and the headers that go with it. PURE.

Every value from outside (host names the node chose, addresses, messages that quote claims) is escaped
with :func:`html.escape` (quotes too, so it is safe in attributes as well as text). No page has a script;
the one style block is allowed by its hash. The Content Security Policy (W3C CSP Level 3) denies everything
else, framing included (``frame-ancestors 'none'``: the confirmation button cannot be clickjacked), and
allows form submissions only to this listener and to the provider's authorization endpoint, because
browsers apply ``form-action`` to the redirect that follows the confirmation's POST too. No page is
cached (``no-store``) or leaks its URL to another site (``Referrer-Policy: no-referrer``): the URLs carry
the login id, and the callback's carry the authorization code.
"""

from __future__ import annotations

import base64
import hashlib
import time
import urllib.parse
from html import escape

from ghostmesh.oidc_core import PendingLogin

STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:40em;margin:3em auto;padding:0 1em;color:#222}"
    "dl{display:grid;grid-template-columns:max-content 1fr;gap:.3em 1em}dt{font-weight:bold}"
    "dd{margin:0;font-family:monospace;word-break:break-all}"
    "button{font-size:1.1em;padding:.4em 1.2em}.warn{color:#8a4b00}"
)
_STYLE_HASH = base64.b64encode(hashlib.sha256(STYLE.encode()).digest()).decode()


def origin(url: str) -> str:
    """``scheme://host[:port]`` of a URL (what a CSP source names)."""
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def headers(form_targets: tuple[str, ...] = ()) -> dict[str, str]:
    """Security headers for every page; ``form_targets``: origins a form on it may lead to besides
    this listener."""
    form_action = " ".join(("'self'", *form_targets))
    csp = (
        f"default-src 'none'; style-src 'sha256-{_STYLE_HASH}'; form-action {form_action}; "
        "frame-ancestors 'none'; base-uri 'none'"
    )
    return {
        "Content-Security-Policy": csp,
        "X-Frame-Options": "DENY",  # for browsers without CSP frame-ancestors
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-store",
    }


def _doc(title: str, body: str) -> str:
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)}</title><style>{STYLE}</style></head>\n<body>\n{body}\n</body></html>\n"
    )


def message_page(title: str, message: str) -> str:
    """A page saying one thing: ``message`` (one line) under ``title``."""
    return _doc(title, f'<h1>{escape(title)}</h1>\n<p id="message">{escape(message)}</p>')


def _ago(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 90:
        return f"{seconds} s ago"
    return f"{seconds // 60} min ago"


def confirm_page(login: PendingLogin, token: str, action: str, now: float, mesh: str) -> str:
    """The page a login URL shows: which node asks to join, from where and when, and the button that
    posts ``token`` to ``action`` (the same URL) to go on to the provider."""
    asked = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(login.created))
    rows = (
        ("Device name", login.hostname or "(none given)"),
        ("Node key", login.node_key),
        ("Asked from", login.remote),
        ("Asked at", f"{asked} ({_ago(now - login.created)})"),
    )
    facts = "\n".join(f"<dt>{escape(k)}</dt><dd>{escape(v)}</dd>" for k, v in rows)
    body = (
        f"<h1>Add a device to {escape(mesh)}?</h1>\n"
        "<p>A device asked to join this mesh as you. Continue only if you started this join yourself, "
        "just now, on this device:</p>\n"
        f"<dl>\n{facts}\n</dl>\n"
        '<p class="warn">If you did not run <code>ghostlink join</code> on this device, close this page: '
        "whoever sent you this link would get a device in the mesh as you.</p>\n"
        f'<form method="post" action="{escape(action)}">'
        f'<input type="hidden" name="csrf" value="{escape(token)}">'
        '<button type="submit">Continue to log in</button></form>'
    )
    return _doc(f"Add a device to {mesh}?", body)
