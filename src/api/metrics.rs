//! Prometheus metrics (prometheus-client encodes them; nothing here writes the format by
//! hand): the agent's own counters, updated as passes and flips happen, and per-tenant state
//! read at scrape time from the tenants file, Docker and HAProxy's `show stat`.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

use super::passes::{Outcome, PassRecord};
use crate::haproxy::runtime::StatRow;
use crate::instances::RunState;
use crate::reconcile::ProblemKind;
use crate::tenant_ops::View;
use crate::tenants::Access;

/// Label sets: a few fixed keys with owned values.
type Labels = Vec<(&'static str, String)>;

fn labels(pairs: &[(&'static str, &str)]) -> Labels {
    pairs.iter().map(|(k, v)| (*k, (*v).to_owned())).collect()
}

/// The agent's metrics that live as long as the process.
#[derive(Debug, Clone)]
pub struct AgentMetrics {
    passes: Family<Labels, Counter>,
    pass_duration: Histogram,
    errors: Family<Labels, Counter>,
    reloads: Counter,
    flips: Family<Labels, Counter>,
    last_success: Gauge<f64, AtomicU64>,
}

impl Default for AgentMetrics {
    fn default() -> Self {
        AgentMetrics {
            passes: Family::default(),
            // 10 ms .. 82 s: a no-op pass, up to one that waits for a new server.
            pass_duration: Histogram::new(exponential_buckets(0.01, 2.0, 14)),
            errors: Family::default(),
            reloads: Counter::default(),
            flips: Family::default(),
            last_success: Gauge::default(),
        }
    }
}

impl AgentMetrics {
    pub fn record_pass(&self, p: &PassRecord) {
        match &p.outcome {
            Outcome::Done {
                errors,
                reloaded,
                duration,
                ..
            } => {
                let result = if errors.is_empty() { "ok" } else { "problems" };
                self.passes
                    .get_or_create(&labels(&[("result", result)]))
                    .inc();
                self.pass_duration.observe(duration.as_secs_f64());
                for e in errors {
                    self.errors
                        .get_or_create(&labels(&[("kind", e.kind.as_str())]))
                        .inc();
                }
                if *reloaded {
                    self.reloads.inc();
                }
                if errors.is_empty() {
                    self.last_success.set(p.finished_unix);
                }
            }
            Outcome::Failed(e) => {
                self.passes
                    .get_or_create(&labels(&[("result", "failed")]))
                    .inc();
                self.errors
                    .get_or_create(&labels(&[("kind", e.kind.as_str())]))
                    .inc();
            }
        }
    }

    /// An access flip made through the API that changed the tenants file.
    pub fn record_flip(&self, to: Access) {
        self.flips
            .get_or_create(&labels(&[("to", to.as_str())]))
            .inc();
    }

    fn register(&self, r: &mut Registry) {
        // Every kind and result at 0 from the start, so alert rules have series to rate().
        for kind in ProblemKind::ALL {
            self.errors
                .get_or_create(&labels(&[("kind", kind.as_str())]))
                .inc_by(0);
        }
        for result in ["ok", "problems", "failed"] {
            self.passes
                .get_or_create(&labels(&[("result", result)]))
                .inc_by(0);
        }
        r.register(
            "reconcile_passes",
            "Reconcile passes, by result: ok, problems (ran, some steps failed), failed (did not run)",
            self.passes.clone(),
        );
        r.register_with_unit(
            "reconcile_duration",
            "Duration of reconcile passes that ran",
            Unit::Seconds,
            self.pass_duration.clone(),
        );
        r.register(
            "reconcile_errors",
            "Problems reported by reconcile passes, by kind: instance, config, reload, maps (in a pass that ran); tenants_file, docker, haproxy (a pass that could not run); certificates; other",
            self.errors.clone(),
        );
        r.register(
            "haproxy_reloads",
            "HAProxy reloads done by the agent",
            self.reloads.clone(),
        );
        r.register(
            "access_flips",
            "Access flips through the API that changed the tenants file, by new state",
            self.flips.clone(),
        );
        r.register_with_unit(
            "last_successful_sync_timestamp",
            "Unix time at which the last pass without problems finished (0: none yet)",
            Unit::Seconds,
            self.last_success.clone(),
        );
    }
}

/// What a scrape read from the world, per tenant.
#[derive(Debug, Default)]
pub struct Sample {
    pub tenants: Vec<View>,
    /// `show stat`; `None` when HAProxy did not answer.
    pub stats: Option<Vec<StatRow>>,
    /// (tenant or "-", reason) → count from `pgs show refused`; `None` when unavailable.
    pub refused: Option<BTreeMap<(String, String), u64>>,
    /// How new connections negotiated (plain, starttls, direct) from `pgs show negotiations`.
    pub negotiations: Option<BTreeMap<String, u64>>,
    /// The certificates directory, when TLS is on.
    pub certificates: Option<Vec<crate::tls::CertStatus>>,
    /// Stick tables from `show table`: (name, size, entries in use).
    pub tables: Option<Vec<(String, u64, u64)>>,
    /// Each tenant's effective session limit (0: none).
    pub connection_limits: Vec<(String, u32)>,
    /// Failed startups per source and window before the throttle.
    pub failed_startups_threshold: u32,
    pub haproxy_up: bool,
    pub docker_up: Option<bool>,
    /// Backup results of the managed tenants with backups on.
    pub backups: Vec<crate::backups::status::Summary>,
    /// Wakes and sleeps (with a Docker engine, the daemon's sleeper).
    pub sleep: Option<SleepSample>,
}

/// The sleeper's counters at scrape time.
#[derive(Debug)]
pub struct SleepSample {
    pub wakes: u64,
    pub sleeps: u64,
    pub wake_seconds: prometheus_client::metrics::histogram::Histogram,
    pub wake_failures: BTreeMap<(String, &'static str), u64>,
}

/// Parses the reply of `pgs show refused` (lines `<tenant|-> <reason> <count>`).
pub fn parse_refused(body: &str) -> BTreeMap<(String, String), u64> {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (t, r, n) = (f.next()?, f.next()?, f.next()?.parse().ok()?);
            Some(((t.to_owned(), r.to_owned()), n))
        })
        .collect()
}

/// Parses the reply of `pgs show negotiations` (lines `<via> <count>`).
pub fn parse_negotiations(body: &str) -> BTreeMap<String, u64> {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            Some((f.next()?.to_owned(), f.next()?.parse().ok()?))
        })
        .collect()
}

