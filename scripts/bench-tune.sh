#!/usr/bin/env bash
# Benchmark 5: HAProxy settings for the data path, and where a transaction's CPU time goes.
#
# Setup as bench-datapath.sh: one external tenant `bench` → a local PostgreSQL 15 (SCRAM, unix
# socket), a fresh pgs layout rendered by `pgs-agent render`, and the static HAProxy of section 4.
#
# Part 1, settings: each variant is pgs's rendered haproxy/pgs.cfg plus a few directives inserted
# into its global, frontend or backend section (awk, below; checked with `haproxy -c`). HAProxy is
# restarted with each variant's file. ROUNDS rounds; in each, P2 (`pgbench -S`, persistent
# connections) and, with MODES="P2 P1", P1 (`pgbench -C -S`) run over `direct` (the server's unix
# socket) and every variant, in an order rotating per round. Reports the median TPS, min, max and
# the ratio to `direct` and to `base` (pgs as rendered).
#
# Part 2, where the time goes (PROFILE=1): ROUNDS rounds of one P2 and one P1 run per path (direct
# unix, direct TCP, static, pgs) with the CPU time of pgbench (bash `times`), PostgreSQL (postmaster and its reaped
# backends), the HAProxy worker and the whole machine (/proc/stat) read before and after: CPU µs
# per transaction (P1: per connection) for each. Then one more P2 run over pgs under HAProxy's task profiler
# (`set profiling tasks on`, `show profiling`) and, if `perf` works here, `perf record -e cpu-clock`
# on the HAProxy worker (top symbols, kernel vs HAProxy).
#
#   scripts/bench-tune.sh [--out FILE]     Markdown section to FILE (default stdout)
#
# Env: ROUNDS (default 3), DURATION seconds (default 5), MODES (default "P2"), VARIANTS (names
# from the table below, default all), PROFILE (default 1), PGS_AGENT (a prebuilt binary),
# BENCH_KEEP=1 keeps the temp dirs (raw pgbench outputs, variant configs, perf data).
source "$(dirname "$0")/bench-common.sh"
bench_parse_args "$@"
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-5}
MODES=${MODES:-P2}
PROFILE=${PROFILE:-1}
TENANT=bench

