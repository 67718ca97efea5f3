//! Client for HAProxy's master CLI (`haproxy -W -S <master.sock>`): the process list, reloads, and confirming that a reload took.
//!
//! Wire facts this module relies on (checked against HAProxy 2.6.12):
//! - the master answers a command at once but keeps the connection open afterwards until the
//!   client half-closes its write side, so every request here is `line\n`, `shutdown(Write)`,
//!   then read to EOF;
//! - `reload` answers nothing and closes; the master then re-executes itself, and for that
//!   moment connecting fails with "connection refused";
//! - a reload whose new configuration does not load leaves the old workers serving, bumps the
//!   master's `reloads` count and its `[failed: N]` count (reset to 0 by the next good
//!   reload), starts no new worker, and turns the `prompt` into `master[ReloadFailed]>`;
//! - 2.6's `show proc` has no relative-pid column (nbproc is gone; the current worker is `@1`).

use std::collections::HashSet;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::time::{sleep, timeout, Instant};

/// Time allowed to connect to the master socket.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Time allowed for each read or write on an open connection.
pub const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause between two polls while waiting for a reload.
pub const RELOAD_POLL_INTERVAL: Duration = Duration::from_millis(10);

/// Everything that can go wrong talking to the master CLI.
#[derive(Debug, thiserror::Error)]
pub enum MasterError {
    #[error("HAProxy master socket {}: {}", .path.display(), describe_connect_error(.source))]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("HAProxy master socket {}: no connection within {timeout:?} — is HAProxy running?", .path.display())]
    ConnectTimeout { path: PathBuf, timeout: Duration },
    #[error("HAProxy master socket {}: no progress within {timeout:?} on `{command}`", .path.display())]
    Timeout {
        path: PathBuf,
        timeout: Duration,
        command: String,
    },
    #[error("HAProxy master socket {}: {source} on `{command}`", .path.display())]
    Io {
        path: PathBuf,
        command: String,
        #[source]
        source: io::Error,
    },
    #[error("HAProxy master rejected `{command}`: {}", .reply.lines().next().unwrap_or(""))]
    Rejected { command: String, reply: String },
    #[error("unexpected reply to `{command}` ({reason}): {}", .reply.lines().next().unwrap_or(""))]
    UnexpectedReply {
        command: String,
        reason: &'static str,
        reply: String,
    },
    #[error(
        "HAProxy reload failed: the master kept the previous configuration \
         ({failed_reloads} failed reload(s) since the last good one); check the configuration \
         with `haproxy -c` and the master's log"
    )]
    ReloadFailed {
        failed_reloads: u32,
        procs: ProcList,
    },
    #[error("HAProxy reload not confirmed within {waited:?}: no new worker appeared")]
    ReloadTimeout {
        waited: Duration,
        /// The last process list seen after the reload, if the master answered at all.
        last: Option<Box<ProcList>>,
    },
}

impl MasterError {
    /// True for the errors a master shows while it re-executes: refused, missing socket,
    /// reset or closed mid-reply, timeouts.
    fn is_transient(&self) -> bool {
        match self {
            MasterError::Connect { source, .. } | MasterError::Io { source, .. } => matches!(
                source.kind(),
                io::ErrorKind::ConnectionRefused
                    | io::ErrorKind::NotFound
                    | io::ErrorKind::ConnectionReset
                    | io::ErrorKind::ConnectionAborted
                    | io::ErrorKind::BrokenPipe
                    | io::ErrorKind::UnexpectedEof
            ),
            MasterError::ConnectTimeout { .. } | MasterError::Timeout { .. } => true,
            MasterError::UnexpectedReply { reply, .. } => reply.is_empty(),
            _ => false,
        }
    }
}

fn describe_connect_error(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => {
            "connection refused — is HAProxy running in master-worker mode (-W -S)?".into()
        }
        io::ErrorKind::NotFound => {
            "no such socket — is HAProxy running in master-worker mode (-W -S)?".into()
        }
        io::ErrorKind::PermissionDenied => "permission denied".into(),
        _ => e.to_string(),
    }
}

