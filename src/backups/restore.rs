//! Restores. Never in place: the repository is restored into a NEW volume by a job container,
//! which replays WAL to the target and promotes; then either the tenant is swapped onto that
//! volume (stopped and started through the tenants file, so the reconciler takes it out of
//! HAProxy's maps and puts it back once it serves) with the previous volume kept until
//! `tenant volumes ID --purge-old`, or a new tenant is made from it (`--into`), with its own
//! repository and archiving.

use serde::Serialize;
use serde_json::json;

use super::{clock, jobs, repo, scripts, BackupError};
use crate::instances::docker::DockerDriver;
use crate::instances::RunState;
use crate::reconcile::{self, Report, SyncOptions};
use crate::settings::Agent;
use crate::tenant_ops;
use crate::tenants::{TenantId, TenantsFileEdit};

/// Where a restore stops replaying.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// The state at this time (milliseconds since the epoch).
    Time(i64),
    /// The end of this backup (an online backup, as taken).
    Backup(String),
    /// Everything the repository holds.
    Latest,
}

/// What a restore did (or, with `--dry-run`, would do).
#[derive(Debug, Clone, Serialize)]
pub struct RestorePlan {
    pub tenant: TenantId,
    pub into: Option<TenantId>,
    pub target: Target,
    pub window: repo::Window,
    /// The volume the data is restored into.
    pub volume: String,
    /// In place: the volume the tenant used before, kept.
    pub previous_volume: Option<String>,
    pub pgbackrest_args: Vec<String>,
    pub dry_run: bool,
    pub seconds: f64,
    /// What recovery reported (stop point, timeline).
    pub recovery: String,
}

/// The pgBackRest restore options for a target, after checking it against the repository.
pub fn target_args(
    id: &TenantId,
    target: &Target,
    backups: &[repo::Backup],
    window: repo::Window,
) -> Result<Vec<String>, BackupError> {
    let window_text = || {
        format!(
            "from {} to {}",
            clock::format_utc(window.from),
            clock::format_utc(window.to)
        )
    };
    match target {
        Target::Time(ms) => {
            if *ms < window.from * 1000 || *ms > (window.to + 1) * 1000 {
                return Err(BackupError::Invalid(format!(
                    "{id}: {} is outside the restore window, {}; pick a time inside it \
                     (`tenant backups {id}` shows it)",
                    clock::format_utc_ms(*ms),
                    window_text()
                )));
            }
            Ok(vec![
                "--type=time".into(),
                format!("--target={}", clock::format_utc_ms(*ms)),
                "--target-action=promote".into(),
            ])
        }
        Target::Backup(label) => {
            let Some(b) = backups.iter().find(|b| &b.label == label) else {
                let labels: Vec<&str> = backups.iter().map(|b| b.label.as_str()).collect();
                return Err(BackupError::Invalid(format!(
                    "{id}: no backup {label:?}; the repository has: {}",
                    if labels.is_empty() {
                        "none".to_owned()
                    } else {
                        labels.join(", ")
                    }
                )));
            };
            if !b.online {
                // PostgreSQL 15 ends recovery of an offline backup before an `immediate` target.
                return Err(BackupError::Invalid(format!(
                    "{id}: backup {label} was taken while the server was stopped; restore it with \
                     --to \"{}\" (its end) instead",
                    clock::format_utc(b.stop)
                )));
            }
            Ok(vec![
                format!("--set={label}"),
                "--type=immediate".into(),
                "--target-action=promote".into(),
            ])
        }
        Target::Latest => Ok(vec!["--type=default".into()]),
    }
}

/// Closes the live server's current WAL segment and waits until it is archived, so the
/// repository holds every commit so far. Best effort: a failure is returned for a warning.
pub async fn switch_wal(
    driver: &DockerDriver,
    id: &TenantId,
    image: String,
) -> Result<String, BackupError> {
    Ok(jobs::run(
        driver,
        &jobs::Job {
            tenant: id.clone(),
            kind: "wal-switch",
            image,
            volume: driver.volume_name(id),
            stanza: id.clone(),
            socket: true,
            new_password: None,
            script: scripts::SWITCH_WAL,
            args: vec![],
        },
    )
    .await?)
}

fn volume_stamp() -> String {
    clock::format_utc(clock::now())
        .replace(['-', ':', ' '], "")
        .trim_end_matches("+00")
        .to_owned()
}

