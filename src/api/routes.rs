//! Request → handler: the route table, authentication before anything but `/healthz`, and the
//! handlers. Tenants-file edits go through `tenant_ops` (the CLI's locked writer) on a
//! blocking thread, then the reconciler is poked; access flips go through `access::set`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, ALLOW, CONNECTION, CONTENT_TYPE, LOCATION};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::json;
use tracing::{info, warn};

use super::body::read_json;
use super::errors::{json_response, ApiError};
use super::metrics::{self, Sample};
use super::passes::{PassRecord, WaitError};
use super::validate;
use super::State;
use crate::access;
use crate::haproxy::maps;
use crate::haproxy::runtime::Command;
use crate::instances::InstanceDriver;
use crate::tenant_ops::{self, EditError};
use crate::tenants::{self, Instance, TenantId};

pub type Resp = Response<Full<Bytes>>;

/// Every route the API serves, as (method, path template); `docs/openapi.json` lists the same.
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("GET", "/v1/tenants"),
    ("POST", "/v1/tenants"),
    ("GET", "/v1/tenants/{id}"),
    ("DELETE", "/v1/tenants/{id}"),
    ("PUT", "/v1/tenants/{id}/access"),
    ("GET", "/v1/tenants/{id}/backups"),
    ("POST", "/v1/tenants/{id}/backups"),
    ("POST", "/v1/tenants/{id}/restore"),
    ("POST", "/v1/tenants/{id}/sleep"),
    ("POST", "/v1/tenants/{id}/wake"),
];

