"""The import contracts can fail: the no-cycles contract, as pyproject.toml writes it, breaks on a cycle.

``lint-imports`` over this tree runs in CI (``scripts/test.sh``); a contract that could never fail would
pass there whatever the code did. This builds a throw-away package beside a copy of the contract and
checks that a cycle between two sibling modules is reported, and that the same package without it passes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _acyclic_contract() -> dict[str, object]:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    (contract,) = [c for c in config["tool"]["importlinter"]["contracts"] if c["type"] == "acyclic_siblings"]
    return contract


def _lint(tmp_path: Path, cycle: bool) -> subprocess.CompletedProcess[str]:
    pkg = tmp_path / "cyclepkg"
    shutil.rmtree(pkg, ignore_errors=True)
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "relay.py").write_text("from cyclepkg import stream\n")
    (pkg / "stream.py").write_text("from cyclepkg import relay\n" if cycle else "X = 1\n")
    contract = _acyclic_contract()
    config = tmp_path / "contracts.toml"
    config.write_text(
        '[tool.importlinter]\nroot_packages = ["cyclepkg"]\n\n[[tool.importlinter.contracts]]\n'
        f'name = "{contract["name"]}"\ntype = "{contract["type"]}"\nancestors = ["cyclepkg"]\n'
    )
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    if lint is None:
        pytest.fail("lint-imports is not installed beside this interpreter; run scripts/bootstrap.sh")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    return subprocess.run(
        [lint, "--config", str(config), "--no-cache"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def test_the_no_cycles_contract_breaks_on_a_cycle_between_siblings(tmp_path: Path) -> None:
    broken = _lint(tmp_path, cycle=True)
    assert broken.returncode != 0
    assert "BROKEN" in broken.stdout
    assert ".relay" in broken.stdout
    assert ".stream" in broken.stdout
    kept = _lint(tmp_path, cycle=False)
    assert kept.returncode == 0, kept.stdout + kept.stderr
    assert "KEPT" in kept.stdout
