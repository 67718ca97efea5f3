//! Several roles per tenant: `role.tenant` user names rewritten by real HAProxy + pg-route.lua
//! (the server sees `user=role`), and managed tenants' roles declared in the tenants file,
//! created, aligned, rotated and dropped on real servers in real containers.

use crate::routing::TwoTenants;
use crate::support::psql;

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
