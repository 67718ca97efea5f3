//! Observe the world, plan, apply: the one writer of HAProxy's files and maps. Everything else
//! (CLI, API, file watch, timer) only asks for a pass. A pass holds the agent lock, so `sync`
//! from cron and the daemon never write at the same time.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant, UNIX_EPOCH};

use anyhow::{anyhow, Context};
use futures_util::stream::{self, StreamExt};
use serde::Serialize;
use tracing::{info, warn};

use crate::access::runtime_api;
use crate::cancel_keys;
use crate::fsutil::{self, FileLock};
use crate::haproxy::maps::{self, Entries};
use crate::haproxy::master::MasterCli;
use crate::haproxy::render::{self, Rendered};
use crate::haproxy::runtime::{Info, RuntimeApi, RuntimeError};
use crate::instances::{DriverError, InstanceDriver, ObservedInstance, RunState};
use crate::plan::{self, Desired, InstanceStep, MapStep, Observed, Plan};
use crate::roles;
use crate::settings::Agent;
use crate::tenants::{self, Instance, TenantId, Tenants};
use crate::tls;

/// How long a reload may take before it counts as failed.
const RELOAD_DEADLINE: Duration = Duration::from_secs(20);

#[derive(Debug, Default, Clone, Copy)]
pub struct SyncOptions {
    /// Plan and print, change nothing.
    pub dry_run: bool,
}

/// What a pass did, for people (`sync`), machines (`--json`) and the daemon's log.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub plan: Plan,
    /// Steps that were carried out, one line each.
    pub done: Vec<String>,
    /// Problems, one line each; a pass with problems exits non-zero.
    pub errors: Vec<Problem>,
    pub reloaded: bool,
    /// Tenants left unroutable because their server is not ready.
    pub held_back: Vec<TenantId>,
    /// Whether HAProxy answered on its Runtime API socket; when it did not, the files are
    /// written and take effect when it starts.
    pub haproxy_running: bool,
    pub duration_ms: u64,
}

impl Report {
    pub fn changed(&self) -> bool {
        !self.done.is_empty()
    }

    fn problem(&mut self, kind: ProblemKind, message: impl Into<String>) {
        self.errors.push(Problem::new(kind, message));
    }
}

/// What part of the world a problem is about: the metrics and alerts count problems by it,
/// so it is set where the problem happens, never guessed from the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProblemKind {
    /// A tenant's server: create, start, stop, remove, readiness.
    Instance,
    /// HAProxy refused the candidate configuration, or its files could not be written.
    Config,
    /// The reload failed; the previous files were put back.
    Reload,
    /// A map file or HAProxy's runtime maps.
    Maps,
    /// The pass did not run: the tenants file is missing or does not validate.
    TenantsFile,
    /// The pass did not run: the Docker engine did not answer.
    Docker,
    /// The pass did not run: HAProxy's Runtime API answered strangely.
    Haproxy,
    /// Anything else (e.g. a lock file that cannot be opened).
    Other,
    /// A TLS certificate file that cannot be used, or that HAProxy refused.
    Certificates,
    /// A managed tenant's extra roles could not be kept in line on its server.
    Roles,
}

impl ProblemKind {
    pub const ALL: [ProblemKind; 10] = [
        ProblemKind::Instance,
        ProblemKind::Config,
        ProblemKind::Reload,
        ProblemKind::Maps,
        ProblemKind::TenantsFile,
        ProblemKind::Docker,
        ProblemKind::Haproxy,
        ProblemKind::Other,
        ProblemKind::Certificates,
        ProblemKind::Roles,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ProblemKind::Instance => "instance",
            ProblemKind::Config => "config",
            ProblemKind::Reload => "reload",
            ProblemKind::Maps => "maps",
            ProblemKind::TenantsFile => "tenants_file",
            ProblemKind::Docker => "docker",
            ProblemKind::Haproxy => "haproxy",
            ProblemKind::Other => "other",
            ProblemKind::Certificates => "certificates",
            ProblemKind::Roles => "roles",
        }
    }

    /// The kind of an error that stopped a whole pass, from its type.
    pub fn of_failed_pass(e: &anyhow::Error) -> ProblemKind {
        if e.downcast_ref::<tenants::LoadError>().is_some() {
            ProblemKind::TenantsFile
        } else if e.downcast_ref::<DriverError>().is_some() {
            ProblemKind::Docker
        } else if e.downcast_ref::<RuntimeError>().is_some() {
            ProblemKind::Haproxy
        } else {
            ProblemKind::Other
        }
    }
}

