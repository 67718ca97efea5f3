//! `tenant backup|backups|restore|verify|restore-test|volumes`: call `backups` and print for
//! people (or JSON).

use std::process::ExitCode;

use anyhow::{anyhow, bail};

use super::sync::print_report;
use super::tenant::require_docker;
use crate::backups::restore::{self, Target};
use crate::backups::{self, clock, status};
use crate::settings::Agent;
use crate::tenants::TenantId;

fn size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

pub async fn backup(
    agent: &Agent,
    id: &TenantId,
    full: bool,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let docker = require_docker(agent).await?;
    let o = backups::backup(agent, &docker, id, full).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&o)?);
    } else {
        println!(
            "{id}: {} backup {} done in {:.1}s ({}, {} in the repository{})",
            o.backup.kind,
            o.backup.label,
            o.seconds,
            size(o.backup.database_size),
            size(o.backup.repository_size),
            if o.backup.online {
                ""
            } else {
                "; server was stopped"
            }
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn list(agent: &Agent, id: &TenantId, json: bool) -> anyhow::Result<ExitCode> {
    let listing = backups::list(agent, id)?;
    let st = status::load(&agent.paths, id);
    let (failures, last) = status::archive_failures(&agent.paths, id);
    if json {
        let mut v = serde_json::to_value(&listing)?;
        v["status"] = serde_json::to_value(&st)?;
        v["archive"] = serde_json::json!({"failures": failures, "last_failure": last});
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "repository {} ({})",
        listing.repository,
        size(listing.repository_bytes)
    );
    if listing.backups.is_empty() {
        println!(
            "no backups yet; `{} tenant backup {id}` takes one",
            agent.cli()
        );
    } else {
        println!(
            "{:<36} {:<5} {:<23} {:<23} {:>10} {:>10}",
            "LABEL", "TYPE", "START", "STOP", "SIZE", "STORED"
        );
        for b in &listing.backups {
            println!(
                "{:<36} {:<5} {:<23} {:<23} {:>10} {:>10}{}",
                b.label,
                b.kind,
                clock::format_utc(b.start),
                clock::format_utc(b.stop),
                size(b.database_size),
                size(b.repository_size),
                if b.online { "" } else { "  (offline)" }
            );
        }
    }
    match listing.window {
        Some(w) => println!(
            "restore window: {} to {}",
            clock::format_utc(w.from),
            clock::format_utc(w.to)
        ),
        None => println!("restore window: none"),
    }
    print_status(&st);
    print_archive_failures(failures, last.as_ref());
    Ok(ExitCode::SUCCESS)
}

/// One line when the server failed to push WAL into the repository.
pub fn print_archive_failures(failures: u64, last: Option<&status::ArchiveFailure>) {
    if let Some(last) = last {
        println!(
            "WAL archiving FAILED {failures} time(s), last for {} at {} (`docker logs` of the \
             tenant's container has pgBackRest's message)",
            last.segment,
            clock::format_utc(last.at)
        );
    }
}

/// The recorded results, one line each (also used by `tenant show`).
pub fn print_status(st: &status::Status) {
    let at = |t: Option<i64>| t.map_or("never".to_owned(), clock::format_utc);
    println!(
        "last backup      {}{}",
        at(st.last_success),
        st.last_size
            .map(|s| format!(" ({})", size(s)))
            .unwrap_or_default()
    );
    if st.failures > 0 {
        println!(
            "failed backups   {} (last {}: {})",
            st.failures,
            at(st.last_failure),
            st.last_error
                .as_deref()
                .unwrap_or("-")
                .lines()
                .next()
                .unwrap_or("-")
        );
    }
    println!(
        "last verify      {}{}",
        at(st.verified_at),
        match st.verify_ok {
            Some(true) => " ok".to_owned(),
            Some(false) => format!(" FAILED: {}", st.verify_error.as_deref().unwrap_or("-")),
            None => String::new(),
        }
    );
    println!(
        "last restore test {}{}",
        at(st.restore_test_at),
        match st.restore_test_ok {
            Some(true) => format!(" ok ({})", st.restore_test_detail.as_deref().unwrap_or("")),
            Some(false) => format!(
                " FAILED: {}",
                st.restore_test_detail.as_deref().unwrap_or("-")
            ),
            None => String::new(),
        }
    );
}

#[allow(clippy::too_many_arguments)]
pub async fn restore_cmd(
    agent: &Agent,
    id: &TenantId,
    to: Option<String>,
    backup: Option<String>,
    latest: bool,
    into: Option<TenantId>,
    dry_run: bool,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let target = match (to, backup, latest) {
        (Some(t), None, false) => {
            Target::Time(clock::parse_time(&t).map_err(|e| anyhow!("--to: {e}"))?)
        }
        (None, Some(l), false) => Target::Backup(l),
        (None, None, true) => Target::Latest,
        _ => bail!("give one of --to TIME, --backup LABEL or --latest"),
    };
    let docker = require_docker(agent).await?;
    if !dry_run && !json {
        eprintln!("{id}: restoring into a new volume (the tenant keeps serving meanwhile)");
    }
    let (plan, report) =
        restore::restore(agent, &docker, id, target, into.clone(), dry_run).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&plan)?);
        return Ok(report.map_or(ExitCode::SUCCESS, |r| {
            if r.errors.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }));
    }
    let window = format!(
        "{} to {}",
        clock::format_utc(plan.window.from),
        clock::format_utc(plan.window.to)
    );
    if dry_run {
        println!("{id}: restore window {window}");
        println!(
            "would restore with pgbackrest {} into volume {}",
            plan.pgbackrest_args.join(" "),
            plan.volume
        );
        match &into {
            Some(new) => {
                println!("then create tenant {new} from it (its own repository and archiving)")
            }
            None => println!(
                "then stop {id}, move it onto {} and start it; {} would be kept",
                plan.volume,
                plan.previous_volume.as_deref().unwrap_or("-")
            ),
        }
        return Ok(ExitCode::SUCCESS);
    }
    if let Some(r) = &report {
        print_report(r, false);
    }
    if !plan.recovery.is_empty() {
        println!("recovery: {}", plan.recovery);
    }
    match &into {
        Some(new) => println!(
            "{new}: created from {id}'s backup in {:.1}s (volume {}); `{} tenant credentials {new}` prints how to connect",
            plan.seconds,
            plan.volume,
            agent.cli()
        ),
        None => println!(
            "{id}: restored in {:.1}s, now on volume {}; the previous volume {} is kept (`{} tenant volumes {id} --purge-old` removes it)",
            plan.seconds,
            plan.volume,
            plan.previous_volume.as_deref().unwrap_or("-"),
            agent.cli()
        ),
    }
    Ok(report.map_or(ExitCode::SUCCESS, |r| {
        if r.errors.is_empty() {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        }
    }))
}

