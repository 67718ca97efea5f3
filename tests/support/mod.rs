//! Fixtures for integration tests: real HAProxy, real PostgreSQL clusters and the real
//! `pgs-agent` binary, each in its own temp dir, stopped and reaped on drop, with their logs
//! printed when the test failed.

#![allow(dead_code)] // each test module uses a different part of the kit

pub mod agent;
pub mod docker;
pub mod dockerd;
pub mod managed;
pub mod pg;
pub mod proxy;
pub mod stack;
pub mod tls;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub use pg::Postgres;
pub use proxy::Haproxy;

/// True when the tools a real-system test needs are installed. In CI
/// (`PGS_REQUIRE_INTEGRATION=1`) a missing tool fails the test instead of skipping it.
pub fn have_tools(tools: &[&str]) -> bool {
    let missing: Vec<&str> = tools
        .iter()
        .copied()
        .filter(|t| find_tool(t).is_none())
        .collect();
    if missing.is_empty() {
        return true;
    }
    let msg = format!("missing tools: {}", missing.join(", "));
    if std::env::var_os("PGS_REQUIRE_INTEGRATION").is_some() {
        panic!("{msg} (PGS_REQUIRE_INTEGRATION is set; .ci/run installs them)");
    }
    eprintln!("skipping: {msg}");
    false
}

/// Finds a tool on PATH, or PostgreSQL's server binaries in their Debian directory.
pub fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = std::env::split_paths(&path).collect();
    dirs.extend(pg::bin_dir());
    dirs.into_iter().map(|d| d.join(name)).find(|p| p.is_file())
}

/// The agent binary under test.
pub fn agent_bin() -> &'static str {
    env!("CARGO_BIN_EXE_pgs-agent")
}

/// Runs `pgs-agent ARGS` and returns its output.
pub fn agent(args: &[&str]) -> Output {
    Command::new(agent_bin())
        .args(args)
        .env_remove("PGS_CONFIG")
        .stdin(Stdio::null())
        .output()
        .expect("run pgs-agent")
}

