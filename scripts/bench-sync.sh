#!/usr/bin/env bash
# Benchmark 3: sync at scale.
#
# A fresh `pgs-agent init` layout whose tenants file holds TENANTS external tenants (unix socket
# addresses that nothing listens on: sync neither needs nor checks them), HAProxy started on the
# rendered config. Times `pgs-agent sync` when nothing changed (RUNS times) and checks the master's
# reload counter (`show proc` on the master CLI) stays put; then adds ADD tenants in one edit
# and times one sync, which should reload exactly once. Also HAProxy's worker RSS (from /proc)
# with TENANTS backends (and with none, as a baseline) and the agent's max RSS (/usr/bin/time -v).
#
#   scripts/bench-sync.sh [--out FILE]     Markdown section to FILE (default stdout)
#
# Env: TENANTS (default 1000), ADD (default 100), RUNS (default 5), PGS_AGENT, BENCH_KEEP=1.
source "$(dirname "$0")/bench-common.sh"
bench_parse_args "$@"
TENANTS=${TENANTS:-1000}
ADD=${ADD:-100}
RUNS=${RUNS:-5}

bench_preflight
machine=$(bench_machine_md)
bench_layout sync

# Baseline: HAProxy's worker with no tenants, same settings and binary.
bench_start_haproxy
sleep 1
base_rss=$("$BENCH_PY" "$BENCH_TOOL" worker-rss --master "$BENCH_MASTER")
log "HAProxy worker RSS with 0 tenants: $base_rss KiB"
bench_stop_haproxy

"$BENCH_PY" "$BENCH_TOOL" write-tenants --file "$BENCH_DIR/tenants.json" --count "$TENANTS" \
    --sock-root "$BENCH_DIR/nowhere"
t0=$(date +%s%N)
bench_start_haproxy
t1=$(date +%s%N)
log "render + HAProxy start with $TENANTS tenants: $(( (t1 - t0) / 1000000 )) ms"
sleep 1

bench_tool "$BENCH_DIR/body.md" sync --agent "$BENCH_AGENT" --cfg "$BENCH_CFG" --dir "$BENCH_DIR" \
    --master "$BENCH_MASTER" --admin "$BENCH_ADMIN" --tenants "$TENANTS" --add "$ADD" \
    --runs "$RUNS" --baseline-rss "$base_rss"
body=$(cat "$BENCH_DIR/body.md")

cmd="scripts/bench-sync.sh"
[ "$TENANTS" = 1000 ] && [ "$ADD" = 100 ] && [ "$RUNS" = 5 ] || cmd="TENANTS=$TENANTS ADD=$ADD RUNS=$RUNS $cmd"
{
    echo "## 3. Sync at scale"
    echo
    echo "Command: \`$cmd\` (took $(bench_elapsed) s, build excluded)"
    echo
    echo "$machine"
    bench_load_md
    echo "- Setup: $TENANTS external tenants, all enabled, in tenants.json; \`pgs-agent render\` then HAProxy"
    echo "  2.6 master-worker started on that config; Docker engine $(docker info >/dev/null 2>&1 && echo running || echo 'not running') (sync observes it; no managed tenants)."
    echo
    echo "$body"
} >"$BENCH_OUT"
log "done"
