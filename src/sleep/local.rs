//! The local wake socket (`run/wake.sock`, mode 600): HAProxy's `pgs_wake` asks here for a
//! sleeping tenant's server, and `tenant sleep|wake` ask here when `run` serves the layout.
//! Plain HTTP/1.1, no token: the socket's mode keeps other local users out.
//!
//! - `POST /wake/<tenant>`  → 200 `awake queued_ms=… start_ms=… ready_ms=… total_ms=…`, or
//!   503 `<reason> <message>` (reason: not_allowed, start_failed, timeout).
//! - `POST /sleep/<tenant>` → 200 `asleep <depth>`, 409 `busy …`, 403 `not_allowed …`,
//!   500 `failed …`.

use std::convert::Infallible;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use super::{SleepError, Sleeper};
use crate::tenants::TenantId;

/// The bound socket; its file is removed when dropped.
pub struct WakeListener {
    listener: UnixListener,
    path: PathBuf,
}

impl Drop for WakeListener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Binds `path` (mode 600, owned by `owner` when given), replacing a socket file nobody
/// answers on.
pub fn bind(path: &Path, owner: Option<&str>) -> anyhow::Result<WakeListener> {
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            anyhow::bail!(
                "another process serves {}; is an agent already running?",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("cannot remove the stale socket {}", path.display()))?;
    }
    // Created with mode 600 from the start: no moment where another user could connect.
    let old = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(path);
    unsafe { libc::umask(old) };
    let listener = bound.with_context(|| format!("cannot listen on {}", path.display()))?;
    if let Some(user) = owner {
        let uid = uid_of(user).with_context(|| {
            format!("[sleep] socket_user = {user:?}: no such user on this host")
        })?;
        std::os::unix::fs::chown(path, Some(uid), None)
            .with_context(|| format!("cannot give {} to {user}", path.display()))?;
    }
    Ok(WakeListener {
        listener,
        path: path.to_owned(),
    })
}

/// The uid of a user name (getpwnam).
fn uid_of(user: &str) -> Option<u32> {
    let name = std::ffi::CString::new(user).ok()?;
    // getpwnam's result points into static storage; read the uid at once.
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    (!pw.is_null()).then(|| unsafe { (*pw).pw_uid })
}

/// Serves wake and sleep requests until the task is dropped.
pub async fn serve(l: WakeListener, sleeper: Arc<Sleeper>) {
    info!(at = %l.path.display(), "wake socket listening");
    let mut conns = JoinSet::new();
    loop {
        match l.listener.accept().await {
            Ok((stream, _)) => {
                let sleeper = Arc::clone(&sleeper);
                conns.spawn(async move {
                    let service = service_fn(move |req| {
                        let sleeper = Arc::clone(&sleeper);
                        async move { Ok::<_, Infallible>(handle(&sleeper, req).await) }
                    });
                    let conn = http1::Builder::new()
                        .timer(TokioTimer::new())
                        .header_read_timeout(Duration::from_secs(10))
                        .serve_connection(TokioIo::new(stream), service);
                    if let Err(e) = conn.await {
                        debug!(error = %e, "wake socket connection ended with an error");
                    }
                });
            }
            Err(e) => {
                warn!(error = %e, "accepting on the wake socket failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        while conns.try_join_next().is_some() {}
    }
}

async fn handle<B>(sleeper: &Sleeper, req: Request<B>) -> Response<Full<Bytes>> {
    if req.method() != Method::POST {
        return text(StatusCode::METHOD_NOT_ALLOWED, "use POST\n".into());
    }
    let path = req.uri().path().to_owned();
    let (verb, tenant) = match path.trim_start_matches('/').split_once('/') {
        Some((v @ ("wake" | "sleep"), t)) => (v, t),
        _ => {
            return text(
                StatusCode::NOT_FOUND,
                "POST /wake/<tenant> or /sleep/<tenant>\n".into(),
            )
        }
    };
    let Ok(id) = TenantId::parse(tenant) else {
        return text(
            StatusCode::BAD_REQUEST,
            "not_allowed not a tenant name\n".into(),
        );
    };
    if verb == "wake" {
        return match sleeper.wake(&id).await {
            Ok(t) => text(
                StatusCode::OK,
                format!(
                    "awake queued_ms={} start_ms={} ready_ms={} total_ms={} started={}\n",
                    t.queued_ms, t.start_ms, t.ready_ms, t.total_ms, t.started
                ),
            ),
            Err(e) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("{} {}\n", e.reason(), one_line(&e.to_string())),
            ),
        };
    }
    match sleeper.sleep(&id).await {
        Ok(depth) => text(StatusCode::OK, format!("asleep {}\n", depth_word(depth))),
        Err(e @ SleepError::Busy) => text(StatusCode::CONFLICT, format!("busy {e}\n")),
        Err(SleepError::NotAllowed(m)) => text(
            StatusCode::FORBIDDEN,
            format!("not_allowed {}\n", one_line(&m)),
        ),
        Err(SleepError::Failed(m)) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("failed {}\n", one_line(&m)),
        ),
    }
}

pub fn depth_word(d: super::Depth) -> &'static str {
    match d {
        super::Depth::Light => "light",
        super::Depth::Deep => "deep",
    }
}

fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// Asks the agent serving `socket` to `verb` (`wake` or `sleep`) `id`; returns the status
/// and the reply's text. `Err` with `NotFound`/`ConnectionRefused` means no agent serves it.
pub async fn ask(
    socket: &Path,
    verb: &str,
    id: &TenantId,
    timeout: Duration,
) -> io::Result<(u16, String)> {
    let exchange = async {
        let mut s = UnixStream::connect(socket).await?;
        let request = format!(
            "POST /{verb}/{id} HTTP/1.1\r\nHost: pgs-agent\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        s.write_all(request.as_bytes()).await?;
        let mut reply = Vec::new();
        s.read_to_end(&mut reply).await?;
        Ok::<_, io::Error>(reply)
    };
    let reply = tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no answer in time"))??;
    parse_reply(&String::from_utf8_lossy(&reply))
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "not an HTTP reply"))
}

/// The status and body of an HTTP/1.1 reply (not chunked: the server sends a length).
fn parse_reply(reply: &str) -> Option<(u16, String)> {
    let (head, body) = reply.split_once("\r\n\r\n")?;
    let status = head
        .lines()
        .next()?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some((status, body.trim_end().to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_resolve_to_uids() {
        assert_eq!(uid_of("root"), Some(0));
        assert_eq!(uid_of("no-such-user-here"), None);
    }

    #[test]
    fn replies_parse() {
        assert_eq!(
            parse_reply("HTTP/1.1 503 Service Unavailable\r\ncontent-length: 9\r\n\r\ntimeout x\n"),
            Some((503, "timeout x".into()))
        );
        assert_eq!(parse_reply("garbage"), None);
    }
}