/// A request path matched against [`ROUTES`].
#[derive(Debug, Clone, PartialEq, Eq)]
enum Route<'a> {
    Healthz,
    Readyz,
    Metrics,
    Tenants,
    Tenant(&'a str),
    TenantAccess(&'a str),
    TenantBackups(&'a str),
    TenantRestore(&'a str),
    TenantSleep(&'a str),
    TenantWake(&'a str),
}

fn route(path: &str) -> Option<Route<'_>> {
    Some(match path {
        "/healthz" => Route::Healthz,
        "/readyz" => Route::Readyz,
        "/metrics" => Route::Metrics,
        "/v1/tenants" => Route::Tenants,
        _ => {
            let rest = path.strip_prefix("/v1/tenants/")?;
            match rest.split_once('/') {
                None if !rest.is_empty() => Route::Tenant(rest),
                Some((id, "access")) if !id.is_empty() => Route::TenantAccess(id),
                Some((id, "backups")) if !id.is_empty() => Route::TenantBackups(id),
                Some((id, "restore")) if !id.is_empty() => Route::TenantRestore(id),
                Some((id, "sleep")) if !id.is_empty() => Route::TenantSleep(id),
                Some((id, "wake")) if !id.is_empty() => Route::TenantWake(id),
                _ => return None,
            }
        }
    })
}

fn allowed(r: &Route) -> &'static [Method] {
    match r {
        Route::Healthz | Route::Readyz | Route::Metrics => &[Method::GET],
        Route::Tenants => &[Method::GET, Method::POST],
        Route::Tenant(_) => &[Method::GET, Method::DELETE],
        Route::TenantAccess(_) => &[Method::PUT],
        Route::TenantBackups(_) => &[Method::GET, Method::POST],
        Route::TenantRestore(_) | Route::TenantSleep(_) | Route::TenantWake(_) => &[Method::POST],
    }
}

/// Answers one request; never fails (errors become JSON error responses).
pub async fn handle(state: Arc<State>, req: Request<Incoming>) -> Resp {
    let started = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let resp = match dispatch(&state, req).await {
        Ok(r) => r,
        Err(e) => {
            let close = e.status == StatusCode::PAYLOAD_TOO_LARGE;
            let mut r = e.into_response();
            if close {
                // The unread rest of the body must not be taken for the next request.
                r.headers_mut()
                    .insert(CONNECTION, HeaderValue::from_static("close"));
            }
            r
        }
    };
    let status = resp.status();
    // A 503 from /readyz is an answer, not a failure: probes would flood the log.
    if status.is_server_error() && path != "/readyz" {
        warn!(%method, %path, status = status.as_u16(), ms = started.elapsed().as_millis() as u64, "api request failed");
    } else if method != Method::GET {
        info!(%method, %path, status = status.as_u16(), ms = started.elapsed().as_millis() as u64, "api request");
    }
    resp
}

async fn dispatch(state: &Arc<State>, req: Request<Incoming>) -> Result<Resp, ApiError> {
    let path = req.uri().path().to_owned();
    if path != "/healthz" {
        state.token.check(req.headers())?;
    }
    // Unknown paths are only told apart from known ones after authentication.
    let Some(r) = route(&path) else {
        return Err(ApiError::not_found(format!("no route {path}")));
    };
    let m = req.method().clone();
    if !allowed(&r).contains(&m) {
        let allow = allowed(&r)
            .iter()
            .map(Method::as_str)
            .collect::<Vec<_>>()
            .join(", ");
        let mut resp = ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            format!("{m} is not allowed on {path}; allowed: {allow}"),
        )
        .into_response();
        if let Ok(v) = HeaderValue::from_str(&allow) {
            resp.headers_mut().insert(ALLOW, v);
        }
        return Ok(resp);
    }
    match r {
        Route::Healthz => Ok(json_response(StatusCode::OK, &json!({"status": "ok"}))),
        Route::Readyz => readyz(state).await,
        Route::Metrics => metrics(state).await,
        Route::Tenants if m == Method::GET => list(state).await,
        Route::Tenants => create(state, req).await,
        Route::Tenant(id) if m == Method::GET => show(state, id).await,
        Route::Tenant(id) => {
            let id = id.to_owned();
            delete(state, &id, req.uri().query()).await
        }
        Route::TenantAccess(id) => {
            let id = id.to_owned();
            set_access(state, &id, req).await
        }
        Route::TenantBackups(id) if m == Method::GET => list_backups(state, id).await,
        Route::TenantBackups(id) => {
            let id = id.to_owned();
            take_backup(state, &id, req).await
        }
        Route::TenantRestore(id) => {
            let id = id.to_owned();
            restore(state, &id, req).await
        }
        Route::TenantSleep(id) => sleep_or_wake(state, id, false).await,
        Route::TenantWake(id) => sleep_or_wake(state, id, true).await,
    }
}

/// `POST /v1/tenants/{id}/sleep|wake`: 200 with the tenant's view once it sleeps or accepts
/// logins; 409 `busy` (sleep: a client session is open), 409 `not_allowed` (external,
/// stopped, disabled), 503 `wake_failed`.
async fn sleep_or_wake(state: &State, id: &str, wake: bool) -> Result<Resp, ApiError> {
    use crate::sleep::{SleepError, WakeError};
    let id = path_id(id)?;
    let Some(view) = view_of(state, &id).await? else {
        return Err(ApiError::tenant_not_found(id.as_str()));
    };
    let sleeper = state.sleeper.as_ref().ok_or_else(|| {
        ApiError::unavailable(
            "docker_unavailable",
            "sleep and wake need the Docker engine, and the agent has none (see its log)",
        )
    })?;
    if view.kind != "managed" {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "not_allowed",
            format!("{id} is an external tenant: pgs does not run its server"),
        ));
    }
    if wake {
        match sleeper.wake(&id).await {
            Ok(_) => {}
            Err(e @ WakeError::NotAllowed(_)) => {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    "not_allowed",
                    e.to_string(),
                ))
            }
            Err(e) => {
                return Err(ApiError::unavailable("wake_failed", e.to_string()));
            }
        }
    } else {
        match sleeper.sleep(&id).await {
            Ok(_) => {}
            Err(SleepError::Busy) => {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    "busy",
                    format!("{id} has client sessions open; it sleeps once they end and it idles"),
                ))
            }
            Err(SleepError::NotAllowed(m)) => {
                return Err(ApiError::new(StatusCode::CONFLICT, "not_allowed", m))
            }
            Err(SleepError::Failed(m)) => return Err(ApiError::internal(m)),
        }
    }
    let view = view_of(state, &id).await?;
    Ok(json_response(StatusCode::OK, &view))
}

fn backup_error(e: crate::backups::BackupError) -> ApiError {
    use crate::backups::{BackupError as E, JobError};
    match e {
        E::Unknown(id) => ApiError::tenant_not_found(id.as_str()),
        E::Invalid(m) => ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_target", m),
        e @ (E::External(_)
        | E::Disabled(_)
        | E::NoData(_)
        | E::Asleep(_)
        | E::Job(JobError::Busy { .. })) => {
            ApiError::new(StatusCode::CONFLICT, "backup_conflict", e.to_string())
        }
        other => ApiError::new(StatusCode::BAD_GATEWAY, "backup_failed", format!("{other}")),
    }
}

