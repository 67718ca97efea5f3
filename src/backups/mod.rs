//! Backups of managed tenants with pgBackRest: one repository per tenant on the host (stanza =
//! tenant id), WAL archived continuously by the tenant's server, backups, restores, verify and
//! restore tests run in one-shot job containers. This module never writes HAProxy's files or
//! maps: a restore in place stops and starts the tenant through the tenants file and the
//! reconciler, like `tenant stop`/`start`.
//!
//! - `clock`    — UTC times in and out.
//! - `repo`     — what the repository holds (backups, newest WAL, restore window), read on the host.
//! - `jobs`     — one-shot job containers, one per tenant at a time.
//! - `scripts`  — what those containers run.
//! - `restore`  — restore into a new volume, then swap the tenant onto it, or make a new tenant.
//! - `schedule` — when each tenant's next backup, verify and restore test are due; the daemon loop.
//! - `status`   — recorded results (last success, failures, verify, restore test).

pub mod clock;
pub mod jobs;
pub mod repo;
pub mod restore;
pub mod schedule;
pub mod scripts;
pub mod status;

use serde::Serialize;

use crate::instances::docker::DockerDriver;
use crate::instances::{InstanceDriver, RunState};
use crate::settings::{parse_interval, Agent, BackupSettings};
use crate::tenants::{self, Instance, ManagedSpec, Tenant, TenantId};

pub use jobs::JobError;

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("no tenant \"{0}\" in the tenants file")]
    Unknown(TenantId),
    #[error("{0} is an external tenant: pgs does not run its server, so it cannot back it up")]
    External(TenantId),
    #[error("backups of {0} are off (\"backups\": {{\"enabled\": false}} in the tenants file)")]
    Disabled(TenantId),
    #[error("{0} has no data volume yet (`sync` provisions it)")]
    NoData(TenantId),
    #[error(
        "{0} is asleep: its data has not changed since its last WAL was archived; \
         `tenant wake {0}` first to back it up now"
    )]
    Asleep(TenantId),
    #[error(transparent)]
    Job(#[from] JobError),
    #[error(transparent)]
    Driver(#[from] crate::instances::DriverError),
    #[error(transparent)]
    Tenants(#[from] tenants::LoadError),
    /// The restore target does not fit the repository (outside the window, no such backup).
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Other(String),
}

/// Retention of full backups.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Retention {
    Count(u32),
    Days(u32),
}

impl Retention {
    /// pgBackRest's options for it.
    pub fn args(self) -> Vec<String> {
        match self {
            Retention::Count(n) => vec![format!("--repo1-retention-full={n}")],
            Retention::Days(d) => vec![
                "--repo1-retention-full-type=time".into(),
                format!("--repo1-retention-full={d}"),
            ],
        }
    }
}

/// A tenant's backup policy with the agent's defaults filled in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Policy {
    pub enabled: bool,
    pub full_every: u64,
    pub incr_every: u64,
    pub retention: Retention,
    pub verify_every: u64,
    pub restore_test_every: u64,
}

/// The effective policy of `tenant` (settings were checked when loaded).
pub fn policy(settings: &BackupSettings, tenant: &Tenant) -> Policy {
    let p = &tenant.backups;
    let interval = |s: &str| parse_interval(s).unwrap_or(86_400);
    let retention = match (p.keep_full, p.keep_days, settings.keep_days) {
        (Some(n), _, _) => Retention::Count(n),
        (None, Some(d), _) | (None, None, Some(d)) => Retention::Days(d),
        (None, None, None) => Retention::Count(settings.keep_full),
    };
    Policy {
        enabled: p.enabled && matches!(tenant.instance, Instance::Managed(_)),
        full_every: p
            .full_every
            .unwrap_or_else(|| interval(&settings.full_every)),
        incr_every: p
            .incr_every
            .unwrap_or_else(|| interval(&settings.incr_every)),
        retention,
        verify_every: interval(&settings.verify_every),
        restore_test_every: interval(&settings.restore_test_every),
    }
}

/// The managed tenant `id` with backups on, and its spec.
pub fn managed(agent: &Agent, id: &TenantId) -> Result<(Tenant, ManagedSpec), BackupError> {
    let all = tenants::load(&agent.paths.tenants_file)?;
    let t = all
        .get(id)
        .cloned()
        .ok_or_else(|| BackupError::Unknown(id.clone()))?;
    let Instance::Managed(spec) = t.instance.clone() else {
        return Err(BackupError::External(id.clone()));
    };
    if !t.backups.enabled {
        return Err(BackupError::Disabled(id.clone()));
    }
    Ok((t, spec))
}

