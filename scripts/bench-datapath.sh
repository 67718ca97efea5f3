#!/usr/bin/env bash
# Benchmark 4: data path cost (pgbench), direct vs static HAProxy vs pgs.
#
# One external tenant `bench` → a local PostgreSQL 15 this script starts (initdb -U bench as user
# postgres into a temp dir, unix socket only, SCRAM password; `pgbench -i -s 1` once). The same
# server is then measured, in one run, over three paths:
#   (a) direct   pgbench → the server's unix socket
#   (b) static   pgbench → a second HAProxy instance (its own -f file, written here) on loopback
#                TCP: one frontend with a static `use_backend`, no Lua, no maps; otherwise the
#                same global/frontend/backend settings and per-connection log as pgs renders
#   (c) pgs      pgbench → HAProxy from a fresh `pgs-agent init DIR --listen 127.0.0.1:PORT
#                --api-listen ""` layout (`render`, `haproxy -W -S run/master.sock -f pgs.cfg`):
#                lua/pg-route.lua + maps
# for P1 (connection setup: `pgbench -C -S`, a new connection per transaction) and P2 (steady:
# `pgbench -S`, persistent connections); `-c 4 -j 2 -T DURATION -n`, sslmode=disable, password
# in PGPASSWORD. ROUNDS rounds; each round runs P1 then P2 over all three paths, the order of the
# paths rotating from round to round. Then (THREADS_PASS=1) P2 over pgs with `[haproxy] threads`
# unset (HAProxy's default, one per CPU) vs `threads = 1` in the layout's pgs.toml, re-rendered
# and HAProxy restarted at each switch, alternating for ROUNDS rounds.
#
#   scripts/bench-datapath.sh [--out FILE]     Markdown section to FILE (default stdout)
#
# Env: ROUNDS (default 3), DURATION seconds (default 5), THREADS_PASS (default 1; 0 skips it),
# PGS_AGENT (a prebuilt binary; default: cargo build --release and use
# target/release/pgs-agent), BENCH_KEEP=1 keeps the temp dirs.
source "$(dirname "$0")/bench-common.sh"
bench_parse_args "$@"
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-5}
THREADS_PASS=${THREADS_PASS:-1}
TENANT=bench
CLIENTS=4
JOBS=2
PGBENCH=$PGBIN/pgbench

bench_preflight
machine=$(bench_machine_md)

# --- the pgs layout, without the HTTP API (as bench_layout, plus --api-listen "").
BENCH_PREFIX="pgsbench-datapath-$$"
BENCH_DIR=$(mktemp -d "${TMPDIR:-/tmp}/pgsbench-datapath.XXXXXX")
rmdir "$BENCH_DIR"
BENCH_PORT=$(bench_free_port)
"$BENCH_AGENT" init "$BENCH_DIR" --listen "127.0.0.1:$BENCH_PORT" --api-listen "" >/dev/null
BENCH_CFG=$BENCH_DIR/pgs.toml
sed -i "s/^prefix = .*/prefix = \"$BENCH_PREFIX\"/" "$BENCH_CFG"
BENCH_ADMIN=$BENCH_DIR/run/admin.sock
BENCH_MASTER=$BENCH_DIR/run/master.sock
log "layout $BENCH_DIR, listen 127.0.0.1:$BENCH_PORT"

# --- local PostgreSQL: initdb -U bench as postgres, unix socket in its own temp dir, SCRAM.
pgroot=$(mktemp -d "${TMPDIR:-/tmp}/pgsbench-pg.XXXXXX")
BENCH_TMP+=("$pgroot")
chown postgres:postgres "$pgroot"
chmod 755 "$pgroot"
tenant_pw=$(head -c 18 /dev/urandom | base64 | tr -d '/+=')
printf '%s\n' "$tenant_pw" >"$pgroot/pwfile"
chown postgres "$pgroot/pwfile"
chmod 600 "$pgroot/pwfile"
log "initdb -U $TENANT (PostgreSQL 15) in $pgroot/data"
runuser -u postgres -- "$PGBIN/initdb" -D "$pgroot/data" -U "$TENANT" --pwfile="$pgroot/pwfile" \
    --auth=scram-sha-256 -E UTF8 --no-sync >/dev/null
rm -f "$pgroot/pwfile"
BENCH_PGDATA=$pgroot/data
runuser -u postgres -- "$PGBIN/pg_ctl" -D "$pgroot/data" -l "$pgroot/postgres.log" -w -t 30 \
    -o "-c listen_addresses='' -k $pgroot -c max_connections=50" start >/dev/null
