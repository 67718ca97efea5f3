//! `tenant create|delete|start|stop|sleep|wake|list|show|credentials`: edit the tenants file, then run
//! the same reconcile pass as `sync`, so the CLI and the daemon can never disagree on order.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use serde_json::{json, Map, Value};

use super::backups;
use super::sync::{driver, print_report};
use crate::cli::{CreateArgs, CredentialsFormat, TenantCommand};
use crate::fsutil::FileLock;
use crate::instances::docker::DockerDriver;
use crate::instances::InstanceDriver;
use crate::reconcile::{self, Report, SyncOptions};
use crate::roles;
use crate::settings::Agent;
use crate::tenant_ops::{self, server_state, views, EditError};
use crate::tenants::{self, Access, Instance, TenantId, TenantsFileEdit};

pub async fn run(agent: &Agent, cmd: TenantCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        TenantCommand::Create(args) => create(agent, args).await,
        TenantCommand::Delete { id, purge_data } => delete(agent, &id, purge_data).await,
        TenantCommand::Start { id } => set_stopped(agent, &id, false).await,
        TenantCommand::Stop { id } => set_stopped(agent, &id, true).await,
        TenantCommand::List { json } => list(agent, json).await,
        TenantCommand::Show { id, json } => show(agent, &id, json).await,
        TenantCommand::Credentials {
            id,
            format,
            role,
            rotate,
        } => credentials(agent, &id, format, role.as_deref(), rotate).await,
        TenantCommand::Backup { id, full, json } => backups::backup(agent, &id, full, json).await,
        TenantCommand::Backups { id, json } => backups::list(agent, &id, json).await,
        TenantCommand::Restore {
            id,
            to,
            backup,
            latest,
            into,
            dry_run,
            json,
        } => backups::restore_cmd(agent, &id, to, backup, latest, into, dry_run, json).await,
        TenantCommand::Verify { id } => backups::verify(agent, &id).await,
        TenantCommand::RestoreTest { id } => backups::restore_test(agent, &id).await,
        TenantCommand::Volumes { id, purge_old } => backups::volumes(agent, &id, purge_old).await,
        TenantCommand::Sleep { id } => sleep_or_wake(agent, &id, "sleep").await,
        TenantCommand::Wake { id } => sleep_or_wake(agent, &id, "wake").await,
    }
}

pub(super) async fn require_docker(agent: &Agent) -> anyhow::Result<DockerDriver> {
    DockerDriver::connect(&agent.settings.docker, &agent.paths)
        .await
        .map(|d| d.with_backups(&agent.settings.backups))
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
        let other = if args.image.is_some() {
            "name an image the engine has (`docker images`)"
        } else {
            "pass --image"
        };
        bail!(
            "image {image} is not present on the Docker engine (pgs never pulls); build \
             pgs/postgres:15 with `docker/build-image.sh` (no registry needed), or {other}"
        );
    }
    let access = if args.enable {
        Access::Enabled
    } else {
        Access::Disabled
    };
    let mut entry = json!({"access": access.as_str(), "managed": Value::Object(managed)});
    if let Some(t) = &args.idle_timeout {
        if t != "never" {
            crate::settings::parse_interval(t).map_err(|e| anyhow!("--idle-timeout: {e}"))?;
        }
        entry["idle_timeout"] = json!(t);
    }
    match tenant_ops::add(&agent.paths.tenants_file, &id, entry) {
        Ok(_) => {}
        Err(EditError::Exists(_)) => bail!(
            "tenant \"{id}\" already exists; `{cli} tenant show {id}` describes it, \
             `{cli} tenant delete {id}` removes it",
            cli = agent.cli()
        ),
        Err(e) => return Err(e.into()),
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
             `{cli} sync`, or remove it with `{cli} tenant delete {id}`",
            cli = agent.cli()
        );
        return Ok(ExitCode::FAILURE);
    }
    let cli = agent.cli();
    let access = if args.enable {
        "access enabled".to_string()
    } else {
        format!("access disabled (`{cli} access enable {id}` opens it)")
    };
    println!("{id}: ready, {access}; `{cli} tenant credentials {id}` prints how to connect");
    Ok(ExitCode::SUCCESS)
}

