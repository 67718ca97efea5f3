# Shared helpers for scripts/bench-*.sh. Sourced, not run. Not a benchmark itself.
#
# Every benchmark makes its own layout in a temp dir (`pgs-agent init DIR --listen
# 127.0.0.1:<free port>`), gives it a unique `[docker] prefix`, starts its own HAProxy and removes
# everything it made on exit (trap), including Docker objects labelled with its prefix.
#
# Conventions for the scripts that source this:
#   bench-X.sh [--out FILE]   writes its Markdown section to FILE (default: stdout);
#                             progress goes to stderr.

set -euo pipefail

BENCH_REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH_AGENT=${PGS_AGENT:-$BENCH_REPO/target/release/pgs-agent}
BENCH_TOOL=$BENCH_REPO/scripts/bench-tool.py
# Debian's interpreter (stdlib only); a pyenv shim in PATH would add ~30 ms to every start.
BENCH_PY=${BENCH_PY:-$(command -v /usr/bin/python3 || command -v python3)}
PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}

BENCH_DIR=""          # the pgs layout (pgs-agent init)
BENCH_PREFIX=""       # [docker] prefix of this run
BENCH_HAPROXY_PID=""  # master we started
BENCH_PGDATA=""       # local PostgreSQL we started (bench_local_postgres)
BENCH_TMP=()          # extra temp dirs to remove
BENCH_CHILD=""        # the measuring tool while it runs
BENCH_PIDS=()         # other children to stop at exit (a second HAProxy, ...)
BENCH_OUT=/dev/stdout
BENCH_T0=$(date +%s)

log() { echo "[$(basename "$0") +$(( $(date +%s) - BENCH_T0 ))s] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

bench_parse_args() {
    while [ $# -gt 0 ]; do
        case "$1" in
            --out) BENCH_OUT=$2; shift 2 ;;
            -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
            *) die "unknown argument: $1 (see --help)" ;;
        esac
    done
}

# Installs a Debian package only when its command is missing.
bench_need() {  # COMMAND PACKAGE
    command -v "$1" >/dev/null 2>&1 && return 0
    log "$1 missing; installing Debian package $2"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$2" >&2 \
        || { apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$2" >&2; } \
        || die "cannot install $2"
}

bench_build() {
    if [ -z "${PGS_AGENT:-}" ]; then
        log "cargo build --release"
        local i
        for i in 1 2 3 4 5 6; do  # src/ may be mid-edit by someone else: wait and retry
            (cd "$BENCH_REPO" && cargo build --release --quiet >&2) && return 0
            log "build failed (attempt $i); retrying in 20 s"
            sleep 20
        done
        die "cargo build --release keeps failing"
    fi
    [ -x "$BENCH_AGENT" ] || die "no agent binary at $BENCH_AGENT"
}

bench_free_port() { "$BENCH_PY" "$BENCH_TOOL" freeport; }

