//! The Docker instance driver against the real engine and the real tenant image: isolation,
//! persistence across restarts, removal with and without purge, spec changes, crashes, and that
//! the generated password never shows in `docker inspect` or `docker logs`.

use std::time::{Duration, Instant};

use bollard::query_parameters::{KillContainerOptionsBuilder, LogsOptionsBuilder};
use futures_util::StreamExt;
use pgs_agent::instances::docker::DockerDriver;
use pgs_agent::instances::{DriverError, InstanceDriver, ObservedInstance, Removed, RunState};
use pgs_agent::tenants::{ManagedSpec, TenantId};

use crate::support::docker::{docker, DockerEnv};
use crate::support::{have_tools, psql};

const READY: Duration = Duration::from_secs(60);

fn tenant(s: &str) -> TenantId {
    TenantId::parse(s).unwrap()
}

/// The engine, the image and psql, or `None` (skip).
fn setup() -> Option<DockerEnv> {
    if !have_tools(&["psql"]) {
        return None;
    }
    DockerEnv::new()
}

async fn up(driver: &DockerDriver, id: &TenantId, spec: &ManagedSpec) {
    driver.ensure(id, spec).await.unwrap();
    driver.wait_ready(id, READY).await.unwrap();
}

/// Runs SQL as the tenant's superuser straight through its socket directory.
fn sql(env: &DockerEnv, driver: &DockerDriver, id: &TenantId, text: &str) -> String {
    let (ok, out, err) = psql(&env.conninfo(id), &driver.password(id).unwrap(), text);
    assert!(ok, "{id}: {text}: {err}");
    out
}

async fn observed(driver: &DockerDriver, id: &TenantId) -> Option<ObservedInstance> {
    driver
        .observe()
        .await
        .unwrap()
        .into_iter()
        .find(|o| &o.tenant == id)
}

