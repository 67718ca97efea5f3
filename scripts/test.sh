#!/usr/bin/env bash
# The whole test suite, from a fresh Debian 12 machine: installs what is missing, starts a Docker
# engine if none answers, builds the tenant image, then runs formatting, lint and every test
# against real HAProxy, PostgreSQL and dockerd. Idempotent. Run as root from the repository.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
step() { echo "==> [$(( $(date +%s) - start ))s] $*"; }

step "dependencies"
scripts/install-deps.sh --tests
step "Docker engine"
scripts/start-dockerd.sh
step "tenant image"
docker/build-image.sh 15

# A missing tool fails the suite instead of skipping tests.
export PGS_REQUIRE_INTEGRATION=1
step "cargo fmt --check"
cargo fmt --all -- --check
step "cargo clippy"
cargo clippy --all-targets --locked -- -D warnings
step "alert rules (promtool)"
promtool check rules monitoring/pgs-alerts.yml
promtool test rules monitoring/tests/pgs-alerts.test.yml
step "cargo test"
cargo test --locked
step "done"
