#!/usr/bin/env bash
# The whole test suite, as CI runs it: bootstrap, generated-code staleness, ruff, mypy, import-linter,
# then pytest over unit, component and netns tests (netns tests need root; as root they are required).
# Extra arguments go to pytest (e.g. scripts/test.sh tests/unit -x).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export PATH="$PWD/.venv/bin:$PATH"
echo "== generated code is up to date"
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
PYTHON=.venv/bin/python bash scripts/genproto.sh "$tmp/pb" >/dev/null 2>&1
if ! diff -r -q -x __pycache__ "$tmp/pb" ghostcore/pb; then
  echo "generated code in ghostcore/pb is stale: run scripts/genproto.sh and commit the result" >&2
  exit 1
fi
echo "== ruff";          ruff check .
echo "== ruff format";   ruff format --check . >/dev/null || { ruff format --diff . | head -50; exit 1; }
echo "== mypy (strict)"; mypy
echo "== import-linter"; lint-imports
echo "== pytest"
if [ "$(id -u)" -eq 0 ]; then export GHOST_REQUIRE_NETNS=1; fi
exec pytest "$@"
