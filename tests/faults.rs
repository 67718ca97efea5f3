//! The fault matrix, against the real systems: dockerd killed and restarted (with and without
//! live-restore, on a private engine), HAProxy killed and started again from its files, the
//! agent killed in the middle of creating a tenant, a tenant's server OOM-killed by its memory
//! limit, the tenants file replaced by garbage, and the layout's disk full. Each ends with every
//! enabled tenant answering through HAProxy and the rows written before the fault still there.
//!
//! A probe client logs in through HAProxy every 100 ms during each fault and measures the
//! seconds of refusals; with `PGS_FAULT_REPORT=FILE` each test appends its figure there
//! (`scripts/bench-faults.sh` makes BENCHMARKS.md's table from it). The tests assert recovery
//! within deadlines, never timings.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::support::agent::{replace_file, AgentProcess};
use crate::support::docker::{docker, DockerEnv};
use crate::support::dockerd::PrivateDockerd;
use crate::support::{
    agent, free_port, have_tools, psql, temp_dir, wait_for, Haproxy, Layout, Session,
};

/// A new managed tenant: volume, container, initdb, readiness, reload, access.
const PROVISION: Duration = Duration::from_secs(90);
/// How long recovery may take once the fault is over. Far below the agent's periodic resync
/// (600 s here), so passing proves the event-driven path; the real figures are measured.
const RECOVER: Duration = Duration::from_secs(20);

fn tenants(list: &[(&str, &str)]) -> String {
    let t: serde_json::Map<String, serde_json::Value> = list
        .iter()
        .map(|(id, access)| {
            (
                id.to_string(),
                json!({"access": access, "managed": {"memory": "128m"}}),
            )
        })
        .collect();
    json!({"version": 1, "tenants": t}).to_string()
}

/// A layout with its own HAProxy and `run` daemon, on the shared engine (a test prefix) or on
/// a private one.
struct Rig {
    agent: Option<AgentProcess>,
    haproxy: Haproxy,
    /// Before `layout`: containers bind-mount its directories.
    env: DockerEnv,
    layout: Layout,
    runs: usize,
}

impl Rig {
    fn new(docker_socket: Option<&Path>) -> Option<Rig> {
        Self::on(Layout::init(), docker_socket)
    }

    fn on(layout: Layout, docker_socket: Option<&Path>) -> Option<Rig> {
        if !have_tools(&["haproxy", "psql", "docker"]) {
            return None;
        }
        let env = DockerEnv::new()?;
        layout.use_docker_prefix(&env.prefix);
        if let Some(sock) = docker_socket {
            layout.edit_settings(|s| {
                s.replace(
                    "socket = \"/var/run/docker.sock\"",
                    &format!("socket = \"{}\"", sock.display()),
                )
            });
        }
        layout.render();
        let haproxy = layout.start_haproxy();
        let mut rig = Rig {
            agent: None,
            haproxy,
            layout,
            env,
            runs: 0,
        };
        rig.start_agent();
        Some(rig)
    }

    fn root(&self) -> PathBuf {
        self.layout.root()
    }

    fn tenants_file(&self) -> PathBuf {
        self.root().join("tenants.json")
    }

    /// `pgs-agent run --resync 600`: everything in these tests is event-driven.
    fn start_agent(&mut self) {
        self.runs += 1;
        let log = self
            .layout
            .dir
            .path()
            .join(format!("run-{}.log", self.runs));
        self.agent = Some(AgentProcess::start(&self.layout.config, 600, &log));
    }

    fn agent(&mut self) -> &mut AgentProcess {
        self.agent.as_mut().expect("agent running")
    }

    fn password(&self, id: &str) -> String {
        let p = std::fs::read_to_string(self.root().join(format!("secrets/{id}.password")));
        p.map(|p| p.trim().to_owned()).unwrap_or_default()
    }

    fn conninfo(&self, id: &str) -> String {
        self.layout.conninfo(id, "connect_timeout=5")
    }

    fn sql(&self, id: &str, sql: &str) -> (bool, String, String) {
        psql(&self.conninfo(id), &self.password(id), sql)
    }

    /// Writes the tenants file and waits until every `enabled` tenant answers.
    fn provision(&mut self, list: &[(&str, &str)]) {
        replace_file(&self.tenants_file(), &tenants(list));
        for (id, access) in list {
            if *access == "enabled" {
                self.wait_answering(id, PROVISION);
            }
        }
    }

    fn wait_answering(&self, id: &str, timeout: Duration) {
        wait_for(&format!("{id} to answer through HAProxy"), timeout, || {
            let (ok, out, _) = self.sql(id, "select current_user");
            (ok && out == id).then_some(())
        });
    }

