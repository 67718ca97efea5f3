//! `run`: the reconcile loop. Pokes (file watch, Docker events, SIGHUP, API calls) and a
//! periodic resync only wake it; each wake runs one full idempotent pass. Pokes that arrive
//! close together are coalesced into one pass (and so at most one reload). Also systemd
//! notification (READY, STATUS, WATCHDOG) when `NOTIFY_SOCKET` is set.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::sync::mpsc;
use tracing::{error, info, warn};

use crate::instances::InstanceDriver;
use crate::reconcile::{self, Report, SyncOptions};
use crate::settings::Agent;

/// Why the loop woke; for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Poke {
    TenantsFileChanged,
    Signal,
    Docker(String),
    Api,
    CertificatesChanged,
    /// The Docker engine answers again after it went away.
    DockerBack,
}

/// Loop timing.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// A pass runs at least this often, repairing drift no event announced.
    pub resync: Duration,
    /// After a poke, wait this long for more before the pass (one pass, one reload).
    pub debounce: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            resync: Duration::from_secs(30),
            debounce: Duration::from_millis(300),
        }
    }
}

/// Runs passes until `shutdown` resolves. A pass in progress when it does is finished; no new
/// one starts. `on_pass` sees every report (the API's readiness and metrics use it).
pub async fn run<D: InstanceDriver>(
    agent: &Agent,
    driver: Option<&D>,
    mut pokes: mpsc::Receiver<Poke>,
    shutdown: impl Future<Output = ()>,
    timing: Timing,
    mut on_pass: impl FnMut(&anyhow::Result<Report>),
) {
    tokio::pin!(shutdown);
    let notifier = SdNotify::from_env();
    let _watchdog = notifier.as_ref().and_then(SdNotify::spawn_watchdog);
    let mut first = true;
    let mut reason = "start".to_owned();
    let mut urgent = false;
    loop {
        info!(reason = %reason, "reconciling");
        let result = reconcile::sync(agent, driver, SyncOptions::default()).await;
        log_pass(&result);
        on_pass(&result);
        if let Some(n) = &notifier {
            if first {
                n.send("READY=1");
            }
            n.send(&format!("STATUS={}", status_line(&result)));
        }
        first = false;

        tokio::select! {
            biased;
            _ = &mut shutdown => break,
            poke = pokes.recv() => match poke {
                Some(p) => {
                    urgent = p == Poke::DockerBack;
                    reason = format!("{p:?}");
                }
                None => {
                    // Every poke source is gone; keep the periodic resync going.
                    tokio::select! {
                        _ = &mut shutdown => break,
                        _ = tokio::time::sleep(timing.resync) => reason = "resync".into(),
                    }
                }
            },
            _ = tokio::time::sleep(timing.resync) => reason = "resync".into(),
        }
        // Coalesce a burst of pokes (an editor's several writes, twenty tenants added by a
        // script) into one pass. Not when Docker came back: tenants may be down until this pass.
        if !std::mem::take(&mut urgent) {
            tokio::select! {
                _ = &mut shutdown => break,
                _ = tokio::time::sleep(timing.debounce) => {}
            }
        }
        while pokes.try_recv().is_ok() {}
    }
    if let Some(n) = &notifier {
        n.send("STOPPING=1");
    }
    info!("stopped");
}

fn log_pass(result: &anyhow::Result<Report>) {
    match result {
        Ok(r) => {
            for line in &r.done {
                info!("{line}");
            }
            for e in &r.errors {
                error!("{e}");
            }
            for t in &r.held_back {
                warn!(tenant = %t, "not routable until its server accepts logins");
            }
            info!(
                changed = r.changed(),
                reloaded = r.reloaded,
                errors = r.errors.len(),
                ms = r.duration_ms,
                "pass finished"
            );
        }
        // A bad tenants file lands here: nothing was touched, the last good state serves.
        Err(e) => error!("pass failed, nothing was changed: {e:#}"),
    }
}

fn status_line(result: &anyhow::Result<Report>) -> String {
    match result {
        Ok(r) if r.errors.is_empty() => format!("in sync ({} ms)", r.duration_ms),
        Ok(r) => format!("{} problem(s): {}", r.errors.len(), r.errors[0]),
        Err(e) => format!("pass failed: {e}"),
    }
}

/// Watches the tenants file's directory (editors replace files by rename, which a watch on the
/// file itself would miss) and pokes on any event touching the file.
pub fn watch_tenants_file(
    path: &Path,
    pokes: mpsc::Sender<Poke>,
) -> notify::Result<notify::RecommendedWatcher> {
    use notify::{RecursiveMode, Watcher};
    let dir = path.parent().unwrap_or(Path::new("/")).to_owned();
    let name = path.file_name().map(|n| n.to_owned());
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        if event.kind.is_access() {
            return;
        }
        if event.paths.iter().any(|p| p.file_name() == name.as_deref()) {
            let _ = pokes.try_send(Poke::TenantsFileChanged);
        }
    })?;
    watcher.watch(&dir, RecursiveMode::NonRecursive)?;
    Ok(watcher)
}

/// Watches the certificates directory and pokes on any change of a file in it (a renewal
/// written in place or by rename, a new file); the pass pushes what changed to HAProxy.
pub fn watch_certificates(
    dir: &Path,
    pokes: mpsc::Sender<Poke>,
) -> notify::Result<notify::RecommendedWatcher> {
    use notify::{RecursiveMode, Watcher};
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        if !event.kind.is_access() {
            let _ = pokes.try_send(Poke::CertificatesChanged);
        }
    })?;
    watcher.watch(dir, RecursiveMode::NonRecursive)?;
    Ok(watcher)
}

/// systemd's notify protocol: datagrams to `$NOTIFY_SOCKET`.
struct SdNotify {
    socket: PathBuf,
    watchdog: Option<Duration>,
}

impl SdNotify {
    fn from_env() -> Option<SdNotify> {
        let socket = std::env::var_os("NOTIFY_SOCKET")?;
        let watchdog = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|u| u.parse::<u64>().ok())
            .map(Duration::from_micros);
        Some(SdNotify {
            socket: socket.into(),
            watchdog,
        })
    }

    fn send(&self, msg: &str) {
        let sock = match std::os::unix::net::UnixDatagram::unbound() {
            Ok(s) => s,
            Err(e) => return warn!(error = %e, "sd_notify: no socket"),
        };
        let path = self.socket.to_string_lossy();
        let result = if let Some(abstract_name) = path.strip_prefix('@') {
            use std::os::linux::net::SocketAddrExt;
            std::os::unix::net::SocketAddr::from_abstract_name(abstract_name.as_bytes())
                .and_then(|addr| sock.send_to_addr(msg.as_bytes(), &addr))
        } else {
            sock.send_to(msg.as_bytes(), &self.socket)
        };
        if let Err(e) = result {
            warn!(error = %e, "sd_notify failed");
        }
    }

    /// Pings the watchdog at half its interval, from the runtime: a hung runtime stops pinging.
    fn spawn_watchdog(&self) -> Option<tokio::task::JoinHandle<()>> {
        let every = self.watchdog? / 2;
        let me = SdNotify {
            socket: self.socket.clone(),
            watchdog: None,
        };
        Some(tokio::spawn(async move {
            loop {
                me.send("WATCHDOG=1");
                tokio::time::sleep(every).await;
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notify_datagrams_reach_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let rx = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        let n = SdNotify {
            socket: path,
            watchdog: None,
        };
        n.send("READY=1");
        let mut buf = [0u8; 64];
        let len = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1");
    }
}
