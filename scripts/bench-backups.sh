#!/usr/bin/env bash
# Benchmark 6: backups and restores (pgBackRest in the tenant image), and the RPO.
#
# In a fresh `pgs-agent init` layout with its own docker prefix and HAProxy, for each pgbench
# scale in SCALES (7 ≈ 100 MB, 68 ≈ 1 GB): a tenant with `pgbench -i -s N` data through HAProxy;
# `tenant backup --full` time; 10 s of pgbench writes, then `tenant backup` (incremental) time;
# the repository's size on disk; `tenant restore --latest` (in place: into a new volume, then
# the swap) until the first query answers through HAProxy.
# RPO: a tenant takes a steady stream of committed inserts (pgbench -R RATE, each row stamped
# with clock_timestamp()) for LOAD seconds; then its container and data volume are destroyed
# (docker rm -f, docker volume rm) at a moment T; `tenant restore --latest` brings it back from
# its repository; RPO = T − the newest row it has (committed work lost). Target: ≤ archive_timeout.
# Needs a running Docker engine and the image pgs/postgres:15 with pgBackRest (docker/build-image.sh).
#
#   scripts/bench-backups.sh [--out FILE]     Markdown section to FILE (default stdout)
#
# Env: SCALES (default "7 68"), LOAD (default 90), RATE (default 20), PGS_AGENT (a prebuilt binary).
source "$(dirname "$0")/bench-common.sh"
bench_parse_args "$@"
SCALES=${SCALES:-7 68}
LOAD=${LOAD:-90}
RATE=${RATE:-20}

bench_preflight
docker info >/dev/null 2>&1 || die "no Docker engine answers (scripts/start-dockerd.sh starts one)"
image=pgs/postgres:15
docker run --rm --network none --entrypoint pgbackrest "$image" version >/dev/null 2>&1 \
    || die "image $image has no pgBackRest (docker/build-image.sh 15 builds one that has)"
machine=$(bench_machine_md)
# The timed work is pgBackRest's and PostgreSQL's; say so when the agent is a debug build.
case "$BENCH_AGENT" in *debug*) machine=${machine/release build/debug build} ;; esac
bench_layout backups
bench_start_haproxy
A=("$BENCH_AGENT" -c "$BENCH_CFG")
timeout_s=$(sed -n 's/^archive_timeout_secs = //p' "$BENCH_CFG")

now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.1f", b - a}'; }
mb() { awk -v b="$1" 'BEGIN {printf "%.0f MB", b / 1048576}'; }
# Runs a command as TENANT through HAProxy, the password from `tenant credentials --format env`.
as_tenant() {  # TENANT CMD...
    local t=$1
    shift
    (eval "$("${A[@]}" tenant credentials "$t" --format env)" && export PGSSLMODE=disable && "$@")
}
PSQL=$(command -v psql)
first_query() {  # TENANT → waits until a query answers through HAProxy
    local i
    for i in $(seq 1200); do
        as_tenant "$1" "$PSQL" -X -Atqc 'select 1' >/dev/null 2>&1 && return 0
        sleep 0.05
    done
    die "$1 does not answer through HAProxy"
}

rows=""
for s in $SCALES; do
    t=b$s
    log "scale $s: tenant $t"
    "${A[@]}" tenant create "$t" --enable --memory 1g >&2
    log "pgbench -i -s $s"
    as_tenant "$t" "$PGBIN/pgbench" -i -s "$s" -q >"$BENCH_DIR/init-$t.log" 2>&1 \
        || { cat "$BENCH_DIR/init-$t.log" >&2; die "pgbench -i failed"; }
    size=$(as_tenant "$t" "$PSQL" -X -Atqc 'select pg_database_size(current_database())')
    t0=$(now)
    "${A[@]}" tenant backup "$t" --full >&2
    full=$(secs "$t0" "$(now)")
    as_tenant "$t" "$PGBIN/pgbench" -n -T 10 -c 2 >"$BENCH_DIR/load-$t.log" 2>&1 || die "pgbench load failed"
    t0=$(now)
    "${A[@]}" tenant backup "$t" >&2
    incr=$(secs "$t0" "$(now)")
    repo=$(du -sb "$BENCH_DIR/backups/$t" | cut -f1)
    listing=$("${A[@]}" tenant backups "$t" --json)
    full_stored=$("$BENCH_PY" -c 'import json,sys; b=json.load(sys.stdin)["backups"]; print(b[0]["repository_size"])' <<<"$listing")
    incr_stored=$("$BENCH_PY" -c 'import json,sys; b=json.load(sys.stdin)["backups"]; print(b[-1]["repository_size"])' <<<"$listing")
    t0=$(now)
    "${A[@]}" tenant restore "$t" --latest >&2
    first_query "$t"
    restore=$(secs "$t0" "$(now)")
    rows+="| $s | $(mb "$size") | $full | $(mb "$full_stored") | $incr | $(mb "$incr_stored") | $(mb "$repo") | $restore |"$'\n'
    "${A[@]}" tenant delete "$t" --purge-data >&2
