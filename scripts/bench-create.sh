#!/usr/bin/env bash
# Benchmark 2: tenant create → first query through HAProxy, idle tenant memory, and batches.
#
# In a fresh `pgs-agent init` layout with its own docker prefix and HAProxy: COUNT times
# `pgs-agent tenant create tN --enable`, then `tenant credentials tN` and a psql query through
# HAProxy (retried every 50 ms until it answers), timed from the create's start, with a
# breakdown from the engine's timestamps. After the first tenant and again after the last, wait
# IDLE seconds and read `docker stats --no-stream`. Then BATCH new tenants in one `pgs-agent
# sync`, once per value of [docker] start_concurrency in CONCURRENCY, and the disk each new
# tenant's volume takes. Last, the image's first init alone, template copy vs initdb (COUNT
# runs each, alternating).
# Needs a running Docker engine and the image pgs/postgres:15 (docker/build-image.sh 15).
#
#   scripts/bench-create.sh [--out FILE]     Markdown section to FILE (default stdout)
#
# Env: COUNT (default 5), IDLE (default 10), BATCH (default 50), CONCURRENCY (default "1 4"),
#      IMAGE (default pgs/postgres:15; e.g. one built with PGS_IMAGE_REPO, so a rebuild of the
#      shared tag during the run cannot change what is measured), PGS_AGENT (a prebuilt
#      binary), BENCH_KEEP=1.
source "$(dirname "$0")/bench-common.sh"
bench_parse_args "$@"
COUNT=${COUNT:-5}
IDLE=${IDLE:-10}
BATCH=${BATCH:-50}
CONCURRENCY=${CONCURRENCY:-1 4}

bench_preflight
docker info >/dev/null 2>&1 || die "no Docker engine answers (scripts/start-dockerd.sh starts one)"
image=${IMAGE:-pgs/postgres:15}
docker image inspect "$image" >/dev/null 2>&1 || die "image $image missing (docker/build-image.sh 15 builds it)"
machine=$(bench_machine_md)
bench_layout create
sed -i "s|^default_image = .*|default_image = \"$image\"|" "$BENCH_CFG"
grep -q "^default_image = \"$image\"" "$BENCH_CFG" || die "could not set default_image in $BENCH_CFG"
bench_start_haproxy

bench_tool "$BENCH_DIR/body.md" create --agent "$BENCH_AGENT" --cfg "$BENCH_CFG" \
    --prefix "$BENCH_PREFIX" --count "$COUNT" --idle "$IDLE"
body=$(cat "$BENCH_DIR/body.md")
# shellcheck disable=SC2086
bench_tool "$BENCH_DIR/batch.md" batch --agent "$BENCH_AGENT" --cfg "$BENCH_CFG" \
    --prefix "$BENCH_PREFIX" --count "$BATCH" --concurrency $CONCURRENCY
batch=$(cat "$BENCH_DIR/batch.md")
bench_tool "$BENCH_DIR/firstinit.md" firstinit --image "$image" --prefix "$BENCH_PREFIX" --runs "$COUNT"
firstinit=$(cat "$BENCH_DIR/firstinit.md")

cmd="scripts/bench-create.sh"
[ "$COUNT" = 5 ] && [ "$IDLE" = 10 ] && [ "$BATCH" = 50 ] && [ "$CONCURRENCY" = "1 4" ] \
    || cmd="COUNT=$COUNT IDLE=$IDLE BATCH=$BATCH CONCURRENCY=\"$CONCURRENCY\" $cmd"
[ "$image" = pgs/postgres:15 ] || cmd="IMAGE=$image $cmd"
image_id=$(docker image inspect --format '{{.Id}}' "$image" | cut -c8-19)
image_size=$(docker image inspect --format '{{.Size}}' "$image" | awk '{printf "%.0f MB", $1/1e6}')
mem=$(sed -n 's/^default_memory = //p' "$BENCH_CFG" | tr -d '"')
{
    echo "## 2. Tenant create → first query through HAProxy"
    echo
    echo "Command: \`$cmd\` (took $(bench_elapsed) s, build excluded)"
    echo
    echo "$machine"
    bench_load_md
    echo "- Setup: image $image ($image_id, $image_size) already present; storage driver"
    echo "  $(docker info --format '{{.Driver}}'), cgroup v$(docker info --format '{{.CgroupVersion}}'); default tenant limits from"
    echo "  \`pgs-agent init\` (memory $mem); HAProxy 2.6 master-worker; tenants created one after another."
    echo
    echo "$body"
    echo
    echo "### Many new tenants in one \`sync\`"
    echo
    echo "$batch"
    echo
    echo "### The first init alone: the template copy against initdb"
    echo
    echo "$firstinit"
} >"$BENCH_OUT"
log "done"