# Markdown lines describing the machine and the software, for every section.
bench_machine_md() {
    local cpu mem load commit dirty docker_v
    cpu=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n1)
    mem=$(awk '/^MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo)
    load=$(cut -d' ' -f1-3 /proc/loadavg)
    commit=$(git -C "$BENCH_REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)
    dirty=$(git -C "$BENCH_REPO" status --porcelain --untracked-files=no -- src Cargo.toml Cargo.lock lua templates 2>/dev/null | grep -q . && echo " + uncommitted changes in src" || true)
    docker_v=$(docker info --format '{{.ServerVersion}}' 2>/dev/null || true)
    echo "- Date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "- Machine: $(nproc) CPUs ($cpu), $mem RAM, Debian $(cat /etc/debian_version), kernel $(uname -r); load average at start: $load"
    echo "- Software: $(haproxy -v | head -n1 | cut -d' ' -f1-3), $("$PGBIN/postgres" --version), Docker ${docker_v:-"not running"}, $("$BENCH_AGENT" --version) (commit $commit$dirty, release build, binary sha256 $(sha256sum "$BENCH_AGENT" | cut -c1-12)), Python $("$BENCH_PY" -c 'import platform; print(platform.python_version())')"
    echo "- Temp layout on: $(df -T "${TMPDIR:-/tmp}" | awk 'NR==2 {print $2}') (${TMPDIR:-/tmp})"
}

# The noise level while the benchmark ran (the machine is shared): the load average at the end,
# and the share of CPU time the hypervisor gave to others (steal) since bench_preflight.
bench_load_md() {
    local steal
    steal=$(printf '%s\n%s\n' "$BENCH_CPU0" "$(grep '^cpu ' /proc/stat)" |
        awk '{t = 0; for (i = 2; i <= 9; i++) t += $i; tot[NR] = t; st[NR] = $9} END {d = tot[2] - tot[1]; printf "%.1f", (d > 0) ? 100 * (st[2] - st[1]) / d : 0}')
    echo "- Load average at the end: $(cut -d' ' -f1-3 /proc/loadavg); CPU steal during the run: $steal % (other work on this machine and its host shows up here)"
}

# pgs-agent init DIR --listen 127.0.0.1:PORT [INIT_ARGS...], with a unique docker prefix. Sets
# BENCH_DIR, BENCH_CFG, BENCH_PORT, BENCH_PREFIX, BENCH_ADMIN, BENCH_MASTER.
bench_layout() {  # NAME [INIT_ARGS...]
    local name=$1
    shift
    BENCH_PREFIX="pgsbench-$name-$$"
    BENCH_DIR=$(mktemp -d "${TMPDIR:-/tmp}/pgsbench-$name.XXXXXX")
    rmdir "$BENCH_DIR"  # init creates it (and refuses an existing layout)
    BENCH_PORT=$(bench_free_port)
    "$BENCH_AGENT" init "$BENCH_DIR" --listen "127.0.0.1:$BENCH_PORT" "$@" >&2
    BENCH_CFG=$BENCH_DIR/pgs.toml
    sed -i "s/^prefix = .*/prefix = \"$BENCH_PREFIX\"/" "$BENCH_CFG"
    grep -q "^prefix = \"$BENCH_PREFIX\"" "$BENCH_CFG" || die "could not set [docker] prefix in $BENCH_CFG"
    BENCH_ADMIN=$BENCH_DIR/run/admin.sock
    BENCH_MASTER=$BENCH_DIR/run/master.sock
    log "layout $BENCH_DIR, listen 127.0.0.1:$BENCH_PORT, docker prefix $BENCH_PREFIX"
}

# pgs-agent render, then haproxy -W -S DIR/run/master.sock -f DIR/haproxy/pgs.cfg in the background.
bench_start_haproxy() {
    "$BENCH_AGENT" -c "$BENCH_CFG" render >&2
    rm -f "$BENCH_ADMIN" "$BENCH_MASTER"  # stale sockets of an earlier HAProxy of this run
    haproxy -W -S "$BENCH_MASTER" -f "$BENCH_DIR/haproxy/pgs.cfg" >>"$BENCH_DIR/haproxy.log" 2>&1 </dev/null &
    BENCH_HAPROXY_PID=$!
    local i
    for i in $(seq 100); do
        [ -S "$BENCH_ADMIN" ] && [ -S "$BENCH_MASTER" ] && return 0
        kill -0 "$BENCH_HAPROXY_PID" 2>/dev/null || break
        sleep 0.1
    done
    tail -n 20 "$BENCH_DIR/haproxy.log" >&2 || true
    die "HAProxy did not start"
}

# Stops a child we started: SIGTERM, up to 10 s, then SIGKILL; always reaps it.
bench_stop_pid() {
    local pid=$1 i
    [ -n "$pid" ] || return 0
    kill -TERM "$pid" 2>/dev/null || return 0
    for i in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null || true
}

bench_stop_haproxy() {
    local pid=$BENCH_HAPROXY_PID
    BENCH_HAPROXY_PID=""
    bench_stop_pid "$pid"
}

# The master CLI (answers after the client half-closes its side: socat -t 2).
bench_master_cli() { echo "$1" | socat -t 2 - "UNIX-CONNECT:$BENCH_MASTER"; }

# Removes containers and volumes of this run only: they carry our installation label, and their
# names start with our unique prefix.
bench_docker_cleanup() {
    [ -n "$BENCH_PREFIX" ] || return 0
    command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1 || return 0
    local id name
    docker ps -a --filter "label=io.pgs.installation=$BENCH_PREFIX" --format '{{.ID}} {{.Names}}' |
        while read -r id name; do
            case "$name" in "$BENCH_PREFIX"-*) docker rm -f "$id" >/dev/null || true ;; esac
        done
    docker volume ls -q --filter "label=io.pgs.installation=$BENCH_PREFIX" |
        while read -r name; do
            case "$name" in "$BENCH_PREFIX"-*) docker volume rm -f "$name" >/dev/null || true ;; esac
        done
}

