#!/usr/bin/env bash
# Runs every benchmark, one after another, and rewrites BENCHMARKS.md with their sections.
#
#   scripts/bench-all.sh
#
# Builds the agent once (cargo build --release), then runs scripts/bench-flip.sh,
# scripts/bench-create.sh, scripts/bench-sync.sh, scripts/bench-datapath.sh,
# scripts/bench-tune.sh, scripts/bench-tls.sh, scripts/bench-faults.sh, scripts/bench-backups.sh,
# scripts/bench-wake.sh and scripts/bench-density.sh with that binary.
# BENCHMARKS.md is replaced only when all of them succeed; otherwise it is left as it was and the
# sections that did finish are kept in a temp file whose path is printed. Each script cleans up
# after itself (HAProxy, PostgreSQL, containers and volumes with its own docker prefix, temp
# dirs). As root, on a machine with a Docker engine and the image pgs/postgres:15. Env overrides
# of each script (FLIPS, RT_FLIPS, COUNT, IDLE, TENANTS, ADD, RUNS, ROUNDS, DURATION, MODES,
# VARIANTS, PROFILE, SESSIONS, PGS_TEST_VENV, WAKES, DEEP_WAKES, WAKE_TENANTS, ROTATE, PAUSE, BATCH,
# ACTIVE, ROTATIONS, PERIOD, PROBES, STAGGER, MAX_LIGHT, IDLE_TIMEOUT) pass through; COUNT is read by both
# bench-create.sh (default 5) and bench-density.sh (default 1000).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
benches=(flip create sync datapath tune tls faults backups wake density)

for i in 1 2 3 4 5 6; do  # src/ may be mid-edit by someone else: wait and retry
    cargo build --release --quiet && break
    [ "$i" = 6 ] && { echo "bench-all: cargo build --release keeps failing" >&2; exit 1; }
    echo "bench-all: build failed (attempt $i); retrying in 20 s" >&2
    sleep 20
done
# A copy, so a concurrent rebuild of target/ cannot swap the binary in the middle of a run.
work=$(mktemp -d "${TMPDIR:-/tmp}/pgsbench-all.XXXXXX")
cp target/release/pgs-agent "$work/pgs-agent"
export PGS_AGENT=$work/pgs-agent

failed=()
for b in "${benches[@]}"; do
    echo "bench-all: scripts/bench-$b.sh" >&2
    if ! scripts/bench-"$b".sh --out "$work/$b.md"; then
        failed+=("$b")
        rm -f "$work/$b.md"
    fi
done

{
    echo "# Benchmarks"
    echo
    echo "How to reproduce: \`scripts/bench-all.sh\` (as root, with a Docker engine and the image"
    echo "pgs/postgres:15) runs every benchmark below and rewrites this file; each section names the"
    echo "script that produced it, which can also be run alone (\`scripts/bench-X.sh --out FILE\`)."
    echo "All figures come from the run recorded in the section, on a shared, noisy machine: compare"
    echo "ratios measured in the same run, not absolute figures across runs."
    for b in "${benches[@]}"; do
        [ -f "$work/$b.md" ] || continue
        echo
        cat "$work/$b.md"
    done
} >"$work/BENCHMARKS.md"

if [ ${#failed[@]} -gt 0 ]; then
    echo "bench-all: failed: ${failed[*]}; BENCHMARKS.md left as it was; what finished is in $work/BENCHMARKS.md" >&2
    rm -f "$work/pgs-agent"
    exit 1
fi
cp "$work/BENCHMARKS.md" "$repo/BENCHMARKS.md"
rm -rf "$work"
echo "bench-all: wrote $repo/BENCHMARKS.md" >&2
