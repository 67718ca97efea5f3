//! The tenants file (desired state): parsing in two stages (JSON text → untyped value → validated
//! `Tenants`, every problem reported with its place), the `TenantId` type, and the locked atomic
//! writer that edits the file in place. It never talks to HAProxy or Docker.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::fsutil::{self, FileLock};

/// The only schema version this agent reads and writes.
pub const VERSION: u64 = 1;

/// Longest tenant id: PostgreSQL truncates identifiers at 63 bytes.
const MAX_ID_LEN: usize = 63;

/// `sun_path` holds 108 bytes including the terminating NUL.
const MAX_UNIX_PATH: usize = 107;

/// A validated tenant id: `^[a-z][a-z0-9_]{0,62}$`. It becomes a PostgreSQL role, a HAProxy
/// backend name, a map key, a container name and a directory name, so it is checked once, here.
#[derive(
    Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(try_from = "String", into = "String")]
pub struct TenantId(String);

impl TryFrom<String> for TenantId {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        TenantId::parse(&s)
    }
}

impl From<TenantId> for String {
    fn from(id: TenantId) -> String {
        id.0
    }
}

impl TenantId {
    pub fn parse(s: &str) -> Result<TenantId, String> {
        let first_ok = s.chars().next().is_some_and(|c| c.is_ascii_lowercase());
        let rest_ok = s
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if s.is_empty() {
            Err("tenant id is empty".into())
        } else if s.len() > MAX_ID_LEN {
            Err(format!(
                "tenant id is {} characters long; the limit is {MAX_ID_LEN}",
                s.len()
            ))
        } else if !first_ok || !rest_ok {
            Err(format!(
                "tenant id {s:?} is not valid: use a lowercase letter, then lowercase letters, digits or '_'"
            ))
        } else {
            Ok(TenantId(s.to_owned()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The HAProxy backend (and map value) that routes to this tenant.
    pub fn backend_name(&self) -> String {
        format!("pgs_{}", self.0)
    }
}

impl fmt::Display for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for TenantId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TenantId::parse(s)
    }
}

/// Whether new connections may reach the tenant. Disabled is the default: secure unless asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Access {
    Enabled,
    #[default]
    Disabled,
}

impl Access {
    pub fn as_str(self) -> &'static str {
        match self {
            Access::Enabled => "enabled",
            Access::Disabled => "disabled",
        }
    }

    pub fn parse(s: &str) -> Option<Access> {
        match s {
            "enabled" => Some(Access::Enabled),
            "disabled" => Some(Access::Disabled),
            _ => None,
        }
    }
}

impl fmt::Display for Access {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a PostgreSQL server listens, as HAProxy will dial it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(untagged)]
pub enum Address {
    /// A unix socket file, e.g. `/run/postgresql/.s.PGSQL.5432`.
    Unix(PathBuf),
    /// `host:port`; the host is an IPv4 address, a bracketed IPv6 address or a DNS name.
    Tcp(String),
}

impl Address {
    pub fn parse(s: &str) -> Result<Address, String> {
        // Everything here ends up as one token of haproxy.cfg: refuse what could split it.
        if let Some(bad) = s
            .chars()
            .find(|c| c.is_whitespace() || c.is_control() || "#\"'\\$%{}".contains(*c))
        {
            return Err(format!(
                "address {s:?} contains {bad:?}, which is not allowed"
            ));
        }
        if s.starts_with('/') {
            if s.len() > MAX_UNIX_PATH {
                return Err(format!(
                    "unix socket path is {} bytes; the system limit is {MAX_UNIX_PATH}",
                    s.len()
                ));
            }
            if s.ends_with('/') {
                return Err(format!(
                    "address {s:?} is a directory: give the socket file, e.g. {s}.s.PGSQL.5432"
                ));
            }
            return Ok(Address::Unix(PathBuf::from(s)));
        }
        let Some((host, port)) = s.rsplit_once(':') else {
            return Err(format!(
                "address {s:?} is neither a unix socket path (starting with '/') nor host:port"
            ));
        };
        let port_ok = port.parse::<u16>().is_ok_and(|p| p != 0);
        if !port_ok {
            return Err(format!("address {s:?} has no valid port (1-65535)"));
        }
        let host_ok = if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
            v6.parse::<std::net::Ipv6Addr>().is_ok()
        } else {
            !host.is_empty()
                && host
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-')
        };
        if !host_ok {
            return Err(format!("address {s:?} has no valid host"));
        }
        Ok(Address::Tcp(s.to_owned()))
    }

    /// The address in HAProxy's `server` syntax.
    pub fn haproxy(&self) -> String {
        match self {
            Address::Unix(p) => format!("unix@{}", p.display()),
            Address::Tcp(hp) => hp.clone(),
        }
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Unix(p) => write!(f, "{}", p.display()),
            Address::Tcp(hp) => f.write_str(hp),
        }
    }
}

/// A PostgreSQL server that pgs runs for the tenant in a container of its own.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct ManagedSpec {
    /// Container image; `None` means the agent's default image.
    pub image: Option<String>,
    /// Memory limit in bytes.
    pub memory: Option<u64>,
    /// CPU limit in cores (fractions allowed).
    pub cpus: Option<f64>,
    /// PostgreSQL `max_connections`.
    pub max_connections: Option<u32>,
    /// Extra `postgres -c name=value` settings.
    pub settings: BTreeMap<String, String>,
    /// Host files run once at first start (`.sql` or `.sh`), in order.
    pub init_scripts: Vec<PathBuf>,
    /// Continuous WAL archiving into the tenant's backup repository (the tenants file's
    /// `backups.enabled`, on unless set to false). Left out of the container's spec label
    /// when on, so containers made before backups existed compare equal.
    #[serde(skip_serializing_if = "is_true")]
    pub backups: bool,
}

