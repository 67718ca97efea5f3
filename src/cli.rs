//! Command-line definitions (clap) and nothing else: what each command does lives in `commands`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::settings::DEFAULT_CONFIG;
use crate::tenants::TenantId;

#[derive(Debug, Parser)]
#[command(
    name = "pgs-agent",
    version,
    about = "Give every tenant its own PostgreSQL server behind one HAProxy port.",
    long_about = "Give every tenant its own PostgreSQL server behind one HAProxy port.\n\n\
        HAProxy carries every byte; pgs-agent is the control plane. It renders HAProxy's \
        configuration and maps from a tenants file, and flips access through HAProxy's \
        Runtime API without reloads.",
    after_help = "Start here:\n  \
        pgs-agent init /srv/pgs                      create a layout (settings, tenants file, folders)\n  \
        pgs-agent -c /srv/pgs/pgs.toml render        write HAProxy's config, maps and Lua\n  \
        haproxy -W -S /srv/pgs/run/master.sock -f /srv/pgs/haproxy/pgs.cfg"
)]
pub struct Cli {
    /// Agent settings file (pgs.toml), as written by `pgs-agent init`.
    #[arg(
        short,
        long,
        global = true,
        env = "PGS_CONFIG",
        default_value = DEFAULT_CONFIG,
        value_name = "FILE"
    )]
    pub config: PathBuf,

    /// Log filter (tracing syntax), e.g. `debug` or `pgs_agent=trace`.
    #[arg(long, global = true, env = "PGS_LOG", default_value = "info")]
    pub log: String,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a self-contained layout in DIR: pgs.toml, an empty tenants.json and the folders
    /// HAProxy and the agent use. Works without root. Refuses to touch an existing layout.
    Init(InitArgs),

    /// Render HAProxy's configuration, maps and Lua router from the tenants file, check them with
    /// `haproxy -c`, and write them (atomically, only files that changed). Does not reload.
    Render,

    /// Check what `render` would write with `haproxy -c`, without writing it. Prints HAProxy's
    /// own message when it refuses.
    Check,

    /// Show what `sync` would change (servers, HAProxy config, maps), changing nothing.
    Plan {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },

    /// Make Docker and HAProxy match the tenants file once, and exit. Safe from cron or CI while
    /// `run` is active (one writer at a time). Exit codes: 0 = already in sync, 2 = changed
    /// something and now in sync, 1 = failed (nothing half-done is left routable).
    Sync {
        /// Print the plan and change nothing (exit 0 when in sync, 2 when changes are due).
        #[arg(long)]
        dry_run: bool,
        /// Machine-readable report.
        #[arg(long)]
        json: bool,
    },

    /// Run the agent: reconcile on every change of the tenants file, on Docker events (a tenant
    /// container that dies is started again), on SIGHUP and every --resync seconds. SIGTERM
    /// finishes the current pass and exits. Speaks systemd's notify protocol when NOTIFY_SOCKET
    /// is set. Serves the HTTP API on [api] listen (bearer token in DIR/secrets/api-token).
    Run {
        /// Seconds between full passes that repair drift no event announced.
        #[arg(long, default_value_t = 30, value_name = "SECONDS")]
        resync: u64,
    },

    /// Create, delete, start, stop and inspect tenants whose PostgreSQL server pgs runs.
    #[command(subcommand)]
    Tenant(TenantCommand),

    /// Turn a tenant's access on or off, instantly: the tenants file, the map file and the
    /// running HAProxy (Runtime API, no reload) change together.
    #[command(subcommand)]
    Access(AccessCommand),

    /// TLS to clients: the certificates HAProxy serves ([tls] in the settings).
    #[command(subcommand)]
    Tls(TlsCommand),
}

