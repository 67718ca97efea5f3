//! Sleep and wake of managed tenants, end to end: the real daemon (`pgs-agent run`), real
//! HAProxy, real containers of the tenant image, real psql through the public port. A tenant
//! goes to sleep when idle (its container runs no PostgreSQL) and the next client is held,
//! woken and answered with its data; many clients share one start; a client racing a sleep is
//! served; a dead agent, a wake past its deadline and a disabled tenant give clean refusals.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use pgs_agent::settings::{Agent, Paths};
use pgs_agent::tenants::TenantId;

use crate::support::agent::{runtime_map, AgentProcess};
use crate::support::docker::docker;
use crate::support::managed::Managed;
use crate::support::{find_tool, raw_startup_error, wait_for, Session};

/// Long enough for a start on a loaded two-core machine.
const SLOW: Duration = Duration::from_secs(60);
const READY: &str = "database system is ready to accept connections";

/// A managed layout with its daemon running.
struct World {
    /// Dropped first: the daemon stops before HAProxy and the containers go.
    agent: Option<AgentProcess>,
    m: Managed,
    paths: Paths,
    /// How many agents this world started (each logs to its own file).
    agents: usize,
}

impl World {
    /// A layout with `[sleep]` settings replaced as given (`("check_every", "\"1s\"")`), the
    /// tenants `ids` created and enabled, then the daemon started.
    fn start(sleep: &[(&str, &str)], ids: &[&str]) -> Option<World> {
        let m = Managed::start()?;
        // Idle passes every second: tests wait for sleeps in seconds, not minutes.
        let mut edits: Vec<(&str, &str)> = vec![("check_every", "\"1s\"")];
        edits.extend_from_slice(sleep);
        for (key, value) in edits {
            m.layout.edit_settings(|s| {
                let start = s.find("\n[sleep]\n").expect("a [sleep] section");
                let at = start + s[start..].find(&format!("\n{key} = ")).expect(key) + 1;
                let end = at + s[at..].find('\n').unwrap();
                format!("{}{key} = {value}{}", &s[..at], &s[end..])
            });
        }
        for id in ids {
            m.ok(&["tenant", "create", id, "--enable", "--memory", "128m"]);
        }
        let paths = Agent::load(&m.layout.config).unwrap().paths;
        let mut w = World {
            m,
            paths,
            agent: None,
            agents: 0,
        };
        w.start_agent();
        Some(w)
    }

    fn start_agent(&mut self) {
        self.agents += 1;
        let log = self
            .m
            .layout
            .dir
            .path()
            .join(format!("agent-{}.log", self.agents));
        self.agent = Some(AgentProcess::start(&self.m.layout.config, 600, &log));
    }

    fn agent(&mut self) -> &mut AgentProcess {
        self.agent.as_mut().expect("the agent runs")
    }