/// The master process line of `show proc`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MasterProc {
    pub pid: u32,
    /// Reloads since start, failed ones included.
    pub reloads: u32,
    /// Failed reloads since the last successful one (`[failed: N]`; 0 where not shown).
    pub failed_reloads: u32,
    pub uptime_sec: u64,
    pub version: String,
}

/// A worker line of `show proc`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Worker {
    pub pid: u32,
    /// Only in formats that print it (before 2.5); `None` on 2.6.
    pub relative_pid: Option<u32>,
    /// Reloads this worker has lived through.
    pub reloads: u32,
    pub uptime_sec: u64,
    pub version: String,
    /// Listed under `# old workers`: finishing its connections after a reload.
    pub old: bool,
}

/// A `program` section's process line of `show proc`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Program {
    pub pid: u32,
    pub name: String,
    pub reloads: u32,
    pub uptime_sec: u64,
    pub old: bool,
}

/// Parsed `show proc`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcList {
    pub master: MasterProc,
    /// Current workers first, then old ones, in HAProxy's order.
    pub workers: Vec<Worker>,
    pub programs: Vec<Program>,
}

impl ProcList {
    /// Parses `show proc` as 2.6 prints it (and the older format with a relative-pid column):
    ///
    /// ```text
    /// #<PID>          <type>          <reloads>       <uptime>        <version>
    /// 7691            master          1 [failed: 0]   0d00h01m16s     2.6.12-1+deb12u4
    /// # workers
    /// 11023           worker          0               0d00h00m00s     2.6.12-1+deb12u4
    /// # old workers
    /// 7692            worker          1               0d00h01m16s     2.6.12-1+deb12u4
    /// # programs
    /// ```
    pub fn parse(body: &str) -> Result<ProcList, &'static str> {
        let mut lines = body.lines().filter(|l| !l.trim().is_empty());
        let header = lines.next().ok_or("empty reply")?;
        if !header.starts_with("#<PID>") {
            return Err("no '#<PID>' header line");
        }
        let with_relative = header.contains("<relative PID>");
        let mut master = None;
        let mut workers = Vec::new();
        let mut programs = Vec::new();
        let mut section = "";
        let mut old = false;
        for line in lines {
            if let Some(name) = line.strip_prefix('#') {
                let name = name.trim();
                old = name.starts_with("old ");
                section = name.trim_start_matches("old ").trim();
                continue;
            }
            let mut t = line.split_whitespace();
            let pid: u32 = t.next().and_then(|p| p.parse().ok()).ok_or("bad pid")?;
            let kind = t.next().ok_or("no process type")?;
            let relative_pid = if with_relative {
                // `1`, `[was: 1]` for an old worker, `-` for a program.
                match t.next().ok_or("no relative pid")? {
                    "-" => None,
                    "[was:" => t.next().and_then(|v| v.trim_end_matches(']').parse().ok()),
                    v => Some(v.parse().map_err(|_| "bad relative pid")?),
                }
            } else {
                None
            };
            let reloads: u32 = t.next().and_then(|p| p.parse().ok()).ok_or("bad reloads")?;
            let mut rest: Vec<&str> = t.collect();
            let mut failed_reloads = 0;
            if rest.first() == Some(&"[failed:") {
                failed_reloads = rest
                    .get(1)
                    .and_then(|v| v.trim_end_matches(']').parse().ok())
                    .ok_or("bad [failed: N]")?;
                rest.drain(..2);
            }
            let uptime_sec = rest
                .first()
                .and_then(|u| parse_uptime(u))
                .ok_or("bad uptime")?;
            let version = rest.get(1..).unwrap_or_default().join(" ");
            match (kind, section) {
                ("master", _) => {
                    master = Some(MasterProc {
                        pid,
                        reloads,
                        failed_reloads,
                        uptime_sec,
                        version,
                    })
                }
                ("worker", _) => workers.push(Worker {
                    pid,
                    relative_pid,
                    reloads,
                    uptime_sec,
                    version,
                    old,
                }),
                (name, "programs") => programs.push(Program {
                    pid,
                    name: name.to_string(),
                    reloads,
                    uptime_sec,
                    old,
                }),
                _ => return Err("process line of an unknown type"),
            }
        }
        Ok(ProcList {
            master: master.ok_or("no master line")?,
            workers,
            programs,
        })
    }

    /// Workers serving the current configuration.
    pub fn current_workers(&self) -> impl Iterator<Item = &Worker> {
        self.workers.iter().filter(|w| !w.old)
    }

    /// Workers left over from earlier configurations, still finishing connections.
    pub fn old_workers(&self) -> impl Iterator<Item = &Worker> {
        self.workers.iter().filter(|w| w.old)
    }

    /// Every pid listed: master, workers, programs.
    pub fn pids(&self) -> impl Iterator<Item = u32> + '_ {
        std::iter::once(self.master.pid)
            .chain(self.workers.iter().map(|w| w.pid))
            .chain(self.programs.iter().map(|p| p.pid))
    }
}