/// Whether the tenant's server runs (online backup) or not (offline: its volume is read with
/// the server stopped).
pub async fn server_state(
    driver: &DockerDriver,
    id: &TenantId,
) -> Result<Option<RunState>, BackupError> {
    let observed = driver.observe().await?;
    let o = observed.into_iter().find(|o| &o.tenant == id);
    match o {
        Some(o) if o.volume.is_some() => Ok(o.state),
        _ => Err(BackupError::NoData(id.clone())),
    }
}

/// What one backup run did.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub tenant: TenantId,
    pub backup: repo::Backup,
    pub seconds: f64,
}

/// Takes a backup of `id` now: full when asked or when there is none yet, incremental
/// otherwise; online when the server runs, offline when it is stopped. Retention is applied
/// by pgBackRest right after (expiring old backups and the WAL only they needed). The result
/// is recorded in the tenant's status.
pub async fn backup(
    agent: &Agent,
    driver: &DockerDriver,
    id: &TenantId,
    full: bool,
) -> Result<Outcome, BackupError> {
    let result = backup_inner(agent, driver, id, full).await;
    let mut st = status::load(&agent.paths, id);
    match &result {
        Ok(o) => st.backup_ok(o.backup.stop, o.backup.repository_size),
        Err(e) => {
            tracing::warn!(tenant = %id, "backup failed: {e}");
            st.backup_failed(&e.to_string());
        }
    }
    status::save(&agent.paths, id, &st);
    result
}

