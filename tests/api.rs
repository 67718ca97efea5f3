//! The HTTP API of `pgs-agent run`, over real HTTP, against real HAProxy, PostgreSQL servers in
//! Docker and the real daemon: a tenant created, opened, used by a real client, closed, refused
//! and deleted through the API; authentication; every problem of a bad body; the body limit;
//! concurrent edits; metrics that see a session; and docs/openapi.json kept true (every
//! operation it lists is called, and every answer matches what it documents).

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};

use crate::support::agent::AgentProcess;
use crate::support::docker::{docker, DockerEnv};
use crate::support::{have_tools, psql, Layout, Session};

/// One answer: status, lower-cased headers, body.
#[derive(Debug)]
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A tiny HTTP/1.1 client (Connection: close) that records every call, so the OpenAPI check
/// at the end can compare what was served with what is documented.
struct Client {
    port: u16,
    token: String,
    calls: std::sync::Mutex<Vec<(String, String, u16, String)>>,
}

impl Client {
    /// `template` is the documented path (`/v1/tenants/{id}`); `path` the real one.
    fn call(&self, method: &str, template: &str, path: &str, body: Option<&Value>) -> Reply {
        let auth = format!("Bearer {}", self.token);
        let r = self.raw(
            method,
            path,
            Some(&auth),
            body.map(|b| b.to_string()).as_deref(),
        );
        self.calls.lock().unwrap().push((
            method.to_owned(),
            template.to_owned(),
            r.status,
            r.body.clone(),
        ));
        r
    }

    fn raw(&self, method: &str, path: &str, auth: Option<&str>, body: Option<&str>) -> Reply {
        let mut head =
            format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n");
        if let Some(a) = auth {
            head.push_str(&format!("Authorization: {a}\r\n"));
        }
        if let Some(b) = body {
            head.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                b.len()
            ));
        }
        head.push_str("\r\n");
        let mut s = self.connect();
        s.write_all(head.as_bytes()).unwrap();
        if let Some(b) = body {
            s.write_all(b.as_bytes()).unwrap();
        }
        read_reply(&mut s)
    }

    fn connect(&self) -> TcpStream {
        let s = TcpStream::connect(("127.0.0.1", self.port)).expect("connect to the API");
        s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        s
    }
}

fn read_reply(s: &mut TcpStream) -> Reply {
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read the reply");
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").expect("a full HTTP reply");
    let mut lines = head.lines();
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Reply {
        status,
        headers,
        body: body.to_owned(),
    }
}

struct World {
    agent: AgentProcess,
    _haproxy: crate::support::Haproxy,
    layout: Layout,
    docker: DockerEnv,
}

impl World {
    fn start() -> Option<World> {
        if !have_tools(&["haproxy", "psql", "docker"]) {
            return None;
        }
        let docker = DockerEnv::new()?;
        let layout = Layout::init();
        layout.use_docker_prefix(&docker.prefix);
        layout.edit_settings(|s| s.replace("max_body_bytes = 65536", "max_body_bytes = 4096"));
        let image = crate::support::docker::image();
        if image != crate::support::docker::IMAGE {
            layout.edit_settings(|s| {
                s.replace(
                    "default_image = \"pgs/postgres:15\"",
                    &format!("default_image = \"{image}\""),
                )
            });
        }
        layout.render();
        let haproxy = layout.start_haproxy();
        let agent = AgentProcess::start(&layout.config, 600, &layout.dir.path().join("agent.log"));
        Some(World {
            agent,
            _haproxy: haproxy,
            layout,
            docker,
        })
    }

    fn client(&self) -> Client {
        let token = std::fs::read_to_string(self.layout.root().join("secrets/api-token")).unwrap();
        Client {
            port: self.layout.api_port,
            token: token.trim().to_owned(),
            calls: Default::default(),
        }
    }

    /// `select current_user` through HAProxy as tenant `id`: Ok(user) or Err(stderr).
    fn query(&self, id: &str) -> Result<String, String> {
        let pw = self.password(id);
        let (ok, out, err) = psql(
            &self.layout.conninfo(id, &format!("dbname={id}")),
            &pw,
            "select current_user",
        );
        if ok {
            Ok(out)
        } else {
            Err(err)
        }
    }

    fn password(&self, id: &str) -> String {
        std::fs::read_to_string(self.layout.root().join(format!("secrets/{id}.password")))
            .unwrap()
            .trim()
            .to_owned()
    }
}