done

log "RPO: tenant rpo, $RATE inserts/s for $LOAD s, then its container and volume are destroyed"
"${A[@]}" tenant create rpo --enable >&2
as_tenant rpo "$PSQL" -X -q -c 'CREATE TABLE w (ts timestamptz NOT NULL)'
"${A[@]}" tenant backup rpo --full >&2
echo 'INSERT INTO w VALUES (clock_timestamp());' >"$BENCH_DIR/insert.sql"
as_tenant rpo "$PGBIN/pgbench" -n -f "$BENCH_DIR/insert.sql" -R "$RATE" -T $((LOAD + 30)) -c 1 >"$BENCH_DIR/rpo-load.log" 2>&1 &
load_pid=$!
BENCH_PIDS+=("$load_pid")
sleep "$LOAD"
T=$(date -u '+%Y-%m-%d %H:%M:%S.%N+00')
Tepoch=$(now)
docker rm -f "$BENCH_PREFIX-rpo" >/dev/null
docker volume rm "$BENCH_PREFIX-rpo-data" >/dev/null
log "destroyed at $T"
wait "$load_pid" 2>/dev/null || true
t0=$(now)
"${A[@]}" tenant restore rpo --latest >&2
first_query rpo
rpo_restore=$(secs "$t0" "$(now)")
newest=$(as_tenant rpo "$PSQL" -X -Atqc "select extract(epoch from max(ts)) from w")
count=$(as_tenant rpo "$PSQL" -X -Atqc "select count(*) from w")
rpo=$(secs "$newest" "$Tepoch")
verdict=$(awk -v x="$rpo" -v t="$timeout_s" 'BEGIN {print (x <= t) ? "**met**" : "**not met**"}')

cmd="scripts/bench-backups.sh"
[ "$SCALES" = "7 68" ] && [ "$LOAD" = 90 ] && [ "$RATE" = 20 ] || cmd="SCALES=\"$SCALES\" LOAD=$LOAD RATE=$RATE $cmd"
{
    echo "## 8. Backups, restores and the RPO"
    echo
    echo "Command: \`$cmd\` (took $(bench_elapsed) s, build excluded)"
    echo
    echo "$machine"
    bench_load_md
    echo "- Setup: image $image with $(docker run --rm --network none --entrypoint pgbackrest "$image" version); one repository per tenant"
    echo "  on the host's disk (posix, gzip compression, pgBackRest's defaults); tenants with memory 1g; every step timed"
    echo "  from the CLI's start to its return (restore: to the first query answered through HAProxy)."
    echo
    echo "| pgbench scale | database | full backup s | full stored | incremental s (after 10 s of pgbench) | incremental stored | repository on disk | restore --latest → first query s |"
    echo "|---:|---:|---:|---:|---:|---:|---:|---:|"
    printf '%s' "$rows"
    echo
    echo "- A restore in place restores into a new volume while the tenant still serves, then stops the tenant"
    echo "  (open sessions end; new connections are refused by HAProxy with \`tenant is not available\`), starts it"
    echo "  on the new volume and routes to it again once PostgreSQL accepts logins."
    echo "- RPO: $RATE committed inserts/s for ${LOAD} s (archive_timeout $timeout_s s), then \`docker rm -f\` of the container and"
    echo "  \`docker volume rm\` of its data at $T; \`tenant restore rpo --latest\` brought back $count rows in $rpo_restore s"
    echo "  (to the first query). Newest row restored: $(date -u -d "@${newest%.*}" '+%H:%M:%S'); **RPO $rpo s** (target ≤ archive_timeout = $timeout_s s) → $verdict."
    echo "  With a steady trickle of writes, WAL segments fill slowly and are archived when archive_timeout"
    echo "  closes them, so the loss is up to archive_timeout; a busier server fills and archives segments sooner."
} >"$BENCH_OUT"
log "done"
