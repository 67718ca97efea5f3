#!/usr/bin/env bash
# Start a Docker engine for pgs if none is answering. Idempotent.
#
# Env:
#   PGS_DOCKERD_LOG      log file            (default /var/log/pgs-dockerd.log)
#   PGS_DOCKERD_TIMEOUT  seconds to wait     (default 60)
#   PGS_DOCKERD_STORAGE  storage driver      (default: overlay2 if the kernel has
#                                             overlay, else vfs)
#   PGS_DOCKERD_ARGS     extra dockerd flags (appended)
#
# dockerd runs with live-restore: tenant containers keep running (and serving) while dockerd
# itself is stopped, killed or restarted. A live-restore setting in /etc/docker/daemon.json wins
# (dockerd refuses the same directive as a flag and in that file).
set -euo pipefail

LOG=${PGS_DOCKERD_LOG:-/var/log/pgs-dockerd.log}
TIMEOUT=${PGS_DOCKERD_TIMEOUT:-60}

say() { printf 'start-dockerd: %s\n' "$*"; }
die() { printf 'start-dockerd: ERROR: %s\n' "$*" >&2; exit 1; }

if docker info >/dev/null 2>&1; then
    say "engine already answering (server $(docker info --format '{{.ServerVersion}}' 2>/dev/null)); nothing to do"
    if [ "$(docker info --format '{{.LiveRestoreEnabled}}' 2>/dev/null)" != true ]; then
        say "note: its live-restore is off: tenants stop serving while dockerd restarts" \
            "(\"live-restore\": true in /etc/docker/daemon.json, then restart it; README.md)"
    fi
    exit 0
fi

[ "$(id -u)" = 0 ] || die "must run as root to start dockerd"

if ! command -v dockerd >/dev/null 2>&1; then
    say "dockerd missing; installing docker.io with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q || die "apt-get update failed"
    apt-get install -y -q docker.io || die "apt-get install docker.io failed"
fi
command -v docker >/dev/null 2>&1 || die "docker client not found in PATH"

wait_ready() {  # $1 = pid; returns 0 ready, 1 dockerd exited, 2 timeout
    local deadline=$(( $(date +%s) + TIMEOUT ))
    while ! docker info >/dev/null 2>&1; do
        kill -0 "$1" 2>/dev/null || return 1
        [ "$(date +%s)" -lt "$deadline" ] || return 2
        sleep 0.5
    done
}

start() {  # $1 = storage driver; sets pid
    mkdir -p "$(dirname "$LOG")"
    # No iptables management: the pgs containers run with --network none.
    local args=(--iptables=false --ip6tables=false --storage-driver="$1")
    grep -qs '"live-restore"' /etc/docker/daemon.json || args+=(--live-restore)
    # shellcheck disable=SC2206
    # shellcheck disable=SC2086,SC2206
    args+=(${PGS_DOCKERD_ARGS:-})
    say "starting dockerd ${args[*]} (log: $LOG)"
    setsid nohup dockerd "${args[@]}" >>"$LOG" 2>&1 </dev/null &
    pid=$!
    disown "$pid" 2>/dev/null || true
}

fail() {
    say "$1; last log lines:" >&2
    tail -n 30 "$LOG" >&2 || true
    exit 1
}

# A dockerd may be running but not answering yet (e.g. started seconds ago).
if pid=$(pgrep -x dockerd | head -n1) && [ -n "$pid" ]; then
    say "dockerd already running (pid $pid) but not answering yet; waiting for it"
    wait_ready "$pid" && rc=0 || rc=$?
else
    driver=${PGS_DOCKERD_STORAGE:-}
    auto=0
    if [ -z "$driver" ]; then
        auto=1
        if grep -qw overlay /proc/filesystems || modprobe overlay 2>/dev/null; then
            driver=overlay2
        else
            driver=vfs
        fi
    fi
    start "$driver"
    wait_ready "$pid" && rc=0 || rc=$?
    if [ "$rc" = 1 ] && [ "$auto" = 1 ] && [ "$driver" = overlay2 ]; then
        # e.g. overlay not usable on this backing filesystem (nested containers)
        say "dockerd exited with overlay2; retrying with the vfs storage driver"
        tail -n 5 "$LOG" | sed 's/^/  | /'
        driver=vfs
        start "$driver"
        wait_ready "$pid" && rc=0 || rc=$?
    fi
fi
case "$rc" in
    1) fail "dockerd (pid $pid) exited" ;;
    2) fail "dockerd (pid $pid) not answering after ${TIMEOUT}s" ;;
esac
say "engine ready: pid $pid, server $(docker info --format '{{.ServerVersion}} storage={{.Driver}} cgroup={{.CgroupVersion}}' 2>/dev/null), log $LOG"