async fn backup_inner(
    agent: &Agent,
    driver: &DockerDriver,
    id: &TenantId,
    full: bool,
) -> Result<Outcome, BackupError> {
    let (tenant, spec) = managed(agent, id)?;
    if crate::sleep::states_on_file(agent).contains_key(id) {
        return Err(BackupError::Asleep(id.clone()));
    }
    let policy = policy(&agent.settings.backups, &tenant);
    let online = server_state(driver, id).await? == Some(RunState::Running);
    driver
        .prepare_repository(id)
        .map_err(|e| BackupError::Other(format!("{id}: backup repository: {e}")))?;
    let repo_dir = agent.paths.tenant_repository(id);
    let before = repo::backups(&repo_dir, id.as_str()).unwrap_or_default();
    let kind = if full || !before.iter().any(|b| b.kind == "full") {
        "full"
    } else {
        "incr"
    };
    let mut args = vec![format!("--type={kind}")];
    if online {
        // An immediate checkpoint: a spread one makes a backup wait minutes before it starts.
        args.push("--start-fast".into());
    } else {
        args.push("--no-online".into());
    }
    args.extend(policy.retention.args());
    args.push("backup".into());
    let mut all = vec![if online { "online" } else { "offline" }.to_owned()];
    all.extend(args);
    let started = std::time::Instant::now();
    jobs::run(
        driver,
        &jobs::Job {
            tenant: id.clone(),
            kind: "backup",
            image: driver.image_for(&spec),
            volume: driver.volume_name(id),
            stanza: id.clone(),
            socket: online,
            new_password: None,
            script: scripts::PGBACKREST,
            args: all,
        },
    )
    .await?;
    let after = repo::backups(&repo_dir, id.as_str())
        .map_err(|e| BackupError::Other(format!("{id}: cannot read the repository: {e}")))?;
    let newest = after
        .into_iter()
        .filter(|b| !before.iter().any(|old| old.label == b.label))
        .max_by(|a, b| a.label.cmp(&b.label))
        .ok_or_else(|| {
            BackupError::Other(format!(
                "{id}: pgBackRest finished but no new backup is listed in {}",
                repo_dir.display()
            ))
        })?;
    tracing::info!(
        tenant = %id,
        "{} backup {} done ({}) in {:.1}s",
        newest.kind,
        newest.label,
        if online { "online" } else { "offline: the server is stopped" },
        started.elapsed().as_secs_f64()
    );
    Ok(Outcome {
        tenant: id.clone(),
        backup: newest,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Creates the tenant's stanza if its repository has none (first start of archiving).
pub async fn ensure_stanza(
    agent: &Agent,
    driver: &DockerDriver,
    id: &TenantId,
) -> Result<bool, BackupError> {
    if repo::has_stanza(&agent.paths.tenant_repository(id), id.as_str()) {
        return Ok(false);
    }
    let (_, spec) = managed(agent, id)?;
    let online = server_state(driver, id).await? == Some(RunState::Running);
    driver
        .prepare_repository(id)
        .map_err(|e| BackupError::Other(format!("{id}: backup repository: {e}")))?;
    jobs::run(
        driver,
        &jobs::Job {
            tenant: id.clone(),
            kind: "stanza-create",
            image: driver.image_for(&spec),
            volume: driver.volume_name(id),
            stanza: id.clone(),
            socket: online,
            new_password: None,
            script: scripts::PGBACKREST,
            args: vec![if online { "online" } else { "offline" }.to_owned()],
        },
    )
    .await?;
    Ok(true)
}

/// The backups of a tenant and the window a restore can reach.
#[derive(Debug, Clone, Serialize)]
pub struct Listing {
    pub tenant: TenantId,
    pub repository: String,
    pub backups: Vec<repo::Backup>,
    pub window: Option<repo::Window>,
    pub repository_bytes: u64,
    pub newest_wal: Option<String>,
}

/// Reads a tenant's repository (no job, no engine).
pub fn list(agent: &Agent, id: &TenantId) -> Result<Listing, BackupError> {
    let dir = agent.paths.tenant_repository(id);
    let backups = repo::backups(&dir, id.as_str())
        .map_err(|e| BackupError::Other(format!("cannot read {}: {e}", dir.display())))?;
    let wal = repo::newest_wal(&dir, id.as_str());
    Ok(Listing {
        tenant: id.clone(),
        repository: dir.display().to_string(),
        window: repo::window(&backups, wal.as_ref().map(|w| w.1)),
        repository_bytes: repo::size_on_disk(&dir),
        newest_wal: wal.map(|w| w.0),
        backups,
    })
}

/// `pgbackrest verify`: checks every file of the repository against its recorded checksum.
pub async fn verify(
    agent: &Agent,
    driver: &DockerDriver,
    id: &TenantId,
) -> Result<String, BackupError> {
    let result = async {
        let (_, spec) = managed(agent, id)?;
        let out = jobs::run(
            driver,
            &jobs::Job {
                tenant: id.clone(),
                kind: "verify",
                image: driver.image_for(&spec),
                volume: driver.volume_name(id),
                stanza: id.clone(),
                socket: false,
                new_password: None,
                script: scripts::PGBACKREST,
                args: vec![
                    "offline".into(),
                    "--log-level-console=info".into(),
                    "verify".into(),
                ],
            },
        )
        .await?;
        // 2.45 reports problems in its output and may still exit 0.
        let problems: Vec<&str> = out
            .lines()
            .filter(|l| l.contains("ERROR") || l.contains("invalid") || l.contains("status: error"))
            .map(str::trim)
            .collect();
        if problems.is_empty() {
            Ok(jobs::tail(&out, 3))
        } else {
            Err(BackupError::Other(format!(
                "{id}: pgbackrest verify found problems:\n{}",
                problems.join("\n")
            )))
        }
    }
    .await;
    let mut st = status::load(&agent.paths, id);
    st.verified(result.as_ref().err().map(|e| e.to_string()));
    status::save(&agent.paths, id, &st);
    result
}

/// Proof by restore: the latest state restored into a scratch volume by a job container with
/// no network, amcheck's `bt_index_check` on every btree index of every database and
/// `pg_dumpall > /dev/null`; the volume is thrown away and the result recorded.
pub async fn restore_test(
    agent: &Agent,
    driver: &DockerDriver,
    id: &TenantId,
) -> Result<String, BackupError> {
    let result = async {
        let (_, spec) = managed(agent, id)?;
        if list(agent, id)?.backups.is_empty() {
            return Err(BackupError::Other(format!(
                "{id} has no backup to test yet"
            )));
        }
        let scratch = format!(
            "{}-scratch",
            crate::instances::docker::volume_name(driver.owner().0, id)
        );
        driver.remove_named_volume(id, &scratch).await?;
        driver
            .create_named_volume(id, &scratch, &[("io.pgs.scratch", "1")])
            .await?;
        let out = jobs::run(
            driver,
            &jobs::Job {
                tenant: id.clone(),
                kind: "restore-test",
                image: driver.image_for(&spec),
                volume: scratch.clone(),
                stanza: id.clone(),
                socket: false,
                new_password: None,
                script: scripts::RESTORE,
                args: vec![
                    "check".into(),
                    id.to_string(),
                    id.to_string(),
                    "--type=default".into(),
                ],
            },
        )
        .await;
        if let Err(e) = driver.remove_named_volume(id, &scratch).await {
            tracing::warn!(tenant = %id, "cannot remove the scratch volume {scratch}: {e}");
        }
        let out = out?;
        Ok(out
            .lines()
            .find(|l| l.starts_with("checked "))
            .unwrap_or("restored")
            .to_owned())
    }
    .await;
    let mut st = status::load(&agent.paths, id);
    match &result {
        Ok(detail) => st.restore_tested(true, detail.clone()),
        Err(e) => st.restore_tested(false, e.to_string()),
    }
    status::save(&agent.paths, id, &st);
    result
}