    /// Writes rows that must survive the fault.
    fn write_rows(&self, id: &str) {
        let (ok, _, err) = self.sql(
            id,
            "create table kept (n int); insert into kept select generate_series(1, 100)",
        );
        assert!(ok, "{id}: {err}");
    }

    /// Every id answers through HAProxy within `timeout`, with its 100 rows.
    fn assert_recovered(&self, ids: &[&str], timeout: Duration) {
        for id in ids {
            wait_for(&format!("{id}'s rows through HAProxy"), timeout, || {
                let (ok, out, _) = self.sql(id, "select count(*) from kept");
                (ok && out == "100").then_some(())
            });
        }
    }

    /// GET /readyz: (status code, body).
    fn readyz(&self) -> (u16, String) {
        let token = std::fs::read_to_string(self.root().join("secrets/api-token")).unwrap();
        let mut s = TcpStream::connect(("127.0.0.1", self.layout.api_port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        write!(
            s,
            "GET /readyz HTTP/1.1\r\nHost: pgs\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
            token.trim()
        )
        .unwrap();
        let mut reply = String::new();
        s.read_to_string(&mut reply).unwrap();
        let code = reply
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = reply.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
        (code, body.to_owned())
    }

    /// Waits until /readyz answers `code` with `needle` in its body; returns the body.
    fn wait_readyz(&self, code: u16, needle: &str) -> String {
        wait_for(
            &format!("/readyz {code} saying {needle:?}"),
            RECOVER,
            || {
                let (c, body) = self.readyz();
                (c == code && body.contains(needle)).then_some(body)
            },
        )
    }

    /// Starts a probe client on `id` (its password is read now).
    fn probe(&self, id: &str) -> Probe {
        Probe::start(self.conninfo(id), self.password(id))
    }

    /// When the tenant's container last started, as the engine `docker_cmd` reaches says.
    fn started_at(&self, docker_cmd: impl Fn(&[&str]) -> std::process::Output, id: &str) -> String {
        let name = format!("{}-{id}", self.env.prefix);
        let out = docker_cmd(&["inspect", "-f", "{{.State.StartedAt}}", &name]);
        assert!(out.status.success(), "inspect {name}: {out:?}");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        // The agent first, so it does not restart what the DockerEnv removes.
        self.agent.take();
    }
}

/// A client that logs in through HAProxy and runs `select 1` every 100 ms, recording when it
/// was refused.
struct Probe {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Vec<(Instant, bool)>>>,
}

struct Impact {
    attempts: usize,
    failed: usize,
    /// From each first failure to the next success (or to the end of the probe).
    refused: Duration,
}

impl Probe {
    fn start(conninfo: String, password: String) -> Probe {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut seen = Vec::new();
            while !s.load(Ordering::Relaxed) {
                let t = Instant::now();
                let (ok, out, _) = psql(&conninfo, &password, "select 1");
                seen.push((t, ok && out == "1"));
                std::thread::sleep(Duration::from_millis(100).saturating_sub(t.elapsed()));
            }
            seen
        });
        Probe {
            stop,
            thread: Some(thread),
        }
    }

    fn finish(mut self, fault: &str) -> Impact {
        self.stop.store(true, Ordering::Relaxed);
        let seen = self.thread.take().unwrap().join().unwrap();
        let end = Instant::now();
        let mut refused = Duration::ZERO;
        let mut down_since: Option<Instant> = None;
        for (t, ok) in &seen {
            match (ok, down_since) {
                (false, None) => down_since = Some(*t),
                (true, Some(d)) => {
                    refused += *t - d;
                    down_since = None;
                }
                _ => {}
            }
        }
        if let Some(d) = down_since {
            refused += end - d;
        }
        let impact = Impact {
            attempts: seen.len(),
            failed: seen.iter().filter(|(_, ok)| !ok).count(),
            refused,
        };
        report(
            fault,
            impact.refused,
            Some((impact.failed, impact.attempts)),
        );
        impact
    }
}