pub async fn verify(agent: &Agent, id: &TenantId) -> anyhow::Result<ExitCode> {
    let docker = require_docker(agent).await?;
    let out = backups::verify(agent, &docker, id).await?;
    println!("{id}: repository verified\n{out}");
    Ok(ExitCode::SUCCESS)
}

pub async fn restore_test(agent: &Agent, id: &TenantId) -> anyhow::Result<ExitCode> {
    let docker = require_docker(agent).await?;
    let out = backups::restore_test(agent, &docker, id).await?;
    println!("{id}: restore test passed: {out}");
    Ok(ExitCode::SUCCESS)
}

pub async fn volumes(agent: &Agent, id: &TenantId, purge_old: bool) -> anyhow::Result<ExitCode> {
    let docker = require_docker(agent).await?;
    docker.check_volume_record(id)?;
    let current = docker.volume_name(id);
    let all = docker.tenant_volumes(id).await?;
    for v in &all {
        let mark = if *v == current { "in use" } else { "previous" };
        if purge_old && *v != current {
            docker.remove_named_volume(id, v).await?;
            println!("{v}  removed");
        } else {
            println!("{v}  {mark}");
        }
    }
    if all.is_empty() {
        println!("{id}: no data volumes");
    }
    Ok(ExitCode::SUCCESS)
}