fn failed_for(report: &Report, id: &TenantId) -> bool {
    report.held_back.contains(id) || !report.errors.is_empty()
}

async fn delete(agent: &Agent, id: &TenantId, purge: bool) -> anyhow::Result<ExitCode> {
    let was = tenant_ops::remove(&agent.paths.tenants_file, id)?;
    if was.is_none() && !purge {
        bail!(
            "no tenant \"{id}\" in {}",
            agent.paths.tenants_file.display()
        );
    }
    let docker = driver(agent).await?;
    let mut report = reconcile::sync(agent, docker.as_ref(), SyncOptions::default()).await?;
    if purge {
        // The pass keeps volumes; the purge below deletes this one, so say nothing about it.
        let kept = format!("server removed: {id} (");
        for line in report.done.iter_mut().filter(|l| l.starts_with(&kept)) {
            *line = format!("server removed: {id}");
        }
    }
    print_report(&report, false);
    let managed = was
        .as_ref()
        .is_none_or(|t| matches!(t.instance, Instance::Managed(_)));
    if managed {
        let d = match docker {
            Some(d) => d,
            None => require_docker(agent).await?,
        };
        let repo = agent.paths.tenant_repository(id);
        if purge {
            let removed = d.remove(id, true).await?;
            match removed.volume {
                Some(v) => println!("{id}: data volume {v} deleted"),
                None => println!("{id}: no data volume to delete"),
            }
            if repo.exists() {
                std::fs::remove_dir_all(&repo)
                    .with_context(|| format!("cannot delete {}", repo.display()))?;
                println!("{id}: backup repository {} deleted", repo.display());
            }
            let _ = std::fs::remove_file(agent.paths.tenant_backup_status(id));
        } else {
            if repo.exists() {
                println!(
                    "{id}: backup repository {} kept; `{cli} tenant restore {id} --latest --into NEWID` \
                     brings the data back as a new tenant, `--purge-data` deletes it",
                    repo.display(),
                    cli = agent.cli()
                );
            }
            println!(
                "{id}: data volume {} kept; `{cli} tenant delete {id} --purge-data` deletes it, \
                 `{cli} tenant create {id}` brings the data back",
                d.volume_name(id),
                cli = agent.cli()
            );
        }
    }
    if was.is_some() {
        println!("{id}: deleted");
    } else {
        println!("{id}: was not in the tenants file; only its leftover data was looked for");
    }
    Ok(if report.errors.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

async fn set_stopped(agent: &Agent, id: &TenantId, stopped: bool) -> anyhow::Result<ExitCode> {
    // Without an engine nothing can be started or stopped: fail before the file changes.
    let docker = require_docker(agent).await?;
    {
        let mut edit = TenantsFileEdit::open(&agent.paths.tenants_file)?;
        let t = edit.tenants()?.get(id).cloned().ok_or_else(|| {
            anyhow!(
                "no tenant \"{id}\" in {}",
                agent.paths.tenants_file.display()
            )
        })?;
        let Instance::Managed(spec) = &t.instance else {
            bail!("{id} is an external tenant: pgs does not run its server");
        };
        // A clean stop leaves the last partial WAL segment unarchived: close and archive it
        // first, so the repository holds every commit made before the stop.
        // A sleeping server archived its last WAL before it stopped.
        let asleep = crate::sleep::states_on_file(agent).contains_key(id);
        if stopped && spec.backups && !t.stopped && !asleep {
            let running = crate::backups::server_state(&docker, id)
                .await
                .ok()
                .flatten()
                == Some(crate::instances::RunState::Running);
            let has_stanza =
                crate::backups::repo::has_stanza(&agent.paths.tenant_repository(id), id.as_str());
            if running && has_stanza {
                if let Err(e) =
                    crate::backups::restore::switch_wal(&docker, id, docker.image_for(spec)).await
                {
                    eprintln!("warning: {id}: the last WAL before the stop was not archived: {e}");
                }
            }
        }
        let entry = edit.tenant_mut(id).expect("tenant exists");
        if stopped {
            entry.insert("stopped".into(), json!(true));
        } else {
            entry.remove("stopped");
        }
        edit.commit()?;
    }
    let report = reconcile::sync(agent, Some(&docker), SyncOptions::default()).await?;
    print_report(&report, false);
    if !report.errors.is_empty() {
        return Ok(ExitCode::FAILURE);
    }
    println!("{id}: {}", if stopped { "stopped" } else { "started" });
    Ok(ExitCode::SUCCESS)
}

/// The engine for `list`/`show`, or a warning that server states are unknown without it.
async fn docker_for_views(agent: &Agent) -> Option<DockerDriver> {
    match require_docker(agent).await {
        Ok(d) => Some(d),
        Err(e) => {
            eprintln!("warning: server states unknown: {e:#}");
            None
        }
    }
}

/// `tenant sleep|wake`: asks the running agent on its wake socket (it owns the sleep states);
/// without one, does it here.
async fn sleep_or_wake(agent: &Agent, id: &TenantId, verb: &str) -> anyhow::Result<ExitCode> {
    let t = tenants::load(&agent.paths.tenants_file)?;
    let Some(tenant) = t.get(id) else {
        bail!(
            "no tenant \"{id}\" in {}",
            agent.paths.tenants_file.display()
        );
    };
    if !matches!(tenant.instance, Instance::Managed(_)) {
        bail!("{id} is an external tenant: pgs does not run its server");
    }
    let wait = Duration::from_secs(agent.settings.sleep.wake_timeout_secs() + 60);
    match crate::sleep::local::ask(&agent.paths.wake_socket, verb, id, wait).await {
        Ok((200, text)) => {
            println!("{id}: {text}");
            return Ok(ExitCode::SUCCESS);
        }
        Ok((_, text)) => bail!("{id}: {verb} refused: {text}"),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) => {}
        Err(e) => bail!(
            "{id}: the agent on {} did not answer: {e}",
            agent.paths.wake_socket.display()
        ),
    }
    // No agent serves the layout: nothing else changes sleep states now.
    let docker = require_docker(agent).await?;
    let sleeper = crate::sleep::Sleeper::new(agent, docker);
    if verb == "wake" {
        let t = sleeper.wake(id).await?;
        if t.started {
            println!(
                "{id}: awake after {} ms (start {} ms, ready {} ms)",
                t.total_ms, t.start_ms, t.ready_ms
            );
        } else {
            println!("{id}: awake");
        }
    } else {
        let depth = sleeper
            .sleep(id)
            .await
            .map_err(|e| anyhow!("{id}: not put to sleep: {e}"))?;
        println!("{id}: asleep {}", crate::sleep::local::depth_word(depth));
        eprintln!(
            "note: no `{} run` serves this layout, so nothing wakes it on a client's connection \
             (clients get 57P03); `tenant wake {id}` does",
            agent.cli()
        );
    }
    Ok(ExitCode::SUCCESS)
}

async fn list(agent: &Agent, json: bool) -> anyhow::Result<ExitCode> {
    let docker = docker_for_views(agent).await;
    let views = views(agent, docker.as_ref()).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&views)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<24} {:<9} {:<9} {:<13} {:<7} ADDRESS",
        "TENANT", "KIND", "ACCESS", "SERVER", "SLEEP"
    );
    for v in &views {
        println!(
            "{:<24} {:<9} {:<9} {:<13} {:<7} {}",
            v.id.as_str(),
            v.kind,
            v.access.as_str(),
            server_state(v, docker.is_some()),
            v.sleep.map_or("-", |s| s.as_str()),
            v.address.as_deref().unwrap_or("-")
        );
    }
    if views.is_empty() {
        println!("(no tenants; `{} tenant create ID` adds one)", agent.cli());
    }
    Ok(ExitCode::SUCCESS)
}

