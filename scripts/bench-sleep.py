#!/usr/bin/env python3
"""Measurement side of scripts/bench-wake.sh and scripts/bench-density.sh (sleep and wake).

Runs with the test venv's Python (psycopg[binary], libpq inside): every timed client is one
psycopg connection through HAProxy (TCP connect, startup, SCRAM, `select 1`), sslmode=disable.
The shell scripts set up and tear down (layout, HAProxy, agent, Docker); this tool runs the timed
loops and prints the Markdown body of a section on stdout. Progress goes to stderr.

  bench-sleep.py wake    --agent A --cfg CFG --dir DIR --prefix PFX --port P --tenants N
                         --rotate N --wakes N --deep-wakes N --pause S --agent-log FILE
  bench-sleep.py density --agent A --cfg CFG --dir DIR --prefix PFX --port P --count N
                         --batch N --active N --rotations N --period S --agent-log FILE
"""

import argparse
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time

from bench_stats import median, pct, summary, verdict  # noqa: F401 (shared)
import urllib.parse

import psycopg

now = time.perf_counter


def log(msg):
    print(f"[bench-sleep +{time.time() - T0:.0f}s] {msg}", file=sys.stderr, flush=True)


T0 = time.time()
AG = None  # the agent this tool runs
FAILED = []  # clients of sleeping tenants that were not answered


# ---------------------------------------------------------------- statistics


def row(name, xs_ms):
    s = summary(xs_ms)
    return (f"| {name} | {s['n']} | {s['p50']:.1f} | {s['p90']:.1f} | {s['p99']:.1f} "
            f"| {s['min']:.1f} | {s['max']:.1f} |")


HEAD = ("| measurement | n | p50 ms | p90 ms | p99 ms | min ms | max ms |\n"
        "|---|---:|---:|---:|---:|---:|---:|")


# ---------------------------------------------------------------- the layout

class Layout:
    def __init__(self, a):
        self.a = a
        self.agent = [a.agent, "-c", a.cfg]
        self.tfile = os.path.join(a.dir, "tenants.json")
        self.wake_sock = os.path.join(a.dir, "run", "wake.sock")
        self.creds = {}

    def write_tenants(self, tenants):
        tmp = self.tfile + ".bench.tmp"
        with open(tmp, "w") as f:
            json.dump({"version": 1, "tenants": tenants}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, self.tfile)

    def sync(self, timeout=3600):
        t0 = now()
        p = subprocess.run(self.agent + ["sync"], capture_output=True, text=True, timeout=timeout)
        dt = now() - t0
        if p.returncode not in (0, 2):
            raise RuntimeError(f"sync exited {p.returncode}: {p.stderr[-2000:]}{p.stdout[-2000:]}")
        return dt, p.returncode

    def password(self, tid):
        if tid not in self.creds:
            p = subprocess.run(self.agent + ["tenant", "credentials", tid], capture_output=True,
                               text=True, timeout=60)
            if p.returncode != 0:
                raise RuntimeError(f"tenant credentials {tid}: {p.stderr}")
            u = urllib.parse.urlsplit(p.stdout.strip())
            self.creds[tid] = urllib.parse.unquote(u.password or "")
        return self.creds[tid]

    def query(self, tid, timeout=30):
        """One client: TCP connect → startup → SCRAM → `select 1` answered. Returns seconds."""
        pw = self.password(tid)
        t0 = now()
        with psycopg.connect(host="127.0.0.1", port=self.a.port, user=tid, dbname=tid,
                             password=pw, sslmode="disable", connect_timeout=timeout) as c:
            v = c.execute("select 1").fetchone()[0]
            dt = now() - t0
        if v != 1:
            raise RuntimeError(f"{tid}: select 1 answered {v!r}")
        return dt

    def local(self, verb, tid, timeout=60):
        """POST /<verb>/<tid> on the agent's wake socket: (status, body)."""
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        try:
            s.connect(self.wake_sock)
            s.sendall(f"POST /{verb}/{tid} HTTP/1.1\r\nHost: pgs\r\nContent-Length: 0\r\n"
                      f"Connection: close\r\n\r\n".encode())
            buf = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
        finally:
            s.close()
        head, _, body = buf.decode(errors="replace").partition("\r\n\r\n")
        status = int(head.split(" ", 2)[1])
        return status, body.strip()

    def sleep(self, tid, limit=30):
        """Puts tid to sleep (light), retrying while its last session is still counted."""
        t0 = now()
        while True:
            st, body = self.local("sleep", tid)
            if st == 200:
                return body
            if st != 409 or now() - t0 > limit:
                raise RuntimeError(f"sleep {tid}: {st} {body}")
            time.sleep(0.05)

    def running(self, tid):
        p = subprocess.run(["docker", "inspect", "-f", "{{.State.Running}}",
                            f"{self.a.prefix}-{tid}"], capture_output=True, text=True, timeout=60)
        return p.stdout.strip() == "true"

    def wait_stopped(self, tids, limit=300):
        t0 = now()
        left = set(tids)
        while left:
            if now() - t0 > limit:
                raise RuntimeError(f"containers still running after {limit} s: {sorted(left)[:5]}")
            p = subprocess.run(["docker", "ps", "--filter",
                                f"label=io.pgs.installation={self.a.prefix}",
                                "--format", "{{.Names}}"], capture_output=True, text=True,
                               timeout=60)
            up = {n[len(self.a.prefix) + 1:] for n in p.stdout.split()}
            left = {t for t in left if t in up}
            if left:
                time.sleep(0.2)
        return now() - t0


