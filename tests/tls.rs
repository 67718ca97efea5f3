//! TLS to clients, terminated by real HAProxy (DESIGN.md §8): real clients (psql with Debian's
//! libpq 15, psycopg with libpq ≥ 17 for direct SSL) to real PostgreSQL servers, raw-socket
//! refusals that must not reach a backend, and certificates renewed without a reload.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use crate::support::agent::{master_reloads, AgentProcess};
use crate::support::tls::{self, TestCerts, DOMAIN};
use crate::support::{
    agent, agent_ok, have_tools, psql, temp_dir, wait_for, Haproxy, Layout, Postgres, Session,
};

/// `acme` (unix socket, TLS optional) and `globex` (loopback TCP, `"tls": "required"`), both
/// enabled, behind a layout made with `init --tls-cert ... --tls-domain db.test`; a 1 s
/// startup timeout.
struct TlsStack {
    haproxy: Haproxy,
    acme: Postgres,
    globex: Postgres,
    layout: Layout,
    certs: TestCerts,
}

impl TlsStack {
    fn start(mode: &str) -> Option<TlsStack> {
        if !have_tools(&[
            "haproxy",
            "psql",
            "initdb",
            "postgres",
            "pg_isready",
            "openssl",
        ]) {
            return None;
        }
        if tls::python().is_none() {
            let msg = "no test venv with psycopg (scripts/install-deps.sh --tests makes it)";
            assert!(
                std::env::var_os("PGS_REQUIRE_INTEGRATION").is_none(),
                "{msg}"
            );
            eprintln!("skipping: {msg}");
            return None;
        }
        let dir = temp_dir();
        let certs = TestCerts::new(dir.path());
        let layout = Layout::init_with(
            dir,
            &[
                "--tls-cert",
                certs.server_pem.to_str().unwrap(),
                "--tls-domain",
                DOMAIN,
                "--tls-mode",
                mode,
            ],
        );
        layout.edit_settings(|s| s.replace("startup_timeout = \"5s\"", "startup_timeout = \"1s\""));
        let acme = Postgres::start(layout.dir.path(), "pg_acme", "acme", None);
        let globex = Postgres::start(
            layout.dir.path(),
            "pg_globex",
            "globex",
            Some(crate::support::free_port()),
        );
        layout.write_tenants(&format!(
            r#"{{"version": 1, "tenants": {{
                "acme":   {{"access": "enabled", "external": {{"address": "{}"}}}},
                "globex": {{"access": "enabled", "tls": "required",
                            "external": {{"address": "127.0.0.1:{}"}}}}
            }}}}"#,
            acme.socket_path().display(),
            globex.port
        ));
        layout.render();
        let haproxy = layout.start_haproxy();
        Some(TlsStack {
            haproxy,
            acme,
            globex,
            layout,
            certs,
        })
    }

    fn password(&self, user: &str) -> &str {
        match user {
            "acme" => &self.acme.password,
            "globex" => &self.globex.password,
            _ => "nope",
        }
    }

    fn cert_file(&self) -> PathBuf {
        self.layout.root().join("tls/server.pem")
    }

    /// psql (libpq 15) through pgs as `user`, with `extra` conninfo.
    fn psql(&self, user: &str, extra: &str, sql: &str) -> (bool, String, String) {
        psql(&self.layout.conninfo(user, extra), self.password(user), sql)
    }

    /// Runs tls_client.py and returns its JSON report.
    fn client(&self, args: &[&str]) -> Value {
        let out = tls::tls_client(args);
        let text = String::from_utf8_lossy(&out.stdout);
        serde_json::from_str(text.trim()).unwrap_or_else(|e| {
            panic!(
                "tls_client.py {args:?}: {e}: {text}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
    }

    /// A psycopg (libpq ≥ 17) query through pgs.
    fn libpq(&self, user: &str, negotiation: &str, sslmode: &str, host: &str, sql: &str) -> Value {
        let out = std::process::Command::new(tls::python().unwrap())
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/tls_client.py"))
            .args([
                "libpq",
                &self.layout.port.to_string(),
                user,
                negotiation,
                sslmode,
            ])
            .arg(&self.certs.ca)
            .arg(sql)
            .args(["--host", host, "--hostaddr", "127.0.0.1"])
            .env("PGPASSWORD", self.password(user))
            .output()
            .unwrap();
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).unwrap_or_else(|e| {
            panic!(
                "libpq client: {e}: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
    }

    fn port(&self) -> String {
        self.layout.port.to_string()
    }

    fn ca(&self) -> &str {
        self.certs.ca.to_str().unwrap()
    }

    /// Sessions HAProxy handed to the tenants' servers (a TLS-required tenant's backend sees
    /// the plaintext session it refuses; its server does not).
    fn sessions(&self) -> u64 {
        self.haproxy.stat("pgs_acme", "acme", "stot")
            + self.haproxy.stat("pgs_globex", "globex", "stot")
    }

    /// Runs a raw exchange that must be refused without reaching a tenant's server.
    fn refused(&self, case: &str, args: &[&str]) -> Value {
        let before = self.sessions();
        let r = self.client(args);
        assert_ne!(r["reply"], "auth", "{case}: reached a server: {r}");
        assert_eq!(self.sessions(), before, "{case}: reached a backend: {r}");
        r
    }
}

#[test]
fn real_clients_over_tls_land_on_their_own_tenant() {
    let Some(t) = TlsStack::start("optional") else {
        return;
    };
    let verify = format!(
        "sslmode=verify-full sslrootcert={} host=localhost",
        t.certs.ca.display()
    );
    for (user, cluster) in [("acme", "pg_acme"), ("globex", "pg_globex")] {
        // Debian's libpq 15: the classic SSLRequest.
        for extra in ["sslmode=require", verify.as_str()] {
            let (ok, out, err) = t.psql(user, extra, "show cluster_name");
            assert!(ok, "psql {user} {extra}: {err}");
            assert_eq!(
                out, cluster,
                "psql {user} {extra} landed on the wrong server"
            );
        }
        // libpq ≥ 17: direct SSL and the classic negotiation, certificate verified.
        for negotiation in ["direct", "postgres"] {
            let r = t.libpq(
                user,
                negotiation,
                "verify-full",
                "localhost",
                "show cluster_name",
            );
            assert_eq!(r["reply"], "ok", "{user} {negotiation}: {r}");
            assert_eq!(r["value"], cluster, "{user} {negotiation}: {r}");
            assert_eq!(r["ssl"], true);
            assert!(r["libpq"].as_u64().unwrap() >= 170000, "{r}");
        }
    }
    // The SNI names the user's own tenant: accepted, whatever its case.
    let r = t.libpq(
        "acme",
        "direct",
        "require",
        "ACME.db.test",
        "select current_user",
    );
    assert_eq!(r["value"], "acme", "{r}");
    // Optional mode: plaintext still works for a tenant that does not require TLS.
    let (ok, out, err) = t.psql("acme", "sslmode=disable", "show cluster_name");
    assert!(ok && out == "pg_acme", "{err}");
    // The client's address survives the internal hop: the TLS frontend logs it.
    let log = t.haproxy.log_text();
    let tls_line = log
        .lines()
        .find(|l| l.contains(" pgs-tls~ pgs_acme/acme "))
        .unwrap_or_else(|| panic!("no TLS session in the log:\n{log}"));
    assert!(
        tls_line.contains("127.0.0.1:") && tls_line.contains("TLSv1."),
        "{tls_line}"
    );
}

#[test]
fn tls_refusal_rules_hold_and_reach_no_server() {
    let Some(t) = TlsStack::start("optional") else {
        return;
    };
    let (port, ca) = (t.port(), t.ca());

    // Plaintext bytes pipelined behind the SSLRequest (CVE-2021-23214 class).
    let r = t.refused("pipelined", &["pipelined", &port]);
    assert_eq!(r["code"], "08P01", "{r}");
    // 'S', then plaintext instead of a ClientHello: dropped without a word.
    let r = t.refused("plaintext after S", &["plaintext-after-s", &port, "acme"]);
    assert_eq!(r["reply"], "closed", "{r}");
    // 'S', then silence: closed at the 1 s startup timeout.
    let r = t.refused("silent after S", &["silent-after-s", &port]);
    assert_eq!(r["reply"], "closed", "{r}");
    assert!(r["seconds"].as_f64().unwrap() < 10.0, "{r}");
    // An SSLRequest inside TLS is a protocol violation.
    let r = t.refused(
        "SSLRequest inside TLS",
        &["starttls", &port, ca, "acme", "--inside", "sslrequest"],
    );
    assert_eq!(r["code"], "08P01", "{r}");
    // Direct TLS without ALPN postgresql, and with another protocol.
    for alpn in ["none", "h2"] {
        let r = t.refused(
            "direct without ALPN postgresql",
            &["direct", &port, ca, "acme", "--alpn", alpn],
        );
        assert_eq!(r["reply"], "closed", "ALPN {alpn}: {r}");
    }
    // An SNI in the tenant domain that names another tenant.
    let r = t.refused(
        "SNI of another tenant",
        &["starttls", &port, ca, "acme", "--sni", "globex.db.test"],
    );
    assert_eq!(r["code"], "28000", "{r}");
    assert!(r["message"].as_str().unwrap().contains("SNI"), "{r}");
    // Plaintext to a TLS-required tenant reads exactly like an unknown tenant.
    let required = t.refused("plaintext to a TLS tenant", &["plaintext", &port, "globex"]);
    let unknown = t.refused(
        "plaintext to an unknown tenant",
        &["plaintext", &port, "nosuch"],
    );
    assert_eq!(required["code"], "28000");
    assert_eq!(
        required["message"].as_str().unwrap().replace("globex", "X"),
        unknown["message"].as_str().unwrap().replace("nosuch", "X")
    );
    assert_eq!(required["hint"], unknown["hint"]);
    assert!(required["hint"]
        .as_str()
        .unwrap()
        .contains("sslmode=require"));
    let log = t.haproxy.log_text();
    assert!(log.contains("reason=tls_required"), "{log}");

    // And what must work: GSSENCRequest → 'N', SSLRequest → 'S', TLS, startup; the SNI of
    // the user's own tenant; a host outside the domain (no check); direct with ALPN.
    let before = t.haproxy.stat("pgs_acme", "acme", "stot");
    for args in [
        vec!["starttls", &port, ca, "acme", "--gssenc-first"],
        vec!["starttls", &port, ca, "acme", "--sni", "acme.db.test"],
        vec!["starttls", &port, ca, "acme", "--sni", "localhost"],
        vec!["direct", &port, ca, "acme"],
    ] {
        let r = t.client(&args);
        assert_eq!(r["reply"], "auth", "{args:?}: {r}");
    }
    let r = t.client(&["direct", &port, ca, "acme"]);
    assert_eq!(r["alpn"], "postgresql", "{r}");
    assert_eq!(t.haproxy.stat("pgs_acme", "acme", "stot"), before + 5);
}

#[test]
fn required_mode_refuses_every_plaintext_startup_alike() {
    let Some(t) = TlsStack::start("required") else {
        return;
    };
    let port = t.port();
    let known = t.refused("plaintext, known tenant", &["plaintext", &port, "acme"]);
    let unknown = t.refused("plaintext, unknown tenant", &["plaintext", &port, "nosuch"]);
    assert_eq!(known["code"], "28000", "{known}");
    assert_eq!(known["message"], unknown["message"]);
    assert!(known["message"]
        .as_str()
        .unwrap()
        .contains("encryption required"));
    let (ok, _, err) = t.psql("acme", "sslmode=disable", "select 1");
    assert!(!ok && err.contains("encryption required"), "{err}");
    let (ok, out, err) = t.psql("acme", "sslmode=prefer", "show cluster_name");
    assert!(ok && out == "pg_acme", "{err}");
}

#[test]
fn other_local_users_cannot_reach_the_internal_tls_listener() {
    let Some(t) = TlsStack::start("optional") else {
        return;
    };
    if !have_tools(&["setpriv"]) {
        return;
    }
    for socket in ["tls.sock", "tls-direct.sock"] {
        let path = t.layout.root().join("run").join(socket);
        // The directories on the way are open to everyone: only the socket's mode guards it.
        let connect = format!(
            "import socket; s = socket.socket(socket.AF_UNIX); s.connect({:?}); print('connected')",
            path.display().to_string()
        );
        let as_nobody = std::process::Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .args(["/usr/bin/python3", "-c", &connect])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&as_nobody.stderr);
        assert!(
            !as_nobody.status.success() && err.contains("PermissionError"),
            "{socket}: another user connected: {err}"
        );
        let as_owner = std::process::Command::new("/usr/bin/python3")
            .args(["-c", &connect])
            .output()
            .unwrap();
        assert!(
            as_owner.status.success(),
            "{socket}: the owner cannot connect"
        );
    }
}

/// A certificate renewed in place is served to new handshakes by the daemon through the
/// Runtime API: new serial, same worker, open TLS sessions untouched; a broken file is refused
/// and the old one keeps serving; a later reload (a new backend) still serves the new one and
/// keeps open TLS sessions.
#[test]
fn renewed_certificates_are_served_without_a_reload() {
    let Some(mut t) = TlsStack::start("optional") else {
        return;
    };
    let daemon_log = t.layout.dir.path().join("agent.log");
    let mut daemon = AgentProcess::start(&t.layout.config, 3600, &daemon_log);
    let (port, ca) = (t.port(), t.ca().to_string());
    let serial = |t: &TlsStack| {
        let r = t.client(&["starttls", &port, &ca, "acme"]);
        assert_eq!(r["reply"], "auth", "{r}");
        r["serial"].as_str().unwrap().to_string()
    };
    let first = serial(&t);
    let worker = t.haproxy.worker_pid();
    let reloads = master_reloads(&t.haproxy);
    let mut session = Session::open(
        &t.layout.conninfo("acme", "sslmode=require"),
        &t.acme.password.clone(),
    );

    // Renewed in place (the way a deploy hook copies it).
    let renewed = t.certs.renew();
    assert_ne!(renewed, first);
    std::fs::copy(&t.certs.server_pem, t.cert_file()).unwrap();
    wait_for("the renewed certificate", Duration::from_secs(15), || {
        (serial(&t) == renewed).then_some(())
    });
    assert_eq!(t.haproxy.worker_pid(), worker, "renewal reloaded HAProxy");
    assert_eq!(master_reloads(&t.haproxy), reloads);
    assert_eq!(
        session.query("select 'still here'").as_deref(),
        Some("still here")
    );
    let status = agent_ok(&t.layout.config, &["tls", "status", "--json"]);
    let status: Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["certificates"][0]["in_sync"], true, "{status}");
    assert_eq!(
        status["certificates"][0]["served"]["serial"],
        renewed.as_str()
    );

    // A broken file is refused with a clear message; HAProxy keeps serving the good one, and
    // never loads the broken file: a restart from the files still serves TLS.
    let mark = daemon.mark();
    std::fs::write(t.cert_file(), "-----BEGIN CERTIFICATE-----\nAAAA\n").unwrap();
    daemon.wait_for_log_after(mark, "is not usable", Duration::from_secs(15));
    assert_eq!(serial(&t), renewed);
    let out = agent(&["-c", t.layout.config.to_str().unwrap(), "tls", "status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("problem") && text.contains("NO"), "{text}");
    drop(session);
    t.haproxy.stop();
    t.haproxy = t.layout.start_haproxy();
    assert_eq!(
        serial(&t),
        renewed,
        "a restart serves the last good certificate"
    );
    let worker = t.haproxy.worker_pid();
    let mut session = Session::open(
        &t.layout.conninfo("acme", "sslmode=require"),
        &t.acme.password.clone(),
    );
    std::fs::copy(&t.certs.server_pem, t.cert_file()).unwrap();

    // A backend change reloads HAProxy: the new worker reads the renewed file, the open TLS
    // session stays on the old worker and keeps answering.
    let mark = daemon.mark();
    let text = std::fs::read_to_string(t.layout.root().join("tenants.json")).unwrap();
    std::fs::write(
        t.layout.root().join("tenants.json"),
        text.replacen(
            r#""tenants": {"#,
            &format!(
                r#""tenants": {{"initech": {{"access": "enabled", "external": {{"address": "{}"}}}},"#,
                t.acme.socket_path().display()
            ),
            1,
        ),
    )
    .unwrap();
    daemon.wait_for_log_after(mark, "HAProxy reloaded", Duration::from_secs(30));
    assert_ne!(t.haproxy.worker_pid(), worker);
    assert_eq!(serial(&t), renewed);
    assert_eq!(
        session.query("select 'after reload'").as_deref(),
        Some("after reload")
    );
    drop(session);
    daemon.stop();
}