SOCK=$pgroot/.s.PGSQL.5432
export PGPASSWORD=$tenant_pw PGSSLMODE=disable PGUSER=$TENANT PGDATABASE=$TENANT
psql -X -q -h "$pgroot" -d postgres -v ON_ERROR_STOP=1 -c "create database $TENANT" >/dev/null
log "pgbench -i -s 1"
"$PGBENCH" -i -s 1 -q -h "$pgroot" >"$pgroot/init.log" 2>&1 || { cat "$pgroot/init.log" >&2; die "pgbench -i failed"; }

# --- (c) pgs: the external tenant, rendered, HAProxy master-worker.
cat >"$BENCH_DIR/tenants.json" <<EOF
{"version": 1,
 "tenants": {"$TENANT": {"access": "enabled", "external": {"address": "$SOCK"}}}}
EOF
bench_start_haproxy

# --- (b) static HAProxy: a second instance, its own config file, no Lua.
STATIC_PORT=$(bench_free_port)
STATIC_DIR=$(mktemp -d "${TMPDIR:-/tmp}/pgsbench-static.XXXXXX")
BENCH_TMP+=("$STATIC_DIR")
STATIC_PID=""
cat >"$STATIC_DIR/static.cfg" <<EOF
# bench-datapath.sh: the same tenant behind a static use_backend (no Lua, no maps). Global,
# frontend and backend settings as pgs renders them (maxconn, timeouts, log), minus Lua.
global
    stats socket $STATIC_DIR/admin.sock mode 600 level admin
    pidfile $STATIC_DIR/haproxy.pid
    log stderr format short local0 info
    maxconn 2100

frontend static
    mode tcp
    bind 127.0.0.1:$STATIC_PORT
    maxconn 2000
    log global
    log-format "%ci:%cp [%t] %ft %b/%s %Tw/%Tc/%Tt %B %ts %ac/%fc/%bc/%sc/%rc"
    timeout client 1h
    use_backend static_$TENANT

backend static_$TENANT
    mode tcp
    timeout connect 5s
    timeout server 1h
    server $TENANT unix@$SOCK
EOF
haproxy -c -q -f "$STATIC_DIR/static.cfg" >&2 || die "static HAProxy config invalid"
stop_static() {
    local pid=$STATIC_PID
    STATIC_PID=""
    bench_stop_pid "$pid"
}
datapath_cleanup() { local rc=$?; stop_static; (exit "$rc"); bench_cleanup; }
trap datapath_cleanup EXIT
haproxy -W -f "$STATIC_DIR/static.cfg" >>"$STATIC_DIR/haproxy.log" 2>&1 </dev/null &
STATIC_PID=$!
for i in $(seq 100); do [ -S "$STATIC_DIR/admin.sock" ] && break; sleep 0.1; done
[ -S "$STATIC_DIR/admin.sock" ] || die "static HAProxy did not start"

# Connection parameters per path (host, port); user, database, password, sslmode come from env.
declare -A HOST=([direct]=$pgroot [static]=127.0.0.1 [pgs]=127.0.0.1)
declare -A PORT=([direct]=5432 [static]=$STATIC_PORT [pgs]=$BENCH_PORT)
for p in direct static pgs; do
    answer=$(psql -X -h "${HOST[$p]}" -p "${PORT[$p]}" -Atqc "select current_user") || die "path $p does not answer"
    [ "$answer" = "$TENANT" ] || die "unexpected answer over $p: $answer"
done
nbthread() { echo "show info" | socat -t 2 - "UNIX-CONNECT:$1" | sed -n 's/^Nbthread: //p'; }
PGS_THREADS_DEFAULT=$(nbthread "$BENCH_ADMIN")
STATIC_THREADS=$(nbthread "$STATIC_DIR/admin.sock")
log "all three paths answer (SCRAM login); HAProxy nbthread pgs=$PGS_THREADS_DEFAULT static=$STATIC_THREADS; measuring"

