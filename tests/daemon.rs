//! The reconciler and the `run` daemon against real HAProxy, PostgreSQL and dockerd: edits of
//! the tenants file converge without restarting the agent, drift (a killed container, map
//! entries deleted by hand, a stale config on disk) is repaired, bad input never tears anything
//! down, a killed agent leaves nothing the next `sync` cannot finish, a burst of tenants costs
//! one reload, and an open session survives every reload.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::json;

use crate::support::agent::{
    master_reloads, replace_file, runtime_map, runtime_map_has, AgentProcess, NotifySocket,
};
use crate::support::docker::{docker, DockerEnv};
use crate::support::{agent, have_tools, psql, wait_for, Haproxy, Layout, Postgres, Session};

/// A new managed tenant: volume, container, initdb, readiness, reload, access.
const PROVISION: Duration = Duration::from_secs(90);
/// A few periodic resyncs (`--resync 1`, plus the daemon's debounce).
const RESYNC: Duration = Duration::from_secs(10);

/// Runs `pgs-agent sync`; returns its exit code and what it printed (stdout, then stderr).
fn sync(layout: &Layout) -> (Option<i32>, String) {
    let out = agent(&["-c", layout.config.to_str().unwrap(), "sync"]);
    (
        out.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// How to reach a tenant through HAProxy, from `tenant credentials --format env`: a conninfo
/// without the password, and the password (for psql's environment, never its arguments).
struct Creds {
    conninfo: String,
    password: String,
}

/// What `tenant credentials --format env` prints, once the tenant has a password.
fn credentials(layout: &Layout, id: &str) -> Option<Creds> {
    let out = agent(&[
        "-c",
        layout.config.to_str().unwrap(),
        "tenant",
        "credentials",
        id,
        "--format",
        "env",
    ]);
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let vars: std::collections::HashMap<&str, &str> = text
        .trim()
        .strip_prefix("export ")?
        .split(' ')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k, v.trim_matches('\'')))
        .collect();
    Some(Creds {
        conninfo: format!(
            "host={} port={} user={} dbname={}",
            vars.get("PGHOST")?,
            vars.get("PGPORT")?,
            vars.get("PGUSER")?,
            vars.get("PGDATABASE")?
        ),
        password: vars.get("PGPASSWORD")?.to_string(),
    })
}

/// Waits until `id` answers a query through HAProxy with the credentials the CLI prints.
fn wait_routable(layout: &Layout, id: &str, timeout: Duration) -> Creds {
    wait_for(&format!("{id} to answer through HAProxy"), timeout, || {
        let c = credentials(layout, id)?;
        let (ok, out, _) = psql(&c.conninfo, &c.password, "select current_user");
        (ok && out == id).then_some(c)
    })
}

fn managed(ids: &[&str]) -> String {
    let tenants: serde_json::Map<String, serde_json::Value> = ids
        .iter()
        .map(|id| {
            (
                id.to_string(),
                json!({"access": "enabled", "managed": {"memory": "128m"}}),
            )
        })
        .collect();
    json!({"version": 1, "tenants": tenants}).to_string()
}

/// External tenants that all point at one PostgreSQL socket, with their access.
fn externals(socket: &Path, tenants: &[(&str, &str)]) -> serde_json::Value {
    let tenants: serde_json::Map<String, serde_json::Value> = tenants
        .iter()
        .map(|(id, access)| {
            (
                id.to_string(),
                json!({"access": access, "external": {"address": socket}}),
            )
        })
        .collect();
    json!({"version": 1, "tenants": tenants})
}

/// The second the running HAProxy worker (re)started, from `show info`.
fn haproxy_start_time(h: &Haproxy) -> u64 {
    h.admin("show info")
        .lines()
        .find_map(|l| l.strip_prefix("Start_time_sec: "))
        .and_then(|v| v.trim().parse().ok())
        .expect("Start_time_sec in show info")
}

