"""An earlier commit of ghost*, checked out beside this one, for benchmarks that compare the two in one run.

``checkout(rev)`` makes a detached ``git worktree`` of ``rev`` in a temporary directory and yields the
environment that runs it: ``PYTHONPATH`` pointing at that tree puts its packages ahead of the editable
install of this one, for every console script and ``python -m`` started with it (the program's own
directory, not the current one, leads ``sys.path``, so both trees' processes can run side by side).
Dependencies come from the same virtual environment; a baseline needing others cannot be measured
this way. The worktree is removed afterwards.
"""

from __future__ import annotations

import contextlib
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True).stdout


@contextlib.contextmanager
def checkout(rev: str) -> Iterator[dict[str, str]]:
    """The environment that runs ``rev``'s code (``PYTHONPATH`` set); the checkout is removed on exit."""
    commit = _git("rev-parse", "--verify", f"{rev}^{{commit}}").strip()
    with tempfile.TemporaryDirectory(prefix="ghost-baseline-") as tmp:
        tree = Path(tmp) / "tree"
        _git("worktree", "add", "--detach", str(tree), commit)
        try:
            yield {"PYTHONPATH": str(tree), "GHOST_BASELINE": commit[:12]}
        finally:
            _git("worktree", "remove", "--force", str(tree))