impl Default for ManagedSpec {
    fn default() -> Self {
        ManagedSpec {
            image: None,
            memory: None,
            cpus: None,
            max_connections: None,
            settings: BTreeMap::new(),
            init_scripts: Vec::new(),
            backups: true,
        }
    }
}

fn is_true(b: &bool) -> bool {
    *b
}

/// A tenant's own backup schedule and retention (the tenants file's `"backups"` entry); every
/// field left out takes the agent's `[backups]` default.
#[derive(Debug, Clone, PartialEq, Default, serde::Serialize)]
pub struct BackupPolicy {
    /// `false` turns backups and WAL archiving off for the tenant.
    pub enabled: bool,
    /// Seconds between full backups.
    pub full_every: Option<u64>,
    /// Seconds between incremental backups.
    pub incr_every: Option<u64>,
    pub keep_full: Option<u32>,
    pub keep_days: Option<u32>,
}

/// What serves the tenant.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Instance {
    /// A server pgs routes to but does not run.
    External { address: Address },
    /// A server pgs runs (Docker).
    Managed(ManagedSpec),
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Tenant {
    pub id: TenantId,
    pub access: Access,
    pub instance: Instance,
    /// A managed tenant whose server is kept stopped (`tenant stop`); it is not routable.
    pub stopped: bool,
    /// Whether plaintext sessions may reach it.
    pub tls: TenantTls,
    /// Most concurrent client sessions through HAProxy; `None`: the settings' default.
    pub connection_limit: Option<u32>,
    /// Extra roles on a managed tenant's server (`managed.roles`), by name; users log in as
    /// `<role>.<tenant>`. Kept out of `ManagedSpec`: a role change never replaces the container.
    pub roles: BTreeMap<String, RoleSpec>,
    /// Backups of a managed tenant (enabled unless the file says otherwise).
    pub backups: BackupPolicy,
    /// When a managed tenant without client sessions sleeps (`"idle_timeout"`); `None`: the
    /// settings' `[sleep] idle_timeout`.
    pub idle_timeout: Option<IdleTimeout>,
}

/// A tenant's `"idle_timeout"`: seconds without a client session before its server sleeps, or
/// `"never"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum IdleTimeout {
    Never,
    Secs(u64),
}

/// One extra role of a managed tenant (`managed.roles.<name>` in the tenants file).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct RoleSpec {
    /// Reads every table but writes none (`pg_read_all_data`, read-only transactions);
    /// otherwise it reads and writes every table (`pg_write_all_data` too).
    pub read_only: bool,
    /// Most concurrent sessions (PostgreSQL's `CONNECTION LIMIT`); `None`: no limit.
    pub connection_limit: Option<u32>,
}

/// A tenant's TLS policy (`"tls"` in the tenants file). `required` refuses plaintext sessions
/// with the same message an unknown tenant gets, so the policy tells outsiders nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TenantTls {
    #[default]
    Optional,
    Required,
}

impl Tenant {
    /// Whether new connections may be routed to it: access enabled and not stopped.
    pub fn routable(&self) -> bool {
        self.access == Access::Enabled && !self.stopped
    }

    /// Seconds without a client session before this tenant's server sleeps, given the
    /// settings' default; `None`: it never sleeps by itself (external, stopped, or off).
    pub fn idle_timeout_secs(&self, default: Option<u64>) -> Option<u64> {
        if !matches!(self.instance, Instance::Managed(_)) || self.stopped {
            return None;
        }
        match self.idle_timeout {
            Some(IdleTimeout::Never) => None,
            Some(IdleTimeout::Secs(s)) => Some(s),
            None => default,
        }
    }
}

/// The validated desired state.
#[derive(Debug, Clone, PartialEq, Default, serde::Serialize)]
pub struct Tenants {
    pub tenants: BTreeMap<TenantId, Tenant>,
}

impl Tenants {
    pub fn get(&self, id: &TenantId) -> Option<&Tenant> {
        self.tenants.get(id)
    }
    pub fn iter(&self) -> impl Iterator<Item = &Tenant> {
        self.tenants.values()
    }
    pub fn len(&self) -> usize {
        self.tenants.len()
    }
    pub fn is_empty(&self) -> bool {
        self.tenants.is_empty()
    }
}

/// One thing wrong with a tenants file, and where.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Problem {
    /// A dotted path into the document, e.g. `tenants.acme.access`; empty for the whole file.
    pub place: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.place.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.place, self.message)
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read tenants file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("tenants file {path} is not valid JSON: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("tenants file {path} has {} problem(s):\n{}", problems.len(), list(problems))]
    Invalid {
        path: PathBuf,
        problems: Vec<Problem>,
    },
}

