//! Rendering pgs's HAProxy files (config from askama templates, map files, the Lua router),
//! checking a candidate with `haproxy -c`, and installing files atomically. It decides nothing
//! about what should exist: it renders the `Tenants` it is given.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use askama::Template;

use crate::fsutil;
use crate::settings::{Agent, ConfigMode, Paths, Settings};
use crate::tenants::{Access, Instance, Tenant, TenantId, TenantTls, Tenants};

/// The startup-phase router, shipped inside the binary so an install is one file.
pub const LUA_ROUTER: &str = include_str!("../../lua/pg-route.lua");
/// The router's pure wire-format module (`require("pgs_wire")`).
pub const LUA_WIRE: &str = include_str!("../../lua/pgs_wire.lua");

#[derive(Template)]
#[template(path = "pgs.cfg", escape = "none")]
struct PgsCfg<'a> {
    global: Option<GlobalBlock<'a>>,
    lua: String,
    /// `lua-prepend-path`: where `require` finds the router's modules.
    lua_path: String,
    f: FrontendBlock<'a>,
    tls: Option<TlsBlock<'a>>,
    tables: TablesBlock<'a>,
    backends: Vec<BackendBlock<'a>>,
}

/// The stick tables and their peers section.
struct TablesBlock<'a> {
    /// Hex of a cancel key: pid (4 bytes) + secret (up to 256 bytes in protocol 3.2).
    key_len: u32,
    cancel_keys: u32,
    cancel_key_ttl: &'a str,
    sources: u32,
    failed_startups_window: &'a str,
    /// Room for every tenant's session counter.
    tenants: usize,
}

/// The internal TLS listener and the public frontend's TLS rules.
struct TlsBlock<'a> {
    /// pgs_route's argument on the public frontend: `optional` or `required`.
    mode: &'static str,
    socket: String,
    direct_socket: String,
    /// ` user U group G` on the binds, or nothing.
    owner: String,
    certificates: String,
    domain: Option<&'a str>,
    connect_timeout: &'a str,
}

struct GlobalBlock<'a> {
    admin_socket: String,
    pidfile: String,
    log: &'a str,
    maxconn: u32,
    threads: Option<u32>,
    hard_stop_after: Option<&'a str>,
}

struct FrontendBlock<'a> {
    listen: &'a str,
    maxconn: u32,
    session_timeout: &'a str,
    startup_timeout: &'a str,
    backends_map: String,
    access_map: String,
    servers_map: String,
    cancels_per_source: u32,
    failed_startups: u32,
}

struct BackendBlock<'a> {
    name: String,
    server: &'a str,
    address: String,
    connect_timeout: &'a str,
    session_timeout: &'a str,
    /// The tenant accepts only TLS sessions.
    tls_required: bool,
    connection_limit: Option<u32>,
    /// Unique across backends: the cancel-key table stores it (see [`server_ids`]).
    server_id: u32,
    key_capture_timeout: &'static str,
    /// A managed tenant's server may sleep: the backend holds its clients while the agent
    /// wakes it.
    wake: Option<WakeBlock>,
}

/// How a tenant backend holds a client of a sleeping tenant (`pgs_wake` in pg-route.lua).
struct WakeBlock {
    asleep_map: String,
    socket: String,
    /// The Lua's HTTP timeout for the agent's answer (ms): the agent's deadline plus a margin.
    ask_timeout_ms: u64,
    /// The backend's inspect-delay: longer still, so the Lua may wait for the whole answer.
    hold: String,
}

/// How long a backend reads the server's first messages for its BackendKeyData: longer than
/// PostgreSQL's `authentication_timeout` (60 s), so a slow login still has its key recorded.
/// It adds no latency: the reader forwards every message as it comes.
const KEY_CAPTURE_TIMEOUT: &str = "70s";

/// Everything pgs hands to HAProxy, as text, before any of it is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    pub cfg: String,
    pub backends_map: String,
    pub access_map: String,
    /// Server id → backend name (see [`server_ids`]); it changes only with the backend set.
    pub servers_map: String,
    /// TLS is on: the certificates directory's files are copied where HAProxy loads them.
    pub tls: bool,
}

