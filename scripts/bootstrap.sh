#!/usr/bin/env bash
# Install what a fresh Debian 12 machine lacks to build, run and test ghost*, idempotently:
# system packages (wireguard-go, wireguard-tools, nftables, iproute2, iputils-ping, iperf3, node + npm, coturn
# for ghostgate's TURN interop tests, miniupnpd for the port-mapping router of the NAT lab, prometheus for
# `promtool check metrics` on what the daemons' /metrics serve, postgresql for the store tests' private
# PostgreSQL cluster, installed without Debian's default cluster, chromium + chromium-driver for the web
# console's browser test, dnsutils for `dig` in the MagicDNS netns test), a
# virtual environment in .venv with the project installed editable plus its dev tools, and the OIDC
# tests' OpenID provider (npm).
set -euo pipefail
cd "$(dirname "$0")/.."
need_apt=()
for pair in wireguard-go:wireguard-go wg:wireguard-tools nft:nftables ip:iproute2 ping:iputils-ping iperf3:iperf3 \
            node:nodejs npm:npm turnutils_uclient:coturn miniupnpd:miniupnpd \
            promtool:prometheus chromium:chromium chromedriver:chromium-driver dig:dnsutils; do
  cmd=${pair%%:*}; pkg=${pair#*:}
  command -v "$cmd" >/dev/null 2>&1 || PATH=$PATH:/usr/sbin:/sbin command -v "$cmd" >/dev/null 2>&1 || need_apt+=("$pkg")
done
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || need_apt+=(python3-venv)
# initdb and pg_ctl live in /usr/lib/postgresql/<version>/bin, not on PATH.
if ! compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null; then
  need_apt+=(postgresql)
  if [ "$(id -u)" -eq 0 ]; then  # the tests start their own cluster: no system one listening on 5432
    mkdir -p /etc/postgresql-common/createcluster.d
    echo 'create_main_cluster = false' >/etc/postgresql-common/createcluster.d/ghost-no-main.conf
  fi
fi
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