    /// Runs `sql` through HAProxy as tenant `id` with real psql; Ok(stdout) or Err(stderr).
    /// The connect timeout covers a wake on a loaded machine.
    fn sql(&self, id: &str, sql: &str) -> Result<String, String> {
        let out = Command::new(find_tool("psql").expect("psql"))
            .arg(self.m.layout.conninfo(id, &format!("dbname={id}")))
            .args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-c", sql])
            .env("PGPASSWORD", self.m.password(id))
            .env("PGCONNECT_TIMEOUT", "60")
            .env_remove("PGSERVICE")
            .stdin(Stdio::null())
            .output()
            .expect("run psql");
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
        }
    }

    /// `tenant sleep ID` (the CLI asks the daemon): Ok(stdout) or Err(stderr).
    fn tenant(&self, verb: &str, id: &str) -> Result<String, String> {
        let out = self.m.run(&["tenant", verb, id]);
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// The asleep map file's value for `id` (`light`, `deep`, `waking`), if any.
    fn asleep_on_file(&self, id: &str) -> Option<String> {
        let text = std::fs::read_to_string(&self.paths.asleep_map).unwrap_or_default();
        text.lines().find_map(|l| {
            let mut f = l.split_whitespace();
            (f.next() == Some(id)).then(|| f.next().unwrap_or_default().to_owned())
        })
    }

    /// The running HAProxy's asleep map value for `id`, if any.
    fn asleep_in_haproxy(&self, id: &str) -> Option<String> {
        let map = wait_for("HAProxy's Runtime API", Duration::from_secs(10), || {
            runtime_map(&self.m.haproxy, &self.paths.asleep_map)
        });
        map.into_iter().find(|(k, _)| k == id).map(|(_, v)| v)
    }

    fn socket(&self, id: &str) -> PathBuf {
        self.paths
            .tenant_socket_dir(&TenantId::parse(id).unwrap())
            .join(".s.PGSQL.5432")
    }

    /// Whether any PostgreSQL process runs in the tenant's container (`docker top`, by
    /// executable name: the supervisor is bash, its idle wait is sleep).
    fn postgres_runs(&self, id: &str) -> bool {
        let out = docker(&["top", &self.m.container(id), "-o", "pid,comm"]);
        out.status.success()
            && String::from_utf8_lossy(&out.stdout)
                .lines()
                .skip(1)
                .any(|l| l.split_whitespace().nth(1) == Some("postgres"))
    }

    fn container_runs(&self, id: &str) -> bool {
        let out = docker(&["inspect", "-f", "{{.State.Running}}", &self.m.container(id)]);
        String::from_utf8_lossy(&out.stdout).trim() == "true"
    }

    /// How often the container's PostgreSQL said it was ready (once per start).
    fn starts(&self, id: &str) -> usize {
        let out = docker(&["logs", &self.m.container(id)]);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        text.matches(READY).count()
    }

    /// `tenant show ID --json`'s `sleep` field.
    fn shown_state(&self, id: &str) -> String {
        let v: serde_json::Value =
            serde_json::from_str(&self.m.ok(&["tenant", "show", id, "--json"])).unwrap();
        v["sleep"].as_str().unwrap_or("-").to_owned()
    }

    /// The SLEEP column of `tenant list` for `id`.
    fn listed_state(&self, id: &str) -> String {
        let list = self.m.ok(&["tenant", "list"]);
        let header: Vec<&str> = list.lines().next().unwrap().split_whitespace().collect();
        let col = header
            .iter()
            .position(|h| *h == "SLEEP")
            .expect("SLEEP column");
        list.lines()
            .find(|l| l.split_whitespace().next() == Some(id))
            .and_then(|l| l.split_whitespace().nth(col).map(str::to_owned))
            .unwrap_or_else(|| panic!("{id} not listed:\n{list}"))
    }

    /// Waits until `id` is asleep: in the map file and HAProxy's map, no PostgreSQL in its
    /// container, its socket gone.
    fn wait_asleep(&self, id: &str) {
        wait_for(&format!("{id} asleep"), SLOW, || {
            (self.asleep_on_file(id).is_some()
                && self.asleep_in_haproxy(id).is_some()
                && !self.postgres_runs(id)
                && !self.socket(id).exists())
            .then_some(())
        });
    }

    /// Asserts `id` is awake everywhere it shows.
    fn assert_awake(&self, id: &str) {
        assert_eq!(self.asleep_on_file(id), None, "{id} in the asleep map file");
        assert_eq!(
            self.asleep_in_haproxy(id),
            None,
            "{id} in HAProxy's asleep map"
        );
        assert!(
            self.postgres_runs(id),
            "{id}'s container runs no PostgreSQL"
        );
        assert!(self.socket(id).exists(), "{id}'s socket is missing");
        assert_eq!(self.shown_state(id), "awake");
    }

    /// Puts `id` to sleep by hand and waits until it is.
    fn put_to_sleep(&self, id: &str) {
        let out = self.tenant("sleep", id).expect("tenant sleep");
        assert!(out.contains("asleep"), "{out}");
        self.wait_asleep(id);
    }

    /// `/metrics` of the daemon's API.
    fn metrics(&self) -> String {
        use std::io::{Read, Write};
        let token = self.m.secret("api-token");
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.m.layout.api_port))
            .expect("connect to the API");
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        write!(
            s,
            "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut reply = String::new();
        s.read_to_string(&mut reply).unwrap();
        assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
        reply
    }

    /// A sample of `/metrics`: the line starting with `name` (labels included), its value; 0
    /// when absent (a counter family with no sample yet).
    fn metric(&self, sample: &str) -> f64 {
        self.metrics()
            .lines()
            .find(|l| l.starts_with(sample) && l[sample.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(0.0)
    }

    /// The agent's "woke" log lines for `id` so far (one per start it did).
    fn woke_lines(&self, id: &str) -> usize {
        let text = self.agent.as_ref().expect("agent").log_text();
        text.lines()
            .filter(|l| l.contains(" woke") && l.contains(&format!("tenant={id}")))
            .count()
    }
}

/// Rewrites the tenant's entry in the tenants file with `field = value`.
fn set_tenant_field(w: &World, id: &str, field: &str, value: serde_json::Value) {
    let path = w.m.layout.root().join("tenants.json");
    let mut doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    doc["tenants"][id][field] = value;
    crate::support::agent::replace_file(&path, &serde_json::to_string_pretty(&doc).unwrap());
}

#[test]
fn an_idle_tenant_sleeps_and_its_next_client_wakes_it_with_its_data() {
    let Some(mut w) = World::start(&[], &["acme", "globex"]) else {
        return;
    };
    w.sql(
        "acme",
        "create table notes(v text); insert into notes values ('before the sleep')",
    )
    .unwrap();
    let mark = w.agent().mark();
    set_tenant_field(&w, "acme", "idle_timeout", "2s".into());
    w.agent()
        .wait_for_log_after(mark, "pass finished", Duration::from_secs(30));

    // Asleep by itself: no PostgreSQL in the container, which stays up; the socket is gone;
    // both maps and every view say so.
    w.wait_asleep("acme");
    assert!(
        w.container_runs("acme"),
        "a light sleep keeps the container"
    );
    assert_eq!(w.asleep_on_file("acme").as_deref(), Some("light"));
    assert_eq!(w.asleep_in_haproxy("acme").as_deref(), Some("light"));
    assert_eq!(w.shown_state("acme"), "asleep");
    assert_eq!(w.listed_state("acme"), "asleep");
    assert!(w
        .m
        .ok(&["tenant", "show", "acme"])
        .contains("sleep     asleep"));
    assert_eq!(
        w.metric("pgs_tenants_by_sleep_state{state=\"asleep\"}"),
        1.0
    );
    // A tenant without an idle timeout stays awake.
    w.assert_awake("globex");
    assert_eq!(w.listed_state("globex"), "awake");

    // A reload (a new tenant) keeps it asleep: the new worker loads the map file.
    let pid = w.m.haproxy.worker_pid();
    w.m.ok(&[
        "tenant", "create", "initech", "--enable", "--memory", "128m",
    ]);
    assert_ne!(w.m.haproxy.worker_pid(), pid, "HAProxy reloaded");
    assert_eq!(w.asleep_in_haproxy("acme").as_deref(), Some("light"));
    assert!(!w.postgres_runs("acme"));

    // The next client is held, the server woken, and the client answered with the data.
    assert_eq!(
        w.sql("acme", "select v from notes").unwrap(),
        "before the sleep"
    );
    w.assert_awake("acme");
    assert_eq!(w.listed_state("acme"), "awake");
    assert!(w.metric("pgs_wakes_total") >= 1.0);
    assert!(w.metric("pgs_sleeps_total") >= 1.0);
    // Idle again, asleep again; and woken again.
    w.wait_asleep("acme");
    assert_eq!(w.sql("acme", "select count(*) from notes").unwrap(), "1");
}

#[test]
fn an_open_session_keeps_its_tenant_awake() {
    let Some(w) = World::start(&[], &["acme"]) else {
        return;
    };
    let mut session = Session::open(
        &w.m.layout.conninfo("acme", "dbname=acme"),
        &w.m.password("acme"),
    );
    // By hand: refused while the session is open.
    let err = w.tenant("sleep", "acme").unwrap_err();
    assert!(err.contains("busy"), "{err}");
    w.assert_awake("acme");

    // Nor does the idle timeout put it to sleep: several idle passes later it is awake and
    // the session still answers.
    set_tenant_field(&w, "acme", "idle_timeout", "1s".into());
    std::thread::sleep(Duration::from_secs(5));
    w.assert_awake("acme");
    assert_eq!(session.query("select 41 + 1").as_deref(), Some("42"));

    // Closed: now it sleeps (so the idle timeout was in force all along).
    drop(session);
    w.wait_asleep("acme");
}

#[test]
fn twenty_clients_at_once_wake_a_sleeping_tenant_with_one_start() {
    let Some(w) = World::start(&[], &["acme"]) else {
        return;
    };
    w.put_to_sleep("acme");
    let starts = w.starts("acme");
    let wakes = w.metric("pgs_wakes_total");
    let woke = w.woke_lines("acme");

    let barrier = Arc::new(Barrier::new(20));
    let w = Arc::new(w);
    let clients: Vec<_> = (0..20)
        .map(|i| {
            let (w, barrier) = (Arc::clone(&w), Arc::clone(&barrier));
            std::thread::spawn(move || {
                barrier.wait();
                w.sql("acme", &format!("select {i}"))
            })
        })
        .collect();
    for (i, c) in clients.into_iter().enumerate() {
        assert_eq!(c.join().unwrap(), Ok(i.to_string()), "client {i}");
    }
    // One start: PostgreSQL said ready once more, the agent counted and logged one wake.
    wait_for("the start in the container's log", SLOW, || {
        (w.starts("acme") > starts).then_some(())
    });
    assert_eq!(w.starts("acme"), starts + 1, "one start for twenty clients");
    assert_eq!(w.metric("pgs_wakes_total"), wakes + 1.0);
    assert_eq!(w.woke_lines("acme"), woke + 1);
    w.assert_awake("acme");
}

#[test]
fn clients_connecting_while_the_tenant_goes_to_sleep_are_served() {
    let Some(w) = World::start(&[], &["acme"]) else {
        return;
    };
    let w = Arc::new(w);
    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicUsize::new(0));
    // Two clients connecting in a loop, with short pauses of varying length so that sleeps
    // find both open sessions and none.
    let clients: Vec<_> = (0..2)
        .map(|c| {
            let (w, stop, served) = (Arc::clone(&w), Arc::clone(&stop), Arc::clone(&served));
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let got = w.sql("acme", &format!("select {n}"));
                    assert_eq!(got, Ok(n.to_string()), "client {c}, connection {n}");
                    served.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis((n * 37 + c * 50) % 120));
                }
            })
        })
        .collect();
    // Clients that came while a sleep was under way: HAProxy held them, their wake queued
    // behind the sleep and then started the server again (`queued_ms` > 0, `start_ms` > 0).
    let held_through_a_sleep = || {
        let field = |l: &str, name: &str| -> Option<u64> {
            let at = l.find(&format!("{name}="))? + name.len() + 1;
            l[at..]
                .split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        };
        w.m.haproxy
            .log_text()
            .lines()
            .filter(|l| l.contains("pgs: woke tenant=acme"))
            .filter(|l| field(l, "queued_ms") > Some(0) && field(l, "start_ms") > Some(0))
            .count()
    };
    // Twenty rounds, more (up to sixty) until a client has come in the middle of a sleep: on
    // a loaded machine most sleeps may find a session open.
    let (mut asleep, mut busy, mut other) = (0, 0, Vec::new());
    for round in 0..60 {
        if round >= 20 && held_through_a_sleep() > 0 {
            break;
        }
        match w.tenant("sleep", "acme") {
            Ok(out) if out.contains("asleep") => asleep += 1,
            Err(err) if err.contains("busy") => busy += 1,
            got => other.push((round, got)),
        }
        std::thread::sleep(Duration::from_millis(50 + (round % 20) * 10));
    }
    // The clients stop before anything is asserted (they hold the world).
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().expect("every client was answered");
    }
    assert!(other.is_empty(), "sleeps neither done nor busy: {other:?}");
    let held_through_a_sleep = held_through_a_sleep();
    let sleeps = w.metric("pgs_sleeps_total");
    eprintln!(
        "{asleep} sleep requests done ({sleeps} sleeps), {busy} refused as busy, {} clients \
         served, {held_through_a_sleep} held through a sleep",
        served.load(Ordering::Relaxed)
    );
    // The race was run: sleeps happened while clients kept coming, and clients that came in
    // the middle of one were served.
    assert!(sleeps >= 1.0, "no sleep done ({busy} busy)");
    assert!(held_through_a_sleep >= 1, "no client came during a sleep");
    assert!(served.load(Ordering::Relaxed) >= 20);
    assert!(w.metric("pgs_wakes_total") >= 1.0);
    let failures = w
        .metrics()
        .lines()
        .filter(|l| l.starts_with("pgs_wake_failures_total{"))
        .map(str::to_owned)
        .collect::<Vec<_>>();
    assert!(failures.is_empty(), "{failures:?}");
}

