"""ACL policy: the ``acls.toml`` format, its parser, the incremental compiler, access checks, the import
of Tailscale policy files and policy diffs. PURE.

Shared by ghostmesh (which compiles the policy in force into each node's peers and filter) and ghostctl
(which checks, imports and diffs policy files offline), so it lives in ghostcore. No asyncio, grpc,
sqlite3 or subprocess here (an import-linter contract keeps it so); loading the file, storing the policy
and shipping the results live in :mod:`ghostmesh.policy_source` and the mapper.

Modules: ``model`` (the types and Tailscale's semantics), ``parse`` (the TOML grammar), ``compiler``
(incremental peers + filters), ``evaluate`` (access questions and ``[[tests]]``), ``tsimport`` (Tailscale
/ Headscale HuJSON -> TOML), ``diff`` (who gains or loses access between two policies). IP protocol names
are :mod:`ghostcore.ipproto`, outside this package: ghostlink's filter needs that table, not the compiler
this package's import brings.
"""

from __future__ import annotations

from ghostcore.policy.compiler import ALLOW_ALL, Compiler, Delta, Filter, FRule, NodeIdent
from ghostcore.policy.evaluate import Answer, PolicyTestError, check, run_tests, validate
from ghostcore.policy.model import Policy, PolicyError
from ghostcore.policy.parse import parse_policy

__all__ = [
    "ALLOW_ALL",
    "Answer",
    "Compiler",
    "Delta",
    "FRule",
    "Filter",
    "NodeIdent",
    "Policy",
    "PolicyError",
    "PolicyTestError",
    "check",
    "parse_policy",
    "run_tests",
    "validate",
]
