//! The Docker instance driver: owns, per managed tenant, one PostgreSQL container
//! (`{prefix}-{tenant}`), its data volume (`{prefix}-{tenant}-data`), its socket directory
//! (bind-mounted as the container's `/var/run/postgresql`, dialled by HAProxy) and its generated
//! password file; it only ever touches Docker objects that carry its installation's labels.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bollard::errors::Error as EngineError;
use bollard::models::{
    ContainerCreateBody, ContainerInspectResponse, ContainerStateStatusEnum, HostConfig, Mount,
    MountType, RestartPolicy, RestartPolicyNameEnum, VolumeCreateRequest,
};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, EventsOptionsBuilder, ListContainersOptionsBuilder,
    ListVolumesOptionsBuilder, LogsOptionsBuilder, RemoveContainerOptionsBuilder,
    RemoveVolumeOptionsBuilder, StopContainerOptionsBuilder,
};
use bollard::Docker;
use futures_util::StreamExt;

use super::{DriverError, InstanceDriver, ObservedInstance, Removed, RunState};
use crate::fsutil;
use crate::pgsql;
use crate::settings::{BackupSettings, DockerSettings, Paths};
use crate::tenants::{self, ManagedSpec, TenantId};

/// Present (`1`) on every object pgs creates.
pub const LABEL_MANAGED: &str = "io.pgs.managed";
/// The installation (`docker.prefix`) that owns the object.
pub const LABEL_INSTALLATION: &str = "io.pgs.installation";
/// The layout directory (where pgs.toml lives) that owns the object: two layouts that share a
/// `docker.prefix` by mistake never touch each other's objects.
pub const LABEL_LAYOUT: &str = "io.pgs.layout";
/// The tenant the object belongs to.
pub const LABEL_TENANT: &str = "io.pgs.tenant";
/// On containers: the `ManagedSpec` (JSON) the container was created from.
pub const LABEL_SPEC: &str = "io.pgs.spec";
/// On containers: a hash of the whole effective container configuration, so a change of the
/// agent's settings (default image, memory, pids limit, server defaults) also replaces it.
pub const LABEL_CONFIG: &str = "io.pgs.config";

/// The socket file name inside a tenant's socket directory (port 5432).
pub const SOCKET_NAME: &str = ".s.PGSQL.5432";

const DATA_DIR: &str = "/var/lib/postgresql/data";
const SOCKET_DIR: &str = "/var/run/postgresql";
const PASSWORD_MOUNT: &str = "/run/secrets/pgs-password";
const INITDB_DIR: &str = "/docker-entrypoint-initdb.d";
/// Where the tenant's pgBackRest repository is mounted (the Debian package's default
/// `repo1-path`).
pub const REPO_DIR: &str = "/var/lib/pgbackrest";
/// The image's `postgres` user.
const PG_UID: u32 = 999;
/// Seconds between SIGINT (fast shutdown) and SIGKILL.
const STOP_TIMEOUT_SECS: i32 = 10;
/// Engine request timeout.
const ENGINE_TIMEOUT_SECS: u64 = 60;
/// Log lines shown when a container dies while we wait for it.
const LOG_TAIL: usize = 20;
/// Readiness polls while a server starts (a login is tried only once its socket exists).
const POLL: Duration = Duration::from_millis(15);
/// One login attempt never takes longer than this.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);

/// Server settings the driver always sets: the server must listen on the bind-mounted socket
/// directory on port 5432 and nowhere else. A tenant's `settings` cannot override them.
const FIXED_SETTINGS: &[(&str, &str)] = &[
    ("listen_addresses", ""),
    ("port", "5432"),
    ("unix_socket_directories", SOCKET_DIR),
];

/// Small-footprint defaults, so a few hundred mostly idle tenants fit on one host. A tenant's
/// `settings` override any of them. `shared_buffers` and `effective_cache_size` are derived from
/// the memory limit (see `server_settings`).
const SMALL_DEFAULTS: &[(&str, &str)] = &[
    ("work_mem", "2MB"),
    ("maintenance_work_mem", "16MB"),
    ("wal_buffers", "512kB"),
    ("max_wal_size", "256MB"),
    ("min_wal_size", "32MB"),
    ("max_worker_processes", "2"),
    ("max_parallel_workers", "2"),
    ("max_parallel_workers_per_gather", "1"),
    ("max_parallel_maintenance_workers", "1"),
    ("autovacuum_max_workers", "1"),
    ("autovacuum_naptime", "5min"),
    ("jit", "off"),
];

/// How often the event watcher asks an engine that went away whether it is back.
const ENGINE_RETRY: Duration = Duration::from_millis(100);

/// What the event watcher reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EngineEvent {
    /// One of this installation's containers died.
    Died { tenant: TenantId, container: String },
    /// The engine answers again after its event stream ended.
    Back,
}

/// Runs managed tenants as containers on the local Docker engine.
#[derive(Debug, Clone)]
pub struct DockerDriver {
    docker: Docker,
    settings: DockerSettings,
    paths: Paths,
    /// This layout's directory, as `io.pgs.layout` carries it.
    layout: String,
    /// Repository root and archive_timeout of tenants with backups on.
    backups: BackupSettings,
}

impl DockerDriver {
    /// Connects to the engine at `settings.socket` and agrees on an API version with it.
    pub async fn connect(settings: &DockerSettings, paths: &Paths) -> Result<Self, DriverError> {
        let socket = &settings.socket;
        let Some(socket_str) = socket.to_str() else {
            return Err(DriverError::Unavailable(format!(
                "docker socket path {} is not valid UTF-8",
                socket.display()
            )));
        };
        let docker = Docker::connect_with_unix(
            socket_str,
            ENGINE_TIMEOUT_SECS,
            bollard::API_DEFAULT_VERSION,
        )
        .map_err(|e| unavailable(socket, "connecting", &e))?;
        // The engine may be older than the client's default API version (dockerd 20.10 speaks
        // 1.41): ask it, and speak the older version if needed.
        let docker = docker
            .negotiate_version()
            .await
            .map_err(|e| unavailable(socket, "asking the engine for its API version", &e))?;
        Ok(DockerDriver {
            docker,
            settings: settings.clone(),
            paths: paths.clone(),
            layout: layout_id(&paths.config),
            backups: BackupSettings::default(),
        })
    }

    /// The same driver with the layout's `[backups]` settings (the defaults otherwise).
    pub fn with_backups(mut self, backups: &BackupSettings) -> Self {
        self.backups = backups.clone();
        self
    }

    /// The engine client, for the backup jobs that run beside the tenants.
    pub fn engine(&self) -> &Docker {
        &self.docker
    }

    /// The installation prefix and this layout's id, as ownership labels carry them.
    pub fn owner(&self) -> (&str, &str) {
        (&self.settings.prefix, &self.layout)
    }

    /// The agent's paths.
    pub fn paths(&self) -> &Paths {
        &self.paths
    }

    /// Follows the engine's event stream and calls `on_event` whenever one of this
    /// installation's containers dies, and once the engine answers again after its stream ended
    /// (dockerd stopped, killed or restarted): what happened meanwhile is unknown, so the caller
    /// reconciles at once rather than at its next periodic resync. Runs until the task is dropped.
    pub async fn watch_events(&self, mut on_event: impl FnMut(EngineEvent) + Send) {
        let mut filters = self.installation_filter();
        filters.insert("type".into(), vec!["container".into()]);
        filters.insert("event".into(), vec!["die".into()]);
        loop {
            let options = EventsOptionsBuilder::default().filters(&filters).build();
            let mut events = self.docker.events(Some(options));
            while let Some(event) = events.next().await {
                let Ok(event) = event else { break };
                let attrs = event.actor.and_then(|a| a.attributes).unwrap_or_default();
                if attrs.contains_key(crate::backups::jobs::LABEL_JOB) {
                    continue;
                }
                let tenant = attrs
                    .get(LABEL_TENANT)
                    .and_then(|t| TenantId::parse(t).ok());
                if let Some(tenant) = tenant {
                    let container = attrs.get("name").cloned().unwrap_or_default();
                    on_event(EngineEvent::Died { tenant, container });
                }
            }
            let away = Instant::now();
            tracing::warn!("Docker event stream ended; waiting for the engine to answer again");
            while self.ping().await.is_err() {
                tokio::time::sleep(ENGINE_RETRY).await;
            }
            tracing::info!(
                away_ms = away.elapsed().as_millis() as u64,
                "Docker engine answers again; reconciling"
            );
            on_event(EngineEvent::Back);
        }
    }