/// `0d00h01m16s` (also `1d 2h03m04s`) to seconds.
pub fn parse_uptime(s: &str) -> Option<u64> {
    let mut total = 0u64;
    let mut num = String::new();
    let mut seen = false;
    for c in s.chars() {
        match c {
            '0'..='9' => num.push(c),
            ' ' => {}
            'd' | 'h' | 'm' | 's' => {
                let n: u64 = num.parse().ok()?;
                num.clear();
                let unit = match c {
                    'd' => 86_400,
                    'h' => 3_600,
                    'm' => 60,
                    _ => 1,
                };
                total = total.checked_add(n.checked_mul(unit)?)?;
                seen = true;
            }
            _ => return None,
        }
    }
    (seen && num.is_empty()).then_some(total)
}

/// A master CLI client over its unix socket. Cheap to clone; one connection per command.
#[derive(Debug, Clone)]
pub struct MasterCli {
    path: PathBuf,
    connect_timeout: Duration,
    read_timeout: Duration,
}

impl MasterCli {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        MasterCli {
            path: path.into(),
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            read_timeout: DEFAULT_READ_TIMEOUT,
        }
    }

    /// `connect` bounds connecting; `read` bounds each read or write after that.
    pub fn with_timeouts(mut self, connect: Duration, read: Duration) -> Self {
        self.connect_timeout = connect;
        self.read_timeout = read;
        self
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Sends one line (e.g. `show proc`, `@1 show info`) and returns the whole reply, its
    /// final empty line removed. The line must not hold a newline.
    pub async fn command(&self, line: &str) -> Result<String, MasterError> {
        self.command_within(line, self.connect_timeout, self.read_timeout)
            .await
    }

    async fn command_within(
        &self,
        line: &str,
        connect_timeout: Duration,
        read_timeout: Duration,
    ) -> Result<String, MasterError> {
        if line.contains(['\n', '\r']) {
            return Err(MasterError::Rejected {
                command: line.to_string(),
                reply: "refused to send: the line holds a newline".into(),
            });
        }
        tracing::debug!(socket = %self.path.display(), command = line, "master cli");
        let mut stream = match timeout(connect_timeout, UnixStream::connect(&self.path)).await {
            Ok(Ok(s)) => s,
            Ok(Err(source)) => {
                return Err(MasterError::Connect {
                    path: self.path.clone(),
                    source,
                })
            }
            Err(_) => {
                return Err(MasterError::ConnectTimeout {
                    path: self.path.clone(),
                    timeout: connect_timeout,
                })
            }
        };
        let io_err = |source| MasterError::Io {
            path: self.path.clone(),
            command: line.to_string(),
            source,
        };
        let timed_out = || MasterError::Timeout {
            path: self.path.clone(),
            timeout: read_timeout,
            command: line.to_string(),
        };
        let request = format!("{line}\n");
        timeout(read_timeout, async {
            stream.write_all(request.as_bytes()).await?;
            // Without this the master answers but never closes the connection.
            stream.shutdown().await
        })
        .await
        .map_err(|_| timed_out())?
        .map_err(io_err)?;
        let mut reply = Vec::new();
        let mut chunk = [0u8; 16 * 1024];
        loop {
            let n = timeout(read_timeout, stream.read(&mut chunk))
                .await
                .map_err(|_| timed_out())?
                .map_err(io_err)?;
            if n == 0 {
                break;
            }
            reply.extend_from_slice(&chunk[..n]);
        }
        let mut text = String::from_utf8_lossy(&reply).into_owned();
        while text.ends_with('\n') {
            text.pop();
        }
        Ok(text)
    }

    /// `show proc`, parsed.
    pub async fn show_proc(&self) -> Result<ProcList, MasterError> {
        self.show_proc_within(self.connect_timeout, self.read_timeout)
            .await
    }

    async fn show_proc_within(
        &self,
        connect_timeout: Duration,
        read_timeout: Duration,
    ) -> Result<ProcList, MasterError> {
        let reply = self
            .command_within("show proc", connect_timeout, read_timeout)
            .await?;
        ProcList::parse(&reply).map_err(|reason| MasterError::UnexpectedReply {
            command: "show proc".into(),
            reason,
            reply,
        })
    }

    /// `reload`: asks the master to re-execute itself with the configuration now on disk.
    /// Returns once the master took the request; it says nothing about the outcome (see
    /// [`MasterCli::reload_and_confirm`]).
    pub async fn reload(&self) -> Result<(), MasterError> {
        match self.command("reload").await {
            Ok(reply) if reply.trim().is_empty() => Ok(()),
            Ok(reply) => Err(MasterError::Rejected {
                command: "reload".into(),
                reply,
            }),
            // The master may re-exec before our read completes.
            Err(MasterError::Io { source, .. })
                if matches!(
                    source.kind(),
                    io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Reloads and waits until `show proc` lists a current worker whose pid was not listed
    /// before the reload; returns that process list. Connection failures while the master
    /// re-executes are retried until `deadline` (the total time allowed) runs out. A
    /// configuration that fails to load is reported as [`MasterError::ReloadFailed`] as soon
    /// as the master is back (its reload count moved and `[failed: N]` is non-zero).
    pub async fn reload_and_confirm(&self, deadline: Duration) -> Result<ProcList, MasterError> {
        let started = Instant::now();
        let end = started + deadline;
        let remaining = |cap: Duration| cap.min(end.saturating_duration_since(Instant::now()));
        let before = self
            .show_proc_within(
                remaining(self.connect_timeout),
                remaining(self.read_timeout),
            )
            .await?;
        let seen: HashSet<u32> = before.pids().collect();
        self.reload().await?;
        tracing::info!(socket = %self.path.display(), "HAProxy reload requested");
        let mut last = None;
        loop {
            let now = Instant::now();
            if now >= end {
                return Err(MasterError::ReloadTimeout {
                    waited: now - started,
                    last: last.map(Box::new),
                });
            }
            match self
                .show_proc_within(
                    remaining(self.connect_timeout),
                    remaining(self.read_timeout),
                )
                .await
            {
                Ok(procs) => {
                    let new_worker = procs
                        .current_workers()
                        .map(|w| w.pid)
                        .find(|pid| !seen.contains(pid));
                    if let Some(pid) = new_worker {
                        tracing::info!(worker = pid, "HAProxy reload confirmed");
                        return Ok(procs);
                    }
                    if procs.master.reloads != before.master.reloads
                        && procs.master.failed_reloads > 0
                    {
                        return Err(MasterError::ReloadFailed {
                            failed_reloads: procs.master.failed_reloads,
                            procs,
                        });
                    }
                    last = Some(procs);
                }
                Err(e) if e.is_transient() => {
                    tracing::debug!(error = %e, "master not answering yet");
                }
                Err(e) => return Err(e),
            }
            sleep(remaining(RELOAD_POLL_INTERVAL)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // `show proc` replies captured from HAProxy 2.6.12-1+deb12u4.
    const AT_START: &str = "#<PID>          <type>          <reloads>       <uptime>        <version>      \n7691            master          0 [failed: 0]   0d00h00m56s     2.6.12-1+deb12u4\n# workers\n7692            worker          0               0d00h00m56s     2.6.12-1+deb12u4\n# programs\n\n";
    const AFTER_RELOAD: &str = "#<PID>          <type>          <reloads>       <uptime>        <version>      \n7691            master          1 [failed: 0]   0d00h01m16s     2.6.12-1+deb12u4\n# workers\n11023           worker          0               0d00h00m00s     2.6.12-1+deb12u4\n# old workers\n7692            worker          1               0d00h01m16s     2.6.12-1+deb12u4\n# programs\n\n";
    const AFTER_FAILED_RELOAD: &str = "#<PID>          <type>          <reloads>       <uptime>        <version>      \n7691            master          2 [failed: 1]   0d00h01m20s     2.6.12-1+deb12u4\n# workers\n11023           worker          1               0d00h00m04s     2.6.12-1+deb12u4\n# old workers\n7692            worker          2               0d00h01m20s     2.6.12-1+deb12u4\n# programs\n\n";
    // The older layout (2.0-2.4), from the management guide, with a relative-pid column.
    const OLD_FORMAT: &str = "#<PID>          <type>          <relative PID>  <reloads>       <uptime>        <version>\n1162            master          0               5               0d00h02m07s     2.0-dev3\n# workers\n1271            worker          1               1               0d00h00m00s     2.0-dev3\n# old workers\n1233            worker          [was: 1]        3               0d00h00m43s     2.0-dev3\n# programs\n1244            foo             -               0               0d00h00m00s     -\n";

    #[test]
    fn parses_show_proc_at_start() {
        let p = ProcList::parse(AT_START).unwrap();
        assert_eq!(
            p.master,
            MasterProc {
                pid: 7691,
                reloads: 0,
                failed_reloads: 0,
                uptime_sec: 56,
                version: "2.6.12-1+deb12u4".into()
            }
        );
        assert_eq!(
            p.workers,
            vec![Worker {
                pid: 7692,
                relative_pid: None,
                reloads: 0,
                uptime_sec: 56,
                version: "2.6.12-1+deb12u4".into(),
                old: false
            }]
        );
        assert!(p.programs.is_empty());
        assert_eq!(p.pids().collect::<Vec<_>>(), vec![7691, 7692]);
    }

    #[test]
    fn parses_show_proc_after_reload() {
        let p = ProcList::parse(AFTER_RELOAD).unwrap();
        assert_eq!(p.master.reloads, 1);
        let cur: Vec<u32> = p.current_workers().map(|w| w.pid).collect();
        let old: Vec<u32> = p.old_workers().map(|w| w.pid).collect();
        assert_eq!((cur, old), (vec![11023], vec![7692]));
        assert_eq!(p.old_workers().next().unwrap().uptime_sec, 76);
    }

    #[test]
    fn parses_show_proc_after_failed_reload() {
        let p = ProcList::parse(AFTER_FAILED_RELOAD).unwrap();
        assert_eq!((p.master.reloads, p.master.failed_reloads), (2, 1));
        // No new worker: the one from the last good reload is still current.
        assert_eq!(
            p.current_workers().map(|w| w.pid).collect::<Vec<_>>(),
            vec![11023]
        );
    }

    #[test]
    fn parses_older_show_proc_with_relative_pids() {
        let p = ProcList::parse(OLD_FORMAT).unwrap();
        assert_eq!((p.master.pid, p.master.reloads), (1162, 5));
        assert_eq!(p.workers[0].relative_pid, Some(1));
        assert_eq!(p.workers[1].relative_pid, Some(1));
        assert!(p.workers[1].old);
        assert_eq!(p.workers[1].reloads, 3);
        assert_eq!(p.programs[0].name, "foo");
    }

    #[test]
    fn refuses_non_show_proc_text() {
        let unknown = "Unknown command, but maybe one of the following ones is a better match:\n  reload                                  : reload haproxy\n\n";
        assert!(ProcList::parse(unknown).is_err());
        assert!(ProcList::parse("").is_err());
    }

    #[test]
    fn parses_uptimes() {
        assert_eq!(parse_uptime("0d00h01m16s"), Some(76));
        assert_eq!(
            parse_uptime("2d03h00m01s"),
            Some(2 * 86_400 + 3 * 3_600 + 1)
        );
        assert_eq!(parse_uptime("0d 0h00m16s"), Some(16));
        assert_eq!(parse_uptime("-"), None);
        assert_eq!(parse_uptime("12"), None);
    }

    #[tokio::test]
    async fn missing_socket_names_the_path() {
        let cli = MasterCli::new("/nonexistent/pgs/master.sock");
        let err = cli.show_proc().await.unwrap_err();
        assert_eq!(
            err.to_string(),
            "HAProxy master socket /nonexistent/pgs/master.sock: no such socket — is HAProxy \
             running in master-worker mode (-W -S)?"
        );
    }
}
