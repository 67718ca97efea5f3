//! Sleep and wake of managed tenants: which tenants sleep (the asleep map, which HAProxy's
//! tenant backends read), one transition at a time per tenant, and the idle pass that finds
//! tenants to put to sleep.
//!
//! A light sleep stops PostgreSQL inside a container that stays up (its supervisor, see
//! docker/entrypoint.sh); a deep sleep stops the container too. A client of a sleeping tenant
//! is held by HAProxy (`pgs_wake` in pg-route.lua) while it asks the agent, on the local wake
//! socket, to wake the server; concurrent clients share one start.
//!
//! Going to sleep is race-free: the tenant is marked asleep in HAProxy first, so every client
//! from then on waits for a wake; only then are HAProxy's session count and the server's own
//! sessions checked, and the sleep is called off if either is not zero.
//!
//! # Layout
//! - `idle`  — pure: which tenants are idle, which sleepers go deep.
//! - `local` — the wake socket: its server (in `run`) and its client (the CLI).

pub mod idle;
pub mod local;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tracing::{info, warn};

use crate::access::runtime_api;
use crate::haproxy::maps;
use crate::haproxy::runtime::{ReplyError, RuntimeError};
use crate::instances::docker::DockerDriver;
use crate::instances::{InstanceDriver, RunState};
use crate::pgsql;
use crate::settings::Agent;
use crate::tenants::{self, Access, Instance, TenantId};

/// How a sleeping tenant sleeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Depth {
    /// PostgreSQL stopped, its container up (a few MiB; wakes in ~0.15 s).
    Light,
    /// The container stopped too (no memory; a wake starts the container).
    Deep,
}

/// A tenant's sleep state as `tenant list`, the API and `/metrics` show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SleepState {
    Awake,
    Waking,
    Asleep,
}

impl SleepState {
    pub fn as_str(self) -> &'static str {
        match self {
            SleepState::Awake => "awake",
            SleepState::Waking => "waking",
            SleepState::Asleep => "asleep",
        }
    }
}

/// One line of the asleep map: `tenant light|deep|waking`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mark {
    Asleep(Depth),
    /// Being woken (the depth it sleeps at until the wake succeeds).
    Waking(Depth),
}

impl Mark {
    fn value(self) -> &'static str {
        match self {
            Mark::Asleep(Depth::Light) => "light",
            Mark::Asleep(Depth::Deep) => "deep",
            Mark::Waking(_) => "waking",
        }
    }
    fn parse(v: &str) -> Mark {
        match v {
            "deep" => Mark::Asleep(Depth::Deep),
            // `waking` left by an agent that stopped mid-wake: the wake checks the container.
            _ => Mark::Asleep(Depth::Light),
        }
    }
    fn depth(self) -> Depth {
        match self {
            Mark::Asleep(d) | Mark::Waking(d) => d,
        }
    }
}

/// Reads the sleep states from the asleep map file: every tenant not in it is awake.
pub fn states_on_file(agent: &Agent) -> BTreeMap<TenantId, (SleepState, Depth)> {
    maps::read_file(&agent.paths.asleep_map)
        .into_iter()
        .filter_map(|(k, v)| {
            let id = TenantId::parse(&k).ok()?;
            let state = if v == "waking" {
                SleepState::Waking
            } else {
                SleepState::Asleep
            };
            Some((id, (state, Mark::parse(&v).depth())))
        })
        .collect()
}

/// Why a wake did not happen.
#[derive(Debug, Clone, thiserror::Error)]
pub enum WakeError {
    #[error("{0}")]
    NotAllowed(String),
    #[error("{0}")]
    StartFailed(String),
    #[error("the server did not accept logins within {0:?}")]
    Timeout(Duration),
}

impl WakeError {
    /// The `reason` label of `pgs_wake_failures_total` and of the HAProxy log.
    pub fn reason(&self) -> &'static str {
        match self {
            WakeError::NotAllowed(_) => "not_allowed",
            WakeError::StartFailed(_) => "start_failed",
            WakeError::Timeout(_) => "timeout",
        }
    }
}

