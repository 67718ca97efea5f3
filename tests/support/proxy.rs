//! A real HAProxy in master-worker mode, started exactly as the README says
//! (`haproxy -W -S master.sock -f pgs.cfg`), stopped and reaped on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{dump_log, find_tool, socket_command, stop_child, wait_for};

pub struct Haproxy {
    child: Option<Child>,
    pub cfg: PathBuf,
    pub master: PathBuf,
    pub admin: PathBuf,
    pub log: PathBuf,
}

impl Haproxy {
    pub fn start(cfg: &Path, master: &Path, admin: &Path, log: &Path) -> Haproxy {
        let logfile = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let child = Command::new(find_tool("haproxy").expect("haproxy"))
            .arg("-W")
            .arg("-S")
            .arg(master)
            .arg("-f")
            .arg(cfg)
            .stdin(Stdio::null())
            .stdout(logfile.try_clone().unwrap())
            .stderr(logfile)
            .spawn()
            .expect("start haproxy");
        let mut h = Haproxy {
            child: Some(child),
            cfg: cfg.to_owned(),
            master: master.to_owned(),
            admin: admin.to_owned(),
            log: log.to_owned(),
        };
        let admin = h.admin.clone();
        let child = h.child.as_mut().unwrap();
        wait_for("HAProxy's admin socket", Duration::from_secs(20), || {
            if let Ok(Some(status)) = child.try_wait() {
                dump_log("haproxy", log);
                panic!("haproxy exited during start-up: {status}");
            }
            socket_command(&admin, "show info")
                .ok()
                .filter(|r| r.contains("Pid:"))
                .map(|_| ())
        });
        h
    }

    /// Sends a Runtime API command and returns the reply.
    pub fn admin(&self, cmd: &str) -> String {
        socket_command(&self.admin, cmd).unwrap_or_else(|e| panic!("admin socket {cmd:?}: {e}"))
    }

    /// The pid of the current worker (unchanged pid = no reload happened).
    pub fn worker_pid(&self) -> u32 {
        self.admin("show info")
            .lines()
            .find_map(|l| l.strip_prefix("Pid: "))
            .and_then(|p| p.trim().parse().ok())
            .expect("Pid in show info")
    }

    /// `show stat` column `field` for proxy `px` and server/row `sv` (`BACKEND`, `FRONTEND`).
    pub fn stat(&self, px: &str, sv: &str, field: &str) -> u64 {
        let csv = self.admin("show stat");
        let mut lines = csv.lines();
        let header: Vec<&str> = lines
            .next()
            .unwrap()
            .trim_start_matches("# ")
            .split(',')
            .collect();
        let col = header.iter().position(|h| *h == field).unwrap();
        lines
            .map(|l| l.split(',').collect::<Vec<_>>())
            .find(|r| r.len() > col && r[0] == px && r[1] == sv)
            .map(|r| r[col].parse().unwrap_or(0))
            .unwrap_or_else(|| panic!("no stat row {px}/{sv}"))
    }

    /// Total sessions the backend has sent to its server.
    pub fn backend_sessions(&self, backend: &str) -> u64 {
        self.stat(backend, "BACKEND", "stot")
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn master_pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// `kill -9` of the master and its worker: no chance to finish anything. The master is
    /// reaped; the worker (whose parent is gone) is waited for until it has disappeared.
    pub fn kill9(&mut self) {
        let worker = self.worker_pid();
        if let Some(mut child) = self.child.take() {
            stop_child(&mut child, libc::SIGKILL, Duration::from_secs(5));
        }
        unsafe {
            libc::kill(worker as i32, libc::SIGKILL);
        }
        wait_for(
            "the killed HAProxy worker to go",
            Duration::from_secs(10),
            || {
                let stat = std::fs::read_to_string(format!("/proc/{worker}/stat")).ok();
                // Gone, or a zombie nobody reaps (its parent was killed).
                stat.is_none_or(|s| s.contains(") Z ")).then_some(())
            },
        );
    }

    /// Stops HAProxy and waits for it (a restart test starts a new one on the same files).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            stop_child(&mut child, libc::SIGTERM, Duration::from_secs(10));
        }
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            dump_log("haproxy", &self.log);
        }
    }
}
