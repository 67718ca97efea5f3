#!/usr/bin/env bash
# Benchmark 6: what each fault costs clients, in seconds of refusals.
#
# Runs the fault matrix (tests/faults.rs, release build, one test at a time) ROUNDS times. In
# each test a probe client logs in through HAProxy and runs `select 1` every 100 ms while the
# fault happens and the system recovers; the seconds of refusals are the time from each failed
# attempt to the next successful one. The tests themselves clean up (private dockerd, HAProxy,
# agent, containers, tmpfs).
#
#   scripts/bench-faults.sh [--out FILE]     Markdown section to FILE (default stdout)
#
# Env: ROUNDS (default 3).
source "$(dirname "$0")/bench-common.sh"
bench_parse_args "$@"
ROUNDS=${ROUNDS:-3}

bench_preflight
log "cargo test --release --no-run (the fault tests and a release pgs-agent)"
(cd "$BENCH_REPO" && cargo test --release --locked --test integration --no-run --quiet >&2)
BENCH_AGENT=$BENCH_REPO/target/release/pgs-agent
BENCH_RUN_T0=$(date +%s)  # the test build is not counted either
machine=$(bench_machine_md)
report=$(mktemp -d "${TMPDIR:-/tmp}/pgsbench-faults.XXXXXX")
BENCH_TMP+=("$report")
for r in $(seq "$ROUNDS"); do
    log "round $r of $ROUNDS"
    (cd "$BENCH_REPO" && PGS_REQUIRE_INTEGRATION=1 PGS_FAULT_REPORT="$report/impact.tsv" \
        cargo test --release --locked --test integration --quiet faults:: -- --test-threads=1 >&2)
done

{
    echo "## 7. Faults: seconds of refusals"
    echo
    echo "Command: \`scripts/bench-faults.sh\` (took $(bench_elapsed) s, build excluded; ROUNDS=$ROUNDS)"
    echo
    echo "$machine"
    bench_load_md
    echo "- Setup: the fault matrix of \`tests/faults.rs\` (\`cargo test --release --test integration"
    echo "  faults:: -- --test-threads=1\`): managed tenants (128m) on Docker, HAProxy master-worker,"
    echo "  \`pgs-agent run --resync 600\` (so no periodic pass hides a missing event). A probe"
    echo "  client (psql, a new SCRAM login and \`select 1\` every 100 ms through HAProxy) runs while"
    echo "  each fault happens and recovers; \"refused\" is the time from each failed attempt to the"
    echo "  next answer. dockerd faults use a private dockerd + containerd of the test's own."
    echo
    "$BENCH_PY" - "$report/impact.tsv" <<'PY'
import statistics, sys
rows, durations = {}, {}
for line in open(sys.argv[1]):
    what, secs, failed, attempts = line.rstrip("\n").split("\t")
    if failed == "-":
        durations.setdefault(what, []).append(float(secs))
    else:
        rows.setdefault(what, []).append((float(secs), int(failed), int(attempts)))
print("| fault (the probe's tenant) | rounds | refused s, median | min | max | failed / attempts, all rounds |")
print("|---|---:|---:|---:|---:|---:|")
for fault, rs in rows.items():
    secs = [r[0] for r in rs]
    print(f"| {fault} | {len(rs)} | {statistics.median(secs):.1f} | {min(secs):.1f} | {max(secs):.1f} "
          f"| {sum(r[1] for r in rs)} / {sum(r[2] for r in rs)} |")
print()
print("| recovery | rounds | s, median | min | max |")
print("|---|---:|---:|---:|---:|")
for what, ds in durations.items():
    print(f"| {what} | {len(ds)} | {statistics.median(ds):.1f} | {min(ds):.1f} | {max(ds):.1f} |")
back = next((ds for what, ds in durations.items() if "dockerd answers" in what), None)
if back:
    verdict = "**met**" if max(back) <= 2.0 else "**not met**"
    print()
    print(f"- Target: tenants back within 2 s of dockerd answering again (live-restore off): "
          f"median {statistics.median(back):.1f} s, max {max(back):.1f} s → {verdict} (judged on the max).")
PY
    echo
    echo "- Every fault ends with every enabled tenant answering through HAProxy with the rows"
    echo "  written before it (asserted by the tests, with deadlines; these figures are not asserted)."
    echo "- HAProxy kill -9: the refusals last until HAProxy is started again — here at once by the"
    echo "  test; under systemd, \`Restart=\` of haproxy.service decides. The tenants keep running."
    echo "- dockerd without live-restore: dockerd stops the tenants' containers when it comes back;"
    echo "  the agent starts them as soon as its event stream reconnects (before: at the next"
    echo "  periodic pass, up to 30 s later). With live-restore nothing is refused."
    echo "- OOM: the server dies with its container; Docker's restart policy (or the agent, on the die"
    echo "  event) starts it again; clients are refused until it accepts logins (crash recovery)."
} >"$BENCH_OUT"
log "done"
