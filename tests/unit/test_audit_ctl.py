"""ghostctl audit: argument handling, the help's truncation warning, and the list/JSON renderings."""

from __future__ import annotations

import pytest

from ghostcore.pb.ghostmesh.v1 import admin_pb2
from ghostctl import audit
from ghostctl.cli import build_parser, main
from ghostctl.errors import EXIT_USAGE, EXIT_VERIFY, VerifyFailed, exit_code_for

ENTRY = admin_pb2.AuditEntry(
    seq=3,
    ts_unix_ms=1_700_000_000_123,
    actor="apikey:0123456789ab",
    action="node.rename",
    target="web2",
    detail='{"id":1,"old_name":"web1"}',
    remote="ipv4:127.0.0.1:5555",
    prev_hash=bytes(32),
    hash=b"\x01" * 32,
    signature=b"\x02" * 64,
)


def test_verify_help_warns_about_truncation(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["audit", "verify", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "removal of the newest entries cannot be detected by anyone who never saw them" in out
    assert "--checkpoint FILE" in out


@pytest.mark.parametrize(
    "argv", [["audit", "list", "--after", "-1"], ["audit", "list", "--limit", "x"], ["audit"]]
)
def test_bad_arguments_are_usage_errors(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == EXIT_USAGE
    assert capsys.readouterr().err


def test_parser_defaults() -> None:
    args = build_parser().parse_args(["audit", "list"])
    assert (args.after, args.limit) == (0, 0)
    args = build_parser().parse_args(["audit", "verify", "--key", "K"])
    assert (args.checkpoint, args.key) == (None, "K")


def test_row_and_doc() -> None:
    assert audit.entry_row(ENTRY) == (
        "3", "2023-11-14T22:13:20Z", "apikey:0123456789ab", "node.rename", "web2", "ipv4:127.0.0.1:5555",
    )  # fmt: skip
    doc = audit.entry_doc(ENTRY)
    assert doc["detail"] == {"id": 1, "old_name": "web1"}
    assert (doc["time"], doc["hash"], doc["prev_hash"]) == ("2023-11-14T22:13:20Z", "01" * 32, "00" * 32)
    bad = admin_pb2.AuditEntry(seq=1, detail="{not json")
    assert audit.entry_doc(bad)["detail"] == "{not json"  # shown as stored; verify judges it
    rec = audit.record_of(ENTRY)
    assert (rec.seq, rec.ts_ms, rec.detail, rec.signature) == (
        3,
        ENTRY.ts_unix_ms,
        ENTRY.detail,
        ENTRY.signature,
    )


def test_verification_failure_has_its_own_exit_code() -> None:
    assert exit_code_for(VerifyFailed("x")) == EXIT_VERIFY == 7