/// Renders the files for `tenants`, with file references pointing into `paths`.
pub fn render(settings: &Settings, paths: &Paths, tenants: &Tenants) -> Rendered {
    let h = &settings.haproxy;
    let global = (h.mode == ConfigMode::Full).then(|| GlobalBlock {
        admin_socket: paths.admin_socket.display().to_string(),
        pidfile: paths.pidfile.display().to_string(),
        log: &h.log,
        // Room for the Runtime API and master CLI beside the frontend's clients; a TLS client
        // holds two sessions (the public frontend and the internal TLS one).
        maxconn: h
            .maxconn
            .saturating_mul(if settings.tls.is_some() { 2 } else { 1 })
            .saturating_add(100),
        threads: h.threads,
        hard_stop_after: h.hard_stop_after.as_deref(),
    });
    let ids = server_ids(tenants);
    let limits = &settings.limits;
    let backends = tenants
        .iter()
        .filter_map(|t| {
            let limit = t.connection_limit.unwrap_or(limits.tenant_connections);
            Some(BackendBlock {
                name: t.id.backend_name(),
                server: t.id.as_str(),
                address: server_address(t, paths)?,
                connect_timeout: &h.connect_timeout,
                session_timeout: &h.session_timeout,
                tls_required: t.tls == TenantTls::Required,
                connection_limit: (limit > 0).then_some(limit),
                server_id: ids[&t.id],
                key_capture_timeout: KEY_CAPTURE_TIMEOUT,
                wake: matches!(t.instance, Instance::Managed(_)).then(|| {
                    let wake_ms = settings.sleep.wake_timeout_secs() * 1000;
                    WakeBlock {
                        asleep_map: paths.asleep_map.display().to_string(),
                        socket: paths.wake_socket.display().to_string(),
                        ask_timeout_ms: wake_ms + 2000,
                        hold: format!("{}ms", wake_ms + 3000),
                    }
                }),
            })
        })
        .collect();
    let tls = settings.tls.as_ref().map(|t| TlsBlock {
        mode: t.mode.as_str(),
        socket: paths.tls_socket.display().to_string(),
        direct_socket: paths.tls_direct_socket.display().to_string(),
        owner: t
            .socket_user
            .iter()
            .map(|u| format!(" user {u}"))
            .chain(t.socket_group.iter().map(|g| format!(" group {g}")))
            .collect(),
        certificates: paths.tls_served_dir.display().to_string(),
        domain: t.domain.as_deref(),
        connect_timeout: &h.connect_timeout,
    });
    let cfg = PgsCfg {
        global,
        lua: paths.lua.display().to_string(),
        lua_path: paths.haproxy_dir.join("?.lua").display().to_string(),
        f: FrontendBlock {
            listen: &h.listen,
            maxconn: h.maxconn,
            session_timeout: &h.session_timeout,
            startup_timeout: &h.startup_timeout,
            backends_map: paths.backends_map.display().to_string(),
            access_map: paths.access_map.display().to_string(),
            servers_map: paths.servers_map.display().to_string(),
            cancels_per_source: limits.cancels_per_source,
            failed_startups: limits.failed_startups,
        },
        tls,
        tables: TablesBlock {
            key_len: 2 * (4 + 256),
            cancel_keys: limits.cancel_keys,
            cancel_key_ttl: &limits.cancel_key_ttl,
            sources: limits.sources,
            failed_startups_window: &limits.failed_startups_window,
            tenants: tenants.len().max(1) * 2,
        },
        backends,
    };
    let mut cfg = cfg.render().expect("templates render");
    cfg.push('\n');
    Rendered {
        cfg,
        backends_map: map_file(backends_entries(tenants, paths)),
        access_map: map_file(access_entries(tenants)),
        servers_map: map_file(
            tenants
                .iter()
                .filter(|t| server_address(t, paths).is_some())
                .map(|t| (ids[&t.id].to_string(), t.id.backend_name())),
        ),
        tls: settings.tls.is_some(),
    }
}

