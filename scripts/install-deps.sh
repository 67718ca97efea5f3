#!/usr/bin/env bash
# Installs, from Debian's packages, what pgs needs on a fresh Debian 12 machine: HAProxy,
# PostgreSQL 15 (server binaries for tests, client for users), the Docker engine, and a Rust
# toolchain check. Idempotent: installs only what is missing. Run as root.
set -euo pipefail

need=()
command -v haproxy >/dev/null 2>&1 || need+=(haproxy)
command -v psql >/dev/null 2>&1 || need+=(postgresql-client-15)
[ -x /usr/lib/postgresql/15/bin/postgres ] || need+=(postgresql-15)
command -v dockerd >/dev/null 2>&1 || need+=(docker.io)
command -v curl >/dev/null 2>&1 || need+=(curl)

if [ ${#need[@]} -eq 0 ]; then
    echo "install-deps: everything is installed"
else
    if [ "$(id -u)" != 0 ]; then
        echo "install-deps: missing ${need[*]}; run as root (or install them yourself)" >&2
        exit 1
    fi
    echo "install-deps: installing ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1; then
    echo "install-deps: cargo not found; install Rust (rustup) first" >&2
    exit 1
fi