/// Restores `id` to `target`: into a new tenant `into`, or in place.
pub async fn restore(
    agent: &Agent,
    driver: &DockerDriver,
    id: &TenantId,
    target: Target,
    into: Option<TenantId>,
    dry_run: bool,
) -> Result<(RestorePlan, Option<Report>), BackupError> {
    let started = std::time::Instant::now();
    let (tenant, spec) = super::managed(agent, id)?;
    let image = driver.image_for(&spec);
    if let Some(new) = &into {
        let all = crate::tenants::load(&agent.paths.tenants_file)?;
        if all.get(new).is_some() {
            return Err(BackupError::Other(format!(
                "tenant \"{new}\" already exists; --into needs a new tenant id"
            )));
        }
        let left = driver.tenant_volumes(new).await?;
        if !left.is_empty() {
            return Err(BackupError::Other(format!(
                "tenant \"{new}\" still has data volumes ({}); purge them first with \
                 `tenant delete {new} --purge-data`",
                left.join(", ")
            )));
        }
    }
    // A tenant whose volume is lost (the case restores are for) counts as not running.
    let running = matches!(
        super::server_state(driver, id).await,
        Ok(Some(RunState::Running))
    );
    if running && !dry_run {
        if let Err(e) = switch_wal(driver, id, image.clone()).await {
            tracing::warn!(tenant = %id, "could not archive the current WAL segment before the restore: {e}");
        }
    }
    let listing = super::list(agent, id)?;
    let Some(window) = listing.window else {
        return Err(BackupError::Invalid(format!(
            "{id} has no backup yet; `tenant backup {id}` takes one"
        )));
    };
    let args = target_args(id, &target, &listing.backups, window)?;
    let (job_tenant, volume, previous) = match &into {
        Some(new) => (
            new.clone(),
            crate::instances::docker::volume_name(driver.owner().0, new),
            None,
        ),
        None => (
            id.clone(),
            format!(
                "{}-r{}",
                crate::instances::docker::volume_name(driver.owner().0, id),
                volume_stamp()
            ),
            Some(driver.volume_name(id)),
        ),
    };
    let mut plan = RestorePlan {
        tenant: id.clone(),
        into: into.clone(),
        target,
        window,
        volume: volume.clone(),
        previous_volume: previous.clone(),
        pgbackrest_args: args.clone(),
        dry_run,
        seconds: 0.0,
        recovery: String::new(),
    };
    if dry_run {
        return Ok((plan, None));
    }
    driver
        .create_named_volume(
            &job_tenant,
            &volume,
            &[("io.pgs.restored-from", id.as_str())],
        )
        .await?;
    let new_password = match &into {
        Some(new) => Some(driver.ensure_password(new).map_err(|e| {
            BackupError::Other(format!("{new}: cannot prepare the password file: {e}"))
        })?),
        None => None,
    };
    let mode = if into.is_some() { "copy" } else { "inplace" };
    let mut job_args = vec![
        mode.to_owned(),
        id.to_string(),
        into.as_ref().unwrap_or(id).to_string(),
    ];
    job_args.extend(args);
    let out = jobs::run(
        driver,
        &jobs::Job {
            tenant: job_tenant.clone(),
            kind: "restore",
            image,
            volume: volume.clone(),
            stanza: id.clone(),
            socket: false,
            new_password,
            script: scripts::RESTORE,
            args: job_args,
        },
    )
    .await;
    let out = match out {
        Ok(o) => o,
        Err(e) => {
            if let Err(e2) = driver.remove_named_volume(&job_tenant, &volume).await {
                tracing::warn!("cannot remove the unfinished restore volume {volume}: {e2}");
            }
            return Err(e.into());
        }
    };
    plan.recovery = out
        .lines()
        .filter(|l| {
            l.contains("recovery stopping")
                || l.contains("selected new timeline")
                || l.contains("replaying to its end")
                || l.contains("are now")
        })
        .map(|l| l.split("LOG:").last().unwrap_or(l).trim().to_owned())
        .collect::<Vec<_>>()
        .join("; ");
    let report = match &into {
        Some(new) => {
            let mut entry = json!({"access": tenant.access.as_str(), "managed": {}});
            if let Some(raw) = raw_entry(agent, id)? {
                if let Some(m) = raw.get("managed") {
                    entry["managed"] = m.clone();
                }
                if let Some(b) = raw.get("backups") {
                    entry["backups"] = b.clone();
                }
            }
            tenant_ops::add(&agent.paths.tenants_file, new, entry)
                .map_err(|e| BackupError::Other(e.to_string()))?;
            let report = sync(agent, driver).await?;
            // The copy's own repository starts with a full backup of it.
            if let Err(e) = super::backup(agent, driver, new, true).await {
                tracing::warn!(tenant = %new, "first backup of the restored copy failed: {e}");
            }
            report
        }
        None => swap(agent, driver, id, &volume, tenant.stopped).await?,
    };
    plan.seconds = started.elapsed().as_secs_f64();
    Ok((plan, Some(report)))
}

