//! Cancel requests routed by the key the server issued, per-tenant session limits and the
//! per-source throttle of failed startups, against real HAProxy and real PostgreSQL servers
//! (DESIGN.md §12, §13).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::stack::{Options, TwoTenants};
use crate::support::{agent, find_tool, psql, wait_for, Postgres, Session};

/// The two-tenant stack with `acme_fields` in acme's entry and `settings` in pgs.toml.
struct Stack(TwoTenants);

impl std::ops::Deref for Stack {
    type Target = TwoTenants;
    fn deref(&self) -> &TwoTenants {
        &self.0
    }
}

impl Stack {
    fn start(acme_fields: &str, settings: &[(&str, &str)]) -> Option<Stack> {
        TwoTenants::with(Options {
            acme_fields,
            settings,
            ..Options::default()
        })
        .map(Stack)
    }

    fn conninfo(&self, user: &str) -> String {
        self.layout.conninfo(user, "sslmode=disable")
    }

    /// Starts `psql -c SQL` as acme through pgs, in the background.
    fn background_query(&self, sql: &str) -> std::process::Child {
        Command::new(find_tool("psql").unwrap())
            .arg(self.conninfo("acme"))
            .args(["-X", "-c", sql])
            .env("PGPASSWORD", &self.acme.password)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    /// Waits until acme's server runs `needle` in some session.
    fn wait_running(&self, needle: &str) {
        let direct = self.acme.direct();
        wait_for("the query to run", Duration::from_secs(10), || {
            let (ok, out, _) = psql(
                &direct,
                &self.acme.password,
                &format!(
                    "select count(*) from pg_stat_activity where query like '{needle}%' \
                     and state = 'active'"
                ),
            );
            (ok && out == "1").then_some(())
        });
    }
}

fn connections_logged(pg: &Postgres) -> usize {
    pg.log_text().matches("connection received").count()
}

/// psql's Ctrl-C: SIGINT makes it send a CancelRequest on a new connection, then wait.
fn interrupt_and_wait(mut child: std::process::Child) -> (String, Duration) {
    let started = Instant::now();
    unsafe {
        libc::kill(child.id() as i32, libc::SIGINT);
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "psql did not finish after the cancel"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let took = started.elapsed();
    let out = child.wait_with_output().unwrap();
    (
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
        took,
    )
}

#[test]
fn ctrl_c_cancels_the_query_even_across_a_reload() {
    let Some(s) = Stack::start("", &[]) else {
        return;
    };
    // Plain: psql's SIGINT sends the cancel; the query ends at once.
    let child = s.background_query("select pg_sleep(30)");
    s.wait_running("select pg_sleep(30)");
    let (out, took) = interrupt_and_wait(child);
    assert!(
        out.contains("canceling statement due to user request"),
        "{out}"
    );
    assert!(took < Duration::from_secs(10), "took {took:?}");

    // A reload between the query's start and the cancel: a new backend, so `sync` reloads;
    // it carries the keys of open sessions into the new worker.
    let child = s.background_query("select pg_sleep(29)");
    s.wait_running("select pg_sleep(29)");
    let worker = s.haproxy.worker_pid();
    let text = std::fs::read_to_string(s.layout.root().join("tenants.json")).unwrap();
    s.layout.write_tenants(&text.replacen(
        r#""tenants": {"#,
        r#""tenants": {"initech": {"access": "enabled", "external": {"address": "127.0.0.1:1"}},"#,
        1,
    ));
    let out = agent(&["-c", s.layout.config.to_str().unwrap(), "sync"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("HAProxy reloaded")
            && text.contains("cancel keys of open sessions carried over: 2"),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_ne!(s.haproxy.worker_pid(), worker);
    let (out, took) = interrupt_and_wait(child);
    assert!(
        out.contains("canceling statement due to user request"),
        "{out}"
    );
    assert!(took < Duration::from_secs(10), "took {took:?}");
    let log = s.haproxy.log_text();
    assert!(log.contains("pgs_acme/acme"), "{log}");
}

const CANCEL_REQUEST: u32 = 80877102;

fn cancel_request(pid: u32, secret: &[u8]) -> Vec<u8> {
    let mut m = Vec::new();
    m.extend((12 + secret.len() as u32).to_be_bytes());
    m.extend(CANCEL_REQUEST.to_be_bytes());
    m.extend(pid.to_be_bytes());
    m.extend(secret);
    m
}

/// Sends a raw CancelRequest through pgs; returns whether pgs closed it without a reply.
fn send_cancel(port: u16, bytes: &[u8]) -> bool {
    let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    c.write_all(bytes).unwrap();
    let mut buf = [0u8; 64];
    matches!(c.read(&mut buf), Ok(0))
}

#[test]
fn forged_keys_are_dropped_and_cancels_never_cross_tenants() {
    let Some(s) = Stack::start("", &[]) else {
        return;
    };
    // A session on acme with a known backend pid; the right pid with a wrong secret, and a
    // made-up key (protocol 3.0 and 3.2 lengths), are dropped in HAProxy.
    let mut session = Session::open(&s.conninfo("acme"), &s.acme.password);
    let pid: u32 = session
        .query("select pg_backend_pid()")
        .unwrap()
        .parse()
        .unwrap();
    let (acme_before, globex_before) = (connections_logged(&s.acme), connections_logged(&s.globex));
    let sessions = s.server_sessions();
    for forged in [
        cancel_request(pid, &[1, 2, 3, 4]),
        cancel_request(12345, &[9, 9, 9, 9]),
        cancel_request(pid, &[7u8; 32]),
    ] {
        assert!(
            send_cancel(s.layout.port, &forged),
            "a forged cancel got a reply"
        );
    }
    assert_eq!(
        s.server_sessions(),
        sessions,
        "a forged cancel reached a server"
    );
    assert_eq!(
        connections_logged(&s.acme),
        acme_before,
        "acme saw a forged cancel"
    );
    assert_eq!(connections_logged(&s.globex), globex_before);
    assert_eq!(session.query("select 'alive'").as_deref(), Some("alive"));
    let log = s.haproxy.log_text();
    assert!(log.contains("reason=cancel_unknown_key"), "{log}");

    // A real cancel of acme's query reaches acme's server only.
    let globex_before = connections_logged(&s.globex);
    let child = s.background_query("select pg_sleep(28)");
    s.wait_running("select pg_sleep(28)");
    let (out, _) = interrupt_and_wait(child);
    assert!(
        out.contains("canceling statement due to user request"),
        "{out}"
    );
    assert_eq!(
        connections_logged(&s.globex),
        globex_before,
        "globex saw acme's cancel"
    );
}

#[test]
fn a_tenants_session_limit_refuses_the_next_with_53300_and_spares_others() {
    let Some(s) = Stack::start(r#""connection_limit": 2,"#, &[]) else {
        return;
    };
    let _first = Session::open(&s.conninfo("acme"), &s.acme.password);
    let query = s.background_query("select pg_sleep(27)");
    s.wait_running("select pg_sleep(27)");
    let (ok, _, err) = psql(&s.conninfo("acme"), &s.acme.password, "select 1");
    assert!(
        !ok && err.contains(r#"too many connections for tenant "acme""#),
        "{err}"
    );
    let log = s.haproxy.log_text();
    assert!(log.contains("reason=too_many_connections"), "{log}");
    // The code drivers and pools treat as transient.
    let (code, _) = crate::support::raw_startup_error(s.layout.port, "acme");
    assert_eq!(code, "53300");
    // Another tenant is not affected.
    let (ok, out, err) = psql(
        &s.conninfo("globex"),
        &s.globex.password,
        "show cluster_name",
    );
    assert!(ok && out == "pg_globex", "{err}");
    // A cancel is not a session: it gets through while acme is at its limit.
    let (out, _) = interrupt_and_wait(query);
    assert!(
        out.contains("canceling statement due to user request"),
        "{out}"
    );
    // A slot freed is a slot for the next client.
    wait_for("a free slot", Duration::from_secs(10), || {
        psql(&s.conninfo("acme"), &s.acme.password, "select 1")
            .0
            .then_some(())
    });
}

#[test]
fn failed_startups_from_one_source_are_throttled_for_a_while() {
    let Some(s) = Stack::start(
        "",
        &[
            ("failed_startups = 20", "failed_startups = 3"),
            (
                "failed_startups_window = \"60s\"",
                "failed_startups_window = \"2s\"",
            ),
        ],
    ) else {
        return;
    };
    // Two unknown tenants and one wrong password (28P01, seen in the server's reply).
    for user in ["nosuch", "other"] {
        let (ok, _, err) = psql(&s.conninfo(user), "x", "select 1");
        assert!(!ok && err.contains("is not available"), "{err}");
    }
    let (ok, _, err) = psql(&s.conninfo("acme"), "wrong password", "select 1");
    assert!(
        !ok && err.contains("password authentication failed"),
        "{err}"
    );
    let (ok, _, err) = psql(&s.conninfo("nosuch"), "x", "select 1");
    assert!(!ok && err.contains("is not available"), "{err}");
    // Past the threshold: one clean 28000, even for the right password.
    let (ok, _, err) = psql(&s.conninfo("acme"), &s.acme.password, "select 1");
    assert!(
        !ok && err.contains("too many failed connection attempts"),
        "{err}"
    );
    // Once the window has passed, the source is welcome again.
    wait_for("the throttle to lift", Duration::from_secs(15), || {
        psql(&s.conninfo("acme"), &s.acme.password, "select 1")
            .0
            .then_some(())
    });
}
