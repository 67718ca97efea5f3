//! Backups and restores against the real engine, the real image (pgBackRest inside) and a real
//! HAProxy: point-in-time restore into a new tenant and in place (through HAProxy, previous
//! volume kept), an offline backup of a stopped tenant, retention, verify catching a changed
//! byte, a killed backup, and an unwritable repository.

use std::path::PathBuf;
use std::time::Duration;

use pgs_agent::backups::clock;

use crate::support::docker::{docker, image, DockerEnv};
use crate::support::{agent, agent_ok, have_tools, psql, Layout};

/// A layout on a test installation of the engine, with HAProxy running.
struct Setup {
    env: DockerEnv,
    layout: Layout,
    _haproxy: crate::support::Haproxy,
}

fn setup() -> Option<Setup> {
    if !have_tools(&["haproxy", "psql", "docker"]) {
        return None;
    }
    let env = DockerEnv::new()?;
    let layout = Layout::init();
    layout.use_docker_prefix(&env.prefix);
    let img = image();
    layout.edit_settings(|s| {
        s.replace(
            "default_image = \"pgs/postgres:15\"",
            &format!("default_image = \"{img}\""),
        )
    });
    layout.render();
    let haproxy = layout.start_haproxy();
    Some(Setup {
        env,
        layout,
        _haproxy: haproxy,
    })
}

impl Setup {
    fn ok(&self, args: &[&str]) -> String {
        agent_ok(&self.layout.config, args)
    }

    fn fails(&self, args: &[&str]) -> String {
        let mut all = vec!["-c", self.layout.config.to_str().unwrap()];
        all.extend_from_slice(args);
        let out = agent(&all);
        assert!(!out.status.success(), "{args:?} succeeded: {out:?}");
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    fn password(&self, id: &str) -> String {
        std::fs::read_to_string(self.layout.root().join(format!("secrets/{id}.password")))
            .unwrap()
            .trim()
            .to_owned()
    }

    /// SQL through HAProxy as the tenant.
    fn sql(&self, id: &str, text: &str) -> String {
        let conninfo = self.layout.conninfo(id, &format!("dbname={id}"));
        let (ok, out, err) = psql(&conninfo, &self.password(id), text);
        assert!(ok, "{id}: {text}: {err}");
        out
    }

    fn repository(&self, id: &str) -> PathBuf {
        self.layout.root().join("backups").join(id)
    }

    fn listing(&self, id: &str) -> serde_json::Value {
        serde_json::from_str(&self.ok(&["tenant", "backups", id, "--json"])).unwrap()
    }
}

fn volume_exists(name: &str) -> bool {
    docker(&["volume", "inspect", name]).status.success()
}

/// A moment between two writes, as `--to` takes it.
fn a_moment_between() -> String {
    std::thread::sleep(Duration::from_millis(1100));
    let t = clock::format_utc_ms(clock::now_ms());
    std::thread::sleep(Duration::from_millis(1100));
    t
}

#[test]
fn point_in_time_restore_into_a_copy_and_in_place() {
    let Some(s) = setup() else { return };
    s.ok(&["tenant", "create", "acme", "--enable"]);
    let out = s.ok(&["tenant", "backup", "acme"]);
    assert!(out.contains("full backup"), "{out}");

    s.sql(
        "acme",
        "CREATE TABLE t (v text); INSERT INTO t VALUES ('A')",
    );
    let t = a_moment_between();
    s.sql("acme", "INSERT INTO t VALUES ('B')");
    assert_eq!(
        s.sql("acme", "SELECT string_agg(v, ',' ORDER BY v) FROM t"),
        "A,B"
    );

    // A time before the first backup is refused, naming the window.
    let err = s.fails(&[
        "tenant",
        "restore",
        "acme",
        "--to",
        "2001-01-01 00:00:00+00",
        "--dry-run",
    ]);
    assert!(err.contains("outside the restore window, from "), "{err}");

    // Into a new tenant: A, not B; the original is untouched.
    let out = s.ok(&["tenant", "restore", "acme", "--to", &t, "--into", "copy"]);
    assert!(out.contains("copy: created from acme"), "{out}");
    assert_eq!(
        s.sql("copy", "SELECT string_agg(v, ',' ORDER BY v) FROM t"),
        "A"
    );
    assert_eq!(
        s.sql("acme", "SELECT string_agg(v, ',' ORDER BY v) FROM t"),
        "A,B"
    );
    // The copy has its own repository, with a first full backup of it.
    let copy = s.listing("copy");
    assert_eq!(copy["backups"].as_array().unwrap().len(), 1, "{copy}");
    assert!(s
        .repository("copy")
        .join("archive/copy/archive.info")
        .is_file());

    // In place: the tenant answers with A only through HAProxy; the previous volume is kept.
    let before = format!("{}-acme-data", s.env.prefix);
    let out = s.ok(&["tenant", "restore", "acme", "--to", &t]);
    assert!(
        out.contains(&format!("the previous volume {before} is kept")),
        "{out}"
    );
    assert_eq!(
        s.sql("acme", "SELECT string_agg(v, ',' ORDER BY v) FROM t"),
        "A"
    );
    assert!(volume_exists(&before));
    let vols = s.ok(&["tenant", "volumes", "acme"]);
    assert!(vols.contains(&format!("{before}  previous")), "{vols}");
    // Writes continue on the new timeline and are archived; a later backup works.
    s.sql("acme", "INSERT INTO t VALUES ('C')");
    s.ok(&["tenant", "backup", "acme"]);

    // A stopped tenant is backed up offline.
    s.ok(&["tenant", "stop", "copy"]);
    let out = s.ok(&["tenant", "backup", "copy"]);
    assert!(out.contains("server was stopped"), "{out}");
    s.ok(&["tenant", "start", "copy"]);
    assert_eq!(s.sql("copy", "SELECT count(*) FROM t"), "1");

    // Purging old volumes leaves the one in use.
    s.ok(&["tenant", "volumes", "acme", "--purge-old"]);
    assert!(!volume_exists(&before));
    assert_eq!(
        s.sql("acme", "SELECT string_agg(v, ',' ORDER BY v) FROM t"),
        "A,C"
    );
}