fn raw_entry(agent: &Agent, id: &TenantId) -> Result<Option<serde_json::Value>, BackupError> {
    let text = std::fs::read_to_string(&agent.paths.tenants_file)
        .map_err(|e| BackupError::Other(e.to_string()))?;
    let doc: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| BackupError::Other(e.to_string()))?;
    Ok(doc["tenants"].get(id.as_str()).cloned())
}

async fn sync(agent: &Agent, driver: &DockerDriver) -> Result<Report, BackupError> {
    reconcile::sync(agent, Some(driver), SyncOptions::default())
        .await
        .map_err(|e| BackupError::Other(format!("{e:#}")))
}

fn set_stopped(agent: &Agent, id: &TenantId, stopped: bool) -> Result<(), BackupError> {
    let err = |e: &dyn std::fmt::Display| BackupError::Other(format!("{id}: {e}"));
    let mut edit = TenantsFileEdit::open(&agent.paths.tenants_file).map_err(|e| err(&e))?;
    let entry = edit
        .tenant_mut(id)
        .ok_or_else(|| BackupError::Unknown(id.clone()))?;
    if stopped {
        entry.insert("stopped".into(), json!(true));
    } else {
        entry.remove("stopped");
    }
    edit.commit().map(drop).map_err(|e| err(&e))
}

/// Stops the tenant (the reconciler takes it out of the access map first, so new clients get
/// HAProxy's refusal instead of a half-started server), points it at `volume`, and starts it
/// again unless it was stopped before.
async fn swap(
    agent: &Agent,
    driver: &DockerDriver,
    id: &TenantId,
    volume: &str,
    was_stopped: bool,
) -> Result<Report, BackupError> {
    if !was_stopped {
        set_stopped(agent, id, true)?;
    }
    let report = sync(agent, driver).await?;
    if !report.errors.is_empty() {
        tracing::warn!(tenant = %id, "stopping for the swap reported: {:?}", report.errors);
    }
    driver
        .set_volume(id, volume)
        .map_err(|e| BackupError::Other(format!("{id}: cannot record the new volume: {e}")))?;
    tracing::info!(tenant = %id, "now on volume {volume}");
    if was_stopped {
        return Ok(report);
    }
    set_stopped(agent, id, false)?;
    sync(agent, driver).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(label: &str, stop: i64, online: bool) -> repo::Backup {
        repo::Backup {
            label: label.into(),
            kind: "full".into(),
            start: stop - 5,
            stop,
            database_size: 1,
            repository_size: 1,
            online,
            wal_start: String::new(),
        }
    }

    #[test]
    fn targets_are_checked_against_the_window() {
        let id: TenantId = "acme".parse().unwrap();
        let backups = [b("F1", 1_000, true), b("F2", 2_000, false)];
        let w = repo::Window {
            from: 1_000,
            to: 3_000,
        };
        let args = target_args(&id, &Target::Time(1_500_000), &backups, w).unwrap();
        assert_eq!(args[0], "--type=time");
        assert_eq!(
            args[1],
            format!("--target={}", clock::format_utc_ms(1_500_000))
        );
        let err = target_args(&id, &Target::Time(500_000), &backups, w).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("outside the restore window"), "{text}");
        assert!(text.contains(&clock::format_utc(1_000)), "{text}");
        assert!(text.contains(&clock::format_utc(3_000)), "{text}");
        assert!(target_args(&id, &Target::Time(3_500_000), &backups, w).is_err());
        assert_eq!(
            target_args(&id, &Target::Backup("F1".into()), &backups, w).unwrap()[0],
            "--set=F1"
        );
        let err = target_args(&id, &Target::Backup("F2".into()), &backups, w).unwrap_err();
        assert!(err.to_string().contains("--to"), "{err}");
        let err = target_args(&id, &Target::Backup("F9".into()), &backups, w).unwrap_err();
        assert!(err.to_string().contains("F1, F2"), "{err}");
        assert_eq!(
            target_args(&id, &Target::Latest, &backups, w).unwrap(),
            ["--type=default"]
        );
    }
}
