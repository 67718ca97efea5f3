//! Several roles per tenant: `role.tenant` user names rewritten by real HAProxy + pg-route.lua
//! (the server sees `user=role`), and managed tenants' roles declared in the tenants file,
//! created, aligned, rotated and dropped on real servers in real containers.

use crate::routing::TwoTenants;
use crate::support::docker::docker;
use crate::support::managed::Managed as SharedManaged;
use crate::support::{have_tools, psql, Layout};

/// Creates a SCRAM login role on an external test server, straight through its socket.
fn create_role(pg: &crate::support::Postgres, role: &str, password: &str) {
    let (ok, _, err) = psql(
        &pg.direct(),
        &pg.password,
        &format!("create role {role} login password '{password}'"),
    );
    assert!(ok, "{err}");
}

/// libpq's own default for the database (no dbname given): the user name as typed.
fn no_dbname(port: u16, user: &str) -> String {
    format!("host=127.0.0.1 port={port} user={user} sslmode=disable")
}

#[test]
fn role_dot_tenant_logs_in_as_the_role_on_the_tenants_server() {
    let Some(t) = TwoTenants::start("enabled") else {
        return;
    };
    create_role(&t.acme, "alice", "alice-pw");
    // Managed tenants have a database named after the tenant; this external one gets one too.
    let (ok, _, err) = psql(&t.acme.direct(), &t.acme.password, "create database acme");
    assert!(ok, "{err}");
    let port = t.layout.port;
    let who = "select current_user || ' ' || current_database() || ' ' || \
               current_setting('cluster_name')";

    // No dbname: the server sees user=alice and database=acme (not "alice.acme").
    let (ok, out, err) = psql(&no_dbname(port, "alice.acme"), "alice-pw", who);
    assert!(ok, "{err}");
    assert_eq!(out, "alice acme pg_acme");
    // An explicit database is kept; sslmode=prefer (SSLRequest, then 'N') rewrites the same.
    let (ok, out, err) = psql(
        &t.layout.conninfo("alice.acme", "sslmode=prefer"),
        "alice-pw",
        who,
    );
    assert!(ok, "{err}");
    assert_eq!(out, "alice postgres pg_acme");
    // A plain tenant name means what it always meant.
    let (ok, out, err) = t.query("acme", "sslmode=disable", "select current_user");
    assert!(ok, "{err}");
    assert_eq!(out, "acme");

    // alice.globex goes to globex's server, which has no alice: refused there, by PostgreSQL.
    let (ok, _, err) = psql(&no_dbname(port, "alice.globex"), "alice-pw", "select 1");
    assert!(
        !ok && err.contains("password authentication failed for user \"alice\""),
        "{err}"
    );
    assert!(
        t.globex
            .log_text()
            .contains("Role \"alice\" does not exist"),
        "{}",
        t.globex.log_text()
    );

    // Names that are neither `tenant` nor `role.tenant` never reach a server.
    let before = t.haproxy.backend_sessions("pgs_acme");
    for bad in ["a.b.acme", ".acme", "alice.", "Alice.acme"] {
        let (ok, _, err) = psql(&no_dbname(port, bad), "x", "select 1");
        assert!(!ok && err.contains("invalid user name"), "{bad}: {err}");
    }
    assert_eq!(t.haproxy.backend_sessions("pgs_acme"), before);
    // HAProxy's log names the tenant and the role.
    let log = t.haproxy.log_text();
    assert!(log.contains("tenant=acme role=alice"), "{log}");
}

