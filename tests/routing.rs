//! Routing through real HAProxy + pg-route.lua to two real PostgreSQL servers.

pub use crate::support::stack::TwoTenants;

#[test]
fn each_tenant_is_answered_by_its_own_server() {
    let Some(t) = TwoTenants::start("enabled") else {
        return;
    };
    for _ in 0..3 {
        for (user, cluster) in [("acme", "pg_acme"), ("globex", "pg_globex")] {
            let (ok, out, err) = t.query(user, "sslmode=disable", "show cluster_name");
            assert!(ok, "{user}: {err}");
            assert_eq!(out, cluster, "{user} landed on the wrong server");
        }
    }
}

/// Regression: the router we replace sent libpq's SSLRequest (sslmode=prefer, the default) to an
/// arbitrary backend, and the StartupMessage that followed on the same connection landed on
/// another tenant's server (`FATAL: role "tenant_a" does not exist` in B's log).
#[test]
fn sslmode_prefer_still_lands_on_the_right_tenant() {
    let Some(t) = TwoTenants::start("enabled") else {
        return;
    };
    for _ in 0..5 {
        for (user, cluster) in [("globex", "pg_globex"), ("acme", "pg_acme")] {
            let (ok, out, err) = t.query(user, "sslmode=prefer", "show cluster_name");
            assert!(ok, "{user}: {err}");
            assert_eq!(out, cluster);
        }
    }
    // Neither server ever saw the other tenant's role.
    assert!(!t.acme.log_text().contains("role \"globex\""));
    assert!(!t.globex.log_text().contains("role \"acme\""));
    // gssencmode=prefer sends GSSENCRequest first when libpq has GSSAPI support; either way the
    // connection must land.
    let (ok, out, err) = t.query(
        "acme",
        "sslmode=prefer gssencmode=prefer",
        "show cluster_name",
    );
    assert!(ok, "{err}");
    assert_eq!(out, "pg_acme");
}

#[test]
fn sslmode_require_fails_with_a_clear_message() {
    let Some(t) = TwoTenants::start("enabled") else {
        return;
    };
    let before = t.haproxy.backend_sessions("pgs_acme");
    let (ok, _, err) = t.query("acme", "sslmode=require", "select 1");
    assert!(!ok);
    assert!(err.contains("server does not support SSL"), "{err}");
    assert_eq!(t.haproxy.backend_sessions("pgs_acme"), before);
}

#[test]
fn unknown_and_disabled_tenants_get_the_same_fatal_message() {
    let Some(t) = TwoTenants::start("disabled") else {
        return;
    };
    let (ok, _, disabled) = t.query("globex", "sslmode=disable", "select 1");
    assert!(!ok);
    let (ok, _, unknown) = t.query("initech", "sslmode=disable", "select 1");
    assert!(!ok);
    assert!(disabled.contains("FATAL:"), "{disabled}");
    assert_eq!(
        disabled.replace("globex", "X"),
        unknown.replace("initech", "X"),
        "the client must not learn which tenants exist"
    );
    assert_eq!(t.haproxy.backend_sessions("pgs_globex"), 0);
    // HAProxy's log tells the operator which case it was.
    let log = t.haproxy.log_text();
    assert!(log.contains("globex") && log.contains("disabled"), "{log}");
    assert!(log.contains("initech") && log.contains("unknown"), "{log}");
    // The enabled tenant is unaffected.
    let (ok, out, err) = t.query("acme", "sslmode=disable", "show cluster_name");
    assert!(ok, "{err}");
    assert_eq!(out, "pg_acme");
}
