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
    if img != crate::support::docker::IMAGE {
        layout.edit_settings(|s| {
            s.replace(
                "default_image = \"pgs/postgres:15\"",
                &format!("default_image = \"{img}\""),
            )
        });
    }
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
    // A client connected during the restore keeps working until the swap, which ends it.
    let mut session = crate::support::Session::open(
        &s.layout.conninfo("acme", "dbname=acme"),
        &s.password("acme"),
    );
    let out = s.ok(&["tenant", "restore", "acme", "--to", &t]);
    assert_eq!(
        session.query("select 1"),
        None,
        "the session outlived the swap"
    );
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

    // Deleting a tenant keeps its repository and says so; --purge-data removes it.
    let out = s.ok(&["tenant", "delete", "copy"]);
    assert!(
        out.contains("backup repository") && out.contains("kept"),
        "{out}"
    );
    assert!(s
        .repository("copy")
        .join("backup/copy/backup.info")
        .is_file());
    let out = s.ok(&["tenant", "delete", "copy", "--purge-data"]);
    assert!(
        out.contains("backup repository") && out.contains("deleted"),
        "{out}"
    );
    assert!(!s.repository("copy").exists());

    // Purging old volumes leaves the one in use.
    s.ok(&["tenant", "volumes", "acme", "--purge-old"]);
    assert!(!volume_exists(&before));
    assert_eq!(
        s.sql("acme", "SELECT string_agg(v, ',' ORDER BY v) FROM t"),
        "A,C"
    );
}

