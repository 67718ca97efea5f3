#!/usr/bin/env bash
# Benchmark 6: TLS to clients, side by side: pgs vs PostgreSQL's own TLS vs a one-hop HAProxy.
#
# One external tenant `bench` → a local PostgreSQL 15 this script starts (bench_local_postgres:
# initdb -U bench into a temp dir, SCRAM password; `pgbench -i -s 1` once), with a local CA and a
# certificate for localhost (scripts/make-local-ca.sh). The same server is measured, in one run,
# with TLS on every path:
#   (a) pgs      a fresh `pgs-agent init DIR --listen 127.0.0.1:PORT --api-listen ""
#                --tls-cert localhost.pem` layout (`render`, `haproxy -W -S run/master.sock -f
#                pgs.cfg`) → the server's unix socket; clients use the classic SSLRequest
#                (`sslmode=require`) or PostgreSQL 17 direct SSL (`sslnegotiation=direct`)
#   (b) pg-tls   PostgreSQL's own TLS: `ssl=on` on the same server with the same certificate
#                and key (ssl_cert_file, ssl_key_file), loopback TCP, classic negotiation
#   (c) one-hop  a second, static HAProxy (`haproxy -W -f onehop.cfg`, written here): `bind
#                127.0.0.1:PORT ssl crt localhost.pem alpn postgresql`, a static backend to the
#                same unix socket, no Lua, no maps, no loop. Plain HAProxy cannot answer an
#                SSLRequest, so it serves direct SSL only
#   (u) unix     the server's unix socket without TLS: a reference for each client's ceiling
# for P1 (a new connection per transaction) and P2 (persistent connections), pgbench's
# select-only transaction, 4 clients, DURATION seconds per run.
#
# Two clients. Debian's pgbench links libpq 15, which has no direct SSL; libpq >= 17 is here only
# in the psycopg[binary] wheel (the venv scripts/install-deps.sh --tests makes), so:
#   pgbench (libpq 15)      `pgbench [-C] -S -n -c 4 -j 2 -T DURATION`: paths pgs (classic),
#                           pg-tls and unix
#   python (libpq 18)       scripts/bench-tls-client.py, 4 processes, each PQconnectdb/PQexec/
#                           PQfinish through psycopg.pq: paths pgs (direct), one-hop (direct),
#                           pgs (classic), pg-tls and unix
# ROUNDS rounds; each round runs P1 then P2, each client's paths in an order rotating per round.
# Also measured: the HAProxy worker's CPU time (/proc/PID/stat utime+stime) per connection over
# the P1 runs and per transaction over the P2 runs; its memory (VmRSS) with SESSIONS idle TLS
# sessions open (logged in, then idle; the server restarted with max_connections SESSIONS+100 for
# this part) through pgs and through the one-hop HAProxy, against none.
#
#   scripts/bench-tls.sh [--out FILE]     Markdown section to FILE (default stdout)
#
# Env: ROUNDS (default 3), DURATION seconds (default 5), SESSIONS (default 1000), PGS_TEST_VENV (the
# venv with psycopg[binary]; default /opt/pgs-test-venv), PGS_AGENT (a prebuilt binary; default:
# cargo build --release and use target/release/pgs-agent), BENCH_KEEP=1 keeps the temp dirs.
source "$(dirname "$0")/bench-common.sh"
bench_parse_args "$@"
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-5}
SESSIONS=${SESSIONS:-1000}
VENV=${PGS_TEST_VENV:-/opt/pgs-test-venv}
VPY=$VENV/bin/python
CLIENT=$BENCH_REPO/scripts/bench-tls-client.py
TENANT=bench
TICKS=$(getconf CLK_TCK)

LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
RUSTC_START=$(pgrep -c -x rustc || true)
CARGO_START=$(pgrep -c -x cargo || true)
bench_preflight
"$VPY" -c 'from psycopg import pq; assert pq.version() >= 170000' 2>/dev/null \
    || die "no libpq >= 17 client: $VPY with psycopg[binary] is missing (scripts/install-deps.sh --tests makes it; PGS_TEST_VENV moves it)"
command -v openssl >/dev/null || die "openssl missing"
machine=$(bench_machine_md)
PY_LIBPQ=$("$VPY" -c 'from psycopg import pq; import psycopg; v = pq.version(); print(f"psycopg {psycopg.__version__} ({pq.__impl__}), libpq {v // 10000}.{v % 100}")')

# --- the certificate, the layout, the server.
CERTS=$(mktemp -d "${TMPDIR:-/tmp}/pgsbench-tlsca.XXXXXX")
BENCH_TMP+=("$CERTS")
"$BENCH_REPO/scripts/make-local-ca.sh" "$CERTS" >&2
PEM=$CERTS/localhost.pem
bench_layout tls --api-listen "" --tls-cert "$PEM"
bench_local_postgres "$TENANT"
bench_pgbench_init
SOCK=$BENCH_PG_SOCK
bench_raw_dir