/// One problem of a pass: its kind and the line people read. Serialized as the line alone, so
/// `sync --json` reads as before.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub kind: ProblemKind,
    pub message: String,
}

impl Problem {
    pub fn new(kind: ProblemKind, message: impl Into<String>) -> Problem {
        Problem {
            kind,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl Serialize for Problem {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.message)
    }
}

/// One full pass: load, observe, plan, apply.
pub async fn sync<D: InstanceDriver>(
    agent: &Agent,
    driver: Option<&D>,
    opts: SyncOptions,
) -> anyhow::Result<Report> {
    let started = Instant::now();
    let lock_path = &agent.paths.agent_lock;
    let _lock = match FileLock::try_exclusive(lock_path)
        .with_context(|| format!("cannot open {}", lock_path.display()))?
    {
        Some(l) => l,
        None => {
            info!("another pgs-agent is reconciling; waiting for it to finish");
            let path = lock_path.clone();
            tokio::task::spawn_blocking(move || FileLock::exclusive(&path))
                .await
                .context("lock task failed")?
                .with_context(|| format!("cannot lock {}", lock_path.display()))?
        }
    };
    let tenants = tenants::load(&agent.paths.tenants_file)?;
    let rendered = render::render(&agent.settings, &agent.paths, &tenants);
    let observed = observe(agent, driver, &tenants).await?;
    let desired = desired(agent, &tenants, &rendered);
    let plan = plan::plan(&desired, &observed);
    let mut report = Report {
        plan: plan.clone(),
        haproxy_running: observed.haproxy_running,
        ..Report::default()
    };
    if !opts.dry_run {
        apply(
            agent,
            driver,
            &tenants,
            &rendered,
            &observed,
            &plan,
            &mut report,
        )
        .await;
    }
    report.duration_ms = started.elapsed().as_millis() as u64;
    Ok(report)
}

fn desired<'a>(agent: &Agent, tenants: &'a Tenants, r: &Rendered) -> Desired<'a> {
    Desired {
        tenants: Some(tenants),
        config: r.cfg.clone(),
        access: maps::entries(render::access_entries(tenants)),
        backends: desired_backends(agent, tenants),
    }
}

fn desired_backends(agent: &Agent, tenants: &Tenants) -> Entries {
    maps::entries(render::backends_entries(tenants, &agent.paths))
}

/// The marker written after a confirmed reload: the worker's pid, then the config it loaded.
fn read_loaded_marker(agent: &Agent) -> Option<(u32, String)> {
    let text = std::fs::read_to_string(&agent.paths.haproxy_loaded).ok()?;
    let (first, cfg) = text.split_once('\n')?;
    Some((first.strip_prefix("pid ")?.parse().ok()?, cfg.to_owned()))
}

fn write_loaded_marker(agent: &Agent, pid: u32, cfg: &str) {
    let text = format!("pid {pid}\n{cfg}");
    if let Err(e) = fsutil::write_atomic(&agent.paths.haproxy_loaded, text.as_bytes(), 0o644) {
        warn!(error = %e, "cannot record the loaded configuration; the next pass may reload once more");
    }
}

