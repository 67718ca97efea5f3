//! The HTTP API that `run` serves beside the reconcile loop: tenants, access flips, health,
//! readiness and Prometheus metrics, behind a bearer token, JSON in and out. It edits the
//! tenants file only through the CLI's locked writer and then pokes the reconciler; it never
//! writes HAProxy's files or maps itself (access flips go through `access::set`, like the CLI).
//!
//! # Layout
//! - `server`   — listeners (TCP or unix socket), the hyper accept loop, graceful shutdown.
//! - `routes`   — the route table, authentication, the handlers.
//! - `validate` — request bodies → typed requests, every problem with its field.
//! - `body`     — bounded JSON request bodies (413 before reading an oversized one).
//! - `auth`     — the bearer token: loading it, constant-time comparison.
//! - `errors`   — `ApiError`: status, stable `code`, human `message`, as JSON.
//! - `passes`   — pass results the daemon publishes; waiting for a pass after an edit.
//! - `metrics`  — Prometheus metrics: agent counters and per-tenant state read at scrape time.

mod auth;
mod body;
mod errors;
pub mod metrics;
pub mod passes;
pub mod routes;
mod server;
mod validate;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::daemon::Poke;
use crate::instances::docker::DockerDriver;
use crate::reconcile::Report;
use crate::settings::Agent;

pub use auth::Token;
pub use server::Listener;

/// What every handler shares.
pub struct State {
    agent: Agent,
    docker: Option<DockerDriver>,
    /// Sleep and wake of managed tenants (with a Docker engine).
    sleeper: Option<Arc<crate::sleep::Sleeper>>,
    pokes: mpsc::Sender<Poke>,
    passes: passes::PassLog,
    metrics: metrics::AgentMetrics,
    token: Token,
    host: validate::HostLimits,
    /// Turns true when the agent stops: waiting handlers give up with 503.
    stop: watch::Receiver<bool>,
}

/// The running API (or none, when `[api] listen` is empty).
pub struct Api {
    state: Option<Arc<State>>,
    stop: watch::Sender<bool>,
    server: Option<JoinHandle<()>>,
}

/// Loads the token and binds the listener (so a bad address fails `run` before the first pass),
/// then serves in the background.
pub async fn start(
    agent: &Agent,
    docker: Option<DockerDriver>,
    sleeper: Option<Arc<crate::sleep::Sleeper>>,
    pokes: mpsc::Sender<Poke>,
) -> anyhow::Result<Api> {
    let (stop, stop_rx) = watch::channel(false);
    let listen = agent.settings.api.listen.trim();
    if listen.is_empty() {
        tracing::info!("no HTTP API ([api] listen is empty)");
        return Ok(Api {
            state: None,
            stop,
            server: None,
        });
    }
    let token = Token::load(&agent.paths.api_token)?;
    let base = agent
        .paths
        .config
        .parent()
        .unwrap_or(std::path::Path::new("/"));
    let listener = Listener::bind(listen, base).await?;
    let state = Arc::new(State {
        agent: agent.clone(),
        docker,
        sleeper,
        pokes,
        passes: passes::PassLog::new(),
        metrics: metrics::AgentMetrics::default(),
        token,
        host: validate::HostLimits::probe(),
        stop: stop_rx.clone(),
    });
    let server = tokio::spawn(server::serve(listener, Arc::clone(&state), stop_rx));
    Ok(Api {
        state: Some(state),
        stop,
        server: Some(server),
    })
}

/// Resolves once `stop` is true (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

impl Api {
    /// The daemon's `on_pass`: readiness, metrics and waiting handlers see the pass.
    pub fn on_pass(&self, result: &anyhow::Result<Report>) {
        if let Some(s) = &self.state {
            let pass = s.passes.publish(result);
            s.metrics.record_pass(&pass);
        }
    }

    /// Stops accepting, lets requests in flight finish (bounded), and returns.
    pub async fn stop(self) {
        self.stop.send_replace(true);
        if let Some(server) = self.server {
            if tokio::time::timeout(Duration::from_secs(15), server)
                .await
                .is_err()
            {
                tracing::warn!("the HTTP API did not stop in time");
            }
        }
    }
}