class Agent:
    """`pgs-agent run`, owned by this tool: started, restarted and stopped here (its pid also in
    DIR/agent.pid, so the shell's trap can stop it should this tool die)."""

    def __init__(self, a):
        self.a = a
        self.p = None

    def start(self):
        logf = open(self.a.agent_log, "a")
        self.p = subprocess.Popen([self.a.agent, "-c", self.a.cfg, "run"], stdout=logf,
                                  stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        logf.close()
        with open(os.path.join(self.a.dir, "agent.pid"), "w") as f:
            f.write(f"{self.p.pid}\n")
        wake = os.path.join(self.a.dir, "run", "wake.sock")
        t0 = now()
        while now() - t0 < 60:
            if self.p.poll() is not None:
                raise RuntimeError(f"pgs-agent run exited {self.p.returncode} (see its log)")
            try:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(wake)
                s.close()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("pgs-agent run: no wake socket after 60 s")

    def stop(self):
        if self.p is None:
            return
        p, self.p = self.p, None
        p.terminate()
        try:
            os.remove(os.path.join(self.a.dir, "agent.pid"))
        except OSError:
            pass
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()

    def restart_with(self, key, value):
        """Sets `[sleep] key = value` in pgs.toml and restarts the agent."""
        self.stop()
        set_sleep(self.a.cfg, [key, value])
        self.start()


class AgentLog:
    """The `woke` lines the agent logged since the last call."""

    def __init__(self, path):
        self.path = path
        self.pos = 0

    def failed_wakes(self):
        """Reasons of every `wake failed` line in the whole log: {reason: count}."""
        out = {}
        with open(self.path, errors="replace") as f:
            for ln in f:
                if "wake failed" in ln:
                    m = re.search(r'reason="?(\w+)', ln)
                    k = m.group(1) if m else "?"
                    out[k] = out.get(k, 0) + 1
        return out

    def skip(self):
        self.pos = os.path.getsize(self.path)

    def woke(self, wait_for=None, limit=5.0):
        t0 = now()
        while True:
            with open(self.path, errors="replace") as f:
                f.seek(self.pos)
                text = f.read()
            lines = [ln for ln in text.splitlines() if " woke" in ln and "total_ms=" in ln]
            if wait_for is None or len(lines) >= wait_for or now() - t0 > limit:
                self.pos += len(text.encode())
                out = []
                for ln in lines:
                    kv = dict(re.findall(r"(\w+)=(\S+)", ln))
                    out.append(kv)
                return out
            time.sleep(0.02)


# ---------------------------------------------------------------- memory

def meminfo():
    d = {}
    with open("/proc/meminfo") as f:
        for line in f:
            k, v = line.split(":")
            d[k] = int(v.split()[0])
    return d


def used_mib():
    """Host memory in use: MemTotal - MemAvailable, MiB."""
    m = meminfo()
    return (m["MemTotal"] - m["MemAvailable"]) / 1024


def container_ids(prefix, all_=True):
    args = ["docker", "ps", "--no-trunc", "--filter", f"label=io.pgs.installation={prefix}",
            "--format", "{{.ID}} {{.Names}}"]
    if all_:
        args.insert(2, "-a")
    p = subprocess.run(args, capture_output=True, text=True, timeout=120)
    return dict(line.split()[::-1] for line in p.stdout.splitlines() if line.strip())


def cgroup_mem_mib(cid):
    """A container's memory as `docker stats` counts it: usage minus inactive file cache.
    cgroup v1 (/sys/fs/cgroup/memory/docker/ID) or v2 (/sys/fs/cgroup/.../docker-ID.scope)."""
    for base in (f"/sys/fs/cgroup/memory/docker/{cid}",
                 f"/sys/fs/cgroup/system.slice/docker-{cid}.scope",
                 f"/sys/fs/cgroup/docker/{cid}"):
        if os.path.isdir(base):
            break
    else:
        return None
    stat = {}
    try:
        with open(os.path.join(base, "memory.stat")) as f:
            for line in f:
                k, v = line.split()
                stat[k] = int(v)
        usage_file = "memory.usage_in_bytes" if os.path.exists(
            os.path.join(base, "memory.usage_in_bytes")) else "memory.current"
        with open(os.path.join(base, usage_file)) as f:
            usage = int(f.read())
    except OSError:
        return None
    inactive = stat.get("total_inactive_file", stat.get("inactive_file", 0))
    return (usage - inactive) / 2**20


def cgroup_parts_mib(cid):
    """A container's cgroup memory by kind, MiB: rss (processes' anonymous memory), shmem
    (PostgreSQL's shared memory), kernel (usage − page cache − rss: slab, page tables, ... on
    cgroup v1; v2's kernel + sock), cache (file pages, reclaimable unless shmem)."""
    for base in (f"/sys/fs/cgroup/memory/docker/{cid}",
                 f"/sys/fs/cgroup/system.slice/docker-{cid}.scope",
                 f"/sys/fs/cgroup/docker/{cid}"):
        try:
            with open(f"{base}/memory.stat") as f:
                st = dict((ln.split()[0], int(ln.split()[1])) for ln in f)
            usage_file = ("memory.usage_in_bytes" if os.path.exists(f"{base}/memory.usage_in_bytes")
                          else "memory.current")
            with open(f"{base}/{usage_file}") as f:
                usage = int(f.read())
        except OSError:
            continue
        if "total_rss" in st:  # v1
            rss, shmem, cache = st["total_rss"], st.get("total_shmem", 0), st["total_cache"]
            kernel = usage - cache - rss
        else:  # v2
            rss, shmem, cache = st.get("anon", 0), st.get("shmem", 0), st.get("file", 0)
            kernel = st.get("kernel", st.get("slab", 0)) + st.get("sock", 0)
        return {k: v / 2**20 for k, v in
                (("rss", rss), ("shmem", shmem), ("kernel", max(kernel, 0)), ("cache", cache))}
    return None


def pids_of(pattern):
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if re.search(pattern, cmd):
            out.append((int(pid), cmd))
    return out


def pss_mib(pid):
    """Proportional set size (shared pages split among their users), MiB."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def rss_mib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def shim_rss_mib(cids):
    """RSS of the containerd-shim of each container id (one shim per container)."""
    want = set(cids)
    total, pss, n = 0.0, 0.0, 0
    for pid, cmd in pids_of(r"containerd-shim"):
        m = re.search(r"-id ([0-9a-f]{64})", cmd)
        if m and m.group(1) in want:
            total += rss_mib(pid)
            pss += pss_mib(pid)
            n += 1
    return total, n, pss


def mem_snapshot(prefix, tids, settle=0):
    if settle:
        time.sleep(settle)
    ids = container_ids(prefix)
    cids = [ids[f"{prefix}-{t}"] for t in tids if f"{prefix}-{t}" in ids]
    cg = [cgroup_mem_mib(c) for c in cids]
    cg = [x for x in cg if x is not None]
    parts = [x for x in (cgroup_parts_mib(c) for c in cids) if x is not None]
    shim, nshim, pss = shim_rss_mib(cids)
    return {"used": used_mib(), "cg": cg, "parts": parts, "shim": shim, "pss": pss,
            "nshim": nshim, "n": len(tids)}


# ---------------------------------------------------------------- 9. wake on connect

def managed(idle=None):
    t = {"access": "enabled", "managed": {}, "backups": {"enabled": False}}
    if idle:
        t["idle_timeout"] = idle
    return t


def wake_loop(a, L, alog, tids, n, deep, label):
    rows = []  # (tenant, total, awake_after, agent dict)
    for i in range(n):
        tid = tids[i % len(tids)]
        L.sleep(tid)
        if deep:
            L.wait_stopped([tid], limit=60)
        else:
            if not L.running(tid):
                raise RuntimeError(f"{tid}: container not running in light sleep")
        time.sleep(a.pause)
        alog.skip()
        try:
            total = L.query(tid)
        except psycopg.Error as e:
            # A result, not a reason to stop: counted and shown with the table.
            msg = " ".join(str(e).split())
            FAILED.append(f"{label} wake {i + 1} of {tid} at {time.strftime('%H:%M:%S')} UTC: {msg}")
            log(FAILED[-1])
            alog.woke(wait_for=1)
            continue
        woke = alog.woke(wait_for=1)
        awake = L.query(tid)
        if len(woke) != 1:
            raise RuntimeError(f"{tid}: expected one `woke` line from the agent, got {woke}")
        w = woke[0]
        rows.append((tid, total, awake, w))
        if (i + 1) % 20 == 0 or i + 1 == n:
            log(f"{label}: {i + 1}/{n} wakes; last {tid}: client {total * 1000:.0f} ms, "
                f"agent {w.get('total_ms')} ms, awake {awake * 1000:.1f} ms")
    return rows


def wake_table(rows, title):
    tot = [r[1] * 1000 for r in rows]
    awake = [r[2] * 1000 for r in rows]
    q = [float(r[3]["queued_ms"]) for r in rows]
    st = [float(r[3]["start_ms"]) for r in rows]
    rd = [float(r[3]["ready_ms"]) for r in rows]
    at = [float(r[3]["total_ms"]) for r in rows]
    hold = [r[1] * 1000 - float(r[3]["total_ms"]) - r[2] * 1000 for r in rows]
    slow = sum(1 for x in rd if x >= 800)
    out = [f"**{title}**", "", HEAD,
           row("**client: TCP connect → `select 1` answered (asleep)**", tot),
           row("agent: queued (waiting for the tenant's lock)", q),
           row("agent: start (signal to the supervisor / `docker start`)", st),
           row("agent: ready (start → PostgreSQL accepts a login)", rd),
           row("agent: total (wake request → reply)", at),
           row("client after the server is up (same client, next connection, now awake)", awake),
           row("HAProxy + Lua (client total − agent total − awake connection)", hold),
           "",
           f"Wakes whose readiness took ≥ 800 ms (the agent signals the supervisor again after "
           f"800 ms without a socket): {slow} of {len(rows)}.",
           ""]
    return out, summary(tot)


def cmd_wake(a):
    L = Layout(a)
    alog = AgentLog(a.agent_log)
    tids = [f"w{i:02d}" for i in range(1, a.tenants + 1)]
    res = {}
    res["base"] = used_mib()
    log(f"host memory in use before: {res['base']:.0f} MiB; writing {a.tenants} managed tenants")
    L.write_tenants({t: managed() for t in tids})
    dt, _ = L.sync()
    log(f"sync created {a.tenants} tenants in {dt:.1f} s")
    res["sync_create"] = dt
    # Waits until every tenant answers (the daemon may still route the last ones).
    for t in tids:
        t0 = now()
        while True:
            try:
                L.query(t, timeout=5)
                break
            except psycopg.Error:
                if now() - t0 > 60:
                    raise
                time.sleep(0.1)
    log("all answer; 15 s settle, then memory with all awake")
    mem_awake = mem_snapshot(a.prefix, tids, settle=15)
    # Awake baseline: the same client, same tenants, before any sleep.
    base = [L.query(tids[i % len(tids)]) * 1000 for i in range(a.wakes)]
    log(f"awake baseline: p50 {median(base):.1f} ms")
    log(f"{a.wakes} light wakes over {len(tids[:a.rotate])} tenants")
    light = wake_loop(a, L, alog, tids[:a.rotate], a.wakes, False, "light")
    log("all tenants to light sleep, then memory")
    for t in tids:
        L.sleep(t)
    mem_light = mem_snapshot(a.prefix, tids, settle=10)
    # Deep: the agent again with [sleep] max_light = 0; its next idle pass stops every container.
    log("restarting the agent with [sleep] max_light = 0")
    AG.restart_with("max_light", "0")
    waited = L.wait_stopped(tids, limit=300)
    log(f"all {len(tids)} deep asleep after {waited:.1f} s")
    mem_deep = mem_snapshot(a.prefix, tids, settle=10)
    alog.skip()
    log(f"{a.deep_wakes} deep wakes")
    deep = wake_loop(a, L, alog, tids, a.deep_wakes, True, "deep")

    out = []
    t_light, s_light = wake_table(light, f"Light sleep ({a.wakes} wakes, {a.rotate} tenants in "
                                  f"turn; PostgreSQL stopped inside a running container)")
    t_deep, s_deep = wake_table(deep, f"Deep sleep ({a.deep_wakes} wakes, {a.tenants} tenants in "
                                f"turn; container stopped, `[sleep] max_light = 0`)")
    out += t_light + t_deep
    out += ["**The same client to an awake tenant** (same run, before the first sleep)", "",
            HEAD, row("client: TCP connect → `select 1` answered (awake)", base), ""]
    b50 = median(base)
    out.append(f"Ratio asleep/awake (p50): light {s_light['p50'] / b50:.1f}×, "
               f"deep {s_deep['p50'] / b50:.1f}×.")
    out.append("")

    def part(m, k):
        return median([x[k] for x in m["parts"]]) if m["parts"] else 0.0

    def shim_of(m):
        return m["pss"] / m["nshim"] if m["nshim"] else 0.0

    def mem_row(name, m):
        cg = m["cg"]
        cgs = (f"{median(cg):.1f} ({min(cg):.1f}–{max(cg):.1f})" if cg else "— (stopped)")
        if not m["parts"]:
            return f"| {name} | {m['n']} | {cgs} | — | — | — | — (none) | **0** | {m['used']:.0f} |"
        own = part(m, "rss") + part(m, "shmem") + part(m, "kernel") + shim_of(m)
        return (f"| {name} | {m['n']} | {cgs} | {part(m, 'rss'):.1f} | {part(m, 'shmem'):.1f} "
                f"| {part(m, 'kernel'):.1f} | {shim_of(m):.1f} ({m['shim'] / m['nshim']:.1f}) "
                f"| **{own:.1f}** | {m['used']:.0f} |")

    out += [f"**Memory per tenant state** ({a.tenants} tenants in each state)", "",
            "| state | containers | cgroup memory per container (usage − inactive file, as "
            "`docker stats`), MiB: median (min–max) | processes' anonymous memory (rss) | "
            "shared memory (shmem) | kernel (usage − cache − rss) | containerd-shim: PSS (RSS) "
            "| **not reclaimable: rss + shmem + kernel + shim PSS** | host memory in use, MiB |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
            mem_row("awake (idle, 15 s after its last query)", mem_awake),
            mem_row("light asleep", mem_light),
            mem_row("deep asleep", mem_deep),
            "",
            f"Host memory in use before the {a.tenants} tenants existed: {res['base']:.0f} MiB.",
            "",
            f"- How: cgroup figures are medians over the {a.tenants} containers, from "
            f"/sys/fs/cgroup (memory.stat and the usage; cgroup v1 puts the kernel's own memory "
            f"for the container — slab, page tables — into the usage, which is what the kernel "
            f"column is); shim figures from /proc/PID/smaps_rollup of each container's "
            f"`containerd-shim-runc-v2` (PSS splits the binary's pages shared by all shims, RSS "
            f"counts them in full for each). Host memory in use is MemTotal − MemAvailable with "
            f"all {a.tenants} in one state.",
            f"- Page cache of a tenant's files (the rest of the cgroup usage) is reclaimed by the "
            f"kernel under pressure and is left out of the bold column; PostgreSQL's shared "
            f"buffers (shmem) are not, and grow with use up to `shared_buffers` (128 MB by "
            f"default) on a busy tenant.",
            f"- The host-wide figure moves with whatever else runs on this shared machine (other "
            f"test suites start and stop containers during the run), so here it is noise next to "
            f"{a.tenants} × a few MiB; the per-container figures are the measurement.",
            ""]
    if FAILED:
        out.append(f"**Clients not answered: {len(FAILED)}** of {a.wakes + a.deep_wakes} "
                   f"(left out of the tables above): " + "; ".join(FAILED[:5]))
        out.append("")
    p50, p99 = s_light["p50"], s_light["p99"]
    dp50, dp99 = s_deep["p50"], s_deep["p99"]
    out.append(f"- Targets for a sleeping tenant (TCP connect → first answer, through HAProxy): "
               f"p50 ≤ 500 ms, p99 ≤ 1500 ms. Light sleep: p50 {p50:.0f} ms, p99 {p99:.0f} ms → "
               f"{verdict(p50 <= 500 and p99 <= 1500)}; moonshot p50 ≤ 250 ms → "
               f"{verdict(p50 <= 250)}. Deep sleep: p50 {dp50:.0f} ms, p99 {dp99:.0f} ms → "
               f"{verdict(dp50 <= 500 and dp99 <= 1500)}"
               + (f"; but {len(FAILED)} client(s) of a sleeping tenant were not answered." if FAILED
                  else "; every client was answered."))
    print("\n".join(out))


# ---------------------------------------------------------------- 10. density

def haproxy_rss(master_pid):
    """Master + every worker (children of the master)."""
    total = rss_mib(master_pid)
    try:
        with open(f"/proc/{master_pid}/task/{master_pid}/children") as f:
            kids = [int(k) for k in f.read().split()]
    except OSError:
        kids = []
    for k in kids:
        total += rss_mib(k)
    return total, 1 + len(kids)


def daemon_rss():
    d = sum(rss_mib(p) for p, c in pids_of(r"^(/usr/bin/|/usr/sbin/)?dockerd( |$)"))
    c = sum(rss_mib(p) for p, c in pids_of(r"^(/usr/bin/)?containerd( |$)"))
    return d, c


def docker_counts(prefix):
    ids = container_ids(prefix, all_=True)
    up = container_ids(prefix, all_=False)
    return len(ids), len(up)


def asleep_states(dirpath):
    out = {}
    try:
        with open(os.path.join(dirpath, "haproxy", "maps", "asleep.map")) as f:
            for line in f:
                p = line.split()
                if len(p) >= 2 and not p[0].startswith("#"):
                    out[p[0]] = p[1]
    except OSError:
        pass
    return out


def awake_of(ids, st):
    return [t for t in ids if t not in st]


def per_container(prefix, tids):
    """cgroup memory and shim RSS of the running containers of tids: (cgroup list, shim list)."""
    ids = container_ids(prefix, all_=False)
    cids = [ids[f"{prefix}-{t}"] for t in tids if f"{prefix}-{t}" in ids]
    cg = [x for x in (cgroup_mem_mib(c) for c in cids) if x is not None]
    _shim, n, pss = shim_rss_mib(cids)
    return cg, (pss / n if n else float("nan"))


def cpu_secs(pid):
    """utime + stime of a process, seconds."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def haproxy_cpu(master_pid):
    total = cpu_secs(master_pid)
    try:
        with open(f"/proc/{master_pid}/task/{master_pid}/children") as f:
            total += sum(cpu_secs(int(k)) for k in f.read().split())
    except OSError:
        pass
    return total


def processes(a):
    d, c = daemon_rss()
    hp, hn = haproxy_rss(a.haproxy_pid)
    return {"dockerd": d, "containerd": c, "haproxy": hp, "haproxy_n": hn,
            "agent": rss_mib(AG.p.pid) if AG.p else 0.0}


def cmd_density(a):
    L = Layout(a)
    alog = AgentLog(a.agent_log)
    base_used = used_mib()
    base_proc = processes(a)
    log(f"host memory in use before: {base_used:.0f} MiB")
    df0 = os.statvfs("/var/lib/docker")
    free0 = df0.f_bavail * df0.f_frsize
    tenants = {}
    tids = [f"d{i:04d}" for i in range(1, a.count + 1)]
    t_all = now()
    syncs, peak_awake, peak_used, waits = [], 0, base_used, []
    stopped_early = None
    for b in range(0, a.count, a.batch):
        batch = tids[b:b + a.batch]
        # At most two batches awake: wait until all but one batch's worth are asleep.
        t_wait = now()
        while True:
            awake = len(awake_of(tids[:b], asleep_states(a.dir)))
            if awake <= a.batch or now() - t_wait > 300:
                break
            time.sleep(0.5)
        waits.append(now() - t_wait)
        avail = meminfo()["MemAvailable"] / 1024
        df = os.statvfs("/var/lib/docker")
        disk_free = df.f_bavail * df.f_frsize
        if avail < 3072 or disk_free < 5 * 2**30:
            stopped_early = (f"stopped at {b} tenants: {avail:.0f} MiB available, "
                             f"{disk_free / 2**30:.1f} GiB disk free")
            log(stopped_early)
            break
        for t in batch:
            tenants[t] = managed(a.idle)
        L.write_tenants(tenants)
        dt, _ = L.sync()
        syncs.append(dt)
        used = used_mib()
        peak_used = max(peak_used, used)
        peak_awake = max(peak_awake, awake + len(batch))
        log(f"batch {b // a.batch + 1}: {b + len(batch)} tenants, sync {dt:.1f} s, "
            f"{awake} awake before it, host in use {used:.0f} MiB")
    created = len(tenants)
    ids = tids[:created]
    t_create = now() - t_all
    log(f"{created} tenants created in {t_create:.0f} s; waiting for all to sleep")
    t0 = now()
    while now() - t0 < 900 and awake_of(ids, asleep_states(a.dir)):
        time.sleep(1)
    t_asleep = now() - t_all
    df1 = os.statvfs("/var/lib/docker")
    disk_per = (free0 - df1.f_bavail * df1.f_frsize) / max(created, 1) / 2**20
    # Deepening (beyond max_light) runs in later idle passes: wait until the light count is
    # down to max_light and the containers are stopped.
    t0 = now()
    while now() - t0 < 900:
        st = asleep_states(a.dir)
        n_light = sum(1 for t in ids if st.get(t) == "light")
        if n_light <= a.max_light and docker_counts(a.prefix)[1] <= n_light:
            break
        time.sleep(2)
    t_settled = now() - t_all
    log("all asleep and settled; 30 s, then memory")
    c_agent, c_hap, t_c = cpu_secs(AG.p.pid), haproxy_cpu(a.haproxy_pid), now()
    time.sleep(30)
    idle_cpu = ((cpu_secs(AG.p.pid) - c_agent) / (now() - t_c) * 100,
                (haproxy_cpu(a.haproxy_pid) - c_hap) / (now() - t_c) * 100)
    st = asleep_states(a.dir)
    light = [t for t in ids if st.get(t) == "light"]
    deep = [t for t in ids if st.get(t) == "deep"]
    asleep = {"used": used_mib(), "proc": processes(a), "light": len(light), "deep": len(deep),
              "awake": len(awake_of(ids, st)), "up": docker_counts(a.prefix)[1]}
    asleep["cg_light"], asleep["shim_light"] = per_container(a.prefix, light)
    log(f"all asleep: light {len(light)}, deep {len(deep)}, in use {asleep['used']:.0f} MiB "
        f"(+{asleep['used'] - base_used:.0f})")

    unchanged = []
    for _ in range(3):
        dt, rc = L.sync()
        unchanged.append((dt, rc))
    log(f"unchanged sync: {', '.join(f'{x[0]:.2f} s (exit {x[1]})' for x in unchanged)}")

    with open(a.script, "w") as f:
        f.write("select 1;\n")
    log(f"{a.rotations} rotations of {a.active} tenants with pgbench -C, {a.period} s each")
    wakes, woke_rows, fails, samples = [], [], [], []
    rot = []
    step = max(1, created // max(a.rotations + 1, 1))
    for r in range(a.rotations):
        active = [ids[(r * step + i) % created] for i in range(a.active)]
        probes = [ids[(r * step + a.active + 3 + i * 5) % created] for i in range(a.probes)]
        alog.skip()
        procs = []
        t_rot = now()
        for i, t in enumerate(active):
            env = dict(os.environ, PGPASSWORD=L.password(t), PGSSLMODE="disable")
            if a.stagger and i:
                time.sleep(a.stagger / len(active))
            procs.append((t, subprocess.Popen(
                [a.pgbench, "-n", "-C", "-c", "1", "-j", "1", "-T", str(a.period), "-f", a.script,
                 "-h", "127.0.0.1", "-p", str(a.port), "-U", t, t],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)))
        for t in probes:  # credentials now, not during the timed part
            L.password(t)
        time.sleep(max(0.0, a.period * 0.35 - (now() - t_rot)))
        st = asleep_states(a.dir)
        aw = awake_of(ids, st)
        cg, shim = per_container(a.prefix, [t for t in active if t in aw])
        snap = {"used": used_mib(), "proc": processes(a), "awake": len(aw),
                "light": sum(1 for t in ids if st.get(t) == "light"),
                "deep": sum(1 for t in ids if st.get(t) == "deep"),
                "up": docker_counts(a.prefix)[1], "cg_active": cg, "shim": shim,
                "clients": sum(pss_mib(p.pid) for _, p in procs)}
        samples.append(snap)
        # Tenants woken while the others run: one client each, one after another.
        rw = []
        for t in probes:
            if t in aw:
                continue
            try:
                rw.append(L.query(t, timeout=30) * 1000)
            except psycopg.Error as e:
                fails.append(f"wake of {t}: {e}")
            time.sleep(0.3)
        wakes += rw
        tps = []
        for t, p in procs:
            outp, _ = p.communicate(timeout=a.period + 120)
            m = re.search(r"tps = ([\d.]+)", outp)
            if p.returncode != 0 or not m or "number of failed transactions: 0 " not in outp:
                fails.append(f"pgbench {t}: exit {p.returncode}: {outp[-300:]}")
            else:
                tps.append(float(m.group(1)))
        woke = alog.woke()
        woke_rows += woke
        rot.append((r + 1, snap, len(woke), rw, sum(tps), len(tps), now() - t_rot))
        log(f"rotation {r + 1}: awake {snap['awake']} (light {snap['light']}, deep "
            f"{snap['deep']}), in use {snap['used']:.0f} MiB, {len(woke)} wakes, probes "
            f"{', '.join(f'{x:.0f}' for x in rw)} ms, pgbench {sum(tps):.0f} tps")
    after = {"used": used_mib(), "proc": processes(a)}

    # ------------------------------------------------------------ the section body
    out = []
    mib = lambda x: f"{x:.0f}"
    out.append("| step | figure |")
    out.append("|---|---|")
    out.append(f"| tenants created | **{created}** of {a.count}"
               + (f" ({stopped_early})" if stopped_early else "") + " |")
    out.append(f"| time to create them all: tenants file + one `sync` per batch of {a.batch}, "
               f"waiting before each batch until at most {a.batch} are awake "
               f"| **{t_create:.0f} s** ({t_create / max(created, 1):.2f} s per tenant); "
               f"batch `sync` median {median(syncs):.1f} s, max {max(syncs):.1f} s; waits for "
               f"sleep {sum(waits):.0f} s in all |")
    out.append(f"| each batch's `sync` (adds {a.batch} tenants), in order, s "
               f"| {', '.join(f'{x:.0f}' for x in syncs)} |")
    out.append(f"| most tenants awake at once while creating | ≤ {peak_awake} |")
    out.append(f"| all asleep | {t_asleep:.0f} s after the first batch started; "
               f"{max(0, t_settled - t_asleep):.0f} s more until only `max_light` = {a.max_light} "
               f"containers ran |")
    out.append(f"| disk per tenant (free space on /var/lib/docker before − after, / tenants) "
               f"| {disk_per:.1f} MiB |")
    out.append(f"| `pgs-agent sync`, nothing changed, {created} tenants "
               f"| {', '.join(f'{x[0]:.2f}' for x in unchanged)} s (exit "
               f"{', '.join(str(x[1]) for x in unchanged)}) |")
    out.append("")
    cgl = asleep["cg_light"]
    out.append(f"**All {created} asleep** ({asleep['light']} light, {asleep['deep']} deep, "
               f"{asleep['awake']} awake; {asleep['up']} containers running), 30 s after they "
               f"settled:")
    out.append("")
    out.append(f"- CPU while all sleep (idle passes every 2 s over {created} tenants; 30 s): "
               f"agent {idle_cpu[0]:.1f} % of one core, HAProxy (master + workers) "
               f"{idle_cpu[1]:.1f} %.")
    out.append(f"- Host memory in use (MemTotal − MemAvailable): {mib(asleep['used'])} MiB, "
               f"**{asleep['used'] - base_used:+.0f} MiB** vs before the run ({mib(base_used)} MiB).")
    if cgl:
        out.append(f"- Per light sleeper: cgroup memory median {median(cgl):.1f} MiB "
                   f"(min {min(cgl):.1f}, max {max(cgl):.1f}) + containerd-shim PSS "
                   f"{asleep['shim_light']:.1f} MiB.")
    rest = asleep["used"] - base_used - sum(asleep["proc"][k] - base_proc[k]
                                            for k in ("dockerd", "containerd", "haproxy", "agent"))
    if cgl and asleep["deep"]:
        light_total = asleep["light"] * (median(cgl) + asleep["shim_light"])
        out.append(f"- Per deep sleeper: no process; what is left of the host delta after the "
                   f"light sleepers and the growth of dockerd, containerd, HAProxy and the agent, "
                   f"spread over the "
                   f"{asleep['deep']} deep sleepers: "
                   f"{(rest - light_total) / asleep['deep']:.2f} MiB (noise level).")
    out.append("")
    out.append("| process | before, MiB RSS | all asleep | end of the rotations |")
    out.append("|---|---:|---:|---:|")
    for k, name in (("dockerd", "dockerd"), ("containerd", "containerd"),
                    ("haproxy", "HAProxy (master + workers)"), ("agent", "pgs-agent run")):
        out.append(f"| {name} | {base_proc[k]:.1f} | {asleep['proc'][k]:.1f} | "
                   f"{after['proc'][k]:.1f} |")
    out.append("")
    out.append(f"**Rotating {a.active} active tenants** ({a.rotations} rotations of {a.period} s; "
               f"each active tenant runs `pgbench -n -C -c 1 -T {a.period} -f select1.sql` "
               f"(a new connection per transaction) through HAProxy, the {a.active} started "
               f"{'at once' if not a.stagger else f'one after another over {a.stagger:.0f} s'}, "
               f"most of them asleep when their first client comes; the others sleep by their "
               f"idle timeout {a.idle}). Sampled {a.period * 0.35:.0f} s into each rotation; "
               f"\"awake\" counts tenants the agent holds awake, \"containers running\" every "
               f"running container of the run (light sleepers included):")
    out.append("")
    out.append("| rotation | awake | light | deep | containers running | host in use MiB (vs "
               "before) | of which the pgbench clients (PSS) MiB | per awake tenant: cgroup "
               "median + shim PSS, MiB | HAProxy MiB | agent MiB | dockerd MiB | pgbench tps "
               "(sum) | agent wakes | probe wakes ms |")
    out.append("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r, sn, nw, rw, tps, ntps, _dt in rot:
        cg = sn["cg_active"]
        cgs = f"{median(cg):.1f} + {sn['shim']:.1f}" if cg else "—"
        out.append(f"| {r} | {sn['awake']} | {sn['light']} | {sn['deep']} | {sn['up']} | "
                   f"{sn['used']:.0f} ({sn['used'] - base_used:+.0f}) | {sn['clients']:.0f} "
                   f"| {cgs} | "
                   f"{sn['proc']['haproxy']:.1f} | {sn['proc']['agent']:.1f} | "
                   f"{sn['proc']['dockerd']:.1f} | {tps:.0f} ({ntps} runs) | {nw} | "
                   f"{', '.join(f'{x:.0f}' for x in rw)} |")
    out.append("")
    if wakes:
        s = summary(wakes)
        out.append(f"Wake latency while {a.active} others run (client: TCP connect → `select 1` "
                   f"answered, one client at a time to a sleeping tenant, n = {s['n']}): "
                   f"**p50 {s['p50']:.0f} ms, p99 {s['p99']:.0f} ms** (p90 {s['p90']:.0f}, "
                   f"max {s['max']:.0f}).")
    by_depth = {}
    for w in woke_rows:
        by_depth.setdefault(w.get("depth", "?"), []).append(float(w["total_ms"]))
    if by_depth:
        out.append("Agent's own wake times during the rotations (all wakes, the pgbench starts "
                   "included; its `woke` log lines): " + "; ".join(
                       f"{d}: n = {len(v)}, p50 {median(v):.0f} ms, p99 "
                       f"{pct(sorted(v), 99):.0f} ms" for d, v in sorted(by_depth.items())) + ".")
    out.append("")
    failed = alog.failed_wakes()
    if failed:
        out.append("Wakes the agent gave up on (its `wake failed` log lines, by reason): "
                   + ", ".join(f"{k} {v}" for k, v in sorted(failed.items())) + ".")
    if fails:
        out.append(f"Client failures ({len(fails)}), the first three: "
                   + "; ".join(" ".join(f.split()) for f in fails[:3]))
    else:
        out.append("No client failed: every pgbench run exited 0 with 0 failed transactions, "
                   "every probe was answered.")
    out.append("")
    worst = max([asleep["used"]] + [sn["used"] for _, sn, *_ in rot]) - base_used
    worst_abs = max([asleep["used"]] + [sn["used"] for _, sn, *_ in rot])
    max_awake = max([sn["awake"] for _, sn, *_ in rot] or [0])
    max_up = max([sn["up"] for _, sn, *_ in rot] or [0])
    out.append(f"- Target: {a.count} tenants with at most 4 GiB of host memory in use while "
               f"≤ 50 are awake: {created} tenants; at most {worst:.0f} MiB more in use than "
               f"before the run ({worst_abs:.0f} MiB in use on the whole machine), sampled with "
               f"up to {max_awake} awake and {max_up} containers running → "
               f"{verdict(created >= a.count and worst <= 4096)} (judged on the delta). "
               f"Clients not served during the rotations: {len(fails)}.")
    print("\n".join(out))


def set_sleep(path, kv):
    """Sets `[sleep] key = value` lines in a pgs.toml (adding the section or keys if missing)."""
    with open(path) as f:
        lines = f.read().splitlines()
    try:
        start = lines.index("[sleep]")
    except ValueError:
        lines += ["", "[sleep]"]
        start = len(lines) - 1
    end = start + 1
    while end < len(lines) and not lines[end].startswith("["):
        end += 1
    for k, v in zip(kv[::2], kv[1::2]):
        for i in range(start + 1, end):
            if re.match(rf"{re.escape(k)}\s*=", lines[i]):
                lines[i] = f"{k} = {v}"
                break
        else:
            lines.insert(start + 1, f"{k} = {v}")
            end += 1
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def on_term(signum, _frame):
    sys.exit(128 + signum)


def main():
    signal.signal(signal.SIGTERM, on_term)
    if sys.argv[1:2] == ["set-sleep"]:
        set_sleep(sys.argv[2], sys.argv[3:])
        return
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("wake", "density"):
        p = sub.add_parser(name)
        p.add_argument("--agent", required=True)
        p.add_argument("--cfg", required=True)
        p.add_argument("--dir", required=True)
        p.add_argument("--prefix", required=True)
        p.add_argument("--port", type=int, required=True)
        p.add_argument("--agent-log", required=True)
    w = sub.choices["wake"]
    w.add_argument("--tenants", type=int, default=20)
    w.add_argument("--rotate", type=int, default=5)
    w.add_argument("--wakes", type=int, default=200)
    w.add_argument("--deep-wakes", type=int, default=30)
    w.add_argument("--pause", type=float, default=0.5)
    d = sub.choices["density"]
    d.add_argument("--count", type=int, default=1000)
    d.add_argument("--batch", type=int, default=50)
    d.add_argument("--active", type=int, default=50)
    d.add_argument("--rotations", type=int, default=6)
    d.add_argument("--period", type=int, default=20)
    d.add_argument("--idle", default="5s")
    d.add_argument("--probes", type=int, default=10)
    d.add_argument("--stagger", type=float, default=10.0)
    d.add_argument("--max-light", type=int, default=200)
    d.add_argument("--haproxy-pid", type=int, required=True)
    d.add_argument("--pgbench", required=True)
    d.add_argument("--script", required=True)
    a = ap.parse_args()
    global AG
    AG = Agent(a)
    try:
        AG.start()
        {"wake": cmd_wake, "density": cmd_density}[a.cmd](a)
    finally:
        AG.stop()


if __name__ == "__main__":
    main()