    /// Whether `image` is present on the engine (no registry is asked).
    pub async fn has_image(&self, image: &str) -> Result<bool, DriverError> {
        match self.docker.inspect_image(image).await {
            Ok(_) => Ok(true),
            Err(EngineError::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(false),
            Err(e) => Err(unavailable(
                &self.settings.socket,
                "looking up the image",
                &e,
            )),
        }
    }

    /// The image a tenant with `spec` runs.
    pub fn image_for(&self, spec: &ManagedSpec) -> String {
        spec.image
            .clone()
            .unwrap_or_else(|| self.settings.default_image.clone())
    }

    /// A cheap liveness check of the engine.
    pub async fn ping(&self) -> Result<(), DriverError> {
        self.docker
            .ping()
            .await
            .map(drop)
            .map_err(|e| unavailable(&self.settings.socket, "pinging", &e))
    }

    /// The tenant's container name.
    pub fn container_name(&self, id: &TenantId) -> String {
        container_name(&self.settings.prefix, id)
    }

    /// The tenant's data volume: the one a restore recorded, else the one it was created with.
    pub fn volume_name(&self, id: &TenantId) -> String {
        fs::read_to_string(self.paths.tenant_volume_record(id))
            .ok()
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| volume_name(&self.settings.prefix, id))
    }

    /// Fails when the tenant's volume record exists but cannot be read: falling back to the
    /// volume it was created with would serve its data from before a restore.
    pub fn check_volume_record(&self, id: &TenantId) -> Result<(), DriverError> {
        let record = self.paths.tenant_volume_record(id);
        match fs::read_to_string(&record) {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(DriverError::Failed {
                tenant: id.clone(),
                message: format!(
                    "cannot read {} ({e}), which names the volume holding its data since a \
                     restore; nothing is started until it can be read",
                    record.display()
                ),
            }),
        }
    }

