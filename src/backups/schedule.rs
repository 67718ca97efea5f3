//! When each tenant's next backup, verify and restore test are due (a pure function), and the
//! daemon loop that runs them one at a time, so backups never pile onto the host at once and
//! never overlap for one tenant. Each tenant's times carry an offset derived from its id, so
//! tenants created together do not all back up in the same minute.

use std::time::Duration;

use super::{repo, status::Status, Policy};
use crate::instances::docker::DockerDriver;
use crate::instances::InstanceDriver;
use crate::settings::Agent;
use crate::tenants::{self, TenantId};

/// How often the loop looks for due work, at most (shorter intervals in the settings make it
/// look more often).
pub const TICK: Duration = Duration::from_secs(20);
/// After a failed backup, wait this long before trying again.
const RETRY_AFTER: i64 = 300;
/// A tenant never backed up gets its first backup within this many seconds of being seen (or
/// half its incremental interval, when shorter).
const FIRST_WITHIN: u64 = 120;

/// How long after first seeing a tenant the loop starts working on it.
fn grace(policy: &Policy) -> i64 {
    (FIRST_WITHIN / 2).min(policy.incr_every / 2) as i64
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Full,
    Incr,
    Verify,
    RestoreTest,
}

/// A stable offset in `[0, span)` seconds for a tenant.
pub fn offset(id: &TenantId, span: u64) -> i64 {
    if span == 0 {
        return 0;
    }
    let h = id.as_str().bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    (h % span) as i64
}

/// The one thing due for a tenant now, if any. `first_seen` is when the loop first saw it.
pub fn due(
    id: &TenantId,
    policy: &Policy,
    backups: &[repo::Backup],
    status: &Status,
    first_seen: i64,
    now: i64,
) -> Option<Action> {
    if !policy.enabled {
        return None;
    }
    let failed_recently = status
        .last_failure
        .is_some_and(|f| now - f < RETRY_AFTER && status.last_success.is_none_or(|s| s < f));
    let spread = |every: u64| offset(id, (every / 10).clamp(1, 3_600));
    let last_full = backups
        .iter()
        .filter(|b| b.kind == "full")
        .map(|b| b.stop)
        .max();
    let last_any = backups.iter().map(|b| b.stop).max();
    match (last_full, last_any) {
        (None, _) => {
            let within = FIRST_WITHIN.min(policy.incr_every / 2).max(1);
            if !failed_recently && now >= first_seen + grace(policy) + offset(id, within) {
                return Some(Action::Full);
            }
        }
        (Some(full), Some(_)) => {
            if !failed_recently
                && now >= full + policy.full_every as i64 + spread(policy.full_every)
            {
                return Some(Action::Full);
            }
        }
        (Some(_), None) => {}
    }
    if backups.is_empty() {
        return None;
    }
    // Of the rest, the one that has been due longest, so no kind starves another. Verify and
    // restore tests count from the first backup when they never ran.
    let since = |at: Option<i64>| at.or(backups.first().map(|b| b.stop)).unwrap_or(now);
    let mut candidates = vec![
        (
            since(status.verified_at) + policy.verify_every as i64 + spread(policy.verify_every),
            Action::Verify,
        ),
        (
            since(status.restore_test_at)
                + policy.restore_test_every as i64
                + spread(policy.restore_test_every),
            Action::RestoreTest,
        ),
    ];
    if let (Some(any), false) = (last_any, failed_recently) {
        candidates.push((
            any + policy.incr_every as i64 + spread(policy.incr_every),
            Action::Incr,
        ));
    }
    candidates
        .into_iter()
        .filter(|(at, _)| *at <= now)
        .min_by_key(|(at, _)| *at)
        .map(|(_, action)| action)
}

/// The daemon's backup loop: every `TICK`, for each managed tenant with backups on and a data
/// volume, creates its stanza when missing, then runs what is due, one job at a time. Runs
/// until the task is dropped.
pub async fn run(agent: Agent, driver: DockerDriver) {
    let mut first_seen: std::collections::HashMap<TenantId, i64> = Default::default();
    let mut archive_failures = Default::default();
    let b = &agent.settings.backups;
    let shortest = [
        &b.full_every,
        &b.incr_every,
        &b.verify_every,
        &b.restore_test_every,
    ]
    .iter()
    .filter_map(|s| crate::settings::parse_interval(s).ok())
    .min()
    .unwrap_or(86_400);
    let every = TICK.min(Duration::from_secs((shortest / 4).max(1)));
    loop {
        tick(&agent, &driver, &mut first_seen, &mut archive_failures).await;
        tokio::time::sleep(every).await;
    }
}

