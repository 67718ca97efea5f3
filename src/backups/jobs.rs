//! One-shot job containers that run pgBackRest beside a tenant: same image, no network, the
//! tenant's repository and data volume mounted, the password read from a mounted file inside
//! the container (never an argument or an environment value). One job per tenant at a time:
//! the container's name (`{prefix}-{tenant}-job`) is the lock.

use std::collections::HashMap;
use std::path::PathBuf;

use bollard::errors::Error as EngineError;
use bollard::models::{ContainerCreateBody, HostConfig, Mount, MountType};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, InspectContainerOptions, LogsOptionsBuilder,
    RemoveContainerOptionsBuilder, WaitContainerOptionsBuilder,
};
use futures_util::StreamExt;

use crate::instances::docker::{bind, ownership_labels, pgbackrest_env, DockerDriver, REPO_DIR};
use crate::tenants::TenantId;

/// On job containers: what the job does (`backup`, `restore`, `verify`, ...).
pub const LABEL_JOB: &str = "io.pgs.job";

const DATA_DIR: &str = "/var/lib/postgresql/data";
const SOCKET_DIR: &str = "/var/run/postgresql";
const PASSWORD_MOUNT: &str = "/run/secrets/pgs-password";
const NEW_PASSWORD_MOUNT: &str = "/run/secrets/pgs-new-password";
/// Lines of a failed job's output kept for the error message.
const TAIL: usize = 15;

/// What a job mounts and runs.
#[derive(Debug, Clone)]
pub struct Job {
    /// The tenant whose job slot it takes (and whose labels the container carries).
    pub tenant: TenantId,
    pub kind: &'static str,
    pub image: String,
    /// The data volume at PGDATA.
    pub volume: String,
    /// The stanza (tenant) whose repository is mounted and whose password the job uses.
    pub stanza: TenantId,
    /// Mount the tenant's live socket directory (online backups).
    pub socket: bool,
    /// A second password file (a restored copy's new owner).
    pub new_password: Option<PathBuf>,
    /// `bash -c SCRIPT job ARGS...`.
    pub script: &'static str,
    pub args: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("a {kind} job for {tenant} is already running (container {name}); wait for it to end")]
    Busy {
        tenant: TenantId,
        kind: String,
        name: String,
    },
    #[error("{tenant}: the {kind} job failed (exit {code}):\n{output}")]
    Failed {
        tenant: TenantId,
        kind: &'static str,
        code: i64,
        output: String,
    },
    #[error("{tenant}: Docker refused the {kind} job: {message}")]
    Engine {
        tenant: TenantId,
        kind: &'static str,
        message: String,
    },
}

/// The job container's name for a tenant.
pub fn job_name(driver: &DockerDriver, id: &TenantId) -> String {
    format!("{}-job", driver.container_name(id))
}