fn container_id(name: &str) -> String {
    let out = docker(&["inspect", "-f", "{{.Id}}", name]);
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[tokio::test]
async fn two_tenants_are_isolated_and_keep_data_across_restarts() {
    let Some(env) = setup() else { return };
    let driver = env.driver().await;
    let (acme, globex) = (tenant("acme"), tenant("globex"));
    env.write_file(
        "init/schema.sql",
        "CREATE TABLE seeded (v text); INSERT INTO seeded VALUES ('from init');",
    );
    let acme_spec = ManagedSpec {
        init_scripts: vec!["init/schema.sql".into()],
        ..Default::default()
    };
    let globex_spec = ManagedSpec::default();
    let t0 = Instant::now();
    tokio::join!(
        up(&driver, &acme, &acme_spec),
        up(&driver, &globex, &globex_spec)
    );
    eprintln!("two new tenants ready in {:?}", t0.elapsed());

    assert_eq!(
        sql(&env, &driver, &acme, "SELECT v FROM seeded"),
        "from init"
    );
    sql(
        &env,
        &driver,
        &acme,
        "CREATE TABLE t (v text); INSERT INTO t VALUES ('acme only')",
    );
    sql(
        &env,
        &driver,
        &globex,
        "CREATE TABLE t (v text); INSERT INTO t VALUES ('globex only')",
    );
    assert_eq!(
        sql(&env, &driver, &acme, "SELECT string_agg(v, ',') FROM t"),
        "acme only"
    );
    assert_eq!(
        sql(&env, &driver, &globex, "SELECT string_agg(v, ',') FROM t"),
        "globex only"
    );
    assert_eq!(
        sql(
            &env,
            &driver,
            &globex,
            "SELECT count(*) FROM pg_tables WHERE tablename = 'seeded'"
        ),
        "0"
    );
    // globex's credentials do not open acme's server, and the passwords differ.
    let (pa, pg) = (
        driver.password(&acme).unwrap(),
        driver.password(&globex).unwrap(),
    );
    assert_ne!(pa, pg);
    let across = format!(
        "host={} user=globex dbname=acme",
        env.paths.tenant_socket_dir(&acme).display()
    );
    assert!(!psql(&across, &pg, "SELECT 1").0);
    let (ok, _, err) = psql(&env.conninfo(&acme), &pg, "SELECT 1");
    assert!(
        !ok && err.contains("password authentication failed"),
        "{err}"
    );

    // The settings the driver chose are in effect, and the server listens on no TCP port.
    assert_eq!(sql(&env, &driver, &acme, "SHOW shared_buffers"), "16MB");
    assert_eq!(sql(&env, &driver, &acme, "SHOW max_connections"), "20");
    assert_eq!(sql(&env, &driver, &acme, "SHOW listen_addresses"), "");

    let all = driver.observe().await.unwrap();
    assert_eq!(all.len(), 2, "{all:#?}");
    for o in &all {
        assert_eq!(o.state, Some(RunState::Running), "{o:?}");
        assert_eq!(
            o.container.as_deref(),
            Some(driver.container_name(&o.tenant).as_str())
        );
        assert_eq!(
            o.volume.as_deref(),
            Some(driver.volume_name(&o.tenant).as_str())
        );
    }
    assert_eq!(
        observed(&driver, &acme).await.unwrap().spec,
        Some(acme_spec.clone())
    );

    // The password is in no inspect output (env, args, labels) and no log line.
    let engine = env.engine().await;
    for (id, password) in [(&acme, &pa), (&globex, &pg)] {
        let name = driver.container_name(id);
        let inspect = engine.inspect_container(&name, None).await.unwrap();
        let text = serde_json::to_string(&inspect).unwrap();
        assert!(text.contains("POSTGRES_PASSWORD_FILE"), "{text}");
        assert!(
            !text.contains(password.as_str()),
            "password in docker inspect of {name}"
        );
        let options = LogsOptionsBuilder::new().stdout(true).stderr(true).build();
        let logs: Vec<_> = engine.logs(&name, Some(options)).collect().await;
        let logs: String = logs.into_iter().map(|l| l.unwrap().to_string()).collect();
        assert!(logs.contains("init complete"), "{logs}");
        // Both start from the image's template; acme's init script still ran (on the
        // temporary server, which globex, without scripts, does without).
        assert!(logs.contains("from the image's template"), "{logs}");
        assert_eq!(logs.contains("temporary server"), id == &acme, "{logs}");
        assert!(
            !logs.contains(password.as_str()),
            "password in docker logs of {name}"
        );
    }

    // Stop → observed stopped; ensure starts it again and the data is still there.
    driver.stop(&acme).await.unwrap();
    assert_eq!(
        observed(&driver, &acme).await.unwrap().state,
        Some(RunState::Stopped)
    );
    driver.stop(&acme).await.unwrap(); // stopping a stopped server is fine
    let id_before = container_id(&driver.container_name(&acme));
    up(&driver, &acme, &acme_spec).await;
    assert_eq!(
        container_id(&driver.container_name(&acme)),
        id_before,
        "restarted, not replaced"
    );
    assert_eq!(sql(&env, &driver, &acme, "SELECT v FROM t"), "acme only");
    // And an engine-side restart.
    engine
        .restart_container(&driver.container_name(&acme), None)
        .await
        .unwrap();
    driver.wait_ready(&acme, READY).await.unwrap();
    assert_eq!(sql(&env, &driver, &acme, "SELECT v FROM t"), "acme only");
}

#[tokio::test]
async fn remove_keeps_the_volume_unless_purged() {
    let Some(env) = setup() else { return };
    let driver = env.driver().await;
    let id = tenant("keeper");
    let spec = ManagedSpec::default();
    up(&driver, &id, &spec).await;
    sql(&env, &driver, &id, "CREATE TABLE t AS SELECT 'kept' AS v");
    let (container, volume) = (driver.container_name(&id), driver.volume_name(&id));

    let removed = driver.remove(&id, false).await.unwrap();
    assert_eq!(
        removed,
        Removed {
            container: Some(container.clone()),
            volume: Some(volume.clone()),
            volume_purged: false
        }
    );
    assert!(env.containers().is_empty());
    assert_eq!(env.volumes(), std::slice::from_ref(&volume));
    let o = observed(&driver, &id).await.unwrap();
    assert_eq!(
        (o.container, o.state, o.volume),
        (None, None, Some(volume.clone()))
    );

    // Re-created on the old volume, with the kept password: the data is back.
    up(&driver, &id, &spec).await;
    assert_eq!(sql(&env, &driver, &id, "SELECT v FROM t"), "kept");

    let removed = driver.remove(&id, true).await.unwrap();
    assert_eq!(
        removed,
        Removed {
            container: Some(container),
            volume: Some(volume),
            volume_purged: true
        }
    );
    assert!(env.containers().is_empty() && env.volumes().is_empty());
    assert!(driver.observe().await.unwrap().is_empty());
    assert!(!env.paths.tenant_password_file(&id).exists());

    // Removing, stopping what is gone: nothing to do, not an error. Starting it is one.
    let removed = driver.remove(&id, true).await.unwrap();
    assert_eq!(
        removed,
        Removed {
            container: None,
            volume: None,
            volume_purged: false
        }
    );
    driver.stop(&id).await.unwrap();
    assert!(driver.start(&id).await.is_err());
}

#[tokio::test]
async fn a_spec_change_replaces_the_container_and_keeps_the_data() {
    let Some(env) = setup() else { return };
    let driver = env.driver().await;
    let id = tenant("grower");
    let small = ManagedSpec {
        max_connections: Some(20),
        ..Default::default()
    };
    up(&driver, &id, &small).await;
    sql(
        &env,
        &driver,
        &id,
        "CREATE TABLE t AS SELECT 'survives' AS v",
    );
    let name = driver.container_name(&id);
    let first = container_id(&name);

    // Same spec again: nothing changes.
    driver.ensure(&id, &small).await.unwrap();
    assert_eq!(container_id(&name), first);

    let bigger = ManagedSpec {
        max_connections: Some(30),
        settings: [("work_mem".to_owned(), "8MB".to_owned())].into(),
        ..small.clone()
    };
    driver.ensure(&id, &bigger).await.unwrap();
    driver.wait_ready(&id, READY).await.unwrap();
    assert_ne!(container_id(&name), first, "replaced");
    assert_eq!(sql(&env, &driver, &id, "SHOW max_connections"), "30");
    assert_eq!(sql(&env, &driver, &id, "SHOW work_mem"), "8MB");
    assert_eq!(sql(&env, &driver, &id, "SELECT v FROM t"), "survives");
    assert_eq!(observed(&driver, &id).await.unwrap().spec, Some(bigger));
    assert_eq!(env.volumes().len(), 1);
}

#[tokio::test]
async fn a_killed_container_is_observed_and_recovered() {
    let Some(env) = setup() else { return };
    let driver = env.driver().await;
    let id = tenant("victim");
    let spec = ManagedSpec::default();
    up(&driver, &id, &spec).await;
    sql(
        &env,
        &driver,
        &id,
        "CREATE TABLE t AS SELECT 'durable' AS v",
    );

    let engine = env.engine().await;
    let kill = KillContainerOptionsBuilder::new().signal("SIGKILL").build();
    engine
        .kill_container(&driver.container_name(&id), Some(kill))
        .await
        .unwrap();
    let state = observed(&driver, &id).await.unwrap().state;
    assert_ne!(state, Some(RunState::Running), "{state:?}");
    assert!(
        driver.wait_ready(&id, READY).await.is_err(),
        "a dead server is not ready"
    );

    // The next ensure starts it; crash recovery keeps committed data.
    up(&driver, &id, &spec).await;
    assert_eq!(
        observed(&driver, &id).await.unwrap().state,
        Some(RunState::Running)
    );
    assert_eq!(sql(&env, &driver, &id, "SELECT v FROM t"), "durable");
}

#[tokio::test]
async fn failures_are_explained_and_foreign_objects_left_alone() {
    let Some(env) = setup() else { return };
    let driver = env.driver().await;

    let missing = ManagedSpec {
        image: Some("pgs/no-such-image:0".into()),
        ..Default::default()
    };
    let err = driver.ensure(&tenant("ghost"), &missing).await.unwrap_err();
    assert!(
        matches!(&err, DriverError::ImageMissing { image, tenant } if image == "pgs/no-such-image:0" && tenant.as_str() == "ghost"),
        "{err}"
    );

    // A same-named volume without our labels is neither used nor removed.
    let intruder = tenant("intruder");
    let foreign = driver.volume_name(&intruder);
    assert!(docker(&["volume", "create", &foreign]).status.success());
    let err = driver
        .ensure(&intruder, &ManagedSpec::default())
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("does not carry pgs's labels"),
        "{err}"
    );
    let err = driver.remove(&intruder, true).await.unwrap_err();
    assert!(err.to_string().contains(&foreign), "{err}");
    let still_there = docker(&["volume", "inspect", &foreign]).status.success();
    docker(&["volume", "rm", "-f", &foreign]);
    assert!(still_there, "the foreign volume was removed");
    assert!(
        env.containers().is_empty(),
        "nothing was created for the intruder"
    );

    // An init script that fails: wait_ready gives up at once, with the container's last words.
    env.write_file(
        "init/fail.sh",
        "echo 'init failing on purpose' >&2\nexit 3\n",
    );
    let broken = tenant("broken");
    let spec = ManagedSpec {
        init_scripts: vec![env.dir.path().join("init/fail.sh")],
        ..Default::default()
    };
    driver.ensure(&broken, &spec).await.unwrap();
    let t0 = Instant::now();
    let err = driver
        .wait_ready(&broken, READY)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        t0.elapsed() < Duration::from_secs(20),
        "took {:?}",
        t0.elapsed()
    );
    assert!(err.contains("init failing on purpose"), "{err}");
    // Exited, or already being restarted by the engine (restart policy `unless-stopped`).
    assert!(
        err.contains("exited with code 3") || err.contains("crashed and was restarted"),
        "{err}"
    );
    let password = driver.password(&broken).unwrap();
    assert!(!err.contains(&password));
}