# A local PostgreSQL 15 for external tenants: initdb -U TENANT (SCRAM, a random password) as user
# postgres into a temp dir, a database named after TENANT, listening on its unix socket and on
# 127.0.0.1:PORT (a free port). Sets BENCH_PG_DIR (the socket directory), BENCH_PG_SOCK,
# BENCH_PG_PORT, BENCH_PGDATA; exports PGPASSWORD, PGUSER, PGDATABASE and PGSSLMODE=disable for
# libpq clients (the password never goes on a command line), and PGPORT (libpq names the socket
# file after the port).
bench_local_postgres() {  # TENANT
    local tenant=$1 root
    root=$(mktemp -d "${TMPDIR:-/tmp}/pgsbench-pg.XXXXXX")
    BENCH_TMP+=("$root")
    chown postgres:postgres "$root"
    chmod 755 "$root"
    export PGPASSWORD PGUSER=$tenant PGDATABASE=$tenant PGSSLMODE=disable
    PGPASSWORD=$(head -c 18 /dev/urandom | base64 | tr -d '/+=')
    printf '%s\n' "$PGPASSWORD" >"$root/pwfile"
    chown postgres "$root/pwfile"
    chmod 600 "$root/pwfile"
    log "initdb -U $tenant (PostgreSQL 15) in $root/data"
    runuser -u postgres -- "$PGBIN/initdb" -D "$root/data" -U "$tenant" --pwfile="$root/pwfile" \
        --auth=scram-sha-256 -E UTF8 --no-sync >/dev/null
    rm -f "$root/pwfile"
    BENCH_PGDATA=$root/data
    BENCH_PG_DIR=$root
    BENCH_PG_PORT=$(bench_free_port)
    BENCH_PG_SOCK=$root/.s.PGSQL.$BENCH_PG_PORT
    export PGPORT=$BENCH_PG_PORT
    runuser -u postgres -- "$PGBIN/pg_ctl" -D "$root/data" -l "$root/postgres.log" -w -t 30 \
        -o "-c listen_addresses=127.0.0.1 -p $BENCH_PG_PORT -k $root -c max_connections=50" start >/dev/null \
        || { tail -n 20 "$root/postgres.log" >&2; die "PostgreSQL did not start"; }
    psql -X -q -h "$root" -p "$BENCH_PG_PORT" -d postgres -v ON_ERROR_STOP=1 -c "create database $tenant" >/dev/null
}

# pgbench -i -s 1 into the local PostgreSQL (bench_local_postgres).
bench_pgbench_init() {
    log "pgbench -i -s 1"
    "$PGBIN/pgbench" -i -s 1 -q -h "$BENCH_PG_DIR" >"$BENCH_PG_DIR/init.log" 2>&1 \
        || { cat "$BENCH_PG_DIR/init.log" >&2; die "pgbench -i failed"; }
}

# A second HAProxy that routes to one server with a static `use_backend`: no Lua, no maps, and
# otherwise the global/frontend/backend settings and per-connection log line pgs renders. Sets
# STATIC_PORT, STATIC_DIR (admin.sock, haproxy.log) and STATIC_PID (its master).
bench_static_haproxy() {  # TENANT SOCKET
    local tenant=$1 sock=$2 i
    STATIC_PORT=$(bench_free_port)
    STATIC_DIR=$(mktemp -d "${TMPDIR:-/tmp}/pgsbench-static.XXXXXX")
    BENCH_TMP+=("$STATIC_DIR")
    cat >"$STATIC_DIR/static.cfg" <<EOF
# The same tenant behind a static use_backend (no Lua, no maps). Global, frontend and backend
# settings as pgs renders them (maxconn, timeouts, log), minus Lua.
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
    use_backend static_$tenant

backend static_$tenant
    mode tcp
    timeout connect 5s
    timeout server 1h
    server $tenant unix@$sock
EOF
    haproxy -c -q -f "$STATIC_DIR/static.cfg" >&2 || die "static HAProxy config invalid"
    haproxy -W -f "$STATIC_DIR/static.cfg" >>"$STATIC_DIR/haproxy.log" 2>&1 </dev/null &
    STATIC_PID=$!
    BENCH_PIDS+=("$STATIC_PID")
    for i in $(seq 100); do [ -S "$STATIC_DIR/admin.sock" ] && return 0; sleep 0.1; done
    die "static HAProxy did not start"
}