async fn tick(
    agent: &Agent,
    driver: &DockerDriver,
    first_seen: &mut std::collections::HashMap<TenantId, i64>,
    archive_failures: &mut std::collections::HashMap<TenantId, u64>,
) {
    let Ok(all) = tenants::load(&agent.paths.tenants_file) else {
        return;
    };
    let Ok(observed) = driver.observe().await else {
        return;
    };
    let now = super::clock::now();
    // A sleeping tenant's data does not change (its last WAL was archived before it slept):
    // its backups wait until it wakes; verifies and restore tests, which need no server, run.
    let asleep = crate::sleep::states_on_file(agent);
    for t in all.iter() {
        let policy = super::policy(&agent.settings.backups, t);
        if !policy.enabled {
            continue;
        }
        let sleeping = asleep.contains_key(&t.id);
        let has_volume = observed
            .iter()
            .any(|o| o.tenant == t.id && o.volume.is_some() && o.container.is_some());
        if !has_volume {
            continue;
        }
        let seen = *first_seen.entry(t.id.clone()).or_insert(now);
        let (failed, last) = super::status::archive_failures(&agent.paths, &t.id);
        let known = archive_failures.insert(t.id.clone(), failed).unwrap_or(0);
        if let (true, Some(last)) = (failed > known, last) {
            tracing::warn!(
                tenant = %t.id,
                "WAL archiving failed {} more time(s) ({failed} in all), last for {} at {}; \
                 `docker logs {}` has pgBackRest's message",
                failed - known,
                last.segment,
                super::clock::format_utc(last.at),
                driver.container_name(&t.id)
            );
        }
        // Leave a tenant alone for a moment after the loop first sees it (a daemon that just
        // started, a tenant just created): its first start and the reconciler's repairs come
        // first.
        if now < seen + grace(&policy) {
            continue;
        }
        let dir = agent.paths.tenant_repository(&t.id);
        if !repo::has_stanza(&dir, t.id.as_str()) && !sleeping {
            match super::ensure_stanza(agent, driver, &t.id).await {
                Ok(_) => {
                    tracing::info!(tenant = %t.id, "backup repository ready in {}", dir.display())
                }
                Err(e) => {
                    tracing::warn!(tenant = %t.id, "cannot create the backup repository's stanza: {e}");
                    continue;
                }
            }
        }
        let backups = repo::backups(&dir, t.id.as_str()).unwrap_or_default();
        let status = super::status::load(&agent.paths, &t.id);
        let action = due(&t.id, &policy, &backups, &status, seen, super::clock::now());
        let result = match action {
            None => continue,
            Some(Action::Full | Action::Incr) if sleeping => continue,
            Some(Action::Full) => super::backup(agent, driver, &t.id, true).await.map(drop),
            Some(Action::Incr) => super::backup(agent, driver, &t.id, false).await.map(drop),
            Some(Action::Verify) => super::verify(agent, driver, &t.id).await.map(drop),
            Some(Action::RestoreTest) => super::restore_test(agent, driver, &t.id).await.map(drop),
        };
        if let Err(e) = result {
            tracing::warn!(tenant = %t.id, "scheduled {action:?} failed: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backups::Retention;

    fn policy() -> Policy {
        Policy {
            enabled: true,
            full_every: 7 * 86_400,
            incr_every: 86_400,
            retention: Retention::Count(2),
            verify_every: 86_400,
            restore_test_every: 7 * 86_400,
        }
    }

    fn full(stop: i64, kind: &str) -> repo::Backup {
        repo::Backup {
            label: format!("L{stop}"),
            kind: kind.into(),
            start: stop - 1,
            stop,
            database_size: 0,
            repository_size: 0,
            online: true,
            wal_start: String::new(),
        }
    }

    #[test]
    fn backups_come_due_in_order() {
        let id: TenantId = "acme".parse().unwrap();
        let p = policy();
        let st = Status::default();
        let t0 = 1_000_000;
        // Never backed up: a full backup within the grace period and FIRST_WITHIN of being seen.
        assert_eq!(due(&id, &p, &[], &st, t0, t0 + 30), None);
        assert_eq!(
            due(&id, &p, &[], &st, t0, t0 + grace(&p) + FIRST_WITHIN as i64),
            Some(Action::Full)
        );
        let b = [full(t0, "full")];
        let ok = Status {
            verified_at: Some(t0),
            restore_test_at: Some(t0),
            ..Status::default()
        };
        assert_eq!(due(&id, &p, &b, &ok, t0, t0 + 60), None);
        // A day on, verify comes first; once it ran, the incremental.
        assert_eq!(
            due(&id, &p, &b, &ok, t0, t0 + 86_400 + 8_640),
            Some(Action::Verify)
        );
        let verified = Status {
            verified_at: Some(t0 + 86_400),
            ..ok.clone()
        };
        assert_eq!(
            due(&id, &p, &b, &verified, t0, t0 + 86_400 + 8_640),
            Some(Action::Incr)
        );
        assert_eq!(
            due(&id, &p, &b, &ok, t0, t0 + 8 * 86_400),
            Some(Action::Full)
        );
        // Verify after a day without one.
        let b2 = [full(t0, "full"), full(t0 + 86_000, "incr")];
        assert_eq!(
            due(&id, &p, &b2, &ok, t0, t0 + 86_400 + 8_640),
            Some(Action::Verify)
        );
        // Frequent checks do not starve incrementals: the one due longest goes first.
        let busy = Policy {
            incr_every: 60,
            verify_every: 10,
            ..p.clone()
        };
        let just_checked = Status {
            verified_at: Some(t0 + 500),
            restore_test_at: Some(t0 + 500),
            ..Status::default()
        };
        assert_eq!(
            due(&id, &busy, &b, &just_checked, t0, t0 + 520),
            Some(Action::Incr)
        );
        // A recent failure holds the retry back.
        let failed = Status {
            last_failure: Some(t0 + 86_400 + 8_600),
            ..verified.clone()
        };
        assert_ne!(
            due(&id, &p, &b, &failed, t0, t0 + 86_400 + 8_640),
            Some(Action::Incr)
        );
        let off = Policy {
            enabled: false,
            ..p
        };
        assert_eq!(due(&id, &off, &[], &st, t0, t0 + 10_000), None);
    }

    #[test]
    fn offsets_spread_tenants() {
        let a = offset(&"acme".parse().unwrap(), 3_600);
        let b = offset(&"globex".parse().unwrap(), 3_600);
        assert!((0..3_600).contains(&a) && (0..3_600).contains(&b));
        assert_ne!(a, b);
    }
}
