"""Tailscale / Headscale policy files (HuJSON) -> ``acls.toml``. PURE: text in, TOML text and a list of
what could not be expressed out.

HuJSON is JSON with comments and trailing commas (github.com/tailscale/hujson); json5 reads it (a
superset). What maps, key by key: ``groups``, ``tagOwners`` -> ``[tag_owners]``, ``hosts``, ``acls``
(``action``, ``src``, ``dst``, ``proto``), ``grants`` (``src``, ``dst``, ``ip``, ``via``),
``autoApprovers`` (``routes``, ``exitNode`` -> ``exit_node``) and ``tests`` (``src``, ``proto``, ``accept``,
``deny``). Users keep their names, e-mail addresses included; a Headscale-style ``alice@`` (no domain)
becomes ``alice``. An ``acls`` or ``grants`` key that is present but empty is kept (it denies everything,
where a file with neither allows everything).

What does not map is reported, one line each naming its key path: ``ssh``, ``sshTests``, ``nodeAttrs``,
``postures`` and the other top-level keys ghostmesh has no use for, ``app`` capabilities of grants,
posture conditions (``srcPosture``), and selectors ghostmesh does not know (``autogroup:admin``,
``autogroup:danger-all``, ``user:*@domain``, ``ipset:``...). The caller decides whether that is fatal
(``ghostctl acl import`` exits 1 unless ``--skip-unsupported``); what is reported is left out of the TOML.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import json5

from ghostcore.policy.model import AUTOGROUPS

_TOP_UNSUPPORTED = {
    "ssh": "SSH rules (ghostlink runs no SSH server)",
    "sshTests": "SSH tests",
    "nodeAttrs": "node attributes",
    "postures": "device postures",
    "defaultSrcPosture": "device postures",
    "ipsets": "IP sets",
    "derpMap": "a DERP map (relays are ghostmesh's [relay] config)",
    "disableIPv4": "disableIPv4",
    "OneCGNATRoute": "OneCGNATRoute",
    "randomizeClientPort": "randomizeClientPort",
    "attrConfig": "attribute configuration",
}
_KNOWN_TOP = ("groups", "tagOwners", "hosts", "acls", "grants", "autoApprovers", "tests")


class ImportError_(ValueError):
    """The file is not a policy at all (not HuJSON, not an object): one line."""


@dataclass
class Imported:
    toml: str
    unsupported: list[str] = field(default_factory=list)


def _user(name: str) -> str:
    """Headscale's ``alice@`` (a user name with an empty domain) is ghostmesh's ``alice``."""
    return name[:-1] if name.endswith("@") and name.count("@") == 1 else name


def _known_selector(text: str) -> str | None:
    """Why ``text`` (a selector before its ports) cannot be expressed, or None when it can."""
    if text.startswith("autogroup:") and text not in AUTOGROUPS:
        return f"{text} is not supported"
    if text.startswith(("user:", "ipset:", "svc:", "cap:")):
        return f"{text} is not supported"
    return None


def _dst_host(text: str) -> str:
    host, _, _ = text.rpartition(":")
    return host or text


def _q(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)  # a TOML basic string is a JSON string for these


def _arr(items: Iterable[str]) -> str:
    return "[" + ", ".join(_q(i) for i in items) + "]"


class _Out:
    def __init__(self) -> None:
        self.head: list[str] = []
        self.body: list[str] = []
        self.unsupported: list[str] = []

    def skip(self, where: str, what: str) -> None:
        self.unsupported.append(f"{where}: {what}")


def _strs(v: Any) -> list[str]:
    if isinstance(v, str):
        return [v]
    if isinstance(v, list):
        return [str(x) for x in v]
    return []


def _selectors(out: _Out, where: str, items: list[str], *, ports: bool) -> list[str]:
    kept = []
    for j, raw in enumerate(items):
        host = _dst_host(raw) if ports else raw
        text = _user(host) + raw[len(host) :]
        why = _known_selector(_user(host))
        if why:
            out.skip(f"{where}[{j}]", why)
        else:
            kept.append(text)
    return kept


def _table(out: _Out, name: str, mapping: dict[str, Any], users: bool) -> None:
    if not mapping:
        return
    out.body.append(f"\n[{name}]")
    for k, v in mapping.items():
        if isinstance(v, list):
            vals = [_user(x) if users else x for x in _strs(v)]
            out.body.append(f"{_q(k)} = {_arr(vals)}")
        else:
            out.body.append(f"{_q(k)} = {_q(str(v))}")


def _acls(out: _Out, acls: list[Any]) -> None:
    for i, r in enumerate(acls):
        where = f"acls[{i}]"
        if not isinstance(r, dict):
            out.skip(where, "not an object")
            continue
        for k in r:
            if k not in ("action", "src", "dst", "proto"):
                out.skip(f"{where}.{k}", f"{k} is not supported")
        src = _selectors(out, f"{where}.src", _strs(r.get("src")), ports=False)
        dst = _selectors(out, f"{where}.dst", _strs(r.get("dst")), ports=True)
        out.body += ["\n[[acls]]", f"action = {_q(str(r.get('action', '')))}", f"src = {_arr(src)}"]
        out.body.append(f"dst = {_arr(dst)}")
        if "proto" in r:
            out.body.append(f"proto = {_q(str(r['proto']))}")


def _grants(out: _Out, grants: list[Any]) -> None:
    for i, g in enumerate(grants):
        where = f"grants[{i}]"
        if not isinstance(g, dict):
            out.skip(where, "not an object")
            continue
        for k in g:
            if k == "app":
                out.skip(f"{where}.app", "app capabilities are not supported (ip grants only)")
            elif k not in ("src", "dst", "ip", "via"):
                out.skip(f"{where}.{k}", f"{k} is not supported")
        if "ip" not in g and "app" in g:
            continue  # nothing of it is left to express
        src = _selectors(out, f"{where}.src", _strs(g.get("src")), ports=False)
        dst = _selectors(out, f"{where}.dst", _strs(g.get("dst")), ports=False)
        out.body += ["\n[[grants]]", f"src = {_arr(src)}", f"dst = {_arr(dst)}"]
        if "ip" in g:
            out.body.append(f"ip = {_arr(_strs(g['ip']))}")
        if "via" in g:
            out.body.append(f"via = {_arr(_strs(g['via']))}")


def _tests(out: _Out, tests: list[Any]) -> None:
    for i, t in enumerate(tests):
        where = f"tests[{i}]"
        if not isinstance(t, dict):
            out.skip(where, "not an object")
            continue
        out.body.append("\n[[tests]]")
        for k, v in t.items():
            if k == "src":
                out.body.append(f"src = {_q(_user(str(v)))}")
            elif k == "proto":
                out.body.append(f"proto = {_q(str(v))}")
            elif k in ("accept", "deny"):
                out.body.append(f"{k} = {_arr(_strs(v))}")
            else:
                out.skip(f"{where}.{k}", f"{k} is not supported")


def _auto(out: _Out, auto: dict[str, Any]) -> None:
    for k in auto:
        if k not in ("routes", "exitNode"):
            out.skip(f"autoApprovers.{k}", f"{k} is not supported")
    exit_node = [_user(x) for x in _strs(auto.get("exitNode"))]
    routes = auto.get("routes") or {}
    if not exit_node and not routes:
        return
    out.body.append("\n[auto_approvers]")
    if exit_node:
        out.body.append(f"exit_node = {_arr(exit_node)}")
    if isinstance(routes, dict) and routes:
        out.body.append("\n[auto_approvers.routes]")
        for prefix, who in routes.items():
            out.body.append(f"{_q(prefix)} = {_arr(_user(x) for x in _strs(who))}")


def convert(text: str, source: str = "") -> Imported:
    """The TOML for a Tailscale / Headscale policy file, and what it could not express."""
    try:
        doc = json.loads(text)  # most files are plain JSON, and json5's pure-Python parser is ~100x slower
    except ValueError:
        doc = None
    try:
        doc = json5.loads(text) if doc is None else doc
    except ValueError as exc:
        raise ImportError_(f"not a HuJSON policy file: {str(exc).splitlines()[0][:200]}") from None
    if not isinstance(doc, dict):
        raise ImportError_("not a policy file: the top level must be an object { ... }")
    out = _Out()
    out.head.append(
        f"# imported from {source} by ghostctl acl import" if source else "# imported by ghostctl acl import"
    )
    for k in doc:
        if k in _TOP_UNSUPPORTED:
            out.skip(k, f"{_TOP_UNSUPPORTED[k]}: not supported")
        elif k not in _KNOWN_TOP:
            out.skip(k, "unknown key: not supported")
    for key in ("acls", "grants"):  # present but empty: an explicit deny-all, kept
        if key in doc and not doc[key]:
            out.head.append(f"{key} = []")
    _table(out, "groups", doc.get("groups") or {}, users=True)
    _table(out, "tag_owners", doc.get("tagOwners") or {}, users=True)
    _table(out, "hosts", doc.get("hosts") or {}, users=False)
    _auto(out, doc.get("autoApprovers") or {})
    _acls(out, doc.get("acls") or [])
    _grants(out, doc.get("grants") or [])
    _tests(out, doc.get("tests") or [])
    return Imported("\n".join(out.head + out.body) + "\n", out.unsupported)
