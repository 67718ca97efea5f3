#!/usr/bin/env bash
# Benchmark 4: data path cost (pgbench), direct vs static HAProxy vs pgs.
#
# One external tenant `bench` → a local PostgreSQL 15 this script starts (bench_local_postgres:
# initdb -U bench into a temp dir, SCRAM password; `pgbench -i -s 1` once). The same
# server is then measured, in one run, over four paths:
#   (a) direct   pgbench → the server's unix socket
#   (b) static   pgbench → a second HAProxy instance (its own -f file, written here) on loopback
#                TCP: one frontend with a static `use_backend`, no Lua, no maps; otherwise the
#                same global/frontend/backend settings and per-connection log as pgs renders
#   (c) pgs      pgbench → HAProxy from a fresh `pgs-agent init DIR --listen 127.0.0.1:PORT
#                --api-listen ""` layout (`render`, `haproxy -W -S run/master.sock -f pgs.cfg`):
#                lua/pg-route.lua + maps
#   (d) tcp      pgbench → the server's own 127.0.0.1 TCP port (a reference: how much of the
#                hop's cost is TCP itself, which pgs's clients use in any case)
# for P1 (connection setup: `pgbench -C -S`, a new connection per transaction) and P2 (steady:
# `pgbench -S`, persistent connections); `-c 4 -j 2 -T DURATION -n`, sslmode=disable, password
# in PGPASSWORD. ROUNDS rounds; each round runs P1 then P2 over all four paths, the order of the
# paths rotating from round to round. HAProxy settings for the hop: scripts/bench-tune.sh.
#
#   scripts/bench-datapath.sh [--out FILE]     Markdown section to FILE (default stdout)
#
# Env: ROUNDS (default 5), DURATION seconds (default 5), PGS_AGENT (a prebuilt binary; default: cargo build --release and use
# target/release/pgs-agent), BENCH_KEEP=1 keeps the temp dirs.
source "$(dirname "$0")/bench-common.sh"
bench_parse_args "$@"
ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-5}
TENANT=bench

bench_preflight
machine=$(bench_machine_md)

bench_layout datapath --api-listen ""
bench_local_postgres "$TENANT"
bench_pgbench_init
SOCK=$BENCH_PG_SOCK
bench_raw_dir

# --- (c) pgs: the external tenant, rendered, HAProxy master-worker.
cat >"$BENCH_DIR/tenants.json" <<EOF
{"version": 1,
 "tenants": {"$TENANT": {"access": "enabled", "external": {"address": "$SOCK"}}}}
EOF
bench_start_haproxy

bench_static_haproxy "$TENANT" "$SOCK"

# Connection parameters per path (host, port); user, database, password, sslmode come from env.
declare -A HOST=([direct]=$BENCH_PG_DIR [static]=127.0.0.1 [pgs]=127.0.0.1 [tcp]=127.0.0.1)
declare -A PORT=([direct]=$BENCH_PG_PORT [static]=$STATIC_PORT [pgs]=$BENCH_PORT [tcp]=$BENCH_PG_PORT)
paths=(direct static pgs tcp)
for p in "${paths[@]}"; do
    answer=$(psql -X -h "${HOST[$p]}" -p "${PORT[$p]}" -Atqc "select current_user") || die "path $p does not answer"
    [ "$answer" = "$TENANT" ] || die "unexpected answer over $p: $answer"
done
PGS_THREADS_DEFAULT=$(bench_nbthread "$BENCH_ADMIN")
STATIC_THREADS=$(bench_nbthread "$STATIC_DIR/admin.sock")
log "all four paths answer (SCRAM login); HAProxy nbthread pgs=$PGS_THREADS_DEFAULT static=$STATIC_THREADS; measuring"

declare -A TPS=()   # "MODE path" → space-separated TPS per round
for r in $(seq "$ROUNDS"); do
    order=()
    for k in 0 1 2 3; do order+=("${paths[$(( (k + r - 1) % 4 ))]}"); done
    for mode in P1 P2; do
        for p in "${order[@]}"; do
            t=$(bench_pgbench "${HOST[$p]}" "${PORT[$p]}" "$mode" "r$r-$p")
            TPS["$mode $p"]+="$t "
            log "round $r $mode $p: $t tps"
        done
    done
done