    /// Points the tenant at another data volume (a restored copy); takes effect when its
    /// container is next created.
    pub fn set_volume(&self, id: &TenantId, volume: &str) -> io::Result<()> {
        let record = self.paths.tenant_volume_record(id);
        if let Some(dir) = record.parent() {
            fs::create_dir_all(dir)?;
        }
        if volume == volume_name(&self.settings.prefix, id) {
            return match fs::remove_file(&record) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            };
        }
        fsutil::write_atomic(&record, format!("{volume}\n").as_bytes(), 0o644)
    }

    /// Every volume of this tenant (the current one and those a restore left behind).
    pub async fn tenant_volumes(&self, id: &TenantId) -> Result<Vec<String>, DriverError> {
        let mut filters = self.installation_filter();
        filters
            .get_mut("label")
            .expect("label filter")
            .push(format!("{LABEL_TENANT}={id}"));
        let options = ListVolumesOptionsBuilder::new().filters(&filters).build();
        let volumes = self
            .docker
            .list_volumes(Some(options))
            .await
            .map_err(|e| self.engine_err(id, "listing volumes", e))?;
        let mut names: Vec<String> = volumes
            .volumes
            .unwrap_or_default()
            .into_iter()
            .filter(|v| is_owned(Some(&v.labels), &self.settings.prefix, &self.layout, id))
            .map(|v| v.name)
            .collect();
        names.sort();
        Ok(names)
    }

    /// Creates an empty volume owned by the tenant (a restore target).
    pub async fn create_named_volume(
        &self,
        id: &TenantId,
        name: &str,
        extra: &[(&str, &str)],
    ) -> Result<(), DriverError> {
        let mut labels = ownership_labels(&self.settings.prefix, &self.layout, id);
        for (k, v) in extra {
            labels.insert((*k).to_owned(), (*v).to_owned());
        }
        let request = VolumeCreateRequest {
            name: Some(name.to_owned()),
            labels: Some(labels),
            ..Default::default()
        };
        self.docker
            .create_volume(request)
            .await
            .map(drop)
            .map_err(|e| self.engine_err(id, &format!("creating volume {name}"), e))
    }

    /// Removes one of the tenant's volumes (never one another tenant or layout owns).
    pub async fn remove_named_volume(&self, id: &TenantId, name: &str) -> Result<(), DriverError> {
        match self.docker.inspect_volume(name).await {
            Ok(v) if is_owned(Some(&v.labels), &self.settings.prefix, &self.layout, id) => {}
            Ok(v) => {
                return Err(not_ours(
                    id,
                    "volume",
                    name,
                    Some(&v.labels),
                    &self.settings.prefix,
                ))
            }
            Err(e) if is_not_found(&e) => return Ok(()),
            Err(e) => return Err(self.engine_err(id, &format!("inspecting volume {name}"), e)),
        }
        tracing::info!(tenant = %id, "removing volume {name}");
        let options = RemoveVolumeOptionsBuilder::new().force(false).build();
        match self.docker.remove_volume(name, Some(options)).await {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(self.engine_err(id, &format!("removing volume {name}"), e)),
        }
    }

    /// Creates the tenant's backup repository directory, owned by the container user.
    pub fn prepare_repository(&self, id: &TenantId) -> io::Result<PathBuf> {
        let dir = self.paths.tenant_repository(id);
        fs::create_dir_all(&dir)?;
        let meta = fs::metadata(&dir)?;
        if meta.uid() != PG_UID {
            std::os::unix::fs::chown(&dir, Some(PG_UID), Some(PG_UID))?;
        }
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o750))?;
        Ok(dir)
    }

    /// The unix socket HAProxy dials for the tenant (`<socket dir>/.s.PGSQL.5432`).
    pub fn socket_path(&self, id: &TenantId) -> PathBuf {
        self.paths.tenant_socket_dir(id).join(SOCKET_NAME)
    }

    /// The tenant's generated superuser password (its role is the tenant id).
    pub fn password(&self, id: &TenantId) -> io::Result<String> {
        let text = fs::read_to_string(self.paths.tenant_password_file(id))?;
        Ok(text.trim_end_matches(['\n', '\r']).to_owned())
    }

    // ----- files on the host ------------------------------------------------------------------

    /// Makes sure the tenant has a password file readable by the container user; returns its
    /// path. An existing password is kept, so a re-created tenant still logs in to its old data.
    pub fn ensure_password(&self, id: &TenantId) -> io::Result<PathBuf> {
        let dir = &self.paths.secrets_dir;
        fs::create_dir_all(dir)?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
        let path = self.paths.tenant_password_file(id);
        if !path.exists() {
            let password = generate_password()?;
            fsutil::write_atomic(&path, format!("{password}\n").as_bytes(), 0o600)?;
            tracing::info!(tenant = %id, "generated a password, stored in {}", path.display());
        }
        let meta = fs::metadata(&path)?;
        if meta.uid() == PG_UID && meta.gid() == PG_UID {
            return Ok(path);
        }
        match std::os::unix::fs::chown(&path, Some(PG_UID), Some(PG_UID)) {
            Ok(()) => fs::set_permissions(&path, fs::Permissions::from_mode(0o600))?,
            Err(e) => {
                tracing::warn!(
                    tenant = %id,
                    "cannot hand {} to the container user (uid {PG_UID}): {e}; making it 0644 \
                     (still private: its directory {} is 0700)",
                    path.display(),
                    dir.display()
                );
                fs::set_permissions(&path, fs::Permissions::from_mode(0o644))?;
            }
        }
        Ok(path)
    }

    /// Creates the tenant's socket directory, owned by the container user, 0755.
    fn prepare_socket_dir(&self, id: &TenantId) -> io::Result<PathBuf> {
        let dir = self.paths.tenant_socket_dir(id);
        fs::create_dir_all(&dir)?;
        let meta = fs::metadata(&dir)?;
        let mode = if meta.uid() == PG_UID {
            0o755
        } else {
            match std::os::unix::fs::chown(&dir, Some(PG_UID), Some(PG_UID)) {
                Ok(()) => 0o755,
                Err(e) => {
                    tracing::warn!(
                        tenant = %id,
                        "cannot chown {} to uid {PG_UID}: {e}; making it 0777 so the server can \
                         create its socket there",
                        dir.display()
                    );
                    0o777
                }
            }
        };
        fs::set_permissions(&dir, fs::Permissions::from_mode(mode))?;
        Ok(dir)
    }

    /// Host paths of the tenant's init scripts; relative ones hang off the tenants file's dir.
    fn resolve_init_scripts(
        &self,
        id: &TenantId,
        spec: &ManagedSpec,
    ) -> Result<Vec<PathBuf>, DriverError> {
        let base = self
            .paths
            .tenants_file
            .parent()
            .map(Path::to_owned)
            .unwrap_or_else(|| PathBuf::from("/"));
        let mut out = Vec::new();
        for script in &spec.init_scripts {
            let host = if script.is_absolute() {
                script.clone()
            } else {
                base.join(script)
            };
            let meta = fs::metadata(&host).map_err(|e| {
                failed(
                    id,
                    format!(
                        "init script {} ({}) cannot be used: {e}",
                        script.display(),
                        host.display()
                    ),
                )
            })?;
            if !meta.is_file() {
                return Err(failed(
                    id,
                    format!("init script {} is not a file", host.display()),
                ));
            }
            if meta.uid() != PG_UID && meta.mode() & 0o004 == 0 {
                tracing::warn!(
                    tenant = %id,
                    "init script {} is not world-readable; the server (uid {PG_UID}) may fail to read it",
                    host.display()
                );
            }
            out.push(host);
        }
        Ok(out)
    }

    // ----- engine helpers ---------------------------------------------------------------------

    fn engine_err(&self, id: &TenantId, doing: &str, e: EngineError) -> DriverError {
        match e {
            EngineError::DockerResponseServerError {
                status_code,
                message,
            } => failed(
                id,
                format!("{doing}: {message} (engine status {status_code})"),
            ),
            other => unavailable(
                &self.settings.socket,
                &format!("{doing} (tenant {id})"),
                &other,
            ),
        }
    }

    fn installation_filter(&self) -> HashMap<String, Vec<String>> {
        HashMap::from([(
            "label".to_owned(),
            vec![
                format!("{LABEL_MANAGED}=1"),
                format!("{LABEL_INSTALLATION}={}", self.settings.prefix),
            ],
        )])
    }

    /// The tenant's container if it exists; an error if something else has its name.
    async fn owned_container(
        &self,
        id: &TenantId,
    ) -> Result<Option<ContainerInspectResponse>, DriverError> {
        let name = self.container_name(id);
        match self.docker.inspect_container(&name, None).await {
            Ok(c) => {
                let labels = c.config.as_ref().and_then(|c| c.labels.as_ref());
                if is_owned(labels, &self.settings.prefix, &self.layout, id) {
                    Ok(Some(c))
                } else {
                    Err(not_ours(
                        id,
                        "container",
                        &name,
                        labels,
                        &self.settings.prefix,
                    ))
                }
            }
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(self.engine_err(id, &format!("inspecting container {name}"), e)),
        }
    }

    /// Whether the tenant's volume exists; an error if a volume we do not own has its name.
    async fn owned_volume(&self, id: &TenantId) -> Result<bool, DriverError> {
        let name = self.volume_name(id);
        match self.docker.inspect_volume(&name).await {
            Ok(v) if is_owned(Some(&v.labels), &self.settings.prefix, &self.layout, id) => Ok(true),
            Ok(v) => Err(not_ours(
                id,
                "volume",
                &name,
                Some(&v.labels),
                &self.settings.prefix,
            )),
            Err(e) if is_not_found(&e) => Ok(false),
            Err(e) => Err(self.engine_err(id, &format!("inspecting volume {name}"), e)),
        }
    }

    async fn create_volume(&self, id: &TenantId) -> Result<(), DriverError> {
        let name = self.volume_name(id);
        tracing::info!(tenant = %id, "creating volume {name}");
        self.create_named_volume(id, &name, &[]).await
    }

    async fn create_container(
        &self,
        id: &TenantId,
        body: ContainerCreateBody,
    ) -> Result<(), DriverError> {
        let name = self.container_name(id);
        let image = body.image.clone().unwrap_or_default();
        tracing::info!(tenant = %id, "creating container {name} from {image}");
        let options = CreateContainerOptionsBuilder::new().name(&name).build();
        let reply = self
            .docker
            .create_container(Some(options), body)
            .await
            .map_err(|e| self.engine_err(id, &format!("creating container {name}"), e))?;
        for warning in reply.warnings {
            tracing::warn!(tenant = %id, "engine warning for container {name}: {warning}");
        }
        Ok(())
    }

    async fn start_container(&self, id: &TenantId) -> Result<(), DriverError> {
        let name = self.container_name(id);
        tracing::info!(tenant = %id, "starting container {name}");
        self.docker
            .start_container(&name, None)
            .await
            .map_err(|e| self.engine_err(id, &format!("starting container {name}"), e))
    }

    async fn stop_container(&self, id: &TenantId) -> Result<(), DriverError> {
        let name = self.container_name(id);
        tracing::info!(tenant = %id, "stopping container {name}");
        let options = StopContainerOptionsBuilder::new()
            .t(STOP_TIMEOUT_SECS)
            .build();
        match self.docker.stop_container(&name, Some(options)).await {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(self.engine_err(id, &format!("stopping container {name}"), e)),
        }
    }

    async fn remove_container(&self, id: &TenantId) -> Result<(), DriverError> {
        let name = self.container_name(id);
        tracing::info!(tenant = %id, "removing container {name}");
        // `v` removes anonymous volumes only; the named data volume is never touched here.
        let options = RemoveContainerOptionsBuilder::new()
            .force(true)
            .v(true)
            .build();
        match self.docker.remove_container(&name, Some(options)).await {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(self.engine_err(id, &format!("removing container {name}"), e)),
        }
    }

    /// Whether the tenant's container runs (`None`: there is none).
    pub async fn container_state(&self, id: &TenantId) -> Result<Option<RunState>, DriverError> {
        Ok(self.owned_container(id).await?.map(|c| {
            run_state(
                &c.state
                    .and_then(|s| s.status)
                    .map(|s| s.to_string())
                    .unwrap_or_default(),
            )
        }))
    }

    /// Tells the supervisor in the tenant's container (`PGS_SUPERVISE=1`, docker/entrypoint.sh)
    /// to start (`SIGUSR1`) or stop (`SIGUSR2`) PostgreSQL; the container stays up.
    pub async fn signal_server(&self, id: &TenantId, signal: &str) -> Result<(), DriverError> {
        let name = self.container_name(id);
        let options = bollard::query_parameters::KillContainerOptionsBuilder::new()
            .signal(signal)
            .build();
        self.docker
            .kill_container(&name, Some(options))
            .await
            .map_err(|e| self.engine_err(id, &format!("signalling container {name}"), e))
    }

    /// Starts the tenant's existing container (a deep-sleeping tenant's wake).
    pub async fn start_existing(&self, id: &TenantId) -> Result<(), DriverError> {
        self.start_container(id).await
    }

    /// Stops the tenant's container, keeping it (a tenant going into deep sleep).
    pub async fn stop_existing(&self, id: &TenantId) -> Result<(), DriverError> {
        self.stop_container(id).await
    }

    /// The last lines the container wrote, with the password masked (it is never printed, but
    /// a log excerpt is shown to people, so make sure).
    async fn log_tail(&self, id: &TenantId) -> String {
        let name = self.container_name(id);
        let options = LogsOptionsBuilder::new()
            .stdout(true)
            .stderr(true)
            .tail(&LOG_TAIL.to_string())
            .build();
        let mut stream = self.docker.logs(&name, Some(options));
        let mut text = String::new();
        while let Some(item) = stream.next().await {
            match item {
                Ok(chunk) => text.push_str(&chunk.to_string()),
                Err(e) => {
                    text.push_str(&format!("<cannot read logs: {e}>"));
                    break;
                }
            }
        }
        let password = self.password(id).unwrap_or_default();
        tail_lines(&text, LOG_TAIL, &password)
    }

    /// The tenant's memory limit in bytes.
    fn memory_limit(&self, id: &TenantId, spec: &ManagedSpec) -> Result<u64, DriverError> {
        match spec.memory {
            Some(m) => Ok(m),
            None => tenants::parse_size(&self.settings.default_memory)
                .map_err(|e| failed(id, format!("docker.default_memory: {e}"))),
        }
    }
}

