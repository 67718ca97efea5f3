//! The Runtime API and master CLI clients against a real `haproxy -W -S` (2.6): every command,
//! HAProxy's error replies as typed errors, batches, atomic map replacement, session shutdown,
//! reloads confirmed by a new worker pid, and a configuration that fails to load.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgs_agent::haproxy::master::{MasterCli, MasterError};
use pgs_agent::haproxy::runtime::{
    BatchMode, Command, Endpoint, ReplyError, RuntimeApi, RuntimeError, ServerOpState, SetOutcome,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::{free_port, have_tools, temp_dir, Haproxy as Proc};

struct Ports {
    frontend: u16,
    server: u16,
    runtime_tcp: u16,
}

/// HAProxy with a map, a user-level socket and a TCP Runtime API socket beside the admin one.
struct Haproxy {
    proc: Proc,
    dir: PathBuf,
    map: PathBuf,
    cfg: PathBuf,
    ports: Ports,
    _tmp: tempfile::TempDir,
}

impl Haproxy {
    fn admin_sock(&self) -> PathBuf {
        self.dir.join("admin.sock")
    }
    fn user_sock(&self) -> PathBuf {
        self.dir.join("user.sock")
    }
    fn master_sock(&self) -> PathBuf {
        self.dir.join("master.sock")
    }

    fn config(dir: &Path, map: &Path, ports: &Ports) -> String {
        format!(
            "global
    stats socket {admin} mode 600 level admin
    stats socket {user} mode 600 level user
    stats socket ipv4@127.0.0.1:{tcp} level admin
    stats timeout 30s

defaults
    mode tcp
    timeout connect 1s
    timeout client 30s
    timeout server 30s

frontend pg
    bind 127.0.0.1:{fe}
    use_backend %[src,map({map},be_default)]

backend be_default
    server s1 127.0.0.1:{srv}

backend pgs_acme
    server pg 127.0.0.1:{srv}
",
            admin = dir.join("admin.sock").display(),
            user = dir.join("user.sock").display(),
            tcp = ports.runtime_tcp,
            fe = ports.frontend,
            srv = ports.server,
            map = map.display(),
        )
    }

    fn start() -> Haproxy {
        let tmp = temp_dir();
        let dir = tmp.path().to_path_buf();
        let map = dir.join("m.map");
        std::fs::write(&map, "tenant_a pgs_a\ntenant_b pgs_b\n").unwrap();
        let ports = Ports {
            frontend: free_port(),
            server: free_port(),
            runtime_tcp: free_port(),
        };
        let cfg = dir.join("haproxy.cfg");
        std::fs::write(&cfg, Self::config(&dir, &map, &ports)).unwrap();
        let proc = Proc::start(
            &cfg,
            &dir.join("master.sock"),
            &dir.join("admin.sock"),
            &dir.join("haproxy.log"),
        );
        Haproxy {
            proc,
            dir,
            map,
            cfg,
            ports,
            _tmp: tmp,
        }
    }
}

fn kind(r: Result<impl std::fmt::Debug, RuntimeError>) -> Option<ReplyError> {
    r.expect_err("expected an HAProxy error").reply_error()
}

fn sorted(mut v: Vec<(String, String)>) -> Vec<(String, String)> {
    v.sort();
    v
}

fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
    v.iter()
        .map(|(k, s)| (k.to_string(), s.to_string()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_command_against_a_real_haproxy() {
    if !have_tools(&["haproxy"]) {
        return;
    }
    let mut h = Haproxy::start();
    let api = RuntimeApi::new(h.admin_sock());
    let map = h.map.as_path();
    let nope_path = h.dir.join("nope.map");
    let nope = nope_path.as_path();

    // --- show info, over the unix socket and over TCP.
    let info = api.show_info().await.unwrap();
    assert!(info.version.starts_with("2.6"), "{}", info.version);
    assert!(info.pid > 0);
    assert_eq!(info.get("Name"), Some("HAProxy"));
    let tcp = RuntimeApi::new(Endpoint::Tcp(SocketAddr::from((
        [127, 0, 0, 1],
        h.ports.runtime_tcp,
    ))));
    assert_eq!(tcp.show_info().await.unwrap().pid, info.pid);

    // --- single map commands and their errors.
    assert_eq!(
        sorted(api.show_map(map).await.unwrap()),
        pairs(&[("tenant_a", "pgs_a"), ("tenant_b", "pgs_b")])
    );
    api.add_map(map, "acme", "pgs_acme").await.unwrap();
    api.set_map(map, "acme", "pgs_acme2").await.unwrap();
    assert!(api
        .show_map(map)
        .await
        .unwrap()
        .contains(&("acme".into(), "pgs_acme2".into())));
    assert_eq!(
        kind(api.set_map(map, "ghost", "x").await),
        Some(ReplyError::EntryNotFound)
    );
    api.del_map(map, "acme").await.unwrap();
    assert_eq!(
        kind(api.del_map(map, "acme").await),
        Some(ReplyError::EntryNotFound)
    );
    for r in [
        api.add_map(nope, "k", "v").await,
        api.set_map(nope, "k", "v").await,
        api.del_map(nope, "k").await,
        api.clear_map(nope).await,
    ] {
        assert_eq!(kind(r), Some(ReplyError::UnknownMap));
    }
    assert_eq!(kind(api.show_map(nope).await), Some(ReplyError::UnknownMap));
    let err = api.set_map(nope, "k", "v").await.unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "HAProxy rejected `set map {} k v` (unknown map): Unknown map \
             identifier. Please use #<id> or <file>.",
            nope.display()
        )
    );
    assert!(matches!(
        api.add_map(map, "a b", "v").await,
        Err(RuntimeError::InvalidArgument { .. })
    ));

    // --- set_entry / del_entry.
    assert_eq!(
        api.set_entry(map, "acme", "pgs_acme").await.unwrap(),
        SetOutcome::Added
    );
    assert_eq!(
        api.set_entry(map, "acme", "enabled").await.unwrap(),
        SetOutcome::Updated
    );
    assert!(api.del_entry(map, "acme").await.unwrap());
    assert!(!api.del_entry(map, "acme").await.unwrap());

    // --- versions by hand: prepare, add @ver, show @ver, commit; and their errors.
    let v = api.prepare_map(map).await.unwrap();
    api.add_map_version(map, v, "x", "pgs_x").await.unwrap();
    assert_eq!(
        api.show_map_version(map, v).await.unwrap(),
        pairs(&[("x", "pgs_x")])
    );
    assert_eq!(
        api.show_map(map).await.unwrap().len(),
        2,
        "not visible before commit"
    );
    assert_eq!(
        kind(api.add_map_version(map, v + 100, "y", "v").await),
        Some(ReplyError::VersionInFuture)
    );
    assert_eq!(
        kind(api.commit_map(map, v + 100).await),
        Some(ReplyError::VersionOutOfRange)
    );
    assert_eq!(
        kind(api.prepare_map(nope).await),
        Some(ReplyError::UnknownMap)
    );
    api.commit_map(map, v).await.unwrap();
    assert_eq!(api.show_map(map).await.unwrap(), pairs(&[("x", "pgs_x")]));
    api.clear_map(map).await.unwrap();
    assert!(api.show_map(map).await.unwrap().is_empty());

    // --- batches, both modes: 1,000 adds, then mixed results keep their order.
    for mode in [BatchMode::Prompt, BatchMode::Lines] {
        let api = api.clone().with_batch_mode(mode);
        let adds: Vec<Command> = (0..1000)
            .map(|i| Command::add_map(map, format!("t{i:04}"), format!("pgs_t{i:04}")))
            .collect();
        let results = api.batch(&adds).await.unwrap();
        assert_eq!(results.len(), 1000);
        assert!(results
            .iter()
            .all(|r| r.as_ref().is_ok_and(|b| b.is_empty())));
        let shown = api.show_map(map).await.unwrap();
        assert_eq!(shown.len(), 1000, "{mode:?}");
        assert_eq!(shown[999], ("t0999".into(), "pgs_t0999".into()));

        let mixed = [
            Command::set_map(map, "t0001", "changed"),
            Command::set_map(map, "ghost", "x"),
            Command::add_map(nope, "k", "v"),
            Command::del_map(map, "t0002"),
            Command::show_map(map),
        ];
        let r = api.batch(&mixed).await.unwrap();
        assert!(r[0].is_ok());
        assert_eq!(
            r[1].as_ref().unwrap_err().reply_error(),
            Some(ReplyError::EntryNotFound)
        );
        assert_eq!(
            r[2].as_ref().unwrap_err().reply_error(),
            Some(ReplyError::UnknownMap)
        );
        assert!(r[3].is_ok());
        assert_eq!(r[4].as_ref().unwrap().lines().count(), 999);
        api.clear_map(map).await.unwrap();
    }

    // --- replace_map: a watcher never sees a half-written map.
    let old: Vec<(String, String)> = (0..300)
        .map(|i| (format!("old{i}"), "pgs_old".to_string()))
        .collect();
    api.replace_map(map, &old).await.unwrap();
    assert_eq!(
        sorted(api.show_map(map).await.unwrap()),
        sorted(old.clone())
    );
    let new: Vec<(String, String)> = (0..2000)
        .map(|i| (format!("new{i:04}"), format!("pgs_n{i}")))
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let samples = Arc::new(AtomicUsize::new(0));
    let watcher = {
        let (api, map) = (api.clone(), map.to_path_buf());
        let (stop, samples) = (stop.clone(), samples.clone());
        tokio::spawn(async move {
            let mut sizes = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                sizes.push(api.show_map(&map).await.unwrap().len());
                samples.fetch_add(1, Ordering::SeqCst);
            }
            sizes
        })
    };
    let wait_for_samples = |n: usize| {
        let samples = samples.clone();
        async move {
            while samples.load(Ordering::SeqCst) < n {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    };
    wait_for_samples(1).await;
    let version = api.replace_map(map, &new).await.unwrap();
    // Two more samples: the second one started after the commit.
    wait_for_samples(samples.load(Ordering::SeqCst) + 2).await;
    stop.store(true, Ordering::SeqCst);
    let sizes = watcher.await.unwrap();
    // The old map, then the new one, never a mix: 300…300 [0] 2000…2000. `show map` fixes the
    // generation it lists when the command is parsed and walks the entries later, so one dump
    // that straddles the commit lists the old generation after it was purged: empty.
    let olds = sizes.iter().take_while(|&&n| n == 300).count();
    let rest = &sizes[olds..];
    let news = rest.strip_prefix(&[0]).unwrap_or(rest);
    assert!(
        olds > 0 && !news.is_empty() && news.iter().all(|&n| n == 2000),
        "watcher saw a partial map: {sizes:?}"
    );
    assert!(version > 0);
    assert_eq!(
        sorted(api.show_map(map).await.unwrap()),
        sorted(new.clone())
    );
    // A bad entry is refused before anything is prepared; the map keeps its content.
    let bad = [("ok", "v"), ("bad key", "v")];
    assert!(matches!(
        api.replace_map(map, &bad).await,
        Err(RuntimeError::InvalidArgument { .. })
    ));
    assert_eq!(api.show_map(map).await.unwrap().len(), 2000);
    assert_eq!(
        kind(api.replace_map(nope, &bad[..1]).await),
        Some(ReplyError::UnknownMap)
    );
    api.replace_map::<&str, &str>(map, &[]).await.unwrap();
    assert!(api.show_map(map).await.unwrap().is_empty());

    // --- a live session through the frontend: show stat, show servers state, shutdown.
    let server = tokio::net::TcpListener::bind(("127.0.0.1", h.ports.server))
        .await
        .unwrap();
    api.set_entry(map, "127.0.0.1", "pgs_acme").await.unwrap();
    let mut client = tokio::net::TcpStream::connect(("127.0.0.1", h.ports.frontend))
        .await
        .unwrap();
    let (_upstream, _) = tokio::time::timeout(Duration::from_secs(5), server.accept())
        .await
        .unwrap()
        .unwrap();
    // The kernel completes our accept a moment before HAProxy counts the session on the
    // server (it does so once it sees the connect succeed), so poll briefly.
    let deadline = Instant::now() + Duration::from_secs(5);
    let stats = loop {
        let stats = api.show_stat().await.unwrap();
        let counted = stats
            .iter()
            .any(|r| r.pxname() == "pgs_acme" && r.svname() == "pg" && r.scur() == Some(1));
        if counted || Instant::now() > deadline {
            break stats;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let acme_be = stats
        .iter()
        .find(|r| r.pxname() == "pgs_acme" && r.svname() == "BACKEND")
        .unwrap();
    assert_eq!(acme_be.scur(), Some(1));
    assert_eq!(acme_be.stot(), Some(1));
    assert_eq!(acme_be.status(), Some("UP"));
    let pg = stats
        .iter()
        .find(|r| r.pxname() == "pgs_acme" && r.svname() == "pg")
        .unwrap();
    assert_eq!(pg.scur(), Some(1));
    assert_eq!(pg.status(), Some("no check"));
    assert!(pg.bin().is_some() && pg.bout().is_some());
    assert_eq!(
        pg.get("addr"),
        Some(format!("127.0.0.1:{}", h.ports.server).as_str())
    );
    let fe = stats.iter().find(|r| r.svname() == "FRONTEND").unwrap();
    assert_eq!((fe.pxname(), fe.status()), ("pg", Some("OPEN")));

    let states = api.show_servers_state().await.unwrap();
    let acme = states.iter().find(|s| s.backend == "pgs_acme").unwrap();
    assert_eq!(acme.server, "pg");
    assert_eq!(acme.addr, "127.0.0.1");
    assert_eq!(acme.port, Some(h.ports.server));
    assert_eq!(acme.op_state, ServerOpState::Running);
    assert!(!acme.in_maintenance());
    let one = api
        .execute(&Command::ShowServersStateOf {
            backend: "pgs_acme".into(),
        })
        .await
        .unwrap();
    assert_eq!(one.lines().count(), 3);
    assert_eq!(
        kind(
            api.execute(&Command::ShowServersStateOf {
                backend: "nope".into()
            })
            .await
        ),
        Some(ReplyError::NoSuchBackend)
    );

    assert_eq!(
        kind(api.shutdown_sessions_server("pgs_acme", "nope").await),
        Some(ReplyError::NoSuchServer)
    );
    assert_eq!(
        kind(api.shutdown_sessions_server("nope", "pg").await),
        Some(ReplyError::NoSuchBackend)
    );
    let user = RuntimeApi::new(h.user_sock());
    assert_eq!(
        kind(user.shutdown_sessions_server("pgs_acme", "pg").await),
        Some(ReplyError::PermissionDenied)
    );
    api.shutdown_sessions_server("pgs_acme", "pg")
        .await
        .unwrap();
    let mut buf = [0u8; 1];
    let n = tokio::time::timeout(Duration::from_secs(5), client.read(&mut buf))
        .await
        .expect("session was not shut down")
        .unwrap_or(0);
    assert_eq!(n, 0, "client connection closed by shutdown sessions");

    // --- master CLI: show proc, reload_and_confirm, a failed reload, recovery.
    let master = MasterCli::new(h.master_sock());
    let before = master.show_proc().await.unwrap();
    assert_eq!(before.master.pid, h.proc.master_pid());
    let worker = before.current_workers().next().unwrap().clone();
    assert_eq!(worker.pid, info.pid);
    assert!(worker.version.starts_with("2.6"));
    assert_eq!(before.master.failed_reloads, 0);

    // Keep a session open so the old worker lingers and shows up as old.
    let mut client = tokio::net::TcpStream::connect(("127.0.0.1", h.ports.frontend))
        .await
        .unwrap();
    let _upstream = tokio::time::timeout(Duration::from_secs(5), server.accept())
        .await
        .unwrap()
        .unwrap();
    let after = master
        .reload_and_confirm(Duration::from_secs(10))
        .await
        .unwrap();
    let new_worker = after.current_workers().next().unwrap();
    assert_ne!(new_worker.pid, worker.pid);
    assert_eq!(after.master.reloads, before.master.reloads + 1);
    assert!(after.old_workers().any(|w| w.pid == worker.pid));
    // The reload re-read the map file: runtime changes are gone.
    let api_new = RuntimeApi::new(h.admin_sock());
    assert_eq!(api_new.show_info().await.unwrap().pid, new_worker.pid);
    assert_eq!(
        sorted(api_new.show_map(map).await.unwrap()),
        pairs(&[("tenant_a", "pgs_a"), ("tenant_b", "pgs_b")])
    );

    // A configuration that does not load.
    let good = std::fs::read_to_string(&h.cfg).unwrap();
    std::fs::write(&h.cfg, format!("{good}\nbogus_keyword here\n")).unwrap();
    let err = master
        .reload_and_confirm(Duration::from_secs(10))
        .await
        .unwrap_err();
    match &err {
        MasterError::ReloadFailed {
            failed_reloads,
            procs,
        } => {
            assert_eq!(*failed_reloads, 1);
            assert_eq!(
                procs.current_workers().next().unwrap().pid,
                new_worker.pid,
                "the previous worker keeps serving"
            );
        }
        other => panic!("expected ReloadFailed, got {other:?}"),
    }
    eprintln!("failed reload: {err}");
    assert_eq!(
        api_new.show_info().await.unwrap().pid,
        new_worker.pid,
        "still serving"
    );
    let prompt = master.command("prompt").await.unwrap();
    assert_eq!(prompt, "master[ReloadFailed]> ");

    // Fix the file; the next reload works and clears the failed count.
    std::fs::write(&h.cfg, good).unwrap();
    let fixed = master
        .reload_and_confirm(Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(fixed.master.failed_reloads, 0);
    assert!(fixed
        .current_workers()
        .all(|w| w.pid != new_worker.pid && w.pid != worker.pid));
    assert_eq!(master.command("prompt").await.unwrap(), "master> ");
    drop(client.shutdown().await);

    h.proc.stop();
    // Gone: both sockets refuse, with errors that name the path.
    let err = RuntimeApi::new(h.admin_sock())
        .show_info()
        .await
        .unwrap_err();
    assert!(err.is_unreachable(), "{err}");
    assert!(
        err.to_string().starts_with(&format!(
            "HAProxy runtime socket {}: ",
            h.admin_sock().display()
        )),
        "{err}"
    );
    assert!(master.show_proc().await.is_err());
}