/// Value of the first sample line of `metric` whose labels contain `labels`.
fn metric(text: &str, metric: &str, labels: &str) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(metric) && l[metric.len()..].starts_with(['{', ' ']))
        .find(|l| l.contains(labels))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[test]
fn the_api_runs_tenants_end_to_end_and_keeps_its_openapi_document_true() {
    let Some(w) = World::start() else { return };
    let c = w.client();
    let tenants = w.layout.root().join("tenants.json");

    // Health needs no token; everything else does, and a wrong one is refused the same way.
    assert_eq!(c.raw("GET", "/healthz", None, None).status, 200);
    c.call("GET", "/healthz", "/healthz", None);
    for (path, auth) in [
        ("/v1/tenants", None),
        ("/v1/tenants", Some("Bearer not-the-token")),
        ("/metrics", Some("Basic Zm9vOmJhcg==")),
        ("/readyz", None),
        ("/nowhere", None),
    ] {
        let r = c.raw("GET", path, auth, None);
        assert_eq!(r.status, 401, "{path} {auth:?}: {}", r.body);
        assert_eq!(r.json()["code"], "unauthorized");
        assert!(r.header("www-authenticate").is_some());
    }
    let r = c.call("GET", "/readyz", "/readyz", None);
    assert_eq!(r.status, 200, "{}", r.body);

    // A bad body: every problem, each with its field; the file is untouched.
    let before = std::fs::read_to_string(&tenants).unwrap();
    let r = c.call(
        "POST",
        "/v1/tenants",
        "/v1/tenants",
        Some(&json!({"id": "Not-An-Id", "access": "on", "colour": "red",
                     "managed": {"memory": "1m", "cpus": -1, "max_connections": 0, "init_scripts": []}})),
    );
    assert_eq!(r.status, 422, "{}", r.body);
    let fields: BTreeSet<String> = r.json()["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["field"].as_str().unwrap().to_owned())
        .collect();
    for f in [
        "id",
        "access",
        "colour",
        "managed.memory",
        "managed.cpus",
        "managed.max_connections",
        "managed.init_scripts",
    ] {
        assert!(fields.contains(f), "{f} not in {fields:?}");
    }
    assert_eq!(std::fs::read_to_string(&tenants).unwrap(), before);

    // The body limit (4096 here): a declared length over it is refused before the body is
    // sent; a chunked body is cut off at the limit.
    let mut s = c.connect();
    write!(
        s,
        "POST /v1/tenants HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: 10000000\r\n\r\n{{\"id\":",
        c.token
    )
    .unwrap();
    let r = read_reply(&mut s);
    assert_eq!(r.status, 413, "{}", r.body);
    assert_eq!(r.json()["code"], "body_too_large");
    let mut s = c.connect();
    write!(
        s,
        "PUT /v1/tenants/acme/access HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
        c.token
    )
    .unwrap();
    for _ in 0..5 {
        let chunk = " ".repeat(1000);
        let _ = write!(s, "{:x}\r\n{chunk}\r\n", chunk.len());
    }
    let _ = write!(s, "0\r\n\r\n");
    let r = read_reply(&mut s);
    assert_eq!(r.status, 413, "{}", r.body);

    // Create: 201 once the server accepts logins and HAProxy routes to it; access stays off.
    let r = c.call(
        "POST",
        "/v1/tenants",
        "/v1/tenants",
        Some(&json!({"id": "acme", "managed": {"memory": "128m"}})),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.header("location"), Some("/v1/tenants/acme"));
    let v = r.json();
    assert_eq!(v["server"]["state"], "running", "{v}");
    assert_eq!(v["access"], "disabled");
    assert!(
        !r.body.contains(&w.password("acme")),
        "a password in {}",
        r.body
    );
    let r = c.call(
        "POST",
        "/v1/tenants",
        "/v1/tenants",
        Some(&json!({"id": "acme"})),
    );
    assert_eq!(
        (r.status, r.json()["code"].clone()),
        (409, json!("tenant_exists"))
    );
    let refused = w.query("acme").unwrap_err();
    assert!(
        refused.contains("tenant \"acme\" is not available"),
        "{refused}"
    );

    // Access on: a real client gets in; its session shows in the metrics.
    let r = c.call(
        "PUT",
        "/v1/tenants/{id}/access",
        "/v1/tenants/acme/access",
        Some(&json!({"enabled": true})),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["runtime"]["state"], "applied");
    assert_eq!(w.query("acme").as_deref(), Ok("acme"));
    let mut session = Session::open(
        &w.layout.conninfo("acme", "dbname=acme"),
        &w.password("acme"),
    );
    assert_eq!(session.query("select 40 + 2").as_deref(), Some("42"));
    let m = c.call("GET", "/metrics", "/metrics", None);
    assert_eq!(m.status, 200);
    assert!(m
        .header("content-type")
        .unwrap()
        .starts_with("application/openmetrics-text"));
    let t = "tenant=\"acme\"";
    assert_eq!(
        metric(&m.body, "pgs_tenant_current_sessions", t),
        Some(1.0),
        "{}",
        m.body
    );
    assert!(
        metric(&m.body, "pgs_tenant_sessions_total", t) >= Some(2.0),
        "{}",
        m.body
    );
    assert!(metric(&m.body, "pgs_tenant_received_bytes_total", t) > Some(0.0));
    assert!(metric(&m.body, "pgs_tenant_sent_bytes_total", t) > Some(0.0));
    assert_eq!(
        metric(
            &m.body,
            "pgs_tenant_access_enabled",
            "tenant=\"acme\",source=\"haproxy\""
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &m.body,
            "pgs_tenant_server_state",
            "tenant=\"acme\",state=\"running\""
        ),
        Some(1.0)
    );
    assert!(metric(&m.body, "pgs_reconcile_passes_total", "result=\"ok\"") >= Some(2.0));
    assert!(metric(&m.body, "pgs_haproxy_reloads_total", "") >= Some(1.0));
    assert_eq!(
        metric(&m.body, "pgs_access_flips_total", "to=\"enabled\""),
        Some(1.0)
    );
    assert!(metric(&m.body, "pgs_last_successful_sync_timestamp_seconds", "") > Some(0.0));

    // Backups: one taken now is listed with its restore window and seen by /metrics; a
    // restore target outside the window is refused, naming it; a dry run says what it would do.
    let r = c.call(
        "POST",
        "/v1/tenants/{id}/backups",
        "/v1/tenants/acme/backups",
        Some(&json!({"full": true})),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.json()["backup"]["type"], "full");
    let r = c.call(
        "GET",
        "/v1/tenants/{id}/backups",
        "/v1/tenants/acme/backups",
        None,
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.json()["backups"].as_array().unwrap().len(),
        1,
        "{}",
        r.body
    );
    assert!(r.json()["window"]["from"].as_i64() > Some(0), "{}", r.body);
    let r = c.call(
        "POST",
        "/v1/tenants/{id}/restore",
        "/v1/tenants/acme/restore",
        Some(&json!({"to": "2001-01-01 00:00:00+00", "dry_run": true})),
    );
    assert_eq!(
        (r.status, r.json()["code"].clone()),
        (422, json!("invalid_target")),
        "{}",
        r.body
    );
    assert!(r.body.contains("outside the restore window"), "{}", r.body);
    let r = c.call(
        "POST",
        "/v1/tenants/{id}/restore",
        "/v1/tenants/acme/restore",
        Some(&json!({"latest": true, "into": "acme_copy", "dry_run": true})),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["restore"]["dry_run"], true);
    let m = c.call("GET", "/metrics", "/metrics", None);
    assert!(
        metric(&m.body, "pgs_backup_last_success_timestamp_seconds", t) > Some(0.0),
        "{}",
        m.body
    );

    // Sleep and wake by hand: refused as busy while the session is open (nothing changes), and
    // an awake tenant's wake answers at once with its view.
    let r = c.call(
        "POST",
        "/v1/tenants/{id}/sleep",
        "/v1/tenants/acme/sleep",
        None,
    );
    assert_eq!(
        (r.status, r.json()["code"].clone()),
        (409, json!("busy")),
        "{}",
        r.body
    );
    assert_eq!(session.query("select 1").as_deref(), Some("1"));
    let r = c.call(
        "POST",
        "/v1/tenants/{id}/wake",
        "/v1/tenants/acme/wake",
        None,
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["sleep"], "awake", "{}", r.body);

    // Access off with terminate: the open session ends, a new client is refused and counted.
    let r = c.call(
        "PUT",
        "/v1/tenants/{id}/access",
        "/v1/tenants/acme/access",
        Some(&json!({"enabled": false, "terminate_sessions": true})),
    );
    assert_eq!(
        (r.status, r.json()["terminated"].clone()),
        (200, json!(true)),
        "{}",
        r.body
    );
    assert_eq!(
        session.query("select 1"),
        None,
        "the session survived terminate_sessions"
    );
    let refused = w.query("acme").unwrap_err();
    assert!(
        refused.contains("tenant \"acme\" is not available"),
        "{refused}"
    );
    let m = c.call("GET", "/metrics", "/metrics", None);
    assert!(
        metric(
            &m.body,
            "pgs_tenant_refused_connections_total",
            "tenant=\"acme\",reason=\"disabled\""
        ) >= Some(2.0),
        "{}",
        m.body
    );
    let r = c.call(
        "PUT",
        "/v1/tenants/{id}/access",
        "/v1/tenants/acme/access",
        Some(&json!({"enabled": "yes"})),
    );
    assert_eq!(r.status, 422);
    let r = c.call(
        "PUT",
        "/v1/tenants/{id}/access",
        "/v1/tenants/ghost/access",
        Some(&json!({"enabled": true})),
    );
    assert_eq!(r.status, 404);

    // Concurrent requests on different tenants lose nothing: two creates at once (one pass),
    // then rounds of flips on three tenants at once; the file ends with every last word.
    std::thread::scope(|s| {
        for id in ["beta", "gamma"] {
            let c = &c;
            s.spawn(move || {
                let r = c.call("POST", "/v1/tenants", "/v1/tenants", Some(&json!({"id": id, "access": "enabled", "managed": {"memory": "128m", "cpus": 0.5}})));
                assert_eq!(r.status, 201, "{id}: {}", r.body);
            });
        }
    });
    for round in 0..4 {
        std::thread::scope(|s| {
            for (i, id) in ["acme", "beta", "gamma"].into_iter().enumerate() {
                let c = &c;
                let enabled = (round + i) % 2 == 0;
                s.spawn(move || {
                    let path = format!("/v1/tenants/{id}/access");
                    let r = c.call(
                        "PUT",
                        "/v1/tenants/{id}/access",
                        &path,
                        Some(&json!({"enabled": enabled})),
                    );
                    assert_eq!(r.status, 200, "{id}: {}", r.body);
                });
            }
        });
    }
    let file: Value = serde_json::from_str(&std::fs::read_to_string(&tenants).unwrap()).unwrap();
    for (i, id) in ["acme", "beta", "gamma"].into_iter().enumerate() {
        let want = if (3 + i) % 2 == 0 {
            "enabled"
        } else {
            "disabled"
        };
        assert_eq!(file["tenants"][id]["access"], want, "{id} in {file}");
    }
    assert_eq!(file["tenants"]["gamma"]["managed"]["cpus"], 0.5);
    assert_eq!(w.query("beta").as_deref(), Ok("beta"));
    assert!(w.query("gamma").is_err());

    // Reads.
    let r = c.call("GET", "/v1/tenants", "/v1/tenants", None);
    let ids: Vec<Value> = r.json()["tenants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].clone())
        .collect();
    assert_eq!(ids, vec![json!("acme"), json!("beta"), json!("gamma")]);
    let r = c.call("GET", "/v1/tenants/{id}", "/v1/tenants/beta", None);
    assert_eq!(
        (r.status, r.json()["haproxy_access"].clone()),
        (200, json!("enabled"))
    );
    assert_eq!(
        c.call("GET", "/v1/tenants/{id}", "/v1/tenants/nobody", None)
            .status,
        404
    );
    assert_eq!(
        c.call("GET", "/v1/tenants/{id}", "/v1/tenants/Bad%20Id", None)
            .status,
        404
    );
    let r = c.raw(
        "PATCH",
        "/v1/tenants/acme",
        Some(&format!("Bearer {}", c.token)),
        None,
    );
    assert_eq!((r.status, r.header("allow")), (405, Some("GET, DELETE")));

    // Delete: out of HAProxy and Docker; the volume only with purge_data.
    let vol = |id: &str| format!("{}-{id}-data", w.docker.prefix);
    let r = c.call("DELETE", "/v1/tenants/{id}", "/v1/tenants/beta", None);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["data_volume_purged"], false);
    assert!(w.query("beta").is_err());
    assert!(docker(&["volume", "inspect", &vol("beta")])
        .status
        .success());
    let r = c.call(
        "DELETE",
        "/v1/tenants/{id}",
        "/v1/tenants/beta?purge_data=true",
        None,
    );
    assert_eq!(
        (r.status, r.json()["data_volume_purged"].clone()),
        (200, json!(true)),
        "{}",
        r.body
    );
    assert!(!docker(&["volume", "inspect", &vol("beta")])
        .status
        .success());
    let r = c.call(
        "DELETE",
        "/v1/tenants/{id}",
        "/v1/tenants/acme?purge_data=true",
        None,
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(!docker(&["inspect", &format!("{}-acme", w.docker.prefix)])
        .status
        .success());
    assert_eq!(
        c.call("DELETE", "/v1/tenants/{id}", "/v1/tenants/acme", None)
            .status,
        404
    );
    assert_eq!(
        c.call(
            "DELETE",
            "/v1/tenants/{id}",
            "/v1/tenants/gamma?purge_data=maybe",
            None
        )
        .status,
        422
    );
    assert!(
        !w.agent.log_text().contains(&c.token),
        "the token is in the agent's log"
    );

    check_openapi(&c.calls.lock().unwrap());
}

/// Every operation of docs/openapi.json was called, and every answer has a documented status
/// and matches its documented schema.
fn check_openapi(calls: &[(String, String, u16, String)]) {
    let doc: Value = serde_json::from_str(
        &std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/openapi.json"))
            .unwrap(),
    )
    .unwrap();
    let mut documented = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item
            .as_object()
            .unwrap()
            .keys()
            .filter(|k| *k != "parameters")
        {
            documented.insert((method.to_uppercase(), path.clone()));
        }
    }
    let served: BTreeSet<(String, String)> = pgs_agent::api::routes::ROUTES
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    assert_eq!(
        documented, served,
        "docs/openapi.json and the route table disagree"
    );
    let called: BTreeSet<(String, String)> = calls
        .iter()
        .map(|(m, t, _, _)| (m.clone(), t.clone()))
        .collect();
    let missed: Vec<_> = documented.difference(&called).collect();
    assert!(missed.is_empty(), "operations never exercised: {missed:?}");
    for (method, template, status, body) in calls {
        let op = &doc["paths"][template][method.to_lowercase()];
        let resp = &op["responses"][status.to_string()];
        assert!(
            resp.is_object(),
            "{method} {template} answered {status}, which is not documented"
        );
        let Some((ctype, media)) = resp["content"].as_object().and_then(|c| c.iter().next()) else {
            continue;
        };
        if ctype != "application/json" {
            continue;
        }
        let value: Value =
            serde_json::from_str(body).unwrap_or_else(|e| panic!("{method} {template}: {e}"));
        let mut errors = Vec::new();
        conforms(&doc, &media["schema"], &value, "$", &mut errors);
        assert!(
            errors.is_empty(),
            "{method} {template} {status}: {errors:?}\n{body}"
        );
    }
}

/// A small JSON Schema check (the subset the document uses).
fn conforms(doc: &Value, schema: &Value, v: &Value, at: &str, errors: &mut Vec<String>) {
    if let Some(r) = schema["$ref"].as_str() {
        let name = r.rsplit('/').next().unwrap();
        return conforms(doc, &doc["components"]["schemas"][name], v, at, errors);
    }
    if v.is_null() && schema["nullable"] == true {
        return;
    }
    if let Some(all) = schema["allOf"].as_array() {
        for s in all {
            conforms(doc, s, v, at, errors);
        }
        return;
    }
    let ok = match schema["type"].as_str() {
        Some("object") => v.is_object(),
        Some("array") => v.is_array(),
        Some("string") => v.is_string(),
        Some("integer") => v.is_u64() || v.is_i64(),
        Some("number") => v.is_number(),
        Some("boolean") => v.is_boolean(),
        _ => true,
    };
    if !ok {
        errors.push(format!("{at}: {v} is not {}", schema["type"]));
        return;
    }
    if let Some(e) = schema["enum"].as_array() {
        if !e.contains(v) {
            errors.push(format!("{at}: {v} not in {e:?}"));
        }
    }
    for req in schema["required"].as_array().into_iter().flatten() {
        if v.get(req.as_str().unwrap()).is_none() {
            errors.push(format!("{at}: missing {req}"));
        }
    }
    if let (Some(props), Some(obj)) = (schema["properties"].as_object(), v.as_object()) {
        for (k, s) in props {
            if let Some(x) = obj.get(k) {
                conforms(doc, s, x, &format!("{at}.{k}"), errors);
            }
        }
    }
    if let (Some(items), Some(arr)) = (schema.get("items"), v.as_array()) {
        for (i, x) in arr.iter().enumerate() {
            conforms(doc, items, x, &format!("{at}[{i}]"), errors);
        }
    }
}