/// Each tenant's server id, unique across backends and the same from one render to the next
/// (a key recorded before a reload must still name the right server after it): a hash of the
/// tenant id, probed upwards in tenant order on the rare collision.
pub fn server_ids(tenants: &Tenants) -> std::collections::BTreeMap<TenantId, u32> {
    let mut taken = std::collections::BTreeSet::new();
    let mut out = std::collections::BTreeMap::new();
    for t in tenants.iter() {
        // FNV-1a, 31 bits (HAProxy ids are positive).
        let mut h: u32 = 0x811c_9dc5;
        for b in t.id.as_str().bytes() {
            h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
        }
        let mut id = (h & 0x7fff_ffff).max(1);
        while !taken.insert(id) {
            id = (id % 0x7fff_ffff) + 1;
        }
        out.insert(t.id.clone(), id);
    }
    out
}

/// Where HAProxy dials the tenant's server: an external address, or the managed container's
/// socket in the tenant's socket directory.
pub fn server_address(t: &Tenant, paths: &Paths) -> Option<String> {
    match &t.instance {
        Instance::External { address } => Some(address.haproxy()),
        Instance::Managed(_) => Some(format!(
            "unix@{}",
            paths
                .tenant_sockets_dir
                .join(t.id.as_str())
                .join(".s.PGSQL.5432")
                .display()
        )),
    }
}

/// Tenant → backend name, for every tenant that has a backend.
pub fn backends_entries(tenants: &Tenants, paths: &Paths) -> Vec<(String, String)> {
    tenants
        .iter()
        .filter(|t| server_address(t, paths).is_some())
        .map(|t| (t.id.to_string(), t.id.backend_name()))
        .collect()
}

/// Tenant → `enabled`, for routable tenants only: absence means refused.
pub fn access_entries(tenants: &Tenants) -> Vec<(String, String)> {
    tenants
        .iter()
        .filter(|t| t.routable())
        .map(|t| (t.id.to_string(), Access::Enabled.to_string()))
        .collect()
}

/// The text of a map file: one `key value` line per entry.
pub fn map_file(entries: impl IntoIterator<Item = (String, String)>) -> String {
    let mut out = String::from("# Rendered by pgs-agent; runtime changes are mirrored here.\n");
    for (k, v) in entries {
        out.push_str(&k);
        out.push(' ');
        out.push_str(&v);
        out.push('\n');
    }
    out
}

/// What `install` changed on disk.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Installed {
    pub cfg: bool,
    pub backends_map: bool,
    pub access_map: bool,
    pub servers_map: bool,
    pub lua: bool,
    pub certificates: bool,
    pub asleep_map: bool,
}

impl Installed {
    pub fn any(&self) -> bool {
        self.cfg
            || self.backends_map
            || self.access_map
            || self.servers_map
            || self.lua
            || self.certificates
    }
}

/// Creates an empty file at `path` unless one exists; whether it did.
fn create_if_missing(path: &Path) -> std::io::Result<bool> {
    if path.exists() {
        return Ok(false);
    }
    fsutil::write_atomic(path, b"", 0o644)?;
    Ok(true)
}

/// Installs the router's Lua files; whether any changed.
fn install_lua(paths: &Paths) -> std::io::Result<bool> {
    let wire = fsutil::write_if_changed(&paths.lua_wire, LUA_WIRE.as_bytes(), 0o644)?;
    let router = fsutil::write_if_changed(&paths.lua, LUA_ROUTER.as_bytes(), 0o644)?;
    Ok(wire || router)
}

