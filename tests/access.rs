//! Instant access flips through the Runtime API, against real HAProxy and PostgreSQL: no
//! reload (same worker pid), open sessions kept unless --terminate, drift repaired, state kept
//! across a HAProxy restart, concurrent flips not lost.

use std::process::Command;

use crate::routing::TwoTenants;
use crate::support::{agent, agent_bin, agent_ok, Session};

fn fatal_for(t: &TwoTenants, user: &str) -> Option<String> {
    let (ok, _, err) = t.query(user, "sslmode=disable", "show cluster_name");
    (!ok).then_some(err)
}

#[test]
fn flips_apply_to_the_next_connection_without_a_reload() {
    let Some(t) = TwoTenants::start("enabled") else {
        return;
    };
    let cfg = &t.layout.config;
    let pid = t.haproxy.worker_pid();
    let mut open = Session::open(
        &t.layout.conninfo("acme", "sslmode=disable"),
        &t.acme.password,
    );

    let out = agent_ok(cfg, &["access", "disable", "acme"]);
    assert!(out.contains("no reload"), "{out}");
    let err = fatal_for(&t, "acme").expect("a disabled tenant must be refused");
    assert!(
        err.contains("FATAL:") && err.contains("not available"),
        "{err}"
    );
    // The session opened before the flip keeps working.
    assert_eq!(open.query("show cluster_name").as_deref(), Some("pg_acme"));
    // The other tenant is untouched.
    assert!(fatal_for(&t, "globex").is_none());

    agent_ok(cfg, &["access", "enable", "acme"]);
    assert!(fatal_for(&t, "acme").is_none(), "re-enabled tenant refused");
    assert_eq!(
        t.haproxy.worker_pid(),
        pid,
        "an access flip must not reload HAProxy"
    );

    // The file says so too.
    let file = std::fs::read_to_string(t.layout.root().join("tenants.json")).unwrap();
    assert!(file.contains("\"enabled\""), "{file}");
}

#[test]
fn terminate_ends_open_sessions() {
    let Some(t) = TwoTenants::start("enabled") else {
        return;
    };
    let mut open = Session::open(
        &t.layout.conninfo("acme", "sslmode=disable"),
        &t.acme.password,
    );
    let mut other = Session::open(
        &t.layout.conninfo("globex", "sslmode=disable"),
        &t.globex.password,
    );
    let out = agent_ok(
        &t.layout.config,
        &["access", "disable", "acme", "--terminate"],
    );
    assert!(out.contains("ended"), "{out}");
    assert_eq!(open.query("select 1"), None, "the session should be gone");
    assert_eq!(
        other.query("show cluster_name").as_deref(),
        Some("pg_globex")
    );
}

#[test]
fn drift_is_repaired_and_state_survives_a_restart() {
    let Some(mut t) = TwoTenants::start("enabled") else {
        return;
    };
    let cfg = t.layout.config.clone();
    let access_map = t.layout.root().join("haproxy/maps/access.map");
    // Someone deletes an entry by hand: status flags it, the next access command restores it.
    t.haproxy
        .admin(&format!("del map {} globex", access_map.display()));
    assert!(fatal_for(&t, "globex").is_some());
    let status = agent_ok(&cfg, &["access", "status"]);
    assert!(status.contains("disagrees"), "{status}");
    let json: serde_json::Value =
        serde_json::from_str(&agent_ok(&cfg, &["access", "status", "globex", "--json"])).unwrap();
    assert_eq!(json["tenants"][0]["agree"], false, "{json}");
    agent_ok(&cfg, &["access", "disable", "acme"]);
    assert!(fatal_for(&t, "globex").is_none(), "drift not repaired");
    assert!(!agent_ok(&cfg, &["access", "status"]).contains("disagrees"));

    // Restarted from its files, HAProxy has the state of the last flip.
    t.haproxy.stop();
    let out = agent_ok(&cfg, &["access", "enable", "acme"]);
    assert!(out.contains("takes effect when it starts"), "{out}");
    agent_ok(&cfg, &["access", "disable", "globex"]);
    t.haproxy = t.layout.start_haproxy();
    assert!(fatal_for(&t, "acme").is_none());
    assert!(fatal_for(&t, "globex").is_some());
}

#[test]
fn racing_flips_on_different_tenants_are_both_kept() {
    let Some(t) = TwoTenants::start("disabled") else {
        return;
    };
    let cfg = t.layout.config.to_str().unwrap().to_owned();
    for round in 0..5 {
        let (a, b) = if round % 2 == 0 {
            (("disable", "acme"), ("enable", "globex"))
        } else {
            (("enable", "acme"), ("disable", "globex"))
        };
        let spawn = |(verb, id): (&str, &str)| {
            Command::new(agent_bin())
                .args(["-c", &cfg, "access", verb, id])
                .output()
                .unwrap()
        };
        let (ra, rb) = std::thread::scope(|s| {
            let ha = s.spawn(|| spawn(a));
            let hb = s.spawn(|| spawn(b));
            (ha.join().unwrap(), hb.join().unwrap())
        });
        assert!(ra.status.success() && rb.status.success(), "{ra:?} {rb:?}");
        let doc: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(t.layout.root().join("tenants.json")).unwrap(),
        )
        .unwrap();
        let want_acme = if a.0 == "enable" {
            "enabled"
        } else {
            "disabled"
        };
        let want_globex = if b.0 == "enable" {
            "enabled"
        } else {
            "disabled"
        };
        assert_eq!(doc["tenants"]["acme"]["access"], want_acme, "round {round}");
        assert_eq!(
            doc["tenants"]["globex"]["access"], want_globex,
            "round {round}"
        );
        assert_eq!(fatal_for(&t, "acme").is_none(), want_acme == "enabled");
        assert_eq!(fatal_for(&t, "globex").is_none(), want_globex == "enabled");
    }
}

#[test]
fn flipping_an_unknown_tenant_is_a_clear_error() {
    let Some(t) = TwoTenants::start("enabled") else {
        return;
    };
    let out = agent(&[
        "-c",
        t.layout.config.to_str().unwrap(),
        "access",
        "enable",
        "initech",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no tenant \"initech\""), "{err}");
    let out = agent(&[
        "-c",
        t.layout.config.to_str().unwrap(),
        "access",
        "enable",
        "Bad-Id",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not valid"));
}
