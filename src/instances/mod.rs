//! Instance drivers: what runs a managed tenant's PostgreSQL server. The trait is kept to what
//! the reconciler needs, so another driver (e.g. Kubernetes with CloudNativePG) is a new module,
//! not a rewrite. Drivers never decide *whether* something should exist; the planner does.

pub mod docker;

use std::future::Future;
use std::time::Duration;

use serde::Serialize;

use crate::tenants::{ManagedSpec, TenantId};

/// The state of one tenant's server as the driver sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RunState {
    Running,
    /// Created or exited: exists but does not serve.
    Stopped,
    /// Restarting, paused, dead or anything else the engine reports.
    Unhealthy,
}

/// One instance this installation owns, found by its ownership labels.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ObservedInstance {
    pub tenant: TenantId,
    /// Container name, or `None` when only the data volume is left.
    pub container: Option<String>,
    pub state: Option<RunState>,
    /// The spec the container was created from (as recorded on it); a different desired spec
    /// means the container must be replaced (the data volume is kept).
    pub spec: Option<ManagedSpec>,
    /// Data volume name, when it exists.
    pub volume: Option<String>,
}

/// What `remove` took away.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Removed {
    pub container: Option<String>,
    /// The volume that was removed (purge) — or kept, with its name, so the user can find it.
    pub volume: Option<String>,
    pub volume_purged: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("{0}")]
    Unavailable(String),
    #[error("tenant {tenant}: image {image} is not present on the Docker engine: build it with `docker/build-image.sh` (no registry is needed), or set another image")]
    ImageMissing { tenant: TenantId, image: String },
    #[error("tenant {tenant}: PostgreSQL did not accept logins within {timeout:?}; see `docker logs {container}`")]
    NotReady {
        tenant: TenantId,
        container: String,
        timeout: Duration,
    },
    #[error("tenant {tenant}: {message}")]
    Failed { tenant: TenantId, message: String },
}

/// Runs managed tenants' servers.
pub trait InstanceDriver: Send + Sync {
    /// Every instance of this installation, including stopped ones and orphans.
    fn observe(&self) -> impl Future<Output = Result<Vec<ObservedInstance>, DriverError>> + Send;

    /// Makes the tenant's server exist and run with `spec`: creates the volume and container if
    /// missing, replaces a container whose spec differs (keeping the volume), starts it.
    /// Returns once started; `wait_ready` says when it serves.
    fn ensure(
        &self,
        tenant: &TenantId,
        spec: &ManagedSpec,
    ) -> impl Future<Output = Result<(), DriverError>> + Send;

    /// Waits until the tenant's server accepts logins.
    fn wait_ready(
        &self,
        tenant: &TenantId,
        timeout: Duration,
    ) -> impl Future<Output = Result<(), DriverError>> + Send;

    fn start(&self, tenant: &TenantId) -> impl Future<Output = Result<(), DriverError>> + Send;

    fn stop(&self, tenant: &TenantId) -> impl Future<Output = Result<(), DriverError>> + Send;

    /// How the agent logs in to the tenant's running server as the tenant's own superuser
    /// (roles, password rotation).
    fn admin_login(&self, tenant: &TenantId) -> Result<crate::pgsql::Login, DriverError>;

    /// Removes the container; removes the data volume only when `purge_data` is set.
    fn remove(
        &self,
        tenant: &TenantId,
        purge_data: bool,
    ) -> impl Future<Output = Result<Removed, DriverError>> + Send;
}
