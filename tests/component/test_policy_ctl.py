"""``ghostctl acl get | set | check | test`` against a real in-process ghostmesh (admin unix socket)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from ghostctl.cli import main
from ghostmesh.server import RunningServer
from tests.component._mesh_fixtures import mesh_config, running

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
