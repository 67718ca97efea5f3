//! Request bodies → typed requests, reporting every problem with its field. Tenant fields are
//! checked by the tenants file's own validator, so the API accepts exactly what the file does,
//! plus limits only the API needs (what this host and Docker can run).

use serde_json::{json, Map, Value};

use super::errors::FieldProblem;
use crate::tenants::{self, Access, TenantId};

/// Fields of `managed` the API accepts. `settings` and `init_scripts` stay in the tenants
/// file: init scripts are host paths the agent mounts, which is the operator's decision, and
/// a bad setting only shows when the server fails to start.
pub const MANAGED_FIELDS: [&str; 4] = ["image", "memory", "cpus", "max_connections"];

/// Docker refuses CPU limits below this.
const MIN_CPUS: f64 = 0.01;

/// What the host offers; limits beyond it are refused up front instead of failing in Docker.
#[derive(Debug, Clone, Copy)]
pub struct HostLimits {
    pub cpus: f64,
    pub memory_bytes: u64,
}

impl HostLimits {
    pub fn probe() -> HostLimits {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let memory_bytes = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|t| {
                let line = t.lines().find(|l| l.starts_with("MemTotal:"))?;
                let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
                Some(kb * 1024)
            })
            .unwrap_or(u64::MAX);
        HostLimits { cpus, memory_bytes }
    }
}

/// A validated `POST /v1/tenants` body.
#[derive(Debug, Clone, PartialEq)]
pub struct CreateRequest {
    pub id: TenantId,
    /// The tenant's entry as the tenants file holds it.
    pub entry: Value,
    /// The image to check for on the engine, when the body names one.
    pub image: Option<String>,
}

fn problem(field: &str, message: impl Into<String>) -> FieldProblem {
    FieldProblem {
        field: field.to_owned(),
        message: message.into(),
    }
}

fn unknown_keys(obj: &Map<String, Value>, at: &str, known: &[&str], out: &mut Vec<FieldProblem>) {
    for key in obj.keys().filter(|k| !known.contains(&k.as_str())) {
        let field = if at.is_empty() {
            key.clone()
        } else {
            format!("{at}.{key}")
        };
        out.push(problem(
            &field,
            format!("unknown field; expected one of: {}", known.join(", ")),
        ));
    }
}