#[test]
fn with_the_agent_killed_a_client_gets_57p03_then_the_restarted_agent_wakes_it() {
    // A wake deadline far beyond what a refusal may take: a fast 57P03 is a refusal, not a
    // timeout.
    let Some(mut w) = World::start(&[("wake_timeout", "\"30s\"")], &["acme"]) else {
        return;
    };
    w.put_to_sleep("acme");
    w.agent().kill9();

    let t0 = Instant::now();
    let err = w.sql("acme", "select 1").unwrap_err();
    let waited = t0.elapsed();
    assert!(err.contains("the database system is starting up"), "{err}");
    let (code, message) = raw_startup_error(w.m.layout.port, "acme");
    assert_eq!(
        (code.as_str(), message.as_str()),
        ("57P03", "the database system is starting up")
    );
    assert!(
        waited < Duration::from_secs(30),
        "the refusal waited for the wake deadline ({waited:?})"
    );
    assert!(w
        .m
        .haproxy
        .log_text()
        .contains("pgs: refused tenant=acme reason=wake_agent_unreachable"));
    // Still asleep: nothing started it.
    assert!(!w.postgres_runs("acme"));
    assert!(w.asleep_in_haproxy("acme").is_some());

    w.start_agent();
    assert_eq!(w.sql("acme", "select 7").unwrap(), "7");
    w.assert_awake("acme");
    assert_eq!(w.woke_lines("acme"), 1);
}