cmd="scripts/bench-datapath.sh"
[ "$ROUNDS" = 5 ] && [ "$DURATION" = 5 ] || cmd="ROUNDS=$ROUNDS DURATION=$DURATION $cmd"
declare -A LABEL=([direct]="(a) direct, unix socket" [static]="(b) HAProxy, static \`use_backend\`, no Lua" [pgs]="(c) **pgs** (HAProxy + pg-route.lua + maps)" [tcp]="(d) direct, loopback TCP (reference)")
{
    echo "## 4. Data path (pgbench)"
    echo
    echo "Command: \`$cmd\` (took $(bench_elapsed) s, build excluded)"
    echo
    echo "$machine"
    bench_load_md
    echo "- Setup: one external tenant \`$TENANT\` → a local PostgreSQL 15 (initdb -U $TENANT, SCRAM, unix socket,"
    echo "  max_connections 50; \`pgbench -i -s 1\` once). Paths: (a) pgbench → the server's unix socket;"
    echo "  (b) a second HAProxy 2.6 instance (\`haproxy -W -f static.cfg\`, written by the script) on"
    echo "  127.0.0.1 TCP → the same socket via a static \`use_backend\`: same global/frontend/backend"
    echo "  settings and per-connection log line as pgs renders, minus Lua and maps; (c) pgs: a fresh"
    echo "  \`pgs-agent init DIR --listen 127.0.0.1:PORT --api-listen \"\"\` layout, tenants.json with the"
    echo "  tenant enabled and \`external.address\` = the socket, \`pgs-agent -c DIR/pgs.toml render\`,"
    echo "  \`haproxy -W -S DIR/run/master.sock -f DIR/haproxy/pgs.cfg\`. HAProxy nbthread: pgs $PGS_THREADS_DEFAULT, static $STATIC_THREADS."
    echo "  (d) pgbench → the server's own port on 127.0.0.1, a reference for what TCP alone costs."
    echo "  pgbench, PostgreSQL and both HAProxy instances share the same $(nproc) CPUs."
    echo "- pgbench: P1 \`pgbench -C -S -n -c $BENCH_CLIENTS -j $BENCH_JOBS -T $DURATION -h HOST -p PORT\` (a new connection,"
    echo "  with SCRAM, per transaction), P2 the same without \`-C\` (4 persistent connections); user and"
    echo "  database \`$TENANT\`, \`PGSSLMODE=disable\`, password in \`PGPASSWORD\`. $ROUNDS rounds; each round runs"
    echo "  P1 then P2 over the four paths, their order rotating per round (round 1: a b c d, round 2: b c d a, …)."
    echo "  Every run: exit 0, 0 failed transactions. TPS as pgbench reports it (P1 includes reconnection times)."
    echo
    echo "| test | path | runs | median TPS | min TPS | max TPS | TPS per round |"
    echo "|---|---|---:|---:|---:|---:|---|"
    for mode in P1 P2; do
        [ "$mode" = P1 ] && mname="P1 connection setup (\`-C -S\`)" || mname="P2 steady (\`-S\`)"
        for p in "${paths[@]}"; do
            read -r m lo hi <<<"$(bench_stat "${TPS[$mode $p]}")"
            echo "| $mname | ${LABEL[$p]} | $ROUNDS | $m | $lo | $hi | ${TPS[$mode $p]% } |"
        done
    done
    echo
    echo "| ratio (of medians) | P1 | P1 per round | P2 | P2 per round | target |"
    echo "|---|---:|---:|---:|---:|---|"
    p1d=$(bench_div "$(bench_med "${TPS[P1 pgs]}")" "$(bench_med "${TPS[P1 direct]}")")
    p2d=$(bench_div "$(bench_med "${TPS[P2 pgs]}")" "$(bench_med "${TPS[P2 direct]}")")
    p1s=$(bench_div "$(bench_med "${TPS[P1 pgs]}")" "$(bench_med "${TPS[P1 static]}")")
    p2s=$(bench_div "$(bench_med "${TPS[P2 pgs]}")" "$(bench_med "${TPS[P2 static]}")")
    echo "| **pgs / direct** | $p1d | $(bench_round_ratios "${TPS[P1 pgs]}" "${TPS[P1 direct]}") | $p2d | $(bench_round_ratios "${TPS[P2 pgs]}" "${TPS[P2 direct]}") | P1 ≥ 0.90 |"
    echo "| **pgs / static** | $p1s | $(bench_round_ratios "${TPS[P1 pgs]}" "${TPS[P1 static]}") | $p2s | $(bench_round_ratios "${TPS[P2 pgs]}" "${TPS[P2 static]}") | P1 and P2 ≥ 0.97 |"
    ratio_row() {  # label num den: one row of the ratio table with no target
        echo "| $1 | $(bench_div "$(bench_med "${TPS[P1 $2]}")" "$(bench_med "${TPS[P1 $3]}")") | $(bench_round_ratios "${TPS[P1 $2]}" "${TPS[P1 $3]}") | $(bench_div "$(bench_med "${TPS[P2 $2]}")" "$(bench_med "${TPS[P2 $3]}")") | $(bench_round_ratios "${TPS[P2 $2]}" "${TPS[P2 $3]}") | (none) |"
    }
    ratio_row "static / direct" static direct
    ratio_row "direct TCP / direct" tcp direct
    ratio_row "pgs / direct TCP" pgs tcp
    echo
    echo "- Targets: P1 pgs/direct $p1d ≥ 0.90 → $(bench_verdict "$p1d" 0.90); P1 pgs/static $p1s ≥ 0.97 → $(bench_verdict "$p1s" 0.97); P2 pgs/static $p2s ≥ 0.97 → $(bench_verdict "$p2s" 0.97)."
    echo "- \"Per round\" is the range of the ratio within each round (paths measured back to back), which"
    echo "  shows how much of a ratio is the machine's noise."
    echo "- HAProxy settings for the hop (threads, splice, buffers, scheduler): section 5, \`scripts/bench-tune.sh\`."
} >"$BENCH_OUT"
log "done"
