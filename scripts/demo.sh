#!/usr/bin/env bash
# README command 1: install what is missing, then run a local demo mesh (needs root).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/python scripts/demo.py "$@"
