#!/usr/bin/env bash
# README command 1: install what is missing, then run a local demo mesh (needs root).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null; then exec sudo "$0" "$@"; fi
  echo "scripts/demo.sh: needs root (network namespaces, TUN devices): run it as root" >&2
  exit 1
fi
bash scripts/bootstrap.sh
exec .venv/bin/python scripts/demo.py "$@"
