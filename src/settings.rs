//! Agent settings (`pgs.toml`) and `Paths`, the one place every file path is derived from.
//! Relative paths in the settings are relative to the directory of the settings file.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

/// Where the agent looks for its settings when neither `-c` nor `PGS_CONFIG` says.
pub const DEFAULT_CONFIG: &str = "/etc/pgs/pgs.toml";

/// The listen address `init` writes when none is given: loopback, and not PostgreSQL's own port,
/// so a development layout never fights a local server.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:6432";

/// Where `run` serves the HTTP API when the settings do not say: loopback only.
pub const DEFAULT_API_LISTEN: &str = "127.0.0.1:6480";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// The desired state.
    #[serde(default = "d_tenants_file")]
    pub tenants_file: PathBuf,
    /// Secrets (tenant passwords, the API token), mode 0700.
    #[serde(default = "d_secrets_dir")]
    pub secrets_dir: PathBuf,
    /// Sockets, pid files and per-tenant socket directories.
    #[serde(default = "d_run_dir")]
    pub run_dir: PathBuf,
    /// What the agent renders for HAProxy: pgs.cfg, maps/, pg-route.lua.
    #[serde(default = "d_haproxy_dir")]
    pub haproxy_dir: PathBuf,
    /// What the agent records about tenants: which volume holds their data, backup results.
    #[serde(default = "d_state_dir")]
    pub state_dir: PathBuf,
    #[serde(default)]
    pub haproxy: HaproxySettings,
    #[serde(default)]
    pub docker: DockerSettings,
    #[serde(default)]
    pub api: ApiSettings,
    #[serde(default)]
    pub limits: LimitsSettings,
    #[serde(default)]
    pub backups: BackupSettings,
    /// TLS to clients, terminated by HAProxy; absent means plaintext only (SSLRequest → 'N').
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsSettings>,
    #[serde(default)]
    pub sleep: SleepSettings,
}

/// Sleep and wake of idle managed tenants: when a server stops, how a client waits for it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SleepSettings {
    /// A managed tenant with no client session for this long is put to sleep ("15m"); a
    /// tenant's `"idle_timeout"` overrides it. Empty: tenants sleep only when their entry says.
    #[serde(default)]
    pub idle_timeout: String,
    /// How long a client of a sleeping tenant waits for its server; past it the client gets
    /// 57P03 ("the database system is starting up"), which drivers retry on.
    #[serde(default = "d_wake_timeout")]
    pub wake_timeout: String,
    /// How often HAProxy's session counts are read to find idle tenants.
    #[serde(default = "d_check_every")]
    pub check_every: String,
    /// A tenant asleep this long also has its container stopped: no memory at all, and a wake
    /// then takes a container start (~0.5 s more).
    #[serde(default = "d_deep_after")]
    pub deep_after: String,
    /// Most sleeping tenants whose container stays up (~6 MiB each); the longest asleep beyond
    /// it have their container stopped.
    #[serde(default = "d_max_light")]
    pub max_light: u32,
    /// Owner of the wake socket when HAProxy's workers drop privileges (`user` in its global
    /// section); unset: the agent's own user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket_user: Option<String>,
}

fn d_wake_timeout() -> String {
    "10s".into()
}
fn d_check_every() -> String {
    "5s".into()
}
fn d_deep_after() -> String {
    "30m".into()
}
fn d_max_light() -> u32 {
    200
}

impl Default for SleepSettings {
    fn default() -> Self {
        toml::from_str("").expect("defaults deserialize")
    }
}

impl SleepSettings {
    /// The default idle timeout in seconds, if tenants sleep by default.
    pub fn idle_timeout_secs(&self) -> Option<u64> {
        (!self.idle_timeout.is_empty())
            .then(|| parse_interval(&self.idle_timeout).ok())
            .flatten()
    }
    pub fn wake_timeout_secs(&self) -> u64 {
        parse_interval(&self.wake_timeout).unwrap_or(10)
    }
    pub fn check_every_secs(&self) -> u64 {
        parse_interval(&self.check_every).unwrap_or(5)
    }
    pub fn deep_after_secs(&self) -> u64 {
        parse_interval(&self.deep_after).unwrap_or(1800)
    }
}

/// What HAProxy counts and caps: sessions per tenant, failed startups and cancels per client
/// address, and the table of cancel keys.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LimitsSettings {
    /// Concurrent client sessions per tenant whose entry sets no `connection_limit`; 0: none.
    #[serde(default = "d_tenant_connections")]
    pub tenant_connections: u32,
    /// Failed startups (malformed, unknown tenant, wrong password, ...) one client address may
    /// have within `failed_startups_window` before it is refused for a while.
    #[serde(default = "d_failed_startups")]
    pub failed_startups: u32,
    #[serde(default = "d_failed_startups_window")]
    pub failed_startups_window: String,
    /// Cancel requests one client address may send per 10 seconds.
    #[serde(default = "d_cancels_per_source")]
    pub cancels_per_source: u32,
    /// Most cancel keys remembered (one per session); when full, the oldest go first.
    #[serde(default = "d_cancel_keys")]
    pub cancel_keys: u32,
    /// How long a session's cancel key is remembered.
    #[serde(default = "d_cancel_key_ttl")]
    pub cancel_key_ttl: String,
    /// Most client addresses counted at once.
    #[serde(default = "d_sources")]
    pub sources: u32,
}