# PostgreSQL's own TLS with the same certificate and key, readable by the server's user.
openssl x509 -in "$PEM" -out "$BENCH_PG_DIR/server.crt"
(umask 077 && openssl pkey -in "$PEM" -out "$BENCH_PG_DIR/server.key")
chown postgres:postgres "$BENCH_PG_DIR/server.crt" "$BENCH_PG_DIR/server.key"
cat >>"$BENCH_PGDATA/postgresql.conf" <<EOF
ssl = on
ssl_cert_file = '$BENCH_PG_DIR/server.crt'
ssl_key_file = '$BENCH_PG_DIR/server.key'
EOF
PG_OPTS="-c listen_addresses=127.0.0.1 -p $BENCH_PG_PORT -k $BENCH_PG_DIR"
pg_restart() {  # MAX_CONNECTIONS
    runuser -u postgres -- "$PGBIN/pg_ctl" -D "$BENCH_PGDATA" -l "$BENCH_PG_DIR/postgres.log" -w -t 30 \
        -o "$PG_OPTS -c max_connections=$1" -m fast restart >/dev/null \
        || { tail -n 20 "$BENCH_PG_DIR/postgres.log" >&2; die "PostgreSQL did not restart"; }
}
pg_restart 50

# pgs: the external tenant (no session cap: the idle part opens SESSIONS), rendered, HAProxy master-worker.
cat >"$BENCH_DIR/tenants.json" <<EOF
{"version": 1,
 "tenants": {"$TENANT": {"access": "enabled", "external": {"address": "$SOCK"}, "connection_limit": 0}}}
EOF
bench_start_haproxy
worker_pid() { pgrep -P "$1" -x haproxy | head -n1; }  # MASTER_PID
rss_mib() { awk '/^VmRSS/ {printf "%.1f", $2 / 1024}' "/proc/$1/status"; }
PGS_WORKER=$(worker_pid "$BENCH_HAPROXY_PID")
[ -n "$PGS_WORKER" ] || die "no pgs HAProxy worker"
PGS_RSS_FRESH=$(rss_mib "$PGS_WORKER")
PGS_MAXCONN=$(awk '$1 == "maxconn" {print $2; exit}' "$BENCH_DIR/haproxy/pgs.cfg")

# (c) the one-hop HAProxy TLS listener: static, direct SSL only. Global settings as pgs renders
# them (maxconn, any ssl- tuning), frontend settings and log line as section 4's static HAProxy.
ONEHOP_PORT=$(bench_free_port)
ONEHOP_DIR=$(mktemp -d "${TMPDIR:-/tmp}/pgsbench-onehop.XXXXXX")
BENCH_TMP+=("$ONEHOP_DIR")
cat >"$ONEHOP_DIR/onehop.cfg" <<EOF
# The same tenant behind one HAProxy TLS listener: TLS terminated on the public bind, a static
# backend to the server's unix socket. No Lua, no maps, no loop. Direct SSL only (ALPN postgresql).
global
    stats socket $ONEHOP_DIR/admin.sock mode 600 level admin
    pidfile $ONEHOP_DIR/haproxy.pid
    log stderr format short local0 info
    maxconn ${PGS_MAXCONN:-2100}
$(grep -E '^[[:space:]]+(ssl-|tune\.ssl|nbthread)' "$BENCH_DIR/haproxy/pgs.cfg" || true)

frontend onehop
    mode tcp
    bind 127.0.0.1:$ONEHOP_PORT ssl crt $PEM alpn postgresql
    maxconn 2000
    log global
    log-format "%ci:%cp [%t] %ft %b/%s %Tw/%Tc/%Tt %B %ts %ac/%fc/%bc/%sc/%rc %sslv %sslc"
    timeout client 1h
    use_backend onehop_$TENANT

backend onehop_$TENANT
    mode tcp
    timeout connect 5s
    timeout server 1h
    server $TENANT unix@$SOCK
EOF
haproxy -c -q -f "$ONEHOP_DIR/onehop.cfg" >&2 || die "one-hop HAProxy config invalid"
haproxy -W -f "$ONEHOP_DIR/onehop.cfg" >>"$ONEHOP_DIR/haproxy.log" 2>&1 </dev/null &
ONEHOP_PID=$!
BENCH_PIDS+=("$ONEHOP_PID")
for i in $(seq 100); do [ -S "$ONEHOP_DIR/admin.sock" ] && break; sleep 0.1; done
[ -S "$ONEHOP_DIR/admin.sock" ] || { tail -n 20 "$ONEHOP_DIR/haproxy.log" >&2; die "one-hop HAProxy did not start"; }
ONEHOP_WORKER=$(worker_pid "$ONEHOP_PID")
[ -n "$ONEHOP_WORKER" ] || die "no one-hop HAProxy worker"
ONEHOP_RSS_FRESH=$(rss_mib "$ONEHOP_WORKER")