/// Prints a measurement and, with `PGS_FAULT_REPORT=FILE`, appends it there as
/// `what<TAB>seconds<TAB>failed<TAB>attempts` (`-` for a duration that is not a probe's).
fn report(what: &str, secs: Duration, probe: Option<(usize, usize)>) {
    let (failed, attempts) = probe.map_or(("-".into(), "-".into()), |(f, a)| {
        (f.to_string(), a.to_string())
    });
    let line = format!("{what}\t{:.1}\t{failed}\t{attempts}\n", secs.as_secs_f64());
    eprint!("fault impact: {line}");
    if let Some(path) = std::env::var_os("PGS_FAULT_REPORT") {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap();
        f.write_all(line.as_bytes()).unwrap();
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn dockerd_killed_and_restarted_with_and_without_live_restore() {
    if !have_tools(&["haproxy", "psql", "docker", "dockerd", "containerd"]) {
        return;
    }
    if DockerEnv::new().is_none() {
        return;
    }
    let mut engine = PrivateDockerd::start(true);
    let Some(mut rig) = Rig::new(Some(&engine.socket)) else {
        return;
    };
    rig.provision(&[("acme", "enabled"), ("globex", "enabled")]);
    rig.write_rows("acme");
    rig.write_rows("globex");
    let on_engine = |args: &[&str]| engine.docker(args);
    let acme_started = rig.started_at(on_engine, "acme");

    // With live-restore the tenants keep serving while dockerd is gone, and /readyz says so.
    let probe = rig.probe("acme");
    let mark = rig.agent().mark();
    engine.kill9();
    let body = rig.wait_readyz(503, "not ready: docker");
    assert!(body.contains("\"haproxy\":\"ok\""), "{body}");
    rig.assert_recovered(&["acme", "globex"], Duration::from_secs(5));
    engine.start_dockerd(true);
    rig.agent()
        .wait_for_log_after(mark, "Docker engine answers again", RECOVER);
    rig.agent()
        .wait_for_log_after(mark, "reason=DockerBack", RECOVER);
    rig.assert_recovered(&["acme", "globex"], RECOVER);
    rig.wait_readyz(200, "\"ready\":true");
    let impact = probe.finish("dockerd kill -9 + restart, live-restore on");
    let on_engine = |args: &[&str]| engine.docker(args);
    assert_eq!(
        rig.started_at(on_engine, "acme"),
        acme_started,
        "live-restore must keep the container running, not restart it"
    );
    assert!(impact.attempts > 0);

    // Without live-restore dockerd stops the containers when it comes back; the agent starts
    // them as soon as its event stream reconnects, not at its next resync.
    let probe = rig.probe("acme");
    let mark = rig.agent().mark();
    engine.kill9();
    let back = engine.start_dockerd(false);
    let log = rig
        .agent()
        .wait_for_log_after(mark, "server started and ready: acme", RECOVER);
    assert!(log.contains("reason=DockerBack"), "{log}");
    rig.assert_recovered(&["acme", "globex"], RECOVER);
    report(
        "both tenants answering with their rows, after the restarted dockerd answers (live-restore off)",
        back.elapsed(),
        None,
    );
    probe.finish("dockerd kill -9 + restart, live-restore off");
    let on_engine = |args: &[&str]| engine.docker(args);
    assert_ne!(rig.started_at(on_engine, "acme"), acme_started);

    // The rig (agent, HAProxy) goes before the engine it uses.
    drop(rig);
    drop(engine);
}

#[test]
fn haproxy_killed_and_started_again_from_its_files() {
    let Some(mut rig) = Rig::new(None) else {
        return;
    };
    rig.provision(&[("acme", "enabled"), ("globex", "enabled")]);
    rig.write_rows("acme");
    rig.write_rows("globex");
    let probe = rig.probe("acme");
    rig.haproxy.kill9();
    rig.wait_readyz(503, "not ready: haproxy");
    // An access flip while HAProxy is down goes to the files it will start from.
    let config = rig.layout.config.clone();
    let out = agent(&[
        "-c",
        config.to_str().unwrap(),
        "access",
        "disable",
        "globex",
    ]);
    assert!(out.status.success(), "{out:?}");
    rig.haproxy = rig.layout.start_haproxy();
    rig.assert_recovered(&["acme"], RECOVER);
    let (ok, _, err) = rig.sql("globex", "select 1");
    assert!(!ok && err.contains("is not available"), "{err}");
    let out = agent(&["-c", config.to_str().unwrap(), "access", "enable", "globex"]);
    assert!(out.status.success(), "{out:?}");
    rig.assert_recovered(&["acme", "globex"], RECOVER);
    rig.wait_readyz(200, "\"ready\":true");
    probe.finish("HAProxy kill -9, started again from its files");
}

#[test]
fn the_agent_killed_while_creating_a_tenant_then_started_again() {
    let Some(mut rig) = Rig::new(None) else {
        return;
    };
    rig.provision(&[("acme", "enabled")]);
    rig.write_rows("acme");
    let probe = rig.probe("acme");
    replace_file(
        &rig.tenants_file(),
        &tenants(&[("acme", "enabled"), ("globex", "enabled")]),
    );
    let name = format!("{}-globex", rig.env.prefix);
    wait_for("globex's container", PROVISION, || {
        docker(&["inspect", &name]).status.success().then_some(())
    });
    rig.agent().kill9();
    let (ok, _, err) = rig.sql("globex", "select 1");
    assert!(!ok && err.contains("is not available"), "{err}");
    rig.start_agent();
    rig.wait_answering("globex", PROVISION);
    rig.write_rows("globex");
    rig.assert_recovered(&["acme", "globex"], RECOVER);
    assert_eq!(rig.env.containers().len(), 2, "one container per tenant");
    probe.finish("pgs-agent kill -9 while creating a tenant, started again");
}

#[test]
fn a_tenant_server_oom_killed_by_its_memory_limit_comes_back() {
    let Some(mut rig) = Rig::new(None) else {
        return;
    };
    rig.provision(&[("acme", "enabled")]);
    rig.write_rows("acme");
    let name = format!("{}-acme", rig.env.prefix);
    // A session whose backend will ask for far more than the 128m limit.
    let mut hog = Session::open(&rig.conninfo("acme"), &rig.password("acme"));
    // The kernel kills the largest process of the container's cgroup, normally that backend
    // (PostgreSQL then restarts its children, and the container stays up). Make the server
    // itself the choice, as when its shared memory dominates, so the container dies.
    let pid = docker(&["inspect", "-f", "{{.State.Pid}}", &name]);
    let pid = String::from_utf8_lossy(&pid.stdout).trim().to_owned();
    std::fs::write(format!("/proc/{pid}/oom_score_adj"), "1000").unwrap();
    let since = docker(&["system", "info", "--format", "{{.SystemTime}}"]);
    let since = String::from_utf8_lossy(&since.stdout).trim().to_owned();
    let probe = rig.probe("acme");
    let mark = rig.agent().mark();
    assert_eq!(
        hog.query("select length(repeat('x', 600 * 1024 * 1024))"),
        None,
        "the query must not survive the OOM kill"
    );
    // The agent hears of the death at once. Docker's restart policy (unless-stopped) usually
    // starts the container again first; if not, the agent's pass does.
    rig.agent()
        .wait_for_log_after(mark, "tenant server died", RECOVER);
    rig.assert_recovered(&["acme"], RECOVER);
    let until = docker(&["system", "info", "--format", "{{.SystemTime}}"]);
    let until = String::from_utf8_lossy(&until.stdout).trim().to_owned();
    let oom = docker(&[
        "events",
        "--since",
        &since,
        "--until",
        &until,
        "--filter",
        &format!("container={name}"),
        "--filter",
        "event=oom",
        "--format",
        "{{.Action}}",
    ]);
    assert!(
        String::from_utf8_lossy(&oom.stdout).contains("oom"),
        "no OOM event for {name}: {oom:?}"
    );
    rig.assert_recovered(&["acme"], RECOVER);
    probe.finish("tenant server OOM-killed by its memory limit");
}

#[test]
fn a_garbage_tenants_file_changes_nothing() {
    let Some(mut rig) = Rig::new(None) else {
        return;
    };
    rig.provision(&[("acme", "enabled"), ("globex", "enabled")]);
    rig.write_rows("acme");
    rig.write_rows("globex");
    let good = std::fs::read_to_string(rig.tenants_file()).unwrap();
    let access_map = rig.root().join("haproxy/maps/access.map");
    let map_before = std::fs::read(&access_map).unwrap();
    let probe = rig.probe("acme");
    let mark = rig.agent().mark();
    replace_file(
        &rig.tenants_file(),
        "{\"version\": 1, \"tenants\": {garbage",
    );
    rig.agent().wait_for_log_after(mark, "pass failed", RECOVER);
    rig.wait_readyz(503, "last_reconcile");
    assert_eq!(std::fs::read(&access_map).unwrap(), map_before);
    rig.assert_recovered(&["acme", "globex"], RECOVER);
    let mark = rig.agent().mark();
    replace_file(&rig.tenants_file(), &good);
    rig.agent().wait_for_log_after(mark, "errors=0", RECOVER);
    rig.wait_readyz(200, "\"ready\":true");
    rig.assert_recovered(&["acme", "globex"], RECOVER);
    probe.finish("tenants file replaced by garbage");
}

/// A small tmpfs mounted for a layout, unmounted on drop.
struct SmallDisk(PathBuf);

impl SmallDisk {
    fn mount(at: &Path, size: &str) -> SmallDisk {
        std::fs::create_dir_all(at).unwrap();
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0755"),
                "tmpfs",
            ])
            .arg(at)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mount a tmpfs at {}: {out:?}",
            at.display()
        );
        SmallDisk(at.to_owned())
    }

    /// Writes a file until the disk is full; returns it.
    fn fill(&self) -> PathBuf {
        let path = self.0.join("filler");
        let mut f = std::fs::File::create(&path).unwrap();
        let chunk = vec![0u8; 64 * 1024];
        loop {
            if let Err(e) = f.write_all(&chunk) {
                assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
                break;
            }
        }
        // Whatever the page cache still holds, down to the last block.
        while f.write_all(&[0u8; 512]).is_ok() && f.sync_all().is_ok() {}
        path
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        // The temp dir around it could not remove its mount point.
        let _ = std::fs::remove_dir(&self.0);
        if let Some(parent) = self.0.parent() {
            let _ = std::fs::remove_dir_all(parent);
        }
    }
}