fn d_tenant_connections() -> u32 {
    100
}
fn d_failed_startups() -> u32 {
    20
}
fn d_failed_startups_window() -> String {
    "60s".into()
}
fn d_cancels_per_source() -> u32 {
    20
}
fn d_cancel_keys() -> u32 {
    100_000
}
fn d_cancel_key_ttl() -> String {
    "24h".into()
}
fn d_sources() -> u32 {
    100_000
}

impl Default for LimitsSettings {
    fn default() -> Self {
        toml::from_str("").expect("defaults deserialize")
    }
}

/// TLS to clients: HAProxy terminates it (classic SSLRequest and PostgreSQL 17's direct SSL) on
/// an internal listener the public frontend loops into.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TlsSettings {
    /// Directory of PEM files (certificate chain and key in one file). Every file is served;
    /// the first in alphabetical order is the default for clients that send no SNI.
    #[serde(default = "d_tls_certificates")]
    pub certificates: PathBuf,
    /// `optional`: plaintext and TLS clients alike; `required`: plaintext startups are refused.
    #[serde(default)]
    pub mode: TlsMode,
    /// Tenant domain: a client whose SNI ends in `.DOMAIN` must name its own tenant in the
    /// SNI's first label (`acme.DOMAIN` for user `acme`). SNI is never required.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    /// Owner of the internal TLS sockets, when HAProxy drops privileges (`user` in its global
    /// section, e.g. Debian's `haproxy`): the worker must be able to connect to them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket_user: Option<String>,
    /// Group of the internal TLS sockets (with `socket_user`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket_group: Option<String>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    #[default]
    Optional,
    Required,
}

impl TlsMode {
    pub fn as_str(self) -> &'static str {
        match self {
            TlsMode::Optional => "optional",
            TlsMode::Required => "required",
        }
    }
}

fn d_tls_certificates() -> PathBuf {
    "tls".into()
}

impl Default for TlsSettings {
    fn default() -> Self {
        toml::from_str("").expect("defaults deserialize")
    }
}

/// Backups of managed tenants (pgBackRest): where the repositories live, and the defaults a
/// tenant's `"backups"` entry in the tenants file can override.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BackupSettings {
    /// One pgBackRest repository per tenant, `<repository>/<tenant>`, bind-mounted into its
    /// container.
    #[serde(default = "d_repository")]
    pub repository: PathBuf,
    /// PostgreSQL's `archive_timeout` in seconds: the most committed work a lost volume can
    /// cost on a server that writes little.
    #[serde(default = "d_archive_timeout")]
    pub archive_timeout_secs: u64,
    /// A full backup at least this often ("7d", "12h", "30m").
    #[serde(default = "d_full_every")]
    pub full_every: String,
    /// An incremental backup at least this often.
    #[serde(default = "d_incr_every")]
    pub incr_every: String,
    /// Full backups kept (with the incrementals and WAL that depend on them).
    #[serde(default = "d_keep_full")]
    pub keep_full: u32,
    /// When set, full backups are kept by age instead of count: this many days.
    pub keep_days: Option<u32>,
    /// `pgbackrest verify` of each repository at least this often.
    #[serde(default = "d_verify_every")]
    pub verify_every: String,
    /// The latest backup is restored into a scratch volume and checked at least this often.
    #[serde(default = "d_restore_test_every")]
    pub restore_test_every: String,
}

fn d_repository() -> PathBuf {
    "backups".into()
}
fn d_archive_timeout() -> u64 {
    60
}
fn d_full_every() -> String {
    "7d".into()
}
fn d_incr_every() -> String {
    "1d".into()
}
fn d_keep_full() -> u32 {
    2
}
fn d_verify_every() -> String {
    "1d".into()
}
fn d_restore_test_every() -> String {
    "7d".into()
}

impl Default for BackupSettings {
    fn default() -> Self {
        toml::from_str("").expect("defaults deserialize")
    }
}

/// Parses an interval like "90s", "30m", "12h" or "7d" into seconds.
pub fn parse_interval(s: &str) -> Result<u64, String> {
    let digits = s.chars().take_while(|c| c.is_ascii_digit()).count();
    let unit = match &s[digits..] {
        "s" => 1,
        "m" => 60,
        "h" => 3_600,
        "d" => 86_400,
        _ => {
            return Err(format!(
                "{s:?} is not an interval like \"90s\", \"30m\", \"12h\" or \"7d\""
            ))
        }
    };
    match s[..digits].parse::<u64>() {
        Ok(n) if n > 0 => n
            .checked_mul(unit)
            .ok_or_else(|| format!("{s:?} is too long")),
        _ => Err(format!(
            "{s:?} is not an interval like \"90s\", \"30m\", \"12h\" or \"7d\""
        )),
    }
}

/// The HTTP API that `run` serves.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ApiSettings {
    /// `HOST:PORT` (keep it on loopback unless a proxy in front adds TLS), a unix socket path
    /// (starting with `/`, or relative and ending in `.sock`), or `""` for no API.
    #[serde(default = "d_api_listen")]
    pub listen: String,
    /// Largest request body accepted, in bytes.
    #[serde(default = "d_api_max_body")]
    pub max_body_bytes: usize,
}

fn d_api_listen() -> String {
    DEFAULT_API_LISTEN.into()
}
fn d_api_max_body() -> usize {
    64 * 1024
}

impl Default for ApiSettings {
    fn default() -> Self {
        toml::from_str("").expect("defaults deserialize")
    }
}