/// Reads the world: Docker (when there is a driver), HAProxy (when it answers), files on disk.
pub async fn observe<D: InstanceDriver>(
    agent: &Agent,
    driver: Option<&D>,
    tenants: &Tenants,
) -> anyhow::Result<Observed> {
    let mut o = Observed {
        config_on_disk: std::fs::read_to_string(&agent.paths.haproxy_cfg).ok(),
        asleep: crate::sleep::states_on_file(agent).into_keys().collect(),
        ..Observed::default()
    };
    if let Some(d) = driver {
        match d.observe().await {
            Ok(list) => {
                o.instances = Some(
                    list.into_iter()
                        .map(|i: ObservedInstance| (i.tenant.clone(), i))
                        .collect(),
                )
            }
            Err(e) => {
                let managed = tenants
                    .iter()
                    .any(|t| matches!(t.instance, Instance::Managed(_)));
                if managed {
                    return Err(anyhow!(e).context("cannot see the managed tenants' servers"));
                }
                warn!(error = %e, "Docker engine not reachable; no managed tenants, carrying on");
            }
        }
    }
    let api = runtime_api(agent);
    match api.show_info().await {
        Ok(info) => {
            o.haproxy_running = true;
            let pid = info.pid;
            o.config_loaded = match read_loaded_marker(agent) {
                Some((p, cfg)) if p == pid => Some(cfg),
                // Written after HAProxy started (`render`, or an agent killed between writing
                // and reloading): what it runs is unknown, so the plan reloads.
                _ if written_after_start(&agent.paths.haproxy_cfg, &info) => None,
                // Started or reloaded by someone else since our last reload: it read the file.
                _ => o.config_on_disk.clone(),
            };
            o.runtime_access = Some(maps::show(&api, &agent.paths.access_map).await?);
            o.runtime_backends = Some(maps::show(&api, &agent.paths.backends_map).await?);
        }
        Err(e) if e.is_unreachable() => {
            info!("HAProxy is not running; files are written for its next start");
        }
        Err(e) => return Err(e).context("HAProxy's Runtime API answered strangely"),
    }
    Ok(o)
}

/// Whether `file` was changed after the running HAProxy (re)started and read it. HAProxy gives
/// its start in whole seconds (`Start_time_sec`, reset by every reload), so a write within that
/// second counts as read.
fn written_after_start(file: &Path, info: &Info) -> bool {
    let Some(start) = info
        .get("Start_time_sec")
        .and_then(|s| s.parse::<u64>().ok())
    else {
        return false;
    };
    std::fs::metadata(file)
        .and_then(|m| m.modified())
        .is_ok_and(|mtime| mtime > UNIX_EPOCH + Duration::from_secs(start + 1))
}