/// How a wake went, in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct WakeTimes {
    /// Waiting behind another transition of the same tenant (another client's wake, a sleep).
    pub queued_ms: u64,
    /// Asking Docker: the supervisor's signal, or the container start of a deep sleeper.
    pub start_ms: u64,
    /// From then until PostgreSQL accepted a login.
    pub ready_ms: u64,
    pub total_ms: u64,
    /// This request did the start (false: another request's start served it, or it was awake).
    pub started: bool,
    pub depth: Option<Depth>,
}

/// Why a sleep did not happen.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SleepError {
    #[error("{0}")]
    NotAllowed(String),
    #[error("it has client sessions")]
    Busy,
    #[error("{0}")]
    Failed(String),
}

/// Counters `/metrics` reads.
#[derive(Debug)]
pub struct SleepStats {
    pub wakes: u64,
    pub sleeps: u64,
    /// Wake durations in seconds, as a waiting client saw the agent take.
    pub wake_seconds: prometheus_client::metrics::histogram::Histogram,
    /// (tenant, reason) → failed wakes.
    pub wake_failures: BTreeMap<(String, &'static str), u64>,
}

/// Buckets of the wake duration histogram, in seconds.
pub const WAKE_BUCKETS: &[f64] = &[
    0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0,
];

impl Default for SleepStats {
    fn default() -> Self {
        SleepStats {
            wakes: 0,
            sleeps: 0,
            wake_seconds: prometheus_client::metrics::histogram::Histogram::new(
                WAKE_BUCKETS.iter().copied(),
            ),
            wake_failures: BTreeMap::new(),
        }
    }
}

#[derive(Default)]
struct Inner {
    /// Sleeping and waking tenants, as in the asleep map file; absent: awake.
    marks: BTreeMap<TenantId, (Mark, Instant)>,
    /// When each tenant woke (or the agent first saw it awake).
    awake_since: HashMap<TenantId, Instant>,
    /// One transition (wake or sleep) at a time per tenant.
    locks: HashMap<TenantId, Arc<tokio::sync::Mutex<()>>>,
    stats: SleepStats,
}

/// The daemon's sleep and wake state; shared by the idle pass, the wake socket and the API.
pub struct Sleeper {
    agent: Agent,
    docker: DockerDriver,
    inner: Mutex<Inner>,
    /// Serializes writers of the asleep map file.
    file: Mutex<()>,
    /// Held while HAProxy's asleep map and the marks change together (a transition's gate, or
    /// `push_map` from read to write), so a push never applies marks read before a change.
    runtime_map: tokio::sync::Mutex<()>,
}

/// Readiness polls while a server starts.
const POLL: Duration = Duration::from_millis(10);
/// The supervisor may miss a signal that lands just before it waits: ask again after this.
const RESIGNAL_AFTER: Duration = Duration::from_millis(800);
/// How long a server may take to stop for a sleep.
const STOP_TIMEOUT: Duration = Duration::from_secs(20);
/// How long the last WAL segment may take to reach the repository before a sleep.
const ARCHIVE_TIMEOUT: Duration = Duration::from_secs(30);
/// Sleeps started at once by the idle pass.
const PARALLEL_SLEEPS: usize = 4;

impl Sleeper {
    /// Loads the sleeping tenants from the asleep map file.
    pub fn new(agent: &Agent, docker: DockerDriver) -> Sleeper {
        let now = Instant::now();
        let marks = maps::read_file(&agent.paths.asleep_map)
            .into_iter()
            .filter_map(|(k, v)| Some((TenantId::parse(&k).ok()?, (Mark::parse(&v), now))))
            .collect();
        Sleeper {
            agent: agent.clone(),
            docker,
            inner: Mutex::new(Inner {
                marks,
                ..Inner::default()
            }),
            file: Mutex::new(()),
            runtime_map: tokio::sync::Mutex::new(()),
        }
    }

    /// The state of every tenant the sleeper knows asleep or waking; others are awake.
    pub fn states(&self) -> BTreeMap<TenantId, (SleepState, Depth)> {
        let inner = self.inner.lock().expect("sleeper lock");
        inner
            .marks
            .iter()
            .map(|(id, (m, _))| {
                let s = match m {
                    Mark::Asleep(_) => SleepState::Asleep,
                    Mark::Waking(_) => SleepState::Waking,
                };
                (id.clone(), (s, m.depth()))
            })
            .collect()
    }

