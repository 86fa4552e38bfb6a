"""ghostctl argument handling through ``main``: usage errors exit 2 before any connection is made."""

from __future__ import annotations

import pytest

from ghostctl.cli import main


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["authkeys", "create", "--expiration", "soon"], "--expiration"),
        (["authkeys", "create", "--tags", "web"], "--tags"),
        (["apikeys", "create", "--expiration", "-1d"], "--expiration"),
        (["--output", "yaml", "users", "list"], "--output"),
        (["--timeout", "0", "users", "list"], "--timeout"),
        (["users", "create"], "name"),
        (["users", "bind", "alice"], "--oidc-subject"),
        (["users", "unbind"], "name"),
        (["nodes", "rename", "only-one"], "new_name"),
        (["frobnicate"], "invalid choice"),
        (["users"], "required"),
    ],
)
def test_usage_errors_exit_2(argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert needle in captured.err
    assert "Traceback" not in captured.err
    assert captured.out == ""


def test_no_command_prints_help_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().err


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    assert "exit codes" in capsys.readouterr().out


def test_bad_output_env_is_a_usage_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("GHOSTCTL_OUTPUT", "xml")
    assert main(["users", "list"]) == 2
    assert "GHOSTCTL_OUTPUT" in capsys.readouterr().err


def test_bad_server_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--server", "unix:relative.sock", "users", "list"]) == 2
    assert "absolute path" in capsys.readouterr().err


def test_api_key_from_env_is_not_echoed_in_help(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("GHOSTCTL_API_KEY", "sk-very-secret")
    assert main(["--help"]) == 0
    assert "sk-very-secret" not in capsys.readouterr().out
