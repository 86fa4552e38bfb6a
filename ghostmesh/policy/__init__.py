"""ACL policy: the ``acls.toml`` format, its parser, the incremental compiler and access checks. PURE.

No asyncio, grpc, sqlite3 or subprocess here (an import-linter contract keeps it so); loading the file,
storing the policy and shipping the results live in :mod:`ghostmesh.policy_source` and the mapper.
"""

from __future__ import annotations

from ghostmesh.policy.compiler import ALLOW_ALL, Compiler, Delta, Filter, FRule, NodeIdent
from ghostmesh.policy.evaluate import Answer, PolicyTestError, check, run_tests, validate
from ghostmesh.policy.model import Policy, PolicyError, parse_policy

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
