#!/usr/bin/env python3
"""Measurement side of scripts/bench-*.sh (Python 3 standard library only).

The shell scripts set up and tear down (layout, HAProxy, PostgreSQL, Docker); this tool runs the
timed loops and prints the Markdown body of a section on stdout. Progress goes to stderr.

  bench-tool.py freeport
  bench-tool.py flip   --agent A --cfg CFG --tenant T --port P --admin SOCK --map MAP [--flips N] [--rt N]
  bench-tool.py create --agent A --cfg CFG --prefix PFX [--count N] [--idle S]
  bench-tool.py batch  --agent A --cfg CFG --prefix PFX [--count N] [--concurrency C...]
  bench-tool.py firstinit --image IMG --prefix PFX [--runs N]
  bench-tool.py sync   --agent A --cfg CFG --dir DIR --master SOCK --admin SOCK [--tenants N] [--add N] [--runs N]
"""

import argparse
import calendar
import gc
import json
import math
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

from bench_stats import median, pct, summary, verdict  # noqa: F401 (shared)
import urllib.parse

now = time.perf_counter


def log(msg):
    print(f"[bench-tool] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- statistics and formatting


def ms(x):
    return f"{x * 1000:.2f}"


def dist_row(name, xs, unit=ms):
    s = summary(xs)
    return (f"| {name} | {s['n']} | {unit(s['p50'])} | {unit(s['p90'])} | {unit(s['p99'])} "
            f"| {unit(s['min'])} | {unit(s['max'])} |")


DIST_HEAD = ("| measurement | n | p50 ms | p90 ms | p99 ms | min ms | max ms |\n"
             "|---|---:|---:|---:|---:|---:|---:|")


# ---------------------------------------------------------------- clients

def startup_message(user, database=None):
    body = struct.pack("!I", 196608)
    body += b"user\0" + user.encode() + b"\0"
    body += b"database\0" + (database or user).encode() + b"\0"
    body += b"\0"
    return struct.pack("!I", len(body) + 4) + body


def recv_exact(s, n):
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise EOFError(f"closed after {len(buf)} of {n} bytes")
        buf += chunk
    return buf


def probe(host, port, msg, timeout=2.0):
    """One new connection: send a StartupMessage, read the first reply message.

    Returns "enabled" (an authentication request 'R' from the tenant's server), "disabled"
    (an ErrorResponse saying "not available") or "other:<detail>".
    """
    s = socket.create_connection((host, port), timeout=timeout)
    try:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(msg)
        head = recv_exact(s, 5)
        kind, length = head[:1], struct.unpack("!I", head[1:])[0]
        if kind == b"R":
            return "enabled"
        if kind == b"E":
            body = recv_exact(s, min(length - 4, 4096))
            if b"not available" in body:
                return "disabled"
            return "other:E " + body.replace(b"\0", b" ").decode(errors="replace")[:120]
        return f"other:{kind!r}"
    except (OSError, EOFError) as e:
        return f"other:{type(e).__name__}: {e}"
    finally:
        s.close()


def runtime_cmd(sock_path, line, timeout=5.0):
    """One Runtime API command on its own connection (non-interactive mode: HAProxy answers and
    closes). Returns the reply text."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(sock_path)
        s.sendall(line.encode() + b"\n")
        out = []
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            out.append(chunk)
        return b"".join(out).decode(errors="replace")
    finally:
        s.close()


def master_show_proc(master_sock):
    """`show proc` on the master CLI through socat, as an operator would: the 2.6 master CLI answers
    only after the client half-closes (socat -t 2 keeps reading after stdin's EOF)."""
    out = subprocess.run(["socat", "-t", "2", "-", f"UNIX-CONNECT:{master_sock}"],
                         input="show proc\n", capture_output=True, text=True, timeout=10).stdout
    master = None
    workers = []
    for line in out.splitlines():
        f = line.split()
        if len(f) >= 3 and f[0].isdigit():
            if f[1] == "master":
                master = {"pid": int(f[0]), "reloads": int(f[2]), "line": line.strip()}
            elif f[1] == "worker":
                workers.append({"pid": int(f[0]), "reloads": int(f[2])})
    if master is None:
        raise RuntimeError(f"unexpected `show proc` reply: {out!r}")
    return master, workers, out


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return None


def run_timed(argv, **kw):
    t0 = now()
    p = subprocess.run(argv, capture_output=True, text=True, **kw)
    return now() - t0, p


# ---------------------------------------------------------------- 1. access flips

class Waiter(threading.Thread):
    """Waits for a child process and records when it exited (perf_counter)."""

    def __init__(self, proc):
        super().__init__(daemon=True)
        self.proc = proc
        self.t_exit = None

    def run(self):
        self.proc.wait()
        self.t_exit = now()


def strace_flip(a, flip_argv, target):
    """What one flip does, from `strace -f` of one call (not timed): fsyncs, connections to the
    admin socket and the Runtime API lines sent. Describes the binary under test, not the docs."""
    if not shutil.which("strace"):
        return f"- (strace not installed: the syscalls of `access {target[:-1]}` are not shown)"
    out = os.path.join(os.path.dirname(os.path.abspath(a.cfg)), "flip.strace")
    subprocess.run(["strace", "-f", "-qq", "-s", "300", "-o", out,
                    "-e", "trace=fsync,fdatasync,sync_file_range,connect,sendto,write,rename"]
                   + flip_argv(target), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   check=True)
    fsyncs = connects = renames = 0
    sent = []
    admin_fds = set()
    with open(out) as f:
        for line in f:
            m = re.match(r"(\d+)\s+(\w+)\((\d+)?", line)
            if not m:
                continue
            call, fd = m.group(2), m.group(3)
            if call in ("fsync", "fdatasync", "sync_file_range"):
                fsyncs += 1
            elif call == "rename":
                renames += 1
            elif call == "connect" and a.admin in line:
                connects += 1
                admin_fds.add(fd)
            elif call in ("sendto", "write") and fd in admin_fds:
                payload = re.search(r'"((?:[^"\\]|\\.)*)"', line)
                if payload:
                    text = payload.group(1).encode().decode("unicode_escape")
                    sent += [c.replace(a.map, "MAP") for c in re.split(r"[\n;]", text)
                             if c.strip() and c.strip() != "prompt"]
    os.unlink(out)
    verb = "disable" if target == "disabled" else "enable"
    return (f"- `access {verb}` in this binary (strace -f of one call, untimed): {fsyncs} fsync(s), "
            f"{renames} rename(s), {connects} connection(s) to the admin socket sending "
            + "; ".join(f"`{c}`" for c in sent) + ".")


def cmd_flip(a):
    host, port = "127.0.0.1", a.port
    msg = startup_message(a.tenant)
    cli = [a.agent, "-c", a.cfg, "access"]
    states = ("disabled", "enabled")

    def flip_argv(target):
        return cli + (["disable", a.tenant] if target == "disabled" else ["enable", a.tenant])

    def run_cli(target):
        t0 = now()
        p = subprocess.Popen(flip_argv(target), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _, err = p.communicate()
        t1 = now()
        if p.returncode != 0:
            raise RuntimeError(f"access {target} failed: {err.decode(errors='replace')}")
        return t1 - t0

    # Start from a known state: enabled in the file and in HAProxy.
    run_cli("enabled")
    first = probe(host, port, msg)
    if first != "enabled":
        raise RuntimeError(f"tenant should answer with an auth request before the run, got {first}")

    # Warm-up (page cache, first connections), not counted.
    for i in range(20):
        run_cli(states[i % 2])
    run_cli("enabled")

    traces = [strace_flip(a, flip_argv, t) for t in states]

    gc.disable()

    # Baseline: starting the agent process and nothing else.
    log(f"baseline: {a.baseline} × `pgs-agent --version`")
    base = []
    for _ in range(a.baseline):
        t0 = now()
        subprocess.run([a.agent, "--version"], stdout=subprocess.DEVNULL)
        base.append(now() - t0)

    # Baseline 2: a flip that changes nothing (already enabled): no file is written (no fsync),
    # one `show map`, no map command.
    log(f"baseline: {a.baseline} × `access enable` while already enabled")
    noop = [run_cli("enabled") for _ in range(a.baseline)]

    # Baseline 3: what one atomic write with fsync costs on this disk (temp file, fsync, rename,
    # fsync of the directory), in the layout's directory, where the tenants file lives.
    log(f"baseline: {a.baseline} × one atomic write with fsync")
    d = os.path.dirname(os.path.abspath(a.cfg))
    writes = []
    payload = b'{"version": 1, "tenants": {"bench": {"access": "enabled"}}}\n' * 3
    tmp, dst = os.path.join(d, ".bench-fsync.tmp"), os.path.join(d, "bench-fsync.json")
    for _ in range(a.baseline):
        t0 = now()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(fd, payload)
        os.fsync(fd)
        os.close(fd)
        os.rename(tmp, dst)
        dfd = os.open(d, os.O_RDONLY)
        os.fsync(dfd)
        os.close(dfd)
        writes.append(now() - t0)
    os.unlink(dst)

    # Pass A: the CLI alone, then one probe after it returned (not timed) to check that the
    # new state is in effect by then.
    log(f"pass A: {a.flips} CLI flips, wall time only, one check probe after each")
    wall_a, stale_after = [], 0
    for i in range(a.flips):
        target = states[i % 2]
        wall_a.append(run_cli(target))
        if probe(host, port, msg) != target:
            stale_after += 1
        # Let the server process the probe started (when enabled) exit before the next flip, so
        # its teardown does not land on the next, timed command.
        time.sleep(0.005)

    # Pass B: the CLI while a client connects again and again; time until the first new
    # connection that sees the new state.
    log(f"pass B: {a.flips} CLI flips with probes running until the new state is seen")
    wall_b, obs_b, probes_b, probe_cost = [], [], [], []
    for i in range(a.flips):
        target = states[i % 2]
        t0 = now()
        p = subprocess.Popen(flip_argv(target), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        w = Waiter(p)
        w.start()
        n = 0
        while True:
            tp = now()
            r = probe(host, port, msg)
            te = now()
            n += 1
            probe_cost.append(te - tp)
            if r == target:
                obs_b.append(te - t0)
                break
            if r not in states:
                raise RuntimeError(f"probe during flip {i}: {r}")
            if te - t0 > 10:
                raise RuntimeError(f"flip {i}: new state not seen within 10 s")
        w.join(30)
        if p.returncode != 0:
            raise RuntimeError(f"flip {i}: access {target} exited {p.returncode}")
        wall_b.append(w.t_exit - t0)
        probes_b.append(n)

    # Pass C: the Runtime API alone, on the same HAProxy and the same map key: what the CLI
    # does at its core (`del map` = disable, `add map` = enable), then `set map` on an existing
    # entry. Each command on its own connection, like the agent.
    log(f"pass C: {a.rt} Runtime API flips (del map / add map) with probes, then {a.rt} × set map")
    # (Like pass A, it pauses 5 ms after each observation, untimed.)
    rt_flip, rt_obs, rt_set = [], [], []
    for i in range(a.rt):
        target = states[i % 2]
        line = (f"del map {a.map} {a.tenant}" if target == "disabled"
                else f"add map {a.map} {a.tenant} enabled")
        t0 = now()
        reply = runtime_cmd(a.admin, line)
        t1 = now()
        if reply.strip():
            raise RuntimeError(f"`{line}` answered {reply!r}")
        rt_flip.append(t1 - t0)
        while True:
            r = probe(host, port, msg)
            te = now()
            if r == target:
                rt_obs.append(te - t0)
                break
            if te - t0 > 10:
                raise RuntimeError(f"runtime flip {i}: new state not seen within 10 s")
        time.sleep(0.005)  # as in pass A: let the probe's server process go first
    # Now enabled again (even count) or disabled; make sure an entry exists for `set map`.
    if a.rt % 2:
        runtime_cmd(a.admin, f"add map {a.map} {a.tenant} enabled")
    for i in range(a.rt):
        line = f"set map {a.map} {a.tenant} enabled"
        t0 = now()
        reply = runtime_cmd(a.admin, line)
        rt_set.append(now() - t0)
        if reply.strip():
            raise RuntimeError(f"`{line}` answered {reply!r}")
    gc.enable()

    # Leave HAProxy agreeing with the file again.
    run_cli("enabled")

    sa, sb_obs, sb_wall = summary(wall_a), summary(obs_b), summary(wall_b)
    rt_s = summary(rt_flip)
    out = []
    out.append(DIST_HEAD)
    out.append(dist_row("process start only: `pgs-agent --version` (baseline)", base))
    out.append(dist_row("no-op flip: `access enable` when already enabled (no file written, `show map` only)", noop))
    out.append(dist_row("one atomic write with fsync of file + directory (Python, in the layout dir)", writes))
    out.append(dist_row("**(a) CLI flip, wall time** (`access disable` / `access enable`, pass A, no load)", wall_a))
    out.append(dist_row("&nbsp;&nbsp;of which `access disable`", wall_a[0::2]))
    out.append(dist_row("&nbsp;&nbsp;of which `access enable`", wall_a[1::2]))
    out.append(dist_row("(a) CLI flip, wall time, while the probe client hammers HAProxy (pass B)", wall_b))
    out.append(dist_row("**(b) CLI start → first new connection that sees the new state** (pass B)", obs_b))
    out.append(dist_row("&nbsp;&nbsp;of which disable (refusal seen: Lua's ErrorResponse)", obs_b[0::2]))
    out.append(dist_row("&nbsp;&nbsp;of which enable (PostgreSQL's auth request seen)", obs_b[1::2]))
    out.append(dist_row("one probe connection (StartupMessage → first reply), pass B", probe_cost))
    out.append(dist_row("**Runtime API round trip, `del map` / `add map`** (one connection each, pass C)", rt_flip))
    out.append(dist_row("Runtime API command start → first new connection that sees it (pass C)", rt_obs))
    out.append(dist_row("&nbsp;&nbsp;of which `del map` (disable)", rt_obs[0::2]))
    out.append(dist_row("&nbsp;&nbsp;of which `add map` (enable)", rt_obs[1::2]))
    out.append(dist_row("Runtime API round trip, `set map` on an existing entry (pass C)", rt_set))
    out.append("")
    out.append(f"- Flips alternate disable/enable; {a.flips} in pass A, {a.flips} in pass B, "
               f"{a.rt} Runtime API flips + {a.rt} `set map` in pass C, all in this one run against "
               f"the same HAProxy and tenant. Percentiles are nearest-rank.")
    out.append("- Passes A and C pause 5 ms (untimed) after each flip's probe, so the teardown of the "
               "server process an enabled probe started does not land on the next timed command; "
               "pass B does not pause.")
    out.append(f"- Pass A check: after the CLI returned, the next new connection saw the new state in "
               f"{a.flips - stale_after} of {a.flips} flips ({stale_after} saw the old state).")
    out.append(f"- Pass B needed {median(probes_b):.0f} probe connection(s) per flip (median; max "
               f"{max(probes_b)}). Time (b) is taken when the reply of the first probe that sees the "
               f"new state arrives, so it is an upper bound by up to one probe "
               f"({ms(median(probe_cost))} ms median).")
    ratio = sa["p50"] / rt_s["p50"] if rt_s["p50"] > 0 else float("nan")
    out.append(f"- The CLI flip (pass A p50 {ms(sa['p50'])} ms) costs about {ratio:.0f}× the bare "
               f"Runtime API command (p50 {ms(rt_s['p50'])} ms), same run. Its wall time includes "
               f"starting a process (baseline p50 {ms(median(base))} ms), reading pgs.toml, the "
               f"tenants-file lock and the atomic rewrite of tenants.json and of access.map, and its "
               f"Runtime API commands (below). The no-op flip (p50 {ms(median(noop))} ms) skips the "
               f"writes and the map change, so they account for about "
               f"{ms(sa['p50'] - median(noop))} ms at p50; one atomic write with fsync of the file "
               f"and its directory costs {ms(median(writes))} ms at p50 on this disk.")
    for line in traces:
        out.append(line)
    out.append(f"- Target p99 < 5 ms for the flip itself: CLI wall time p99 {ms(sa['p99'])} ms → "
               f"{verdict(sa['p99'] < 0.005)}; command start → observed p99 {ms(sb_obs['p99'])} ms → "
               f"{verdict(sb_obs['p99'] < 0.005)}; Runtime API round trip p99 {ms(rt_s['p99'])} ms → "
               f"{verdict(rt_s['p99'] < 0.005)}.")
    print("\n".join(out))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"baseline": base, "wall_a": wall_a, "wall_b": wall_b, "obs_b": obs_b,
                       "probe_cost": probe_cost, "rt_flip": rt_flip, "rt_obs": rt_obs,
                       "rt_set": rt_set, "noop": noop, "writes": writes, "stale_after": stale_after}, f)


# ---------------------------------------------------------------- 2. tenant create → first query

def docker_mem(names):
    """MemUsage of containers from one `docker stats --no-stream` call, in MiB."""
    p = subprocess.run(["docker", "stats", "--no-stream", "--format",
                        "{{.Name}}\t{{.MemUsage}}"] + names,
                       capture_output=True, text=True, timeout=60)
    if p.returncode != 0:
        raise RuntimeError(f"docker stats: {p.stderr}")
    units = {"B": 1 / 2**20, "KiB": 1 / 1024, "kB": 1000 / 2**20, "MiB": 1, "MB": 1e6 / 2**20,
             "GiB": 1024, "GB": 1e9 / 2**20}
    out = {}
    for line in p.stdout.splitlines():
        name, usage = line.split("\t")
        used = usage.split("/")[0].strip()
        m = re.match(r"([\d.]+)\s*([A-Za-z]+)", used)
        out[name] = float(m.group(1)) * units[m.group(2)]
    return out


def docker_time(stamp):
    """Docker's RFC 3339 timestamp with nanoseconds → Unix time (float)."""
    m = re.match(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?Z", stamp)
    if not m:
        raise ValueError(f"unexpected docker timestamp {stamp!r}")
    base = calendar.timegm(time.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S"))
    return base + float("0." + (m.group(2) or "0"))


def breakdown(container, t0, t_create):
    """Where one create's time went, from the engine's timestamps (seconds from t0 between
    steps), or None if a step is missing from the logs."""
    p = subprocess.run(["docker", "inspect", "-f", "{{.Created}} {{.State.StartedAt}}", container],
                       capture_output=True, text=True, timeout=30)
    if p.returncode != 0:
        return None
    created, started = (docker_time(x) for x in p.stdout.split())
    p = subprocess.run(["docker", "logs", "-t", container], capture_output=True, text=True,
                       timeout=30)
    marks = {}
    for line in (p.stdout + p.stderr).splitlines():
        stamp, _, text = line.partition(" ")
        for key, needle in (("init", "[entrypoint] initializing database cluster"),
                            ("init_done", "[entrypoint] init complete"),
                            ("ready", "database system is ready to accept connections")):
            if needle in text and key not in marks:
                marks[key] = docker_time(stamp)
    if len(marks) < 3:
        return None
    return {
        "command start → container created (volume, container create)": created - t0,
        "→ container started (docker start)": started - created,
        "→ entrypoint begins the first init": marks["init"] - started,
        "→ first init done (template copy, sync, single-user fix-up)": marks["init_done"] - marks["init"],
        "→ PostgreSQL ready to accept connections": marks["ready"] - marks["init_done"],
        "→ `tenant create` returns (its login check, HAProxy reload, access map)":
            t0 + t_create - marks["ready"],
    }


def cmd_create(a):
    agent = [a.agent, "-c", a.cfg]
    rows = []
    totals, creates, queries = [], [], []
    phases = {}
    mem1 = mem5 = None
    for i in range(1, a.count + 1):
        tid = f"t{i}"
        log(f"tenant create {tid} --enable")
        t0_wall = time.time()
        t0 = now()
        p = subprocess.run(agent + ["tenant", "create", tid, "--enable"],
                           capture_output=True, text=True, timeout=180)
        t_create = now() - t0
        if p.returncode != 0:
            raise RuntimeError(f"tenant create {tid} exited {p.returncode}: {p.stderr}{p.stdout}")
        p = subprocess.run(agent + ["tenant", "credentials", tid], capture_output=True, text=True,
                           timeout=30)
        if p.returncode != 0:
            raise RuntimeError(f"tenant credentials {tid}: {p.stderr}")
        # The password goes to psql through PGPASSWORD, not the command line.
        u = urllib.parse.urlsplit(p.stdout.strip())
        env = dict(os.environ, PGPASSWORD=urllib.parse.unquote(u.password or ""))
        netloc = f"{u.username}@{u.hostname}:{u.port}" if u.port else f"{u.username}@{u.hostname}"
        uri = urllib.parse.urlunsplit((u.scheme, netloc, u.path, u.query, u.fragment))
        attempts = 0
        while True:
            attempts += 1
            q = subprocess.run(["psql", uri, "-XAtqc", "select current_user"],
                               capture_output=True, text=True, timeout=30, env=env)
            if q.returncode == 0 and q.stdout.strip() == tid:
                break
            if now() - t0 > 60:
                raise RuntimeError(f"{tid}: no answer through HAProxy after 60 s: {q.stderr}")
            time.sleep(0.05)
        t_total = now() - t0
        totals.append(t_total)
        creates.append(t_create)
        queries.append(t_total - t_create)
        b = breakdown(f"{a.prefix}-{tid}", t0_wall, t_create)
        if b:
            for k, v in b.items():
                phases.setdefault(k, []).append(v)
            log(f"{tid}: " + ", ".join(f"{k} {v:.3f}" for k, v in b.items()))
        rows.append(f"| {tid} | {t_create:.3f} | {t_total - t_create:.3f} | {attempts} | {t_total:.3f} |")
        log(f"{tid}: create {t_create:.3f} s, first query after {t_total:.3f} s ({attempts} attempt(s))")
        if i == 1:
            log(f"waiting {a.idle} s, then docker stats for 1 idle tenant")
            time.sleep(a.idle)
            mem1 = docker_mem([f"{a.prefix}-t1"])
    log(f"waiting {a.idle} s, then docker stats for {a.count} idle tenants")
    time.sleep(a.idle)
    names = [f"{a.prefix}-t{i}" for i in range(1, a.count + 1)]
    mem5 = docker_mem(names)

    st, sc, sq = summary(totals), summary(creates), summary(queries)
    out = ["| tenant | `tenant create --enable` s | then psql answers after s | psql attempts | total s |",
           "|---|---:|---:|---:|---:|"]
    out += rows
    out.append("")
    out.append("| measurement | n | median s | min s | max s |")
    out.append("|---|---:|---:|---:|---:|")
    for name, s in (("**create → first query answered through HAProxy**", st),
                    ("`tenant create ID --enable` (wall)", sc),
                    ("`tenant credentials` + psql until it answers", sq)):
        out.append(f"| {name} | {s['n']} | {s['p50']:.3f} | {s['min']:.3f} | {s['max']:.3f} |")
    for name, xs in phases.items():
        s = summary(xs)
        out.append(f"| — {name} | {s['n']} | {s['p50']:.3f} | {s['min']:.3f} | {s['max']:.3f} |")
    out.append("")
    if phases:
        out.append("The rows marked — split the create → first query time, from the engine's own "
                   "timestamps (`docker inspect` Created/StartedAt, `docker logs -t` of the entrypoint "
                   "and of PostgreSQL), on the same clock as the command's start.")
        out.append("")
    m1 = list(mem1.values())[0]
    out.append(f"Idle memory (`docker stats --no-stream`, MemUsage, {a.idle} s after the last query):")
    out.append("")
    out.append(f"- 1 tenant running: {a.prefix}-t1 uses {m1:.1f} MiB.")
    vals = [mem5[n] for n in names if n in mem5]
    out.append(f"- {len(vals)} tenants running: {sum(vals):.1f} MiB in total; per container median "
               f"{median(vals):.1f} MiB, min {min(vals):.1f}, max {max(vals):.1f} "
               f"({', '.join(f'{v:.1f}' for v in vals)}).")
    out.append("")
    out.append(f"- Target create → first query ≤ 0.5 s with the image present: median {st['p50']:.2f} s "
               f"→ {verdict(st['p50'] <= 0.5)} (judged on the median); max {st['max']:.2f} s.")
    out.append("- Each iteration is one `tenant create tN --enable` (volume, container, wait until "
               "PostgreSQL accepts a login, backend + HAProxy reload, access map) followed by "
               "`tenant credentials tN` and `psql URI -c 'select current_user'` through HAProxy, "
               "retried every 50 ms until it answers (the attempts column shows whether it "
               "answered at once).")
    print("\n".join(out))


def edit_tenants(path, add=(), remove=()):
    with open(path) as f:
        doc = json.load(f)
    for tid in remove:
        doc["tenants"].pop(tid, None)
    for tid in add:
        doc["tenants"][tid] = {"access": "enabled", "managed": {}}
    tmp = path + ".bench.tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)


def set_setting(cfg, key, value):
    with open(cfg) as f:
        text = f.read()
    new, n = re.subn(rf"(?m)^{key} = .*$", f"{key} = {value}", text)
    if n != 1:
        raise RuntimeError(f"{cfg}: expected one `{key} = ...` line, found {n}")
    with open(cfg, "w") as f:
        f.write(new)


def volume_kib(name):
    p = subprocess.run(["docker", "volume", "inspect", "-f", "{{.Mountpoint}}", name],
                       capture_output=True, text=True, timeout=30)
    if p.returncode != 0:
        raise RuntimeError(f"docker volume inspect {name}: {p.stderr}")
    p = subprocess.run(["du", "-sk", p.stdout.strip()], capture_output=True, text=True, timeout=60)
    if p.returncode != 0:
        raise RuntimeError(f"du: {p.stderr}")
    return int(p.stdout.split()[0])


def cmd_batch(a):
    """N new managed tenants in one `sync`, once per start_concurrency value."""
    agent = [a.agent, "-c", a.cfg]
    tenants_file = os.path.join(os.path.dirname(a.cfg), "tenants.json")
    rows, disk = [], []
    for conc in a.concurrency:
        ids = [f"c{conc}x{i:03d}" for i in range(1, a.count + 1)]
        set_setting(a.cfg, "start_concurrency", conc)
        edit_tenants(tenants_file, add=ids)
        log(f"sync: {a.count} new tenants, start_concurrency = {conc}")
        t0 = now()
        p = subprocess.run(agent + ["sync"], capture_output=True, text=True, timeout=3600)
        took = now() - t0
        if p.returncode not in (0, 2):  # 2: changes were made
            raise RuntimeError(f"sync exited {p.returncode}: {p.stderr[-2000:]}{p.stdout[-2000:]}")
        log(f"start_concurrency {conc}: {a.count} tenants in {took:.1f} s")
        rows.append((conc, took))
        if not disk:
            disk = [volume_kib(f"{a.prefix}-{tid}-data") for tid in ids]
        # Make room for the next batch: the removal pass is not timed.
        edit_tenants(tenants_file, remove=ids)
        p = subprocess.run(agent + ["sync"], capture_output=True, text=True, timeout=3600)
        if p.returncode not in (0, 2):
            raise RuntimeError(f"removal sync exited {p.returncode}: {p.stderr[-2000:]}")
    set_setting(a.cfg, "start_concurrency", 4)
    out = [f"| `start_concurrency` | tenants created in one `sync` | `sync` wall s | per tenant s | tenants/s | 1,000 tenants at this rate |",
           "|---:|---:|---:|---:|---:|---:|"]
    for conc, took in rows:
        out.append(f"| {conc} | {a.count} | {took:.1f} | {took / a.count:.3f} | {a.count / took:.1f} | "
                   f"{1000 * took / a.count / 60:.1f} min |")
    out.append("")
    d = summary([x / 1024 for x in disk])
    out.append(f"Disk per new tenant (`du -sk` of its data volume right after the batch, n = {d['n']}): "
               f"median {d['p50']:.1f} MiB, min {d['min']:.1f}, max {d['max']:.1f}.")
    out.append("")
    out.append("- Each batch adds its tenants to the tenants file and runs one `pgs-agent sync`, which "
               "creates the volumes and containers, waits until each server accepts a login, and "
               "reloads HAProxy once; the tenants are then removed (untimed) before the next batch.")
    print("\n".join(out))


def cmd_firstinit(a):
    """`docker run` → first login through the socket, template copy vs initdb, interleaved."""
    import tempfile
    times = {"template": [], "initdb": []}
    label = f"io.pgs.installation={a.prefix}"
    with tempfile.TemporaryDirectory(prefix="pgsbench-firstinit.") as d:
        pw = os.path.join(d, "pw")
        with open(pw, "w") as f:
            f.write("bench-secret\n")
        os.chmod(pw, 0o644)
        for i in range(1, a.runs + 1):
            for mode in ("template", "initdb"):
                name = f"{a.prefix}-firstinit-{mode}-{i}"
                sock = os.path.join(d, name)
                os.mkdir(sock)
                os.chmod(sock, 0o777)
                subprocess.run(["docker", "volume", "create", "--label", label, name],
                               check=True, capture_output=True, timeout=60)
                env = ["-e", "PGS_INIT_TEMPLATE=0"] if mode == "initdb" else []
                t0 = now()
                subprocess.run(["docker", "run", "-d", "--name", name, "--label", label,
                                "--network", "none", "--memory", "256m",
                                "-e", "POSTGRES_USER=bench", "-e", "POSTGRES_PASSWORD_FILE=/pw",
                                "-v", f"{pw}:/pw:ro", "-v", f"{name}:/var/lib/postgresql/data",
                                "-v", f"{sock}:/var/run/postgresql"] + env + [a.image],
                               check=True, capture_output=True, timeout=60)
                penv = dict(os.environ, PGPASSWORD="bench-secret")
                while True:
                    q = subprocess.run(["psql", f"host={sock} user=bench dbname=bench",
                                        "-XAtqc", "select 1"], capture_output=True, text=True,
                                       env=penv, timeout=30)
                    if q.returncode == 0:
                        break
                    if now() - t0 > 60:
                        raise RuntimeError(f"{name}: no login after 60 s: {q.stderr}")
                    time.sleep(0.02)
                took = now() - t0
                times[mode].append(took)
                log(f"{mode} #{i}: docker run → first login {took:.3f} s")
                subprocess.run(["docker", "rm", "-f", name], capture_output=True, timeout=60)
                subprocess.run(["docker", "volume", "rm", "-f", name], capture_output=True, timeout=60)
    out = ["| first init | n | median s | min s | max s |", "|---|---:|---:|---:|---:|"]
    for mode, label_ in (("template", "copy of the image's template (default)"),
                         ("initdb", "initdb + temporary server (`PGS_INIT_TEMPLATE=0`)")):
        st = summary(times[mode])
        out.append(f"| {label_} | {st['n']} | {st['p50']:.3f} | {st['min']:.3f} | {st['max']:.3f} |")
    out.append("")
    out.append("- `docker run -d` of the image (no network, 256m, a new volume) until psql logs in "
               "through the socket directory, retried every 20 ms; the two ways alternate, so both "
               "see the same load. No HAProxy, no agent.")
    print("\n".join(out))


# ---------------------------------------------------------------- 3. sync at scale

def write_tenants(path, n, sock_root):
    tenants = {}
    for i in range(1, n + 1):
        tid = f"t{i:04d}"
        tenants[tid] = {"access": "enabled",
                        "external": {"address": f"{sock_root}/{tid}/.s.PGSQL.5432"}}
    tmp = path + ".bench.tmp"
    with open(tmp, "w") as f:
        json.dump({"version": 1, "tenants": tenants}, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)


def timed_sync(a, label):
    """`/usr/bin/time -v pgs-agent sync`: wall time (perf_counter), exit code, max RSS."""
    tv = os.path.join(a.dir, "time-v.txt")
    t0 = now()
    p = subprocess.Popen(["/usr/bin/time", "-v", "-o", tv, a.agent, "-c", a.cfg, "sync"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    w = Waiter(p)
    w.start()
    # `time -v` reports the largest RSS among the agent and the children it waited for (such as
    # `haproxy -c`), so also sample the agent's own peak (VmHWM) until it exits.
    hwm, agent_pid = None, None
    while w.t_exit is None and now() - t0 < 120:
        try:
            if agent_pid is None:
                with open(f"/proc/{p.pid}/task/{p.pid}/children") as f:
                    kids = f.read().split()
                agent_pid = int(kids[0]) if kids else None
            if agent_pid is not None:
                with open(f"/proc/{agent_pid}/status") as f:
                    for line in f:
                        if line.startswith("VmHWM:"):
                            hwm = max(hwm or 0, int(line.split()[1]))
        except (OSError, ValueError, IndexError):
            pass
        time.sleep(0.002)
    w.join(120)
    dt = w.t_exit - t0
    out, err = p.communicate()
    with open(tv) as f:
        m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", f.read())
    rss = int(m.group(1)) if m else None
    log(f"{label}: {dt:.3f} s, exit {p.returncode}, time -v max RSS {rss} KiB, agent VmHWM {hwm} KiB")
    if p.returncode not in (0, 2):
        raise RuntimeError(f"sync failed (exit {p.returncode}): {err}{out}")
    return dt, p.returncode, rss, out, hwm


def map_size(a, name):
    reply = runtime_cmd(a.admin, f"show map {a.dir}/haproxy/maps/{name}")
    return sum(1 for line in reply.splitlines() if line.strip())


def cmd_sync_baseline(a):
    """RSS of an HAProxy worker with the layout as it is (used for the 0-tenant baseline)."""
    _, workers, _ = master_show_proc(a.master)
    print(rss_kib(workers[-1]["pid"]))


def cmd_sync(a):
    tfile = os.path.join(a.dir, "tenants.json")
    sock_root = os.path.join(a.dir, "nowhere")
    agent = [a.agent, "-c", a.cfg]
    res = {}

    # The tenants file already holds a.tenants tenants and HAProxy was started on the rendered
    # config (see bench-sync.sh). A first sync may still have something to do.
    master, workers, _ = master_show_proc(a.master)
    r_start = master["reloads"]
    worker_pid = workers[-1]["pid"]
    res["rss_worker"] = rss_kib(worker_pid)
    res["rss_master"] = rss_kib(master["pid"])
    first = timed_sync(a, "first sync after HAProxy start")

    master, _, _ = master_show_proc(a.master)
    r0 = master["reloads"]
    unchanged = []
    for i in range(a.runs):
        unchanged.append(timed_sync(a, f"unchanged sync {i + 1}/{a.runs}"))
    master, workers, _ = master_show_proc(a.master)
    r1 = master["reloads"]

    # A batch: a.add new tenants in one edit of the tenants file, one sync.
    write_tenants(tfile, a.tenants + a.add, sock_root)
    batch = timed_sync(a, f"sync after adding {a.add} tenants in one edit")
    master, workers, _ = master_show_proc(a.master)
    r2 = master["reloads"]
    # Old workers may linger briefly after a reload; the current one is the newest.
    new_worker = max(workers, key=lambda w: w["pid"]) if workers else None
    n_backends = map_size(a, "backends.map")
    n_access = map_size(a, "access.map")
    time.sleep(1)
    rss_after = rss_kib(new_worker["pid"]) if new_worker else None
    after = timed_sync(a, "unchanged sync after the batch")
    master, _, _ = master_show_proc(a.master)
    r3 = master["reloads"]

    u_times = [u[0] for u in unchanged]
    su = summary(u_times)
    out = []
    def kib(x):
        return f"{x / 1024:.1f}" if x else "n/a"

    out.append("| step | n | median s | min s | max s | exit code(s) | `time -v` max RSS MiB | agent's own VmHWM MiB | HAProxy reloads |")
    out.append("|---|---:|---:|---:|---:|---|---:|---:|---:|")
    out.append(f"| first `sync` after HAProxy started on the rendered config ({a.tenants} tenants) "
               f"| 1 | {first[0]:.3f} | | | {first[1]} | {kib(first[2])} | {kib(first[4])} | {r0 - r_start} |")
    out.append(f"| **`sync`, nothing changed** ({a.tenants} tenants) | {su['n']} | {su['p50']:.3f} "
               f"| {su['min']:.3f} | {su['max']:.3f} | {','.join(str(u[1]) for u in unchanged)} "
               f"| {kib(max(u[2] for u in unchanged))} | {kib(max(u[4] or 0 for u in unchanged))} | {r1 - r0} |")
    out.append(f"| **`sync` after adding {a.add} tenants in one edit** | 1 | {batch[0]:.3f} | | "
               f"| {batch[1]} | {kib(batch[2])} | {kib(batch[4])} | {r2 - r1} |")
    out.append(f"| `sync`, nothing changed ({a.tenants + a.add} tenants) | 1 | {after[0]:.3f} | | "
               f"| {after[1]} | {kib(after[2])} | {kib(after[4])} | {r3 - r2} |")
    out.append("")
    out.append(f"- HAProxy memory (VmRSS from /proc): worker {res['rss_worker'] / 1024:.1f} MiB with "
               f"{a.tenants} backends loaded (0-tenant baseline: {a.baseline_rss / 1024:.1f} MiB, "
               f"same binary and settings); master {res['rss_master'] / 1024:.1f} MiB; "
               f"new worker {rss_after / 1024 if rss_after else float('nan'):.1f} MiB with "
               f"{a.tenants + a.add} backends, 1 s after the reload.")
    out.append(f"- After the batch the running HAProxy holds {n_backends} entries in backends.map and "
               f"{n_access} in access.map (expected {a.tenants + a.add} each).")
    out.append("- Reloads are the master's `reloads` counter from `show proc` on the master CLI "
               "(`echo 'show proc' | socat -t 2 - UNIX-CONNECT:run/master.sock`) before and after "
               "each step. Times are wall time of `/usr/bin/time -v pgs-agent -c CFG sync`. "
               "`time -v`'s max RSS is the largest of the agent and the children it waited for "
               "(the batch sync runs `haproxy -c` on the new config, which is larger than the "
               "agent); the agent's own peak is its VmHWM, sampled from /proc every 2 ms until it "
               "exits (a lower bound).")
    ok_time = su["p50"] <= 1.0
    out.append(f"- Targets: unchanged sync of {a.tenants} tenants ≤ 1 s (median {su['p50']:.3f} s, "
               f"max {su['max']:.3f} s) → {verdict(ok_time)}; 0 reloads when unchanged ({r1 - r0}) "
               f"→ {verdict(r1 - r0 == 0)}; one reload for the {a.add}-tenant batch ({r2 - r1}) "
               f"→ {verdict(r2 - r1 == 1)}.")
    print("\n".join(out))


# ---------------------------------------------------------------- main

def on_term(signum, _frame):
    # SystemExit unwinds through subprocess.run, which kills and reaps the running child (an
    # agent command, psql), so nothing keeps creating objects while the shell cleans up.
    sys.exit(128 + signum)


def main():
    signal.signal(signal.SIGTERM, on_term)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("freeport")

    f = sub.add_parser("flip")
    f.add_argument("--agent", required=True)
    f.add_argument("--cfg", required=True)
    f.add_argument("--tenant", required=True)
    f.add_argument("--port", type=int, required=True)
    f.add_argument("--admin", required=True)
    f.add_argument("--map", required=True)
    f.add_argument("--flips", type=int, default=1000)
    f.add_argument("--rt", type=int, default=1000)
    f.add_argument("--baseline", type=int, default=200)
    f.add_argument("--json")

    c = sub.add_parser("create")
    c.add_argument("--agent", required=True)
    c.add_argument("--cfg", required=True)
    c.add_argument("--prefix", required=True)
    c.add_argument("--count", type=int, default=5)
    c.add_argument("--idle", type=float, default=10)

    bt = sub.add_parser("batch")
    bt.add_argument("--agent", required=True)
    bt.add_argument("--cfg", required=True)
    bt.add_argument("--prefix", required=True)
    bt.add_argument("--count", type=int, default=50)
    bt.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])

    fi = sub.add_parser("firstinit")
    fi.add_argument("--image", required=True)
    fi.add_argument("--prefix", required=True)
    fi.add_argument("--runs", type=int, default=5)

    s = sub.add_parser("sync")
    s.add_argument("--agent", required=True)
    s.add_argument("--cfg", required=True)
    s.add_argument("--dir", required=True)
    s.add_argument("--master", required=True)
    s.add_argument("--admin", required=True)
    s.add_argument("--tenants", type=int, default=1000)
    s.add_argument("--add", type=int, default=100)
    s.add_argument("--runs", type=int, default=5)
    s.add_argument("--baseline-rss", type=int, default=0)

    b = sub.add_parser("worker-rss")
    b.add_argument("--master", required=True)

    w = sub.add_parser("write-tenants")
    w.add_argument("--file", required=True)
    w.add_argument("--count", type=int, required=True)
    w.add_argument("--sock-root", required=True)

    a = ap.parse_args()
    if a.cmd == "freeport":
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            print(s.getsockname()[1])
    elif a.cmd == "flip":
        cmd_flip(a)
    elif a.cmd == "create":
        cmd_create(a)
    elif a.cmd == "batch":
        cmd_batch(a)
    elif a.cmd == "firstinit":
        cmd_firstinit(a)
    elif a.cmd == "sync":
        cmd_sync(a)
    elif a.cmd == "worker-rss":
        cmd_sync_baseline(a)
    elif a.cmd == "write-tenants":
        write_tenants(a.file, a.count, a.sock_root)


if __name__ == "__main__":
    try:
        main()
    except Exception as e:  # noqa: BLE001 - report and fail the benchmark
        log(f"ERROR: {e}")
        sys.exit(1)
