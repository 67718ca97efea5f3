#!/usr/bin/env bash
# Benchmark 1: access flip latency.
#
# One external tenant pointing at a local PostgreSQL 15 this script starts (bench_local_postgres:
# a temp dir, SCRAM password, reached through its unix socket). HAProxy runs from a fresh
# `pgs-agent init` layout. Then, in one run: FLIPS flips alternating
# `pgs-agent -c CFG access disable|enable bench` timing the command (pass A), FLIPS more while a
# raw-socket client (StartupMessage → 'R' auth request or 'E' "not available") keeps opening new
# connections to time when the new state is first observed (pass B), and RT_FLIPS bare Runtime
# API commands (`del map` / `add map`, then `set map`) on the admin socket (pass C).
#
#   scripts/bench-flip.sh [--out FILE]     Markdown section to FILE (default stdout)
#
# Env: FLIPS (default 1000), RT_FLIPS (default 1000), PGS_AGENT (a prebuilt binary; default:
# cargo build --release and use target/release/pgs-agent), BENCH_KEEP=1 keeps the temp dirs.
source "$(dirname "$0")/bench-common.sh"
bench_parse_args "$@"
FLIPS=${FLIPS:-1000}
RT_FLIPS=${RT_FLIPS:-1000}
TENANT=bench

bench_preflight
machine=$(bench_machine_md)
bench_layout flip

bench_local_postgres "$TENANT"

# --- the external tenant and HAProxy.
cat >"$BENCH_DIR/tenants.json" <<EOF
{"version": 1,
 "tenants": {"$TENANT": {"access": "enabled", "external": {"address": "$BENCH_PG_SOCK"}}}}
EOF
bench_start_haproxy
answer=$(psql -X -h 127.0.0.1 -p "$BENCH_PORT" -Atqc "select current_user") || die "the tenant does not answer through HAProxy"
[ "$answer" = "$TENANT" ] || die "unexpected answer through HAProxy: $answer"
log "tenant $TENANT answers through HAProxy (SCRAM login via psql); measuring"

bench_tool "$BENCH_DIR/body.md" flip --agent "$BENCH_AGENT" --cfg "$BENCH_CFG" --tenant "$TENANT" \
    --port "$BENCH_PORT" --admin "$BENCH_ADMIN" --map "$BENCH_DIR/haproxy/maps/access.map" \
    --flips "$FLIPS" --rt "$RT_FLIPS"
body=$(cat "$BENCH_DIR/body.md")
status=$("$BENCH_AGENT" -c "$BENCH_CFG" access status "$TENANT" | tail -n1 | tr -s ' ' | sed 's/ $//')
log "after the run: $status"

cmd="scripts/bench-flip.sh"
[ "$FLIPS" = 1000 ] && [ "$RT_FLIPS" = 1000 ] || cmd="FLIPS=$FLIPS RT_FLIPS=$RT_FLIPS $cmd"
{
    echo "## 1. Access flip latency"
    echo
    echo "Command: \`$cmd\` (took $(bench_elapsed) s, build excluded)"
    echo
    echo "$machine"
    bench_load_md
    echo "- Setup: one external tenant \`$TENANT\` → a local PostgreSQL 15 (unix socket, SCRAM), HAProxy"
    echo "  2.6 master-worker from a fresh \`pgs-agent init\` layout; the probe client is Python on the"
    echo "  same $(nproc) CPUs as HAProxy, PostgreSQL and the agent. \`access status\` after the run (tenant, file, map file, HAProxy): \`$status\`"
    echo
    echo "$body"
} >"$BENCH_OUT"
log "done"
