#!/usr/bin/env bash
# Benchmark 3: sync at scale.
#
# A fresh `pgs-agent init` layout whose tenants file holds TENANTS external tenants (unix socket
# addresses that nothing listens on: sync neither needs nor checks them), HAProxy started on the
# rendered config. Times `pgs-agent sync` when nothing changed (RUNS times) and checks the master's
# reload counter (`show proc` on the master CLI) stays put; then adds ADD tenants in one edit
# and times one sync, which should reload exactly once. Also HAProxy's worker RSS (from /proc)
# with TENANTS backends (and with none, as a baseline), the agent's max RSS (/usr/bin/time -v), and
# the memory of the daemon (`pgs-agent run`, HTTP API on a unix socket) holding TENANTS+ADD tenants.
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

# The daemon with every tenant loaded: its memory once its first pass is done (/readyz answers 200).
api_sock=$BENCH_DIR/run/api.sock
sed -i "/^\[api\]/,/^\[/ s|^listen = .*|listen = \"$api_sock\"|" "$BENCH_CFG"
grep -q "^listen = \"$api_sock\"" "$BENCH_CFG" || die "could not set [api] listen in $BENCH_CFG"
# The token goes to curl in a header file, never on its command line.
hdr=$BENCH_DIR/secrets/api-header
(umask 077 && printf 'Authorization: Bearer %s\n' "$(cat "$BENCH_DIR/secrets/api-token")" >"$hdr")
t0=$(date +%s%N)
"$BENCH_AGENT" -c "$BENCH_CFG" run >>"$BENCH_DIR/daemon.log" 2>&1 </dev/null &
daemon=$!
BENCH_PIDS+=("$daemon")
ready=""
for i in $(seq 300); do
    if curl -fsS -H "@$hdr" --unix-socket "$api_sock" http://pgs/readyz >/dev/null 2>&1; then ready=$(( ($(date +%s%N) - t0) / 1000000 )); break; fi
    kill -0 "$daemon" 2>/dev/null || break
    sleep 0.1
done
[ -n "$ready" ] || { tail -n 20 "$BENCH_DIR/daemon.log" >&2; die "the daemon did not become ready"; }
sleep 5
daemon_mem=$(awk '/^VmRSS/ {r = $2} /^VmHWM/ {h = $2} END {printf "VmRSS %.1f MiB, VmHWM %.1f MiB", r / 1024, h / 1024}' "/proc/$daemon/status")
log "daemon with $((TENANTS + ADD)) tenants: ready after $ready ms; $daemon_mem"
bench_stop_pid "$daemon"

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
    echo "- The daemon (\`pgs-agent run\`, HTTP API on a unix socket) with all $((TENANTS + ADD)) tenants: /readyz answered 200"
    echo "  ${ready} ms after it started (its first pass: nothing to change); 5 s later: $daemon_mem."
} >"$BENCH_OUT"
log "done"
