#!/usr/bin/env bash
# Installs, from Debian's packages, what pgs needs on a fresh Debian 12 machine: HAProxy, the
# PostgreSQL 15 client, the Docker engine and curl; with --tests also the PostgreSQL 15 server
# binaries the test suite runs, promtool (Debian ships it in `prometheus`, whose package also
# installs a Prometheus server that systemd starts on :9090), lintian, systemd-analyze and
# dpkg-dev. Checks the Rust toolchain first (Debian 12's rustc is too old; rustup's is
# needed). Idempotent: installs only what is missing. Run as root.
#
#   scripts/install-deps.sh [--tests]
#
# Note: Debian's postgresql-15 package (--tests) creates and, under systemd, starts a cluster
# "15/main" on port 5432; `pg_dropcluster --stop 15 main` removes it if HAProxy needs that port.
set -euo pipefail
cd "$(dirname "$0")/.."

tests=0
case "${1:-}" in
    --tests) tests=1 ;;
    "") ;;
    *) echo "usage: $0 [--tests]" >&2; exit 2 ;;
esac

# Rust first: nothing else is worth installing without it.
want=$(sed -n 's/^rust-version = "\(.*\)"/\1/p' Cargo.toml)
if ! command -v cargo >/dev/null 2>&1; then
    echo "install-deps: cargo not found. pgs needs Rust $want or newer, from rustup:" >&2
    echo "  curl --proto '=https' -sSf https://sh.rustup.rs | sh -s -- -y --component rustfmt,clippy" >&2
    echo "  (Debian 12's rustc 1.63 is too old), then open a new shell or: . ~/.cargo/env" >&2
    exit 1
fi
have=$(rustc --version | cut -d' ' -f2)
if [ "$(printf '%s\n%s\n' "$want" "$have" | sort -V | head -n1)" != "$want" ]; then
    echo "install-deps: rustc $have is older than the $want pgs needs; \`rustup update\`" >&2
    exit 1
fi
if [ "$tests" = 1 ] && ! { cargo fmt --version && cargo clippy --version; } >/dev/null 2>&1; then
    echo "install-deps: the tests need rustfmt and clippy: \`rustup component add rustfmt clippy\`" >&2
    exit 1
fi

need=()
command -v haproxy >/dev/null 2>&1 || need+=(haproxy)
command -v psql >/dev/null 2>&1 || need+=(postgresql-client-15)
if [ "$tests" = 1 ]; then
    [ -x /usr/lib/postgresql/15/bin/postgres ] || need+=(postgresql-15)
    command -v promtool >/dev/null 2>&1 || need+=(prometheus)   # promtool: alert rule tests
    command -v lintian >/dev/null 2>&1 || need+=(lintian)        # checks the .deb
    command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd) # checks the units
    command -v dpkg-shlibdeps >/dev/null 2>&1 || need+=(dpkg-dev) # builds the .deb
fi
command -v dockerd >/dev/null 2>&1 || need+=(docker.io)
command -v curl >/dev/null 2>&1 || need+=(curl)

if [ ${#need[@]} -eq 0 ]; then
    echo "install-deps: everything is installed (rustc $have)"
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "install-deps: missing ${need[*]}; run as root (or install them yourself)" >&2
    exit 1
fi
echo "install-deps: installing ${need[*]} (apt-get; a minute or two on a fresh machine)"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
echo "install-deps: done"
