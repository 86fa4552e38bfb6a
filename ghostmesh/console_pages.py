"""The web console's HTML, its one script and one style sheet, and the headers every answer carries. PURE.

Every value from outside (node and host names nodes chose, tags, users, policy text, audit details, error
messages that quote them) goes through :func:`html.escape` with quotes, so it is inert in text and in
attributes alike. No page has inline script or style: the script (:data:`SCRIPT`) and the style sheet
(:data:`STYLE`) are files the console serves itself, and the Content Security Policy (W3C CSP Level 3)
allows scripts, styles and connections from this origin only (no ``unsafe-inline``), forms posting to it
only, no framing (``frame-ancestors 'none'``, and ``X-Frame-Options: DENY`` for older browsers), no
``<base>``. Pages are never cached (``no-store``) and leak no URL to other sites. Every form carries the
session's CSRF token; no page shows a secret, except the page answering the creation of an auth key,
which shows that key once (it is stored hashed: it cannot be shown again).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from html import escape

from ghostcore.auditchain import AuditRecord
from ghostmesh.store.base import AuthKeyRec, NodeRec, RouteRec, UserRec

NAV = (("nodes", "Nodes"), ("mesh", "Mesh"), ("users", "Users"), ("keys", "Auth keys"),
       ("routes", "Routes"), ("policy", "Policy"), ("audit", "Audit log"))  # fmt: skip

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)


def headers() -> dict[str, str]:
    """The security headers of every answer (pages, script, style, events)."""
    return {
        "Content-Security-Policy": CSP,
        "X-Frame-Options": "DENY",
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-store",
    }


STYLE = """
body{font-family:system-ui,sans-serif;margin:0;color:#222}
header{background:#223;color:#fff;padding:.5em 1em;display:flex;gap:1em;align-items:center;flex-wrap:wrap}
header a{color:#cde}header a.on{color:#fff;font-weight:bold}header form{margin-left:auto}
main{padding:1em}table{border-collapse:collapse}td,th{border-bottom:1px solid #ddd;padding:.25em .5em;
text-align:left;vertical-align:top}form.inline{display:inline}.flash{background:#eef6ee;padding:.5em}
.error{color:#a00}.secret{font-family:monospace;background:#ffd;padding:.5em;font-size:1.1em}
textarea{width:100%;font-family:monospace}.ok{color:#070}.mono{font-family:monospace}
svg{border:1px solid #ccc;background:#fcfcfc}.node.on{fill:#2a7}.node.off{fill:#bbb}
.edge{stroke-width:2}.edge-direct{stroke:#2a7}.edge-relay{stroke:#e90}.edge-turn{stroke:#c33}
.edge-unknown{stroke:#999;stroke-dasharray:4 3}.label{font-size:11px}.legend span{margin-right:1em}
a.button{display:inline-block;padding:.3em 1em;border:1px solid #557;border-radius:3px;background:#eef;
text-decoration:none}
.k-direct{color:#2a7}.k-relay{color:#e90}.k-turn{color:#c33}.k-unknown{color:#999}
"""

SCRIPT = """'use strict';
(function () {
  document.addEventListener('click', function (ev) {
    var b = ev.target.closest('button[data-confirm]');
    if (b && !window.confirm(b.getAttribute('data-confirm'))) { ev.preventDefault(); }
  });
  var text = document.getElementById('policy-text');
  if (text) {
    var out = document.getElementById('policy-result');
    var csrf = document.querySelector('input[name=csrf]').value;
    var timer = null;
    var check = function () {
      var body = new URLSearchParams({csrf: csrf, text: text.value});
      fetch('/policy/check', {method: 'POST', body: body, credentials: 'same-origin',
                              headers: {'Accept': 'application/json'}})
        .then(function (r) { return r.json(); })
        .then(function (res) {
          out.textContent = '';
          var head = document.createElement('p');
          head.className = res.ok ? 'ok' : 'error';
          head.textContent = res.ok ? 'valid: ' + res.tests_passed + ' policy tests passed'
                                    : 'not valid:';
          out.appendChild(head);
          var ul = document.createElement('ul');
          res.errors.forEach(function (e) {
            var li = document.createElement('li'); li.className = 'error'; li.textContent = e;
            ul.appendChild(li);
          });
          out.appendChild(ul);
        });
    };
    text.addEventListener('input', function () { clearTimeout(timer); timer = setTimeout(check, 300); });
  }
  var svg = document.getElementById('mesh');
  if (svg) {
    var NS = 'http://www.w3.org/2000/svg';
    var list = document.getElementById('mesh-list');
    var el = function (name, attrs) {
      var e = document.createElementNS(NS, name);
      Object.keys(attrs).forEach(function (k) { e.setAttribute(k, attrs[k]); });
      return e;
    };
    var draw = function (pic) {
      while (svg.firstChild) { svg.removeChild(svg.firstChild); }
      list.textContent = '';
      var n = pic.nodes.length, at = {};
      pic.nodes.forEach(function (p, i) {
        var a = 2 * Math.PI * i / Math.max(n, 1);
        at[p.id] = [300 + 220 * Math.cos(a), 260 + 220 * Math.sin(a)];
      });
      pic.edges.forEach(function (e) {
        var a = at[e[0]], b = at[e[1]];
        svg.appendChild(el('line', {x1: a[0], y1: a[1], x2: b[0], y2: b[1], 'class': 'edge edge-' + e[2]}));
      });
      pic.nodes.forEach(function (p) {
        var c = at[p.id];
        var g = el('g', {'class': 'point', 'data-name': p.name});
        g.appendChild(el('circle', {cx: c[0], cy: c[1], r: 8, 'class': 'node ' + (p.online ? 'on' : 'off')}));
        var t = el('text', {x: c[0] + 11, y: c[1] + 4, 'class': 'label'});
        t.textContent = p.name + ' ' + p.ip;
        g.appendChild(t);
        svg.appendChild(g);
        var li = document.createElement('li');
        li.textContent = p.name + (p.online ? ' (online)' : ' (offline)');
        list.appendChild(li);
      });
      svg.setAttribute('data-count', String(n));
      document.getElementById('mesh-more').textContent = pic.more ? pic.more + ' more nodes not drawn' : '';
    };
    var source = new EventSource('/events');
    source.onmessage = function (ev) { draw(JSON.parse(ev.data)); };
  }
})();
"""


def _t(value: float) -> str:
    """A UTC time, or "never" for 0."""
    if not value:
        return "never"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(value))


def _csrf(token: str) -> str:
    return f'<input type="hidden" name="csrf" value="{escape(token)}">'


_NODE_BUTTONS = (
    '<button type="submit">Rename</button> '
    '<button type="submit" formaction="/nodes/expire" data-confirm="Expire this key now?">Expire</button> '
    '<button type="submit" formaction="/nodes/delete" data-confirm="Delete this node?">Delete</button>'
)


def _button(action: str, token: str, label: str, fields: dict[str, str]) -> str:
    hidden = "".join(
        f'<input type="hidden" name="{escape(k)}" value="{escape(v)}">' for k, v in fields.items()
    )
    return (
        f'<form class="inline" method="post" action="{escape(action)}">{_csrf(token)}{hidden}'
        f'<button type="submit">{escape(label)}</button></form>'
    )


def document(
    title: str, body: str, *, active: str = "", csrf: str = "", flash: str = "", head: str = ""
) -> str:
    """A whole page: the navigation (when logged in: ``csrf`` set), a one-time message, ``body``;
    ``head``: more of the head (made by this module, never from outside)."""
    nav = ""
    if csrf:
        links = " ".join(
            f'<a href="/{key}"{" class=on" if key == active else ""}>{escape(label)}</a>'
            for key, label in NAV
        )
        nav = (
            f"<header><strong>ghostmesh</strong> {links}"
            f'<form method="post" action="/logout">{_csrf(csrf)}<button type="submit">Log out</button>'
            "</form></header>"
        )
    note = f'<p class="flash" id="flash">{escape(flash)}</p>' if flash else ""
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<title>{escape(title)} - ghostmesh</title><link rel="stylesheet" href="/static/console.css">'
        f'<script src="/static/console.js" defer></script>{head}</head>\n'
        f"<body>{nav}<main>\n<h1>{escape(title)}</h1>\n{note}{body}\n</main></body></html>\n"
    )


def refused_page(message: str, csrf: str = "") -> str:
    """A refusal: ``message``, one line."""
    return document("Refused", f'<p class="error" id="error">{escape(message)}</p>', csrf=csrf)


def login_page(error: str = "", *, oidc_url: str = "", oidc_name: str = "") -> str:
    """The login form (an API key) and, with ``oidc_url`` (OIDC admins configured), the link that starts
    an OIDC login at the provider named ``oidc_name``. A link, not a form: it is a plain navigation to
    the console, which answers with the redirect to the provider (a form's redirect would need the
    provider in ``form-action``)."""
    err = f'<p class="error" id="error">{escape(error)}</p>' if error else ""
    oidc = ""
    if oidc_url:
        oidc = (
            f'<p><a class="button" id="oidc-login" href="{escape(oidc_url)}">Log in with '
            f"{escape(oidc_name)}</a> (admins named in <code>console.oidc_admins</code>)</p><p>or</p>"
        )
    body = (
        f"{err}{oidc}<p>Log in with an admin API key (<code>ghostctl apikeys create</code>).</p>"
        '<form method="post" action="/login"><label>API key <input type="password" name="api_key" '
        'id="api_key" autocomplete="off" size="60" required></label> '
        '<button type="submit" id="login">Log in</button></form>'
    )
    return document("Log in", body)


def logged_in_page(actor: str) -> str:
    """The answer to a good OIDC login: on to the nodes page. Not a redirect: the provider's redirect
    chain made this request cross-site, and a browser does not send the ``SameSite=Strict`` session
    cookie along such a chain; a refresh from this page of the console's own is same-site."""
    body = (
        f'<p id="logged-in">Logged in as <span class="mono">{escape(actor)}</span>.</p>'
        '<p><a id="continue" href="/nodes">Continue to the console</a></p>'
    )
    return document("Logged in", body, head='<meta http-equiv="refresh" content="0;url=/nodes">')


def nodes_page(nodes: Sequence[NodeRec], online: set[int], now: float, csrf: str, flash: str = "") -> str:
    rows = []
    names = {n.id: n.name for n in nodes}
    for n in nodes:
        expiry = "never" if not n.expires else ("expired" if n.expired(now) else _t(n.expires))
        # a device runs no ghostlink and never connects: it is reached through its gateway
        state = (
            f"device via {names.get(n.via, n.via)}" if n.via else ("online" if n.id in online else "offline")
        )
        ref = str(n.id)
        # one form a row: the rename field and three buttons (fewer bytes than a form each, on big meshes)
        actions = (
            f'<form class="inline" method="post" action="/nodes/rename">{_csrf(csrf)}'
            f'<input type="hidden" name="ref" value="{ref}">'
            '<input name="new_name" size="14" aria-label="new name">'
            f"{_NODE_BUTTONS}</form>"
        )
        rows.append(
            f'<tr data-node="{escape(n.name)}"><td>{escape(n.name)}</td><td>{escape(n.user)}</td>'
            f"<td>{escape(state)}</td><td>{_t(n.last_seen)}</td>"
            f"<td>{escape(expiry)}</td><td>{escape(', '.join(n.tags))}</td>"
            f'<td class="mono">{escape(n.ipv4)}<br>{escape(n.ipv6)}</td><td>{actions}</td></tr>'
        )
    body = (
        f"<p>{len(nodes)} nodes, {len(online)} online.</p><table><thead><tr><th>Name</th><th>User</th>"
        "<th>State</th><th>Last seen (UTC)</th><th>Key expiry</th><th>Tags</th><th>Addresses</th>"
        f"<th>Actions</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )
    return document("Nodes", body, active="nodes", csrf=csrf, flash=flash)


def users_page(users: Iterable[UserRec], csrf: str, flash: str = "") -> str:
    rows = "".join(
        f"<tr><td>{escape(u.name)}</td><td>{_t(u.created)}</td>"
        f"<td>{escape(u.oidc_issuer + ' ' + u.oidc_subject if u.oidc_subject else '')}</td>"
        f"<td>{escape(', '.join(u.groups))}</td></tr>"
        for u in users
    )
    body = (
        "<table><thead><tr><th>Name</th><th>Created (UTC)</th><th>OIDC account</th><th>Groups</th></tr>"
        f"</thead><tbody>{rows}</tbody></table>"
    )
    return document("Users", body, active="users", csrf=csrf, flash=flash)


def keys_page(keys: Iterable[AuthKeyRec], now: float, csrf: str, flash: str = "", secret: str = "") -> str:
    """The auth keys; ``secret``: the key just created, shown this once."""
    shown = ""
    if secret:
        shown = (
            "<p>The new key, shown only now (it is stored hashed and cannot be shown again):</p>"
            f'<p class="secret" id="new-secret">{escape(secret)}</p>'
        )
    rows = []
    for k in keys:
        state = "unusable" if k.unusable(now) else "usable"
        revoke = "" if k.unusable(now) else _button("/keys/revoke", csrf, "Revoke", {"id": k.id})
        kind = ", ".join(w for w, on in (("reusable", k.reusable), ("ephemeral", k.ephemeral)) if on)
        rows.append(
            f'<tr data-key="{escape(k.id)}"><td class="mono">{escape(k.id)}</td><td>{escape(k.user)}</td>'
            f"<td>{escape(kind)}</td><td>{escape(', '.join(k.tags))}</td><td>{_t(k.created)}</td>"
            f"<td>{_t(k.expires)}</td><td>{k.used_count}</td><td>{state}</td><td>{revoke}</td></tr>"
        )
    form = (
        f'<h2>Create</h2><form method="post" action="/keys/create" id="create-key">{_csrf(csrf)}'
        '<label>User <input name="user" placeholder="default"></label> '
        '<label>Tags <input name="tags" placeholder="tag:a,tag:b"></label> '
        '<label>Expires in (seconds, 0: default) <input name="expiration" value="0" size="8"></label> '
        '<label><input type="checkbox" name="reusable" value="1"> reusable</label> '
        '<label><input type="checkbox" name="ephemeral" value="1"> ephemeral</label> '
        '<button type="submit" id="create">Create</button></form>'
    )
    body = (
        f"{shown}<table><thead><tr><th>Id</th><th>User</th><th>Kind</th><th>Tags</th><th>Created</th>"
        "<th>Expires</th><th>Used</th><th>State</th><th></th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>{form}"
    )
    return document("Auth keys", body, active="keys", csrf=csrf, flash=flash)


def routes_page(routes: Iterable[tuple[NodeRec, RouteRec, bool]], csrf: str, flash: str = "") -> str:
    rows = []
    for node, r, primary in routes:
        approve = (
            ""
            if r.approved
            else _button("/routes/approve", csrf, "Approve", {"node": str(node.id), "prefix": r.prefix})
        )
        rows.append(
            f'<tr data-route="{escape(r.prefix)}"><td>{escape(node.name)}</td>'
            f'<td class="mono">{escape(r.prefix)}</td><td>{"yes" if r.advertised else "no"}</td>'
            f"<td>{'yes' if r.approved else 'no'}</td><td>{'yes' if primary else ''}</td>"
            f"<td>{approve}</td></tr>"
        )
    body = (
        "<table><thead><tr><th>Node</th><th>Prefix</th><th>Advertised</th><th>Approved</th><th>Primary</th>"
        f"<th></th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )
    return document("Routes", body, active="routes", csrf=csrf, flash=flash)


def check_result(ok: bool, errors: Sequence[str], passed: int) -> str:
    """The policy check's verdict as HTML (what the script builds from the JSON answer, too)."""
    if ok:
        return f'<p class="ok">valid: {passed} policy tests passed</p>'
    items = "".join(f'<li class="error">{escape(e)}</li>' for e in errors)
    return f'<p class="error">not valid:</p><ul>{items}</ul>'


def policy_page(text: str, source: str, sha256: str, csrf: str, *, result: str = "", flash: str = "") -> str:
    force = f'<span class="mono">{escape(sha256[:16])}</span> from {escape(source)}' if sha256 else "none"
    body = (
        f"<p>In force: {force} (none: every node may reach every other). "
        "Edits are checked as you type; Apply puts the text in force (refused when not valid or its "
        "tests fail).</p>"
        f'<form method="post" action="/policy/apply" id="policy-form">{_csrf(csrf)}'
        f'<textarea name="text" id="policy-text" rows="24" spellcheck="false">{escape(text)}</textarea>'
        '<p><button type="submit" formaction="/policy/check">Check</button> '
        '<button type="submit" id="apply">Apply</button></p></form>'
        f'<div id="policy-result">{result}</div>'
    )
    return document("Policy", body, active="policy", csrf=csrf, flash=flash)


def audit_page(entries: Sequence[AuditRecord], csrf: str, *, verdict: str = "", flash: str = "") -> str:
    rows = "".join(
        f"<tr><td>{e.seq}</td><td>{_t(e.ts_ms / 1000)}</td><td>{escape(e.actor)}</td>"
        f"<td>{escape(e.action)}</td>"
        f'<td>{escape(e.target)}</td><td class="mono">{escape(e.detail)}</td><td>{escape(e.remote)}</td></tr>'
        for e in entries
    )
    body = (
        f"{_button('/audit/verify', csrf, 'Verify the whole log', {})}"
        f'<p id="verdict">{escape(verdict)}</p><p>The newest {len(entries)} entries:</p>'
        "<table><thead><tr><th>Seq</th><th>Time (UTC)</th><th>Actor</th><th>Action</th><th>Target</th>"
        f"<th>Detail</th><th>Remote</th></tr></thead><tbody>{rows}</tbody></table>"
    )
    return document("Audit log", body, active="audit", csrf=csrf, flash=flash)


def mesh_page(csrf: str) -> str:
    body = (
        '<p class="legend">Likely path between online nodes, from what each reports about itself (the '
        'server sees no per-peer path): <span class="k-direct">direct</span><span class="k-relay">relay'
        '</span><span class="k-turn">TURN</span><span class="k-unknown">unknown</span></p>'
        '<svg id="mesh" width="640" height="520" viewBox="0 0 640 520" data-count="0"></svg>'
        '<p id="mesh-more"></p><ul id="mesh-list"></ul>'
    )
    return document("Mesh", body, active="mesh", csrf=csrf)