impl InstanceDriver for DockerDriver {
    fn admin_login(&self, id: &TenantId) -> Result<pgsql::Login, DriverError> {
        let password = self.password(id).map_err(|e| {
            failed(
                id,
                format!(
                    "cannot read the password file {}: {e}",
                    self.paths.tenant_password_file(id).display()
                ),
            )
        })?;
        Ok(pgsql::Login {
            socket: self.socket_path(id),
            user: id.to_string(),
            password,
        })
    }

    async fn observe(&self) -> Result<Vec<ObservedInstance>, DriverError> {
        let prefix = &self.settings.prefix;
        let filters = self.installation_filter();
        let options = ListContainersOptionsBuilder::new()
            .all(true)
            .filters(&filters)
            .build();
        let containers = self
            .docker
            .list_containers(Some(options))
            .await
            .map_err(|e| listing_err(&self.settings.socket, prefix, "containers", e))?;
        let options = ListVolumesOptionsBuilder::new().filters(&filters).build();
        let volumes = self
            .docker
            .list_volumes(Some(options))
            .await
            .map_err(|e| listing_err(&self.settings.socket, prefix, "volumes", e))?;

        let mut found: BTreeMap<TenantId, ObservedInstance> = BTreeMap::new();
        let empty = |tenant: &TenantId| ObservedInstance {
            tenant: tenant.clone(),
            container: None,
            state: None,
            spec: None,
            volume: None,
        };
        for c in containers {
            let labels = c.labels.unwrap_or_default();
            if labels.contains_key(crate::backups::jobs::LABEL_JOB) {
                continue; // a backup job beside the tenant, not its server
            }
            if let Some(other) = other_layout(&labels, &self.layout) {
                tracing::warn!(
                    "container {:?} belongs to the pgs layout in {other}, which uses the same \
                     docker.prefix {prefix:?}; left alone. Give one of the layouts its own \
                     [docker] prefix",
                    c.names
                );
                continue;
            }
            let Some(tenant) = labelled_tenant(&labels) else {
                tracing::warn!("container {:?} of installation {prefix} has no valid {LABEL_TENANT} label; ignored", c.names);
                continue;
            };
            let name = c
                .names
                .as_ref()
                .and_then(|n| n.first())
                .map(|n| n.trim_start_matches('/').to_owned())
                .unwrap_or_default();
            let entry = found
                .entry(tenant.clone())
                .or_insert_with(|| empty(&tenant));
            // Our own name wins over a stray container that merely carries our labels.
            if entry.container.is_some() && name != container_name(prefix, &tenant) {
                tracing::warn!(tenant = %tenant, "container {name} also carries this tenant's labels; ignored");
                continue;
            }
            entry.container = Some(name);
            entry.state = Some(run_state(
                &c.state.map(|s| s.to_string()).unwrap_or_default(),
            ));
            entry.spec = labels.get(LABEL_SPEC).and_then(|s| parse_spec_label(s));
        }
        for v in volumes.volumes.unwrap_or_default() {
            if let Some(other) = other_layout(&v.labels, &self.layout) {
                tracing::warn!(
                    "volume {} belongs to the pgs layout in {other}, which uses the same \
                     docker.prefix {prefix:?}; left alone",
                    v.name
                );
                continue;
            }
            let Some(tenant) = labelled_tenant(&v.labels) else {
                tracing::warn!(
                    "volume {} of installation {prefix} has no valid {LABEL_TENANT} label; ignored",
                    v.name
                );
                continue;
            };
            if v.name != self.volume_name(&tenant) {
                if v.name.starts_with(&volume_name(prefix, &tenant)) {
                    tracing::debug!(tenant = %tenant, "volume {} is a previous or restored copy of this tenant's data", v.name);
                } else {
                    tracing::warn!(tenant = %tenant, "volume {} carries this tenant's labels but not its name; ignored", v.name);
                }
                continue;
            }
            found
                .entry(tenant.clone())
                .or_insert_with(|| empty(&tenant))
                .volume = Some(v.name);
        }
        Ok(found.into_values().collect())
    }

    async fn ensure(&self, id: &TenantId, spec: &ManagedSpec) -> Result<(), DriverError> {
        self.check_volume_record(id)?;
        let image = spec
            .image
            .clone()
            .unwrap_or_else(|| self.settings.default_image.clone());
        let image_info = match self.docker.inspect_image(&image).await {
            Ok(info) => info,
            Err(e) if is_not_found(&e) => {
                return Err(DriverError::ImageMissing {
                    tenant: id.clone(),
                    image,
                })
            }
            Err(e) => return Err(self.engine_err(id, &format!("inspecting image {image}"), e)),
        };
        let image_sets_stop_signal = image_info
            .config
            .and_then(|c| c.stop_signal)
            .is_some_and(|s| !s.is_empty());
        for (key, _) in FIXED_SETTINGS {
            if spec.settings.contains_key(*key) {
                tracing::warn!(tenant = %id, "setting {key} is managed by pgs; the tenant's value is ignored");
            }
        }
        let max_connections = spec
            .max_connections
            .unwrap_or(self.settings.default_max_connections);
        if i64::from(max_connections) + 20 > self.settings.pids_limit {
            tracing::warn!(
                tenant = %id,
                "max_connections = {max_connections} is close to docker.pids_limit = {}: \
                 connections beyond the process limit will fail",
                self.settings.pids_limit
            );
        }
        // Refuse same-named objects we do not own before creating anything.
        let volume_exists = self.owned_volume(id).await?;
        let existing = self.owned_container(id).await?;
        let password_file = self.ensure_password(id).map_err(|e| {
            failed(
                id,
                format!(
                    "cannot prepare the password file {}: {e}",
                    self.paths.tenant_password_file(id).display()
                ),
            )
        })?;
        let socket_dir = self.prepare_socket_dir(id).map_err(|e| {
            failed(
                id,
                format!(
                    "cannot prepare the socket directory {}: {e}",
                    self.paths.tenant_socket_dir(id).display()
                ),
            )
        })?;
        let init_scripts = self.resolve_init_scripts(id, spec)?;
        // A repository that cannot be prepared costs the tenant its archiving, not its server.
        let archive = match spec.backups.then(|| self.prepare_repository(id)) {
            Some(Ok(repository)) => Some(Archive {
                repository,
                timeout_secs: self.backups.archive_timeout_secs,
            }),
            Some(Err(e)) => {
                tracing::warn!(
                    tenant = %id,
                    "cannot prepare the backup repository {}: {e}; the server runs without WAL \
                     archiving until it can",
                    self.paths.tenant_repository(id).display()
                );
                None
            }
            None => None,
        };
        let blueprint = Blueprint {
            volume: self.volume_name(id),
            archive,
            prefix: self.settings.prefix.clone(),
            layout: self.layout.clone(),
            tenant: id.clone(),
            spec: spec.clone(),
            image: image.clone(),
            image_sets_stop_signal,
            memory: self.memory_limit(id, spec)?,
            default_max_connections: self.settings.default_max_connections,
            pids_limit: self.settings.pids_limit,
            socket_dir,
            password_file,
            init_scripts,
        };
        let body = container_body(&blueprint);

        if !volume_exists {
            self.create_volume(id).await?;
        }

        let name = self.container_name(id);
        let Some(existing) = existing else {
            self.create_container(id, body).await?;
            return self.start_container(id).await;
        };
        let labels = existing
            .config
            .as_ref()
            .and_then(|c| c.labels.clone())
            .unwrap_or_default();
        let existing_image = existing.config.as_ref().and_then(|c| c.image.clone());
        let want_config = body
            .labels
            .as_ref()
            .and_then(|l| l.get(LABEL_CONFIG))
            .cloned();
        let status = existing
            .state
            .as_ref()
            .and_then(|s| s.status)
            .unwrap_or(ContainerStateStatusEnum::EMPTY);
        let reason = if labels
            .get(LABEL_SPEC)
            .and_then(|s| parse_spec_label(s))
            .as_ref()
            != Some(spec)
        {
            Some("its spec changed")
        } else if existing_image.as_deref() != Some(image.as_str()) {
            Some("its image changed")
        } else if labels.get(LABEL_CONFIG) != want_config.as_ref() {
            Some("the agent's settings for it changed")
        } else if status == ContainerStateStatusEnum::DEAD {
            Some("it is dead")
        } else {
            None
        };
        if let Some(reason) = reason {
            tracing::info!(
                tenant = %id,
                "replacing container {name}: {reason} (volume {} is kept)",
                self.volume_name(id)
            );
            self.stop_container(id).await?;
            self.remove_container(id).await?;
            self.create_container(id, body).await?;
            return self.start_container(id).await;
        }
        match status {
            ContainerStateStatusEnum::RUNNING | ContainerStateStatusEnum::RESTARTING => {
                tracing::debug!(tenant = %id, "container {name} is up to date and {status}");
                Ok(())
            }
            ContainerStateStatusEnum::PAUSED => {
                tracing::info!(tenant = %id, "unpausing container {name}");
                self.docker
                    .unpause_container(&name)
                    .await
                    .map_err(|e| self.engine_err(id, &format!("unpausing container {name}"), e))
            }
            _ => self.start_container(id).await,
        }
    }

