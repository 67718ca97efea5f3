//! The real `pgs-agent -c CFG run` daemon as a child process: its stderr (the tracing log) goes
//! to a file the test reads, start-up waits for its first pass, and drop sends SIGTERM and
//! reaps it (dumping the log when the test failed). Also what daemon tests observe it with: a
//! systemd notify socket, HAProxy's reload count and runtime maps, an editor-style file write.

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{agent_bin, dump_log, socket_command, stop_child, wait_for, Haproxy};

/// How long a first pass may take before the daemon counts as hung.
const FIRST_PASS: Duration = Duration::from_secs(30);

pub struct AgentProcess {
    child: Option<Child>,
    pub log: PathBuf,
}

impl AgentProcess {
    /// Starts `pgs-agent -c CONFIG run --resync RESYNC`, logging to `log` (truncated), and
    /// waits until its first pass has finished (or failed).
    pub fn start(config: &Path, resync: u64, log: &Path) -> AgentProcess {
        Self::start_with_env(config, resync, log, &[])
    }

    /// `start` with extra environment (e.g. systemd's `NOTIFY_SOCKET` and `WATCHDOG_USEC`).
    pub fn start_with_env(
        config: &Path,
        resync: u64,
        log: &Path,
        env: &[(&str, &str)],
    ) -> AgentProcess {
        let logfile = std::fs::File::create(log).unwrap();
        let child = Command::new(agent_bin())
            .arg("-c")
            .arg(config)
            .args(["--log", "info", "run", "--resync", &resync.to_string()])
            .env_remove("PGS_CONFIG")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(logfile.try_clone().unwrap())
            .stderr(logfile)
            .spawn()
            .expect("start pgs-agent run");
        let mut a = AgentProcess {
            child: Some(child),
            log: log.to_owned(),
        };
        a.wait_for_pass_after(0, FIRST_PASS);
        a
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("agent running").id()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Passes finished or failed so far.
    pub fn passes(&self) -> usize {
        self.log_text()
            .lines()
            .filter(|l| l.contains("pass finished") || l.contains("pass failed"))
            .count()
    }

    /// Waits until more than `n` passes have ended; panics if the daemon exits meanwhile.
    pub fn wait_for_pass_after(&mut self, n: usize, timeout: Duration) {
        let what = format!("pgs-agent pass number {}", n + 1);
        wait_for(&what, timeout, || {
            self.assert_running();
            (self.passes() > n).then_some(())
        });
    }

    /// Where the log ends now, for `wait_for_log_after`.
    pub fn mark(&self) -> usize {
        self.log_text().len()
    }

    /// Waits until the log contains `needle`; returns the log.
    pub fn wait_for_log(&mut self, needle: &str, timeout: Duration) -> String {
        self.wait_for_log_after(0, needle, timeout)
    }

    /// Waits until the log written after `mark` contains `needle`; returns that part. The
    /// daemon logs a pass's steps when the pass ends, a moment after their effects show.
    pub fn wait_for_log_after(&mut self, mark: usize, needle: &str, timeout: Duration) -> String {
        wait_for(&format!("{needle:?} in the agent's log"), timeout, || {
            self.assert_running();
            let text = self.log_text();
            let new = text.get(mark..).unwrap_or_default();
            new.contains(needle).then(|| new.to_owned())
        })
    }

    fn assert_running(&mut self) {
        let child = self.child.as_mut().expect("agent running");
        if let Ok(Some(status)) = child.try_wait() {
            panic!("pgs-agent run exited unexpectedly: {status}");
        }
    }

    /// Sends `signal` (e.g. SIGHUP, what systemd's `ExecReload` sends).
    pub fn signal(&self, signal: i32) {
        unsafe {
            libc::kill(self.pid() as i32, signal);
        }
    }

    /// `kill -9`: no chance to finish anything. Reaps the process.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            stop_child(&mut child, libc::SIGKILL, Duration::from_secs(5));
        }
    }

    /// SIGTERM, then waits for the exit (SIGKILL after a grace period) and returns the status.
    pub fn stop(&mut self) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        stop_child(&mut child, libc::SIGTERM, Duration::from_secs(20));
        child.wait().ok()
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            dump_log("pgs-agent", &self.log);
        }
    }
}

/// A systemd notify socket stand-in: a unix datagram socket whose messages a thread collects
/// (so a sender never blocks on a full queue) until drop.
pub struct NotifySocket {
    pub path: PathBuf,
    messages: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl NotifySocket {
    pub fn bind(path: &Path) -> NotifySocket {
        let sock = UnixDatagram::bind(path).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let messages = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (m, s) = (messages.clone(), stop.clone());
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while !s.load(Ordering::Relaxed) {
                if let Ok(n) = sock.recv(&mut buf) {
                    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                    m.lock().unwrap().push(text);
                }
            }
        });
        NotifySocket {
            path: path.to_owned(),
            messages,
            stop,
            reader: Some(reader),
        }
    }

    pub fn messages(&self) -> Vec<String> {
        self.messages.lock().unwrap().clone()
    }

    /// Waits until a message starting with `prefix` arrived; returns it.
    pub fn wait_for(&self, prefix: &str, timeout: Duration) -> String {
        wait_for(&format!("sd_notify {prefix:?}"), timeout, || {
            self.messages().into_iter().find(|m| m.starts_with(prefix))
        })
    }
}

impl Drop for NotifySocket {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

/// The master's `reloads` count from `show proc` (one per reload, good or failed).
pub fn master_reloads(h: &Haproxy) -> u32 {
    let reply = socket_command(&h.master, "show proc").expect("show proc");
    reply
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(1) == Some(&"master")).then(|| f.get(2)?.parse().ok())?
        })
        .unwrap_or_else(|| panic!("no master line in show proc:\n{reply}"))
}

/// `show map` of `map` in the running HAProxy, as (key, value) pairs; `None` when the Runtime
/// API does not answer (e.g. for a moment during a reload).
pub fn runtime_map(h: &Haproxy, map: &Path) -> Option<Vec<(String, String)>> {
    let reply = socket_command(&h.admin, &format!("show map {}", map.display())).ok()?;
    Some(
        reply
            .lines()
            .filter_map(|l| {
                // `0x55d0c8a0 acme enabled`
                let mut f = l.split_whitespace().skip(1);
                Some((f.next()?.to_owned(), f.next()?.to_owned()))
            })
            .collect(),
    )
}

/// Whether `key` is in `map` in the running HAProxy (waits out a reload's brief silence).
pub fn runtime_map_has(h: &Haproxy, map: &Path, key: &str) -> bool {
    wait_for("HAProxy's Runtime API", Duration::from_secs(10), || {
        runtime_map(h, map)
    })
    .iter()
    .any(|(k, _)| k == key)
}

/// Replaces `path` the way editors and CI do: a temp file beside it, then rename.
pub fn replace_file(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp-edit");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}