    /// Runs `f` on the counters.
    pub fn with_stats<R>(&self, f: impl FnOnce(&SleepStats) -> R) -> R {
        f(&self.inner.lock().expect("sleeper lock").stats)
    }

    fn lock_for(&self, id: &TenantId) -> Arc<tokio::sync::Mutex<()>> {
        let mut inner = self.inner.lock().expect("sleeper lock");
        Arc::clone(inner.locks.entry(id.clone()).or_default())
    }

    fn mark(&self, id: &TenantId) -> Option<Mark> {
        let inner = self.inner.lock().expect("sleeper lock");
        inner.marks.get(id).map(|(m, _)| *m)
    }

    /// Sets (or clears) a tenant's mark in memory and in the map file.
    fn set_mark(&self, id: &TenantId, mark: Option<Mark>) {
        let entries = {
            let mut inner = self.inner.lock().expect("sleeper lock");
            match mark {
                Some(m) => {
                    let since = match inner.marks.get(id) {
                        // A wake that failed keeps the sleep's age.
                        Some((Mark::Waking(_), since)) if matches!(m, Mark::Asleep(_)) => *since,
                        Some((Mark::Asleep(_), since)) if matches!(m, Mark::Waking(_)) => *since,
                        _ => Instant::now(),
                    };
                    inner.marks.insert(id.clone(), (m, since));
                    inner.awake_since.remove(id);
                }
                None => {
                    inner.marks.remove(id);
                    inner.awake_since.insert(id.clone(), Instant::now());
                }
            }
            file_entries(&inner.marks)
        };
        let _file = self.file.lock().expect("asleep map file lock");
        if let Err(e) = maps::write_file(&self.agent.paths.asleep_map, &entries) {
            warn!(
                tenant = %id,
                "cannot write {}: {e}; a HAProxy restarted now would not know who sleeps",
                self.agent.paths.asleep_map.display()
            );
        }
    }

    /// Makes the running HAProxy's asleep map hold exactly the sleeping and waking tenants.
    pub async fn push_map(&self) -> Result<(), RuntimeError> {
        let _map = self.runtime_map.lock().await;
        let want = {
            let inner = self.inner.lock().expect("sleeper lock");
            file_entries(&inner.marks)
        };
        let api = runtime_api(&self.agent);
        maps::sync(&api, &self.agent.paths.asleep_map, &want).await?;
        Ok(())
    }

    /// Wakes `id` (or waits for the wake in progress) until its server accepts logins or
    /// `[sleep] wake_timeout` passes.
    pub async fn wake(&self, id: &TenantId) -> Result<WakeTimes, WakeError> {
        let t0 = Instant::now();
        if self.mark(id).is_none() {
            return Ok(WakeTimes::default());
        }
        let lock = self.lock_for(id);
        let deadline = Duration::from_secs(self.agent.settings.sleep.wake_timeout_secs());
        let guard = match tokio::time::timeout(deadline, lock.lock()).await {
            Ok(g) => g,
            Err(_) => {
                let e = WakeError::Timeout(deadline);
                self.count_failure(id, &e);
                return Err(e);
            }
        };
        let queued = t0.elapsed();
        let Some(mark) = self.mark(id) else {
            // Another client's wake did it while this one queued.
            return Ok(WakeTimes {
                queued_ms: ms(queued),
                total_ms: ms(t0.elapsed()),
                ..WakeTimes::default()
            });
        };
        let result = self.wake_locked(id, mark.depth(), t0 + deadline).await;
        drop(guard);
        match result {
            Ok(mut times) => {
                times.queued_ms = ms(queued);
                times.total_ms = ms(t0.elapsed());
                let mut inner = self.inner.lock().expect("sleeper lock");
                inner.stats.wakes += 1;
                inner.stats.wake_seconds.observe(t0.elapsed().as_secs_f64());
                drop(inner);
                info!(
                    tenant = %id,
                    depth = ?mark.depth(),
                    queued_ms = times.queued_ms,
                    start_ms = times.start_ms,
                    ready_ms = times.ready_ms,
                    total_ms = times.total_ms,
                    "woke"
                );
                Ok(times)
            }
            Err(e) => {
                warn!(tenant = %id, reason = e.reason(), "wake failed: {e}");
                self.count_failure(id, &e);
                Err(e)
            }
        }
    }