async fn show(agent: &Agent, id: &TenantId, json: bool) -> anyhow::Result<ExitCode> {
    let docker = docker_for_views(agent).await;
    let v = views(agent, docker.as_ref())
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
        let mut out = serde_json::to_value(&v)?;
        if v.spec.as_ref().is_some_and(|s| s.backups) {
            let listing = crate::backups::list(agent, id)?;
            let summary = crate::backups::status::summaries(&agent.paths, std::slice::from_ref(id));
            out["backups"] = json!({
                "count": listing.backups.len(),
                "window": listing.window,
                "repository": listing.repository,
                "summary": summary.first(),
            });
        }
        println!("{}", serde_json::to_string_pretty(&out)?);
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
        server_state(&v, docker.is_some()),
        if v.stopped {
            " (stopped on request)"
        } else {
            ""
        }
    );
    if let Some(state) = v.sleep {
        println!(
            "sleep     {}{}",
            state.as_str(),
            match v.sleep_depth {
                Some(crate::sleep::Depth::Light) => " (server stopped, container up)",
                Some(crate::sleep::Depth::Deep) => " (server and container stopped)",
                None => "",
            }
        );
    }
    println!("address   {}", v.address.as_deref().unwrap_or("-"));
    if let Some(s) = &v.server {
        println!("container {}", s.container.as_deref().unwrap_or("-"));
        println!("volume    {}", s.volume.as_deref().unwrap_or("-"));
    }
    if let Some(spec) = &v.spec {
        println!("spec      {}", serde_json::to_string(spec)?);
        if spec.backups {
            let listing = crate::backups::list(agent, id)?;
            println!(
                "backups   {} in {}{}",
                listing.backups.len(),
                listing.repository,
                listing
                    .window
                    .map(|w| format!(
                        ", restore window {} to {}",
                        crate::backups::clock::format_utc(w.from),
                        crate::backups::clock::format_utc(w.to)
                    ))
                    .unwrap_or_default()
            );
            let summary = crate::backups::status::summaries(&agent.paths, std::slice::from_ref(id));
            if let Some(lag) = summary.first().and_then(|s| s.wal_archive_lag_seconds) {
                println!("wal archived {lag}s ago");
            }
            backups::print_status(&crate::backups::status::load(&agent.paths, id));
            if let Some(s) = summary.first() {
                backups::print_archive_failures(
                    s.archive_failures,
                    s.last_archive_failure.as_ref(),
                );
            }
        } else {
            println!("backups   off");
        }
    }
    let tenants = tenants::load(&agent.paths.tenants_file)?;
    for (name, r) in tenants.get(id).map(|t| &t.roles).into_iter().flatten() {
        let mut what = vec![if r.read_only {
            "read-only"
        } else {
            "read-write"
        }
        .to_owned()];
        if let Some(n) = r.connection_limit {
            what.push(format!("at most {n} sessions"));
        }
        println!("role      {name} (user {name}.{id}; {})", what.join(", "));
    }
    Ok(ExitCode::SUCCESS)
}

