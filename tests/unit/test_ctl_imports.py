"""ghostctl starts without loading what only some commands use: every command pays for its start, and
scripts (and the benchmarks that poll ``ghostctl status``) run it many times."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("dns.query", "aioquic", "trio", "ghostcore.policy")


def test_ghostctl_starts_without_the_resolver_client_or_the_policy_engine() -> None:
    code = f"import json, sys, ghostctl.cli; print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert json.loads(out.stdout) == []