/// How managed tenants run on the Docker engine.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DockerSettings {
    /// The engine's API socket.
    #[serde(default = "d_docker_socket")]
    pub socket: PathBuf,
    /// Prefix of container and volume names and value of the `io.pgs.installation` label, so two
    /// installations (or parallel tests) on one engine never touch each other's objects.
    #[serde(default = "d_prefix")]
    pub prefix: String,
    /// Image for managed tenants that name none (`docker/build-image.sh` builds it).
    #[serde(default = "d_image")]
    pub default_image: String,
    /// Memory limit for tenants that set none.
    #[serde(default = "d_memory")]
    pub default_memory: String,
    /// PostgreSQL `max_connections` for tenants that set none.
    #[serde(default = "d_max_connections")]
    pub default_max_connections: u32,
    /// Process limit per container.
    #[serde(default = "d_pids_limit")]
    pub pids_limit: i64,
    /// How long a new or restarted server may take to accept logins, in seconds.
    #[serde(default = "d_ready_timeout")]
    pub ready_timeout_secs: u64,
    /// Servers a pass creates, starts or stops at the same time (1..=64): a batch of new tenants
    /// starts this many at a time, and one slow server does not hold the others back.
    #[serde(default = "d_start_concurrency")]
    pub start_concurrency: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HaproxySettings {
    /// `bind` address of the PostgreSQL frontend.
    #[serde(default = "d_listen")]
    pub listen: String,
    /// The HAProxy executable.
    #[serde(default = "d_binary")]
    pub binary: PathBuf,
    /// Admin stats socket (Runtime API); default `<run_dir>/admin.sock`.
    pub admin_socket: Option<PathBuf>,
    /// Master CLI socket (`haproxy -W -S`); default `<run_dir>/master.sock`.
    pub master_socket: Option<PathBuf>,
    /// `full`: pgs.cfg is HAProxy's whole configuration, with its own `global` section.
    /// `fragment`: pgs.cfg holds only pgs's frontend, backends and Lua, loaded with a second `-f`
    /// beside the operator's haproxy.cfg, which owns `global` (stats socket, logging, pidfile).
    #[serde(default)]
    pub mode: ConfigMode,
    /// How long a client may take to send its startup packet (`tcp-request inspect-delay`).
    #[serde(default = "d_startup_timeout")]
    pub startup_timeout: String,
    /// Idle timeout of client and server sides of an established session.
    #[serde(default = "d_session_timeout")]
    pub session_timeout: String,
    /// Timeout for connecting to a tenant's server.
    #[serde(default = "d_connect_timeout")]
    pub connect_timeout: String,
    /// Where HAProxy sends its log (the argument of the global `log` keyword).
    #[serde(default = "d_log")]
    pub log: String,
    /// Maximum concurrent client connections to the frontend.
    #[serde(default = "d_maxconn")]
    pub maxconn: u32,
    /// Old workers that still serve sessions after a reload are stopped after this long
    /// (`hard-stop-after`); unset means they live until their last session ends.
    pub hard_stop_after: Option<String>,
    /// `nbthread`; unset lets HAProxy pick one per CPU.
    pub threads: Option<u32>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum ConfigMode {
    #[default]
    Full,
    Fragment,
}

fn d_tenants_file() -> PathBuf {
    "tenants.json".into()
}
fn d_secrets_dir() -> PathBuf {
    "secrets".into()
}
fn d_run_dir() -> PathBuf {
    "run".into()
}
fn d_state_dir() -> PathBuf {
    "state".into()
}
fn d_haproxy_dir() -> PathBuf {
    "haproxy".into()
}
fn d_listen() -> String {
    DEFAULT_LISTEN.into()
}
fn d_binary() -> PathBuf {
    "haproxy".into()
}
fn d_startup_timeout() -> String {
    "5s".into()
}
fn d_session_timeout() -> String {
    "1h".into()
}
fn d_connect_timeout() -> String {
    "5s".into()
}
fn d_log() -> String {
    "stderr format short local0 info".into()
}
fn d_docker_socket() -> PathBuf {
    "/var/run/docker.sock".into()
}
fn d_prefix() -> String {
    "pgs".into()
}
fn d_image() -> String {
    "pgs/postgres:15".into()
}
fn d_memory() -> String {
    "256m".into()
}
fn d_max_connections() -> u32 {
    20
}
fn d_pids_limit() -> i64 {
    200
}
fn d_ready_timeout() -> u64 {
    60
}
fn d_start_concurrency() -> usize {
    4
}
fn d_maxconn() -> u32 {
    2_000
}

impl Default for HaproxySettings {
    fn default() -> Self {
        toml::from_str("").expect("defaults deserialize")
    }
}

impl Default for DockerSettings {
    fn default() -> Self {
        toml::from_str("").expect("defaults deserialize")
    }
}

impl Default for Settings {
    fn default() -> Self {
        toml::from_str("").expect("defaults deserialize")
    }
}

impl Settings {
    pub fn parse(text: &str) -> anyhow::Result<Settings> {
        let s: Settings = toml::from_str(text)?;
        s.check()?;
        Ok(s)
    }

    /// Rejects values HAProxy would misread; says which key and what is expected.
    pub fn check(&self) -> anyhow::Result<()> {
        let h = &self.haproxy;
        for (name, v) in [
            ("haproxy.startup_timeout", &h.startup_timeout),
            ("haproxy.session_timeout", &h.session_timeout),
            ("haproxy.connect_timeout", &h.connect_timeout),
        ]
        .into_iter()
        .chain(
            h.hard_stop_after
                .as_ref()
                .map(|v| ("haproxy.hard_stop_after", v)),
        )
        .chain([
            (
                "limits.failed_startups_window",
                &self.limits.failed_startups_window,
            ),
            ("limits.cancel_key_ttl", &self.limits.cancel_key_ttl),
        ]) {
            if !is_haproxy_duration(v) {
                bail!("{name} = {v:?} is not a duration like \"500ms\", \"5s\", \"10m\" or \"1h\"");
            }
        }
        if h.listen.is_empty() || h.listen.chars().any(|c| c.is_whitespace() || c == '#') {
            bail!(
                "haproxy.listen = {:?} is not a bind address like \"127.0.0.1:6432\"",
                h.listen
            );
        }
        if h.log.chars().any(|c| c.is_control() || c == '#') {
            bail!("haproxy.log must be one line without '#'");
        }
        let d = &self.docker;
        let prefix_ok = d.prefix.len() <= 40
            && d.prefix.starts_with(|c: char| c.is_ascii_lowercase())
            && d.prefix
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        if !prefix_ok {
            bail!(
                "docker.prefix = {:?} must be up to 40 lowercase letters, digits or '-', starting with a letter",
                d.prefix
            );
        }
        crate::tenants::parse_size(&d.default_memory)
            .map_err(|e| anyhow::anyhow!("docker.default_memory: {e}"))?;
        if !(1..=64).contains(&d.start_concurrency) {
            bail!(
                "docker.start_concurrency = {} must be 1 to 64 (servers started at the same time)",
                d.start_concurrency
            );
        }
        if let Some(tls) = &self.tls {
            tls.check()?;
        }
        let b = &self.backups;
        for (name, v) in [
            ("backups.full_every", &b.full_every),
            ("backups.incr_every", &b.incr_every),
            ("backups.verify_every", &b.verify_every),
            ("backups.restore_test_every", &b.restore_test_every),
        ] {
            parse_interval(v).map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
        }
        if b.keep_full == 0 {
            bail!("backups.keep_full must be at least 1");
        }
        if b.archive_timeout_secs == 0 || b.archive_timeout_secs > 86_400 {
            bail!("backups.archive_timeout_secs must be from 1 to 86400");
        }
        let z = &self.sleep;
        for (name, v, may_be_empty) in [
            ("sleep.idle_timeout", &z.idle_timeout, true),
            ("sleep.wake_timeout", &z.wake_timeout, false),
            ("sleep.check_every", &z.check_every, false),
            ("sleep.deep_after", &z.deep_after, false),
        ] {
            if !(may_be_empty && v.is_empty()) {
                parse_interval(v).map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
            }
        }
        if z.wake_timeout_secs() > 300 {
            bail!("sleep.wake_timeout must be at most 5m");
        }
        if let Some(u) = &z.socket_user {
            let ok = !u.is_empty()
                && u.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
            if !ok {
                bail!("sleep.socket_user = {u:?} is not a user name");
            }
        }
        for (key, v) in [
            ("limits.cancel_keys", self.limits.cancel_keys),
            ("limits.sources", self.limits.sources),
        ] {
            if v == 0 {
                bail!("{key} must be at least 1");
            }
        }
        Ok(())
    }

    /// The settings file `init` writes: every default spelled out, so it documents itself.
    /// The settings as `init` writes them: every key with a comment saying what it does, and
    /// the optional ones that are unset as commented-out examples.
    pub fn to_commented_toml(&self) -> String {
        let value = toml::Value::try_from(self).expect("settings serialize");
        let table = value.as_table().expect("settings are a table");
        let mut out = String::from(
            "# pgs-agent settings. Every key is optional (the value shown is the default unless \
             you\n# changed it); relative paths hang off this file's directory. After an edit: \
             `pgs-agent -c\n# <this file> check`, then `systemctl reload pgs-agent` (or SIGHUP) \
             or `pgs-agent sync`.\n",
        );
        let section = |name: &str, t: &toml::Table, out: &mut String| {
            if !name.is_empty() {
                out.push_str(&format!("\n[{name}]\n"));
            }
            for (_, key, doc, example) in SETTING_DOCS.iter().filter(|d| d.0 == name) {
                out.push_str(&format!("# {doc}\n"));
                match t.get(*key) {
                    Some(v) if !v.is_table() => out.push_str(&format!("{key} = {v}\n")),
                    _ => out.push_str(&format!("# {key} = {example}\n")),
                }
            }
        };
        section("", table, &mut out);
        for name in ["haproxy", "docker", "api", "limits", "backups", "sleep"] {
            let t = table.get(name).and_then(|v| v.as_table()).cloned();
            section(name, &t.unwrap_or_default(), &mut out);
        }
        match table.get("tls").and_then(|v| v.as_table()) {
            Some(t) => section("tls", t, &mut out),
            None => {
                // Off: the whole section as a commented-out example.
                let mut example = String::new();
                let t = toml::Value::try_from(TlsSettings::default()).expect("tls serializes");
                section("tls", t.as_table().expect("a table"), &mut example);
                out.push_str("\n# TLS to clients is off. To turn it on, uncomment [tls], put a PEM (chain and key)\n# in the certificates directory and run `render` (README.md, \"TLS\").\n");
                for line in example.lines().filter(|l| !l.is_empty()) {
                    if line.starts_with("# ") {
                        out.push_str(&format!("{line}\n"));
                    } else {
                        out.push_str(&format!("# {line}\n"));
                    }
                }
            }
        }
        out
    }
}

/// (section, key, what it does, example for an unset optional key), in the order `init`
/// writes them. A unit test checks that every setting is here.
const SETTING_DOCS: &[(&str, &str, &str, &str)] = &[
    ("", "tenants_file", "The desired state: tenants and their access (README.md, \"The tenants file\").", ""),
    ("", "secrets_dir", "Generated secrets (tenant passwords, the API token), mode 0700.", ""),
    ("", "run_dir", "Sockets, pid files, locks and the tenants' socket directories.", ""),
    ("", "haproxy_dir", "What the agent renders for HAProxy: pgs.cfg, maps/, pg-route.lua.", ""),
    ("", "state_dir", "What the agent records about tenants: the volume holding each one's data after a restore, backup results.", ""),
    ("haproxy", "listen", "Where HAProxy accepts PostgreSQL clients (bind address).", ""),
    ("haproxy", "binary", "The HAProxy executable (used for `haproxy -c` checks).", ""),
    ("haproxy", "admin_socket", "Runtime API socket; default run_dir/admin.sock. In fragment mode: the `stats socket ... level admin` of your haproxy.cfg.", "\"/run/haproxy/admin.sock\""),
    ("haproxy", "master_socket", "Master CLI socket (`haproxy -W -S`), used to reload; default run_dir/master.sock.", "\"/run/haproxy-master.sock\""),
    ("haproxy", "mode", "\"full\": pgs.cfg is HAProxy's whole config; \"fragment\": only pgs's frontend, backends and Lua, loaded with a second -f beside your haproxy.cfg.", ""),
    ("haproxy", "startup_timeout", "How long a client may take to send its startup packet.", ""),
    ("haproxy", "session_timeout", "Idle timeout of an established session, both sides.", ""),
    ("haproxy", "connect_timeout", "Timeout for connecting to a tenant's server.", ""),
    ("haproxy", "log", "Argument of HAProxy's global `log` (full mode).", ""),
    ("haproxy", "maxconn", "Most concurrent client connections.", ""),
    ("haproxy", "hard_stop_after", "After a reload, old workers still serving sessions stop after this long; unset: when their last session ends.", "\"1h\""),
    ("haproxy", "threads", "HAProxy's nbthread; unset: one per CPU (BENCHMARKS.md, section 5, measured 1 vs 2).", "1"),
    ("docker", "socket", "The Docker engine's API socket.", ""),
    ("docker", "prefix", "Names this layout's containers and volumes (PREFIX-acme); one per layout on an engine.", ""),
    ("docker", "default_image", "Image of managed tenants that name none (docker/build-image.sh builds it; pgs never pulls).", ""),
    ("docker", "default_memory", "Memory limit of managed tenants that set none.", ""),
    ("docker", "default_max_connections", "PostgreSQL max_connections of managed tenants that set none.", ""),
    ("docker", "pids_limit", "Process limit per tenant container.", ""),
    ("docker", "ready_timeout_secs", "How long a new or restarted server may take to accept logins, in seconds.", ""),
    ("docker", "start_concurrency", "Servers a pass creates, starts or stops at the same time (1 to 64); BENCHMARKS.md, section 2, measures a batch at 1 and 4.", ""),
    ("api", "listen", "HTTP API of `run`: HOST:PORT (keep it on loopback), a unix socket path, or \"\" for none.", ""),
    ("api", "max_body_bytes", "Largest request body the API accepts, in bytes.", ""),
    ("limits", "tenant_connections", "Concurrent client sessions per tenant whose entry sets no connection_limit (FATAL 53300 past it); 0: no limit. PostgreSQL's max_connections stays the hard limit.", ""),
    ("limits", "failed_startups", "Failed startups (malformed, unknown tenant, wrong password) one client address may have per window before it is refused (28000) until its rate drops.", ""),
    ("limits", "failed_startups_window", "The window of failed_startups.", ""),
    ("limits", "cancels_per_source", "Cancel requests one client address may send per 10 seconds; more are dropped.", ""),
    ("limits", "cancel_keys", "Most cancel keys remembered (one per session); when full the oldest are dropped first.", ""),
    ("limits", "cancel_key_ttl", "How long a session's cancel key is remembered (a session older than this cannot be cancelled).", ""),
    ("limits", "sources", "Most client addresses counted at once.", ""),
    ("backups", "repository", "Where each managed tenant's pgBackRest repository lives (one directory per tenant).", ""),
    ("backups", "archive_timeout_secs", "PostgreSQL's archive_timeout: the most committed work (in seconds) a lost volume can cost.", ""),
    ("backups", "full_every", "A full backup at least this often (\"7d\", \"12h\"); a tenant's \"backups\" entry overrides it.", ""),
    ("backups", "incr_every", "An incremental backup at least this often.", ""),
    ("backups", "keep_full", "Full backups kept (with their incrementals and WAL).", ""),
    ("backups", "keep_days", "Keep full backups by age (days) instead of by count.", "14"),
    ("backups", "verify_every", "`pgbackrest verify` of each repository at least this often.", ""),
    ("backups", "restore_test_every", "Restore the latest backup into a scratch volume and check it at least this often.", ""),
    ("sleep", "idle_timeout", "Managed tenants with no client session for this long sleep (their server stops; the next client wakes it); a tenant's \"idle_timeout\" overrides it. Unset: only tenants whose entry says.", "\"15m\""),
    ("sleep", "wake_timeout", "How long a client of a sleeping tenant is held while its server starts; past it the client gets 57P03 (drivers retry).", ""),
    ("sleep", "check_every", "How often HAProxy's session counts are read to find idle tenants.", ""),
    ("sleep", "deep_after", "A tenant asleep this long also has its container stopped (no memory; a wake then takes ~0.5 s more).", ""),
    ("sleep", "max_light", "Most sleeping tenants whose container stays up (~6 MiB each, fast wake); beyond it the longest asleep have their container stopped.", ""),
    ("sleep", "socket_user", "Owner of the agent's wake socket (run/wake.sock, mode 600) when HAProxy's workers drop privileges (`user` in its global section).", "\"haproxy\""),
    ("tls", "certificates", "Directory of PEM files (chain and key in one file), all served; the first alphabetically is the default without SNI. Renewed files are picked up without a reload.", ""),
    ("tls", "mode", "\"optional\": plaintext and TLS clients; \"required\": plaintext startups are refused with a FATAL that says to use TLS.", ""),
    ("tls", "domain", "Tenant domain: an SNI ending in .DOMAIN must name the user's tenant in its first label (acme.DOMAIN); SNI is never required.", "\"db.example.com\""),
    ("tls", "socket_user", "Owner of the internal TLS sockets when HAProxy drops privileges (`user` in its global section).", "\"haproxy\""),
    ("tls", "socket_group", "Group of the internal TLS sockets.", "\"haproxy\""),
];

impl TlsSettings {
    /// Rejects values HAProxy would misread.
    pub fn check(&self) -> anyhow::Result<()> {
        if let Some(d) = &self.domain {
            let ok = !d.is_empty()
                && d.len() <= 253
                && !d.starts_with(['.', '-'])
                && !d.ends_with('.')
                && !d.contains("..")
                && d.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' || c == '-');
            if !ok {
                bail!(
                    "tls.domain = {d:?} is not a lowercase DNS name like \"db.example.com\" \
                     (no leading dot, no wildcard)"
                );
            }
        }
        for (key, v) in [
            ("tls.socket_user", &self.socket_user),
            ("tls.socket_group", &self.socket_group),
        ] {
            if let Some(v) = v {
                let ok = !v.is_empty()
                    && v.chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
                if !ok {
                    bail!("{key} = {v:?} is not a user or group name");
                }
            }
        }
        let p = self.certificates.to_string_lossy();
        if p.is_empty() || p.chars().any(|c| c.is_whitespace() || c == '#') {
            bail!("tls.certificates = {p:?} must be a directory path without spaces or '#'");
        }
        Ok(())
    }
}

/// Accepts what HAProxy's time parser accepts for our uses: digits and an optional unit.
/// HAProxy keeps timers in signed 32-bit milliseconds (about 24.8 days).
pub fn is_haproxy_duration(s: &str) -> bool {
    let digits = s.chars().take_while(|c| c.is_ascii_digit()).count();
    let ms_per_unit: u64 = match &s[digits..] {
        "us" => 0,
        "" | "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return false,
    };
    let Ok(n) = s[..digits].parse::<u64>() else {
        return false;
    };
    n.checked_mul(ms_per_unit.max(1))
        .is_some_and(|ms| ms <= i32::MAX as u64)
}

/// Every path the agent touches, absolute, derived from the settings in one place.
#[derive(Debug, Clone, PartialEq)]
pub struct Paths {
    pub config: PathBuf,
    pub tenants_file: PathBuf,
    /// Generated secrets, mode 0700.
    pub secrets_dir: PathBuf,
    /// The bearer token API clients present (generated by `init`, mode 0600).
    pub api_token: PathBuf,
    pub run_dir: PathBuf,
    /// One directory per tenant holding its server's unix socket.
    pub tenant_sockets_dir: PathBuf,
    pub admin_socket: PathBuf,
    pub master_socket: PathBuf,
    pub pidfile: PathBuf,
    /// Serializes reconcilers (daemon, `sync`) so there is one writer of HAProxy's files.
    pub agent_lock: PathBuf,
    /// Held by `run` for its whole life: one daemon per layout.
    pub daemon_lock: PathBuf,
    /// Written after a confirmed reload: the worker pid and the config it loaded.
    pub haproxy_loaded: PathBuf,
    /// Serializes writers of the map files and of HAProxy's runtime maps.
    pub maps_lock: PathBuf,
    pub haproxy_dir: PathBuf,
    pub haproxy_cfg: PathBuf,
    pub maps_dir: PathBuf,
    pub backends_map: PathBuf,
    pub access_map: PathBuf,
    /// Server id → backend, for routing a cancel request by the server that issued its key.
    pub servers_map: PathBuf,
    pub lua: PathBuf,
    /// The router's wire-format module, loaded by `require` from `haproxy_dir`.
    pub lua_wire: PathBuf,
    /// Candidate files are rendered and checked here before the real ones are replaced.
    pub staging_dir: PathBuf,
    /// The certificates the operator provides (`[tls] certificates`); the agent watches it.
    pub tls_dir: PathBuf,
    /// The copies HAProxy loads (`crt`): only files that parsed and that HAProxy accepted
    /// (at runtime or in `haproxy -c`) reach it, so a broken file never stops a restart.
    pub tls_served_dir: PathBuf,
    /// The root of the tenants' backup repositories (`[backups] repository`).
    pub backups_dir: PathBuf,
    /// What the agent records about tenants: which volume holds their data, backup results.
    pub state_dir: PathBuf,
    /// Internal TLS listener for clients that asked with an SSLRequest (mode 600).
    pub tls_socket: PathBuf,
    /// Internal TLS listener for direct TLS (PostgreSQL 17+, ALPN `postgresql`) (mode 600).
    pub tls_direct_socket: PathBuf,
    /// The agent's local wake endpoint, which HAProxy calls for a client of a sleeping tenant
    /// (mode 600).
    pub wake_socket: PathBuf,
    /// Sleeping tenants (`tenant asleep|waking`); written by the agent alone, read by
    /// HAProxy's tenant backends, which hold a client there until the agent woke the server.
    pub asleep_map: PathBuf,
}

impl Paths {
    pub fn new(config: &Path, s: &Settings) -> Paths {
        let config = absolute(config);
        let base = config
            .parent()
            .map(Path::to_owned)
            .unwrap_or_else(|| PathBuf::from("/"));
        let at = |p: &Path| {
            if p.is_absolute() {
                p.to_owned()
            } else {
                base.join(p)
            }
        };
        let run_dir = at(&s.run_dir);
        let secrets_dir = at(&s.secrets_dir);
        let haproxy_dir = at(&s.haproxy_dir);
        let maps_dir = haproxy_dir.join("maps");
        Paths {
            tenants_file: at(&s.tenants_file),
            api_token: secrets_dir.join("api-token"),
            secrets_dir,
            tenant_sockets_dir: run_dir.join("tenants"),
            admin_socket: s
                .haproxy
                .admin_socket
                .as_deref()
                .map(&at)
                .unwrap_or_else(|| run_dir.join("admin.sock")),
            master_socket: s
                .haproxy
                .master_socket
                .as_deref()
                .map(&at)
                .unwrap_or_else(|| run_dir.join("master.sock")),
            pidfile: run_dir.join("haproxy.pid"),
            agent_lock: run_dir.join("agent.lock"),
            daemon_lock: run_dir.join("daemon.lock"),
            maps_lock: run_dir.join("maps.lock"),
            haproxy_loaded: run_dir.join("haproxy.loaded"),
            haproxy_cfg: haproxy_dir.join("pgs.cfg"),
            backends_map: maps_dir.join("backends.map"),
            access_map: maps_dir.join("access.map"),
            servers_map: maps_dir.join("servers.map"),
            lua: haproxy_dir.join("pg-route.lua"),
            lua_wire: haproxy_dir.join("pgs_wire.lua"),
            staging_dir: haproxy_dir.join(".staging"),
            tls_dir: at(&s.tls.clone().unwrap_or_default().certificates),
            tls_served_dir: haproxy_dir.join("tls"),
            backups_dir: at(&s.backups.repository),
            state_dir: at(&s.state_dir),
            tls_socket: run_dir.join("tls.sock"),
            tls_direct_socket: run_dir.join("tls-direct.sock"),
            wake_socket: run_dir.join("wake.sock"),
            asleep_map: maps_dir.join("asleep.map"),
            maps_dir,
            haproxy_dir,
            run_dir,
            config,
        }
    }

    /// A managed tenant's pgBackRest repository.
    pub fn tenant_repository(&self, id: &crate::tenants::TenantId) -> PathBuf {
        self.backups_dir.join(id.as_str())
    }

    /// The file naming the volume that holds a tenant's data, once a restore moved it off the
    /// volume it was created with.
    pub fn tenant_volume_record(&self, id: &crate::tenants::TenantId) -> PathBuf {
        self.state_dir.join("volumes").join(id.as_str())
    }

    /// Backup results of a tenant (last success, failures, verify and restore tests).
    pub fn tenant_backup_status(&self, id: &crate::tenants::TenantId) -> PathBuf {
        self.state_dir
            .join("backups")
            .join(format!("{}.json", id.as_str()))
    }

    /// The directory bind-mounted as a managed tenant's `/var/run/postgresql`.
    pub fn tenant_socket_dir(&self, id: &crate::tenants::TenantId) -> PathBuf {
        self.tenant_sockets_dir.join(id.as_str())
    }

    /// The generated password of a managed tenant's PostgreSQL superuser.
    pub fn tenant_password_file(&self, id: &crate::tenants::TenantId) -> PathBuf {
        self.secrets_dir.join(format!("{id}.password"))
    }

    /// Where the passwords of a managed tenant's extra roles live (`<role>.password`, 0600).
    pub fn tenant_roles_dir(&self, id: &crate::tenants::TenantId) -> PathBuf {
        self.secrets_dir.join("roles").join(id.as_str())
    }

    /// The password file of role `role` of tenant `id`.
    pub fn role_password_file(&self, id: &crate::tenants::TenantId, role: &str) -> PathBuf {
        self.tenant_roles_dir(id).join(format!("{role}.password"))
    }

    /// The same layout with the rendered HAProxy files moved under `dir` (for checking a
    /// candidate without touching the live files).
    pub fn with_haproxy_dir(&self, dir: &Path) -> Paths {
        let maps_dir = dir.join("maps");
        Paths {
            haproxy_dir: dir.to_owned(),
            haproxy_cfg: dir.join("pgs.cfg"),
            backends_map: maps_dir.join("backends.map"),
            access_map: maps_dir.join("access.map"),
            servers_map: maps_dir.join("servers.map"),
            asleep_map: maps_dir.join("asleep.map"),
            lua: dir.join("pg-route.lua"),
            lua_wire: dir.join("pgs_wire.lua"),
            tls_served_dir: dir.join("tls"),
            staging_dir: dir.join(".staging"),
            maps_dir,
            ..self.clone()
        }
    }
}

fn absolute(p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_owned()
    } else {
        std::env::current_dir()
            .map(|d| d.join(p))
            .unwrap_or_else(|_| p.to_owned())
    }
}