#[test]
fn a_full_disk_keeps_the_last_good_tenants_file_and_maps() {
    if unsafe { libc::geteuid() } != 0 {
        assert!(
            std::env::var_os("PGS_REQUIRE_INTEGRATION").is_none(),
            "mounting a tmpfs needs root"
        );
        return;
    }
    // The layout lives on an 8 MiB tmpfs; the logs stay outside it.
    let dir = temp_dir();
    let root = dir.path().join("pgs");
    let disk = SmallDisk::mount(&root, "8m");
    let (port, api_port) = (free_port(), free_port());
    let out = agent(&[
        "init",
        root.to_str().unwrap(),
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--api-listen",
        &format!("127.0.0.1:{api_port}"),
    ]);
    assert!(out.status.success(), "init: {out:?}");
    let layout = Layout {
        config: root.join("pgs.toml"),
        port,
        api_port,
        dir,
    };
    let Some(mut rig) = Rig::on(layout, None) else {
        return;
    };
    rig.provision(&[("acme", "enabled"), ("globex", "enabled")]);
    rig.write_rows("acme");
    rig.write_rows("globex");
    let tenants_file = rig.tenants_file();
    let access_map = rig.root().join("haproxy/maps/access.map");
    let good_tenants = std::fs::read(&tenants_file).unwrap();
    let good_map = std::fs::read(&access_map).unwrap();
    // Written before the disk fills: a rename needs no space.
    let next = rig.root().join("tenants.next");
    std::fs::write(
        &next,
        tenants(&[("acme", "enabled"), ("globex", "disabled")]),
    )
    .unwrap();
    let probe = rig.probe("acme");
    let filler = disk.fill();

    // The tenants file: an edit fails with the reason, and the file is as it was.
    let config = rig.layout.config.clone();
    let out = agent(&["-c", config.to_str().unwrap(), "access", "disable", "acme"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "an edit on a full disk must fail");
    assert!(err.contains("No space left on device"), "{err}");
    assert_eq!(std::fs::read(&tenants_file).unwrap(), good_tenants);

    // A map: the pass reports the failure, the last good map file stays whole.
    // A second link keeps the replaced file's blocks in use: the rename frees no space.
    std::fs::hard_link(&tenants_file, rig.root().join("tenants.before")).unwrap();
    let mark = rig.agent().mark();
    std::fs::rename(&next, &tenants_file).unwrap();
    let log = rig
        .agent()
        .wait_for_log_after(mark, "No space left on device", RECOVER);
    assert!(log.contains("access.map"), "{log}");
    assert_eq!(std::fs::read(&access_map).unwrap(), good_map);
    let leftovers: Vec<_> = std::fs::read_dir(access_map.parent().unwrap())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp."))
        .collect();
    assert!(leftovers.is_empty(), "temp files left: {leftovers:?}");
    rig.wait_readyz(503, "No space left on device");
    rig.assert_recovered(&["acme"], RECOVER);

    // Space again: the next pass writes the files, and everything converges.
    std::fs::remove_file(&filler).unwrap();
    let mark = rig.agent().mark();
    rig.agent().signal(libc::SIGHUP);
    rig.agent().wait_for_log_after(mark, "errors=0", RECOVER);
    assert!(!String::from_utf8_lossy(&std::fs::read(&access_map).unwrap()).contains("globex"));
    let out = agent(&["-c", config.to_str().unwrap(), "access", "enable", "globex"]);
    assert!(out.status.success(), "{out:?}");
    rig.assert_recovered(&["acme", "globex"], RECOVER);
    rig.wait_readyz(200, "\"ready\":true");
    probe.finish("layout's disk full while writing the tenants file and a map");
    drop(rig);
    drop(disk);
}