fn docker_of(state: &State) -> Result<&crate::instances::docker::DockerDriver, ApiError> {
    state.docker.as_ref().ok_or_else(|| {
        ApiError::unavailable(
            "docker_unavailable",
            "backups need the Docker engine, and the agent has none (see its log)",
        )
    })
}

async fn list_backups(state: &State, id: &str) -> Result<Resp, ApiError> {
    let id = path_id(id)?;
    crate::backups::managed(&state.agent, &id).map_err(backup_error)?;
    let listing = crate::backups::list(&state.agent, &id).map_err(backup_error)?;
    let mut v = serde_json::to_value(&listing).map_err(|e| ApiError::internal(e.to_string()))?;
    v["status"] = serde_json::to_value(crate::backups::status::load(&state.agent.paths, &id))
        .map_err(|e| ApiError::internal(e.to_string()))?;
    Ok(json_response(StatusCode::OK, &v))
}

fn field(field: &str, message: impl Into<String>) -> super::errors::FieldProblem {
    super::errors::FieldProblem {
        field: field.into(),
        message: message.into(),
    }
}

async fn take_backup(state: &State, id: &str, req: Request<Incoming>) -> Result<Resp, ApiError> {
    let id = path_id(id)?;
    let body = read_json(req, state.agent.settings.api.max_body_bytes)
        .await
        .unwrap_or(json!({}));
    let full = match body.get("full") {
        None => false,
        Some(serde_json::Value::Bool(b)) => *b,
        Some(_) => {
            return Err(ApiError::invalid(vec![field(
                "full",
                "expected true or false",
            )]))
        }
    };
    let docker = docker_of(state)?;
    let o = crate::backups::backup(&state.agent, docker, &id, full)
        .await
        .map_err(backup_error)?;
    Ok(json_response(StatusCode::CREATED, &o))
}

async fn restore(state: &State, id: &str, req: Request<Incoming>) -> Result<Resp, ApiError> {
    use crate::backups::restore::Target;
    let id = path_id(id)?;
    let body = read_json(req, state.agent.settings.api.max_body_bytes).await?;
    let mut problems = Vec::new();
    let mut targets = Vec::new();
    if let Some(v) = body.get("to") {
        match v.as_str().map(crate::backups::clock::parse_time) {
            Some(Ok(ms)) => targets.push(Target::Time(ms)),
            Some(Err(e)) => problems.push(field("to", e)),
            None => problems.push(field("to", "expected a time string")),
        }
    }
    if let Some(v) = body.get("backup") {
        match v.as_str() {
            Some(l) => targets.push(Target::Backup(l.to_owned())),
            None => problems.push(field("backup", "expected a backup label")),
        }
    }
    match body.get("latest") {
        None | Some(serde_json::Value::Bool(false)) => {}
        Some(serde_json::Value::Bool(true)) => targets.push(Target::Latest),
        Some(_) => problems.push(field("latest", "expected true or false")),
    }
    let into = match body.get("into") {
        None | Some(serde_json::Value::Null) => None,
        Some(v) => match v.as_str().map(TenantId::parse) {
            Some(Ok(new)) => Some(new),
            Some(Err(e)) => {
                problems.push(field("into", e));
                None
            }
            None => {
                problems.push(field("into", "expected a tenant id"));
                None
            }
        },
    };
    let dry_run = match body.get("dry_run") {
        None => false,
        Some(serde_json::Value::Bool(b)) => *b,
        Some(_) => {
            problems.push(field("dry_run", "expected true or false"));
            false
        }
    };
    if let Some(obj) = body.as_object() {
        for k in obj.keys() {
            if !["to", "backup", "latest", "into", "dry_run"].contains(&k.as_str()) {
                problems.push(field(
                    k,
                    "unknown field; expected to, backup, latest, into or dry_run",
                ));
            }
        }
    }
    if targets.len() != 1 && problems.is_empty() {
        problems.push(field(
            "to",
            "give exactly one of \"to\", \"backup\" or \"latest\": true",
        ));
    }
    if !problems.is_empty() {
        return Err(ApiError::invalid(problems));
    }
    let docker = docker_of(state)?;
    let target = targets.remove(0);
    let (plan, report) =
        crate::backups::restore::restore(&state.agent, docker, &id, target, into, dry_run)
            .await
            .map_err(backup_error)?;
    let problems = report.map(|r| r.errors).unwrap_or_default();
    let status = if problems.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::BAD_GATEWAY
    };
    Ok(json_response(
        status,
        &json!({"restore": plan, "problems": problems}),
    ))
}

