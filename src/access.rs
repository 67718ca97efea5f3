//! Access flips: a tenant's `access` changed in the tenants file (locked, atomic), then in the
//! access map file, then in the running HAProxy through the Runtime API — no reload, effective
//! for the next connection. Also the file-vs-runtime status report.

use anyhow::{anyhow, Context};
use serde::Serialize;
use serde_json::Value;

use crate::fsutil::FileLock;
use crate::haproxy::maps::{self, Entries};
use crate::haproxy::render;
use crate::haproxy::runtime::{RuntimeApi, RuntimeError};
use crate::settings::Agent;
use crate::tenants::{self, Access, TenantId, Tenants, TenantsFileEdit};

/// The Runtime API client for this agent's HAProxy.
pub fn runtime_api(agent: &Agent) -> RuntimeApi {
    RuntimeApi::new(agent.paths.admin_socket.clone())
}

/// What happened in the running HAProxy.
#[derive(Debug, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum RuntimePush {
    /// The running HAProxy now agrees with the file; `changes` map commands were sent.
    Applied { changes: usize },
    /// HAProxy is not running: it reads the map file when it starts.
    NotRunning { reason: String },
}

#[derive(Debug, Serialize)]
pub struct Flip {
    pub tenant: TenantId,
    pub access: Access,
    /// Whether the tenants file changed (false when it already said so).
    pub file_changed: bool,
    pub runtime: RuntimePush,
    /// Sessions ended with `--terminate` (None when not asked).
    pub terminated: Option<bool>,
    /// The tenant's server is kept stopped (`tenant stop`): not routed whatever its access.
    pub stopped: bool,
}

/// Sets `id`'s access in the tenants file and pushes the access map to HAProxy.
pub async fn set(
    agent: &Agent,
    id: &TenantId,
    access: Access,
    terminate: bool,
) -> anyhow::Result<Flip> {
    let file_changed = {
        let mut edit = TenantsFileEdit::open(&agent.paths.tenants_file)?;
        let entry = edit.tenant_mut(id).ok_or_else(|| {
            anyhow!(
                "no tenant \"{id}\" in {}; `pgs-agent tenant list` shows the tenants",
                agent.paths.tenants_file.display()
            )
        })?;
        let current = entry
            .get("access")
            .and_then(Value::as_str)
            .and_then(Access::parse);
        if current.unwrap_or_default() == access && current.is_some() {
            false
        } else {
            entry.insert("access".into(), Value::String(access.to_string()));
            edit.commit()?;
            true
        }
    };
    let (tenants, runtime) = push_access(agent).await?;
    let stopped = tenants.get(id).is_some_and(|t| t.stopped);
    let terminated = if terminate && access == Access::Disabled {
        Some(terminate_sessions(agent, id).await?)
    } else {
        None
    };
    Ok(Flip {
        tenant: id.clone(),
        access,
        file_changed,
        runtime,
        terminated,
        stopped,
    })
}

/// Writes the access map file from the tenants file as it is now, then makes the running
/// HAProxy agree; returns the tenants it pushed. Serialized by the maps lock, and reading the
/// file under it, so concurrent flips end in the file's final state whatever order they push in.
pub async fn push_access(agent: &Agent) -> anyhow::Result<(Tenants, RuntimePush)> {
    let _lock = FileLock::exclusive(&agent.paths.maps_lock)
        .with_context(|| format!("cannot lock {}", agent.paths.maps_lock.display()))?;
    let tenants = tenants::load(&agent.paths.tenants_file)?;
    let want = desired_access(&tenants);
    maps::write_file(&agent.paths.access_map, &want)
        .with_context(|| format!("cannot write {}", agent.paths.access_map.display()))?;
    let api = runtime_api(agent);
    let push = match maps::sync(&api, &agent.paths.access_map, &want).await {
        Ok(steps) => RuntimePush::Applied {
            changes: steps.len(),
        },
        Err(e) if e.is_unreachable() => RuntimePush::NotRunning {
            reason: e.to_string(),
        },
        Err(e) => {
            return Err(e).context(
                "the tenants file and map file are updated, but HAProxy refused the change",
            )
        }
    };
    Ok((tenants, push))
}