/// `{"id": "acme", "access": "enabled", "managed": {"memory": "256m", ...}}`
pub fn create(body: &Value, host: HostLimits) -> Result<CreateRequest, Vec<FieldProblem>> {
    let Some(obj) = body.as_object() else {
        return Err(vec![problem("", "expected a JSON object")]);
    };
    let mut problems = Vec::new();
    unknown_keys(
        obj,
        "",
        &["id", "access", "managed", "idle_timeout"],
        &mut problems,
    );
    let id = match obj.get("id") {
        None => {
            problems.push(problem("id", "missing; give the tenant id, e.g. \"acme\""));
            None
        }
        Some(Value::String(s)) => match TenantId::parse(s) {
            Ok(id) => Some(id),
            Err(e) => {
                problems.push(problem("id", e));
                None
            }
        },
        Some(other) => {
            problems.push(problem("id", format!("expected a string, found {other}")));
            None
        }
    };
    let mut entry = Map::new();
    if let Some(a) = obj.get("access") {
        entry.insert("access".into(), a.clone());
    }
    // Checked by the file's validator below, like the rest.
    if let Some(t) = obj.get("idle_timeout") {
        entry.insert("idle_timeout".into(), t.clone());
    }
    let mut managed = Map::new();
    match obj.get("managed") {
        None => {}
        Some(Value::Object(m)) => {
            unknown_keys(m, "managed", &MANAGED_FIELDS, &mut problems);
            managed.extend(
                m.iter()
                    .filter(|(k, _)| MANAGED_FIELDS.contains(&k.as_str()))
                    .map(|(k, v)| (k.clone(), v.clone())),
            );
        }
        Some(other) => problems.push(problem(
            "managed",
            format!("expected an object, found {other}"),
        )),
    }
    entry.insert("managed".into(), Value::Object(managed.clone()));
    // The file's validator, on a one-tenant document; its places map back to body fields.
    let key = id
        .as_ref()
        .map_or("placeholder", TenantId::as_str)
        .to_owned();
    let doc = json!({"version": tenants::VERSION, "tenants": {key.clone(): entry.clone()}});
    if let Err(found) = tenants::validate(&doc) {
        let prefix = format!("tenants.{key}");
        for p in found {
            let field = p
                .place
                .strip_prefix(&prefix)
                .map(|rest| rest.trim_start_matches('.').to_owned())
                .unwrap_or(p.place);
            problems.push(problem(&field, p.message));
        }
    }
    if let Some(image) = managed.get("image").and_then(Value::as_str) {
        if !image.is_empty() && !crate::tenants::is_image_reference(image) {
            problems.push(problem(
                "managed.image",
                format!("{image:?} is not a Docker image reference (lowercase repository, e.g. \"pgs/postgres:15\")"),
            ));
        }
    }
    if let Some(c) = managed.get("cpus").and_then(Value::as_f64) {
        if c > 0.0 && c < MIN_CPUS {
            problems.push(problem(
                "managed.cpus",
                format!("at least {MIN_CPUS} (Docker's minimum)"),
            ));
        } else if c > host.cpus && c <= 1024.0 {
            problems.push(problem(
                "managed.cpus",
                format!("{c} is more than the {} CPU(s) of this host", host.cpus),
            ));
        }
    }
    if let Some(Ok(bytes)) = managed
        .get("memory")
        .and_then(Value::as_str)
        .map(tenants::parse_size)
    {
        if bytes > host.memory_bytes {
            problems.push(problem(
                "managed.memory",
                format!("more than this host's {} MiB", host.memory_bytes >> 20),
            ));
        }
    }
    match id {
        Some(id) if problems.is_empty() => Ok(CreateRequest {
            id,
            image: managed
                .get("image")
                .and_then(Value::as_str)
                .map(str::to_owned),
            entry: Value::Object(entry),
        }),
        _ => Err(problems),
    }
}

/// A validated `PUT /v1/tenants/{id}/access` body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AccessRequest {
    pub access: Access,
    pub terminate_sessions: bool,
}

/// `{"enabled": false, "terminate_sessions": true}`
pub fn access(body: &Value) -> Result<AccessRequest, Vec<FieldProblem>> {
    let Some(obj) = body.as_object() else {
        return Err(vec![problem("", "expected a JSON object")]);
    };
    let mut problems = Vec::new();
    unknown_keys(obj, "", &["enabled", "terminate_sessions"], &mut problems);
    let enabled = match obj.get("enabled") {
        Some(Value::Bool(b)) => Some(*b),
        None => {
            problems.push(problem("enabled", "missing; true or false"));
            None
        }
        Some(other) => {
            problems.push(problem(
                "enabled",
                format!("expected true or false, found {other}"),
            ));
            None
        }
    };
    let terminate = match obj.get("terminate_sessions") {
        None => false,
        Some(Value::Bool(b)) => *b,
        Some(other) => {
            problems.push(problem(
                "terminate_sessions",
                format!("expected true or false, found {other}"),
            ));
            false
        }
    };
    if enabled == Some(true) && terminate {
        problems.push(problem(
            "terminate_sessions",
            "only goes with \"enabled\": false (sessions are ended when access is closed)",
        ));
    }
    match enabled {
        Some(e) if problems.is_empty() => Ok(AccessRequest {
            access: if e { Access::Enabled } else { Access::Disabled },
            terminate_sessions: terminate,
        }),
        _ => Err(problems),
    }
}