/// Runs `pgs-agent -c CONFIG ARGS`, asserts success, returns stdout.
pub fn agent_ok(config: &Path, args: &[&str]) -> String {
    let mut all = vec!["-c", config.to_str().unwrap()];
    all.extend_from_slice(args);
    let out = agent(&all);
    assert!(
        out.status.success(),
        "pgs-agent {all:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A free loopback TCP port (bound and released; good enough for tests on one machine).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A temp dir that other users can traverse (PostgreSQL runs as `postgres` when we are root).
pub fn temp_dir() -> tempfile::TempDir {
    let dir = tempfile::Builder::new().prefix("pgs-").tempdir().unwrap();
    set_mode(dir.path(), 0o755);
    dir
}

pub fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Polls `f` until it returns `Some`, or panics with `what` after `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sends one command on a unix stream socket (HAProxy's Runtime API or master CLI) and reads
/// the reply to EOF. Independent of the agent's own client on purpose.
pub fn socket_command(path: &Path, cmd: &str) -> std::io::Result<String> {
    let mut s = UnixStream::connect(path)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(cmd.as_bytes())?;
    s.write_all(b"\n")?;
    // The master CLI answers only once our write side is closed.
    s.shutdown(std::net::Shutdown::Write)?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

/// Sends SIGTERM, waits up to `grace`, then SIGKILL; always reaps the child.
pub fn stop_child(child: &mut Child, signal: i32, grace: Duration) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    unsafe {
        libc::kill(child.id() as i32, signal);
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// A log file's text, for dumping when a test failed.
pub fn dump_log(label: &str, path: &Path) {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| format!("<{e}>"));
    let tail: Vec<&str> = text.lines().rev().take(80).collect();
    eprintln!("----- {label} ({}) -----", path.display());
    for line in tail.into_iter().rev() {
        eprintln!("{line}");
    }
}

/// Runs psql with the password in its environment (never in its arguments) and returns
/// (success, stdout, stderr).
pub fn psql(conninfo: &str, password: &str, sql: &str) -> (bool, String, String) {
    let out = Command::new(find_tool("psql").expect("psql"))
        .arg(conninfo)
        .args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-c", sql])
        .env("PGPASSWORD", password)
        .env("PGCONNECT_TIMEOUT", "10")
        .env_remove("PGSERVICE")
        .stdin(Stdio::null())
        .output()
        .expect("run psql");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        String::from_utf8_lossy(&out.stderr).trim().to_owned(),
    )
}

/// Sends a StartupMessage for `user` straight to pgs on `port` and returns the SQLSTATE and
/// message of the ErrorResponse it gets (panics on anything else).
pub fn raw_startup_error(port: u16, user: &str) -> (String, String) {
    let mut pairs: Vec<u8> = Vec::new();
    pairs.extend(b"user\0");
    pairs.extend(user.as_bytes());
    pairs.extend(b"\0database\0postgres\0\0");
    let mut m = Vec::new();
    m.extend((8 + pairs.len() as u32).to_be_bytes());
    m.extend((3u32 << 16).to_be_bytes());
    m.extend(pairs);
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(&m).unwrap();
    let mut reply = Vec::new();
    let _ = s.read_to_end(&mut reply);
    assert_eq!(
        reply.first(),
        Some(&b'E'),
        "not an ErrorResponse: {reply:?}"
    );
    let mut code = String::new();
    let mut message = String::new();
    for field in reply[5..].split(|&b| b == 0).filter(|f| !f.is_empty()) {
        let text = String::from_utf8_lossy(&field[1..]).into_owned();
        match field[0] {
            b'C' => code = text,
            b'M' => message = text,
            _ => {}
        }
    }
    (code, message)
}

/// A pgs layout made by `pgs-agent init`, with its listen port and its HTTP API port (its own,
/// so daemons of parallel tests never fight over the default API address).
pub struct Layout {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub port: u16,
    pub api_port: u16,
}

impl Layout {
    pub fn init() -> Layout {
        Self::init_with(temp_dir(), &[])
    }

    /// `init` into `dir` with extra arguments (e.g. `--tls-cert FILE`).
    pub fn init_with(dir: tempfile::TempDir, extra: &[&str]) -> Layout {
        let port = free_port();
        let api_port = free_port();
        let root = dir.path().join("pgs");
        let listen = format!("127.0.0.1:{port}");
        let api_listen = format!("127.0.0.1:{api_port}");
        let mut args = vec![
            "init",
            root.to_str().unwrap(),
            "--listen",
            &listen,
            "--api-listen",
            &api_listen,
        ];
        args.extend_from_slice(extra);
        let out = agent(&args);
        assert!(out.status.success(), "init: {out:?}");
        Layout {
            config: root.join("pgs.toml"),
            port,
            api_port,
            dir,
        }
    }

    pub fn root(&self) -> PathBuf {
        self.dir.path().join("pgs")
    }

    /// Rewrites pgs.toml with `edit` (which must change it).
    pub fn edit_settings(&self, edit: impl FnOnce(String) -> String) {
        let before = std::fs::read_to_string(&self.config).unwrap();
        let after = edit(before.clone());
        assert_ne!(before, after, "the settings edit changed nothing");
        std::fs::write(&self.config, after).unwrap();
    }

    /// Puts this layout's Docker objects under `prefix` (a test installation's).
    pub fn use_docker_prefix(&self, prefix: &str) {
        self.edit_settings(|s| s.replace("prefix = \"pgs\"", &format!("prefix = \"{prefix}\"")));
    }

    pub fn write_tenants(&self, json: &str) {
        std::fs::write(self.root().join("tenants.json"), json).unwrap();
    }

    pub fn render(&self) -> String {
        agent_ok(&self.config, &["render"])
    }

    /// Starts HAProxy on the rendered files the way the README says.
    pub fn start_haproxy(&self) -> Haproxy {
        Haproxy::start(
            &self.root().join("haproxy/pgs.cfg"),
            &self.root().join("run/master.sock"),
            &self.root().join("run/admin.sock"),
            &self.dir.path().join("haproxy.log"),
        )
    }

    /// A libpq conninfo for `user` through the pgs frontend.
    pub fn conninfo(&self, user: &str, extra: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user={user} dbname=postgres {extra}",
            self.port
        )
    }
}

/// A psql session kept open (one backend connection), fed queries on stdin.
pub struct Session {
    child: Child,
    stdin: Option<std::process::ChildStdin>,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Session {
    pub fn open(conninfo: &str, password: &str) -> Session {
        let mut child = Command::new(find_tool("psql").expect("psql"))
            .arg(conninfo)
            .args(["-X", "-A", "-t", "-q"])
            .env("PGPASSWORD", password)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start psql");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut s = Session {
            stdin: child.stdin.take(),
            child,
            lines,
        };
        assert!(s.query("select 1").is_some(), "session did not open");
        s
    }

    /// Runs one single-row, single-column query; None when the session is gone.
    pub fn query(&mut self, sql: &str) -> Option<String> {
        let stdin = self.stdin.as_mut()?;
        writeln!(stdin, "{sql};").ok()?;
        stdin.flush().ok()?;
        self.lines.recv_timeout(Duration::from_secs(10)).ok()
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        drop(self.stdin.take());
        stop_child(&mut self.child, libc::SIGTERM, Duration::from_secs(5));
    }
}

/// An exclusive lock shared by every checkout's suite on this machine, for tests that use a
/// machine-wide resource (installed packages, /etc); released on drop.
pub struct MachineLock(pgs_agent::fsutil::FileLock);

impl MachineLock {
    pub fn take(name: &str) -> MachineLock {
        let path = PathBuf::from(format!("/run/lock/{name}.lock"));
        MachineLock(
            pgs_agent::fsutil::FileLock::exclusive(&path)
                .unwrap_or_else(|e| panic!("lock {}: {e}", path.display())),
        )
    }
}