async fn apply<D: InstanceDriver>(
    agent: &Agent,
    driver: Option<&D>,
    tenants: &Tenants,
    rendered: &Rendered,
    observed: &Observed,
    plan: &Plan,
    report: &mut Report,
) {
    let api = runtime_api(agent);
    let maps_lock = FileLock::exclusive(&agent.paths.maps_lock);
    if let Err(e) = &maps_lock {
        report.problem(ProblemKind::Maps, format!("cannot lock the maps: {e}"));
        return;
    }

    // 1. Access off first: whatever goes away stops being routable before anything else.
    if !plan.access_off.is_empty() {
        let closing = |k: &String| {
            plan.access_off
                .iter()
                .any(|s| matches!(s, MapStep::Del { key } if key == k))
        };
        // The file first, so a HAProxy (re)started from here on cannot open them again.
        let mut on_file = maps::read_file(&agent.paths.access_map);
        on_file.retain(|k, _| !closing(k));
        if let Err(e) = maps::write_file(&agent.paths.access_map, &on_file) {
            report.problem(
                ProblemKind::Maps,
                format!("writing {}: {e}", agent.paths.access_map.display()),
            );
        }
        let mut keep = observed.runtime_access.clone().unwrap_or_default();
        keep.retain(|k, _| !closing(k));
        let current = observed.runtime_access.clone().unwrap_or_default();
        match maps::apply(
            &api,
            &agent.paths.access_map,
            &plan.access_off,
            &current,
            &keep,
        )
        .await
        {
            Ok(()) => report.done.extend(
                plan.access_off
                    .iter()
                    .map(|s| format!("access closed: {}", key_of(s))),
            ),
            Err(e) => report.problem(ProblemKind::Maps, format!("closing access: {e}")),
        }
    }

    // 2. Servers: create / replace / start, then wait until they accept logins. Meanwhile the
    // candidate config is checked (`haproxy -c`): it does not depend on them.
    let mut failed: BTreeSet<TenantId> = BTreeSet::new();
    let ready_timeout = Duration::from_secs(agent.settings.docker.ready_timeout_secs);
    let needs_config = plan.write_config || plan.reload;
    let check = async {
        if needs_config {
            Some(render::check(agent, tenants).await)
        } else {
            None
        }
    };
    let servers = async {
        let Some(d) = driver else {
            return Vec::new();
        };
        // A few at a time: after dockerd comes back without live-restore every tenant needs a
        // start, and one slow server must not keep the others down.
        // Boxed as Send here, for these lifetimes: a stream of closure-made futures cannot be
        // proven Send for every lifetime, which callers on spawned tasks (the HTTP API's
        // restores) need.
        type StepFuture<'s> = std::pin::Pin<
            Box<
                dyn std::future::Future<Output = (usize, &'s InstanceStep, Result<(), DriverError>)>
                    + Send
                    + 's,
            >,
        >;
        let steps: Vec<StepFuture<'_>> = plan
            .instances
            .iter()
            .filter(|s| !matches!(s, InstanceStep::Remove { .. }))
            .enumerate()
            .map(|(i, step)| -> StepFuture<'_> {
                Box::pin(async move { (i, step, run_instance_step(d, step, ready_timeout).await) })
            })
            .collect();
        // Unordered: a slot frees as soon as any server is ready, so a new tenant never waits
        // for a slow one ahead of it in the plan; the report keeps the plan's order.
        let mut results: Vec<_> = stream::iter(steps)
            .buffer_unordered(agent.settings.docker.start_concurrency.max(1))
            .collect()
            .await;
        results.sort_by_key(|(i, _, _)| *i);
        results
    };
    let (results, checked) = tokio::join!(servers, check);
    for (_, step, result) in results {
        match result {
            Ok(()) => report.done.push(describe_instance(step)),
            Err(e) => {
                report.problem(ProblemKind::Instance, e.to_string());
                failed.insert(step.tenant().clone());
            }
        }
    }
    report.held_back = failed.iter().cloned().collect();

    // 2b. Extra roles, on servers that run and accept logins.
    if let Some(d) = driver {
        sync_roles(agent, d, tenants, observed, plan, &failed, report).await;
    }

    // 3. Config: check, write, reload (only when the backend set changed). The access map
    // written with it leaves out servers that are not ready: a reload must not open them.
    let mut want_access = maps::entries(render::access_entries(tenants));
    want_access.retain(|k, _| !failed.iter().any(|f| f.as_str() == k));
    let rendered = Rendered {
        access_map: render::map_file(want_access.clone()),
        ..rendered.clone()
    };
    let mut config_ok = true;
    if let Some(checked) = checked {
        config_ok = write_and_reload(agent, checked, &rendered, plan, report).await;
    }

    // 4. Maps: the files always; the running HAProxy for what a reload did not bring.
    let want_backends = desired_backends(agent, tenants);
    if !config_ok {
        // Tenants new in this config are not in the running HAProxy, nor in the kept files a
        // HAProxy not running yet will start from: do not open them.
        let known = observed
            .runtime_backends
            .clone()
            .unwrap_or_else(|| maps::read_file(&agent.paths.backends_map));
        want_access.retain(|k, _| known.contains_key(k));
    }
    // The backends map file goes with the config: a kept config keeps it. Written here too, so
    // a map file edited on disk is repaired without a config change.
    let mut files = vec![(&agent.paths.access_map, &want_access)];
    if config_ok {
        files.push((&agent.paths.backends_map, &want_backends));
    }
    for (path, want) in files {
        match maps::write_file(path, want) {
            Ok(true) => report
                .done
                .push(format!("map file written: {}", path.display())),
            Ok(false) => {}
            Err(e) => report.problem(
                ProblemKind::Maps,
                format!("writing {}: {e}", path.display()),
            ),
        }
    }
    if observed.haproxy_running && config_ok {
        match maps::sync(&api, &agent.paths.backends_map, &want_backends).await {
            Ok(steps) => report
                .done
                .extend(steps.iter().map(|s| format!("backends map: {}", key_of(s)))),
            Err(e) => report.problem(ProblemKind::Maps, format!("backends map: {e}")),
        }
    }
    if observed.haproxy_running {
        match maps::sync(&api, &agent.paths.access_map, &want_access).await {
            Ok(steps) => report.done.extend(steps.iter().map(|s| match s {
                MapStep::Set { key, .. } => format!("access opened: {key}"),
                MapStep::Del { key } => format!("access closed: {key}"),
            })),
            Err(e) => report.problem(ProblemKind::Maps, format!("access map: {e}")),
        }
    }
    drop(maps_lock);

    // 5. Certificates: a renewed or new file in the certificates directory is served without a
    // reload (a reload above read the copies it installed).
    if agent.settings.tls.is_some() {
        sync_certificates(agent, tenants, &api, observed.haproxy_running, report).await;
    }

    // 6. Containers of tenants that went away: after their backend is gone. Volumes stay.
    if let Some(d) = driver {
        for step in plan
            .instances
            .iter()
            .filter(|s| matches!(s, InstanceStep::Remove { .. }))
        {
            match d.remove(step.tenant(), false).await {
                Ok(r) => report.done.push(format!(
                    "server removed: {} (data volume {} kept)",
                    step.tenant(),
                    r.volume.as_deref().unwrap_or("-")
                )),
                Err(e) => report.problem(ProblemKind::Instance, e.to_string()),
            }
        }
    }
}