/// A path id that is not a valid tenant id names no tenant.
fn path_id(id: &str) -> Result<TenantId, ApiError> {
    TenantId::parse(id).map_err(|_| ApiError::tenant_not_found(id))
}

/// Runs a blocking tenants-file edit (it waits on the file's flock) off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal(format!("edit task failed: {e}")))
}

fn edit_error(e: EditError) -> ApiError {
    match e {
        EditError::Exists(id) => ApiError::new(
            StatusCode::CONFLICT,
            "tenant_exists",
            format!("tenant \"{id}\" already exists"),
        ),
        other => ApiError::internal(other.to_string()),
    }
}

async fn view_of(state: &State, id: &TenantId) -> Result<Option<tenant_ops::View>, ApiError> {
    let views = tenant_ops::views(&state.agent, state.docker.as_ref()).await?;
    Ok(views.into_iter().find(|v| v.id == *id))
}

async fn list(state: &State) -> Result<Resp, ApiError> {
    let views = tenant_ops::views(&state.agent, state.docker.as_ref()).await?;
    Ok(json_response(StatusCode::OK, &json!({ "tenants": views })))
}

async fn show(state: &State, id: &str) -> Result<Resp, ApiError> {
    let id = path_id(id)?;
    match view_of(state, &id).await? {
        Some(v) => Ok(json_response(StatusCode::OK, &v)),
        None => Err(ApiError::tenant_not_found(id.as_str())),
    }
}

/// How long a create or delete waits for the reconciler: a server's start-up, plus a reload.
fn pass_timeout(state: &State) -> Duration {
    Duration::from_secs(state.agent.settings.docker.ready_timeout_secs + 60)
}

async fn wait_for_pass(state: &State, edit: Instant) -> Result<Arc<PassRecord>, WaitError> {
    state
        .passes
        .wait_for_pass_after(edit, &state.pokes, pass_timeout(state), state.stop.clone())
        .await
}

fn wait_error(e: WaitError, what: &str) -> ApiError {
    match e {
        WaitError::Timeout => ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "reconcile_timeout",
            format!("the tenants file is updated, but no reconcile pass finished {what} in time; GET the tenant to follow it"),
        ),
        WaitError::ShuttingDown => ApiError::unavailable(
            "shutting_down",
            format!("the agent is stopping; the tenants file is updated and the next start finishes {what}"),
        ),
    }
}

/// This pass's problems that name the tenant (all of them when none does).
fn problems_for(pass: &PassRecord, id: &TenantId) -> Vec<String> {
    let all = pass.problems();
    let mine: Vec<String> = all
        .iter()
        .filter(|l| l.contains(&format!("tenant {id}:")) || l.contains(&format!("\"{id}\"")))
        .cloned()
        .collect();
    if mine.is_empty() {
        all
    } else {
        mine
    }
}