    async fn wait_ready(&self, id: &TenantId, timeout: Duration) -> Result<(), DriverError> {
        let started = Instant::now();
        let deadline = started + timeout;
        let name = self.container_name(id);
        let login = self.admin_login(id)?;
        let mut restarts_at_start = None;
        loop {
            let Some(c) = self.owned_container(id).await? else {
                return Err(failed(id, format!("container {name} does not exist")));
            };
            let restarts = c.restart_count.unwrap_or(0);
            let first = *restarts_at_start.get_or_insert(restarts);
            if let Some(problem) = not_running(&c, first) {
                let logs = self.log_tail(id).await;
                return Err(failed(
                    id,
                    format!(
                        "container {name} {problem} while waiting for PostgreSQL to accept logins; its last log lines:\n{logs}"
                    ),
                ));
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            let attempt = remaining.clamp(Duration::from_millis(200), ATTEMPT_TIMEOUT);
            let last = if !login.socket.exists() {
                "no socket yet".to_owned()
            } else {
                match tokio::time::timeout(attempt, pgsql::login(&login)).await {
                    Ok(Ok(())) => {
                        tracing::info!(
                            tenant = %id,
                            "PostgreSQL accepts logins after {:.1}s",
                            started.elapsed().as_secs_f64()
                        );
                        return Ok(());
                    }
                    Ok(Err(e @ pgsql::ConnectError::Refused(_))) => {
                        let message = e.to_string();
                        let hint = if e.is_wrong_password() {
                            format!(
                                "; the data volume {} was initialized with another password \
                                     than the one in {}",
                                self.volume_name(id),
                                self.paths.tenant_password_file(id).display()
                            )
                        } else {
                            String::new()
                        };
                        return Err(failed(
                            id,
                            format!("PostgreSQL refused the tenant's login: {message}{hint}"),
                        ));
                    }
                    Ok(Err(pgsql::ConnectError::NotYet(message))) => message,
                    Err(_) => format!("no answer within {attempt:?}"),
                }
            };
            if Instant::now() >= deadline {
                tracing::warn!(tenant = %id, "not ready after {timeout:?}; last attempt: {last}");
                return Err(DriverError::NotReady {
                    tenant: id.clone(),
                    container: name,
                    timeout,
                });
            }
            tokio::time::sleep(POLL.min(deadline.saturating_duration_since(Instant::now()))).await;
        }
    }

    async fn start(&self, id: &TenantId) -> Result<(), DriverError> {
        if self.owned_container(id).await?.is_none() {
            return Err(failed(
                id,
                format!(
                    "container {} does not exist (ensure creates it)",
                    self.container_name(id)
                ),
            ));
        }
        self.start_container(id).await
    }

    async fn stop(&self, id: &TenantId) -> Result<(), DriverError> {
        match self.owned_container(id).await? {
            Some(_) => self.stop_container(id).await,
            None => Ok(()),
        }
    }

    async fn remove(&self, id: &TenantId, purge_data: bool) -> Result<Removed, DriverError> {
        let container = match self.owned_container(id).await? {
            Some(_) => {
                self.stop_container(id).await?;
                self.remove_container(id).await?;
                Some(self.container_name(id))
            }
            None => None,
        };
        let name = self.volume_name(id);
        let (volume, volume_purged) = match (self.owned_volume(id).await?, purge_data) {
            (false, _) => (None, false),
            (true, false) => {
                tracing::info!(tenant = %id, "keeping volume {name} (purge removes it)");
                (Some(name), false)
            }
            (true, true) => {
                tracing::info!(tenant = %id, "removing volume {name}");
                let options = RemoveVolumeOptionsBuilder::new().force(false).build();
                match self.docker.remove_volume(&name, Some(options)).await {
                    Ok(()) => {}
                    Err(e) if is_not_found(&e) => {}
                    Err(e) => {
                        return Err(self.engine_err(id, &format!("removing volume {name}"), e))
                    }
                }
                (Some(name), true)
            }
        };
        // The socket directory is re-created by ensure; a purge also takes the password (kept
        // otherwise, so a re-created tenant logs in to its old data).
        let socket_dir = self.paths.tenant_socket_dir(id);
        if let Err(e) = fs::remove_dir_all(&socket_dir) {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::warn!(tenant = %id, "cannot remove {}: {e}", socket_dir.display());
            }
        }
        if purge_data {
            for other in self.tenant_volumes(id).await? {
                self.remove_named_volume(id, &other).await?;
            }
            if let Err(e) = fs::remove_file(self.paths.tenant_volume_record(id)) {
                if e.kind() != io::ErrorKind::NotFound {
                    tracing::warn!(tenant = %id, "cannot remove the volume record: {e}");
                }
            }
            let pw = self.paths.tenant_password_file(id);
            if let Err(e) = fs::remove_file(&pw) {
                if e.kind() != io::ErrorKind::NotFound {
                    tracing::warn!(tenant = %id, "cannot remove {}: {e}", pw.display());
                }
            }
            let roles = self.paths.tenant_roles_dir(id);
            if let Err(e) = fs::remove_dir_all(&roles) {
                if e.kind() != io::ErrorKind::NotFound {
                    tracing::warn!(tenant = %id, "cannot remove {}: {e}", roles.display());
                }
            }
        }
        Ok(Removed {
            container,
            volume,
            volume_purged,
        })
    }
}

// ----- pure parts -----------------------------------------------------------------------------

/// `{prefix}-{tenant}`.
pub fn container_name(prefix: &str, id: &TenantId) -> String {
    format!("{prefix}-{id}")
}

/// `{prefix}-{tenant}-data`.
pub fn volume_name(prefix: &str, id: &TenantId) -> String {
    format!("{prefix}-{id}-data")
}

/// The labels that make an object ours.
pub fn ownership_labels(prefix: &str, layout: &str, id: &TenantId) -> HashMap<String, String> {
    HashMap::from([
        (LABEL_MANAGED.to_owned(), "1".to_owned()),
        (LABEL_INSTALLATION.to_owned(), prefix.to_owned()),
        (LABEL_LAYOUT.to_owned(), layout.to_owned()),
        (LABEL_TENANT.to_owned(), id.to_string()),
    ])
}

/// True when `labels` say the object belongs to tenant `id` of installation `prefix` in this
/// layout. Objects made before `io.pgs.layout` existed lack it and still count as ours.
pub fn is_owned(
    labels: Option<&HashMap<String, String>>,
    prefix: &str,
    layout: &str,
    id: &TenantId,
) -> bool {
    let Some(labels) = labels else { return false };
    labels.get(LABEL_MANAGED).map(String::as_str) == Some("1")
        && labels.get(LABEL_INSTALLATION).map(String::as_str) == Some(prefix)
        && labels.get(LABEL_TENANT).map(String::as_str) == Some(id.as_str())
        && other_layout(labels, layout).is_none()
}

/// The other layout an object belongs to, if its `io.pgs.layout` names one.
fn other_layout<'a>(labels: &'a HashMap<String, String>, layout: &str) -> Option<&'a str> {
    labels
        .get(LABEL_LAYOUT)
        .map(String::as_str)
        .filter(|l| *l != layout)
}

