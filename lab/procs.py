"""Processes: bounded command runs, processes spawned inside a namespace, and their logs.

``Proc``: ``proc.pid``, ``proc.log_path``, ``proc.stop(grace=5.0) -> int | None``, ``proc.kill()``,
``proc.alive()``, ``proc.reap(timeout) -> bool``, ``proc.log_text()``. Processes are signalled by PID, never
by name. Logs of spawned processes go to the lab's ``artifacts_dir`` as ``<host>-<log_name>.log`` and are
kept; a log containing ``TRACEBACK_MARK`` is what ``Lab.assert_no_tracebacks`` reports.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from lab.errors import LabError

TRACEBACK_MARK = "Traceback (most recent call last)"


def run(
    argv: Sequence[str],
    *,
    check: bool = True,
    timeout: float = 30.0,
    input: str | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` (bounded by ``timeout``); ``LabError`` when it times out, or fails and ``check`` is on."""
    try:
        cp = subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
            env={**os.environ, **env} if env is not None else None,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"command timed out after {timeout}s: {' '.join(argv)}") from exc
    if check and cp.returncode != 0:
        raise LabError(
            f"command failed (exit {cp.returncode}): {' '.join(argv)}: {(cp.stderr or cp.stdout).strip()}"
        )
    return cp


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers kill(0); treat it as gone (its parent will reap it).
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


class Proc:
    """A process started inside a namespace, logging stdout+stderr to ``log_path``."""

    def __init__(self, popen: subprocess.Popen[bytes], log_path: Path, argv: Sequence[str]) -> None:
        self.popen = popen
        self.pid = popen.pid
        self.log_path = log_path
        self.argv = list(argv)

    def __repr__(self) -> str:
        return f"Proc(pid={self.pid}, argv={self.argv[:3]!r}, log={self.log_path.name})"

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: int) -> None:
        """Send ``sig`` to this PID (never by name); a no-op when it has exited."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def stop(self, grace: float = 5.0) -> int | None:
        """SIGTERM, wait up to ``grace`` seconds, then SIGKILL. Returns the exit code."""
        self.signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self.kill()
        return self.popen.returncode

    def kill(self, wait: float = 5.0) -> None:
        """SIGKILL this PID and reap it (bounded)."""
        self.signal(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):  # SIGKILL cannot be ignored; bound anyway
            self.popen.wait(timeout=wait)

    def reap(self, timeout: float) -> bool:
        """Collect the exit status (bounded); True once it has one. A process that died while its kill
        waited on the kernel (a TUN device torn down under the RTNL lock of a busy namespace cleanup) is
        a zombie until reaped, and an unreaped ``Popen`` warns when garbage-collected, in whichever test
        happens to run then."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=timeout)
        return self.popen.returncode is not None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


def new_log_path(artifacts_dir: Path, host_name: str, log_name: str) -> Path:
    """``<artifacts_dir>/<host_name>-<log_name>.log``, numbered ``.2``, ``.3``... when taken already."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", log_name)
    path = artifacts_dir / f"{host_name}-{safe}.log"
    n = 1
    while path.exists() and n < 1000:
        n += 1
        path = artifacts_dir / f"{host_name}-{safe}.{n}.log"
    return path


def spawn_in_netns(netns: str, argv: Sequence[str], log_path: Path, env: Mapping[str, str] | None) -> Proc:
    """Start ``argv`` inside ``netns`` (``ip netns exec`` execs it after setns, so the PID is the program)."""
    full = ["ip", "netns", "exec", netns, *argv]
    with log_path.open("wb") as log:
        popen = subprocess.Popen(
            full,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **env} if env is not None else None,
            start_new_session=True,  # a Ctrl-C of the test run does not hit them before cleanup
        )
    return Proc(popen, log_path, argv)
