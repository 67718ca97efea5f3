#!/usr/bin/env bash
# Installs, from Debian's packages, what pgs needs on a fresh Debian 12 machine: HAProxy, the
# PostgreSQL 15 client, the Docker engine and curl; with --tests also the PostgreSQL 15 server
# binaries, lua5.3, openssl and a venv with psycopg (libpq >= 17) the test suite runs,
# promtool (Debian ships it in `prometheus`, whose package also installs a Prometheus
# server that systemd starts on :9090), lintian, systemd-analyze and dpkg-dev. Checks the
# Rust toolchain first (Debian 12's rustc is too old; rustup's is needed). Idempotent:
# installs only what is missing. Run as root.
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
    command -v lua5.3 >/dev/null 2>&1 || need+=(lua5.3)
    command -v openssl >/dev/null 2>&1 || need+=(openssl)
    command -v setpriv >/dev/null 2>&1 || need+=(util-linux)
    /usr/bin/python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || need+=(python3-venv)
    command -v promtool >/dev/null 2>&1 || need+=(prometheus)   # promtool: alert rule tests
    command -v lintian >/dev/null 2>&1 || need+=(lintian)        # checks the .deb
    command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd) # checks the units
    command -v dpkg-shlibdeps >/dev/null 2>&1 || need+=(dpkg-dev) # builds the .deb
fi
command -v dockerd >/dev/null 2>&1 || need+=(docker.io)
command -v curl >/dev/null 2>&1 || need+=(curl)

# The tests' libpq >= 17 client (direct SSL): psycopg's binary wheel bundles libpq 18, in a
# venv of Debian's python3. PGS_TEST_VENV moves it; the tests read PGS_TEST_PYTHON.
venv=${PGS_TEST_VENV:-/opt/pgs-test-venv}
make_venv() {
    [ "$tests" = 1 ] || return 0
    if ! "$venv/bin/python" -c 'import psycopg; assert psycopg.pq.version() >= 170000' >/dev/null 2>&1; then
        echo "install-deps: creating $venv with psycopg[binary] (libpq >= 17) from PyPI"
        /usr/bin/python3 -m venv --clear "$venv"
        "$venv/bin/pip" install -q --disable-pip-version-check "psycopg[binary]>=3.2"
    fi
}

if [ ${#need[@]} -eq 0 ]; then
    make_venv
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
make_venv
echo "install-deps: done"
