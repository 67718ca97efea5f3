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
BENCH_PGDATA=""       # local PostgreSQL we started (bench-flip)
BENCH_TMP=()          # extra temp dirs to remove
BENCH_CHILD=""        # the measuring tool while it runs
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
    local cpu mem load commit dirty
    cpu=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n1)
    mem=$(awk '/^MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo)
    load=$(cut -d' ' -f1-3 /proc/loadavg)
    commit=$(git -C "$BENCH_REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)
    dirty=$(git -C "$BENCH_REPO" status --porcelain --untracked-files=no -- src Cargo.toml Cargo.lock lua templates 2>/dev/null | grep -q . && echo " + uncommitted changes in src" || true)
    echo "- Date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "- Machine: $(nproc) CPUs ($cpu), $mem RAM, Debian $(cat /etc/debian_version), kernel $(uname -r); load average at start: $load"
    echo "- Software: $(haproxy -v | head -n1 | cut -d' ' -f1-3), $("$PGBIN/postgres" --version), Docker $(docker version --format '{{.Server.Version}}' 2>/dev/null || echo 'n/a'), $("$BENCH_AGENT" --version) (commit $commit$dirty, release build, binary sha256 $(sha256sum "$BENCH_AGENT" | cut -c1-12)), Python $("$BENCH_PY" -c 'import platform; print(platform.python_version())')"
    echo "- Temp layout on: $(df -T "${TMPDIR:-/tmp}" | awk 'NR==2 {print $2}') (${TMPDIR:-/tmp})"
}

# The noise level while the benchmark ran (the machine is shared).
bench_load_md() { echo "- Load average at the end: $(cut -d' ' -f1-3 /proc/loadavg) (other work on this machine shows up here)"; }

# pgs-agent init DIR --listen 127.0.0.1:PORT, with a unique docker prefix. Sets BENCH_DIR, BENCH_CFG,
# BENCH_PORT, BENCH_PREFIX.
bench_layout() {  # NAME
    BENCH_PREFIX="pgsbench-$1-$$"
    BENCH_DIR=$(mktemp -d "${TMPDIR:-/tmp}/pgsbench-$1.XXXXXX")
    rmdir "$BENCH_DIR"  # init creates it (and refuses an existing layout)
    BENCH_PORT=$(bench_free_port)
    "$BENCH_AGENT" init "$BENCH_DIR" --listen "127.0.0.1:$BENCH_PORT" >&2
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
    [ -x "$PGBIN/postgres" ] || die "PostgreSQL 15 missing at $PGBIN"
    bench_build
    BENCH_RUN_T0=$(date +%s)
}

# Seconds since the end of bench_preflight (the build is not counted).
bench_elapsed() { echo $(( $(date +%s) - BENCH_RUN_T0 )); }