/// `?purge_data=true|false` (absent = false).
pub fn purge_data(query: Option<&str>) -> Result<bool, Vec<FieldProblem>> {
    let mut purge = false;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if k == "purge_data" {
            purge = match v {
                "true" => true,
                "false" => false,
                _ => return Err(vec![problem("purge_data", "expected true or false")]),
            };
        }
    }
    Ok(purge)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOST: HostLimits = HostLimits {
        cpus: 2.0,
        memory_bytes: 4 << 30,
    };

    fn fields(r: Result<impl std::fmt::Debug, Vec<FieldProblem>>) -> Vec<String> {
        r.unwrap_err().into_iter().map(|p| p.field).collect()
    }

    #[test]
    fn a_good_create_body_becomes_a_file_entry() {
        let r = create(
            &json!({"id": "acme", "access": "enabled", "managed": {"memory": "128m", "cpus": 0.5}}),
            HOST,
        )
        .unwrap();
        assert_eq!(r.id.as_str(), "acme");
        assert_eq!(
            r.entry,
            json!({"access": "enabled", "managed": {"memory": "128m", "cpus": 0.5}})
        );
        assert!(create(&json!({"id": "b"}), HOST).is_ok());
        let r = create(
            &json!({"id": "c", "managed": {}, "idle_timeout": "15m"}),
            HOST,
        )
        .unwrap();
        assert_eq!(r.entry["idle_timeout"], "15m");
        assert_eq!(
            fields(create(
                &json!({"id": "d", "managed": {}, "idle_timeout": "soon"}),
                HOST
            )),
            ["idle_timeout"]
        );
    }

    #[test]
    fn every_problem_of_a_bad_create_body_is_reported() {
        let got = fields(create(
            &json!({
                "id": "Bad-Id",
                "access": "on",
                "colour": 1,
                "managed": {"memory": "1m", "cpus": 64, "max_connections": 0,
                            "settings": {}, "image": "no spaces allowed"}
            }),
            HOST,
        ));
        for want in [
            "id",
            "access",
            "colour",
            "managed.memory",
            "managed.cpus",
            "managed.max_connections",
            "managed.settings",
            "managed.image",
        ] {
            assert!(
                got.contains(&want.to_string()),
                "{want} missing from {got:?}"
            );
        }
        assert_eq!(fields(create(&json!([1]), HOST)), vec![""]);
        assert_eq!(fields(create(&json!({}), HOST)), vec!["id"]);
        assert_eq!(
            fields(create(
                &json!({"id": "a", "managed": {"memory": "8g"}}),
                HOST
            )),
            vec!["managed.memory"]
        );
    }

    #[test]
    fn docker_image_references() {
        for ok in [
            "pgs/postgres:15",
            "postgres",
            "library/postgres:17-bookworm",
            "localhost:5000/a/b_c__d.e-f:v1.2",
            "Registry.Example.com/team/pg:Latest_1",
            "pg@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        ] {
            assert!(crate::tenants::is_image_reference(ok), "{ok}");
        }
        // "yC": schemathesis found Docker answering 400 for it, which became a 503.
        for bad in [
            "yC",
            "pgs/Postgres",
            "a//b",
            "a/",
            "-a",
            "a..b",
            "a:",
            "a:-x",
            "a___b",
            "pg@sha256:12",
            ":tag",
        ] {
            assert!(!crate::tenants::is_image_reference(bad), "{bad}");
        }
    }

    #[test]
    fn access_bodies() {
        assert_eq!(
            access(&json!({"enabled": false, "terminate_sessions": true})).unwrap(),
            AccessRequest {
                access: Access::Disabled,
                terminate_sessions: true
            }
        );
        assert_eq!(
            access(&json!({"enabled": true})).unwrap().access,
            Access::Enabled
        );
        assert_eq!(
            fields(access(
                &json!({"enabled": "yes", "terminate_sessions": 1, "x": 0})
            )),
            vec!["x", "enabled", "terminate_sessions"]
        );
        assert_eq!(
            fields(access(
                &json!({"enabled": true, "terminate_sessions": true})
            )),
            vec!["terminate_sessions"]
        );
    }

    #[test]
    fn purge_query() {
        assert!(!purge_data(None).unwrap());
        assert!(purge_data(Some("purge_data=true")).unwrap());
        assert!(!purge_data(Some("x=1&purge_data=false")).unwrap());
        assert!(purge_data(Some("purge_data=yes")).is_err());
    }
}
