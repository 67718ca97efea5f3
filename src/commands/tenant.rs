//! `tenant create|delete|start|stop|list|show|credentials`: edit the tenants file, then run
//! the same reconcile pass as `sync`, so the CLI and the daemon can never disagree on order.

use std::process::ExitCode;

use anyhow::{anyhow, bail, Context};
use serde::Serialize;
use serde_json::{json, Map, Value};

use super::sync::{driver, print_report};
use crate::access;
use crate::cli::{CreateArgs, TenantCommand};
use crate::instances::docker::DockerDriver;
use crate::instances::{InstanceDriver, ObservedInstance};
use crate::reconcile::{self, Report, SyncOptions};
use crate::settings::Agent;
use crate::tenants::{self, Access, Instance, Tenant, TenantId, TenantsFileEdit};

pub async fn run(agent: &Agent, cmd: TenantCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        TenantCommand::Create(args) => create(agent, args).await,
        TenantCommand::Delete { id, purge_data } => delete(agent, &id, purge_data).await,
        TenantCommand::Start { id } => set_stopped(agent, &id, false).await,
        TenantCommand::Stop { id } => set_stopped(agent, &id, true).await,
        TenantCommand::List { json } => list(agent, json).await,
        TenantCommand::Show { id, json } => show(agent, &id, json).await,
        TenantCommand::Credentials { id } => credentials(agent, &id).await,
    }
}

async fn require_docker(agent: &Agent) -> anyhow::Result<DockerDriver> {
    DockerDriver::connect(&agent.settings.docker, &agent.paths)
        .await
        .context("managed tenants need the Docker engine")
}

async fn create(agent: &Agent, args: CreateArgs) -> anyhow::Result<ExitCode> {
    let id = args.id;
    let mut managed = Map::new();
    if let Some(image) = &args.image {
        managed.insert("image".into(), json!(image));
    }
    if let Some(memory) = &args.memory {
        tenants::parse_size(memory).map_err(|e| anyhow!("--memory: {e}"))?;
        managed.insert("memory".into(), json!(memory));
    }
    if let Some(cpus) = args.cpus {
        managed.insert("cpus".into(), json!(cpus));
    }
    if let Some(n) = args.max_connections {
        managed.insert("max_connections".into(), json!(n));
    }
    // Check what would make provisioning fail before the tenants file is touched.
    let docker = require_docker(agent).await?;
    let image = args
        .image
        .clone()
        .unwrap_or_else(|| agent.settings.docker.default_image.clone());
    if !docker.has_image(&image).await? {
        bail!(
            "image {image} is not present on the Docker engine; build it with \
             `docker/build-image.sh` (no registry needed) or pass --image"
        );
    }
    {
        let mut edit = TenantsFileEdit::open(&agent.paths.tenants_file)?;
        let all = edit
            .tenants_mut()
            .ok_or_else(|| anyhow!("the tenants file has no \"tenants\" object"))?;
        if all.contains_key(id.as_str()) {
            bail!(
                "tenant \"{id}\" already exists; `pgs-agent tenant show {id}` describes it, \
                 `pgs-agent tenant delete {id}` removes it"
            );
        }
        let access = if args.enable {
            Access::Enabled
        } else {
            Access::Disabled
        };
        all.insert(
            id.to_string(),
            json!({"access": access.as_str(), "managed": Value::Object(managed)}),
        );
        edit.commit()?;
    }
    eprintln!(
        "{id}: added to {}; provisioning",
        agent.paths.tenants_file.display()
    );
    let report = reconcile::sync(agent, Some(&docker), SyncOptions::default()).await?;
    print_report(&report, false);
    if failed_for(&report, &id) {
        eprintln!(
            "{id} is in the tenants file but not serving; fix the problem above and run \
             `pgs-agent sync`, or remove it with `pgs-agent tenant delete {id}`"
        );
        return Ok(ExitCode::FAILURE);
    }
    let access = if args.enable {
        "access enabled"
    } else {
        "access disabled (`pgs-agent access enable ...` opens it)"
    };
    println!("{id}: ready, {access}; `pgs-agent tenant credentials {id}` prints how to connect");
    Ok(ExitCode::SUCCESS)
}

fn failed_for(report: &Report, id: &TenantId) -> bool {
    report.held_back.contains(id) || !report.errors.is_empty()
}