async fn create(state: &Arc<State>, req: Request<Incoming>) -> Result<Resp, ApiError> {
    let body = read_json(req, state.agent.settings.api.max_body_bytes).await?;
    let mut problems = Vec::new();
    let parsed = validate::create(&body, state.host)
        .map_err(|p| problems = p)
        .ok();
    // Provisioning needs the engine and the image; say so before the file is touched.
    let Some(docker) = state.docker.as_ref() else {
        if !problems.is_empty() {
            return Err(ApiError::invalid(problems));
        }
        return Err(ApiError::unavailable(
            "docker_unavailable",
            "managed tenants need the Docker engine, and the agent has none (see its log)",
        ));
    };
    let image = parsed
        .as_ref()
        .and_then(|c| c.image.clone())
        .unwrap_or_else(|| state.agent.settings.docker.default_image.clone());
    let image_ok = match docker.has_image(&image).await {
        Ok(found) => found,
        // Docker's 400 for a reference it cannot parse (the check above should catch it first).
        Err(e) if e.to_string().contains("invalid reference format") => false,
        Err(e) => {
            return Err(ApiError::unavailable(
                "docker_unavailable",
                format!("cannot ask Docker for the image: {e}"),
            ))
        }
    };
    if !image_ok {
        problems.push(super::errors::FieldProblem {
            field: "managed.image".into(),
            message: format!(
                "image {image} is not present on the Docker engine (no registry is asked); build it with docker/build-image.sh"
            ),
        });
    }
    let req = match parsed {
        Some(r) if problems.is_empty() => r,
        _ => return Err(ApiError::invalid(problems)),
    };
    let file = state.agent.paths.tenants_file.clone();
    let (id, entry) = (req.id.clone(), req.entry.clone());
    blocking(move || tenant_ops::add(&file, &id, entry))
        .await?
        .map_err(edit_error)?;
    let edit = Instant::now();
    info!(tenant = %req.id, "api: tenant added to the tenants file; waiting for the reconciler");
    let pass = wait_for_pass(state, edit)
        .await
        .map_err(|e| wait_error(e, "provisioning it"))?;
    let id = &req.id;
    let held_back = matches!(&pass.outcome, super::passes::Outcome::Done { held_back, .. } if held_back.contains(id));
    let routed = maps::read_file(&state.agent.paths.backends_map).contains_key(id.as_str());
    if held_back || !routed {
        let problems = problems_for(&pass, id);
        return Err(ApiError::new(
            StatusCode::BAD_GATEWAY,
            "provisioning_failed",
            format!(
                "tenant \"{id}\" is in the tenants file, but its server is not serving: {}; fix the cause and the reconciler retries, or DELETE the tenant",
                problems.join("; ")
            ),
        )
        .with_detail(json!({ "problems": problems })));
    }
    let view = view_of(state, id).await?.ok_or_else(|| {
        ApiError::internal(format!("tenant \"{id}\" vanished from the tenants file"))
    })?;
    let mut resp = json_response(StatusCode::CREATED, &view);
    if let Ok(v) = HeaderValue::from_str(&format!("/v1/tenants/{id}")) {
        resp.headers_mut().insert(LOCATION, v);
    }
    Ok(resp)
}

async fn delete(state: &Arc<State>, id: &str, query: Option<&str>) -> Result<Resp, ApiError> {
    let id = path_id(id)?;
    let purge = validate::purge_data(query).map_err(ApiError::invalid)?;
    let file = state.agent.paths.tenants_file.clone();
    let was = {
        let id = id.clone();
        blocking(move || tenant_ops::remove(&file, &id))
            .await?
            .map_err(edit_error)?
    };
    if was.is_some() {
        let edit = Instant::now();
        info!(tenant = %id, "api: tenant removed from the tenants file; waiting for the reconciler");
        let pass = wait_for_pass(state, edit)
            .await
            .map_err(|e| wait_error(e, "removing it"))?;
        let still_routed =
            maps::read_file(&state.agent.paths.backends_map).contains_key(id.as_str());
        let mine = format!("tenant {id}:");
        if still_routed || pass.problems().iter().any(|l| l.contains(&mine)) {
            let problems = problems_for(&pass, &id);
            return Err(ApiError::new(
                StatusCode::BAD_GATEWAY,
                "removal_failed",
                format!(
                    "tenant \"{id}\" is out of the tenants file, but removing it failed: {}; the reconciler retries",
                    problems.join("; ")
                ),
            )
            .with_detail(json!({ "problems": problems })));
        }
    }
    let managed = was
        .as_ref()
        .is_none_or(|t| matches!(t.instance, Instance::Managed(_)));
    let mut volume = None;
    let mut purged = false;
    // Only an explicit purge ever removes data: a repeated DELETE of a tenant already out of
    // the file is a 404, never a wipe.
    if managed && purge {
        let Some(docker) = state.docker.as_ref() else {
            return Err(ApiError::unavailable(
                "docker_unavailable",
                "purging a data volume needs the Docker engine, and the agent has none",
            ));
        };
        // Hold the tenants file's lock while purging, so a create of the same id cannot slip
        // in between and lose its new data.
        let file = state.agent.paths.tenants_file.clone();
        let guard = blocking(move || tenants::TenantsFileEdit::open(&file))
            .await?
            .map_err(|e| ApiError::internal(e.to_string()))?;
        if guard.tenants().is_ok_and(|t| t.get(&id).is_some()) {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "tenant_exists",
                format!("tenant \"{id}\" was created again meanwhile; its data volume is kept"),
            ));
        }
        let removed = docker
            .remove(&id, true)
            .await
            .map_err(|e| ApiError::new(StatusCode::BAD_GATEWAY, "docker_error", e.to_string()))?;
        drop(guard);
        if was.is_none() && removed.container.is_none() && removed.volume.is_none() {
            return Err(ApiError::tenant_not_found(id.as_str()));
        }
        volume = removed.volume;
        purged = removed.volume_purged;
    } else if was.is_none() {
        return Err(ApiError::tenant_not_found(id.as_str()));
    } else if managed {
        volume = state.docker.as_ref().map(|d| d.volume_name(&id));
    }
    Ok(json_response(
        StatusCode::OK,
        &json!({"id": id, "deleted": true, "data_volume": volume, "data_volume_purged": purged}),
    ))
}

