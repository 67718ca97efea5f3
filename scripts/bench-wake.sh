#!/usr/bin/env bash
# Benchmark 9: wake on connect — a client's first query to a sleeping tenant, and memory per state.
#
# In a fresh `pgs-agent init` layout (own docker prefix, own HAProxy, `pgs-agent run` with
# `[sleep] check_every = "1s"`): WAKE_TENANTS managed tenants (backups off, no idle timeout: they
# sleep only when told). Then
#   - awake: WAKES timed clients to awake tenants (the baseline);
#   - light: WAKES times: `POST /sleep/<t>` on the agent's wake socket (PostgreSQL stops inside
#     the running container), PAUSE s, then one timed client (psycopg: TCP connect, startup, SCRAM,
#     `select 1` answered) through HAProxy, which holds it while the agent wakes the server; the
#     agent's `woke` log line gives queued/start/ready; a second client right after gives the
#     cost of the connection itself once the server is up; ROTATE tenants in turn;
#   - memory with all WAKE_TENANTS awake, all light asleep, all deep asleep (host MemTotal −
#     MemAvailable, each container's cgroup memory, each containerd-shim's RSS);
#   - deep: the agent restarted with `[sleep] max_light = 0` (every sleeper's container stops),
#     DEEP_WAKES times: sleep, wait until the container stopped, one timed client.
# Needs a running Docker engine, the image pgs/postgres:15 (docker/build-image.sh 15) and the venv
# with psycopg[binary] (scripts/install-deps.sh --tests).
#
#   scripts/bench-wake.sh [--out FILE]     Markdown section to FILE (default stdout)
#
# Env: WAKES (default 200), DEEP_WAKES (30), WAKE_TENANTS (20), ROTATE (5), PAUSE (0.5), PGS_TEST_VENV
# (default /opt/pgs-test-venv), PGS_AGENT (a prebuilt binary), BENCH_KEEP=1.
source "$(dirname "$0")/bench-common.sh"
bench_parse_args "$@"
WAKES=${WAKES:-200}
DEEP_WAKES=${DEEP_WAKES:-30}
WAKE_TENANTS=${WAKE_TENANTS:-20}
ROTATE=${ROTATE:-5}
PAUSE=${PAUSE:-0.5}

bench_sleep_preflight
machine=$(bench_machine_md)
bench_layout wake --api-listen ""
bench_sleep_settings check_every '"1s"' max_light 200
bench_start_haproxy

bench_sleep_tool "$BENCH_DIR/body.md" wake --agent "$BENCH_AGENT" --cfg "$BENCH_CFG" \
    --dir "$BENCH_DIR" --prefix "$BENCH_PREFIX" --port "$BENCH_PORT" \
    --agent-log "$BENCH_DIR/agent.log" --tenants "$WAKE_TENANTS" --rotate "$ROTATE" \
    --wakes "$WAKES" --deep-wakes "$DEEP_WAKES" --pause "$PAUSE"
body=$(cat "$BENCH_DIR/body.md")

cmd="scripts/bench-wake.sh"
env=""
[ "$WAKES" = 200 ] || env+="WAKES=$WAKES "
[ "$DEEP_WAKES" = 30 ] || env+="DEEP_WAKES=$DEEP_WAKES "
[ "$WAKE_TENANTS" = 20 ] || env+="WAKE_TENANTS=$WAKE_TENANTS "
[ "$ROTATE" = 5 ] || env+="ROTATE=$ROTATE "
[ "$PAUSE" = 0.5 ] || env+="PAUSE=$PAUSE "
cmd="$env$cmd"
image_id=$(docker image inspect --format '{{.Id}}' "$image" | cut -c8-19)
{
    echo "## 9. Wake on connect"
    echo
    echo "Command: \`$cmd\` (took $(bench_elapsed) s, build excluded)"
    echo
    echo "$machine"
    bench_load_md
    echo "- Setup: image $image ($image_id); $WAKE_TENANTS managed tenants (default limits, backups off,"
    echo "  no idle timeout: put to sleep by \`POST /sleep/<t>\` on \`run/wake.sock\`, as \`tenant sleep\`"
    echo "  does); \`pgs-agent run\` with \`[sleep] check_every = \"1s\"\`, \`wake_timeout\` default;"
    echo "  HAProxy 2.6 master-worker. Client: psycopg $("$VPY" -c 'import psycopg; print(psycopg.__version__)')"
    echo "  (libpq $("$VPY" -c 'import psycopg; v = psycopg.pq.version(); print(f"{v // 10000}.{v % 100}")')),"
    echo "  \`psycopg.connect(host=127.0.0.1, sslmode=disable)\` + \`select 1\`, timed with"
    echo "  \`time.perf_counter\` from before the connect to the answer; a new connection each time;"
    echo "  each wake $PAUSE s after the sleep request returned (the server stopped)."
    echo "- Breakdown: \`queued\`, \`start\`, \`ready\` and \`total\` are the agent's own figures from its"
    echo "  \`woke tenant=… queued_ms start_ms ready_ms total_ms\` log line for that wake; \"client after"
    echo "  the server is up\" is the next connection of the same client to the now-awake tenant; the"
    echo "  HAProxy + Lua row is what remains of the client's total (reading the startup packet, the"
    echo "  Lua's call to the wake socket, the map lookup, connecting on)."
    echo
    echo "$body"
} >"$BENCH_OUT"
log "done"
