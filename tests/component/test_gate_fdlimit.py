"""ghostgate raises its open-file limit to what its limits need, or refuses to start with one line.

ghostgate runs as a real process under limits set just for it (a small launcher sets RLIMIT_NOFILE and
execs it: a process may lower its hard limit, but not raise it again, so the test's own is left alone).
"""

from __future__ import annotations

import resource
import subprocess
import sys
from pathlib import Path

GATE = str(Path(sys.executable).parent / "ghostgate")


def _argv(tmp_path: Path, soft: int, hard: int, settings: str) -> list[str]:
    cfg = tmp_path / "ghostgate.toml"
    cfg.write_text(f'[relay]\nlisten = "127.0.0.1:0"\n{settings}\nrelay_address = "127.0.0.1"\n')
    launch = (
        "import os, resource, sys; "
        f"resource.setrlimit(resource.RLIMIT_NOFILE, ({soft}, {hard})); os.execv(sys.argv[1], sys.argv[1:])"
    )
    return [sys.executable, "-c", launch, GATE, "--config", str(cfg)]


def test_a_hard_limit_below_what_the_limits_need_stops_the_start(tmp_path: Path) -> None:
    argv = _argv(tmp_path, 256, 4096, '[turn]\nsecret = "s"\nmax_allocations = 5000')
    res = subprocess.run(argv, capture_output=True, text=True, timeout=20, check=False)
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("ghostgate: the open-file limit is 4096 (hard), below the 15256 that ")
    assert "listening" not in res.stderr


def test_the_soft_limit_is_raised_to_what_the_limits_need(tmp_path: Path) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    settings = 'max_connections = 100\n[turn]\nsecret = "s"\nmax_allocations = 1000'
    with subprocess.Popen(
        _argv(tmp_path, 256, hard, settings), stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
    ) as proc:
        try:
            assert proc.stderr is not None
            line = proc.stderr.readline()  # the ready line
            assert line.startswith("ghostgate: listening on 127.0.0.1:"), line
            limits = Path(f"/proc/{proc.pid}/limits").read_text().splitlines()
            soft = next(x for x in limits if x.startswith("Max open files")).split()[3]
            assert int(soft) == 1000 + 100 + 256
        finally:
            proc.terminate()
            assert proc.wait(timeout=10) == 0