fn list(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| format!("  - {p}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The text of a new, empty tenants file.
pub fn empty_file() -> String {
    format!("{{\n  \"version\": {VERSION},\n  \"tenants\": {{}}\n}}\n")
}

/// Reads and validates the tenants file at `path`.
pub fn load(path: &Path) -> Result<Tenants, LoadError> {
    let text = std::fs::read_to_string(path).map_err(|source| LoadError::Io {
        path: path.to_owned(),
        source,
    })?;
    let value = parse_json(path, &text)?;
    validate(&value).map_err(|problems| LoadError::Invalid {
        path: path.to_owned(),
        problems,
    })
}

fn parse_json(path: &Path, text: &str) -> Result<Value, LoadError> {
    serde_json::from_str(text).map_err(|e| LoadError::Syntax {
        path: path.to_owned(),
        message: e.to_string(),
    })
}

/// Stage two: the untyped document → validated `Tenants`, collecting every problem.
pub fn validate(doc: &Value) -> Result<Tenants, Vec<Problem>> {
    let mut v = Validator::default();
    let Some(obj) = v.object(doc, "") else {
        return Err(v.problems);
    };
    v.known_keys(obj, "", &["version", "tenants"]);
    match obj.get("version") {
        None => v.problem("version", format!("missing; add \"version\": {VERSION}")),
        Some(Value::Number(n)) if n.as_u64() == Some(VERSION) => {}
        Some(other) => v.problem(
            "version",
            format!("unsupported version {other}; this agent reads version {VERSION}"),
        ),
    }
    let mut tenants = BTreeMap::new();
    match obj.get("tenants") {
        None => v.problem("tenants", "missing; add \"tenants\": {}"),
        Some(t) => {
            if let Some(map) = v.object(t, "tenants") {
                for (key, spec) in map {
                    let place = format!("tenants.{key}");
                    let id = match TenantId::parse(key) {
                        Ok(id) => Some(id),
                        Err(e) => {
                            v.problem(&place, e);
                            None
                        }
                    };
                    let tenant = v.tenant(spec, &place, key);
                    if let (Some(id), Some(f)) = (id, tenant) {
                        tenants.insert(
                            id.clone(),
                            Tenant {
                                id,
                                access: f.access,
                                instance: f.instance,
                                stopped: f.stopped,
                                tls: f.tls,
                                connection_limit: f.connection_limit,
                                idle_timeout: f.idle_timeout,
                                roles: f.roles,
                                backups: f.backups,
                            },
                        );
                    }
                }
            }
        }
    }
    if v.problems.is_empty() {
        Ok(Tenants { tenants })
    } else {
        Err(v.problems)
    }
}

/// A tenant's entry, validated (everything of a `Tenant` but its id).
struct TenantFields {
    access: Access,
    instance: Instance,
    stopped: bool,
    tls: TenantTls,
    connection_limit: Option<u32>,
    roles: BTreeMap<String, RoleSpec>,
    backups: BackupPolicy,
    idle_timeout: Option<IdleTimeout>,
}

#[derive(Default)]
struct Validator {
    problems: Vec<Problem>,
}

impl Validator {
    fn problem(&mut self, place: &str, message: impl Into<String>) {
        self.problems.push(Problem {
            place: place.to_owned(),
            message: message.into(),
        });
    }

    fn object<'a>(&mut self, value: &'a Value, place: &str) -> Option<&'a Map<String, Value>> {
        match value {
            Value::Object(m) => Some(m),
            other => {
                self.problem(
                    place,
                    format!("expected an object, found {}", kind_of(other)),
                );
                None
            }
        }
    }

    /// Unknown keys are errors (a typo like `acess` must not silently mean "disabled"), except
    /// keys starting with `x-`, which are kept for people's own notes and tooling.
    fn known_keys(&mut self, obj: &Map<String, Value>, place: &str, known: &[&str]) {
        for key in obj.keys() {
            if !known.contains(&key.as_str()) && !key.starts_with("x-") {
                self.problem(
                    &join(place, key),
                    format!(
                        "unknown field; expected one of: {} (or a key starting with \"x-\")",
                        known.join(", ")
                    ),
                );
            }
        }
    }

    fn tenant(&mut self, spec: &Value, place: &str, id: &str) -> Option<TenantFields> {
        let obj = self.object(spec, place)?;
        self.known_keys(
            obj,
            place,
            &[
                "access",
                "external",
                "managed",
                "stopped",
                "tls",
                "connection_limit",
                "backups",
                "idle_timeout",
            ],
        );
        let idle_timeout = match obj.get("idle_timeout") {
            None => Some(None),
            Some(_) if !obj.contains_key("managed") => {
                self.problem(
                    &join(place, "idle_timeout"),
                    "only a managed tenant sleeps; pgs does not run an external server",
                );
                None
            }
            Some(Value::String(s)) if s == "never" => Some(Some(IdleTimeout::Never)),
            Some(Value::String(s)) => match crate::settings::parse_interval(s) {
                Ok(secs) => Some(Some(IdleTimeout::Secs(secs))),
                Err(e) => {
                    self.problem(&join(place, "idle_timeout"), format!("{e}, or \"never\""));
                    None
                }
            },
            Some(other) => {
                self.problem(
                    &join(place, "idle_timeout"),
                    format!("expected an interval like \"15m\" or \"never\", found {other}"),
                );
                None
            }
        };
        let backups = match obj.get("backups") {
            None => Some(BackupPolicy {
                enabled: obj.contains_key("managed"),
                ..BackupPolicy::default()
            }),
            Some(_) if !obj.contains_key("managed") => {
                self.problem(
                    &join(place, "backups"),
                    "only a managed tenant has backups; pgs does not run an external server",
                );
                None
            }
            Some(b) => self.backups(b, &join(place, "backups")),
        };
        let limit = match obj.get("connection_limit") {
            None => Some(None),
            Some(Value::Number(n)) if n.as_u64().is_some_and(|n| n <= 1_000_000) => {
                Some(n.as_u64().map(|n| n as u32))
            }
            Some(other) => {
                self.problem(
                    &join(place, "connection_limit"),
                    format!(
                        "expected a number of sessions (0 for no limit, at most 1000000), found {other}"
                    ),
                );
                None
            }
        };
        let tls = match obj.get("tls") {
            None => Some(TenantTls::default()),
            Some(Value::String(s)) if s == "optional" => Some(TenantTls::Optional),
            Some(Value::String(s)) if s == "required" => Some(TenantTls::Required),
            Some(other) => {
                self.problem(
                    &join(place, "tls"),
                    format!("expected \"optional\" or \"required\", found {other}"),
                );
                None
            }
        };
        let stopped = match obj.get("stopped") {
            None => Some(false),
            Some(Value::Bool(b)) if !*b || obj.contains_key("managed") => Some(*b),
            Some(Value::Bool(_)) => {
                self.problem(
                    &join(place, "stopped"),
                    "only a managed tenant can be stopped; use \"access\": \"disabled\"",
                );
                None
            }
            Some(other) => {
                self.problem(
                    &join(place, "stopped"),
                    format!("expected true or false, found {other}"),
                );
                None
            }
        };
        let access = match obj.get("access") {
            None => Some(Access::default()),
            Some(Value::String(s)) if Access::parse(s).is_some() => Access::parse(s),
            Some(other) => {
                self.problem(
                    &join(place, "access"),
                    format!("expected \"enabled\" or \"disabled\", found {other}"),
                );
                None
            }
        };
        let instance = match (obj.get("external"), obj.get("managed")) {
            (Some(_), Some(_)) => {
                self.problem(place, "has both \"external\" and \"managed\"; keep one");
                None
            }
            (None, None) => {
                self.problem(
                    place,
                    "needs \"external\": {\"address\": ...} or \"managed\": {}",
                );
                None
            }
            (Some(ext), None) => self.external(ext, &join(place, "external")),
            (None, Some(m)) => self.managed(m, &join(place, "managed")),
        };
        let roles = match obj.get("managed").and_then(|m| m.get("roles")) {
            Some(r) => self.roles(r, &join(place, "managed.roles"), id),
            None => Some(BTreeMap::new()),
        };
        let backups = backups?;
        let instance = match instance? {
            Instance::Managed(mut spec) => {
                spec.backups = backups.enabled;
                Instance::Managed(spec)
            }
            other => other,
        };
        Some(TenantFields {
            access: access?,
            instance,
            stopped: stopped?,
            tls: tls?,
            connection_limit: limit?,
            roles: roles?,
            backups,
            idle_timeout: idle_timeout?,
        })
    }

    fn backups(&mut self, value: &Value, place: &str) -> Option<BackupPolicy> {
        let obj = self.object(value, place)?;
        self.known_keys(
            obj,
            place,
            &[
                "enabled",
                "full_every",
                "incr_every",
                "keep_full",
                "keep_days",
            ],
        );
        let before = self.problems.len();
        let mut policy = BackupPolicy {
            enabled: true,
            ..BackupPolicy::default()
        };
        match obj.get("enabled") {
            None => {}
            Some(Value::Bool(b)) => policy.enabled = *b,
            Some(other) => self.problem(
                &join(place, "enabled"),
                format!("expected true or false, found {other}"),
            ),
        }
        for (key, slot) in [
            ("full_every", &mut policy.full_every),
            ("incr_every", &mut policy.incr_every),
        ] {
            match obj.get(key) {
                None => {}
                Some(Value::String(s)) => match crate::settings::parse_interval(s) {
                    Ok(secs) => *slot = Some(secs),
                    Err(e) => self.problem(&join(place, key), e),
                },
                Some(other) => self.problem(
                    &join(place, key),
                    format!("expected an interval like \"7d\" or \"12h\", found {other}"),
                ),
            }
        }
        for (key, slot) in [
            ("keep_full", &mut policy.keep_full),
            ("keep_days", &mut policy.keep_days),
        ] {
            match obj.get(key) {
                None => {}
                Some(v) => match v.as_u64() {
                    Some(n @ 1..=9_999) => *slot = Some(n as u32),
                    _ => self.problem(
                        &join(place, key),
                        format!("expected a whole number from 1 to 9999, found {v}"),
                    ),
                },
            }
        }
        (self.problems.len() == before).then_some(policy)
    }

    /// `managed.roles`: `{"<role>": {"read_only": bool, "connection_limit": n}}`.
    fn roles(
        &mut self,
        value: &Value,
        place: &str,
        tenant: &str,
    ) -> Option<BTreeMap<String, RoleSpec>> {
        let obj = self.object(value, place)?;
        let before = self.problems.len();
        let mut roles = BTreeMap::new();
        for (name, spec) in obj {
            let here = join(place, name);
            if let Err(e) = TenantId::parse(name) {
                let e = e.replace("tenant id", "role name");
                self.problem(&here, e);
                continue;
            }
            if name == tenant {
                self.problem(
                    &here,
                    "is the tenant's own role (its superuser); name the extra roles otherwise",
                );
                continue;
            }
            if name.starts_with("pg_") {
                self.problem(&here, "names starting with \"pg_\" are PostgreSQL's own");
                continue;
            }
            let Some(fields) = self.object(spec, &here) else {
                continue;
            };
            self.known_keys(fields, &here, &["read_only", "connection_limit"]);
            let mut role = RoleSpec::default();
            match fields.get("read_only") {
                None => {}
                Some(Value::Bool(b)) => role.read_only = *b,
                Some(other) => self.problem(
                    &join(&here, "read_only"),
                    format!("expected true or false, found {other}"),
                ),
            }
            match fields.get("connection_limit") {
                None => {}
                Some(v) => match v.as_u64() {
                    Some(0) => role.connection_limit = None,
                    Some(n @ 1..=10_000) => role.connection_limit = Some(n as u32),
                    _ => self.problem(
                        &join(&here, "connection_limit"),
                        format!("expected a whole number from 0 (no limit) to 10000, found {v}"),
                    ),
                },
            }
            roles.insert(name.clone(), role);
        }
        (self.problems.len() == before).then_some(roles)
    }

    fn external(&mut self, value: &Value, place: &str) -> Option<Instance> {
        let obj = self.object(value, place)?;
        self.known_keys(obj, place, &["address"]);
        let at = join(place, "address");
        match obj.get("address") {
            None => {
                self.problem(&at, "missing; give a unix socket path or host:port");
                None
            }
            Some(Value::String(s)) => match Address::parse(s) {
                Ok(address) => Some(Instance::External { address }),
                Err(e) => {
                    self.problem(&at, e);
                    None
                }
            },
            Some(other) => {
                self.problem(&at, format!("expected a string, found {}", kind_of(other)));
                None
            }
        }
    }

    fn managed(&mut self, value: &Value, place: &str) -> Option<Instance> {
        let obj = self.object(value, place)?;
        self.known_keys(
            obj,
            place,
            &[
                "image",
                "memory",
                "cpus",
                "max_connections",
                "settings",
                "init_scripts",
                "roles",
            ],
        );
        let before = self.problems.len();
        let mut spec = ManagedSpec::default();
        if let Some(v) = obj.get("image") {
            match v.as_str() {
                Some(s) if is_image_reference(s) => spec.image = Some(s.to_owned()),
                _ => self.problem(
                    &join(place, "image"),
                    format!("expected an image reference like \"pgs/postgres:15\", found {v}"),
                ),
            }
        }
        if let Some(v) = obj.get("memory") {
            match v.as_str().map(parse_size) {
                Some(Ok(bytes)) if bytes >= 64 << 20 => spec.memory = Some(bytes),
                Some(Ok(_)) => self.problem(
                    &join(place, "memory"),
                    "PostgreSQL needs at least 64m to start reliably",
                ),
                Some(Err(e)) => self.problem(&join(place, "memory"), e),
                None => self.problem(
                    &join(place, "memory"),
                    format!("expected a size string like \"256m\" or \"1g\", found {v}"),
                ),
            }
        }
        if let Some(v) = obj.get("cpus") {
            match v.as_f64() {
                Some(c) if c > 0.0 && c <= 1024.0 => spec.cpus = Some(c),
                _ => self.problem(
                    &join(place, "cpus"),
                    format!("expected a number of cores greater than 0, like 0.5, found {v}"),
                ),
            }
        }
        if let Some(v) = obj.get("max_connections") {
            match v.as_u64() {
                Some(n @ 1..=10_000) => spec.max_connections = Some(n as u32),
                _ => self.problem(
                    &join(place, "max_connections"),
                    format!("expected a whole number from 1 to 10000, found {v}"),
                ),
            }
        }
        if let Some(v) = obj.get("settings") {
            let at = join(place, "settings");
            if let Some(map) = self.object(v, &at) {
                for (name, value) in map {
                    let here = join(&at, name);
                    let name_ok = !name.is_empty()
                        && name.chars().all(|c| {
                            c.is_ascii_lowercase() || c.is_ascii_digit() || "_.".contains(c)
                        });
                    if !name_ok {
                        self.problem(&here, "not a PostgreSQL setting name");
                        continue;
                    }
                    let text = match value {
                        Value::String(s) => s.clone(),
                        Value::Number(n) => n.to_string(),
                        Value::Bool(b) => if *b { "on" } else { "off" }.to_owned(),
                        other => {
                            self.problem(
                                &here,
                                format!(
                                    "expected a string, number or boolean, found {}",
                                    kind_of(other)
                                ),
                            );
                            continue;
                        }
                    };
                    if text.chars().any(|c| c.is_control()) {
                        self.problem(&here, "value contains a control character");
                        continue;
                    }
                    spec.settings.insert(name.clone(), text);
                }
            }
        }
        if let Some(v) = obj.get("init_scripts") {
            let at = join(place, "init_scripts");
            match v.as_array() {
                Some(items) => {
                    for (i, item) in items.iter().enumerate() {
                        let here = format!("{at}[{i}]");
                        match item.as_str() {
                            Some(s) if s.ends_with(".sql") || s.ends_with(".sh") => {
                                spec.init_scripts.push(PathBuf::from(s))
                            }
                            _ => self.problem(
                                &here,
                                format!("expected a path to a .sql or .sh file, found {item}"),
                            ),
                        }
                    }
                }
                None => self.problem(&at, format!("expected a list of paths, found {v}")),
            }
        }
        (self.problems.len() == before).then_some(Instance::Managed(spec))
    }
}