/// A layout's identity: the absolute directory of its pgs.toml.
pub fn layout_id(config: &Path) -> String {
    let config = std::fs::canonicalize(config).unwrap_or_else(|_| config.to_path_buf());
    config
        .parent()
        .unwrap_or(Path::new("/"))
        .display()
        .to_string()
}

fn labelled_tenant(labels: &HashMap<String, String>) -> Option<TenantId> {
    labels
        .get(LABEL_TENANT)
        .and_then(|t| TenantId::parse(t).ok())
}

/// The `io.pgs.spec` label value.
pub fn spec_label(spec: &ManagedSpec) -> String {
    serde_json::to_string(spec).unwrap_or_default()
}

/// Reads an `io.pgs.spec` label back; `None` when it is not a spec.
pub fn parse_spec_label(label: &str) -> Option<ManagedSpec> {
    serde_json::from_str(label).ok()
}

/// The engine's container state (`running`, `exited`, ...) as the planner sees it.
pub fn run_state(status: &str) -> RunState {
    match status {
        "running" => RunState::Running,
        "created" | "exited" => RunState::Stopped,
        _ => RunState::Unhealthy,
    }
}

/// The PostgreSQL settings of a tenant's server, as `postgres -c` will get them: small
/// defaults (shared_buffers = memory/16, at least 16MB; effective_cache_size = memory/2), then
/// `max_connections`, then the tenant's own settings, then the fixed listening settings.
pub fn server_settings(
    spec: &ManagedSpec,
    memory: u64,
    default_max_connections: u32,
) -> BTreeMap<String, String> {
    const MB: u64 = 1 << 20;
    let mut out: BTreeMap<String, String> = SMALL_DEFAULTS
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    out.insert(
        "shared_buffers".into(),
        format!("{}MB", (memory / 16 / MB).max(16)),
    );
    out.insert(
        "effective_cache_size".into(),
        format!("{}MB", (memory / 2 / MB).max(32)),
    );
    out.insert(
        "max_connections".into(),
        spec.max_connections
            .unwrap_or(default_max_connections)
            .to_string(),
    );
    for (k, v) in &spec.settings {
        out.insert(k.clone(), v.clone());
    }
    for (k, v) in FIXED_SETTINGS {
        out.insert((*k).to_owned(), (*v).to_owned());
    }
    out
}

/// `postgres -c k=v ...`
pub fn server_command(settings: &BTreeMap<String, String>) -> Vec<String> {
    let mut cmd = vec!["postgres".to_owned()];
    for (k, v) in settings {
        cmd.push("-c".to_owned());
        cmd.push(format!("{k}={v}"));
    }
    cmd
}

/// Where init script number `index` (0-based) appears in the container: `NN-<file name>`, so
/// the entrypoint runs them in the tenant's order.
pub fn init_script_target(index: usize, host: &Path) -> String {
    let file = host
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_else(|| "script.sql".into());
    format!("{INITDB_DIR}/{:02}-{file}", index + 1)
}

/// Everything a tenant's container is made from.
#[derive(Debug, Clone)]
struct Blueprint {
    prefix: String,
    layout: String,
    tenant: TenantId,
    spec: ManagedSpec,
    image: String,
    image_sets_stop_signal: bool,
    memory: u64,
    default_max_connections: u32,
    pids_limit: i64,
    socket_dir: PathBuf,
    password_file: PathBuf,
    init_scripts: Vec<PathBuf>,
    /// The data volume (named after the tenant unless a restore moved it).
    volume: String,
    /// Continuous archiving into the tenant's repository, when backups are on.
    archive: Option<Archive>,
}

/// What a tenant's container needs for continuous WAL archiving.
#[derive(Debug, Clone)]
struct Archive {
    repository: PathBuf,
    timeout_secs: u64,
}

/// The environment that configures pgBackRest for a tenant (no secret in it): stanza = tenant
/// id, repository and data directory where the containers mount them, no log files.
pub fn pgbackrest_env(id: &TenantId) -> Vec<String> {
    vec![
        format!("PGBACKREST_STANZA={id}"),
        format!("PGBACKREST_REPO1_PATH={REPO_DIR}"),
        format!("PGBACKREST_PG1_PATH={DATA_DIR}"),
        format!("PGBACKREST_PG1_SOCKET_PATH={SOCKET_DIR}"),
        format!("PGBACKREST_PG1_USER={id}"),
        format!("PGBACKREST_PG1_DATABASE={id}"),
        "PGBACKREST_LOG_LEVEL_FILE=off".to_owned(),
        "PGBACKREST_LOG_LEVEL_CONSOLE=warn".to_owned(),
        "PGBACKREST_LOG_LEVEL_STDERR=error".to_owned(),
    ]
}

/// Written by the `archive_command` in the tenant's socket directory (on the host, and writable
/// even when the repository is not): one line `<unix time> <segment>` per failed push.
pub const ARCHIVE_FAILURES: &str = "pgs-archive-failures";

/// The `archive_command`: push each WAL segment into the repository once its stanza exists
/// (segments from before the first backup can restore nothing, so they are not kept); a failed
/// push is noted in the socket directory for the agent to report and count.
pub fn archive_command() -> String {
    format!(
        "[ ! -e {REPO_DIR}/archive/\"$PGBACKREST_STANZA\"/archive.info ] || pgbackrest archive-push %p \
         || {{ echo \"$(date +%s) %f\" >> {SOCKET_DIR}/{ARCHIVE_FAILURES}; exit 1; }}"
    )
}

/// A bind mount of a host path (also the backup jobs' mounts).
pub(crate) fn bind(source: &Path, target: &str, read_only: bool) -> Mount {
    Mount {
        typ: Some(MountType::BIND),
        source: Some(source.to_string_lossy().into_owned()),
        target: Some(target.to_owned()),
        read_only: Some(read_only),
        ..Default::default()
    }
}

/// The container create request. The password is only ever a mounted file.
fn container_body(bp: &Blueprint) -> ContainerCreateBody {
    let id = &bp.tenant;
    let mut mounts = vec![
        Mount {
            typ: Some(MountType::VOLUME),
            source: Some(bp.volume.clone()),
            target: Some(DATA_DIR.to_owned()),
            ..Default::default()
        },
        bind(&bp.socket_dir, SOCKET_DIR, false),
        bind(&bp.password_file, PASSWORD_MOUNT, true),
    ];
    for (i, script) in bp.init_scripts.iter().enumerate() {
        mounts.push(bind(script, &init_script_target(i, script), true));
    }
    if let Some(a) = &bp.archive {
        mounts.push(bind(&a.repository, REPO_DIR, false));
    }
    let memory = i64::try_from(bp.memory).unwrap_or(i64::MAX);
    let host_config = HostConfig {
        mounts: Some(mounts),
        network_mode: Some("none".to_owned()),
        memory: Some(memory),
        memory_swap: Some(memory),
        nano_cpus: bp.spec.cpus.map(|c| (c * 1e9).round() as i64),
        pids_limit: Some(bp.pids_limit),
        restart_policy: Some(RestartPolicy {
            name: Some(RestartPolicyNameEnum::UNLESS_STOPPED),
            maximum_retry_count: None,
        }),
        cap_drop: Some(vec!["ALL".to_owned()]),
        security_opt: Some(vec!["no-new-privileges".to_owned()]),
        ..Default::default()
    };
    let mut settings = server_settings(&bp.spec, bp.memory, bp.default_max_connections);
    let mut env = vec![
        format!("POSTGRES_USER={id}"),
        format!("POSTGRES_DB={id}"),
        format!("POSTGRES_PASSWORD_FILE={PASSWORD_MOUNT}"),
        // The entrypoint keeps the container up while the server sleeps (signals, see
        // `DockerDriver::signal_server`).
        "PGS_SUPERVISE=1".to_owned(),
    ];
    if let Some(a) = &bp.archive {
        env.extend(pgbackrest_env(id));
        settings.insert("archive_mode".into(), "on".into());
        settings.insert("archive_command".into(), archive_command());
        settings.insert("archive_timeout".into(), a.timeout_secs.to_string());
    }
    let mut body = ContainerCreateBody {
        image: Some(bp.image.clone()),
        env: Some(env),
        cmd: Some(server_command(&settings)),
        stop_signal: (!bp.image_sets_stop_signal).then(|| "SIGINT".to_owned()),
        stop_timeout: Some(i64::from(STOP_TIMEOUT_SECS)),
        host_config: Some(host_config),
        ..Default::default()
    };
    let config_hash = format!(
        "{:016x}",
        fnv1a64(&serde_json::to_vec(&body).unwrap_or_default())
    );
    let mut labels = ownership_labels(&bp.prefix, &bp.layout, id);
    labels.insert(LABEL_SPEC.to_owned(), spec_label(&bp.spec));
    labels.insert(LABEL_CONFIG.to_owned(), config_hash);
    body.labels = Some(labels);
    body
}

