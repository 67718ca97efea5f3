#!/usr/bin/env bash
# Fuzzes the HTTP API from its OpenAPI document (docs/openapi.json) with schemathesis, against a
# real `pgs-agent run` beside a real HAProxy and Docker engine, in a throwaway layout with its
# own Docker prefix. Fails on any 5xx or any answer the document does not describe. Prints the
# number of requests sent. Cleans up (agent, HAProxy, containers, volumes) on exit.
#
#   scripts/fuzz-api.sh                  default budget (PGS_FUZZ_EXAMPLES=25 per operation)
#   PGS_FUZZ_EXAMPLES=100 scripts/fuzz-api.sh
#
# Needs: python3 with venv, haproxy, a Docker engine with the tenant image
# (docker/build-image.sh 15). schemathesis is installed from PyPI into target/fuzz-venv.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
examples=${PGS_FUZZ_EXAMPLES:-25}
schemathesis_version=4.32.5
venv=$repo/target/fuzz-venv
work=$(mktemp -d /tmp/pgs-fuzz.XXXXXX)
prefix=pgsfuzz-$$
agent=$repo/target/debug/pgs-agent

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

cleanup() {
    set +e
    for pidfile in "$work/agent.pid" "$work/haproxy.pid"; do
        if [ -f "$pidfile" ]; then
            pid=$(cat "$pidfile")
            kill -TERM "$pid" 2>/dev/null
            for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -KILL "$pid" 2>/dev/null
            wait "$pid" 2>/dev/null
        fi
    done
    containers=$(docker ps -aq --filter "label=io.pgs.installation=$prefix")
    [ -n "$containers" ] && docker rm -f -v $containers >/dev/null
    volumes=$(docker volume ls -q --filter "label=io.pgs.installation=$prefix")
    [ -n "$volumes" ] && docker volume rm -f $volumes >/dev/null
    rm -rf "$work"
}
trap cleanup EXIT

if ! "$venv/bin/schemathesis" --version 2>/dev/null | grep -q "$schemathesis_version"; then
    echo "==> installing schemathesis $schemathesis_version into $venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q "schemathesis==$schemathesis_version"
fi
cargo build -q --bin pgs-agent

port=$(free_port)
api_port=$(free_port)
"$agent" init "$work/pgs" --listen "127.0.0.1:$port" --api-listen "127.0.0.1:$api_port" >/dev/null
sed -i "s/^prefix = \"pgs\"/prefix = \"$prefix\"/" "$work/pgs/pgs.toml"
"$agent" -c "$work/pgs/pgs.toml" render >/dev/null
haproxy -W -S "$work/pgs/run/master.sock" -f "$work/pgs/haproxy/pgs.cfg" >"$work/haproxy.log" 2>&1 &
echo $! >"$work/haproxy.pid"
"$agent" -c "$work/pgs/pgs.toml" run >"$work/agent.log" 2>&1 &
echo $! >"$work/agent.pid"
for _ in $(seq 100); do
    curl -sf "http://127.0.0.1:$api_port/healthz" >/dev/null && break
    sleep 0.1
done
token=$(cat "$work/pgs/secrets/api-token")

# Checks: everything but positive_data_acceptance, which would flag the 422s the document
# declares for values the schema cannot express (limits of this host, images missing on the
# engine) and the 409 for an id an earlier example already created.
echo "==> schemathesis run docs/openapi.json (max $examples examples per operation)"
status=0
# From the work dir: schemathesis keeps a cache (.schemathesis/) in the current directory.
(cd "$work" && "$venv/bin/schemathesis" run "$repo/docs/openapi.json" \
    --url "http://127.0.0.1:$api_port" \
    --header "Authorization: Bearer $token" \
    --checks all --exclude-checks positive_data_acceptance \
    --max-examples "$examples" --seed 1 --workers 1 \
    --request-timeout 180 \
    --report har --report-dir "$work/report" \
    --warnings off) || status=$?

summary=$(python3 - "$work/report" <<'PY'
import collections, glob, json, sys
entries = [e for f in glob.glob(sys.argv[1] + "/har-*.json") for e in json.load(open(f))["log"]["entries"]]
by = collections.Counter((e["request"]["method"], e["response"]["status"]) for e in entries)
print(len(entries), sum(1 for e in entries if e["response"]["status"] >= 500))
print(", ".join(f"{m} {s}: {n}" for (m, s), n in sorted(by.items())), file=sys.stderr)
PY
)
read -r requests server_errors <<<"$summary"
echo "==> $requests requests sent; $server_errors answered 5xx; schemathesis exit status $status"
if [ "$status" -ne 0 ] || [ "$server_errors" -ne 0 ]; then
    echo "---- agent log (tail) ----"
    tail -40 "$work/agent.log"
    exit 1
fi
