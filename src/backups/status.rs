//! What the agent records about each tenant's backups, under `state/backups/<id>.json`: the
//! last success and its size, failures (counted, with the last reason), the last verify and
//! the last restore test. Written atomically; a missing or unreadable file reads as "nothing
//! yet".

use serde::{Deserialize, Serialize};

use super::clock;
use crate::fsutil;
use crate::settings::Paths;
use crate::tenants::TenantId;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Status {
    /// When the last successful backup ended (seconds since the epoch).
    pub last_success: Option<i64>,
    /// Its size in the repository, in bytes.
    pub last_size: Option<u64>,
    pub last_failure: Option<i64>,
    pub last_error: Option<String>,
    /// Failed backups since the agent began counting.
    pub failures: u64,
    pub verified_at: Option<i64>,
    pub verify_ok: Option<bool>,
    pub verify_error: Option<String>,
    pub restore_test_at: Option<i64>,
    pub restore_test_ok: Option<bool>,
    pub restore_test_detail: Option<String>,
}

impl Status {
    pub fn backup_ok(&mut self, stop: i64, size: u64) {
        self.last_success = Some(stop);
        self.last_size = Some(size);
    }

    pub fn backup_failed(&mut self, reason: &str) {
        self.last_failure = Some(clock::now());
        self.last_error = Some(reason.to_owned());
        self.failures += 1;
    }

    pub fn verified(&mut self, error: Option<String>) {
        self.verified_at = Some(clock::now());
        self.verify_ok = Some(error.is_none());
        self.verify_error = error;
    }

    pub fn restore_tested(&mut self, ok: bool, detail: String) {
        self.restore_test_at = Some(clock::now());
        self.restore_test_ok = Some(ok);
        self.restore_test_detail = Some(detail);
    }
}

pub fn load(paths: &Paths, id: &TenantId) -> Status {
    std::fs::read(paths.tenant_backup_status(id))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

pub fn save(paths: &Paths, id: &TenantId, status: &Status) {
    let path = paths.tenant_backup_status(id);
    let result = path
        .parent()
        .map_or(Ok(()), std::fs::create_dir_all)
        .and_then(|()| {
            let text = serde_json::to_vec_pretty(status).unwrap_or_default();
            fsutil::write_atomic(&path, &text, 0o644)
        });
    if let Err(e) = result {
        tracing::warn!(tenant = %id, "cannot record backup status in {}: {e}", path.display());
    }
}

/// What `/metrics` and `tenant show` say about one tenant's backups.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Summary {
    pub tenant: String,
    #[serde(flatten)]
    pub status: Status,
    /// When the newest WAL segment reached the repository.
    pub newest_wal_at: Option<i64>,
    /// Seconds since then (grows on a server that writes nothing; compare with writes).
    pub wal_archive_lag_seconds: Option<i64>,
    /// Failed WAL pushes the tenant's server noted, and the last one.
    pub archive_failures: u64,
    pub last_archive_failure: Option<ArchiveFailure>,
}

/// One failed WAL push.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ArchiveFailure {
    pub at: i64,
    pub segment: String,
}

/// The failed WAL pushes a tenant's server noted in its socket directory: how many, the last.
pub fn archive_failures(paths: &Paths, id: &TenantId) -> (u64, Option<ArchiveFailure>) {
    let file = paths
        .tenant_socket_dir(id)
        .join(crate::instances::docker::ARCHIVE_FAILURES);
    let Ok(text) = std::fs::read_to_string(file) else {
        return (0, None);
    };
    let mut count = 0;
    let mut last = None;
    for line in text.lines() {
        let mut f = line.split_whitespace();
        if let (Some(at), Some(segment)) = (f.next().and_then(|t| t.parse().ok()), f.next()) {
            count += 1;
            last = Some(ArchiveFailure {
                at,
                segment: segment.to_owned(),
            });
        }
    }
    (count, last)
}

/// The summary of every tenant with backups on.
pub fn summaries(paths: &Paths, ids: &[TenantId]) -> Vec<Summary> {
    let now = clock::now();
    ids.iter()
        .map(|id| {
            let wal = super::repo::newest_wal(&paths.tenant_repository(id), id.as_str());
            let (archive_failures, last_archive_failure) = archive_failures(paths, id);
            Summary {
                tenant: id.to_string(),
                status: load(paths, id),
                newest_wal_at: wal.as_ref().map(|w| w.1),
                wal_archive_lag_seconds: wal.map(|w| (now - w.1).max(0)),
                archive_failures,
                last_archive_failure,
            }
        })
        .collect()
}