# The Runtime API's answer to one command.
bench_runtime() { echo "$2" | socat -t 2 - "UNIX-CONNECT:$1"; }  # SOCKET COMMAND
bench_nbthread() { bench_runtime "$1" "show info" | sed -n 's/^Nbthread: //p'; }  # SOCKET

# One pgbench -S run (P1 adds -C: a new connection per transaction), -c BENCH_CLIENTS -j BENCH_JOBS
# -T DURATION, in the background so that INT/TERM reach the trap; prints the TPS. Its output is
# kept as BENCH_RAW/<ns>-TAG-MODE.txt (call bench_raw_dir once first). Every run must exit 0 with 0
# failed transactions.
BENCH_CLIENTS=4
BENCH_JOBS=2
BENCH_RAW=""
bench_raw_dir() {
    [ -n "$BENCH_RAW" ] && return 0
    BENCH_RAW=$(mktemp -d "${TMPDIR:-/tmp}/pgsbench-raw.XXXXXX")
    BENCH_TMP+=("$BENCH_RAW")
}
bench_pgbench() {  # HOST PORT MODE(P1|P2) TAG
    local host=$1 port=$2 mode=$3 tag=$4 out rc=0 tps
    local flags=(-S -n -c "$BENCH_CLIENTS" -j "$BENCH_JOBS" -T "$DURATION")
    [ "$mode" = P1 ] && flags=(-C "${flags[@]}")
    out=$BENCH_RAW/$(date +%s%N)-$tag-$mode.txt
    "$PGBIN/pgbench" "${flags[@]}" -h "$host" -p "$port" >"$out" 2>&1 &
    BENCH_CHILD=$!
    wait "$BENCH_CHILD" || rc=$?
    BENCH_CHILD=""
    [ "$rc" = 0 ] || { cat "$out" >&2; die "pgbench $mode ($tag) failed (exit $rc)"; }
    grep -q '^number of failed transactions: 0 ' "$out" || { cat "$out" >&2; die "pgbench $mode ($tag) had failed transactions"; }
    tps=$(sed -n 's/^tps = \([0-9.]*\) .*/\1/p' "$out")
    [ -n "$tps" ] || { cat "$out" >&2; die "no tps in pgbench output"; }
    printf "%.1f\n" "$tps"
}

# Statistics over a space-separated list: "median min max"; ratios; the per-round ratio range.
bench_stat() {  # LIST [DECIMALS (default 1)]
    tr ' ' '\n' <<<"$1" | grep . | sort -g | awk -v d="${2:-1}" '{v[NR]=$1} END {
        m = (NR % 2) ? v[(NR+1)/2] : (v[NR/2]+v[NR/2+1])/2; f = "%." d "f"; printf f " " f " " f, m, v[1], v[NR]}'
}
bench_med() { bench_stat "$1" "${2:-1}" | cut -d' ' -f1; }
bench_div() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.3f", a/b}'; }
bench_round_ratios() {  # LIST_A LIST_B → "min–max" of per-round A/B
    paste <(tr ' ' '\n' <<<"$1" | grep .) <(tr ' ' '\n' <<<"$2" | grep .) |
        awk '{r=$1/$2; if (NR==1 || r<lo) lo=r; if (NR==1 || r>hi) hi=r} END {printf "%.3f–%.3f", lo, hi}'
}
bench_verdict() { awk -v x="$1" -v t="$2" 'BEGIN {print (x >= t) ? "**met**" : "**not met**"}'; }

bench_stop_postgres() {
    [ -n "$BENCH_PGDATA" ] || return 0
    local d=$BENCH_PGDATA
    BENCH_PGDATA=""
    [ -f "$d/postmaster.pid" ] && runuser -u postgres -- "$PGBIN/pg_ctl" -D "$d" -m fast -w -t 20 stop >/dev/null 2>&1 || true
}