    fn count_failure(&self, id: &TenantId, e: &WakeError) {
        let mut inner = self.inner.lock().expect("sleeper lock");
        *inner
            .stats
            .wake_failures
            .entry((id.to_string(), e.reason()))
            .or_default() += 1;
    }

    async fn wake_locked(
        &self,
        id: &TenantId,
        depth: Depth,
        deadline: Instant,
    ) -> Result<WakeTimes, WakeError> {
        // A disabled or stopped tenant never wakes (HAProxy refuses its clients before this).
        let tenants = tenants::load(&self.agent.paths.tenants_file)
            .map_err(|e| WakeError::NotAllowed(format!("cannot read the tenants file: {e}")))?;
        match tenants.get(id) {
            Some(t) if t.stopped => {
                return Err(WakeError::NotAllowed(format!(
                    "{id} is stopped (`tenant start` first)"
                )))
            }
            Some(t) if t.access != Access::Enabled => {
                return Err(WakeError::NotAllowed(format!(
                    "{id} is disabled (`access enable` first)"
                )))
            }
            Some(t) if matches!(t.instance, Instance::Managed(_)) => {}
            _ => {
                return Err(WakeError::NotAllowed(format!(
                    "{id} is not a managed tenant"
                )))
            }
        }
        self.set_mark(id, Some(Mark::Waking(depth)));
        // A failed wake leaves the tenant asleep; once its container was started it sleeps
        // light (the idle pass stops a server that came up late, and deepens it as usual).
        let container_up = std::sync::atomic::AtomicBool::new(depth == Depth::Light);
        let fail = |e: WakeError| {
            let now = if container_up.load(std::sync::atomic::Ordering::Relaxed) {
                Depth::Light
            } else {
                depth
            };
            self.set_mark(id, Some(Mark::Asleep(now)));
            e
        };
        let t_start = Instant::now();
        let state = self
            .docker
            .container_state(id)
            .await
            .map_err(|e| fail(WakeError::StartFailed(e.to_string())))?;
        let deep = match state {
            Some(RunState::Running) => {
                self.docker
                    .signal_server(id, "SIGUSR1")
                    .await
                    .map_err(|e| fail(WakeError::StartFailed(e.to_string())))?;
                false
            }
            Some(_) => {
                self.docker
                    .start_existing(id)
                    .await
                    .map_err(|e| fail(WakeError::StartFailed(e.to_string())))?;
                container_up.store(true, std::sync::atomic::Ordering::Relaxed);
                true
            }
            None => {
                return Err(fail(WakeError::StartFailed(format!(
                    "{id} has no container (`sync` creates it)"
                ))))
            }
        };
        let start = t_start.elapsed();
        let t_ready = Instant::now();
        let login = self
            .docker
            .admin_login(id)
            .map_err(|e| fail(WakeError::StartFailed(e.to_string())))?;
        let socket = login.socket.clone();
        let mut resignalled = deep;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(fail(WakeError::Timeout(
                    deadline.saturating_duration_since(t_ready - start),
                )));
            }
            if socket.exists() {
                match tokio::time::timeout(left, pgsql::login(&login)).await {
                    Ok(Ok(())) => break,
                    Ok(Err(e @ pgsql::ConnectError::Refused(_))) => {
                        return Err(fail(WakeError::StartFailed(format!(
                            "PostgreSQL refused the tenant's login: {e}"
                        ))))
                    }
                    Ok(Err(pgsql::ConnectError::NotYet(_))) | Err(_) => {}
                }
            } else if !resignalled && t_ready.elapsed() >= RESIGNAL_AFTER {
                resignalled = true;
                let _ = self.docker.signal_server(id, "SIGUSR1").await;
            }
            tokio::time::sleep(POLL.min(left)).await;
        }
        let ready = t_ready.elapsed();
        // Open the gate: clients connecting from now on go straight to the server.
        let api = runtime_api(&self.agent);
        let _map = self.runtime_map.lock().await;
        if let Err(e) = api.del_map(&self.agent.paths.asleep_map, id.as_str()).await {
            if !e.is_unreachable() {
                warn!(tenant = %id, "cannot clear the tenant in HAProxy's asleep map: {e}");
            }
        }
        self.set_mark(id, None);
        Ok(WakeTimes {
            start_ms: ms(start),
            ready_ms: ms(ready),
            started: true,
            depth: Some(if deep { Depth::Deep } else { Depth::Light }),
            ..WakeTimes::default()
        })
    }

    /// Puts `id` to sleep now (light), unless a client session is open.
    pub async fn sleep(&self, id: &TenantId) -> Result<Depth, SleepError> {
        let lock = self.lock_for(id);
        let _guard = lock.lock().await;
        if let Some(m) = self.mark(id) {
            return Ok(m.depth());
        }
        let tenants = tenants::load(&self.agent.paths.tenants_file)
            .map_err(|e| SleepError::Failed(format!("cannot read the tenants file: {e}")))?;
        match tenants.get(id) {
            Some(t) if t.stopped => return Err(SleepError::NotAllowed(format!("{id} is stopped"))),
            Some(t) if matches!(t.instance, Instance::Managed(_)) => {}
            _ => {
                return Err(SleepError::NotAllowed(format!(
                    "{id} is not a managed tenant"
                )))
            }
        }
        match self.docker.container_state(id).await {
            Ok(Some(RunState::Running)) => {}
            Ok(_) => return Err(SleepError::Failed(format!("{id}'s server is not running"))),
            Err(e) => return Err(SleepError::Failed(e.to_string())),
        }
        let login = self
            .docker
            .admin_login(id)
            .map_err(|e| SleepError::Failed(e.to_string()))?;
        let session = pgsql::connect(&login)
            .await
            .map_err(|e| SleepError::Failed(format!("cannot log in to check its sessions: {e}")))?;
        // A busy tenant is left alone before any work (checked again once the gate is shut).
        let api = runtime_api(&self.agent);
        let busy_in_haproxy =
            matches!(backend_sessions(&api, &id.backend_name()).await, Ok(n) if n > 0);
        if busy_in_haproxy || matches!(session.other_sessions().await, Ok(n) if n > 0) {
            return Err(SleepError::Busy);
        }
        // Backups' rule: the repository gets the last WAL before the server stops. Done while
        // still awake; a client arriving meanwhile calls the sleep off below.
        match session.archive_current_wal(ARCHIVE_TIMEOUT).await {
            Ok(Some(segment)) => info!(tenant = %id, "archived through {segment} before sleeping"),
            Ok(None) => {}
            Err(e) => {
                return Err(SleepError::Failed(format!(
                    "the last WAL was not archived, so it stays awake: {e}"
                )))
            }
        }
        let map = self.runtime_map.lock().await;
        // The gate first: from here on every new client waits for a wake (which waits for
        // this sleep to finish, then starts the server again).
        let haproxy = match api
            .add_map(
                &self.agent.paths.asleep_map,
                id.as_str(),
                Mark::Asleep(Depth::Light).value(),
            )
            .await
        {
            Ok(()) => true,
            Err(e) if e.is_unreachable() => false,
            Err(e) => {
                return Err(SleepError::Failed(format!(
                    "cannot mark it asleep in HAProxy: {e}"
                )))
            }
        };
        self.set_mark(id, Some(Mark::Asleep(Depth::Light)));
        drop(map);
        let call_off = |why: SleepError| async move {
            let _map = self.runtime_map.lock().await;
            if haproxy {
                let api = runtime_api(&self.agent);
                let _ = api.del_map(&self.agent.paths.asleep_map, id.as_str()).await;
            }
            self.set_mark(id, None);
            why
        };
        // Then the count: a client routed before the gate closed is in HAProxy's count (or,
        // through an old worker after a reload, in the server's own).
        if haproxy {
            match backend_sessions(&api, &id.backend_name()).await {
                Ok(0) => {}
                Ok(_) => return Err(call_off(SleepError::Busy).await),
                Err(e) => {
                    return Err(call_off(SleepError::Failed(format!(
                        "cannot read HAProxy's session count: {e}"
                    )))
                    .await)
                }
            }
        }
        match session.other_sessions().await {
            Ok(0) => {}
            Ok(_) => return Err(call_off(SleepError::Busy).await),
            Err(e) => {
                return Err(call_off(SleepError::Failed(format!(
                    "cannot count the server's sessions: {e}"
                )))
                .await)
            }
        }
        drop(session);
        if let Err(e) = self.stop_server(id, &login.socket).await {
            // It may still run: a client wakes it (a no-op start) and is served.
            warn!(tenant = %id, "{e}");
        }
        let mut inner = self.inner.lock().expect("sleeper lock");
        inner.stats.sleeps += 1;
        info!(tenant = %id, "asleep");
        Ok(Depth::Light)
    }

    async fn stop_server(&self, id: &TenantId, socket: &std::path::Path) -> Result<(), String> {
        let t0 = Instant::now();
        self.docker
            .signal_server(id, "SIGUSR2")
            .await
            .map_err(|e| e.to_string())?;
        let mut resignalled = false;
        while socket.exists() {
            if t0.elapsed() >= STOP_TIMEOUT {
                return Err(format!("its server did not stop within {STOP_TIMEOUT:?}"));
            }
            if !resignalled && t0.elapsed() >= RESIGNAL_AFTER * 2 {
                resignalled = true;
                let _ = self.docker.signal_server(id, "SIGUSR2").await;
            }
            tokio::time::sleep(POLL * 2).await;
        }
        Ok(())
    }

    /// Stops the container of a light sleeper.
    async fn deepen(&self, id: &TenantId) -> Result<(), String> {
        let lock = self.lock_for(id);
        let _guard = lock.lock().await;
        if self.mark(id) != Some(Mark::Asleep(Depth::Light)) {
            return Ok(());
        }
        // Marked first: the reconciler must not start a container it sees stopped.
        let map = self.runtime_map.lock().await;
        self.set_mark(id, Some(Mark::Asleep(Depth::Deep)));
        let api = runtime_api(&self.agent);
        let _ = api
            .set_map(
                &self.agent.paths.asleep_map,
                id.as_str(),
                Mark::Asleep(Depth::Deep).value(),
            )
            .await;
        drop(map);
        self.docker
            .stop_existing(id)
            .await
            .map_err(|e| e.to_string())?;
        info!(tenant = %id, "deep asleep (container stopped)");
        Ok(())
    }

    /// Forgets the sleep of tenants that no longer sleep by pgs's rules: gone from the tenants
    /// file, external, or stopped (`tenant start` then starts them like any other).
    fn forget_unmanaged(&self, tenants: &tenants::Tenants) -> Vec<TenantId> {
        let gone: Vec<TenantId> = {
            let inner = self.inner.lock().expect("sleeper lock");
            inner
                .marks
                .keys()
                .filter(|id| {
                    !tenants
                        .get(id)
                        .is_some_and(|t| matches!(t.instance, Instance::Managed(_)) && !t.stopped)
                })
                .cloned()
                .collect()
        };
        for id in &gone {
            self.set_mark(id, None);
        }
        gone
    }

    /// One idle pass: finds idle tenants and puts them to sleep, deepens long sleepers, and
    /// keeps HAProxy's asleep map equal to the sleeper's.
    pub async fn idle_pass(&self) {
        let tenants = match tenants::load(&self.agent.paths.tenants_file) {
            Ok(t) => t,
            Err(e) => {
                warn!("idle pass skipped: {e}");
                return;
            }
        };
        for id in self.forget_unmanaged(&tenants) {
            info!(tenant = %id, "no longer sleeps (stopped, external or gone)");
        }
        let api = runtime_api(&self.agent);
        if let Err(e) = self.push_map().await {
            // Not running, or running a config without managed tenants (no map to hold).
            let quiet = e.is_unreachable() || e.reply_error() == Some(ReplyError::UnknownMap);
            if !quiet {
                warn!("cannot bring HAProxy's asleep map up to date: {e}");
            }
            return;
        }
        let rows = match api.show_stat_backends().await {
            Ok(r) => r,
            Err(e) => {
                warn!("idle pass: cannot read HAProxy's counters: {e}");
                return;
            }
        };
        // A worker started by a reload counts sessions from its own start: before that, the
        // tenant may have had one a moment ago.
        let uptime = api.show_info().await.ok().map(|i| i.uptime_sec);
        let sessions: BTreeMap<String, idle::Sessions> = rows
            .iter()
            .filter(|r| r.svname() == "BACKEND")
            .map(|r| {
                (
                    r.pxname().to_owned(),
                    idle::Sessions {
                        current: r.scur().unwrap_or(0),
                        last_secs: r
                            .get("lastsess")
                            .and_then(|v| v.parse::<i64>().ok())
                            .and_then(|v| u64::try_from(v).ok())
                            .or(uptime),
                    },
                )
            })
            .collect();
        let (awake, light) = {
            let mut inner = self.inner.lock().expect("sleeper lock");
            let now = Instant::now();
            for t in tenants.iter() {
                if !inner.marks.contains_key(&t.id) {
                    inner.awake_since.entry(t.id.clone()).or_insert(now);
                }
            }
            let awake: BTreeMap<TenantId, u64> = inner
                .awake_since
                .iter()
                .filter(|(id, _)| !inner.marks.contains_key(*id))
                .map(|(id, since)| (id.clone(), since.elapsed().as_secs()))
                .collect();
            let light: BTreeMap<TenantId, u64> = inner
                .marks
                .iter()
                .filter(|(_, (m, _))| *m == Mark::Asleep(Depth::Light))
                .map(|(id, (_, since))| (id.clone(), since.elapsed().as_secs()))
                .collect();
            (awake, light)
        };
        let z = &self.agent.settings.sleep;
        let sleepy = idle::to_sleep(&tenants, z.idle_timeout_secs(), &sessions, &awake);
        use futures_util::StreamExt;
        futures_util::stream::iter(sleepy)
            .for_each_concurrent(PARALLEL_SLEEPS, |id| async move {
                match self.sleep(&id).await {
                    Ok(_) | Err(SleepError::Busy) => {}
                    Err(e) => warn!(tenant = %id, "idle, but not put to sleep: {e}"),
                }
            })
            .await;
        // A light sleeper whose server runs anyway (a wake that timed out and finished late, a
        // restarted container) has no client: every client of a marked tenant goes through a
        // wake, which clears the mark. Stop it again, unless a transition is under way.
        let restless: Vec<TenantId> = light
            .keys()
            .filter(|id| self.docker.socket_path(id).exists())
            .cloned()
            .collect();
        futures_util::stream::iter(restless)
            .for_each_concurrent(PARALLEL_SLEEPS, |id| async move {
                let lock = self.lock_for(&id);
                let Ok(_guard) = lock.try_lock() else {
                    return;
                };
                if self.mark(&id) != Some(Mark::Asleep(Depth::Light)) {
                    return;
                }
                info!(tenant = %id, "asleep, but its server runs: stopping it again");
                if let Err(e) = self.stop_server(&id, &self.docker.socket_path(&id)).await {
                    warn!(tenant = %id, "{e}");
                }
            })
            .await;
        let deeper = idle::to_deepen(&light, z.deep_after_secs(), z.max_light as usize);
        futures_util::stream::iter(deeper)
            .for_each_concurrent(PARALLEL_SLEEPS, |id| async move {
                if let Err(e) = self.deepen(&id).await {
                    warn!(tenant = %id, "cannot stop the sleeping tenant's container: {e}");
                }
            })
            .await;
    }

    /// Runs idle passes every `[sleep] check_every` until the task is dropped.
    pub async fn run_idle_passes(self: Arc<Self>) {
        let every = Duration::from_secs(self.agent.settings.sleep.check_every_secs());
        loop {
            tokio::time::sleep(every).await;
            self.idle_pass().await;
        }
    }
}

fn file_entries(marks: &BTreeMap<TenantId, (Mark, Instant)>) -> maps::Entries {
    marks
        .iter()
        .map(|(id, (m, _))| (id.to_string(), m.value().to_owned()))
        .collect()
}

/// HAProxy's open sessions of one backend (`scur`), held wakes included.
async fn backend_sessions(
    api: &crate::haproxy::runtime::RuntimeApi,
    backend: &str,
) -> Result<u64, RuntimeError> {
    let rows = api.show_stat_of(backend).await?;
    Ok(rows
        .iter()
        .find(|r| r.pxname() == backend && r.svname() == "BACKEND")
        .and_then(|r| r.scur())
        .unwrap_or(0))
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