fn desired_access(tenants: &Tenants) -> Entries {
    maps::entries(render::access_entries(tenants))
}

/// Ends every established session of the tenant (`shutdown sessions server`).
async fn terminate_sessions(agent: &Agent, id: &TenantId) -> anyhow::Result<bool> {
    let api = runtime_api(agent);
    match api
        .execute(&maps::shutdown_sessions(&id.backend_name(), id.as_str()))
        .await
    {
        Ok(_) => Ok(true),
        Err(e) if e.is_unreachable() => Ok(false),
        Err(e) => Err(e).context("access is off, but ending the open sessions failed"),
    }
}

/// One tenant's access as the file, the map file and the running HAProxy say.
#[derive(Debug, Serialize)]
pub struct AccessStatus {
    pub tenant: TenantId,
    pub file: Access,
    /// The server is kept stopped (`tenant stop`), so the maps leave it out whatever `file` says.
    pub stopped: bool,
    pub map_file: Access,
    /// None when HAProxy is not running.
    pub runtime: Option<Access>,
    /// The map file and HAProxy say what the file asks for: enabled only when access is
    /// enabled and the server is not stopped.
    pub agree: bool,
}

#[derive(Debug, Serialize)]
pub struct StatusReport {
    pub haproxy_running: bool,
    /// Why HAProxy could not be asked, when it could not.
    pub haproxy_error: Option<String>,
    pub tenants: Vec<AccessStatus>,
    /// Entries in HAProxy's access map for tenants not in the file (drift to repair).
    pub unexpected_runtime_entries: Vec<String>,
}

pub async fn status(agent: &Agent, only: Option<&TenantId>) -> anyhow::Result<StatusReport> {
    let tenants = tenants::load(&agent.paths.tenants_file)?;
    if let Some(id) = only {
        if tenants.get(id).is_none() {
            return Err(anyhow!(
                "no tenant \"{id}\" in {}",
                agent.paths.tenants_file.display()
            ));
        }
    }
    let map_file = maps::read_file(&agent.paths.access_map);
    let api = runtime_api(agent);
    let (runtime, haproxy_error): (Option<Entries>, Option<RuntimeError>) =
        match maps::show(&api, &agent.paths.access_map).await {
            Ok(m) => (Some(m), None),
            Err(e) => (None, Some(e)),
        };
    let state = |m: &Entries, id: &TenantId| match m.get(id.as_str()).map(String::as_str) {
        Some("enabled") => Access::Enabled,
        _ => Access::Disabled,
    };
    // What `push_access` would write: a stopped tenant is left out whatever its access says.
    let want = desired_access(&tenants);
    let mut out = Vec::new();
    for t in tenants.iter().filter(|t| only.is_none_or(|o| *o == t.id)) {
        let mf = state(&map_file, &t.id);
        let rt = runtime.as_ref().map(|m| state(m, &t.id));
        let expected = state(&want, &t.id);
        out.push(AccessStatus {
            tenant: t.id.clone(),
            file: t.access,
            stopped: t.stopped,
            map_file: mf,
            runtime: rt,
            agree: mf == expected && rt.is_none_or(|r| r == expected),
        });
    }
    let unexpected = runtime
        .as_ref()
        .map(|m| {
            m.keys()
                .filter(|k| TenantId::parse(k).map_or(true, |id| tenants.get(&id).is_none()))
                .filter(|_| only.is_none())
                .cloned()
                .collect()
        })
        .unwrap_or_default();
    Ok(StatusReport {
        haproxy_running: runtime.is_some(),
        haproxy_error: haproxy_error.map(|e| e.to_string()),
        tenants: out,
        unexpected_runtime_entries: unexpected,
    })
}