# One pgbench run in the background (so INT/TERM reach the trap); prints its TPS.
RAW=$STATIC_DIR/raw
mkdir -p "$RAW"
RUN_N=0
run_pgbench() {  # PATH MODE(P1|P2) TAG
    local path=$1 mode=$2 tag=$3 flags=(-S -n -c "$CLIENTS" -j "$JOBS" -T "$DURATION") out rc=0 tps
    [ "$mode" = P1 ] && flags=(-C "${flags[@]}")
    RUN_N=$((RUN_N + 1))
    out=$RAW/$(printf '%03d' "$RUN_N")-$tag-$mode-$path.txt
    "$PGBENCH" "${flags[@]}" -h "${HOST[$path]}" -p "${PORT[$path]}" >"$out" 2>&1 &
    BENCH_CHILD=$!
    wait "$BENCH_CHILD" || rc=$?
    BENCH_CHILD=""
    [ "$rc" = 0 ] || { cat "$out" >&2; die "pgbench $mode over $path failed (exit $rc)"; }
    grep -q '^number of failed transactions: 0 ' "$out" || { cat "$out" >&2; die "pgbench $mode over $path had failed transactions"; }
    tps=$(sed -n 's/^tps = \([0-9.]*\) .*/\1/p' "$out")
    [ -n "$tps" ] || { cat "$out" >&2; die "no tps in pgbench output"; }
    printf "%.1f\n" "$tps"
}

declare -A TPS=()   # "MODE path" → space-separated TPS per round
paths=(direct static pgs)
for r in $(seq "$ROUNDS"); do
    order=()
    for k in 0 1 2; do order+=("${paths[$(( (k + r - 1) % 3 ))]}"); done
    for mode in P1 P2; do
        for p in "${order[@]}"; do
            t=$(run_pgbench "$p" "$mode" "r$r")
            TPS["$mode $p"]+="$t "
            log "round $r $mode $p: $t tps"
        done
    done
done

# --- optional: P2 over pgs, threads unset vs threads = 1 (pgs.toml edit + render + restart).
set_threads() {  # "" (unset) or N; re-renders and restarts HAProxy
    sed -i '/^threads = /d' "$BENCH_CFG"
    [ -z "$1" ] || sed -i "/^\[haproxy\]/a threads = $1" "$BENCH_CFG"
    bench_stop_haproxy
    bench_start_haproxy
    psql -X -h 127.0.0.1 -p "$BENCH_PORT" -Atqc "select 1" >/dev/null || die "pgs does not answer after restart"
}
declare -A TTPS=()
T1_THREADS=""
if [ "$THREADS_PASS" = 1 ]; then
    for r in $(seq "$ROUNDS"); do
        if [ $((r % 2)) = 1 ]; then variants=(default one); else variants=(one default); fi
        for v in "${variants[@]}"; do
            if [ "$v" = one ]; then set_threads 1; T1_THREADS=$(nbthread "$BENCH_ADMIN"); else set_threads ""; fi
            t=$(run_pgbench pgs P2 "threads-$v-r$r")
            TTPS[$v]+="$t "
            log "threads pass round $r, pgs threads=$v (nbthread $(nbthread "$BENCH_ADMIN")): $t tps"
        done
    done
    set_threads ""
fi

# --- statistics: median, min, max of a list; ratios of medians, and the per-round ratio range.
stat() { tr ' ' '\n' <<<"$1" | grep . | sort -g | awk '{v[NR]=$1} END {m = (NR % 2) ? v[(NR+1)/2] : (v[NR/2]+v[NR/2+1])/2; printf "%.1f %.1f %.1f", m, v[1], v[NR]}'; }
med() { stat "$1" | cut -d' ' -f1; }
div() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.3f", a/b}'; }
round_ratios() {  # LIST_A LIST_B → "min–max" of per-round A/B
    paste <(tr ' ' '\n' <<<"$1" | grep .) <(tr ' ' '\n' <<<"$2" | grep .) |
        awk '{r=$1/$2; if (NR==1 || r<lo) lo=r; if (NR==1 || r>hi) hi=r} END {printf "%.3f–%.3f", lo, hi}'
}
verdict() { awk -v x="$1" -v t="$2" 'BEGIN {print (x >= t) ? "**met**" : "**not met**"}'; }