#[test]
fn a_disabled_sleeping_tenant_is_refused_and_stays_asleep() {
    let Some(w) = World::start(&[], &["acme"]) else {
        return;
    };
    w.put_to_sleep("acme");
    w.m.ok(&["access", "disable", "acme"]);
    let err = w.sql("acme", "select 1").unwrap_err();
    assert!(err.contains("tenant \"acme\" is not available"), "{err}");
    let (code, _) = raw_startup_error(w.m.layout.port, "acme");
    assert_eq!(code, "28000");
    // Idle passes (every second) come and go; it sleeps on, and no wake was even tried.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(w.asleep_on_file("acme").as_deref(), Some("light"));
    assert!(w.asleep_in_haproxy("acme").is_some());
    assert!(!w.postgres_runs("acme"));
    assert!(!w.socket("acme").exists());
    assert_eq!(w.shown_state("acme"), "asleep");
    assert_eq!(w.woke_lines("acme"), 0);
    // `tenant wake` is refused too.
    let err = w.tenant("wake", "acme").unwrap_err();
    assert!(err.contains("disabled"), "{err}");
    assert!(!w.postgres_runs("acme"));

    // Enabled again, its next client wakes it.
    w.m.ok(&["access", "enable", "acme"]);
    assert_eq!(w.sql("acme", "select 1").unwrap(), "1");
    w.assert_awake("acme");
}

