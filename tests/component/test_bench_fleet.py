"""The fleet simulator split over worker processes (:mod:`bench.fleet`, :mod:`bench.fleet_worker`), at a
tiny N against a real ghostmesh: the parent's aggregation of the workers' answers counts every node and
every change sample once, and nothing it started outlives it."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

from bench.fanout import Procs
from bench.fleet import measure, parser

N, CHANGES = 20, 3


class _Recording(Procs):
    """Procs that remembers what it started, so the test can see each process has ended."""

    def __init__(self) -> None:
        super().__init__()
        self.started: list[subprocess.Popen[Any]] = []

    def start(self, argv: list[str], **kw: Any) -> subprocess.Popen[Any]:
        proc = super().start(argv, **kw)
        self.started.append(proc)
        return proc


def test_two_workers_aggregate_every_node_and_every_change_sample(tmp_path: Path) -> None:
    opts = parser().parse_args(
        [
            "--nodes",
            str(N),
            "--workers",
            "2",
            "--channels",
            "3",
            "--changes",
            str(CHANGES),
            "--phase-timeout",
            "60",
        ]
    )
    procs = _Recording()
    try:
        result = measure(N, tmp_path / "run", procs, opts)
        ended = [proc.poll() is not None for proc in procs.started]  # measure stopped them itself
    finally:
        procs.stop_all()
    assert ended == [True, True, True]  # the server and both workers
    assert result["workers"] == 2
    assert result["have_map"] == N  # every node got its full map in the join wave
    assert result["complete"] == N  # ... and knew all N-1 peers
    assert result["change_samples"] == CHANGES * (N - 1)  # every other stream timed every change
    assert 0 < result["change_p50_s"] <= result["change_p99_s"] < 60
    assert result["storm_have_map"] == N  # every reopened stream got a map again
    assert result["messages"] >= N
    assert result["bytes"] > 0
    assert result["sim_hwm_kib"] > 0
    logs = sorted(p.name for p in (tmp_path / "run").iterdir() if p.name.startswith("worker-"))
    assert logs == ["worker-0.log", "worker-1.log"]