/// Parses the reply of `show table` (lines `# table: NAME, type: T, size:N, used:M`).
pub fn parse_tables(body: &str) -> Vec<(String, u64, u64)> {
    body.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("# table: ")?;
            let name = rest.split(',').next()?.trim().to_string();
            let num = |tag: &str| -> Option<u64> {
                rest.split(tag)
                    .nth(1)?
                    .split(|c: char| !c.is_ascii_digit())
                    .next()?
                    .parse()
                    .ok()
            };
            Some((name, num("size:")?, num("used:")?))
        })
        .collect()
}

/// A gauge holding `v`.
fn gauge(v: i64) -> Gauge {
    let g: Gauge = Gauge::default();
    g.set(v);
    g
}

/// The whole exposition: agent metrics plus `sample`, in the OpenMetrics text format.
pub fn render(agent: &AgentMetrics, sample: &Sample) -> Result<String, std::fmt::Error> {
    let mut r = Registry::with_prefix("pgs");
    agent.register(&mut r);

    r.register(
        "haproxy_up",
        "Whether HAProxy's Runtime API answered this scrape",
        gauge(sample.haproxy_up as i64),
    );
    if let Some(d) = sample.docker_up {
        r.register(
            "docker_up",
            "Whether the Docker engine answered this scrape",
            gauge(d as i64),
        );
    }

    let access: Family<Labels, Gauge> = Family::default();
    let server: Family<Labels, Gauge> = Family::default();
    for t in &sample.tenants {
        let id = t.id.as_str();
        let on = |a: Access| (a == Access::Enabled) as i64;
        access
            .get_or_create(&labels(&[("tenant", id), ("source", "file")]))
            .set(on(t.access));
        if let Some(a) = t.haproxy_access {
            access
                .get_or_create(&labels(&[("tenant", id), ("source", "haproxy")]))
                .set(on(a));
        }
        if t.kind == "managed" && sample.docker_up != Some(false) {
            let now = match t.server.as_ref().and_then(|s| s.state) {
                Some(RunState::Running) => "running",
                Some(RunState::Stopped) => "stopped",
                Some(RunState::Unhealthy) => "unhealthy",
                None => "absent",
            };
            for state in ["running", "stopped", "unhealthy", "absent"] {
                server
                    .get_or_create(&labels(&[("tenant", id), ("state", state)]))
                    .set((state == now) as i64);
            }
        }
    }
    r.register(
        "tenant_access_enabled",
        "1 when the tenant's access is enabled, as the tenants file (source=file) or the running HAProxy (source=haproxy) says",
        access,
    );
    r.register(
        "tenant_server_state",
        "1 for the current state of a managed tenant's container: running, stopped, unhealthy or absent",
        server,
    );

    let by_sleep: Family<Labels, Gauge> = Family::default();
    let deep: Gauge = Gauge::default();
    for state in ["awake", "waking", "asleep"] {
        by_sleep.get_or_create(&labels(&[("state", state)])).set(0);
    }
    for t in &sample.tenants {
        if let Some(s) = t.sleep {
            by_sleep
                .get_or_create(&labels(&[("state", s.as_str())]))
                .inc();
        }
        if t.sleep_depth == Some(crate::sleep::Depth::Deep) {
            deep.inc();
        }
    }
    r.register(
        "tenants_by_sleep_state",
        "Managed tenants awake, waking or asleep",
        by_sleep,
    );
    r.register(
        "tenants_asleep_deep",
        "Sleeping tenants whose container is stopped too (the rest keep it up)",
        deep,
    );
    if let Some(z) = &sample.sleep {
        let wakes: Counter = Counter::default();
        wakes.inc_by(z.wakes);
        r.register(
            "wakes",
            "Sleeping servers started for a client or `tenant wake`",
            wakes,
        );
        let sleeps: Counter = Counter::default();
        sleeps.inc_by(z.sleeps);
        r.register(
            "sleeps",
            "Servers put to sleep (idle or `tenant sleep`)",
            sleeps,
        );
        r.register_with_unit(
            "wake_duration",
            "How long waking a server took, as a waiting client saw it (agent side)",
            Unit::Seconds,
            z.wake_seconds.clone(),
        );
        let failures: Family<Labels, Counter> = Family::default();
        for ((tenant, reason), n) in &z.wake_failures {
            failures
                .get_or_create(&labels(&[("tenant", tenant), ("reason", reason)]))
                .inc_by(*n);
        }
        r.register(
            "wake_failures",
            "Wakes that failed, by tenant and reason (not_allowed, start_failed, timeout); their clients got 57P03",
            failures,
        );
    }

    if let Some(stats) = &sample.stats {
        let current: Family<Labels, Gauge> = Family::default();
        let total: Family<Labels, Counter> = Family::default();
        let bytes_in: Family<Labels, Counter> = Family::default();
        let bytes_out: Family<Labels, Counter> = Family::default();
        for t in &sample.tenants {
            let backend = t.id.backend_name();
            let Some(row) = stats
                .iter()
                .find(|r| r.pxname() == backend && r.svname() == "BACKEND")
            else {
                continue;
            };
            let l = labels(&[("tenant", t.id.as_str())]);
            current
                .get_or_create(&l)
                .set(row.scur().unwrap_or(0) as i64);
            total.get_or_create(&l).inc_by(row.stot().unwrap_or(0));
            bytes_in.get_or_create(&l).inc_by(row.bin().unwrap_or(0));
            bytes_out.get_or_create(&l).inc_by(row.bout().unwrap_or(0));
        }
        r.register(
            "tenant_current_sessions",
            "Sessions open now through HAProxy to the tenant's server (show stat scur)",
            current,
        );
        r.register(
            "tenant_sessions",
            "Sessions routed to the tenant since HAProxy's last reload (show stat stot)",
            total,
        );
        r.register_with_unit(
            "tenant_received",
            "Bytes received from the tenant's clients since HAProxy's last reload (show stat bin)",
            Unit::Bytes,
            bytes_in,
        );
        r.register_with_unit(
            "tenant_sent",
            "Bytes sent to the tenant's clients since HAProxy's last reload (show stat bout)",
            Unit::Bytes,
            bytes_out,
        );
    }

    if let Some(refused) = &sample.refused {
        let per_tenant: Family<Labels, Counter> = Family::default();
        let all: Family<Labels, Counter> = Family::default();
        for t in &sample.tenants {
            // Present (at 0) for every tenant, so a rate() has a series before the first refusal.
            per_tenant
                .get_or_create(&labels(&[
                    ("tenant", t.id.as_str()),
                    ("reason", "disabled"),
                ]))
                .inc_by(0);
        }
        for ((tenant, reason), n) in refused {
            if tenant != "-" {
                per_tenant
                    .get_or_create(&labels(&[("tenant", tenant), ("reason", reason)]))
                    .inc_by(*n);
            }
            all.get_or_create(&labels(&[("reason", reason)])).inc_by(*n);
        }
        r.register(
            "tenant_refused_connections",
            "Connections HAProxy refused for a known tenant because its access is disabled, since HAProxy's last reload",
            per_tenant,
        );
        r.register(
            "refused_connections",
            "Connections HAProxy refused, by reason (unknown, disabled, invalid_user, ...), since its last reload",
            all,
        );
    }

    let limits: Family<Labels, Gauge> = Family::default();
    for (tenant, n) in &sample.connection_limits {
        limits
            .get_or_create(&labels(&[("tenant", tenant)]))
            .set(i64::from(*n));
    }
    r.register(
        "tenant_connection_limit",
        "Most concurrent client sessions HAProxy lets through to the tenant (0: no limit); FATAL 53300 past it",
        limits,
    );
    r.register(
        "failed_startups_threshold",
        "Failed startups one client address may have per window before it is refused for a while",
        gauge(i64::from(sample.failed_startups_threshold)),
    );
    if let Some(tables) = &sample.tables {
        let size: Family<Labels, Gauge> = Family::default();
        let used: Family<Labels, Gauge> = Family::default();
        for (name, s, u) in tables {
            size.get_or_create(&labels(&[("table", name)]))
                .set(*s as i64);
            used.get_or_create(&labels(&[("table", name)]))
                .set(*u as i64);
        }
        r.register(
            "stick_table_size",
            "Most entries of HAProxy's stick table (cancel keys, sources, tenant sessions)",
            size,
        );
        r.register(
            "stick_table_entries",
            "Entries in use in HAProxy's stick table; at the size, the oldest go first",
            used,
        );
    }

    if let Some(n) = &sample.negotiations {
        let by: Family<Labels, Counter> = Family::default();
        for (via, count) in n {
            by.get_or_create(&labels(&[("via", via)])).inc_by(*count);
        }
        r.register(
            "connections_by_negotiation",
            "New client connections on the public port by how they negotiated: plain (no TLS), starttls (SSLRequest), direct (PostgreSQL 17 direct SSL), since HAProxy's last reload",
            by,
        );
    }

    if let Some(certs) = &sample.certificates {
        let expiry: Family<Labels, Gauge> = Family::default();
        let served: Family<Labels, Gauge> = Family::default();
        for c in certs {
            let file = c.file.display().to_string();
            let l = labels(&[("file", &file)]);
            if let Some(secs) = c.expires_in_secs {
                expiry.get_or_create(&l).set(secs);
            }
            if let Some(ok) = c.in_sync {
                served.get_or_create(&l).set(ok as i64);
            }
        }
        r.register_with_unit(
            "tls_certificate_expiry",
            "Seconds until the certificate in this file expires (negative once expired)",
            Unit::Seconds,
            expiry,
        );
        r.register(
            "tls_certificate_served",
            "1 when the running HAProxy serves exactly this file's certificate",
            served,
        );
    }

    if !sample.backups.is_empty() {
        let last: Family<Labels, Gauge> = Family::default();
        let size: Family<Labels, Gauge> = Family::default();
        let failures: Family<Labels, Counter> = Family::default();
        let lag: Family<Labels, Gauge> = Family::default();
        let tested: Family<Labels, Gauge> = Family::default();
        let test_ok: Family<Labels, Gauge> = Family::default();
        let verify_ok: Family<Labels, Gauge> = Family::default();
        let archive_failures: Family<Labels, Counter> = Family::default();
        for b in &sample.backups {
            let l = labels(&[("tenant", b.tenant.as_str())]);
            last.get_or_create(&l)
                .set(b.status.last_success.unwrap_or(0));
            size.get_or_create(&l)
                .set(b.status.last_size.unwrap_or(0) as i64);
            failures.get_or_create(&l).inc_by(b.status.failures);
            if let Some(s) = b.wal_archive_lag_seconds {
                lag.get_or_create(&l).set(s);
            }
            tested
                .get_or_create(&l)
                .set(b.status.restore_test_at.unwrap_or(0));
            if let Some(ok) = b.status.restore_test_ok {
                test_ok.get_or_create(&l).set(ok as i64);
            }
            if let Some(ok) = b.status.verify_ok {
                verify_ok.get_or_create(&l).set(ok as i64);
            }
            archive_failures
                .get_or_create(&l)
                .inc_by(b.archive_failures);
        }
        r.register_with_unit(
            "backup_last_success_timestamp",
            "Unix time at which the tenant's last successful backup ended (0: none yet)",
            Unit::Seconds,
            last,
        );
        r.register_with_unit(
            "backup_last_size",
            "Size in the repository of the tenant's last successful backup",
            Unit::Bytes,
            size,
        );
        r.register(
            "backup_failures",
            "Failed backups of the tenant (recorded under the layout's state/, kept across restarts)",
            failures,
        );
        r.register_with_unit(
            "backup_wal_archive_lag",
            "Seconds since the tenant's newest WAL segment reached its repository (a server that writes nothing archives nothing)",
            Unit::Seconds,
            lag,
        );
        r.register_with_unit(
            "backup_restore_test_timestamp",
            "Unix time of the tenant's last restore test (0: none yet)",
            Unit::Seconds,
            tested,
        );
        r.register(
            "backup_restore_test_ok",
            "1 when the tenant's last restore test (restore, amcheck, pg_dumpall) passed",
            test_ok,
        );
        r.register(
            "backup_archive_failures",
            "Failed WAL pushes into the tenant's repository noted by its server (since its socket directory was made)",
            archive_failures,
        );
        r.register(
            "backup_verify_ok",
            "1 when the last pgbackrest verify of the tenant's repository found no problem",
            verify_ok,
        );
    }

    let mut out = String::new();
    encode(&mut out, &r)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::passes::PassLog;
    use crate::reconcile::{Problem, ProblemKind, Report};
    use crate::tenants::TenantId;
    use anyhow::Context;

    fn view(id: &str, access: Access) -> View {
        View {
            id: TenantId::parse(id).unwrap(),
            kind: "managed",
            access,
            stopped: false,
            address: None,
            spec: None,
            server: None,
            haproxy_access: Some(access),
            sleep: Some(if id == "globex" {
                crate::sleep::SleepState::Asleep
            } else {
                crate::sleep::SleepState::Awake
            }),
            sleep_depth: (id == "globex").then_some(crate::sleep::Depth::Light),
        }
    }

    #[test]
    fn problems_are_counted_by_their_typed_kind() {
        let agent = AgentMetrics::default();
        let log = PassLog::new();
        // Whole passes that could not run: the kind comes from the error's type.
        let bad_file = crate::tenants::load(std::path::Path::new("/nonexistent/tenants.json"))
            .map(drop)
            .map_err(anyhow::Error::from)
            .context("loading");
        agent.record_pass(&log.publish(&bad_file.map(|_| Report::default())));
        let no_docker: anyhow::Result<Report> = Err(anyhow::Error::from(
            crate::instances::DriverError::Unavailable("docker engine: gone".into()),
        )
        .context("cannot see the managed tenants' servers"));
        agent.record_pass(&log.publish(&no_docker));
        // A problem inside a pass keeps the kind its step gave it, whatever its wording.
        agent.record_pass(&log.publish(&Ok(Report {
            errors: vec![Problem::new(
                ProblemKind::Reload,
                "tenant x: made-up wording",
            )],
            ..Report::default()
        })));
        let text = render(&agent, &Sample::default()).unwrap();
        for line in [
            "pgs_reconcile_errors_total{kind=\"tenants_file\"} 1",
            "pgs_reconcile_errors_total{kind=\"docker\"} 1",
            "pgs_reconcile_errors_total{kind=\"reload\"} 1",
            "pgs_reconcile_errors_total{kind=\"instance\"} 0",
            "pgs_reconcile_passes_total{result=\"failed\"} 2",
        ] {
            assert!(text.contains(line), "missing {line:?} in:\n{text}");
        }
    }

    #[test]
    fn the_exposition_has_agent_and_tenant_metrics() {
        let agent = AgentMetrics::default();
        let log = PassLog::new();
        agent.record_pass(&log.publish(&Ok(Report {
            duration_ms: 120,
            reloaded: true,
            ..Report::default()
        })));
        agent.record_pass(&log.publish(&Ok(Report {
            errors: vec![Problem::new(
                ProblemKind::Instance,
                "tenant acme: PostgreSQL did not accept logins",
            )],
            ..Report::default()
        })));
        agent.record_flip(Access::Enabled);
        let stats = StatRow::parse_all(
            "# pxname,svname,scur,stot,bin,bout,\npgs_acme,BACKEND,2,7,1000,2000,\n",
        )
        .unwrap();
        let sample = Sample {
            tenants: vec![
                view("acme", Access::Enabled),
                view("globex", Access::Disabled),
            ],
            stats: Some(stats),
            refused: Some(parse_refused(
                "# pgs refused: tenant reason count\nglobex disabled 3\n- unknown 5\n",
            )),
            negotiations: Some(parse_negotiations(
                "# pgs negotiations: via count\nplain 4\nstarttls 2\ndirect 1\n",
            )),
            certificates: Some(vec![crate::tls::CertStatus {
                file: "/srv/pgs/tls/db.pem".into(),
                certificate: None,
                problem: None,
                expires_in_secs: Some(86_400),
                served: None,
                in_sync: Some(true),
            }]),
            tables: Some(parse_tables(
                "# table: pgs-cancel-keys, type: string, size:100000, used:3\n",
            )),
            connection_limits: vec![("acme".into(), 2)],
            failed_startups_threshold: 20,
            haproxy_up: true,
            docker_up: Some(true),
            backups: vec![crate::backups::status::Summary {
                tenant: "acme".into(),
                status: crate::backups::status::Status {
                    last_success: Some(1_796_499_272),
                    last_size: Some(4_078_553),
                    failures: 2,
                    restore_test_at: Some(1_796_499_300),
                    restore_test_ok: Some(true),
                    verify_ok: Some(false),
                    ..Default::default()
                },
                newest_wal_at: Some(1_796_499_280),
                wal_archive_lag_seconds: Some(42),
                archive_failures: 3,
                last_archive_failure: None,
            }],
            sleep: Some(SleepSample {
                wakes: 4,
                sleeps: 5,
                wake_seconds: {
                    let h = prometheus_client::metrics::histogram::Histogram::new(
                        crate::sleep::WAKE_BUCKETS.iter().copied(),
                    );
                    h.observe(0.12);
                    h.observe(0.7);
                    h
                },
                wake_failures: [(("globex".to_owned(), "timeout"), 3)]
                    .into_iter()
                    .collect(),
            }),
        };
        let text = render(&agent, &sample).unwrap();
        for line in [
            "pgs_tenants_by_sleep_state{state=\"awake\"} 1",
            "pgs_tenants_by_sleep_state{state=\"asleep\"} 1",
            "pgs_tenants_by_sleep_state{state=\"waking\"} 0",
            "pgs_tenants_asleep_deep 0",
            "pgs_wakes_total 4",
            "pgs_sleeps_total 5",
            "pgs_wake_duration_seconds_count 2",
            "pgs_wake_duration_seconds_bucket{le=\"0.15\"} 1",
            "pgs_wake_failures_total{tenant=\"globex\",reason=\"timeout\"} 3",
            "pgs_backup_last_success_timestamp_seconds{tenant=\"acme\"} 1796499272",
            "pgs_backup_last_size_bytes{tenant=\"acme\"} 4078553",
            "pgs_backup_failures_total{tenant=\"acme\"} 2",
            "pgs_backup_wal_archive_lag_seconds{tenant=\"acme\"} 42",
            "pgs_backup_restore_test_timestamp_seconds{tenant=\"acme\"} 1796499300",
            "pgs_backup_restore_test_ok{tenant=\"acme\"} 1",
            "pgs_backup_verify_ok{tenant=\"acme\"} 0",
            "pgs_backup_archive_failures_total{tenant=\"acme\"} 3",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        for line in [
            "pgs_reconcile_passes_total{result=\"ok\"} 1",
            "pgs_reconcile_passes_total{result=\"problems\"} 1",
            "pgs_reconcile_errors_total{kind=\"instance\"} 1",
            "pgs_haproxy_reloads_total 1",
            "pgs_access_flips_total{to=\"enabled\"} 1",
            "pgs_reconcile_duration_seconds_count 2",
            "pgs_tenant_access_enabled{tenant=\"acme\",source=\"file\"} 1",
            "pgs_tenant_access_enabled{tenant=\"globex\",source=\"haproxy\"} 0",
            "pgs_tenant_server_state{tenant=\"acme\",state=\"absent\"} 1",
            "pgs_tenant_current_sessions{tenant=\"acme\"} 2",
            "pgs_tenant_sessions_total{tenant=\"acme\"} 7",
            "pgs_tenant_received_bytes_total{tenant=\"acme\"} 1000",
            "pgs_tenant_sent_bytes_total{tenant=\"acme\"} 2000",
            "pgs_tenant_refused_connections_total{tenant=\"globex\",reason=\"disabled\"} 3",
            "pgs_tenant_refused_connections_total{tenant=\"acme\",reason=\"disabled\"} 0",
            "pgs_refused_connections_total{reason=\"unknown\"} 5",
            "pgs_haproxy_up 1",
            "pgs_connections_by_negotiation_total{via=\"direct\"} 1",
            "pgs_connections_by_negotiation_total{via=\"plain\"} 4",
            "pgs_tls_certificate_expiry_seconds{file=\"/srv/pgs/tls/db.pem\"} 86400",
            "pgs_tls_certificate_served{file=\"/srv/pgs/tls/db.pem\"} 1",
            "pgs_tenant_connection_limit{tenant=\"acme\"} 2",
            "pgs_failed_startups_threshold 20",
            "pgs_stick_table_entries{table=\"pgs-cancel-keys\"} 3",
            "pgs_stick_table_size{table=\"pgs-cancel-keys\"} 100000",
            "# EOF",
        ] {
            assert!(text.contains(line), "missing {line:?} in:\n{text}");
        }
        assert!(
            text.contains("pgs_last_successful_sync_timestamp_seconds "),
            "{text}"
        );
    }

    /// Series the alert rules and the dashboard use that other parts of pgs export (backups,
    /// wake); every other `pgs_` name there must be one this module exports.
    const EXPORTED_ELSEWHERE: &[&str] = &["pgs_backup_last_success_timestamp_seconds"];

    #[test]
    fn the_alert_rules_and_dashboard_name_only_real_series() {
        let agent = AgentMetrics::default();
        let log = PassLog::new();
        agent.record_pass(&log.publish(&Ok(Report {
            reloaded: true,
            ..Report::default()
        })));
        let sample = Sample {
            tenants: vec![view("acme", Access::Enabled)],
            stats: Some(
                StatRow::parse_all(
                    "# pxname,svname,scur,stot,bin,bout,\npgs_acme,BACKEND,2,7,1,2,\n",
                )
                .unwrap(),
            ),
            sleep: Some(SleepSample {
                wakes: 0,
                sleeps: 0,
                wake_seconds: prometheus_client::metrics::histogram::Histogram::new(
                    crate::sleep::WAKE_BUCKETS.iter().copied(),
                ),
                wake_failures: [(("acme".to_owned(), "timeout"), 1)].into_iter().collect(),
            }),
            refused: Some(parse_refused("acme disabled 1\n")),
            certificates: Some(vec![crate::tls::CertStatus {
                file: "/srv/pgs/tls/db.pem".into(),
                certificate: None,
                problem: None,
                expires_in_secs: Some(86_400),
                served: None,
                in_sync: Some(true),
            }]),
            haproxy_up: true,
            docker_up: Some(true),
            ..Sample::default()
        };
        let text = render(&agent, &sample).unwrap();
        let exported: std::collections::BTreeSet<&str> = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split(['{', ' ']).next())
            .collect();
        for (file, body) in [
            (
                "pgs-alerts.yml",
                include_str!("../../monitoring/pgs-alerts.yml"),
            ),
            (
                "grafana-dashboard.json",
                include_str!("../../monitoring/grafana-dashboard.json"),
            ),
        ] {
            let mut named = 0;
            for (at, _) in body.match_indices("pgs_") {
                // Only whole identifiers: not the middle of `a_pgs_x`, not `pgs-agent`.
                if at > 0 && body.as_bytes()[at - 1].is_ascii_alphanumeric() {
                    continue;
                }
                let name: String = body[at..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                named += 1;
                assert!(
                    exported.contains(name.as_str()) || EXPORTED_ELSEWHERE.contains(&name.as_str()),
                    "{file} uses {name}, which /metrics does not export:\n{text}"
                );
            }
            assert!(named > 10, "{file}: only {named} series found");
        }
    }
}
