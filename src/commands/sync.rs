//! `plan`, `sync` and `run`: the reconciler from the command line.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::daemon::{self, Poke, Timing};
use crate::fsutil::FileLock;
use crate::instances::docker::{DockerDriver, EngineEvent};
use crate::reconcile::{self, Report, SyncOptions};
use crate::settings::Agent;
use crate::tenants::{self, Instance};

/// Exit code of `sync` when it changed something and the world is now in sync.
pub const EXIT_CHANGED: u8 = 2;

/// The Docker driver, when the engine answers. Without managed tenants a missing engine is
/// fine (external tenants only); with them it is an error that says how to fix it.
pub async fn driver(agent: &Agent) -> anyhow::Result<Option<DockerDriver>> {
    match DockerDriver::connect(&agent.settings.docker, &agent.paths).await {
        Ok(d) => Ok(Some(d.with_backups(&agent.settings.backups))),
        Err(e) => {
            let managed = tenants::load(&agent.paths.tenants_file)
                .map(|t| t.iter().any(|t| matches!(t.instance, Instance::Managed(_))))
                .unwrap_or(false);
            if managed {
                Err(e).context("the tenants file has managed tenants, but Docker is not reachable")
            } else {
                tracing::debug!(error = %e, "no Docker engine; external tenants only");
                Ok(None)
            }
        }
    }
}

pub async fn plan(agent: &Agent, json: bool) -> anyhow::Result<ExitCode> {
    let d = driver(agent).await?;
    let report = reconcile::sync(agent, d.as_ref(), SyncOptions { dry_run: true }).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report.plan)?);
    } else if report.plan.is_empty() {
        println!("in sync: nothing to do");
    } else {
        for line in report.plan.describe() {
            println!("{line}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn sync(agent: &Agent, dry_run: bool, json: bool) -> anyhow::Result<ExitCode> {
    let d = driver(agent).await?;
    let report = reconcile::sync(agent, d.as_ref(), SyncOptions { dry_run }).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report, dry_run);
    }
    Ok(exit_code(&report, dry_run))
}

fn exit_code(report: &Report, dry_run: bool) -> ExitCode {
    if !report.errors.is_empty() {
        ExitCode::FAILURE
    } else if report.changed() || (dry_run && !report.plan.is_empty()) {
        ExitCode::from(EXIT_CHANGED)
    } else {
        ExitCode::SUCCESS
    }
}

/// The summary a CI log reader sees, then the details.
pub fn print_report(report: &Report, dry_run: bool) {
    if dry_run {
        if report.plan.is_empty() {
            println!("pgs sync --dry-run: in sync, nothing to do");
        } else {
            println!(
                "pgs sync --dry-run: {} change(s) due",
                report.plan.describe().len()
            );
            for line in report.plan.describe() {
                println!("  - {line}");
            }
        }
        return;
    }
    let verdict = if !report.errors.is_empty() {
        "FAILED"
    } else if report.changed() {
        "changed"
    } else {
        "in sync"
    };
    println!(
        "pgs sync: {verdict}: {} change(s), {} problem(s), {}reload, {} ms",
        report.done.len(),
        report.errors.len(),
        if report.reloaded { "" } else { "no " },
        report.duration_ms
    );
    for line in &report.done {
        println!("  - {line}");
    }
    for line in &report.errors {
        println!("  ! {line}");
    }
    for t in &report.held_back {
        println!("  ! {t} is not routable until its server accepts logins");
    }
    if !report.haproxy_running {
        println!(
            "  ! HAProxy is not running: its files are written, and nothing is routed until it \
             starts (README.md, Troubleshooting)"
        );
    }
}

pub async fn run(agent: &Agent, resync: u64) -> anyhow::Result<ExitCode> {
    let lock_path = &agent.paths.daemon_lock;
    let Some(_daemon_lock) = FileLock::try_exclusive(lock_path)
        .with_context(|| format!("cannot open {}", lock_path.display()))?
    else {
        bail!(
            "another `pgs-agent run` is already serving this layout (it holds {}); stop it \
             first (systemctl stop pgs-agent, or SIGTERM to its pid)",
            lock_path.display()
        );
    };
    let d = driver(agent).await?;
    let (tx, rx) = mpsc::channel(64);
    let _watcher = daemon::watch_tenants_file(&agent.paths.tenants_file, tx.clone())
        .with_context(|| format!("cannot watch {}", agent.paths.tenants_file.display()))?;
    let _cert_watcher = match &agent.settings.tls {
        Some(_) => Some(
            daemon::watch_certificates(&agent.paths.tls_dir, tx.clone()).with_context(|| {
                format!(
                    "cannot watch the certificates directory {}",
                    agent.paths.tls_dir.display()
                )
            })?,
        ),
        None => None,
    };
    if let Some(d) = &d {
        let events = d.clone();
        let events_agent = agent.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            events
                .watch_events(|event| match event {
                    EngineEvent::Died { tenant, container } => {
                        if crate::sleep::states_on_file(&events_agent).contains_key(&tenant) {
                            info!(tenant = %tenant, container = %container, "container of a sleeping tenant stopped");
                        } else {
                            warn!(tenant = %tenant, container = %container, "tenant server died; repairing");
                        }
                        let _ = tx.try_send(Poke::Docker(container));
                    }
                    EngineEvent::Back => {
                        let _ = tx.try_send(Poke::DockerBack);
                    }
                })
                .await
        });
    }
    let hup_tx = tx.clone();
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("cannot listen for SIGHUP")?;
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            info!("SIGHUP: resync");
            let _ = hup_tx.send(Poke::Signal).await;
        }
    });
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot listen for SIGTERM")?;
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => info!("SIGTERM: finishing the current pass, then stopping"),
            _ = tokio::signal::ctrl_c() => info!("interrupted: finishing the current pass, then stopping"),
        }
    };
    let timing = Timing {
        resync: Duration::from_secs(resync.max(1)),
        ..Timing::default()
    };
    info!(
        tenants_file = %agent.paths.tenants_file.display(),
        docker = d.is_some(),
        "pgs-agent running"
    );
    if d.is_none() {
        warn!("no Docker engine: managed tenants cannot be served until one answers");
    }
    // Sleep and wake: the wake socket HAProxy's tenant backends call, and the idle passes.
    let sleeper = d
        .clone()
        .map(|d| Arc::new(crate::sleep::Sleeper::new(agent, d)));
    let mut sleep_tasks = Vec::new();
    if let Some(s) = &sleeper {
        let listener = crate::sleep::local::bind(
            &agent.paths.wake_socket,
            agent.settings.sleep.socket_user.as_deref(),
        )?;
        sleep_tasks.push(tokio::spawn(crate::sleep::local::serve(
            listener,
            Arc::clone(s),
        )));
        sleep_tasks.push(tokio::spawn(Arc::clone(s).run_idle_passes()));
    }
    // Bound before the first pass, so a taken address fails here; served beside the loop.
    let api = crate::api::start(agent, d.clone(), sleeper.clone(), tx.clone()).await?;
    // Scheduled backups, verifies and restore tests, one job at a time, beside the loop.
    let backups = d
        .clone()
        .map(|d| tokio::spawn(crate::backups::schedule::run(agent.clone(), d)));
    daemon::run(agent, d.as_ref(), rx, shutdown, timing, |pass| {
        api.on_pass(pass)
    })
    .await;
    if let Some(task) = backups {
        task.abort();
    }
    for task in sleep_tasks {
        task.abort();
    }
    api.stop().await;
    Ok(ExitCode::SUCCESS)
}