async fn set_access(
    state: &Arc<State>,
    id: &str,
    req: Request<Incoming>,
) -> Result<Resp, ApiError> {
    let id = path_id(id)?;
    let body = read_json(req, state.agent.settings.api.max_body_bytes).await?;
    let want = validate::access(&body).map_err(ApiError::invalid)?;
    let known = tenants::load(&state.agent.paths.tenants_file)
        .map_err(|e| ApiError::internal(e.to_string()))?
        .get(&id)
        .is_some();
    if !known {
        return Err(ApiError::tenant_not_found(id.as_str()));
    }
    // `access::set` takes the tenants file's and the maps' flocks, blocking: run it on a
    // blocking thread with its own handle on the runtime, so waiting never stalls a worker.
    let agent = state.agent.clone();
    let handle = tokio::runtime::Handle::current();
    let flip_id = id.clone();
    let flip = blocking(move || {
        handle.block_on(access::set(
            &agent,
            &flip_id,
            want.access,
            want.terminate_sessions,
        ))
    })
    .await?
    .map_err(|e| {
        let text = format!("{e:#}");
        if text.starts_with("no tenant") {
            ApiError::tenant_not_found(id.as_str())
        } else {
            ApiError::new(StatusCode::BAD_GATEWAY, "haproxy_error", text)
        }
    })?;
    if flip.file_changed {
        state.metrics.record_flip(flip.access);
        let _ = state.pokes.try_send(crate::daemon::Poke::Api);
    }
    Ok(json_response(StatusCode::OK, &flip))
}

async fn readyz(state: &State) -> Result<Resp, ApiError> {
    let api = access::runtime_api(&state.agent);
    let haproxy = match api.show_info().await {
        Ok(_) => Ok(()),
        Err(e) => Err(e.to_string()),
    };
    let docker = match &state.docker {
        Some(d) => d.ping().await.map_err(|e| e.to_string()),
        None => {
            let managed = tenants::load(&state.agent.paths.tenants_file)
                .map(|t| t.iter().any(|t| matches!(t.instance, Instance::Managed(_))))
                .unwrap_or(true);
            if managed {
                Err("the agent started without a Docker engine".to_owned())
            } else {
                Ok(())
            }
        }
    };
    let pass = match state.passes.latest() {
        None => Err("no reconcile pass has finished yet".to_owned()),
        Some(p) if p.ok() => Ok(()),
        Some(p) => Err(p.problems().join("; ")),
    };
    let show = |r: &Result<(), String>| match r {
        Ok(()) => "ok".to_owned(),
        Err(e) => e.clone(),
    };
    let checks =
        json!({"haproxy": show(&haproxy), "docker": show(&docker), "last_reconcile": show(&pass)});
    if haproxy.is_ok() && docker.is_ok() && pass.is_ok() {
        Ok(json_response(
            StatusCode::OK,
            &json!({"ready": true, "checks": checks}),
        ))
    } else {
        let failing: Vec<&str> = [
            ("haproxy", &haproxy),
            ("docker", &docker),
            ("last_reconcile", &pass),
        ]
        .into_iter()
        .filter(|(_, r)| r.is_err())
        .map(|(n, _)| n)
        .collect();
        Err(
            ApiError::unavailable("not_ready", format!("not ready: {}", failing.join(", ")))
                .with_detail(json!({ "checks": checks })),
        )
    }
}

