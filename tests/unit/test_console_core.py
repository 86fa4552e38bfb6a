"""The web console's pure parts: the bounded session table with its expiry and CSRF tokens, the mesh
picture's edges, and pages that escape whatever nodes and admins put in names, tags and policies."""

from __future__ import annotations

from dataclasses import replace

from ghostcore.auditchain import AuditRecord
from ghostmesh import console_pages as pages
from ghostmesh.console_core import MAX_PICTURE_EDGES, MAX_PICTURE_NODES, Sessions, edge_kind, mesh_picture
from ghostmesh.store.base import AuthKeyRec, NodeRec, RouteRec, UserRec

HOSTILE = '<script>alert(1)</script>" onmouseover="x'


def node(i: int, **kw: object) -> NodeRec:
    base = NodeRec(
        id=i, name=f"n{i}", user="default", node_key="k", ipv4=f"100.64.0.{i}", ipv6="fd7a:115c:a1e0::1",
        ephemeral=False, tags=(), created=0.0, expires=0.0, last_seen=0.0, endpoints=(), hostname="h",
        auth_key_id=None,
    )  # fmt: skip
    return replace(base, **kw)  # type: ignore[arg-type]


def test_sessions_expire_and_the_table_is_bounded() -> None:
    table = Sessions(lifetime=100.0, max_sessions=3)
    made = [table.create(f"apikey:{i}", str(i), now=float(i)) for i in range(4)]
    assert len(table) == 3
    assert table.get(made[0].id, 4.0) is None  # the oldest went to make room
    assert table.get(made[1].id, 4.0) is made[1]
    assert table.get(made[1].id, 101.0) is None  # its lifetime ended (and it is removed)
    assert len(table) == 2
    assert len({s.id for s in made} | {s.csrf for s in made}) == 8  # every id and token distinct
    assert all(len(s.id) >= 43 and len(s.csrf) >= 43 for s in made)  # 32 random bytes, base64url
    table.end(made[3].id)
    assert table.get(made[3].id, 4.0) is None
    table.sweep(1000.0)
    assert len(table) == 0


def test_csrf_token_check() -> None:
    s = Sessions(60.0, 1).create("apikey:a", "a", 0.0)
    assert s.csrf_ok(s.csrf)
    assert not s.csrf_ok("")
    assert not s.csrf_ok(s.csrf[:-1])
    assert not s.csrf_ok(s.csrf + "x")
    assert not s.csrf_ok("é" * 10)  # non-ASCII is compared as bytes, never raises
    assert s.csrf not in repr(s)
    assert s.id not in repr(s)
    s.flash = "done"
    assert s.take_flash() == "done"
    assert s.take_flash() == ""


def test_edge_kinds_follow_what_nodes_report() -> None:
    ep = ("192.0.2.1:41641",)
    assert edge_kind(node(1, endpoints=ep), node(2, endpoints=ep)) == "direct"
    assert edge_kind(node(1, endpoints=ep, turn_relay="203.0.113.1:5000"), node(2)) == "turn"
    assert edge_kind(node(1, home_region=1), node(2, home_region=2)) == "relay"
    assert edge_kind(node(1, home_region=1), node(2)) == "unknown"


def test_mesh_picture_is_bounded() -> None:
    nodes = [node(i, endpoints=("192.0.2.1:1",)) for i in range(1, MAX_PICTURE_NODES + 11)]
    pic = mesh_picture(nodes, {n.id for n in nodes})
    assert len(pic["nodes"]) == MAX_PICTURE_NODES  # type: ignore[arg-type]
    assert pic["more"] == 10
    assert len(pic["edges"]) == MAX_PICTURE_EDGES  # type: ignore[arg-type]
    small = mesh_picture([node(1), node(2), node(3)], {1, 3})
    assert small["edges"] == [[1, 3, "unknown"]]  # offline nodes have no edges


def _no_raw_hostile(text: str) -> None:
    assert "<script>alert" not in text
    assert '" onmouseover="x' not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;&quot; onmouseover=&quot;x" in text


def test_pages_escape_hostile_names_tags_and_text() -> None:
    evil = node(7, name=HOSTILE, user=HOSTILE, tags=(HOSTILE,))
    _no_raw_hostile(pages.nodes_page([evil], {7}, 0.0, "tok"))
    _no_raw_hostile(pages.users_page([UserRec(1, HOSTILE, 0.0, groups=(HOSTILE,))], "tok"))
    key = AuthKeyRec(id="abc", hash=b"h", user=HOSTILE, reusable=False, ephemeral=False, tags=(HOSTILE,),
                     created=0.0, expires=0.0)  # fmt: skip
    _no_raw_hostile(pages.keys_page([key], 0.0, "tok", flash=HOSTILE))
    route = RouteRec(node_id=7, prefix="10.0.0.0/24", by_node=True)
    _no_raw_hostile(pages.routes_page([(evil, route, False)], "tok"))
    _no_raw_hostile(
        pages.policy_page(HOSTILE, HOSTILE, "0" * 64, "tok", result=pages.check_result(False, [HOSTILE], 0))
    )
    rec = AuditRecord(1, 0, HOSTILE, "node.rename", HOSTILE, HOSTILE, HOSTILE, b"")
    _no_raw_hostile(pages.audit_page([rec], "tok", verdict=HOSTILE))
    _no_raw_hostile(pages.login_page(HOSTILE))
    _no_raw_hostile(pages.refused_page(HOSTILE, "tok"))


def test_pages_carry_the_csrf_token_in_every_form_and_no_inline_code() -> None:
    text = pages.nodes_page([node(1), node(2)], set(), 0.0, 'tok"en')
    forms = text.count("<form")
    assert forms == 1 + 2  # logout + one per node (rename, expire, delete)
    assert text.count('name="csrf" value="tok&quot;en"') == forms
    for page in (text, pages.mesh_page("t"), pages.login_page()):
        assert "<script>" not in page
        assert "<style" not in page
        assert " style=" not in page
        assert " on" not in page.replace(" online", "")  # no inline event handlers


def test_a_device_shows_its_gateway_instead_of_a_presence() -> None:
    text = pages.nodes_page([node(1), node(2, via=1, name="phone")], {1}, 0.0, "tok")
    assert '<tr data-node="phone"><td>phone</td><td>default</td><td>device via n1</td>' in text
    assert '<tr data-node="n1"><td>n1</td><td>default</td><td>online</td>' in text
