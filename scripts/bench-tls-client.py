#!/usr/bin/env python3
"""Load driver for scripts/bench-tls.sh: pgbench's select-only transaction over libpq >= 17.

Debian's pgbench links libpq 15, which cannot make a PostgreSQL 17 direct SSL connection
(`sslnegotiation=direct`). This driver calls libpq through psycopg's thin wrapper (psycopg.pq,
from the psycopg[binary] wheel, which bundles libpq 18): PQconnectdb, PQexec, PQfinish, with no
cursor or type adaptation on top, so that its own cost per query stays small. Run it with the
venv's interpreter (scripts/install-deps.sh --tests makes /opt/pgs-test-venv).

  bench-tls-client.py run CONNINFO --mode P1|P2 [--procs 4] [--duration 5] [--scale 1]
      P1: a new connection per transaction (like `pgbench -C -S`); P2: one persistent
      connection per process (like `pgbench -S`). The transaction is pgbench's -S query on a
      random aid. Prints one JSON line: transactions, connections, elapsed s, tps, and the
      driver's own CPU µs per transaction (utime + stime of its worker processes).
  bench-tls-client.py hold CONNINFO --count N [--procs 4]
      Opens N connections (logged in, then idle) from PROCS processes, prints "ready N" once all
      are open, holds them until SIGTERM or SIGINT, then closes them and exits 0.
  bench-tls-client.py check CONNINFO
      One connection; prints "ssl_in_use=BOOL user=USER".

The password comes from PGPASSWORD (never a command line); CONNINFO is a libpq connection string.
Exit code 1 with a message on stderr when a connection or a query fails.
"""

import argparse
import json
import multiprocessing as mp
import os
import queue
import random
import resource
import signal
import sys
import time

from psycopg import pq


def fail(msg):
    print(f"bench-tls-client: {msg}", file=sys.stderr, flush=True)
    sys.exit(1)


def connect(conninfo):
    conn = pq.PGconn.connect(conninfo.encode())
    if conn.status != pq.ConnStatus.OK:
        msg = conn.get_error_message() if hasattr(conn, "get_error_message") else conn.error_message
        conn.finish()
        raise RuntimeError(f"connection failed: {msg!r}")
    return conn


def query(conn, naccounts):
    aid = random.randint(1, naccounts)
    res = conn.exec_(b"SELECT abalance FROM pgbench_accounts WHERE aid = %d;" % aid)
    if res.status != pq.ExecStatus.TUPLES_OK or res.ntuples != 1:
        raise RuntimeError(f"query failed: {res.error_message!r}")


def cpu_s():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def worker(conninfo, mode, duration, naccounts, barrier, out):
    """One client: waits at the barrier, then runs transactions until the deadline."""
    try:
        conn = connect(conninfo) if mode == "P2" else None
        barrier.wait()
        t0 = time.monotonic()
        c0 = cpu_s()
        deadline = t0 + duration
        n = conns = 0
        while time.monotonic() < deadline:
            if mode == "P1":
                conn = connect(conninfo)
                conns += 1
                query(conn, naccounts)
                conn.finish()
            else:
                query(conn, naccounts)
            n += 1
        t1 = time.monotonic()
        c1 = cpu_s()
        if mode == "P2":
            conn.finish()
        out.put({"n": n, "conns": conns, "t0": t0, "t1": t1, "cpu": c1 - c0})
    except Exception as e:  # reported by the parent
        try:
            barrier.abort()
        except Exception:
            pass
        out.put({"error": str(e)})


def cmd_run(a):
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(a.procs)
    out = ctx.Queue()
    naccounts = 100000 * a.scale
    procs = [ctx.Process(target=worker, args=(a.conninfo, a.mode, a.duration, naccounts, barrier, out))
             for _ in range(a.procs)]
    for p in procs:
        p.start()
    results = [out.get(timeout=a.duration + 120) for _ in procs]
    for p in procs:
        p.join()
    errors = [r["error"] for r in results if "error" in r]
    if errors:
        fail(f"{len(errors)} of {a.procs} clients failed: {errors[0]}")
    n = sum(r["n"] for r in results)
    elapsed = max(r["t1"] for r in results) - min(r["t0"] for r in results)
    cpu = sum(r["cpu"] for r in results)
    print(json.dumps({
        "mode": a.mode, "procs": a.procs, "transactions": n,
        "connections": sum(r["conns"] for r in results), "elapsed": round(elapsed, 3),
        "tps": round(n / elapsed, 1), "client_cpu_us_per_tx": round(cpu * 1e6 / n, 1) if n else None,
    }))


def holder(conninfo, count, ready, stop, parent):
    """Opens COUNT connections, reports, then holds them until told to stop or the parent dies."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        conns = [connect(conninfo) for _ in range(count)]
    except Exception as e:
        ready.put(str(e))
        return
    ready.put(None)
    while not stop.wait(0.5) and os.getppid() == parent:
        pass
    for c in conns:
        c.finish()


def cmd_hold(a):
    ctx = mp.get_context("fork")
    ready = ctx.Queue()
    stop = ctx.Event()
    # The handlers only set a flag: Event.set() inside a handler can deadlock with the main
    # thread's own wait on the same lock.
    term = []
    signal.signal(signal.SIGTERM, lambda *_: term.append(1))
    signal.signal(signal.SIGINT, lambda *_: term.append(1))
    shares = [a.count // a.procs + (1 if i < a.count % a.procs else 0) for i in range(a.procs)]
    procs = [ctx.Process(target=holder, args=(a.conninfo, n, ready, stop, os.getpid()), daemon=True)
             for n in shares if n]
    for p in procs:
        p.start()
    errors = []
    for _ in procs:
        while True:
            try:
                e = ready.get(timeout=0.5)
                break
            except queue.Empty:
                if term:
                    stop.set()
                    sys.exit(1)
        if e:
            errors.append(e)
    if errors:
        stop.set()
        for p in procs:
            p.join()
        fail(f"could not open {a.count} connections: {errors[0]}")
    print(f"ready {a.count}", flush=True)
    while not term:
        time.sleep(0.2)
    stop.set()
    for p in procs:
        p.join()


def cmd_check(a):
    try:
        conn = connect(a.conninfo)
        res = conn.exec_(b"select current_user")
        user = res.get_value(0, 0).decode() if res.status == pq.ExecStatus.TUPLES_OK else "?"
        print(f"ssl_in_use={conn.ssl_in_use} user={user}")
        conn.finish()
    except Exception as e:
        fail(str(e))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("conninfo")
    r.add_argument("--mode", choices=["P1", "P2"], required=True)
    r.add_argument("--procs", type=int, default=4)
    r.add_argument("--duration", type=float, default=5.0)
    r.add_argument("--scale", type=int, default=1)
    h = sub.add_parser("hold")
    h.add_argument("conninfo")
    h.add_argument("--count", type=int, required=True)
    h.add_argument("--procs", type=int, default=4)
    c = sub.add_parser("check")
    c.add_argument("conninfo")
    a = ap.parse_args()
    if pq.version() < 170000 and "sslnegotiation" in a.conninfo:
        fail(f"libpq {pq.version()} cannot do sslnegotiation (needs >= 17)")
    {"run": cmd_run, "hold": cmd_hold, "check": cmd_check}[a.cmd](a)


if __name__ == "__main__":
    main()
