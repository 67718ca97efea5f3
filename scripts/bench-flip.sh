#!/usr/bin/env bash
# Benchmark 1: access flip latency.
#
# One external tenant pointing at a local PostgreSQL 15 this script starts (initdb as user
# postgres into a temp dir, unix socket only, SCRAM password). HAProxy runs from a fresh
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

# --- local PostgreSQL: initdb as postgres, unix socket in its own temp dir, SCRAM.
pgroot=$(mktemp -d "${TMPDIR:-/tmp}/pgsbench-pg.XXXXXX")
BENCH_TMP+=("$pgroot")
chown postgres:postgres "$pgroot"
chmod 755 "$pgroot"
su_pw=$(head -c 18 /dev/urandom | base64 | tr -d '/+=')
tenant_pw=$(head -c 18 /dev/urandom | base64 | tr -d '/+=')
printf '%s\n' "$su_pw" >"$pgroot/pwfile"
chown postgres "$pgroot/pwfile"
chmod 600 "$pgroot/pwfile"
log "initdb (PostgreSQL 15) in $pgroot/data"
runuser -u postgres -- "$PGBIN/initdb" -D "$pgroot/data" -U postgres --pwfile="$pgroot/pwfile" \
    --auth=scram-sha-256 -E UTF8 --no-sync >/dev/null
rm -f "$pgroot/pwfile"
BENCH_PGDATA=$pgroot/data
runuser -u postgres -- "$PGBIN/pg_ctl" -D "$pgroot/data" -l "$pgroot/postgres.log" -w -t 30 \
    -o "-c listen_addresses='' -k $pgroot -c max_connections=50" start >/dev/null
PGPASSWORD=$su_pw psql -X -q -h "$pgroot" -U postgres -d postgres -v ON_ERROR_STOP=1 \
    -c "create role $TENANT login password '$tenant_pw'" -c "create database $TENANT owner $TENANT" >/dev/null

# --- the external tenant and HAProxy.
cat >"$BENCH_DIR/tenants.json" <<EOF
{"version": 1,
 "tenants": {"$TENANT": {"access": "enabled", "external": {"address": "$pgroot/.s.PGSQL.5432"}}}}
EOF
bench_start_haproxy
answer=$(psql -X "host=127.0.0.1 port=$BENCH_PORT user=$TENANT dbname=$TENANT password=$tenant_pw sslmode=disable" \
    -Atqc "select current_user") || die "the tenant does not answer through HAProxy"
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