/// Makes every running managed server hold the roles its tenant declares (see `roles`). A
/// role problem is reported but never closes the tenant: its own role still works.
async fn sync_roles<D: InstanceDriver>(
    agent: &Agent,
    driver: &D,
    tenants: &Tenants,
    observed: &Observed,
    plan: &Plan,
    failed: &BTreeSet<TenantId>,
    report: &mut Report,
) {
    for t in tenants.iter() {
        // A sleeping server gets its roles at the first pass after it woke.
        if !matches!(t.instance, Instance::Managed(_))
            || t.stopped
            || failed.contains(&t.id)
            || (observed.asleep.contains(&t.id) && !started_now_by(plan, &t.id))
            || !roles::needs_sync(&agent.paths, &t.id, &t.roles)
        {
            continue;
        }
        let started_now = plan.instances.iter().any(|s| {
            s.tenant() == &t.id
                && !matches!(s, InstanceStep::Stop { .. } | InstanceStep::Remove { .. })
        });
        let running = observed
            .instances
            .as_ref()
            .and_then(|m| m.get(&t.id))
            .and_then(|i| i.state)
            == Some(RunState::Running);
        if !started_now && !running {
            continue;
        }
        let login = match driver.admin_login(&t.id) {
            Ok(l) => l,
            Err(e) => {
                report.problem(ProblemKind::Roles, e.to_string());
                continue;
            }
        };
        let outcome = roles::sync(&agent.paths, &login, &t.id, &t.roles).await;
        report.done.extend(outcome.done);
        for e in outcome.errors {
            report.problem(ProblemKind::Roles, e);
        }
    }
}

fn started_now_by(plan: &Plan, id: &TenantId) -> bool {
    plan.instances.iter().any(|s| {
        s.tenant() == id
            && matches!(
                s,
                InstanceStep::Create { .. } | InstanceStep::Replace { .. }
            )
    })
}