/// Stable 64-bit FNV-1a (std's hasher may change between Rust releases; labels must not).
fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Why a container that should be starting up is not (`None` while it runs).
fn not_running(c: &ContainerInspectResponse, restarts_at_start: i64) -> Option<String> {
    let state = c.state.as_ref()?;
    let status = state.status.unwrap_or(ContainerStateStatusEnum::EMPTY);
    let restarts = c.restart_count.unwrap_or(0);
    if status == ContainerStateStatusEnum::RUNNING && restarts == restarts_at_start {
        return None;
    }
    let mut why = match status {
        ContainerStateStatusEnum::EXITED | ContainerStateStatusEnum::DEAD => {
            format!("exited with code {}", state.exit_code.unwrap_or(-1))
        }
        ContainerStateStatusEnum::RESTARTING => format!(
            "exited with code {} and is being restarted by the engine (restart count {restarts})",
            state.exit_code.unwrap_or(-1)
        ),
        ContainerStateStatusEnum::RUNNING => {
            format!("crashed and was restarted by the engine (restart count {restarts})")
        }
        other => format!("is not running (state {other})"),
    };
    if state.oom_killed == Some(true) {
        why.push_str(" after running out of memory (raise the tenant's memory limit)");
    }
    if let Some(err) = state.error.as_deref().filter(|e| !e.is_empty()) {
        why.push_str(&format!(" ({err})"));
    }
    Some(why)
}

/// The last `n` lines of `text`, with `secret` masked.
fn tail_lines(text: &str, n: usize, secret: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(n)..].join("\n");
    if secret.is_empty() {
        tail
    } else {
        tail.replace(secret, "********")
    }
}

/// 32 random bytes as 64 hex digits: nothing a shell, a URL or a conninfo string would mangle.
pub(crate) fn generate_password() -> io::Result<String> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| io::Error::other(format!("getrandom: {e}")))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

fn failed(tenant: &TenantId, message: String) -> DriverError {
    DriverError::Failed {
        tenant: tenant.clone(),
        message,
    }
}

fn not_ours(
    id: &TenantId,
    kind: &str,
    name: &str,
    labels: Option<&HashMap<String, String>>,
    prefix: &str,
) -> DriverError {
    if let Some(other) = labels.and_then(|l| l.get(LABEL_LAYOUT)) {
        return failed(
            id,
            format!(
                "the {kind} {name} belongs to the pgs layout in {other}, which uses the same \
                 docker.prefix {prefix:?}; pgs never touches another layout's objects: give \
                 this layout its own [docker] prefix in pgs.toml"
            ),
        );
    }
    failed(
        id,
        format!(
            "a {kind} named {name} exists but does not carry pgs's labels \
             ({LABEL_MANAGED}=1, {LABEL_INSTALLATION}={prefix}, {LABEL_TENANT}={id}); pgs never \
             modifies or removes what it does not own: rename or remove it yourself, or use \
             another docker.prefix"
        ),
    )
}

fn is_not_found(e: &EngineError) -> bool {
    matches!(
        e,
        EngineError::DockerResponseServerError {
            status_code: 404,
            ..
        }
    )
}

fn unavailable(socket: &Path, doing: &str, e: &EngineError) -> DriverError {
    DriverError::Unavailable(format!(
        "docker engine at {}: {doing} failed: {}; is dockerd running? start it with \
         `scripts/start-dockerd.sh` or `systemctl start docker`, or set [docker] socket in \
         pgs.toml to the engine's socket",
        socket.display(),
        with_causes(e)
    ))
}

/// An error and its sources (hyper's own message is just "client error (Connect)").
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let more = cause.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = cause.source();
    }
    text
}

fn listing_err(socket: &Path, prefix: &str, what: &str, e: EngineError) -> DriverError {
    match e {
        EngineError::DockerResponseServerError {
            status_code,
            message,
        } => DriverError::Unavailable(format!(
            "listing {what} of installation {prefix}: {message} (engine status {status_code})"
        )),
        other => unavailable(socket, &format!("listing {what}"), &other),
    }
}

