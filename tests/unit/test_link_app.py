"""ghostlink's CLI errors that need no network: one line, exit 1, nothing written."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from ghostlink import app, node
from ghostlink.engine import NodeInfo


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """main() configures the root logger for a real process; undo it so other tests keep theirs."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_not_root_is_checked_first(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    rc = app.main(["join", "--server", "bad", "--auth", "k", "--state-dir", str(tmp_path / "s")])
    assert rc == 1
    err = capsys.readouterr().err
    assert err == "ghostlink: must run as root to create the WireGuard interface; try sudo\n"
    assert not (tmp_path / "s").exists()


def test_invalid_server_address(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    rc = app.main(["join", "--server", "no-port", "--auth", "k", "--state-dir", str(tmp_path / "s")])
    assert rc == 1
    err = capsys.readouterr().err
    assert err.startswith("ghostlink: ")
    assert err.count("\n") == 1
    assert "'no-port' is not host:port; use e.g." in err
    assert "Traceback" not in err
    assert not (tmp_path / "s").exists()


def test_run_without_join(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    rc = app.main(["run", "--state-dir", str(tmp_path / "s")])
    assert rc == 1
    assert "no saved registration; run `ghostlink join" in capsys.readouterr().err


def test_config_check(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    good = Path(__file__).resolve().parents[2] / "configs" / "ghostlink.toml"
    assert app.main(["config", "check", "--config", str(good)]) == 0
    assert capsys.readouterr().out.endswith(": ok\n")
    bad = tmp_path / "bad.toml"
    bad.write_text("[wireguard]\nbackend = 'magic'\n")
    assert app.main(["config", "check", "--config", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "wireguard.backend" in err
    assert err.count("\n") == 1


def test_usage_error_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        app.main(["join", "--listen-port", "x"])
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("ghostlink: ")
    assert err.count("\n") == 1


def test_up_line() -> None:
    n = NodeInfo(1, "laptop", "u", "k", ("100.64.0.1", "fd7a:115c:a1e0::1"), (), (), True, 0, 0)
    assert node.up_line(n, "wireguard-go", "ghost0") == (
        "joined as laptop (100.64.0.1, fd7a:115c:a1e0::1) via wireguard-go on ghost0"
    )


@pytest.mark.parametrize(
    ("argv", "accept"),
    [([], None), (["--accept-dns"], True), (["--accept-dns=false"], False), (["--accept-dns", "no"], False)],
)
def test_accept_dns_flag(argv: list[str], accept: bool | None) -> None:
    args = app.build_parser().parse_args(["run", *argv])
    assert app._flags(args)["dns.accept"] is accept


def test_accept_dns_flag_refuses_other_words(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        app.build_parser().parse_args(["run", "--accept-dns=maybe"])
    assert "expected true or false" in capsys.readouterr().err