/// Runs the job to its end; returns its output (stdout and stderr), or why it failed.
pub async fn run(driver: &DockerDriver, job: &Job) -> Result<String, JobError> {
    let docker = driver.engine();
    let name = job_name(driver, &job.tenant);
    let engine = |e: EngineError| JobError::Engine {
        tenant: job.tenant.clone(),
        kind: job.kind,
        message: e.to_string(),
    };
    // A job container left behind by an agent that died: remove it, unless it still runs.
    if let Ok(c) = docker
        .inspect_container(&name, None::<InspectContainerOptions>)
        .await
    {
        let running = c.state.as_ref().and_then(|s| s.running).unwrap_or(false);
        let kind = c
            .config
            .as_ref()
            .and_then(|c| c.labels.as_ref())
            .and_then(|l| l.get(LABEL_JOB).cloned())
            .unwrap_or_default();
        if running {
            return Err(JobError::Busy {
                tenant: job.tenant.clone(),
                kind,
                name,
            });
        }
        tracing::info!(tenant = %job.tenant, "removing the finished {kind} job container {name} left behind");
        remove(driver, &name).await;
        // Another agent process (the daemon's loop, a CLI call) may be removing it already:
        // its name is free only once the removal is done.
        for _ in 0..100 {
            match docker
                .inspect_container(&name, None::<InspectContainerOptions>)
                .await
            {
                Ok(c) if c.state.as_ref().and_then(|s| s.running).unwrap_or(false) => break,
                Ok(_) => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
                Err(_) => break,
            }
        }
    }
    let paths = driver.paths();
    let mut mounts = vec![
        Mount {
            typ: Some(MountType::VOLUME),
            source: Some(job.volume.clone()),
            target: Some(DATA_DIR.to_owned()),
            ..Default::default()
        },
        bind(&paths.tenant_repository(&job.stanza), REPO_DIR, false),
        bind(
            &paths.tenant_password_file(&job.stanza),
            PASSWORD_MOUNT,
            true,
        ),
    ];
    if job.socket {
        mounts.push(bind(
            &paths.tenant_socket_dir(&job.tenant),
            SOCKET_DIR,
            false,
        ));
    }
    if let Some(p) = &job.new_password {
        mounts.push(bind(p, NEW_PASSWORD_MOUNT, true));
    }
    let (prefix, layout) = driver.owner();
    let mut labels: HashMap<String, String> = ownership_labels(prefix, layout, &job.tenant);
    labels.insert(LABEL_JOB.to_owned(), job.kind.to_owned());
    let mut env = pgbackrest_env(&job.stanza);
    env.push(format!("PGDATA={DATA_DIR}"));
    let mut cmd = vec![
        "bash".to_owned(),
        "-c".to_owned(),
        job.script.to_owned(),
        job.kind.to_owned(),
    ];
    cmd.extend(job.args.iter().cloned());
    let body = ContainerCreateBody {
        image: Some(job.image.clone()),
        entrypoint: Some(vec![]),
        cmd: Some(cmd),
        env: Some(env),
        labels: Some(labels),
        host_config: Some(HostConfig {
            mounts: Some(mounts),
            network_mode: Some("none".to_owned()),
            cap_drop: Some(vec!["ALL".to_owned()]),
            security_opt: Some(vec!["no-new-privileges".to_owned()]),
            ..Default::default()
        }),
        ..Default::default()
    };
    let options = CreateContainerOptionsBuilder::new().name(&name).build();
    match docker.create_container(Some(options), body).await {
        Ok(_) => {}
        Err(EngineError::DockerResponseServerError {
            status_code: 409, ..
        }) => {
            return Err(JobError::Busy {
                tenant: job.tenant.clone(),
                kind: "other".into(),
                name,
            })
        }
        Err(e) => return Err(engine(e)),
    }
    tracing::debug!(tenant = %job.tenant, "{} job {name}: {:?}", job.kind, job.args);
    if let Err(e) = docker.start_container(&name, None).await {
        remove(driver, &name).await;
        return Err(engine(e));
    }
    let options = WaitContainerOptionsBuilder::new()
        .condition("not-running")
        .build();
    let mut wait = docker.wait_container(&name, Some(options));
    let code = match wait.next().await {
        Some(Ok(r)) => r.status_code,
        Some(Err(EngineError::DockerContainerWaitError { code, .. })) => code,
        Some(Err(e)) => {
            remove(driver, &name).await;
            return Err(engine(e));
        }
        None => -1,
    };
    let output = logs(driver, &name).await;
    remove(driver, &name).await;
    if code == 0 {
        Ok(output)
    } else {
        Err(JobError::Failed {
            tenant: job.tenant.clone(),
            kind: job.kind,
            code,
            output: tail(&output, TAIL),
        })
    }
}

async fn logs(driver: &DockerDriver, name: &str) -> String {
    let options = LogsOptionsBuilder::new().stdout(true).stderr(true).build();
    let mut stream = driver.engine().logs(name, Some(options));
    let mut text = String::new();
    while let Some(Ok(chunk)) = stream.next().await {
        text.push_str(&chunk.to_string());
    }
    text
}

async fn remove(driver: &DockerDriver, name: &str) {
    let options = RemoveContainerOptionsBuilder::new()
        .force(true)
        .v(true)
        .build();
    if let Err(e) = driver.engine().remove_container(name, Some(options)).await {
        tracing::warn!("cannot remove job container {name}: {e}");
    }
}

/// The last `n` non-empty lines.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