/// Settings and paths, loaded together.
#[derive(Debug, Clone)]
pub struct Agent {
    pub settings: Settings,
    pub paths: Paths,
    /// The settings file it was loaded from (`-c`).
    pub config: PathBuf,
}

impl Agent {
    pub fn load(config: &Path) -> anyhow::Result<Agent> {
        let text = std::fs::read_to_string(config).with_context(|| {
            format!(
                "cannot read agent settings {}; create a layout with `pgs-agent init DIR` \
                 and pass `-c DIR/pgs.toml` (or set PGS_CONFIG)",
                config.display()
            )
        })?;
        let settings = Settings::parse(&text)
            .with_context(|| format!("agent settings {} are not valid", config.display()))?;
        let paths = Paths::new(config, &settings);
        Ok(Agent {
            settings,
            paths,
            config: config.to_path_buf(),
        })
    }

    /// How to invoke the agent on this layout in a hint: `pgs-agent`, plus `-c FILE` unless the
    /// settings are at the default path.
    pub fn cli(&self) -> String {
        if self.config == Path::new(DEFAULT_CONFIG) {
            "pgs-agent".to_string()
        } else {
            format!("pgs-agent -c {}", self.config.display())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hints_name_the_settings_file_unless_it_is_the_default() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("pgs.toml");
        std::fs::write(&config, Settings::default().to_commented_toml()).unwrap();
        let mut agent = Agent::load(&config).unwrap();
        assert_eq!(agent.cli(), format!("pgs-agent -c {}", config.display()));
        agent.config = PathBuf::from(DEFAULT_CONFIG);
        assert_eq!(agent.cli(), "pgs-agent");
    }

    #[test]
    fn defaults_round_trip_through_the_written_file() {
        let s = Settings::default();
        let text = s.to_commented_toml();
        assert_eq!(Settings::parse(&text).unwrap(), s);
        assert!(text.contains("listen = \"127.0.0.1:6432\""), "{text}");
    }

    #[test]
    fn every_setting_is_documented_in_the_written_file() {
        let mut s = Settings::default();
        s.haproxy.admin_socket = Some("/run/a.sock".into());
        s.haproxy.master_socket = Some("/run/m.sock".into());
        s.haproxy.hard_stop_after = Some("1h".into());
        s.haproxy.threads = Some(1);
        s.backups.keep_days = Some(14);
        let full = toml::Value::try_from(&s).unwrap();
        for (name, v) in full.as_table().unwrap() {
            let keys: Vec<(&str, &str)> = match v.as_table() {
                Some(t) => t.keys().map(|k| (name.as_str(), k.as_str())).collect(),
                None => vec![("", name.as_str())],
            };
            for (sec, key) in keys {
                assert!(
                    SETTING_DOCS.iter().any(|d| d.0 == sec && d.1 == key),
                    "[{sec}] {key} has no entry in SETTING_DOCS"
                );
            }
        }
        assert_eq!(Settings::parse(&s.to_commented_toml()).unwrap(), s);
        // Unset optional keys appear as commented-out examples, and still parse as unset.
        let text = Settings::default().to_commented_toml();
        assert!(text.contains("\n# threads = 1\n"), "{text}");
        assert!(text.contains("\n# admin_socket = "), "{text}");
    }

    #[test]
    fn relative_paths_hang_off_the_settings_file() {
        let p = Paths::new(Path::new("/srv/pgs/pgs.toml"), &Settings::default());
        assert_eq!(p.tenants_file, Path::new("/srv/pgs/tenants.json"));
        assert_eq!(p.admin_socket, Path::new("/srv/pgs/run/admin.sock"));
        assert_eq!(p.access_map, Path::new("/srv/pgs/haproxy/maps/access.map"));
        let staged = p.with_haproxy_dir(Path::new("/tmp/x"));
        assert_eq!(staged.lua, Path::new("/tmp/x/pg-route.lua"));
        assert_eq!(staged.admin_socket, p.admin_socket);
    }

    #[test]
    fn bad_settings_are_explained() {
        let err = Settings::parse("[haproxy]\nstartup_timeout = \"soon\"\n").unwrap_err();
        assert!(err.to_string().contains("haproxy.startup_timeout"), "{err}");
        let err = Settings::parse("tenant_file = \"x\"\n").unwrap_err();
        assert!(format!("{err:#}").contains("unknown field"), "{err:#}");
    }

    #[test]
    fn start_concurrency_is_bounded() {
        assert_eq!(Settings::default().docker.start_concurrency, 4);
        for ok in [1, 64] {
            let s = Settings::parse(&format!("[docker]\nstart_concurrency = {ok}\n")).unwrap();
            assert_eq!(s.docker.start_concurrency, ok);
        }
        for bad in [0, 65] {
            let err = Settings::parse(&format!("[docker]\nstart_concurrency = {bad}\n"))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("docker.start_concurrency") && err.contains("1 to 64"),
                "{err}"
            );
        }
    }

    #[test]
    fn intervals() {
        assert_eq!(parse_interval("90s"), Ok(90));
        assert_eq!(parse_interval("7d"), Ok(604_800));
        for bad in ["", "7", "0d", "1w", "d", "-1h"] {
            assert!(parse_interval(bad).is_err(), "{bad}");
        }
        let err = Settings::parse("[backups]\nfull_every = \"weekly\"\n").unwrap_err();
        assert!(err.to_string().contains("backups.full_every"), "{err}");
    }

    #[test]
    fn durations() {
        for ok in ["5s", "500ms", "1h", "30", "2d"] {
            assert!(is_haproxy_duration(ok), "{ok}");
        }
        for bad in ["", "s", "5 s", "5x", "-1s", "30d", "99999999999s"] {
            assert!(!is_haproxy_duration(bad), "{bad}");
        }
    }
}