# Runs bench-tool.py in the background and waits for it, so that INT/TERM reach the trap at once
# (bash defers traps while a foreground child runs); its stdout (the section body) goes to FILE.
bench_tool() {  # FILE ARGS...
    local out=$1
    shift
    "$BENCH_PY" "$BENCH_TOOL" "$@" >"$out" &
    BENCH_CHILD=$!
    local rc=0
    wait "$BENCH_CHILD" || rc=$?
    BENCH_CHILD=""
    return "$rc"
}

bench_cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    if [ -n "$BENCH_CHILD" ]; then
        kill -TERM "$BENCH_CHILD" 2>/dev/null
        wait "$BENCH_CHILD" 2>/dev/null
        sleep 1  # let an agent command it had started finish (it holds no lock after exit)
    fi
    bench_stop_haproxy
    local p
    for p in "${BENCH_PIDS[@]}"; do bench_stop_pid "$p"; done
    bench_stop_orphan_agent
    bench_stop_postgres
    bench_docker_cleanup
    [ -n "$BENCH_DIR" ] && [ -z "${BENCH_KEEP:-}" ] && rm -rf "$BENCH_DIR"
    local d
    for d in "${BENCH_TMP[@]}"; do [ -z "${BENCH_KEEP:-}" ] && rm -rf "$d"; done
    [ "$rc" = 0 ] || log "failed (exit $rc); cleaned up"
    exit "$rc"
}
trap bench_cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

bench_preflight() {
    bench_need socat socat
    bench_need /usr/bin/time time
    command -v haproxy >/dev/null || die "haproxy missing (scripts/install-deps.sh installs it)"
    [ -x "$PGBIN/postgres" ] || die "PostgreSQL 15 server missing at $PGBIN (scripts/install-deps.sh --tests installs it)"
    bench_build
    BENCH_RUN_T0=$(date +%s)
    BENCH_CPU0=$(grep '^cpu ' /proc/stat)
}

# Seconds since the end of bench_preflight (the build is not counted).
bench_elapsed() { echo $(( $(date +%s) - BENCH_RUN_T0 )); }

# ---------------------------------------------------------------- sleep benchmarks (9, 10)

# What both sleep benchmarks need before they start: bench_preflight, a Docker engine, the
# tenant image (in `image`), and the test venv's Python with psycopg (in VPY).
bench_sleep_preflight() {
    VENV=${PGS_TEST_VENV:-/opt/pgs-test-venv}
    VPY=$VENV/bin/python
    bench_preflight
    docker info >/dev/null 2>&1 || die "no Docker engine answers (scripts/start-dockerd.sh starts one)"
    image=pgs/postgres:15
    docker image inspect "$image" >/dev/null 2>&1 || die "image $image missing (docker/build-image.sh 15 builds it)"
    "$VPY" -c 'import psycopg' 2>/dev/null || die "no psycopg in $VENV (scripts/install-deps.sh --tests makes it; PGS_TEST_VENV moves it)"
}

# Sets `[sleep] KEY = VALUE` (VALUE as TOML: '"1s"', 200) in BENCH_CFG; pairs of arguments.
bench_sleep_settings() {  # KEY VALUE [KEY VALUE ...]
    "${VPY:?}" "$BENCH_REPO/scripts/bench-sleep.py" set-sleep "$BENCH_CFG" "$@" >&2 \
        || die "cannot set [sleep] in $BENCH_CFG"
    "$BENCH_AGENT" -c "$BENCH_CFG" check >/dev/null || die "the [sleep] settings were refused"
}

# Runs scripts/bench-sleep.py with the test venv's Python (psycopg) in the background, like
# bench_tool; it runs `pgs-agent run` itself (pid in BENCH_DIR/agent.pid) and stops it on exit.
bench_sleep_tool() {  # FILE ARGS...
    local out=$1
    shift
    "${VPY:?}" "$BENCH_REPO/scripts/bench-sleep.py" "$@" >"$out" &
    BENCH_CHILD=$!
    local rc=0
    wait "$BENCH_CHILD" || rc=$?
    BENCH_CHILD=""
    return "$rc"
}

# The agent bench-sleep.py ran, should the tool have died without stopping it.
bench_stop_orphan_agent() {
    [ -n "$BENCH_DIR" ] && [ -f "$BENCH_DIR/agent.pid" ] || return 0
    local pid i
    pid=$(cat "$BENCH_DIR/agent.pid")
    rm -f "$BENCH_DIR/agent.pid"
    grep -q "pgs-agent" "/proc/$pid/cmdline" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || return 0
    for i in $(seq 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
}