async fn delete(agent: &Agent, id: &TenantId, purge: bool) -> anyhow::Result<ExitCode> {
    let was = {
        let mut edit = TenantsFileEdit::open(&agent.paths.tenants_file)?;
        let was = edit.tenants()?.get(id).cloned();
        if was.is_some() {
            edit.tenants_mut().map(|t| t.remove(id.as_str()));
            edit.commit()?;
        }
        was
    };
    if was.is_none() && !purge {
        bail!(
            "no tenant \"{id}\" in {}",
            agent.paths.tenants_file.display()
        );
    }
    let docker = driver(agent).await?;
    let report = reconcile::sync(agent, docker.as_ref(), SyncOptions::default()).await?;
    print_report(&report, false);
    let managed = was
        .as_ref()
        .is_none_or(|t| matches!(t.instance, Instance::Managed(_)));
    if managed {
        let d = match docker {
            Some(d) => d,
            None => require_docker(agent).await?,
        };
        if purge {
            let removed = d.remove(id, true).await?;
            match removed.volume {
                Some(v) => println!("{id}: data volume {v} deleted"),
                None => println!("{id}: no data volume to delete"),
            }
        } else {
            println!(
                "{id}: data volume {} kept; `pgs-agent tenant delete {id} --purge-data` deletes it, \
                 `pgs-agent tenant create {id}` brings the data back",
                d.volume_name(id)
            );
        }
    }
    println!("{id}: deleted");
    Ok(if report.errors.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

async fn set_stopped(agent: &Agent, id: &TenantId, stopped: bool) -> anyhow::Result<ExitCode> {
    {
        let mut edit = TenantsFileEdit::open(&agent.paths.tenants_file)?;
        let t = edit.tenants()?.get(id).cloned().ok_or_else(|| {
            anyhow!(
                "no tenant \"{id}\" in {}",
                agent.paths.tenants_file.display()
            )
        })?;
        if !matches!(t.instance, Instance::Managed(_)) {
            bail!("{id} is an external tenant: pgs does not run its server");
        }
        let entry = edit.tenant_mut(id).expect("tenant exists");
        if stopped {
            entry.insert("stopped".into(), json!(true));
        } else {
            entry.remove("stopped");
        }
        edit.commit()?;
    }
    let docker = require_docker(agent).await?;
    let report = reconcile::sync(agent, Some(&docker), SyncOptions::default()).await?;
    print_report(&report, false);
    if !report.errors.is_empty() {
        return Ok(ExitCode::FAILURE);
    }
    println!("{id}: {}", if stopped { "stopped" } else { "started" });
    Ok(ExitCode::SUCCESS)
}

/// One tenant as `list` and `show` report it. No secrets.
#[derive(Debug, Serialize)]
struct View {
    id: TenantId,
    kind: &'static str,
    access: Access,
    stopped: bool,
    /// The address HAProxy dials.
    address: Option<String>,
    spec: Option<tenants::ManagedSpec>,
    /// Container and volume as Docker reports them (managed tenants).
    server: Option<ObservedInstance>,
    /// Access in the running HAProxy (None when it is not running).
    haproxy_access: Option<Access>,
}

async fn views(agent: &Agent) -> anyhow::Result<Vec<View>> {
    let tenants = tenants::load(&agent.paths.tenants_file)?;
    let observed = match DockerDriver::connect(&agent.settings.docker, &agent.paths).await {
        Ok(d) => d.observe().await.ok(),
        Err(_) => None,
    };
    let status = access::status(agent, None).await?;
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
        })
        .collect())
}

fn server_state(v: &View) -> String {
    match (&v.server, v.kind) {
        (_, "external") => "-".into(),
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

async fn list(agent: &Agent, json: bool) -> anyhow::Result<ExitCode> {
    let views = views(agent).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&views)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<24} {:<9} {:<9} {:<13} ADDRESS",
        "TENANT", "KIND", "ACCESS", "SERVER"
    );
    for v in &views {
        println!(
            "{:<24} {:<9} {:<9} {:<13} {}",
            v.id.as_str(),
            v.kind,
            v.access.as_str(),
            server_state(v),
            v.address.as_deref().unwrap_or("-")
        );
    }
    if views.is_empty() {
        println!("(no tenants; `pgs-agent tenant create ID` adds one)");
    }
    Ok(ExitCode::SUCCESS)
}

async fn show(agent: &Agent, id: &TenantId, json: bool) -> anyhow::Result<ExitCode> {
    let v = views(agent)
        .await?
        .into_iter()
        .find(|v| v.id == *id)
        .ok_or_else(|| {
            anyhow!(
                "no tenant \"{id}\" in {}",
                agent.paths.tenants_file.display()
            )
        })?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("tenant    {}", v.id);
    println!("kind      {}", v.kind);
    println!(
        "access    {} (HAProxy: {})",
        v.access,
        v.haproxy_access.map_or("not running", |a| a.as_str())
    );
    println!(
        "server    {}{}",
        server_state(&v),
        if v.stopped {
            " (stopped on request)"
        } else {
            ""
        }
    );
    println!("address   {}", v.address.as_deref().unwrap_or("-"));
    if let Some(s) = &v.server {
        println!("container {}", s.container.as_deref().unwrap_or("-"));
        println!("volume    {}", s.volume.as_deref().unwrap_or("-"));
    }
    if let Some(spec) = &v.spec {
        println!("spec      {}", serde_json::to_string(spec)?);
    }
    Ok(ExitCode::SUCCESS)
}

async fn credentials(agent: &Agent, id: &TenantId) -> anyhow::Result<ExitCode> {
    let tenants = tenants::load(&agent.paths.tenants_file)?;
    let t = tenants.get(id).ok_or_else(|| {
        anyhow!(
            "no tenant \"{id}\" in {}",
            agent.paths.tenants_file.display()
        )
    })?;
    if !matches!(t.instance, Instance::Managed(_)) {
        bail!("{id} is an external tenant: pgs does not know its password");
    }
    let path = agent.paths.tenant_password_file(id);
    let password = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "cannot read {} (was the tenant provisioned?)",
            path.display()
        )
    })?;
    let listen = &agent.settings.haproxy.listen;
    let (host, port) = listen.rsplit_once(':').unwrap_or((listen, "5432"));
    let host = match host {
        "" | "*" | "0.0.0.0" | "::" | "[::]" => "127.0.0.1",
        h => h,
    };
    println!(
        "postgresql://{id}:{}@{host}:{port}/{id}",
        percent_encode(password.trim_end())
    );
    Ok(ExitCode::SUCCESS)
}

/// Percent-encodes everything but unreserved URI characters.
fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn percent_encoding_keeps_unreserved_only() {
        assert_eq!(super::percent_encode("a-Z_0.~"), "a-Z_0.~");
        assert_eq!(super::percent_encode("p@ss:/w"), "p%40ss%3A%2Fw");
    }
}