/// `Some(running)` for the container of `id`, `None` when it does not exist.
fn container_running(env: &DockerEnv, id: &str) -> Option<bool> {
    let out = docker(&[
        "inspect",
        "-f",
        "{{.State.Running}}",
        &format!("{}-{id}", env.prefix),
    ]);
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim() == "true")
}

#[test]
fn managed_tenants_follow_file_edits_docker_deaths_and_a_killed_agent() {
    if !have_tools(&["haproxy", "psql", "docker"]) {
        return;
    }
    let Some(env) = DockerEnv::new() else { return };
    let layout = Layout::init();
    layout.use_docker_prefix(&env.prefix);
    layout.render();
    let haproxy = layout.start_haproxy();
    let root = layout.root();
    let tenants_file = root.join("tenants.json");
    let access_map = root.join("haproxy/maps/access.map");
    let backends_map = root.join("haproxy/maps/backends.map");
    // The resync is far away: everything below is driven by the file watch and Docker events.
    let mut daemon = AgentProcess::start(&layout.config, 600, &layout.dir.path().join("run-1.log"));

    // An edit of the tenants file, with the agent running, provisions a tenant as written:
    // container, backend, access; a client logs in with the credentials the CLI prints.
    replace_file(&tenants_file, &managed(&["acme"]));
    let acme = wait_routable(&layout, "acme", PROVISION);
    assert_eq!(container_running(&env, "acme"), Some(true));
    assert!(runtime_map_has(&haproxy, &backends_map, "acme"));
    assert!(runtime_map_has(&haproxy, &access_map, "acme"));
    assert!(haproxy.backend_sessions("pgs_acme") >= 1);
    // The log lines come at the end of the pass, a moment after their effect.
    for want in [
        "reason=TenantsFileChanged",
        "server created and ready: acme",
        "HAProxy reloaded",
    ] {
        daemon.wait_for_log(want, RESYNC);
    }
    let (ok, _, err) = psql(
        &acme.conninfo,
        &acme.password,
        "create table notes (v text); insert into notes values ('kept')",
    );
    assert!(ok, "{err}");
    // Kept open across the reload below: established sessions stay on the old worker.
    let mut session = Session::open(&acme.conninfo, &acme.password);

    // kill -9 of the agent while it waits for a new tenant's server to accept logins.
    let reloads = master_reloads(&haproxy);
    replace_file(&tenants_file, &managed(&["acme", "globex"]));
    wait_for("globex's container", PROVISION, || {
        container_running(&env, "globex").map(|_| ())
    });
    daemon.kill9();
    assert!(
        !runtime_map_has(&haproxy, &access_map, "globex"),
        "the agent was killed before globex was ready, so it must not be routable"
    );
    assert_eq!(master_reloads(&haproxy), reloads);

    // `sync` finishes the job (exit 2: changed), and nothing was lost.
    let (code, out) = sync(&layout);
    assert_eq!(code, Some(2), "sync after a killed agent:\n{out}");
    assert!(out.contains("globex"), "{out}");
    wait_routable(&layout, "globex", Duration::from_secs(10));
    assert_eq!(
        psql(&acme.conninfo, &acme.password, "select v from notes").1,
        "kept"
    );
    assert_eq!(
        master_reloads(&haproxy),
        reloads + 1,
        "one reload for globex"
    );
    assert_eq!(
        session.query("select current_user").as_deref(),
        Some("acme"),
        "the session opened before the reload must still answer"
    );
    let (code, out) = sync(&layout);
    assert_eq!(code, Some(0), "a second sync has nothing to do:\n{out}");

    // A container killed behind the agent's back is started again on the Docker event.
    let mut daemon = AgentProcess::start(&layout.config, 600, &layout.dir.path().join("run-2.log"));
    assert!(
        daemon.log_text().contains("changed=false"),
        "{}",
        daemon.log_text()
    );
    // SIGHUP (the unit's ExecReload) asks for a pass.
    daemon.signal(libc::SIGHUP);
    daemon.wait_for_log("reason=Signal", Duration::from_secs(10));
    drop(session); // its server is about to die
    let killed = docker(&["kill", &format!("{}-acme", env.prefix)]);
    assert!(killed.status.success(), "{killed:?}");
    let log = daemon.wait_for_log("server started and ready: acme", PROVISION);
    assert!(
        log.contains("tenant server died") && log.contains("reason=Docker"),
        "{log}"
    );
    wait_for(
        "acme's data after the restart",
        Duration::from_secs(10),
        || {
            let (ok, out, _) = psql(&acme.conninfo, &acme.password, "select v from notes");
            (ok && out == "kept").then_some(())
        },
    );
    assert_eq!(
        master_reloads(&haproxy),
        reloads + 1,
        "a restart never reloads"
    );

    let status = daemon.stop().expect("agent status");
    assert!(
        status.success(),
        "SIGTERM should end `run` cleanly: {status}"
    );
    assert!(daemon.log_text().contains("stopped"));
}