#[test]
fn a_deep_sleeper_has_its_container_stopped_and_a_client_starts_it() {
    let Some(w) = World::start(&[("max_light", "0")], &["acme"]) else {
        return;
    };
    w.sql("acme", "create table t as select 5 as v").unwrap();
    w.put_to_sleep("acme");
    wait_for("acme's container stopped (deep sleep)", SLOW, || {
        (!w.container_runs("acme")
            && w.asleep_on_file("acme").as_deref() == Some("deep")
            && w.asleep_in_haproxy("acme").as_deref() == Some("deep"))
        .then_some(())
    });
    assert!(w
        .m
        .ok(&["tenant", "show", "acme"])
        .contains("(server and container stopped)"));
    assert_eq!(w.metric("pgs_tenants_asleep_deep"), 1.0);

    // Ten clients at once: one container start serves them all.
    let starts = w.starts("acme");
    let w = Arc::new(w);
    let clients: Vec<_> = (0..10)
        .map(|_| {
            let w = Arc::clone(&w);
            std::thread::spawn(move || w.sql("acme", "select v from t"))
        })
        .collect();
    for c in clients {
        assert_eq!(c.join().unwrap(), Ok("5".to_owned()));
    }
    assert!(w.container_runs("acme"));
    w.assert_awake("acme");
    assert_eq!(w.starts("acme"), starts + 1, "one start for ten clients");

    // Deep asleep again, `tenant wake` starts it by hand.
    w.put_to_sleep("acme");
    wait_for("acme's container stopped again", SLOW, || {
        (!w.container_runs("acme")).then_some(())
    });
    let out = w.tenant("wake", "acme").unwrap();
    assert!(out.contains("awake"), "{out}");
    w.assert_awake("acme");
}