cmd="scripts/bench-datapath.sh"
[ "$ROUNDS" = 3 ] && [ "$DURATION" = 5 ] && [ "$THREADS_PASS" = 1 ] || cmd="ROUNDS=$ROUNDS DURATION=$DURATION THREADS_PASS=$THREADS_PASS $cmd"
declare -A LABEL=([direct]="(a) direct, unix socket" [static]="(b) HAProxy, static \`use_backend\`, no Lua" [pgs]="(c) **pgs** (HAProxy + pg-route.lua + maps)")
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
    echo "  pgbench, PostgreSQL and both HAProxy instances share the same $(nproc) CPUs."
    echo "- pgbench: P1 \`pgbench -C -S -n -c $CLIENTS -j $JOBS -T $DURATION -h HOST -p PORT\` (a new connection,"
    echo "  with SCRAM, per transaction), P2 the same without \`-C\` (4 persistent connections); user and"
    echo "  database \`$TENANT\`, \`PGSSLMODE=disable\`, password in \`PGPASSWORD\`. $ROUNDS rounds; each round runs"
    echo "  P1 then P2 over the three paths, their order rotating per round (round 1: a b c, round 2: b c a, …)."
    echo "  Every run: exit 0, 0 failed transactions. TPS as pgbench reports it (P1 includes reconnection times)."
    echo
    echo "| test | path | runs | median TPS | min TPS | max TPS | TPS per round |"
    echo "|---|---|---:|---:|---:|---:|---|"
    for mode in P1 P2; do
        [ "$mode" = P1 ] && mname="P1 connection setup (\`-C -S\`)" || mname="P2 steady (\`-S\`)"
        for p in "${paths[@]}"; do
            read -r m lo hi <<<"$(stat "${TPS[$mode $p]}")"
            echo "| $mname | ${LABEL[$p]} | $ROUNDS | $m | $lo | $hi | ${TPS[$mode $p]% } |"
        done
    done
    echo
    echo "| ratio (of medians) | P1 | P1 per round | P2 | P2 per round | target |"
    echo "|---|---:|---:|---:|---:|---|"
    p1d=$(div "$(med "${TPS[P1 pgs]}")" "$(med "${TPS[P1 direct]}")")
    p2d=$(div "$(med "${TPS[P2 pgs]}")" "$(med "${TPS[P2 direct]}")")
    p1s=$(div "$(med "${TPS[P1 pgs]}")" "$(med "${TPS[P1 static]}")")
    p2s=$(div "$(med "${TPS[P2 pgs]}")" "$(med "${TPS[P2 static]}")")
    echo "| **pgs / direct** | $p1d | $(round_ratios "${TPS[P1 pgs]}" "${TPS[P1 direct]}") | $p2d | $(round_ratios "${TPS[P2 pgs]}" "${TPS[P2 direct]}") | P1 ≥ 0.90 |"
    echo "| **pgs / static** | $p1s | $(round_ratios "${TPS[P1 pgs]}" "${TPS[P1 static]}") | $p2s | $(round_ratios "${TPS[P2 pgs]}" "${TPS[P2 static]}") | P1 and P2 ≥ 0.97 |"
    echo "| static / direct | $(div "$(med "${TPS[P1 static]}")" "$(med "${TPS[P1 direct]}")") | $(round_ratios "${TPS[P1 static]}" "${TPS[P1 direct]}") | $(div "$(med "${TPS[P2 static]}")" "$(med "${TPS[P2 direct]}")") | $(round_ratios "${TPS[P2 static]}" "${TPS[P2 direct]}") | (none) |"
    echo
    echo "- Targets: P1 pgs/direct $p1d ≥ 0.90 → $(verdict "$p1d" 0.90); P1 pgs/static $p1s ≥ 0.97 → $(verdict "$p1s" 0.97); P2 pgs/static $p2s ≥ 0.97 → $(verdict "$p2s" 0.97)."
    echo "- \"Per round\" is the range of the ratio within each round (paths measured back to back), which"
    echo "  shows how much of a ratio is the machine's noise."
    if [ "$THREADS_PASS" = 1 ]; then
        read -r dm dlo dhi <<<"$(stat "${TTPS[default]}")"
        read -r om olo ohi <<<"$(stat "${TTPS[one]}")"
        echo
        echo "HAProxy threads for pgs, P2 only (\`pgbench -S -n -c $CLIENTS -j $JOBS -T $DURATION\` over pgs): \`[haproxy] threads\`"
        echo "unset (before; HAProxy's default, nbthread $PGS_THREADS_DEFAULT) vs \`threads = 1\` (after; nbthread $T1_THREADS) in the"
        echo "layout's pgs.toml, \`render\` and an HAProxy restart at every switch, alternating, $ROUNDS rounds, same run:"
        echo
        echo "| pgs.toml \`[haproxy]\` | runs | median TPS | min TPS | max TPS | TPS per round |"
        echo "|---|---:|---:|---:|---:|---|"
        echo "| threads unset (nbthread $PGS_THREADS_DEFAULT) | $ROUNDS | $dm | $dlo | $dhi | ${TTPS[default]% } |"
        echo "| \`threads = 1\` | $ROUNDS | $om | $olo | $ohi | ${TTPS[one]% } |"
        echo
        echo "- threads = 1 / unset, P2 median: $(div "$om" "$dm") (per round $(round_ratios "${TTPS[one]}" "${TTPS[default]}")). The layout is left at the default."
    fi
} >"$BENCH_OUT"
log "done"
