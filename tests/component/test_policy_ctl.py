"""``ghostctl acl get | set | check | test`` against a real in-process ghostmesh (admin unix socket)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from ghostctl.cli import main
from ghostmesh.server import RunningServer
from tests.component._mesh_fixtures import NodeClient, auth_key, mesh_config, running

POLICY = """
[groups]
"group:eng" = ["alice"]
[tag_owners]
"tag:server" = ["group:eng"]
[hosts]
db = "100.64.0.10"
[[acls]]
action = "accept"
src = ["group:eng"]
dst = ["tag:server:22", "db:5432"]
[[tests]]
src = "alice"
accept = ["tag:server:22", "db:5432"]
deny = ["tag:server:80"]
"""


async def ctl(srv: RunningServer, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    rc = await asyncio.to_thread(main, ["--server", f"unix:{srv.admin_socket}", *args])
    out, err = capsys.readouterr()
    # only ghostctl's own lines: the in-process server's log may share stderr once a test set up logging
    return rc, out, "\n".join(line for line in err.splitlines() if line.startswith("ghostctl"))


async def test_acl_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "acls.toml"
    good.write_text(POLICY)
    bad = tmp_path / "bad.toml"
    bad.write_text(
        POLICY.replace("tag:server:22", "tag:nope:22").replace("[[tests]]", "bogus = 1\n[[tests]]")
    )
    async with running(mesh_config(tmp_path)) as srv:
        rc, out, _ = await ctl(srv, capsys, "acl", "get")
        assert rc == 0
        assert "no policy set" in out
        rc, out, _ = await ctl(srv, capsys, "acl", "check", str(bad))
        assert rc == 1
        lines = out.strip().splitlines()
        assert 'acls[0].dst[0]: unknown tag "tag:nope"; declare it in [tag_owners]' in lines
        assert any(line.startswith("acls[0].bogus: unknown key") for line in lines)
        rc, out, _ = await ctl(srv, capsys, "acl", "check", str(good))
        assert (rc, out.strip()) == (0, "ok: policy valid, 3 tests passed")
        rc, _, err = await ctl(srv, capsys, "acl", "set", str(bad))
        assert rc == 2
        assert "invalid policy" in err
        assert len(err.strip().splitlines()) == 1
        rc, out, _ = await ctl(srv, capsys, "acl", "set", str(good))
        assert rc == 0
        assert out.startswith("policy applied (source api, sha256 ")
        rc, out, _ = await ctl(srv, capsys, "--output", "json", "acl", "get")
        doc = json.loads(out)
        assert (doc["source"], doc["text"]) == ("api", POLICY)
        rc, out, _ = await ctl(srv, capsys, "acl", "test")  # the policy's own tests
        assert (rc, out.strip()) == (0, "ok: policy valid, 3 tests passed")
        args = ("acl", "test", "--src", "alice", "--dst", "tag:server:22", "--dst", "db:80")
        rc, out, _ = await ctl(srv, capsys, "--output", "json", *args)
        assert rc == 0
        assert [(a["dst"], a["allowed"], a["reason"]) for a in json.loads(out)] == [
            ("tag:server:22", True, "acls[0] accepts"),
            ("db:80", False, "no rule matches"),
        ]
        rc, out, _ = await ctl(srv, capsys, *args)
        assert out.splitlines()[0].split() == ["SRC", "DST", "PROTO", "RESULT", "REASON"]
        assert "deny" in out.splitlines()[2]
        rc, _, err = await ctl(srv, capsys, "acl", "test", "--src", "alice")
        assert rc == 2
        assert "--dst" in err


def offline(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    rc = main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def test_acl_check_runs_offline_without_a_server(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("GHOSTCTL_SERVER", raising=False)
    good = tmp_path / "acls.toml"
    good.write_text(POLICY)
    # the default admin socket does not exist here: a call to a server would fail with exit 5
    rc, out, _ = offline(capsys, "acl", "check", str(good))
    assert (rc, out.strip()) == (0, "ok: policy valid, 3 tests passed")
    bad = tmp_path / "bad.toml"
    bad.write_text(POLICY.replace('deny = ["tag:server:80"]', 'deny = ["tag:server:22"]'))
    rc, out, _ = offline(capsys, "acl", "check", str(bad))
    assert rc == 1
    assert out.strip() == (
        "tests[0].deny[0]: alice -> tag:server:22 (tcp) should be denied but is accepted (acls[0] accepts)"
    )
    rc, _, err = offline(capsys, "--server", f"unix:{tmp_path}/none.sock", "acl", "check", str(good))
    assert rc == 5  # --server asks for the live nodes: that server is not there
    assert len(err.strip().splitlines()) == 1


HUJSON = """{
  // Tailscale's syntax: comments and trailing commas
  "tagOwners": {"tag:server": ["alice@example.com"],},
  "acls": [{"action": "accept", "src": ["alice@example.com"], "dst": ["tag:server:22"]}],
  "ssh": [{"action": "accept", "src": ["alice@example.com"], "dst": ["tag:server"], "users": ["root"]}],
  "tests": [{"src": "alice@example.com", "accept": ["tag:server:22"], "deny": ["tag:server:80"]}],
}"""


def test_acl_import_prints_toml_and_reports_what_it_cannot_express(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "policy.hujson"
    src.write_text(HUJSON)
    rc, out, err = offline(capsys, "acl", "import", str(src))
    assert rc == 1
    assert err.splitlines()[0] == (
        "ghostctl: acl import: not expressible: ssh: SSH rules (ghostlink runs no SSH server): not supported"
    )
    rc, out, err = offline(capsys, "acl", "import", "--skip-unsupported", str(src))
    assert (rc, err.count("not expressible")) == (0, 1)
    dst = tmp_path / "acls.toml"
    dst.write_text(out)
    rc, out, _ = offline(capsys, "acl", "check", str(dst))  # round trip: the file's own tests pass here
    assert (rc, out.strip()) == (0, "ok: policy valid, 2 tests passed")
    (tmp_path / "junk").write_text("{ nope")
    rc, _, err = offline(capsys, "acl", "import", str(tmp_path / "junk"))
    assert rc == 2
    assert err.startswith("ghostctl: acl import ")
    assert len(err.strip().splitlines()) == 1


async def test_acl_diff_against_the_policy_in_force(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    wider = tmp_path / "wider.toml"
    wider.write_text(
        POLICY.replace('dst = ["tag:server:22", "db:5432"]', 'dst = ["tag:server:22,443", "db:5432"]')
    )
    good = tmp_path / "acls.toml"
    good.write_text(POLICY)
    async with running(mesh_config(tmp_path)) as srv:
        assert (await ctl(srv, capsys, "acl", "set", str(good)))[0] == 0
        await NodeClient(srv).register(await auth_key(srv, user="alice"), "laptop")
        await NodeClient(srv).register(await auth_key(srv, user="alice", tags=["tag:server"]), "srv")
        rc, out, _ = await ctl(srv, capsys, "acl", "diff", str(good))
        assert (rc, out.strip()) == (0, "no change: every node keeps the same access and peers")
        rc, out, _ = await ctl(srv, capsys, "acl", "diff", str(wider))
        assert rc == 0
        lines = out.strip().splitlines()
        assert len(lines) == 1
        assert lines[0].startswith("+ laptop -> srv: tcp:443 100.64.")
        assert "udp:443 fd7a:115c:a1e0::" in lines[0]
        rc, out, _ = await ctl(srv, capsys, "--output", "json", "acl", "diff", str(wider.with_name("x")))
        assert rc == 2
        rc, _, err = await ctl(srv, capsys, "acl", "diff", str(tmp_path / "missing.toml"))
        assert rc == 2
        assert "cannot read policy file" in err