async fn metrics(state: &State) -> Result<Resp, ApiError> {
    let api = access::runtime_api(&state.agent);
    let stats = api.show_stat().await.ok();
    let refused = api
        .execute(&Command::ShowPgsRefused)
        .await
        .ok()
        .map(|body| metrics::parse_refused(&body));
    let negotiations = api
        .execute(&Command::ShowPgsNegotiations)
        .await
        .ok()
        .map(|body| metrics::parse_negotiations(&body));
    let certificates = match &state.agent.settings.tls {
        Some(_) => {
            let reach = stats.is_some().then_some(&api);
            let p = &state.agent.paths;
            crate::tls::status(&p.tls_dir, &p.tls_served_dir, reach)
                .await
                .ok()
        }
        None => None,
    };
    let tables = api
        .execute(&Command::ShowTables)
        .await
        .ok()
        .map(|body| metrics::parse_tables(&body));
    let limits = &state.agent.settings.limits;
    let connection_limits = crate::tenants::load(&state.agent.paths.tenants_file)
        .map(|t| {
            t.iter()
                .map(|t| {
                    let n = t.connection_limit.unwrap_or(limits.tenant_connections);
                    (t.id.to_string(), n)
                })
                .collect()
        })
        .unwrap_or_default();
    let docker_up = match &state.docker {
        Some(d) => Some(d.ping().await.is_ok()),
        None => None,
    };
    let tenants = tenant_ops::views(&state.agent, state.docker.as_ref())
        .await
        .unwrap_or_default();
    let with_backups: Vec<_> = tenants
        .iter()
        .filter(|t| t.spec.as_ref().is_some_and(|s| s.backups))
        .map(|t| t.id.clone())
        .collect();
    let sleep = state.sleeper.as_ref().map(|z| {
        z.with_stats(|s| metrics::SleepSample {
            wakes: s.wakes,
            sleeps: s.sleeps,
            wake_seconds: s.wake_seconds.clone(),
            wake_failures: s.wake_failures.clone(),
        })
    });
    let sample = Sample {
        sleep,
        backups: crate::backups::status::summaries(&state.agent.paths, &with_backups),
        tenants,
        haproxy_up: stats.is_some(),
        stats,
        refused,
        negotiations,
        certificates,
        tables,
        connection_limits,
        failed_startups_threshold: limits.failed_startups,
        docker_up,
    };
    let text = metrics::render(&state.metrics, &sample)
        .map_err(|_| ApiError::internal("cannot encode the metrics"))?;
    let mut resp = Response::new(Full::new(Bytes::from(text)));
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_match_the_route_table() {
        assert_eq!(route("/healthz"), Some(Route::Healthz));
        assert_eq!(route("/v1/tenants"), Some(Route::Tenants));
        assert_eq!(route("/v1/tenants/acme"), Some(Route::Tenant("acme")));
        assert_eq!(
            route("/v1/tenants/acme/access"),
            Some(Route::TenantAccess("acme"))
        );
        for none in [
            "/",
            "/v1/tenants/",
            "/v1/tenants/acme/",
            "/v1/tenants//access",
            "/v1/tenants/a/b/c",
            "/v2/tenants",
        ] {
            assert_eq!(route(none), None, "{none}");
        }
        // Every table entry is routable with its methods.
        for (method, template) in ROUTES {
            let path = template.replace("{id}", "acme");
            let r = route(&path).unwrap_or_else(|| panic!("{path}"));
            assert!(
                allowed(&r).iter().any(|m| m.as_str() == *method),
                "{method} {path}"
            );
        }
        let methods: usize = [
            Route::Healthz,
            Route::Readyz,
            Route::Metrics,
            Route::Tenants,
            Route::Tenant("a"),
            Route::TenantAccess("a"),
            Route::TenantBackups("a"),
            Route::TenantRestore("a"),
            Route::TenantSleep("a"),
            Route::TenantWake("a"),
        ]
        .iter()
        .map(|r| allowed(r).len())
        .sum();
        assert_eq!(methods, ROUTES.len(), "ROUTES and `allowed` disagree");
    }
}