/// Whether Docker would parse `s` as an image reference: `[host[:port]/]path[:tag][@digest]`,
/// path components lowercase (the grammar of distribution/reference). Docker answers 400, not
/// 404, for anything else, which must be the client's 422 rather than our 503.
pub fn is_image_reference(s: &str) -> bool {
    let (rest, digest) = match s.split_once('@') {
        Some((r, d)) => (r, Some(d)),
        None => (s, None),
    };
    if let Some(d) = digest {
        let Some((alg, hex)) = d.split_once(':') else {
            return false;
        };
        let alg_ok = !alg.is_empty()
            && alg
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+._-".contains(c));
        if !alg_ok || hex.len() < 32 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
            return false;
        }
    }
    let (name, tag) = match rest.rfind(':') {
        Some(i) if !rest[i..].contains('/') => (&rest[..i], Some(&rest[i + 1..])),
        _ => (rest, None),
    };
    let word = |c: char| c.is_ascii_alphanumeric() || c == '_';
    if let Some(t) = tag {
        let ok = !t.is_empty()
            && t.len() <= 128
            && t.starts_with(word)
            && t.chars().all(|c| word(c) || c == '.' || c == '-');
        if !ok {
            return false;
        }
    }
    if name.is_empty() || name.len() > 255 {
        return false;
    }
    let mut parts: Vec<&str> = name.split('/').collect();
    if parts.len() > 1 {
        let first = parts[0];
        if first.contains(['.', ':'])
            || first == "localhost"
            || first.chars().any(|c| c.is_ascii_uppercase())
        {
            let (host, port) = first.split_once(':').unwrap_or((first, ""));
            let label_ok = |l: &str| {
                !l.is_empty()
                    && !l.starts_with('-')
                    && !l.ends_with('-')
                    && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            };
            let port_ok = port.is_empty() && !first.contains(':')
                || !port.is_empty() && port.chars().all(|c| c.is_ascii_digit());
            if !host.split('.').all(label_ok) || !port_ok {
                return false;
            }
            parts.remove(0);
        }
    }
    parts.iter().all(|p| path_component_ok(p))
}