/// `role.tenant` inside TLS: the internal frontend runs the same Lua on the decrypted stream,
/// rewrites the StartupMessage the same way, and checks SNI against the tenant part.
#[test]
fn role_dot_tenant_is_rewritten_inside_tls_too() {
    use crate::support::tls::{TestCerts, DOMAIN};
    use crate::support::{temp_dir, Postgres};
    if !have_tools(&[
        "haproxy",
        "psql",
        "initdb",
        "postgres",
        "pg_isready",
        "openssl",
    ]) {
        return;
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
        ],
    );
    let acme = Postgres::start(layout.dir.path(), "pg_acme", "acme", None);
    for sql in [
        "create role alice login password 'alice-pw'",
        "create database acme",
    ] {
        let (ok, _, err) = psql(&acme.direct(), &acme.password, sql);
        assert!(ok, "{err}");
    }
    layout.write_tenants(&format!(
        r#"{{"version": 1, "tenants": {{
            "acme": {{"access": "enabled", "external": {{"address": "{}"}}}}}}}}"#,
        acme.socket_path().display()
    ));
    layout.render();
    let haproxy = layout.start_haproxy();
    let who = "select current_user || ' ' || current_database()";
    // No dbname: libpq sends database=alice.acme, the server sees acme.
    let conninfo = |host: &str| {
        format!(
            "host={host} hostaddr=127.0.0.1 port={} user=alice.acme sslmode=require",
            layout.port
        )
    };
    for host in ["127.0.0.1", "acme.db.test"] {
        let (ok, out, err) = psql(&conninfo(host), "alice-pw", who);
        assert!(ok, "{host}: {err}");
        assert_eq!(out, "alice acme", "{host}");
    }
    // The SNI names another tenant than the user's tenant part: refused before any lookup.
    let (ok, _, err) = psql(&conninfo("globex.db.test"), "alice-pw", who);
    assert!(!ok && err.contains("names another tenant"), "{err}");
    let log = haproxy.log_text();
    assert!(log.contains("tenant=acme role=alice"), "{log}");
}

/// `text` with every generated password (a run of 32+ hex digits) masked: test output never
/// shows a secret, even when an assertion fails.
fn masked(text: &str) -> String {
    let mut out = String::new();
    let mut run = String::new();
    for c in text.chars().chain(std::iter::once(' ')) {
        if c.is_ascii_hexdigit() {
            run.push(c);
            continue;
        }
        out.push_str(if run.len() >= 32 { "********" } else { &run });
        run.clear();
        out.push(c);
    }
    out.pop();
    out
}

/// The managed-tenants stack with the CLI calls these tests repeat.
struct Managed(SharedManaged);

impl std::ops::Deref for Managed {
    type Target = SharedManaged;
    fn deref(&self) -> &SharedManaged {
        &self.0
    }
}

impl Managed {
    fn start() -> Option<Managed> {
        SharedManaged::start().map(Managed)
    }

    /// Runs the CLI; returns (exit code, stdout + stderr).
    fn cli(&self, args: &[&str]) -> (Option<i32>, String) {
        let out = self.run(args);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.code(), text)
    }

    /// `sync`, which must not fail (0: in sync, 2: changed).
    fn sync(&self) -> String {
        let (code, text) = self.cli(&["sync"]);
        assert!(matches!(code, Some(0 | 2)), "sync: {}", masked(&text));
        text
    }

    fn write_tenants(&self, acme_roles: &str) {
        self.layout.write_tenants(&format!(
            r#"{{"version": 1, "tenants": {{
                "acme":   {{"access": "enabled", "managed": {{"memory": "128m", "roles": {acme_roles}}}}},
                "globex": {{"access": "enabled", "managed": {{"memory": "128m"}}}}
            }}}}"#
        ));
    }

    /// Runs `sql` through HAProxy as `user` (no dbname: libpq's default, the user as typed).
    fn sql(&self, user: &str, password: &str, sql: &str) -> (bool, String, String) {
        psql(
            &format!(
                "host=127.0.0.1 port={} user={user} sslmode=disable",
                self.layout.port
            ),
            password,
            sql,
        )
    }

    /// As the tenant's own role; must succeed.
    fn as_acme(&self, sql: &str) -> String {
        let (ok, out, err) = self.sql("acme", &self.secret("acme.password"), sql);
        assert!(ok, "{sql}: {err}");
        out
    }
}