#[test]
fn external_tenants_converge_with_one_reload_and_drift_and_bad_input_are_handled() {
    if !have_tools(&["haproxy", "psql", "initdb", "postgres", "pg_isready"]) {
        return;
    }
    let layout = Layout::init();
    let root = layout.root();
    let tenants_file = root.join("tenants.json");
    let cfg_file = root.join("haproxy/pgs.cfg");
    let access_map = root.join("haproxy/maps/access.map");
    let backends_map = root.join("haproxy/maps/backends.map");
    // One server for all: tenant `ext` is its superuser, `early` and t01..t20 are login roles
    // with the same password, so every tenant can log in as itself through HAProxy.
    let pg = Postgres::start(layout.dir.path(), "pg_ext", "ext", None);
    let sock = pg.socket_path();
    let (ok, _, err) = psql(
        &pg.direct(),
        &pg.password,
        &format!(
            "DO $$ BEGIN FOR i IN 1..20 LOOP EXECUTE format('CREATE ROLE %I LOGIN PASSWORD %L', \
             't' || lpad(i::text, 2, '0'), '{pw}'); END LOOP; END $$; \
             CREATE ROLE early LOGIN PASSWORD '{pw}'",
            pw = pg.password
        ),
    );
    assert!(ok, "{err}");
    let ids: Vec<String> = (1..=20).map(|i| format!("t{i:02}")).collect();
    let login = |id: &str| {
        psql(
            &layout.conninfo(id, "sslmode=disable"),
            &pg.password,
            "select current_user",
        )
    };

    layout.write_tenants(&externals(&sock, &[("ext", "enabled")]).to_string());
    layout.render();
    let mut haproxy = layout.start_haproxy();
    let mut session = Session::open(&layout.conninfo("ext", "sslmode=disable"), &pg.password);

    // Regression: a config written after HAProxy started (here by `render`; an agent killed
    // between writing and reloading leaves the same) was taken for the loaded one unless the
    // agent had reloaded that HAProxy itself: `sync` said "in sync" and routed `early` to a
    // backend the running HAProxy did not have.
    let base = [("ext", "enabled"), ("early", "enabled")];
    let start = haproxy_start_time(&haproxy);
    wait_for(
        "HAProxy's start second to pass",
        Duration::from_secs(5),
        || {
            (SystemTime::now() > UNIX_EPOCH + Duration::from_millis(start * 1000 + 1100))
                .then_some(())
        },
    );
    layout.write_tenants(&externals(&sock, &base).to_string());
    layout.render();
    let reloads = master_reloads(&haproxy);
    let (code, out) = sync(&layout);
    assert_eq!(code, Some(2), "{out}");
    assert_eq!(master_reloads(&haproxy), reloads + 1, "no reload:\n{out}");
    let (ok, out, err) = login("early");
    assert!(ok && out == "early", "{err}");

    // Started as systemd would: READY after the first pass, STATUS, WATCHDOG pings.
    let notify = NotifySocket::bind(&layout.dir.path().join("notify.sock"));
    let mut daemon = AgentProcess::start_with_env(
        &layout.config,
        1,
        &layout.dir.path().join("run.log"),
        &[
            ("NOTIFY_SOCKET", notify.path.to_str().unwrap()),
            ("WATCHDOG_USEC", "1000000"),
        ],
    );
    notify.wait_for("READY=1", Duration::from_secs(5));
    notify.wait_for("STATUS=in sync", Duration::from_secs(5));
    notify.wait_for("WATCHDOG=1", Duration::from_secs(5));
    assert!(
        daemon.log_text().contains("changed=false"),
        "a converged world must not be touched at start:\n{}",
        daemon.log_text()
    );

    // Twenty tenants in one edit: one reload, all routable.
    let reloads = master_reloads(&haproxy);
    let pid = haproxy.worker_pid();
    let mut all: Vec<(&str, &str)> = base.to_vec();
    all.extend(ids.iter().map(|id| (id.as_str(), "enabled")));
    let good = externals(&sock, &all);
    replace_file(&tenants_file, &good.to_string());
    wait_for("22 tenants in both runtime maps", RESYNC, || {
        let full = |m| runtime_map(&haproxy, m).is_some_and(|e| e.len() == 22);
        (full(&backends_map) && full(&access_map)).then_some(())
    });
    let seen = daemon.passes();
    daemon.wait_for_pass_after(seen + 1, RESYNC); // two more passes: no second reload
    assert_eq!(master_reloads(&haproxy), reloads + 1, "exactly one reload");
    assert_ne!(haproxy.worker_pid(), pid);
    assert_eq!(daemon.log_text().matches("HAProxy reloaded").count(), 1);
    for id in &ids {
        let (ok, out, err) = login(id);
        assert!(ok && out == *id, "{id}: {err}");
    }
    assert_eq!(
        session.query("show cluster_name").as_deref(),
        Some("pg_ext")
    );

    // Drift: map entries deleted by hand and a config edited on disk are repaired by the
    // periodic resync, without a reload.
    let pid = haproxy.worker_pid();
    let mark = daemon.mark();
    haproxy.admin(&format!("del map {} t05", access_map.display()));
    haproxy.admin(&format!("del map {} t06", backends_map.display()));
    wait_for("the resync to restore both map entries", RESYNC, || {
        (runtime_map_has(&haproxy, &access_map, "t05")
            && runtime_map_has(&haproxy, &backends_map, "t06"))
        .then_some(())
    });
    daemon.wait_for_log_after(mark, "access opened: t05", RESYNC);
    daemon.wait_for_log_after(mark, "backends map: t06", RESYNC);
    assert!(login("t05").0 && login("t06").0);
    let rendered = std::fs::read_to_string(&cfg_file).unwrap();
    let stale =
        rendered.replacen("    maxconn 2000\n", "    maxconn 1\n", 1) + "# edited by hand\n";
    assert!(stale.contains("maxconn 1\n"), "{rendered}");
    let mark = daemon.mark();
    std::fs::write(&cfg_file, stale).unwrap();
    wait_for("the stale config to be replaced", RESYNC, || {
        (std::fs::read_to_string(&cfg_file).unwrap() == rendered).then_some(())
    });
    daemon.wait_for_log_after(mark, "configuration written", RESYNC);
    // Regression: map files edited on disk were never rewritten (only HAProxy's memory was
    // repaired), so the next HAProxy start lost t07's route and let an intruder in.
    let files_before = [&backends_map, &access_map].map(|f| std::fs::read_to_string(f).unwrap());
    assert!(files_before[0].contains("t07 pgs_t07\n"));
    let mark = daemon.mark();
    std::fs::write(&backends_map, files_before[0].replace("t07 pgs_t07\n", "")).unwrap();
    std::fs::write(
        &access_map,
        format!("{}intruder enabled\n", files_before[1]),
    )
    .unwrap();
    wait_for("the map files to be repaired", RESYNC, || {
        let now = [&backends_map, &access_map].map(|f| std::fs::read_to_string(f).unwrap());
        (now == files_before).then_some(())
    });
    daemon.wait_for_log_after(mark, "map file written", RESYNC);
    assert_eq!(haproxy.worker_pid(), pid, "repairing drift must not reload");

    // An invalid tenants file: every problem logged with its place, nothing torn down.
    let mut bad = good.clone();
    bad["tenants"]["t05"]["access"] = json!("on");
    bad["tenants"]["t06"]["acess"] = json!("enabled");
    let mark = daemon.mark();
    replace_file(&tenants_file, &bad.to_string());
    let log = daemon.wait_for_log_after(mark, "pass failed", RESYNC);
    for want in ["tenants.t05.access", "tenants.t06.acess"] {
        assert!(log.contains(want), "no {want:?} in the agent's log:\n{log}");
    }
    let seen = daemon.passes();
    daemon.wait_for_pass_after(seen, RESYNC);
    for m in [&access_map, &backends_map] {
        assert_eq!(runtime_map(&haproxy, m).unwrap().len(), 22, "{m:?}");
    }
    assert!(
        login("t05").0 && login("ext").0,
        "previous tenants must stay routable"
    );
    assert_eq!(std::fs::read_to_string(&cfg_file).unwrap(), rendered);
    // Fixing the file converges again (an access change: no reload).
    let mut fixed = good.clone();
    fixed["tenants"]["t05"]["access"] = json!("disabled");
    let mark = daemon.mark();
    replace_file(&tenants_file, &fixed.to_string());
    wait_for("t05's access to close", RESYNC, || {
        (!runtime_map_has(&haproxy, &access_map, "t05")).then_some(())
    });
    let (ok, _, err) = login("t05");
    assert!(!ok && err.contains("not available"), "{err}");
    daemon.wait_for_log_after(mark, "access closed: t05", RESYNC);
    assert_eq!(haproxy.worker_pid(), pid);

    let status = daemon.stop().expect("agent status");
    assert!(
        status.success(),
        "SIGTERM should end `run` cleanly: {status}"
    );
    notify.wait_for("STOPPING=1", Duration::from_secs(5));

    // `sync` exit codes: 0 in sync, 2 changed something, 1 failed.
    let (code, out) = sync(&layout);
    assert_eq!(code, Some(0), "{out}");
    haproxy.admin(&format!("del map {} t06", access_map.display()));
    let (code, out) = sync(&layout);
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("t06"), "{out}");
    assert!(runtime_map_has(&haproxy, &access_map, "t06"));

    // A setting our validation lets through but HAProxy rejects: `sync` fails with HAProxy's
    // own words, the files on disk stay the previous good ones, HAProxy keeps serving.
    let settings = std::fs::read_to_string(&layout.config).unwrap();
    let broken = settings.replace("format short", "format nonsense");
    assert_ne!(settings, broken);
    std::fs::write(&layout.config, &broken).unwrap();
    let files = [
        &cfg_file,
        &access_map,
        &backends_map,
        &root.join("haproxy/pg-route.lua"),
    ];
    let before: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(f).unwrap()).collect();
    let reloads = master_reloads(&haproxy);
    let (code, out) = sync(&layout);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("HAProxy rejected") && out.contains("unknown log format 'nonsense'"),
        "{out}"
    );
    let after: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(f).unwrap()).collect();
    assert!(
        before == after,
        "a rejected config must leave the files alone"
    );
    assert_eq!(haproxy.worker_pid(), pid);
    assert_eq!(master_reloads(&haproxy), reloads);
    assert!(login("ext").0);
    std::fs::write(&layout.config, &settings).unwrap();
    let (code, out) = sync(&layout);
    assert_eq!(code, Some(0), "{out}");

    // The session opened at the start lived through both reloads and everything since.
    assert_eq!(
        session.query("show cluster_name").as_deref(),
        Some("pg_ext")
    );

    // Regression: a rejected config while HAProxy was down emptied the access map file (no
    // running HAProxy meant "no known backends"), so HAProxy then started refusing everyone.
    drop(session);
    haproxy.stop();
    let access_before = std::fs::read(&access_map).unwrap();
    std::fs::write(&layout.config, &broken).unwrap();
    let (code, out) = sync(&layout);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        std::fs::read(&access_map).unwrap() == access_before,
        "access map file changed"
    );
    std::fs::write(&layout.config, &settings).unwrap();
    let (code, out) = sync(&layout);
    assert_eq!(code, Some(0), "{out}");
}