# --- the paths. pgbench: "host port sslmode"; python: a libpq connection string (user,
# database and password come from PGUSER, PGDATABASE, PGPASSWORD).
declare -A PGB=([pgs]="127.0.0.1 $BENCH_PORT require" [pg]="127.0.0.1 $BENCH_PG_PORT require"
                [unix]="$BENCH_PG_DIR $BENCH_PG_PORT disable")
declare -A PYC=([pgsdirect]="host=127.0.0.1 port=$BENCH_PORT sslmode=require sslnegotiation=direct"
                [onehop]="host=127.0.0.1 port=$ONEHOP_PORT sslmode=require sslnegotiation=direct"
                [pgs]="host=127.0.0.1 port=$BENCH_PORT sslmode=require"
                [pg]="host=127.0.0.1 port=$BENCH_PG_PORT sslmode=require"
                [unix]="host=$BENCH_PG_DIR port=$BENCH_PG_PORT sslmode=disable")
declare -A HAP=([pgs]=$PGS_WORKER [pgsdirect]=$PGS_WORKER [onehop]=$ONEHOP_WORKER)  # whose CPU to read
pgb_paths=(pgs pg unix)
py_paths=(pgsdirect onehop pgs pg unix)
declare -A LABEL=([pgs]="(a) **pgs**, classic (SSLRequest)" [pgsdirect]="(a) **pgs**, direct SSL"
                  [pg]="(b) PostgreSQL's own TLS, classic" [onehop]="(c) one-hop HAProxy TLS, direct SSL"
                  [unix]="(u) unix socket, no TLS (reference)")

# Every path answers, with TLS where it must (sslmode=require fails without it); the server sees
# TLS only on its own port.
for p in "${pgb_paths[@]}"; do
    read -r h po m <<<"${PGB[$p]}"
    answer=$(PGSSLMODE=$m psql -X -h "$h" -p "$po" -Atqc "select current_user || ' ' || coalesce((select ssl::text from pg_stat_ssl where pid = pg_backend_pid()), '?')") \
        || die "pgbench path $p does not answer"
    log "libpq 15 over $p (sslmode=$m): user, server-side ssl = $answer"
    [ "${answer%% *}" = "$TENANT" ] || die "unexpected answer over $p: $answer"
done
for p in "${py_paths[@]}"; do
    answer=$("$VPY" "$CLIENT" check "${PYC[$p]}") || die "python path $p does not answer"
    log "libpq 18 over $p: $answer"
    [ "$answer" = "ssl_in_use=$([ "$p" = unix ] && echo False || echo True) user=$TENANT" ] || die "unexpected answer over $p: $answer"
done
# What each TLS server negotiates with OpenSSL's own client (protocol, cipher suite).
tls_params() {  # -starttls postgres | -alpn postgresql, PORT
    openssl s_client -connect "127.0.0.1:$3" "$1" "$2" -brief </dev/null 2>&1 |
        awk -F': ' '/^Protocol version/ {v = $2} /^Ciphersuite/ {c = $2} END {print v " " c}'
}
NEG_PGS_CLASSIC=$(tls_params -starttls postgres "$BENCH_PORT")
NEG_PGS_DIRECT=$(tls_params -alpn postgresql "$BENCH_PORT")
NEG_PG=$(tls_params -starttls postgres "$BENCH_PG_PORT")
NEG_ONEHOP=$(tls_params -alpn postgresql "$ONEHOP_PORT")
log "negotiated (openssl s_client): pgs classic $NEG_PGS_CLASSIC; pgs direct $NEG_PGS_DIRECT; pg $NEG_PG; one-hop $NEG_ONEHOP"
PGS_THREADS=$(bench_nbthread "$BENCH_ADMIN")
ONEHOP_THREADS=$(bench_nbthread "$ONEHOP_DIR/admin.sock")
log "all paths answer; HAProxy nbthread pgs=$PGS_THREADS one-hop=$ONEHOP_THREADS; measuring"

