#!/usr/bin/env bash
# The main job on a fresh Debian 12 machine, as root: install what is missing, start a Docker
# engine, build the agent and the tenant image, create a layout, start HAProxy and
# `pgs-agent run`, create an enabled demo tenant, and print the psql line. TLS is on: a local
# CA and a certificate for localhost are made in the layout (DIR/ca), so sslmode=require and
# verify-full work at once.
# Idempotent: a second run reuses everything that is there, and brings the demo tenant back to
# started and enabled if you stopped or disabled it. Needs Rust (rustup), see README.md.
#
#   scripts/quickstart.sh          set up (or check) and print how to connect
#   scripts/quickstart.sh stop     stop the agent and HAProxy (tenant containers keep running;
#                                  run scripts/quickstart.sh again to start them)
#   scripts/quickstart.sh purge    stop everything and delete the demo layout, containers, volumes
#
# Env: PGS_DEMO_DIR (default /var/lib/pgs-demo), PGS_DEMO_LISTEN (default 127.0.0.1:6432),
#      PGS_DEMO_API_LISTEN (the agent's HTTP API, default 127.0.0.1:6480; "" for none),
#      PGS_DEMO_TENANT (default demo). Containers are named pgsdemo-<tenant> (the layout's own
#      docker prefix, so another pgs layout on the same engine never touches them).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
dir=${PGS_DEMO_DIR:-/var/lib/pgs-demo}
listen=${PGS_DEMO_LISTEN:-127.0.0.1:6432}
api_listen=${PGS_DEMO_API_LISTEN-127.0.0.1:6480}
tenant=${PGS_DEMO_TENANT:-demo}
agent=$repo/target/release/pgs-agent
cfg=$dir/pgs.toml
start=$(date +%s)
step() { echo "==> [$(( $(date +%s) - start ))s] $*"; }

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

stop_pid() {
    local pidfile=$1 name=$2
    if alive "$pidfile"; then
        local pid; pid=$(cat "$pidfile")
        kill -TERM "$pid"
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        echo "stopped $name (pid $pid)"
    fi
    rm -f "$pidfile"
}

case "${1:-}" in
stop)
    stop_pid "$dir/run/agent.pid" pgs-agent
    stop_pid "$dir/run/haproxy-master.pid" HAProxy
    exit 0 ;;
purge)
    stop_pid "$dir/run/agent.pid" pgs-agent
    if [ -x "$agent" ] && [ -f "$cfg" ]; then
        for t in $("$agent" -c "$cfg" tenant list --json 2>/dev/null | sed -n 's/^    "id": "\(.*\)",$/\1/p'); do
            "$agent" -c "$cfg" tenant delete "$t" --purge-data || true
        done
    fi
    stop_pid "$dir/run/haproxy-master.pid" HAProxy
    rm -rf "$dir"
    echo "purged $dir"
    exit 0 ;;
"") ;;
*) echo "usage: $0 [stop|purge]" >&2; exit 2 ;;
esac

step "dependencies (Debian packages)"
scripts/install-deps.sh
step "Docker engine"
scripts/start-dockerd.sh
step "tenant image pgs/postgres:15"
docker/build-image.sh 15
if [ -x "$agent" ]; then
    step "building pgs-agent (release; up to date unless the sources changed)"
else
    step "building pgs-agent (release; the first build takes 3-4 minutes on 2 cores)"
fi
cargo build --release --locked

step "local CA and a certificate for localhost ($dir/ca)"
scripts/make-local-ca.sh "$dir/ca"
if [ -f "$cfg" ]; then
    step "layout $dir exists; reusing it"
    if ! grep -q '^\[tls\]' "$cfg"; then
        step "turning TLS on in the existing layout ([tls] in $cfg)"
        install -d -m 0700 "$dir/tls"
        install -m 0600 "$dir/ca/localhost.pem" "$dir/tls/localhost.pem"
        printf '\n[tls]\ncertificates = "tls"\nmode = "optional"\n' >>"$cfg"
    fi
else
    step "creating layout $dir"
    "$agent" init "$dir" --listen "$listen" --api-listen "$api_listen" --docker-prefix pgsdemo \
        --tls-cert "$dir/ca/localhost.pem"
    step "this script runs those next steps itself"
fi

step "rendering HAProxy's files"
"$agent" -c "$cfg" render

if alive "$dir/run/haproxy-master.pid"; then
    step "HAProxy already running (pid $(cat "$dir/run/haproxy-master.pid")); reloading it for any new listener"
    "$agent" -c "$cfg" sync >/dev/null || true
else
    step "starting HAProxy: haproxy -W -S $dir/run/master.sock -f $dir/haproxy/pgs.cfg"
    setsid nohup haproxy -W -S "$dir/run/master.sock" -f "$dir/haproxy/pgs.cfg" \
        >>"$dir/haproxy.log" 2>&1 </dev/null &
    echo $! >"$dir/run/haproxy-master.pid"
    for _ in $(seq 100); do [ -S "$dir/run/admin.sock" ] && break; sleep 0.1; done
    [ -S "$dir/run/admin.sock" ] || { tail -20 "$dir/haproxy.log"; echo "HAProxy did not start" >&2; exit 1; }
fi

if alive "$dir/run/agent.pid"; then
    step "pgs-agent run already running (pid $(cat "$dir/run/agent.pid"))"
else
    step "starting pgs-agent run (log: $dir/agent.log)"
    setsid nohup "$agent" -c "$cfg" run >>"$dir/agent.log" 2>&1 </dev/null &
    echo $! >"$dir/run/agent.pid"
fi

if "$agent" -c "$cfg" tenant show "$tenant" >/dev/null 2>&1; then
    step "tenant $tenant exists; making sure it is started and enabled"
    "$agent" -c "$cfg" tenant start "$tenant" >/dev/null
    "$agent" -c "$cfg" access enable "$tenant" >/dev/null
else
    step "creating tenant $tenant (container, volume, wait for logins, backend, access)"
    "$agent" -c "$cfg" tenant create "$tenant" --enable
fi

# The password reaches psql through its environment, never its command line.
verify="sslmode=verify-full sslrootcert=$dir/ca/ca.crt host=localhost"
(eval "$("$agent" -c "$cfg" tenant credentials "$tenant" --format env)" &&
    psql -X -Atqc "select 'demo tenant answers: ' || current_user" >/dev/null &&
    psql "$verify" -X -Atqc "select 1" >/dev/null) \
    || { echo "the demo tenant does not answer through HAProxy; see $dir/agent.log" >&2; exit 1; }
step "done"
cat <<EOF

pgs is running. Connect to tenant "$tenant" through HAProxy (the password goes to psql
through PGPASSWORD, so it never shows in \`ps\`):

  (eval "\$($agent -c $cfg tenant credentials $tenant --format env)" && psql)

The connection is encrypted (psql's default sslmode=prefer takes the TLS pgs offers). To also
verify the server's certificate against the layout's local CA:

  (eval "\$($agent -c $cfg tenant credentials $tenant --format env)" && psql "$verify")

More:
  $agent -c $cfg tenant create acme --enable     another tenant
  $agent -c $cfg access disable $tenant           refuse new connections, instantly
  $agent -c $cfg tenant list
  $agent -c $cfg tls status                       the certificate HAProxy serves
  logs: $dir/agent.log, $dir/haproxy.log
  stop: scripts/quickstart.sh stop      remove everything: scripts/quickstart.sh purge
EOF