#[test]
fn a_wake_past_its_deadline_gives_57p03_in_time_and_is_counted() {
    let Some(w) = World::start(&[("wake_timeout", "\"2s\"")], &["acme"]) else {
        return;
    };
    w.put_to_sleep("acme");
    // The container's supervisor frozen: the agent's signal is queued, PostgreSQL never
    // starts, so the wake runs into its deadline.
    let pid = String::from_utf8(
        docker(&["inspect", "-f", "{{.State.Pid}}", &w.m.container("acme")]).stdout,
    )
    .unwrap()
    .trim()
    .parse::<i32>()
    .unwrap();
    assert!(pid > 0);
    unsafe {
        libc::kill(pid, libc::SIGSTOP);
    }
    let t0 = Instant::now();
    let got = w.sql("acme", "select 1");
    let waited = t0.elapsed();
    unsafe {
        libc::kill(pid, libc::SIGCONT);
    }
    let err = got.unwrap_err();
    assert!(err.contains("the database system is starting up"), "{err}");
    // The deadline (2 s) plus a sanity margin: never a hang past it.
    assert!(
        waited < Duration::from_secs(5),
        "the client waited {waited:?}"
    );
    assert_eq!(
        w.metric("pgs_wake_failures_total{tenant=\"acme\",reason=\"timeout\"}"),
        1.0
    );
    assert!(w.asleep_in_haproxy("acme").is_some());

    // A paused container cannot be started: a quick 57P03 too, counted as start_failed.
    assert!(docker(&["pause", &w.m.container("acme")]).status.success());
    let got = w.sql("acme", "select 1");
    assert!(docker(&["unpause", &w.m.container("acme")])
        .status
        .success());
    let err = got.unwrap_err();
    assert!(err.contains("the database system is starting up"), "{err}");
    assert_eq!(
        w.metric("pgs_wake_failures_total{tenant=\"acme\",reason=\"start_failed\"}"),
        1.0
    );

    // Back to normal, the next client is served.
    assert_eq!(w.sql("acme", "select 1").unwrap(), "1");
    w.assert_awake("acme");
}