# --- the runs.
proc_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }  # utime + stime of one process
# Seconds of CPU used by this shell's waited-for children (bash `times`, second line); `times`
# must run in this shell, not in a $(...) subshell, hence the file.
children_cpu() {
    times >"$BENCH_RAW/times"
    tail -n1 "$BENCH_RAW/times" | awk '{ split($1, u, /[ms]/); split($2, s, /[ms]/); printf "%.3f", u[1] * 60 + u[2] + s[1] * 60 + s[2] }'
}
declare -A TPS=() HCPU=() CCPU=() NCONN=()  # "client mode path" → values per round
LOADS=()  # the 1-minute load average at the start of each round
run_one() {  # CLIENT(pgbench|python) MODE PATH ROUND
    local client=$1 mode=$2 path=$3 r=$4 out rc=0 h0=0 h1=0 c0 c1 n conns tps ccpu
    local worker=${HAP[$path]:-}
    out=$BENCH_RAW/r$r-$client-$mode-$path.txt
    [ -n "$worker" ] && h0=$(proc_ticks "$worker")
    if [ "$client" = pgbench ]; then
        local h po m flags=(-S -n -c "$BENCH_CLIENTS" -j "$BENCH_JOBS" -T "$DURATION")
        read -r h po m <<<"${PGB[$path]}"
        [ "$mode" = P1 ] && flags=(-C "${flags[@]}")
        children_cpu >"$BENCH_RAW/c0"
        PGSSLMODE=$m "$PGBIN/pgbench" "${flags[@]}" -h "$h" -p "$po" >"$out" 2>&1 &
        BENCH_CHILD=$!
        wait "$BENCH_CHILD" || rc=$?
        BENCH_CHILD=""
        children_cpu >"$BENCH_RAW/c1"
        [ "$rc" = 0 ] || { cat "$out" >&2; die "pgbench $mode over $path failed (exit $rc)"; }
        grep -q '^number of failed transactions: 0 ' "$out" || { cat "$out" >&2; die "pgbench $mode over $path had failed transactions"; }
        tps=$(sed -n 's/^tps = \([0-9.]*\) .*/\1/p' "$out")
        n=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' "$out")
        [ -n "$tps" ] && [ -n "$n" ] || { cat "$out" >&2; die "no tps in pgbench output"; }
        conns=$n; [ "$mode" = P2 ] && conns=$BENCH_CLIENTS
        c0=$(cat "$BENCH_RAW/c0"); c1=$(cat "$BENCH_RAW/c1")
        ccpu=$(awk -v a="$c0" -v b="$c1" -v n="$n" 'BEGIN {printf "%.1f", (b - a) * 1e6 / n}')
        tps=$(printf "%.1f" "$tps")
    else
        "$VPY" "$CLIENT" run "${PYC[$path]}" --mode "$mode" --procs "$BENCH_CLIENTS" --duration "$DURATION" >"$out" 2>&1 &
        BENCH_CHILD=$!
        wait "$BENCH_CHILD" || rc=$?
        BENCH_CHILD=""
        [ "$rc" = 0 ] || { cat "$out" >&2; die "python $mode over $path failed (exit $rc)"; }
        read -r tps n conns ccpu < <("$BENCH_PY" -c 'import json, sys
d = json.loads(sys.stdin.read().strip().splitlines()[-1])
print("%.1f" % d["tps"], d["transactions"], d["connections"] or d["procs"], d["client_cpu_us_per_tx"])' <"$out") \
            || { cat "$out" >&2; die "no result from python $mode over $path"; }
    fi
    [ -n "$worker" ] && h1=$(proc_ticks "$worker")
    local key="$client $mode $path"
    TPS[$key]+="$tps "
    CCPU[$key]+="$ccpu "
    if [ -n "$worker" ]; then
        NCONN[$key]+="$conns "
        # P1: µs per connection (one transaction each); P2: µs per transaction.
        HCPU[$key]+="$(awk -v t="$((h1 - h0))" -v hz="$TICKS" -v n="$n" 'BEGIN {printf "%.1f", t / hz * 1e6 / n}') "
    fi
    log "round $r $client $mode $path: $tps tps, client CPU $ccpu µs/tx${worker:+, HAProxy CPU $((h1 - h0)) ticks over $n transactions}"
}

for r in $(seq "$ROUNDS"); do
    LOADS+=("$(cut -d' ' -f1 /proc/loadavg)")
    for mode in P1 P2; do
        for k in $(seq 0 $((${#pgb_paths[@]} - 1))); do
            run_one pgbench "$mode" "${pgb_paths[$(( (k + r - 1) % ${#pgb_paths[@]} ))]}" "$r"
        done
        for k in $(seq 0 $((${#py_paths[@]} - 1))); do
            run_one python "$mode" "${py_paths[$(( (k + r - 1) % ${#py_paths[@]} ))]}" "$r"
        done
    done
done
LOAD_AFTER_RUNS=$(cut -d' ' -f1-3 /proc/loadavg)

# --- memory with SESSIONS idle TLS sessions open (logged in; the server needs the connection slots).
log "restarting PostgreSQL with max_connections $((SESSIONS + 100)) for $SESSIONS idle sessions"
pg_restart $((SESSIONS + 100))
curr_conns() { bench_runtime "$1" "show info" | sed -n 's/^CurrConns: //p'; }  # ADMIN_SOCKET
HOLD_PID=""
declare -A MEM=()  # "path what" → value
idle_sessions() {  # PATH ADMIN_SOCKET WORKER
    local path=$1 admin=$2 worker=$3 out=$BENCH_RAW/hold-$1.txt i
    MEM[$path none]=$(rss_mib "$worker")
    "$VPY" "$CLIENT" hold "${PYC[$path]}" --count "$SESSIONS" >"$out" 2>&1 &
    HOLD_PID=$!
    BENCH_CHILD=$HOLD_PID  # stopped by the cleanup if this script ends early
    for i in $(seq 1200); do
        grep -qs "^ready" "$out" && break
        kill -0 "$HOLD_PID" 2>/dev/null || { cat "$out" >&2; die "could not open $SESSIONS sessions over $path"; }
        sleep 0.1
    done
    grep -q '^ready' "$out" || die "$SESSIONS sessions over $path not open after 120 s"
    sleep 2  # let HAProxy settle (buffers released once idle)
    MEM[$path open]=$(rss_mib "$worker")
    MEM[$path sessions]=$(curr_conns "$admin")
    MEM[$path backends]=$(psql -X -h "$BENCH_PG_DIR" -p "$BENCH_PG_PORT" -Atqc "select count(*) from pg_stat_activity where usename = '$TENANT' and state = 'idle' and pid <> pg_backend_pid()")
    bench_stop_pid "$HOLD_PID"
    HOLD_PID=""
    BENCH_CHILD=""
    sleep 2
    MEM[$path closed]=$(rss_mib "$worker")
    log "idle over $path: worker VmRSS ${MEM[$path none]} MiB with none, ${MEM[$path open]} with $SESSIONS (HAProxy sessions ${MEM[$path sessions]}, idle backends ${MEM[$path backends]}), ${MEM[$path closed]} after closing"
}
idle_sessions pgs "$BENCH_ADMIN" "$PGS_WORKER"
idle_sessions onehop "$ONEHOP_DIR/admin.sock" "$ONEHOP_WORKER"

# --- the section.
med() { bench_med "$1" "${2:-1}"; }
cmd="scripts/bench-tls.sh"
[ "$ROUNDS" = 3 ] && [ "$DURATION" = 5 ] && [ "$SESSIONS" = 1000 ] || cmd="ROUNDS=$ROUNDS DURATION=$DURATION SESSIONS=$SESSIONS $cmd"
busy=""
awk -v l="${LOAD_START%% *}" 'BEGIN {exit !(l >= 1.0)}' && busy=1
ratio() {  # CLIENT MODE PATH_A PATH_B → "median-ratio | per-round range"
    echo "$(bench_div "$(med "${TPS[$1 $2 $3]}")" "$(med "${TPS[$1 $2 $4]}")") | $(bench_round_ratios "${TPS[$1 $2 $3]}" "${TPS[$1 $2 $4]}")"
}
cross() {  # MODE PATH: python / pgbench, of medians and per round
    echo "$(bench_div "$(med "${TPS[python $1 $2]}")" "$(med "${TPS[pgbench $1 $2]}")") | $(bench_round_ratios "${TPS[python $1 $2]}" "${TPS[pgbench $1 $2]}")"
}
straddle() {  # LIST_A LIST_B TARGET: a warning when the per-round ratios fall on both sides of TARGET
    local lo hi
    read -r lo hi <<<"$(bench_round_ratios "$1" "$2" | sed 's/–/ /')"
    awk -v lo="$lo" -v hi="$hi" -v t="$3" 'BEGIN {exit !(lo < t && hi >= t)}' &&
        echo " (but the per-round ratios, $lo–$hi, fall on both sides of $3: within this machine's noise)"
    return 0
}
P1_CLASSIC=$(bench_div "$(med "${TPS[pgbench P1 pgs]}")" "$(med "${TPS[pgbench P1 pg]}")")
P2_DIRECT=$(bench_div "$(med "${TPS[python P2 pgsdirect]}")" "$(med "${TPS[python P2 onehop]}")")
{
    echo "## 6. TLS"
    echo
    echo "Command: \`$cmd\` (took $(bench_elapsed) s, build excluded)"
    echo
    echo "$machine"
    bench_load_md
    echo "- Load average (1 min) at the start of each round: ${LOADS[*]}; after the last round: $LOAD_AFTER_RUNS."
    if [ -n "$busy" ]; then
        echo "- **Busy machine**: other developers' builds and tests were running (load average $LOAD_START"
        echo "  on $(nproc) CPUs before this script started anything; $RUSTC_START rustc and $CARGO_START cargo processes running)."
        echo "  Absolute TPS are lower and noisier than on an idle machine; the ratios compare paths measured"
        echo "  back to back in the same rounds."
    else
        echo "- Load average before this script started anything: $LOAD_START on $(nproc) CPUs."
    fi
    echo "- Clients: pgbench $("$PGBIN/pgbench" --version | awk '{print $3}') (Debian's libpq 15, no direct SSL); the Python driver"
    echo "  \`scripts/bench-tls-client.py\` ($PY_LIBPQ, from the psycopg[binary] wheel in $VENV), which"
    echo "  calls PQconnectdb/PQexec/PQfinish through psycopg.pq with pgbench's \`-S\` query on a random aid."
    echo "- Setup: one external tenant \`$TENANT\` → a local PostgreSQL 15 (initdb -U $TENANT, SCRAM, max_connections 50,"
    echo "  \`pgbench -i -s 1\` once), a local CA and one certificate for localhost (\`scripts/make-local-ca.sh\`, EC P-256)"
    echo "  served by every path. (a) pgs: \`pgs-agent init DIR --listen 127.0.0.1:PORT --api-listen \"\" --tls-cert"
    echo "  localhost.pem\`, the tenant enabled with \`external.address\` = the server's unix socket and"
    echo "  \`connection_limit\` 0 (no per-tenant session cap, for the idle sessions below), \`render\`, HAProxy"
    echo "  2.6 master-worker; a TLS client crosses the public frontend, the internal unix-socket loop and the"
    echo "  TLS frontend (DESIGN §8). (b) PostgreSQL's own TLS: \`ssl = on\`, \`ssl_cert_file\`/\`ssl_key_file\` = the same"
    echo "  certificate and key, loopback TCP. (c) one-hop: a second HAProxy 2.6 (\`haproxy -W -f onehop.cfg\`):"
    echo "  \`bind 127.0.0.1:PORT ssl crt localhost.pem alpn postgresql\`, a static backend to the same socket, no"
    echo "  Lua, maps or loop; same global maxconn and per-connection log line as section 4's static HAProxy."
    echo "  It cannot answer an SSLRequest, so it serves direct SSL only. (u) the server's unix socket without"
    echo "  TLS, each client's ceiling. HAProxy nbthread: pgs $PGS_THREADS, one-hop $ONEHOP_THREADS. Clients, HAProxy and"
    echo "  PostgreSQL share the same $(nproc) CPUs."
    echo "- Negotiated (\`openssl s_client\`, OpenSSL's client defaults): pgs classic $NEG_PGS_CLASSIC; pgs direct"
    echo "  $NEG_PGS_DIRECT; PostgreSQL $NEG_PG; one-hop $NEG_ONEHOP. libpq makes a full handshake on every"
    echo "  connection (no session resumption), so P1 pays one handshake per transaction on every TLS path."
    echo "- Runs: P1 a new connection (TLS handshake + SCRAM) per transaction, P2 persistent connections;"
    echo "  $BENCH_CLIENTS clients, $DURATION s per run. pgbench: \`pgbench [-C] -S -n -c $BENCH_CLIENTS -j $BENCH_JOBS -T $DURATION\`,"
    echo "  \`PGSSLMODE=require\` (unix: \`disable\`), every run exit 0 with 0 failed transactions. Python: $BENCH_CLIENTS"
    echo "  processes, \`sslmode=require\` plus \`sslnegotiation=direct\` on the direct paths. $ROUNDS rounds; each round runs"
    echo "  P1 then P2, pgbench's paths then Python's, each client's paths in an order rotating per round."
    echo "  TPS include the reconnection times in P1, as pgbench reports them."
    echo
    echo "| test | client | path | runs | median TPS | min TPS | max TPS | TPS per round |"
    echo "|---|---|---|---:|---:|---:|---:|---|"
    for mode in P1 P2; do
        [ "$mode" = P1 ] && mname="P1 connection per transaction" || mname="P2 persistent"
        for client in pgbench python; do
            [ "$client" = pgbench ] && cname="pgbench (libpq 15)" || cname="Python (libpq 18)"
            [ "$client" = pgbench ] && ps=("${pgb_paths[@]}") || ps=("${py_paths[@]}")
            for p in "${ps[@]}"; do
                read -r m lo hi <<<"$(bench_stat "${TPS[$client $mode $p]}")"
                echo "| $mname | $cname | ${LABEL[$p]} | $ROUNDS | $m | $lo | $hi | ${TPS[$client $mode $p]% } |"
            done
        done
    done
    echo
    echo "| ratio (of medians) | client | P1 | P1 per round | P2 | P2 per round | target |"
    echo "|---|---|---:|---:|---:|---:|---|"
    echo "| **pgs classic / PostgreSQL's own TLS** | pgbench (libpq 15) | $(ratio pgbench P1 pgs pg) | $(ratio pgbench P2 pgs pg) | P1 ≥ 0.90 |"
    echo "| pgs classic / PostgreSQL's own TLS | Python (libpq 18) | $(ratio python P1 pgs pg) | $(ratio python P2 pgs pg) | (same ratio, other client) |"
    echo "| **pgs direct / one-hop HAProxy TLS (direct)** | Python (libpq 18) | $(ratio python P1 pgsdirect onehop) | $(ratio python P2 pgsdirect onehop) | P2 ≥ 0.95 |"
    echo "| pgs direct / pgs classic | Python (libpq 18) | $(ratio python P1 pgsdirect pgs) | $(ratio python P2 pgsdirect pgs) | (none) |"
    echo "| one-hop (direct) / PostgreSQL's own TLS (classic) | Python (libpq 18) | $(ratio python P1 onehop pg) | $(ratio python P2 onehop pg) | (none) |"
    echo "| PostgreSQL's own TLS / unix socket, no TLS | pgbench (libpq 15) | $(ratio pgbench P1 pg unix) | $(ratio pgbench P2 pg unix) | (none) |"
    echo "| PostgreSQL's own TLS / unix socket, no TLS | Python (libpq 18) | $(ratio python P1 pg unix) | $(ratio python P2 pg unix) | (none) |"
    echo
    echo "- Targets: P1 pgs ÷ PostgreSQL's own TLS (classic negotiation on both, measured with pgbench) $P1_CLASSIC ≥ 0.90 →"
    echo "  $(bench_verdict "$P1_CLASSIC" 0.90)$(straddle "${TPS[pgbench P1 pgs]}" "${TPS[pgbench P1 pg]}" 0.90); P2 pgs ÷ one-hop HAProxy TLS (direct SSL on both,"
    echo "  measured with the Python driver, the only libpq ≥ 17 client here) $P2_DIRECT ≥ 0.95 →"
    echo "  $(bench_verdict "$P2_DIRECT" 0.95)$(straddle "${TPS[python P2 pgsdirect]}" "${TPS[python P2 onehop]}" 0.95)."
    echo "- \"Per round\" is the range of the ratio within each round (paths measured back to back), which"
    echo "  shows how much of a ratio is the machine's noise."
    echo
    echo "The clients' own cost. A client's CPU per query adds to every transaction's time and shares the"
    echo "$(nproc) CPUs with HAProxy and PostgreSQL, so the costlier the client, the more a server-side cost is"
    echo "diluted and the closer a ratio gets to 1. Both clients on the same paths (client CPU: pgbench's"
    echo "from bash \`times\`, the Python driver's from its workers' getrusage over the timed loop; µs per"
    echo "transaction, median of rounds):"
    echo
    echo "| test | path | pgbench TPS | Python TPS | Python / pgbench (per round) | pgbench client CPU µs/tx | Python client CPU µs/tx |"
    echo "|---|---|---:|---:|---:|---:|---:|"
    for mode in P1 P2; do
        for p in unix pg pgs; do
            echo "| $mode | ${LABEL[$p]} | $(med "${TPS[pgbench $mode $p]}") | $(med "${TPS[python $mode $p]}") | $(cross "$mode" "$p" | sed 's/ | / (/; s/$/)/') | $(med "${CCPU[pgbench $mode $p]}") | $(med "${CCPU[python $mode $p]}") |"
        done
    done
    echo
    c_pgb=$(bench_div "$(med "${TPS[pgbench P2 pgs]}")" "$(med "${TPS[pgbench P2 pg]}")")
    c_py=$(bench_div "$(med "${TPS[python P2 pgs]}")" "$(med "${TPS[python P2 pg]}")")
    u_py=$(bench_div "$(med "${TPS[python P2 unix]}")" "$(med "${TPS[pgbench P2 unix]}")")
    cpu_x=$(for p in unix pg pgs; do bench_div "$(med "${CCPU[python P2 $p]}")" "$(med "${CCPU[pgbench P2 $p]}")"; echo; done | sort -g | sed -n '1p;$p' | paste -sd' ')
    read -r cpu_lo cpu_hi <<<"$cpu_x"
    echo "- The Python driver's own CPU per P2 transaction is ${cpu_lo}–${cpu_hi}× pgbench's on the same paths, and on"
    echo "  the plain unix socket it reaches $u_py of pgbench's P2 TPS (each client's ceiling on this machine)."
    if awk -v x="$cpu_hi" 'BEGIN {exit !(x <= 1.5)}'; then
        echo "  Its per-query cost is of the same order as pgbench's, so it compresses the P2 ratios it measures"
        echo "  (the direct-SSL target among them) toward 1 only slightly; the spread between rounds is larger."
    else
        echo "  That extra cost per query dilutes a server-side cost: the P2 ratios it measures (the direct-SSL"
        echo "  target among them) are compressed toward 1 compared with what pgbench would show."
    fi
    echo "  The same P2 ratio, pgs classic ÷ PostgreSQL's own TLS: $c_pgb with pgbench ($(bench_round_ratios "${TPS[pgbench P2 pgs]}" "${TPS[pgbench P2 pg]}") per round),"
    echo "  $c_py with the Python driver ($(bench_round_ratios "${TPS[python P2 pgs]}" "${TPS[python P2 pg]}")). In P1 the TLS handshake and the SCRAM login dominate"
    echo "  both clients' time."
    echo
    echo "HAProxy's CPU (worker utime+stime from /proc/PID/stat, before and after each run; P1: per"
    echo "connection, each a full TLS handshake + SCRAM login + one query; P2: per transaction; median of"
    echo "the rounds, min–max in brackets; clock ticks of $((1000000 / TICKS)) µs):"
    echo
    echo "| test | client | path | connections or transactions (all rounds) | HAProxy worker CPU µs each |"
    echo "|---|---|---|---:|---:|"
    for mode in P1 P2; do
        for cp in "pgbench pgs" "python pgs" "python pgsdirect" "python onehop"; do
            read -r client p <<<"$cp"
            [ "$client" = pgbench ] && cname="pgbench (libpq 15)" || cname="Python (libpq 18)"
            read -r m lo hi <<<"$(bench_stat "${HCPU[$client $mode $p]}")"
            if [ "$mode" = P1 ]; then
                total=$(tr ' ' '\n' <<<"${NCONN[$client $mode $p]}" | awk '{s += $1} END {print s}')
            else
                total=$(awk -v t="${TPS[$client $mode $p]}" -v d="$DURATION" 'BEGIN {n = split(t, a, " "); for (i = 1; i <= n; i++) s += a[i] * d; printf "%.0f", s}')
            fi
            echo "| $mode | $cname | ${LABEL[$p]} | $total | $m ($lo–$hi) |"
        done
    done
    echo
    h_pgs=$(med "${HCPU[python P1 pgsdirect]}"); h_one=$(med "${HCPU[python P1 onehop]}")
    echo "- Per TLS connection (P1, same Python client, direct SSL): pgs $h_pgs µs, one-hop $h_one µs of HAProxy"
    echo "  CPU: pgs ÷ one-hop $(bench_div "$h_pgs" "$h_one"). pgs's worker runs the TLS handshake plus the public"
    echo "  frontend, the Lua on both sides of the loop and two sessions per client."
    q_pgs=$(med "${HCPU[python P2 pgsdirect]}"); q_one=$(med "${HCPU[python P2 onehop]}")
    echo "- Per P2 transaction (same client, direct SSL): pgs $q_pgs µs, one-hop $q_one µs of HAProxy CPU: pgs ÷"
    echo "  one-hop $(bench_div "$q_pgs" "$q_one"); the loop relays each query and each result once more, between"
    echo "  the public frontend and the TLS frontend. P2 transactions counted as TPS × $DURATION s."
    echo
    echo "HAProxy's memory with $SESSIONS idle TLS sessions (the Python driver opens $SESSIONS connections from 4"
    echo "processes: TLS handshake and SCRAM login, then idle; PostgreSQL"
    echo "restarted with max_connections $((SESSIONS + 100)) for this part; worker VmRSS from /proc/PID/status, 2 s after"
    echo "the last session opened and 2 s after they all closed):"
    echo
    echo "| path | worker VmRSS fresh, before any traffic | with none open (after the runs) | with $SESSIONS open | after closing them | per client | HAProxy sessions (CurrConns) | idle backends on the server |"
    echo "|---|---:|---:|---:|---:|---:|---:|---:|"
    for p in pgs onehop; do
        [ "$p" = pgs ] && fresh=$PGS_RSS_FRESH lbl="(a) **pgs**, classic (SSLRequest)" || { fresh=$ONEHOP_RSS_FRESH; lbl=${LABEL[onehop]}; }
        per=$(awk -v a="${MEM[$p open]}" -v b="${MEM[$p none]}" -v n="$SESSIONS" 'BEGIN {printf "%.1f KiB", (a - b) * 1024 / n}')
        echo "| $lbl | $fresh MiB | ${MEM[$p none]} MiB | ${MEM[$p open]} MiB | ${MEM[$p closed]} MiB | $per | ${MEM[$p sessions]} | ${MEM[$p backends]} |"
    done
    echo
    echo "- A TLS client through pgs holds two HAProxy sessions (the public frontend and the internal TLS"
    echo "  frontend), hence CurrConns twice the clients; global maxconn as rendered: ${PGS_MAXCONN:-?}."
} >"$BENCH_OUT"
log "done"