/// Keeps HAProxy's certificates equal to the certificates directory. With HAProxy running, a
/// renewed or new file is handed to it through the Runtime API and its served copy written only
/// once HAProxy took it; without, the copies are vetted by `haproxy -c` first. A file that does
/// not parse, or that HAProxy refuses, changes nothing and is reported at every pass.
async fn sync_certificates(
    agent: &Agent,
    tenants: &Tenants,
    api: &RuntimeApi,
    running: bool,
    report: &mut Report,
) {
    let (dir, served_dir) = (&agent.paths.tls_dir, &agent.paths.tls_served_dir);
    let scan = match tls::scan(dir, served_dir) {
        Ok(s) => s,
        Err(e) => {
            report.problem(
                ProblemKind::Certificates,
                format!(
                    "cannot read the certificates directory {}: {e}",
                    dir.display()
                ),
            );
            return;
        }
    };
    for (file, reason) in &scan.unusable {
        report.problem(
            ProblemKind::Certificates,
            format!(
                "certificate {} is not usable ({reason}); HAProxy keeps serving what it had",
                file.display()
            ),
        );
    }
    if !running {
        if scan.changed.is_empty() && scan.orphans.is_empty() {
            return;
        }
        match render::check(agent, tenants).await {
            Ok(()) => match tls::install_served(dir, served_dir) {
                Ok(_) => report.done.push(format!(
                    "certificates copied for HAProxy's next start: {}",
                    scan.changed
                        .iter()
                        .map(|c| c.file.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                )),
                Err(e) => report.problem(
                    ProblemKind::Certificates,
                    format!("writing {}: {e}", served_dir.display()),
                ),
            },
            Err(e) => report.problem(
                ProblemKind::Certificates,
                format!("{e}; the certificates were not copied"),
            ),
        }
        return;
    }
    // Served copies first, so a restart reads what HAProxy serves; then any drift in memory.
    for c in scan.changed.iter().chain(&scan.current) {
        match tls::push(api, served_dir, c).await {
            Ok(pushed) => {
                if let Err(e) = tls::write_served(c) {
                    report.problem(
                        ProblemKind::Certificates,
                        format!("writing {}: {e}", c.served.display()),
                    );
                }
                match pushed {
                    tls::Pushed::Unchanged => {}
                    tls::Pushed::Renewed { serial } => report.done.push(format!(
                        "certificate renewed: {} (serial {serial})",
                        c.file.display()
                    )),
                    tls::Pushed::Added { serial } => report.done.push(format!(
                        "certificate added: {} (serial {serial})",
                        c.file.display()
                    )),
                }
            }
            Err(e) => report.problem(
                ProblemKind::Certificates,
                format!(
                    "HAProxy refused certificate {}: {e}; it keeps serving what it had",
                    c.file.display()
                ),
            ),
        }
    }
    for o in &scan.orphans {
        match std::fs::remove_file(o) {
            Ok(()) => report.done.push(format!(
                "certificate removed: {} (served until HAProxy's next reload)",
                o.display()
            )),
            Err(e) => report.problem(
                ProblemKind::Certificates,
                format!("removing {}: {e}", o.display()),
            ),
        }
    }
}

/// One server step: create, replace or start and wait until it accepts logins; wait; stop.
async fn run_instance_step<D: InstanceDriver>(
    d: &D,
    step: &InstanceStep,
    ready_timeout: Duration,
) -> Result<(), DriverError> {
    let id = step.tenant();
    match step {
        InstanceStep::Create { spec, .. }
        | InstanceStep::Replace { spec, .. }
        | InstanceStep::Start { spec, .. } => {
            d.ensure(id, spec).await?;
            d.wait_ready(id, ready_timeout).await
        }
        InstanceStep::AwaitReady { .. } => d.wait_ready(id, ready_timeout).await,
        InstanceStep::Stop { .. } => d.stop(id).await,
        InstanceStep::Remove { .. } => unreachable!("removals run after the backends are gone"),
    }
}

/// Checks the candidate, installs it, and reloads HAProxy if it runs and the plan says so. On
/// any failure the previous files are put back and HAProxy keeps serving what it had.
/// Installs the checked config (`checked`: the result of `render::check` on it) and reloads
/// when the plan says so.
async fn write_and_reload(
    agent: &Agent,
    checked: Result<(), render::CheckError>,
    rendered: &Rendered,
    plan: &Plan,
    report: &mut Report,
) -> bool {
    if let Err(e) = checked {
        report.problem(
            ProblemKind::Config,
            format!("{e}; the running configuration was kept"),
        );
        return false;
    }
    let previous = Snapshot::take(agent);
    match render::install(&agent.paths, rendered) {
        Ok(w) if w.any() => report.done.push("configuration written".into()),
        Ok(_) => {}
        Err(e) => {
            previous.restore();
            report.problem(ProblemKind::Config, format!("writing HAProxy's files: {e}"));
            return false;
        }
    }
    if !plan.reload {
        return true;
    }
    // The keys of open sessions, for the new worker (the old one drops its table as it stops).
    let api = runtime_api(agent);
    let keys = match cancel_keys::snapshot(&api).await {
        Ok(k) => Some(k),
        Err(e) => {
            warn!(error = %e, "cannot read the cancel keys before the reload; open sessions cannot be cancelled after it");
            None
        }
    };
    let master = MasterCli::new(agent.paths.master_socket.clone());
    match master.reload_and_confirm(RELOAD_DEADLINE).await {
        Ok(procs) => {
            let pid = procs.current_workers().map(|w| w.pid).max().unwrap_or(0);
            write_loaded_marker(agent, pid, &rendered.cfg);
            report.reloaded = true;
            report
                .done
                .push(format!("HAProxy reloaded (new worker {pid})"));
            if let Some(keys) = keys.filter(|k| !k.is_empty()) {
                match cancel_keys::restore(&api, &keys).await {
                    Ok(n) => report
                        .done
                        .push(format!("cancel keys of open sessions carried over: {n}")),
                    Err(e) => {
                        warn!(error = %e, "cannot carry the cancel keys over; open sessions cannot be cancelled")
                    }
                }
            }
            true
        }
        Err(e) => {
            previous.restore();
            report.problem(
                ProblemKind::Reload,
                format!("HAProxy reload failed, previous files restored: {e}"),
            );
            false
        }
    }
}

/// The rendered files as they were before a write, to put back on failure.
struct Snapshot(Vec<(std::path::PathBuf, Option<Vec<u8>>)>);

impl Snapshot {
    fn take(agent: &Agent) -> Snapshot {
        let p = &agent.paths;
        Snapshot(
            [
                &p.haproxy_cfg,
                &p.backends_map,
                &p.access_map,
                &p.servers_map,
                &p.lua,
                &p.lua_wire,
            ]
            .into_iter()
            .map(|f| (f.clone(), std::fs::read(f).ok()))
            .collect(),
        )
    }

    fn restore(&self) {
        for (path, old) in &self.0 {
            let result = match old {
                Some(bytes) => fsutil::write_atomic(path, bytes, 0o644),
                None => std::fs::remove_file(path).or(Ok(())),
            };
            if let Err(e) = result {
                warn!(file = %path.display(), error = %e, "could not restore");
            }
        }
    }
}

fn key_of(s: &MapStep) -> &str {
    match s {
        MapStep::Set { key, .. } | MapStep::Del { key } => key,
    }
}

fn describe_instance(step: &InstanceStep) -> String {
    match step {
        InstanceStep::Create { tenant, .. } => format!("server created and ready: {tenant}"),
        InstanceStep::Replace { tenant, .. } => format!("server replaced and ready: {tenant}"),
        InstanceStep::Start { tenant, .. } => format!("server started and ready: {tenant}"),
        InstanceStep::AwaitReady { tenant } => format!("server ready: {tenant}"),
        InstanceStep::Stop { tenant } => format!("server stopped: {tenant}"),
        InstanceStep::Remove { tenant } => format!("server removed: {tenant}"),
    }
}