#[test]
fn a_sleeping_tenant_stopped_and_started_serves_clients() {
    let Some(w) = World::start(&[], &["acme", "globex"]) else {
        return;
    };
    for id in ["acme", "globex"] {
        w.sql(id, "create table t as select 'kept' as v").unwrap();
        w.put_to_sleep(id);
        w.m.ok(&["tenant", "stop", id]);
        assert!(!w.container_runs(id));
        let err = w.sql(id, "select 1").unwrap_err();
        assert!(
            err.contains(&format!("tenant \"{id}\" is not available")),
            "{err}"
        );
    }
    // acme started again at once; globex once the daemon has forgotten its sleep (a stopped
    // tenant does not sleep).
    w.m.ok(&["tenant", "start", "acme"]);
    assert_eq!(w.sql("acme", "select v from t").unwrap(), "kept");
    wait_for("globex's sleep forgotten", SLOW, || {
        (w.asleep_on_file("globex").is_none() && w.asleep_in_haproxy("globex").is_none())
            .then_some(())
    });
    w.m.ok(&["tenant", "start", "globex"]);
    assert_eq!(w.sql("globex", "select v from t").unwrap(), "kept");
    for id in ["acme", "globex"] {
        w.assert_awake(id);
    }
}

#[test]
fn a_sleeper_whose_container_died_is_started_by_its_next_client() {
    let Some(mut w) = World::start(&[], &["acme"]) else {
        return;
    };
    w.sql("acme", "create table t as select 'kept' as v")
        .unwrap();
    w.put_to_sleep("acme");
    assert!(docker(&["kill", &w.m.container("acme")]).status.success());
    // The daemon sees the container gone and leaves it to the next wake.
    let mark = w.agent().mark();
    w.agent()
        .wait_for_log_after(mark, "pass finished", Duration::from_secs(30));
    assert!(!w.container_runs("acme"));
    assert!(w.asleep_in_haproxy("acme").is_some());
    assert_eq!(w.sql("acme", "select v from t").unwrap(), "kept");
    w.assert_awake("acme");
}

/// Regression: the idle pass brought HAProxy's asleep map up to date from a list it had read
/// before a wake or a sleep changed that map, and then undid the change: a woken tenant was
/// put back in the map (every client then asked the agent again), a sleeping one taken out
/// (clients went to its stopped server), until the next pass.
#[test]
fn haproxy_asleep_map_follows_every_sleep_and_wake_during_idle_passes() {
    let Some(w) = World::start(&[], &["acme"]) else {
        return;
    };
    let w = Arc::new(w);
    // A stale entry lasts until the next pass (a second): look a little after each change.
    let settle = Duration::from_millis(200);
    for round in 0..10 {
        let out = w.tenant("sleep", "acme").expect("tenant sleep");
        assert!(out.contains("asleep"), "{out}");
        std::thread::sleep(settle);
        assert!(
            w.asleep_in_haproxy("acme").is_some(),
            "round {round}: asleep, but not in HAProxy's asleep map"
        );
        // Many clients at once keep HAProxy busy while the idle pass reads its map.
        let clients: Vec<_> = (0..10)
            .map(|i| {
                let w = Arc::clone(&w);
                std::thread::spawn(move || w.sql("acme", &format!("select {i}")))
            })
            .collect();
        for (i, c) in clients.into_iter().enumerate() {
            assert_eq!(c.join().unwrap(), Ok(i.to_string()), "round {round}");
        }
        std::thread::sleep(settle);
        assert_eq!(
            w.asleep_in_haproxy("acme"),
            None,
            "round {round}: awake, but still in HAProxy's asleep map"
        );
    }
}
