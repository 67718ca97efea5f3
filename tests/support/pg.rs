//! A real PostgreSQL cluster in a temp dir: initdb with a SCRAM password for one role, started
//! on a unix socket (and optionally a loopback port), fast shutdown and reap on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{dump_log, find_tool, stop_child, wait_for};

/// Debian keeps server binaries out of PATH, in /usr/lib/postgresql/<version>/bin.
pub fn bin_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("PGS_PG_BINDIR") {
        return Some(d.into());
    }
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("postgres").is_file())
        .collect();
    dirs.sort_by_key(|p| {
        p.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    dirs.pop()
}

/// postgres refuses to run as root; when we are root, it runs as the `postgres` user.
fn run_as() -> Option<(u32, u32)> {
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        if f.first() != Some(&"postgres") || f.len() < 4 {
            return None;
        }
        Some((f[2].parse().ok()?, f[3].parse().ok()?))
    })
}

fn command(tool: &str) -> Command {
    let mut c = Command::new(find_tool(tool).unwrap_or_else(|| panic!("{tool} not found")));
    if let Some((uid, gid)) = run_as() {
        use std::os::unix::process::CommandExt;
        c.uid(uid).gid(gid);
    }
    c.stdin(Stdio::null());
    c
}

fn chown(path: &Path) {
    if let Some((uid, gid)) = run_as() {
        std::os::unix::fs::chown(path, Some(uid), Some(gid)).unwrap();
    }
}

pub struct Postgres {
    child: Option<Child>,
    pub name: String,
    pub user: String,
    pub password: String,
    /// Directory holding the unix socket.
    pub socket_dir: PathBuf,
    /// The port in the socket name, and on loopback when `tcp` is set.
    pub port: u16,
    pub tcp: bool,
    pub log: PathBuf,
}

impl Postgres {
    /// Starts a cluster under `dir/<name>` whose superuser is `user` (SCRAM, password below) and
    /// whose `cluster_name` is `name`, so a query can tell which server answered.
    pub fn start(dir: &Path, name: &str, user: &str, tcp_port: Option<u16>) -> Postgres {
        let root = dir.join(name);
        let data = root.join("data");
        let socket_dir = root.join("sock");
        std::fs::create_dir_all(&socket_dir).unwrap();
        super::set_mode(&root, 0o755);
        chown(&root);
        chown(&socket_dir);
        let password = format!("pw-{name}-{}", std::process::id());
        let pwfile = root.join("pwfile");
        std::fs::write(&pwfile, &password).unwrap();
        chown(&pwfile);
        let log = root.join("postgres.log");
        let out = command("initdb")
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                user,
                "--auth=scram-sha-256",
                "--no-sync",
                "-E",
                "UTF8",
            ])
            .args(["--locale=C"])
            .arg(format!("--pwfile={}", pwfile.display()))
            .output()
            .expect("run initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::remove_file(&pwfile).unwrap();
        let logfile = std::fs::File::create(&log).unwrap();
        chown(&log);
        let port = tcp_port.unwrap_or(5432);
        let listen = if tcp_port.is_some() { "127.0.0.1" } else { "" };
        let child = command("postgres")
            .arg("-D")
            .arg(&data)
            .arg("-k")
            .arg(&socket_dir)
            .args(["-p", &port.to_string()])
            .args(["-c", &format!("listen_addresses={listen}")])
            .args(["-c", &format!("cluster_name={name}")])
            .args(["-c", "fsync=off", "-c", "log_connections=on"])
            .args(["-c", "shared_buffers=8MB", "-c", "max_connections=40"])
            .stdout(logfile.try_clone().unwrap())
            .stderr(logfile)
            .spawn()
            .expect("start postgres");
        let pg = Postgres {
            child: Some(child),
            name: name.to_owned(),
            user: user.to_owned(),
            password,
            socket_dir,
            port,
            tcp: tcp_port.is_some(),
            log,
        };
        wait_for(
            &format!("postgres {name} to accept connections"),
            Duration::from_secs(30),
            || {
                let ok = Command::new(find_tool("pg_isready").unwrap())
                    .arg("-q")
                    .arg("-h")
                    .arg(&pg.socket_dir)
                    .args(["-p", &port.to_string()])
                    .status()
                    .ok()?
                    .success();
                ok.then_some(())
            },
        );
        pg
    }

    /// The socket file HAProxy dials (`external.address`).
    pub fn socket_path(&self) -> PathBuf {
        self.socket_dir.join(format!(".s.PGSQL.{}", self.port))
    }

    /// A conninfo straight to this server over its socket, bypassing HAProxy.
    pub fn direct(&self) -> String {
        format!(
            "host={} port={} user={} dbname=postgres",
            self.socket_dir.display(),
            self.port,
            self.user
        )
    }

    /// The server's log, e.g. to prove a connection never reached it.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGINT: fast shutdown, which ends open sessions instead of waiting for them.
            stop_child(&mut child, libc::SIGINT, Duration::from_secs(10));
        }
        if std::thread::panicking() {
            dump_log(&format!("postgres {}", self.name), &self.log);
        }
    }
}