/// `[a-z0-9]+` runs joined by `.`, `_`, `__` or dashes.
fn path_component_ok(p: &str) -> bool {
    let alnum = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    if !p.starts_with(alnum) || !p.ends_with(alnum) {
        return false;
    }
    let mut sep = String::new();
    for c in p.chars() {
        if alnum(c) {
            let ok = sep.is_empty()
                || sep == "."
                || sep == "_"
                || sep == "__"
                || sep.chars().all(|c| c == '-');
            if !ok {
                return false;
            }
            sep.clear();
        } else if ".-_".contains(c) {
            sep.push(c);
        } else {
            return false;
        }
    }
    true
}

/// Parses a size like `256m`, `1g`, `512MiB` or a plain byte count.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim().to_ascii_lowercase();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size like \"256m\" or \"1g\""))?;
    let mult: u64 = match unit.trim() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        _ => return Err(format!("{s:?} has an unknown unit; use k, m or g")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))
}

fn join(place: &str, key: &str) -> String {
    if place.is_empty() {
        key.to_owned()
    } else {
        format!("{place}.{key}")
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// The tenants file opened for an edit: holds the exclusive lock from `open` until drop, so two
/// writers (CLI, API, daemon) never lose each other's updates. Edits work on the JSON document,
/// so fields this agent does not know, and other tenants, are kept as they were.
#[derive(Debug)]
pub struct TenantsFileEdit {
    path: PathBuf,
    doc: Value,
    _lock: FileLock,
}

impl TenantsFileEdit {
    pub fn open(path: &Path) -> Result<TenantsFileEdit, LoadError> {
        let lock = FileLock::exclusive(&lock_path(path)).map_err(|source| LoadError::Io {
            path: lock_path(path),
            source,
        })?;
        let text = std::fs::read_to_string(path).map_err(|source| LoadError::Io {
            path: path.to_owned(),
            source,
        })?;
        let doc = parse_json(path, &text)?;
        Ok(TenantsFileEdit {
            path: path.to_owned(),
            doc,
            _lock: lock,
        })
    }

    /// The document as it is now, validated.
    pub fn tenants(&self) -> Result<Tenants, LoadError> {
        validate(&self.doc).map_err(|problems| LoadError::Invalid {
            path: self.path.clone(),
            problems,
        })
    }

    /// The raw JSON object of one tenant, to edit in place.
    pub fn tenant_mut(&mut self, id: &TenantId) -> Option<&mut Map<String, Value>> {
        self.doc
            .get_mut("tenants")?
            .get_mut(id.as_str())?
            .as_object_mut()
    }

    /// The `tenants` object, to add or remove entries.
    pub fn tenants_mut(&mut self) -> Option<&mut Map<String, Value>> {
        self.doc.get_mut("tenants")?.as_object_mut()
    }

    /// Validates the edited document and, only if it is valid, replaces the file atomically.
    pub fn commit(self) -> Result<Tenants, CommitError> {
        let tenants = validate(&self.doc).map_err(|problems| {
            CommitError::Invalid(LoadError::Invalid {
                path: self.path.clone(),
                problems,
            })
        })?;
        let mut text = serde_json::to_string_pretty(&self.doc).expect("a JSON value serializes");
        text.push('\n');
        fsutil::write_atomic(&self.path, text.as_bytes(), 0o644).map_err(|source| {
            CommitError::Write {
                path: self.path.clone(),
                source,
            }
        })?;
        Ok(tenants)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    #[error("the change would make the tenants file invalid; nothing was written: {0}")]
    Invalid(LoadError),
    #[error("cannot write tenants file {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The sidecar lock file that serializes writers of `path`.
pub fn lock_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "tenants.json".into());
    path.with_file_name(format!(".{name}.lock"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn problems(doc: Value) -> Vec<String> {
        validate(&doc)
            .unwrap_err()
            .into_iter()
            .map(|p| p.to_string())
            .collect()
    }

    #[test]
    fn the_documented_example_loads() {
        let t = validate(&json!({"version": 1, "tenants": {
            "acme":   {"access": "enabled",  "external": {"address": "/run/pg/acme/.s.PGSQL.5432"}},
            "globex": {"access": "disabled", "external": {"address": "127.0.0.1:5433"}}
        }}))
        .unwrap();
        let acme = t.get(&TenantId::parse("acme").unwrap()).unwrap();
        assert_eq!(acme.access, Access::Enabled);
        assert_eq!(
            acme.instance,
            Instance::External {
                address: Address::Unix("/run/pg/acme/.s.PGSQL.5432".into())
            }
        );
        let globex = t.get(&TenantId::parse("globex").unwrap()).unwrap();
        assert_eq!(
            globex.instance,
            Instance::External {
                address: Address::Tcp("127.0.0.1:5433".into())
            }
        );
    }

    #[test]
    fn access_defaults_to_disabled() {
        let t = validate(&json!({"version": 1, "tenants": {
            "acme": {"external": {"address": "127.0.0.1:5432"}}}}))
        .unwrap();
        assert_eq!(t.iter().next().unwrap().access, Access::Disabled);
    }

    #[test]
    fn every_problem_is_reported_with_its_place() {
        let got = problems(json!({"version": 2, "extra": 1, "tenants": {
            "Acme": {"external": {"address": "127.0.0.1:5432"}},
            "ok_one": {"access": "on", "external": {"address": "nohost"}},
            "two": {"acess": "enabled", "external": {"address": "/tmp/x/"}},
            "three": {},
            "four": {"external": {"address": 5}, "managed": {}},
        }}));
        let want = [
            "extra: unknown field",
            "version: unsupported version 2",
            "tenants.Acme: tenant id \"Acme\" is not valid",
            "tenants.ok_one.access: expected \"enabled\" or \"disabled\", found \"on\"",
            "tenants.ok_one.external.address: address \"nohost\" is neither",
            "tenants.two.acess: unknown field",
            "tenants.two.external.address: address \"/tmp/x/\" is a directory",
            "tenants.three: needs \"external\"",
            "tenants.four: has both \"external\" and \"managed\"",
        ];
        for w in want {
            assert!(
                got.iter().any(|g| g.starts_with(w)),
                "missing {w:?} in {got:#?}"
            );
        }
        assert_eq!(got.len(), want.len(), "{got:#?}");
    }

    #[test]
    fn tenant_ids_follow_the_pattern() {
        for ok in ["a", "acme", "a_1", &"a".repeat(63)] {
            assert!(TenantId::parse(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "1a",
            "_a",
            "ACME",
            "a-b",
            "a b",
            "acme\0x",
            "é",
            &"a".repeat(64),
        ] {
            assert!(TenantId::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn addresses_are_checked_for_haproxy_safety() {
        assert_eq!(
            Address::parse("/run/pg/.s.PGSQL.5432").unwrap().haproxy(),
            "unix@/run/pg/.s.PGSQL.5432"
        );
        assert_eq!(
            Address::parse("[::1]:5432").unwrap().haproxy(),
            "[::1]:5432"
        );
        assert_eq!(
            Address::parse("db.internal:5432").unwrap().haproxy(),
            "db.internal:5432"
        );
        for bad in [
            "/a b/.s.PGSQL.5432",
            "/x\n/y",
            "host:0",
            "host:99999",
            ":5432",
            "[zz]:5432",
            "host",
            "/#/s",
        ] {
            assert!(Address::parse(bad).is_err(), "{bad:?}");
        }
        let long = format!("/{}", "a".repeat(107));
        assert!(Address::parse(&long).unwrap_err().contains("system limit"));
    }

    #[test]
    fn backups_are_on_by_default_and_validated() {
        let t = validate(&json!({"version": 1, "tenants": {
            "a": {"managed": {}},
            "b": {"managed": {}, "backups": {"enabled": false}},
            "c": {"managed": {}, "backups": {"full_every": "1d", "incr_every": "1h", "keep_full": 3}},
            "x": {"external": {"address": "/run/x/.s.PGSQL.5432"}}
        }}))
        .unwrap();
        let get = |id: &str| t.get(&id.parse().unwrap()).unwrap().clone();
        let managed = |id: &str| match get(id).instance {
            Instance::Managed(m) => m,
            _ => panic!("not managed"),
        };
        assert!(get("a").backups.enabled && managed("a").backups);
        assert!(!get("b").backups.enabled && !managed("b").backups);
        assert_eq!(get("c").backups.full_every, Some(86_400));
        assert_eq!(get("c").backups.incr_every, Some(3_600));
        assert_eq!(get("c").backups.keep_full, Some(3));
        assert!(!get("x").backups.enabled);
        let err = validate(&json!({"version": 1, "tenants": {
            "a": {"managed": {}, "backups": {"enabeld": false, "full_every": "weekly", "keep_full": 0}},
            "x": {"external": {"address": "/run/x/.s.PGSQL.5432"}, "backups": {}}
        }}))
        .unwrap_err();
        let places: Vec<&str> = err.iter().map(|p| p.place.as_str()).collect();
        assert_eq!(
            places,
            [
                "tenants.a.backups.enabeld",
                "tenants.a.backups.full_every",
                "tenants.a.backups.keep_full",
                "tenants.x.backups"
            ],
            "{err:?}"
        );
    }

    #[test]
    fn managed_specs_are_validated() {
        let t = validate(&json!({"version": 1, "tenants": {"acme": {"managed": {
            "image": "pgs/postgres:15", "memory": "256m", "cpus": 0.5, "max_connections": 20,
            "settings": {"work_mem": "4MB", "jit": false, "shared_buffers": 16384},
            "init_scripts": ["init/schema.sql"]
        }}}}))
        .unwrap();
        let Instance::Managed(m) = &t.iter().next().unwrap().instance else {
            panic!("not managed")
        };
        assert_eq!(m.memory, Some(256 << 20));
        assert_eq!(m.settings["jit"], "off");
        assert_eq!(m.settings["shared_buffers"], "16384");
        let got = problems(json!({"version": 1, "tenants": {"acme": {"managed": {
            "memory": "lots", "cpus": 0, "max_connections": 0,
            "settings": {"Bad-Name": "1", "ok": [1]}, "init_scripts": ["x.txt"]
        }}}}));
        assert_eq!(got.len(), 6, "{got:#?}");
    }

    #[test]
    fn roles_of_managed_tenants_are_validated() {
        let t = validate(&json!({"version": 1, "tenants": {"acme": {"managed": {
            "memory": "128m",
            "roles": {"app": {}, "reporting": {"read_only": true, "connection_limit": 5}}
        }}}}))
        .unwrap();
        let acme = t.iter().next().unwrap();
        assert_eq!(acme.roles["app"], RoleSpec::default());
        assert_eq!(
            acme.roles["reporting"],
            RoleSpec {
                read_only: true,
                connection_limit: Some(5)
            }
        );
        // Roles never change the container's spec (its label): no replacement for a role.
        let Instance::Managed(spec) = &acme.instance else {
            panic!("not managed")
        };
        assert_eq!(spec.memory, Some(128 << 20));
        assert!(!serde_json::to_string(spec).unwrap().contains("reporting"));

        let got = problems(json!({"version": 1, "tenants": {
            "acme": {"managed": {"roles": {
                "acme": {}, "pg_monitor": {}, "App": {}, "a.b": {},
                "ok": {"read_only": "yes", "connection_limit": -1, "superuser": true},
                "unlimited": {"connection_limit": 0},
                "list": []
            }}},
            "globex": {"external": {"address": "127.0.0.1:5432"}, "roles": {}},
            "initech": {"managed": {"roles": []}}
        }}));
        let want = [
            "tenants.acme.managed.roles.acme: is the tenant's own role",
            "tenants.acme.managed.roles.pg_monitor: names starting with \"pg_\"",
            "tenants.acme.managed.roles.App: role name \"App\" is not valid",
            "tenants.acme.managed.roles.a.b: role name \"a.b\" is not valid",
            "tenants.acme.managed.roles.ok.superuser: unknown field",
            "tenants.acme.managed.roles.ok.read_only: expected true or false",
            "tenants.acme.managed.roles.ok.connection_limit: expected a whole number",
            "tenants.acme.managed.roles.list: expected an object, found a list",
            "tenants.globex.roles: unknown field",
            "tenants.initech.managed.roles: expected an object, found a list",
        ];
        for w in want {
            assert!(
                got.iter().any(|g| g.starts_with(w)),
                "missing {w:?} in {got:#?}"
            );
        }
        assert_eq!(got.len(), want.len(), "{got:#?}");
    }

    #[test]
    fn image_references_are_what_docker_accepts() {
        for ok in [
            "pgs/postgres:15",
            "postgres",
            "registry:5000/pg/postgres:17-alpine",
            "a/b@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        ] {
            assert!(is_image_reference(ok), "{ok}");
        }
        for bad in [
            "yC",
            "pgs/Postgres:15",
            "pgs/postgres:",
            "-x",
            "pgs//",
            "a b",
            "",
        ] {
            assert!(!is_image_reference(bad), "{bad:?}");
        }
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("256m"), Ok(256 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("1024"), Ok(1024));
        assert!(parse_size("1t").is_err());
        assert!(parse_size("m").is_err());
    }

    #[test]
    fn syntax_errors_say_line_and_column() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tenants.json");
        std::fs::write(&path, "{\"version\": 1,\n \"tenants\": {,}}").unwrap();
        let err = load(&path).unwrap_err().to_string();
        assert!(err.contains("line 2 column"), "{err}");
    }

    #[test]
    fn edits_keep_unknown_fields_and_refuse_invalid_results() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tenants.json");
        std::fs::write(
            &path,
            r#"{"version": 1, "x-owner": "ops", "tenants": {
                "acme": {"x-note": "keep me", "external": {"address": "127.0.0.1:5432"}},
                "globex": {"access": "enabled", "external": {"address": "127.0.0.1:5433"}}}}"#,
        )
        .unwrap();
        let id = TenantId::parse("acme").unwrap();
        let mut edit = TenantsFileEdit::open(&path).unwrap();
        edit.tenant_mut(&id)
            .unwrap()
            .insert("access".into(), json!("enabled"));
        edit.commit().unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.contains("keep me") && text.contains("x-owner"),
            "{text}"
        );
        assert_eq!(
            load(&path).unwrap().get(&id).unwrap().access,
            Access::Enabled
        );

        let mut edit = TenantsFileEdit::open(&path).unwrap();
        edit.tenant_mut(&id)
            .unwrap()
            .insert("access".into(), json!("maybe"));
        assert!(matches!(edit.commit(), Err(CommitError::Invalid(_))));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
    }
}