/// Writes the rendered files under `paths` (atomically, only those that changed).
pub fn install(paths: &Paths, r: &Rendered) -> std::io::Result<Installed> {
    std::fs::create_dir_all(&paths.maps_dir)?;
    Ok(Installed {
        // Maps and Lua first: the config refers to them.
        backends_map: fsutil::write_if_changed(
            &paths.backends_map,
            r.backends_map.as_bytes(),
            0o644,
        )?,
        access_map: fsutil::write_if_changed(&paths.access_map, r.access_map.as_bytes(), 0o644)?,
        servers_map: fsutil::write_if_changed(&paths.servers_map, r.servers_map.as_bytes(), 0o644)?,
        lua: install_lua(paths)?,
        // The agent's own (who sleeps): only made when missing, never rewritten here.
        asleep_map: create_if_missing(&paths.asleep_map)?,
        // Certificates that parse; `check` runs `haproxy -c` on the same before a live install.
        certificates: r.tls && crate::tls::install_served(&paths.tls_dir, &paths.tls_served_dir)?,
        cfg: fsutil::write_if_changed(&paths.haproxy_cfg, r.cfg.as_bytes(), 0o644)?,
    })
}

#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("cannot run {binary} to check the configuration: {source} (install HAProxy 2.6+ or set haproxy.binary in the agent settings)")]
    Spawn {
        binary: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot stage the candidate configuration in {dir}: {source}")]
    Stage {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("HAProxy rejected the configuration:\n{message}")]
    Rejected { message: String },
    #[error(
        "TLS is on ([tls] in {config}) but {dir} holds no certificate: put a PEM file there \
             with the certificate chain and its private key (e.g. `cat fullchain.pem privkey.pem \
             > {dir}/server.pem`, mode 0600), or remove [tls]"
    )]
    NoCertificate { config: PathBuf, dir: PathBuf },
}

/// Renders `tenants` into the staging directory and runs `haproxy -c` on it. The live files are
/// not touched; on success the same render can be installed for real.
pub async fn check(agent: &Agent, tenants: &Tenants) -> Result<(), CheckError> {
    if agent.settings.tls.is_some() {
        let usable = crate::tls::scan(&agent.paths.tls_dir, &agent.paths.tls_served_dir)
            .map_or(0, |s| s.usable());
        if usable == 0 {
            return Err(CheckError::NoCertificate {
                config: agent.paths.config.clone(),
                dir: agent.paths.tls_dir.clone(),
            });
        }
    }
    let staged = agent.paths.with_haproxy_dir(&agent.paths.staging_dir);
    let rendered = render(&agent.settings, &staged, tenants);
    install(&staged, &rendered).map_err(|source| CheckError::Stage {
        dir: staged.haproxy_dir.clone(),
        source,
    })?;
    match check_file(&agent.settings.haproxy.binary, &staged.haproxy_cfg).await {
        Err(CheckError::Rejected { message }) => Err(CheckError::Rejected {
            message: format!(
                "{message}\n(the rejected candidate stays in {} for a look; its lines come from \
                 {} ([haproxy]) and the tenants file)",
                staged.haproxy_cfg.display(),
                agent.paths.config.display()
            ),
        }),
        other => other,
    }
}