// ----- readiness: a real SCRAM-SHA-256 login over the unix socket -----------------------------

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> TenantId {
        TenantId::parse(s).unwrap()
    }

    fn blueprint(spec: ManagedSpec) -> Blueprint {
        Blueprint {
            prefix: "pgs".into(),
            layout: "/srv/pgs".into(),
            tenant: id("acme"),
            spec,
            image: "pgs/postgres:15".into(),
            image_sets_stop_signal: true,
            memory: 256 << 20,
            default_max_connections: 20,
            pids_limit: 200,
            socket_dir: "/srv/pgs/run/tenants/acme".into(),
            password_file: "/srv/pgs/state/secrets/acme.password".into(),
            init_scripts: vec!["/srv/pgs/init/schema.sql".into(), "/x/seed.sh".into()],
            volume: "pgs-acme-data".into(),
            archive: None,
        }
    }

    #[test]
    fn names_follow_the_prefix() {
        assert_eq!(container_name("pgs", &id("acme")), "pgs-acme");
        assert_eq!(volume_name("pgs-test-1", &id("a_1")), "pgs-test-1-a_1-data");
    }

    #[test]
    fn ownership_needs_all_three_labels_and_no_other_layout() {
        let labels = ownership_labels("pgs", "/srv/pgs", &id("acme"));
        let owned = |l: Option<&HashMap<String, String>>, prefix, layout, t| {
            is_owned(l, prefix, layout, &id(t))
        };
        assert!(owned(Some(&labels), "pgs", "/srv/pgs", "acme"));
        assert!(!owned(Some(&labels), "pgs2", "/srv/pgs", "acme"));
        assert!(!owned(Some(&labels), "pgs", "/srv/pgs", "globex"));
        assert!(!owned(None, "pgs", "/srv/pgs", "acme"));
        // Another layout with the same prefix leaves it alone.
        assert!(!owned(Some(&labels), "pgs", "/var/lib/pgs-demo", "acme"));
        for key in [LABEL_MANAGED, LABEL_INSTALLATION, LABEL_TENANT] {
            let mut partial = labels.clone();
            partial.remove(key);
            assert!(!owned(Some(&partial), "pgs", "/srv/pgs", "acme"), "{key}");
        }
        // Made before the layout label existed: still ours.
        let mut legacy = labels.clone();
        legacy.remove(LABEL_LAYOUT);
        assert!(owned(Some(&legacy), "pgs", "/srv/pgs", "acme"));
    }

    #[test]
    fn a_layout_is_named_by_the_absolute_directory_of_its_settings() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("pgs.toml"), "").unwrap();
        let canonical = std::fs::canonicalize(dir.path()).unwrap();
        assert_eq!(
            layout_id(&dir.path().join("pgs.toml")),
            canonical.display().to_string()
        );
    }

    #[test]
    fn states_map_to_run_states() {
        assert_eq!(run_state("running"), RunState::Running);
        assert_eq!(run_state("created"), RunState::Stopped);
        assert_eq!(run_state("exited"), RunState::Stopped);
        for other in ["restarting", "paused", "dead", "removing", ""] {
            assert_eq!(run_state(other), RunState::Unhealthy, "{other}");
        }
    }

    #[test]
    fn spec_label_round_trips() {
        let spec = ManagedSpec {
            image: Some("pgs/postgres:16".into()),
            memory: Some(512 << 20),
            cpus: Some(0.3),
            max_connections: Some(42),
            settings: BTreeMap::from([("work_mem".into(), "8MB".into())]),
            init_scripts: vec!["init/a.sql".into()],
            backups: false,
        };
        assert_eq!(parse_spec_label(&spec_label(&spec)), Some(spec));
        // Labels written before backups existed read as backups on.
        assert_eq!(
            parse_spec_label(
                r#"{"image":null,"memory":null,"cpus":null,"max_connections":null,"settings":{},"init_scripts":[]}"#
            ),
            Some(ManagedSpec::default())
        );
        assert_eq!(
            parse_spec_label(&spec_label(&ManagedSpec::default())),
            Some(ManagedSpec::default())
        );
        assert_eq!(parse_spec_label("not json"), None);
    }

    #[test]
    fn server_settings_are_small_and_overridable() {
        let s = server_settings(&ManagedSpec::default(), 256 << 20, 20);
        assert_eq!(s["shared_buffers"], "16MB");
        assert_eq!(s["effective_cache_size"], "128MB");
        assert_eq!(s["max_connections"], "20");
        assert_eq!(s["listen_addresses"], "");
        assert_eq!(s["unix_socket_directories"], "/var/run/postgresql");
        let s = server_settings(&ManagedSpec::default(), 2 << 30, 20);
        assert_eq!(s["shared_buffers"], "128MB");

        let spec = ManagedSpec {
            max_connections: Some(50),
            settings: BTreeMap::from([
                ("work_mem".into(), "64MB".into()),
                ("shared_buffers".into(), "32MB".into()),
                ("listen_addresses".into(), "*".into()),
                ("port".into(), "5433".into()),
            ]),
            ..Default::default()
        };
        let s = server_settings(&spec, 256 << 20, 20);
        assert_eq!(s["max_connections"], "50");
        assert_eq!(s["work_mem"], "64MB");
        assert_eq!(s["shared_buffers"], "32MB");
        assert_eq!(s["listen_addresses"], "", "fixed settings win");
        assert_eq!(s["port"], "5432");
        let cmd = server_command(&s);
        assert_eq!(cmd[0], "postgres");
        assert!(cmd.windows(2).all(|w| w[0] != "-c" || w[1].contains('=')));
        assert!(cmd.contains(&"max_connections=50".to_string()));
        assert!(cmd.contains(&"listen_addresses=".to_string()));
        assert_eq!(cmd.len(), 1 + 2 * s.len());
    }

    #[test]
    fn container_body_has_mounts_limits_and_no_password() {
        let spec = ManagedSpec {
            memory: Some(300 << 20),
            cpus: Some(0.5),
            ..Default::default()
        };
        let mut bp = blueprint(spec.clone());
        bp.memory = 300 << 20;
        let body = container_body(&bp);
        let env = body.env.clone().unwrap();
        assert_eq!(
            env,
            [
                "POSTGRES_USER=acme",
                "POSTGRES_DB=acme",
                "POSTGRES_PASSWORD_FILE=/run/secrets/pgs-password",
                "PGS_SUPERVISE=1"
            ]
        );
        let host = body.host_config.clone().unwrap();
        assert_eq!(host.network_mode.as_deref(), Some("none"));
        assert_eq!(host.memory, Some(300 << 20));
        assert_eq!(host.nano_cpus, Some(500_000_000));
        assert_eq!(host.pids_limit, Some(200));
        assert_eq!(
            host.restart_policy.unwrap().name,
            Some(RestartPolicyNameEnum::UNLESS_STOPPED)
        );
        let mounts: Vec<(String, String, bool)> = host
            .mounts
            .unwrap()
            .into_iter()
            .map(|m| {
                (
                    m.source.unwrap(),
                    m.target.unwrap(),
                    m.read_only.unwrap_or(false),
                )
            })
            .collect();
        assert_eq!(
            mounts,
            [
                ("pgs-acme-data".into(), DATA_DIR.into(), false),
                ("/srv/pgs/run/tenants/acme".into(), SOCKET_DIR.into(), false),
                (
                    "/srv/pgs/state/secrets/acme.password".into(),
                    PASSWORD_MOUNT.into(),
                    true
                ),
                (
                    "/srv/pgs/init/schema.sql".into(),
                    "/docker-entrypoint-initdb.d/01-schema.sql".into(),
                    true
                ),
                (
                    "/x/seed.sh".into(),
                    "/docker-entrypoint-initdb.d/02-seed.sh".into(),
                    true
                ),
            ]
        );
        let labels = body.labels.clone().unwrap();
        assert!(is_owned(Some(&labels), "pgs", "/srv/pgs", &id("acme")));
        assert_eq!(parse_spec_label(&labels[LABEL_SPEC]), Some(spec));
        assert_eq!(body.stop_signal, None, "the image sets it");
        assert_eq!(body.stop_timeout, Some(10));
        bp.image_sets_stop_signal = false;
        assert_eq!(container_body(&bp).stop_signal.as_deref(), Some("SIGINT"));
    }

    #[test]
    fn a_tenant_with_backups_archives_into_its_repository() {
        let mut bp = blueprint(ManagedSpec::default());
        bp.archive = Some(Archive {
            repository: "/srv/pgs/backups/acme".into(),
            timeout_secs: 60,
        });
        let body = container_body(&bp);
        let mounts = body.host_config.clone().unwrap().mounts.unwrap();
        let repo = mounts.last().unwrap();
        assert_eq!(repo.source.as_deref(), Some("/srv/pgs/backups/acme"));
        assert_eq!(repo.target.as_deref(), Some(REPO_DIR));
        assert_eq!(repo.read_only, Some(false));
        let env = body.env.clone().unwrap();
        assert!(
            env.contains(&"PGBACKREST_STANZA=acme".to_string()),
            "{env:?}"
        );
        assert!(env.iter().all(|e| !e.contains("PASSWORD=")), "{env:?}");
        let cmd = body.cmd.clone().unwrap();
        assert!(cmd.contains(&"archive_mode=on".to_string()), "{cmd:?}");
        assert!(cmd.contains(&"archive_timeout=60".to_string()), "{cmd:?}");
        assert!(cmd.contains(&format!("archive_command={}", archive_command())));
        let without = container_body(&blueprint(ManagedSpec::default()));
        assert_ne!(
            body.labels.as_ref().unwrap()[LABEL_CONFIG],
            without.labels.as_ref().unwrap()[LABEL_CONFIG],
            "turning backups on replaces the container"
        );
    }

    #[test]
    fn config_hash_follows_the_effective_config() {
        let a = container_body(&blueprint(ManagedSpec::default()));
        let b = container_body(&blueprint(ManagedSpec::default()));
        assert_eq!(
            a.labels.as_ref().unwrap()[LABEL_CONFIG],
            b.labels.as_ref().unwrap()[LABEL_CONFIG]
        );
        let mut other = blueprint(ManagedSpec::default());
        other.pids_limit = 100;
        let c = container_body(&other);
        assert_ne!(
            a.labels.as_ref().unwrap()[LABEL_CONFIG],
            c.labels.as_ref().unwrap()[LABEL_CONFIG]
        );
    }

    #[test]
    fn passwords_are_64_hex_digits_and_differ() {
        let a = generate_password().unwrap();
        let b = generate_password().unwrap();
        assert_eq!(a.len(), 64);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }

    #[test]
    fn log_tails_are_short_and_masked() {
        let text = (1..=30)
            .map(|i| format!("line {i} s3cret"))
            .collect::<Vec<_>>()
            .join("\n");
        let tail = tail_lines(&text, 20, "s3cret");
        assert_eq!(tail.lines().count(), 20);
        assert!(tail.starts_with("line 11 ********"));
        assert!(!tail.contains("s3cret"));
    }

    #[tokio::test]
    async fn a_missing_engine_is_explained() {
        let dir = tempfile::tempdir().unwrap();
        let settings = DockerSettings {
            socket: dir.path().join("docker.sock"),
            ..Default::default()
        };
        let paths = Paths::new(&dir.path().join("pgs.toml"), &Default::default());
        let err = DockerDriver::connect(&settings, &paths).await.unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, DriverError::Unavailable(_)), "{text}");
        assert!(
            text.contains(&settings.socket.display().to_string()),
            "{text}"
        );
        assert!(text.contains("scripts/start-dockerd.sh"), "{text}");
        // A socket nobody listens on.
        let _ = std::os::unix::net::UnixListener::bind(&settings.socket).map(drop);
        let err = DockerDriver::connect(&settings, &paths).await.unwrap_err();
        assert!(err.to_string().contains("is dockerd running?"), "{err}");
    }
}