/// One container of the tenant image, run by hand (`docker run`) with the first-init
/// environment under test, in `env`'s installation so its drop removes it.
struct FirstInit {
    name: String,
    socket_dir: std::path::PathBuf,
}

impl FirstInit {
    fn run(env: &DockerEnv, name: &str, password: &str, vars: &[(&str, &str)]) -> FirstInit {
        let dir = env.dir.path().join(name);
        let socket_dir = dir.join("sock");
        std::fs::create_dir_all(&socket_dir).unwrap();
        crate::support::set_mode(&socket_dir, 0o777);
        let pw = dir.join("pw");
        std::fs::write(&pw, format!("{password}\n")).unwrap();
        crate::support::set_mode(&pw, 0o644);
        let name = format!("{}-{name}", env.prefix);
        let label = format!(
            "{}={}",
            pgs_agent::instances::docker::LABEL_INSTALLATION,
            env.prefix
        );
        let out = docker(&["volume", "create", "--label", &label, &name]);
        assert!(out.status.success(), "{out:?}");
        let mut args = vec![
            "run".to_owned(),
            "-d".into(),
            "--name".into(),
            name.clone(),
            "--label".into(),
            label.clone(),
            "--network".into(),
            "none".into(),
            "-e".into(),
            "POSTGRES_PASSWORD_FILE=/run/secrets/pw".into(),
            "-v".into(),
            format!("{}:/run/secrets/pw:ro", pw.display()),
            "-v".into(),
            format!("{name}:/var/lib/postgresql/data"),
            "-v".into(),
            format!("{}:/var/run/postgresql", socket_dir.display()),
        ];
        for (k, v) in vars {
            args.extend(["-e".to_owned(), format!("{k}={v}")]);
        }
        args.push(crate::support::docker::image());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = docker(&args);
        assert!(out.status.success(), "docker run: {out:?}");
        FirstInit { name, socket_dir }
    }