async fn credentials(
    agent: &Agent,
    id: &TenantId,
    format: CredentialsFormat,
    role: Option<&str>,
    rotate: bool,
) -> anyhow::Result<ExitCode> {
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
    if let Some(r) = role.filter(|r| !t.roles.contains_key(*r)) {
        let declared = if t.roles.is_empty() {
            "none".to_owned()
        } else {
            t.roles.keys().cloned().collect::<Vec<_>>().join(", ")
        };
        bail!(
            "tenant {id} declares no role \"{r}\" (declared: {declared}); add it under \
             tenants.{id}.managed.roles in {} and run `{} sync`",
            agent.paths.tenants_file.display(),
            agent.cli()
        );
    }
    let password = if rotate {
        rotate_password(agent, t, role).await?
    } else {
        let (path, read) = match role {
            Some(r) => (
                agent.paths.role_password_file(id, r),
                roles::stored_password(&agent.paths, id, r),
            ),
            None => {
                let path = agent.paths.tenant_password_file(id);
                let read = std::fs::read_to_string(&path);
                (path, read)
            }
        };
        read.with_context(|| {
            format!(
                "cannot read {} (was the tenant provisioned? `{} sync` creates its roles)",
                path.display(),
                agent.cli()
            )
        })?
    };
    let user = match role {
        Some(r) => format!("{r}.{id}"),
        None => id.to_string(),
    };
    let listen = &agent.settings.haproxy.listen;
    let (host, port) = listen.rsplit_once(':').unwrap_or((listen, "5432"));
    let host = match host {
        "" | "*" | "0.0.0.0" | "::" | "[::]" => "127.0.0.1",
        h => h,
    };
    println!(
        "{}",
        connection_text(format, &user, id, host, port, password.trim_end())
    );
    if rotate {
        eprintln!("{user}: new password set; the old one no longer works");
    }
    Ok(ExitCode::SUCCESS)
}

