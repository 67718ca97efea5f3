#!/usr/bin/env bash
# Benchmark 10: density — COUNT managed tenants on one host, idle ones asleep, 5 % active.
#
# In a fresh `pgs-agent init` layout (own docker prefix, own HAProxy, `pgs-agent run` with
# `[sleep] check_every = "2s"`, `max_light` default 200): COUNT managed tenants with
# `"idle_timeout": IDLE_TIMEOUT` and backups off, added to the tenants file BATCH at a time with one
# `pgs-agent sync` per batch; before each batch the script waits until at most BATCH tenants are
# awake (the idle pass puts the last batch to sleep), so no more than 2 × BATCH are ever awake.
# Then, with all asleep: memory (host MemTotal − MemAvailable vs before the run; per light
# sleeper cgroup memory + containerd-shim RSS; dockerd, containerd, HAProxy and agent RSS) and
# three unchanged `sync`s of them all. Then ROTATIONS rotations of PERIOD s: ACTIVE tenants run
# `pgbench -n -C -c 1 -T PERIOD` (a new connection per `select 1`) through HAProxy, started one
# after another over STAGGER s (0: all at once), while
# PROBES other sleeping tenants are woken one after another by a timed psycopg client (TCP
# connect → `select 1` answered); memory is sampled in each rotation.
# Stops creating early (and says so) when less than 3 GiB of memory is available or less than
# 5 GiB of disk is free under /var/lib/docker. Removes every container and volume it created
# (its own docker prefix only), also on failure or Ctrl-C.
# Needs a running Docker engine, the image pgs/postgres:15 (docker/build-image.sh 15), pgbench
# (PostgreSQL 15 client) and the venv with psycopg[binary] (scripts/install-deps.sh --tests).
#
#   scripts/bench-density.sh [--out FILE]     Markdown section to FILE (default stdout)
#
# Env: COUNT (default 1000), BATCH (50), ACTIVE (50), ROTATIONS (6), PERIOD (30), PROBES (10),
# STAGGER (10), MAX_LIGHT (200), IDLE_TIMEOUT (5s), PGS_TEST_VENV (default /opt/pgs-test-venv),
# PGS_AGENT (a prebuilt binary), BENCH_KEEP=1.
source "$(dirname "$0")/bench-common.sh"
bench_parse_args "$@"
COUNT=${COUNT:-1000}
BATCH=${BATCH:-50}
ACTIVE=${ACTIVE:-50}
ROTATIONS=${ROTATIONS:-6}
PERIOD=${PERIOD:-30}
PROBES=${PROBES:-10}
STAGGER=${STAGGER:-10}
IDLE_TIMEOUT=${IDLE_TIMEOUT:-5s}
MAX_LIGHT=${MAX_LIGHT:-200}

bench_sleep_preflight
[ -x "$PGBIN/pgbench" ] || die "pgbench missing at $PGBIN (scripts/install-deps.sh --tests installs PostgreSQL 15)"
disk_free=$(df -B1M --output=avail /var/lib/docker 2>/dev/null | tail -n1 | tr -d ' ')
mem_avail=$(awk '/^MemAvailable/ {printf "%d", $2/1024}' /proc/meminfo)
log "before: ${disk_free} MiB disk free under /var/lib/docker, ${mem_avail} MiB memory available"
[ "${disk_free:-0}" -gt 10240 ] || die "less than 10 GiB free under /var/lib/docker (${disk_free} MiB)"
machine=$(bench_machine_md)
bench_layout density --api-listen ""
bench_sleep_settings check_every '"2s"' max_light "$MAX_LIGHT"

# Many containers to remove: in batches, before the per-object removal of bench_cleanup (which
# then finds nothing left). Only names with this run's prefix and its installation label.
density_cleanup() {
    local rc=$?
    set +e
    if [ -n "$BENCH_CHILD" ]; then
        kill -TERM "$BENCH_CHILD" 2>/dev/null
        wait "$BENCH_CHILD" 2>/dev/null
        BENCH_CHILD=""
    fi
    bench_stop_orphan_agent
    if [ -n "$BENCH_PREFIX" ] && docker info >/dev/null 2>&1; then
        log "removing this run's containers and volumes"
        docker ps -aq --filter "label=io.pgs.installation=$BENCH_PREFIX" --filter "name=^$BENCH_PREFIX-" |
            xargs -r -n 50 docker rm -f >/dev/null 2>&1 || true
        docker volume ls -q --filter "label=io.pgs.installation=$BENCH_PREFIX" | grep "^$BENCH_PREFIX-" |
            xargs -r -n 50 docker volume rm -f >/dev/null 2>&1 || true
    fi
    (exit "$rc")  # bench_cleanup reads the status from $?
    bench_cleanup
}
trap density_cleanup EXIT
bench_start_haproxy

bench_sleep_tool "$BENCH_DIR/body.md" density --agent "$BENCH_AGENT" --cfg "$BENCH_CFG" \
    --dir "$BENCH_DIR" --prefix "$BENCH_PREFIX" --port "$BENCH_PORT" \
    --agent-log "$BENCH_DIR/agent.log" --count "$COUNT" --batch "$BATCH" --active "$ACTIVE" \
    --rotations "$ROTATIONS" --period "$PERIOD" --probes "$PROBES" --stagger "$STAGGER" \
    --idle "$IDLE_TIMEOUT" \
    --max-light "$MAX_LIGHT" --haproxy-pid "$BENCH_HAPROXY_PID" --pgbench "$PGBIN/pgbench" \
    --script "$BENCH_DIR/select1.sql"
body=$(cat "$BENCH_DIR/body.md")

cmd="scripts/bench-density.sh"
env=""
for v in COUNT:1000 BATCH:50 ACTIVE:50 ROTATIONS:6 PERIOD:30 PROBES:10 STAGGER:10 MAX_LIGHT:200 IDLE_TIMEOUT:5s; do
    name=${v%%:*}
    [ "${!name}" = "${v#*:}" ] || env+="$name=${!name} "
done
image_id=$(docker image inspect --format '{{.Id}}' "$image" | cut -c8-19)
mem=$(sed -n 's/^default_memory = //p' "$BENCH_CFG" | tr -d '"')
{
    echo "## 10. Density: 1,000 tenants on one host"
    echo
    echo "Command: \`$env$cmd\` (took $(bench_elapsed) s, build excluded)"
    echo
    echo "$machine"
    bench_load_md
    echo "- Setup: image $image ($image_id); storage driver $(docker info --format '{{.Driver}}'),"
    echo "  cgroup v$(docker info --format '{{.CgroupVersion}}'); $COUNT managed tenants, default limits (memory $mem),"
    echo "  \`\"idle_timeout\": \"$IDLE_TIMEOUT\"\`, backups off (\`\"backups\": {\"enabled\": false}\`: the backup"
    echo "  scheduler with a thousand tenants was not part of this run); \`pgs-agent run\` with"
    echo "  \`[sleep] check_every = \"2s\"\`, \`max_light = $MAX_LIGHT\` (the longest asleep beyond it have"
    echo "  their container stopped), \`deep_after\` default; HAProxy 2.6 master-worker."
    echo "- Memory \"in use\" is MemTotal − MemAvailable from /proc/meminfo, compared with the same"
    echo "  figure just before the run; the machine is shared, so other work moves it too. Per-container"
    echo "  memory is the container's cgroup (usage − inactive file cache, as \`docker stats\` counts it);"
    echo "  the containerd-shim of each running container is outside it and counted separately (PSS)."
    echo
    echo "$body"
} >"$BENCH_OUT"
log "done"