fn labels(listing: &serde_json::Value) -> Vec<String> {
    listing["backups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["label"].as_str().unwrap().to_owned())
        .collect()
}

/// Archived WAL segment names (24 hex digits) in a repository.
fn archived_segments(repo: &std::path::Path, stanza: &str) -> Vec<String> {
    let mut out = Vec::new();
    let archive = repo.join("archive").join(stanza);
    for version in std::fs::read_dir(archive).unwrap().flatten() {
        let Ok(dirs) = std::fs::read_dir(version.path()) else {
            continue;
        };
        for dir in dirs.flatten() {
            for f in std::fs::read_dir(dir.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                let name = f.file_name().to_string_lossy().into_owned();
                let seg = name.split('-').next().unwrap_or("");
                if seg.len() == 24 && !name.contains(".backup") {
                    out.push(seg.to_owned());
                }
            }
        }
    }
    out.sort();
    out
}

#[test]
fn retention_verify_and_failures() {
    let Some(s) = setup() else { return };
    s.ok(&["tenant", "create", "acme", "--enable"]);
    s.sql(
        "acme",
        "CREATE TABLE t (v text); INSERT INTO t VALUES ('A')",
    );

    // Retention: three full backups with keep_full = 2 leave the last two, and the WAL only
    // the first needed is gone.
    let mut taken = Vec::new();
    for _ in 0..3 {
        s.sql("acme", "INSERT INTO t VALUES ('x')");
        s.ok(&["tenant", "backup", "acme", "--full"]);
        taken.push(labels(&s.listing("acme")).last().unwrap().clone());
    }
    let listing = s.listing("acme");
    assert_eq!(labels(&listing), taken[1..], "{listing}");
    let oldest_kept_wal = listing["backups"][0]["wal_start"]
        .as_str()
        .unwrap()
        .to_owned();
    let segments = archived_segments(&s.repository("acme"), "acme");
    assert!(!segments.is_empty());
    assert!(
        segments.iter().all(|seg| *seg >= oldest_kept_wal),
        "WAL older than the oldest kept backup ({oldest_kept_wal}) is still there: {segments:?}"
    );
    // The rest restore: the older kept backup by label, the latest by a restore test.
    s.ok(&[
        "tenant", "restore", "acme", "--backup", &taken[1], "--into", "older",
    ]);
    assert_eq!(s.sql("older", "SELECT count(*) FROM t"), "3");
    let out = s.ok(&["tenant", "restore-test", "acme"]);
    assert!(out.contains("restore test passed: checked "), "{out}");
    let listing = s.listing("acme");
    assert_eq!(listing["status"]["restore_test_ok"], true, "{listing}");

    // verify passes, then catches one changed byte in a backup file.
    s.ok(&["tenant", "verify", "acme"]);
    let mut files: Vec<PathBuf> = Vec::new();
    let base = s
        .repository("acme")
        .join("backup/acme")
        .join(&taken[2])
        .join("pg_data/base");
    for db in std::fs::read_dir(&base).unwrap().flatten() {
        for f in std::fs::read_dir(db.path()).unwrap().flatten() {
            if f.metadata().unwrap().len() > 2048 {
                files.push(f.path());
            }
        }
    }
    files.sort();
    let victim = files.first().expect("a backup file to corrupt").clone();
    let mut bytes = std::fs::read(&victim).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&victim, &bytes).unwrap();
    let err = s.fails(&["tenant", "verify", "acme"]);
    assert!(err.contains("invalid"), "{err}");
    bytes[mid] ^= 0xff;
    std::fs::write(&victim, &bytes).unwrap();

    // A backup killed halfway (SIGKILL to the job's processes) lists nothing new as good, and
    // the next one succeeds.
    s.sql(
        "acme",
        "CREATE TABLE big AS SELECT g, md5(g::text) || md5((g * 7)::text) AS pad FROM generate_series(1, 600000) g",
    );
    let before = labels(&s.listing("acme"));
    let mut child = std::process::Command::new(crate::support::agent_bin())
        .args([
            "-c",
            s.layout.config.to_str().unwrap(),
            "tenant",
            "backup",
            "acme",
            "--full",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let job = format!("{}-acme-job", s.env.prefix);
    crate::support::wait_for("the backup job", Duration::from_secs(30), || {
        let out = docker(&["top", &job]);
        String::from_utf8_lossy(&out.stdout)
            .contains("pgbackrest")
            .then_some(())
    });
    std::thread::sleep(Duration::from_millis(700));
    assert!(docker(&["kill", "--signal", "KILL", &job]).status.success());
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(
        labels(&s.listing("acme")),
        before,
        "a killed backup must not be listed"
    );
    let out = s.ok(&["tenant", "backup", "acme", "--full"]);
    assert!(out.contains("full backup"), "{out}");
    assert_eq!(labels(&s.listing("acme")).len(), 2);

    // A repository that cannot be written: the backup fails, is reported and counted; the
    // tenant keeps serving.
    let backup_dir = s.repository("acme").join("backup/acme");
    crate::support::set_mode(&backup_dir, 0o500);
    let err = s.fails(&["tenant", "backup", "acme", "--full"]);
    assert!(err.contains("backup job failed"), "{err}");
    assert_eq!(s.sql("acme", "SELECT count(*) FROM t"), "4");
    let listing = s.listing("acme");
    assert!(
        listing["status"]["failures"].as_u64().unwrap() >= 1,
        "{listing}"
    );
    assert!(listing["status"]["last_error"]
        .as_str()
        .unwrap()
        .contains("backup"));
    crate::support::set_mode(&backup_dir, 0o750);
    s.ok(&["tenant", "backup", "acme"]);

    // The same for WAL archiving: a failed push is noted, reported and counted; the server
    // keeps answering, and archiving resumes once the repository can be written again.
    let archive = s.repository("acme").join("archive/acme/15-1");
    let mut dirs = vec![archive.clone()];
    for d in std::fs::read_dir(&archive).unwrap().flatten() {
        if d.path().is_dir() {
            dirs.push(d.path());
        }
    }
    for d in &dirs {
        crate::support::set_mode(d, 0o500);
    }
    s.sql("acme", "INSERT INTO t VALUES ('y')");
    s.sql("acme", "SELECT pg_switch_wal()");
    let failures = crate::support::wait_for("a failed WAL push", Duration::from_secs(60), || {
        let l = s.listing("acme");
        let n = l["archive"]["failures"].as_u64().unwrap_or(0);
        (n > 0).then_some(l)
    });
    assert!(
        failures["archive"]["last_failure"]["segment"]
            .as_str()
            .is_some(),
        "{failures}"
    );
    let show = s.ok(&["tenant", "show", "acme"]);
    assert!(show.contains("WAL archiving FAILED"), "{show}");
    assert_eq!(s.sql("acme", "SELECT count(*) FROM t"), "5");
    for d in &dirs {
        crate::support::set_mode(d, 0o750);
    }
    s.ok(&["tenant", "backup", "acme"]);
}

#[test]
fn the_daemon_backs_up_on_schedule_a_stopped_tenant_too() {
    let Some(s) = setup() else { return };
    s.layout.edit_settings(|t| {
        t.replace("incr_every = \"1d\"", "incr_every = \"6s\"")
            .replace("verify_every = \"1d\"", "verify_every = \"10s\"")
            .replace(
                "restore_test_every = \"7d\"",
                "restore_test_every = \"15s\"",
            )
    });
    s.ok(&["tenant", "create", "acme", "--enable"]);
    s.ok(&["tenant", "create", "globex"]);
    s.ok(&["tenant", "stop", "globex"]);
    let _daemon = crate::support::agent::AgentProcess::start(
        &s.layout.config,
        600,
        &s.layout.dir.path().join("agent.log"),
    );
    crate::support::wait_for(
        "scheduled backups, verify and restore test",
        Duration::from_secs(150),
        || {
            let acme = s.listing("acme");
            let globex = s.listing("globex");
            let kinds: Vec<&str> = acme["backups"]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| b["type"].as_str().unwrap())
                .collect();
            let done = kinds.contains(&"full")
                && kinds.contains(&"incr")
                && acme["status"]["verify_ok"] == true
                && acme["status"]["restore_test_ok"] == true
                && globex["backups"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|b| b["online"] == false);
            done.then_some(())
        },
    );
    // The stopped tenant stayed stopped.
    let out = docker(&[
        "inspect",
        "-f",
        "{{.State.Running}}",
        &format!("{}-globex", s.env.prefix),
    ]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "false");
}