    /// A libpq conninfo for `user`/`db` (quoted, so any name works).
    fn conninfo(&self, user: &str, db: &str) -> String {
        let q = |s: &str| s.replace('\\', "\\\\").replace('\'', "\\'");
        format!(
            "host='{}' user='{}' dbname='{}'",
            q(&self.socket_dir.to_string_lossy()),
            q(user),
            q(db)
        )
    }

    /// Waits until `user` logs in to `db` with `password`; returns what `sql` printed.
    fn wait_sql(&self, user: &str, db: &str, password: &str, sql: &str) -> String {
        let conninfo = self.conninfo(user, db);
        crate::support::wait_for(&format!("{} to accept logins", self.name), READY, || {
            let (ok, out, _) = psql(&conninfo, password, sql);
            ok.then_some(out)
        })
    }

    fn logs(&self) -> String {
        let out = docker(&["logs", &self.name]);
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }
}

const DATABASES: &str = "SELECT string_agg(datname, ',' ORDER BY datname) FROM pg_database";
const WHO: &str = "SELECT current_user || '|' || current_database() || '|' \
                   || (SELECT rolname FROM pg_roles WHERE oid = 10)";

#[test]
fn first_init_copies_the_template_or_runs_initdb_when_asked() {
    let Some(env) = setup() else { return };
    // Names and a password that need quoting everywhere the entrypoint writes them.
    let (user, db, password) = ("app'user", "my \"db\"", r#"pa'ss\wo"rd;"#);
    let copied = FirstInit::run(
        &env,
        "copied",
        password,
        &[("POSTGRES_USER", user), ("POSTGRES_DB", db)],
    );
    let plain = FirstInit::run(
        &env,
        "plain",
        "other-secret",
        &[("POSTGRES_USER", "owner"), ("POSTGRES_DB", "postgres")],
    );
    let checksums = FirstInit::run(
        &env,
        "checksums",
        "third-secret",
        &[
            ("POSTGRES_USER", "owner"),
            ("POSTGRES_DB", "app"),
            ("POSTGRES_INITDB_ARGS", "--data-checksums"),
        ],
    );
    let opted_out = FirstInit::run(
        &env,
        "optout",
        "fourth-secret",
        &[("POSTGRES_USER", "owner"), ("PGS_INIT_TEMPLATE", "0")],
    );

    // From the template: the superuser (OID 10, as initdb makes it) has the asked-for name and
    // password, the database is the asked-for one, and the placeholder is gone.
    assert_eq!(
        copied.wait_sql(user, db, password, WHO),
        format!("{user}|{db}|{user}")
    );
    assert_eq!(
        copied.wait_sql(user, db, password, DATABASES),
        format!("{db},postgres,template0,template1")
    );
    assert_eq!(
        copied.wait_sql(user, db, password, "SHOW password_encryption"),
        "scram-sha-256"
    );
    let (ok, _, err) = psql(&copied.conninfo(user, db), "wrong", "SELECT 1");
    assert!(
        !ok && err.contains("password authentication failed"),
        "{err}"
    );
    let logs = copied.logs();
    assert!(logs.contains("from the image's template"), "{logs}");
    assert!(
        !logs.contains("temporary server"),
        "no init scripts, no temporary server: {logs}"
    );
    assert!(
        !logs.contains(password) && !logs.contains("pa'ss"),
        "password in the logs: {logs}"
    );

    assert_eq!(
        plain.wait_sql("owner", "postgres", "other-secret", DATABASES),
        "postgres,template0,template1"
    );
    // Same template, yet each server knows only its own superuser and password.
    let (ok, _, err) = psql(&plain.conninfo(user, "postgres"), password, "SELECT 1");
    assert!(
        !ok && err.contains("password authentication failed"),
        "{err}"
    );

    // Each copy gets its own system identifier (pgBackRest tells clusters apart by it) and
    // mock-authentication nonce, as initdb would give it.
    let ident = "SELECT (SELECT system_identifier FROM pg_control_system())::text";
    let (a, b) = (
        copied.wait_sql(user, db, password, ident),
        plain.wait_sql("owner", "postgres", "other-secret", ident),
    );
    assert!(!a.is_empty() && a != b, "{a} vs {b}");
    let template = docker(&[
        "run",
        "--rm",
        "--network",
        "none",
        "--entrypoint",
        "pg_controldata",
        &crate::support::docker::image(),
        "/usr/share/pgs/template",
    ]);
    let template = String::from_utf8_lossy(&template.stdout);
    assert!(
        template.contains("Database system identifier:"),
        "{template}"
    );
    assert!(
        !template.contains(&a) && !template.contains(&b),
        "{template}"
    );

    // POSTGRES_INITDB_ARGS (and the opt-out) still run initdb, with the same defaults.
    assert_eq!(
        checksums.wait_sql("owner", "app", "third-secret", "SHOW data_checksums"),
        "on"
    );
    assert_eq!(
        checksums.wait_sql("owner", "app", "third-secret", WHO),
        "owner|app|owner"
    );
    assert!(
        checksums
            .logs()
            .contains("with initdb (POSTGRES_INITDB_ARGS is set)"),
        "{}",
        checksums.logs()
    );
    assert_eq!(
        opted_out.wait_sql(
            "owner",
            "owner",
            "fourth-secret",
            "SHOW unix_socket_directories"
        ),
        "/var/run/postgresql"
    );
    assert!(
        opted_out
            .logs()
            .contains("with initdb (PGS_INIT_TEMPLATE=0)"),
        "{}",
        opted_out.logs()
    );
}
