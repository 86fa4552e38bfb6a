#!/usr/bin/env bash
# Install what a fresh Debian 12 machine lacks to build, run and test ghost*, idempotently:
# system packages (wireguard-go, wireguard-tools, nftables, iproute2, iputils-ping, iperf3, node + npm, coturn
# for ghostgate's TURN interop tests), a
# virtual environment in .venv with the project installed editable plus its dev tools, and the OIDC
# tests' OpenID provider (npm).
set -euo pipefail
cd "$(dirname "$0")/.."
need_apt=()
for pair in wireguard-go:wireguard-go wg:wireguard-tools nft:nftables ip:iproute2 ping:iputils-ping iperf3:iperf3 \
            node:nodejs npm:npm turnutils_uclient:coturn; do
  cmd=${pair%%:*}; pkg=${pair#*:}
  command -v "$cmd" >/dev/null 2>&1 || PATH=$PATH:/usr/sbin:/sbin command -v "$cmd" >/dev/null 2>&1 || need_apt+=("$pkg")
done
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || need_apt+=(python3-venv)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "bootstrap: missing ${need_apt[*]}; run as root (sudo) so they can be installed with apt-get" >&2
    exit 1
  fi
  echo "bootstrap: apt-get install ${need_apt[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import ghostcore, grpc_tools, pytest' >/dev/null 2>&1 \
   || [ pyproject.toml -nt .venv/.installed ]; then
  echo "bootstrap: creating .venv and installing ghost* with its dev tools" >&2
  python3 -m venv .venv
  .venv/bin/pip install -q --upgrade pip >/dev/null
  .venv/bin/pip install -q -e '.[dev,fast]'
  touch .venv/.installed
fi
# The real OpenID provider the OIDC tests start (tests/fixtures/oidc, exact versions from its lock file).
oidc=tests/fixtures/oidc
if [ ! -d "$oidc/node_modules" ] || [ "$oidc/package-lock.json" -nt "$oidc/node_modules" ]; then
  echo "bootstrap: npm ci --prefix $oidc" >&2
  npm ci --prefix "$oidc" --no-audit --no-fund >/dev/null
  touch "$oidc/node_modules"
fi