#[derive(Debug, Subcommand)]
pub enum TlsCommand {
    /// Each certificate file: subject, names, expiry, and whether the running HAProxy serves
    /// exactly it. A renewed file is served within seconds by `run` (it watches the directory),
    /// or by the next `sync`, without a reload.
    Status {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum AccessCommand {
    /// Allow new connections to the tenant.
    Enable {
        /// Tenant id.
        id: TenantId,
    },
    /// Refuse new connections to the tenant. Sessions already open keep running unless
    /// --terminate is given; new ones get `FATAL: tenant "ID" is not available`.
    Disable {
        /// Tenant id.
        id: TenantId,
        /// Also end the tenant's open sessions now.
        #[arg(long)]
        terminate: bool,
    },
    /// Show access as the tenants file, the map file and the running HAProxy see it, and flag
    /// any disagreement (repaired by the next `access` command or sync).
    Status {
        /// Only this tenant.
        id: Option<TenantId>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
pub struct InitArgs {
    /// Directory to create the layout in (created if missing; must not hold a layout yet).
    pub dir: PathBuf,

    /// Address HAProxy accepts PostgreSQL clients on.
    #[arg(long, value_name = "HOST:PORT", default_value = crate::settings::DEFAULT_LISTEN)]
    pub listen: String,

    /// Address (HOST:PORT or a unix socket path) `run` serves the HTTP API on; "" for none.
    #[arg(long, value_name = "HOST:PORT", default_value = crate::settings::DEFAULT_API_LISTEN)]
    pub api_listen: String,

    /// Name prefix of this layout's containers and volumes (`PREFIX-acme`). Give every layout
    /// on one Docker engine its own.
    #[arg(long, value_name = "NAME", default_value = "pgs")]
    pub docker_prefix: String,

    /// Turn on TLS to clients: a PEM file with the certificate chain and its private key (as
    /// HAProxy reads it, e.g. `cat fullchain.pem privkey.pem`). It is copied into DIR/tls/
    /// (mode 0600) and served to clients that ask with `sslmode=require` or PostgreSQL 17's
    /// direct SSL.
    #[arg(long, value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,

    /// With --tls-cert: the tenant domain. A client whose SNI ends in .DOMAIN must name its own
    /// tenant there (host acme.DOMAIN for user acme); SNI is never required.
    #[arg(long, value_name = "DOMAIN", requires = "tls_cert")]
    pub tls_domain: Option<String>,

    /// With --tls-cert: `optional` (plaintext and TLS) or `required` (plaintext startups are
    /// refused with a FATAL that says to use TLS).
    #[arg(long, value_name = "MODE", requires = "tls_cert", default_value = "optional", value_parser = ["optional", "required"])]
    pub tls_mode: String,
}

#[derive(Debug, Subcommand)]
pub enum TenantCommand {
    /// Provision a tenant: data volume, container, wait until PostgreSQL accepts logins, add its
    /// HAProxy backend (one reload). Access stays disabled unless --enable.
    Create(CreateArgs),
    /// Remove a tenant: access off, backend gone, container removed. Its data volume is kept
    /// (its name is printed) unless --purge-data.
    Delete {
        /// Tenant id.
        id: TenantId,
        /// Also delete the tenant's data volume. This cannot be undone.
        #[arg(long)]
        purge_data: bool,
    },
    /// Start a stopped tenant's server and route to it again.
    Start {
        /// Tenant id.
        id: TenantId,
    },
    /// Stop a tenant's server (data kept). New connections are refused while it is stopped.
    Stop {
        /// Tenant id.
        id: TenantId,
    },
    /// List tenants with their access and server state.
    List {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// One tenant: spec, server state, access, socket. No secrets.
    Show {
        /// Tenant id.
        id: TenantId,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Print how to connect through HAProxy, with the tenant's password. The only command
    /// that reveals a password.
    ///
    /// `--format env` keeps the password off command lines (where `ps` shows it):
    /// `(eval "$(pgs-agent tenant credentials acme --format env)" && psql)`.
    /// `--role app` prints how to connect as the tenant's role `app` (user `app.acme`);
    /// `--rotate` first sets a new password (printed, and stored for later `credentials` calls; the old one stops working).
    Credentials {
        /// Tenant id.
        id: TenantId,
        /// uri: a postgresql:// URI; env: `export PGHOST=... PGPASSWORD=...` for a shell to
        /// eval; pgpass: a line for ~/.pgpass (mode 0600).
        #[arg(long, value_enum, default_value_t = CredentialsFormat::Uri)]
        format: CredentialsFormat,
        /// One of the roles the tenant declares in the tenants file (`managed.roles`).
        #[arg(long, value_name = "ROLE")]
        role: Option<String>,
        /// Set a new password first, on the server and in the agent's secrets.
        #[arg(long)]
        rotate: bool,
    },
    /// Back the tenant up now (pgBackRest): incremental, or full with --full or when it has
    /// none yet. Works on a stopped tenant too (an offline backup).
    Backup {
        /// Tenant id.
        id: TenantId,
        /// A full backup instead of an incremental one.
        #[arg(long)]
        full: bool,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// List the tenant's backups (label, type, start and stop, size) and the window of times a
    /// restore can reach, plus its last verify and restore test.
    Backups {
        /// Tenant id.
        id: TenantId,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Restore the tenant's data as it was at a time, at a backup, or as late as the
    /// repository reaches. The data goes into a NEW volume; then the tenant is stopped (new
    /// connections are refused, open sessions end), moved onto it and started again, and the
    /// previous volume is kept (`tenant volumes ID --purge-old` removes it). With --into, a new
    /// tenant is made from the copy instead and the original is not touched.
    #[command(group(clap::ArgGroup::new("target").required(true).args(["to", "backup", "latest"])))]
    Restore {
        /// Tenant id.
        id: TenantId,
        /// A time inside the restore window, e.g. "2026-12-05 14:02:00+00" (no zone: UTC).
        #[arg(long, value_name = "TIME")]
        to: Option<String>,
        /// A backup label from `tenant backups ID`.
        #[arg(long, value_name = "LABEL")]
        backup: Option<String>,
        /// Everything the repository holds.
        #[arg(long)]
        latest: bool,
        /// Make a new tenant NEWID from the copy (its own repository and archiving).
        #[arg(long, value_name = "NEWID")]
        into: Option<TenantId>,
        /// Check the target against the repository and say what would happen; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Check every file of the tenant's backup repository against its checksum
    /// (`pgbackrest verify`).
    Verify {
        /// Tenant id.
        id: TenantId,
    },
    /// Prove the latest backup restores: into a scratch volume, no network, amcheck on every
    /// btree index, pg_dumpall; then thrown away. The result is recorded.
    RestoreTest {
        /// Tenant id.
        id: TenantId,
    },
    /// The tenant's data volumes: the one it uses and those restores left behind.
    Volumes {
        /// Tenant id.
        id: TenantId,
        /// Remove every volume but the one in use. This cannot be undone.
        #[arg(long)]
        purge_old: bool,
    },
    /// Put the tenant's server to sleep now (PostgreSQL stops, its container stays up; the
    /// next client wakes it). Refused while a client session is open. With backups on, the
    /// last WAL is archived first. Idle tenants sleep by themselves with an "idle_timeout".
    Sleep {
        /// Tenant id.
        id: TenantId,
    },
    /// Wake a sleeping tenant's server now and wait until it accepts logins (a client's first
    /// connection does the same by itself).
    Wake {
        /// Tenant id.
        id: TenantId,
    },
}

/// How `tenant credentials` prints a tenant's connection details.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CredentialsFormat {
    Uri,
    Env,
    Pgpass,
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Tenant id: lowercase letters, digits and `_`, starting with a letter, at most 63; it is
    /// also the tenant's PostgreSQL user and database name.
    pub id: TenantId,
    /// Open access once the server is ready.
    #[arg(long)]
    pub enable: bool,
    /// Container image (default: docker.default_image in the settings).
    #[arg(long)]
    pub image: Option<String>,
    /// Memory limit, e.g. 256m or 1g (default: docker.default_memory).
    #[arg(long)]
    pub memory: Option<String>,
    /// CPU limit in cores, e.g. 0.5.
    #[arg(long)]
    pub cpus: Option<f64>,
    /// PostgreSQL max_connections (default: docker.default_max_connections).
    #[arg(long)]
    pub max_connections: Option<u32>,
    /// Sleep after this long without a client session, e.g. 15m ("never": stay awake;
    /// default: [sleep] idle_timeout). The next client wakes it.
    #[arg(long, value_name = "DURATION")]
    pub idle_timeout: Option<String>,
}