/// The installation haproxy/haproxy.service.d/pgs.conf describes: the operator's config owns
/// `global` (with the stats socket `haproxy.admin_socket` points to), pgs.cfg is a fragment
/// loaded after it, and `sync` adds a tenant with one reload through the master socket while
/// the operator's own proxy keeps answering.
#[test]
fn fragment_mode_lives_beside_the_operators_config() {
    if !have_tools(&["haproxy", "psql", "initdb", "postgres", "pg_isready"]) {
        return;
    }
    let layout = Layout::init();
    let dir = layout.dir.path();
    let root = layout.root();
    let pg = Postgres::start(dir, "pg_frag", "frag", None);
    let (ok, _, err) = psql(
        &pg.direct(),
        &pg.password,
        &format!("CREATE ROLE frag2 LOGIN PASSWORD '{}'", pg.password),
    );
    assert!(ok, "{err}");
    let admin = dir.join("operator-admin.sock");
    let master = dir.join("operator-master.sock");
    let web_port = crate::support::free_port();
    // HAProxy reads every *.cfg of a directory in name order: the operator's file, then pgs's
    // (the two `-f` of the drop-in).
    let conf = dir.join("conf");
    std::fs::create_dir(&conf).unwrap();
    std::fs::write(
        conf.join("00-haproxy.cfg"),
        format!(
            "global\n    stats socket {} mode 600 level admin\n    log stderr format short local0 info\n\
             defaults\n    mode http\n    log global\n    timeout connect 5s\n    timeout client 30s\n    timeout server 30s\n\
             frontend operator_web\n    bind 127.0.0.1:{web_port}\n    \
             http-request return status 200 content-type text/plain string operator\n",
            admin.display()
        ),
    )
    .unwrap();
    std::os::unix::fs::symlink(root.join("haproxy/pgs.cfg"), conf.join("50-pgs.cfg")).unwrap();
    let settings = std::fs::read_to_string(&layout.config).unwrap();
    let fragment = settings.replace(
        "mode = \"full\"\n",
        &format!(
            "mode = \"fragment\"\nadmin_socket = \"{}\"\nmaster_socket = \"{}\"\n",
            admin.display(),
            master.display()
        ),
    );
    assert_ne!(settings, fragment);
    std::fs::write(&layout.config, fragment).unwrap();
    let sock = pg.socket_path();
    layout.write_tenants(&externals(&sock, &[("frag", "enabled")]).to_string());
    layout.render();
    let cfg = std::fs::read_to_string(root.join("haproxy/pgs.cfg")).unwrap();
    assert!(
        !cfg.contains("stats socket"),
        "a fragment has no global settings:\n{cfg}"
    );
    let haproxy = Haproxy::start(&conf, &master, &admin, &dir.join("haproxy.log"));
    let login = |id: &str| {
        psql(
            &layout.conninfo(id, "sslmode=disable"),
            &pg.password,
            "select current_user",
        )
    };
    let web = || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", web_port)).unwrap();
        s.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
        let mut reply = String::new();
        s.read_to_string(&mut reply).unwrap();
        reply
    };
    assert_eq!(login("frag").1, "frag");
    assert!(web().ends_with("operator"));
    let (code, out) = sync(&layout);
    assert_eq!(code, Some(0), "{out}");

    let reloads = master_reloads(&haproxy);
    layout
        .write_tenants(&externals(&sock, &[("frag", "enabled"), ("frag2", "enabled")]).to_string());
    let (code, out) = sync(&layout);
    assert_eq!(code, Some(2), "{out}");
    assert_eq!(master_reloads(&haproxy), reloads + 1, "{out}");
    let (ok, who, err) = login("frag2");
    assert!(ok && who == "frag2", "{err}");
    assert!(
        web().ends_with("operator"),
        "the operator's proxy must survive"
    );
    let (code, out) = sync(&layout);
    assert_eq!(code, Some(0), "{out}");
}
