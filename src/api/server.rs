//! Listeners (loopback TCP or a unix socket) and the hyper accept loop: one task per
//! connection, a cap on concurrent connections, header and body timeouts, and a graceful
//! shutdown that lets requests in flight finish (for a bounded time).

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use super::{routes, State};

/// Connections served at once; more wait in the kernel's backlog.
const MAX_CONNECTIONS: usize = 256;
/// A client must send its request head within this time.
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// How long requests in flight may take to finish once shutdown begins.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug)]
pub enum Listener {
    Tcp(TcpListener),
    /// The socket file is removed when the listener is dropped.
    Unix(UnixListener, PathBuf),
}

impl Listener {
    /// Binds `listen` (`HOST:PORT`, or a unix socket path: absolute, or relative to `base` and
    /// ending in `.sock`). A socket file nobody answers on is replaced; a live one is an error.
    pub async fn bind(listen: &str, base: &Path) -> anyhow::Result<Listener> {
        if listen.starts_with('/') || listen.ends_with(".sock") {
            let path = base.join(listen);
            if path.exists() {
                if std::os::unix::net::UnixStream::connect(&path).is_ok() {
                    bail!(
                        "another process serves {}; is an agent already running?",
                        path.display()
                    );
                }
                std::fs::remove_file(&path).with_context(|| {
                    format!("cannot remove the stale socket {}", path.display())
                })?;
            }
            let l = UnixListener::bind(&path)
                .with_context(|| format!("cannot listen on {}", path.display()))?;
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                .with_context(|| format!("cannot restrict {}", path.display()))?;
            return Ok(Listener::Unix(l, path));
        }
        let l = TcpListener::bind(listen).await.with_context(|| {
            format!("cannot listen on {listen} (set [api] listen to a free HOST:PORT, a unix socket path, or \"\" for no API)")
        })?;
        if l.local_addr().is_ok_and(|a| !a.ip().is_loopback()) {
            warn!(
                listen,
                "the HTTP API listens beyond loopback without TLS; put a TLS proxy in front"
            );
        }
        Ok(Listener::Tcp(l))
    }

    /// Where clients reach it, for the log.
    pub fn describe(&self) -> String {
        match self {
            Listener::Tcp(l) => l
                .local_addr()
                .map(|a| format!("http://{a}"))
                .unwrap_or_else(|_| "tcp".into()),
            Listener::Unix(_, p) => format!("unix:{}", p.display()),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Serves until `stop` turns true, then lets connections finish for up to [`DRAIN_TIMEOUT`].
pub async fn serve(listener: Listener, state: Arc<State>, mut stop: watch::Receiver<bool>) {
    info!(at = %listener.describe(), "HTTP API listening");
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut conns = JoinSet::new();
    loop {
        let Ok(permit) = Arc::clone(&permits).acquire_owned().await else {
            break;
        };
        let accepted = tokio::select! {
            _ = super::stopped(&mut stop) => break,
            a = accept(&listener) => a,
        };
        match accepted {
            Ok(Accepted::Tcp(s)) => {
                conns.spawn(connection(s, Arc::clone(&state), stop.clone(), permit));
            }
            Ok(Accepted::Unix(s)) => {
                conns.spawn(connection(s, Arc::clone(&state), stop.clone(), permit));
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                warn!(error = %e, "accepting an API connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        while conns.try_join_next().is_some() {}
    }
    drop(listener);
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        warn!(
            left = conns.len(),
            "API connections still open after {DRAIN_TIMEOUT:?}; closing them"
        );
        conns.abort_all();
    }
    info!("HTTP API stopped");
}

enum Accepted {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

async fn accept(l: &Listener) -> std::io::Result<Accepted> {
    match l {
        Listener::Tcp(l) => l.accept().await.map(|(s, _)| Accepted::Tcp(s)),
        Listener::Unix(l, _) => l.accept().await.map(|(s, _)| Accepted::Unix(s)),
    }
}

async fn connection<S>(
    stream: S,
    state: Arc<State>,
    mut stop: watch::Receiver<bool>,
    _permit: tokio::sync::OwnedSemaphorePermit,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |req| {
        let state = Arc::clone(&state);
        async move { Ok::<_, Infallible>(routes::handle(state, req).await) }
    });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = super::stopped(&mut stop) => {
            // Finish the request in flight, then close instead of keeping the connection alive.
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        debug!(error = %e, "API connection ended with an error");
    }
}