# name | directives, ";"-separated, each prefixed g: (global), f: (frontend pgs), b: (every backend)
VARIANT_TABLE=(
    "base|"
    "nbthread1|g:nbthread 1"
    "splice|f:option splice-auto;b:option splice-auto"
    "bufsize4k|g:tune.bufsize 4096"
    "bufsize64k|g:tune.bufsize 65536"
    "lowlat|g:tune.sched.low-latency on"
    "maxpoll16|g:tune.maxpollevents 16"
    "runq8|g:tune.runqueue-depth 8"
    "edge|g:expose-experimental-directives;g:tune.fd.edge-triggered on"
    "smart|f:option tcp-smart-accept;b:option tcp-smart-connect"
    "smartaccept|f:option tcp-smart-accept"
    "busypoll|g:busy-polling"
    "cpumap|g:cpu-map auto:1/1-2 0-1"
    "nbthread1-cpu0|g:nbthread 1;g:cpu-map 1/1 0"
    "nbthread1-lowlat|g:nbthread 1;g:tune.sched.low-latency on"
)
declare -A DIRECTIVES=()
ALL=()
for row in "${VARIANT_TABLE[@]}"; do
    ALL+=("${row%%|*}")
    DIRECTIVES[${row%%|*}]=${row#*|}
done
read -r -a VARIANTS <<<"${VARIANTS:-${ALL[*]}}"
for v in "${VARIANTS[@]}"; do [ -n "${DIRECTIVES[$v]+x}" ] || die "unknown variant $v (known: ${ALL[*]})"; done

bench_preflight
machine=$(bench_machine_md)
bench_layout tune --api-listen ""
bench_local_postgres "$TENANT"
bench_pgbench_init
bench_raw_dir
cat >"$BENCH_DIR/tenants.json" <<EOF
{"version": 1,
 "tenants": {"$TENANT": {"access": "enabled", "external": {"address": "$BENCH_PG_SOCK"}}}}
EOF
"$BENCH_AGENT" -c "$BENCH_CFG" render >&2
RENDERED=$BENCH_DIR/haproxy/pgs.cfg
VDIR=$BENCH_DIR/variants
mkdir -p "$VDIR"

# pgs.cfg with a variant's directives after the `global`, `frontend pgs` and `backend` lines.
variant_cfg() {  # NAME → path of its config
    local name=$1 out=$VDIR/$1.cfg
    DIRS=${DIRECTIVES[$name]} awk '
        BEGIN { n = split(ENVIRON["DIRS"], d, ";") }
        function emit(sec,   i) { for (i = 1; i <= n; i++) if (substr(d[i], 1, 2) == sec ":") print "    " substr(d[i], 3) }
        { print }
        /^global$/       { emit("g") }
        /^frontend pgs$/ { emit("f") }
        /^backend /      { emit("b") }
    ' "$RENDERED" >"$out"
    haproxy -c -q -f "$out" >&2 || die "variant $name: HAProxy rejects its config ($out)"
    echo "$out"
}

# Starts pgs's HAProxy (master-worker) on a variant's config and waits until the tenant answers.
start_variant() {  # NAME
    local cfg i
    cfg=$(variant_cfg "$1")
    bench_stop_haproxy
    rm -f "$BENCH_ADMIN" "$BENCH_MASTER"
    haproxy -W -S "$BENCH_MASTER" -f "$cfg" >>"$BENCH_DIR/haproxy.log" 2>&1 </dev/null &
    BENCH_HAPROXY_PID=$!
    for i in $(seq 100); do [ -S "$BENCH_ADMIN" ] && break; sleep 0.1; done
    [ -S "$BENCH_ADMIN" ] || { tail -n 20 "$BENCH_DIR/haproxy.log" >&2; die "HAProxy did not start with variant $1"; }
    psql -X -h 127.0.0.1 -p "$BENCH_PORT" -Atqc "select 1" >/dev/null || die "pgs does not answer with variant $1"
}
worker_pid() { pgrep -P "$1" -x haproxy | head -n1; }  # MASTER_PID

machine_ctxt() { awk '/^ctxt / {print $2}' /proc/stat; }  # context switches since boot

# --- part 1: the settings, side by side.
declare -A TPS=()   # "MODE name" → TPS per round
declare -A CSW=()   # "MODE name" → context switches per transaction, per round
paths=(direct "${VARIANTS[@]}")
for r in $(seq "$ROUNDS"); do
    order=()
    for k in $(seq 0 $((${#paths[@]} - 1))); do order+=("${paths[$(( (k + r - 1) % ${#paths[@]} ))]}"); done
    for p in "${order[@]}"; do
        if [ "$p" = direct ]; then host=$BENCH_PG_DIR port=$BENCH_PG_PORT; else start_variant "$p"; host=127.0.0.1 port=$BENCH_PORT; fi
        for mode in $MODES; do
            x0=$(machine_ctxt)
            t=$(bench_pgbench "$host" "$port" "$mode" "r$r-$p")
            x=$(awk -v d="$(( $(machine_ctxt) - x0 ))" -v t="$t" -v s="$DURATION" 'BEGIN {printf "%.2f", d / (t * s)}')
            TPS["$mode $p"]+="$t "
            CSW["$mode $p"]+="$x "
            log "round $r $mode $p: $t tps, $x context switches per transaction"
        done
    done
done

# --- part 2: CPU time per transaction, per process, for one P2 and one P1 run per path.
ticks=$(getconf CLK_TCK)
proc_cpu() { awk '{print $14 + $15 + $16 + $17}' "/proc/$1/stat"; }          # PID → ticks incl. reaped children
machine_busy() { awk '/^cpu / {print $2 + $3 + $4 + $7 + $8 + $9}' /proc/stat; }  # user nice system irq softirq steal
# Seconds of CPU used by this shell's waited-for children (bash `times`, second line). `times` must
# run in this shell, not in a $(...) subshell, hence the file.
children_cpu() {
    times >"$BENCH_RAW/times"
    tail -n1 "$BENCH_RAW/times" | awk '{ split($1, u, /[ms]/); split($2, s, /[ms]/); printf "%.3f", u[1] * 60 + u[2] + s[1] * 60 + s[2] }'
}

declare -A CPU=()   # "mode path column" → values per round; columns: tps, then per transaction: µs of
                    # pgbench, postgres, haproxy, other, total busy; context switches
measure_cpu() {  # MODE PATH HOST PORT HAPROXY_MASTER_PID(or "")
    local mode=$1 path=$2 host=$3 port=$4 master=$5 worker="" pm out rc=0 reconnect=""
    [ "$mode" = P1 ] && reconnect=-C
    pm=$(head -n1 "$BENCH_PGDATA/postmaster.pid")
    [ -n "$master" ] && worker=$(worker_pid "$master")
    local c0 p0 h0=0 m0 x0 c1 p1 h1=0 m1 x1
    children_cpu >"$BENCH_RAW/c0"; p0=$(proc_cpu "$pm"); m0=$(machine_busy); x0=$(machine_ctxt)
    [ -n "$worker" ] && h0=$(proc_cpu "$worker")
    out=$BENCH_RAW/cpu-$path-$mode.txt
    "$PGBIN/pgbench" $reconnect -S -n -c "$BENCH_CLIENTS" -j "$BENCH_JOBS" -T "$DURATION" -h "$host" -p "$port" >"$out" 2>&1 &
    BENCH_CHILD=$!
    wait "$BENCH_CHILD" || rc=$?
    BENCH_CHILD=""
    [ "$rc" = 0 ] || { cat "$out" >&2; die "pgbench over $path failed"; }
    sleep 0.3  # the postmaster reaps the backends that served the run
    children_cpu >"$BENCH_RAW/c1"; p1=$(proc_cpu "$pm"); m1=$(machine_busy); x1=$(machine_ctxt)
    c0=$(cat "$BENCH_RAW/c0"); c1=$(cat "$BENCH_RAW/c1")
    [ -n "$worker" ] && h1=$(proc_cpu "$worker")
    local n tps
    n=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' "$out")
    tps=$(sed -n 's/^tps = \([0-9.]*\) .*/\1/p' "$out")
    local row
    row=$(awk -v n="$n" -v tps="$tps" -v hz="$ticks" -v c="$c0 $c1" -v p="$((p1 - p0))" -v h="$((h1 - h0))" -v m="$((m1 - m0))" -v x="$((x1 - x0))" 'BEGIN {
        split(c, cc, " "); us = 1e6 / n
        pg = (cc[2] - cc[1]) * us; ps = p / hz * us; hp = h / hz * us; tot = m / hz * us
        printf "%.0f %.1f %.1f %.1f %.1f %.1f %.2f", tps, pg, ps, hp, tot - pg - ps - hp, tot, x / n }')
    local i=0 v
    for v in $row; do CPU["$mode $path $i"]+="$v "; i=$((i + 1)); done
    log "cpu $mode $path: tps, then µs per transaction: pgbench postgres haproxy other total, context switches = $row"
}

PROFILE_MD=""
if [ "$PROFILE" = 1 ]; then
    start_variant base
    bench_static_haproxy "$TENANT" "$BENCH_PG_SOCK"
    cpu_paths=(direct-unix direct-tcp static pgs)
    declare -A CPU_ARGS=([direct-unix]="$BENCH_PG_DIR $BENCH_PG_PORT" [direct-tcp]="127.0.0.1 $BENCH_PG_PORT"
                         [static]="127.0.0.1 $STATIC_PORT $STATIC_PID" [pgs]="127.0.0.1 $BENCH_PORT $BENCH_HAPROXY_PID")
    for r in $(seq "$ROUNDS"); do
        for k in 0 1 2 3; do
            p=${cpu_paths[$(( (k + r - 1) % 4 ))]}
            read -r h po m <<<"${CPU_ARGS[$p]}"
            measure_cpu P2 "$p" "$h" "$po" "${m:-}"
            measure_cpu P1 "$p" "$h" "$po" "${m:-}"
        done
    done

    # HAProxy's own task profiler over one P2 run through pgs.
    bench_runtime "$BENCH_ADMIN" "set profiling tasks on" >/dev/null
    bench_pgbench 127.0.0.1 "$BENCH_PORT" P2 profiling >/dev/null
    bench_runtime "$BENCH_ADMIN" "show profiling" >"$BENCH_RAW/show-profiling.txt"
    bench_runtime "$BENCH_ADMIN" "set profiling tasks off" >/dev/null

    # perf, sampling the HAProxy worker by CPU clock (hardware counters are often absent in VMs).
    PERF_MD="perf: not installed"
    if command -v perf >/dev/null 2>&1; then
        worker=$(worker_pid "$BENCH_HAPROXY_PID")
        pdata=$BENCH_RAW/perf.data
        perf record -q -e cpu-clock -F 999 -p "$worker" -o "$pdata" -- sleep "$DURATION" >/dev/null 2>"$BENCH_RAW/perf.err" &
        perf_pid=$!
        bench_pgbench 127.0.0.1 "$BENCH_PORT" P2 perf >/dev/null
        wait "$perf_pid" || true
        if [ -s "$pdata" ]; then
            perf report -i "$pdata" --stdio --no-children --sort dso 2>/dev/null | awk '/^ +[0-9]/ && n++ < 6' >"$BENCH_RAW/perf-dso.txt"
            perf report -i "$pdata" --stdio --no-children --sort sym 2>/dev/null | awk '/^ +[0-9]/ && n++ < 15' >"$BENCH_RAW/perf-sym.txt"
            PERF_MD=ok
        else
            PERF_MD="perf record failed here: $(head -n1 "$BENCH_RAW/perf.err")"
        fi
    fi
fi

# --- report
cmd="scripts/bench-tune.sh"
env=""
[ "$ROUNDS" = 3 ] || env+="ROUNDS=$ROUNDS "
[ "$DURATION" = 5 ] || env+="DURATION=$DURATION "
[ "$MODES" = P2 ] || env+="MODES=\"$MODES\" "
[ "${VARIANTS[*]}" = "${ALL[*]}" ] || env+="VARIANTS=\"${VARIANTS[*]}\" "
[ "$PROFILE" = 1 ] || env+="PROFILE=$PROFILE "
{
    echo "## 5. HAProxy settings for the hop, and where the time goes"
    echo
    echo "Command: \`$env$cmd\` (took $(bench_elapsed) s, build excluded)"
    echo
    echo "$machine"
    bench_load_md
    echo "- Setup as section 4 (same tenant, PostgreSQL and pgbench flags: \`-S -n -c $BENCH_CLIENTS -j $BENCH_JOBS -T $DURATION\`,"
    echo "  P1 adds \`-C\`). Each variant is the \`haproxy/pgs.cfg\` that \`pgs-agent render\` wrote plus the"
    echo "  directives listed, inserted into its \`global\`, \`frontend pgs\` or backend sections; HAProxy is"
    echo "  restarted with each variant's file. $ROUNDS rounds, variants and \`direct\` (the server's unix"
    echo "  socket) in an order rotating per round. HAProxy nbthread by default: $(bench_nbthread "$BENCH_ADMIN" 2>/dev/null || echo '?')."
    echo
    for mode in $MODES; do
        [ "$mode" = P1 ] && mname="P1 (\`-C -S\`, a new connection per transaction)" || mname="P2 (\`-S\`, persistent connections)"
        base=$(bench_med "${TPS[$mode base]:-0}")
        direct=$(bench_med "${TPS[$mode direct]}")
        echo "$mname:"
        echo
        echo "| variant | directives added | median TPS | min | max | / direct | / base (per round) | context switches / tx |"
        echo "|---|---|---:|---:|---:|---:|---:|---:|"
        for p in "${paths[@]}"; do
            read -r m lo hi <<<"$(bench_stat "${TPS[$mode $p]}")"
            if [ "$p" = direct ]; then
                echo "| direct (unix socket) | — | $m | $lo | $hi | 1 | — | $(bench_med "${CSW[$mode $p]}" 2) |"
            else
                d=${DIRECTIVES[$p]:-(none: pgs as rendered)}
                d=$(sed 's/g:/global: /g; s/f:/frontend: /g; s/b:/backend: /g; s/;/<br>/g' <<<"$d")
                rb="—"
                [ -n "${TPS[$mode base]:-}" ] && [ "$p" != base ] && rb="$(bench_div "$m" "$base") ($(bench_round_ratios "${TPS[$mode $p]}" "${TPS[$mode base]}"))"
                echo "| $p | $d | $m | $lo | $hi | $(bench_div "$m" "$direct") | $rb | $(bench_med "${CSW[$mode $p]}" 2) |"
            fi
        done
        echo
    done
    if [ "$PROFILE" = 1 ]; then
        echo "Where the CPU time goes (medians of $ROUNDS rounds of one $DURATION s P2 run and one P1 run per path, the"
        echo "order rotating per round; CPU µs per transaction (P1: per connection, which is one transaction)"
        echo "= the process's utime+stime delta / transactions; PostgreSQL = the postmaster and"
        echo "its reaped backends; \"other\" = the machine's busy time (/proc/stat) minus the three, i.e."
        echo "softirq and everything else; $(nproc) CPUs → at most $(( $(nproc) * 1000000 )) µs per second; context"
        echo "switches: the machine's, /proc/stat \`ctxt\`, per transaction):"
        echo
        echo "| test | path | TPS | pgbench µs | PostgreSQL µs | HAProxy µs | other µs | total busy µs | context switches |"
        echo "|---|---|---:|---:|---:|---:|---:|---:|---:|"
        for mode in P2 P1; do
            for p in direct-unix direct-tcp static pgs; do
                row="| $mode | $p"
                for i in 0 1 2 3 4 5 6; do
                    case $i in 0) row+=" | $(bench_med "${CPU[$mode $p $i]}" 0)" ;; 6) row+=" | $(bench_med "${CPU[$mode $p $i]}" 2)" ;; *) row+=" | $(bench_med "${CPU[$mode $p $i]}")" ;; esac
                done
                echo "$row |"
            done
        done
        echo
        echo "HAProxy's task profiler during one P2 run through pgs (\`show profiling\`, tasks part):"
        echo
        echo '```'
        awk '/^Tasks activity:/ {on = 1} on && n++ < 14' "$BENCH_RAW/show-profiling.txt"
        echo '```'
        echo
        if [ "$PERF_MD" = ok ]; then
            echo "\`perf record -e cpu-clock -F 999 -p <HAProxy worker>\` during one P2 run through pgs, by DSO and top symbols:"
            echo
            echo '```'
            cat "$BENCH_RAW/perf-dso.txt"
            echo
            cat "$BENCH_RAW/perf-sym.txt"
            echo '```'
        else
            echo "- $PERF_MD"
        fi
    fi
} >"$BENCH_OUT"
log "done"