/// Runs `haproxy -c -f cfg` and returns HAProxy's own words when it refuses.
pub async fn check_file(binary: &Path, cfg: &Path) -> Result<(), CheckError> {
    let out = tokio::process::Command::new(binary)
        .arg("-c")
        .arg("-f")
        .arg(cfg)
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|source| CheckError::Spawn {
            binary: binary.to_owned(),
            source,
        })?;
    if out.status.success() {
        return Ok(());
    }
    // HAProxy's own words, without its version banner.
    let mut message = String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with("[NOTICE]"))
        .collect::<Vec<_>>()
        .join("\n");
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !stdout.trim().is_empty() {
        message.push('\n');
        message.push_str(stdout.trim());
    }
    if message.is_empty() {
        message = format!("haproxy -c exited with {}", out.status);
    }
    Err(CheckError::Rejected { message })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tenants::validate;

    /// Fixed settings for golden files: paths under /srv/pgs.
    fn golden(tenants_json: &str, mode: ConfigMode) -> Rendered {
        let mut settings = Settings::default();
        settings.haproxy.mode = mode;
        let paths = Paths::new(Path::new("/srv/pgs/pgs.toml"), &settings);
        let doc: serde_json::Value = serde_json::from_str(tenants_json).unwrap();
        render(&settings, &paths, &validate(&doc).unwrap())
    }

    /// Compares with the checked-in golden file; `PGS_BLESS=1 cargo test` rewrites it.
    fn assert_golden(name: &str, actual: &str) {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/golden")
            .join(name);
        if std::env::var_os("PGS_BLESS").is_some() {
            std::fs::write(&path, actual).unwrap();
        }
        let expected = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e} (run with PGS_BLESS=1 to create)", path.display()));
        assert!(
            expected == actual,
            "{} differs from the render; run with PGS_BLESS=1 to accept:\n{actual}",
            path.display()
        );
    }

    pub(crate) const TWO_TENANTS: &str = r#"{"version": 1, "tenants": {
        "acme":   {"access": "enabled",  "external": {"address": "/run/pg/acme/.s.PGSQL.5432"}},
        "globex": {"access": "disabled", "external": {"address": "127.0.0.1:5433"}},
        "initech": {"access": "enabled", "managed": {}}
    }}"#;

    #[test]
    fn two_tenants_full_config() {
        let r = golden(TWO_TENANTS, ConfigMode::Full);
        assert_golden("two-tenants.cfg", &r.cfg);
        assert_golden("two-tenants.backends.map", &r.backends_map);
        assert_golden("two-tenants.access.map", &r.access_map);
    }

    #[test]
    fn fragment_mode_has_no_global_settings() {
        let r = golden(TWO_TENANTS, ConfigMode::Fragment);
        assert_golden("two-tenants.fragment.cfg", &r.cfg);
        assert!(!r.cfg.contains("stats socket"));
        assert!(r.cfg.contains("lua-load /srv/pgs/haproxy/pg-route.lua"));
    }

    #[test]
    fn empty_tenants_render_a_frontend_that_refuses_everyone() {
        let r = golden(r#"{"version": 1, "tenants": {}}"#, ConfigMode::Full);
        assert_golden("empty.cfg", &r.cfg);
        assert!(!r
            .cfg
            .lines()
            .any(|l| l.trim_start().starts_with("default_backend")));
        // Only the tables' holders: no tenant backend.
        assert!(!r.cfg.contains("\nbackend pgs_"));
    }

    #[test]
    fn tls_adds_the_internal_listener_and_per_tenant_policy() {
        let mut settings = Settings::default();
        settings.tls = Some(crate::settings::TlsSettings {
            domain: Some("db.example.com".into()),
            socket_user: Some("haproxy".into()),
            socket_group: Some("haproxy".into()),
            ..Default::default()
        });
        let paths = Paths::new(Path::new("/srv/pgs/pgs.toml"), &settings);
        let doc: serde_json::Value = serde_json::from_str(
            r#"{"version": 1, "tenants": {
                "acme": {"access": "enabled", "external": {"address": "/run/pg/acme/.s.PGSQL.5432"}},
                "globex": {"access": "enabled", "tls": "required", "external": {"address": "127.0.0.1:5433"}}
            }}"#,
        )
        .unwrap();
        let r = render(&settings, &paths, &validate(&doc).unwrap());
        assert_golden("tls.cfg", &r.cfg);
        assert!(r.cfg.contains("lua.pgs_route optional"));
        assert!(r.cfg.contains("lua.pgs_route inside"));
        assert!(r.cfg.contains(
            "bind unix@/srv/pgs/run/tls.sock mode 600 user haproxy group haproxy accept-proxy"
        ));
        assert!(r.cfg.contains("crt /srv/pgs/haproxy/tls alpn postgresql"));
        assert!(
            r.cfg.contains("maxconn 4100"),
            "two sessions per TLS client"
        );
        // Only globex's backend refuses plaintext.
        assert_eq!(r.cfg.matches("pgs_refuse tls_required").count(), 1);
        let globex = r.cfg.split("backend pgs_globex").nth(1).unwrap();
        assert!(globex.contains("pgs_refuse tls_required unless { ssl_fc }"));
        // Without [tls] nothing of it is rendered.
        let plain = golden(TWO_TENANTS, ConfigMode::Full);
        assert!(plain.cfg.contains("lua.pgs_route plain"));
        assert!(!plain.cfg.contains("pgs-tls"));
    }

    #[test]
    fn server_ids_are_unique_and_do_not_move_when_tenants_come_and_go() {
        let many: String = (0..2000)
            .map(|i| format!(r#""t{i}": {{"external": {{"address": "127.0.0.1:1"}}}}"#))
            .collect::<Vec<_>>()
            .join(",");
        let doc: serde_json::Value =
            serde_json::from_str(&format!(r#"{{"version": 1, "tenants": {{{many}}}}}"#)).unwrap();
        let all = server_ids(&validate(&doc).unwrap());
        let unique: std::collections::BTreeSet<_> = all.values().collect();
        assert_eq!(unique.len(), 2000);
        assert!(all.values().all(|&id| id > 0 && id <= 0x7fff_ffff));
        let two: serde_json::Value = serde_json::from_str(TWO_TENANTS).unwrap();
        let before = server_ids(&validate(&two).unwrap());
        let mut doc3 = two.clone();
        doc3["tenants"]["zeta"] = serde_json::json!({"external": {"address": "127.0.0.1:1"}});
        let after = server_ids(&validate(&doc3).unwrap());
        for (id, sid) in &before {
            assert_eq!(after[id], *sid, "{id} moved");
        }
        // The servers map names each id's backend; cancels are routed through it.
        let r = golden(TWO_TENANTS, ConfigMode::Full);
        assert!(r.servers_map.contains(&format!(
            "{} pgs_acme\n",
            before[&TenantId::parse("acme").unwrap()]
        )));
    }

    #[test]
    fn connection_limits_come_from_the_tenant_or_the_default() {
        let doc: serde_json::Value = serde_json::from_str(
            r#"{"version": 1, "tenants": {
                "acme": {"connection_limit": 2, "external": {"address": "127.0.0.1:1"}},
                "globex": {"external": {"address": "127.0.0.1:2"}},
                "initech": {"connection_limit": 0, "external": {"address": "127.0.0.1:3"}}
            }}"#,
        )
        .unwrap();
        let settings = Settings::default();
        let paths = Paths::new(Path::new("/srv/pgs/pgs.toml"), &settings);
        let cfg = render(&settings, &paths, &validate(&doc).unwrap()).cfg;
        let section = |name: &str| cfg.split(&format!("backend {name}\n")).nth(1).unwrap();
        assert!(section("pgs_acme").contains("sc2_conn_cur(pgs-tenant-sessions) gt 2 }"));
        assert!(section("pgs_globex").contains("sc2_conn_cur(pgs-tenant-sessions) gt 100 }"));
        assert!(!section("pgs_initech")
            .split("\nbackend")
            .next()
            .unwrap()
            .contains("track-sc2"));
        let bad: serde_json::Value = serde_json::from_str(
            r#"{"version": 1, "tenants": {"acme": {"connection_limit": -1, "external": {"address": "127.0.0.1:1"}}}}"#,
        )
        .unwrap();
        let problems = validate(&bad).unwrap_err();
        assert_eq!(problems[0].place, "tenants.acme.connection_limit");
    }

    #[test]
    fn only_enabled_tenants_are_in_the_access_map() {
        let r = golden(TWO_TENANTS, ConfigMode::Full);
        assert!(r.access_map.contains("acme enabled\n"));
        assert!(!r.access_map.contains("globex"));
        assert!(r.backends_map.contains("globex pgs_globex\n"));
        assert!(r
            .cfg
            .contains("server initech unix@/srv/pgs/run/tenants/initech/.s.PGSQL.5432"));
    }

    #[test]
    fn install_writes_only_what_changed() {
        let dir = tempfile::tempdir().unwrap();
        let settings = Settings::default();
        let paths = Paths::new(&dir.path().join("pgs.toml"), &settings);
        let doc: serde_json::Value = serde_json::from_str(TWO_TENANTS).unwrap();
        let r = render(&settings, &paths, &validate(&doc).unwrap());
        assert!(install(&paths, &r).unwrap().cfg);
        assert_eq!(install(&paths, &r).unwrap(), Installed::default());
    }
}