/// Sets a new password while holding the agent lock, so no reconcile pass (readiness logs in
/// with the tenant's stored password) runs between the server's change and the file's.
async fn rotate_password(
    agent: &Agent,
    t: &tenants::Tenant,
    role: Option<&str>,
) -> anyhow::Result<String> {
    let docker = require_docker(agent).await?;
    let lock_path = agent.paths.agent_lock.clone();
    let _lock = tokio::task::spawn_blocking(move || FileLock::exclusive(&lock_path))
        .await
        .context("lock task failed")?
        .with_context(|| format!("cannot lock {}", agent.paths.agent_lock.display()))?;
    if t.stopped {
        bail!(
            "tenant {} is stopped; `{} tenant start {}` first",
            t.id,
            agent.cli(),
            t.id
        );
    }
    let login = docker.admin_login(&t.id)?;
    roles::rotate(&agent.paths, &login, &t.id, role)
        .await
        .with_context(|| format!("tenant {}: rotating the password", t.id))
}

/// Connection details through HAProxy for `user` (`tenant` or `role.tenant`) on database
/// `id`, in one of the `credentials` formats.
fn connection_text(
    format: CredentialsFormat,
    user: &str,
    id: &TenantId,
    host: &str,
    port: &str,
    password: &str,
) -> String {
    match format {
        CredentialsFormat::Uri => format!(
            "postgresql://{user}:{}@{host}:{port}/{id}",
            percent_encode(password)
        ),
        CredentialsFormat::Env => format!(
            "export PGHOST={} PGPORT={} PGUSER={user} PGDATABASE={id} PGPASSWORD={}",
            shell_quote(host),
            shell_quote(port),
            shell_quote(password)
        ),
        CredentialsFormat::Pgpass => {
            let esc = |s: &str| s.replace('\\', "\\\\").replace(':', "\\:");
            format!("{}:{}:{id}:{user}:{}", esc(host), esc(port), esc(password))
        }
    }
}

/// Single-quotes a word for a POSIX shell.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
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
    use super::*;

    #[test]
    fn every_credentials_format_carries_the_password_intact() {
        let id: TenantId = "acme".parse().unwrap();
        let text = |f| connection_text(f, "acme", &id, "127.0.0.1", "6432", "p'w:\\x");
        assert_eq!(
            text(CredentialsFormat::Uri),
            "postgresql://acme:p%27w%3A%5Cx@127.0.0.1:6432/acme"
        );
        assert_eq!(
            text(CredentialsFormat::Env),
            "export PGHOST='127.0.0.1' PGPORT='6432' PGUSER=acme PGDATABASE=acme \
             PGPASSWORD='p'\\''w:\\x'"
        );
        assert_eq!(
            text(CredentialsFormat::Pgpass),
            "127.0.0.1:6432:acme:acme:p'w\\:\\\\x"
        );
    }

    #[test]
    fn a_role_connects_as_role_dot_tenant_to_the_tenants_database() {
        let id: TenantId = "acme".parse().unwrap();
        let text = |f| connection_text(f, "app.acme", &id, "h", "5432", "pw");
        assert_eq!(
            text(CredentialsFormat::Uri),
            "postgresql://app.acme:pw@h:5432/acme"
        );
        assert!(text(CredentialsFormat::Env).contains("PGUSER=app.acme PGDATABASE=acme "));
        assert_eq!(text(CredentialsFormat::Pgpass), "h:5432:acme:app.acme:pw");
    }

    #[test]
    fn percent_encoding_keeps_unreserved_only() {
        assert_eq!(super::percent_encode("a-Z_0.~"), "a-Z_0.~");
        assert_eq!(super::percent_encode("p@ss:/w"), "p%40ss%3A%2Fw");
    }
}
