//! Tenant operations the CLI and the HTTP API share: adding and removing a tenant in the
//! tenants file (under its lock, through `TenantsFileEdit`) and the user-facing view of a
//! tenant (spec and observed state, never a secret). Running a reconcile pass afterwards is
//! the caller's business: the CLI runs one itself, the API pokes the daemon.

use std::path::Path;

use serde::Serialize;
use serde_json::Value;

use crate::access;
use crate::instances::docker::DockerDriver;
use crate::instances::{InstanceDriver, ObservedInstance};
use crate::settings::Agent;
use crate::tenants::{self, Access, CommitError, Instance, LoadError, Tenant, TenantId};
use crate::tenants::{Tenants, TenantsFileEdit};

#[derive(Debug, thiserror::Error)]
pub enum EditError {
    #[error("tenant \"{0}\" already exists")]
    Exists(TenantId),
    #[error("the tenants file has no \"tenants\" object")]
    NoTenantsObject,
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Commit(#[from] CommitError),
}

/// Adds `id` with the raw JSON `entry` (the file's own shape) to the tenants file, unless a
/// tenant of that id exists. The file is validated before it is replaced. Blocking (flock).
pub fn add(tenants_file: &Path, id: &TenantId, entry: Value) -> Result<Tenants, EditError> {
    let mut edit = TenantsFileEdit::open(tenants_file)?;
    let all = edit.tenants_mut().ok_or(EditError::NoTenantsObject)?;
    if all.contains_key(id.as_str()) {
        return Err(EditError::Exists(id.clone()));
    }
    all.insert(id.to_string(), entry);
    Ok(edit.commit()?)
}

/// Removes `id` from the tenants file; returns the tenant as it was, `None` when it was not
/// there (the file is then left untouched). Blocking (flock).
pub fn remove(tenants_file: &Path, id: &TenantId) -> Result<Option<Tenant>, EditError> {
    let mut edit = TenantsFileEdit::open(tenants_file)?;
    let was = edit.tenants()?.get(id).cloned();
    if was.is_some() {
        edit.tenants_mut().map(|t| t.remove(id.as_str()));
        edit.commit()?;
    }
    Ok(was)
}

/// One tenant as `tenant list|show` and `GET /v1/tenants` report it. No secrets.
#[derive(Debug, Clone, Serialize)]
pub struct View {
    pub id: TenantId,
    /// `managed` or `external`.
    pub kind: &'static str,
    /// Access as the tenants file says.
    pub access: Access,
    pub stopped: bool,
    /// The address HAProxy dials.
    pub address: Option<String>,
    pub spec: Option<tenants::ManagedSpec>,
    /// Container and volume as Docker reports them (managed tenants).
    pub server: Option<ObservedInstance>,
    /// Access in the running HAProxy (None when it is not running).
    pub haproxy_access: Option<Access>,
    /// `awake`, `waking` or `asleep` (managed tenants).
    pub sleep: Option<crate::sleep::SleepState>,
    /// How an asleep tenant sleeps: `light` (server stopped) or `deep` (container stopped too).
    pub sleep_depth: Option<crate::sleep::Depth>,
}

/// Every tenant of the file with what Docker (when `docker` is given and answers) and the
/// running HAProxy say about it.
pub async fn views(agent: &Agent, docker: Option<&DockerDriver>) -> anyhow::Result<Vec<View>> {
    let tenants = tenants::load(&agent.paths.tenants_file)?;
    let observed = match docker {
        Some(d) => d.observe().await.ok(),
        None => None,
    };
    let status = access::status(agent, None).await?;
    let sleeping = crate::sleep::states_on_file(agent);
    Ok(tenants
        .iter()
        .map(|t: &Tenant| View {
            id: t.id.clone(),
            kind: match t.instance {
                Instance::External { .. } => "external",
                Instance::Managed(_) => "managed",
            },
            access: t.access,
            stopped: t.stopped,
            address: crate::haproxy::render::server_address(t, &agent.paths),
            spec: match &t.instance {
                Instance::Managed(s) => Some(s.clone()),
                Instance::External { .. } => None,
            },
            server: observed
                .as_ref()
                .and_then(|o| o.iter().find(|i| i.tenant == t.id).cloned()),
            haproxy_access: status
                .tenants
                .iter()
                .find(|s| s.tenant == t.id)
                .and_then(|s| s.runtime),
            sleep: matches!(t.instance, Instance::Managed(_)).then(|| {
                sleeping
                    .get(&t.id)
                    .map_or(crate::sleep::SleepState::Awake, |s| s.0)
            }),
            sleep_depth: sleeping
                .get(&t.id)
                .filter(|s| s.0 == crate::sleep::SleepState::Asleep)
                .map(|s| s.1),
        })
        .collect())
}

/// The server's state in one word: `running`, `stopped`, `unhealthy`, `no container`,
/// `absent`, or `-` for external tenants.
/// The server column of `tenant list|show`; `docker_known` is false when the engine did not
/// answer, so a managed server's state is unknown rather than absent.
pub fn server_state(v: &View, docker_known: bool) -> String {
    match (&v.server, v.kind) {
        (_, "external") => "-".into(),
        (None, _) if !docker_known => "unknown".into(),
        (Some(ObservedInstance { state: Some(s), .. }), _) => serde_json::to_value(s)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default(),
        (
            Some(ObservedInstance {
                volume: Some(_), ..
            }),
            _,
        ) => "no container".into(),
        _ => "absent".into(),
    }
}