#[test]
fn roles_in_the_tenants_file_log_in_as_role_dot_tenant_and_are_kept_in_line() {
    let Some(m) = Managed::start() else { return };
    m.write_tenants(r#"{"alice": {}, "reporting": {"read_only": true, "connection_limit": 5}}"#);
    let out = m.sync();
    assert!(
        out.contains("role created: alice.acme") && out.contains("role created: reporting.acme"),
        "{}",
        masked(&out)
    );
    // A second pass finds nothing to do for the roles.
    let out = m.sync();
    assert!(!out.contains("role"), "{}", masked(&out));

    m.as_acme("create table t(v int); insert into t values (1)");
    let alice = m.secret("roles/acme/alice.password");
    let reporting = m.secret("roles/acme/reporting.password");
    let (ok, out, err) = m.sql(
        "alice.acme",
        &alice,
        "insert into t values (2); select current_user || ' ' || current_database() || ' ' || count(*) from t",
    );
    assert!(ok, "{err}");
    assert_eq!(out, "alice acme 2");

    // The read-only role reads everything and writes nothing, even when it asks to.
    let (ok, out, err) = m.sql("reporting.acme", &reporting, "select count(*) from t");
    assert!(ok, "{err}");
    assert_eq!(out, "2");
    let (ok, _, err) = m.sql("reporting.acme", &reporting, "insert into t values (3)");
    assert!(!ok && err.contains("read-only transaction"), "{err}");
    let (ok, _, err) = m.sql(
        "reporting.acme",
        &reporting,
        "begin read write; insert into t values (3); commit",
    );
    assert!(
        !ok && err.contains("permission denied for table t"),
        "{err}"
    );
    assert_eq!(
        m.as_acme("select rolconnlimit from pg_roles where rolname = 'reporting'"),
        "5"
    );
    // Only SCRAM verifiers are stored.
    assert_eq!(
        m.as_acme(
            "select count(*) from pg_authid where rolname in ('alice', 'reporting') \
             and rolpassword like 'SCRAM-SHA-256$%'"
        ),
        "2"
    );

    // alice.globex reaches globex's server, which has no alice.
    let (ok, _, err) = m.sql("alice.globex", &alice, "select 1");
    assert!(
        !ok && err.contains("password authentication failed for user \"alice\""),
        "{err}"
    );

    // `credentials --role` says how to connect as the role.
    let (code, text) = m.cli(&["tenant", "credentials", "acme", "--role", "alice"]);
    assert_eq!(code, Some(0), "{}", masked(&text));
    assert!(
        text.contains(&format!("postgresql://alice.acme:{alice}@127.0.0.1:"))
            && text.contains("/acme"),
        "{}",
        masked(&text)
    );
    let (code, text) = m.cli(&["tenant", "credentials", "acme", "--role", "bob"]);
    assert!(
        code != Some(0) && text.contains("declares no role \"bob\" (declared: alice, reporting)"),
        "{}",
        masked(&text)
    );

    let (_, show) = m.cli(&["tenant", "show", "acme"]);
    assert!(
        show.contains("role      reporting (user reporting.acme; read-only, at most 5 sessions)")
            && !show.contains(&alice),
        "{}",
        masked(&show)
    );

    // A password changed behind the agent's back is put back by the next pass.
    m.as_acme("alter role alice password 'changed-by-hand'");
    let out = m.sync();
    assert!(
        out.contains("role alice.acme: password put back"),
        "{}",
        masked(&out)
    );
    assert!(m.sql("alice.acme", &alice, "select 1").0);

    // Rotation: printed once, the old password stops working, the new one works.
    let (code, text) = m.cli(&[
        "tenant",
        "credentials",
        "acme",
        "--role",
        "alice",
        "--rotate",
        "--format",
        "env",
    ]);
    assert_eq!(code, Some(0), "{}", masked(&text));
    let new_alice = m.secret("roles/acme/alice.password");
    assert!(new_alice != alice, "rotation kept the old password");
    assert!(
        text.contains(&new_alice) && !text.contains(&alice),
        "{}",
        masked(&text)
    );
    let (ok, _, err) = m.sql("alice.acme", &alice, "select 1");
    assert!(
        !ok && err.contains("password authentication failed"),
        "{err}"
    );
    assert!(m.sql("alice.acme", &new_alice, "select 1").0);

    // The tenant's own role too: the agent's stored password changes in step, so readiness
    // (a real login with it) still passes after a restart.
    let old_own = m.secret("acme.password");
    let (code, text) = m.cli(&["tenant", "credentials", "acme", "--rotate"]);
    assert_eq!(code, Some(0), "{}", masked(&text));
    let new_own = m.secret("acme.password");
    assert!(new_own != old_own, "rotation kept the old password");
    assert!(text.contains(&new_own), "{}", masked(&text));
    let (ok, _, err) = m.sql("acme", &old_own, "select 1");
    assert!(
        !ok && err.contains("password authentication failed"),
        "{err}"
    );
    let (code, text) = m.cli(&["tenant", "stop", "acme"]);
    assert_eq!(code, Some(0), "{}", masked(&text));
    let (code, text) = m.cli(&["tenant", "start", "acme"]);
    assert_eq!(code, Some(0), "{}", masked(&text));
    assert_eq!(m.as_acme("select count(*) from t"), "2");
    // A stored password that is not the server's: readiness is a real login and says why.
    let own_file = m.layout.root().join("secrets/acme.password");
    std::fs::write(&own_file, format!("{old_own}\n")).unwrap();
    m.cli(&["tenant", "stop", "acme"]);
    let (code, text) = m.cli(&["tenant", "start", "acme"]);
    assert!(
        code == Some(1)
            && text.contains("PostgreSQL refused the tenant's login")
            && text.contains("initialized with another password"),
        "{}",
        masked(&text)
    );
    std::fs::write(&own_file, format!("{new_own}\n")).unwrap();
    m.sync();
    assert_eq!(m.as_acme("select count(*) from t"), "2");

    // Removing a role that owns a table is refused, with the way out; the role stays.
    m.as_acme("grant create on schema public to alice");
    let (ok, _, err) = m.sql("alice.acme", &new_alice, "create table mine(x int)");
    assert!(ok, "{err}");
    m.write_tenants(r#"{"reporting": {"read_only": true, "connection_limit": 5}}"#);
    let (code, text) = m.cli(&["sync"]);
    assert_eq!(code, Some(1), "{}", masked(&text));
    assert!(
        text.contains("role alice is no longer in the tenants file but still owns objects")
            && text.contains("owner of table mine")
            && text.contains("REASSIGN OWNED BY alice"),
        "{}",
        masked(&text)
    );
    assert!(
        m.sql("alice.acme", &new_alice, "select 1").0,
        "the role stays"
    );
    // Once its objects are gone, the next pass drops it and its password file.
    m.as_acme("reassign owned by alice to acme; drop owned by alice");
    let out = m.sync();
    assert!(out.contains("role dropped: alice.acme"), "{}", masked(&out));
    assert_eq!(
        m.as_acme("select count(*) from pg_roles where rolname = 'alice'"),
        "0"
    );
    assert!(!m
        .layout
        .root()
        .join("secrets/roles/acme/alice.password")
        .exists());
    assert!(
        m.sql("reporting.acme", &reporting, "select count(*) from mine")
            .0
    );

    // No role password in the container's description or logs.
    for name in ["acme", "globex"] {
        let container = format!("{}-{name}", m.docker.prefix);
        for args in [vec!["inspect", &container], vec!["logs", &container]] {
            let out = docker(&args);
            let all = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            for pw in [&alice, &new_alice, &reporting, &new_own] {
                assert!(
                    !all.contains(pw.as_str()),
                    "docker {args:?} shows a password"
                );
            }
        }
    }
}
